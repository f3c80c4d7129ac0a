"""The "ctwin DRR" render engine: the scene camera is the X-ray source (SPEC 5).

F12 renders the current frame; Render Animation and ``blender -b FILE -a`` render each frame.
Each render puts the line-integral (or intensity/display) image into the render result (all of
R, G, B = the value, A = 1) and writes ``<output path><frame>.tif`` (32-bit float, one channel,
rows = detector rows) with its ``.json`` sidecar, atomically. Blender's own image saving is off
for this engine, so those are the frame files. An animation render skips frames whose .tif and
.json already hold this request (resume, ``core.safety.frame_to_skip``: the image reads back
whole and the sidecar matches the camera, size, value, method, sampling, noise and physics); it
reads them back into the render result instead. A damaged frame is rendered again; a frame written
for another request is an error unless "Overwrite frames" is on.
"""
from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np

from ..core.errors import CtwinError
from . import scene_volumes
from .camera import geometry_from_camera


def frame_stem(scene, frame: int) -> Path:
    """Output stem for a frame: Blender's frame path without its extension."""
    p = Path(bpy.path.abspath(scene.render.frame_path(frame=frame)))
    name = p.name
    for ext in p.suffixes:
        name = name[: -len(ext)] if name.endswith(ext) else name
    return p.with_name(name)


def render_frame(scene, frame: int | None = None, depsgraph=None, *, resume: bool = False,
                 write: bool = False):
    """Render the scene's DRR at ``frame`` (default: current). Returns (image float32, Geometry, info).

    Through the shared frame loop (``core.drr.frames.render_frames``): ``resume`` keeps a frame on disk
    that holds this request (an animation render), ``write`` writes the frame files. ``info``: the
    request's sidecar keys and the physics record. ``depsgraph``: the evaluated depsgraph whose
    animated objects the volume providers read; it is only held during this call (a depsgraph
    outlives neither its render nor a file load)."""
    from ..core.drr.frames import FrameView, render_frames

    frame = scene.frame_current if frame is None else frame
    s = scene.ctwin_drr
    g, info = frame_request(scene, frame)
    view = FrameView("drr", frame_stem(scene, frame), g, g.to_sidecar(**info, blend=bpy.data.filepath))
    rec = {}

    def render(f, v, state, record):
        scene_volumes.set_depsgraph(depsgraph)
        try:
            li = _line_integral(scene, f, v.geometry, info["device"], xray, record)
        finally:
            scene_volumes.set_depsgraph(None)
        rec.update(record)
        return li

    xray = _xray_setup(s, frame) if s.kvp > 0 else None
    images = render_frames([(frame, [view])], render, value=s.value, photons=s.photons or None,
                           electronic_sigma=s.electronic_noise, seed=s.seed, xray=xray,
                           overwrite=s.overwrite_frames, resume=resume, write=write, keep_images=True,
                           remedy="set another output path or turn on Overwrite frames")
    info.update(rec)
    return images["drr"], g, info


def _xray_setup(s, frame):
    from ..core.drr.xray import XraySetup

    return XraySetup(kvp=s.kvp, filter_al_mm=s.filter_al_mm, filter_cu_mm=s.filter_cu_mm,
                     detector=s.detector, focal_spot_mm=s.focal_spot_mm, photons=s.photons or None,
                     scatter=s.scatter, grid_ratio=s.grid_ratio or None, grid_lines_per_cm=s.grid_lines,
                     electronic_sigma=s.electronic_noise or None, seed=s.seed + frame)


