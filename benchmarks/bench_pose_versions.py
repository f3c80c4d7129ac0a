"""Cost of a new pose, this tree against an earlier version of it, in ONE process: both packages are
loaded side by side and every repetition interleaves them, so that the shared machine's load changes
both alike. Prints measured ratios.

    git archive COMMIT | tar -x -C /tmp/base      # the earlier version, outside this repository
    .venv/bin/python benchmarks/bench_pose_versions.py --base /tmp/base [--sizes 256,512] [--reps 5]
        [--cache DIR] [--what all|phantom|real] [--pose-only] [--identical N] [--fidelity]

Per row (the phantom presets of ``bench_pose_cost.py``, then the real abdomen CT twin at hip_flexion,
sitting and walking_stride; each repetition the preset plus a seeded 2-degree jitter on every joint):
static AP and lateral ``render_drr(ct, g)``, then through each version a new pose rendered AP, and a
new pose rendered AP + lateral. Best of ``--reps``; ratios against the static render of the same run,
"new/old" the ratio of the two versions' one-view times. ``--pose-only`` times the pose alone
(``posed_scene``) through each version instead, wall and process CPU time. The phantom's CT and decomposition come from
``bench_pose_cost.load_or_build`` (``--cache``), the real twin from ``bench_pose_cost.real_twin``;
both versions read the same files. ``--identical N`` checks instead that the two versions give the
same frames: N new poses per row through each version, the warp, the grid, ``scene.info``, the
parts' placements, the composed frame (voxel for voxel, and its empty-space grid) and the AP and
lateral DRRs (``--sizes``, bit for bit) compared; it prints the empty-space blocks each version marks
(and the exact grid's count) and the largest image difference relative to the image maximum.
``--fidelity`` prints instead ``bench_posed_drr.py``'s target-pose fidelity (seed-0 3 mm phantom,
the truth's transforms) through both versions, PSNR to 0.01 dB, and the largest image difference.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_pose_cost as B  # noqa: E402  (loads this tree as ``ctwin``)

from ctwin.core.drr.carm import default_views  # noqa: E402
from ctwin.core.drr.projector import render_drr  # noqa: E402
from ctwin.core.rig.poses import PRESETS  # noqa: E402

A = B.A


def load_base(root: Path):
    name = "ctwin_old"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    m = importlib.util.module_from_spec(spec)
    sys.modules[name] = m
    spec.loader.exec_module(m)
    from ctwin_old.core.twin import articulated as AO  # noqa: E402
    from ctwin_old.core.twin import twin as TO  # noqa: E402

    return AO, TO


def pose_row(label, new_pose, versions, reps):
    """The pose alone (``posed_scene``: warp and placed parts, no composition or render) through each
    version, interleaved, best of ``reps``: wall time and process CPU time (both cores together; less
    sensitive to the other processes of a shared machine than wall time)."""
    for pose, _ in versions.values():  # warm-up: compilation, cached inputs
        pose(new_pose())
    t = {k: [] for k in versions}
    for _ in range(reps):
        for key, (pose, _) in versions.items():
            p = new_pose()
            w, c = time.perf_counter(), time.process_time()
            pose(p)
            t[key].append((time.perf_counter() - w, time.process_time() - c))
    b = {k: (min(v[0] for v in t[k]), min(v[1] for v in t[k])) for k in t}
    print(f"[pose] {label:26s} wall: old {b['old'][0] * 1e3:5.0f} ms new {b['new'][0] * 1e3:5.0f} ms "
          f"(new/old {b['new'][0] / b['old'][0]:4.2f}) | CPU: old {b['old'][1] * 1e3:5.0f} ms new "
          f"{b['new'][1] * 1e3:5.0f} ms (new/old {b['new'][1] / b['old'][1]:4.2f})", flush=True)


def identical_row(label, size, views, new_pose, versions, n, P, PO):
    """``n`` new poses through both versions: whether everything each frame is made of is equal."""
    same = {"warp": 0, "grid": 0, "info": 0, "parts": 0, "frame": 0, "occ": 0, "images": 0}
    blocks = [0, 0, 0]  # empty-space blocks marked: old, new, exact grid of the new frame's voxels
    dmax = 0.0
    for _ in range(n):
        p = new_pose()
        sc = {k: pose(p) for k, (pose, _) in versions.items()}
        a, b = sc["new"], sc["old"]
        wa = None if a.warp is None else (np.asarray(a.warp[0]), a.warp[1])
        wb = None if b.warp is None else (np.asarray(b.warp[0]), b.warp[1])
        same["warp"] += (wa is None and wb is None) or (wa is not None and wb is not None and np.array_equal(
            wa[0], wb[0], equal_nan=True) and np.array_equal(wa[1], wb[1]))
        same["grid"] += all(np.array_equal(x, y) for x, y in zip(a.grid, b.grid))
        same["info"] += a.info == b.info
        same["parts"] += all(np.array_equal(x.affine, y.affine) for x, y in zip(a.parts, b.parts))
        fa, fb = P.compose_scene(a), PO.compose_scene(b)
        same["frame"] += fa.shape == fb.shape and np.array_equal(fa.flat, fb.flat) and np.array_equal(fa.affine, fb.affine)
        same["occ"] += np.array_equal(fa.occ, fb.occ)
        blocks[0] += int(np.count_nonzero(fb.occ))
        blocks[1] += int(np.count_nonzero(fa.occ))
        blocks[2] += int(np.count_nonzero(P.occupancy_grid(fa.flat, fa.lut, fa.shape)))
        eq = True
        for v in ("ap", "lateral"):
            ia, ib = versions["new"][1](a, views[v]), versions["old"][1](b, views[v])
            eq = eq and np.array_equal(ia, ib)
            dmax = max(dmax, float(np.abs(ia.astype(np.float64) - ib).max() / max(float(np.abs(ib).max()), 1e-30)))
        same["images"] += eq
    print(f"[identical] {size}^2 {label:26s} " + ", ".join(f"{k} {v}/{n}" for k, v in same.items())
          + f" | empty-space blocks marked old {blocks[0]}, new {blocks[1]}, exact (from the new frames' voxels) "
          f"{blocks[2]}; largest image difference {dmax:.1e} of the image maximum", flush=True)
    return all(v == n for v in same.values())


def fidelity_rows(AO, size):
    """``bench_posed_drr.py``'s target poses (the seed-0 3 mm phantom decomposed at supine_arms_down,
    posed to each preset with the truth's transforms, 12 mm warp) through both versions: SSIM / PSNR
    (to 0.01 dB) against the phantom CT generated at the pose, AP and lateral, and the largest
    difference between the versions' images."""
    from ctwin.core.meshes.metrics import drr_similarity
    from ctwin.core.phantom.phantom import generate_phantom

    ph = generate_phantom("supine_arms_down", spacing=3.0)
    arts = {"new": A.prepare_articulated(ph.ct, ph.seg, ph.labels),
            "old": AO.prepare_articulated(ph.ct, ph.seg, ph.labels)}
    mods = {"new": A, "old": AO}
    ta = ph.truth
    views = default_views(ph.ct.bbox_world(), size=size)
    for pname in (p for p in PRESETS if p != "supine_arms_down"):
        pb = generate_phantom(pname, spacing=3.0)
        tb = pb.truth
        bd = {n: np.asarray(tb["bones"][n]) @ np.linalg.inv(np.asarray(ta["bones"][n]))
              for n in tb["bones"] if n in ta["bones"]}
        jd = A.joint_deltas_between(ta["pose"], ta["joints"], tb["pose"], tb["joints"])
        sc = {k: mods[k].posed_scene(arts[k], bd, jd, warp_spacing_mm=B.WARP_MM) for k in mods}
        for vname, g in views.items():
            ref = render_drr(pb.ct, g, device="cpu")
            im = {k: mods[k].render_posed(sc[k], g, device="cpu") for k in mods}
            s = {k: drr_similarity(im[k], ref) for k in mods}
            d = float(np.abs(im["new"].astype(np.float64) - im["old"]).max() / np.abs(im["old"]).max())
            print(f"[fidelity] {size}^2 {pname:20s} {vname:8s} old SSIM {s['old']['ssim']:.4f} PSNR "
                  f"{s['old']['psnr_db']:.2f} dB | new SSIM {s['new']['ssim']:.4f} PSNR {s['new']['psnr_db']:.2f} dB "
                  f"| largest difference {d:.1e} of the image maximum", flush=True)


