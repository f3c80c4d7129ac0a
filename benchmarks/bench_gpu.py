"""CUDA benchmark: DRR throughput on a real GPU, and CUDA = CPU on real hardware.

    python benchmarks/bench_gpu.py [--sizes 256 512] [--repeat 50] [--batch 100]
                                   [--npz DIR] [--json FILE] [--skip-cpu]
    python benchmarks/bench_gpu.py --nanodrr-settings [--device cpu] [--nano-batch 100]

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
3. nanodrr's published settings (``--nanodrr-settings``: only this part): 200x200 pixels, 500
   samples per ray (``samples_per_ray``) on the real abdomen CT and the phantom (1.5 mm, or
   ``--phantom-spacing``), with the default storage (int16 HU, float64 sums) and float16 mu
   storage: single ``render_drr`` calls, a batch of ``--nano-batch`` views (C-arm sweep) and a
   batch of as many rigid poses of the CT under one view (``transforms``), each one launch; the
   largest float16 error per pixel relative to the image maximum of the default result; then
   nanodrr (its own renderer, the same detector size, sample count, SDD and SAD) in the same run
   when it can be imported, else the reason it is skipped. ``--device cpu`` runs this part on the
   CPU path (no GPU needed).
Only measured numbers are printed (one JSON object per line; ``--json`` collects them).
"""
from __future__ import annotations

