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


def register():
    import bpy

    for cls in CLASSES:
        bpy.utils.register_class(cls)
    for menu, fn in MENUS:
        getattr(bpy.types, menu).append(fn)


def unregister():
    import bpy

    for menu, fn in reversed(MENUS):
        getattr(bpy.types, menu).remove(fn)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
