"""Operator "Fit Body Model" (thin layer over ``core.body.fit.fit_body_model``).

Inputs, in this order of preference:
- the CT and segmentation paths stored by the import operator (``scene.ctwin.ct_path`` /
  ``seg_path``): the labelmap is read from them;
- otherwise the bone meshes of the Skeleton collection, rasterised into a labelmap
  (``core.body.landmarks.labelmap_from_meshes``).
The skin is the Skin collection's ``skin`` object (or, with a CT path, ``core.meshes.mesh.skin_mesh``).
The fitted body appears as the mesh object ``body_model`` (collection "Body Model", LPS metres)
with the fit summary as custom properties. The fit (its JSON) and the body model file are kept in
``scene.ctwin`` (``fit_json``, ``body_model_path``), where Build Rig reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

import bpy
from bpy.props import BoolProperty, StringProperty

from ..blender import data as bl_data
from ..blender.properties import abspath
from ..blender.scene import anatomy_meshes, anatomy_objects
from ..core import progress
from ..core.errors import CtwinError

BODY_OBJECT = "body_model"
BODY_COLLECTION = "Body Model"


def _skin_from_scene():
    obj = bpy.data.objects.get("skin")
    if obj is None or obj.type != "MESH":
        return None
    return anatomy_meshes([obj])["skin"]


def _skeleton_meshes():
    from ..core.volumes.labels import is_skeletal

    return anatomy_meshes(o for o in anatomy_objects(("Skeleton",)) if is_skeletal(o.name))


def gather_inputs(context):
    """(skin Mesh, labelmap Volume or None, names, fov_box) from the scene; raises CtwinError."""
    from ..core.body.landmarks import labelmap_from_meshes

    scene = context.scene
    ct_path, seg_path = abspath(scene.ctwin.ct_path), abspath(scene.ctwin.seg_path)
    skin = _skin_from_scene()
    if ct_path and seg_path and Path(ct_path).exists() and Path(seg_path).exists():
        from ..core.volumes.ct import load_ct
        from ..core.volumes.segmentation import load_segmentation

        ct = load_ct(ct_path)
        labelmap, names = load_segmentation(seg_path, ct)
        if skin is None:
            from ..core.meshes.mesh import skin_mesh

            skin = skin_mesh(ct)
        return skin, labelmap, names, labelmap.bbox_world()
    if skin is None:
        raise CtwinError("no skin mesh: import CT anatomy first (object 'skin' in the Skin collection)")
    bones = _skeleton_meshes()
    lo, hi = skin.vertices.min(0), skin.vertices.max(0)
    if not bones:
        return skin, None, {}, (lo, hi)
    labelmap, names = labelmap_from_meshes(bones, spacing=3.0, box=(lo - 3.0, hi + 3.0))
    return skin, labelmap, names, (lo, hi)


def show_body(result):
    """Create or replace the ``body_model`` mesh object from a FitResult."""
    old = bpy.data.objects.get(BODY_OBJECT)
    if old is not None:
        mesh = old.data
        bpy.data.objects.remove(old)
        if mesh.users == 0:
            bpy.data.meshes.remove(mesh)
    col = bl_data.ensure_collection(BODY_COLLECTION)
    obj = bl_data.mesh_object(BODY_OBJECT, result.vertices_mm, result.faces, col)
    obj.data.materials.append(bl_data.material("ctwin_body_model", (0.35, 0.55, 0.85, 0.3)))
    props = {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    props.update({"fit_seconds": result.seconds, "pose": result.pose, "betas": result.betas,
                  "transl_mm": result.transl_mm})
    bl_data.set_custom_props(obj, props)
    return obj


class CTWIN_OT_fit_body_model(bpy.types.Operator):
    """Fit the body model (global pose, shape, body pose, non-rigid residual) to the imported anatomy"""

    bl_idname = "ctwin.fit_body_model"
    bl_label = "Fit Body Model"
    bl_options = {"REGISTER", "UNDO"}

    body_model_path: StringProperty(name="Body Model", subtype="FILE_PATH",
                                    description="SMPL .npz/.pkl file (empty: the built-in model); "
                                                "kept in the scene for Build Rig")
    residual: BoolProperty(name="Non-rigid Residual", default=True,
                           description="Fit per-vertex offsets so that the surface follows the skin")

    def execute(self, context):
        from ..core.body.body_model import load_body_model
        from ..core.body.fit import fit_body_model
        from .import_anatomy import _Progress

        try:
            with _Progress(context):
                skin, labelmap, names, box = gather_inputs(context)
                bm_path = bpy.path.abspath(self.body_model_path) if self.body_model_path else ""
                bm = load_body_model(bm_path or None)
                result = fit_body_model(bm, skin, labelmap, names, fov_box=box, residual=self.residual)
        except CtwinError as exc:
            self.report({"ERROR"}, " ".join(str(exc).split()))
            return {"CANCELLED"}
        show_body(result)
        state = context.scene.ctwin
        state.fit_json = json.dumps(result.to_json())
        state.body_model_path = bm_path  # Build Rig binds with the model the fit used
        m = result.metrics
        msg = f"fitted in {result.seconds:.1f} s: chamfer {m.get('chamfer_mm', float('nan')):.2f} mm"
        if "enclosure_pct" in m:
            msg += f", enclosure {m['enclosure_pct']:.2f} %"
        self.report({"INFO"}, msg)
        progress.report(msg)
        return {"FINISHED"}


CLASSES = (CTWIN_OT_fit_body_model,)
