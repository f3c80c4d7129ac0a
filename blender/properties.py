"""ctwin's typed state stored in the .blend: ``scene.ctwin`` (one property group).

Every Blender-layer module reads and writes the workflow's state here, never as loose custom
properties: the twin directory a scene renders, the CT and segmentation imported by "Import CT
Anatomy", the body model "Fit Body Model" used (so that "Build Rig" binds with the same one), the
fit itself, and the device the DRR engine computes on. The render engine's own options (output
value, method, physics) are in ``scene.ctwin_drr`` (``render/engine.py``).
"""
import json

import bpy

DEVICE_ITEMS = (
    ("auto", "Auto", "CUDA when a GPU is available, else CPU"),
    ("cpu", "CPU", "numba on the CPU"),
    ("cuda", "CUDA", "numba CUDA on the GPU"),
)


class CtwinSceneSettings(bpy.types.PropertyGroup):
    """Per-scene ctwin state."""

    twin_dir: bpy.props.StringProperty(
        name="Twin Directory",
        description="The twin directory this scene was built from and renders (docs/SPEC.md section 4)",
        subtype="DIR_PATH",
        default="",
        options={"PATH_SUPPORTS_BLEND_RELATIVE"},
    )
    ct_path: bpy.props.StringProperty(
        name="CT",
        description="The CT (file or DICOM folder) imported by Import CT Anatomy; the DRR engine renders "
                    "it when no twin or rig provides volumes",
        subtype="FILE_PATH",
        default="",
        options={"PATH_SUPPORTS_BLEND_RELATIVE"},
    )
    seg_path: bpy.props.StringProperty(
        name="Segmentation",
        description="The segmentation imported with the CT",
        subtype="FILE_PATH",
        default="",
        options={"PATH_SUPPORTS_BLEND_RELATIVE"},
    )
    body_model_path: bpy.props.StringProperty(
        name="Body Model",
        description="The SMPL-format body model of the fit (empty: the built-in model); Build Rig binds "
                    "with the same model",
        subtype="FILE_PATH",
        default="",
        options={"PATH_SUPPORTS_BLEND_RELATIVE"},
    )
    device: bpy.props.EnumProperty(
        name="Device",
        description="Where DRRs are computed",
        items=DEVICE_ITEMS,
        default="auto",
    )
    fit_json: bpy.props.StringProperty(
        name="Fit",
        description="The body-model fit of Fit Body Model (its JSON: pose, betas, translation, joints, metrics)",
        default="",
        options={"HIDDEN"},
    )

    def fit(self) -> dict | None:
        """The stored fit as a dict, or None before Fit Body Model."""
        return json.loads(self.fit_json) if self.fit_json else None


CLASSES = (CtwinSceneSettings,)


def abspath(path: str) -> str:
    """A stored path as an absolute one ('' stays ''): blend-relative paths resolved."""
    return bpy.path.abspath(path) if path else ""


def register():
    for cls in CLASSES:
        if not getattr(cls, "is_registered", False):
            bpy.utils.register_class(cls)
    bpy.types.Scene.ctwin = bpy.props.PointerProperty(type=CtwinSceneSettings)


def unregister():
    if hasattr(bpy.types.Scene, "ctwin"):
        del bpy.types.Scene.ctwin
    for cls in reversed(CLASSES):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
