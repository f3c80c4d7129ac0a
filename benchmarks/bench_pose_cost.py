"""Cost of a new pose of the phantom twin against a static DRR, every repetition a pose not rendered
before. Prints measured numbers.

    .venv/bin/python benchmarks/bench_pose_cost.py [--spacing 3] [--sizes 256,512] [--presets a,b]
        [--reps 5] [--jitter-deg 2] [--seed 0] [--cache DIR] [--device auto]

The phantom (``--seed``) is generated at supine_arms_down and decomposed (``prepare_articulated``;
``--cache DIR`` keeps the CT and the decomposition between runs). Repetition r of a preset poses it
at the preset with a seeded ``--jitter-deg`` rotation about a random axis on every joint (body
joints 1-23), so that no per-pose cache counts; the bone transforms and joint deltas come from the
phantom's own kinematics at that jittered pose (``core.phantom.phantom`` segment transforms, no
voxelisation). Interleaved per repetition, best of ``--reps``:

- static: ``render_drr(ct, g)`` on the loaded CT (whatever it caches by itself counts);
- posed, one view: ``posed_scene`` (inverse warp) + ``render_posed`` (composition + render), with the
  composed frame's buffer reused (only the blocks the previous frame wrote are restored);
- posed, one view, full fill: the same with the buffer state dropped first (every voxel of the grid
  rewritten: the composition before buffer reuse);
- posed, AP + lateral of one new pose against the two static renders.

Ratios are measured in the same run (the shared 2-core machine's load changes between runs).
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

WARP_MM = 12.0  # core.twin.twin.WARP_SPACING_MM: what twins render with


def pose_truth(pose, seed):
    """Bone transforms and joints (world mm) of the phantom at ``pose`` (72 floats or a preset)."""
    pose_v, _ = PH._as_pose(pose)
    anat = PH._packed(seed)[0]
    T = PH._segment_transforms(anat, pose_v, np.zeros(3))
    bones = {st.name: T[st.seg] for st in anat.structures if st.name and is_skeletal(st.name)}
    return {"pose": pose_v, "joints": forward_kinematics(pose_v, anat.joints)[1], "bones": bones}


def jittered(preset, deg, rng):
    """The preset with a rotation of ``deg`` degrees about a random axis composed onto joints 1-23."""
    from scipy.spatial.transform import Rotation

    p = np.array(PH._as_pose(preset)[0], dtype=np.float64).reshape(24, 3)
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--presets", default="")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--jitter-deg", type=float, default=2.0)
    ap.add_argument("--cache", default="")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    from ctwin.core.rig.poses import PRESETS

    ct, art = load_or_build(a.spacing, a.seed, a.cache)
    ta = pose_truth("supine_arms_down", a.seed)
    presets = [p for p in (a.presets.split(",") if a.presets else PRESETS) if p != "supine_arms_down"]
    dev = a.device
    print(f"[setup] phantom seed {a.seed} at {a.spacing:g} mm, CT {ct.shape}, {len(art.parts)} parts; "
          f"jitter {a.jitter_deg:g} deg on joints 1-23, best of {a.reps}", flush=True)
    for size in (int(s) for s in a.sizes.split(",")):
        views = default_views(ct.bbox_world(), size=size)
        g, g2 = views["ap"], views["lateral"]
        for pname in presets:
            rng = np.random.default_rng([a.seed, size, sum(map(ord, pname))])
            new_pose = lambda: deltas(ta, pose_truth(jittered(pname, a.jitter_deg, rng), a.seed))  # noqa: E731
            A.render_posed(A.posed_scene(art, *new_pose(), warp_spacing_mm=WARP_MM), g, device=dev)  # warm-up
            render_drr(ct, g, device=dev)
            t = {"static": [], "static2": [], "one": [], "full": [], "two": [], "warp": []}
            for _ in range(a.reps):
                s = time.perf_counter()
                render_drr(ct, g, device=dev)
                t["static"].append(time.perf_counter() - s)
                s = time.perf_counter()
                render_drr(ct, g2, device=dev)
                t["static2"].append(time.perf_counter() - s)
                bd, jd = new_pose()
                s = time.perf_counter()
                sc = A.posed_scene(art, bd, jd, warp_spacing_mm=WARP_MM)
                t["warp"].append(time.perf_counter() - s)
                A.render_posed(sc, g, device=dev)
                t["one"].append(time.perf_counter() - s)
                bd, jd = new_pose()
                s = time.perf_counter()
                sc = A.posed_scene(art, bd, jd, warp_spacing_mm=WARP_MM)
                saved = dict(sc._buffer_state)
                sc._buffer_state.clear()  # this frame is composed without buffer reuse
                A.render_posed(sc, g, device=dev)
                t["full"].append(time.perf_counter() - s)
                used = id(next(reversed(sc._composed.values()))[2])
                for key, st in saved.items():  # the other buffers keep their state
                    if key != used:
                        sc._buffer_state.setdefault(key, st)
                bd, jd = new_pose()
                s = time.perf_counter()
                sc = A.posed_scene(art, bd, jd, warp_spacing_mm=WARP_MM)
                A.render_posed(sc, g, device=dev)
                A.render_posed(sc, g2, device=dev)
                t["two"].append(time.perf_counter() - s)
            b = {k: min(v) for k, v in t.items()}
            print(f"[cost] {size}^2 {pname:20s} static {b['static'] * 1e3:5.0f} ms, new pose {b['one'] * 1e3:5.0f} ms "
                  f"(warp {b['warp'] * 1e3:4.0f}): ratio {b['one'] / b['static']:4.2f} "
                  f"(full fill {b['full'] / b['static']:4.2f}); AP+lateral "
                  f"{b['two'] / (b['static'] + b['static2']):4.2f}", flush=True)


if __name__ == "__main__":
    main()
