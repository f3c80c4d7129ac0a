"""Operators of the ctwin panel's later steps: Build Rig, X-ray Camera, Render DRR, Render Animation.

Thin: they collect Blender data, call the core, and write the results back into the scene.
"""
from __future__ import annotations

import bpy
import numpy as np
from bpy.props import EnumProperty, FloatProperty, IntProperty

from ..blender import data as bl_data
from ..blender.properties import abspath
from ..blender.scene import anatomy_meshes, anatomy_objects
from ..core import progress
from ..core.body.skeleton import MM_TO_M
from ..core.drr.carm import DEFAULT_SAD_MM, DEFAULT_SID_MM
from ..core.errors import CtwinError
from ..core.volumes.volume import apply_transform

RIG_COLLECTION = "Rig"
CONE_OBJECT = "xray_cone"
IMAGE_NAME = "ctwin DRR"

VIEW_ITEMS = [
    ("ap", "AP", "anteroposterior"), ("pa", "PA", "posteroanterior"),
    ("lat_left", "Lateral (left)", "left lateral"), ("lat_right", "Lateral (right)", "right lateral"),
    ("lao30", "LAO 30", "left anterior oblique 30 degrees"), ("rao30", "RAO 30", "right anterior oblique 30 degrees"),
    ("lao30_cran20", "LAO 30 / cranial 20", ""), ("caud20", "Caudal 20", ""),
]


def _fit_from_scene(context) -> dict:
    fit = context.scene.ctwin.fit()
    if fit is None:
        raise CtwinError("no fit in the scene: run Fit Body Model first")
    return {k: np.asarray(fit[k], dtype=np.float64) for k in ("pose", "betas", "transl_mm", "joints_mm")}


def anatomy_bbox_mm():
    """World (min, max) in mm of the imported CT (SPEC 5: the isocentre is the centre of the CT's
    bounding box), or of the meshes in the scene when there is no CT."""
    import os

    ct_path = abspath(bpy.context.scene.ctwin.ct_path)
    if ct_path and os.path.exists(ct_path):
        from ..core.volumes.ct import read_volume

        return read_volume(ct_path).bbox_world()
    pts = []
    for obj in bpy.context.scene.objects:
        if obj.type == "MESH" and obj.name != CONE_OBJECT:
            m = np.array(obj.matrix_world)
            c = np.array([list(v) for v in obj.bound_box], dtype=np.float64)
            pts.append(apply_transform(m, c) * bl_data.M_TO_MM)
    if not pts:
        raise CtwinError("nothing in the scene to aim the X-ray camera at: import anatomy first")
    p = np.concatenate(pts)
    return p.min(axis=0), p.max(axis=0)


class CTWIN_OT_build_rig(bpy.types.Operator):
    """Build the armature from the fitted skeleton and bind the anatomy (bones rigid, soft tissue smooth)"""

    bl_idname = "ctwin.build_rig"
    bl_label = "Build Rig"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        from ..core.rig.binding import bind_structures
        from ..core.body.body_model import load_body_model
        from ..rig.armature import bind_meshes, create_armature

        try:
            fit = _fit_from_scene(context)
            objects = {o.name: o for o in anatomy_objects()}
            if not objects:
                raise CtwinError("no anatomy in the scene: import CT anatomy or meshes first")
            bm = load_body_model(abspath(context.scene.ctwin.body_model_path) or None)  # the fit's model
            fit["residual_mm"] = None  # weights come from the parametric fit; the residual is small
            meshes = anatomy_meshes(objects.values())
            progress.report(f"binding {len(meshes)} structures")
            binding = bind_structures(meshes, bm, fit)
            old = bpy.data.objects.get("ctwin_rig")
            if old is not None:
                bpy.data.objects.remove(old)
            arm = create_armature(binding, collection=bl_data.ensure_collection(RIG_COLLECTION))
            bind_meshes(arm, objects, binding)
        except CtwinError as exc:
            self.report({"ERROR"}, " ".join(str(exc).split()))
            return {"CANCELLED"}
        self.report({"INFO"}, f"rig built: {len(binding.rigid)} rigid structures, {len(binding.soft)} smooth")
        return {"FINISHED"}


def _cone(scene, g):
    """A wire pyramid from the source to the detector corners, and the detector outline."""
    w, h = g.size_px
    du, dv = g.pixel_spacing_mm
    c = np.asarray(g.detector_center_mm)
    u, v = np.asarray(g.detector_u), np.asarray(g.detector_v)
    hw, hh = 0.5 * w * du, 0.5 * h * dv
    corners = [c - hw * u - hh * v, c + hw * u - hh * v, c + hw * u + hh * v, c - hw * u + hh * v]
    src = np.asarray(g.source_mm) if not g.parallel else None
    verts = corners + ([src] if src is not None else [k - g.sid_mm * g.normal for k in corners])
    verts = np.asarray(verts)
    if src is not None:
        edges = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 0), (4, 1), (4, 2), (4, 3)]
    else:
        edges = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]
    old = bpy.data.objects.get(CONE_OBJECT)
    if old is not None:
        me = old.data
        bpy.data.objects.remove(old)
        bpy.data.meshes.remove(me)
    me = bpy.data.meshes.new(CONE_OBJECT)
    me.from_pydata((verts * MM_TO_M).tolist(), edges, [])
    obj = bpy.data.objects.new(CONE_OBJECT, me)
    scene.collection.objects.link(obj)
    obj.hide_render = True
    obj.hide_select = True
    return obj


