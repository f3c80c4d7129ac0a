"""Binding the twin's structures to its armature (no ``bpy``).

- Every skeletal structure (``core.volumes.labels.is_skeletal``) is bound to exactly ONE bone with weight 1,
  by anatomy (``core.volumes.labels.JOINT_RULES``: femur -> hip, tibia/fibula/patella -> knee, ...). Rib k
  follows its own thoracic vertebra's bone (``vertebrae_T<k>``) where that vertebra is segmented,
  else the spine segment at its height (spine2 for ribs 7-12, spine3 for 1-6). The costal
  cartilages (one label spanning ribs 1-10 and the sternum) and skeletal names that no rule knows
  follow their nearest rigidly bound neighbour.
- Vertebrae (C1..L5) get one bone each, named after the structure (e.g. ``vertebrae_L3``). Its
  transform blends the two spine segments around it (pelvis, spine1, spine2, spine3, neck, head):
  the vertebra's centroid ``c`` is placed on the spine curve at arc length ``s``; the blend weight is
  piecewise linear between segment midpoints, so a vertebra at a segment's middle moves with that
  segment and one at a joint moves half with each. The transform is rigid:
  ``R = slerp(R_a, R_b, w)`` and ``c -> lerp(D_a c, D_b c, w)`` (``vertebra_transform``). In
  Blender the same blend comes from a Copy Transforms constraint at influence w (see rig.armature).
- Soft structures (organs, skin, muscle, ...) get per-vertex LBS weights transferred from the
  fitted body model: the closest point on the body-model surface at the acquisition pose (for
  points deeper than 15 mm, among the faces of the same body part only: trunk, each arm, each
  leg, chosen by the nearest bone segment, so that a liver vertex never takes the weights of
  the arm beside it), barycentric
  interpolation of that face's vertex weights, then the 4 largest kept and renormalised.
- ``Binding.table()`` (label -> bone name; ``"smooth"`` for LBS-weighted structures) goes into
  twin.json; ``save_binding`` / ``load_binding`` keep everything (weights included) in an .npz.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .armature import SPINE_CHAIN, Armature, armature_from_fit, build_armature
from ..errors import CtwinError
from ..volumes.labels import is_skeletal, joint_for_label
from ..meshes.metrics import closest_points_on_triangles
from ..body.skeleton import JOINT_INDEX, JOINT_NAMES, N_JOINTS
from ..fileio import atomic_path

SMOOTH = "smooth"
TOP_K = 4

_VERTEBRA = re.compile(r"^vertebrae_(C|T|L)\d+$")
_RIB = re.compile(r"^rib_(left|right)_(\d+)$")

# Body parts for the weight transfer: faces of the body-model surface are only taken from the
# part of the query point's nearest skeleton segment.
_PART_OF_JOINT = np.array([0] * N_JOINTS)
for _side, _leg, _arm in (("left", 1, 3), ("right", 2, 4)):
    for _n in ("hip", "knee", "ankle", "foot"):
        _PART_OF_JOINT[JOINT_INDEX[f"{_side}_{_n}"]] = _leg
    for _n in ("shoulder", "elbow", "wrist", "hand"):
        _PART_OF_JOINT[JOINT_INDEX[f"{_side}_{_n}"]] = _arm


def is_vertebra(name: str) -> bool:
    return bool(_VERTEBRA.match(name))


@dataclass
class VertebraBone:
    """A vertebra's own bone: blends the deltas of joints ``lower`` and ``upper`` with weight ``w``."""

    name: str
    lower: int
    upper: int
    w: float
    anchor_mm: np.ndarray  # (3,) the vertebra's centroid at the acquisition pose (bone head)
    tail_mm: np.ndarray  # (3,) a point up the spine curve (bone tail, for Blender)


@dataclass
class SoftWeights:
    index: np.ndarray  # (N, 4) joint ids
    weight: np.ndarray  # (N, 4) weights summing to 1

    def dense(self) -> np.ndarray:
        out = np.zeros((len(self.index), N_JOINTS))
        rows = np.arange(len(self.index))
        for k in range(self.index.shape[1]):  # repeated indices are summed
            np.add.at(out, (rows, self.index[:, k].astype(np.int64)), self.weight[:, k])
        return out


