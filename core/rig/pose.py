"""Posing the twin (no ``bpy``): bone transforms, rigid bones, LBS soft tissue, joint-range checks.

For a pose ``p`` (72,) and translation ``t`` (mm; None keeps the twin's fitted translation):

- ``bone_deltas(binding, p, t)`` -> {bone name: 4x4}: ``D_j = W_j(p, t) inv(W_j(p0, t0))`` for the
  24 SMPL bones (``core.rig.armature``) and the blended rigid transform of each vertebra bone.
- ``bone_transforms(binding, p, t)`` -> {structure: 4x4}: the delta of every rigidly bound
  structure (acquisition world mm -> posed world mm). The acquisition pose gives identities.
- ``pose_meshes(binding, meshes, p, t)`` -> {name: Mesh}: rigid structures by their 4x4 (exactly
  rigid), soft ones by linear blend skinning with the transferred weights.
- ``check_joint_limits(pose)`` warns (``warnings.warn`` + a progress line) when a joint rotates
  beyond the anatomical range in ``JOINT_LIMITS_DEG``.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy.spatial.transform import Rotation

from .binding import Binding, VertebraBone
from ..errors import CtwinError
from ..body.skeleton import (
    JOINT_INDEX, JOINT_NAMES, as_pose, rodrigues, rotation_to_rotvec,
)
from ..volumes.volume import apply_transform
from ..progress import report


def _slerp_matrices(ra: np.ndarray, rb: np.ndarray, w: float) -> np.ndarray:
    if w <= 0.0:
        return ra
    if w >= 1.0:
        return rb
    rel = rotation_to_rotvec(ra.T @ rb)
    return ra @ rodrigues(w * rel)


def vertebra_transform(deltas: np.ndarray, vb: VertebraBone) -> np.ndarray:
    """Rigid 4x4 of a vertebra bone: slerp of the two joints' rotations, its centroid lerped."""
    return vertebra_transforms(deltas, [vb.lower], [vb.upper], [vb.w], [vb.anchor_mm])[0]


def vertebra_transforms(deltas: np.ndarray, lower, upper, w, anchor_mm, rotvec=rotation_to_rotvec) -> np.ndarray:
    """Rigid 4x4s (V, 4, 4) of V vertebra bones (``VertebraBone``'s fields as arrays): the rotation
    ``R_a rodrigues(w rotvec(R_a^T R_b))`` (the slerp of the two joints' rotations), the anchor
    moved to the lerp of where the two joints move it. ``rotvec``: the matrix -> axis-angle map
    (``core.body.skeleton.rotvec_fast`` is faster and equal to about 1e-13)."""
    lower, upper = np.asarray(lower, dtype=np.intp), np.asarray(upper, dtype=np.intp)
    w = np.asarray(w, dtype=np.float64)
    c = np.asarray(anchor_mm, dtype=np.float64).reshape(-1, 3)
    da, db = deltas[lower], deltas[upper]
    out = da.copy()
    blend = (lower != upper) & (w > 0.0)
    if not blend.any():
        return out
    da, db, w, c = da[blend], db[blend], w[blend], c[blend]
    r = db[:, :3, :3].copy()
    part = w < 1.0
    if part.any():
        ra = da[part, :3, :3]
        rel = rotvec(np.swapaxes(ra, 1, 2) @ db[part, :3, :3])
        r[part] = ra @ rodrigues(w[part, None] * rel)
    cc = c[:, :, None]
    pa = (da[:, :3, :3] @ cc)[..., 0] + da[:, :3, 3]
    pb = (db[:, :3, :3] @ cc)[..., 0] + db[:, :3, 3]
    t = np.zeros((len(w), 4, 4))
    t[:, :3, :3] = r
    t[:, :3, 3] = (1.0 - w)[:, None] * pa + w[:, None] * pb - (r @ cc)[..., 0]
    t[:, 3, 3] = 1.0
    out[blend] = t
    return out


