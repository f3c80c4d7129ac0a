"""Blender layer: ctwin's settings stored in the .blend (``scene.ctwin``).

A thin scaffold: the Blender-layer modules (operators, rig, render, ui) read and write these
settings; the work itself is done by ``core``. Add fields here, keep them plain data.
"""
import bpy


class CtwinSceneSettings(bpy.types.PropertyGroup):
    """Per-scene ctwin settings."""

    twin_dir: bpy.props.StringProperty(
        name="Twin Directory",
        description="The twin directory (SPEC section 4) this scene was built from or renders",
        subtype="DIR_PATH",
        default="",
        options={"PATH_SUPPORTS_BLEND_RELATIVE"},
    )
    device: bpy.props.EnumProperty(
        name="Device",
        description="Where DRRs are computed",
        items=(
            ("AUTO", "Auto", "CUDA when a GPU is available, else CPU"),
            ("CPU", "CPU", "numba on the CPU"),
            ("CUDA", "CUDA", "numba CUDA on the GPU"),
        ),
        default="AUTO",
    )


CLASSES = (CtwinSceneSettings,)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.ctwin = bpy.props.PointerProperty(type=CtwinSceneSettings)


def unregister():
    if hasattr(bpy.types.Scene, "ctwin"):
        del bpy.types.Scene.ctwin
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
