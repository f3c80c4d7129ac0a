"""SMPL's 24-joint kinematic tree and the rig maths shared by the body model, phantom and rig.

Conventions (SPEC section 4):
- A pose is 72 floats: 24 axis-angle vectors in SMPL's joint order. ``pose[0:3]`` rotates SMPL's
  canonical frame (x left, y up, z front) into LPS world; the identity lays the body along world +y.
- Rest geometry is in the canonical frame. Body models are stored in metres as SMPL files are;
  the world is in mm: ``world_mm = 1000 * posed_m + transl_mm`` (``model_to_world_mm``).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

from ..errors import CtwinError

JOINT_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hand", "right_hand",
)
PARENTS = np.array([-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21])
N_JOINTS = 24
JOINT_INDEX = {n: i for i, n in enumerate(JOINT_NAMES)}

# metres per millimetre: SMPL files and Blender's units are metres, the world is millimetres
MM_TO_M = 1e-3

# Global orientation of the standard acquisition: supine, head first. Canonical up (+y) -> superior
# (+z), canonical front (+z) -> anterior (-y): a +90 degree rotation about x.
SUPINE_GLOBAL_ORIENT = np.array([np.pi / 2, 0.0, 0.0])

# The project's canonical rest skeleton: anatomical joint centres of the default adult (1.75 m) in
# SMPL's T pose, canonical frame, millimetres, the floor at y = 0. Left side; the right mirrors x.
#
# A pose vector is a set of rotations *relative to the canonical rest bone directions*, so one pose
# means one articulation only between skeletons whose rest bones point the same way. The built-in
# body model (``core.body.body_model``) and the phantom (``core.phantom.anatomy``) are both generated around this
# table (each then scales its own segments, which keeps the directions): a pose fitted with the
# body model is the pose the phantom was generated with, and a target pose applied to a fitted twin
# moves its bones as the phantom's move. A user's own SMPL file brings its own rest skeleton.
# The spine joints sit on the intervertebral discs of ``core.phantom.anatomy``'s spine layout
# (tests/test_phantom.py checks that they agree).
_CANONICAL_LEFT_MM = {
    "pelvis": (0.0, 940.0, -10.0),
    "hip": (88.0, 905.0, 5.0),            # femoral head centre
    "spine1": (0.0, 1075.0, -22.5),       # L3/L4 disc
    "knee": (95.0, 500.0, -2.0),          # between the femoral condyles
    "spine2": (0.0, 1180.0, -34.0),       # T12/L1 disc
    "ankle": (95.0, 62.0, -5.0),          # talus
    "spine3": (0.0, 1345.0, -62.0),       # T6/T7 disc
    "foot": (95.0, 18.0, 125.0),          # metatarsophalangeal joints
    "neck": (0.0, 1488.4, -36.0),         # C7/T1 disc
    "collar": (25.0, 1442.0, 70.0),       # sternoclavicular joint: the clavicle's medial end
    "head": (0.0, 1610.0, -20.0),         # occipital condyles
    "shoulder": (180.0, 1425.0, -30.0),   # glenohumeral centre
    "elbow": (500.0, 1425.0, -30.0),      # between the epicondyles
    "wrist": (768.0, 1425.0, -25.0),      # radiocarpal joint
    "hand": (866.0, 1425.0, -25.0),       # metacarpophalangeal joints
}


def canonical_joints_mm() -> np.ndarray:
    """The canonical rest joints (24, 3) in mm, floor frame (see ``_CANONICAL_LEFT_MM``)."""
    j = np.zeros((N_JOINTS, 3))
    for name, xyz in _CANONICAL_LEFT_MM.items():
        if name in JOINT_INDEX:
            j[JOINT_INDEX[name]] = xyz
        else:
            j[JOINT_INDEX["left_" + name]] = xyz
            j[JOINT_INDEX["right_" + name]] = (-xyz[0], xyz[1], xyz[2])
    return j


def kintree_table() -> np.ndarray:
    """SMPL's ``kintree_table`` (2 x 24): parents (root's parent as 2**32-1) and joint ids."""
    t = np.zeros((2, N_JOINTS), dtype=np.int64)
    t[0] = np.where(PARENTS < 0, 4294967295, PARENTS)
    t[1] = np.arange(N_JOINTS)
    return t


def rodrigues(rotvecs) -> np.ndarray:
    """Axis-angle vectors (..., 3) to rotation matrices (..., 3, 3)."""
    r = np.asarray(rotvecs, dtype=np.float64)
    theta = np.sqrt(np.add.reduce(r * r, axis=-1, keepdims=True))
    tiny = theta < 1e-12
    k = r / np.where(tiny, 1.0, theta)
    kmat = np.zeros(r.shape[:-1] + (3, 3))
    kmat[..., 0, 1], kmat[..., 0, 2] = -k[..., 2], k[..., 1]
    kmat[..., 1, 0], kmat[..., 1, 2] = k[..., 2], -k[..., 0]
    kmat[..., 2, 0], kmat[..., 2, 1] = -k[..., 1], k[..., 0]
    s = np.sin(theta)[..., None]
    c = np.cos(theta)[..., None]
    eye = np.eye(3)
    out = eye + s * kmat + (1.0 - c) * (kmat @ kmat)
    return np.where(tiny[..., None], eye, out)


def rotation_to_rotvec(rot) -> np.ndarray:
    """Rotation matrices (..., 3, 3) to axis-angle vectors (..., 3)."""
    rot = np.asarray(rot, dtype=np.float64)
    flat = rot.reshape(-1, 3, 3)
    return Rotation.from_matrix(flat).as_rotvec().reshape(rot.shape[:-2] + (3,))


def rotvec_fast(rot) -> np.ndarray:
    """Rotation matrices (..., 3, 3) to axis-angle vectors (..., 3) by the closed form
    ``theta = acos((tr R - 1) / 2)``, ``r = theta / (2 sin theta) (R32 - R23, R13 - R31, R21 - R12)``:
    several times faster than ``rotation_to_rotvec`` on small batches. For relative rotations of
    adjacent joints: equal to scipy's to 3e-15 below 2.5 rad, 5e-13 below 3.1 rad; the closed form
    loses precision toward 180 degrees (3e-8 at 1e-4 rad from it), where ``rotation_to_rotvec``
    takes over."""
    rot = np.asarray(rot, dtype=np.float64)
    flat = rot.reshape(-1, 3, 3)
    c = np.clip(0.5 * (flat[:, 0, 0] + flat[:, 1, 1] + flat[:, 2, 2] - 1.0), -1.0, 1.0)
    th = [math.acos(x) for x in c.tolist()]
    v = np.stack([flat[:, 2, 1] - flat[:, 1, 2], flat[:, 0, 2] - flat[:, 2, 0], flat[:, 1, 0] - flat[:, 0, 1]], axis=-1)
    f = [0.5 if t < 1e-9 else (math.nan if t > math.pi - 1e-4 else 0.5 * t / math.sin(t)) for t in th]
    out = v * np.array(f)[:, None]
    near = [i for i, t in enumerate(th) if t > math.pi - 1e-4]
    if near:
        out[near] = rotation_to_rotvec(flat[near])
    return out.reshape(rot.shape[:-2] + (3,))


def as_pose(pose) -> np.ndarray:
    """Validate a pose (72 floats or 24x3) and return it as (24, 3) float64."""
    p = np.asarray(pose, dtype=np.float64)
    if p.size != 72:
        raise CtwinError(f"a pose has 72 values (24 joints x 3), got {p.size}")
    return p.reshape(N_JOINTS, 3)


def forward_kinematics(pose, joints_rest, parents=PARENTS):
    """Skinning transforms of a pose.

    Returns ``(A, joints_posed)``: ``A`` (24, 4, 4) maps a rest-space point bound to joint j to its
    posed position (``x_posed = A[j] @ [x_rest, 1]``), and ``joints_posed`` (24, 3). The root rotates
    about its own rest position, as in SMPL. Units are those of ``joints_rest``.
    """
    return rigid_transforms(rodrigues(as_pose(pose)), joints_rest, parents)


def depth_levels(parents) -> tuple:
    """The joints of a kinematic tree grouped by depth (root first), each group an index array:
    every joint's parent lies in an earlier group. Parents must precede their children."""
    par = np.asarray(parents)
    key = (par.dtype.str, par.tobytes())
    levels = _LEVELS.get(key)
    if levels is None:
        depth = []
        for i, p in enumerate(int(v) for v in par):
            if p >= i:
                raise CtwinError(f"kinematic tree: joint {i}'s parent {p} does not precede it")
            depth.append(0 if p < 0 else depth[p] + 1)
        depth = np.asarray(depth)
        levels = tuple(np.flatnonzero(depth == d) for d in range(int(depth.max()) + 1)) if len(par) else ()
        _LEVELS[key] = levels
    return levels