import argparse
import copy
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
from ctwin.core.drr.projector import (Scene, PlacedVolume, half_precision, prepare_volume,  # noqa: E402
                                      render_drr, render_drr_batch, render_scene)
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
    ph = f"phantom_{args.phantom_spacing:g}mm"
    if npz is not None and (npz / f"{ph}.npz").exists():
        out[ph] = load_npz(npz / f"{ph}.npz")
    elif not args.skip_phantom:
        from ctwin.core.phantom.phantom import generate_phantom

        out[ph] = generate_phantom(spacing=args.phantom_spacing).ct
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
    poses = rigid_poses(len(gs), seed=1)
    for label, v, kw in (("batch(4 views x 4 poses)", pv, {}),
                         ("batch(4 poses, 500 samples)", pv, {"samples_per_ray": 500}),
                         ("batch(4 poses, 500 samples, float16)", half_precision(pv), {"samples_per_ray": 500})):
        a = render_drr_batch(v, gs, transforms=poses, device="cpu", **kw)
        b = render_drr_batch(v, gs, transforms=poses, device="cuda", **kw)
        emit({"check": "cuda_vs_cpu", "volume": name, "method": label, "max_rel_diff": rel(b, a),
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


NANO_SIZE = 200  # nanodrr's published benchmark: 200x200 DRRs, 500 samples per ray (its README)
NANO_SAMPLES = 500


def rigid_poses(n: int, seed: int = 0, deg: float = 5.0, mm: float = 10.0) -> np.ndarray:
    """n random rigid 4x4 transforms about the world origin: rotations up to about ``deg`` degrees
    per axis, translations of about ``mm`` (a registration's or a rigid training set's spread)."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    out = np.tile(np.eye(4), (n, 1, 1))
    out[:, :3, :3] = Rotation.from_rotvec(np.radians(deg) * rng.uniform(-1, 1, (n, 3))).as_matrix()
    out[:, :3, 3] = rng.normal(0.0, mm, (n, 3))
    return out


def about_centre(poses: np.ndarray, centre) -> np.ndarray:
    """The same rigid motions about ``centre`` instead of the origin."""
    c = np.eye(4)
    c[:3, 3] = centre
    ci = np.eye(4)
    ci[:3, 3] = -np.asarray(centre)
    return np.stack([c @ p @ ci for p in poses])


def nanodrr_settings(vol: Volume, name: str, device: str, repeat: int, batch: int, jp):
    """DRR/s at 200x200 and 500 samples per ray: default and float16 storage, single and batched."""
    sync = lambda: None  # noqa: E731
    if device == "cuda":
        from numba import cuda

        sync = cuda.synchronize
    pv = prepare_volume(vol)
    pv.occupancy()
    bbox = pv.bbox_world()
    g = named_view("ap", bbox, size=NANO_SIZE)
    sweep = [named_view("ap", bbox, size=NANO_SIZE, lao=a) for a in np.linspace(-50, 50, batch)]
    poses = about_centre(rigid_poses(batch), 0.5 * (bbox[0] + bbox[1]))
    ref = {}
    for storage in ("default", "float16"):
        t = time.perf_counter()
        v = pv if storage == "default" else half_precision(pv)
        v.occupancy()
        conv = time.perf_counter() - t
        kw = {"samples_per_ray": NANO_SAMPLES, "device": device}
        single = median_time(lambda: render_drr(v, g, **kw), repeat, sync)
        nb = max(3, repeat // 10)
        tv = median_time(lambda: render_drr_batch(v, sweep, **kw), nb, sync)
        tp = median_time(lambda: render_drr_batch(v, [g], transforms=poses, **kw), nb, sync)
        views_img = render_drr_batch(v, sweep, **kw)
        poses_img = render_drr_batch(v, [g], transforms=poses, **kw)
        rec = {"volume": name, "shape": list(pv.shape), "device": device, "size": NANO_SIZE,
               "samples_per_ray": NANO_SAMPLES, "storage": storage,
               "voxel_bytes": int(v.flat.itemsize), "single_s": single, "single_drr_per_s": 1.0 / single,
               "batch": batch, "batch_views_drr_per_s": batch / tv, "batch_poses_drr_per_s": batch / tp}
        if storage == "default":
            ref = {"views": views_img, "poses": poses_img}
        else:
            rec["convert_s"] = conv
            for key, img in (("views", views_img), ("poses", poses_img)):
                # largest error per image relative to that image's maximum (default storage)
                r = ref[key].astype(np.float64)
                err = np.abs(img - r).max(axis=(1, 2)) / r.max(axis=(1, 2))
                rec[f"max_err_vs_default_{key}_pct_of_image_max"] = 100.0 * float(err.max())
        emit(rec, jp)
    run_nanodrr(vol, name, g, render_drr(pv, g, samples_per_ray=NANO_SAMPLES, device=device), device, repeat,
                batch, jp)


def run_nanodrr(vol: Volume, name: str, g, ours: np.ndarray, device: str, repeat: int, batch: int, jp):
    """nanodrr beside ctwin in the same run (same detector size and pixels, samples per ray, SDD and
    SAD; an AP view about the CT's centre), or the reason it does not run. That it renders the same
    anatomy is shown by the correlation of its single image with ctwin's (``ours``), best over the
    detector flips (the two define the detector's axes differently, and their HU -> mu maps differ:
    nanodrr's water-bone model against SPEC 5's linear map)."""
    try:
        import torch
        from nanodrr.camera import make_rt_inv
        from nanodrr.data import Subject
        from nanodrr.drr import DRR
    except Exception as exc:  # an optional peer: skipped with its reason
        emit({"volume": name, "nanodrr": f"skipped: cannot import nanodrr ({type(exc).__name__}: {exc})"}, jp)
        return
    try:
        from importlib.metadata import version

        tdev = torch.device("cuda" if device == "cuda" else "cpu")
        data = torch.from_numpy(np.asarray(vol.data, np.float32))
        image = data[None, None].permute(0, 1, 4, 3, 2).contiguous()  # nanodrr's (1, 1, D, H, W)
        v2w = torch.from_numpy(np.asarray(vol.affine, np.float64))
        centre = apply_centre(vol)
        subject = Subject(image, torch.zeros_like(image), v2w.float(), v2w.inverse().float(),
                          Subject._make_voxel_to_grid(image.shape), torch.tensor(centre, dtype=torch.float32)).to(tdev)
        sdd = float(np.linalg.norm(g.detector_center_mm - g.source_mm))
        sad = float(np.linalg.norm(np.asarray(centre) - g.source_mm))
        du, dv = (float(x) for x in g.pixel_spacing_mm)
        drr = DRR.from_carm_intrinsics(sdd, du, dv, 0.0, 0.0, NANO_SIZE, NANO_SIZE, device=tdev,
                                       dtype=torch.float32)
        zeros = torch.zeros(1, 3, device=tdev)
        rt1 = make_rt_inv(zeros, torch.tensor([[0.0, sad, 0.0]], device=tdev), orientation="AP",
                          isocenter=subject.isocenter)
        rng = np.random.default_rng(0)
        rot = torch.tensor(rng.uniform(-5, 5, (batch, 3)), dtype=torch.float32, device=tdev)
        tr = torch.tensor(rng.normal(0, 10, (batch, 3)) + [0.0, sad, 0.0], dtype=torch.float32, device=tdev)
        rtb = make_rt_inv(rot, tr, orientation="AP", isocenter=subject.isocenter)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.no_grad():
            img = drr(subject, rt1, n_samples=NANO_SAMPLES)[0, 0].float().cpu().numpy()
        flips = (img, img[::-1], img[:, ::-1], img[::-1, ::-1])
        emit({"volume": name, "nanodrr_image_max": float(img.max()), "ctwin_image_max": float(ours.max()),
              "nanodrr_nonzero_fraction": float((img > 0).mean()),
              "ncc_with_ctwin_best_flip": max(ncc(f, ours) for f in flips)}, jp)
        dtypes = [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
        for label, dt in dtypes:
            # bfloat16 as nanodrr's own benchmark runs it: volume, camera and poses all in that dtype
            sub, cam, r1, rb = subject, drr, rt1, rtb
            if dt != torch.float32:
                sub = copy.deepcopy(subject).to(dt)
                cam = DRR.from_carm_intrinsics(sdd, du, dv, 0.0, 0.0, NANO_SIZE, NANO_SIZE, device=tdev, dtype=dt)
                r1, rb = rt1.to(dt), rtb.to(dt)
            with torch.no_grad():
                single = median_time(lambda: cam(sub, r1, n_samples=NANO_SAMPLES), repeat, sync)
                nb = max(3, repeat // 10)
                tb = median_time(lambda: cam(sub, rb, n_samples=NANO_SAMPLES), nb, sync)
            emit({"volume": name, "nanodrr": version("nanodrr"), "device": device,
                  "dtype": label, "size": NANO_SIZE, "samples_per_ray": NANO_SAMPLES,
                  "single_drr_per_s": 1.0 / single, "batch": batch, "batch_poses_drr_per_s": batch / tb}, jp)
    except Exception as exc:  # reported; ctwin's figures above stand
        emit({"volume": name, "nanodrr": f"error: {type(exc).__name__}: {exc}"}, jp)


def ncc(a, b) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def apply_centre(vol: Volume) -> list:
    n = np.asarray(vol.data.shape, np.float64)
    return (vol.affine[:3, :3] @ ((n - 1) / 2.0) + vol.affine[:3, 3]).tolist()


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
    ap.add_argument("--nanodrr-settings", action="store_true",
                    help="only part 3: 200x200, 500 samples per ray, default and float16 storage, nanodrr beside")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="the path that --nanodrr-settings times (cpu: no GPU needed)")
    ap.add_argument("--nano-batch", type=int, default=100, help="views / poses per batch in part 3")
    ap.add_argument("--phantom-spacing", type=float, default=1.5, help="phantom voxel size (mm)")
    ap.add_argument("--nano-size", type=int, default=200,
                    help="detector size of part 3 (nanodrr's: 200; smaller only to smoke-test the script)")
    args = ap.parse_args()
    globals()["NANO_SIZE"] = args.nano_size
    progress.set_quiet(True)
    import numba
    from numba import cuda

    jp = Path(args.json) if args.json else None
    if args.nanodrr_settings and args.device == "cpu":
        emit({"numba": numba.__version__, "numpy": np.__version__, "device": "cpu",
              "cpu_threads": numba.get_num_threads()}, jp)
        args.skip_clinical = True
        for name, vol in volumes(args).items():
            if not args.only or name in args.only:
                nanodrr_settings(vol, name, "cpu", args.repeat, args.nano_batch, jp)
        return
    if not cuda.is_available():
        print("no CUDA GPU is available (numba.cuda.is_available() is False)")
        sys.exit(2)
    dev = cuda.get_current_device()
    emit({"numba": numba.__version__, "numpy": np.__version__, "gpu": str(getattr(dev, "name", dev)),
          "compute_capability": list(getattr(dev, "compute_capability", ())), "cpu_threads": numba.get_num_threads()}, jp)
    if args.nanodrr_settings:
        args.skip_clinical = True
    vols = volumes(args)
    first = next(iter(vols))
    t = time.perf_counter()
    agreement(vols[first], first, args.check_size, jp)
    emit({"agreement_s (incl. CPU and CUDA compilation)": time.perf_counter() - t}, jp)
    for name, vol in vols.items():
        if args.only and name not in args.only:
            continue
        try:
            if args.nanodrr_settings:
                nanodrr_settings(vol, name, "cuda", args.repeat, args.nano_batch, jp)
            else:
                throughput(vol, name, args.sizes, args.repeat, args.batch, args.skip_cpu, jp)
        except Exception as exc:  # reported, and the other volumes still run
            emit({"volume": name, "error": f"{type(exc).__name__}: {exc}"}, jp)


if __name__ == "__main__":
    main()
