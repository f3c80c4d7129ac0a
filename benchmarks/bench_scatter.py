"""Scatter model (core.drr.xray): scatter-to-primary ratios of water slabs, with and without a grid.

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
No published Monte Carlo SPR table for water slabs could be read on this machine (Chan & Doi, Med
Phys 12:152, 1985; Boone & Seibert, Med Phys 15:713, 1988; Persliden & Carlsson 1997 and Sandborg
et al. 1993 were searched: only their abstracts are reachable, without the tables). A second
search found no more: Siewerdsen & Jaffray, Med Phys 28:220, 2001 (full text, but SPR measured
on a cone-beam bench for cylinders, given in figures), Sisniega et al., Med Phys 40:051915, 2013,
and a Monte Carlo cone-beam study of water cylinders ("SPR around 5 for large phantoms, wide beams
and 120 kV"), Kyriakou & Kalender 2007, Fetterly & Schueler and Court & Yamazaki 2004 (grids):
abstracts or set-ups other than slabs; and no public repository publishes such a table (XCIST's
kernel model states about 15 % SPR for a 35 cm water cylinder in a 40 mm CT beam, a different
geometry). So the table has no Monte Carlo column and claims no validation against Monte Carlo,
and no multiple-scatter term is fitted (nothing to fit it to or check it against). After it, the only
published SPR figures that could be read are printed beside the model's value for the nearest
set-up, for scale only (their set-ups differ or are not fully known):
- Johns & Yaffe, "Coherent scatter in diagnostic radiology", Med Phys 10(1), 1983 (abstract):
  radiography of the abdomen, coherent first scatter = 26 % of the primary and 10 % of all scatter
  before a grid (so SPR ~ 2.6), 7.5 % and 22 % behind a grid (SPR ~ 0.34);
- Altunbas et al., AAPM 2016 abstract WE-AB-207A-10 (Med Phys 43(6), 2016; full paper
  Med Phys 44:3952, 2017), measured with a beam stop on a linac-mounted CBCT: 30 cm of acrylic,
  SPR 4.51 without a grid and 1.28 with a 10:1 grid.
Both are several times the first-order model's values: the model has no multiple scatter, which
dominates in thick bodies, so its SPR is a lower bound. Only measured numbers are printed.
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

from ctwin.core.drr import xray
from ctwin.core.drr.carm import Geometry  # noqa: E402

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
    print("published figures (set-ups differ; for scale, not a validation):")
    for kvp, cm, grid, ref, src in ((70.0, 20, None, 2.6, "Johns & Yaffe 1983, abdomen, no grid (~2.6)"),
                                    (70.0, 20, 10.0, 0.34, "Johns & Yaffe 1983, abdomen, grid (~0.34)"),
                                    (120.0, 30, None, 4.51, "Altunbas et al. 2016, 30 cm acrylic CBCT, no grid"),
                                    (120.0, 30, 10.0, 1.28, "Altunbas et al. 2016, same, 10:1 grid")):
        t = cm * 10.0
        d = GAP + t / 2.0
        g = Geometry(source_mm=[0, 0, -(SID - d)], detector_center_mm=[0, 0, d], detector_u=[1, 0, 0],
                     detector_v=[0, 1, 0], pixel_spacing_mm=(FIELD / N, FIELD / N), size_px=(N, N),
                     extra={"sad_mm": SID - d})
        rec = xray.form_image({"water": np.full((N, N), t)}, xray.XraySetup(kvp=kvp, scatter=True, grid_ratio=grid),
                              g)["sidecar"]["scatter_model"]
        print(f"  {src}: published {ref:.2f}; model ({cm} cm water, {kvp:.0f} kVp, "
              f"{'10:1 grid' if grid else 'no grid'}) {rec['spr_centre']:.2f} (ratio {ref / rec['spr_centre']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
