"""Blender camera <-> X-ray geometry (SPEC 5). Blender world = LPS in metres.

The camera is the X-ray source; it looks down its local -Z, its local +X is the detector's u
(increasing column) and its local +Y is -v (image up). Perspective = cone beam, orthographic =
parallel beam. The render resolution (times its percentage) is the detector in pixels.

Custom properties on the camera data keep the physical detector: ``ctwin_sid_mm`` (source to
detector plane) and ``ctwin_detector_mm`` ([width, height]). They stay consistent with Blender's
own settings: sensor width = detector width (mm), lens = SID (mm) (sensor fit HORIZONTAL), so
Blender's viewport frustum is the X-ray cone. When reading, lens and sensor are authoritative for
the field of view (a user may edit them), SID for the distance, and the camera shift moves the
detector centre off the central ray (shift in units of the detector width).
"""
from __future__ import annotations

import numpy as np

from ..core.drr.carm import DEFAULT_SID_MM, Geometry
from ..core.errors import CtwinError

SID_PROP = "ctwin_sid_mm"
DET_PROP = "ctwin_detector_mm"


def _pixels(scene) -> tuple[int, int]:
    r = scene.render
    return (max(1, int(r.resolution_x * r.resolution_percentage / 100)),
            max(1, int(r.resolution_y * r.resolution_percentage / 100)))


def geometry_from_camera(scene, cam_obj=None) -> Geometry:
    """The X-ray geometry of a scene's camera (or ``cam_obj``) at the current frame."""
    cam_obj = cam_obj or scene.camera
    if cam_obj is None or cam_obj.type != "CAMERA":
        raise CtwinError("the scene has no camera: the camera is the X-ray source")
    cam = cam_obj.data
    W, H = _pixels(scene)
    mw = np.array(cam_obj.matrix_world, dtype=np.float64)
    R = mw[:3, :3] / np.linalg.norm(mw[:3, :3], axis=0)
    u, up, back = R[:, 0], R[:, 1], R[:, 2]
    v = -up
    n = -back
    src = mw[:3, 3] * 1000.0
    sid = float(cam.get(SID_PROP, DEFAULT_SID_MM))
    aspect = scene.render.pixel_aspect_y / scene.render.pixel_aspect_x  # dv / du
    fit = cam.sensor_fit
    if fit == "AUTO":
        fit = "HORIZONTAL" if W >= H * aspect else "VERTICAL"
    if cam.type == "ORTHO":
        size_fit = cam.ortho_scale * 1000.0
        parallel = True
    elif cam.type == "PERSP":
        if fit == "HORIZONTAL" or cam.sensor_fit == "AUTO":
            sensor = cam.sensor_width
        else:
            sensor = cam.sensor_height
        size_fit = sensor * sid / cam.lens
        parallel = False
    else:
        raise CtwinError(f"camera type {cam.type} is not supported (use perspective or orthographic)")
    if fit == "HORIZONTAL":
        du = size_fit / W
        dv = du * aspect
        shift_unit = size_fit
    else:
        dv = size_fit / H
        du = dv / aspect
        shift_unit = size_fit
    det = src + sid * n + cam.shift_x * shift_unit * u - cam.shift_y * shift_unit * v
    return Geometry(src, det, u, v, (du, dv), (W, H), parallel,
                    extra={"camera": cam_obj.name})


def setup_xray_camera(cam_obj, geometry: Geometry, scene=None) -> None:
    """Place and configure a Blender camera (and the scene resolution) to match ``geometry``."""
    from mathutils import Matrix

    g = geometry
    u, v = g.detector_u, g.detector_v
    n = g.normal
    if n @ (g.detector_center_mm - g.source_mm) <= 0:
        raise CtwinError("this geometry's image is mirrored relative to a camera at the source "
                         "(u x v points away from the detector); flip detector_u")
    R = np.column_stack([u, -v, -n])
    m = np.eye(4)
    m[:3, :3] = R
    m[:3, 3] = g.source_mm / 1000.0
    cam_obj.matrix_world = Matrix(m.tolist())
    cam = cam_obj.data
    W, H = g.size_px
    du, dv = g.pixel_spacing_mm
    wmm, hmm = W * du, H * dv
    sid = g.sid_mm
    cam.sensor_fit = "HORIZONTAL"
    off = g.detector_center_mm - (g.source_mm + sid * n)
    cam.shift_x = float(off @ u / wmm)
    cam.shift_y = float(-(off @ v) / wmm)
    if g.parallel:
        cam.type = "ORTHO"
        cam.ortho_scale = wmm / 1000.0
    else:
        cam.type = "PERSP"
        cam.sensor_width = wmm
        cam.sensor_height = hmm
        cam.lens = sid
    cam.clip_start = 0.001
    cam.clip_end = max(10.0, 2.0 * sid / 1000.0)
    cam[SID_PROP] = float(sid)
    cam[DET_PROP] = [float(wmm), float(hmm)]
    if scene is not None:
        r = scene.render
        r.resolution_x, r.resolution_y, r.resolution_percentage = int(W), int(H), 100
        r.pixel_aspect_x, r.pixel_aspect_y = 1.0, float(dv / du)
        if r.pixel_aspect_y < 1.0:
            r.pixel_aspect_x, r.pixel_aspect_y = float(du / dv), 1.0


def set_xray_camera(scene, geometry, name: str = "xray_source"):
    """Create or update the camera ``name`` as the X-ray source of ``geometry`` and make it the
    scene camera."""
    import bpy

    cam_data = bpy.data.cameras.get(name) or bpy.data.cameras.new(name)
    cam = bpy.data.objects.get(name) or bpy.data.objects.new(name, cam_data)
    if cam.name not in scene.collection.objects:
        scene.collection.objects.link(cam)
    setup_xray_camera(cam, geometry, scene)
    scene.camera = cam
    return cam
