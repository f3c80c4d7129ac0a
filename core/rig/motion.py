"""Motion import (no ``bpy``): AMASS-style ``.npz`` files to pose sequences in the twin's frame.

An AMASS-style file holds ``poses`` (T, 72 SMPL / 156 SMPL-H / 165 SMPL-X axis-angle values),
``trans`` (T, 3) metres and ``mocap_framerate`` or ``mocap_frame_rate`` (Hz).

- Joints: SMPL's 72 values are taken as is; longer vectors (SMPL-H, SMPL-X) give their 22 body
  joints (the first 66 values) and SMPL's two hand joints (22, 23) are set to zero (no rotation),
  since SMPL-H/X have finger chains instead.
- Resampling to ``fps``: rotations by slerp per joint (``scipy.spatial.transform.Slerp``),
  translations linearly, on the times ``k / fps`` that lie within the clip.
- Root: AMASS is z-up with its own heading. The twin keeps its acquisition global orientation
  ``R_0`` and applies only the motion's root rotation relative to the first frame:
  ``R_twin(t) = M R_m(t)`` with ``M = R_0 R_m(0)^T``, which maps the motion's world into the twin's
  world so that frame 0 coincides with the acquisition orientation (the body never spins to the
  mocap heading). Translation: ``transl(t) = t_0 + 1000 M (trans(t) - trans(0))`` mm.
- Source skeleton: a motion's pose vectors rotate bones relative to the rest skeleton it was made on
  (AMASS: SMPL or SMPL+H's template shaped by the file's ``betas``). ``source=(model_path,
  target_rest_mm)`` retargets every frame from that model's skeleton onto the twin's
  (``core.rig.retarget``) before the root is mapped; without a source model the built-in body model's
  skeleton is the source and the file's betas are not used.
- ``load_motion(path, fps, twin_pose=None, twin_transl_mm=None)``: without ``twin_pose`` the root
  is mapped onto the standard supine acquisition (``SUPINE_GLOBAL_ORIENT``), and without
  ``twin_transl_mm`` the translations are displacements from the first frame (t_0 = 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from ..errors import CtwinError
from ..body.skeleton import SUPINE_GLOBAL_ORIENT, rodrigues, rotation_to_rotvec
from ..fileio import atomic_path
from .pose import joint_limit_violations, check_joint_limits
from .retarget import model_rest_joints_mm, retarget_poses

FRAMERATE_KEYS = ("mocap_framerate", "mocap_frame_rate", "frame_rate", "fps")
# Values per frame of the body models' axis-angle vectors: SMPL-H/X body joints only (22 x 3),
# SMPL (24 x 3), SMPL-H (52 x 3), SMPL-X (55 x 3). Any other width is not a pose of these models.
MOTION_WIDTHS = (66, 72, 156, 165)


def smpl72(poses) -> np.ndarray:
    """(T, 72) SMPL pose vectors from (T, 72), (T, 156) or (T, 165) axis-angle arrays."""
    p = np.asarray(poses, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise CtwinError(f"motion 'poses' must be a (frames, values) array, got shape {p.shape}")
    if p.shape[1] == 72:
        return p.copy()
    if p.shape[1] not in MOTION_WIDTHS:
        raise CtwinError(f"motion 'poses' has {p.shape[1]} values per frame; expected 72 (SMPL), 156 "
                         f"(SMPL-H), 165 (SMPL-X) or 66 (their 22 body joints)")
    out = np.zeros((p.shape[0], 72))
    out[:, :66] = p[:, :66]
    return out


def resample(poses, trans, src_fps: float, fps: float | None):
    """Resample (T, 72) poses (slerp per joint) and (T, 3) translations (linear) from src_fps to fps."""
    poses = np.asarray(poses, dtype=np.float64)
    trans = np.asarray(trans, dtype=np.float64)
    if fps is None or abs(fps - src_fps) < 1e-9 or len(poses) == 1:
        return poses.copy(), trans.copy()
    if fps <= 0:
        raise CtwinError(f"target frame rate must be positive, got {fps}")
    duration = (len(poses) - 1) / src_fps
    n = int(np.floor(duration * fps + 1e-9)) + 1
    u = np.arange(n) / fps * src_fps  # fractional source frame of each output frame
    i0 = np.clip(np.floor(u).astype(np.int64), 0, len(poses) - 2)
    f = (u - i0)[:, None]
    rot = poses.reshape(len(poses), 24, 3)
    times = np.arange(len(poses), dtype=np.float64)
    u = np.clip(u, 0.0, times[-1])
    out_p = np.stack([Slerp(times, Rotation.from_rotvec(rot[:, j]))(u).as_rotvec() for j in range(24)],
                     axis=1).reshape(n, 72)
    out_t = (1.0 - f) * trans[i0] + f * trans[i0 + 1]
    return out_p, out_t


def retarget_root(poses, trans_m, twin_global_orient=None, twin_transl_mm=None):
    """Map the motion's root into the twin's frame (see the module docstring). Returns (poses, transl_mm)."""
    poses = np.asarray(poses, dtype=np.float64).copy()
    r0_twin = rodrigues(np.asarray(SUPINE_GLOBAL_ORIENT if twin_global_orient is None else twin_global_orient,
                                   dtype=np.float64).reshape(3))
    rm = rodrigues(poses[:, :3])
    m = r0_twin @ rm[0].T
    poses[:, :3] = rotation_to_rotvec(m[None] @ rm)
    d = (np.asarray(trans_m, dtype=np.float64) - np.asarray(trans_m, dtype=np.float64)[0]) @ m.T * 1000.0
    t0 = np.zeros(3) if twin_transl_mm is None else np.asarray(twin_transl_mm, dtype=np.float64).reshape(3)
    return poses, d + t0


def read_motion_file(path):
    """(poses (T, 72), trans (T, 3) metres, framerate) from an AMASS-style .npz."""
    path = Path(path)
    if not path.exists():
        raise CtwinError(f"motion file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error
        raise CtwinError(f"cannot read motion file {path}: {exc}") from None
    with z:
        if "poses" not in z:
            raise CtwinError(f"motion file {path.name} has no 'poses' array (AMASS-style .npz expected)")
        poses = smpl72(z["poses"])
        trans = np.asarray(z["trans"], dtype=np.float64) if "trans" in z else np.zeros((len(poses), 3))
        if trans.shape != (len(poses), 3):
            raise CtwinError(f"motion 'trans' must be ({len(poses)}, 3), got {trans.shape}")
        rate = None
        for k in FRAMERATE_KEYS:
            if k in z:
                rate = float(np.asarray(z[k]).reshape(-1)[0])
                break
    if rate is None:
        raise CtwinError(f"motion file {path.name} has no frame rate ('mocap_framerate' or 'mocap_frame_rate')")
    if not np.isfinite(poses).all() or not np.isfinite(trans).all() or rate <= 0:
        raise CtwinError(f"motion file {path.name} has non-finite values or a bad frame rate")
    return poses, trans, rate


def read_betas(path):
    """The motion file's ``betas`` (the subject's shape), or None."""
    with np.load(path, allow_pickle=False) as z:
        return np.asarray(z["betas"], dtype=np.float64).reshape(-1) if "betas" in z else None


def load_motion(path, fps=None, twin_pose=None, twin_transl_mm=None, *, check_limits: bool = True,
                source=None):
    """An AMASS-style motion as ``(poses (T, 72), transl (T, 3) mm)`` in the twin's frame at ``fps``.

    ``twin_pose``: the twin's acquisition pose (72,) or global orientation (3,) (default: supine);
    ``twin_transl_mm``: its translation (default: displacements from the first frame).
    ``fps=None`` keeps the file's frame rate. Poses outside joint ranges are reported once.
    ``source``: ``(model_path, target_rest_mm[, located])``, the SMPL/SMPL+H file the motion was made
    on (shaped by the file's betas), the twin's rest skeleton (24, 3) mm and the joints its fit
    located (``core.rig.retarget.rest_alignment``); the frames are retargeted.
    """
    poses, trans, rate = read_motion_file(path)
    if source is not None:
        model_path, target_rest = source[:2]
        rest = model_rest_joints_mm(model_path, read_betas(path))
        poses = retarget_poses(poses, rest, target_rest, located=source[2] if len(source) > 2 else None)
    poses, trans = resample(poses, trans, rate, fps)
    go = None if twin_pose is None else np.asarray(twin_pose, dtype=np.float64).reshape(-1)[:3]
    poses, transl = retarget_root(poses, trans, go, twin_transl_mm)
    if check_limits:
        worst = max(range(len(poses)), key=lambda i: len(joint_limit_violations(poses[i])))
        if joint_limit_violations(poses[worst]):
            check_joint_limits(poses[worst], label=f"motion {Path(path).name} (frame {worst})")
    return poses, transl


def write_motion_file(path, poses, trans_m, framerate: float) -> None:
    """Write an AMASS-style .npz (``poses``, ``trans`` metres, ``mocap_framerate``), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, poses=np.asarray(poses, dtype=np.float64), trans=np.asarray(trans_m, dtype=np.float64),
                     mocap_framerate=np.float64(framerate))
