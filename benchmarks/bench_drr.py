"""DRR benchmark: speed, accuracy and memory of core.drr.projector against plastimatch and DiffDRR.

    .venv/bin/python benchmarks/bench_drr.py [--sizes 256 512] [--repeat 5] [--skip-phantom]
                                             [--skip-rss] [--device cpu|cuda|auto]

1. real_ct/abdomen_pelvis (122x101x112, 3 mm) and the built-in phantom at 1.5 mm (if
   core.phantom.phantom exists): AP DRRs (SPEC 5 default geometry) at each size, trilinear (default step =
   half a voxel), exact (exact integral of the trilinear field) and Siddon. Median wall time of ``--repeat`` runs after a warm-up (JIT compile
   excluded and reported separately), rays/s, samples/s (trilinear samples actually taken along the
   clipped rays, i.e. chord / step summed over rays), accuracy: max |error| / image max against the
   slow float64 reference (fine step 0.05 mm) on a 32x32 sub-sampled detector.
2. Peers on the same geometry, when installed (see benchmarks/README.md; nothing is installed
   here): plastimatch ``drr`` (exact and uniform, multi-threaded CPU; its own reported compute
   time, and the wall time of the process including reading the volume) and DiffDRR (CPU, torch,
   Siddon). Prints NCC and max relative error against ours and the speed ratios.
3. Peak RSS: a child process renders a 512x512x1800 int16 synthetic CT (0.8 x 0.8 x 0.8 mm) at
   512^2; its peak RSS is reported (target <= 4 GB).
Only measured numbers are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

from ctwin.core.drr import physics
from ctwin.core import progress
from ctwin.core.drr.carm import named_view  # noqa: E402
from ctwin.core.drr.projector import prepare_volume, reference_drr, render_drr  # noqa: E402
from ctwin.core.volumes.volume import Volume, affine_from  # noqa: E402

DIFFDRR_MAX_GB = float(os.environ.get("CTWIN_BENCH_DIFFDRR_MAX_GB", "10"))
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis" / "ct.nii.gz"


def ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def timed(fn, repeat):
    ts = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out


def identity_direction(vol: Volume) -> Volume:
    A, d = vol.affine.copy(), vol.data
    for ax in range(3):
        if A[ax, ax] < 0:
            d = np.flip(d, axis=ax)
            A[:3, 3] += A[:3, ax] * (d.shape[ax] - 1)
            A[:3, ax] *= -1
    return Volume(np.ascontiguousarray(d), A)


def run_plastimatch(mu_path, g, out_prefix, algorithm):
    W, H = g.size_px
    cmd = ["plastimatch", "drr", "-P", "none", "-t", "raw", "-i", algorithm,
           "-o", " ".join(map(str, g.extra["isocenter_mm"])), "-n", " ".join(map(str, -g.ray_direction)),
           "--vup", " ".join(map(str, -g.detector_v)), "--sad", str(g.extra["sad_mm"]),
           "--sid", str(g.sid_mm), "-r", f"{H} {W}",
           "-z", f"{H * g.pixel_spacing_mm[1]} {W * g.pixel_spacing_mm[0]}",
           "-O", str(out_prefix), str(mu_path)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    compute = None
    for line in r.stdout.splitlines():
        if line.strip().startswith("Total time"):
            try:
                compute = float(line.split(":")[1].split()[0])
            except (IndexError, ValueError):
                pass
    img = np.fromfile(f"{out_prefix}0000.raw", np.float32).reshape(H, W) * 10.0  # cm -> mm units
    return img, wall, compute


def run_diffdrr(vol: Volume, mu: np.ndarray, g, repeat):
    """DiffDRR (CPU) with our geometry: returns (image, median seconds) or a reason string."""
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        from diffdrr.drr import DRR  # noqa: F401
    except Exception as exc:  # not installed
        return f"not available ({type(exc).__name__}: {exc})"
    try:
        return _diffdrr_render(vol, mu, g, repeat)
    except Exception as exc:  # an API mismatch is reported, not hidden
        return f"failed ({type(exc).__name__}: {str(exc)[:200]})"


def _diffdrr_render(vol, mu, g, repeat, renderer="siddon"):
    """DiffDRR's own renderer on our rays: DRR.render(density, source, target) with the source and
    the pixel centres in its world frame (the NIfTI's RAS mm), density = our mu per mm."""
    import torch
    from diffdrr.data import read
    from diffdrr.drr import DRR

    from ctwin.core.volumes.volume import save_nifti

    tmp = Path(tempfile.mkdtemp())
    save_nifti(vol.with_data(mu.astype(np.float32)), tmp / "mu.nii.gz")
    subject = read(str(tmp / "mu.nii.gz"), orientation=None, center_volume=False)
    W, H = g.size_px
    drr = DRR(subject, sdd=g.sid_mm, height=H, width=W, delx=g.pixel_spacing_mm[0],
              dely=g.pixel_spacing_mm[1], renderer=renderer)
    drr.density = torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float32))
    ras = np.array([-1.0, -1.0, 1.0])
    o, d, length = g.rays()
    src = torch.tensor((o.reshape(-1, 3)[:1] * ras)[None], dtype=torch.float32)
    tgt = torch.tensor(((o + d * length[..., None]).reshape(-1, 3) * ras)[None], dtype=torch.float32)
    if g.parallel:
        raise RuntimeError("parallel beams are not compared with DiffDRR here")
    with torch.no_grad():
        drr.render(drr.density, src, tgt)  # warm-up
        t, img = timed(lambda: drr.render(drr.density, src, tgt), repeat)
    return img.reshape(H, W).numpy(), t


