"""Skeletal landmarks from bone labels, for the body-model fit (``core.fit``).

- ``extract_landmarks(labelmap, names) -> Landmarks``: body axes detected from the labels
  (superior from the cranio-caudal order of vertebrae, ribs and limb bones; left from left/right
  label pairs), vertebral centroids with their level, joint-centre landmarks mapped to SMPL
  joints (femoral head centres by sphere fit -> hips, humeral heads -> shoulders, distal femur and
  proximal tibia -> knees, distal humerus -> elbows, distal tibia -> ankles), and the arms state.
  Ends of bones cut by the field of view are not used.
- ``sample_bone_points(labelmap, names, n, seed)``: surface voxels of the skeletal labels.
- ``landmark_residuals(lm, joints_mm)``: the landmark term of the fit (like with like: anatomical
  joint centres against the model's joints; vertebrae against the model's spine chain along the
  body axis and left-right only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .labels import is_skeletal
from .skeleton import JOINT_INDEX

_VERT = re.compile(r"^vertebrae_([CTLS])(\d+)$")
_OFFSET = {"C": 0, "T": 7, "L": 19, "S": 24}

# Cranio-caudal pseudo-levels (vertebral level units, C1 = 1, S1 = 25) for non-vertebral labels.
_PSEUDO_LEVEL = {"skull": -2.0, "clavicula": 8.0, "scapula": 11.0, "sternum": 13.0, "sacrum": 26.0,
                 "hip": 27.0, "femur": 33.0, "patella": 38.0, "tibia": 42.0, "fibula": 42.0}

# Where each vertebral level lies on the model's spine chain (pelvis, spine1, spine2, spine3,
# neck, head): level of each chain joint, SMPL proportions.
CHAIN_JOINTS = [JOINT_INDEX[n] for n in ("pelvis", "spine1", "spine2", "spine3", "neck", "head")]
CHAIN_LEVELS = np.array([25.0, 22.0, 19.5, 16.5, 7.5, 1.0])


def vertebra_level(name: str):
    m = _VERT.match(name)
    if not m:
        return 26.0 if name == "sacrum" else None
    return float(_OFFSET[m.group(1)] + int(m.group(2)))


def _pseudo_level(name: str):
    lv = vertebra_level(name)
    if lv is not None:
        return lv
    m = re.match(r"^rib_(left|right)_(\d+)$", name)
    if m:
        return 7.0 + int(m.group(2))
    base = re.sub(r"_(left|right)$", "", name)
    return _PSEUDO_LEVEL.get(base)


@dataclass
class Landmarks:
    joints: dict = field(default_factory=dict)      # SMPL joint index -> (3,) world mm
    joint_names: dict = field(default_factory=dict)  # SMPL joint index -> landmark description
    vertebrae: list = field(default_factory=list)   # (level, centroid (3,))
    superior: np.ndarray | None = None
    left_hint: np.ndarray | None = None
    spine_centroid: np.ndarray | None = None
    level_fit: tuple | None = None                   # (origin (3,), slope (3,)) centroid = o + slope*level
    humerus_levels: list = field(default_factory=list)
    axes: np.ndarray | None = None                   # columns left, up, front (set by the fit)

    def names(self):
        out = [self.joint_names[j] for j in sorted(self.joints)]
        if self.vertebrae:
            out.append(f"spine ({len(self.vertebrae)} vertebrae)")
        return out

    def as_dict(self):
        from .skeleton import JOINT_NAMES

        d = {JOINT_NAMES[j]: p for j, p in self.joints.items()}
        for lv, c in self.vertebrae:
            d[f"vertebra_level_{lv:g}"] = c
        return d

    def arms_state(self):
        """"up", "down" or None (unknown) from the humeri's cranio-caudal level."""
        if not self.humerus_levels:
            return None
        lv = float(np.mean(self.humerus_levels))
        return "up" if lv < 4.0 else "down"


def _boundary(mask):
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def fit_sphere(p):
    """Algebraic least-squares sphere through points (N,3): (centre, radius)."""
    a = np.column_stack([2 * p, np.ones(len(p))])
    b = (p ** 2).sum(1)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    c = sol[:3]
    r = float(np.sqrt(max(sol[3] + c @ c, 0.0)))
    return c, r


