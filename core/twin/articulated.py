"""Volumetric articulated CT: render the posed twin from its own voxels.

The CT is decomposed once (``prepare_articulated``) into

- **rigid parts**: one sub-volume per skeletal label (the CT cropped to the label's box, with a mask
  = the label plus a thin rim of surrounding voxels, so the bone's partial-volume edge travels with
  it), and one *static* part (the table and anything else outside the body: it never moves);
- **soft tissue**: the CT with the interior of those masks filled from the surrounding tissue
  (nearest-neighbour fill, smoothed), so a bone moved away leaves plausible tissue, not a hole or a
  ghost;
- a smooth **skinning-weight field** on a coarse grid: per SMPL joint j, the distance d_j to the
  bones bound to it, turned into weights by a soft-min whose width grows with the distance to the
  nearest bone, ``exp(-(d_j - d_min) / (tau + slope d_min))`` (normalised, below 2 % dropped).

``posed_scene`` turns a pose (per-structure 4x4 rest->posed transforms and per-joint deltas D_j)
into a posed ``core.drr.projector.Scene``: each rigid part (a ``core.drr.projector.PlacedVolume``) gets
``affine' = D @ affine``; the soft tissue (the scene's base) gets an
inverse-warp displacement grid (posed point y -> rest point x with y = sum_j w_j(x) D_j x) that a
renderer interpolates trilinearly.

Composition rule (the projector's ``render_scene`` rule): at a world point, the first rigid part
(in priority order) whose box contains the point and whose mask is set at the nearest voxel counts;
otherwise the warped soft tissue counts. Each point is counted once.

Exactness at the acquisition pose: the masks of the parts are disjoint (the rims are assigned to
the nearest bone), each part's crop carries the real CT one voxel beyond its mask, and the soft
tissue keeps the real CT in a one-voxel shell inside the union of the masks (only the interior is
filled). Any rule that decides "part" only next to a mask voxel and "soft tissue" only next to a
non-mask voxel (nearest-voxel mask, or trilinear mask >= 0.5) then reproduces the trilinear
interpolation of the original CT at every point, and the identity warp is exactly zero.

Rendering: ``render_posed`` composes the frame onto the CT lattice (``core.drr.projector.compose_scene``:
soft tissue pulled through the warp where it moved, parts written by the rule above, cached per
frame) and renders it with the static kernels; ``backend="projector"`` evaluates the rule at every
ray sample instead, ``backend="reference"`` is a slow numpy ray marcher.

Static objects: the table and other static objects are a rigid part with the identity transform
(kind ``"static"``) rather than a "world" weight channel: they stay exactly in place whatever the
warp does, and the soft tissue outside the body is air.
"""
from __future__ import annotations

import json
import math
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import CtwinError
from ..fileio import atomic_path, write_json
from ..drr.kernels import claims, compile_shared, lerp3
from ..volumes.labels import is_skeletal, joint_for_label
from ..progress import report
from ..drr.projector import (OnDevice, PlacedVolume, Scene, _grid_from_bounds, cell_box_corners, compose_scene,
                             render_scene, resolve_device)
from ..body.skeleton import JOINT_INDEX, JOINT_NAMES, N_JOINTS, PARENTS, forward_kinematics, rodrigues
from ..volumes.volume import Volume, apply_transform, invert_affine, resample_onto
# Imported where used, so that importing this module stays light: numba (heavy or optional third-party packages).

FORMAT_VERSION = 1
AIR_HU = -1000
# a warp node whose best pre-image misses it by this many node spacings is posed air (see
# inverse_lbs_nodes): 2.5 (30 mm at the twins' 12 mm nodes) is the middle of 24, 30 and 36 mm,
# compared over the phantom presets of two phantoms (README, Posed DRRs)
AIR_MISS_NODES = 2.5

def resolve_joint(bone, label_name: str | None = None) -> int:
    """Joint index of a binding value (SMPL joint name or index); -1 when unknown."""
    if isinstance(bone, (int, np.integer)) and 0 <= int(bone) < N_JOINTS:
        return int(bone)
    if isinstance(bone, str) and bone in JOINT_INDEX:
        return JOINT_INDEX[bone]
    if label_name is not None:
        j = joint_for_label(label_name)
        if j is not None:
            return JOINT_INDEX[j]
    return -1


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _crop_affine(ct_affine: np.ndarray, offset) -> np.ndarray:
    """index -> world of a crop of the CT grid that starts at voxel ``offset``."""
    t = np.eye(4)
    t[:3, 3] = offset
    return ct_affine @ t


