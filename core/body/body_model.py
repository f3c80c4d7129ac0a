"""The built-in SMPL-format body model, loading any SMPL model file, and linear blend skinning.

SMPL's own model files are licensed and cannot ship, so ctwin generates its own body model
deterministically by code (:func:`generate_body_model`): no SMPL data is downloaded or copied.
It has SMPL's file layout, units and conventions, so that it and a user's licensed SMPL file go
through exactly the same code (:func:`load_body_model`, :class:`BodyModel`, and ``smplx``):

- keys ``v_template`` (V, 3) metres, ``f`` (F, 3), ``J_regressor`` (24, V) dense, ``weights``
  (V, 24), ``posedirs`` (V, 3, 207), ``shapedirs`` (V, 3, 10), ``kintree_table`` (2, 24), plus
  ``J`` (24, 3, the rest joints) and ``shape_names`` (what each shape component does);
- SMPL's canonical frame: x = the body's left, y = up, z = front; a T-pose with the arms out
  horizontally (palms down), legs straight, feet flat on the plane of the soles;
- SMPL's 24 joints, named and ordered as :data:`core.body.skeleton.JOINT_NAMES`.

How the model is made:

- **Surface**: an implicit body, the smooth-min union of round cones and ellipsoids (head, neck,
  torso, pelvis, shoulders, arms, mitten hands with a thumb, thighs, calves, feet), polygonised
  with marching cubes, the largest component kept, smoothed (Taubin) and projected back onto the
  implicit surface. It is watertight, manifold and oriented outward (checked at generation).
  Vertices ``smplx`` reads as extra keypoints (nose, eyes, ears, toes, heels, finger tips; see
  ``smplx.vertex_ids['smplh']``) are placed at those anatomical landmarks.
- **Joints**: the project's canonical rest skeleton (``core.body.skeleton.canonical_joints_mm``:
  anatomical joint centres of an adult, 1.75 m at ``betas = 0``, the same bone directions as the
  phantom's, so a fitted pose is the phantom's pose); the limb flesh is stretched to follow
  them (``_retarget``). The pelvis joint is at the
  origin for every shape, so ``transl`` is the pelvis position (in SMPL it is not; nothing else
  depends on it). ``J_regressor`` rows are convex weights of the vertices around each joint
  that reproduce the joint centre (to ~1e-6 m at rest).
- **Skinning weights**: a softmax of the distances to each joint's body-part primitives,
  restricted to the kinematic neighbourhood of the nearest part, smoothed on the mesh; rows sum
  to 1, mostly 1-3 joints per vertex.
- **Shape space** (``betas``, 10 components, :data:`SHAPE_NAMES`): each component is an exact
  linear displacement field of the same topology: per-bone affine maps (scaling along the bone
  axis and around it, joints following down the tree) blended with the skinning weights.
  ``betas[0]`` is stature: height = 1.75 m x (1 + 0.048 betas[0]), so betas in [-3, 3] span
  about 1.50-2.00 m.
- **Pose correctives** (``posedirs``) are all zero: the built-in model is plain LBS.

Loading: :func:`load_body_model` reads ``.npz`` (no pickle) or ``.pkl`` (a user's licensed SMPL
file: chumpy arrays and scipy sparse matrices are converted generically; chumpy itself is not
needed for the usual SMPL files) through one code path, and :meth:`BodyModel.forward` is SMPL's
LBS as ``smplx`` computes it (it matches ``smplx`` in float64 to < 1e-6 m).

Note on ``smplx``: ``smplx.SMPL(model_path=...)`` reads its file with ``pickle`` only, so it
loads the ``.pkl`` twin of the built-in model (``default_body_model_path(".pkl")``); for any
``.npz`` use :meth:`BodyModel.to_smplx`, which passes the same arrays as ``data_struct``. ``smplx`` appends 21 extra keypoints from fixed vertex ids
(indices < 6890), so the built-in model has more vertices than that.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
import heapq
import zipfile

from ..errors import CtwinError
from ..fileio import atomic_path
from ..progress import report
from .skeleton import (JOINT_INDEX, JOINT_NAMES, N_JOINTS, PARENTS, as_pose, canonical_joints_mm,
                       kintree_table, rigid_transforms, rodrigues)
# Imported where used, so that importing this module stays light: skimage, smplx, trimesh (heavy or optional third-party packages).

GENERATOR_VERSION = 2
NUM_BETAS = 10
DEFAULT_HEIGHT_M = 1.75
GRID_SPACING_M = 0.0105  # marching-cubes grid of the built-in surface
TARGET_VERTICES = 9000  # after decimation
STATURE_PER_BETA = 0.048  # relative height change per unit of betas[0]

SHAPE_NAMES = (
    "stature",          # uniform scale about the pelvis
    "girth",            # weight: torso and limb circumference, belly
    "shoulder_width",
    "hip_width",
    "arm_length",       # arm length relative to height
    "leg_length",       # leg length relative to the trunk, height nearly unchanged
    "torso_length",
    "head_size",
    "belly",            # abdominal depth
    "limb_girth",       # limb circumference relative to the trunk (muscularity)
)

# Vertex ids smplx reads as extra keypoints (smplx.vertex_ids['smplh']): name -> landmark.
SMPLX_KEYPOINT_IDS = {
    "nose": 332, "reye": 6260, "leye": 2800, "rear": 4071, "lear": 583,
    "rthumb": 6191, "rindex": 5782, "rmiddle": 5905, "rring": 6016, "rpinky": 6133,
    "lthumb": 2746, "lindex": 2319, "lmiddle": 2445, "lring": 2556, "lpinky": 2673,
    "LBigToe": 3216, "LSmallToe": 3226, "LHeel": 3387,
    "RBigToe": 6617, "RSmallToe": 6624, "RHeel": 6787,
}

_REQUIRED_KEYS = ("v_template", "f", "J_regressor", "weights", "posedirs", "shapedirs", "kintree_table")


# --------------------------------------------------------------------------------------------
# Anatomy of the built-in body (metres, measured from the floor; x = left, y = up, z = front).
# Left-side items are listed once and mirrored (x -> -x) for the right side.
# --------------------------------------------------------------------------------------------
# The rest joints are the project's canonical skeleton (``core.body.skeleton.canonical_joints_mm``,
# shared with the phantom so that one pose vector means one articulation for both). The flesh
# primitives below were drawn around the skeleton in ``_FLESH_JOINTS_FLOOR``; ``_retarget`` moves
# the limb primitives (and limb landmarks) with their joints, so arms and legs bend where the
# canonical joints are.
_ORIGIN_FLOOR = canonical_joints_mm()[0] / 1000.0  # the pelvis joint: the model's origin
_PELVIS_HEIGHT = float(_ORIGIN_FLOOR[1])

_FLESH_JOINTS_FLOOR = {
    "pelvis": (0.0, 0.970, 0.000),
    "left_hip": (0.088, 0.885, 0.002),
    "spine1": (0.0, 1.085, -0.012),
    "left_knee": (0.098, 0.490, 0.004),
    "spine2": (0.0, 1.205, -0.015),
    "left_ankle": (0.104, 0.082, -0.030),
    "spine3": (0.0, 1.275, -0.012),
    "left_foot": (0.112, 0.022, 0.100),
    "neck": (0.0, 1.490, -0.022),
    "left_collar": (0.072, 1.415, -0.010),
    "head": (0.0, 1.590, 0.005),
    "left_shoulder": (0.180, 1.425, -0.022),
    "left_elbow": (0.465, 1.425, -0.030),
    "left_wrist": (0.720, 1.425, -0.025),
    "left_hand": (0.810, 1.425, -0.025),
}

# Primitives: (joint, kind, params). kind "cone": (a, b, ra, rb) round cone; "ellipsoid":
# (centre, radii). The union is clipped at the floor (y >= 0), which flattens the soles.
_PRIMS_FLOOR = [
    # trunk
    ("pelvis", "ellipsoid", ((0.0, 0.930, -0.010), (0.170, 0.115, 0.120))),
    ("pelvis", "ellipsoid", ((0.064, 0.905, -0.050), (0.086, 0.100, 0.082))),  # buttock
    ("spine1", "ellipsoid", ((0.0, 1.060, 0.004), (0.152, 0.120, 0.112))),
    ("spine2", "ellipsoid", ((0.0, 1.180, -0.002), (0.148, 0.120, 0.108))),
    ("spine3", "ellipsoid", ((0.0, 1.300, 0.000), (0.165, 0.152, 0.120))),
    ("left_collar", "cone", ((0.045, 1.405, -0.018), (0.170, 1.430, -0.024), 0.066, 0.056)),
    # the clavicle's ridge, from the sternoclavicular joint (the collar joint) to the shoulder
    ("left_collar", "cone", ((0.025, 1.445, 0.060), (0.120, 1.455, 0.042), 0.022, 0.022)),
    ("left_collar", "cone", ((0.120, 1.455, 0.042), (0.176, 1.461, -0.020), 0.022, 0.022)),
    ("neck", "cone", ((0.0, 1.440, -0.022), (0.0, 1.585, -0.004), 0.058, 0.053)),
    ("head", "ellipsoid", ((0.0, 1.642, 0.014), (0.076, 0.108, 0.096))),
    # arm (left; mirrored for the right)
    ("left_shoulder", "cone", ((0.180, 1.425, -0.022), (0.465, 1.425, -0.030), 0.052, 0.039)),
    ("left_elbow", "cone", ((0.465, 1.425, -0.030), (0.720, 1.425, -0.025), 0.039, 0.027)),
    ("left_wrist", "ellipsoid", ((0.778, 1.424, -0.022), (0.062, 0.0165, 0.044))),
    ("left_wrist", "cone", ((0.745, 1.420, 0.012), (0.805, 1.420, 0.052), 0.0145, 0.0125)),
    ("left_hand", "ellipsoid", ((0.858, 1.425, -0.024), (0.058, 0.0135, 0.041))),
    # leg
    ("left_hip", "cone", ((0.088, 0.885, 0.002), (0.098, 0.490, 0.004), 0.078, 0.050)),
    ("left_knee", "cone", ((0.098, 0.490, 0.004), (0.104, 0.082, -0.030), 0.049, 0.031)),
    ("left_knee", "ellipsoid", ((0.099, 0.355, -0.016), (0.050, 0.110, 0.056))),
    ("left_ankle", "cone", ((0.103, 0.036, -0.058), (0.110, 0.028, 0.090), 0.046, 0.038)),
    ("left_foot", "ellipsoid", ((0.115, 0.018, 0.150), (0.046, 0.029, 0.060))),
]

# Landmarks for smplx's keypoint vertex ids (left side; right mirrored), floor coordinates.
_LANDMARKS_FLOOR = {
    "nose": (0.0, 1.625, 0.160), "leye": (0.033, 1.665, 0.140), "lear": (0.095, 1.635, 0.005),
    "lthumb": (0.815, 1.420, 0.075), "lindex": (0.915, 1.425, 0.012),
    "lmiddle": (0.925, 1.425, -0.012), "lring": (0.915, 1.425, -0.036),
    "lpinky": (0.895, 1.425, -0.060),
    "LBigToe": (0.095, 0.000, 0.230), "LSmallToe": (0.150, 0.000, 0.185),
    "LHeel": (0.103, 0.000, -0.110),
}
_SMOOTH_K = 0.028  # smooth-min blending radius (m)
_SMOOTH_K_TRUNK = 0.08  # the trunk's parts blend over a wider band (no creases at the waist)
_TRUNK = ("pelvis", "spine1", "spine2", "spine3")


def _mirror_name(name: str) -> str:
    if name.startswith("left_"):
        return "right_" + name[5:]
    return name


def _rest_joints() -> np.ndarray:
    """Rest joints (24, 3) in the canonical frame, metres, pelvis at the origin."""
    return canonical_joints_mm() / 1000.0 - _ORIGIN_FLOOR


_ARM_CHAIN = ("left_shoulder", "left_elbow", "left_wrist", "left_hand")
_LEG_CHAIN = ("left_hip", "left_knee", "left_ankle")


def _retarget(joint: str, p) -> np.ndarray:
    """A left-side primitive point (floor frame, m) of ``joint``'s body part, moved from the flesh
    skeleton (``_FLESH_JOINTS_FLOOR``) to the canonical one: along the arm and leg chains the
    joints' displacements are interpolated by the point's projection on the chain (a stretch of
    each segment); the leg keeps its front-back profile (x and y only); the foot moves sideways
    with the ankle and keeps its sole on the floor; the trunk and head stay as drawn."""
    p = np.asarray(p, dtype=np.float64)
    new = canonical_joints_mm() / 1000.0
    if joint in _ARM_CHAIN:
        chain, keep = _ARM_CHAIN, np.ones(3)
    elif joint in _LEG_CHAIN[:2]:
        chain, keep = _LEG_CHAIN, np.array([1.0, 1.0, 0.0])
    elif joint in ("left_ankle", "left_foot"):
        d = new[JOINT_INDEX["left_ankle"]] - np.asarray(_FLESH_JOINTS_FLOOR["left_ankle"])
        return p + d * np.array([1.0, 0.0, 0.0])
    else:
        return p
    old_j = [np.asarray(_FLESH_JOINTS_FLOOR[n]) for n in chain]
    new_j = [new[JOINT_INDEX[n]] for n in chain]
    best = None
    for k in range(len(chain) - 1):
        ab = old_j[k + 1] - old_j[k]
        t = float(np.clip(np.dot(p - old_j[k], ab) / np.dot(ab, ab), 0.0, 1.0))
        dist = float(np.linalg.norm(old_j[k] + t * ab - p))
        if best is None or dist < best[0]:
            best = (dist, k, t)
    _, k, t = best
    d = (1.0 - t) * (new_j[k] - old_j[k]) + t * (new_j[k + 1] - old_j[k + 1])
    return p + d * keep


def _primitives() -> list:
    """All primitives (both sides) in the canonical frame: dicts with joint, kind, arrays."""
    out = []
    for joint, kind, params in _PRIMS_FLOOR:
        sides = [(joint, 1.0)]
        if joint.startswith("left_"):
            sides.append((_mirror_name(joint), -1.0))
        for name, sx in sides:
            m = np.array([sx, 1.0, 1.0])
            shift = -_ORIGIN_FLOOR
            if kind == "cone":
                a, b, ra, rb = params
                a, b = _retarget(joint, a), _retarget(joint, b)
                prim = dict(a=np.array(a) * m + shift, b=np.array(b) * m + shift, ra=ra, rb=rb)
                lo = np.minimum(prim["a"] - ra, prim["b"] - rb)
                hi = np.maximum(prim["a"] + ra, prim["b"] + rb)
            else:
                c, r = params
                c = _retarget(joint, c)
                prim = dict(c=np.array(c) * m + shift, r=np.array(r, dtype=np.float64))
                lo, hi = prim["c"] - prim["r"], prim["c"] + prim["r"]
            k = _SMOOTH_K_TRUNK if name in _TRUNK else _SMOOTH_K
            prim.update(joint=JOINT_INDEX[name], kind=kind, lo=lo, hi=hi, k=k)
            out.append(prim)
    return out


def _prim_sdf(prim, p: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of one primitive at points (..., 3)."""
    if prim["kind"] == "cone":
        d = _round_cone_sdf(p, prim["a"], prim["b"], prim["ra"], prim["rb"])
    else:
        q = p - prim["c"]
        r = prim["r"]
        k0 = np.linalg.norm(q / r, axis=-1)
        k1 = np.linalg.norm(q / (r * r), axis=-1)
        d = k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)
    return d


