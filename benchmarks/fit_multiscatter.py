"""Fit of the scatter model's multiple-scatter term (``core.drr.xray.MULTI_FIT``, ``MULTI_SOURCE_MM``,
``MULTI_SOURCE_PER_TAU``, ``MULTI_COS_POWER``) to the Monte Carlo of water slabs
(``benchmarks/scatter_mc_slabs.py``, its ``benchmarks/results/scatter_mc_slabs.json``).

    .venv/bin/python benchmarks/fit_multiscatter.py

For each power n of the emission's cos^n angular distribution:
1. the virtual source's height above the exit face (c mm + k tau) that best reproduces the radial
   profiles of multiple scatter of the Monte Carlo's pencil beams (70 / 120 kVp, 10 / 20 / 30 cm;
   cumulative profiles to 500 mm);
2. the amplitude: the model's multiple-scatter SPR per unit amplitude over the central 6 x 6 cm of
   each no-grid slab lying on a thickness knot (5, 10, 15, 20, 30 cm), and the least-squares fit of
   ln A = c0 + c1 ln(mu_s tau) + c2 mu_s tau + c3 ln(E / 60 keV) to what the Monte Carlo's total SPR
   leaves beyond the model's first order (so the term also takes up the first order's shortfall);
3. the model's SPR behind the 10:1 grid on the same knots against the Monte Carlo's: the n with the
   smallest rms difference is kept.
The 25 cm slabs are fitted in no step, nor are the other air gaps and kVps that ``bench_scatter.py``
checks. Each candidate goes to the model as a ``xray.MultiScatterFit`` (the module's constants are
not touched). Prints the constants to put in ``core/drr/xray.py``.
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

from ctwin.core.drr import scatter_mc, xray  # noqa: E402

MC = ROOT / "benchmarks" / "results" / "scatter_mc_slabs.json"
N = 128


def slab_spr(kvp, cm, grid, field, region, sid, gap, fit):
    """The model's (single, multiple) SPR over the central region of a uniform slab, the multiple-scatter
    term with the parameters ``fit`` (a ``xray.MultiScatterFit``)."""
    g, ints, sel = scatter_mc.slab_view(cm * 10.0, N, field_mm=field, region_mm=region, sid_mm=sid, gap_mm=gap)
    prim = xray.form_image(ints, xray.XraySetup(kvp=kvp, grid_ratio=grid), g)["intensity"]
    out = []
    for multiple in (False, True):
        setup = xray.XraySetup(kvp=kvp, scatter=True, multiple_scatter=multiple, grid_ratio=grid)
        tot = xray.form_image(ints, setup, g, multi_fit=fit)["intensity"]
        out.append(float((tot[sel] - prim[sel]).sum() / prim[sel].sum()))
    return out[0], out[1] - out[0]


def main() -> int:
    mc = json.loads(MC.read_text())
    su = mc["set_up"]
    # 1. virtual source height and angular power from the pencil beams' radial profiles
    best = None
    pens = []
    for pen in mc["pencils"]:
        t = pen["cm"] * 10.0
        e, fl = xray.spectrum(pen["kvp"], distance_mm=su["sid_mm"])
        ew = fl * e * np.exp(-xray.mass_attenuation("water", e) * t / 10.0)
        pens.append((t, float((ew * e).sum() / ew.sum()), pen["ring_mm"], np.asarray(pen["multiple"])))
    sp = 5.0
    y = (np.arange(201) - 100) * sp
    r = np.hypot(y[:, None], y[None, :])
    def fit_height(n):
        """Virtual source height (c mm + k tau) for the power n by the pencils' cumulative profiles."""
        out = None
        for c in np.arange(0.0, 121.0, 10.0):
            for k in np.arange(0.0, 0.81, 0.1):
                fit = xray.MultiScatterFit(source_mm=float(c), source_per_tau=float(k), cos_power=float(n))
                err = 0.0
                for t, kev, ring, ref in pens:
                    km = xray.multiple_scatter_kernel(kev, t, su["gap_mm"] + t / 2.0, (101, 101), (sp, sp), fit=fit)
                    idx = np.minimum((r / ring).astype(int), len(ref))
                    mod = np.bincount(idx.ravel(), km.ravel(), minlength=len(ref) + 1)[:len(ref)]
                    err += float(((np.cumsum(mod) / mod.sum() - np.cumsum(ref) / ref.sum()) ** 2).sum())
                if out is None or err < out[2]:
                    out = (float(c), float(k), err)
        return out

    def fit_amplitude(n, c, k):
        """2. ln A on the no-grid knots (the Monte Carlo's total less the model's first order), for the
        power n and source height c + k tau: the fit's coefficients and rms residual."""
        unit_fit = xray.MultiScatterFit((0.0, 0.0, 0.0, 0.0), c, k, n)   # A = 1
        X, Y = [], []
        for row in mc["slabs"]:
            if row["grid"] or row["cm"] == 25:
                continue
            single, unit = slab_spr(row["kvp"], row["cm"], None, su["field_mm"], su["region_half_mm"],
                                    su["sid_mm"], su["gap_mm"], unit_fit)
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
        return tuple(float(v) for v in coef), float(np.sqrt((res ** 2).mean()))

    # 3. the power n by the slabs behind the grid on the knots (1. and 2. redone for each)
    for n in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0):
        c, k, perr = fit_height(n)
        coef, arms = fit_amplitude(n, c, k)
        fit = xray.MultiScatterFit(coef, c, k, n)
        gres = []
        for row in mc["slabs"]:
            if not row["grid"] or row["cm"] == 25:
                continue
            single, multi = slab_spr(row["kvp"], row["cm"], row["grid"], su["field_mm"], su["region_half_mm"],
                                     su["sid_mm"], su["gap_mm"], fit)
            gres.append(np.log((single + multi) / row["spr"]))
        grms = float(np.sqrt(np.mean(np.square(gres))))
        print(f"n = {n:.1f}: source {c:.0f} mm + {k:.1f} tau (profile error {perr:.3f}), amplitude rms {arms * 100:.1f} %, "
              f"grid rms {grms * 100:.1f} % (max {np.max(np.abs(gres)) * 100:.1f} %), fit ({', '.join(f'{v:.4f}' for v in coef)})",
              flush=True)
        if best is None or grms < best[3]:
            best = (n, c, k, grms, coef, arms)
    n, c, k, grms, coef, arms = best
    print(f"MULTI_FIT = ({', '.join(f'{v:.4f}' for v in coef)})  # rms residual {arms * 100:.1f} %")
    print(f"MULTI_SOURCE_MM = {c:.1f}")
    print(f"MULTI_SOURCE_PER_TAU = {k:.2f}")
    print(f"MULTI_COS_POWER = {n:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