@dataclass
class ArticulatedCT:
    affine: np.ndarray  # CT index -> LPS mm
    soft: np.ndarray  # int16 HU, CT grid: the CT with the parts' interiors filled
    parts: list  # [PlacedVolume] crops of the CT grid at the acquisition pose, in priority order
    weights: np.ndarray  # float32 (a, b, c, C) skinning weights on a coarse grid (sum 1)
    weight_affine: np.ndarray  # coarse index -> LPS mm
    weight_joints: np.ndarray  # (C,) int joint index of each channel
    joints_rest_mm: np.ndarray | None = None  # (24, 3) acquisition-pose joints, world mm
    binding: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple:
        return tuple(self.soft.shape)

    def part(self, name: str) -> PlacedVolume:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    # ---- IO --------------------------------------------------------------------------------
    def save(self, directory) -> None:
        """Write ``articulated.json`` + ``articulated.npz`` (int16 HU, uint8 masks, float16 weights)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"soft": self.soft.astype(np.int16), "weights": self.weights.astype(np.float16)}
        meta_parts = []
        for i, p in enumerate(self.parts):
            arrays[f"hu_{i}"] = p.data.astype(np.int16)
            arrays[f"mask_{i}"] = p.mask.astype(np.uint8)
            meta_parts.append({"name": p.name, "kind": p.kind, "bone": p.bone, "joint": int(p.joint),
                               "offset": [int(v) for v in p.offset_on(self.affine)],
                               "shape": list(p.data.shape)})
        with atomic_path(d / "articulated.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        write_json(d / "articulated.json", {
            "format": "ctwin-articulated", "version": FORMAT_VERSION,
            "affine": self.affine, "shape": list(self.shape), "parts": meta_parts,
            "weight_affine": self.weight_affine, "weight_joints": [int(j) for j in self.weight_joints],
            "weight_joint_names": [JOINT_NAMES[j] for j in self.weight_joints],
            "joints_rest_mm": None if self.joints_rest_mm is None else np.asarray(self.joints_rest_mm),
            "binding": self.binding, "params": self.params,
        })

    @classmethod
    def load(cls, directory) -> "ArticulatedCT":
        d = Path(directory)
        jp, npz = d / "articulated.json", d / "articulated.npz"
        if not jp.exists() or not npz.exists():
            raise CtwinError(f"no articulated CT in {d} (articulated.json / articulated.npz missing)")
        with open(jp) as f:
            meta = json.load(f)
        if meta.get("format") != "ctwin-articulated" or int(meta.get("version", 0)) > FORMAT_VERSION:
            raise CtwinError(f"{jp.name}: not a ctwin articulated CT of a supported version")
        affine = np.asarray(meta["affine"], dtype=np.float64)
        with np.load(npz) as z:
            parts = []
            for i, pm in enumerate(meta["parts"]):
                parts.append(PlacedVolume(z[f"hu_{i}"], z[f"mask_{i}"],
                                          _crop_affine(affine, np.asarray(pm["offset"], dtype=np.int64)),
                                          pm["name"], pm["kind"], pm["bone"], int(pm["joint"])))
            soft = z["soft"]
            weights = z["weights"].astype(np.float32)
        jr = meta.get("joints_rest_mm")
        return cls(affine, soft, parts, weights,
                   np.asarray(meta["weight_affine"], dtype=np.float64),
                   np.asarray(meta["weight_joints"], dtype=np.int64),
                   None if jr is None else np.asarray(jr, dtype=np.float64),
                   dict(meta.get("binding", {})), dict(meta.get("params", {})))


# --------------------------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def _pool_any(mask: np.ndarray, f) -> np.ndarray:
    """Any-pool a 3-D mask by integer factors f (padding with False)."""
    pad = [(0, (-s) % fi) for s, fi in zip(mask.shape, f)]
    m = np.pad(mask, pad)
    a, b, c = (s // fi for s, fi in zip(m.shape, f))
    return m.reshape(a, f[0], b, f[1], c, f[2]).any(axis=(1, 3, 5))


def prepare_articulated(ct: Volume, labelmap: Volume, names: dict, binding: dict | None = None,
                        joints_rest_mm=None, *, rim_voxels: float = 2.0,
                        weight_spacing_mm: float = 8.0, weight_tau_mm: float = 3.0,
                        weight_tau_slope: float = 0.3, weight_cutoff: float = 0.02,
                        static_labels=("table",), body_threshold_hu: float = -500.0,
                        static_threshold_hu: float = -900.0, fill_sigma_vox: float = 1.5
                        ) -> ArticulatedCT:
    """Decompose a CT into rigid bone parts, a static part, soft tissue and skinning weights.

    ``labelmap`` is resolved onto the CT grid by world coordinates when the grids differ.
    ``names``: label id -> name. ``binding``: label name -> rig bone (an SMPL joint name or index);
    skeletal labels missing from it use ``joint_for_label``.
    """
    if ct.shape != labelmap.shape or not np.allclose(ct.affine, labelmap.affine, atol=1e-4):
        lab = resample_onto(labelmap, ct, order=0)
    else:
        lab = np.asarray(labelmap.data)
    lab = lab.astype(np.int32, copy=False)
    hu = np.asarray(ct.data)
    names = {int(k): str(v) for k, v in names.items()}
    binding = dict(binding or {})
    present = set(int(i) for i in np.unique(lab)) - {0}
    bone_ids = sorted(i for i in present if i in names and is_skeletal(names[i]))
    static_ids = sorted(i for i in present if names.get(i) in set(static_labels))
    report(f"articulated CT: {len(bone_ids)} bones, {len(static_ids)} static labels")

    # -- bone masks: the labels plus a rim assigned to the nearest bone (disjoint masks) --------
    is_bone = np.isin(lab, bone_ids) if bone_ids else np.zeros(lab.shape, bool)
    is_static_label = np.isin(lab, static_ids) if static_ids else np.zeros(lab.shape, bool)
    owner = np.zeros(lab.shape, dtype=np.int32)
    if bone_ids:
        r = int(math.ceil(rim_voxels))
        sl = ndimage.find_objects(is_bone.astype(np.uint8))[0]
        sl = tuple(slice(max(s.start - r - 1, 0), min(s.stop + r + 1, n)) for s, n in zip(sl, lab.shape))
        sub_bone = is_bone[sl]
        dist, inds = ndimage.distance_transform_edt(~sub_bone, return_indices=True)
        sub_lab = lab[sl]
        nearest = sub_lab[tuple(inds)]
        del inds
        own = np.where(dist <= rim_voxels, nearest, 0)
        own[sub_bone] = sub_lab[sub_bone]
        own[is_static_label[sl]] = 0
        owner[sl] = own
        del dist, nearest, own

    # -- body and static objects --------------------------------------------------------------
    body = _largest_component(ndimage.binary_opening((hu > body_threshold_hu) & ~is_static_label))
    body |= owner > 0
    static_core = (((hu > static_threshold_hu) & ~ndimage.binary_dilation(body, iterations=2))
                   | is_static_label) & ~body
    static_mask = np.zeros(lab.shape, bool)
    if static_core.any():
        static_mask = ndimage.binary_dilation(static_core, iterations=1) & ~body & (owner == 0)

    # -- parts (priority: bones by label id, then static) ---------------------------------------
    parts = []
    objs = ndimage.find_objects(owner)
    for lid in bone_ids:
        if lid - 1 >= len(objs) or objs[lid - 1] is None:
            continue
        name = names[lid]
        sl = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(objs[lid - 1], lab.shape))
        bone = binding.get(name)
        if bone is None:
            bone = joint_for_label(name)
        parts.append(PlacedVolume(hu[sl].astype(np.int16), (owner[sl] == lid).astype(np.uint8),
                                  _crop_affine(ct.affine, np.array([s.start for s in sl], dtype=np.int64)),
                                  name, "bone", None if bone is None else str(bone) if not isinstance(bone, (int, np.integer)) else JOINT_NAMES[int(bone)],
                                  resolve_joint(bone, name)))
    if static_mask.any():
        sl = ndimage.find_objects(static_mask.astype(np.uint8))[0]
        sl = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, lab.shape))
        parts.append(PlacedVolume(hu[sl].astype(np.int16), static_mask[sl].astype(np.uint8),
                                  _crop_affine(ct.affine, np.array([s.start for s in sl], dtype=np.int64)),
                                  "static", "static", None, -1))

    # -- soft tissue: real CT in a one-voxel shell inside the masks, interiors filled -------------
    union = (owner > 0) | static_mask
    interior = ndimage.binary_erosion(union, structure=np.ones((3, 3, 3), bool), border_value=1)
    soft = hu.astype(np.int16, copy=True)
    soft[interior & static_mask] = AIR_HU
    fill = interior & ~static_mask
    if fill.any():
        sl = ndimage.find_objects(fill.astype(np.uint8))[0]
        sl = tuple(slice(max(s.start - 3, 0), min(s.stop + 3, n)) for s, n in zip(sl, lab.shape))
        f_sub = fill[sl]
        known = ~interior[sl]
        inds = ndimage.distance_transform_edt(~known, return_distances=False, return_indices=True)
        src = hu[sl].astype(np.float32)
        filled = src[tuple(inds)]
        del inds
        if fill_sigma_vox > 0:
            filled = ndimage.gaussian_filter(filled, fill_sigma_vox)
        sub = soft[sl]
        sub[f_sub] = np.clip(np.rint(filled[f_sub]), -32768, 32767).astype(np.int16)
        soft[sl] = sub

    # -- skinning weights on a coarse grid ------------------------------------------------------
    sp = ct.spacing
    fac = [max(1, int(round(weight_spacing_mm / s))) for s in sp]
    t = np.eye(4)
    t[:3, :3] = np.diag(fac)
    t[:3, 3] = [(f - 1) / 2.0 for f in fac]
    w_affine = ct.affine @ t
    cshape = tuple(-(-n // f) for n, f in zip(lab.shape, fac))
    joints_of_parts = sorted(set(p.joint for p in parts if p.kind == "bone" and p.joint >= 0))
    dists = []
    for j in joints_of_parts:
        ids = [lid for lid in bone_ids if resolve_joint(binding.get(names[lid], joint_for_label(names[lid])), names[lid]) == j]
        m = _pool_any(np.isin(lab, ids), fac)
        dists.append(ndimage.distance_transform_edt(~m, sampling=[f * s for f, s in zip(fac, sp)]))
    if dists:
        dd = np.stack(dists, axis=-1)
        # soft-min of the distances with a width that grows with the distance to the nearest bone:
        # rigid on and next to a bone, 50/50 half-way between two bones, broad blending far from
        # all bones (w_j ~ exp(-(d_j - d_min) / (tau + slope d_min)))
        dmin = dd.min(axis=-1, keepdims=True)
        w = np.exp(-(dd - dmin) / (max(weight_tau_mm, 1e-3) + weight_tau_slope * dmin))
        w /= w.sum(axis=-1, keepdims=True)
        w[w < weight_cutoff] = 0.0
        w /= w.sum(axis=-1, keepdims=True)
        weights = w.astype(np.float32)
    else:
        weights = np.zeros(cshape + (0,), np.float32)
    jr = None if joints_rest_mm is None else np.asarray(joints_rest_mm, dtype=np.float64).reshape(N_JOINTS, 3)
    params = {"rim_voxels": rim_voxels, "weight_spacing_mm": weight_spacing_mm, "weight_tau_mm": weight_tau_mm,
              "weight_tau_slope": weight_tau_slope, "weight_cutoff": weight_cutoff,
              "body_threshold_hu": body_threshold_hu, "static_threshold_hu": static_threshold_hu,
              "fill_sigma_vox": fill_sigma_vox}
    return ArticulatedCT(ct.affine.copy(), soft, parts, weights, w_affine,
                         np.asarray(joints_of_parts, dtype=np.int64), jr,
                         {p.name: p.bone for p in parts if p.kind == "bone"}, params)


# --------------------------------------------------------------------------------------------
# Joint deltas from poses
# --------------------------------------------------------------------------------------------


def _global_rotations(pose) -> np.ndarray:
    rots = rodrigues(np.asarray(pose, dtype=np.float64).reshape(N_JOINTS, 3))
    g = np.zeros_like(rots)
    for i in range(N_JOINTS):
        g[i] = rots[i] if PARENTS[i] < 0 else g[PARENTS[i]] @ rots[i]
    return g


def canonical_joints(pose, joints_posed_mm) -> np.ndarray:
    """Rest (canonical-frame) joints, root at the origin, that ``pose`` maps onto ``joints_posed_mm``."""
    g = _global_rotations(pose)
    jp = np.asarray(joints_posed_mm, dtype=np.float64).reshape(N_JOINTS, 3)
    rest = np.zeros((N_JOINTS, 3))
    for i in range(1, N_JOINTS):
        p = PARENTS[i]
        rest[i] = rest[p] + g[p].T @ (jp[i] - jp[p])
    return rest


def _world_skinning(pose, rest, root_mm) -> np.ndarray:
    a, _ = forward_kinematics(pose, rest)
    a[:, :3, 3] += np.asarray(root_mm, dtype=np.float64)
    return a


def joint_deltas_between(pose_a, joints_a_mm, pose_b, joints_b_mm=None, transl_delta_mm=None) -> np.ndarray:
    """D_j (24, 4, 4) mapping a point bound to joint j from pose A to pose B (world mm).

    The rest skeleton is recovered from (pose A, joints A). The root of B is ``joints_b_mm[0]`` when
    given, else joints A's root plus ``transl_delta_mm``.
    """
    rest = canonical_joints(pose_a, joints_a_mm)
    ja = np.asarray(joints_a_mm, dtype=np.float64).reshape(N_JOINTS, 3)
    if joints_b_mm is not None:
        root_b = np.asarray(joints_b_mm, dtype=np.float64).reshape(N_JOINTS, 3)[0]
    else:
        root_b = ja[0] + (0.0 if transl_delta_mm is None else np.asarray(transl_delta_mm, dtype=np.float64))
    wa = _world_skinning(pose_a, rest, ja[0])
    wb = _world_skinning(pose_b, rest, root_b)
    return wb @ invert_affine(wa)


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------

# The kernels are plain module-level functions (no closures), compiled lazily by _kernels() over
# a namespace dict in which their callees are globals: numba's on-disk cache key of a closure
# hashes its pickled cells (other dispatchers here), which differ in every process, so as
# closures the kernels would be recompiled (and a new cache entry written) in every process.
# Measured, test_articulated.py -k test_posed_knee_renders_bones_rigid in a second process (loaded
# 2-core machine): 28.3 s as closures (recompiled every time), 1.0 s as module functions (all loaded).


def _clampf(c, n):
    if c < 0.0:
        c = 0.0
    if c > n - 1.0:
        c = n - 1.0
    i0 = int(math.floor(c))
    if i0 > n - 2:
        i0 = n - 2
    if i0 < 0:
        i0 = 0
    f = c - i0
    if n == 1:
        f = 0.0
    return i0, f


def _tri_flat(buf, off, ni, nj, nk, ci, cj, ck):
    i0, fi = _clampf(ci, ni)
    j0, fj = _clampf(cj, nj)
    k0, fk = _clampf(ck, nk)
    i1 = i0 + 1 if ni > 1 else i0
    j1 = j0 + 1 if nj > 1 else j0
    k1 = k0 + 1 if nk > 1 else k0
    s = nj * nk
    v000 = float(buf[off + i0 * s + j0 * nk + k0])
    v001 = float(buf[off + i0 * s + j0 * nk + k1])
    v010 = float(buf[off + i0 * s + j1 * nk + k0])
    v011 = float(buf[off + i0 * s + j1 * nk + k1])
    v100 = float(buf[off + i1 * s + j0 * nk + k0])
    v101 = float(buf[off + i1 * s + j0 * nk + k1])
    v110 = float(buf[off + i1 * s + j1 * nk + k0])
    v111 = float(buf[off + i1 * s + j1 * nk + k1])
    # along i first, then j, then k: lerp3 with the axes reversed
    return lerp3(v000, v100, v010, v110, v001, v101, v011, v111, fk, fj, fi)


def _tri3(vol, ci, cj, ck):
    ni, nj, nk = vol.shape
    i0, fi = _clampf(ci, ni)
    j0, fj = _clampf(cj, nj)
    k0, fk = _clampf(ck, nk)
    i1 = i0 + 1 if ni > 1 else i0
    j1 = j0 + 1 if nj > 1 else j0
    k1 = k0 + 1 if nk > 1 else k0
    return lerp3(vol[i0, j0, k0], vol[i1, j0, k0], vol[i0, j1, k0], vol[i1, j1, k0],
                 vol[i0, j0, k1], vol[i1, j0, k1], vol[i0, j1, k1], vol[i1, j1, k1], fk, fj, fi)


def sample_points(pts, base, base_inv, warp, warp_inv, has_warp, hu_flat, mask_flat,
                  p_off, p_shape, p_inv, out):
    n_pts = pts.shape[0]
    n_parts = p_off.shape[0]
    bi, bj, bk = base.shape
    wi, wj, wk = warp.shape[0], warp.shape[1], warp.shape[2]
    for n in prange(n_pts):  # noqa: F821 (prange: a global of the build namespace)
        x = pts[n, 0]
        y = pts[n, 1]
        z = pts[n, 2]
        done = False
        for p in range(n_parts):
            ni = p_shape[p, 0]
            nj = p_shape[p, 1]
            nk = p_shape[p, 2]
            ci = p_inv[p, 0, 0] * x + p_inv[p, 0, 1] * y + p_inv[p, 0, 2] * z + p_inv[p, 0, 3]
            cj = p_inv[p, 1, 0] * x + p_inv[p, 1, 1] * y + p_inv[p, 1, 2] * z + p_inv[p, 1, 3]
            ck = p_inv[p, 2, 0] * x + p_inv[p, 2, 1] * y + p_inv[p, 2, 2] * z + p_inv[p, 2, 3]
            if not claims(mask_flat, p_off[p], ni, nj, nk, ci, cj, ck):
                continue
            out[n] = _tri_flat(hu_flat, p_off[p], ni, nj, nk, ci, cj, ck)
            done = True
            break
        if done:
            continue
        if has_warp:
            ci = warp_inv[0, 0] * x + warp_inv[0, 1] * y + warp_inv[0, 2] * z + warp_inv[0, 3]
            cj = warp_inv[1, 0] * x + warp_inv[1, 1] * y + warp_inv[1, 2] * z + warp_inv[1, 3]
            ck = warp_inv[2, 0] * x + warp_inv[2, 1] * y + warp_inv[2, 2] * z + warp_inv[2, 3]
            if (ci >= -0.5 and ci <= wi - 0.5 and cj >= -0.5 and cj <= wj - 0.5
                    and ck >= -0.5 and ck <= wk - 0.5):
                dx = _tri3(warp[:, :, :, 0], ci, cj, ck)
                dy = _tri3(warp[:, :, :, 1], ci, cj, ck)
                dz = _tri3(warp[:, :, :, 2], ci, cj, ck)
                if dx != dx or dy != dy or dz != dz:  # a NaN node: posed air
                    out[n] = -1000.0
                    continue
                x += dx
                y += dy
                z += dz
        ci = base_inv[0, 0] * x + base_inv[0, 1] * y + base_inv[0, 2] * z + base_inv[0, 3]
        cj = base_inv[1, 0] * x + base_inv[1, 1] * y + base_inv[1, 2] * z + base_inv[1, 3]
        ck = base_inv[2, 0] * x + base_inv[2, 1] * y + base_inv[2, 2] * z + base_inv[2, 3]
        if (ci < -0.5 or ci > bi - 0.5 or cj < -0.5 or cj > bj - 0.5 or ck < -0.5
                or ck > bk - 0.5):
            out[n] = -1000.0
        else:
            out[n] = _tri3(base, ci, cj, ck)


def _blend(x, y, z, W, w_inv, D, m):
    """Blended 3x4 transform sum_j w_j(x) D_j (normalised) into m.

    ``W`` = (shape (3,), P, S): the weight field blended with this pose's transforms per weight
    node (``blend_field``: P[n] = sum_j w_j D_j as 12 numbers, S[n] = sum_j w_j), interpolated
    trilinearly; ``D`` is not read (P holds it)."""
    Ws, P, S = W
    a = Ws[0]
    b = Ws[1]
    c = Ws[2]
    ci = w_inv[0, 0] * x + w_inv[0, 1] * y + w_inv[0, 2] * z + w_inv[0, 3]
    cj = w_inv[1, 0] * x + w_inv[1, 1] * y + w_inv[1, 2] * z + w_inv[1, 3]
    ck = w_inv[2, 0] * x + w_inv[2, 1] * y + w_inv[2, 2] * z + w_inv[2, 3]
    i0, fi = _clampf(ci, a)
    j0, fj = _clampf(cj, b)
    k0, fk = _clampf(ck, c)
    i1 = i0 + 1 if a > 1 else i0
    j1 = j0 + 1 if b > 1 else j0
    k1 = k0 + 1 if c > 1 else k0
    for r in range(3):
        for q in range(4):
            m[r, q] = 0.0
    tot = 0.0
    for q in range(8):
        wi = fi if (q & 4) else 1.0 - fi
        wj = fj if (q & 2) else 1.0 - fj
        wk = fk if (q & 1) else 1.0 - fk
        cw = wi * wj * wk
        if cw <= 0.0:
            continue
        node = ((i1 if (q & 4) else i0) * b + (j1 if (q & 2) else j0)) * c + (k1 if (q & 1) else k0)
        sw = S[node]
        if sw == 0.0:
            continue
        tot += cw * sw
        for r in range(3):
            for q2 in range(4):
                m[r, q2] += cw * P[node, r * 4 + q2]
    if tot <= 0.0:
        for r in range(3):
            for q in range(4):
                m[r, q] = 1.0 if r == q else 0.0
    else:
        for r in range(3):
            for q in range(4):
                m[r, q] /= tot


def blend_node(Wp, Wc, Wv, D, P, S, n):
    """``blend_field`` at weight node n (the body that the CPU and CUDA drivers share)."""
    for t in range(12):
        P[n, t] = 0.0
    sw = 0.0
    for e in range(Wp[n], Wp[n + 1]):
        w = Wv[e]
        ch = Wc[e]
        sw += w
        for r in range(3):
            for q in range(4):
                P[n, r * 4 + q] += w * D[ch, r, q]
    S[n] = sw


def blend_field(Wp, Wc, Wv, D, P, S):
    """Per weight node n (sparse rows: channels Wc[e], weights Wv[e] for e in Wp[n] .. Wp[n + 1]):
    P[n] = sum_e Wv[e] D[Wc[e]] (the 3x4 rows, 12 numbers) and S[n] = sum_e Wv[e]. Once per pose,
    so that a blend at a point reads 8 nodes of 13 numbers whatever the number of channels."""
    for n in prange(Wp.shape[0] - 1):  # noqa: F821 (prange: a global of the build namespace)
        blend_node(Wp, Wc, Wv, D, P, S, n)


def _resid(x, y, z, px, py, pz, W, w_inv, D, m):
    _blend(x, y, z, W, w_inv, D, m)
    fx = m[0, 0] * x + m[0, 1] * y + m[0, 2] * z + m[0, 3] - px
    fy = m[1, 0] * x + m[1, 1] * y + m[1, 2] * z + m[1, 3] - py
    fz = m[2, 0] * x + m[2, 1] * y + m[2, 2] * z + m[2, 3] - pz
    return math.sqrt(fx * fx + fy * fy + fz * fz)


def forward_lbs_kernel(xs, W, w_inv, D, out):
    for n in prange(xs.shape[0]):  # noqa: F821 (prange: a global of the build namespace)
        m = np.empty((3, 4))
        _blend(xs[n, 0], xs[n, 1], xs[n, 2], W, w_inv, D, m)
        for r in range(3):
            out[n, r] = m[r, 0] * xs[n, 0] + m[r, 1] * xs[n, 1] + m[r, 2] * xs[n, 2] + m[r, 3]


def forward_points(xs, W, w_inv, D, ys, Minv, m, n0, n1):
    """``forward_blend`` at points n0 .. n1 - 1, with ``m`` (3x4) as work space (the shared body: the
    CPU driver passes a chunk of points, the CUDA driver one)."""
    for n in range(n0, n1):
        x = xs[n, 0]
        y = xs[n, 1]
        z = xs[n, 2]
        _blend(x, y, z, W, w_inv, D, m)
        for r in range(3):
            ys[n, r] = m[r, 0] * x + m[r, 1] * y + m[r, 2] * z + m[r, 3]
        a00, a01, a02 = m[0, 0], m[0, 1], m[0, 2]
        a10, a11, a12 = m[1, 0], m[1, 1], m[1, 2]
        a20, a21, a22 = m[2, 0], m[2, 1], m[2, 2]
        det = (a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20)
               + a02 * (a10 * a21 - a11 * a20))
        if abs(det) < 1e-9:
            det = 1e-9
        i00 = (a11 * a22 - a12 * a21) / det
        i01 = -(a01 * a22 - a02 * a21) / det
        i02 = (a01 * a12 - a02 * a11) / det
        i10 = -(a10 * a22 - a12 * a20) / det
        i11 = (a00 * a22 - a02 * a20) / det
        i12 = -(a00 * a12 - a02 * a10) / det
        i20 = (a10 * a21 - a11 * a20) / det
        i21 = -(a00 * a21 - a01 * a20) / det
        i22 = (a00 * a11 - a01 * a10) / det
        Minv[n, 0, 0] = i00
        Minv[n, 0, 1] = i01
        Minv[n, 0, 2] = i02
        Minv[n, 1, 0] = i10
        Minv[n, 1, 1] = i11
        Minv[n, 1, 2] = i12
        Minv[n, 2, 0] = i20
        Minv[n, 2, 1] = i21
        Minv[n, 2, 2] = i22
        for r in range(3):
            Minv[n, r, 3] = -(Minv[n, r, 0] * m[0, 3] + Minv[n, r, 1] * m[1, 3] + Minv[n, r, 2] * m[2, 3])


def forward_blend(xs, W, w_inv, D, ys, Minv):
    """Forward skinning of rest points xs with their blended transforms' inverses (3x4)."""
    nt = xs.shape[0]
    nch = min(nt, 4096)
    for ch in prange(nch):  # noqa: F821 (prange: a global of the build namespace)
        m = np.empty((3, 4))  # one per chunk of points, not per point
        forward_points(xs, W, w_inv, D, ys, Minv, m, ch * nt // nch, (ch + 1) * nt // nch)


def splat_rows(ys, order, starts, g0, waff, ninv, wn, R, best, src, a, b_lo, b_hi):
    """``splat_nearest`` for the nodes of slab a in rows b_lo .. b_hi (the shared body: the CPU
    driver passes a whole slab, the CUDA driver a single row)."""
    lo_s = 1e30
    for q in range(3):
        lo_s = min(lo_s, math.sqrt(waff[0, q] ** 2 + waff[1, q] ** 2 + waff[2, q] ** 2))
    rI = R / lo_s + 1e-9
    R2 = R * R
    n12 = wn[1] * wn[2]
    nsl = starts.shape[0] - 1
    q0 = starts[min(max(int(math.floor(a - rI)), 0), nsl)]
    q1 = starts[min(max(int(math.floor(a + rI)) + 1, 0), nsl)]
    for q in range(q0, q1):
        s = order[q]
        yx = ys[s, 0]
        yy = ys[s, 1]
        yz = ys[s, 2]
        g1 = ninv[1, 0] * yx + ninv[1, 1] * yy + ninv[1, 2] * yz + ninv[1, 3]
        g2 = ninv[2, 0] * yx + ninv[2, 1] * yy + ninv[2, 2] * yz + ninv[2, 3]
        gs = g0[s]
        ra2 = rI * rI - (a - gs) * (a - gs)
        if ra2 < 0.0:
            continue
        ra = math.sqrt(ra2)
        b0 = max(int(math.ceil(g1 - ra)), b_lo)
        b1 = min(int(math.floor(g1 + ra)), b_hi)
        for b in range(b0, b1 + 1):
            rb2 = ra2 - (b - g1) * (b - g1)
            if rb2 < 0.0:
                continue
            rb = math.sqrt(rb2)
            c0 = max(int(math.ceil(g2 - rb)), 0)
            c1 = min(int(math.floor(g2 + rb)), wn[2] - 1)
            ex = waff[0, 0] * a + waff[0, 1] * b
            ey = waff[1, 0] * a + waff[1, 1] * b
            ez = waff[2, 0] * a + waff[2, 1] * b
            nb = a * n12 + b * wn[2]
            for c in range(c0, c1 + 1):
                dx = ex + waff[0, 2] * c + waff[0, 3] - yx
                dy = ey + waff[1, 2] * c + waff[1, 3] - yy
                dz = ez + waff[2, 2] * c + waff[2, 3] - yz
                d2 = dx * dx + dy * dy + dz * dz
                n = nb + c
                if d2 <= R2 and d2 <= best[n]:
                    if d2 == best[n]:
                        t = src[n]
                        if not (gs < g0[t] or (gs == g0[t] and s < t)):
                            continue
                    best[n] = d2
                    src[n] = s


def splat_nearest(ys, order, starts, g0, waff, ninv, wn, R, best, src):
    """For every warp node within R mm of a forward-skinned point ys[s], the nearest such s (of
    equally near points, the one with the smallest first node coordinate ``g0[s]``, then the smallest
    s). ``order`` lists the points by node slab (``floor(g0)``), slab i's from ``starts[i]`` to
    ``starts[i + 1]``; parallel over node slabs, each writing its own nodes only."""
    for a in prange(wn[0]):  # noqa: F821 (prange: a global of the build namespace)
        splat_rows(ys, order, starts, g0, waff, ninv, wn, R, best, src, a, 0, wn[1] - 1)


def inverse_nodes(waff, wn, W, w_inv, D, near, src, Minv, iters, tol, air_tol, disp, res, status, m, n0, n1):
    """``inverse_lbs_nodes`` at warp nodes n0 .. n1 - 1, with ``m`` (3x4) as work space (the shared
    body: the CPU driver passes a chunk of nodes, the CUDA driver one)."""
    n12 = wn[1] * wn[2]
    a_ = near.shape[0]
    b_ = near.shape[1]
    c_ = near.shape[2]
    for n in range(n0, n1):
        a = n // n12
        rr = n - a * n12
        b = rr // wn[2]
        c = rr - b * wn[2]
        px = waff[0, 0] * a + waff[0, 1] * b + waff[0, 2] * c + waff[0, 3]
        py = waff[1, 0] * a + waff[1, 1] * b + waff[1, 2] * c + waff[1, 3]
        pz = waff[2, 0] * a + waff[2, 1] * b + waff[2, 2] * c + waff[2, 3]
        disp[n, 0] = 0.0
        disp[n, 1] = 0.0
        disp[n, 2] = 0.0
        res[n] = 0.0
        status[n] = 0
        s = src[n]
        rest_near = False
        ci = int(math.floor(w_inv[0, 0] * px + w_inv[0, 1] * py + w_inv[0, 2] * pz + w_inv[0, 3] + 0.5))
        cj = int(math.floor(w_inv[1, 0] * px + w_inv[1, 1] * py + w_inv[1, 2] * pz + w_inv[1, 3] + 0.5))
        ck = int(math.floor(w_inv[2, 0] * px + w_inv[2, 1] * py + w_inv[2, 2] * pz + w_inv[2, 3] + 0.5))
        if ci >= 0 and cj >= 0 and ck >= 0 and ci < a_ and cj < b_ and ck < c_:
            rest_near = near[ci, cj, ck] != 0
        if s < 0 and not rest_near:
            continue
        status[n] = 1
        # m always holds the blended transform at the point of the last residual
        if s >= 0:  # the guess first (moved tissue), then the identity (tissue in place)
            bx = Minv[s, 0, 0] * px + Minv[s, 0, 1] * py + Minv[s, 0, 2] * pz + Minv[s, 0, 3]
            by = Minv[s, 1, 0] * px + Minv[s, 1, 1] * py + Minv[s, 1, 2] * pz + Minv[s, 1, 3]
            bz = Minv[s, 2, 0] * px + Minv[s, 2, 1] * py + Minv[s, 2, 2] * pz + Minv[s, 2, 3]
            br = _resid(bx, by, bz, px, py, pz, W, w_inv, D, m)
            m_ok = True
            if br >= tol:
                r = _resid(px, py, pz, px, py, pz, W, w_inv, D, m)
                m_ok = r < br
                if m_ok:
                    bx, by, bz, br = px, py, pz, r
        else:
            bx, by, bz = px, py, pz
            br = _resid(px, py, pz, px, py, pz, W, w_inv, D, m)
            m_ok = True
        x, y, z = bx, by, bz
        # without a skinned-tissue guess only tissue nearly in place can land here: a few steps
        for it in range(iters if s >= 0 else min(iters, 3)):
            if br < tol:
                break
            if not m_ok:
                _blend(x, y, z, W, w_inv, D, m)
            a00, a01, a02 = m[0, 0], m[0, 1], m[0, 2]
            a10, a11, a12 = m[1, 0], m[1, 1], m[1, 2]
            a20, a21, a22 = m[2, 0], m[2, 1], m[2, 2]
            det = (a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20)
                   + a02 * (a10 * a21 - a11 * a20))
            if abs(det) < 1e-9:
                break
            rx = px - m[0, 3]
            ry = py - m[1, 3]
            rz = pz - m[2, 3]
            qx = ((a11 * a22 - a12 * a21) * rx - (a01 * a22 - a02 * a21) * ry
                  + (a01 * a12 - a02 * a11) * rz) / det
            qy = (-(a10 * a22 - a12 * a20) * rx + (a00 * a22 - a02 * a20) * ry
                  - (a00 * a12 - a02 * a10) * rz) / det
            qz = ((a10 * a21 - a11 * a20) * rx - (a00 * a21 - a01 * a20) * ry
                  + (a00 * a11 - a01 * a10) * rz) / det
            r = _resid(qx, qy, qz, px, py, pz, W, w_inv, D, m)
            if r < br:
                bx, by, bz, br = qx, qy, qz, r
                x, y, z = qx, qy, qz
                m_ok = True
            else:  # damped step
                x = 0.5 * (x + qx)
                y = 0.5 * (y + qy)
                z = 0.5 * (z + qz)
                m_ok = False
        if (s < 0 and br >= tol) or br >= air_tol:
            # no pre-image: rest tissue here moved away (none skinned near it), or skinning
            # only reaches the node by stretching tissue across an opening gap
            status[n] = 2
            disp[n, 0] = np.nan
            disp[n, 1] = np.nan
            disp[n, 2] = np.nan
            continue
        disp[n, 0] = bx - px
        disp[n, 1] = by - py
        disp[n, 2] = bz - pz
        res[n] = br


