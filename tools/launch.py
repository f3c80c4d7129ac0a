"""Run the ctwin CLI from a clone: loads the repository root as the package ``ctwin``.

The repository root is the Blender extension, whose package name is not fixed once installed, so
the code uses relative imports only; here we give it the name ``ctwin``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_package(name: str = "ctwin"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _main() -> int:
    """Run the CLI; Ctrl-C anywhere (while importing, or after the command, while Python shuts
    down) is exit status 130 with one line, never a traceback."""
    import signal

    try:
        load_package()
        from ctwin import cli  # noqa: E402  (the package exists only after load_package)

        rc = cli.main(sys.argv[1:])
    except KeyboardInterrupt:
        print("ctwin: interrupted", file=sys.stderr)
        rc = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command is over: let Python shut down
    return rc


if __name__ == "__main__":
    sys.exit(_main())