def frame_request(scene, frame: int) -> tuple:
    """(Geometry, sidecar keys) that a render of ``frame`` writes before its measured physics
    record: the camera geometry, the output value, method, device, sampling, noise and, with a kVp,
    every physics option. A resumed animation keeps a frame on disk only when its sidecar has these
    values (``core.safety.frame_to_skip``), as the CLI's ``render`` does."""
    from ..core.drr.projector import resolve_device
    from ..core.safety import request_keys

    s, state = scene.ctwin_drr, scene.ctwin
    g = geometry_from_camera(scene)
    step = s.step_mm if s.step_mm > 0 else None
    photons = s.photons or None
    info = {"frame": int(frame), "value": s.value, "device": resolve_device(state.device), "method": s.method,
            "kvp": s.kvp or None, "photons": photons,
            "ct_path": bpy.path.abspath(state.ct_path) if state.ct_path else None}
    xr = _xray_setup(s, frame) if s.kvp > 0 else None
    if xr is None:
        info.update(request_keys(step, photons, s.electronic_noise, s.seed + frame))
    else:  # the physics record carries the noise options itself
        info.update(request_keys(step, None, 0.0, 0, xr))
    return g, info


def _line_integral(scene, frame, g, device, xray, record):
    """The frame's line integral: the volume provider's volume or posed scene (SPEC 5 mu, or
    -ln(I/I0) through ``xray``: posed scenes are composed onto one HU grid first)."""
    from ..core.drr.projector import (PreparedVolume, Scene, frame_volume, render_drr, render_scene,
                                  xray_line_integral)

    s = scene.ctwin_drr
    step = s.step_mm if s.step_mm > 0 else None
    obj = scene_volumes.volumes_for_frame(scene, frame)
    if not isinstance(obj, (Scene, PreparedVolume)):
        raise CtwinError(f"the volume provider returned {type(obj).__name__}, not a volume or scene")
    if xray is not None:
        vol = frame_volume(obj)
        return xray_line_integral(vol, g, xray, method=s.method if vol is obj else "trilinear",
                                  step_mm=step, device=device, record=record)
    if isinstance(obj, Scene):
        return render_scene(obj, g, step_mm=step, device=device)
    return render_drr(obj, g, method=s.method, step_mm=step, device=device)


class CTWIN_DRR_RenderEngine(bpy.types.RenderEngine):
    bl_idname = "CTWIN_DRR"
    bl_label = "ctwin DRR"
    bl_use_preview = False
    bl_use_postprocess = False
    bl_use_image_save = False
    bl_use_eevee_viewport = True

    def render(self, depsgraph):
        scene = depsgraph.scene_eval  # evaluated: the camera's animated matrix at this frame
        frame = scene.frame_current
        W = max(1, int(scene.render.resolution_x * scene.render.resolution_percentage / 100))
        H = max(1, int(scene.render.resolution_y * scene.render.resolution_percentage / 100))
        try:
            self.update_stats("ctwin DRR", f"frame {frame}: projecting")
            img, _, _ = render_frame(scene, frame, depsgraph, resume=self.is_animation,
                                     write=scene.ctwin_drr.write_frames or self.is_animation)
        except CtwinError as exc:
            self.report({"ERROR"}, str(exc))
            img = np.zeros((H, W), np.float32)
        if img.shape != (H, W):
            self.report({"ERROR"}, f"image {img.shape} does not match the resolution {W}x{H}")
            img = np.zeros((H, W), np.float32)
        rgba = np.empty((H, W, 4), np.float32)
        rgba[..., :3] = img[::-1, :, None]  # Blender's rows run bottom to top
        rgba[..., 3] = 1.0
        result = self.begin_result(0, 0, W, H)
        result.layers[0].passes["Combined"].rect = rgba.reshape(-1, 4)
        self.end_result(result)