def inverse_lbs_nodes(waff, wn, W, w_inv, D, near, src, Minv, iters, tol, air_tol, disp, res, status):
    """Inverse skinning at the warp nodes that can carry soft tissue.

    status 0: no tissue can reach the node (no forward-skinned tissue within R, no rest tissue
    next to it): displacement 0. Otherwise start from the best of the identity, the inverse of
    the blended transform of the nearest forward-skinned tissue point (``src``/``Minv``); then
    fixed-point steps
    x <- M(x)^-1 y (halved when they do not improve). status 1: a pre-image (residual < tol
    or the best found, if under ``air_tol``); status 2: posed air: rest tissue here has moved
    away and nothing moved in, or the best pre-image misses the node by ``air_tol`` or more.
    The latter are nodes where skinning would stretch tissue across a gap that opens (between
    an abducted arm and the torso): there the steps do not converge, and the stretched tissue
    would be a web that is not in the patient."""
    nt = wn[0] * wn[1] * wn[2]
    nch = min(nt, 4096)
    for ch in prange(nch):  # noqa: F821 (prange: a global of the build namespace)
        m = np.empty((3, 4))  # one per chunk of points, not per point
        inverse_nodes(waff, wn, W, w_inv, D, near, src, Minv, iters, tol, air_tol, disp, res, status, m,
                      ch * nt // nch, (ch + 1) * nt // nch)


def border_mark(wn, status, disp, t2, a, b0, b1, c0, c1):
    """``air_border``'s first pass over the nodes (a, b0 .. b1 - 1, c0 .. c1 - 1): the unreached
    neighbours (status 0) of each solved node that moves by more than sqrt(t2) mm are marked 3 (the
    shared body: the CPU driver passes a node slab, the CUDA driver one node)."""
    n12 = wn[1] * wn[2]
    for b in range(b0, b1):
        for c in range(c0, c1):
            q = a * n12 + b * wn[2] + c
            if status[q] != 1:
                continue
            if not disp[q, 0] ** 2 + disp[q, 1] ** 2 + disp[q, 2] ** 2 > t2:
                continue
            for da in range(max(a - 1, 0), min(a + 2, wn[0])):
                for db in range(max(b - 1, 0), min(b + 2, wn[1])):
                    for dc in range(max(c - 1, 0), min(c + 2, wn[2])):
                        n = da * n12 + db * wn[2] + dc
                        if status[n] == 0:
                            status[n] = 3


def border_air(status, disp, n0, n1):
    """``air_border``'s second pass over nodes n0 .. n1 - 1: a marked node becomes air (status 2, NaN)."""
    for n in range(n0, n1):
        if status[n] == 3:
            status[n] = 2
            disp[n, 0] = np.nan
            disp[n, 1] = np.nan
            disp[n, 2] = np.nan


def air_border(wn, status, disp, thr):
    """Nodes left at zero displacement (no tissue can reach them) next to a solved node that
    moves by more than ``thr`` mm become air (NaN): interpolating between the two would sweep
    the cell's pre-images across the rest anatomy in between. Visits the few moving solved
    nodes and marks their unreached neighbours (a marked node is never read as a source)."""
    t2 = thr * thr
    for a in prange(wn[0]):  # noqa: F821 (prange: a global of the build namespace)
        border_mark(wn, status, disp, t2, a, 0, wn[1], 0, wn[2])
    border_air(status, disp, 0, wn[0] * wn[1] * wn[2])


# CUDA drivers of the posing bodies above: a thread per weight node, skinned point or warp node.
# The blended weight field arrives as its parts (the field's shape wa, wb, wc; P; S), packed here into
# the tuple that ``_blend`` reads.
def cuda_blend_field(Wp, Wc, Wv, D, P, S):
    n = cuda.grid(1)  # noqa: F821 (cuda: a global of the build namespace)
    if n < Wp.shape[0] - 1:
        blend_node(Wp, Wc, Wv, D, P, S, n)


def cuda_forward_blend(xs, wa, wb, wc, P, S, w_inv, D, ys, Minv):
    n = cuda.grid(1)  # noqa: F821
    if n < xs.shape[0]:
        m = cuda.local.array((3, 4), numba.float64)  # noqa: F821
        forward_points(xs, ((wa, wb, wc), P, S), w_inv, D, ys, Minv, m, n, n + 1)


def cuda_splat_nearest(ys, order, starts, g0, waff, ninv, wn, R, best, src):
    """``splat_nearest`` with a thread per node row (a, b): each writes its own nodes only."""
    p = cuda.grid(1)  # noqa: F821
    if p < wn[0] * wn[1]:
        a = p // wn[1]
        b = p - a * wn[1]
        splat_rows(ys, order, starts, g0, waff, ninv, wn, R, best, src, a, b, b)


def cuda_fill_nearest(best, src):
    """``best`` := inf, ``src`` := -1 (no point near yet), a thread per node."""
    n = cuda.grid(1)  # noqa: F821
    if n < best.shape[0]:
        best[n] = math.inf
        src[n] = -1


def cuda_inverse_lbs_nodes(waff, wn, wa, wb, wc, P, S, w_inv, D, near, src, Minv, iters, tol, air_tol, disp, res,
                           status):
    n = cuda.grid(1)  # noqa: F821
    if n < wn[0] * wn[1] * wn[2]:
        m = cuda.local.array((3, 4), numba.float64)  # noqa: F821
        inverse_nodes(waff, wn, ((wa, wb, wc), P, S), w_inv, D, near, src, Minv, iters, tol, air_tol, disp, res,
                      status, m, n, n + 1)


def cuda_border_mark(wn, status, disp, t2):
    """``air_border``'s first pass, a thread per node; threads that mark the same neighbour all
    write 3 over a 0, so the outcome does not depend on their order."""
    p = cuda.grid(1)  # noqa: F821
    n12 = wn[1] * wn[2]
    if p < wn[0] * n12:
        a = p // n12
        r = p - a * n12
        b = r // wn[2]
        c = r - b * wn[2]
        border_mark(wn, status, disp, t2, a, b, b + 1, c, c + 1)


def cuda_border_air(status, disp):
    n = cuda.grid(1)  # noqa: F821
    if n < status.shape[0]:
        border_air(status, disp, n, n + 1)


# Device-only steps of a pose on the GPU, so that per pose only the joint transforms go up and a few
# scalars come back (``_DevicePosing``): the skinned points' grid bounds, their slab order (a counting
# sort) and the warp's summary (``scene.info``), each equal to the host's computation bit for bit.
def cuda_point_bounds(ys, M, out):
    """out[0:3] = min, out[3:6] = max over the points of ``M @ ys`` (3x4, ``_points_bounds``'s
    arithmetic: the skinned points in CT index space); out starts at (+inf, -inf)."""
    n = cuda.grid(1)  # noqa: F821
    if n < ys.shape[0]:
        for r in range(3):
            v = ys[n, 0] * M[r, 0] + ys[n, 1] * M[r, 1] + ys[n, 2] * M[r, 2] + M[r, 3]
            cuda.atomic.min(out, r, v)  # noqa: F821
            cuda.atomic.max(out, 3 + r, v)  # noqa: F821


def cuda_fill_scalars(out, lo, hi, v0, v1):
    """out[lo:hi] = v0 and out[hi:] = v1 (one thread)."""
    if cuda.grid(1) == 0:  # noqa: F821
        for i in range(out.shape[0]):
            out[i] = v0 if (i >= lo and i < hi) else v1


def cuda_slab_keys(ys, ninv, nslab, chunk, g0, slab, counts):
    """Per chunk of ``chunk`` points (a thread each): every point's first node coordinate g0 and node
    slab (``_slab_order``'s arithmetic), and the chunk's count per slab (counts[c, :nslab])."""
    c = cuda.grid(1)  # noqa: F821
    n = ys.shape[0]
    if c * chunk < n:
        for j in range(nslab):
            counts[c, j] = 0
        for s in range(c * chunk, min((c + 1) * chunk, n)):
            g = ys[s, 0] * ninv[0, 0] + ys[s, 1] * ninv[0, 1] + ys[s, 2] * ninv[0, 2] + ninv[0, 3]
            g0[s] = g
            if g < 0.0:  # np.clip(np.floor(g), 0, nslab - 1)
                k = 0
            elif g >= nslab - 1:
                k = nslab - 1
            else:
                k = int(math.floor(g))
            slab[s] = k
            counts[c, k] += 1


def cuda_slab_scan(counts, nchunk, nslab, starts):
    """Per slab j (a thread each): counts[:, j] -> its exclusive running sum over the chunks, the
    slab's total in starts[j + 1] (``cuda_slab_starts`` then sums those up)."""
    j = cuda.grid(1)  # noqa: F821
    if j < nslab:
        run = 0
        for c in range(nchunk):
            t = counts[c, j]
            counts[c, j] = run
            run += t
        starts[j + 1] = run


def cuda_slab_starts(starts, nslab):
    """starts[0] = 0 and starts[j + 1] = the first position after slab j (one thread)."""
    if cuda.grid(1) == 0:  # noqa: F821
        starts[0] = 0
        for j in range(nslab):
            starts[j + 1] += starts[j]


def cuda_slab_scatter(slab, chunk, counts, starts, order):
    """Per chunk (a thread each, its points in index order): each point goes to the next place of its
    slab after the earlier chunks' points of that slab: the points by slab, in index order within a
    slab (numpy's stable argsort of the slabs)."""
    c = cuda.grid(1)  # noqa: F821
    n = slab.shape[0]
    if c * chunk < n:
        for s in range(c * chunk, min((c + 1) * chunk, n)):
            k = slab[s]
            order[starts[k] + counts[c, k]] = s
            counts[c, k] += 1


def cuda_warp_summary(status, res, out):
    """The warp's summary by atomics: out[0] solved nodes, out[1] air nodes, out[2] solved nodes with a
    residual above 0.5 mm, out[3] the largest solved residual (out starts at 0)."""
    n = cuda.grid(1)  # noqa: F821
    if n < status.shape[0]:
        st = status[n]
        if st == 1:
            cuda.atomic.add(out, 0, 1.0)  # noqa: F821
            cuda.atomic.max(out, 3, res[n])  # noqa: F821
            if res[n] > 0.5:
                cuda.atomic.add(out, 2, 1.0)  # noqa: F821
        elif st == 2:
            cuda.atomic.add(out, 1, 1.0)  # noqa: F821


def cuda_select_hist(status, keys, sel, shift, hist):
    """One pass of the radix select of a solved residual's rank (``cuda_select_pick``): the solved
    nodes whose residual's bits (``keys``: the float64 bits as int64, ordered as the non-negative
    residuals) above ``shift + 8`` equal the selection's so far, counted by their 8 bits at ``shift``."""
    n = cuda.grid(1)  # noqa: F821
    if n < status.shape[0] and status[n] == 1:
        k = keys[n]
        if shift == 56 or (k >> (shift + 8)) == (sel[0] >> (shift + 8)):
            cuda.atomic.add(hist, (k >> shift) & 255, 1)  # noqa: F821


def cuda_select_pick(hist, sel, shift):
    """One thread: the 8-bit digit at ``shift`` of the element of rank sel[1] among those counted in
    ``hist`` (sel[0] |= digit << shift, sel[1] -= the elements of smaller digits, sel[2] = the
    count of the chosen digit); ``hist`` back to zero."""
    if cuda.grid(1) == 0:  # noqa: F821
        cum = 0
        done = False
        for d in range(256):
            c = hist[d]
            hist[d] = 0
            if not done and cum + c > sel[1]:
                sel[0] |= d << shift
                sel[1] -= cum
                sel[2] = c
                done = True
            cum += c


def cuda_select_init(out, q, sel):
    """One thread: the ranks that ``numpy.percentile(solved, 100 q)`` interpolates between (numpy's
    'linear' method: virtual index (n - 1) q), n = out[0]: sel[1] = floor((n - 1) q), sel[0] = 0."""
    if cuda.grid(1) == 0:  # noqa: F821
        n = out[0]
        sel[0] = 0
        sel[1] = int(math.floor((n - 1.0) * q)) if n > 0 else 0
        sel[2] = 0


def cuda_select_next(status, res, keys, sel, out):
    """After the select: out[4] = the selected residual, out[5] = the next one in order (the same
    value when the selected one repeats, else the smallest larger solved residual, atomics)."""
    n = cuda.grid(1)  # noqa: F821
    if n < status.shape[0] and status[n] == 1:
        k = keys[n]
        if k == sel[0]:
            out[4] = res[n]
            if sel[1] + 1 < sel[2]:
                out[5] = res[n]
        elif k > sel[0]:
            cuda.atomic.min(out, 5, res[n])  # noqa: F821


# the per-element bodies that the CUDA drivers share with the CPU ones (device functions there)
_POSING_SHARED = ("_clampf", "_blend", "_resid", "blend_node", "forward_points", "splat_rows", "inverse_nodes",
                  "border_mark", "border_air")
_POSING_CUDA = ("cuda_blend_field", "cuda_forward_blend", "cuda_fill_nearest", "cuda_splat_nearest",
                "cuda_inverse_lbs_nodes", "cuda_border_mark", "cuda_border_air", "cuda_point_bounds",
                "cuda_fill_scalars", "cuda_slab_keys", "cuda_slab_scan", "cuda_slab_starts", "cuda_slab_scatter",
                "cuda_warp_summary", "cuda_select_init", "cuda_select_hist", "cuda_select_pick", "cuda_select_next")


# (function, numba.njit options besides cache=True), compiled by _kernels()
_KERNEL_DEFS = (
    ("claims", {"inline": "always"}),
    ("lerp3", {"inline": "always"}),
    ("_clampf", {"inline": "always"}),
    ("_tri_flat", {}),
    ("_tri3", {}),
    ("sample_points", {"parallel": True}),
    # not inlined: inlining _blend and _resid makes inverse_lbs_nodes ~25 % faster (no reference
    # counts on the weight arrays per call) but its first compilation 5x slower (49 s against 9 s of
    # CPU on the 2-core machine), paid on every fresh install and CI run
    ("_blend", {}),
    ("blend_node", {"inline": "always"}),
    ("blend_field", {"parallel": True}),
    ("_resid", {}),
    ("forward_lbs_kernel", {"parallel": True}),
    ("forward_points", {}),
    ("forward_blend", {"parallel": True}),
    ("splat_rows", {"inline": "always"}),
    ("splat_nearest", {"parallel": True}),
    ("inverse_nodes", {}),
    ("inverse_lbs_nodes", {"parallel": True}),
    ("border_mark", {}),
    ("border_air", {}),
    ("air_border", {}),  # serial: 15 ms against 31 ms parallel (2 loops) on the loaded 2-core machine
)


_KERNELS = None


def _kernels():
    """The numba kernels above, compiled lazily (the CLI must not import numba for --help).

    Each is re-created over one namespace dict ``ns`` (the module globals plus ``prange``) in which
    the other kernels are the compiled dispatchers, as globals: no closure cells, so numba's cache
    index key is the same in every process and the compiled code is loaded from disk."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import numba

    opts = dict(_KERNEL_DEFS)
    ns = compile_shared(globals(), opts, lambda f: numba.njit(f, cache=True, **opts[f.__name__]),
                        {"prange": numba.prange})
    _KERNELS = {"sample_points": ns["sample_points"], "forward_lbs": ns["forward_lbs_kernel"],
                "blend_field": ns["blend_field"], "forward_blend": ns["forward_blend"],
                "splat_nearest": ns["splat_nearest"], "inverse_lbs_nodes": ns["inverse_lbs_nodes"],
                "air_border": ns["air_border"]}
    return _KERNELS


def posing_cuda_namespace(decorate, extra: dict) -> dict:
    """The posing bodies compiled with ``decorate`` (CUDA device functions) in a fresh namespace."""
    return compile_shared(globals(), _POSING_SHARED, decorate, extra)


_POSING_GPU = None


def posing_cuda_kernels() -> dict:
    """{'blend_field', 'forward_blend', 'splat_nearest', 'inverse_lbs_nodes', 'border_mark', 'border_air'}: the CUDA
    posing kernels, built from the same bodies as the CPU ones (compiled lazily)."""
    global _POSING_GPU
    if _POSING_GPU is None:
        import numba
        from numba import cuda

        ns = posing_cuda_namespace(lambda f: cuda.jit(device=True)(f), {"cuda": cuda, "numba": numba})
        _POSING_GPU = {name[len("cuda_"):]: cuda.jit(types.FunctionType(globals()[name].__code__, ns, name))
                       for name in _POSING_CUDA}
    return _POSING_GPU


# --------------------------------------------------------------------------------------------
# Posing
# --------------------------------------------------------------------------------------------


def sample_scene(scene: Scene, points) -> np.ndarray:
    """HU (float32) of a scene at world points (N, 3) by the composition rule (float64 trilinear
    inside each volume; the warp displacement trilinear, zero outside its grid)."""
    pts = np.ascontiguousarray(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    res = scene.resident
    if "sample_base" not in res:
        soft = scene.base_data()
        if not (soft.dtype == np.int16 or soft.dtype == np.float32):
            soft = soft.astype(np.int16 if np.issubdtype(soft.dtype, np.integer)
                               and soft.min() >= -32768 and soft.max() <= 32767 else np.float32)
        res["sample_base"] = np.ascontiguousarray(soft)
        res["sample_parts"] = _pack_parts(scene.parts)
    if scene.warp is not None:
        warp = np.ascontiguousarray(scene.warp[0], dtype=np.float32)
        winv, has = np.ascontiguousarray(np.linalg.inv(scene.warp[1])[:3]), True
    else:
        warp, winv, has = np.zeros((1, 1, 1, 3), np.float32), np.eye(4)[:3].copy(), False
    inv = (np.ascontiguousarray(np.stack([np.linalg.inv(p.affine)[:3] for p in scene.parts]))
           if scene.parts else np.zeros((0, 3, 4)))
    out = np.empty(len(pts), np.float64)
    _kernels()["sample_points"](pts, res["sample_base"], np.ascontiguousarray(np.linalg.inv(scene.base.affine)[:3]),
                                warp, winv, has, *res["sample_parts"], inv, out)
    return out.astype(np.float32)


def _pack_parts(parts):
    """The parts' voxels and masks concatenated, with each one's offset and shape."""
    if not parts:
        return (np.zeros(1, np.int16), np.zeros(1, np.uint8), np.zeros(0, np.int64),
                np.zeros((0, 3), np.int64))
    hu = np.concatenate([p.data.ravel() for p in parts]).astype(np.int16)
    mask = np.concatenate([p.mask.ravel() for p in parts]).astype(np.uint8)
    sizes = np.array([p.data.size for p in parts], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    shp = np.array([p.data.shape for p in parts], dtype=np.int64)
    return hu, mask, off, shp


def _moved_joints(D, tol=1e-9) -> np.ndarray:
    """Per transform of the stack D (n, 4, 4): whether it differs from the identity by more than
    ``tol`` in some entry (a NaN counts as moved)."""
    return ~(np.abs(np.asarray(D, np.float64) - np.eye(4)).max(axis=(1, 2)) <= tol)


def posed_scene(art: ArticulatedCT, bone_deltas: dict | None = None, joint_deltas=None, *,
                warp_spacing_mm: float = 6.0, iterations: int = 12, tol_mm: float = 0.05,
                air_miss_mm: float | None = None, device: str = "cpu") -> Scene:
    """Pose an articulated CT: a ``core.drr.projector.Scene`` (base = the soft tissue, parts = the rigid
    parts placed for this pose, compose=True) that shares the resident arrays of every other frame
    posed from ``art``.

    ``bone_deltas``: {label name or rig bone name: 4x4 world transform rest -> posed}.
    ``joint_deltas``: (24, 4, 4) D_j for the soft tissue (and for bones missing from
    ``bone_deltas``). Missing everything = identity. Static parts never move.

    The scene's ``grid`` is the CT lattice extended (in whole 8-voxel blocks) to hold the posed
    content; the inverse warp lives on the same lattice (every ``warp_spacing_mm`` / voxel spacing
    voxels, rounded), covering that grid. A warp node whose best pre-image misses it by
    ``air_miss_mm`` or more (default ``AIR_MISS_NODES`` node spacings) is posed air.

    ``device="cuda"`` (or ``"auto"`` where a GPU is usable): the posing kernels run on the GPU
    (``posing_cuda_kernels``; the weight field, the tissue points and the work arrays stay there), the
    same warp and ``info`` as on the CPU up to the GPU's rounding. Per pose the joint transforms go up
    and a few scalars come back (the skinned points' bounds, the warp's summary); the displacement grid
    stays on the device (``scene.warp[0]`` is a ``core.drr.projector.OnDevice``, which
    ``compose_scene(scene, "cuda")`` reads in place and which is copied to the host only if read there).
    """
    device = resolve_device(device)  # "auto": the GPU where one is usable
    if air_miss_mm is not None and not float(air_miss_mm) > 0:
        raise CtwinError(f"air_miss_mm must be positive, got {air_miss_mm}")
    bone_deltas = dict(bone_deltas or {})
    jd = None if joint_deltas is None else np.asarray(joint_deltas, dtype=np.float64).reshape(N_JOINTS, 4, 4)
    geo = _parts_geometry(art)
    eye = geo["eye"]
    ds = []
    for p in art.parts:
        d = eye
        if p.kind == "bone":
            if p.name in bone_deltas:
                d = bone_deltas[p.name]
            elif p.bone is not None and p.bone in bone_deltas:
                d = bone_deltas[p.bone]
            elif jd is not None and p.joint >= 0:
                d = jd[p.joint]
        ds.append(d)
    lo, hi = np.zeros(3), np.asarray(art.shape, np.float64) - 1.0
    parts = []
    if ds:
        Ds = np.array(ds, dtype=np.float64).reshape(-1, 4, 4)
        moved = _moved_joints(Ds)
        placed = np.matmul(Ds, geo["affines"])  # each part's d @ affine (PlacedVolume.moved), in one call
        for i, p in enumerate(art.parts):  # a frame's own objects (set_frame)
            parts.append(PlacedVolume(p.data, p.mask, placed[i], p.name, p.kind, p.bone, p.joint)
                         if moved[i] else replace(p))
        sel = moved & geo["has_box"]
        if sel.any():  # the moved parts' content boxes in CT index space, all at once
            M = np.matmul(np.matmul(geo["ct_inv"], Ds[sel]), geo["affines"][sel])
            q = np.matmul(geo["corners"][sel], np.swapaxes(M[:, :3, :3], 1, 2)) + M[:, None, :3, 3]
            lo = np.minimum(lo, q.min(axis=(0, 1)))
            hi = np.maximum(hi, q.max(axis=(0, 1)))
    res = art._cache.setdefault("scene_resident", {})
    if "base" not in res:
        res["base"] = Volume(np.ascontiguousarray(art.soft), art.affine.copy())
        res["warp_base"] = _warp_base(art)
    scene = Scene(res["base"], parts, compose=True, warp_base=res["warp_base"], info={"warp": "none"},
                  source=art, resident=res)
    D = None if jd is None or art.weights.shape[-1] == 0 else jd[art.weight_joints]
    if D is None or not _moved_joints(D).any():
        scene.grid = _grid(art, lo, hi)
        return scene
    warp, waff, grid, info = _inverse_warp_grid(art, D, warp_spacing_mm, iterations, tol_mm, lo, hi, air_miss_mm,
                                                device)
    scene.warp, scene.grid = (warp, waff), grid
    scene.info = info
    return scene


def _warp_base(art: ArticulatedCT):
    """What the warp pulls: the soft tissue without the static parts' edge voxels (kept in the soft
    tissue for exactness at rest), so that a table's edge does not travel with the tissue on it;
    None when there is no static part."""
    wb = None
    for p in art.parts:
        if p.kind == "static":
            if wb is None:
                wb = np.array(art.soft, dtype=np.int16, copy=True)
            t = p.offset_on(art.affine)
            sl = tuple(slice(int(a), int(a) + n) for a, n in zip(t, p.mask.shape))
            wb[sl][p.mask > 0] = AIR_HU
    return wb


def _grid(art, lo, hi):
    return _grid_from_bounds(lo, hi, np.asarray(art.shape, np.int64))


def _part_content_box(art, p):
    """Index box (lo, hi) of a part's masked non-air voxels (cached per ArticulatedCT)."""
    boxes = art._cache.setdefault("part_boxes", {})
    if p.name not in boxes:
        m = (p.mask > 0) & (p.data > -900)
        if m.any():
            idx = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
            boxes[p.name] = (np.array([v[0] for v in idx], np.float64), np.array([v[-1] for v in idx], np.float64))
        else:
            boxes[p.name] = None
    return boxes[p.name]