@dataclass
class Binding:
    armature: Armature
    rigid: dict = field(default_factory=dict)  # structure -> bone name (SMPL joint or vertebra bone)
    vertebrae: dict = field(default_factory=dict)  # vertebra bone name -> VertebraBone
    soft: dict = field(default_factory=dict)  # structure -> SoftWeights

    def table(self) -> dict:
        """label -> armature bone (``"smooth"`` for LBS-weighted soft structures), for twin.json."""
        t = dict(self.rigid)
        t.update({n: SMOOTH for n in self.soft})
        return dict(sorted(t.items()))

    def bone_names(self) -> list:
        """All armature bones: SMPL's 24 then the vertebra bones (inferior to superior)."""
        vb = sorted(self.vertebrae.values(), key=lambda v: (v.lower, v.w, v.anchor_mm[2]))
        return list(JOINT_NAMES) + [v.name for v in vb]


# --- geometry helpers ------------------------------------------------------------------------
def _point_segment_dist(p, a, b):
    """Distances (N, S) from points (N, 3) to segments a (S, 3) -> b (S, 3)."""
    ab = b - a
    ll = np.maximum(np.einsum("sk,sk->s", ab, ab), 1e-12)
    t = np.clip(np.einsum("nsk,sk->ns", p[:, None, :] - a[None], ab) / ll, 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None, :] - closest, axis=-1)


def _top_k(dense: np.ndarray, k: int = TOP_K) -> SoftWeights:
    idx = np.argsort(-dense, axis=1)[:, :k]
    w = np.take_along_axis(dense, idx, axis=1)
    w = np.clip(w, 0.0, None)
    s = w.sum(axis=1, keepdims=True)
    w = np.where(s > 1e-12, w / np.where(s > 1e-12, s, 1.0), np.eye(k)[0][None])
    return SoftWeights(index=idx.astype(np.int16), weight=w.astype(np.float32))


def segment_weights_fallback(points, armature: Armature, sigma_mm: float = 40.0) -> np.ndarray:
    """Dense (N, 24) weights from the distance to each bone segment (used without a body model)."""
    d = _point_segment_dist(np.asarray(points, float), armature.heads, armature.tails)
    d = d - d.min(axis=1, keepdims=True)
    w = np.exp(-0.5 * (d / sigma_mm) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _closest_weights(pts, bv, bf, bw, centroids, faces_idx, k_candidates):
    """(distance (N,), interpolated weights (N, J)) of the closest point among faces ``faces_idx``."""
    tree = cKDTree(centroids[faces_idx])
    k = min(k_candidates, len(faces_idx))
    _, cand = tree.query(pts, k=k)
    cand = faces_idx[np.asarray(cand).reshape(len(pts), k)]
    best_d = np.full(len(pts), np.inf)
    best_f = np.zeros(len(pts), dtype=np.int64)
    best_b = np.zeros((len(pts), 3))
    for c in range(k):
        fi = cand[:, c]
        f = bf[fi]
        cp, bary = closest_points_on_triangles(pts, bv[f[:, 0]], bv[f[:, 1]], bv[f[:, 2]])
        d = np.einsum("nk,nk->n", cp - pts, cp - pts)
        better = d < best_d
        best_d[better] = d[better]
        best_f[better] = fi[better]
        best_b[better] = bary[better]
    w = np.einsum("nk,nkj->nj", best_b, bw[bf[best_f]])
    return np.sqrt(best_d), w


def transfer_weights(points, armature: Armature, body_verts_mm, body_faces, body_weights, k_candidates=12,
                     near_mm: float = 15.0):
    """Dense (N, 24) LBS weights for points from the closest body-model surface point.

    Points within ``near_mm`` of the surface (skin, fat) take the closest point on the whole
    surface; deeper points take the closest point among the faces of their own body part (the
    part of their nearest bone segment), so that an organ never takes an arm's weights.
    """
    pts = np.asarray(points, dtype=np.float64)
    bv = np.asarray(body_verts_mm, dtype=np.float64)
    bf = np.asarray(body_faces, dtype=np.int64)
    bw = np.asarray(body_weights, dtype=np.float64)
    centroids = bv[bf].mean(axis=1)
    dist, out = _closest_weights(pts, bv, bf, bw, centroids, np.arange(len(bf)), k_candidates)
    deep = np.nonzero(dist > near_mm)[0]
    if len(deep) == 0:
        return out
    face_part = _PART_OF_JOINT[np.argmax(bw[bf].sum(axis=1), axis=1)]
    pt_part = _PART_OF_JOINT[np.argmin(_point_segment_dist(pts[deep], armature.heads, armature.tails), axis=1)]
    for part in np.unique(pt_part):
        q = deep[pt_part == part]
        faces_idx = np.nonzero(face_part == part)[0]
        if len(faces_idx) == 0:
            continue
        _, out[q] = _closest_weights(pts[q], bv, bf, bw, centroids, faces_idx, k_candidates)
    return out


# --- binding ---------------------------------------------------------------------------------
def _get(obj, key):
    if isinstance(obj, dict) or (hasattr(obj, "files") and hasattr(obj, "__getitem__")):
        return obj[key] if key in obj else None
    return getattr(obj, key, None)


def _spine_arclength(points, chain_pts):
    """Arc-length parameter of points projected onto the spine polyline (extrapolated at both ends)."""
    seg = np.diff(chain_pts, axis=0)
    lens = np.linalg.norm(seg, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(lens)])
    best = np.full(len(points), np.inf)
    s_out = np.zeros(len(points))
    last = len(seg) - 1
    for k in range(len(seg)):
        t = (points - chain_pts[k]) @ seg[k] / max(lens[k] ** 2, 1e-12)
        lo = -np.inf if k == 0 else 0.0
        hi = np.inf if k == last else 1.0
        t = np.clip(t, lo, hi)
        d = np.linalg.norm(points - (chain_pts[k] + t[:, None] * seg[k]), axis=1)
        better = d < best
        best[better] = d[better]
        s_out[better] = cum[k] + t[better] * lens[k]
    return s_out, cum