def _round_cone_sdf(p, a, b, r1, r2):
    """Exact signed distance to a round cone (sphere r1 at a swept to sphere r2 at b)."""
    ba = b - a
    l2 = float(ba @ ba)
    rr = r1 - r2
    a2 = l2 - rr * rr
    il2 = 1.0 / l2
    pa = p - a
    y = pa @ ba
    z = y - l2
    w = pa * l2 - y[..., None] * ba
    x2 = np.einsum("...i,...i->...", w, w)
    y2 = y * y * l2
    z2 = z * z * l2
    k = np.sign(rr) * rr * rr * x2
    d_mid = (np.sqrt(np.maximum(x2 * a2 * il2, 0.0)) + y * rr) * il2 - r1
    d_b = np.sqrt(x2 + z2) * il2 - r2
    d_a = np.sqrt(x2 + y2) * il2 - r1
    return np.where(np.sign(z) * a2 * z2 > k, d_b, np.where(np.sign(y) * a2 * y2 < k, d_a, d_mid))


def _smin(a, b, k=_SMOOTH_K):
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


def _body_sdf(p: np.ndarray, prims) -> np.ndarray:
    d = np.full(p.shape[:-1], np.inf)
    for prim in prims:
        d = _smin(d, _prim_sdf(prim, p), prim["k"])
    return np.maximum(d, -(p[..., 1] + _PELVIS_HEIGHT))  # flat soles: nothing below the floor