def _parts_geometry(art: ArticulatedCT) -> dict:
    """Pose-independent arrays of the parts (cached per ArticulatedCT): their acquisition affines
    stacked (n, 4, 4), the CT's world -> index map, and the 8 corners of each part's content cell box
    (``_part_content_box``, the centres' box grown by half a voxel; zeros where a part has no content)
    with a flag for the parts that have one. ``posed_scene`` places every part and bounds the moved
    ones with a few stacked products instead of a loop of small ones."""
    geo = art._cache.get("parts_geometry")
    if geo is None:
        n = len(art.parts)
        corners = np.zeros((n, 8, 3))
        has = np.zeros(n, bool)
        for i, p in enumerate(art.parts):
            cb = _part_content_box(art, p)
            if cb is not None:
                corners[i] = cell_box_corners(*cb)
                has[i] = True
        geo = {"affines": np.array([np.asarray(p.affine, np.float64) for p in art.parts]).reshape(n, 4, 4),
               "ct_inv": invert_affine(art.affine), "corners": corners, "has_box": has, "eye": np.eye(4)}
        art._cache["parts_geometry"] = geo
    return geo


def _sparse_weights(art: ArticulatedCT) -> tuple:
    """The weight field as (shape, row pointers, channels, weights) (cached): a blend reads only a
    node's non-zero channels."""
    w = art._cache.get("sparse_weights")
    if w is None:
        W = np.asarray(art.weights)
        flat = W.reshape(-1, W.shape[-1])
        nzr, nzc = np.nonzero(flat > 0)
        ptr = np.zeros(len(flat) + 1, np.int64)
        np.cumsum(np.bincount(nzr, minlength=len(flat)), out=ptr[1:])
        w = (np.asarray(W.shape[:3], np.int64), ptr, nzc.astype(np.int64),
             flat[nzr, nzc].astype(np.float64))
        art._cache["sparse_weights"] = w
    return w