def row(label, size, ct, views, new_pose, versions, reps):
    g, g2 = views["ap"], views["lateral"]
    for pose, render in versions.values():  # warm-up: compilation, resident arrays, buffers
        for gg in (g, g2):
            render(pose(new_pose()), gg)
    render_drr(ct, g)
    render_drr(ct, g2)
    t = {k: [] for k in ("s", "s2", "new", "old", "new2", "old2")}
    for _ in range(reps):
        s = time.perf_counter()
        render_drr(ct, g)
        t["s"].append(time.perf_counter() - s)
        s = time.perf_counter()
        render_drr(ct, g2)
        t["s2"].append(time.perf_counter() - s)
        for key, (pose, render) in versions.items():
            p = new_pose()
            s = time.perf_counter()
            render(pose(p), g)
            t[key].append(time.perf_counter() - s)
            p = new_pose()
            s = time.perf_counter()
            sc = pose(p)
            render(sc, g)
            render(sc, g2)
            t[key + "2"].append(time.perf_counter() - s)
    b = {k: min(v) for k, v in t.items()}
    s2 = b["s"] + b["s2"]
    print(f"[versions] {size}^2 {label:26s} static {b['s'] * 1e3:5.0f} ms | one view: old {b['old'] / b['s']:4.2f}x "
          f"new {b['new'] / b['s']:4.2f}x (new/old {b['new'] / b['old']:4.2f}) | AP+lat: old {b['old2'] / s2:4.2f}x "
          f"new {b['new2'] / s2:4.2f}x", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="a tree of the earlier version (git archive COMMIT)")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cache", default="")
    ap.add_argument("--what", choices=("all", "phantom", "real"), default="all")
    ap.add_argument("--pose-only", action="store_true",
                    help="time the pose alone (posed_scene), wall and CPU, instead of a new pose rendered")
    ap.add_argument("--identical", type=int, default=0, metavar="N",
                    help="compare N new poses per row between the versions (frames, images) instead of timing")
    ap.add_argument("--fidelity", action="store_true",
                    help="bench_posed_drr.py's target-pose fidelity through both versions instead of timing")
    a = ap.parse_args(argv)
    base = Path(a.base).resolve()
    if not (base / "__init__.py").exists() or not (base / "core" / "twin" / "articulated.py").exists():
        raise SystemExit(f"bench_pose_versions: {base} is not a ctwin tree")
    AO, TO = load_base(base)
    if a.fidelity:
        for size in (int(s) for s in a.sizes.split(",")):
            fidelity_rows(AO, size)
        return 0
    from ctwin.core.drr import projector as P
    from ctwin_old.core.drr import projector as PO

    if a.identical:
        def run_row(label, size, ct, views, draw, versions):
            ok.append(identical_row(label, size, views, draw, versions, a.identical, P, PO))
    elif a.pose_only:
        def run_row(label, size, ct, views, draw, versions):
            pose_row(label, draw, versions, a.reps)
    else:
        def run_row(label, size, ct, views, draw, versions):
            row(label, size, ct, views, draw, versions, a.reps)
    ok = []
    cache = a.cache
    if not cache:
        import tempfile

        cache = tempfile.mkdtemp(prefix="bench_pose_versions_")
    for size in ([0] if a.pose_only else (int(s) for s in a.sizes.split(","))):
        if a.what in ("all", "phantom"):
            ct, art = B.load_or_build(3.0, 0, cache)
            art_old = AO.ArticulatedCT.load(Path(cache) / "phantom_s0_3mm")
            ta = B.pose_truth("supine_arms_down", 0)
            views = default_views(ct.bbox_world(), size=size) if size else None
            for pname in (p for p in PRESETS if p != "supine_arms_down"):
                rng = np.random.default_rng([0, size, sum(map(ord, pname))])
                versions = {"new": (lambda p: A.posed_scene(art, *p, warp_spacing_mm=B.WARP_MM), A.render_posed),
                            "old": (lambda p: AO.posed_scene(art_old, *p, warp_spacing_mm=B.WARP_MM), AO.render_posed)}
                draw = lambda: B.deltas(ta, B.pose_truth(B.jittered(pname, 2.0, rng), 0))  # noqa: E731
                run_row("phantom " + pname, size, ct, views, draw, versions)
        if a.what in ("all", "real"):
            tn = B.real_twin(cache)
            if tn is None:
                continue
            to = TO.load_twin(tn.path)
            ct = tn.ct.with_data(np.asarray(tn.ct.data).astype(np.int16))
            views = default_views(ct.bbox_world(), size=size) if size else None
            for pname in ("hip_flexion", "sitting", "walking_stride"):
                p0, t0 = tn.resolve_pose(pname)
                rng = np.random.default_rng([7, size, sum(map(ord, pname))])
                versions = {"new": (lambda p: tn.posed_scene(p, t0), A.render_posed),
                            "old": (lambda p: to.posed_scene(p, t0), AO.render_posed)}
                run_row("real CT " + pname, size, ct, views, lambda: B.jittered(p0, 2.0, rng), versions)


    if a.identical:
        print(f"[identical] {sum(ok)}/{len(ok)} rows identical in every frame", flush=True)
        return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
