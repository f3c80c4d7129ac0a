"""Cost of a new pose of the phantom twin and the real CT twin against a static DRR, every repetition
a pose not rendered before. Prints measured numbers.

    .venv/bin/python benchmarks/bench_pose_cost.py [--spacing 3] [--sizes 256,512] [--presets a,b]
        [--reps 5] [--jitter-deg 2] [--seed 0] [--cache DIR] [--device auto]
        [--real-presets hip_flexion,sitting,walking_stride] [--no-real] [--no-phantom] [--profile]

The phantom (``--seed``) is generated at supine_arms_down and decomposed (``prepare_articulated``;
``--cache DIR`` keeps the CT and the decomposition between runs). Repetition r of a preset poses it
at the preset with a seeded ``--jitter-deg`` rotation about a random axis on every joint (body
joints 1-23), so that no per-pose cache counts; the bone transforms and joint deltas come from the
phantom's own kinematics at that jittered pose (``core.phantom.phantom`` segment transforms, no
voxelisation). Interleaved per repetition, best of ``--reps``:

- static: ``render_drr(ct, g)`` on the loaded CT (whatever it caches by itself counts);
- posed, one view: ``posed_scene`` (inverse warp) + ``render_posed`` (composition + render), the
  drawing of the jittered pose itself not timed;
- posed, AP + lateral of one new pose against the two static renders.

The targets are printed beside each ratio: one view <= 1.5x the static DRR, AP + lateral
<= 1.2x the two static DRRs. The real abdomen CT twin (``shared/data/real_ct/abdomen_pelvis``,
built once by ``build_twin`` into ``--cache``, or a fresh temporary folder) is measured the same way
at ``--real-presets`` (the twin's own preset pose plus the seeded jitter, posed by
``Twin.posed_scene``); it is skipped, with the reason, where the data is absent.

``--profile`` prints instead where the time of a new pose goes (each posing and composition
kernel, the Python between them, the render). Ratios are measured in the same run (the shared
2-core machine's load changes between runs).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")
from ctwin.core.twin import articulated as A
from ctwin.core.phantom import phantom as PH
from ctwin.core.drr.carm import default_views  # noqa: E402
from ctwin.core.volumes.labels import is_skeletal  # noqa: E402
from ctwin.core.drr.projector import render_drr  # noqa: E402
from ctwin.core.body.skeleton import forward_kinematics, rodrigues  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis"

WARP_MM = 12.0  # core.twin.twin.WARP_SPACING_MM: what twins render with


def pose_truth(pose, seed):
    """Bone transforms and joints (world mm) of the phantom at ``pose`` (72 floats or a preset)."""
    pose_v = PH._as_pose(pose)[0]
    anat = PH._packed(seed)[0]
    T = PH._segment_transforms(anat, pose_v, np.zeros(3))
    bones = {st.name: T[st.seg] for st in anat.structures if st.name and is_skeletal(st.name)}
    return {"pose": pose_v, "joints": forward_kinematics(pose_v, anat.joints)[1], "bones": bones}


def jittered(preset, deg, rng):
    """The preset (a name or 72 floats) with a rotation of ``deg`` degrees about a random axis
    composed onto joints 1-23."""
    from scipy.spatial.transform import Rotation

    p = np.array(PH._as_pose(preset)[0] if isinstance(preset, str) else preset, dtype=np.float64).reshape(24, 3)
    ax = rng.normal(size=(23, 3))
    ax /= np.linalg.norm(ax, axis=1, keepdims=True)
    R = rodrigues(p[1:]) @ rodrigues(ax * np.deg2rad(deg))
    p[1:] = Rotation.from_matrix(R).as_rotvec()
    return p.reshape(-1)


def deltas(ta, tb):
    bd = {n: tb["bones"][n] @ np.linalg.inv(ta["bones"][n]) for n in tb["bones"] if n in ta["bones"]}
    jd = A.joint_deltas_between(ta["pose"], ta["joints"], tb["pose"], tb["joints"])
    return bd, jd


def load_or_build(spacing, seed, cache):
    from ctwin.core.volumes.volume import load_nifti, save_nifti

    d = Path(cache) / f"phantom_s{seed}_{spacing:g}mm" if cache else None
    if d is not None and (d / "articulated.json").exists():
        ct = load_nifti(d / "ct.nii.gz")
        return ct.with_data(np.asarray(ct.data).astype(np.int16)), A.ArticulatedCT.load(d)
    ph = PH.generate_phantom("supine_arms_down", spacing=spacing, seed=seed)
    art = A.prepare_articulated(ph.ct, ph.seg, ph.labels)
    if d is not None:
        d.mkdir(parents=True, exist_ok=True)
        art.save(d)
        save_nifti(ph.ct, d / "ct.nii.gz")
    return ph.ct, art


def measure(label, size, ct, views, poser, reps, dev):
    """Best-of-``reps`` cost of a new pose against ``render_drr(ct, g)``, interleaved; prints one line.
    ``poser`` = (new_pose, pose_scene): ``new_pose()`` draws the next jittered pose (not timed: for the
    phantom it evaluates the phantom's own kinematics), ``pose_scene(p)`` poses the CT (timed)."""
    new_pose, pose_scene = poser
    g, g2 = views["ap"], views["lateral"]
    A.render_posed(pose_scene(new_pose()), g, device=dev)  # warm-up (compilation, resident arrays, buffers)
    A.render_posed(pose_scene(new_pose()), g2, device=dev)
    render_drr(ct, g, device=dev)
    render_drr(ct, g2, device=dev)
    t = {"static": [], "static2": [], "one": [], "two": [], "warp": []}
    grid = []
    for _ in range(reps):
        s = time.perf_counter()
        render_drr(ct, g, device=dev)
        t["static"].append(time.perf_counter() - s)
        s = time.perf_counter()
        render_drr(ct, g2, device=dev)
        t["static2"].append(time.perf_counter() - s)
        p = new_pose()
        s = time.perf_counter()
        sc = pose_scene(p)
        t["warp"].append(time.perf_counter() - s)
        A.render_posed(sc, g, device=dev)
        t["one"].append(time.perf_counter() - s)
        grid.append(float(np.prod(sc.grid[1])) / float(np.prod(ct.shape)))
        p = new_pose()
        s = time.perf_counter()
        sc = pose_scene(p)
        A.render_posed(sc, g, device=dev)
        A.render_posed(sc, g2, device=dev)
        t["two"].append(time.perf_counter() - s)
    b = {k: min(v) for k, v in t.items()}
    r1 = b["one"] / b["static"]
    r2 = b["two"] / (b["static"] + b["static2"])
    print(f"[cost] {size}^2 {label:28s} static {b['static'] * 1e3:5.0f} ms, new pose {b['one'] * 1e3:5.0f} ms "
          f"(pose {b['warp'] * 1e3:4.0f} ms, grid/CT {np.mean(grid):4.2f}): ratio {r1:4.2f} "
          f"[{'met' if r1 <= 1.5 else 'NOT met'}: <= 1.5]; AP+lateral {r2:4.2f} "
          f"[{'met' if r2 <= 1.2 else 'NOT met'}: <= 1.2]", flush=True)
    return r1, r2


def profile(label, size, ct, views, poser, reps, dev):
    """Where the time of one new pose and view goes: each posing and composition kernel (numba,
    timed around the call), the Python between them, and the render; medians over ``reps`` poses
    after two warm-up poses. Prints one line."""
    from collections import defaultdict

    from ctwin.core.drr import projector as P

    new_pose, pose_scene = poser
    g = views["ap"]
    times = defaultdict(list)
    cur = defaultdict(float)
    tables = (A._kernels(), P.compose_kernels())
    saved = [dict(t) for t in tables]

    def timed(name, f):
        def w(*args):
            s = time.perf_counter()
            r = f(*args)
            cur[name] += time.perf_counter() - s
            return r
        return w

    for t in tables:
        for name, f in list(t.items()):
            t[name] = timed(name, f)
    try:
        for r in range(reps + 2):
            cur.clear()
            s0 = time.perf_counter()
            render_drr(ct, g, device=dev)
            p = new_pose()
            s1 = time.perf_counter()
            sc = pose_scene(p)
            s2 = time.perf_counter()
            pv = P.compose_scene(sc)
            s3 = time.perf_counter()
            render_drr(pv, g, device=dev)
            s4 = time.perf_counter()
            if r < 2:
                continue
            pose_k = sum(v for k, v in cur.items() if k in tables[0])
            comp_k = sum(v for k, v in cur.items() if k in tables[1])
            row = {"static": s1 - s0, "pose": s2 - s1, "compose": s3 - s2, "render": s4 - s3,
                   "pose python": (s2 - s1) - pose_k, "compose python": (s3 - s2) - comp_k}
            row.update(cur)
            for k, v in row.items():
                times[k].append(v)
    finally:
        for t, orig in zip(tables, saved):
            t.update(orig)
    med = {k: 1e3 * float(np.median(v + [0.0] * (reps - len(v)))) for k, v in times.items()}
    parts = ", ".join(f"{k} {v:.0f}" for k, v in med.items() if k not in ("static", "pose", "compose", "render"))
    print(f"[profile] {size}^2 {label:28s} static {med['static']:.0f} ms | pose {med['pose']:.0f} + compose "
          f"{med['compose']:.0f} + render {med['render']:.0f} ms | {parts} (ms, medians)", flush=True)


def real_twin(cache):
    """The real abdomen CT twin (built once into ``cache``), or None with the reason printed."""
    from ctwin.core.twin.twin import build_twin, load_twin

    if not (REAL / "ct.nii.gz").exists():
        print(f"[real] abdomen_pelvis: skipped ({REAL} not found)", flush=True)
        return None
    import tempfile

    d = Path(cache or tempfile.mkdtemp(prefix="bench_pose_cost_")) / "abdomen_twin"
    if not (d / "twin.json").exists():
        build_twin(REAL / "ct.nii.gz", REAL / "seg.nii.gz", d)
    return load_twin(d)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--presets", default="")
    ap.add_argument("--real-presets", default="hip_flexion,sitting,walking_stride")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--no-phantom", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--jitter-deg", type=float, default=2.0)
    ap.add_argument("--cache", default="")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", action="store_true", help="where the time of a new pose goes, per kernel")
    a = ap.parse_args(argv)
    run = profile if a.profile else measure
    from ctwin.core.rig.poses import PRESETS

    sizes = [int(s) for s in a.sizes.split(",")]
    dev = a.device
    ratios = []
    if not a.no_phantom:
        ct, art = load_or_build(a.spacing, a.seed, a.cache)
        ta = pose_truth("supine_arms_down", a.seed)
        presets = [p for p in (a.presets.split(",") if a.presets else PRESETS) if p != "supine_arms_down"]
        print(f"[setup] phantom seed {a.seed} at {a.spacing:g} mm, CT {ct.shape}, {len(art.parts)} parts; "
              f"jitter {a.jitter_deg:g} deg on joints 1-23, best of {a.reps}", flush=True)
        for size in sizes:
            views = default_views(ct.bbox_world(), size=size)
            for pname in presets:
                rng = np.random.default_rng([a.seed, size, sum(map(ord, pname))])

                def new_pose():
                    return deltas(ta, pose_truth(jittered(pname, a.jitter_deg, rng), a.seed))

                def pose_scene(p):
                    return A.posed_scene(art, *p, warp_spacing_mm=WARP_MM)

                ratios.append(run(f"phantom {pname}", size, ct, views, (new_pose, pose_scene), a.reps, dev))
    if not a.no_real:
        twin = real_twin(a.cache)
        if twin is not None:
            rct = twin.ct
            rct = rct.with_data(np.asarray(rct.data).astype(np.int16))
            print(f"[setup] real abdomen CT twin, CT {rct.shape}, {len(twin.articulated.parts)} parts", flush=True)
            for size in sizes:
                views = default_views(rct.bbox_world(), size=size)
                for pname in (p for p in a.real_presets.split(",") if p):
                    p0, t0 = twin.resolve_pose(pname)
                    rng = np.random.default_rng([7, size, sum(map(ord, pname))])

                    def new_pose():
                        return jittered(p0, a.jitter_deg, rng)

                    def pose_scene(p):
                        return twin.posed_scene(p, t0)

                    ratios.append(run(f"real CT {pname}", size, rct, views, (new_pose, pose_scene), a.reps, dev))
    if ratios and not a.profile:
        r = np.array(ratios)
        print(f"[summary] one view: {r[:, 0].min():.2f}-{r[:, 0].max():.2f}x (target <= 1.5, met in "
              f"{int(np.sum(r[:, 0] <= 1.5))}/{len(r)}); AP+lateral: {r[:, 1].min():.2f}-{r[:, 1].max():.2f}x "
              f"(target <= 1.2, met in {int(np.sum(r[:, 1] <= 1.2))}/{len(r)})", flush=True)


if __name__ == "__main__":
    main()
