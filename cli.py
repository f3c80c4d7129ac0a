"""The ctwin command line (SPEC section 3).

One handler serves ``./ctwin <command>`` from a clone and ``blender -b -c ctwin <command>`` inside
an installed Blender. Each command lives in ``commands/<name>.py`` and defines ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; only commands that exist are listed.
Bad input exits 2 with one line on stderr; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .core.errors import CtwinError

# The order in which commands are listed in --help.
COMMAND_NAMES = ("demo", "phantom", "build", "pose", "render", "evaluate")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line and exits 2."""

    def error(self, message):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def _command_modules() -> dict:
    mods = {}
    for name in COMMAND_NAMES:
        full = f"{__package__}.commands.{name}"
        if importlib.util.find_spec(full) is None:
            continue
        mods[name] = importlib.import_module(full)
    return mods


def build_parser(prog: str = "ctwin") -> tuple[argparse.ArgumentParser, dict]:
    mods = _command_modules()
    parser = _Parser(
        prog=prog,
        description="ctwin: patient-specific articulated digital twins from CT, rendered as DRRs.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
    return parser, mods


def main(argv=None, prog: str = "ctwin") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, mods = build_parser(prog)
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from .core import progress

    progress.set_quiet(args.quiet)
    try:
        return int(mods[args.command].run(args) or 0)
    except CtwinError as exc:
        msg = " ".join(str(exc).split())
        print(f"{prog} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130
