"""Scatter model (core.xray): scatter-to-primary ratios of water slabs, with and without a grid.

    .venv/bin/python benchmarks/bench_scatter.py

Water slabs 5-30 cm thick, 30 x 30 cm field, the slab lying on the table 50 mm above the detector
(SID 1000 mm; radiography), 70 and 120 kVp (2.5 mm Al, ideal detector), without and with a 10:1,
40 lines/cm grid. For each case it prints:
- ``model``: the SPR at the field centre from the full chain (``xray.form_image`` on a slab image,
  polychromatic, 8-group thickness kernels on a 128^2 coarse grid);
- ``single``: the single-scatter SPR at the same point by direct volume integration through the
  slab (``xray.slab_spr_reference``: every depth, the true oblique exit path at the Compton
  energy, inverse square), summed over the SpekPy spectrum in 5 keV groups weighted by each
  group's detected primary behind the slab. It checks the kernel approximations (pencil beams,
  8 scatter depths, thickness groups, one energy per group, the water-equivalent thickness read
  from the polychromatic primary); it is the same first-order physics, not a Monte Carlo;
- the time of one scatter image (loaded shared machine).
No published Monte Carlo SPR table for water slabs could be obtained on this machine (only the
qualitative statements that SPR grows with thickness, field and kVp, and exceeds 1 for a pelvis
in cone-beam CT: Siewerdsen & Jaffray, Med Phys 28:220, 2001, abstract), so this prints no
reference column and claims no validation against Monte Carlo. The model has no multiple scatter:
for thick slabs the true SPR is larger (multiple scatter dominates beyond ~10 cm of water).
Only measured numbers are printed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

from ctwin.core import xray  # noqa: E402
from ctwin.core.carm import Geometry  # noqa: E402

SID, GAP, FIELD, N = 1000.0, 50.0, 300.0, 128


def poly_reference(kvp: float, t: float, d: float, grid) -> float:
    """Single-scatter SPR of the slab summed over the spectrum (5 keV groups)."""
    e, fl = xray.spectrum(kvp, distance_mm=SID)
    w = fl * e * np.exp(-xray.mass_attenuation("water", e) * t / 10.0)   # ideal detector: energy deposit
    s_sum = p_sum = 0.0
    for lo in np.arange(5.0, kvp, 5.0):
        sel = (e >= lo) & (e < lo + 5.0)
        if not sel.any() or w[sel].sum() <= 0:
            continue
        eg = float((w[sel] * e[sel]).sum() / w[sel].sum())
        tp, _ = xray.grid_transmission(eg, np.zeros(1), grid)
        spr = xray.slab_spr_reference(eg, t, d, (FIELD, FIELD), grid_ratio=grid, n=50)
        s_sum += w[sel].sum() * tp * spr
        p_sum += w[sel].sum() * tp
    return s_sum / p_sum


def main() -> int:
    print(f"water slabs, {FIELD / 10:g} x {FIELD / 10:g} cm field, slab {GAP:g} mm above the detector, SID {SID:g} mm")
    print(f"{'kVp':>4} {'grid':>5} {'cm':>4} {'E_eff':>6} {'model':>8} {'single':>8} {'diff%':>7} {'s':>6}")
    worst = 0.0
    for kvp in (70.0, 120.0):
        for grid in (None, 10.0):
            for cm in (5, 10, 15, 20, 25, 30):
                t = cm * 10.0
                d = GAP + t / 2.0                      # slab mid-plane above the detector
                sad = SID - d
                g = Geometry(source_mm=[0, 0, -sad], detector_center_mm=[0, 0, d], detector_u=[1, 0, 0],
                             detector_v=[0, 1, 0], pixel_spacing_mm=(FIELD / N, FIELD / N), size_px=(N, N),
                             extra={"sad_mm": sad})
                ints = {"water": np.full((N, N), t * 1.0)}  # g/cm3 x mm
                setup = xray.XraySetup(kvp=kvp, scatter=True, grid_ratio=grid)
                t0 = time.perf_counter()
                rec = xray.form_image(ints, setup, g)["sidecar"]["scatter_model"]
                dt = time.perf_counter() - t0
                ref = poly_reference(kvp, t, d, grid)
                diff = 100.0 * (rec["spr_centre"] / ref - 1.0)
                worst = max(worst, abs(diff))
                print(f"{kvp:4.0f} {grid or 0:5.0f} {cm:4d} {rec['effective_kev']:6.1f} {rec['spr_centre']:8.3f} "
                      f"{ref:8.3f} {diff:7.1f} {dt:6.2f}")
    print(f"max |model - single-scatter integral| = {worst:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
