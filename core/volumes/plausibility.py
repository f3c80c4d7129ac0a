"""Plausibility checks: does the segmentation belong to this CT, and does the fit look like a body?

``check_ct_segmentation`` runs before any meshing, on the labelmap resolved onto the CT grid by world
coordinates. A valid but misregistered pair (the CT's origin shifted by a few centimetres) puts the
bone labels on soft tissue and fat; that is measured, not guessed:

- bone: the pooled HU of all skeletal labels. Aligned real CTs (the shared TotalSegmentator test
  CTs: abdomen-pelvis and chest) give a median of 172 and 217 HU with 56 % and 64 % of the voxels
  above 150 HU; the same pairs with the CT shifted by 14 mm give 58-71 HU and 23-30 %, by 28 mm
  30-32 HU and 10-17 %, by 57 mm -28..4 HU and 2-7 % (``benchmarks/bench_plausibility.py``). Cancellous bone alone
  is 140-280 HU in those CTs, and osteoporotic trabecular bone goes below 110 HU (Pickhardt et
  al., Ann Intern Med 2013), so the check fails only
  when both the median is below ``BONE_MEDIAN_MIN_HU`` and fewer than ``BONE_FRACTION_MIN`` of the
  voxels are above 150 HU.
- soft-tissue organs (liver, spleen, kidneys, heart, muscles): a pooled median below -300 HU means
  they lie in air or lung.
- extent: more than half of the segmentation's labels wholly outside the CT.
- sides: paired ``*_left``/``*_right`` labels with the left one on the patient's right (LPS +x is
  the patient's left) in most pairs.

``check_fit`` flags a fit far outside what real bodies give: chamfer above ``FIT_CHAMFER_MAX_MM``
or skeletal enclosure below ``FIT_ENCLOSURE_MIN_PCT`` (real fits: 0.84-2.14 mm and >= 99.8 %,
README "Measured results"), and a joint geometry no body has (``joint_geometry_findings``):

- segment lengths (joint centre to joint centre) outside ``SEGMENT_RANGE_MM``. Adult long bones
  are about 45 cm (femur), 37 cm (tibia), 33 cm (humerus) and 25 cm (radius) long in Trotter &
  Gleser's series (Am J Phys Anthropol 1952); the ranges are wide
  (children from about six years to the tallest adults) so that only a collapsed or exploded fit,
  or a unit error, trips them.
- left/right asymmetry of a paired segment above ``ASYMMETRY_MAX``: bilateral length asymmetry
  of limb bones averages 1-3 % (Auerbach & Ruff, J Hum Evol 2006);
  20 % is no body.
- sides: the left hip and shoulder at the patient's right (LPS x smaller than the right one's).
"""
from __future__ import annotations

import numpy as np

from ..errors import CtwinError
from .labels import is_skeletal
from ..progress import report

BONE_MEDIAN_MIN_HU = 100.0
BONE_FRACTION_MIN = 0.35
BONE_HU = 150.0
SOFT_MEDIAN_MIN_HU = -300.0
FIT_CHAMFER_MAX_MM = 10.0
FIT_ENCLOSURE_MIN_PCT = 95.0

_SOFT = ("liver", "spleen", "kidney_left", "kidney_right", "heart", "pancreas", "gluteus_maximus_left",
         "gluteus_maximus_right", "iliopsoas_left", "iliopsoas_right", "autochthon_left", "autochthon_right",
         "muscle", "brain")


