"""The ctwin command line (SPEC section 3).

One handler serves ``./ctwin <command>`` from a clone and ``blender -b -c ctwin <command>`` inside
an installed Blender. Each command lives in ``commands/<name>.py`` and defines ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int`` (optionally ``DESCRIPTION``) and is listed in
``COMMAND_NAMES``. ``main()`` never raises SystemExit: it returns the exit status,
so Blender's command handler gets a plain int. Bad input (an unknown command, a bad argument, a
``CtwinError``) returns 2 with one line on stderr; so does a file-system refusal (permission denied,
a read-only or full disk, a folder where a file is meant: ``OSError``). An interrupt (Ctrl-C) returns
130 with one line, and Python's "Exception ignored" notes from objects torn down by the interrupt
are silenced. Progress goes to stderr. Anything else is a bug and is not hidden.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .core.errors import CtwinError

# The order in which commands are listed in --help.
COMMAND_NAMES = ("demo", "phantom", "build", "pose", "render", "dataset", "evaluate", "register")


class _ArgumentError(Exception):
    """A bad command line: the message is one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (exit status 2) instead of exiting."""

    def error(self, message):  # noqa: D102
        raise _ArgumentError(f"{self.prog}: error: {' '.join(str(message).split())}")


EXIT_CODES = ("exit status: 0 done; 2 refused (bad input, an implausible CT/segmentation pair, an output "
              "that would overwrite something, a damaged twin, a file-system error), with one line on "
              "stderr saying why; 130 interrupted (Ctrl-C). Partial files of an interrupted or killed "
              "run are removed by the next run.")


def version() -> str:
    """The extension's version from blender_manifest.toml ("unknown" if it cannot be read)."""
    try:
        import tomllib

        with open(Path(__file__).resolve().parent / "blender_manifest.toml", "rb") as f:
            return str(tomllib.load(f)["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def _command_modules() -> dict:
    return {name: importlib.import_module(f"{__package__}.commands.{name}") for name in COMMAND_NAMES}


def build_parser(prog: str = "ctwin") -> tuple[argparse.ArgumentParser, dict]:
    mods = _command_modules()
    parser = _Parser(
        prog=prog,
        description="ctwin: patient-specific articulated digital twins from CT, rendered as DRRs.",
        epilog=f"Run '{prog} <command> --help' for a command's options. {EXIT_CODES}",
    )
    parser.add_argument("--version", action="version", version=f"ctwin {version()}")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    sub = parser.add_subparsers(
        dest="command",
        metavar="<command>",
        parser_class=_Parser,
        title="commands",
    )
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
    return parser, mods


def main(argv=None, prog: str = "ctwin") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, mods = build_parser(prog)
    known = ", ".join(mods)
    no_command = f"{prog}: error: no command given (commands: {known}); see '{prog} --help'"
    i = 0
    while i < len(argv) and argv[i] == "--quiet":  # the only option that takes no exit
        i += 1
    if i < len(argv) and not argv[i].startswith("-") and argv[i] not in mods:
        print(f"{prog}: error: unknown command '{argv[i]}' (commands: {known})", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version print and "exit"
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        print(no_command, file=sys.stderr)
        return 2
    from .core import progress

    progress.set_quiet(args.quiet)
    _watch_interrupts()
    try:
        return int(mods[args.command].run(args) or 0)
    except CtwinError as exc:
        msg = " ".join(str(exc).split())
        print(f"{prog} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _silence_teardown_noise()
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"{prog} {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        progress.set_quiet(False)


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error: what went wrong and on which path."""
    what = exc.strerror or type(exc).__name__
    names = [n for n in (exc.filename, exc.filename2) if n]
    where = " -> ".join(str(n) for n in names)
    return " ".join(f"{what}: {where}".split()) if where else " ".join(f"{what} ({exc})".split())


_interrupted = False


def _silence_teardown_noise() -> None:
    global _interrupted
    _interrupted = True


def _watch_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered: objects torn down mid-write by
    it (an open ZipFile of np.savez) report their failed close as "Exception ignored in ...", which
    is noise once the command has stopped, so such reports are dropped after an interrupt."""
    import signal
    import threading

    global _interrupted
    _interrupted = False
    if getattr(sys.unraisablehook, "_ctwin", False) is False:
        default = sys.unraisablehook

        def hook(unraisable):  # noqa: ANN001
            if _interrupted or isinstance(unraisable.exc_value, KeyboardInterrupt):
                return
            default(unraisable)

        hook._ctwin = True
        sys.unraisablehook = hook
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        def on_sigint(signum, frame):  # noqa: ANN001
            global _interrupted
            _interrupted = True
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