_LEVELS: dict = {}


def rigid_transforms(rots, joints_rest, parents=PARENTS):
    """``forward_kinematics`` from per-joint local rotation matrices (24, 3, 3) (smplx's
    ``batch_rigid_transform``): returns ``(A (24, 4, 4), joints_posed (24, 3))``.

    The chain ``G_i = G_parent(i) L_i`` is evaluated one tree depth at a time (one stacked 4x4
    product per depth; each product is the same BLAS product as a joint-by-joint loop's, so the
    result is bit-identical to it)."""
    j = np.asarray(joints_rest, dtype=np.float64)
    par = np.asarray(parents)
    local = _local_transforms(j, par)
    local[:, :3, :3] = rots
    g = np.empty(local.shape)
    _chain(g, local, [(lvl, None if d == 0 else par[lvl]) for d, lvl in enumerate(depth_levels(par))])
    return _skinning(g, j), g[:, :3, 3].copy()


def _local_transforms(j: np.ndarray, par: np.ndarray) -> np.ndarray:
    """(n, 4, 4) joint-local transforms with the rest offsets from the parents (rotations zero)."""
    local = np.zeros((len(par), 4, 4))
    local[:, 3, 3] = 1.0
    local[:, :3, 3] = j
    child = par >= 0
    local[child, :3, 3] = j[child] - j[par[child]]
    return local