def _blended_weights(art: ArticulatedCT, D3) -> tuple:
    """The weight field blended with the pose's (n, 3, 4) transforms ``D3`` per weight node, as
    ``_blend`` reads it: (shape, P (nodes, 12), S (nodes,)). The arrays are reused across poses."""
    shape, ptr, chan, wts = _sparse_weights(art)
    n = len(ptr) - 1
    buf = art._cache.get("blend_field")
    if buf is None or buf[0].shape[0] != n:
        buf = (np.empty((n, 12)), np.empty(n))
        art._cache["blend_field"] = buf
    _kernels()["blend_field"](ptr, chan, wts, np.ascontiguousarray(D3, dtype=np.float64), buf[0], buf[1])
    return shape, buf[0], buf[1]


def _warp_prep(art: ArticulatedCT) -> dict:
    """Pose-independent inputs of the inverse warp (cached): the weight cells that hold soft tissue,
    their centres and channels, and the tissue cells dilated by one cell."""
    prep = art._cache.get("warp_prep")
    if prep is None:
        W = _sparse_weights(art)
        fac = np.maximum(np.rint(np.linalg.norm(art.weight_affine[:3, :3], axis=0)
                                 / np.linalg.norm(art.affine[:3, :3], axis=0)).astype(int), 1)
        wshape = art.weights.shape[:3]
        occ = np.zeros(wshape, bool)
        pooled = _pool_any(art.soft > -900, fac)[: wshape[0], : wshape[1], : wshape[2]]
        occ[: pooled.shape[0], : pooled.shape[1], : pooled.shape[2]] = pooled
        idx = np.argwhere(occ)
        prep = {"W": W, "w_inv": np.ascontiguousarray(np.linalg.inv(art.weight_affine)[:3]),
                "occ": occ,
                "centres": np.ascontiguousarray(apply_transform(art.weight_affine, idx)),
                "chan": art.weights[tuple(idx.T)] > 0, "fac": fac}
        art._cache["warp_prep"] = prep
    return prep


