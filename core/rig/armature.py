"""The twin's armature: SMPL's 24 bones placed at the fitted joints, and its posing maths.

No ``bpy`` here: this module computes the bone table (heads, tails, rest frames, rolls) that the
Blender layer (``rig/``) turns into an armature, and the per-bone world transforms of a pose.

Conventions (SPEC sections 2 and 4):

- All positions are LPS world millimetres. The armature's rest pose is the twin's acquisition
  pose: the fitted pose ``p0`` (72,) with fitted joints ``J0`` (24, 3) and translation ``t0``.
- The canonical rest joints ``joints_rest_mm`` are recovered exactly from ``(J0, p0, t0)`` by
  undoing the forward kinematics (``unpose_joints``), so that
  ``forward_kinematics(p0, joints_rest_mm)`` + ``t0`` reproduces ``J0``.
- ``W_j(p, t) = T(t) @ A_j(p)`` is the world transform of joint j's segment for pose p
  (``core.body.skeleton.forward_kinematics`` on the rest joints, in mm, plus the translation).
  Posing the twin to (p, t) moves a point bound rigidly to joint j by
  ``D_j = W_j(p, t) @ inv(W_j(p0, t0))``; the acquisition pose is the identity delta.
- A pose file without ``transl`` keeps the twin's own ``t0`` (the pelvis stays where it was).

Bone rest frames and rolls (what Blender's ``bone.matrix_local`` rotation will be):

- head = the joint (J0); tail = toward the joint's primary child (the neck for spine3, the only
  child otherwise). The pelvis bone points forward (the rotated canonical front axis), not up
  the spine: a pelvis bone pointing up would make the hip bones point almost exactly backwards
  in its frame, where Blender's bone-roll maths (``vec_roll_to_mat3``) loses float32 precision
  (bone matrices non-orthonormal by 5e-5, posed joints off by ~0.01 mm); forward keeps every
  child at a right angle to it. Leaves: the head bone points along the joint's rotated
  canonical up axis, a foot bone along its rotated canonical front axis, a hand bone continues
  the wrist-to-hand direction.
- Local Y = the bone direction (Blender's rule). Local Z = the joint's rotated canonical front
  axis (canonical z), or its rotated canonical up axis (canonical y) for bones that run mostly
  front-back (the feet), orthogonalised against Y. Local X = Y x Z. "Rotated" means by the
  joint's global rotation at p0, so for a bone that runs along the canonical up axis (spine,
  neck, legs in the rest pose) the bone's local axes are exactly the rotated canonical axes.
- ``rolls`` is Blender's roll angle for that frame (the angle about Y from Blender's roll-0 frame,
  ``vec_roll_to_mat3``); the Blender layer uses ``EditBone.align_roll(Z)``, which is equivalent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CtwinError
from ..volumes.volume import invert_affine
from ..body.skeleton import (
    JOINT_NAMES, N_JOINTS, PARENTS, as_pose, forward_kinematics, rodrigues, rotation_to_rotvec,
)

# Pelvis -> spine1 -> spine2 -> spine3 -> neck -> head.
SPINE_CHAIN = (0, 3, 6, 9, 12, 15)
# The child a bone's tail points at, where a joint has several children.
PRIMARY_CHILD = {0: 3, 9: 12}
LEAF_JOINTS = (10, 11, 15, 22, 23)


def global_rotations(pose) -> np.ndarray:
    """World rotation of each joint's frame (24, 3, 3): the product of the rotations up the chain."""
    rots = rodrigues(as_pose(pose))
    g = np.zeros((N_JOINTS, 3, 3))
    for i in range(N_JOINTS):
        p = PARENTS[i]
        g[i] = rots[i] if p < 0 else g[p] @ rots[i]
    return g


def unpose_joints(joints_mm, pose, transl_mm) -> np.ndarray:
    """Canonical rest joints (mm) from posed world joints, their pose and translation.

    Exact inverse of ``forward_kinematics(pose, rest)[1] + transl_mm``: bone offsets are rotated back
    by the parent's global rotation, and the root rest position is ``J0_root - transl``.
    """
    j = np.asarray(joints_mm, dtype=np.float64).reshape(N_JOINTS, 3)
    t = np.asarray(transl_mm, dtype=np.float64).reshape(3)
    g = global_rotations(pose)
    rest = np.zeros((N_JOINTS, 3))
    for i in range(N_JOINTS):
        p = PARENTS[i]
        rest[i] = j[i] - t if p < 0 else rest[p] + g[p].T @ (j[i] - j[p])
    return rest


def _unit(v):
    n = np.linalg.norm(v)
    return v / n if n > 1e-12 else v