def extract_landmarks(labelmap, names) -> Landmarks:
    from scipy import ndimage

    data = np.asarray(labelmap.data)
    lm = Landmarks()
    present = {int(i): str(n) for i, n in names.items() if int(i) > 0}
    ids = np.array(sorted(present), dtype=np.int64)
    if len(ids) == 0:
        return lm
    # per-label centroids and voxel counts in one pass
    maxid = int(max(ids.max(), data.max()))
    idx = np.indices(data.shape).reshape(3, -1).T if data.size < 4e6 else None
    flat = data.reshape(-1).astype(np.int64)
    counts = np.bincount(flat, minlength=maxid + 1)
    sums = np.zeros((maxid + 1, 3))
    if idx is not None:
        for a in range(3):
            sums[:, a] = np.bincount(flat, weights=idx[:, a], minlength=maxid + 1)
    else:
        for a in range(3):
            sums[:, a] = ndimage.sum_labels(np.indices(data.shape)[a], data, np.arange(maxid + 1))
    cent = {}
    for i, n in present.items():
        if i <= maxid and counts[i] >= 5:
            cent[n] = labelmap.index_to_world(sums[i] / counts[i])
    by_name = {n: i for i, n in present.items()}
    # superior axis: regression of centroids on cranio-caudal level
    pts, lvs = [], []
    for n, c in cent.items():
        lv = _pseudo_level(n)
        if lv is not None and not n.startswith("humerus"):
            pts.append(c)
            lvs.append(lv)
    if len(set(lvs)) >= 2:
        P, Lv = np.array(pts), np.array(lvs)
        A = np.column_stack([np.ones(len(Lv)), Lv])
        sol, *_ = np.linalg.lstsq(A, P, rcond=None)
        slope = sol[1]
        span = np.ptp(Lv) * np.linalg.norm(slope)
        if span > 30.0:
            lm.superior = -slope / np.linalg.norm(slope)
            lm.level_fit = (sol[0], slope)
    # left direction from left/right pairs
    diffs = []
    for n, c in cent.items():
        if "left" in n:
            other = n.replace("left", "right")
            if other in cent:
                diffs.append(c - cent[other])
    if diffs:
        s = np.sum(diffs, axis=0)
        if np.linalg.norm(s) > 10.0:
            lm.left_hint = s / np.linalg.norm(s)
    # vertebrae
    verts = [(vertebra_level(n), c) for n, c in cent.items() if n.startswith("vertebrae_")]
    lm.vertebrae = sorted(verts, key=lambda t: t[0])
    if verts:
        lm.spine_centroid = np.mean([c for _, c in verts], axis=0)
    elif "sacrum" in cent:
        lm.spine_centroid = cent["sacrum"]
    up = lm.superior if lm.superior is not None else np.array([0.0, 0.0, 1.0])

    def level_at(p):
        if lm.level_fit is None:
            return None
        o, s = lm.level_fit
        return float((p - o) @ s / (s @ s))

    for side in ("left", "right"):
        if f"humerus_{side}" in cent:
            lv = level_at(cent[f"humerus_{side}"])
            if lv is not None:
                lm.humerus_levels.append(lv)
    arms = lm.arms_state()
    shape = np.array(data.shape)

    def bone_points(name):
        m = data == by_name[name]
        return m

    def ends(name, axis_dir):
        """Proximal/distal end regions of a long bone along axis_dir: (top_pts, top_cut, bot_pts, bot_cut)."""
        m = bone_points(name)
        ijk = np.argwhere(m)
        p = labelmap.index_to_world(ijk)
        h = p @ axis_dir
        hi_, lo_ = h.max(), h.min()
        on_border = np.any((ijk == 0) | (ijk == shape - 1), axis=1)
        top = h > hi_ - 0.15 * (hi_ - lo_)
        bot = h < lo_ + 0.15 * (hi_ - lo_)
        return m, p, h, top, bool(on_border[top].any()), bot, bool(on_border[bot].any())

    for side, hip_j, knee_j, ank_j, sh_j, el_j in (
            ("left", "left_hip", "left_knee", "left_ankle", "left_shoulder", "left_elbow"),
            ("right", "right_hip", "right_knee", "right_ankle", "right_shoulder", "right_elbow")):
        fem = f"femur_{side}"
        if fem in cent and counts[by_name[fem]] > 50:
            m, p, h, top, top_cut, bot, bot_cut = ends(fem, up)
            if not top_cut:
                head = _femoral_head(labelmap, m, p, h, up, lm.spine_centroid)
                if head is not None:
                    lm.joints[JOINT_INDEX[hip_j]] = head
                    lm.joint_names[JOINT_INDEX[hip_j]] = f"femoral head {side} (sphere fit)"
            if not bot_cut and (h.max() - h.min()) > 250.0:
                knee = p[h < h.min() + 25.0].mean(axis=0)
                tib = f"tibia_{side}"
                if tib in cent:
                    _, pt, ht, ttop, tcut, _, _ = ends(tib, up)
                    if not tcut:
                        knee = 0.5 * (knee + pt[ht > ht.max() - 25.0].mean(axis=0))
                lm.joints[JOINT_INDEX[knee_j]] = knee
                lm.joint_names[JOINT_INDEX[knee_j]] = f"distal femur {side}"
        tib = f"tibia_{side}"
        if tib in cent and counts[by_name[tib]] > 50:
            _, pt, ht, _, _, bot, bot_cut = ends(tib, up)
            if not bot_cut and (ht.max() - ht.min()) > 250.0:
                lm.joints[JOINT_INDEX[ank_j]] = pt[ht < ht.min() + 20.0].mean(axis=0)
                lm.joint_names[JOINT_INDEX[ank_j]] = f"distal tibia {side}"
        hum = f"humerus_{side}"
        if hum in cent and counts[by_name[hum]] > 50 and arms is not None:
            # proximal end: superior with arms down, inferior with arms up
            axis = up if arms == "down" else -up
            m, p, h, top, top_cut, bot, bot_cut = ends(hum, axis)
            if not top_cut:
                sel = h > h.max() - 45.0
                bnd = _boundary(m)[m]
                q = p[sel & bnd]
                ok = False
                if len(q) > 20:
                    c, r = fit_sphere(q)
                    ok = 10.0 < r < 40.0 and np.linalg.norm(c - p[sel].mean(0)) < 30.0
                lm.joints[JOINT_INDEX[sh_j]] = c if ok else p[sel].mean(axis=0)
                lm.joint_names[JOINT_INDEX[sh_j]] = f"humeral head {side}"
            if not bot_cut and (h.max() - h.min()) > 200.0:
                lm.joints[JOINT_INDEX[el_j]] = p[h < h.min() + 20.0].mean(axis=0)
                lm.joint_names[JOINT_INDEX[el_j]] = f"distal humerus {side}"
    return lm


