"""Blender layer: operators. Thin translation between Blender data and the core.

To add operators: import the classes here and append them to ``CLASSES`` (registered in order);
File-menu entries go in ``MENUS`` as ``(menu_type_name, draw_function)`` pairs.
"""
from .import_anatomy import CTWIN_OT_import_anatomy_meshes, CTWIN_OT_import_ct_anatomy, menu_import
from .fit import CTWIN_OT_fit_body_model
from .workflow import CLASSES as WORKFLOW_CLASSES

CLASSES = (
    CTWIN_OT_import_ct_anatomy,
    CTWIN_OT_import_anatomy_meshes,
    CTWIN_OT_fit_body_model,
    *WORKFLOW_CLASSES,
)

MENUS = (
    ("TOPBAR_MT_file_import", menu_import),
)


_menus_added = False


def register():
    """Register the operators (idempotent: classes already registered are skipped)."""
    import bpy

    global _menus_added
    for cls in CLASSES:
        if not getattr(cls, "is_registered", False):
            bpy.utils.register_class(cls)
    if not _menus_added:
        for menu, fn in MENUS:
            getattr(bpy.types, menu).append(fn)
        _menus_added = True


def unregister():
    import bpy

    global _menus_added
    if _menus_added:
        for menu, fn in reversed(MENUS):
            getattr(bpy.types, menu).remove(fn)
        _menus_added = False
    for cls in reversed(CLASSES):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