def blender_roll0_matrix(direction) -> np.ndarray:
    """Blender's ``vec_roll_to_mat3_normalized(dir, 0)``: the bone frame (columns X, Y, Z) at roll 0."""
    x, y, z = (float(c) for c in _unit(np.asarray(direction, dtype=np.float64)))
    safe, critical = 6.1e-3, 2.5e-4
    theta = 1.0 + y
    theta_alt = x * x + z * z
    b = np.zeros((3, 3))  # b[col][row] as in Blender, transposed at the end
    if theta > safe or theta_alt > critical * critical:
        b[0][1] = -x
        b[1][0] = x
        b[1][1] = y
        b[1][2] = z
        b[2][1] = -z
        if theta <= safe:
            theta = theta_alt * 0.5 + theta_alt * theta_alt * 0.125
        b[0][0] = 1 - x * x / theta
        b[2][2] = 1 - z * z / theta
        b[2][0] = b[0][2] = -x * z / theta
    else:
        b = np.eye(3)
        b[0][0] = b[1][1] = -1.0
    return b.T


def roll_from_frame(frame) -> float:
    """Blender's roll angle of a bone whose rest frame (columns X, Y, Z) is ``frame``."""
    frame = np.asarray(frame, dtype=np.float64)
    y = frame[:, 1]
    z0 = blender_roll0_matrix(y)[:, 2]
    z = frame[:, 2]
    return float(np.arctan2(np.dot(np.cross(z0, z), y), np.dot(z0, z)))


