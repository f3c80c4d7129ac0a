"""Blender layer: render. The "ctwin DRR" render engine (engine.py), camera <-> X-ray geometry
(camera.py), the per-frame volume lookup with its resident cache (scene_volumes.py) and the
providers of twins and of the panel workflow (providers.py)."""


def _classes():
    from .engine import (CTWIN_DRR_LabelMaterial, CTWIN_DRR_PT_settings, CTWIN_DRR_RenderEngine,
                         CTWIN_DRR_Settings, CTWIN_OT_label_material_add, CTWIN_OT_label_material_remove,
                         CTWIN_UL_label_materials)

    return (CTWIN_DRR_LabelMaterial, CTWIN_DRR_Settings, CTWIN_DRR_RenderEngine, CTWIN_UL_label_materials,
            CTWIN_OT_label_material_add, CTWIN_OT_label_material_remove, CTWIN_DRR_PT_settings)


CLASSES = ()  # filled on register (importing bpy types lazily keeps the package bpy-free)


def register():
    """Register the engine, its settings and panel (idempotent: registered classes are skipped)."""
    import bpy

    global CLASSES
    CLASSES = _classes()
    for cls in CLASSES:
        if not getattr(cls, "is_registered", False):
            bpy.utils.register_class(cls)
    if not hasattr(bpy.types.Scene, "ctwin_drr"):
        bpy.types.Scene.ctwin_drr = bpy.props.PointerProperty(type=CLASSES[1])
    from . import providers, scene_volumes
    from .engine import register_compat

    register_compat()
    for fn in providers.PROVIDERS:
        scene_volumes.register_provider(fn)


def unregister():
    import bpy

    from . import providers, scene_volumes
    from .engine import unregister_compat

    for fn in reversed(providers.PROVIDERS):
        scene_volumes.unregister_provider(fn)
    unregister_compat()
    if hasattr(bpy.types.Scene, "ctwin_drr"):
        del bpy.types.Scene.ctwin_drr
    for cls in reversed(CLASSES):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
