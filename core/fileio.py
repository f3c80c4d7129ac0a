"""Atomic file writing: outputs appear whole or not at all."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path in the same folder; rename it onto ``path`` on success.

    The temporary name keeps the final extension (``suffix`` overrides it) so that writers that
    look at the extension (nibabel, SimpleITK, tifffile) pick the right format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        name = path.name
        suffix = name[name.index("."):] if "." in name else ""
    # The name carries the process id (core.safety.partial_tag) so that the next run can remove
    # what a killed writer left without touching the files of a writer that still runs.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}-", suffix=f".part{suffix}",
                               dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path, data, indent: int = 2) -> None:
    """Write JSON atomically; numpy arrays and scalars are converted."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent, default=_json_default)
            f.write("\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)
