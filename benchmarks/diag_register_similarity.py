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