def _grid_sdf(prims, spacing):
    """The body's implicit field on a regular grid (each primitive evaluated in its box only)."""
    lo = np.min([p["lo"] for p in prims], axis=0) - 3 * spacing
    hi = np.max([p["hi"] for p in prims], axis=0) + 3 * spacing
    half_x = np.ceil(max(-lo[0], hi[0]) / spacing)
    lo[0], hi[0] = -half_x * spacing, half_x * spacing  # symmetric in x: mirror-symmetric mesh
    n = np.round((hi - lo) / spacing).astype(int) + 1
    axes = [lo[i] + spacing * np.arange(n[i]) for i in range(3)]
    field = np.full(tuple(n), 1.0)  # "far outside"
    for prim in prims:
        margin = prim["k"] + 2 * spacing
        i0 = np.maximum(np.floor((prim["lo"] - margin - lo) / spacing).astype(int), 0)
        i1 = np.minimum(np.ceil((prim["hi"] + margin - lo) / spacing).astype(int) + 1, n)
        sub = np.stack(np.meshgrid(*[axes[i][i0[i]:i1[i]] for i in range(3)], indexing="ij"), axis=-1)
        sl = tuple(slice(i0[i], i1[i]) for i in range(3))
        field[sl] = _smin(field[sl], _prim_sdf(prim, sub), prim["k"])
    floor = -(axes[1] + _PELVIS_HEIGHT)
    return np.maximum(field, floor[None, :, None]), lo


