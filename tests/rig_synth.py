"""Synthetic rig inputs for the rig tests: SMPL-like rest joints, box bones, a fake body model.

Not a test module (no ``test_`` prefix); imported by tests/test_armature.py, test_binding.py,
test_motion.py and test_rig_blender.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctwin.core.body.skeleton import N_JOINTS, PARENTS, SUPINE_GLOBAL_ORIENT, forward_kinematics

# Canonical rest joints (mm; x left, y up, z front), roughly an adult in SMPL's T-pose.
REST_JOINTS_MM = np.array([
    [0, 0, 0], [90, -80, 0], [-90, -80, 0], [0, 100, -10], [100, -460, 0], [-100, -460, 0],
    [0, 230, 0], [100, -860, -30], [-100, -860, -30], [0, 290, 10], [110, -920, 90], [-110, -920, 90],
    [0, 500, -10], [70, 410, 0], [-70, 410, 0], [0, 580, 20], [180, 440, -10], [-180, 440, -10],
    [440, 440, -30], [-440, 440, -30], [690, 440, -20], [-690, 440, -20], [770, 440, -30], [-770, 440, -30],
], dtype=np.float64)

# Rigid structures used by the synthetic "phantom": name -> SMPL joint it moves with.
BONES = {
    "femur_left": 1, "femur_right": 2, "tibia_left": 4, "tibia_right": 5, "humerus_left": 16,
    "humerus_right": 17, "radius_left": 18, "ulna_right": 19, "skull": 15, "hip_left": 0, "sacrum": 0,
    "clavicula_left": 13, "tarsal_left": 7, "metacarpal_right": 21,
}


@dataclass
class Mesh:
    vertices: np.ndarray
    faces: np.ndarray
    name: str = ""


def box(center, half, n=3):
    """A closed box-like vertex cloud with triangle faces (n x n grid per face)."""
    g = np.linspace(-1, 1, n)
    pts = []
    for ax in range(3):
        for sgn in (-1, 1):
            a, b = np.meshgrid(g, g, indexing="ij")
            p = np.zeros((n * n, 3))
            others = [i for i in range(3) if i != ax]
            p[:, ax] = sgn
            p[:, others[0]] = a.ravel()
            p[:, others[1]] = b.ravel()
            pts.append(p)
    v = np.concatenate(pts) * np.asarray(half) + np.asarray(center)
    faces = []
    for f in range(6):
        o = f * n * n
        for i in range(n - 1):
            for j in range(n - 1):
                a = o + i * n + j
                faces += [[a, a + 1, a + n], [a + 1, a + n + 1, a + n]]
    return v, np.asarray(faces, dtype=np.int64)


def segment_mid(rest, j):
    kids = [c for c in range(N_JOINTS) if PARENTS[c] == j]
    if not kids:
        return rest[j]
    return 0.5 * (rest[j] + rest[kids[0] if j not in (0, 9) else (3 if j == 0 else 12)])


def acquisition_pose(rng=None):
    """Supine, arms down, small random joint rotations."""
    p = np.zeros((24, 3))
    p[0] = SUPINE_GLOBAL_ORIENT
    p[16, 2] = -1.25
    p[17, 2] = 1.25
    if rng is not None:
        p[1:] += rng.normal(0, 0.05, (23, 3))
    return p.reshape(72)


def target_pose(rng):
    p = acquisition_pose().reshape(24, 3).copy()
    p[0] += rng.normal(0, 0.1, 3)
    p[1, 0] = -0.9  # hip flexion
    p[4, 0] = 1.2  # knee flexion
    p[3, 0], p[6, 0], p[9, 0] = 0.25, 0.2, 0.2  # spine flexion
    p[16] += (0.3, 0.2, 0.8)
    p[18, 1] = -1.0
    p[15] += (0.2, 0.1, 0.0)
    return p.reshape(72)


def truth_scene(pose, transl_mm, rest=REST_JOINTS_MM):
    """World joints and per-bone world transforms T (like a phantom's truth.json) and posed meshes."""
    a, j = forward_kinematics(pose, rest)
    a[:, :3, 3] += transl_mm
    joints = j + transl_mm
    meshes, transforms = {}, {}
    for name, jid in BONES.items():
        v, f = box(segment_mid(rest, jid), (25, 25, 25))
        transforms[name] = a[jid]
        meshes[name] = Mesh(v @ a[jid][:3, :3].T + a[jid][:3, 3], f, name)
    return joints, transforms, meshes


class FakeBodyModel:
    """Boxes around every segment with one-hot weights; ``forward`` poses them by FK (mm)."""

    def __init__(self, rest=REST_JOINTS_MM):
        vs, fs, ws = [], [], []
        off = 0
        for j in range(N_JOINTS):
            v, f = box(segment_mid(rest, j), (60, 60, 60), n=4)
            w = np.zeros((len(v), N_JOINTS))
            w[:, j] = 1
            vs.append(v)
            fs.append(f + off)
            ws.append(w)
            off += len(v)
        self.v_template = np.concatenate(vs) / 1000.0
        self.faces = np.concatenate(fs)
        self.weights = np.concatenate(ws)
        self.rest = rest

    def forward(self, pose=None, betas=None, transl_mm=None, residual_mm=None):
        a, j = forward_kinematics(pose, self.rest)
        v = self.v_template * 1000.0
        m = np.einsum("vj,jab->vab", self.weights, a)
        out = np.einsum("vab,vb->va", m[:, :3, :3], v) + m[:, :3, 3]
        t = np.zeros(3) if transl_mm is None else np.asarray(transl_mm)
        return out + t, j + t


def best_rigid_deviation(a, b):
    """Max distance between b and the best rigid (Kabsch) fit of a onto b."""
    ca, cb = a.mean(0), b.mean(0)
    h = (a - ca).T @ (b - cb)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1, 1, d]) @ u.T
    return float(np.linalg.norm((a - ca) @ r.T + cb - b, axis=1).max())
