"""Packages the CLI uses that the Blender extension does not bundle (tools/build_extension.py
BUNDLED lists what it does): importing one where it is absent is one clear error line."""
from __future__ import annotations

import importlib

from .errors import CtwinError


def require(module: str, dist: str, what: str):
    """Import ``module`` or raise CtwinError saying that ``what`` needs the distribution ``dist``,
    which an installed extension does not bundle, and how to run it instead."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CtwinError(
            f"{what} needs {dist}, which is not installed here (the Blender extension does not "
            f"bundle it); run it from a clone's environment (tools/setup.sh, then ./ctwin) or "
            f"pip install {dist}") from None
