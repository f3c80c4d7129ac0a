"""Fit of the scatter model's multiple-scatter term (``core.drr.xray.MULTI_FIT``,
``MULTI_SIGMA_PER_TAU``, ``MULTI_COS_POWER``) to the Monte Carlo of water slabs
(``benchmarks/scatter_mc_slabs.py``, its ``benchmarks/results/scatter_mc_slabs.json``).

    .venv/bin/python benchmarks/fit_multiscatter.py

1. The lateral spread: sigma / tau of the exit-face Gaussian that best reproduces the radial profiles
   of multiple scatter of the Monte Carlo's pencil beams (70 / 120 kVp, 10 / 20 / 30 cm; cumulative
   profiles to 150 mm compared; with the emission power n in core/drr/xray.py, found by 3.).
2. The amplitude: the model's multiple-scatter SPR per unit amplitude over the central 6 x 6 cm of
   each no-grid slab lying on a thickness knot (5, 10, 15, 20, 30 cm), and the least-squares fit of
   ln A = c0 + c1 ln(mu_s tau) + c2 mu_s tau + c3 ln(E / 60 keV) to what the Monte Carlo's total SPR
   leaves beyond the model's first order (so the term also takes up the first order's shortfall).
3. The power n of the emission's cos^n angular distribution: the one (2. refitted for each) whose
   model best matches the Monte Carlo's SPR behind the 10:1 grid on the same knots.
The 25 cm slabs are fitted in no step: ``bench_scatter.py`` checks them. Prints the constants to put
in ``core/drr/xray.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

from ctwin.core.drr import xray  # noqa: E402
from ctwin.core.drr.carm import Geometry  # noqa: E402

MC = ROOT / "benchmarks" / "results" / "scatter_mc_slabs.json"
N = 128


def slab_spr(kvp, cm, grid, field, region, sid, gap):
    """The model's (single, multiple) SPR over the central region of a uniform slab."""
    t = cm * 10.0
    d = gap + t / 2.0
    g = Geometry(source_mm=[0, 0, -(sid - d)], detector_center_mm=[0, 0, d], detector_u=[1, 0, 0],
                 detector_v=[0, 1, 0], pixel_spacing_mm=(field / N, field / N), size_px=(N, N),
                 extra={"sad_mm": sid - d})
    ints = {"water": np.full((N, N), t)}
    prim = xray.form_image(ints, xray.XraySetup(kvp=kvp, grid_ratio=grid), g)["intensity"]
    c = (np.arange(N) - (N - 1) / 2.0) * field / N
    sel = (abs(c)[:, None] <= region) & (abs(c)[None, :] <= region)
    out = []
    keep = xray.MULTI_FIT
    for fit in ((-80.0, 0.0, 0.0, 0.0), keep):
        xray.MULTI_FIT = fit
        tot = xray.form_image(ints, xray.XraySetup(kvp=kvp, scatter=True, grid_ratio=grid), g)["intensity"]
        out.append(float((tot[sel] - prim[sel]).sum() / prim[sel].sum()))
    xray.MULTI_FIT = keep
    return out[0], out[1] - out[0]


def main() -> int:
    mc = json.loads(MC.read_text())
    su = mc["set_up"]
    # 1. lateral spread from the pencil beams
    best = None
    for k in np.arange(0.0, 0.81, 0.05):
        xray.MULTI_SIGMA_PER_TAU = float(k)
        err = 0.0
        for pen in mc["pencils"]:
            t = pen["cm"] * 10.0
            e, fl = xray.spectrum(pen["kvp"], distance_mm=su["sid_mm"])
            ew = fl * e * np.exp(-xray.mass_attenuation("water", e) * t / 10.0)
            kev = float((ew * e).sum() / ew.sum())
            sp = 2.5
            km = xray.multiple_scatter_kernel(kev, t, su["gap_mm"] + t / 2.0, (161, 161), (sp, sp))
            y = (np.arange(km.shape[0]) - (km.shape[0] - 1) / 2.0) * sp
            r = np.hypot(y[:, None], y[None, :])
            ring = pen["ring_mm"]
            edges = np.arange(0, 151, ring)
            mod = np.array([km[(r >= a) & (r < a + ring)].sum() for a in edges[:-1]])
            ref = np.asarray(pen["multiple"])[:len(mod)]
            cm_mod = np.cumsum(mod) / mod.sum()
            cm_ref = np.cumsum(ref) / ref.sum()
            err += float(((cm_mod - cm_ref) ** 2).sum())
        print(f"sigma/tau {k:.2f}: squared error of the cumulative radial profiles {err:.4f}")
        if best is None or err < best[1]:
            best = (float(k), err)
    xray.MULTI_SIGMA_PER_TAU = best[0]
    print(f"best sigma/tau = {best[0]:.2f}")
    # 2. amplitude (to the Monte Carlo's total less the model's first order, no grid) for each power n
    #    of the angular distribution; 3. n by the slabs behind the grid on the knots
    knots = [r for r in mc["slabs"] if r["cm"] != 25]
    best_n = None
    for n in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0):
        xray.MULTI_COS_POWER = n
        xray.MULTI_FIT = (0.0, 0.0, 0.0, 0.0)   # A = 1
        X, Y = [], []
        for row in knots:
            if row["grid"]:
                continue
            single, unit = slab_spr(row["kvp"], row["cm"], None, su["field_mm"], su["region_half_mm"],
                                    su["sid_mm"], su["gap_mm"])
            t = row["cm"] * 10.0
            e, fl = xray.spectrum(row["kvp"], distance_mm=su["sid_mm"])
            ew = fl * e * np.exp(-xray.mass_attenuation("water", e) * t / 10.0)
            kev = float((ew * e).sum() / ew.sum())
            *_, sig = xray._angle_weights(kev, None)
            x = sig * xray.density("water") * t / 10.0
            X.append([1.0, np.log(x), x, np.log(kev / 60.0)])
            Y.append(np.log((row["spr"] - single) / unit))
        coef, *_ = np.linalg.lstsq(np.array(X), np.array(Y), rcond=None)
        res = np.array(Y) - np.array(X) @ coef
        xray.MULTI_FIT = tuple(float(c) for c in coef)
        gres = []
        for row in knots:
            if not row["grid"]:
                continue
            single, multi = slab_spr(row["kvp"], row["cm"], row["grid"], su["field_mm"], su["region_half_mm"],
                                     su["sid_mm"], su["gap_mm"])
            gres.append(np.log((single + multi) / row["spr"]))
        grms = float(np.sqrt(np.mean(np.square(gres))))
        print(f"n = {n:.1f}: amplitude fit rms {np.sqrt((res ** 2).mean()) * 100:.1f} %, grid cases rms "
              f"{grms * 100:.1f} % (max {np.max(np.abs(gres)) * 100:.1f} %), fit ({', '.join(f'{c:.4f}' for c in coef)})",
              flush=True)
        if best_n is None or grms < best_n[1]:
            best_n = (n, grms, tuple(float(c) for c in coef), float(np.sqrt((res ** 2).mean())))
    print(f"MULTI_FIT = ({', '.join(f'{c:.4f}' for c in best_n[2])})  # rms residual {best_n[3] * 100:.1f} %")
    print(f"MULTI_SIGMA_PER_TAU = {best[0]:.2f}")
    print(f"MULTI_COS_POWER = {best_n[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
