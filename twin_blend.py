"""Blender layer: build a twin's scene (``twin.blend``) from a twin directory.

Translation only: the anatomy meshes, the armature and its binding, the fitted body model, an X-ray
camera at the AP metric view, and the "ctwin DRR" engine selected. The scene stores the twin
directory relative to the .blend file, so the engine renders the twin's articulated CT at the
armature's pose in each frame.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MM = 0.001  # Blender units (metres) per mm


def ensure_registered() -> None:
    """Register the extension's classes when running from a clone (the bpy module, no install)."""
    import bpy

    engines = {cls.bl_idname for cls in bpy.types.RenderEngine.__subclasses__()
               if getattr(cls, "is_registered", False)}
    if "CTWIN_DRR" in engines:
        return
    from . import register

    register()


def set_xray_camera(scene, geometry, name: str = "xray_source"):
    """Create or update the scene camera so that it is the X-ray source of ``geometry``.

    The camera looks down its local -Z, local +X is the detector's u (columns) and local -Y its v
    (rows). Perspective = cone beam with lens/sensor matching SID/detector width; orthographic =
    parallel beam with ortho_scale = detector width. Detector size and SID are custom properties.
    """
    import bpy
    from mathutils import Matrix

    g = geometry
    cam_data = bpy.data.cameras.get(name) or bpy.data.cameras.new(name)
    cam = bpy.data.objects.get(name) or bpy.data.objects.new(name, cam_data)
    if cam.name not in scene.collection.objects:
        scene.collection.objects.link(cam)
    src = np.asarray(g.source_mm, dtype=np.float64)
    det = np.asarray(g.detector_center_mm, dtype=np.float64)
    d = det - src
    sid = float(np.linalg.norm(d))
    u = np.asarray(g.detector_u, dtype=np.float64)
    v = np.asarray(g.detector_v, dtype=np.float64)
    rot = np.column_stack([u, -v, -d / sid])
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = src * MM
    cam.matrix_world = Matrix(m.tolist())
    w, h = g.size_px
    du, dv = g.pixel_spacing_mm
    width_mm, height_mm = w * du, h * dv
    cam_data.sensor_fit = "HORIZONTAL"
    cam_data.sensor_width = width_mm
    cam_data.sensor_height = height_mm
    if g.parallel:
        cam_data.type = "ORTHO"
        cam_data.ortho_scale = width_mm * MM
    else:
        cam_data.type = "PERSP"
        cam_data.lens_unit = "MILLIMETERS"
        cam_data.lens = sid
    cam_data.clip_start = 0.01
    cam_data.clip_end = max(10.0, 2 * sid * MM)
    cam_data["sid_mm"] = sid
    cam_data["detector_width_mm"] = width_mm
    cam_data["detector_height_mm"] = height_mm
    scene.camera = cam
    scene.render.resolution_x = int(w)
    scene.render.resolution_y = int(h)
    scene.render.resolution_percentage = 100
    scene.render.pixel_aspect_x = 1.0
    scene.render.pixel_aspect_y = float(dv / du) if du > 0 else 1.0
    return cam


def write_twin_blend(twin_dir, blend_path, *, reset: bool = True) -> Path:
    """Write ``twin.blend`` for the twin directory ``twin_dir`` (the directory may still be a
    temporary build folder: paths are stored relative to the .blend)."""
    import bpy

    from . import bl_data
    from .core.fileio import read_json
    from .core.twin import Twin
    from .operators.import_anatomy import create_anatomy
    from .rig.armature import bind_meshes, create_armature

    twin_dir = Path(twin_dir)
    if reset:
        bpy.ops.wm.read_factory_settings(use_empty=True)
    ensure_registered()
    twin = Twin(twin_dir, read_json(twin_dir / "twin.json"))
    scene = bpy.context.scene
    scene.name = "ctwin"
    meshes = twin.meshes(include_skin=False)
    skin = twin.meshes()["skin"]
    stats = {}
    objs = create_anatomy(meshes, skin, stats)
    binding = twin.binding
    rig_col = bl_data.ensure_collection("Rig")
    arm_obj = create_armature(binding, collection=rig_col)
    bind_meshes(arm_obj, objs, binding)

    from .core.mesh import read_mesh

    body = read_mesh(twin_dir / "meshes" / "body_model.ply", name="body_model")
    body_obj = bl_data.mesh_object("body_model", body.vertices, body.faces, rig_col)
    body_obj.display_type = "WIRE"
    body_obj.hide_render = True
    bm = twin.body_model
    w = np.asarray(bm.weights, dtype=np.float64)
    from .core.skeleton import JOINT_NAMES

    for j, n in enumerate(JOINT_NAMES):
        rows = np.nonzero(w[:, j] > 1e-4)[0]
        if len(rows):
            bl_data.set_vertex_group(body_obj, n, rows, w[rows, j])
    body_obj.parent = arm_obj
    mod = body_obj.modifiers.new("ctwin_armature", "ARMATURE")
    mod.object = arm_obj

    views = twin.default_views(size=512)
    set_xray_camera(scene, views["ap"])
    scene.render.engine = "CTWIN_DRR"
    scene["ctwin_twin_dir"] = "//"
    scene.render.fps = 24
    scene.frame_start = 1
    scene.frame_end = 1
    scene.render.filepath = "//render/"
    blend_path = Path(blend_path)
    bpy.ops.wm.save_as_mainfile(filepath=str(blend_path), check_existing=False, compress=True)
    return blend_path
