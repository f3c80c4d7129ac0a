"""Is a registration's error the search's or the similarity's? Scores the truth against an estimate.

    .venv/bin/python benchmarks/diag_register_similarity.py --twin DIR --case random_0
        [--estimate registration.json ...] [--soft-models rigid-hu ...] [--views ap lateral]
        [--size 256] [--seed 0]

The case is generated as ``bench_register.py`` does (same seeds: the phantom at the case's pose,
rendered monoenergetic with Poisson noise). Without ``--estimate`` the twin is registered from the
benchmark's displaced start first. Printed per level (64, 128, 256 px): the summed gradient
correlation (``core.twin.registration``'s similarity) of the twin posed by the truth's pose vector,
by the estimate, and by the estimate with one joint group taken from the truth (spine + neck, arms,
legs), each with its SPEC 6 bone_err, and the registration's prior penalty (toward the start pose;
its cost is the penalty less the similarity); ``--kvp`` renders the polyenergetic condition, ``--bone-gain``
also scores with the bones weighted more or less against the soft tissue, ``--soft-models`` with
other models of the soft tissue (``rigid-hu``: the registration's default, the CT's HU in blocks each
rigid with the joint of its largest skinning weight; ``blend-hu``: blocks moved by the blend of their
joints; ``*-uniform``: water wherever the body is). When the estimate scores higher than the truth, no search
finds the truth: the limit is the similarity (or the twin's model of the image), not the optimiser.

``--joints`` prints which joints of the estimate are wrong (the angle of each joint's rotation relative
to the truth's, the root's translation) and its worst bones (SPEC 6 per-bone error). ``--variants``
scores the truth and the estimate under variants of the similarity, per level: ``gc`` the
registration's (gradient correlation, blur ``sigma`` as the level's), ``gc_s2`` / ``gc_s4`` the blur
doubled / quadrupled, ``gmag`` the normalised cross-correlation of the gradient magnitudes,
``gc_border`` the image border (10 % of each side) left out, ``gc_tiles`` the mean of the
gradient correlations of 8 x 8 tiles (local: a faint region counts as much as the trunk), ``bone_only`` the twin's rendering
without its soft-tissue blocks and table, ``soft_half`` those at half weight, ``no_hands`` /
``no_forearms`` the hands (carpals, metacarpals, phalanges) / also the radius and ulna not rendered
(their share of the preference). ``posed`` the twin's real posed DRR (``Twin.posed_scene`` + ``render_posed``: the
soft tissue through the inverse skinning warp, the bones rigid; line integrals at the level's size and geometry)
instead of the registration's splatted clouds, with the same gradient correlation (the level's blur;
``posed_s1``: blur of one pixel); ``--posed-warp MM ...`` scores it with coarser warps too (``posed@24``),
``--posed-coarsen F ...`` on the articulated CT pooled F x F x F (``posed@MM/cF``; the registration's
``posed_refine`` scores so), ``--posed-cost`` times one evaluation (warp + composition + render of every view) per level. ``--regions`` splits the estimate's gain at ``--size`` px among
the pixels where the arms', legs', trunk's or soft tissue's edges are strongest. A similarity under which the truth wins at every level is one that
a search can be steered by.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from launch import load_package  # noqa: E402

load_package("ctwin")

GROUPS = {
    "spine+neck": ("spine1", "spine2", "spine3", "neck", "head"),
    "arms": ("left_collar", "right_collar", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
             "left_wrist", "right_wrist"),
    "legs": ("left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"),
}


VARIANTS = ("gc", "gc_s2", "gc_s4", "gmag", "gc_border", "gc_tiles", "bone_only", "soft_half", "no_hands",
            "no_forearms", "posed", "posed_s1")
POSED_WARP_MM = (12.0,)  # --posed-warp: the inverse warp's node spacing(s) of the posed-DRR variants
HAND_KEYS = ("phalanges_hand", "metacarpal", "carpal")  # the twin's hand bones (carpal_*, metacarpal_*, ...)
FOREARM_KEYS = ("radius", "ulna")


def joint_errors(twin, pt, tt, pe, te, truth_a, truth_b) -> None:
    """Print the estimate's joints whose rotation differs from the truth's by more than 3 degrees
    (the angle of R_est^T R_truth; the root also its translation) and its eight worst bones."""
    from ctwin.core.body.skeleton import JOINT_NAMES, rodrigues, rotation_to_rotvec
    from ctwin.core.twin.evaluation import bone_error

    rows = []
    for j, name in enumerate(JOINT_NAMES):
        R = rodrigues(pe[3 * j:3 * j + 3]).T @ rodrigues(pt[3 * j:3 * j + 3])
        rows.append((float(np.degrees(np.linalg.norm(rotation_to_rotvec(R)))), name))
    wrong = sorted((r for r in rows if r[0] > 3.0), reverse=True)
    print("joints off by > 3 deg: " + ", ".join(f"{n} {a:.0f}" for a, n in wrong)
          + f"; root translation off {np.linalg.norm(te - tt):.1f} mm")
    per = bone_error(twin, pe, te, truth_a, truth_b)["per_bone"]
    worst = sorted(per.items(), key=lambda kv: -kv[1])[:8]
    print("worst bones: " + ", ".join(f"{n} {v:.1f}" for n, v in worst))


def _gc_masked(a: np.ndarray, b: np.ndarray, sigma: float, border: float = 0.0) -> float:
    from ctwin.core.twin.registration import _grad_pair, _normalised

    out = 0.0
    for x, y in zip(_grad_pair(a, sigma), _grad_pair(b, sigma)):
        if border > 0:
            h, w = x.shape
            bh, bw = int(border * h), int(border * w)
            x, y = x[bh:h - bh, bw:w - bw], y[bh:h - bh, bw:w - bw]
        nx, ny = _normalised(x), _normalised(y)
        if nx is not None and ny is not None:
            out += float((nx * ny).sum())
    return 0.5 * out


def _gc_tiles(a: np.ndarray, b: np.ndarray, sigma: float, n: int = 8) -> float:
    """Local gradient correlation: the mean over n x n tiles of each tile's gradient correlation
    (tiles whose target gradients carry under 1 % of the mean tile's energy left out), so that a
    faint region (a hand, a forearm over the pelvis) counts as much as the trunk's outline."""
    from ctwin.core.twin.registration import _grad_pair, _normalised

    ga, gb = _grad_pair(a, sigma), _grad_pair(b, sigma)
    h, w = ga[0].shape
    rs, cs = np.linspace(0, h, n + 1).astype(int), np.linspace(0, w, n + 1).astype(int)
    energy = sum(g * g for g in gb)
    mean_e = energy.sum() / (n * n)
    vals = []
    for i in range(n):
        for j in range(n):
            sl = (slice(rs[i], rs[i + 1]), slice(cs[j], cs[j + 1]))
            if energy[sl].sum() < 0.01 * mean_e:
                continue
            c = 0.0
            for x, y in zip(ga, gb):
                nx, ny = _normalised(x[sl]), _normalised(y[sl])
                if nx is not None and ny is not None:
                    c += 0.5 * float((nx * ny).sum())
            vals.append(c)
    return float(np.mean(vals)) if vals else 0.0


def _gmag(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    from ctwin.core.twin.registration import _grad_pair, _normalised

    ma, mb = (np.hypot(*_grad_pair(x, sigma)) for x in (a, b))
    na, nb = _normalised(ma), _normalised(mb)
    return float((na * nb).sum()) if na is not None and nb is not None else 0.0


def posed_images(twin, pose, transl, geometries, warp_mm: float, exact_bones: dict | None = None,
                 coarsen: int = 1) -> list:
    """The twin's posed DRRs (line integrals, float64) at ``geometries``: one inverse warp and composition,
    a render per geometry (CPU). ``exact_bones``: {label: 4x4} replacing the pose's bone transforms;
    ``coarsen``: the articulated CT pooled so (``core.twin.registration.coarse_articulated``)."""
    from ctwin.core.rig.pose import bone_deltas
    from ctwin.core.twin.articulated import posed_scene, render_posed
    from ctwin.core.twin.registration import coarse_articulated

    jd = twin.joint_deltas(pose, transl)
    bd = bone_deltas(twin.binding, pose, transl, jd)
    if exact_bones:
        bd.update(exact_bones)
    scene = posed_scene(coarse_articulated(twin.articulated, coarsen), bd, jd, warp_spacing_mm=warp_mm,
                        device="cpu")
    return [np.asarray(render_posed(scene, g, device="cpu"), dtype=np.float64) for g in geometries]


def posed_cost(twin, xr, cands, levels, warps, repeat: int = 3, coarsen: int = 1) -> None:
    """Seconds of one posed-DRR evaluation (pose, warp, compose, render each view, gradient
    correlation) per level and warp spacing, best of ``repeat``, at the estimate's pose."""
    import time

    p, t = cands["estimate"][:2]
    print("posed-DRR evaluation cost (CPU, best of %d), s:" % repeat)
    for w in warps:
        cells = []
        for lv in levels:
            geoms = _level_geometries(xr, lv)
            best = np.inf
            for _ in range(repeat):
                t0 = time.perf_counter()
                imgs = posed_images(twin, p, t, geoms, w, coarsen=coarsen)
                for img, x, g in zip(imgs, xr, geoms):
                    _gc_masked(img, _level_target(x, g), 1.0)
                best = min(best, time.perf_counter() - t0)
            cells.append(f"{lv} px {best:.3f}")
        print(f"  CT pooled x{coarsen}, warp {w:g} mm: " + ", ".join(cells), flush=True)


def _level_geometries(xr, size):
    """The views' geometries at a level's size (as ``_Level`` sizes them)."""
    out = []
    for x in xr:
        g0 = x.geometry
        scale = size / max(g0.width, g0.height)
        w, h = max(8, int(round(g0.width * scale))), max(8, int(round(g0.height * scale)))
        out.append(g0.with_size(w, h) if (w, h) != tuple(g0.size_px) else g0)
    return out


def _level_target(x, g):
    from ctwin.core.twin.registration import target_image

    return target_image(x, g.width, g.height)


def variant_table(twin, cloud, xr, cands, errs, levels, variants, exact=None) -> None:
    """Per candidate pose, each similarity variant at each level (summed over the views). With
    ``exact`` (the acquisition and target truths) also "truth, exact bones": every bone moved by its
    exact transform (T_B inv(T_A), what SPEC 6 scores against), the soft tissue by the truth's pose
    vector: the twin's image with its bones where the phantom's are, which the pose vector reaches
    only to the rig's floor."""
    from ctwin.core.twin.registration import _Level, _Problem, target_image

    def scaled(pred, gain):
        w = cloud.weight.copy()
        struct = np.array([pred(n) for n in cloud.names])
        w[struct[cloud.owner]] *= gain
        return replace(cloud, weight=w)

    clouds = {"base": cloud,
              "bone_only": scaled(lambda n: n.startswith("_"), 0.0),
              "soft_half": scaled(lambda n: n.startswith("_soft:"), 0.5),
              "no_hands": scaled(lambda n: any(k in n for k in HAND_KEYS), 0.0),
              "no_forearms": scaled(lambda n: any(k in n for k in HAND_KEYS + FOREARM_KEYS), 0.0)}
    lvs = {(k, lv): _Level(xr, lv, c) for k, c in clouds.items() if k == "base" or k in variants for lv in levels}
    targets = {}
    for lv in levels:
        L = lvs[("base", lv)]
        tt = []
        for x, v in zip(xr, L.views):
            tt.append(target_image(x, v.geometry.width, v.geometry.height))
        targets[lv] = tt
    print("similarity variants (summed over the views), per level " + " / ".join(f"{lv}" for lv in levels) + " px")
    print(f"{'pose':<34} {'bone_err':>8} " + " ".join(f"{v:>22}" for v in variants))
    res = {}
    rows = list(cands.items())
    if exact is not None:
        rows.insert(1, ("truth, exact bones", cands["truth"] + ("exact",)))
        errs = dict(errs, **{"truth, exact bones": 0.0})
    for k, c in rows:
        p, t = c[0], c[1]
        prob = _Problem(twin, cloud, xr, p, t, True)
        T = prob.transforms(p, t)
        if len(c) > 2:
            ta_b, tb_b = exact[0]["bones"], exact[1]["bones"]
            for i, n in enumerate(cloud.names):
                if n in ta_b and n in tb_b:
                    T[i] = np.asarray(tb_b[n], dtype=np.float64) @ np.linalg.inv(np.asarray(ta_b[n], dtype=np.float64))
        cells = []
        posed = {}
        for var in variants:
            vals = []
            for lv in levels:
                L = lvs[(var if var in clouds else "base", lv)]
                if var.startswith("posed"):
                    spec = var.split("@")[1] if "@" in var else f"{POSED_WARP_MM[0]:g}"
                    w, f = (float(spec.split("/c")[0]), int(spec.split("/c")[1])) if "/c" in spec else (float(spec), 1)
                    if (w, f, lv) not in posed:
                        eb = None
                        if len(c) > 2:
                            ta_b, tb_b = exact[0]["bones"], exact[1]["bones"]
                            eb = {n: np.asarray(tb_b[n], dtype=np.float64) @ np.linalg.inv(
                                np.asarray(ta_b[n], dtype=np.float64)) for n in ta_b if n in tb_b}
                        posed[(w, f, lv)] = posed_images(twin, p, t, [v.geometry for v in prob.level_views(L)], w,
                                                         eb, f)
                    imgs = posed[(w, f, lv)]
                else:
                    imgs = [a if b is None else a + b for a, b in L.render(T, prob.level_views(L))]
                s = 0.0
                for img, tgt, sig in zip(imgs, targets[lv], L.sigma):
                    if var == "gc_s2":
                        s += _gc_masked(img, tgt, 2 * sig)
                    elif var == "gc_s4":
                        s += _gc_masked(img, tgt, 4 * sig)
                    elif var == "gmag":
                        s += _gmag(img, tgt, sig)
                    elif var == "gc_tiles":
                        s += _gc_tiles(img, tgt, sig)
                    elif var == "gc_border":
                        s += _gc_masked(img, tgt, sig, 0.1)
                    elif var.startswith("posed_s1"):
                        s += _gc_masked(img, tgt, 1.0)
                    else:
                        s += _gc_masked(img, tgt, sig)
                vals.append(s)
            res[(k, var)] = vals
            cells.append("/".join(f"{v:.4f}" for v in vals))
        print(f"{k:<34} {errs[k]:8.2f} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    for ref in ("truth", "truth, exact bones"):
        if (ref, variants[0]) in res and "estimate" in cands:
            print(f"{ref} - estimate (positive: it wins): " + "; ".join(
                f"{var} " + "/".join(f"{a - b:+.4f}" for a, b in zip(res[(ref, var)], res[("estimate", var)]))
                for var in variants))


REGION_KEYS = {
    "arms": ("humerus", "radius", "ulna", "scapula", "clavicula") + HAND_KEYS,
    "legs": ("femur", "patella", "tibia", "fibula", "tarsal", "metatarsal", "phalanges_feet"),
}


def region_shares(twin, cloud, xr, cands, size) -> None:
    """Where the estimate gains on the truth at ``size`` px: the summed gradient correlation is a sum
    of per-pixel products of normalised gradients; their difference (estimate - truth) summed over
    the pixels where each bone region's edges are strongest (the region's own rendering, truth or
    estimate, with the largest gradient magnitude): arms (shoulder girdle to hand), legs, trunk
    (the other bones); "soft+table": the pixels where no bone's gradient reaches 10 % of the
    view's 99th percentile of bone gradients."""
    from ctwin.core.twin.registration import _grad_pair, _Level, _Problem, _normalised

    def region(n):
        if n.startswith("_"):
            return "soft+table"
        for r, keys in REGION_KEYS.items():
            if any(k in n for k in keys):
                return r
        return "trunk"

    regs = ("arms", "legs", "trunk", "soft+table")
    of = np.array([regs.index(region(n)) for n in cloud.names])
    L = _Level(xr, size, cloud)
    contrib, mags = {}, {}
    for k in ("truth", "estimate"):
        p, t = cands[k]
        prob = _Problem(twin, cloud, xr, p, t, True)
        T = prob.transforms(p, t)
        views = prob.level_views(L)
        per_view = []
        for vi, (img, (tx, ty), sig) in enumerate(zip(L.render(T, views), L.targets, L.sigma)):
            img = img[0] if img[1] is None else img[0] + img[1]
            gx, gy = _grad_pair(img, sig)
            per_view.append(0.5 * (_normalised(gx) * tx + _normalised(gy) * ty))
        contrib[k] = per_view
        for ri in range(len(regs)):
            w = np.where(of[cloud.owner] == ri, cloud.weight, 0.0)
            Lr = _Level(xr, size, replace(cloud, weight=w))
            for vi, (img, sig) in enumerate(zip(Lr.render(T, views), Lr.sigma)):
                img = img[0] if img[1] is None else img[0] + img[1]
                m = np.hypot(*_grad_pair(img, sig))
                key = (vi, ri)
                mags[key] = m if key not in mags else np.maximum(mags[key], m)
    print(f"where the estimate gains on the truth at {size} px (summed per-pixel products, estimate - truth):")
    for vi, x in enumerate(xr):
        bones = np.stack([mags[(vi, ri)] for ri in range(len(regs) - 1)])
        lab = np.argmax(bones, axis=0)
        lab[bones.max(axis=0) < 0.1 * np.percentile(bones.max(axis=0), 99)] = len(regs) - 1
        d = contrib["estimate"][vi] - contrib["truth"][vi]
        print(f"  {x.name:<8} total {d.sum():+.4f}: " + ", ".join(
            f"{r} {d[lab == ri].sum():+.4f}" for ri, r in enumerate(regs)))


REGION_SETS = {  # the joints put from the truth into the estimate, per limb group
    "left_arm": ("left_collar", "left_shoulder", "left_elbow", "left_wrist", "left_hand"),
    "right_arm": ("right_collar", "right_shoulder", "right_elbow", "right_wrist", "right_hand"),
    "left_forearm": ("left_elbow", "left_wrist", "left_hand"),
    "right_forearm": ("right_elbow", "right_wrist", "right_hand"),
    "neck": ("neck", "head"),
}


def region_ranking(twin, cloud, xr, pt, tt, pe, te, truth_a, truth_b, levels, span_deg, margin_mm) -> dict:
    """Per limb group (``REGION_SETS``): the estimate with that group's joints taken from the truth
    (the other joints, the root and the translation the estimate's; "local": the truth's joint
    rotations, "world": each joint turned so that its world orientation is the truth's under the
    estimate's trunk, i.e. the limb pointing where the truth's points; "at_truth": the truth against
    the truth with the estimate's group, whose bone_err is printed) against the estimate, scored by
    the whole views' gradient correlation and by the region score (``_RegionLevel`` over
    the union of ``_region_masks`` of the group's joints at the estimate's pose, as a registration
    stage starting there would score it, and at the substituted pose), at each level. Positive: the truth's group wins. Also the group's worst
    joint angle (estimate vs truth) and the bone_err of the substituted pose."""
    from ctwin.core.body.skeleton import JOINT_INDEX, PARENTS, rodrigues, rotation_to_rotvec as R_to_vec
    from ctwin.core.twin.evaluation import bone_error
    from ctwin.core.twin.registration import _Level, _Problem, _region_masks, _RegionLevel

    lvs = [_Level(xr, lv, cloud) for lv in levels]
    out = {}
    e_est = bone_error(twin, pe, te, truth_a, truth_b)["mean"]
    print(f"region score (span {span_deg:g} deg, margin {margin_mm:g} mm) vs whole views: truth's group in the "
          f"estimate - estimate, per level {' / '.join(str(lv) for lv in levels)} px (estimate bone_err {e_est:.2f})")
    print(f"{'group':<20} {'off deg':>7} {'bone_err':>8} {'whole views':>24} {'region':>24} {'region px %':>14}")
    def world_rotations(pose):
        Rw = []
        for j in range(len(PARENTS)):
            Rl = rodrigues(pose[3 * j:3 * j + 3])
            Rw.append(Rl if PARENTS[j] < 0 else Rw[PARENTS[j]] @ Rl)
        return Rw

    Rt = world_rotations(pt)
    for (g, names), mode in ((gn, m) for gn in REGION_SETS.items() for m in ("local", "world", "at_truth")):
        js = sorted(JOINT_INDEX[n] for n in names)
        # (the pose with the truth's group, the pose with the estimate's group, its translation)
        p, base, tb = pe.copy(), pe, te
        if mode == "at_truth":  # the truth against the truth with the estimate's group
            p, base, tb = pt, pt.copy(), tt
            for j in js:
                base[3 * j:3 * j + 3] = pe[3 * j:3 * j + 3]
        off = 0.0
        for j in js:
            R = rodrigues(pe[3 * j:3 * j + 3]).T @ rodrigues(pt[3 * j:3 * j + 3])
            off = max(off, float(np.degrees(np.linalg.norm(R_to_vec(R)))))
            if mode == "local":
                p[3 * j:3 * j + 3] = pt[3 * j:3 * j + 3]
            elif mode == "world":  # the joint's world orientation the truth's, under the estimate's trunk
                Rp = world_rotations(p)[PARENTS[j]]
                p[3 * j:3 * j + 3] = R_to_vec(Rp.T @ Rt[j])
        g = f"{g} {mode}"
        e_mix = bone_error(twin, p, tb, truth_a, truth_b)["mean"]
        if mode == "at_truth":
            e_mix = bone_error(twin, base, tb, truth_a, truth_b)["mean"]
        whole, reg, frac = [], [], []
        for L in lvs:
            prob = _Problem(twin, cloud, xr, p, tb, True)
            mix_masks = _region_masks(prob, L, js, span_deg, margin_mm)
            prob = _Problem(twin, cloud, xr, base, tb, True)
            masks = [a | b for a, b in zip(_region_masks(prob, L, js, span_deg, margin_mm), mix_masks)]
            R = _RegionLevel(L, masks)
            frac.append(100.0 * np.mean([m.mean() for m in masks]))
            sc = {}
            for k, pose in (("est", base), ("mix", p)):
                T = prob.transforms(pose, tb)
                imgs = L.render(T, prob.level_views(L))
                sc[k] = (L.score(imgs), R.score(imgs))
            whole.append(sc["mix"][0] - sc["est"][0])
            reg.append(sc["mix"][1] - sc["est"][1])
        out[g] = {"off_deg": off, "bone_err": e_mix, "whole": whole, "region": reg}
        print(f"{g:<20} {off:7.1f} {e_mix:8.2f} {'/'.join(f'{v:+.4f}' for v in whole):>24} "
              f"{'/'.join(f'{v:+.4f}' for v in reg):>24} {'/'.join(f'{v:.0f}' for v in frac):>14}", flush=True)
    return out


def main() -> int:
    from bench_register import displaced_start, random_pose
    from ctwin.core import progress
    from ctwin.core.body.skeleton import JOINT_INDEX, N_JOINTS
    from ctwin.core.drr.carm import default_views
    from ctwin.core.drr.projector import prepare_volume, render_value
    from ctwin.core.fileio import read_json
    from ctwin.core.phantom.phantom import generate_phantom
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.twin.evaluation import _source_truth, bone_error
    from ctwin.core.twin.registration import XRay, _Level, _Problem, bone_cloud, register
    from ctwin.core.twin.twin import load_twin

    ap = argparse.ArgumentParser()
    ap.add_argument("--twin", required=True)
    ap.add_argument("--case", default="random_0", help="random_N or a preset name")
    ap.add_argument("--estimate", nargs="*", default=None,
                    help="registration.json files (pose, transl; else: register first); the groups of the "
                         "truth are put into the first")
    ap.add_argument("--views", nargs="*", default=["ap", "lateral"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--photons", type=float, default=2e4)
    ap.add_argument("--kvp", type=float, default=None, help="the polyenergetic condition (bench_register's poly)")
    ap.add_argument("--bone-gain", type=float, nargs="*", default=[1.0],
                    help="also score with the bones' cloud weights scaled by these factors (the bone "
                         "contrast against soft tissue that the similarity sees)")
    ap.add_argument("--soft-models", nargs="*", default=["rigid-hu"],
                    choices=["blend-uniform", "blend-hu", "rigid-uniform", "rigid-hu"])
    ap.add_argument("--regions", action="store_true",
                    help="where (arms, legs, trunk, soft tissue) the estimate gains on the truth at --size px")
    ap.add_argument("--joints", action="store_true", help="per-joint angle errors and the worst bones")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="score under these similarity variants (none given: all): " + " ".join(VARIANTS))
    ap.add_argument("--posed-warp", type=float, nargs="*", default=None,
                    help="with the posed variants: also score them with these warp spacings (mm; posed@MM)")
    ap.add_argument("--posed-coarsen", type=int, nargs="*", default=[],
                    help="with the posed variants: also score them on the articulated CT pooled by these "
                         "factors (core.twin.registration.coarse_articulated; posed@MM/cF)")
    ap.add_argument("--posed-cost", action="store_true",
                    help="time one posed-DRR evaluation per level (and --posed-warp spacing)")
    ap.add_argument("--region", type=float, nargs=2, default=None, metavar=("SPAN_DEG", "MARGIN_MM"),
                    help="per limb group, the truth's group put into the estimate scored by the region score "
                         "(core.twin.registration._RegionLevel) and by the whole views")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", type=int, default=None,
                    help="the case's position in the benchmark run (its noise and start seeds); default: "
                         "its position in bench_register's default run")
    args = ap.parse_args()
    progress.set_quiet(True)

    twin = load_twin(args.twin)
    truth_a = _source_truth(twin)
    spacing = float(truth_a["spacing_mm"])
    if args.case.startswith("random_"):
        n = int(args.case.split("_")[1])
        rng = np.random.default_rng(args.seed)
        poses = [random_pose(PRESETS["supine_arms_down"], rng) for _ in range(n + 1)]
        pose_b, ci = poses[n], n
    elif args.case in PRESETS:
        # the case index of bench_register's default run (random 10, then the presets in order)
        pose_b = PRESETS[args.case]
        ci = 10 + [p for p in PRESETS if p != "supine_arms_down"].index(args.case)
    else:
        raise SystemExit(f"unknown case {args.case!r}: random_N or one of {', '.join(PRESETS)}")
    ci = ci if args.index is None else args.index
    ph = generate_phantom(pose=pose_b, spacing=spacing, seed=0)
    truth_b = ph.truth
    pv = prepare_volume(ph.ct)
    views = default_views(ph.ct, size=args.size)
    kw = {} if args.kvp is None else {"kvp": args.kvp}
    xr = [XRay(vn, render_value(pv, g, value="line_integral", photons=args.photons, seed=1000 * ci + vi, **kw), g,
               photons=args.photons)
          for vi, (vn, g) in enumerate(views.items()) if vn in args.views]
    clouds = {m: bone_cloud(twin, soft_blend=m.startswith("blend"), soft_uniform=m.endswith("uniform"))
              for m in args.soft_models}
    cloud = clouds[args.soft_models[0]]
    pt = np.asarray(truth_b["pose"], dtype=np.float64)
    tt = twin.transl0_mm + (np.asarray(truth_b["transl"]) - np.asarray(truth_a["transl"]))
    others = {}
    start_pose = displaced_start(twin, np.random.default_rng([args.seed, ci]))[0]
    if args.estimate:
        recs = [read_json(f) for f in args.estimate]
        pe, te = (np.asarray(recs[0][k], dtype=np.float64) for k in ("pose", "transl"))
        others = {f"estimate {Path(f).stem}": (np.asarray(r["pose"], dtype=np.float64),
                                               np.asarray(r["transl"], dtype=np.float64))
                  for f, r in zip(args.estimate[1:], recs[1:])}
    else:
        sp, st = displaced_start(twin, np.random.default_rng([args.seed, ci]))
        reg = register(twin, xr, init_pose=sp, init_transl_mm=st, seed=args.seed + ci, cloud=cloud)
        pe, te = reg.pose, reg.transl_mm

    def mix(names):
        p = pe.copy()
        for n in names:
            j = JOINT_INDEX[n]
            p[3 * j:3 * j + 3] = pt[3 * j:3 * j + 3]
        return p

    cands = {"truth": (pt, tt), "estimate": (pe, te)}
    cands.update({f"estimate, {g} of truth": (mix(names), te) for g, names in GROUPS.items()})
    cands.update(others)
    errs = {k: bone_error(twin, p, t, truth_a, truth_b)["mean"] for k, (p, t) in cands.items()}
    cond = "monoenergetic" if args.kvp is None else f"{args.kvp:g} kVp"
    print(f"case {args.case} ({cond}), views {' + '.join(x.name for x in xr)}; "
          "similarity = summed gradient correlation")
    levels = [lv for lv in (64, 128, 256) if lv <= args.size]
    if args.joints:
        joint_errors(twin, pt, tt, pe, te, truth_a, truth_b)
    if args.regions:
        region_shares(twin, cloud, xr, cands, args.size)
    if args.posed_cost:
        for f in [1] + list(args.posed_coarsen):
            posed_cost(twin, xr, cands, levels, list(POSED_WARP_MM) + list(args.posed_warp or []), coarsen=f)
    if args.region is not None:
        region_ranking(twin, cloud, xr, pt, tt, pe, te, truth_a, truth_b, levels, *args.region)
        return 0
    if args.variants is not None:
        variants = args.variants or list(VARIANTS)
        base = [v for v in variants if v in ("posed", "posed_s1")]
        for w in args.posed_warp or []:
            variants += [f"{v}@{w:g}" for v in base]
        for f in args.posed_coarsen:
            for w in list(POSED_WARP_MM) + list(args.posed_warp or []):
                variants += [f"{v}@{w:g}/c{f}" for v in base]
        variant_table(twin, cloud, xr, cands, errs, levels, variants, exact=(truth_a, truth_b))
        return 0
    for (model, cl), gain in ((m, g) for m in clouds.items() for g in args.bone_gain):
        c = cl
        if gain != 1.0:
            w = cl.weight.copy()
            w[cl.bone[cl.owner]] *= gain
            c = replace(cl, weight=w)
        print(f"soft tissue {model}, bone weight x {gain:g}")
        print(f"{'pose':<34} {'bone_err':>8} " + " ".join(f"{lv:>4} px" for lv in levels) + "    prior")
        lvs = [_Level(xr, lv, c) for lv in levels]
        for k, (p, t) in cands.items():
            prob = _Problem(twin, c, xr, p, t, True)
            # the registration's prior toward the start (and joint-range penalty): its cost is
            # this minus the similarity
            prob.start_pose = start_pose
            pen = prob._penalty(p, range(1, N_JOINTS))
            print(f"{k:<34} {errs[k]:8.2f} " + " ".join(f"{prob.score(L):7.4f}" for L in lvs) + f" {pen:8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
