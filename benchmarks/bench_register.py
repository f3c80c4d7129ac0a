"""Articulated 2D/3D registration on the phantom (``core.twin.registration``, ``ctwin register``).

    .venv/bin/python benchmarks/bench_register.py [--twin DIR] [--spacing 3] [--size 256]
        [--random 10] [--presets all|none|NAME ...] [--conditions mono poly] [--views aplat ap]
        [--methods articulated rigid] [--soft-model rigid-hu] [--seed 0] [--out /tmp/bench_register]
        [--json FILE]

Protocol: the twin is built from the phantom (seed 0) at the acquisition pose (``--twin`` reuses a
built one; its input CT's truth.json is the acquisition truth). Each case is a target pose: seeded
random poses within the joint ranges (``random_pose``) and the presets. The phantom is generated at
that pose and rendered AP + lateral with the code of ``ctwin render --ct`` (``render_value``, the
default views of that CT) in two conditions: ``mono`` (SPEC 5 monoenergetic, Poisson noise,
``--photons``) and ``poly`` (``--kvp`` 100 polyenergetic spectrum, same noise). The twin is then
registered from its acquisition pose with the root displaced uniformly within 50 mm (a ball) and
10 degrees (seeded), from AP + lateral and from AP alone, articulated and rigid (the whole twin
as one body). Score: SPEC 6 bone_err of the twin posed by the estimate against the phantom's bones
mapped by the truth; beside it the twin posed by the truth's own pose vector (the rig's floor).
Prints one row per run and a summary (mean/max bone_err, converged runs <= 5 mm, seconds per run).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

# per joint: (axis, lo, hi) degree ranges of the random change added to the acquisition pose,
# inside core.rig.pose.JOINT_LIMITS_DEG (knees flex only, axis x)
RANDOM_RANGES = {
    "left_hip": ((0, -60, 15), (1, -15, 15), (2, -20, 20)), "right_hip": ((0, -60, 15), (1, -15, 15), (2, -20, 20)),
    "left_knee": ((0, 0, 70),), "right_knee": ((0, 0, 70),),
    "left_ankle": ((0, -20, 20),), "right_ankle": ((0, -20, 20),),
    "spine1": ((0, -10, 10), (1, -8, 8), (2, -8, 8)), "spine2": ((0, -8, 8), (1, -6, 6), (2, -6, 6)),
    "spine3": ((0, -8, 8), (1, -6, 6), (2, -6, 6)), "neck": ((0, -15, 15), (1, -15, 15)),
    "left_shoulder": ((0, -40, 40), (1, -30, 30), (2, -30, 30)),
    "right_shoulder": ((0, -40, 40), (1, -30, 30), (2, -30, 30)),
    "left_elbow": ((1, -60, 0),), "right_elbow": ((1, 0, 60),),
}


def random_pose(base, rng):
    from ctwin.core.rig.pose import joint_limit_violations
    from ctwin.core.body.skeleton import JOINT_INDEX

    for _ in range(100):
        p = np.asarray(base, dtype=np.float64).copy()
        for name, axes in RANDOM_RANGES.items():
            j = JOINT_INDEX[name]
            for ax, lo, hi in axes:
                p[3 * j + ax] += math.radians(rng.uniform(lo, hi))
        if not joint_limit_violations(p):
            return p
    raise RuntimeError("no random pose within the joint limits")


def displaced_start(twin, rng, max_mm=50.0, max_deg=10.0):
    from ctwin.core.body.skeleton import rodrigues, rotation_to_rotvec

    d = rng.normal(size=3)
    d *= max_mm * rng.uniform() ** (1 / 3) / np.linalg.norm(d)
    ax = rng.normal(size=3)
    ax /= np.linalg.norm(ax)
    ang = math.radians(rng.uniform(0, max_deg))
    p = twin.pose0.copy()
    p[0:3] = rotation_to_rotvec(rodrigues(ax * ang) @ rodrigues(p[0:3]))
    return p, twin.transl0_mm + d


def resume_posed(twin, xr, cloud, start_pose, start_t, prev, levels, effort):
    """register()'s posed refinement (its last stage) run from a recorded registration's result: the
    same problem (start and prior from the displaced start, the recorded pose and translation), the
    same levels. Equal to register() with ``POSED_REFINE`` where the stages before it are deterministic."""
    from ctwin.core.twin.registration import Registration, _make_level, _Problem, posed_stage

    prob = _Problem(twin, cloud, xr, start_pose, start_t, True)
    prob.pose = np.asarray(prev["pose"], dtype=np.float64).copy()
    prob.transl = np.asarray(prev["transl"], dtype=np.float64).copy()
    lv = [_make_level(xr, int(s), cloud, li) for li, s in enumerate(levels)]
    t0 = time.perf_counter()
    st = posed_stage(prob, lv, effort)
    final = prob.score(lv[-1])
    return Registration(prob.pose, prob.transl, twin.binding.armature.posed_joints(prob.pose, prob.transl), final,
                        [st], time.perf_counter() - t0, [x.geometry for x in xr], start_pose, start_t)


def main() -> int:
    from ctwin.core import progress
    from ctwin.core.drr.carm import default_views
    from ctwin.core.twin.evaluation import _source_truth
    from ctwin.core.fileio import write_json
    from ctwin.core.phantom.phantom import generate_phantom, write_phantom
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.drr.projector import prepare_volume, render_value
    from ctwin.core.twin.evaluation import bone_error
    from ctwin.core.twin.registration import XRay, bone_cloud, register, to_line_integral
    from ctwin.core.twin.twin import build_twin, load_twin

    ap = argparse.ArgumentParser()
    ap.add_argument("--twin", default=None)
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--random", type=int, default=10)
    ap.add_argument("--presets", nargs="*", default=["all"])
    ap.add_argument("--conditions", nargs="*", default=["mono", "poly"])
    ap.add_argument("--views", nargs="*", default=["aplat", "ap"])
    ap.add_argument("--methods", nargs="*", default=["articulated", "rigid"])
    ap.add_argument("--photons", type=float, default=2e4)
    ap.add_argument("--kvp", type=float, default=100.0)
    ap.add_argument("--levels", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--effort", type=float, default=1.0)
    ap.add_argument("--soft-model", default="rigid-hu",
                    choices=["blend-uniform", "blend-hu", "rigid-uniform", "rigid-hu"],
                    help="the registration's soft-tissue model (core.twin.registration.bone_cloud): blocks "
                         "moved by the blend of their joints or rigidly with one, water or the CT's HU")
    ap.add_argument("--evolve-levels", type=int, nargs="*", default=None,
                    help="the levels (indices) of the global search of the arm chains and the trunk "
                         "(core.twin.registration.EVOLVE_LEVELS; none: off; default: the module's)")
    ap.add_argument("--shoulder-twist-sigma", type=float, default=None,
                    help="the prior's width (degrees) on the shoulders' rotation about the humerus "
                         "(rotation vector x; core.twin.registration.PRIOR_AXIS_SIGMA_DEG; default: the module's)")
    ap.add_argument("--prior-weight", type=float, default=None,
                    help="the weight of the prior toward the start pose (core.twin.registration.PRIOR_WEIGHT "
                         "with two or more views, PRIOR_WEIGHT_ONE_VIEW with one: both; default: the module's)")
    ap.add_argument("--evolve-extra", nargs="*", default=[],
                    help="further global searches KIND:LEVEL:SPAN:EVALS (KIND arm, leg, forearm (elbow + "
                         "wrist + hand, per side) or trunk; LEVEL an index into --levels; SPAN degrees per "
                         "joint axis) added to core.twin.registration.EVOLVE_GROUPS")
    ap.add_argument("--root-hypotheses", type=int, default=None,
                    help="root optima carried through the coarsest level (core.twin.registration.ROOT_HYPOTHESES)")
    ap.add_argument("--similarity", default=None, choices=["gc", "gc_tiles"],
                    help="core.twin.registration.SIMILARITY (default: the module's)")
    ap.add_argument("--tiles", type=int, default=None, help="core.twin.registration.TILES (gc_tiles)")
    ap.add_argument("--tiled-levels", type=int, nargs="*", default=None,
                    help="core.twin.registration.TILED_LEVELS: the level indices gc_tiles scores")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these cases (each keeps its index, hence its noise and start seeds, in the run)")
    ap.add_argument("--depth-mirror-levels", type=int, nargs="*", default=None,
                    help="with one view, the levels (indices) where each limb chain is also tried mirrored in "
                         "depth (core.twin.registration.DEPTH_MIRROR_LEVELS; none: off; default: the module's)")
    ap.add_argument("--posed-refine", action="store_true",
                    help="end with the refinement scored with the twin's posed DRR "
                         "(core.twin.registration.POSED_REFINE)")
    ap.add_argument("--posed-size", type=int, default=None, help="core.twin.registration.POSED_SIZE (px)")
    ap.add_argument("--posed-maxfev", type=int, default=None, help="core.twin.registration.POSED_MAXFEV")
    ap.add_argument("--posed-warp", type=float, default=None, help="core.twin.registration.POSED_WARP_MM")
    ap.add_argument("--posed-step", type=float, default=None,
                    help="core.twin.registration.POSED_STEP_DEG and POSED_STEP_MM (the first step)")
    ap.add_argument("--posed-decoupled", nargs="*", default=None,
                    help="core.twin.registration.POSED_DECOUPLED: joints also moved with their children's "
                         "world orientations kept")
    ap.add_argument("--resume", default=None,
                    help="a recorded run (--json) of the same cases and settings without the posed refinement: "
                         "each case's result is taken from it and only the posed refinement is run from it "
                         "(register()'s last stage, on the same images, start and prior); needs --posed-refine")
    ap.add_argument("--region-groups", nargs="*", default=None,
                    help="the groups scored over the region where their bones project "
                         "(core.twin.registration.REGION_GROUPS: neck, shoulder, elbow, wrist, ..., evolve_arm; "
                         "none: off; default: the module's)")
    ap.add_argument("--region-levels", type=int, nargs="*", default=None,
                    help="core.twin.registration.REGION_LEVELS: the level indices where the region scores")
    ap.add_argument("--region-span", type=float, default=None,
                    help="core.twin.registration.REGION_SPAN_DEG: the local stages' region covers each joint "
                         "axis turned by +- this")
    ap.add_argument("--region-margin", type=float, default=None,
                    help="core.twin.registration.REGION_MARGIN_MM: the bones' boxes dilated by this")
    ap.add_argument("--finest-repeats", type=int, default=None,
                    help="core.twin.registration.FINEST_REPEATS: the finest level's stages run again this many times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/bench_register")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    progress.set_quiet(True)
    if args.evolve_levels is not None:
        from ctwin.core.twin import registration
        registration.EVOLVE_LEVELS = tuple(args.evolve_levels)
    if args.depth_mirror_levels is not None:
        from ctwin.core.twin import registration
        registration.DEPTH_MIRROR_LEVELS = tuple(args.depth_mirror_levels)
    if args.prior_weight is not None:
        from ctwin.core.twin import registration
        registration.PRIOR_WEIGHT = registration.PRIOR_WEIGHT_ONE_VIEW = args.prior_weight
    if args.shoulder_twist_sigma is not None:
        from ctwin.core.twin import registration
        sig = dict(registration.PRIOR_AXIS_SIGMA_DEG)
        for side in ("left", "right"):
            sig[f"{side}_shoulder"] = (args.shoulder_twist_sigma,) + tuple(sig[f"{side}_shoulder"][1:])
        registration.PRIOR_AXIS_SIGMA_DEG = sig
    if args.evolve_extra:
        from ctwin.core.twin import registration
        groups = {k: list(v) for k, v in registration.EVOLVE_GROUPS.items()}
        names = {"arm": registration._ARM, "leg": registration._LEG, "forearm": registration._FOREARM,
                 "trunk": registration._TRUNK}
        for spec in args.evolve_extra:
            kind, li, span, fev = spec.split(":")
            groups.setdefault(int(li), []).append((kind, names[kind], float(span), int(fev)))
        registration.EVOLVE_GROUPS = {k: tuple(v) for k, v in groups.items()}
        registration.EVOLVE_LEVELS = tuple(sorted(set(registration.EVOLVE_LEVELS) | set(groups)))
        print("global searches:", registration.EVOLVE_GROUPS)
    if args.similarity is not None or args.tiles is not None:
        from ctwin.core.twin import registration
        registration.SIMILARITY = args.similarity or registration.SIMILARITY
        registration.TILES = args.tiles or registration.TILES
    if args.tiled_levels is not None:
        from ctwin.core.twin import registration
        registration.TILED_LEVELS = tuple(args.tiled_levels)
    if args.root_hypotheses is not None:
        from ctwin.core.twin import registration
        registration.ROOT_HYPOTHESES = args.root_hypotheses
    if args.posed_refine:
        from ctwin.core.twin import registration
        registration.POSED_REFINE = True
        for key, attr in (("posed_size", "POSED_SIZE"), ("posed_maxfev", "POSED_MAXFEV"),
                          ("posed_warp", "POSED_WARP_MM")):
            if getattr(args, key) is not None:
                setattr(registration, attr, getattr(args, key))
        if args.posed_step is not None:
            registration.POSED_STEP_DEG = registration.POSED_STEP_MM = args.posed_step
        if args.posed_decoupled is not None:
            registration.POSED_DECOUPLED = tuple(args.posed_decoupled)
    if args.resume and not args.posed_refine:
        raise SystemExit("--resume runs only the posed refinement: give --posed-refine")
    resumed = {}
    if args.resume:
        from ctwin.core.fileio import read_json
        resumed = {(r["case"], r["condition"], r["views"], r["method"]): r for r in read_json(args.resume)["rows"]}
    if args.region_groups is not None or args.region_levels is not None or args.region_span is not None \
            or args.region_margin is not None:
        from ctwin.core.twin import registration
        if args.region_groups is not None:
            registration.REGION_GROUPS = tuple(args.region_groups)
        if args.region_levels is not None:
            registration.REGION_LEVELS = tuple(args.region_levels)
        if args.region_span is not None:
            registration.REGION_SPAN_DEG = args.region_span
        if args.region_margin is not None:
            registration.REGION_MARGIN_MM = args.region_margin
        print("region similarity:", registration.REGION_GROUPS, "levels", registration.REGION_LEVELS,
              "span", registration.REGION_SPAN_DEG, "deg, margin", registration.REGION_MARGIN_MM, "mm")
    if args.finest_repeats is not None:
        from ctwin.core.twin import registration
        registration.FINEST_REPEATS = args.finest_repeats
        print("finest level's stages repeated", registration.FINEST_REPEATS, "times")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.twin:
        twin_dir = Path(args.twin)
    else:
        src = out / f"phantom_{args.spacing:g}"
        if not (src / "truth.json").is_file():
            write_phantom(src, pose="supine_arms_down", spacing=args.spacing, seed=0)
        twin_dir = out / f"twin_{args.spacing:g}"
        if not (twin_dir / "twin.json").is_file():
            build_twin(src / "ct.nii.gz", src / "seg.nii.gz", twin_dir)
    twin = load_twin(twin_dir)
    truth_a = _source_truth(twin)
    spacing = float(truth_a["spacing_mm"])
    cloud = bone_cloud(twin, soft_blend=args.soft_model.startswith("blend"),
                       soft_uniform=args.soft_model.endswith("uniform"))
    print(f"twin {twin_dir} ({spacing:g} mm), {len(cloud.names)} bones, {len(cloud.weight)} cloud points")

    rng = np.random.default_rng(args.seed)
    cases = [(f"random_{i}", random_pose(PRESETS["supine_arms_down"], rng)) for i in range(args.random)]
    presets = [p for p in PRESETS if p != "supine_arms_down"] if args.presets == ["all"] else \
        ([] if args.presets == ["none"] else args.presets)
    cases += [(p, PRESETS[p]) for p in presets]

    rows = []
    hdr = f"{'case':<20} {'cond':<5} {'views':<6} {'method':<12} {'start':>7} {'mean':>6} {'max':>6} {'truthpv':>7} {'s':>6}"
    print(hdr)
    for ci, (case, pose_b) in enumerate(cases):
        if args.only is not None and case not in args.only:
            continue
        ph = generate_phantom(pose=pose_b, spacing=spacing, seed=0)
        truth_b = ph.truth
        pv = prepare_volume(ph.ct)
        views = default_views(ph.ct, size=args.size)
        t_truth = twin.transl0_mm + (np.asarray(truth_b["transl"]) - np.asarray(truth_a["transl"]))
        floor = bone_error(twin, np.asarray(truth_b["pose"]), t_truth, truth_a, truth_b)
        start_pose, start_t = displaced_start(twin, np.random.default_rng([args.seed, ci]))
        e0 = bone_error(twin, start_pose, start_t, truth_a, truth_b)
        for cond in args.conditions:
            imgs = {}
            for vi, (vn, g) in enumerate(views.items()):
                kw = dict(photons=args.photons, seed=1000 * ci + vi)
                if cond == "poly":
                    kw["kvp"] = args.kvp
                li = render_value(pv, g, value="line_integral", **kw)
                imgs[vn] = XRay(vn, to_line_integral(li, "line_integral"), g, photons=args.photons)
            for vset in args.views:
                xr = [imgs["ap"], imgs["lateral"]] if vset == "aplat" else [imgs["ap"]]
                for method in args.methods:
                    t0 = time.perf_counter()
                    prev = resumed.get((case, cond, vset, method))
                    if args.resume and (prev is None or method != "articulated"):
                        continue
                    if prev is not None:
                        reg = resume_posed(twin, xr, cloud, start_pose, start_t, prev, tuple(args.levels),
                                           args.effort)
                    else:
                        reg = register(twin, xr, init_pose=start_pose, init_transl_mm=start_t,
                                       articulated=method == "articulated", levels=tuple(args.levels),
                                       seed=args.seed + ci, effort=args.effort, cloud=cloud)
                    dt = time.perf_counter() - t0 + (prev["seconds"] if prev is not None else 0.0)
                    e = bone_error(twin, reg.pose, reg.transl_mm, truth_a, truth_b)
                    row = {"case": case, "condition": cond, "views": vset, "method": method,
                           "start_mean": e0["mean"], "mean": e["mean"], "max": e["max"], "worst": e["worst"],
                           "truth_pose_mean": floor["mean"], "truth_pose_max": floor["max"], "seconds": dt,
                           "similarity": reg.similarity, "pose": reg.pose.tolist(),
                           "transl": reg.transl_mm.tolist()}
                    if prev is not None:
                        row.update(resumed_from={k: prev[k] for k in ("mean", "max", "seconds")},
                                   posed_stage=reg.stages[-1])
                    rows.append(row)
                    print(f"{case:<20} {cond:<5} {vset:<6} {method:<12} {e0['mean']:7.1f} {e['mean']:6.2f} "
                          f"{e['max']:6.2f} {floor['mean']:7.2f} {dt:6.1f}  worst {e['worst']}", flush=True)
    print()
    print("summary (bone_err mm; converged = mean <= 5 mm)")
    print(f"{'views':<6} {'method':<12} {'cond':<5} {'runs':>4} {'mean of means':>13} {'worst max':>9} "
          f"{'max of means':>12} {'converged':>9} {'s/run':>6} {'truth-pose mean':>15}")
    for vset in args.views:
        for method in args.methods:
            for cond in args.conditions:
                rr = [r for r in rows if r["views"] == vset and r["method"] == method and r["condition"] == cond]
                if not rr:
                    continue
                means = np.array([r["mean"] for r in rr])
                print(f"{vset:<6} {method:<12} {cond:<5} {len(rr):4d} {means.mean():13.2f} "
                      f"{max(r['max'] for r in rr):9.2f} {means.max():12.2f} "
                      f"{100 * np.mean(means <= 5.0):8.0f}% {np.mean([r['seconds'] for r in rr]):6.1f} "
                      f"{np.mean([r['truth_pose_mean'] for r in rr]):15.2f}")
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
