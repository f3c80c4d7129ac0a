"""The posing kernels on a GPU against the CPU's, on the inputs of a real new pose of the phantom twin.

    python benchmarks/bench_posing_gpu.py [--spacing 3] [--preset walking_stride] [--jitter-deg 2]
        [--warp-mm 12] [--reps 5] [--seed 0] [--cache DIR]

One new pose (``--preset`` plus a seeded ``--jitter-deg`` rotation on every body joint, as in
bench_pose_cost.py) is posed with ``posed_scene`` on the CPU while every posing kernel call
(``articulated._kernels()``: blend_field, forward_blend, splat_nearest, inverse_lbs_nodes, air_border)
is recorded: its inputs before and its outputs after. Each call is then replayed through the CUDA
kernel built from the same body (``articulated.posing_cuda_kernels``) on the recorded inputs, and
printed, measured: per kernel the elements and outputs that differ from the CPU's (a GPU may fuse a
multiply-add, so a few last-bit differences are possible, and a node near a threshold may change its
status), the largest difference, and the times (CPU: the recorded call; device: the kernel alone,
inputs already on the device, best of ``--reps`` after a compiling call); then the whole posing,
``posed_scene`` with ``device="cpu"`` and ``"cuda"`` on new poses (best of ``--reps``) and how far the
two warps differ. The steps that keep a pose on the device (the skinned points' slab order, a counting
sort, and the warp's summary, reductions and a radix select, with its copy of 6 numbers back) are
timed on the recorded inputs and compared with the host's. Under
``NUMBA_ENABLE_CUDASIM=1`` it runs without a GPU (slowly: use a coarse ``--spacing``, e.g. 12, and
``--reps 1``; the times then mean nothing).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pose_cost as B  # noqa: E402  (loads the package ctwin)

A = B.A


def _copy(v):
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, tuple):
        return tuple(_copy(x) for x in v)
    return v


def record(art, pose):
    """posed_scene(art, *pose) with every posing kernel call recorded: [(name, args before, args
    after, seconds)]."""
    k = A._kernels()
    saved = dict(k)
    calls = []

    def wrap(name, f):
        def w(*args):
            before = _copy(args)
            s = time.perf_counter()
            r = f(*args)
            calls.append((name, before, _copy(args), time.perf_counter() - s))
            return r
        return w

    for name, f in saved.items():
        k[name] = wrap(name, f)
    try:
        A.posed_scene(art, *pose, warp_spacing_mm=B.WARP_MM)
    finally:
        k.update(saved)
    return calls


def device_args(name, args):
    """The CUDA kernels' arguments for a recorded CPU call (the weight field's tuple unpacked), and
    the positions of its outputs in the CPU call's arguments and in the device ones."""
    if name == "blend_field":
        return list(args), [4, 5], [4, 5]
    if name == "forward_blend":
        xs, (ws, P, S), w_inv, D, ys, Minv = args
        return [xs, *ws, P, S, w_inv, D, ys, Minv], [4, 5], [8, 9]
    if name == "splat_nearest":
        return list(args), [8, 9], [8, 9]
    if name == "inverse_lbs_nodes":
        waff, wn, (ws, P, S), *rest = args
        return [waff, wn, *ws, P, S, *rest], [11, 12, 13], [15, 16, 17]
    raise KeyError(name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--preset", default="walking_stride")
    ap.add_argument("--jitter-deg", type=float, default=2.0)
    ap.add_argument("--warp-mm", type=float, default=B.WARP_MM)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="")
    a = ap.parse_args(argv)
    B.WARP_MM = a.warp_mm
    from numba import cuda

    g = A.posing_cuda_kernels()
    ct, art = B.load_or_build(a.spacing, a.seed, a.cache)
    ta = B.pose_truth("supine_arms_down", a.seed)
    rng = np.random.default_rng([a.seed, sum(map(ord, a.preset))])

    def pose():
        return B.deltas(ta, B.pose_truth(B.jittered(a.preset, a.jitter_deg, rng), a.seed))

    record(art, pose())  # compiles / loads the CPU kernels
    calls = record(art, pose())
    import os

    dev = "CUDA simulator" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else cuda.get_current_device().name
    print(f"[setup] phantom seed {a.seed} at {a.spacing:g} mm, CT {tuple(ct.shape)}; {a.preset} + "
          f"{a.jitter_deg:g} deg jitter; warp every {a.warp_mm:g} mm; device: {dev}", flush=True)

    def launch(kern, n, args):
        kern[max(1, -(-n // 128)), 128](*args)

    for name, before, after, t_cpu in calls:
        if name == "air_border":
            wn, status, disp, thr = before
            n = int(np.prod(wn))
            dargs = [cuda.to_device(wn), cuda.to_device(status), cuda.to_device(disp)]

            def run(d=dargs, n=n, thr=thr):
                launch(g["border_mark"], n, (d[0], d[1], d[2], thr * thr))
                launch(g["border_air"], n, (d[1], d[2]))
            outs_cpu, outs_dev = [after[1], after[2]], [1, 2]
        else:
            hargs, outs_i, outs_dev = device_args(name, before)
            outs_cpu = [after[i] for i in outs_i]
            dargs = [cuda.to_device(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for v in hargs]
            if name == "blend_field":
                n = len(before[0]) - 1
            elif name == "forward_blend":
                n = len(before[0])
            elif name == "splat_nearest":
                n = int(before[6][0] * before[6][1])  # a thread per node row
            else:
                n = int(np.prod(before[1]))

            def run(d=dargs, name=name, n=n):
                launch(g[name], n, d)
        best = np.inf
        for r in range(max(a.reps, 1) + 1):
            # in-place kernels (best/src, status/disp) start again from the recorded inputs
            if name == "splat_nearest":
                dargs[8].copy_to_device(before[8])
                dargs[9].copy_to_device(before[9])
            if name == "air_border":
                dargs[1].copy_to_device(before[1])
                dargs[2].copy_to_device(before[2])
            cuda.synchronize()
            s = time.perf_counter()
            run()
            cuda.synchronize()
            if r:
                best = min(best, time.perf_counter() - s)
        diffs = []
        for c, i in zip(outs_cpu, outs_dev):
            d = dargs[i].copy_to_host()
            c = np.asarray(c)
            same = (c == d) | (np.isnan(c) & np.isnan(d)) if c.dtype.kind == "f" else (c == d)
            fin = np.isfinite(c) & np.isfinite(d) if c.dtype.kind == "f" else np.ones(c.shape, bool)
            big = float(np.abs(c[fin].astype(np.float64) - d[fin]).max()) if fin.any() else 0.0
            diffs.append(f"{int(np.count_nonzero(~same))}/{c.size} differ (max |diff| {big:.3g})")
        print(f"{name:18s} {n:9d} elements | CPU {1e3 * t_cpu:8.2f} ms, device {1e3 * best:8.2f} ms | "
              + "; ".join(diffs), flush=True)

    # the steps that keep a pose on the device, on the recorded inputs: the skinned points' slab order
    # (a counting sort) and the warp's summary (reductions and a radix select), against the host's
    rec = {name: (before, after) for name, before, after, _ in calls}
    ys, waff3, wn = rec["splat_nearest"][0][0], rec["splat_nearest"][0][4], rec["splat_nearest"][0][6]
    res_, status_ = rec["inverse_lbs_nodes"][1][12], rec["air_border"][1][1]
    ninv, g0, order, starts = A._slab_order(ys, np.vstack([waff3, [0.0, 0.0, 0.0, 1.0]]), wn)
    scratch = {}
    d_ys, d_ninv, d_st, d_res = (cuda.to_device(np.ascontiguousarray(v)) for v in (ys, ninv, status_, res_))
    steps = (("slab order", len(ys), lambda: A._device_slab_order(g, scratch, d_ys, d_ninv, int(wn[0]),
                                                                  A._DevicePosing.CHUNK)),
             ("warp summary", len(res_), lambda: A._device_summary(g, scratch, d_st, d_res)))
    for label, n, fn in steps:
        best = np.inf
        for r in range(max(a.reps, 1) + 1):
            cuda.synchronize()
            s = time.perf_counter()
            out = fn()
            cuda.synchronize()
            if r:
                best = min(best, time.perf_counter() - s)
        if label == "slab order":
            bad = sum(int(np.count_nonzero(d.copy_to_host() != h)) for d, h in zip(out, (order, starts, g0)))
            what = f"{bad} of the order, starts and first coordinates differ from the host's"
        else:
            sol = res_[status_ == 1]
            ns = int(out[0])
            host = (len(sol), int(np.sum(status_ == 2)), float(np.percentile(sol, 99)) if len(sol) else 0.0,
                    float(sol.max()) if len(sol) else 0.0)
            dev_ = (ns, int(out[1]), A._percentile_from_ranks(ns, 0.99, out[4], out[5]) if ns else 0.0,
                    float(out[3]) if ns else 0.0)
            what = f"(solved, air, p99, max) host {host}, device {dev_}"
        print(f"{label:18s} {n:9d} elements | device {1e3 * best:8.2f} ms | {what}", flush=True)

    # the whole posing through posed_scene on each device (the device one keeps its arrays resident)
    t = {"cpu": [], "cuda": []}
    for r in range(max(a.reps, 1) + 1):
        p = pose()
        sc = {}
        for dev in ("cpu", "cuda"):
            s = time.perf_counter()
            sc[dev] = A.posed_scene(art, *p, warp_spacing_mm=B.WARP_MM, device=dev)
            if r:
                t[dev].append(time.perf_counter() - s)
    wc, wg = sc["cpu"].warp[0], sc["cuda"].warp[0]
    fin = np.isfinite(wc) & np.isfinite(wg)
    print(f"posed_scene: CPU {1e3 * min(t['cpu']):.1f} ms, device {1e3 * min(t['cuda']):.1f} ms (best of "
          f"{len(t['cpu'])}); warp {wc.shape[:3]}: {int(np.count_nonzero(np.isnan(wc) != np.isnan(wg)))} nodes differ "
          f"in air, max |diff| {float(np.abs(wc[fin] - wg[fin]).max()) if fin.any() else 0.0:.3g} mm; "
          f"solved nodes {sc['cpu'].info['solved_nodes']} / {sc['cuda'].info['solved_nodes']}", flush=True)


if __name__ == "__main__":
    main()
