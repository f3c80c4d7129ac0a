"""CUDA benchmark: DRR throughput on a real GPU, and CUDA = CPU on real hardware.

    python benchmarks/bench_gpu.py [--sizes 256 512] [--repeat 50] [--batch 100]
                                   [--npz DIR] [--json FILE] [--skip-cpu]

Needs a CUDA GPU and numba-cuda. Volumes:
- ``abdomen_pelvis``: real_ct/abdomen_pelvis (122x101x112, 3 mm), read from ../shared, or from
  ``DIR/abdomen_pelvis.npz`` (``data`` int16, ``affine``) where nibabel or the data are absent;
- ``phantom_1.5mm``: the built-in phantom's CT at 1.5 mm (generated, or ``DIR/phantom_1.5mm.npz``);
- ``clinical_512x512x1800``: a synthetic 512x512x1800 int16 CT at 0.8 mm (body ellipse and a bone
  cylinder; the peak-RSS volume of bench_drr.py), made here.

1. Agreement: max |CUDA - CPU| / max(CPU) for each method (trilinear, exact, siddon), cone and
   parallel beam, on an oblique 256^2 view of the real CT, for a batch of views and for a posed
   scene (rigid sub-volume + inverse warp).
2. Throughput per volume, size and method: single ``render_drr`` calls (upload of the geometry,
   launch, image back to the host, as a user calls it) and ``render_drr_batch`` over a C-arm
   sweep of ``--batch`` views (one launch). Median of ``--repeat`` calls after a warm-up; DRR/s,
   rays/s, trilinear samples/s. The CPU path on the same machine (all its cores) gives the ratio.
Only measured numbers are printed (one JSON object per line; ``--json`` collects them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

from ctwin.core import progress
from ctwin.core.drr.carm import named_view  # noqa: E402
from ctwin.core.drr.projector import (Scene, PlacedVolume, prepare_volume, render_drr,  # noqa: E402
                                  render_drr_batch, render_scene)
from ctwin.core.volumes.volume import Volume, affine_from  # noqa: E402

from bench_drr import clinical_ct  # noqa: E402  (this script's folder is on sys.path)

REAL_CT = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis" / "ct.nii.gz"
METHODS = ("trilinear", "exact", "siddon")
RESULTS: list = []


def emit(rec: dict, json_path: Path | None):
    RESULTS.append(rec)
    print(json.dumps({k: (round(v, 7) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    if json_path is not None:
        tmp = json_path.with_suffix(".part")
        tmp.write_text(json.dumps(RESULTS, indent=1))
        os.replace(tmp, json_path)


def median_time(fn, repeat, sync):
    fn()
    sync()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def load_npz(path: Path) -> Volume:
    z = np.load(path)
    return Volume(np.ascontiguousarray(z["data"]), np.asarray(z["affine"], np.float64))


def volumes(args):
    npz = Path(args.npz) if args.npz else None
    out = {}
    if npz is not None and (npz / "abdomen_pelvis.npz").exists():
        out["abdomen_pelvis"] = load_npz(npz / "abdomen_pelvis.npz")
    elif REAL_CT.exists():
        from ctwin.core.volumes.ct import load_ct

        out["abdomen_pelvis"] = load_ct(REAL_CT)
    if npz is not None and (npz / "phantom_1.5mm.npz").exists():
        out["phantom_1.5mm"] = load_npz(npz / "phantom_1.5mm.npz")
    elif not args.skip_phantom:
        from ctwin.core.phantom.phantom import generate_phantom

        out["phantom_1.5mm"] = generate_phantom(spacing=1.5).ct
    if not args.skip_clinical:
        out["clinical_512x512x1800"] = clinical_ct()
    return out


def rel(a, b):
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def agreement(vol: Volume, name: str, size: int, jp):
    pv = prepare_volume(vol)
    for parallel in (False, True):
        g = named_view("lao30_cran10", pv.bbox_world(), size=size, parallel=parallel)
        for m in METHODS:
            a = render_drr(pv, g, method=m, device="cpu")
            b = render_drr(pv, g, method=m, device="cuda")
            emit({"check": "cuda_vs_cpu", "volume": name, "method": m, "parallel": parallel,
                  "max_rel_diff": rel(b, a), "image_max": float(a.max())}, jp)
    gs = [named_view("ap", pv.bbox_world(), size=max(size // 2, 4), lao=a) for a in (-40.0, 0.0, 25.0, 90.0)]
    a = render_drr_batch(pv, gs, device="cpu")
    b = render_drr_batch(pv, gs, device="cuda")
    emit({"check": "cuda_vs_cpu", "volume": name, "method": "batch(4 views)", "max_rel_diff": rel(b, a),
          "image_max": float(a.max())}, jp)
    d = np.asarray(vol.data)
    c = np.array(d.shape) // 2
    h = np.maximum(np.array(d.shape) // 6, 2)
    sub = np.ascontiguousarray(d[c[0] - h[0]:c[0] + h[0], c[1] - h[1]:c[1] + h[1], c[2] - h[2]:c[2] + h[2]])
    mask = (sub > 150).astype(np.uint8)
    aff = vol.affine.copy()
    aff[:3, 3] = vol.affine[:3, :3] @ (c - h) + vol.affine[:3, 3] + np.array([6.0, -4.0, 9.0])
    lo, hi = pv.bbox_world()
    disp = np.full((6, 6, 6, 3), 2.5, np.float32)
    waff = affine_from(tuple((hi - lo) / 5.0), tuple(lo))
    sc = Scene(base=vol, parts=[PlacedVolume(sub, mask, aff)], warp=(disp, waff))
    g = named_view("ap", pv.bbox_world(), size=size)
    a = render_scene(sc, g, device="cpu")
    b = render_scene(sc, g, device="cuda")
    emit({"check": "cuda_vs_cpu", "volume": name, "method": "scene(sub-volume + warp)",
          "max_rel_diff": rel(b, a), "image_max": float(a.max())}, jp)


def throughput(vol: Volume, name: str, sizes, repeat, batch, skip_cpu, jp):
    from numba import cuda

    pv = prepare_volume(vol)
    t = time.perf_counter()
    pv.occupancy()
    prep = time.perf_counter() - t
    bbox = pv.bbox_world()
    sync = cuda.synchronize
    nosync = lambda: None  # noqa: E731
    step = 0.5 * float(np.min(pv.spacing))
    for size in sizes:
        g = named_view("ap", bbox, size=size)
        sweep = [named_view("ap", bbox, size=size, lao=a) for a in np.linspace(-50, 50, batch)]
        chords = render_drr(pv, g, method="siddon", device="cuda", lut=np.ones(65536, np.float32))
        samples = float(np.ceil(chords[chords > 0] / step).sum())
        for m in METHODS:
            t0 = time.perf_counter()
            render_drr(pv, g, method=m, device="cuda")
            first = time.perf_counter() - t0
            single = median_time(lambda: render_drr(pv, g, method=m, device="cuda"), repeat, sync)
            nb = max(3, repeat // 10)
            tb = median_time(lambda: render_drr_batch(pv, sweep, method=m, device="cuda"), nb, sync)
            rec = {"volume": name, "shape": list(pv.shape), "size": size, "method": m,
                   "first_call_s": first, "single_s": single, "single_drr_per_s": 1.0 / single,
                   "batch_views": batch, "batch_s": tb, "batch_drr_per_s": batch / tb,
                   "batch_rays_per_s": batch * size * size / tb}
            if m == "trilinear":
                rec["batch_samples_per_s"] = batch * samples / tb
            if not skip_cpu:
                cpu = median_time(lambda: render_drr(pv, g, method=m, device="cpu"), 3, nosync)
                rec["cpu_single_s"] = cpu
                rec["gpu_single_speedup_vs_cpu"] = cpu / single
                rec["gpu_batch_speedup_vs_cpu"] = cpu / (tb / batch)
            emit(rec, jp)
    emit({"volume": name, "prepare_occupancy_s": prep}, jp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--npz", help="folder with abdomen_pelvis.npz / phantom_1.5mm.npz (data, affine)")
    ap.add_argument("--json", help="write all records to this JSON file as they come")
    ap.add_argument("--skip-cpu", action="store_true", help="no CPU timings")
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument("--skip-clinical", action="store_true")
    ap.add_argument("--check-size", type=int, default=256, help="detector size of the agreement checks")
    ap.add_argument("--only", nargs="+", help="volume names to time")
    args = ap.parse_args()
    progress.set_quiet(True)
    import numba
    from numba import cuda

    if not cuda.is_available():
        print("no CUDA GPU is available (numba.cuda.is_available() is False)")
        sys.exit(2)
    jp = Path(args.json) if args.json else None
    dev = cuda.get_current_device()
    emit({"numba": numba.__version__, "numpy": np.__version__, "gpu": str(getattr(dev, "name", dev)),
          "compute_capability": list(getattr(dev, "compute_capability", ())), "cpu_threads": numba.get_num_threads()}, jp)
    vols = volumes(args)
    first = next(iter(vols))
    t = time.perf_counter()
    agreement(vols[first], first, args.check_size, jp)
    emit({"agreement_s (incl. CPU and CUDA compilation)": time.perf_counter() - t}, jp)
    for name, vol in vols.items():
        if args.only and name not in args.only:
            continue
        try:
            throughput(vol, name, args.sizes, args.repeat, args.batch, args.skip_cpu, jp)
        except Exception as exc:  # reported, and the other volumes still run
            emit({"volume": name, "error": f"{type(exc).__name__}: {exc}"}, jp)


if __name__ == "__main__":
    main()