def _femoral_head(labelmap, m, p, h, up, spine_c):
    """Femoral head centre: sphere fit to the surface voxels of the medial part of the top slab."""
    sel = h > h.max() - 50.0
    if sel.sum() < 20:
        return None
    top = p[sel]
    mid = spine_c if spine_c is not None else top.mean(0)
    lat = np.linalg.norm((top - mid) - np.outer((top - mid) @ up, up), axis=1)
    medial = lat <= np.median(lat)
    bnd = _boundary(m)[m][sel]
    q = top[medial & bnd]
    if len(q) < 20:
        return top[medial].mean(axis=0)
    c, r = fit_sphere(q)
    if not (10.0 < r < 40.0) or np.linalg.norm(c - top[medial].mean(0)) > 30.0:
        return top[medial].mean(axis=0)
    return c


def sample_bone_points(labelmap, names, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` surface voxel centres of the skeletal labels (world mm), deterministic."""
    data = np.asarray(labelmap.data)
    ids = [int(i) for i, nm in names.items() if is_skeletal(str(nm))]
    if not ids:
        return np.zeros((0, 3))
    mask = np.isin(data, np.asarray(ids, dtype=data.dtype))
    b = _boundary(mask)
    ijk = np.argwhere(b)
    if len(ijk) > n:
        rng = np.random.default_rng(seed + 3)
        ijk = ijk[np.sort(rng.choice(len(ijk), size=n, replace=False))]
    return labelmap.index_to_world(ijk)


def chain_point(joints, level):
    """Point on the model's spine chain (pelvis..head) at a vertebral level (linear in level)."""
    lv = np.clip(level, CHAIN_LEVELS.min(), CHAIN_LEVELS.max())
    k = int(np.searchsorted(-CHAIN_LEVELS, -lv, side="right")) - 1
    k = min(max(k, 0), len(CHAIN_LEVELS) - 2)
    t = (CHAIN_LEVELS[k] - lv) / (CHAIN_LEVELS[k] - CHAIN_LEVELS[k + 1])
    return (1 - t) * joints[CHAIN_JOINTS[k]] + t * joints[CHAIN_JOINTS[k + 1]]


def landmark_residuals(lm: Landmarks, joints) -> np.ndarray:
    """Residuals (mm) of the landmark term, normalised so that their squares sum to a mean."""
    r = []
    for j, p in lm.joints.items():
        r.append(joints[j] - p)
    if lm.vertebrae and lm.axes is not None:
        left, up = lm.axes[:, 0], lm.axes[:, 1]
        for lv, c in lm.vertebrae:
            d = c - chain_point(joints, lv)
            r.append(np.array([d @ up, d @ left]))
    if not r:
        return np.zeros(0)
    out = np.concatenate(r)
    return out / np.sqrt(len(lm.joints) + len(lm.vertebrae))


def initial_translation(lm: Landmarks, joints, R):
    """Translation (3,) that puts the model's joints (transl = 0) on the landmarks, or None."""
    if lm.joints:
        return np.mean([p - joints[j] for j, p in lm.joints.items()], axis=0)
    if lm.vertebrae:
        return np.mean([c - chain_point(joints, lv) for lv, c in lm.vertebrae], axis=0)
    return None


def labelmap_from_meshes(meshes: dict, spacing: float = 3.0, box=None):
    """Rasterise closed label meshes ({name: Mesh}, world mm) into a labelmap Volume on an
    axis-aligned grid (voxel centres inside a mesh by winding number >= 0.5). For anatomy that
    was imported as meshes only (no segmentation file). ``box``: (lo, hi) world mm of the grid,
    default the union of the meshes' bounds. Returns ``(labelmap, names)``; unknown names get
    ids from 1000 up."""
    from .labels import name_to_id
    from .metrics import winding_number
    from .volume import Volume, affine_from

    known = name_to_id()
    if box is None:
        lo = np.min([np.asarray(m.vertices).min(0) for m in meshes.values()], axis=0)
        hi = np.max([np.asarray(m.vertices).max(0) for m in meshes.values()], axis=0)
    else:
        lo, hi = (np.asarray(b, dtype=np.float64) for b in box)
    shape = np.maximum(np.ceil((hi - lo) / spacing).astype(int), 1)
    aff = affine_from([spacing] * 3, lo + 0.5 * spacing)
    data = np.zeros(tuple(shape), dtype=np.uint16)
    names = {}
    extra = 1000
    for name, m in meshes.items():
        if name in known:
            lid = known[name]
        else:
            lid, extra = extra, extra + 1
        v = np.asarray(m.vertices, dtype=np.float64)
        i0 = np.clip(np.floor((v.min(0) - lo) / spacing).astype(int), 0, shape - 1)
        i1 = np.clip(np.ceil((v.max(0) - lo) / spacing).astype(int), 0, shape - 1)
        sub = np.indices(tuple(i1 - i0 + 1)).reshape(3, -1).T + i0
        pts = sub * spacing + lo + 0.5 * spacing
        inside = winding_number(pts, v, m.faces) >= 0.5
        if inside.any():
            s = sub[inside]
            data[s[:, 0], s[:, 1], s[:, 2]] = lid
            names[lid] = name
    return Volume(data, aff), names