def bone_deltas(binding: Binding, pose, transl_mm=None, joint_deltas=None) -> dict:
    """{bone name: 4x4} for the 24 SMPL bones and the vertebra bones (world mm -> world mm).
    ``joint_deltas``: the armature's ``deltas(pose, transl_mm)`` where the caller has them already."""
    d = binding.armature.deltas(pose, transl_mm) if joint_deltas is None else joint_deltas
    out = {n: d[i] for i, n in enumerate(JOINT_NAMES)}
    vbs = list(binding.vertebrae.values())
    if vbs:  # all vertebra bones in one batch (equal, bit for bit, to one at a time)
        v = vertebra_transforms(d, [b.lower for b in vbs], [b.upper for b in vbs], [b.w for b in vbs],
                                [b.anchor_mm for b in vbs])
        out.update(zip(binding.vertebrae, v))
    return out


def bone_transforms(binding: Binding, pose, transl_mm=None) -> dict:
    """{structure: 4x4} for every rigidly bound structure: acquisition world mm -> posed world mm."""
    bd = bone_deltas(binding, pose, transl_mm)
    return {name: bd[bone] for name, bone in binding.rigid.items()}


def _with_vertices(mesh, vertices):
    if dataclasses.is_dataclass(mesh):
        return dataclasses.replace(mesh, vertices=vertices)
    return type(mesh)(vertices=vertices, faces=mesh.faces, name=getattr(mesh, "name", ""))


def lbs_points(deltas: np.ndarray, points, index, weight) -> np.ndarray:
    """Linear blend skinning of points (N, 3) with sparse weights (index/weight (N, K)) and deltas (24, 4, 4)."""
    p = np.asarray(points, dtype=np.float64)
    m = np.einsum("nk,nkij->nij", np.asarray(weight, dtype=np.float64), deltas[np.asarray(index, dtype=np.int64)])
    return np.einsum("nij,nj->ni", m[:, :3, :3], p) + m[:, :3, 3]