@dataclass
class Armature:
    """SMPL's 24 bones at the twin's acquisition pose (see the module docstring)."""

    joints_mm: np.ndarray  # (24, 3) fitted world joints J0
    pose0: np.ndarray  # (72,) fitted pose p0
    transl0_mm: np.ndarray  # (3,) fitted translation t0
    joints_rest_mm: np.ndarray  # (24, 3) canonical rest joints, mm
    heads: np.ndarray  # (24, 3) world mm (= joints_mm)
    tails: np.ndarray  # (24, 3) world mm
    frames: np.ndarray  # (24, 3, 3) bone rest frames, columns = local X, Y, Z in world
    rolls: np.ndarray  # (24,) Blender roll angles, radians
    global_rot0: np.ndarray  # (24, 3, 3) joints' global rotations at p0
    names: tuple = JOINT_NAMES
    parents: np.ndarray = field(default_factory=lambda: PARENTS.copy())

    # --- posing ---------------------------------------------------------------------------
    def world_transforms(self, pose, transl_mm=None) -> np.ndarray:
        """``W_j(p, t) = T(t) A_j(p)`` (24, 4, 4), mm. ``transl_mm=None`` keeps ``t0``."""
        t = self.transl0_mm if transl_mm is None else np.asarray(transl_mm, dtype=np.float64).reshape(3)
        a, _ = forward_kinematics(pose, self.joints_rest_mm)
        a[:, :3, 3] += t
        return a

    def deltas(self, pose, transl_mm=None) -> np.ndarray:
        """``D_j = W_j(p, t) inv(W_j(p0, t0))`` (24, 4, 4): rest (acquisition) world -> posed world."""
        w = self.world_transforms(pose, transl_mm)
        w0 = self.world_transforms(self.pose0, self.transl0_mm)
        return w @ invert_affine(w0)

    def posed_joints(self, pose, transl_mm=None) -> np.ndarray:
        t = self.transl0_mm if transl_mm is None else np.asarray(transl_mm, dtype=np.float64).reshape(3)
        return forward_kinematics(pose, self.joints_rest_mm)[1] + t

    # --- Blender pose-bone values -----------------------------------------------------------
    def local_rotations(self, pose, transl_mm=None) -> tuple[np.ndarray, np.ndarray]:
        """Pose-bone ``matrix_basis`` values for a pose: rotations (24, 3, 3) and root location (3,) mm.

        Blender composes ``P_j = P_parent inv(Rest_parent) Rest_j Basis_j``; we want ``P_j = D_j Rest_j``,
        so ``Basis_j = inv(Rest_j) inv(D_parent) D_j Rest_j``: a pure rotation about the bone head
        ``B_j^T G0_parent R_j(p) R_j(p0)^T G0_parent^T B_j`` (B = bone rest frame, G0 = global rotations
        at p0), and for the root a rotation ``B^T R(p) R(p0)^T B`` plus a location ``B^T (t - t0)``.
        """
        r = rodrigues(as_pose(pose))
        r0 = rodrigues(as_pose(self.pose0))
        t = self.transl0_mm if transl_mm is None else np.asarray(transl_mm, dtype=np.float64).reshape(3)
        q = np.zeros((N_JOINTS, 3, 3))
        for j in range(N_JOINTS):
            p = self.parents[j]
            gp = np.eye(3) if p < 0 else self.global_rot0[p]
            b = self.frames[j]
            q[j] = b.T @ gp @ r[j] @ r0[j].T @ gp.T @ b
        loc = self.frames[0].T @ (t - self.transl0_mm)
        return q, loc

    def pose_from_local_rotations(self, q, loc_mm=None) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of ``local_rotations``: ``(pose (72,), transl_mm (3,))`` from pose-bone values."""
        q = np.asarray(q, dtype=np.float64).reshape(N_JOINTS, 3, 3)
        r0 = rodrigues(as_pose(self.pose0))
        rots = np.zeros((N_JOINTS, 3, 3))
        for j in range(N_JOINTS):
            p = self.parents[j]
            gp = np.eye(3) if p < 0 else self.global_rot0[p]
            b = self.frames[j]
            rots[j] = gp.T @ b @ q[j] @ b.T @ gp @ r0[j]
        pose = rotation_to_rotvec(rots).reshape(72)
        loc = np.zeros(3) if loc_mm is None else np.asarray(loc_mm, dtype=np.float64).reshape(3)
        transl = self.transl0_mm + self.frames[0] @ loc
        return pose, transl

    # --- serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "bones": [
                {"name": n, "parent": (None if p < 0 else JOINT_NAMES[p]), "head_mm": h.tolist(),
                 "tail_mm": t.tolist(), "roll": float(r)}
                for n, p, h, t, r in zip(self.names, self.parents, self.heads, self.tails, self.rolls)
            ],
            "pose0": self.pose0.tolist(),
            "transl0_mm": self.transl0_mm.tolist(),
        }


def build_armature(joints_mm, pose, transl_mm=None) -> Armature:
    """The bone table of the twin's armature from fitted joints (world mm) and the fitted pose.

    ``transl_mm`` is the fitted translation (smplx ``transl``, mm). When it is not given, the
    translation is taken as the root joint's position with a zero canonical root (``transl = J0_root``),
    which only changes how a later pose's ``transl`` is read, not the rest placement.
    """
    j0 = np.asarray(joints_mm, dtype=np.float64)
    if j0.shape != (N_JOINTS, 3):
        raise CtwinError(f"joints must be 24 x 3 (world mm), got shape {j0.shape}")
    if not np.all(np.isfinite(j0)):
        raise CtwinError("joints contain NaN or infinite values")
    p0 = as_pose(pose).reshape(72).copy()
    t0 = j0[0].copy() if transl_mm is None else np.asarray(transl_mm, dtype=np.float64).reshape(3).copy()
    rest = unpose_joints(j0, p0, t0)
    g0 = global_rotations(p0)

    tails = np.zeros((N_JOINTS, 3))
    children = {i: [c for c in range(N_JOINTS) if PARENTS[c] == i] for i in range(N_JOINTS)}
    for i in range(N_JOINTS):
        if i == 0:  # pelvis: forward (see the module docstring)
            tails[i] = j0[i] + max(0.5 * float(np.linalg.norm(j0[3] - j0[0])), 50.0) * g0[i][:, 2]
            continue
        if children[i]:
            c = PRIMARY_CHILD.get(i, children[i][0])
            tails[i] = j0[c]
            continue
        seg = j0[i] - j0[PARENTS[i]]
        seg_len = float(np.linalg.norm(seg))
        if i == 15:  # head: along the rotated canonical up axis
            d, length = g0[i][:, 1], max(seg_len, 60.0)
        elif i in (10, 11):  # toes: along the rotated canonical front axis
            d, length = g0[i][:, 2], max(0.5 * seg_len, 30.0)
        else:  # hands: continue wrist -> hand
            d, length = _unit(seg), max(0.8 * seg_len, 30.0)
        tails[i] = j0[i] + length * _unit(d)
    # Degenerate (zero-length) bones get a 10 mm bone along the rotated canonical up axis.
    for i in range(N_JOINTS):
        if np.linalg.norm(tails[i] - j0[i]) < 1.0:
            tails[i] = j0[i] + 10.0 * g0[i][:, 1]

    frames = np.zeros((N_JOINTS, 3, 3))
    rolls = np.zeros(N_JOINTS)
    for i in range(N_JOINTS):
        y = _unit(tails[i] - j0[i])
        zref = g0[i][:, 2]
        if abs(np.dot(y, zref)) > 0.7:
            zref = g0[i][:, 1]
        z = _unit(zref - np.dot(zref, y) * y)
        x = np.cross(y, z)
        frames[i] = np.stack([x, y, z], axis=1)
        rolls[i] = roll_from_frame(frames[i])
    return Armature(joints_mm=j0.copy(), pose0=p0, transl0_mm=t0, joints_rest_mm=rest, heads=j0.copy(),
                    tails=tails, frames=frames, rolls=rolls, global_rot0=g0)


def armature_from_fit(fit) -> Armature:
    """``build_armature`` from a fit result (object with attributes or a dict / npz mapping): the
    fitted joints, and the skeleton's own pose (``scaffold_pose``, see ``core.body.fit.scaffold_pose``)
    where the fit has one, else the surface fit's pose."""
    mapping = hasattr(fit, "__getitem__") and not hasattr(fit, "joints_mm")

    def get(k):
        if mapping:
            return fit[k] if k in fit else None
        return getattr(fit, k, None)

    pose = get("scaffold_pose")
    if pose is None:
        pose = get("pose")
    return build_armature(np.asarray(get("joints_mm")), np.asarray(pose), np.asarray(get("transl_mm")))