def _points_bounds(M, pts) -> tuple:
    """(min, max) per axis of the points ``pts`` (N, 3) mapped by the 4x4 ``M``, without BLAS:
    numpy's OpenBLAS threads collide with numba's workers right after a parallel kernel
    (``core.volumes.volume.invert_affine``; a matrix product measured 3-38 ms for 115,000 points on
    the loaded 2-core machine). Each axis's coordinates are computed into one contiguous array and
    reduced there."""
    M = np.asarray(M, np.float64)
    lo, hi = np.empty(3), np.empty(3)
    for r in range(3):
        v = pts[:, 0] * M[r, 0] + pts[:, 1] * M[r, 1] + pts[:, 2] * M[r, 2] + M[r, 3]
        lo[r], hi[r] = v.min(), v.max()
    return lo, hi


def _tissue_points(prep: dict, moved) -> tuple:
    """The tissue weight cells that the moved joints drive (a flag per tissue cell) and their centres,
    cached for the last set of moved joints (a sequence of poses moves the same joints)."""
    key = np.asarray(moved, bool).tobytes()
    hit = prep.get("tissue_points")
    if hit is None or hit[0] != key:
        sel = prep["chan"][:, moved].any(axis=1)
        hit = (key, sel, np.ascontiguousarray(prep["centres"][sel]))
        prep["tissue_points"] = hit
    return hit[1], hit[2]


def _point_buffers(art: ArticulatedCT, n: int) -> tuple:
    """The skinned points (n, 3) and their blended transforms' inverses (n, 3, 4), reused across
    poses (cached): a pose reads them only while it is posed (the scene keeps neither)."""
    buf = art._cache.get("point_buffers")
    if buf is None or len(buf[0]) != n:
        buf = (np.empty((n, 3)), np.empty((n, 3, 4)))
        art._cache["point_buffers"] = buf
    return buf


