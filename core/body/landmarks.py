"""Skeletal landmarks from bone labels, for the body-model fit (``core.body.fit``).

- ``extract_landmarks(labelmap, names) -> Landmarks``: body axes detected from the labels
  (superior from the cranio-caudal order of vertebrae, ribs and limb bones; left from left/right
  label pairs), vertebral centroids with their level, joint-centre landmarks mapped to SMPL
  joints (femoral head centres by sphere fit -> hips, humeral heads by a trimmed sphere fit ->
  shoulders, the femur's shaft axis at the centre height of its condylar arc -> knees
  (``knee_centre``), distal humerus -> elbows, distal tibia -> ankles), and the arms state.
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
from scipy import ndimage

from ..meshes.metrics import winding_number
from ..volumes.labels import is_skeletal, name_to_id
from ..volumes.volume import Volume, affine_from
from .skeleton import JOINT_INDEX, JOINT_NAMES, PARENTS

_VERT = re.compile(r"^vertebrae_([CTLS])(\d+)$")
_OFFSET = {"C": 0, "T": 7, "L": 19, "S": 24}

# Cranio-caudal pseudo-levels (vertebral level units, C1 = 1, S1 = 25) for non-vertebral labels.
_PSEUDO_LEVEL = {"skull": -2.0, "clavicula": 8.0, "scapula": 11.0, "sternum": 13.0, "sacrum": 26.0,
                 "hip": 27.0, "femur": 33.0, "patella": 38.0, "tibia": 42.0, "fibula": 42.0}

# Where each vertebral level lies on the model's spine chain (pelvis, spine1, spine2, spine3,
# neck, head): level of each chain joint, SMPL proportions.
# The model's own spine joints need not follow these levels (its joints are its own), so the
# spine-line term is a weak guide along the body axis and left-right.
SPINE_WEIGHT = 0.3
CHAIN_JOINTS = [JOINT_INDEX[n] for n in ("pelvis", "spine1", "spine2", "spine3", "neck", "head")]
CHAIN_LEVELS = np.array([26.5, 22.5, 19.5, 13.5, 7.5, 0.5])


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
    arms: str | None = None
    axes: np.ndarray | None = None                   # columns left, up, front (set by the fit)
    extra: dict = field(default_factory=dict)        # collars, vertebral centroids by level

    def names(self):
        out = [self.joint_names[j] for j in sorted(self.joints)]
        if self.vertebrae:
            out.append(f"spine ({len(self.vertebrae)} vertebrae)")
        return out

    def as_dict(self):
        d = {JOINT_NAMES[j]: p for j, p in self.joints.items()}
        for lv, c in self.vertebrae:
            d[f"vertebra_level_{lv:g}"] = c
        return d

    def arms_state(self):
        """"up", "down" or None (unknown), from the humeri (see ``extract_landmarks``)."""
        return self.arms


def _boundary(mask):
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def fit_sphere(p):
    """Algebraic least-squares sphere through points (N, 3), or circle through points (N, 2):
    (centre, radius)."""
    a = np.column_stack([2 * p, np.ones(len(p))])
    b = (p ** 2).sum(1)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    d = p.shape[1]
    c = sol[:d]
    r = float(np.sqrt(max(sol[d] + c @ c, 0.0)))
    return c, r


# The humeral head's sphere fit keeps the surface points within this distance of the sphere (the
# head is close to a sphere, radius 19-28 mm: Iannotti et al., J Bone Joint Surg Am 74:491, 1992);
# the neck, the tuberosities and the shaft below it are not on it. A label's boundary voxel centres
# lie between 0 and about one voxel inside the true surface, i.e. within half a voxel of their mean
# radius, hence the tolerance's part in voxels.
HEAD_FIT_TOL_MM = 2.0
HEAD_FIT_TOL_VOXELS = 0.5


def fit_sphere_trimmed(p, tol, iterations=8):
    """Least-squares sphere (``fit_sphere``) refitted to the points within ``tol`` mm of the
    previous sphere until the inliers no longer change: (centre, radius)."""
    keep = np.ones(len(p), bool)
    c, r = fit_sphere(p)
    for _ in range(iterations):
        new = np.abs(np.linalg.norm(p - c, axis=1) - r) < tol
        if new.sum() < 10 or np.array_equal(new, keep):
            break
        keep = new
        c, r = fit_sphere(p[keep])
    return c, r


# The condylar arc's window along the shaft axis, as a fraction of the femur's length (a knee's size
# scales with its femur's). A choice, not a literature value: the distal tenth (about 45 mm of an
# adult femur) covers the posterior condyles' articular arc without reaching far into the
# metaphysis; with a fixed 45 mm the phantom's larger body (seed 2) came out 2.9 mm low.
KNEE_ARC_FRACTION = 0.10


def knee_centre(p, bnd, up, anterior, proximal_hint=None, arc_mm=None):
    """Knee centre from a femur's voxel centres ``p`` (N, 3) and boundary flags ``bnd`` (N,): the
    point of the femur's shaft axis at the height of the knee's flexion axis, or None.

    - Shaft axis: the principal axis of the diaphysis (20-60 % of the femur's length from its distal
      end); the knee centre of the limb's axes lies at the intercondylar notch, into which the
      distal shaft axis runs (Moreland et al., J Bone Joint Surg Am 69:745, 1987). Found from the
      femur alone, so a flexed or rotated thigh does not bias it. The proximal end is the one
      nearer ``proximal_hint`` (the spine's centroid) when given, else the one up.
    - Flexion axis: the posterior condyles are circular in the sagittal plane and the knee flexes
      about their common centre (Elias et al., Clin Orthop 260:98, 1990; Hollister et al., Clin
      Orthop 290:259, 1993): a circle fitted to the femur's surface points, projected on the
      sagittal plane, on the distal and posterior arc of the condyles: within ``arc_mm`` of the
      distal end (default ``KNEE_ARC_FRACTION`` of the femur's length, the condyles' size scaling
      with the bone's) and posterior to the shaft axis or within a quarter of that of the end. Its
      height along the shaft axis is the knee's; its antero-posterior position is not used (the
      condyles lie behind the axis by a body's own amount).
    """
    # the femur's long axis, oriented toward its proximal end (nearer ``proximal_hint``, else up)
    a = np.linalg.svd(p - p.mean(axis=0), full_matrices=False)[2][0]
    h = p @ a
    if proximal_hint is not None:
        top, bot = p[h > np.percentile(h, 95)].mean(0), p[h < np.percentile(h, 5)].mean(0)
        a = a if np.linalg.norm(top - proximal_hint) < np.linalg.norm(bot - proximal_hint) else -a
    else:
        a = a * np.sign(a @ up)
    h = p @ a
    end, length = float(h.min()), float(np.ptp(h))
    shaft = (h > end + 0.2 * length) & (h < end + 0.6 * length)
    if shaft.sum() < 20:
        return None
    c0 = p[shaft].mean(axis=0)
    a2 = np.linalg.svd(p[shaft] - c0, full_matrices=False)[2][0]
    a = a2 * np.sign(a2 @ a)
    ant = anterior - (anterior @ a) * a
    if np.linalg.norm(ant) < 0.5:
        return None
    ant /= np.linalg.norm(ant)
    rel = p - c0
    y, x = rel @ a, rel @ ant
    y_end = float(y.min())
    depth = KNEE_ARC_FRACTION * length if arc_mm is None else float(arc_mm)
    arc = bnd & (y < y_end + depth) & ((x < 0.0) | (y < y_end + 0.25 * depth))
    if arc.sum() < 12:
        return None
    (_, cy), r = fit_sphere(np.column_stack([x[arc], y[arc]]))
    if not (8.0 < r < 40.0) or not (y_end < cy < y_end + depth):
        return None
    return c0 + cy * a


def extract_landmarks(labelmap, names) -> Landmarks:
    data = np.asarray(labelmap.data)
    lm = Landmarks()
    present = {int(i): str(n) for i, n in names.items() if int(i) > 0}
    ids = np.array(sorted(present), dtype=np.int64)
    if len(ids) == 0:
        return lm
    # per-label voxels through bounding boxes (one pass over the volume)
    objs = ndimage.find_objects(data)
    shape = np.array(data.shape)
    local_cache = {}

    def local(lid):
        """(voxel indices (N,3), boundary flag (N,)) of label lid, via its padded bounding box."""
        if lid not in local_cache:
            sl = objs[lid - 1] if lid - 1 < len(objs) else None
            if sl is None:
                local_cache[lid] = (np.zeros((0, 3), np.int64), np.zeros(0, bool))
            else:
                lo_ = [max(x.start - 1, 0) for x in sl]
                hi_ = [min(x.stop + 1, n) for x, n in zip(sl, data.shape)]
                sub = data[lo_[0]:hi_[0], lo_[1]:hi_[1], lo_[2]:hi_[2]] == lid
                local_cache[lid] = (np.argwhere(sub) + np.array(lo_), _boundary(sub)[sub])
        return local_cache[lid]

    counts, cent = {}, {}
    for i, n in present.items():
        ijk, _ = local(i)
        counts[i] = len(ijk)
        if len(ijk) >= 5:
            cent[n] = labelmap.index_to_world(ijk.mean(axis=0))
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


    def ends(name, axis_dir):
        """A long bone along axis_dir: (boundary flags, points, heights, top sel, top cut by the FOV,
        bottom sel, bottom cut)."""
        ijk, bnd = local(by_name[name])
        p = labelmap.index_to_world(ijk)
        h = p @ axis_dir
        hi_, lo_ = h.max(), h.min()
        on_border = np.any((ijk == 0) | (ijk == shape - 1), axis=1)
        top = h > hi_ - 0.15 * (hi_ - lo_)
        bot = h < lo_ + 0.15 * (hi_ - lo_)
        return bnd, p, h, top, bool(on_border[top].any()), bot, bool(on_border[bot].any())

    def usable(name):
        return name in cent and counts[by_name[name]] > 50

    def distal_pair(a, b, axis, depth, at_end=False):
        """Mean of the distal-end centroids of two parallel bones (b optional), or None if cut.
        ``at_end``: moved along the axis onto the most distal point (an articular surface)."""
        out, h_end = [], np.inf
        for nm in (a, b):
            if nm and usable(nm):
                _, p, h, _, _, _, cut = ends(nm, axis)
                if cut or (h.max() - h.min()) < 150.0:
                    if nm == a or not out:
                        return None
                    break
                out.append(p[h < h.min() + depth].mean(axis=0))
                h_end = min(h_end, float(h.min()))
        if not out:
            return None
        c = np.mean(out, axis=0)
        return c + (h_end - c @ axis) * axis if at_end else c

    def put(j, p, what):
        lm.joints[JOINT_INDEX[j]] = p
        lm.joint_names[JOINT_INDEX[j]] = what

    # arms up or down, from the humeri: their proximal end is the one nearer the scapula; without
    # scapulae, the humeri's height against T1 (arms down: the humerus hangs below the shoulder)
    votes = []
    t1 = next((c for lv_, c in lm.vertebrae if lv_ == 8.0), None)
    for side in ("left", "right"):
        hum, sca = f"humerus_{side}", f"scapula_{side}"
        if not usable(hum):
            continue
        _, p, h, top, _, bot, _ = ends(hum, up)
        if sca in cent:
            ptop, pbot = p[top].mean(0), p[bot].mean(0)
            near_top = np.linalg.norm(ptop - cent[sca]) < np.linalg.norm(pbot - cent[sca])
            votes.append("down" if near_top else "up")
        elif t1 is not None:
            votes.append("up" if (cent[hum] - t1) @ up > 0 else "down")
        elif level_at(cent[hum]) is not None:
            votes.append("up" if level_at(cent[hum]) < 6.0 else "down")
    if votes:
        lm.arms = max(set(votes), key=votes.count)
    arms = lm.arms
    # body axes in the patient: anterior = left x superior
    anterior = left = None
    if lm.superior is not None and lm.left_hint is not None:
        left = lm.left_hint - (lm.left_hint @ lm.superior) * lm.superior
        if np.linalg.norm(left) > 0.5:
            left /= np.linalg.norm(left)
            anterior = np.cross(left, lm.superior)
    h_vox = float(np.mean(np.abs(np.asarray(labelmap.affine)[:3, :3]).sum(axis=0)))

    for side in ("left", "right"):
        fem = f"femur_{side}"
        if usable(fem):
            bnd, p, h, top, top_cut, bot, bot_cut = ends(fem, up)
            if not top_cut:
                head = _femoral_head(bnd, p, h, up, lm.spine_centroid)
                if head is not None:
                    put(f"{side}_hip", head, f"femoral head {side} (sphere fit)")
            if not bot_cut and (h.max() - h.min()) > 250.0:
                # the condyles' size from the femur's length when the whole femur is in the CT
                arc = None if not top_cut else 45.0
                knee = None if anterior is None else knee_centre(p, bnd, up, anterior, lm.spine_centroid, arc)
                if knee is not None:
                    put(f"{side}_knee", knee, f"femoral condyles {side} (shaft axis, condylar arc)")
                else:
                    # the flexion axis runs through the condyles, about 20 mm above the distal end
                    put(f"{side}_knee", p[h < h.min() + 45.0].mean(axis=0), f"femoral condyles {side}")
        ank = distal_pair(f"tibia_{side}", f"fibula_{side}", up, 20.0)
        if ank is not None:
            put(f"{side}_ankle", ank, f"malleoli {side}")
        hum = f"humerus_{side}"
        if usable(hum) and arms is not None:
            # proximal end: superior with arms down, inferior with arms up
            axis = up if arms == "down" else -up
            bnd, p, h, top, top_cut, bot, bot_cut = ends(hum, axis)
            if not top_cut:
                sel = h > h.max() - 45.0
                q = p[sel & bnd]
                ok = False
                if len(q) > 20:
                    c, r = fit_sphere_trimmed(q, max(HEAD_FIT_TOL_MM, HEAD_FIT_TOL_VOXELS * h_vox))
                    ok = 10.0 < r < 40.0 and np.linalg.norm(c - p[sel].mean(0)) < 30.0
                put(f"{side}_shoulder", c if ok else p[sel].mean(axis=0), f"humeral head {side} (sphere fit)")
            if not bot_cut and (h.max() - h.min()) > 200.0:
                put(f"{side}_elbow", p[h < h.min() + 20.0].mean(axis=0), f"distal humerus {side}")
            # the radiocarpal joint: on the distal articular surface of the radius and ulna
            wr = distal_pair(f"radius_{side}", f"ulna_{side}", axis, 15.0, at_end=True)
            if wr is not None:
                put(f"{side}_wrist", wr, f"distal radius/ulna {side}")
        cla = f"clavicula_{side}"
        if usable(cla) and lm.left_hint is not None:
            _, p, _, _, _, _, _ = ends(cla, up)
            mid = lm.spine_centroid if lm.spine_centroid is not None else p.mean(0)
            lat = np.abs((p - mid) @ lm.left_hint)
            near = lat < lat.min() + 12.0
            ijk, _ = local(by_name[cla])
            if not np.any((ijk[near] == 0) | (ijk[near] == shape - 1)):
                lm.extra[f"{side}_collar"] = p[near].mean(axis=0)
    # vertebral body centres (the spine joints sit on the discs between the bodies); the label's
    # centroid lies 5-10 mm behind, pulled back by the arch and processes
    for n, c in cent.items():
        lv = vertebra_level(n)
        if lv is not None and n.startswith("vertebrae_"):
            if anterior is not None:
                ijk, _ = local(by_name[n])
                if not np.any((ijk == 0) | (ijk == shape - 1)):
                    c = vertebral_body_centre(labelmap.index_to_world(ijk), anterior, left, h_vox)
            lm.extra[f"level_{lv:g}"] = c
    if anterior is not None and "level_1" in lm.extra and "level_2" in lm.extra:
        # the atlas is a ring with no body: its centre in depth is that of the axis's body (the
        # dens sits in the ring)
        c1, c2 = lm.extra["level_1"], lm.extra["level_2"]
        lm.extra["level_1"] = c1 + ((c2 - c1) @ anterior) * anterior
    return lm


BODY_DEPTH_TO_WIDTH = 0.74   # vertebral bodies: antero-posterior depth / left-right width


def vertebral_body_centre(p, anterior, left, voxel_mm):
    """Centre of a vertebral body from its label's voxel centres (N, 3): the body is the label's
    anterior, roughly elliptic part, its depth ``BODY_DEPTH_TO_WIDTH`` times its width. The width is
    read in the front half of the body (no pedicles or processes there); the centre lies half a
    depth behind the anterior surface, and left-right and cranio-caudally at the front part's
    centroid."""
    a = p @ anterior
    front = a.max() + 0.5 * voxel_mm
    depth = 30.0
    for _ in range(3):
        sel = a >= front - 0.5 * depth
        if sel.sum() < 8:
            return p.mean(axis=0)
        x = p[sel] @ left
        depth = BODY_DEPTH_TO_WIDTH * (np.percentile(x, 99) - np.percentile(x, 1) + voxel_mm)
    c = p[a >= front - depth].mean(axis=0)
    return c + (front - 0.5 * depth - c @ anterior) * anterior


def _femoral_head(bnd, p, h, up, spine_c):
    """Femoral head centre: sphere fit to the surface voxels of the medial part of the top slab."""
    sel = h > h.max() - 50.0
    if sel.sum() < 20:
        return None
    top = p[sel]
    mid = spine_c if spine_c is not None else top.mean(0)
    lat = np.linalg.norm((top - mid) - np.outer((top - mid) @ up, up), axis=1)
    medial = lat <= np.median(lat)
    bnd = bnd[sel]
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
            r.append(SPINE_WEIGHT * np.array([d @ up, d @ left]))
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
    """Rasterise label meshes ({name: Mesh}, world mm) into a labelmap Volume on an axis-aligned
    grid (voxel centres inside a mesh by winding number >= 0.5), for anatomy imported as meshes
    only (no segmentation file). The winding number tolerates the small holes that imported and
    field-of-view-cut surfaces have, which mesh mode's exact voxeliser
    (``core.meshes.mesh_volume.voxelise_meshes``, closed surfaces only) refuses. ``box``: (lo, hi)
    world mm of the grid, default the union of the meshes' bounds. Returns ``(labelmap, names)``;
    unknown names get ids from 1000 up."""
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


# Anatomical joint conventions (those of the project's anatomy, ``core.phantom.anatomy``): the spine joints
# sit on the intervertebral discs, the neck on C7/T1, the head on the occipital condyles just
# above C1, the collars on the sternoclavicular joints, and the pelvis 30 % of the way from the
# femoral-head midpoint to the centre of the L5 body.
_DISC_JOINTS = {"spine1": (22, 23), "spine2": (19, 20), "spine3": (13, 14), "neck": (7, 8)}


def anatomical_joints(lm: Landmarks, model_joints):
    """The scaffold's joints: each model joint replaced by its anatomical estimate from the labels
    where the labels give one; a joint without evidence follows its parent's correction.
    Returns (joints (24, 3), {joint name: source})."""
    mj = np.asarray(model_joints, dtype=np.float64)
    ev = {j: p for j, p in lm.joints.items()}
    src = {JOINT_NAMES[j]: lm.joint_names[j] for j in ev}
    lv = {float(k[6:]): v for k, v in lm.extra.items() if k.startswith("level_")}
    for name, (a, b) in _DISC_JOINTS.items():
        if a in lv and b in lv:
            ev[JOINT_INDEX[name]] = 0.5 * (lv[a] + lv[b])
            src[name] = f"disc between levels {a} and {b}"
    if 1 in lv and 2 in lv:
        ev[JOINT_INDEX["head"]] = lv[1] + 0.65 * (lv[1] - lv[2])
        src["head"] = "above C1"
    hips = [JOINT_INDEX["left_hip"], JOINT_INDEX["right_hip"]]
    if all(h in lm.joints for h in hips) and 24 in lv:
        hm = 0.5 * (lm.joints[hips[0]] + lm.joints[hips[1]])
        ev[0] = hm + 0.30 * (lv[24] - hm)
        src["pelvis"] = "femoral heads and L5"
    for side in ("left", "right"):
        if f"{side}_collar" in lm.extra:
            ev[JOINT_INDEX[f"{side}_collar"]] = lm.extra[f"{side}_collar"]
            src[f"{side}_collar"] = f"sternoclavicular joint {side}"
    out = mj.copy()
    for j in range(len(mj)):
        if j in ev:
            out[j] = ev[j]
        elif PARENTS[j] >= 0:
            out[j] = mj[j] + (out[PARENTS[j]] - mj[PARENTS[j]])
        else:
            # the root without evidence: the mean correction of the joints that have some
            d = [ev[k] - mj[k] for k in ev]
            out[j] = mj[j] + (np.mean(d, axis=0) if d else 0.0)
    return out, src