def spine_blend(s: float, cum: np.ndarray) -> tuple[int, int, float]:
    """(lower joint, upper joint, w) for arc length ``s`` on the spine chain (see module docstring)."""
    mids = list(0.5 * (cum[:-1] + cum[1:])) + [cum[-1] + 0.5 * (cum[-1] - cum[-2])]
    chain = SPINE_CHAIN
    if s <= mids[0]:
        return chain[0], chain[0], 0.0
    if s >= mids[-1]:
        return chain[-1], chain[-1], 0.0
    for k in range(len(mids) - 1):
        if mids[k] <= s < mids[k + 1]:
            return chain[k], chain[k + 1], float((s - mids[k]) / (mids[k + 1] - mids[k]))
    return chain[-1], chain[-1], 0.0


def bind_structures(meshes: dict, body_model=None, fit=None, *, armature: Armature | None = None) -> Binding:
    """Bind every structure: skeletal ones rigidly to one bone, vertebrae to their own blended bones,
    soft ones by weights transferred from the fitted body model.

    ``meshes``: {label name: Mesh (vertices (N, 3) world mm at the acquisition pose, faces)}.
    ``fit``: the fit result (attributes or a mapping with ``pose``, ``betas``, ``transl_mm``,
    ``residual_mm``, ``joints_mm``). ``body_model``: a ``BodyModel``; without one, soft structures
    get weights from the distance to the bone segments. ``armature`` overrides the one built from
    ``fit``. The names ``skin``/``body_model`` are ordinary soft structures.
    """
    if armature is None:
        if fit is None:
            raise CtwinError("binding needs the fit (joints, pose, translation) or an armature")
        armature = armature_from_fit(fit)
    binding = Binding(armature=armature)

    rigid_pts, rigid_lbl = [], []
    unknown = []
    chain_pts = armature.joints_mm[list(SPINE_CHAIN)]
    # vertebrae first: the ribs attach to theirs
    order = sorted(meshes, key=lambda n: (not is_vertebra(n), n))
    for name in order:
        v = np.asarray(meshes[name].vertices, dtype=np.float64)
        if not is_skeletal(name):
            continue
        rib = _RIB.match(name)
        if rib and f"vertebrae_T{rib.group(2)}" in binding.vertebrae:
            binding.rigid[name] = f"vertebrae_T{rib.group(2)}"
        elif is_vertebra(name):
            c = v.mean(axis=0) if len(v) else chain_pts[2]
            (s,), cum = _spine_arclength(c[None], chain_pts)
            lo, up, w = spine_blend(float(s), cum)
            # tail: 20 mm further up the spine curve, parallel to the local spine direction
            k = int(np.clip(np.searchsorted(cum, s) - 1, 0, len(chain_pts) - 2))
            direction = chain_pts[k + 1] - chain_pts[k]
            direction = direction / max(np.linalg.norm(direction), 1e-9)
            binding.vertebrae[name] = VertebraBone(name=name, lower=lo, upper=up, w=w, anchor_mm=c,
                                                   tail_mm=c + 20.0 * direction)
            binding.rigid[name] = name
        else:
            bone = None if name == "costal_cartilages" else joint_for_label(name)
            if bone is None:
                unknown.append(name)
                continue
            binding.rigid[name] = bone
        if len(v):
            sub = v[:: max(1, len(v) // 2000)]
            rigid_pts.append(sub)
            rigid_lbl += [name] * len(sub)

    # skeletal structures without a rule: the nearest rigidly bound neighbour's bone
    if unknown:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.concatenate(rigid_pts)) if rigid_pts else None
        for name in unknown:
            v = np.asarray(meshes[name].vertices, dtype=np.float64)
            if tree is not None and len(v):
                _, nn = tree.query(v[:: max(1, len(v) // 2000)])
                names, counts = np.unique(np.asarray(rigid_lbl)[nn], return_counts=True)
                binding.rigid[name] = binding.rigid[str(names[np.argmax(counts)])]
            else:
                c = v.mean(axis=0) if len(v) else armature.joints_mm[0]
                d = _point_segment_dist(c[None], armature.heads, armature.tails)[0]
                binding.rigid[name] = JOINT_NAMES[int(np.argmin(d))]

    soft_names = [n for n in meshes if not is_skeletal(n)]
    if soft_names:
        if body_model is not None:
            if fit is None:
                raise CtwinError("transferring body-model weights needs the fit result")
            verts_mm, _ = body_model.forward(pose=_get(fit, "pose"), betas=_get(fit, "betas"),
                                             transl_mm=_get(fit, "transl_mm"),
                                             residual_mm=_get(fit, "residual_mm"))
        for name in soft_names:
            v = np.asarray(meshes[name].vertices, dtype=np.float64)
            if len(v) == 0:
                binding.soft[name] = SoftWeights(np.zeros((0, TOP_K), np.int16), np.zeros((0, TOP_K), np.float32))
                continue
            if body_model is not None:
                dense = transfer_weights(v, armature, verts_mm, body_model.faces, body_model.weights)
            else:
                dense = segment_weights_fallback(v, armature)
            binding.soft[name] = _top_k(dense)
    return binding


# --- persistence -----------------------------------------------------------------------------
def save_binding(binding: Binding, path) -> None:
    """Everything needed to pose the twin (armature, rigid table, vertebrae, soft weights) in one .npz."""
    arm = binding.armature
    arrays = {
        "joints_mm": arm.joints_mm, "pose0": arm.pose0, "transl0_mm": arm.transl0_mm,
        "rigid": np.array(json.dumps(binding.rigid)),
        "vertebrae": np.array(json.dumps({
            n: {"lower": v.lower, "upper": v.upper, "w": v.w, "anchor_mm": v.anchor_mm.tolist(),
                "tail_mm": v.tail_mm.tolist()} for n, v in binding.vertebrae.items()})),
        "soft_names": np.array(json.dumps(list(binding.soft))),
    }
    for i, (n, sw) in enumerate(binding.soft.items()):
        arrays[f"soft_index_{i}"] = sw.index
        arrays[f"soft_weight_{i}"] = sw.weight
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_binding(path) -> Binding:
    with np.load(path, allow_pickle=False) as z:
        arm = build_armature(z["joints_mm"], z["pose0"], z["transl0_mm"])
        b = Binding(armature=arm, rigid=json.loads(str(z["rigid"])))
        for n, v in json.loads(str(z["vertebrae"])).items():
            b.vertebrae[n] = VertebraBone(name=n, lower=int(v["lower"]), upper=int(v["upper"]), w=float(v["w"]),
                                          anchor_mm=np.asarray(v["anchor_mm"]), tail_mm=np.asarray(v["tail_mm"]))
        for i, n in enumerate(json.loads(str(z["soft_names"]))):
            b.soft[n] = SoftWeights(index=z[f"soft_index_{i}"], weight=z[f"soft_weight_{i}"])
    return b


__all__ = ["Binding", "VertebraBone", "SoftWeights", "bind_structures", "is_vertebra",
           "transfer_weights", "save_binding", "load_binding", "spine_blend"]
