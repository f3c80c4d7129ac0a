"""Blender layer: rig. Thin translation between Blender data and the core rig maths.

- ``rig.armature``: ``create_armature``, ``bind_meshes``, ``set_pose``, ``armature_pose``,
  ``armature_pose_vector(obj) -> (72,)`` (what the DRR engine reads for the current frame).
- ``rig.animation``: ``keyframe_poses`` (bulk F-curves), ``load_motion_keyframes``.
- ``rig.operators``: the "Load Motion" operator, the binding table UIList and the rig panel.
"""

from .operators import CLASSES, register_props, unregister_props


def register():
    import bpy

    for cls in CLASSES:
        if not cls.is_registered:
            bpy.utils.register_class(cls)
    register_props()


def unregister():
    import bpy

    unregister_props()
    for cls in reversed(CLASSES):
        if cls.is_registered:
            bpy.utils.unregister_class(cls)
