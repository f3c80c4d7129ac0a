"""Rig UI: "Pose from X-ray": register the twin to one or two X-ray images and key the armature.

The images (TIFF + sidecar JSON, or DICOM; see ``core.twin.registration.load_xray``) are shown as
background images of cameras placed at their geometry (``render.camera.setup_xray_camera``). The
registration runs in ``core.twin.registration.register`` with progress in Blender's status bar; the
result is keyed on the armature at the current frame. With "Sequence", the images are the first
frames of numbered series (``ap_0000.tif``, ``ap_0001.tif``, ...): each frame is registered
starting from the previous one's pose and keyed at successive scene frames.
"""
from __future__ import annotations

import re
from pathlib import Path

import bpy
from bpy.props import BoolProperty, StringProperty

from ..core import progress
from ..core.errors import CtwinError


def _series(path: Path) -> list:
    """``ap_0003.tif`` -> [ap_0003.tif, ap_0004.tif, ...] while the files exist."""
    m = re.fullmatch(r"(.*?)(\d+)", path.stem)
    if not m:
        return [path]
    head, num = m.group(1), m.group(2)
    out, i = [], int(num)
    while True:
        p = path.with_name(f"{head}{i:0{len(num)}d}{path.suffix}")
        if not p.is_file():
            return out
        out.append(p)
        i += 1


def _show_as_background(context, xray, name: str):
    """A camera at the image's geometry with the image as its background."""
    from ..render.camera import setup_xray_camera

    cam = bpy.data.objects.get(name)
    if cam is None or cam.type != "CAMERA":
        cam = bpy.data.objects.new(name, bpy.data.cameras.new(name))
        context.scene.collection.objects.link(cam)
    setup_xray_camera(cam, xray.geometry, None)
    img = bpy.data.images.load(xray.path, check_existing=True)
    cam.data.show_background_images = True
    bg = cam.data.background_images[0] if len(cam.data.background_images) else cam.data.background_images.new()
    bg.image = img
    bg.alpha = 0.8
    return cam


def key_poses(arm_obj, poses, transls, frame_start: int) -> None:
    """Key the 24 bones' rotations and the root's location at successive frames (other keys stay)."""
    from ..core.body.skeleton import JOINT_NAMES
    from .armature import set_pose

    for k, (p, t) in enumerate(zip(poses, transls)):
        set_pose(arm_obj, p, t)
        for i, n in enumerate(JOINT_NAMES):
            pb = arm_obj.pose.bones[n]
            pb.keyframe_insert("rotation_quaternion", frame=frame_start + k, group=n)
            if i == 0:
                pb.keyframe_insert("location", frame=frame_start + k, group=n)


class CTWIN_OT_pose_from_xray(bpy.types.Operator):
    """Estimate the twin's pose from one or two X-ray images (with geometry) and key the armature"""

    bl_idname = "ctwin.pose_from_xray"
    bl_label = "Pose from X-ray"
    bl_options = {"REGISTER", "UNDO"}

    image_1: StringProperty(name="Image", subtype="FILE_PATH", description="TIFF with sidecar JSON, or DICOM")
    image_2: StringProperty(name="Second image", subtype="FILE_PATH", description="optional second view")
    sequence: BoolProperty(name="Sequence", default=False,
                           description="register the numbered series that starts at these images, frame by frame")
    rigid: BoolProperty(name="Rigid", default=False, description="the whole twin as one rigid body")

    @classmethod
    def poll(cls, context):
        from .operators import _rig_object

        return _rig_object(context) is not None

    def invoke(self, context, event):
        return context.window_manager.invoke_props_dialog(self)

    def execute(self, context):
        from ..core.twin.registration import bone_cloud, load_xray, register
        from ..core.twin.twin import load_twin
        from .armature import armature_pose
        from .operators import _rig_object

        import os

        arm_obj = _rig_object(context)
        settings = getattr(context.scene, "ctwin", None)
        wm = context.window_manager
        try:
            if settings is None or not settings.twin_dir:
                raise CtwinError("the scene has no ctwin twin directory (open a twin.blend)")
            twin = load_twin(os.path.realpath(bpy.path.abspath(settings.twin_dir)))
            paths = [Path(bpy.path.abspath(p)) for p in (self.image_1, self.image_2) if p]
            if not paths:
                raise CtwinError("choose at least one X-ray image")
            series = [_series(p) if self.sequence else [p] for p in paths]
            n = min(len(s) for s in series)
            if n == 0:
                raise CtwinError("no image found")
            cloud = bone_cloud(twin)
            pose, transl = armature_pose(arm_obj)
            start = context.scene.frame_current
            wm.progress_begin(0, 100)
            ws = context.workspace

            def sink(msg, f):
                wm.progress_update(int(100 * (f or 0)))
                if ws is not None:
                    ws.status_text_set(f"ctwin: {msg}")

            progress.set_sink(sink)
            poses, transls = [], []
            for k in range(n):
                xrays = [load_xray(s[k], twin.ct_bbox_mm) for s in series]
                if k == 0:
                    for i, x in enumerate(xrays):
                        _show_as_background(context, x, f"ctwin X-ray {i + 1}")
                reg = register(twin, xrays, init_pose=pose, init_transl_mm=transl, cloud=cloud,
                               articulated=not self.rigid, root_starts=8 if k == 0 else 0)
                pose, transl = reg.pose, reg.transl_mm
                poses.append(pose)
                transls.append(transl)
        except CtwinError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        finally:
            progress.set_sink(None)
            wm.progress_end()
            if context.workspace is not None:
                context.workspace.status_text_set(None)
        key_poses(arm_obj, poses, transls, start)
        self.report({"INFO"}, f"Registered {len(poses)} frame(s) from {start}; similarity {reg.similarity:.3f}")
        return {"FINISHED"}
