"""A reference photon-transport Monte Carlo for water slabs: the truth the scatter model is fitted to
and checked against (``core.drr.xray``'s multiple-scatter term, ``benchmarks/bench_scatter.py``).

Analog transport, seeded, one photon at a time in a numba kernel:
- source: a point source ``sid_mm`` above the detector whose photons land uniformly over a
  rectangular field on the detector plane (the flat open field the image model assumes), a
  parallel beam over the same field, or a pencil beam along the axis; energies drawn from the
  SpekPy spectrum's 1 keV bins (or one energy);
- medium: a water slab (``thickness_mm``, lateral half-width ``slab_half_mm``) whose lower face is
  ``gap_mm`` above the detector, in vacuum;
- interactions from xraylib's cross sections of water (Schoonjans et al., Spectrochim Acta B
  66:776, 2011): free paths from CS_Photo + CS_Compt + CS_Rayl (= CS_Total below the pair
  threshold); photoelectric absorption deposits the photon (fluorescence of oxygen, 0.5 keV, is
  local); Compton angles by Klein-Nishina with rejection on the incoherent scattering function of the
  molecule, S_H2O(x) = 2 S_H + S_O (xraylib SF_Compt), the photon keeping the Compton-shifted energy
  (no Doppler broadening); Rayleigh angles from the molecule's squared form factor, 2 F_H^2 + F_O^2
  (independent atoms, xraylib FF_Rayl), sampled in x^2 and accepted on (1 + cos^2)/2 (the scheme of
  PENELOPE, Salvat et al., NEA 2008, ch. 2); x = sin(theta/2) / lambda in 1/Angstrom, hc = 12.39842
  keV Angstrom. Photons below 1 keV deposit locally;
- detector: the plane z = 0, energy integrating and ideal (a photon deposits its energy); optionally
  behind the model's linear anti-scatter grid (``xray.grid_transmission``'s acceptance, with the
  exact azimuth instead of its average: a photon of direction (u, v, w) passes with probability
  open fraction x max(0, 1 - ratio |u / w|) x exp(-mu_Al h / |w|), lamellae along y; primary:
  open fraction x exp(-mu_Al h)).

Tallies over a central square of the detector (half-width ``region_mm``): primary energy as its
expected value per source photon (exp(-mu T / cos) along the straight line, exact and low-variance)
and analog (uncollided photons counted), scatter energy by order (one interaction, more than one);
the energy balance (source = absorbed + escaped through each face); the angle of each photon's first
interaction; the radial profile of scatter at the detector (for pencil beams). Statistical errors
from independent batches.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import CtwinError
from . import xray
from .carm import Geometry

# Imported where used: xraylib (optional third-party package).

HC_KEV_A = 12.39842          # keV x Angstrom (CODATA 2018 hc)
ME_KEV = 510.99895           # electron rest energy, keV (CODATA 2018)
E_CUT_KEV = 1.0
DE_TABLE = 0.1               # keV step of the cross-section tables
DX_TABLE = 0.005             # 1/Angstrom step of the S(x) table
DX2_TABLE = 0.01             # 1/Angstrom^2 step of the cumulative F^2 table
ANGLE_BINS = 90              # first-interaction cos(theta) histogram, -1..1
RADIAL_BINS, RADIAL_MM = 100, 5.0


@functools.lru_cache(maxsize=4)
def tables(e_max_kev: float = 151.0) -> dict:
    """Water's cross sections (1/mm) on a 0.1 keV grid, S_H2O(x) / 10 and the cumulative of
    2 F_H^2 + F_O^2 in x^2, all from xraylib."""
    import xraylib as xr

    zs, ws, rho, _ = xray.composition("water")
    eg = np.arange(E_CUT_KEV, e_max_kev + DE_TABLE, DE_TABLE)
    mu = np.zeros((3, eg.size))
    for z, w in zip(zs, ws):
        for i, e in enumerate(eg):
            mu[0, i] += w * xr.CS_Photo(int(z), float(e))
            mu[1, i] += w * xr.CS_Compt(int(z), float(e))
            mu[2, i] += w * xr.CS_Rayl(int(z), float(e))
    mu *= rho / 10.0
    xmax = e_max_kev / HC_KEV_A + 0.1
    xs = np.arange(0.0, xmax + DX_TABLE, DX_TABLE)
    # xraylib's S(x) table starts at x = 0.001 / Angstrom; below it S grows as x^2 (S(0) = 0)
    s = np.array([(2 * xr.SF_Compt(1, max(x, 1e-3)) + xr.SF_Compt(8, max(x, 1e-3))) / 10.0 * min(1.0, (x / 1e-3) ** 2)
                  for x in xs])
    x2 = np.arange(0.0, xmax ** 2 + DX2_TABLE, DX2_TABLE)
    f2 = np.array([2 * xr.FF_Rayl(1, math.sqrt(v)) ** 2 + xr.FF_Rayl(8, math.sqrt(v)) ** 2 for v in x2])
    g = np.concatenate([[0.0], np.cumsum(0.5 * (f2[1:] + f2[:-1]) * DX2_TABLE)])
    al = xray.mass_attenuation("aluminium", eg) * xray.density("aluminium") / 10.0
    return {"e": eg, "mu": mu, "s": np.clip(s, 0.0, 1.0), "g": g, "mu_al": al}


@njit(cache=True)
def _interp(tab, x0, dx, x):
    f = (x - x0) / dx
    i = int(f)
    if i < 0:
        return tab[0]
    if i >= tab.size - 1:
        return tab[tab.size - 1]
    t = f - i
    return tab[i] * (1.0 - t) + tab[i + 1] * t


@njit(cache=True)
def _rotate(u, v, w, cth, phi):
    sth = math.sqrt(max(0.0, 1.0 - cth * cth))
    cp, sp = math.cos(phi), math.sin(phi)
    if abs(w) > 0.99999:
        sgn = 1.0 if w > 0 else -1.0
        return sth * cp, sth * sp, sgn * cth
    t = math.sqrt(1.0 - w * w)
    un = u * cth + sth * (u * w * cp - v * sp) / t
    vn = v * cth + sth * (v * w * cp + u * sp) / t
    wn = w * cth - sth * t * cp
    n = math.sqrt(un * un + vn * vn + wn * wn)
    return un / n, vn / n, wn / n


@njit(cache=True)
def _transport(n, seed, mode, sid, fx, fy, thick, gap, half, region,
               e_src, cdf, e0, mu, s_tab, g_tab, mu_al, ratio, open_frac, h_grid,
               tally, angle_hist, radial):
    """Transport ``n`` photons. tally: [0] primary expected, [1] primary analog, [2] single scatter,
    [3] multiple scatter (detected energy in the central region), [4] source energy, [5] absorbed,
    [6] out through the lower face, [7] upper face, [8] sides, [9] source photons landing in the region, [10] single and [11] multiple scatter photons
    detected in the region (for their mean energy)."""
    np.random.seed(seed)
    ztop = gap + thick
    for _ in range(n):
        e = e_src[np.searchsorted(cdf, np.random.random() * cdf[cdf.size - 1], side="right")]
        if mode == 2:      # pencil along the axis
            tx, ty = 0.0, 0.0
        else:
            tx = (2.0 * np.random.random() - 1.0) * fx
            ty = (2.0 * np.random.random() - 1.0) * fy
        if mode == 0:      # point source at height sid, aimed at (tx, ty, 0)
            dx, dy, dz = tx, ty, -sid
            nn = math.sqrt(dx * dx + dy * dy + dz * dz)
            u, v, w = dx / nn, dy / nn, dz / nn
            s0 = (sid - ztop) / (-w)
            x, y, z = u * s0, v * s0, ztop
        else:
            u, v, w = 0.0, 0.0, -1.0
            x, y, z = tx, ty, ztop
        tally[4] += e
        in_region = abs(tx) <= region and abs(ty) <= region
        mut = _interp(mu[0], e0, 0.1, e) + _interp(mu[1], e0, 0.1, e) + _interp(mu[2], e0, 0.1, e)
        if in_region:
            tally[9] += 1.0
            tp = 1.0
            if ratio > 0:
                tp = open_frac * math.exp(-_interp(mu_al, e0, 0.1, e) * h_grid)
            tally[0] += e * math.exp(-mut * thick / (-w)) * tp
        order = 0
        first = True
        while True:
            mph = _interp(mu[0], e0, 0.1, e)
            mco = _interp(mu[1], e0, 0.1, e)
            mra = _interp(mu[2], e0, 0.1, e)
            mut = mph + mco + mra
            s = -math.log(1.0 - np.random.random()) / mut
            # distance to the slab's faces
            if w < 0:
                dz_ = (z - gap) / (-w)
            elif w > 0:
                dz_ = (ztop - z) / w
            else:
                dz_ = 1e30
            dxs = 1e30
            if u > 0:
                dxs = (half - x) / u
            elif u < 0:
                dxs = (-half - x) / u
            dys = 1e30
            if v > 0:
                dys = (half - y) / v
            elif v < 0:
                dys = (-half - y) / v
            dmin = min(dz_, dxs, dys)
            if s >= dmin:
                x += u * dmin
                y += v * dmin
                z += w * dmin
                if dz_ <= dxs and dz_ <= dys:
                    if w < 0:   # lower face: on to the detector plane
                        tally[6] += e
                        t = z / (-w)
                        xd, yd = x + u * t, y + v * t
                        if order > 0:
                            r = math.sqrt(xd * xd + yd * yd)
                            ib = int(r / 5.0)
                            if ib < radial.shape[1]:
                                radial[min(order, 2) - 1, ib] += e
                        if abs(xd) <= region and abs(yd) <= region:
                            wt = 1.0
                            if ratio > 0:
                                if order == 0:
                                    wt = open_frac * math.exp(-_interp(mu_al, e0, 0.1, e) * h_grid)
                                else:
                                    geo = 1.0 - ratio * abs(u / w)
                                    wt = 0.0
                                    if geo > 0:
                                        wt = open_frac * geo * math.exp(-_interp(mu_al, e0, 0.1, e) * h_grid / (-w))
                            if order == 0:
                                tally[1] += e * wt
                            elif order == 1:
                                tally[2] += e * wt
                                tally[10] += wt
                            else:
                                tally[3] += e * wt
                                tally[11] += wt
                    else:
                        tally[7] += e
                else:
                    tally[8] += e
                break
            x += u * s
            y += v * s
            z += w * s
            r = np.random.random() * mut
            if r < mph:
                tally[5] += e
                break
            k = e / ME_KEV
            xmax = e / HC_KEV_A
            if r < mph + mco:   # Compton: Klein-Nishina x S(x)/Z by rejection
                while True:
                    c = 2.0 * np.random.random() - 1.0
                    p = 1.0 / (1.0 + k * (1.0 - c))
                    f = 0.5 * p * p * (p + 1.0 / p - (1.0 - c * c))
                    xq = xmax * math.sqrt(0.5 * (1.0 - c))
                    if np.random.random() < f * _interp(s_tab, 0.0, 0.005, xq):
                        break
                ne = e * p
                tally[5] += e - ne
                e = ne
            else:               # Rayleigh: x^2 from F^2, accepted on (1 + cos^2) / 2
                gmax = _interp(g_tab, 0.0, 0.01, xmax * xmax)
                while True:
                    target = np.random.random() * gmax
                    j = np.searchsorted(g_tab, target)
                    if j < 1:
                        j = 1
                    dg = g_tab[j] - g_tab[j - 1]
                    x2 = (j - 1 + ((target - g_tab[j - 1]) / dg if dg > 0 else 0.0)) * 0.01
                    c = 1.0 - 2.0 * x2 / (xmax * xmax)
                    if c < -1.0:
                        c = -1.0
                    if np.random.random() < 0.5 * (1.0 + c * c):
                        break
            if first:
                ia = int((c + 1.0) * 0.5 * angle_hist.size)
                angle_hist[min(ia, angle_hist.size - 1)] += 1.0
                first = False
            order += 1
            u, v, w = _rotate(u, v, w, c, 2.0 * math.pi * np.random.random())
            if e < 1.0:
                tally[5] += e
                break


@dataclass
class SlabResult:
    spr: float               # (single + multiple scatter) / primary in the central region
    spr_single: float
    spr_multiple: float
    spr_err: float           # one standard error (between batches)
    spr_single_err: float
    spr_multiple_err: float
    primary_expected: float  # detected primary energy per source photon (expected value)
    primary_analog: float    # the same counted from uncollided photons
    primary_analog_err: float
    energy: dict             # per source photon: source, absorbed, lower, upper, sides
    angle_hist: np.ndarray   # first interactions per cos(theta) bin (-1..1)
    radial: np.ndarray       # (2, RADIAL_BINS) scatter energy per 5 mm ring: single, multiple
    photons: int
    kev_single: float        # mean energy of the detected single / multiple scatter
    kev_multiple: float


def simulate_slab(thickness_mm: float, kvp: float | None = None, kev: float | None = None, photons: int = 100000,
                  seed: int = 0, beam: str = "cone", sid_mm: float = 1000.0, gap_mm: float = 50.0,
                  field_mm=(300.0, 300.0), region_mm: float = 30.0, slab_half_mm: float = 1000.0,
                  grid_ratio: float | None = None, grid_lines_per_cm: float = xray.GRID_LINES_PER_CM,
                  batches: int = 8, spectrum=None) -> SlabResult:
    """Monte Carlo SPR of a water slab at the centre of the detector (module docstring). ``kvp``: the
    SpekPy spectrum at the detector distance (``xray.spectrum``; or ``spectrum`` = (keV, weights)),
    ``kev``: one energy."""
    if not 0.0 < thickness_mm <= 1000.0:
        raise CtwinError(f"slab thickness must be within 0-1000 mm, got {thickness_mm:g}")
    modes = {"cone": 0, "parallel": 1, "pencil": 2}
    if beam not in modes:
        raise CtwinError(f"beam must be one of {', '.join(modes)}, got {beam!r}")
    if not (gap_mm >= 0 and field_mm[0] > 0 and field_mm[1] > 0 and region_mm > 0 and slab_half_mm > 0):
        raise CtwinError("gap must be >= 0 mm and the field, region and slab sizes positive")
    if beam == "cone" and not sid_mm > gap_mm + thickness_mm:
        raise CtwinError(f"the source ({sid_mm:g} mm) must lie above the slab's upper face ({gap_mm + thickness_mm:g} mm)")
    if int(photons) < batches or batches < 1:
        raise CtwinError(f"need at least one photon per batch ({photons} photons, {batches} batches)")
    if (kvp is None) == (kev is None) and spectrum is None:
        raise CtwinError("give kvp (a SpekPy spectrum) or kev (one energy)")
    if spectrum is not None:
        e_src, wts = (np.asarray(a, np.float64) for a in spectrum)
    elif kvp is not None:
        e_src, wts = xray.spectrum(kvp, distance_mm=sid_mm)
    else:
        e_src, wts = np.array([float(kev)]), np.array([1.0])
    if e_src.min() < E_CUT_KEV or e_src.max() > 150.0:
        raise CtwinError("source energies must be within 1-150 keV")
    tb = tables()
    if grid_ratio:
        pitch = 10.0 / float(grid_lines_per_cm)
        gap_g = pitch - xray.GRID_LAMELLA_MM
        ratio, open_frac, h_grid = float(grid_ratio), gap_g / pitch, float(grid_ratio) * gap_g
    else:
        ratio, open_frac, h_grid = 0.0, 1.0, 0.0
    cdf = np.cumsum(wts)
    per = max(1, int(photons) // batches)
    rows = []
    ang = np.zeros(ANGLE_BINS)
    rad = np.zeros((2, RADIAL_BINS))
    for b in range(batches):
        t = np.zeros(12)
        _transport(per, int(seed) * 1000003 + b, modes[beam], float(sid_mm), field_mm[0] / 2.0, field_mm[1] / 2.0,
                   float(thickness_mm), float(gap_mm), float(slab_half_mm), float(region_mm), e_src, cdf,
                   float(tb["e"][0]), tb["mu"], tb["s"], tb["g"], tb["mu_al"], ratio, open_frac, h_grid,
                   t, ang, rad)
        rows.append(t)
    T = np.array(rows)
    tot = T.sum(0)

    def ratio_err(num):
        r = num.sum() / max(T[:, 0].sum(), 1e-300)
        rb = num / np.maximum(T[:, 0], 1e-300)
        return float(r), float(rb.std(ddof=1) / math.sqrt(batches)) if batches > 1 else float("nan")

    s1, e1 = ratio_err(T[:, 2])
    s2, e2 = ratio_err(T[:, 3])
    st, et = ratio_err(T[:, 2] + T[:, 3])
    n = per * batches
    pa = T[:, 1] / per
    return SlabResult(spr=st, spr_single=s1, spr_multiple=s2, spr_err=et, spr_single_err=e1, spr_multiple_err=e2,
                      primary_expected=float(tot[0] / n), primary_analog=float(tot[1] / n),
                      primary_analog_err=float(pa.std(ddof=1) / math.sqrt(batches)) if batches > 1 else float("nan"),
                      energy={"source": tot[4] / n, "absorbed": tot[5] / n, "lower": tot[6] / n,
                              "upper": tot[7] / n, "sides": tot[8] / n},
                      angle_hist=ang, radial=rad / n, photons=n,
                      kev_single=float(tot[2] / max(tot[10], 1e-300)), kev_multiple=float(tot[3] / max(tot[11], 1e-300)))


def slab_view(thickness_mm: float, n: int, *, field_mm: float = 300.0, region_mm: float = 30.0,
              sid_mm: float = 1000.0, gap_mm: float = 50.0) -> tuple:
    """``simulate_slab``'s cone-beam set-up for the image model: (``Geometry`` of an ``n``^2 detector
    covering the ``field_mm`` field, the slab's material integrals {"water": g/cm3 x mm}, the (n, n)
    mask of the central square of half-width ``region_mm`` that the Monte Carlo tallies). The
    isocentre (``sad_mm``) is the slab's mid-plane, ``gap_mm`` + half the thickness above the detector."""
    d = gap_mm + thickness_mm / 2.0
    g = Geometry(source_mm=[0, 0, -(sid_mm - d)], detector_center_mm=[0, 0, d], detector_u=[1, 0, 0],
                 detector_v=[0, 1, 0], pixel_spacing_mm=(field_mm / n, field_mm / n), size_px=(n, n),
                 extra={"sad_mm": sid_mm - d})
    c = (np.arange(n) - (n - 1) / 2.0) * field_mm / n
    central = (abs(c)[:, None] <= region_mm) & (abs(c)[None, :] <= region_mm)
    return g, {"water": np.full((n, n), float(thickness_mm))}, central