def _surface(prims, spacing):
    """Watertight outward-oriented surface of the implicit body: (V, F)."""
    import trimesh
    from skimage.measure import marching_cubes

    field, origin = _grid_sdf(prims, spacing)
    verts, faces, _, _ = marching_cubes(-field, level=0.0, spacing=(spacing,) * 3)
    verts = verts + origin
    mesh = trimesh.Trimesh(verts, faces, process=True, validate=False)
    parts = mesh.split(only_watertight=False)
    mesh = max(parts, key=lambda m: len(m.faces)) if len(parts) > 1 else mesh
    mesh.remove_unreferenced_vertices()
    v, f = _decimate(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64),
                     TARGET_VERTICES)
    mesh = trimesh.Trimesh(v, f, process=False)
    trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=-0.53, iterations=10)
    v = _project_to_surface(np.asarray(mesh.vertices, dtype=np.float64), prims, iterations=3)
    if trimesh.Trimesh(v, f, process=False).volume < 0:
        f = f[:, ::-1].copy()
    return v, f


def _decimate(v, f, target_nv, min_cos=0.3):
    """Shortest-edge-first collapse to ``target_nv`` vertices, keeping a closed 2-manifold.

    Each collapse merges an edge's end points at its midpoint; it is refused when it would break
    the link condition (non-manifold result), leave a vertex of valence < 3, or flip or fold a
    face (normal turning by more than acos(min_cos)). Deterministic (ties broken by index).
    Plain Python on lists: the per-collapse work is on a dozen tiny triangles.
    """
    nv = len(v)
    pos = [tuple(p) for p in np.asarray(v, dtype=np.float64).tolist()]
    tris = [list(t) for t in np.asarray(f).tolist()]
    face_alive = [True] * len(tris)
    vert_alive = [True] * nv
    vf = [set() for _ in range(nv)]
    for i, tri in enumerate(tris):
        for x in tri:
            vf[x].add(i)

    def neighbours(x):
        out = set()
        for fi in vf[x]:
            out.update(tris[fi])
        out.discard(x)
        return out

    def length2(a, b):
        pa, pb = pos[a], pos[b]
        return (pa[0] - pb[0]) ** 2 + (pa[1] - pb[1]) ** 2 + (pa[2] - pb[2]) ** 2

    def normal(p0, p1, p2):
        ux, uy, uz = p1[0] - p0[0], p1[1] - p0[1], p1[2] - p0[2]
        wx, wy, wz = p2[0] - p0[0], p2[1] - p0[1], p2[2] - p0[2]
        return (uy * wz - uz * wy, uz * wx - ux * wz, ux * wy - uy * wx)

    edges = np.unique(np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1), axis=0)
    heap = [(length2(a, b), a, b) for a, b in edges.tolist()]
    heapq.heapify(heap)
    alive = nv
    while alive > target_nv and heap:
        l2, a, b = heapq.heappop(heap)
        if not (vert_alive[a] and vert_alive[b]) or length2(a, b) != l2:
            continue
        shared = vf[a] & vf[b]
        if len(shared) != 2:
            continue
        opposite = set()
        for fi in shared:
            opposite.update(tris[fi])
        opposite -= {a, b}
        na, nb = neighbours(a), neighbours(b)
        if (na & nb) != opposite or len(na | nb) < 5 or any(len(vf[c]) <= 3 for c in opposite):
            continue
        pa, pb = pos[a], pos[b]
        p = (0.5 * (pa[0] + pb[0]), 0.5 * (pa[1] + pb[1]), 0.5 * (pa[2] + pb[2]))
        ok = True
        for x in (a, b):
            for fi in vf[x] - shared:
                tri = tris[fi]
                old = [pos[t] for t in tri]
                new = [p if t == x else pos[t] for t in tri]
                n0, n1 = normal(*old), normal(*new)
                dot = n0[0] * n1[0] + n0[1] * n1[1] + n0[2] * n1[2]
                den = ((n0[0] ** 2 + n0[1] ** 2 + n0[2] ** 2) * (n1[0] ** 2 + n1[1] ** 2 + n1[2] ** 2)) ** 0.5
                if den <= 0.0 or dot < min_cos * den:
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            continue
        for fi in shared:
            face_alive[fi] = False
            for x in tris[fi]:
                vf[x].discard(fi)
        for fi in vf[b]:
            tri = tris[fi]
            tri[tri.index(b)] = a
            vf[a].add(fi)
        vf[b] = set()
        vert_alive[b] = False
        pos[a] = p
        alive -= 1
        for c in neighbours(a):
            heapq.heappush(heap, (length2(a, c), min(a, c), max(a, c)))
    keep = np.flatnonzero(vert_alive)
    remap = np.full(nv, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    faces = np.array([t for t, ok in zip(tris, face_alive) if ok], dtype=np.int64)
    return np.array(pos, dtype=np.float64)[keep], remap[faces]


def _project_to_surface(v, prims, iterations=3, h=1e-5):
    for _ in range(iterations):
        d = _body_sdf(v, prims)
        g = np.stack([(_body_sdf(v + h * e, prims) - _body_sdf(v - h * e, prims)) / (2 * h)
                      for e in np.eye(3)], axis=-1)
        g2 = np.maximum(np.einsum("ij,ij->i", g, g), 1e-6)
        step = (d / g2)[:, None] * g
        step_len = np.linalg.norm(step, axis=1, keepdims=True)
        v = v - step * np.minimum(1.0, 0.5 * GRID_SPACING_M / np.maximum(step_len, 1e-15))
    return v


def _place_landmarks(v, f):
    """Permute vertices so that smplx's keypoint vertex ids sit at the matching landmarks."""
    nv = len(v)
    if nv <= max(SMPLX_KEYPOINT_IDS.values()):
        raise RuntimeError("the built-in body surface has too few vertices for smplx's keypoints")
    targets = {}
    for name, p in _LANDMARKS_FLOOR.items():
        part = {"lt": "left_hand", "li": "left_hand", "lm": "left_hand", "lr": "left_hand", "lp": "left_hand",
                "LB": "left_foot", "LS": "left_foot", "LH": "left_foot"}.get(name[:2], "head")
        q = _retarget(part, p) - _ORIGIN_FLOOR
        targets[name] = q
        if name[0] in "lL":
            targets[{"l": "r", "L": "R"}[name[0]] + name[1:]] = q * np.array([-1.0, 1.0, 1.0])
    chosen = {}
    used = set()
    for name in SMPLX_KEYPOINT_IDS:  # fixed order: deterministic
        order = np.argsort(np.linalg.norm(v - targets[name], axis=1), kind="stable")
        k = next(int(i) for i in order if int(i) not in used)
        used.add(k)
        chosen[SMPLX_KEYPOINT_IDS[name]] = k
    new_to_old = np.full(nv, -1, dtype=np.int64)
    for new, old in chosen.items():
        new_to_old[new] = old
    rest_old = np.array([i for i in range(nv) if i not in used], dtype=np.int64)
    new_to_old[new_to_old < 0] = rest_old
    old_to_new = np.empty(nv, dtype=np.int64)
    old_to_new[new_to_old] = np.arange(nv)
    return v[new_to_old], old_to_new[f]


# --------------------------------------------------------------------------------------------
# Skinning weights, joint regressor, shape space
# --------------------------------------------------------------------------------------------
def _kinematic_distance() -> np.ndarray:
    n = N_JOINTS
    d = np.full((n, n), 99, dtype=int)
    np.fill_diagonal(d, 0)
    for j in range(1, n):
        d[j, PARENTS[j]] = d[PARENTS[j], j] = 1
    for k in range(n):  # Floyd-Warshall on a 24-node tree
        d = np.minimum(d, d[:, k:k + 1] + d[k:k + 1, :])
    return d


def _vertex_adjacency(f, nv):
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    a = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(nv, nv)).tocsr()
    a.data[:] = 1.0
    deg = np.asarray(a.sum(axis=1)).ravel()
    return a, deg


