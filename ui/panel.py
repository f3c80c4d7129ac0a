"""Blender layer: the "ctwin" N-panel (3D View sidebar) that holds the whole workflow."""
import bpy


class CTWIN_PT_workflow(bpy.types.Panel):
    bl_idname = "CTWIN_PT_workflow"
    bl_label = "ctwin"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ctwin"

    def draw(self, context):
        layout = self.layout
        scene = context.scene
        col = layout.column(align=True)
        col.label(text="1. Anatomy", icon="IMPORT")
        col.operator("ctwin.import_ct_anatomy", text="Import CT Anatomy")
        col.operator("ctwin.import_anatomy_meshes", text="Import Meshes")
        col = layout.column(align=True)
        col.label(text="2. Body model", icon="OUTLINER_OB_ARMATURE")
        col.operator("ctwin.fit_body_model", text="Fit Body Model")
        col.operator("ctwin.build_rig", text="Build Rig")
        col.operator("ctwin.load_motion", text="Load Motion")
        col = layout.column(align=True)
        col.label(text="3. X-ray", icon="CAMERA_DATA")
        row = col.row(align=True)
        for view, text in (("ap", "AP"), ("lat_left", "Lateral"), ("lao30", "LAO 30"), ("rao30", "RAO 30")):
            row.operator("ctwin.xray_camera", text=text).view = view
        from ..core.drr.projector import device_status  # numba and the kernels: loaded on first draw, not on register

        line = device_status()  # asked once per session
        col.label(text=line, icon="INFO" if line.startswith("GPU path unavailable") else "CHECKMARK")
        col.operator("ctwin.render_drr", text="Render DRR", icon="RENDER_STILL")
        col.operator("ctwin.render_animation", text="Render Animation", icon="RENDER_ANIMATION")
        settings = getattr(scene, "ctwin", None)
        if settings is not None:
            col.prop(settings, "device")
            layout.prop(settings, "twin_dir")


CLASSES = (CTWIN_PT_workflow,)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