def _dual_quaternions(deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rigid 4x4s (J, 4, 4) -> unit dual quaternions (real (J, 4), dual (J, 4)), (w, x, y, z)."""
    xyzw = Rotation.from_matrix(deltas[:, :3, :3]).as_quat()
    qr = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    t = deltas[:, :3, 3]
    # q_d = 0.5 * (0, t) * q_r
    w, v = qr[:, 0], qr[:, 1:]
    qd = 0.5 * np.concatenate([(-(t * v).sum(axis=1))[:, None], t * w[:, None] + np.cross(t, v)], axis=1)
    return qr, qd


def dqs_points(deltas: np.ndarray, points, index, weight) -> np.ndarray:
    """Dual-quaternion skinning of points (N, 3) (same arguments as ``lbs_points``). Blending
    rotations as dual quaternions keeps limbs from collapsing at bent and twisted joints, where
    linear blending shrinks the flesh toward the joint."""
    p = np.asarray(points, dtype=np.float64)
    idx = np.asarray(index, dtype=np.int64)
    w = np.asarray(weight, dtype=np.float64)
    qr, qd = _dual_quaternions(np.asarray(deltas, dtype=np.float64))
    r, d = qr[idx], qd[idx]                                     # (N, K, 4)
    pivot = r[np.arange(len(p)), np.argmax(w, axis=1)]           # antipodal alignment to the dominant joint
    sign = np.where(np.einsum("nkc,nc->nk", r, pivot) < 0, -1.0, 1.0)
    br = np.einsum("nk,nkc->nc", w * sign, r)
    bd = np.einsum("nk,nkc->nc", w * sign, d)
    norm = np.linalg.norm(br, axis=1, keepdims=True)
    br, bd = br / norm, bd / norm
    w0, v = br[:, :1], br[:, 1:]
    d0, dv = bd[:, :1], bd[:, 1:]
    # rotate, then translate by 2 (w0 dv - d0 v + v x dv)
    rot = p + 2.0 * np.cross(v, np.cross(v, p) + w0 * p)
    return rot + 2.0 * (w0 * dv - d0 * v + np.cross(v, dv))


def pose_meshes(binding: Binding, meshes: dict, pose, transl_mm=None, *, check_limits: bool = True) -> dict:
    """Pose every mesh: bones rigidly, soft tissue by LBS. Returns {name: Mesh} (world mm)."""
    if check_limits:
        check_joint_limits(pose)
    d = binding.armature.deltas(pose, transl_mm)
    bd = bone_deltas(binding, pose, transl_mm, d)
    out = {}
    for name, mesh in meshes.items():
        v = np.asarray(mesh.vertices, dtype=np.float64)
        if name in binding.rigid:
            t = bd[binding.rigid[name]]
            nv = apply_transform(t, v)
        elif name in binding.soft:
            sw = binding.soft[name]
            if len(sw.index) != len(v):
                raise CtwinError(f"mesh '{name}' has {len(v)} vertices but its binding has {len(sw.index)}")
            nv = lbs_points(d, v, sw.index, sw.weight)
        else:
            raise CtwinError(f"structure '{name}' is not bound to the armature")
        out[name] = _with_vertices(mesh, nv)
    return out


# --- anatomical ranges ------------------------------------------------------------------------
# Per joint: (largest total rotation in degrees from the neutral (zero) local rotation,
# optional per-axis (lo, hi) degree ranges on the axis-angle components in SMPL's local frame).
# Generous ranges: they flag implausible poses, not merely unusual ones. The root (pelvis) is free.
JOINT_LIMITS_DEG = {
    "left_hip": (150.0, None), "right_hip": (150.0, None),
    "spine1": (60.0, None), "spine2": (45.0, None), "spine3": (45.0, None),
    "left_knee": (165.0, {0: (-15.0, 165.0), 1: (-45.0, 45.0), 2: (-30.0, 30.0)}),
    "right_knee": (165.0, {0: (-15.0, 165.0), 1: (-45.0, 45.0), 2: (-30.0, 30.0)}),
    "left_ankle": (75.0, None), "right_ankle": (75.0, None),
    "left_foot": (60.0, None), "right_foot": (60.0, None),
    "neck": (80.0, None), "head": (80.0, None),
    "left_collar": (50.0, None), "right_collar": (50.0, None),
    "left_shoulder": (180.0, None), "right_shoulder": (180.0, None),
    "left_elbow": (165.0, None), "right_elbow": (165.0, None),
    "left_wrist": (100.0, None), "right_wrist": (100.0, None),
    "left_hand": (90.0, None), "right_hand": (90.0, None),
}


def joint_limit_violations(pose) -> list[str]:
    """One line per joint whose local rotation leaves ``JOINT_LIMITS_DEG``."""
    p = np.degrees(as_pose(pose))
    out = []
    for name, (max_deg, axes) in JOINT_LIMITS_DEG.items():
        r = p[JOINT_INDEX[name]]
        angle = float(np.linalg.norm(r))
        if angle > max_deg:
            out.append(f"{name} rotates {angle:.0f} deg (limit {max_deg:.0f})")
            continue
        for ax, (lo, hi) in (axes or {}).items():
            if not lo <= r[ax] <= hi:
                out.append(f"{name} axis {'xyz'[ax]} at {r[ax]:.0f} deg (range {lo:.0f}..{hi:.0f})")
    return out


def check_joint_limits(pose, label: str = "pose") -> list[str]:
    """Warn (warnings.warn and a progress line) when a pose leaves the anatomical ranges."""
    bad = joint_limit_violations(pose)
    if bad:
        msg = f"{label} outside anatomical joint ranges: " + "; ".join(bad)
        report(msg)
        warnings.warn(msg, stacklevel=2)
    return bad