def _skinning_weights(v, f, prims, tau=0.011, smooth_iters=4, min_weight=0.01):
    nv = len(v)
    dist = np.full((nv, N_JOINTS), np.inf)
    for prim in prims:
        dist[:, prim["joint"]] = np.minimum(dist[:, prim["joint"]], _prim_sdf(prim, v))
    best = np.argmin(dist, axis=1)
    kd = _kinematic_distance()
    side = np.array([1 if n.startswith("left_") else -1 if n.startswith("right_") else 0 for n in JOINT_NAMES])
    allowed = (kd[best] <= 2) & (side[best][:, None] * side[None, :] >= 0)
    rel = dist - dist[np.arange(nv), best][:, None]
    w = np.where(allowed, np.exp(-np.minimum(rel, 50 * tau) / tau), 0.0)
    w /= w.sum(axis=1, keepdims=True)
    adj, deg = _vertex_adjacency(f, nv)
    for _ in range(smooth_iters):
        w = 0.5 * w + 0.5 * (adj @ w) / deg[:, None]
    w[w < min_weight] = 0.0
    return w / w.sum(axis=1, keepdims=True)


def _joint_regressor(v, joints, max_radius=0.3):
    """Convex vertex weights per joint that reproduce the joint centre.

    Candidates are the vertices within a radius of the joint (grown until the joint lies in
    their hull); the weights are the closest ones to a Gaussian falloff that satisfy
    ``sum(w) = 1``, ``w @ v = joint`` and ``w >= 0`` (active-set least-change projection).
    """
    reg = np.zeros((N_JOINTS, len(v)))
    for j in range(N_JOINTS):
        d = np.linalg.norm(v - joints[j], axis=1)
        r = 1.5 * d.min()
        while True:
            idx = np.flatnonzero(d <= r)
            w0 = np.exp(-0.5 * (d[idx] / (0.5 * r)) ** 2)
            w0 /= w0.sum()
            w, err = _convex_fit(v[idx], joints[j], w0)
            if err < 1e-6 or r > max_radius:
                break
            r *= 1.2
        if err > 1e-3:
            raise RuntimeError(f"joint regressor: cannot surround joint {JOINT_NAMES[j]} ({err:.4f} m)")
        reg[j, idx] = w
    return reg


def _convex_fit(pts, target, w0, iters=50):
    """min |w - w0|^2  s.t.  w >= 0, sum w = 1, w @ pts = target. Returns (w, residual)."""
    active = np.ones(len(w0), dtype=bool)
    w = w0.copy()
    for _ in range(iters):
        a = np.vstack([pts[active].T, np.ones((1, active.sum()))])  # (4, n)
        rhs = np.concatenate([target, [1.0]]) - a @ w0[active]
        lam = np.linalg.lstsq(a @ a.T, rhs, rcond=None)[0]
        w = np.zeros(len(w0))
        w[active] = w0[active] + a.T @ lam
        neg = active & (w < 0)
        if not neg.any():
            break
        active &= ~neg
        if active.sum() < 4:
            break
    w = np.maximum(w, 0.0)
    w /= w.sum()
    return w, float(np.linalg.norm(w @ pts - target))


def _bone_frames(joints):
    """Per joint: axis u (along the bone it drives) and two radial unit vectors (e1, e2)."""
    children = {j: [c for c in range(N_JOINTS) if PARENTS[c] == j] for j in range(N_JOINTS)}
    frames = []
    for j, name in enumerate(JOINT_NAMES):
        if name in ("pelvis", "spine1", "spine2", "spine3", "neck", "head"):
            u = np.array([0.0, 1.0, 0.0])
        elif len(children[j]) == 1:
            u = joints[children[j][0]] - joints[j]
        elif name.endswith("_hand"):
            u = joints[j] - joints[PARENTS[j]]
        else:  # feet (toes): forward
            u = np.array([0.0, 0.0, 1.0])
        u = u / np.linalg.norm(u)
        ref = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.7 else np.array([0.0, 1.0, 0.0])
        e1 = ref - (ref @ u) * u
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(u, e1)
        frames.append((u, e1, e2))
    return frames