class CTWIN_DRR_Settings(bpy.types.PropertyGroup):
    """The engine's render options; the CT and the device are the scene's ctwin state (``scene.ctwin``)."""

    method: bpy.props.EnumProperty(name="Method", items=[
        ("trilinear", "Trilinear", "ray marching through the trilinear mu field"),
        ("siddon", "Siddon", "exact integral of the nearest-voxel mu field"),
        ("exact", "Exact trilinear", "exact integral of the trilinear mu field")], default="trilinear")
    value: bpy.props.EnumProperty(name="Output", items=[
        ("line_integral", "Line integral", "integral of mu along the ray"),
        ("intensity", "Intensity", "Beer-Lambert I/I0"),
        ("display", "Display", "log display in [0, 1]"),
        ("radiograph", "Radiograph", "for presentation: log signal, per-image window, bone bright")],
        default="line_integral")
    step_mm: bpy.props.FloatProperty(name="Step (mm)", default=0.0, min=0.0,
                                     description="trilinear step; 0 = half the smallest voxel")
    kvp: bpy.props.FloatProperty(name="kVp", default=0.0, min=0.0, max=150.0,
                                 description="realistic physics, SpekPy spectrum (40-150); 0 = monoenergetic")
    filter_al_mm: bpy.props.FloatProperty(name="Added Al (mm)", default=0.0, min=0.0)
    filter_cu_mm: bpy.props.FloatProperty(name="Added Cu (mm)", default=0.0, min=0.0)
    detector: bpy.props.EnumProperty(name="Detector", items=[
        ("ideal", "Ideal", "absorbs every photon, no blur"),
        ("paxscan4030cb", "PaxScan 4030CB", "C-arm flat panel, 600 um CsI"),
        ("pixium4343", "Pixium 4343RC", "radiography panel, CsI")], default="ideal")
    focal_spot_mm: bpy.props.FloatProperty(name="Focal spot (mm)", default=0.0, min=0.0)
    scatter: bpy.props.BoolProperty(name="Scatter", default=False,
                                    description="first-order scatter (kernel model; SPR in the frame's sidecar)")
    grid_ratio: bpy.props.FloatProperty(name="Grid ratio", default=0.0, min=0.0, max=40.0,
                                        description="anti-scatter grid ratio; 0 = no grid")
    grid_lines: bpy.props.FloatProperty(name="Grid lines/cm", default=40.0, min=5.0, max=200.0)
    photons: bpy.props.FloatProperty(name="Photons/pixel", default=0.0, min=0.0,
                                     description="Poisson noise; 0 = noiseless")
    electronic_noise: bpy.props.FloatProperty(name="Electronic noise", default=0.0, min=0.0,
                                              description="counts; with kVp, 0 = the detector's own")
    seed: bpy.props.IntProperty(name="Seed", default=0, min=0)
    overwrite_frames: bpy.props.BoolProperty(
        name="Overwrite frames", default=False,
        description="an animation render replaces frames written for other settings; "
                    "off: such a frame stops the render with an error (matching frames are skipped)")
    write_frames: bpy.props.BoolProperty(
        name="Write frames on F12", default=True,
        description="also write the .tif and .json to the output path for still renders")


class CTWIN_DRR_PT_settings(bpy.types.Panel):
    bl_label = "ctwin DRR"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "render"
    COMPAT_ENGINES = {"CTWIN_DRR"}

    @classmethod
    def poll(cls, context):
        return context.engine in cls.COMPAT_ENGINES

    def draw(self, context):
        s = context.scene.ctwin_drr
        col = self.layout.column()
        col.prop(context.scene.ctwin, "ct_path")
        col.prop(context.scene.ctwin, "device")
        for name in ("method", "value", "step_mm", "kvp", "filter_al_mm", "filter_cu_mm",
                     "detector", "focal_spot_mm", "scatter", "grid_ratio", "grid_lines", "photons",
                     "electronic_noise", "seed", "write_frames", "overwrite_frames"):
            col.prop(s, name)


_COMPAT_PANELS = ("RENDER_PT_format", "RENDER_PT_frame_range", "RENDER_PT_output", "DATA_PT_lens",
                  "DATA_PT_camera", "DATA_PT_camera_display", "RENDER_PT_color_management")


def register_compat():
    for name in _COMPAT_PANELS:
        p = getattr(bpy.types, name, None)
        if p is not None and hasattr(p, "COMPAT_ENGINES"):
            p.COMPAT_ENGINES.add("CTWIN_DRR")


def unregister_compat():
    for name in _COMPAT_PANELS:
        p = getattr(bpy.types, name, None)
        if p is not None and hasattr(p, "COMPAT_ENGINES"):
            p.COMPAT_ENGINES.discard("CTWIN_DRR")
