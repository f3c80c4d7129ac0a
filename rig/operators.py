"""Rig UI: "Load Motion" operator, the binding table as a UIList, the rig panel."""
from __future__ import annotations

import bpy
from bpy.props import CollectionProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from ..core import progress
from ..core.errors import CtwinError


def _rig_object(context):
    obj = context.active_object
    if obj is not None and obj.type != "ARMATURE" and obj.parent is not None and obj.parent.type == "ARMATURE":
        obj = obj.parent
    if obj is not None and obj.type == "ARMATURE" and "ctwin_pose0" in obj:
        return obj
    for o in context.scene.objects:
        if o.type == "ARMATURE" and "ctwin_pose0" in o:
            return o
    return None


class CtwinBindingItem(bpy.types.PropertyGroup):
    """One row of the binding table: a label and the armature bone it is bound to."""

    label: StringProperty(name="Label")
    bone: StringProperty(name="Bone")


class CTWIN_UL_binding(bpy.types.UIList):
    bl_idname = "CTWIN_UL_binding"

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index):
        row = layout.row(align=True)
        row.label(text=item.label, icon="BONE_DATA" if item.bone != "smooth" else "MOD_VERTEX_WEIGHT")
        row.label(text=item.bone)


class CTWIN_OT_load_motion(bpy.types.Operator, ImportHelper):
    """Import an AMASS-style motion (.npz) as keyframes on the twin's armature"""

    bl_idname = "ctwin.load_motion"
    bl_label = "Load Motion"
    bl_options = {"REGISTER", "UNDO"}
    filename_ext = ".npz"
    filter_glob: StringProperty(default="*.npz", options={"HIDDEN"})
    source_model: StringProperty(
        name="Source Model", subtype="FILE_PATH", default="",
        description="SMPL or SMPL+H model file the motion was made on (shaped by the file's betas); "
                    "empty: the built-in body model's skeleton")

    @classmethod
    def poll(cls, context):
        return _rig_object(context) is not None

    def execute(self, context):
        from .animation import load_motion_keyframes

        import warnings

        arm = _rig_object(context)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, n = load_motion_keyframes(arm, self.filepath, context.scene,
                                             source_model=bpy.path.abspath(self.source_model) or None)
        except CtwinError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        for w in caught:  # joint-range warnings: shown in Blender's status bar / info log
            self.report({"WARNING"}, str(w.message))
        progress.report(f"motion: {n} frames keyed on {arm.name}")
        self.report({"INFO"}, f"Loaded {n} frames")
        return {"FINISHED"}


class CTWIN_PT_rig(bpy.types.Panel):
    bl_idname = "CTWIN_PT_rig"
    bl_label = "Rig and Poses"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ctwin"

    def draw(self, context):
        layout = self.layout
        arm = _rig_object(context)
        if arm is None:
            layout.label(text="No ctwin armature in the scene")
            return
        layout.label(text=arm.name, icon="ARMATURE_DATA")
        layout.operator(CTWIN_OT_load_motion.bl_idname, icon="ANIM")
        layout.operator("ctwin.pose_from_xray", icon="IMAGE_BACKGROUND")
        layout.label(text="Binding (label -> bone)")
        layout.template_list("CTWIN_UL_binding", "", arm, "ctwin_binding_items", arm, "ctwin_binding_index", rows=6)


from .xray_pose import CTWIN_OT_pose_from_xray  # noqa: E402

CLASSES = (CtwinBindingItem, CTWIN_UL_binding, CTWIN_OT_load_motion, CTWIN_OT_pose_from_xray, CTWIN_PT_rig)


def register_props():
    bpy.types.Object.ctwin_binding_items = CollectionProperty(type=CtwinBindingItem)
    bpy.types.Object.ctwin_binding_index = bpy.props.IntProperty(default=0)


def unregister_props():
    for name in ("ctwin_binding_items", "ctwin_binding_index"):
        if hasattr(bpy.types.Object, name):
            delattr(bpy.types.Object, name)