def count_samples(pv, g, step):
    """Trilinear samples taken: sum over rays of ceil(chord / step) (chord = integral of mu = 1)."""
    chords = render_drr(pv, g, method="siddon", device="cpu", lut=np.ones(65536, np.float32))
    return float(np.ceil(chords[chords > 0] / step).sum())


def bench_volume(name, vol, sizes, repeat, device, peers, tmpdir):
    print(f"\n== {name}: {vol.shape} voxels, spacing {np.round(vol.spacing, 3).tolist()} mm, "
          f"{vol.data.dtype} ==")
    t = time.perf_counter()
    pv = prepare_volume(vol)
    pv.occupancy()
    print(f"prepare (16-bit view + occupancy grid): {time.perf_counter() - t:.3f} s; "
          f"empty blocks {100 * (1 - pv.occ.mean()):.1f} %")
    mu = physics.mu_from_hu(vol.data).astype(np.float32)
    mu_path = None
    if peers.get("plastimatch"):
        from ctwin.core.volumes.ct import save_itk

        mu_path = tmpdir / f"{name}_mu.mha"
        save_itk(identity_direction(vol.with_data(mu)), mu_path)
    rows = []
    for size in sizes:
        g = named_view("ap", vol, size=size)
        step = 0.5 * float(np.min(vol.spacing))
        for method in ("trilinear", "exact", "siddon"):
            t0 = time.perf_counter()
            render_drr(pv, g, method=method, device=device)
            first = time.perf_counter() - t0
            sec, img = timed(lambda: render_drr(pv, g, method=method, device=device), repeat)
            rays = size * size
            line = {"volume": name, "size": size, "method": method, "seconds": sec,
                    "first_call_s": first, "rays_per_s": rays / sec, "drr_per_s": 1.0 / sec}
            if method == "trilinear":
                line["samples_per_s"] = count_samples(pv, g, step) / sec
            if method in ("trilinear", "exact"):
                gs = g.with_size(32)
                ref = reference_drr(vol, gs, step_mm=0.05)
                sub = render_drr(pv, gs, method=method, device=device)
                line["max_err_vs_f64_ref_pct"] = 100 * float(np.abs(sub - ref).max() / ref.max())
            if mu_path is not None:
                for alg in ("exact", "uniform"):
                    pm, wall, comp = run_plastimatch(mu_path, g, tmpdir / f"pm_{name}_{size}_{alg}_", alg)
                    walls = [wall] + [run_plastimatch(mu_path, g, tmpdir / f"pm_{name}_{size}_{alg}_", alg)[1]
                                      for _ in range(max(0, repeat // 2))]
                    line[f"plastimatch_{alg}_wall_s"] = float(np.median(walls))
                    line[f"plastimatch_{alg}_compute_s"] = comp
                    line[f"ncc_vs_plastimatch_{alg}"] = ncc(img, pm)
                    line[f"maxrel_vs_plastimatch_{alg}_pct"] = 100 * float(np.abs(img - pm).max() / pm.max())
                    ref_t = comp if comp else wall
                    line[f"speedup_vs_plastimatch_{alg}"] = ref_t / sec
            # DiffDRR holds (rays x plane crossings) float tensors: skip it when they would be huge
            # (measured: about 18 floats per ray and plane crossing at peak)
            diff_gb = size * size * (sum(vol.shape) + 3) * 4 * 18 / 2 ** 30
            if peers.get("diffdrr") and method == "siddon" and diff_gb > DIFFDRR_MAX_GB:
                line["diffdrr"] = f"skipped: would need about {diff_gb:.0f} GB (limit {DIFFDRR_MAX_GB} GB)"
            elif peers.get("diffdrr") and method == "siddon":
                res = run_diffdrr(vol, mu, g, max(1, repeat // 2))
                if isinstance(res, str):
                    line["diffdrr"] = res
                else:
                    dimg, dsec = res
                    line["diffdrr_s"] = dsec
                    line["speedup_vs_diffdrr"] = dsec / sec
                    line["ncc_vs_diffdrr"] = ncc(img, dimg)
                    line["maxrel_vs_diffdrr_pct"] = 100 * float(np.abs(img - dimg).max() / dimg.max())
            rows.append(line)
            print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in line.items()}))
    return rows


def clinical_ct(n: int = 512, nz: int = 1800, sp: float = 0.8) -> Volume:
    """A synthetic n x n x nz int16 CT at sp mm (a body ellipse with a bone cylinder, the same on
    every slice): the size of a clinical whole-trunk CT."""
    yy, xx = np.mgrid[0:n, 0:n]
    r2 = ((xx - n / 2) / (0.42 * n)) ** 2 + ((yy - n / 2) / (0.30 * n)) ** 2
    body = np.where(r2 < 1.0, 40, -1000).astype(np.int16)
    body[((xx - n / 2) ** 2 + (yy - 0.62 * n) ** 2) < (0.05 * n) ** 2] = 900
    d = np.empty((n, n, nz), np.int16)
    d[:] = body[:, :, None]
    return Volume(d, affine_from((sp, sp, sp), (-n * sp / 2, -n * sp / 2, -nz * sp / 2)))


RSS_CHILD = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from bench_drr import clinical_ct
from ctwin.core.drr.carm import named_view
from ctwin.core.drr.projector import prepare_volume, render_drr
vol = clinical_ct()
t = time.perf_counter()
pv = prepare_volume(vol)
g = named_view("ap", vol, size=512)
img = render_drr(pv, g, device="cpu")
t1 = time.perf_counter() - t
t = time.perf_counter(); render_drr(pv, g, device="cpu"); t2 = time.perf_counter() - t
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, t1, t2, float(img.max()))
"""


def bench_rss():
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(ROOT)], capture_output=True, text=True)
    if r.returncode != 0:
        print("peak-RSS check failed:", r.stderr[-500:])
        return
    rss_mb, t1, t2, vmax = r.stdout.split("RSS", 1)[1].split()
    print(f"\n== 512x512x1800 int16 CT (0.8 mm), 512^2 AP DRR ==\npeak RSS {float(rss_mb) / 1024:.2f} GB "
          f"(volume itself {512 * 512 * 1800 * 2 / 2**30:.2f} GB); first render incl. prepare "
          f"{float(t1):.2f} s, second render {float(t2):.2f} s; image max {float(vmax):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-only", action="store_true", help="only the 512x512x1800 peak-RSS check")
    args = ap.parse_args()
    if args.rss_only:
        bench_rss()
        return
    progress.set_quiet(True)
    import numba

    print(f"CPU threads used by numba: {numba.get_num_threads()} (os.cpu_count() = {os.cpu_count()})")
    peers = {"plastimatch": shutil.which("plastimatch") is not None}
    try:
        import diffdrr  # noqa: F401

        peers["diffdrr"] = True
    except Exception:
        peers["diffdrr"] = False
    print("peers:", {k: ("installed" if v else "not installed (see benchmarks/README.md)") for k, v in peers.items()})
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_drr_"))
    if REAL_CT.exists():
        from ctwin.core.volumes.ct import load_ct

        bench_volume("abdomen_pelvis", load_ct(REAL_CT), args.sizes, args.repeat, args.device, peers, tmpdir)
    else:
        print(f"real CT not found at {REAL_CT}: skipped")
    if not args.skip_phantom:
        try:
            from ctwin.core.phantom.phantom import generate_phantom
        except ImportError:
            print("core.phantom.phantom.generate_phantom is not available: phantom part skipped")
        else:
            t = time.perf_counter()
            ph = generate_phantom(spacing=1.5)
            print(f"\n(phantom generated in {time.perf_counter() - t:.1f} s)")
            bench_volume("phantom_1.5mm", ph.ct, args.sizes, args.repeat, args.device, peers, tmpdir)
    if not args.skip_rss:
        bench_rss()
    shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"\nbenchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB")


if __name__ == "__main__":
    main()
