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

# State that earlier versions kept as loose scene custom properties -> its field in scene.ctwin.
_LOOSE = {"ctwin_ct_path": "ct_path", "ctwin_seg_path": "seg_path", "ctwin_fit": "fit_json",
          "ctwin_body_model_path": "body_model_path", "ctwin_twin_dir": "twin_dir"}
# ... and fields earlier versions had in the engine's settings (scene.ctwin_drr).
_ENGINE_FIELDS = ("ct_path", "device")


def migrate_scene(scene) -> list:
    """Move the ctwin state of a .blend written by an earlier version into ``scene.ctwin``:
    the loose custom properties (``scene["ctwin_fit"]``, ...) and the CT and device of the engine's
    settings. Returns the keys moved. A value already set in ``scene.ctwin`` wins, except the
    twin directory, where the loose one was the more specific (a copy of a twin's scene saved
    elsewhere)."""
    state = scene.ctwin
    moved = []
    for key, attr in _LOOSE.items():
        if key not in scene.keys():
            continue
        value = scene[key]
        if isinstance(value, str) and value and (attr == "twin_dir" or not getattr(state, attr)):
            setattr(state, attr, value)
        del scene[key]
        moved.append(key)
    engine = getattr(scene, "ctwin_drr", None)
    if engine is not None:
        for key in _ENGINE_FIELDS:
            if key not in engine.keys():
                continue
            value = engine[key]
            if key == "ct_path" and isinstance(value, str) and value and not state.ct_path:
                state.ct_path = value
            elif key == "device" and isinstance(value, int) and 0 < value < len(DEVICE_ITEMS) \
                    and state.device == "auto":
                state.device = DEVICE_ITEMS[value][0]  # stored as the enum's index, same order
            del engine[key]
            moved.append(f"ctwin_drr.{key}")
    return moved


@bpy.app.handlers.persistent
def _migrate_on_load(_filepath):
    for scene in bpy.data.scenes:
        migrate_scene(scene)


def abspath(path: str) -> str:
    """A stored path as an absolute one ('' stays ''): blend-relative paths resolved."""
    return bpy.path.abspath(path) if path else ""


def register():
    for cls in CLASSES:
        if not getattr(cls, "is_registered", False):
            bpy.utils.register_class(cls)
    bpy.types.Scene.ctwin = bpy.props.PointerProperty(type=CtwinSceneSettings)
    if _migrate_on_load not in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.append(_migrate_on_load)


def unregister():
    if _migrate_on_load in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_migrate_on_load)
    if hasattr(bpy.types.Scene, "ctwin"):
        del bpy.types.Scene.ctwin
    for cls in reversed(CLASSES):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