def ct_segmentation_findings(ct, labelmap, names: dict, outside_labels=()) -> tuple[list[str], dict]:
    """(problems, measurements): each problem is one sentence; no problem means plausible."""
    lab = np.asarray(labelmap.data).reshape(-1)
    hu = np.asarray(ct.data).reshape(-1)
    problems: list[str] = []
    meas: dict = {}
    bone_ids = [i for i, n in names.items() if is_skeletal(n)]
    if not bone_ids:
        problems.append("the segmentation has no bone labels, so the twin would have no skeleton "
                        "(a TotalSegmentator 'total' segmentation has them)")
    else:
        b = hu[np.isin(lab, bone_ids)].astype(np.float64)
        if b.size:
            med, frac = float(np.median(b)), float((b > BONE_HU).mean())
            meas["bone_median_hu"], meas["bone_fraction_above_150_hu"] = med, round(frac, 4)
            if med < BONE_MEDIAN_MIN_HU and frac < BONE_FRACTION_MIN:
                off = _bone_offset_mm(ct, lab, hu, bone_ids)
                meas["bone_centroid_offset_mm"] = off
                by = "" if off is None else (f"; the segmentation lies about {np.linalg.norm(off):.0f} mm "
                                             f"off, (x, y, z) = {[round(v) for v in off]} mm LPS, "
                                             f"from where its bones fall on the CT's bone")
                problems.append(f"bone labels have median {med:.0f} HU ({100 * frac:.0f} % above "
                                f"{BONE_HU:.0f} HU; bone gives a median above {BONE_MEDIAN_MIN_HU:.0f} HU): "
                                f"segmentation and CT are not aligned{by} (try checking their origins)")
    soft_ids = [i for i, n in names.items() if n in _SOFT]
    if soft_ids:
        s = hu[np.isin(lab, soft_ids)]
        if s.size:
            med = float(np.median(s))
            meas["soft_tissue_median_hu"] = med
            if med < SOFT_MEDIAN_MIN_HU:
                problems.append(f"soft-tissue organ labels have median {med:.0f} HU (air or lung): "
                                f"segmentation and CT are not aligned")
    n_out = len(outside_labels)
    meas["labels_outside_ct"] = n_out
    if n_out and n_out > len(names):
        problems.append(f"{n_out} of {n_out + len(names)} labels lie wholly outside the CT: "
                        f"segmentation and CT do not cover the same body (check their origins)")
    # sides: the *_left member of each pair should lie at larger x (LPS: +x = patient left)
    pairs = [(n, n[:-5] + "_right") for n in names.values() if n.endswith("_left")]
    by_name = {n: i for i, n in names.items()}
    pairs = [(by_name[a], by_name[b]) for a, b in pairs if b in by_name]
    if pairs:
        x = _centroid_x(ct, lab, [i for p in pairs for i in p])
        flipped = [1 for a, b in pairs if a in x and b in x and x[a] < x[b]]
        meas["left_right_pairs"], meas["left_right_swapped"] = len(pairs), len(flipped)
        if len(pairs) >= 2 and len(flipped) > len(pairs) / 2:
            problems.append(f"{len(flipped)} of {len(pairs)} left/right label pairs lie on the wrong side "
                            f"(the segmentation is mirrored left-right relative to the CT)")
    return problems, meas


def _bone_offset_mm(ct, lab_flat, hu_flat, bone_ids, reach_mm: float = 120.0, step_mm: float = 5.0):
    """The world shift (mm) of the bone labels that puts most of them on bone (> 150 HU): a search
    along x, y and z in turn (two rounds, ``step_mm`` steps within ``reach_mm``) on up to 20,000
    sampled label voxels. A measure of the misregistration for the message, None if unclear."""
    idx = np.flatnonzero(np.isin(lab_flat, bone_ids))
    if idx.size < 10:
        return None
    rng = np.random.default_rng(0)
    if idx.size > 20000:
        idx = rng.choice(idx, 20000, replace=False)
    ijk = np.stack(np.unravel_index(idx, ct.shape), axis=1).astype(np.float64)
    inv = np.linalg.inv(ct.affine[:3, :3])
    hu = np.asarray(ct.data)
    shape = np.asarray(ct.shape)

    def score(shift):
        q = np.rint(ijk + inv @ shift).astype(np.int64)
        ok = np.all((q >= 0) & (q < shape), axis=1)
        if ok.sum() < 0.5 * len(q):
            return -1.0
        return float((hu[q[ok, 0], q[ok, 1], q[ok, 2]] > BONE_HU).mean())

    best = np.zeros(3)
    steps = np.arange(-reach_mm, reach_mm + 1e-9, step_mm)
    for _ in range(2):
        for ax in range(3):
            cands = []
            for d in steps:
                s = best.copy()
                s[ax] = d
                cands.append((score(s), -abs(d), d))
            best[ax] = max(cands)[2]
    if score(best) < BONE_FRACTION_MIN:
        return None
    return [float(-v) for v in best]


