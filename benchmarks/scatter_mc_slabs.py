"""Monte Carlo scatter-to-primary ratios of water slabs (``core.drr.scatter_mc``): the reference the
scatter model's multiple-scatter term is fitted to and checked against.

    nice -n 10 .venv/bin/python benchmarks/scatter_mc_slabs.py [--photons N]

The set-up of ``bench_scatter.py``: point source 1000 mm above the detector, a 30 x 30 cm open field
at the detector, water slabs 5-30 cm lying 50 mm above it (laterally 2 x 2 m), 70 and 120 kVp
(SpekPy, 2.5 mm Al), ideal energy-integrating detector, no grid and the model's 10:1, 40 lines/cm
grid; SPR over the central 6 x 6 cm. Also pencil beams (radial profiles of single and multiple
scatter at the detector). Writes ``benchmarks/results/scatter_mc_slabs.json`` and prints the table
(``results/scatter_mc_slabs.txt``: the run of the stored JSON, with the seconds per case on the
loaded shared 2-core machine).
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

from ctwin.core.drr import scatter_mc  # noqa: E402
from ctwin.core.fileio import write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "scatter_mc_slabs.json"
SID, GAP, FIELD, REGION = 1000.0, 50.0, 300.0, 30.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photons", type=int, default=20_000_000)
    ap.add_argument("--pencil-photons", type=int, default=2_000_000)
    a = ap.parse_args()
    rows, pencils = [], []
    print(f"{'kVp':>4} {'grid':>4} {'cm':>3} {'SPR':>7} {'+-':>6} {'single':>7} {'multi':>7} {'E_s':>5} {'E_m':>5} {'s':>5}")
    for kvp in (70.0, 120.0):
        for grid in (None, 10.0):
            for cm in (5, 10, 15, 20, 25, 30):
                t0 = time.perf_counter()
                r = scatter_mc.simulate_slab(cm * 10.0, kvp=kvp, photons=a.photons, seed=cm + int(kvp),
                                             sid_mm=SID, gap_mm=GAP, field_mm=(FIELD, FIELD), region_mm=REGION,
                                             grid_ratio=grid)
                dt = time.perf_counter() - t0
                rows.append({"kvp": kvp, "grid": grid, "cm": cm, "spr": r.spr, "spr_err": r.spr_err,
                             "spr_single": r.spr_single, "spr_single_err": r.spr_single_err,
                             "spr_multiple": r.spr_multiple, "spr_multiple_err": r.spr_multiple_err,
                             "kev_single": r.kev_single, "kev_multiple": r.kev_multiple,
                             "primary_expected": r.primary_expected, "primary_analog": r.primary_analog,
                             "photons": r.photons, "seed": cm + int(kvp)})
                print(f"{kvp:4.0f} {grid or 0:4.0f} {cm:3d} {r.spr:7.3f} {r.spr_err:6.3f} {r.spr_single:7.3f} "
                      f"{r.spr_multiple:7.3f} {r.kev_single:5.1f} {r.kev_multiple:5.1f} {dt:5.1f}", flush=True)
    for kvp in (70.0, 120.0):
        for cm in (10, 20, 30):
            r = scatter_mc.simulate_slab(cm * 10.0, kvp=kvp, photons=a.pencil_photons, seed=7 + cm, beam="pencil",
                                         sid_mm=SID, gap_mm=GAP, region_mm=REGION)
            pencils.append({"kvp": kvp, "cm": cm, "ring_mm": scatter_mc.RADIAL_MM,
                            "single": r.radial[0].tolist(), "multiple": r.radial[1].tolist(),
                            "primary_expected": r.primary_expected, "photons": r.photons})
            print(f"pencil {kvp:.0f} kVp {cm} cm: multiple / single = {r.radial[1].sum() / r.radial[0].sum():.2f}", flush=True)
    meta = {"set_up": {"sid_mm": SID, "gap_mm": GAP, "field_mm": FIELD, "region_half_mm": REGION,
                       "detector": "ideal", "filtration": "2.5 mm Al (SpekPy)", "grid": "10:1, 40 lines/cm, 36 um lamellae"},
            "slabs": rows, "pencils": pencils}
    write_json(OUT, meta, indent=1)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
