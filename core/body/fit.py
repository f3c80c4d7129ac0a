"""Fit the body model to a CT: the kinematic scaffold of the twin.

``fit_body_model(body_model, skin, labelmap, names, ...) -> FitResult``

What is fitted: global rotation, translation, shape (betas) and body pose, then an optional
per-vertex non-rigid residual (Laplacian-regularised offsets in the canonical rest frame, in mm)
that lets the surface follow what the shape space cannot (a supine CT flattens the back).

What it is fitted to (numpy/scipy only, no torch, so that it runs inside Blender):
- the CT skin surface, by bidirectional point-to-plane distances (ICP with re-estimated
  correspondences, Huber-weighted), restricted to the CT's field of view; the truncation caps
  (skin within a few mm of the volume's faces) are ignored;
- skeletal landmarks from the bone labels (``core.body.landmarks``): femoral head centres by sphere
  fit -> hip joints, humeral heads (sphere fit) -> shoulders, femoral shaft axis and condyles ->
  knees, distal humerus -> elbows, and the spine line through vertebral centroids -> the model's spine chain
  (only along the body axis and left-right: vertebral bodies sit posterior to the model's spine
  joints, so the antero-posterior component is left to the surface);
- an enclosure term: a hinge on the signed distance of bone points outside the body surface.

Orientation (supine/prone, head-first/feet-first) is detected from the labels (vertebral order,
spine vs body centroid, left/right pairs); arms up/down from the humeri when labelled, otherwise
both acquisition presets are tried and the better fit kept. ``FitResult.detected`` reports it.
Deterministic: fixed sample seeds, deterministic solvers.

The same code runs for the built-in model and a user SMPL file: only the ``BodyModel`` arrays
(``v_template, faces, J_regressor, weights, posedirs, shapedirs``) and ``forward`` are used.

Joints: ``FitResult.joints_mm`` are the scaffold's joints, i.e. anatomical joint centres from
the labels where the labels give them (``core.body.landmarks.anatomical_joints``: the conventions of
the project's anatomy), elsewhere the model's joint moved with its parent's correction;
``FitResult.model_joints_mm`` are the body model's own J_regressor joints at the fitted
parameters (what ``BodyModel.forward`` returns). The two differ by the model's own joint
conventions (e.g. the built-in model's pelvis and spine3 joints sit 40-100 mm from the anatomical
ones). ``iterations`` counts Levenberg-Marquardt steps (Jacobian evaluations).

Stages: for each candidate acquisition preset a rigid + overall-size fit, compared by a capped
symmetric surface distance; then the body pose; then everything with the enclosure term; then the
residual (Laplacian-smoothed offsets toward the skin, bone points just outside pushed in).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares, leastsq
from scipy.sparse.linalg import splu
from scipy.spatial import cKDTree
import scipy.sparse as sp

from . import landmarks as lmk
from ..errors import CtwinError
from ..progress import report
from .body_model import lbs, load_body_model
from .skeleton import JOINT_INDEX, N_JOINTS, PARENTS, forward_kinematics, rotation_to_rotvec
from ..fileio import atomic_path
from ..meshes.mesh import Mesh
from ..meshes.metrics import SurfaceIndex, chamfer_mm, enclosure_pct, sample_surface, winding_number

CAP_MARGIN_MM = 6.0      # skin within this distance of the volume faces is a truncation cap
HUBER_MM = 10.0
ENC_REACH_MM = 15.0
N_SKIN_SAMPLES = 4000
N_MODEL_POINTS = 2000
N_BONE_POINTS = 4000

# joints whose rotation is fitted (hands are not: nothing in a CT constrains them)
FREE_JOINTS = [j for j in range(1, N_JOINTS) if j not in (22, 23)]


SCAFFOLD_SIGMA_MM = 3.0       # the joint centres' uncertainty
SCAFFOLD_PRIOR_PER_DEG = 1.0   # what the joints cannot tell: 1 degree off the prior costs one sigma
SCAFFOLD_WEAK_PER_DEG = 0.05   # every local rotation, weakly (keeps the problem well posed)


def _twist_deg(rotvec, axis):
    """The twist (degrees) of a rotation about a unit axis (swing-twist decomposition)."""
    theta = np.linalg.norm(rotvec)
    if theta < 1e-12:
        return 0.0
    w = np.cos(theta / 2.0)
    v = np.sin(theta / 2.0) * rotvec / theta
    return float(np.degrees(2.0 * np.arctan2(v @ axis, w)))


def scaffold_pose(rest_joints_mm, joints_mm, pose, evidence, prior=None, sigma_mm=SCAFFOLD_SIGMA_MM,
                  prior_per_deg=SCAFFOLD_PRIOR_PER_DEG, weak_per_deg=SCAFFOLD_WEAK_PER_DEG):
    """The skeleton's pose at the acquisition: local rotations whose forward kinematics put the
    joints where the bones say they are, for the armature's rest pose.

    The surface fit's pose (``pose``, the starting point) also bends joints to match the body
    model's flesh to the patient's skin (a head turned 10 degrees to fit a differently shaped
    skull); a target pose is applied on top of the armature's rest pose, so every such degree moves
    bones at every new pose. Here the rotations are re-estimated from the skeleton alone: the rest
    skeleton has the bone directions of ``rest_joints_mm`` (the body model's template: a pose is
    read on the model's mean-shape skeleton, as the phantom's poses are on its canonical one; the
    built-in model's shape space would otherwise turn bones by up to 5 degrees through its joint
    regressor) and the bone lengths of ``joints_mm``; the residuals are the joints with anatomical evidence (``evidence``, joint
    indices) in units of ``sigma_mm``, and, in degrees, what the joints cannot tell, pulled toward
    ``prior`` (the acquisition template): the twist of a joint about its only located child, the
    whole rotation of a joint with no located child (the head's nod, the hands, the feet), and
    weakly every local rotation. Returns (72,).
    """
    rb = np.asarray(rest_joints_mm, dtype=np.float64).reshape(N_JOINTS, 3)
    jm = np.asarray(joints_mm, dtype=np.float64).reshape(N_JOINTS, 3)
    p0 = np.asarray(pose, dtype=np.float64).reshape(N_JOINTS, 3)
    ev = sorted(set(int(j) for j in evidence))
    if len(ev) < 3:
        return p0.reshape(-1).copy()
    pr = np.zeros((N_JOINTS, 3)) if prior is None else np.asarray(prior, dtype=np.float64).reshape(N_JOINTS, 3)
    rest = np.zeros((N_JOINTS, 3))
    for j in range(1, N_JOINTS):
        u = rb[j] - rb[PARENTS[j]]
        rest[j] = rest[PARENTS[j]] + np.linalg.norm(jm[j] - jm[PARENTS[j]]) * u / max(np.linalg.norm(u), 1e-9)
    free = FREE_JOINTS
    twist_axis, whole = {}, []
    for j in free:
        located = [c for c in range(N_JOINTS) if PARENTS[c] == j and c in ev]
        if len(located) == 1:
            u = rest[located[0]] - rest[j]
            twist_axis[j] = u / np.linalg.norm(u)
        elif not located:
            whole.append(j)
    twist_prior = {j: _twist_deg(pr[j], a) for j, a in twist_axis.items()}

    def unpack(x):
        p = p0.copy()
        p[0] = x[0:3]
        p[free] = x[3:3 + 3 * len(free)].reshape(-1, 3)
        return p, x[3 + 3 * len(free):]

    def residuals(x):
        p, t = unpack(x)
        _, jp = forward_kinematics(p, rest)
        tw = [_twist_deg(p[j], a) - twist_prior[j] for j, a in twist_axis.items()]
        return np.concatenate([((jp[ev] + t) - jm[ev]).ravel() / sigma_mm,
                               prior_per_deg * np.asarray(tw),
                               prior_per_deg * np.degrees(p[whole] - pr[whole]).ravel(),
                               weak_per_deg * np.degrees(p[free] - pr[free]).ravel()])

    x0 = np.concatenate([p0[0], p0[free].ravel(), jm[0] - rest[0]])
    sol = least_squares(residuals, x0, method="lm", max_nfev=4000)
    return unpack(sol.x)[0].reshape(-1)


@dataclass
class FitResult:
    pose: np.ndarray            # (72,)
    betas: np.ndarray           # (B,)
    transl_mm: np.ndarray       # (3,)
    residual_mm: np.ndarray     # (V, 3) rest-frame offsets
    joints_mm: np.ndarray       # (24, 3) world mm: the scaffold's joints (anatomical where the labels tell)
    vertices_mm: np.ndarray     # (V, 3) fitted surface, world mm
    faces: np.ndarray           # (F, 3)
    metrics: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0
    detected: dict = field(default_factory=dict)
    landmarks: dict = field(default_factory=dict)
    body_model_path: str = ""
    model_joints_mm: np.ndarray | None = None   # (24, 3) the body model's own joints at the fit
    joint_sources: dict = field(default_factory=dict)
    scaffold_pose: np.ndarray | None = None      # (72,) the armature's rest pose (``scaffold_pose``)

    def to_json(self) -> dict:
        out = {
            "pose": self.pose.tolist(),
            "betas": self.betas.tolist(),
            "transl_mm": self.transl_mm.tolist(),
            "joints_mm": self.joints_mm.tolist(),
            "model_joints_mm": None if self.model_joints_mm is None else self.model_joints_mm.tolist(),
            "joint_sources": self.joint_sources,
            "scaffold_pose": None if self.scaffold_pose is None else self.scaffold_pose.tolist(),
            **{k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float, np.floating))},
            "metrics": {k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
                        for k, v in self.metrics.items()},
            "losses": {k: float(v) for k, v in self.losses.items()},
            "iterations": int(self.iterations),
            "seconds": float(self.seconds),
            "detected": self.detected,
            "landmarks_mm": {k: np.asarray(v).tolist() for k, v in self.landmarks.items()},
            "residual_max_mm": float(np.linalg.norm(self.residual_mm, axis=1).max()) if len(self.residual_mm) else 0.0,
            "body_model": self.body_model_path,
        }
        return out

    def save_npz(self, path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                extra = {} if self.scaffold_pose is None else {"scaffold_pose": self.scaffold_pose}
                np.savez(f, pose=self.pose, betas=self.betas, transl_mm=self.transl_mm,
                         residual_mm=self.residual_mm, joints_mm=self.joints_mm, **extra)

    def body_mesh(self, name: str = "body_model"):
        return Mesh(self.vertices_mm.copy(), self.faces.copy(), name)


# --------------------------------------------------------------------------------------------
# the body model's LBS (``body_model.lbs``) with arrays precomputed for the fit's repeated calls
# --------------------------------------------------------------------------------------------
class _Lbs:
    """A ``BodyModel`` truncated to ``n_betas`` shape components, with the shaped rest joints
    precomputed as ``Jt + Jsd @ betas`` and sparse weights for vertex subsets (``subset``)."""

    def __init__(self, bm, n_betas: int):
        self.vt = bm.v_template
        self.nb = int(min(n_betas, bm.num_betas))
        self.sd = bm.shapedirs[:, :, : self.nb]
        self.pd = bm.posedirs
        self.W = bm.weights
        self.Jt = bm.J_regressor @ self.vt
        self.Jsd = np.einsum("jv,vcb->jcb", bm.J_regressor, self.sd)
        self.faces = bm.faces
        self.V = len(self.vt)

    def subset(self, idx):
        """Precomputed arrays for fast evaluation of the vertices ``idx`` (see ``verts_sub``)."""
        idx = np.asarray(idx, dtype=np.int64)
        n = len(idx)
        pd = self.pd[idx].reshape(n * 3, -1)
        return {
            "idx": idx,
            "vt": self.vt[idx],
            "sd": self.sd[idx].reshape(n * 3, self.nb),
            "pd": pd if np.any(pd) else None,
            "W": sp.csr_matrix(np.where(self.W[idx] > 1e-6, self.W[idx], 0.0)),
        }

    def verts_sub(self, sub, pose, betas, transl):
        n = len(sub["idx"])
        v = sub["vt"] + (sub["sd"] @ betas).reshape(n, 3)
        out, jp, _, _ = lbs(pose, v, self.joints_rest(betas), sub["pd"], sub["W"])
        return 1000.0 * out + transl, 1000.0 * jp + transl

    def joints_rest(self, betas):
        return self.Jt + self.Jsd @ betas

    def verts(self, pose, betas, transl, idx=None, residual_m=None, return_T=False):
        sl = slice(None) if idx is None else idx
        v = self.vt[sl] + self.sd[sl] @ betas
        out, jp, _, T = lbs(pose, v, self.joints_rest(betas), self.pd[sl], self.W[sl],
                            residual=None if residual_m is None else residual_m[sl])
        world = 1000.0 * out + transl
        jw = 1000.0 * jp + transl
        if return_T:
            return world, jw, T
        return world, jw


def vertex_normals(V, F):
    fn = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
    vn = np.zeros_like(V)
    for k in range(3):
        np.add.at(vn, F[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def _huber_w(d, delta=HUBER_MM):
    a = np.abs(d)
    return np.where(a <= delta, 1.0, delta / np.maximum(a, 1e-12))


# --------------------------------------------------------------------------------------------
# the data
# --------------------------------------------------------------------------------------------
class _Data:
    """Skin samples, FOV box, bone points and landmarks, all world mm."""

    def __init__(self, skin, labelmap, names, fov_box, seed):
        sv = np.asarray(skin.vertices, dtype=np.float64)
        sf = np.asarray(skin.faces, dtype=np.int64)
        self.skin_v, self.skin_f = sv, sf
        self._skin_index = None
        if fov_box is None:
            fov_box = (labelmap.bbox_world() if labelmap is not None else (sv.min(0), sv.max(0)))
        self.lo = np.asarray(fov_box[0], dtype=np.float64)
        self.hi = np.asarray(fov_box[1], dtype=np.float64)
        pts, fi = sample_surface(sv, sf, 40000, seed=seed, return_faces=True)
        fn = np.cross(sv[sf[:, 1]] - sv[sf[:, 0]], sv[sf[:, 2]] - sv[sf[:, 0]])
        fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
        nrm = fn[fi]
        keep = self.inside_fov(pts, CAP_MARGIN_MM)
        if keep.sum() < 100:
            raise CtwinError("fit: the skin surface has almost no area inside the CT's field of view")
        pts, nrm = pts[keep], nrm[keep]
        self.dense_pts, self.dense_nrm = pts, nrm
        self.tree = cKDTree(pts)
        rng = np.random.default_rng(seed + 7)
        sel = rng.choice(len(pts), size=min(N_SKIN_SAMPLES, len(pts)), replace=False)
        self.pts = pts[np.sort(sel)]
        self.centroid = pts.mean(axis=0)
        # bone data
        self.bone_pts = np.zeros((0, 3))
        self.lm = lmk.Landmarks()
        if labelmap is not None and names:
            self.lm = lmk.extract_landmarks(labelmap, names)
            self.bone_pts = lmk.sample_bone_points(labelmap, names, N_BONE_POINTS, seed=seed)

    @property
    def skin_index(self):
        if self._skin_index is None:
            self._skin_index = SurfaceIndex(self.skin_v, self.skin_f)
        return self._skin_index

    def inside_fov(self, p, margin):
        return np.all((p >= self.lo + margin) & (p <= self.hi - margin), axis=1)


# --------------------------------------------------------------------------------------------
# initial orientation
# --------------------------------------------------------------------------------------------
def _orientation(data: _Data):
    """Body axes in world: up (superior), front (anterior), left; with what was detected."""
    lm = data.lm
    up = lm.superior if lm.superior is not None else np.array([0.0, 0.0, 1.0])
    up = up / np.linalg.norm(up)
    front = None
    if lm.spine_centroid is not None:
        f = data.centroid - lm.spine_centroid  # the spine is posterior to the body's centroid
        f = f - (f @ up) * up
        if np.linalg.norm(f) > 10.0:
            front = f / np.linalg.norm(f)
    if front is None and lm.left_hint is not None:
        left = lm.left_hint - (lm.left_hint @ up) * up
        left /= np.linalg.norm(left)
        front = np.cross(left, up)  # canonical: x left, y up, z front -> z = x cross y
    if front is None:
        # LPS convention when the data cannot tell: anterior is -y, or the axis of y nearest
        f = np.array([0.0, -1.0, 0.0])
        f = f - (f @ up) * up
        front = f / max(np.linalg.norm(f), 1e-9)
    left = np.cross(up, front)
    R = np.stack([left, up, front], axis=1)
    detected = {
        "superior_axis": up.round(3).tolist(),
        "anterior_axis": front.round(3).tolist(),
        "head_first": bool(up[2] >= 0),
        "position": "supine" if front[1] <= 0 else "prone",
        "orientation_from": "labels" if lm.superior is not None else "LPS default",
    }
    if lm.left_hint is not None:
        detected["left_right_consistent"] = bool(lm.left_hint @ left > 0)
    return R, detected


def _preset_body_poses():
    """Candidate acquisition body poses (69,): the acquisition presets of ``core.rig.poses``."""
    from ..rig.poses import ACQUISITION_PRESETS, PRESETS  # deferred: the rig package builds on this one

    return {k: np.asarray(PRESETS[k], dtype=np.float64).reshape(-1)[3:].copy() for k in ACQUISITION_PRESETS}


# --------------------------------------------------------------------------------------------
# the parametric fit
# --------------------------------------------------------------------------------------------
class _Problem:
    def __init__(self, lbs: _Lbs, data: _Data, weights: dict, seed: int):
        self.lbs, self.data, self.w = lbs, data, weights
        rng = np.random.default_rng(seed + 11)
        n = min(N_MODEL_POINTS, lbs.V)
        self.sub = np.sort(rng.choice(lbs.V, size=n, replace=False))
        self.free = np.array(FREE_JOINTS)
        self.enc_on = 0.0  # the enclosure term joins once the body is roughly in place

    # parameter vector: rotvec(3), transl(3), betas(nb), pose of free joints (3*len(free))
    def pack(self, pose, betas, transl):
        return np.concatenate([pose[:3], transl, betas, pose.reshape(24, 3)[self.free].reshape(-1)])

    def unpack(self, x, pose_template):
        nb = self.lbs.nb
        pose = pose_template.reshape(24, 3).copy()
        pose[0] = x[:3]
        transl = x[3:6]
        betas = x[6:6 + nb]
        pose[self.free] = x[6 + nb:].reshape(-1, 3)
        return pose.reshape(-1), betas, transl

    def correspondences(self, x, pose_template, gate):
        pose, betas, transl = self.unpack(x, pose_template)
        allv, joints = self.lbs.verts(pose, betas, transl)
        vn = vertex_normals(allv, self.lbs.faces)
        d = self.data
        c = {}
        # model -> skin: model points inside the FOV, nearest skin sample, point-to-plane
        vs = allv[self.sub]
        ins = d.inside_fov(vs, CAP_MARGIN_MM)
        dist, j = d.tree.query(vs[ins])
        nrm = d.dense_nrm[j]
        ok = (dist < gate) & (np.einsum("ij,ij->i", nrm, vn[self.sub][ins]) > 0.0)
        idx = np.nonzero(ins)[0][ok]
        c["m2s_idx"] = self.sub[idx]
        c["m2s_q"] = d.dense_pts[j[ok]]
        c["m2s_n"] = nrm[ok]
        r = np.einsum("ij,ij->i", vs[idx] - c["m2s_q"], c["m2s_n"])
        c["m2s_w"] = np.sqrt(_huber_w(r))
        # skin -> model: skin samples, nearest model vertex, point-to-plane with the model normal

        mt = cKDTree(allv)
        dist2, k = mt.query(d.pts)
        ok2 = (dist2 < gate) & (np.einsum("ij,ij->i", vn[k], self._skin_n()) > 0.0)
        c["s2m_p"] = d.pts[ok2]
        c["s2m_idx"] = k[ok2]
        c["s2m_n"] = vn[k[ok2]]
        r2 = np.einsum("ij,ij->i", c["s2m_p"] - allv[c["s2m_idx"]], c["s2m_n"])
        c["s2m_w"] = np.sqrt(_huber_w(r2))
        # enclosure: bone points near or outside the surface -> nearest vertex half-space
        if len(d.bone_pts):
            db, kb = mt.query(d.bone_pts)
            s = np.einsum("ij,ij->i", d.bone_pts - allv[kb], vn[kb])
            near = (s > -15.0) & (s < 25.0)  # far outside: a limb elsewhere, not an enclosure matter
            c["enc_p"] = d.bone_pts[near]
            c["enc_idx"] = kb[near]
            c["enc_n"] = vn[kb[near]]
        else:
            c["enc_p"] = np.zeros((0, 3))
            c["enc_idx"] = np.zeros(0, dtype=np.int64)
            c["enc_n"] = np.zeros((0, 3))
        # union of vertices needed by the residual function
        need = np.unique(np.concatenate([c["m2s_idx"], c["s2m_idx"], c["enc_idx"]]).astype(np.int64))
        c["need"] = need
        pos = np.full(self.lbs.V, -1, dtype=np.int64)
        pos[need] = np.arange(len(need))
        c["m2s_k"], c["s2m_k"], c["enc_k"] = pos[c["m2s_idx"]], pos[c["s2m_idx"]], pos[c["enc_idx"]]
        c["sub"] = self.lbs.subset(need)
        return c

    def mismatch_mm(self, x, pose_template, cap=100.0):
        """Symmetric mean surface distance (mm, capped, no gating) inside the FOV: what decides
        between initial presets (a limb where the CT has air costs here, not in the gated ICP)."""
        pose, betas, transl = self.unpack(x, pose_template)
        allv, _ = self.lbs.verts(pose, betas, transl)
        vs = allv[self.sub]
        vs = vs[self.data.inside_fov(vs, CAP_MARGIN_MM)]
        d1 = np.minimum(self.data.tree.query(vs)[0], cap).mean() if len(vs) else cap
        d2 = np.minimum(cKDTree(allv).query(self.data.pts)[0], cap).mean()
        return float(0.5 * (d1 + d2))

    def unsupported(self, x, pose_template):
        """Model points inside the CT's axial slab but outside its cross-section."""
        pose, betas, transl = self.unpack(x, pose_template)
        vs, _ = self.lbs.verts(pose, betas, transl, idx=self.sub)
        d = self.data
        slab = (vs[:, 2] >= d.lo[2]) & (vs[:, 2] <= d.hi[2])
        cross = np.all((vs[:, :2] >= d.lo[:2]) & (vs[:, :2] <= d.hi[:2]), axis=1)
        return int((slab & ~cross).sum())

    def _skin_n(self):
        if not hasattr(self, "_skin_n_cache"):
            _, j = self.data.tree.query(self.data.pts)
            self._skin_n_cache = self.data.dense_nrm[j]
        return self._skin_n_cache

    def residuals(self, x, pose_template, c, prior_pose, parts=False):
        pose, betas, transl = self.unpack(x, pose_template)
        v, joints = self.lbs.verts_sub(c["sub"], pose, betas, transl)
        w = self.w
        n_m = max(len(c["m2s_k"]), 1)
        n_s = max(len(c["s2m_k"]), 1)
        r_m2s = np.einsum("ij,ij->i", v[c["m2s_k"]] - c["m2s_q"], c["m2s_n"]) * c["m2s_w"] * np.sqrt(w["m2s"] / n_m)
        r_s2m = np.einsum("ij,ij->i", c["s2m_p"] - v[c["s2m_k"]], c["s2m_n"]) * c["s2m_w"] * np.sqrt(w["s2m"] / n_s)
        nb_all = max(len(self.data.bone_pts), 1)
        s = np.einsum("ij,ij->i", c["enc_p"] - v[c["enc_k"]], c["enc_n"])
        r_enc = np.maximum(s + 1.0, 0.0) * np.sqrt(w["enc"] * self.enc_on / nb_all)
        r_lm = lmk.landmark_residuals(self.data.lm, joints) * np.sqrt(w["lm"])
        bp = pose.reshape(24, 3)[self.free].reshape(-1) - prior_pose
        r_pose = bp * np.sqrt(w["pose"])
        r_beta = betas * np.sqrt(w["beta"])
        if parts:
            return {"surface_model_to_skin": float((r_m2s ** 2).sum()),
                    "surface_skin_to_model": float((r_s2m ** 2).sum()),
                    "enclosure": float((r_enc ** 2).sum()), "landmarks": float((r_lm ** 2).sum()),
                    "pose_prior": float((r_pose ** 2).sum()), "shape_prior": float((r_beta ** 2).sum())}
        return np.concatenate([r_m2s, r_s2m, r_enc, r_lm, r_pose, r_beta])

    def solve(self, x0, pose_template, prior_pose, outer, inner, mask=None, gates=None, tag=""):
        """ICP-style: ``outer`` correspondence updates, each followed by ``inner`` LM steps."""
        x = x0.copy()
        nfev = 0
        mask = np.ones(len(x), bool) if mask is None else mask
        cost = np.inf
        for it in range(outer):
            gate = gates[min(it, len(gates) - 1)] if gates else 60.0
            c = self.correspondences(x, pose_template, gate)

            def fun(y):
                z = x.copy()
                z[mask] = y
                return self.residuals(z, pose_template, c, prior_pose)

            # MINPACK's Levenberg-Marquardt with a forward-difference Jacobian (lmdif): at most
            # ``inner`` Jacobians (n + 1 evaluations each), stopping at a 1e-5 relative decrease.
            # ``leastsq`` rather than ``least_squares(method="lm")``, which evaluates one more
            # Jacobian at each solution: the phantom's fit took 48 s with it against 36 s (the 3 mm
            # phantom, interleaved runs on a loaded 2-core machine)
            per_jacobian = int(mask.sum()) + 1
            y, _, info, _, _ = leastsq(fun, x[mask], ftol=1e-5, maxfev=inner * per_jacobian,
                                       full_output=True)
            nfev += -(-int(info["nfev"]) // per_jacobian)
            cost = 0.5 * float(info["fvec"] @ info["fvec"])
            x[mask] = y
            report(f"fit {tag}: iteration {it + 1}/{outer}, cost {cost:.2f}")
        c = self.correspondences(x, pose_template, gates[-1] if gates else 60.0)
        cost = 0.5 * float((self.residuals(x, pose_template, c, prior_pose) ** 2).sum())
        return x, cost, nfev, c


# --------------------------------------------------------------------------------------------
# the non-rigid residual
# --------------------------------------------------------------------------------------------
def _laplacian(F, n):
    e = np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    a.data[:] = 1.0
    deg = np.asarray(a.sum(axis=1)).ravel()
    dinv = sp.diags(1.0 / np.maximum(deg, 1))
    return sp.identity(n) - dinv @ a


def _fit_residual(lbs: _Lbs, data: _Data, pose, betas, transl, iterations=4, smooth=2.0, margin=2.5):
    """Per-vertex world offsets u (Laplacian-smoothed) toward the skin and around the bones,
    mapped back to the rest frame. Returns residual_mm (V, 3) in the rest frame."""
    F = lbs.faces
    n = lbs.V
    L = _laplacian(F, n)
    LtL = (L.T @ L).tocsc()
    base, _, T = lbs.verts(pose, betas, transl, return_T=True)
    u = np.zeros((n, 3))
    enc_w = np.zeros(n)
    enc_t = np.zeros((n, 3))
    for it in range(iterations):
        v = base + u
        vn = vertex_normals(v, F)
        wgt = np.zeros(n)
        tgt = np.zeros((n, 3))
        # model -> skin: exact closest point on the skin for vertices inside the FOV
        ins = np.nonzero(data.inside_fov(v, CAP_MARGIN_MM))[0]
        if len(ins):
            d, q, _ = data.skin_index.query(v[ins], return_closest=True)
            ok = d < 40.0
            i = ins[ok]
            wgt[i] += 1.0
            tgt[i] += q[ok] - v[i]
        # skin -> model: each dense skin sample pulls its nearest vertex
        tree = cKDTree(v)
        d2, k = tree.query(data.dense_pts)
        ok2 = d2 < 40.0
        cnt = np.bincount(k[ok2], minlength=n).astype(float)
        acc = np.zeros((n, 3))
        for ax in range(3):
            acc[:, ax] = np.bincount(k[ok2], weights=(data.dense_pts[ok2, ax] - v[k[ok2], ax]), minlength=n)
        has = cnt > 0
        wgt[has] += 1.0
        tgt[has] += acc[has] / cnt[has, None]
        both = wgt > 0
        tgt[both] /= wgt[both, None]
        target = u + tgt  # desired total offset
        # enclosure: bone points outside (or within the margin) push their nearest vertex outward
        if len(data.bone_pts):
            w_in = winding_number(data.bone_pts, v, F)
            db, kb = tree.query(data.bone_pts)
            s = np.einsum("ij,ij->i", data.bone_pts - v[kb], vn[kb])
            # only bones just outside or just under the surface: farther ones mean a misplaced
            # limb, which the surface terms fix, not a bulge
            bad = ((w_in < 0.5) | (s > -margin)) & (s < ENC_REACH_MM)
            if bad.any():
                need = (s[bad] + margin)[:, None] * vn[kb[bad]]
                for j, nv in zip(kb[bad], need):
                    cur = enc_t[j] if enc_w[j] > 0 else np.zeros(3)
                    enc_t[j] = np.where(np.abs(u[j] + nv) > np.abs(cur), u[j] + nv, cur)
                    enc_w[j] = min(enc_w[j] + 2.0, 10.0)
        W = sp.diags(wgt.clip(0, 1) + enc_w + 1e-3)
        rhs = (wgt.clip(0, 1))[:, None] * target + enc_w[:, None] * enc_t
        lu = splu((W + smooth * LtL).tocsc())
        u = np.stack([lu.solve(rhs[:, a]) for a in range(3)], axis=1)
        report(f"fit residual: iteration {it + 1}/{iterations}", 0.8 + 0.04 * it)
    # world offset u (mm) -> rest-frame offset: world = 1000 * (T3 @ (v_rest + r)) + ...
    Tinv = np.linalg.inv(T[:, :3, :3])
    return np.einsum("vab,vb->va", Tinv, u)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
DEFAULT_WEIGHTS = {"m2s": 1.0, "s2m": 1.0, "enc": 3.0, "lm": 1.0, "pose": 20.0, "beta": 1.0}


def fit_body_model(body_model=None, skin=None, labelmap=None, names=None, *, fov_box=None,
                   residual: bool = True, n_betas: int = 10, arms: str | None = None,
                   compute_metrics: bool = True, weights: dict | None = None, seed: int = 0,
                   outer: int = 6) -> FitResult:
    """Fit ``body_model`` to the CT skin surface ``skin`` (Mesh, world mm) and the bone labels
    ``labelmap`` (Volume on the CT grid) with ``names`` (id -> name).

    ``fov_box``: (lo, hi) world box of the CT (default: the labelmap's bounding box).
    ``arms``: force "up"/"down" instead of detecting it. ``residual``: fit the non-rigid residual.
    """
    t0 = time.perf_counter()
    if body_model is None or isinstance(body_model, (str, bytes)) or hasattr(body_model, "__fspath__"):
        body_model = load_body_model(body_model)
    if skin is None:
        raise CtwinError("fit: a skin surface is needed")
    w = dict(DEFAULT_WEIGHTS, **(weights or {}))
    report("fit: preparing the data", 0.0)
    data = _Data(skin, labelmap, names, fov_box, seed)
    lbs = _Lbs(body_model, n_betas)
    prob = _Problem(lbs, data, w, seed)
    R, detected = _orientation(data)
    data.lm.axes = R
    detected["landmarks"] = sorted(data.lm.names())
    go = rotation_to_rotvec(R)

    presets = _preset_body_poses()
    arm_state = arms or data.lm.arms_state()
    if arm_state in ("up", "down"):
        cands = {k: v for k, v in presets.items() if k.endswith("arms_" + arm_state)} or presets
        detected["arms_from"] = "argument" if arms else "humerus labels"
    else:
        cands = presets
        detected["arms_from"] = "best fit of the presets"
    betas0 = np.zeros(lbs.nb)

    def initial(body69):
        pose = np.concatenate([go, body69])
        transl = np.zeros(3)
        _, j = lbs.verts(pose, betas0, transl, idx=np.arange(1))
        # along the body axis: landmarks if any, else the centroid of the FOV
        shift = lmk.initial_translation(data.lm, j, R)
        allv, _ = lbs.verts(pose, betas0, transl)
        if shift is None:
            shift = data.centroid - allv.mean(axis=0)
        allv = allv + shift
        # across the body axis: match the centroid of the model's part inside the FOV
        ins = data.inside_fov(allv, 0.0)
        if ins.sum() > 50:
            dv = data.centroid - allv[ins].mean(axis=0)
            up = R[:, 1]
            shift = shift + dv - (dv @ up) * up
        return prob.pack(pose, betas0, shift)

    nb = lbs.nb
    nfree = 3 * len(prob.free)
    rigid_mask = np.zeros(6 + nb + nfree, bool)
    rigid_mask[:6 + min(nb, 2)] = True
    iters = 0
    costs, tried = {}, {}
    for k, (name, body69) in enumerate(cands.items()):
        # rigid placement and overall size with the preset's limbs; the presets are compared here,
        # before the limbs are freed (a freed arm can hide where the CT has none)
        tmpl = np.concatenate([go, body69])
        x0 = initial(body69)
        x, cost, nf, _ = prob.solve(x0, tmpl, _free_of(body69, prob.free), 3, 15,
                                    mask=rigid_mask, gates=[150.0, 80.0, 50.0], tag=f"rigid {name}")
        iters += nf
        score = prob.mismatch_mm(x, tmpl)
        report(f"fit: preset {name}: surface mismatch {score:.2f} mm", 0.1 + 0.2 * k)
        costs[name] = score
        tried[name] = (x, score, name, tmpl, body69)
    order = sorted(tried, key=lambda k: costs[k])
    undetermined = len(order) > 1 and costs[order[1]] - costs[order[0]] < 0.5
    if undetermined:
        # the data hardly prefer one preset (< 0.5 mm): the limbs are outside the CT's cross-section.
        # Keep them out of the CT's axial extent where a preset can (SPEC's chamfer counts the whole
        # axial slab, and a limb cut off by the field of view is no evidence for being there).
        order = sorted(order, key=lambda k: prob.unsupported(tried[k][0], tried[k][3]))
    x, _, name, tmpl, body69 = tried[order[0]]
    x, cost, nf, _ = prob.solve(x, tmpl, _free_of(body69, prob.free), 2, 15, gates=[50.0], tag=f"pose {name}")
    iters += nf
    prob.enc_on = 1.0
    detected["arms"] = "up" if name.endswith("arms_up") else "down"
    if undetermined and detected["arms_from"].startswith("best fit"):
        detected["arms"] = "undetermined (" + detected["arms"] + " assumed)"
    detected["preset_costs"] = {k: round(v, 3) for k, v in costs.items()}
    detected["initial_preset"] = name
    x, cost, nf, c = prob.solve(x, tmpl, _free_of(body69, prob.free), outer, 25,
                                gates=[40.0, 30.0, 25.0], tag="full")
    iters += nf
    losses = prob.residuals(x, tmpl, c, _free_of(body69, prob.free), parts=True)
    pose, betas, transl = prob.unpack(x, tmpl)
    res = np.zeros((lbs.V, 3))
    if residual:
        res = _fit_residual(lbs, data, pose, betas, transl)
    verts, joints = body_model.forward(pose=pose, betas=_pad_betas(betas, body_model), transl_mm=transl,
                                       residual_mm=res if residual else None)
    verts = np.asarray(verts, dtype=np.float64)
    model_joints = np.asarray(joints, dtype=np.float64)
    joints, sources = lmk.anatomical_joints(data.lm, model_joints)
    _, rest_j = body_model.rest()
    p_scaffold = scaffold_pose(np.asarray(rest_j) * 1000.0, joints, pose,
                               [JOINT_INDEX[n] for n in sources], prior=tmpl)
    out = FitResult(pose=pose, betas=_pad_betas(betas, body_model), transl_mm=transl, residual_mm=res,
                    joints_mm=joints, model_joints_mm=model_joints, joint_sources=sources,
                    scaffold_pose=p_scaffold, vertices_mm=verts, faces=lbs.faces.copy(), losses=losses,
                    iterations=int(iters), detected=detected, landmarks=data.lm.as_dict(),
                    body_model_path=str(getattr(body_model, "path", "")))
    if compute_metrics:
        report("fit: metrics", 0.95)
        out.metrics = fit_metrics(out, skin, labelmap, names, fov_box=(data.lo, data.hi),
                                  skin_index=data.skin_index)
    out.seconds = time.perf_counter() - t0
    report(f"fit: done in {out.seconds:.1f} s", 1.0)
    return out


def _free_of(body69, free):
    return np.asarray(body69, dtype=np.float64).reshape(23, 3)[np.asarray(free) - 1].reshape(-1)


def _pad_betas(betas, bm):
    nb_model = np.asarray(bm.shapedirs).shape[2]
    out = np.zeros(nb_model)
    out[: len(betas)] = betas
    return out


def fit_metrics(result: FitResult, skin, labelmap, names, fov_box=None, skin_index=None) -> dict:
    """chamfer_mm and enclosure_pct (SPEC section 6) of a fit."""
    m = {}
    if fov_box is None:
        fov_box = labelmap.bbox_world() if labelmap is not None else (skin.vertices.min(0), skin.vertices.max(0))
    z = (float(fov_box[0][2]), float(fov_box[1][2]))
    m["chamfer_mm"] = chamfer_mm((result.vertices_mm, result.faces), skin, z, skin_index=skin_index)
    if labelmap is not None and names:
        try:
            m["enclosure_pct"] = enclosure_pct(result.vertices_mm, result.faces, labelmap, names)
        except CtwinError:
            pass
    return m
