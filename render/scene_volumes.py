"""Where the DRR engine gets its volumes for a frame: providers + a resident module-level cache.

A provider is ``fn(scene, frame) -> object | None`` returning what ``core.drr.projector`` renders: a
``PreparedVolume`` (a static CT) or a ``core.drr.projector.Scene`` (a posed twin: resident arrays, with
the per-frame affines/warp already set). Providers are asked in order; the first non-None answer
wins. The built-in provider renders the scene's CT (``scene.ctwin.ct_path``) as a plain CT; the
providers of twins and of the panel workflow (``providers.py``) pose a Scene for the frame.

Volumes stay resident across frames and renders in ``_CACHE`` (keyed by path and mtime), so an
animation render loads the CT once and streams only the poses.

Label materials (realistic physics): a provider whose volumes have a segmentation carries a
``labels(scene, mapping)`` attribute that returns its override materials for ``mapping`` ({label,
pattern or number: material}, ``core.drr.xray.parse_label_materials``): an object with ``materials``
(override materials by code), ``applied`` ({label: material}) and ``frame(obj)`` (the HU volume of
the provider's answer with the labels' voxels set to the override codes), as
``core.twin.label_materials.LabelOverrides`` has for twins.
"""
from __future__ import annotations

import os
import weakref

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


def drop(tag: str) -> None:
    """Remove the resident objects whose key starts with ``tag``."""
    for k in [k for k in _CACHE if k[0] == tag]:
        del _CACHE[k]


def cached(key, build):
    """The resident object for ``key``, built once with ``build()``."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def derived(obj, tag: str, build):
    """``build()``, made once per resident ``obj`` and ``tag`` (e.g. a CT's float16 copy); dropped
    when ``obj`` is no longer held."""
    for k in [k for k in _CACHE if k[0] == "derived" and _CACHE[k][0]() is None]:
        del _CACHE[k]
    key = ("derived", tag, id(obj))
    hit = _CACHE.get(key)
    if hit is None or hit[0]() is not obj:
        hit = _CACHE[key] = (weakref.ref(obj), build())
    return hit[1]


def mapping_key(mapping: dict) -> tuple:
    """A cache key of a label -> material mapping (its order counts: the first match wins)."""
    return tuple((str(k), str(v)) for k, v in mapping.items())


def check_applied(overrides, where: str):
    """``overrides`` when some label takes a material, else the CLI's one-line error."""
    from ..core.errors import CtwinError

    if not overrides.applied:
        raise CtwinError(f"no label of {where} takes a material (no label material entry, and no label named "
                         f"as an implant); add an entry LABEL = MATERIAL")
    return overrides


class FixedOverrides:
    """Label materials of a static CT: the HU volume with the override codes, the same every frame."""

    def __init__(self, volume, materials, applied):
        self.volume, self.materials, self.applied = volume, list(materials), dict(applied)

    def frame(self, obj):
        return self.volume


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


def ct_labels(scene, mapping: dict):
    """Label materials of the scene's plain CT from its segmentation (``scene.ctwin.seg_path``), as
    ``ctwin render --ct CT --seg SEG --label-material ...`` applies them (labels named as implants
    take their default metal)."""
    import bpy

    from ..core.errors import CtwinError

    settings = scene.ctwin
    ct_path = bpy.path.abspath(settings.ct_path)
    seg_path = bpy.path.abspath(settings.seg_path) if settings.seg_path else ""
    if not seg_path:
        raise CtwinError("label materials of a plain CT need its segmentation: import the CT with its "
                         "segmentation (Import CT Anatomy) or open a twin")
    if not os.path.exists(seg_path):
        raise CtwinError(f"segmentation not found: {seg_path!r}")
    load_ct_cached(ct_path)  # checks the CT
    key = ("ct-labels", os.path.realpath(ct_path), os.stat(ct_path).st_mtime_ns, os.path.realpath(seg_path),
           os.stat(seg_path).st_mtime_ns, mapping_key(mapping))

    def build():
        from ..core.drr.projector import prepare_volume
        from ..core.drr.xray import apply_label_materials
        from ..core.volumes.ct import load_ct
        from ..core.volumes.segmentation import load_segmentation

        drop("ct-labels")  # another CT, segmentation or mapping: one set of overrides stays resident
        ct = load_ct(ct_path)
        labelmap, names = load_segmentation(seg_path, ct)
        out, mats, applied = apply_label_materials(ct, labelmap, names, mapping, defaults=True)
        return FixedOverrides(prepare_volume(out), mats, applied)

    return check_applied(cached(key, build), "the segmentation")


ct_provider.labels = ct_labels


def _provide(scene, frame) -> tuple:
    """(the first provider's answer, that provider)."""
    from ..core.errors import CtwinError

    for fn in list(_PROVIDERS) + [ct_provider]:
        obj = fn(scene, frame)
        if obj is not None:
            return obj, fn
    raise CtwinError("nothing to render: set the CT in the ctwin DRR render settings or open a twin")


def volumes_for_frame(scene, frame):
    return _provide(scene, frame)[0]


def volumes_with_labels(scene, frame, mapping: dict) -> tuple:
    """(the frame's volumes, their label materials for ``mapping``; see the module docstring)."""
    from ..core.errors import CtwinError

    obj, fn = _provide(scene, frame)
    labels = getattr(fn, "labels", None)
    if labels is None:
        raise CtwinError(f"label materials need a segmentation, and the volume provider "
                         f"{getattr(fn, '__name__', fn)!s} has none")
    return obj, labels(scene, mapping)