def _node_buffers(art: ArticulatedCT, n: int) -> tuple:
    """Per-node work arrays of the inverse warp (nearest distance, source point, residual, status),
    reused across poses (cached, 25 % slack): fresh memory costs a page fault per 4 KiB on first
    touch, about 5 ms a pose for the phantom's 1.2 M nodes on the 2-core machine."""
    buf = art._cache.get("node_buffers")
    if buf is None or len(buf[0]) < n:
        m = int(n * 1.25)
        buf = (np.empty(m), np.empty(m, np.int64), np.empty(m), np.empty(m, np.int8))
        art._cache["node_buffers"] = buf
    return tuple(b[:n] for b in buf)


class _DevicePosing:
    """The posing kernels of one pose on the GPU (``posing_cuda_kernels``), for ``_inverse_warp_grid``.

    Resident in ``art._cache["posing_device"]`` across poses: the sparse weight field, the blended
    field's buffers, the tissue points of the last set of moved joints, the CT's world -> index map,
    the dilated rest tissue, the per-node work arrays and the slab sort's buffers (25 % slack). Per
    pose the joint transforms go up (n x 3 x 4 float64), then the grid's two 3 x 4 maps (192 B) and
    shape (24 B) once the host has sized it; back come the skinned points' index bounds (6 float64,
    48 B: the host sizes the grid from them) and the warp's summary (6 float64, 48 B). The skinned
    points, their slab order and the displacement grid stay on the device (the grid as an
    ``OnDevice``, read in place by ``compose_scene(scene, "cuda")``)."""

    CHUNK = 256  # points per thread of the slab sort

    def __init__(self, art, prep, D3, moved, sel):
        from numba import cuda

        self.cuda, self.k = cuda, posing_cuda_kernels()
        self.res = art._cache.setdefault("posing_device", {})
        r = self.res
        if "W" not in r:
            shape, ptr, chan, wts = prep["W"]
            r["W"] = (tuple(int(v) for v in shape), cuda.to_device(ptr), cuda.to_device(chan), cuda.to_device(wts))
            n = len(ptr) - 1
            r["P"], r["S"] = cuda.device_array((n, 12)), cuda.device_array(n)
            r["w_inv"] = cuda.to_device(prep["w_inv"])
            r["ct_inv"] = cuda.to_device(np.ascontiguousarray(invert_affine(art.affine)[:3]))
            r["Minv0"] = cuda.device_array((1, 3, 4))  # read by no node when no point moved
            _device_scratch(self.k, r)
        self.D = cuda.to_device(D3)
        shape, ptr, chan, wts = r["W"]
        _launch_posing(self.k["blend_field"], len(ptr) - 1, ptr, chan, wts, self.D, r["P"], r["S"])
        key = moved.tobytes()
        if r.get("xs_key") != key:  # the tissue points of this set of moved joints
            r["xs"] = cuda.to_device(np.ascontiguousarray(prep["centres"][sel]))
            r["xs_key"] = key

    def forward_bounds(self):
        """Skin the tissue points forward; their bounds in CT index space ((3,), (3,)), or None when
        there are none."""
        r = self.res
        n = r["xs"].shape[0]
        self.n = n
        if n == 0:
            return None
        if r.get("points", 0) < n:
            m = int(n * 1.25)
            r["points"] = m
            r["ys"], r["Minv"] = self.cuda.device_array((m, 3)), self.cuda.device_array((m, 3, 4))
        self.ys, self.Minv = r["ys"][:n], r["Minv"][:n]
        _launch_posing(self.k["forward_blend"], n, r["xs"], *r["W"][0], r["P"], r["S"], r["w_inv"], self.D, self.ys,
                       self.Minv)
        out = r["scalars"]
        self.k["fill_scalars"][1, 1](out, 0, 3, math.inf, -math.inf)
        _launch_posing(self.k["point_bounds"], n, self.ys, r["ct_inv"], out)
        b = out.copy_to_host()
        return b[:3], b[3:]

    def nearest(self, waff, wn, R):
        cuda, r = self.cuda, self.res
        N = int(np.prod(wn))
        if r.get("nodes", 0) < N:
            m = int(N * 1.25)
            r["nodes"] = m
            r["best"], r["src"] = cuda.device_array(m), cuda.device_array(m, np.int64)
            r["resid"], r["status"] = cuda.device_array(m), cuda.device_array(m, np.int8)
        self.best, self.src = r["best"][:N], r["src"][:N]
        _launch_posing(self.k["fill_nearest"], N, self.best, self.src)
        ninv = invert_affine(waff)[:3]
        maps = cuda.to_device(np.concatenate([np.ravel(waff[:3]), np.ravel(ninv)]).astype(np.float64))
        self.waff, ninv_d = maps[:12].reshape(3, 4), maps[12:].reshape(3, 4)
        self.wn = cuda.to_device(np.asarray(wn, np.int64))
        if self.n:
            order, starts, g0 = _device_slab_order(self.k, r, self.ys, ninv_d, int(wn[0]), self.CHUNK)
            _launch_posing(self.k["splat_nearest"], int(wn[0] * wn[1]), self.ys, order, starts, g0, self.waff, ninv_d,
                           self.wn, float(R), self.best, self.src)

    def inverse(self, waff, wn, near, kn, iterations, tol, air_tol, thr):
        """Inverse skinning and the air border: (the displacement grid as an ``OnDevice`` (N, 3), the
        summary from ``_device_summary``)."""
        cuda, r = self.cuda, self.res
        N = int(np.prod(wn))
        if r.get("near_key") != kn:
            r["near"], r["near_key"] = cuda.to_device(near), kn
        disp = cuda.device_array((N, 3), np.float32)  # fresh: the scene keeps it
        resid, status = r["resid"][:N], r["status"][:N]
        _launch_posing(self.k["inverse_lbs_nodes"], N, self.waff, self.wn, *r["W"][0], r["P"], r["S"], r["w_inv"],
                       self.D, r["near"], self.src, self.Minv if self.n else r["Minv0"],
                       int(iterations), float(tol), float(air_tol), disp, resid, status)
        _launch_posing(self.k["border_mark"], N, self.wn, status, disp, thr * thr)
        _launch_posing(self.k["border_air"], N, status, disp)
        return OnDevice(disp), _device_summary(self.k, r, status, resid)


def _device_scratch(k, r) -> None:
    """The few scalars a pose on the device brings back, and the radix select's work arrays."""
    from numba import cuda

    if "scalars" not in r:
        r["scalars"] = cuda.device_array(6)  # the points' bounds, then the warp's summary
        r["sel"] = cuda.device_array(3, np.int64)
        r["hist"] = cuda.device_array(256, np.int64)
        k["fill_scalars"][1, 1](r["hist"], 0, 0, 0, 0)