def _shape_component(k, joints):
    """Per-bone linear maps C (24, 3, 3) for one unit of betas[k]."""
    frames = _bone_frames(joints)
    c = np.zeros((N_JOINTS, 3, 3))
    idx = JOINT_INDEX
    trunk = ["pelvis", "spine1", "spine2", "spine3"]
    arms = [f"{s}_{p}" for s in ("left", "right") for p in ("shoulder", "elbow", "wrist", "hand")]
    legs = [f"{s}_{p}" for s in ("left", "right") for p in ("hip", "knee", "ankle", "foot")]

    def add(names, axial=0.0, r1=0.0, r2=0.0):
        for n in names:
            u, e1, e2 = frames[idx[n]]
            c[idx[n]] += axial * np.outer(u, u) + r1 * np.outer(e1, e1) + r2 * np.outer(e2, e2)

    name = SHAPE_NAMES[k]
    if name == "stature":
        c[:] = STATURE_PER_BETA * np.eye(3)
    elif name == "girth":
        add(trunk, 0.0, 0.055, 0.075)
        add(["neck"], 0.0, 0.04, 0.04)
        add([n for n in arms + legs if not n.endswith(("_hand", "_foot", "_wrist", "_ankle"))], 0.0, 0.055, 0.055)
        add(["left_collar", "right_collar"], 0.0, 0.04, 0.04)
    elif name == "shoulder_width":
        add(["spine3"], 0.0, 0.045, 0.0)
        add(["left_collar", "right_collar"], 0.12, 0.0, 0.0)
    elif name == "hip_width":
        add(["pelvis"], 0.0, 0.055, 0.01)
        add(["spine1"], 0.0, 0.02, 0.0)
    elif name == "arm_length":
        add([n for n in arms if not n.endswith("_hand")], 0.045)
        add([n for n in arms if n.endswith("_hand")], 0.03)
    elif name == "leg_length":
        add([n for n in legs if n.endswith(("_hip", "_knee"))], 0.05)
        # the trunk, neck and head shorten so that the height stays about the same
        add(trunk + ["neck", "head"], -0.05 * 0.8 / 0.78)
    elif name == "torso_length":
        add(trunk, 0.05)
    elif name == "head_size":
        add(["head"], 0.06, 0.06, 0.06)
        add(["neck"], 0.0, 0.02, 0.02)
    elif name == "belly":
        u = np.array([0.0, 0.0, 1.0])
        for n, s in (("spine1", 0.09), ("spine2", 0.07), ("pelvis", 0.03)):
            c[idx[n]] += s * np.outer(u, u)
    elif name == "limb_girth":
        add([n for n in arms + legs if not n.endswith(("_hand", "_foot"))], 0.0, 0.06, 0.06)
        add(trunk, 0.0, -0.015, -0.015)
    return c


def _shape_joint_offsets(c, joints):
    """dJ (24, 3): how each joint moves per unit beta (bone vectors scaled down the tree)."""
    dj = np.zeros((N_JOINTS, 3))
    for j in range(1, N_JOINTS):  # parents precede children in SMPL's order
        p = PARENTS[j]
        dj[j] = dj[p] + c[p] @ (joints[j] - joints[p])
    return dj


def _shape_dirs(v, joints, weights):
    out = np.zeros((len(v), 3, NUM_BETAS))
    for k in range(NUM_BETAS):
        c = _shape_component(k, joints)
        dj = _shape_joint_offsets(c, joints)
        # per-bone displacement of each vertex: dJ_b + C_b (v - J_b), blended by the weights
        disp = dj[None, :, :] + np.einsum("bij,vbj->vbi", c, v[:, None, :] - joints[None, :, :])
        out[:, :, k] = np.einsum("vb,vbi->vi", weights, disp)
    return out


def generate_body_model() -> dict:
    """Generate the built-in body model's arrays (deterministic; a few seconds)."""
    prims = _primitives()
    joints = _rest_joints()
    report("body model: implicit surface")
    v, f = _surface(prims, GRID_SPACING_M)
    v, f = _place_landmarks(v, f)
    report(f"body model: {len(v)} vertices, skinning weights, joint regressor, shape space")
    weights = _skinning_weights(v, f, prims)
    jreg = _joint_regressor(v, joints)
    shapedirs = _shape_dirs(v, joints, weights)
    return {
        "v_template": v.astype(np.float64),
        "f": f.astype(np.uint32),
        "J_regressor": jreg.astype(np.float64),
        "weights": weights.astype(np.float64),
        "posedirs": np.zeros((len(v), 3, 9 * (N_JOINTS - 1)), dtype=np.float64),
        "shapedirs": shapedirs.astype(np.float64),
        "kintree_table": kintree_table(),
        "J": joints.astype(np.float64),
        "shape_names": np.array(SHAPE_NAMES),
        "ctwin_generator": np.array(f"ctwin body model v{GENERATOR_VERSION}"),
    }


def write_body_model(path) -> Path:
    """Generate the built-in model and write it atomically as ``.npz`` or ``.pkl`` (by suffix).

    The ``.pkl`` holds a plain dict of numpy arrays (no chumpy), as ``smplx.SMPL`` reads it.
    """
    path = Path(path)
    if path.suffix not in (".npz", ".pkl"):
        raise CtwinError(f"body model file must end in .npz or .pkl: {path}")
    data = generate_body_model()
    _write_arrays(path, data)
    return path


def _write_arrays(path: Path, data: dict) -> None:
    """Write SMPL arrays atomically and byte-reproducibly (.npz: fixed zip timestamps)."""
    with atomic_path(path) as tmp:
        if path.suffix == ".npz":
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
                for key in sorted(data):
                    info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with zf.open(info, "w", force_zip64=True) as fh:
                        np.lib.format.write_array(fh, np.asanyarray(data[key]), allow_pickle=False)
        else:
            plain = {k: (str(v) if v.dtype.kind == "U" and v.ndim == 0 else v) for k, v in data.items()}
            with open(tmp, "wb") as fh:
                pickle.dump(plain, fh, protocol=2)


