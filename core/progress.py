"""Progress reports on stderr (the CLI contract: progress goes to stderr, results to files).

Blender code may install its own sink (status bar, window manager progress) with ``set_sink``.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional

_sink: Optional[Callable[[str, Optional[float]], None]] = None
_quiet = False


def set_sink(sink: Optional[Callable[[str, Optional[float]], None]]) -> None:
    """Route reports to ``sink(message, fraction_or_None)`` instead of stderr (None restores stderr)."""
    global _sink
    _sink = sink


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def report(message: str, fraction: Optional[float] = None) -> None:
    """Report one step. ``fraction`` in [0, 1] where the work has a known size."""
    if _sink is not None:
        _sink(message, fraction)
        return
    if _quiet:
        return
    if fraction is None:
        print(f"[ctwin] {message}", file=sys.stderr, flush=True)
    else:
        print(f"[ctwin] {100.0 * fraction:5.1f}% {message}", file=sys.stderr, flush=True)


@contextmanager
def step(message: str):
    """Report the start and the duration of a step."""
    t0 = time.perf_counter()
    report(f"{message} ...")
    yield
    report(f"{message}: done in {time.perf_counter() - t0:.1f} s")
