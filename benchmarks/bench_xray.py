"""Realistic X-ray physics (core.drr.xray): validation figures, cost, and the README pictures.

    .venv/bin/python benchmarks/bench_xray.py [--phantom DIR] [--images DIR] [--skip-noise]

1. Beam hardening: effective attenuation mu_eff = -ln(I/I0) / t of water (1-30 cm) and aluminium
   (0.5-20 mm) step wedges, rendered through the whole chain (HU volume -> calibration materials ->
   projector (exact integral) -> SpekPy spectrum -> detector), against an independent float64 sum
   over the SpekPy spectrum with xraylib cross sections looked up by chemical formula, for 70 and
   120 kVp, with the ideal detector and with 600 um CsI. Prints the max relative error.
2. Noise: 512^2 flat fields through the PaxScan 4030CB preset (LSF sigma 0.77 px): pixel variance
   against the Poisson prediction after the blur (mean x sum of the squared kernel), and the
   normalised NPS against the Gaussian MTF^2 up to half the Nyquist frequency (32 realisations).
3. Cost: AP DRR of real_ct/abdomen_pelvis at 512^2 on the CPU, monoenergetic vs realistic
   (materials + spectrum + detector + noise), median of 3 after a warm-up.
4. Pictures (``--images DIR``): side-by-side AP images, default (SPEC 5 mu, ``display`` value)
   and realistic (SpekPy spectrum, stoichiometric materials, PaxScan 4030CB, quantum noise,
   ``radiograph`` value): the phantom's chest and pelvis (``--phantom``: a ``ctwin phantom`` folder)
   and the real pelvis CT (contrast and a femoral implant).
Only measured numbers are printed.
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

from ctwin.core.drr import physics, xray
from ctwin.core.drr.carm import Geometry, named_view  # noqa: E402
from ctwin.core.drr.projector import material_integrals, prepare_volume, render_value  # noqa: E402
from ctwin.core.volumes.volume import Volume  # noqa: E402

REAL_PELVIS = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis" / "ct.nii.gz"


def beam_hardening():
    import spekpy
    import xraylib

    table = xray.HuTable.from_dict({"segments": [{"hu": [-1000, -500], "materials": ["air"]},
                                                 {"hu": [-500, 1000], "materials": ["water"]},
                                                 {"hu": [1000, 4000], "materials": ["aluminium"], "density": "material"}]})
    rows = []
    for name, hu, formula, steps_mm in (("water", 0, "H2O", [10, 50, 100, 200, 300]),
                                        ("aluminium", 2000, "Al", [0.5, 2, 5, 10, 20])):
        n = len(steps_mm)
        vox = min(steps_mm) / 5.0 if name == "aluminium" else 1.0
        L = np.array(steps_mm, float)
        nz = int(round(L.max() / vox)) + 4
        data = np.full((4 * n, 4, nz), -1000, np.int16)
        for k, t in enumerate(L):
            data[4 * k:4 * k + 4, :, 2:2 + int(round(t / vox))] = hu
        vol = Volume(data, np.diag([vox, vox, vox, 1.0]))
        cx, cy = (data.shape[0] - 1) / 2.0 * vox, 1.5 * vox
        g = Geometry(source_mm=[cx, cy, -100.0], detector_center_mm=[cx, cy, nz * vox + 100.0], detector_u=[1, 0, 0],
                     detector_v=[0, 1, 0], pixel_spacing_mm=(4 * vox, 4 * vox), size_px=(n, 1), parallel=True)
        ints = material_integrals(vol, g, table, method="exact", device="cpu")
        for kvp in (70, 120):
            for det, csi in (("ideal", None), ("CsI 600 um", 600.0)):
                setup = xray.XraySetup(kvp=kvp, csi_um=csi)
                img = xray.form_image(ints, setup, g)["intensity"][0]
                mu_eff = -np.log(img) / (L / 10.0)
                s = spekpy.Spek(kvp=kvp, th=12, dk=1.0)
                s.filter("Al", 2.5)
                k, f = s.get_spectrum()
                rho = 1.0 if formula == "H2O" else xraylib.ElementDensity(13)
                mu = np.array([xraylib.CS_Total_CP(formula, float(x)) for x in k]) * rho
                eta = np.ones_like(k) if csi is None else 1 - np.exp(
                    -np.array([xraylib.CS_Total_CP("CsI", float(x)) for x in k]) * 4.51 * csi * 1e-4)
                w = f * k * eta
                ref = np.array([-np.log((w * np.exp(-mu * t / 10.0)).sum() / w.sum()) for t in L]) / (L / 10.0)
                err = np.max(np.abs(mu_eff / ref - 1)) * 100
                rows.append((name, kvp, det, mu_eff[0], mu_eff[-1], err))
    print("\n1. beam hardening: mu_eff (1/cm) at the thinnest and thickest step; max |error| vs float64 SpekPy+xraylib")
    print(f"{'wedge':10s} {'kVp':>4s} {'detector':12s} {'mu_eff thin':>12s} {'mu_eff thick':>13s} {'max err %':>10s}")
    for r in rows:
        print(f"{r[0]:10s} {r[1]:4d} {r[2]:12s} {r[3]:12.4f} {r[4]:13.4f} {r[5]:10.4f}")
    return max(r[5] for r in rows)


def noise(m=32):
    n = 512
    g = Geometry(source_mm=[0, 0, -1000.0], detector_center_mm=[0, 0, 500.0], detector_u=[1, 0, 0],
                 detector_v=[0, 1, 0], pixel_spacing_mm=(0.194, 0.194), size_px=(n, n), extra={"sad_mm": 1000.0})
    setup = xray.XraySetup(kvp=80, detector="paxscan4030cb", photons=5000.0, electronic_sigma=0.0)
    zero = {"water": np.zeros((n, n))}
    p = xray.polychromatic(zero, setup, g)
    eta = xray.absorbed_fraction(p["spectrum_kev"], setup.csi)
    n_det = 5000.0 * float((eta * p["spectrum_fluence"]).sum() / p["spectrum_fluence"].sum())
    sig = xray.blur_sigma_px(setup, g)
    delta = np.zeros((41, 41))
    delta[20, 20] = 1
    k2 = float((xray.blur(delta, sig) ** 2).sum())
    nps = np.zeros((n, n))
    var = []
    for s in range(m):
        setup.seed = s
        img = xray.form_image(zero, setup, g)["intensity"]
        var.append(img[8:-8, 8:-8].var())
        d = img - img.mean()
        nps += np.abs(np.fft.fft2(d)) ** 2 / (n * n)
    nps /= m
    f = np.fft.fftfreq(n)
    fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    mtf2 = np.exp(-4 * np.pi ** 2 * sig[0] ** 2 * fr ** 2)
    bins = np.linspace(0.01, 0.25, 13)
    ratios = [float(np.mean(nps[(fr > a) & (fr <= b)]) * n_det / np.mean(mtf2[(fr > a) & (fr <= b)]))
              for a, b in zip(bins[:-1], bins[1:])]
    vr = float(np.mean(var) / (k2 / n_det))
    print(f"\n2. noise (PaxScan 4030CB preset, {n}^2, {m} realisations): variance / Poisson-after-blur prediction "
          f"= {vr:.4f}; NPS / MTF^2 (up to half Nyquist) in 12 rings: min {min(ratios):.3f}, max {max(ratios):.3f}")
    return vr, ratios


def cost():
    from ctwin.core.volumes.ct import load_ct

    if not REAL_PELVIS.exists():
        print("\n3. cost: real CT not found, skipped")
        return
    pv = prepare_volume(load_ct(REAL_PELVIS))
    g = named_view("ap", pv.bbox_world() if hasattr(pv, "bbox_world") else load_ct(REAL_PELVIS), size=512)
    setup = xray.XraySetup(kvp=80, detector="paxscan4030cb", mas=2.0)
    render_value(pv, g, device="cpu")
    render_value(pv, g, device="cpu", xray=setup)
    tm, tr = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        render_value(pv, g, device="cpu")
        tm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rec = {}
        render_value(pv, g, device="cpu", xray=setup, record=rec)
        tr.append(time.perf_counter() - t0)
    print(f"\n3. cost, real pelvis CT AP 512^2 CPU: monoenergetic {np.median(tm):.2f} s, realistic "
          f"{np.median(tr):.2f} s (ratio {np.median(tr) / np.median(tm):.1f}; "
          f"{len(physics.material_luts())} calibration materials, one projection each where present)")


def crop_z(vol: Volume, z0: float, z1: float) -> Volume:
    zs = (vol.affine @ np.c_[np.zeros((vol.data.shape[2], 2)), np.arange(vol.data.shape[2]),
                            np.ones(vol.data.shape[2])].T)[2]
    keep = np.where((zs >= min(z0, z1)) & (zs <= max(z0, z1)))[0]
    k0, k1 = int(keep.min()), int(keep.max()) + 1
    aff = vol.affine.copy()
    aff[:3, 3] = (vol.affine @ np.array([0, 0, k0, 1.0]))[:3]
    return Volume(np.ascontiguousarray(vol.data[:, :, k0:k1]), aff)


def side_by_side(vol: Volume, kvp: float, mas: float, path: Path, title: str):
    from PIL import Image

    pv = prepare_volume(vol)
    g = named_view("ap", vol, size=512)
    a = render_value(pv, g, device="auto", value="display")
    setup = xray.XraySetup(kvp=kvp, detector="paxscan4030cb", mas=mas, focal_spot_mm=0.6, seed=1)
    b = render_value(pv, g, device="auto", value="radiograph", xray=setup)
    a = a / max(float(a.max()), 1e-6)
    gap = np.ones((a.shape[0], 8))
    img = (np.clip(np.hstack([a, gap, b]), 0, 1) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    print(f"   {path.name}: {title}, left default, right {kvp:g} kVp / {mas:g} mAs / PaxScan 4030CB")


def pictures(out: Path, phantom: Path | None):
    from ctwin.core.volumes.ct import load_ct
    from ctwin.core.fileio import read_json

    print("\n4. pictures")
    if phantom is not None:
        vol = load_ct(phantom / "ct.nii.gz")
        j = np.asarray(read_json(phantom / "truth.json")["joints"], float)
        # SMPL joints: 0 pelvis, 3 spine1, 4/5 knees, 12 neck, 16/17 shoulders
        side_by_side(crop_z(vol, j[3, 2] - 40, j[12, 2] + 20), 120, 2.0, out / "xray_phantom_chest.png",
                     "phantom chest (spine1 to neck)")
        side_by_side(crop_z(vol, 0.5 * (j[0, 2] + j[4, 2]) - 60, j[3, 2]), 80, 10.0, out / "xray_phantom_pelvis.png",
                     "phantom pelvis (mid-thigh to spine1)")
    if REAL_PELVIS.exists():
        side_by_side(load_ct(REAL_PELVIS), 80, 10.0, out / "xray_real_pelvis.png",
                     "real pelvis CT (TotalSegmentator test data: contrast, femoral implant)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantom", type=Path, default=None, help="a ctwin phantom folder (ct.nii.gz, truth.json)")
    ap.add_argument("--images", type=Path, default=None, help="write the side-by-side pictures here")
    ap.add_argument("--skip-noise", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    a = ap.parse_args()
    beam_hardening()
    if not a.skip_noise:
        noise()
    if not a.skip_cost:
        cost()
    if a.images:
        pictures(a.images, a.phantom)


if __name__ == "__main__":
    main()