class CTWIN_OT_xray_camera(bpy.types.Operator):
    """Place the X-ray source (the scene camera) at a C-arm view of the anatomy and show the beam"""

    bl_idname = "ctwin.xray_camera"
    bl_label = "X-ray Camera"
    bl_options = {"REGISTER", "UNDO"}

    view: EnumProperty(name="View", items=VIEW_ITEMS, default="ap")
    sad_mm: FloatProperty(name="SAD (mm)", default=DEFAULT_SAD_MM, min=100.0, description="source to isocentre")
    sid_mm: FloatProperty(name="SID (mm)", default=DEFAULT_SID_MM, min=150.0, description="source to detector")
    pixels: IntProperty(name="Detector pixels", default=512, min=8, max=8192)

    def execute(self, context):
        from ..core.drr.carm import named_view
        from ..render.camera import set_xray_camera

        try:
            g = named_view(self.view, anatomy_bbox_mm(), sad_mm=self.sad_mm, sid_mm=self.sid_mm,
                           size=self.pixels)
            cam = set_xray_camera(context.scene, g)
            _cone(context.scene, g)
        except CtwinError as exc:
            self.report({"ERROR"}, " ".join(str(exc).split()))
            return {"CANCELLED"}
        if context.scene.render.engine != "CTWIN_DRR":
            context.scene.render.engine = "CTWIN_DRR"
        self.report({"INFO"}, f"{cam.name}: {self.view}, SID {self.sid_mm:g} mm, "
                              f"detector {g.detector_size_mm[0]:.0f} mm, {self.pixels} px")
        return {"FINISHED"}


def show_image(img: np.ndarray, name: str = IMAGE_NAME):
    """Put a float DRR into an image datablock (bulk) and show it in an Image Editor if one exists."""
    h, w = img.shape
    im = bpy.data.images.get(name)
    if im is None or tuple(im.size) != (w, h):
        if im is not None:
            bpy.data.images.remove(im)
        im = bpy.data.images.new(name, width=w, height=h, float_buffer=True, is_data=True)
    top = float(np.percentile(img, 99.7)) or 1.0
    g = np.clip(img / top, 0.0, 1.0)[::-1].astype(np.float32)  # Blender rows run bottom-up
    rgba = np.empty((h, w, 4), np.float32)
    rgba[..., :3] = g[..., None]
    rgba[..., 3] = 1.0
    im.pixels.foreach_set(rgba.reshape(-1))
    im.update()
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = im
                return im
    return im


class CTWIN_OT_render_drr(bpy.types.Operator):
    """Render the DRR of the current frame with the ctwin DRR engine and show it"""

    bl_idname = "ctwin.render_drr"
    bl_label = "Render DRR"

    def execute(self, context):
        from ..render.engine import render_frame

        scene = context.scene
        try:
            img, _, _ = render_frame(scene, depsgraph=context.evaluated_depsgraph_get(),
                                     write=scene.ctwin_drr.write_frames)
        except CtwinError as exc:
            self.report({"ERROR"}, " ".join(str(exc).split()))
            return {"CANCELLED"}
        show_image(img)
        self.report({"INFO"}, f"DRR {img.shape[1]}x{img.shape[0]} of frame {scene.frame_current}")
        return {"FINISHED"}


class CTWIN_OT_render_animation(bpy.types.Operator):
    """Render every frame of the scene's range with the ctwin DRR engine (.tif + .json per frame)"""

    bl_idname = "ctwin.render_animation"
    bl_label = "Render Animation"

    def execute(self, context):
        scene = context.scene
        if scene.render.engine != "CTWIN_DRR":
            scene.render.engine = "CTWIN_DRR"
        if scene.camera is None:
            self.report({"ERROR"}, "no X-ray camera: use X-ray Camera first")
            return {"CANCELLED"}
        bpy.ops.render.render(animation=True)
        n = scene.frame_end - scene.frame_start + 1
        self.report({"INFO"}, f"rendered {n} frames to {bpy.path.abspath(scene.render.filepath)}")
        return {"FINISHED"}


CLASSES = (CTWIN_OT_build_rig, CTWIN_OT_xray_camera, CTWIN_OT_render_drr, CTWIN_OT_render_animation)
