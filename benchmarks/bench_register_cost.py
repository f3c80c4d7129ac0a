"""Cost of one registration's similarity evaluations (``core.twin.registration``), split by part.

    .venv/bin/python benchmarks/bench_register_cost.py --twin DIR --xray AP.tif --xray LAT.tif
        [--init POSE.json | --displace 4,-3,2,25,-15,20] [--levels 64,128] [--starts 4] [--seed 0]
        [--root REPO] [--json FILE]
    .venv/bin/python benchmarks/bench_register_cost.py --twin DIR --preset arm_abducted [--size 256]
        (the target as ``bench_register.py --random 0 --presets NAME`` makes it: the phantom at
        the preset, AP + lateral by ``render --ct``'s code with Poisson noise, the displaced start)

Runs ``register`` once (the numba kernel compiled beforehand) with a timer around each part of
the cost function: the pose maths (``_Problem._apply``: the optimiser's values into a pose;
``transforms``: the structures' 4x4s; ``_penalty``: prior and joint ranges), the splats
(``splat_bones``) and the similarity (``_Level.score``); the rest of an evaluation (scipy's
Powell and differential evolution, copies, composition) is the remainder. Prints seconds,
evaluations, milliseconds per evaluation and per part, the final similarity and a digest of the
result (pose, translation, similarity and every stage's scores), so two versions of the code can
be compared: ``--root`` loads the package from another checkout (e.g. ``git worktree`` or
``git archive`` of an older commit) with this script's own arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                    help="the checkout whose package is measured (default: this one)")
    ap.add_argument("--twin", required=True)
    ap.add_argument("--xray", action="append", default=[])
    ap.add_argument("--preset", default=None, help="make the target as bench_register.py does for this preset")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--init", default=None)
    ap.add_argument("--displace", default=None,
                    help="start: the acquisition pose with the root rotated by rx,ry,rz degrees and moved by x,y,z mm")
    ap.add_argument("--levels", default="64,128,256")
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-parts", action="store_true", help="no per-part timers (the plain total)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root / "tools"))
    from launch import load_package

    load_package("ctwin")
    import numpy as np

    from ctwin.core import progress
    from ctwin.core.body.skeleton import rodrigues, rotation_to_rotvec
    from ctwin.core.twin import registration as R
    from ctwin.core.twin.twin import load_twin

    progress.set_quiet(True)
    twin = load_twin(args.twin)
    if args.preset:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_register import displaced_start

        from ctwin.core.drr.carm import default_views
        from ctwin.core.drr.projector import prepare_volume, render_value
        from ctwin.core.phantom.phantom import generate_phantom
        from ctwin.core.rig.poses import PRESETS
        from ctwin.core.twin.evaluation import _source_truth

        spacing = float(_source_truth(twin)["spacing_mm"])
        ph = generate_phantom(pose=PRESETS[args.preset], spacing=spacing, seed=0)
        pv = prepare_volume(ph.ct)
        xr = []
        for vi, (vn, g) in enumerate(default_views(ph.ct, size=args.size).items()):
            li = render_value(pv, g, value="line_integral", photons=2e4, seed=vi)
            xr.append(R.XRay(vn, R.to_line_integral(li, "line_integral"), g, photons=2e4))
        p0, t0 = displaced_start(twin, np.random.default_rng([args.seed, 0]))
    else:
        xr = [R.load_xray(p, twin.ct_bbox_mm) for p in args.xray]
        p0, t0 = twin.pose0.copy(), twin.transl0_mm.copy()
        if args.init:
            from ctwin.core.rig.poses import resolve_pose

            p = resolve_pose(args.init)
            p0, t0 = np.asarray(p["pose"], dtype=np.float64), np.asarray(p.get("transl", t0), dtype=np.float64)
        if args.displace:
            d = [float(v) for v in args.displace.split(",")]
            p0[0:3] = rotation_to_rotvec(rodrigues(np.radians(d[:3])) @ rodrigues(p0[0:3]))
            t0 = t0 + np.asarray(d[3:6])
    levels = tuple(int(v) for v in args.levels.split(","))
    cloud = R.bone_cloud(twin)
    R.register(twin, xr, init_pose=p0, init_transl_mm=t0, levels=(16,), root_starts=0, cloud=cloud,
               effort=0.01)  # compiles the splat kernel

    spent = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    if not args.no_parts:
        for cls, name, part in ((R._Problem, "_apply", "pose_apply"), (R._Problem, "transforms", "transforms"),
                                (R._Problem, "_penalty", "penalty"), (R._Level, "score", "similarity")):
            setattr(cls, name, timed(part, getattr(cls, name)))
        R.splat_bones = timed("splat", R.splat_bones)
    t = time.perf_counter()
    reg = R.register(twin, xr, init_pose=p0, init_transl_mm=t0, levels=levels, root_starts=args.starts,
                     seed=args.seed, cloud=cloud)
    dt = time.perf_counter() - t
    evals = sum(s.get("evals", 0) for s in reg.stages)
    stages = [{k: v for k, v in s.items() if k != "seconds"} for s in reg.stages]
    digest = hashlib.sha256(json.dumps([reg.pose.tolist(), reg.transl_mm.tolist(), reg.similarity, stages],
                                       default=str).encode()).hexdigest()[:16]
    print(f"code {root}")
    print(f"register: {dt:.2f} s, {evals} evaluations, {1000 * dt / evals:.3f} ms per evaluation")
    for part, s in sorted(spent.items()):
        print(f"  {part:<11} {1000 * s / evals:7.3f} ms per evaluation ({100 * s / dt:4.1f} %)")
    if spent:
        rest = dt - sum(spent.values())
        print(f"  {'rest':<11} {1000 * rest / evals:7.3f} ms per evaluation ({100 * rest / dt:4.1f} %)")
    for size in levels:
        st = [s for s in reg.stages if s.get("level") == size and "seconds" in s and "evals" in s]
        ev, sec = sum(s["evals"] for s in st), sum(s["seconds"] for s in st)
        if ev:
            print(f"  level {size:>4} px: {ev:6d} evaluations, {sec:7.2f} s, {1000 * sec / ev:.3f} ms per evaluation")
    print(f"similarity {reg.similarity!r}, result digest {digest}")
    if args.json:
        Path(args.json).write_text(json.dumps({"root": str(root), "seconds": dt, "evals": evals,
                                               "parts": spent, "similarity": reg.similarity, "digest": digest,
                                               "pose": reg.pose.tolist(), "transl": reg.transl_mm.tolist()},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