def _device_slab_order(k, r, ys, ninv_d, nslab: int, chunk: int) -> tuple:
    """``_slab_order`` on the device for the points ``ys`` (device, (n, 3)) and the grid's world ->
    index map ``ninv_d`` (device 3x4): (order, starts, g0) as device arrays, equal to the host's. A
    stable counting sort: per chunk of ``chunk`` points its count per slab, per slab the running sum
    over the chunks, the slabs' starts, then each chunk places its points in index order. Its
    buffers (in ``r``) are kept across poses, with 25 % slack."""
    from numba import cuda

    n = ys.shape[0]
    if r.get("points_sort", 0) < n:
        m = int(n * 1.25) + 1
        r["points_sort"] = m
        r["g0"], r["slab"], r["order"] = cuda.device_array(m), cuda.device_array(m, np.int64), \
            cuda.device_array(m, np.int64)
    nchunk = -(-n // chunk)
    cnt = r.get("counts")
    if cnt is None or cnt.shape[0] < nchunk or cnt.shape[1] < nslab:
        cnt = cuda.device_array((int(nchunk * 1.25) + 1, int(nslab * 1.25) + 1), np.int64)
        r["counts"] = cnt
    if r.get("nstarts", 0) < nslab + 1:
        r["nstarts"] = int(nslab * 1.25) + 2
        r["starts"] = cuda.device_array(r["nstarts"], np.int64)
    g0, slab, order, starts = r["g0"][:n], r["slab"][:n], r["order"][:n], r["starts"][:nslab + 1]
    _launch_posing(k["slab_keys"], nchunk, ys, ninv_d, nslab, chunk, g0, slab, cnt)
    _launch_posing(k["slab_scan"], nslab, cnt, nchunk, nslab, starts)
    k["slab_starts"][1, 1](starts, nslab)
    _launch_posing(k["slab_scatter"], nchunk, slab, chunk, cnt, starts, order)
    return order, starts, g0


def _device_summary(k, r, status, resid) -> np.ndarray:
    """The warp's summary from the device's per-node status and residuals, by reductions: 6 float64
    come back (solved, air and unconverged node counts, the largest solved residual, and the solved
    residuals at rank floor((n - 1) 0.99) and the next, for ``_percentile_from_ranks``)."""
    _device_scratch(k, r)
    N = status.shape[0]
    out, sel, hist = r["scalars"], r["sel"], r["hist"]
    k["fill_scalars"][1, 1](out, 5, 6, math.inf, 0.0)
    _launch_posing(k["warp_summary"], N, status, resid, out)
    keys = resid.view(np.int64)  # the residuals (>= 0) as their bits: the same order
    k["select_init"][1, 1](out, 0.99, sel)
    for shift in range(56, -1, -8):  # the rank's residual, 8 bits a pass from the top
        _launch_posing(k["select_hist"], N, status, keys, sel, shift, hist)
        k["select_pick"][1, 1](hist, sel, shift)
    _launch_posing(k["select_next"], N, status, resid, keys, sel, out)
    return out.copy_to_host()


def _launch_posing(kernel, n: int, *args) -> None:
    """``kernel`` over n threads (blocks of 128); nothing when n is 0."""
    if n > 0:
        kernel[(n + 127) // 128, 128](*args)


def _slab_order(ys, waff, wn) -> tuple:
    """``splat_nearest``'s inputs besides the points: the grid's world -> index map (3x4), the points'
    first node coordinate g0, their order by node slab and each slab's start in it."""
    ninv = np.ascontiguousarray(invert_affine(waff)[:3])
    g0 = ys[:, 0] * ninv[0, 0] + ys[:, 1] * ninv[0, 1] + ys[:, 2] * ninv[0, 2] + ninv[0, 3]
    slab = np.clip(np.floor(g0), 0, wn[0] - 1).astype(np.int64)
    # a stable sort of 16-bit keys is numpy's radix sort: 0.5 ms for 115,000 points against 3.9 ms
    order = np.argsort(slab.astype(np.int16) if wn[0] < 32768 else slab, kind="stable")
    starts = np.zeros(int(wn[0]) + 1, np.int64)
    np.cumsum(np.bincount(slab, minlength=int(wn[0])), out=starts[1:])
    return ninv, g0, order, starts


def _nearest_points(ys, waff, wn, R, best, src) -> None:
    """For every node of the grid ``waff`` (index -> world, shape ``wn``) within R mm of a point
    ys[s]: the nearest s (``src``) and its squared distance (``best``); nodes that no point reaches
    keep their values (inf / -1 on entry). Of equally near points the one with the smallest first
    node coordinate, then the smallest s (``splat_nearest``, parallel over node slabs)."""
    ninv, g0, order, starts = _slab_order(ys, waff, wn)
    _kernels()["splat_nearest"](np.ascontiguousarray(ys, dtype=np.float64), order, starts, g0,
                                np.ascontiguousarray(waff[:3]), ninv, np.asarray(wn, np.int64), float(R), best, src)


def _inverse_warp_grid(art: ArticulatedCT, D, spacing, iterations, tol, lo, hi, air_miss=None, device="cpu"):
    """Displacement x - y (mm) on a CT-lattice grid covering the posed content.

    The tissue weight cells that a moved joint drives are skinned forward (their centres); the grid
    covers their images and the CT. Each node within R of such an image starts from the inverse of
    that image's blended transform; nodes whose rest tissue moved away with nothing moving in get
    NaN (air); nodes that no tissue can reach keep 0. ``device="cuda"``: the kernels run on the GPU
    (``_DevicePosing``)."""
    prep = _warp_prep(art)
    k = _kernels()
    moved = _moved_joints(D)
    sel, xs = _tissue_points(prep, moved)
    D3 = np.ascontiguousarray(D[:, :3], dtype=np.float64)
    gpu = _DevicePosing(art, prep, D3, moved, sel) if device == "cuda" else None
    if gpu is None:
        Wb = _blended_weights(art, D3)
        ys, Minv = _point_buffers(art, len(xs))
        if len(xs):
            k["forward_blend"](xs, Wb, prep["w_inv"], D3, ys, Minv)
            bounds = _points_bounds(_parts_geometry(art)["ct_inv"], ys)
        else:
            bounds = None
    else:
        bounds = gpu.forward_bounds()  # the skinned points stay on the device
    wsp = np.linalg.norm(art.weight_affine[:3, :3], axis=0)
    if bounds is not None:
        lo = np.minimum(lo, bounds[0] - prep["fac"])
        hi = np.maximum(hi, bounds[1] + prep["fac"])
    i0, shape = _grid(art, lo, hi)
    vsp = np.linalg.norm(art.affine[:3, :3], axis=0)
    f = np.maximum(np.rint(spacing / vsp).astype(np.int64), 1)
    wn = np.maximum(-(-(shape - 1) // f) + 1, 2)
    t = np.eye(4)
    t[:3, :3] = np.diag(f.astype(np.float64))
    t[:3, 3] = i0
    waff = art.affine @ t
    N = int(np.prod(wn))
    if gpu is None:
        best, src, res, status = _node_buffers(art, N)
        best.fill(np.inf)
        src.fill(-1)
    node_sp = vsp * f
    air_tol = AIR_MISS_NODES * float(node_sp.max()) if air_miss is None else float(air_miss)
    R = float(np.sqrt(3.0) * (node_sp.max() + 0.5 * wsp.max()))
    if gpu is not None:
        gpu.nearest(waff, wn, R)
    elif len(ys):
        _nearest_points(ys, waff, wn, R, best, src)
    # rest tissue within a node cell's diagonal of the node (in weight cells)
    kn = int(np.ceil(np.sqrt(3.0) * node_sp.max() / wsp.min()))
    near = prep.get(("near", kn))
    if near is None:
        from scipy import ndimage

        near = np.ascontiguousarray(ndimage.binary_dilation(prep["occ"], np.ones((3, 3, 3), bool),
                                                            iterations=kn).astype(np.uint8))
        prep[("near", kn)] = near
    info = {"warp": "inverse_lbs", "warp_shape": [int(v) for v in wn],
            "warp_spacing_mm": [float(v) for v in node_sp]}
    if gpu is None:
        disp = np.empty((N, 3), np.float32)  # fresh: the scene keeps it (composed frames are keyed by it)
        k["inverse_lbs_nodes"](np.ascontiguousarray(waff[:3]), wn, Wb, prep["w_inv"], D3, near, src,
                               Minv, iterations, tol, air_tol, disp, res, status)
        k["air_border"](wn, status, disp, float(0.5 * node_sp.min()))
        warp = disp.reshape(tuple(wn) + (3,))
        solved = res[status == 1]
        info.update({"solved_nodes": int(len(solved)), "air_nodes": int(np.sum(status == 2)), "air_miss_mm": air_tol,
                     "residual_mm_p99": float(np.percentile(solved, 99)) if len(solved) else 0.0,
                     "residual_mm_max": float(solved.max()) if len(solved) else 0.0,
                     "unconverged_fraction": float(np.mean(solved > 0.5)) if len(solved) else 0.0})
    else:
        disp, sm = gpu.inverse(waff, wn, near, kn, iterations, tol, air_tol, float(0.5 * node_sp.min()))
        warp = OnDevice(disp.device, tuple(wn) + (3,))  # read on the host only if asked
        ns = int(sm[0])
        info.update({"solved_nodes": ns, "air_nodes": int(sm[1]), "air_miss_mm": air_tol,
                     "residual_mm_p99": _percentile_from_ranks(ns, 0.99, sm[4], sm[5]) if ns else 0.0,
                     "residual_mm_max": float(sm[3]) if ns else 0.0,
                     "unconverged_fraction": float(sm[2] / ns) if ns else 0.0})
    return warp, waff, (i0, shape), info


def _percentile_from_ranks(n: int, q: float, a: float, b: float) -> float:
    """``numpy.percentile(x, 100 q)`` (method 'linear') of n values from its two order statistics:
    a at rank floor((n - 1) q) and b at the next rank (numpy's interpolation, ``numpy.lib
    .function_base._lerp``)."""
    vi = (n - 1) * q
    if vi >= n - 1:
        return float(a)
    t = vi - np.floor(vi)
    a, b = np.float64(a), np.float64(b)
    d = b - a
    return float(b - d * (1 - t) if t >= 0.5 else a + d * t)


def forward_lbs(art: ArticulatedCT, points, joint_deltas) -> np.ndarray:
    """Forward skinning of rest points (N, 3) with the articulated CT's weight field."""
    jd = np.asarray(joint_deltas, dtype=np.float64).reshape(N_JOINTS, 4, 4)
    D = np.ascontiguousarray(jd[art.weight_joints][:, :3])
    pts = np.ascontiguousarray(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    out = np.empty_like(pts)
    _kernels()["forward_lbs"](pts, _blended_weights(art, D),
                              np.ascontiguousarray(np.linalg.inv(art.weight_affine)[:3]), D, out)
    return out


def sample_warp(scene: Scene, points) -> np.ndarray:
    """Rest points for posed world points through the scene's warp grid (trilinear)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if scene.warp is None:
        return pts.copy()

    warp, waff = scene.warp
    idx = (pts - waff[:3, 3]) @ np.linalg.inv(waff[:3, :3]).T
    inside = np.all((idx >= -0.5) & (idx <= np.asarray(warp.shape[:3]) - 0.5), axis=1)
    disp = np.zeros_like(pts)
    for c in range(3):
        disp[:, c] = ndimage.map_coordinates(warp[..., c].astype(np.float64), idx.T, order=1,
                                             mode="nearest")
    disp[~inside] = 0
    return pts + disp


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def compose_volume(scene: Scene, affine=None, shape=None) -> Volume:
    """The posed scene on a grid (HU, float32).

    Default grid: the scene's own (``scene.grid``: the CT's axes and spacing, extended in whole
    8-voxel blocks where the posed content leaves the CT box), written by
    ``core.drr.projector.compose_scene`` (what ``render_posed`` renders); at the acquisition pose it is
    the CT voxel for voxel. With ``affine`` and ``shape``: the composition rule sampled at that
    grid's voxel centres (``sample_scene``).
    """
    if affine is None:
        pv = compose_scene(scene)
        return Volume(pv.flat.reshape(pv.shape).astype(np.float32), pv.affine.copy(), {"articulated": True})
    affine = np.asarray(affine, dtype=np.float64)
    out = np.empty(int(np.prod(shape)), np.float32)
    # chunk along the first axis to bound memory
    ni = shape[0]
    plane = shape[1] * shape[2]
    jk = np.indices(shape[1:]).reshape(2, -1).T.astype(np.float64)
    step = max(1, 4_000_000 // max(plane, 1))
    for i in range(0, ni, step):
        ii = np.arange(i, min(i + step, ni), dtype=np.float64)
        idx = np.concatenate([np.repeat(ii, plane)[:, None], np.tile(jk, (len(ii), 1))], axis=1)
        pts = apply_transform(affine, idx)
        out[i * plane: i * plane + len(pts)] = sample_scene(scene, pts)
    return Volume(out.reshape(shape), affine, {"articulated": True})


def hu_to_mu(hu) -> np.ndarray:
    """SPEC §5 monoenergetic default: mu = 0.02/mm (1 + HU/1000), clipped at 0."""
    return np.maximum(0.02 * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0)


def geometry_rays(geometry):
    """Pixel ray origins and unit directions (H*W, 3) from a Geometry-like object (SPEC §4 keys)."""
    g = geometry
    src = np.asarray(g.source_mm, dtype=np.float64)
    dc = np.asarray(g.detector_center_mm, dtype=np.float64)
    u = np.asarray(g.detector_u, dtype=np.float64)
    v = np.asarray(g.detector_v, dtype=np.float64)
    du, dv = (float(x) for x in g.pixel_spacing_mm)
    w, h = (int(x) for x in g.size_px)
    r, c = np.mgrid[0:h, 0:w]
    pix = dc + ((c - (w - 1) / 2.0) * du)[..., None] * u + ((r - (h - 1) / 2.0) * dv)[..., None] * v
    pix = pix.reshape(-1, 3)
    if getattr(g, "parallel", False):
        d = dc - src
        d = np.broadcast_to(d / np.linalg.norm(d), pix.shape).copy()
        o = pix - d * np.linalg.norm(dc - src)
    else:
        o = np.broadcast_to(src, pix.shape).copy()
        d = pix - src
        d /= np.linalg.norm(d, axis=1, keepdims=True)
    return o, d, (h, w)


def render_scene_reference(scene: Scene, geometry, step_mm: float = 0.5) -> np.ndarray:
    """Slow, simple ray marcher for scenes (tests/reference): line integrals of mu, (H, W) float32.

    Samples every ``step_mm`` (midpoint rule) inside the scene's world box.
    """
    o, d, (h, w) = geometry_rays(geometry)
    lo, hi = scene.bbox_world()
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = np.where(np.abs(d) > 1e-12, (lo - o) / d, -np.inf)
        t1 = np.where(np.abs(d) > 1e-12, (hi - o) / d, np.inf)
    tn = np.max(np.minimum(t0, t1), axis=1)
    tf = np.min(np.maximum(t0, t1), axis=1)
    tn = np.maximum(tn, 0)
    out = np.zeros(len(o))
    hit = tf > tn
    if not hit.any():
        return out.reshape(h, w).astype(np.float32)
    t_start = np.floor(tn[hit].min() / step_mm) * step_mm
    n_steps = int(np.ceil((tf[hit].max() - t_start) / step_mm)) + 1
    rays = np.nonzero(hit)[0]
    chunk = max(1, 2_000_000 // n_steps)
    ts = t_start + (np.arange(n_steps) + 0.5) * step_mm
    for s in range(0, len(rays), chunk):
        rr = rays[s: s + chunk]
        pts = o[rr, None, :] + ts[None, :, None] * d[rr, None, :]
        vals = hu_to_mu(sample_scene(scene, pts.reshape(-1, 3))).reshape(len(rr), n_steps)
        out[rr] = vals.sum(axis=1) * step_mm
    return out.reshape(h, w).astype(np.float32)


def static_scene(ct: Volume) -> Scene:
    """A plain CT as a scene (no parts, no warp): the reference for the articulated renders."""
    return Scene(ct, [], info={"warp": "none"})


def render_posed(scene: Scene, geometry, *, step_mm: float | None = None,
                 device: str = "auto", backend: str = "auto") -> np.ndarray:
    """Line integrals of mu through a posed scene, float32 (H, W).

    ``backend``: "auto" or "compose" (the frame composed onto one grid, cached per frame so that
    several views of one frame compose once, then the static kernels: ``core.drr.projector.render_scene``
    with ``compose=True``; CPU or CUDA), "projector" (the per-sample scene kernel, ``compose=False``)
    or "reference" (``render_scene_reference``, slow).
    """
    if backend in ("auto", "compose", "projector"):
        return render_scene(scene, geometry, step_mm=step_mm, device=device, compose=backend != "projector")
    if backend == "reference":
        return render_scene_reference(scene, geometry, step_mm=step_mm or 0.5)
    raise CtwinError(f"unknown render backend {backend!r}")