def _source_tag() -> str:
    """Hash of the generator's sources (this module and the canonical skeleton it is built around)."""
    h = hashlib.sha1(Path(__file__).read_bytes())
    h.update((Path(__file__).parent / "skeleton.py").read_bytes())
    return h.hexdigest()[:10]


def cache_dir() -> Path:
    """$CTWIN_CACHE, else $XDG_CACHE_HOME/ctwin, else ~/.cache/ctwin."""
    env = os.environ.get("CTWIN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctwin"


def default_body_model_path(suffix: str = ".npz") -> Path:
    """The built-in model file in the cache, generated atomically if missing.

    ``suffix=".pkl"`` gives the same model as a plain pickle, the form that
    ``smplx.SMPL(model_path=...)`` reads directly. The file name carries a hash of the
    generator's source, so an edited generator never reuses a stale file.
    """
    if suffix not in (".npz", ".pkl"):
        raise CtwinError(f"body model suffix must be .npz or .pkl, not {suffix!r}")
    d = cache_dir() / "body_model"
    stem = f"SMPL_CTWIN_v{GENERATOR_VERSION}_{_source_tag()}"
    npz, out = d / f"{stem}.npz", d / f"{stem}{suffix}"
    if out.exists():
        return out
    try:
        if npz.exists():  # the .pkl twin of an existing .npz: no need to generate again
            data = _read_model_file(npz)
        else:
            report(f"generating the built-in body model into {d}")
            data = generate_body_model()
        _write_arrays(out, data)
    except OSError as e:
        raise CtwinError(f"cannot write the body model cache in {d}: {e}") from e
    return out


# --------------------------------------------------------------------------------------------
# Loading (one code path for .npz and .pkl) and LBS
# --------------------------------------------------------------------------------------------
class _Opaque:
    """Stands in for a class that cannot be imported from a pickle (e.g. chumpy's Ch)."""

    _ctwin_module = ""
    _ctwin_name = ""

    def __init__(self, *args, **kwargs):
        self._ctwin_args = args

    def __setstate__(self, state):
        self._ctwin_state = state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if not module.split(".")[0] == "chumpy":
                raise
            return type(name, (_Opaque,), {"_ctwin_module": module, "_ctwin_name": name})


def _as_array(key, value, path) -> np.ndarray:
    if hasattr(value, "toarray") and "sparse" in type(value).__module__:
        return np.asarray(value.toarray())
    if isinstance(value, _Opaque):
        state = getattr(value, "_ctwin_state", None)
        x = state.get("x") if isinstance(state, dict) else None
        if x is None or not isinstance(x, np.ndarray):
            raise CtwinError(
                f"{path}: '{key}' is a chumpy {value._ctwin_name} that cannot be read without chumpy; "
                "convert the file to .npz (np.savez with np.asarray of each array)")
        return np.asarray(x)
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - any array-like that refuses conversion
        raise CtwinError(f"{path}: '{key}' cannot be converted to an array ({e})") from e


def _read_model_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".pkl":
            with open(path, "rb") as fh:
                raw = _Unpickler(fh, encoding="latin1").load()
            if not isinstance(raw, dict):
                raise CtwinError(f"{path}: not a SMPL model file (the pickle holds a {type(raw).__name__})")
            return raw
    except CtwinError:
        raise
    except FileNotFoundError as e:
        raise CtwinError(f"body model file not found: {path}") from e
    except Exception as e:  # noqa: BLE001 - corrupt or foreign files
        raise CtwinError(f"cannot read body model {path}: {type(e).__name__}: {e}") from e
    raise CtwinError(f"body model must be a SMPL .npz or .pkl file: {path}")


class BodyModel:
    """A SMPL-format body model: arrays in metres, LBS exactly as ``smplx`` computes it.

    Attributes: ``v_template`` (V, 3) m, ``faces`` (F, 3) int64, ``J_regressor`` (24, V),
    ``weights`` (V, 24), ``posedirs`` (V, 3, 207), ``shapedirs`` (V, 3, B), ``num_betas``,
    ``parents`` (24,), ``path``, ``builtin`` (True for the generated model), ``shape_names``.
    """

    def __init__(self, arrays: dict, path=None, builtin: bool = False):
        p = str(path) if path is not None else "<arrays>"
        missing = [k for k in _REQUIRED_KEYS if k not in arrays]
        if missing:
            raise CtwinError(f"{p}: not a SMPL model file (missing {', '.join(missing)})")
        a = {k: _as_array(k, arrays[k], p) for k in _REQUIRED_KEYS}
        v = a["v_template"].astype(np.float64)
        if v.ndim != 2 or v.shape[1] != 3:
            raise CtwinError(f"{p}: v_template has shape {v.shape}, expected (V, 3)")
        nv = len(v)
        jreg = a["J_regressor"].astype(np.float64)
        if jreg.shape != (N_JOINTS, nv):
            raise CtwinError(f"{p}: J_regressor has shape {jreg.shape}, expected (24, {nv}) (SMPL's 24 joints)")
        weights = a["weights"].astype(np.float64)
        if weights.shape != (nv, N_JOINTS):
            raise CtwinError(f"{p}: weights has shape {weights.shape}, expected ({nv}, 24)")
        posedirs = a["posedirs"].astype(np.float64)
        if posedirs.shape != (nv, 3, 207):
            raise CtwinError(f"{p}: posedirs has shape {posedirs.shape}, expected ({nv}, 3, 207)")
        shapedirs = a["shapedirs"].astype(np.float64)
        if shapedirs.ndim != 3 or shapedirs.shape[:2] != (nv, 3):
            raise CtwinError(f"{p}: shapedirs has shape {shapedirs.shape}, expected ({nv}, 3, B)")
        faces = a["f"].astype(np.int64)
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= nv:
            raise CtwinError(f"{p}: f is not a (F, 3) triangle list into {nv} vertices")
        parents = a["kintree_table"].astype(np.int64)[0].copy()
        parents[0] = -1
        if parents.shape != (N_JOINTS,) or np.any(parents[1:] >= np.arange(1, N_JOINTS)):
            raise CtwinError(f"{p}: kintree_table is not SMPL's 24-joint tree")
        self.v_template = v
        self.faces = faces
        self.J_regressor = jreg
        self.weights = weights
        self.posedirs = posedirs
        self.shapedirs = shapedirs
        self.num_betas = int(shapedirs.shape[2])
        self.parents = parents
        self.path = Path(path) if path is not None else None
        self.builtin = bool(builtin)
        names = arrays.get("shape_names")
        self.shape_names = tuple(str(s) for s in np.asarray(names).ravel()) if names is not None else None

    # ---------------------------------------------------------------------------------------
    def _betas(self, betas) -> np.ndarray:
        b = np.zeros(self.num_betas)
        if betas is not None:
            betas = np.asarray(betas, dtype=np.float64).ravel()
            if betas.size > self.num_betas:
                raise CtwinError(f"{betas.size} betas given, the body model has {self.num_betas}")
            b[:betas.size] = betas
        return b

    def rest(self, betas=None):
        """Shaped rest pose: ``(verts_m (V, 3), joints_m (24, 3))`` in the canonical frame."""
        v = self.v_template + self.shapedirs @ self._betas(betas)
        return v, self.J_regressor @ v

    def _lbs(self, pose, betas, residual_mm):
        v_shaped, joints = self.rest(betas)
        r = None
        if residual_mm is not None:
            r = np.asarray(residual_mm, dtype=np.float64)
            if r.shape != v_shaped.shape:
                raise CtwinError(f"residual has shape {r.shape}, expected {v_shaped.shape}")
            r = r / 1000.0
        verts, joints_posed, a, _ = lbs(pose, v_shaped, joints, self.posedirs, self.weights, self.parents, r)
        return verts, joints_posed, a

    def forward(self, pose=None, betas=None, transl_mm=None, residual_mm=None):
        """Posed surface and joints in world mm: ``(verts_mm (V, 3), joints_mm (24, 3))``.

        SMPL's LBS as ``smplx`` computes it (``pose`` = global_orient + body_pose, 72 values;
        ``betas`` up to ``num_betas``), then ``world_mm = 1000 * posed_m + transl_mm``.
        ``residual_mm`` (V, 3) is a per-vertex offset in the canonical rest frame (mm), added
        after the shape and pose blend shapes and before skinning; it does not move the joints.
        """
        verts, joints, _ = self._lbs(pose, betas, residual_mm)
        t = np.zeros(3) if transl_mm is None else np.asarray(transl_mm, dtype=np.float64).reshape(3)
        return 1000.0 * verts + t, 1000.0 * joints + t

    def skinning(self, pose=None, betas=None) -> np.ndarray:
        """Per-joint skinning transforms A (24, 4, 4) in mm units, without ``transl``."""
        rots = rodrigues(_pose24(pose))
        _, joints = self.rest(betas)
        a, _ = rigid_transforms(rots, joints, self.parents)
        a[:, :3, 3] *= 1000.0
        return a

    def arrays(self) -> dict:
        """The model as SMPL file arrays (``f`` as faces)."""
        return {"v_template": self.v_template, "f": self.faces, "J_regressor": self.J_regressor,
                "weights": self.weights, "posedirs": self.posedirs, "shapedirs": self.shapedirs,
                "kintree_table": np.stack([np.where(self.parents < 0, 4294967295, self.parents),
                                           np.arange(N_JOINTS)])}

    def to_smplx(self, **kwargs):
        """An ``smplx.SMPL`` module on these arrays (needs smplx and torch; not bundled)."""
        import smplx
        from smplx.utils import Struct

        kwargs.setdefault("num_betas", min(self.num_betas, 10))
        return smplx.SMPL(model_path=str(self.path or ""), data_struct=Struct(**self.arrays()), **kwargs)


def _pose24(pose) -> np.ndarray:
    return np.zeros((N_JOINTS, 3)) if pose is None else as_pose(pose)


def lbs(pose, v_shaped, joints_rest, posedirs, weights, parents=PARENTS, residual=None):
    """SMPL's linear blend skinning, as ``smplx.lbs`` computes it, for any subset of vertices.

    ``pose``: 72 values or None (rest); ``v_shaped`` (N, 3): rest vertices with the shape blend
    shapes applied; ``joints_rest`` (24, 3): the shaped rest joints; ``posedirs``: the pose
    correctives of those vertices, (N, 3, 207) or (3 N, 207), or None for none; ``weights``: (N, 24)
    dense or a ``scipy.sparse`` matrix; ``residual`` (N, 3): an offset added before skinning.
    Units are those of the inputs. Returns ``(verts (N, 3), joints_posed (24, 3), A (24, 4, 4),
    T)`` with ``T`` the per-vertex blended transforms ((N, 4, 4) dense, (N, 3, 4) sparse).
    """
    rots = rodrigues(_pose24(pose))
    v = v_shaped
    if posedirs is not None:
        v = v + (posedirs @ (rots[1:] - np.eye(3)).reshape(-1)).reshape(v.shape)
    if residual is not None:
        v = v + residual
    a, joints_posed = rigid_transforms(rots, joints_rest, parents)
    if hasattr(weights, "tocsr"):
        t = (weights @ a[:, :3, :].reshape(len(a), 12)).reshape(-1, 3, 4)
    else:
        t = np.einsum("vj,jab->vab", weights, a)
    verts = np.einsum("vab,vb->va", t[:, :3, :3], v) + t[:, :3, 3]
    return verts, joints_posed, a, t


def load_body_model(path=None) -> BodyModel:
    """Load a SMPL-format model (.npz or .pkl); ``None`` = the built-in default model."""
    builtin = path is None
    path = default_body_model_path() if builtin else Path(path).expanduser()
    if not path.exists():
        raise CtwinError(f"body model file not found: {path}")
    arrays = _read_model_file(path)
    if not builtin and "ctwin_generator" in arrays:
        builtin = True
    return BodyModel(arrays, path=path, builtin=builtin)
