"""Where the DRR engine gets its volumes for a frame: providers + a resident module-level cache.

A provider is ``fn(scene, frame) -> object | None`` returning what ``core.drr.projector`` renders: a
``PreparedVolume`` (a static CT) or a ``core.drr.projector.Scene`` (a posed twin: resident arrays, with
the per-frame affines/warp already set). Providers are asked in order; the first non-None answer
wins. The built-in provider renders the scene's CT (``scene.ctwin.ct_path``) as a plain CT; the
providers of twins and of the panel workflow (``providers.py``) pose a Scene for the frame.

Volumes stay resident across frames and renders in ``_CACHE`` (keyed by path and mtime), so an
animation render loads the CT once and streams only the poses.
"""
from __future__ import annotations

import os

_CACHE: dict = {}
_PROVIDERS: list = []
_DEPSGRAPH = [None]


def set_depsgraph(depsgraph) -> None:
    """The depsgraph of the frame being rendered (set by the engine before asking providers)."""
    _DEPSGRAPH[0] = depsgraph


def evaluated(obj):
    """``obj`` as evaluated for the frame being rendered (animation, constraints applied)."""
    dg = _DEPSGRAPH[0]
    if dg is None:
        return obj
    try:
        return obj.evaluated_get(dg)
    except (ReferenceError, RuntimeError):
        return obj


def register_provider(fn, first: bool = True) -> None:
    if fn not in _PROVIDERS:
        _PROVIDERS.insert(0 if first else len(_PROVIDERS), fn)


def unregister_provider(fn) -> None:
    if fn in _PROVIDERS:
        _PROVIDERS.remove(fn)


def clear_cache() -> None:
    _CACHE.clear()


def cached(key, build):
    """The resident object for ``key``, built once with ``build()``."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def load_ct_cached(path: str):
    """A PreparedVolume for a CT file or DICOM folder, resident while the file is unchanged."""
    from ..core.errors import CtwinError
    from ..core.drr.projector import prepare_volume

    if not path or not os.path.exists(path):
        raise CtwinError(f"CT not found: {path!r} (set the CT in the ctwin DRR render settings)")
    key = ("ct", os.path.realpath(path), os.stat(path).st_mtime_ns)

    def build():
        from ..core.volumes.ct import load_ct

        for k in [k for k in _CACHE if k[:2] == key[:2]]:
            del _CACHE[k]  # an older version of the same file
        return prepare_volume(load_ct(path))

    return cached(key, build)


def ct_provider(scene, frame):
    import bpy

    settings = getattr(scene, "ctwin", None)
    if settings is None or not settings.ct_path:
        return None
    return load_ct_cached(bpy.path.abspath(settings.ct_path))


def volumes_for_frame(scene, frame):
    from ..core.errors import CtwinError

    for fn in list(_PROVIDERS) + [ct_provider]:
        obj = fn(scene, frame)
        if obj is not None:
            return obj
    raise CtwinError("nothing to render: set the CT in the ctwin DRR render settings or open a twin")
