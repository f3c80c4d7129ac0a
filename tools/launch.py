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


if __name__ == "__main__":
    load_package()
    from ctwin import cli  # noqa: E402  (the package exists only after load_package)

    sys.exit(cli.main(sys.argv[1:]))