def _centroid_x(ct, lab_flat: np.ndarray, ids) -> dict:
    """World x (LPS mm) of each label's centroid."""
    shape = ct.shape
    out = {}
    idx = np.flatnonzero(np.isin(lab_flat, ids))
    if not idx.size:
        return out
    ijk = np.stack(np.unravel_index(idx, shape), axis=1).astype(np.float64)
    xw = ijk @ ct.affine[0, :3] + ct.affine[0, 3]
    labs = lab_flat[idx]
    for i in ids:
        m = labs == i
        if m.any():
            out[i] = float(xw[m].mean())
    return out


def check_ct_segmentation(ct, labelmap, names: dict, *, force: bool = False) -> dict:
    """Refuse an implausible CT/segmentation pair (``CtwinError``, one line) unless ``force``;
    returns the record for twin.json: measurements, problems, forced."""
    outside = (labelmap.meta or {}).get("outside_labels", ()) if hasattr(labelmap, "meta") else ()
    problems, meas = ct_segmentation_findings(ct, labelmap, names, outside)
    rec = {"ok": not problems, "problems": problems, "measured": meas, "forced": bool(force and problems)}
    if problems and not force:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CtwinError(f"{problems[0]}{more}; --force builds anyway and records this in twin.json")
    for p in problems:
        report(f"WARNING (--force): {p}")
    return rec


# (name, (parent joint, child joint) left, the same right, (min, max) mm); SMPL joint indices
# (core.body.skeleton.JOINT_NAMES).
SEGMENT_RANGE_MM = (
    ("femur", (1, 4), (2, 5), (200.0, 650.0)),
    ("tibia", (4, 7), (5, 8), (150.0, 550.0)),
    ("humerus", (16, 18), (17, 19), (150.0, 500.0)),
    ("forearm", (18, 20), (19, 21), (100.0, 400.0)),
)
ASYMMETRY_MAX = 0.20
_SIDE_PAIRS = (("hip", 1, 2), ("shoulder", 16, 17))


def joint_geometry_findings(joints_mm) -> list[str]:
    """Sentences for a fitted skeleton (24, 3 world LPS mm) no real body has (empty when plausible)."""
    j = np.asarray(joints_mm, dtype=np.float64).reshape(24, 3)
    out = []
    if not np.isfinite(j).all():
        return ["implausible fit: the fitted joints are not finite"]
    for name, left, right, (lo, hi) in SEGMENT_RANGE_MM:
        ln = [float(np.linalg.norm(j[b] - j[a])) for a, b in (left, right)]
        for side, v in zip(("left", "right"), ln):
            if not lo <= v <= hi:
                out.append(f"implausible fit: {side} {name} length {v:.0f} mm (real bodies: {lo:.0f}-{hi:.0f} mm)")
        m = 0.5 * (ln[0] + ln[1])
        if m > 0 and abs(ln[0] - ln[1]) / m > ASYMMETRY_MAX:
            out.append(f"implausible fit: left and right {name} lengths {ln[0]:.0f} and {ln[1]:.0f} mm differ by "
                       f"{100 * abs(ln[0] - ln[1]) / m:.0f} % (real bodies: a few %)")
    for name, li, ri in _SIDE_PAIRS:
        if j[li, 0] < j[ri, 0]:
            out.append(f"implausible fit: the left {name} lies on the patient's right (the fit is mirrored)")
    return out


def check_fit(metrics: dict, joints_mm=None) -> list[str]:
    """Warnings for a fit far outside real bodies' range (empty when plausible): chamfer, enclosure
    and, given the fitted joints, their geometry (``joint_geometry_findings``)."""
    out = []
    ch, enc = metrics.get("chamfer_mm"), metrics.get("enclosure_pct")
    if ch is not None and np.isfinite(ch) and ch > FIT_CHAMFER_MAX_MM:
        out.append(f"implausible fit: chamfer {ch:.1f} mm (real fits give 0.8-2.2 mm; above "
                   f"{FIT_CHAMFER_MAX_MM:g} mm the body model does not follow the skin)")
    if enc is not None and np.isfinite(enc) and enc < FIT_ENCLOSURE_MIN_PCT:
        out.append(f"implausible fit: only {enc:.1f} % of the skeleton lies inside the fitted body "
                   f"(real fits give >= 99.8 %)")
    if joints_mm is not None:
        out += joint_geometry_findings(joints_mm)
    for w in out:
        report(f"WARNING: {w}")
    return out