def _chain(g: np.ndarray, local: np.ndarray, steps) -> None:
    """``g[sel] = g[parents of sel] @ local[sel]`` per (sel, parents) step, in order (parents None:
    roots, ``g[sel] = local[sel]``)."""
    for sel, psel in steps:
        g[sel] = local[sel] if psel is None else g[psel] @ local[sel]


def _skinning(g: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The skinning transforms ``A = G T(-J_rest)`` of the global joint transforms ``G``."""
    a = g.copy()
    a[:, :3, 3] -= np.einsum("nij,nj->ni", g[:, :3, :3], j)
    return a


class ForwardKinematics:
    """``forward_kinematics(pose, joints_rest)[0]`` for a sequence of poses (an optimiser's): each
    call recomputes the rotations of the joints whose pose values changed since the previous call
    and the chain below them only, keeping the other joints' transforms; bit-identical to
    ``forward_kinematics``."""

    def __init__(self, joints_rest, parents=PARENTS):
        self.j = np.asarray(joints_rest, dtype=np.float64)
        self.parents = np.asarray(parents)
        n = len(self.parents)
        self.levels = depth_levels(self.parents)
        self.below = np.eye(n, dtype=bool)  # below[i]: joint i and its descendants
        for i in range(n - 1, 0, -1):  # children come after their parents
            if self.parents[i] >= 0:
                self.below[self.parents[i]] |= self.below[i]
        self.local = _local_transforms(self.j, self.parents)
        self.g = np.empty(self.local.shape)
        self.pose = None
        self._steps = {}

    def __call__(self, pose) -> np.ndarray:
        """The skinning transforms A (n, 4, 4) of ``pose`` (a new array)."""
        p = np.array(as_pose(pose) if len(self.parents) == N_JOINTS else np.asarray(pose, np.float64).reshape(-1, 3))
        changed = np.arange(len(p)) if self.pose is None else np.flatnonzero((p != self.pose).any(axis=1))
        if len(changed):
            self.local[changed, :3, :3] = rodrigues(p[changed])
            key = changed.tobytes()
            steps = self._steps.get(key)
            if steps is None:
                below = self.below[changed].any(axis=0)
                steps = self._steps[key] = [(lvl[below[lvl]], None if d == 0 else self.parents[lvl[below[lvl]]])
                                            for d, lvl in enumerate(self.levels) if below[lvl].any()]
            _chain(self.g, self.local, steps)
            self.pose = p
        return _skinning(self.g, self.j)


def model_to_world_mm(points_m, transl_mm) -> np.ndarray:
    """Posed body-model coordinates (metres, global orientation applied) to LPS world mm."""
    return 1000.0 * np.asarray(points_m, dtype=np.float64) + np.asarray(transl_mm, dtype=np.float64)

