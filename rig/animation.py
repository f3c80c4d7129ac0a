"""Keyframes on the twin's armature from pose sequences, written in bulk.

``keyframe_poses(arm_obj, poses (T, 72), transl_mm (T, 3) or None, frame_start=1)`` computes every
frame's pose-bone values in numpy (``core.rig.armature.Armature.local_rotations``), then writes one
F-curve per channel with ``keyframe_points.add(T)`` + ``foreach_set("co", ...)`` (Blender 5's
layered actions: the action's channelbag for the object's slot). Quaternion signs are made
continuous over time; interpolation is linear. ``load_motion_keyframes`` imports an AMASS-style
.npz (``core.rig.motion.load_motion``) at the scene's frame rate, mapped into the twin's frame.
"""
from __future__ import annotations

import bpy
import numpy as np

from ..blender.properties import abspath
from ..core.body.skeleton import JOINT_NAMES, N_JOINTS
from .armature import MM_TO_M, _matrix3_to_quat, twin_armature


def _channelbag(arm_obj, action_name: str):
    from bpy_extras import anim_utils

    ad = arm_obj.animation_data or arm_obj.animation_data_create()
    action = bpy.data.actions.new(action_name)
    ad.action = action
    slot = ad.action_slot
    if slot is None:
        slot = action.slots.new(id_type="OBJECT", name=arm_obj.name)
        ad.action_slot = slot
    return action, anim_utils.action_ensure_channelbag_for_slot(action, slot)


def pose_sequence_values(arm, poses, transl_mm=None):
    """Quaternions (T, 24, 4) (w first, sign-continuous) and root locations (T, 3) metres."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 72)
    t = len(poses)
    qs = np.zeros((t, N_JOINTS, 3, 3))
    locs = np.zeros((t, 3))
    for k in range(t):
        qs[k], locs[k] = arm.local_rotations(poses[k], None if transl_mm is None else transl_mm[k])
    quats = _matrix3_to_quat(qs)
    for k in range(1, t):  # continuous signs so that the F-curves interpolate the short way
        flip = np.einsum("jq,jq->j", quats[k], quats[k - 1]) < 0
        quats[k, flip] *= -1
    return quats, locs * MM_TO_M


def _write_fcurve(bag, data_path: str, index: int, group: str, frames, values):
    fc = bag.fcurves.find(data_path, index=index)
    if fc is None:
        fc = bag.fcurves.new(data_path, index=index, group_name=group)
    else:
        fc.keyframe_points.clear()
    n = len(frames)
    fc.keyframe_points.add(n)
    co = np.empty(2 * n, dtype=np.float32)
    co[0::2] = frames
    co[1::2] = values
    fc.keyframe_points.foreach_set("co", co)
    linear = bpy.types.Keyframe.bl_rna.properties["interpolation"].enum_items["LINEAR"].value
    fc.keyframe_points.foreach_set("interpolation", np.full(n, linear, dtype=np.int32))
    fc.update()
    return fc


def keyframe_poses(arm_obj, poses, transl_mm=None, frame_start: int = 1, action_name: str | None = None):
    """Keyframe a pose sequence on the 24 SMPL bones (rotations) and the root (location)."""
    arm = twin_armature(arm_obj)
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 72)
    tr = None if transl_mm is None else np.asarray(transl_mm, dtype=np.float64).reshape(-1, 3)
    quats, locs = pose_sequence_values(arm, poses, tr)
    frames = frame_start + np.arange(len(poses), dtype=np.float64)
    action, bag = _channelbag(arm_obj, action_name or f"{arm_obj.name}_motion")
    for i, n in enumerate(JOINT_NAMES):
        arm_obj.pose.bones[n].rotation_mode = "QUATERNION"
        path = f'pose.bones["{n}"].rotation_quaternion'
        for c in range(4):
            _write_fcurve(bag, path, c, n, frames, quats[:, i, c])
    for c in range(3):
        _write_fcurve(bag, f'pose.bones["{JOINT_NAMES[0]}"].location', c, JOINT_NAMES[0], frames, locs[:, c])
    return action


def _retarget_target(scene):
    """(rest skeleton (24, 3) mm, located joints or None) that poses are retargeted onto: the twin's
    own when this file is a twin directory's twin.blend, else the fit's body model's skeleton and
    the joints located by the fit stored in the scene (``scene.ctwin``), if any."""
    from pathlib import Path

    if bpy.data.filepath:
        d = Path(bpy.data.filepath).parent
        if (d / "twin.json").is_file():
            from ..core.twin.twin import load_twin

            twin = load_twin(d)
            return twin.skeleton_rest_mm(), twin.located_joints()
    from ..core.body.body_model import load_body_model
    from ..core.body.skeleton import JOINT_INDEX

    located = None
    fit = scene.ctwin.fit()
    if fit:
        src = fit.get("joint_sources") or {}
        located = sorted(JOINT_INDEX[n] for n in src if n in JOINT_INDEX) or None
    return load_body_model(abspath(scene.ctwin.body_model_path) or None).rest()[1] * 1000.0, located


def load_motion_keyframes(arm_obj, path, scene=None, frame_start: int | None = None, source_model=None):
    """Import an AMASS-style .npz as keyframes at the scene's frame rate; sets the frame range.

    ``source_model``: the SMPL or SMPL+H file the motion was made on; its skeleton (shaped by the
    file's betas) is retargeted onto the twin's, as ``ctwin render --source-model`` does
    (``_retarget_target``)."""
    from ..core.rig.motion import load_motion

    scene = scene or bpy.context.scene
    fps = scene.render.fps / scene.render.fps_base
    arm = twin_armature(arm_obj)
    src = None
    if source_model:
        src = (source_model,) + _retarget_target(scene)
    poses, transl = load_motion(path, fps=fps, twin_pose=arm.pose0, twin_transl_mm=arm.transl0_mm, source=src)
    start = scene.frame_start if frame_start is None else frame_start
    action = keyframe_poses(arm_obj, poses, transl, frame_start=start)
    scene.frame_start = start
    scene.frame_end = start + len(poses) - 1
    return action, len(poses)
