"""X-ray physics: attenuation look-up tables, kVp spectra, Beer-Lambert, noise, output values.

Monoenergetic default (SPEC 5): mu = 0.02/mm x (1 + HU/1000), clipped at 0. The kernels read
volumes as 16-bit patterns through a 65536-entry float32 table (``hu_to_mu_lut``), so the
conversion happens on the fly per voxel corner.

Polyenergetic option (``polyenergetic_line_integral``), approximations stated plainly:
- Material decomposition by HU: soft tissue (air and lung included: their mass attenuation differs
  from soft tissue's by < 8 % at 20-150 keV), bone, metal. Soft tissue and bone are blended
  linearly between 100 and 400 HU (``BONE_BLEND_HU``); HU >= 3000 is metal (titanium).
- Density from HU, piecewise linear: (-1000 HU, 0 g/cm3), (0, 1.0), (1000, 1.6), (2000, 2.2),
  (3000, 2.8) (a Schneider-like calibration); metal voxels take titanium's 4.5 g/cm3.
- Mass attenuation coefficients (cm2/g, coherent scattering included) are NIST XCOM values
  tabulated below at 10-150 keV for ICRU-44 soft tissue, ICRU-44 cortical bone, titanium and
  aluminium, interpolated log-log (no absorption edge lies in 10-150 keV for these materials).
- Spectrum: Kramers' law for the photon number, N(E) ~ (kVp - E) / E per keV, 1 keV bins from
  10 keV to kVp, hardened by an inherent filtration of 2.5 mm Al (plus ``extra_al_mm``). No
  characteristic lines (tungsten K lines at 58-69 keV matter above ~70 kVp: a few % of fluence).
- Detector: energy integrating (each photon weighted by its energy), ideal efficiency.
- Output: the effective line integral -ln(I / I0), which shows beam hardening (sub-linear growth
  with path length), and the intensity I / I0.

Noise (``add_noise``): the expected photon count per pixel is N0 x I / I0; a seeded Poisson draw
(quantum noise) plus a seeded Gaussian (electronic noise, in counts); back to a line integral with
-ln(max(counts, 0.5) / N0).
"""
from __future__ import annotations

import numpy as np

from .errors import CtwinError

MU_WATER_PER_MM = 0.02
VALUES = ("line_integral", "intensity", "display")
DISPLAY_MAX = 10.0  # line integral mapped to display value 1 by the log display

# --- attenuation tables ------------------------------------------------------------------------
_E_KEV = np.array([10, 15, 20, 30, 40, 50, 60, 80, 100, 150], dtype=np.float64)
# NIST XCOM mass attenuation coefficients mu/rho in cm^2/g (total, with coherent scattering).
MASS_ATTENUATION = {
    "soft_tissue": np.array([5.379, 1.690, 0.8205, 0.3783, 0.2685, 0.2262, 0.2048, 0.1823, 0.1693, 0.1492]),
    "bone": np.array([28.51, 9.032, 4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480]),
    "metal": np.array([110.7, 35.87, 15.85, 4.972, 2.214, 1.213, 0.7661, 0.4052, 0.2721, 0.1649]),
    "aluminium": np.array([26.23, 7.955, 3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378]),
    "water": np.array([5.329, 1.673, 0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505]),
}
MATERIALS = ("soft_tissue", "bone", "metal")
BONE_BLEND_HU = (100.0, 400.0)
METAL_HU = 3000.0
METAL_DENSITY = 4.5
AL_DENSITY = 2.699
INHERENT_AL_MM = 2.5
_DENSITY_HU = np.array([-1000.0, 0.0, 1000.0, 2000.0, 3000.0])
_DENSITY_G = np.array([0.0, 1.0, 1.6, 2.2, 2.8])


def mass_attenuation(material: str, energy_kev) -> np.ndarray:
    """mu/rho (cm^2/g) of a tabulated material at the given energies (log-log interpolation)."""
    if material not in MASS_ATTENUATION:
        raise CtwinError(f"unknown material {material!r}")
    e = np.clip(np.asarray(energy_kev, dtype=np.float64), _E_KEV[0], _E_KEV[-1])
    return np.exp(np.interp(np.log(e), np.log(_E_KEV), np.log(MASS_ATTENUATION[material])))


# --- 16-bit look-up tables ----------------------------------------------------------------------
def _int16_patterns() -> np.ndarray:
    return np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.float64)


def mu_from_hu(hu, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """SPEC 5 monoenergetic attenuation (1/mm)."""
    return np.maximum(mu_water * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0)


def hu_to_mu_lut(mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """float32[65536]: int16 HU bit pattern -> mu (1/mm)."""
    return mu_from_hu(_int16_patterns(), mu_water).astype(np.float32)


def float16_lut() -> np.ndarray:
    """float32[65536]: float16 mu bit pattern -> mu (1/mm), negatives and non-finite -> 0."""
    v = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    v[~np.isfinite(v)] = 0.0
    return np.maximum(v, 0.0).astype(np.float32)


def density_from_hu(hu) -> np.ndarray:
    hu = np.asarray(hu, dtype=np.float64)
    rho = np.interp(hu, _DENSITY_HU, _DENSITY_G, left=0.0)
    slope = (_DENSITY_G[-1] - _DENSITY_G[-2]) / (_DENSITY_HU[-1] - _DENSITY_HU[-2])
    return np.where(hu > _DENSITY_HU[-1], _DENSITY_G[-1] + slope * (hu - _DENSITY_HU[-1]), rho)


def material_fractions(hu) -> dict:
    """Per-material partial densities (g/cm3) for HU values: {material: array}."""
    hu = np.asarray(hu, dtype=np.float64)
    rho = density_from_hu(hu)
    metal = hu >= METAL_HU
    w = np.clip((hu - BONE_BLEND_HU[0]) / (BONE_BLEND_HU[1] - BONE_BLEND_HU[0]), 0.0, 1.0)
    return {
        "soft_tissue": np.where(metal, 0.0, (1.0 - w) * rho),
        "bone": np.where(metal, 0.0, w * rho),
        "metal": np.where(metal, METAL_DENSITY, 0.0),
    }


def material_luts() -> dict:
    """{material: float32[65536]} int16 HU bit pattern -> partial density (g/cm3) per mm of path."""
    fr = material_fractions(_int16_patterns())
    return {m: fr[m].astype(np.float32) for m in MATERIALS}


# --- spectra -----------------------------------------------------------------------------------
def spectrum(kvp: float, extra_al_mm: float = 0.0, inherent_al_mm: float = INHERENT_AL_MM):
    """(energies keV, normalised photon-number weights) of a filtered Kramers spectrum."""
    kvp = float(kvp)
    if not 40.0 <= kvp <= 150.0:
        raise CtwinError(f"kVp must be within 40-150 (60-120 is the supported range), got {kvp:g}")
    e = np.arange(10.0, kvp, 1.0) + 0.5
    n = (kvp - e) / e
    t_cm = 0.1 * (inherent_al_mm + extra_al_mm)
    n = n * np.exp(-mass_attenuation("aluminium", e) * AL_DENSITY * t_cm)
    return e, n / n.sum()


def mean_energy(kvp: float, **kw) -> float:
    e, w = spectrum(kvp, **kw)
    return float((e * w).sum())


def polyenergetic_intensity(material_integrals: dict, kvp: float = 100.0, **kw) -> np.ndarray:
    """I / I0 of an energy-integrating detector, from per-material integrals of density (g/cm3 x mm)."""
    e, n = spectrum(kvp, **kw)
    weight = n * e
    weight = weight / weight.sum()
    shape = np.shape(next(iter(material_integrals.values())))
    out = np.zeros(shape, dtype=np.float64)
    mats = {m: np.asarray(v, dtype=np.float64) * 0.1 for m, v in material_integrals.items()}  # -> g/cm2
    coeffs = {m: mass_attenuation(m, e) for m in mats}
    for b in range(len(e)):
        expo = np.zeros(shape)
        for m, li in mats.items():
            expo += coeffs[m][b] * li
        out += weight[b] * np.exp(-expo)
    return out


def beer_lambert(line_integral) -> np.ndarray:
    """I / I0 = exp(-integral of mu)."""
    return np.exp(-np.asarray(line_integral, dtype=np.float64))


def add_noise(line_integral, photons: float, electronic_sigma: float = 0.0, seed: int = 0) -> np.ndarray:
    """Seeded Poisson quantum noise (N0 = ``photons`` per pixel unattenuated) plus Gaussian
    electronic noise (``electronic_sigma`` counts); returns the noisy line integral (float32)."""
    if photons <= 0:
        raise CtwinError(f"photon count must be positive, got {photons}")
    rng = np.random.default_rng(seed)
    expected = photons * beer_lambert(line_integral)
    counts = rng.poisson(expected).astype(np.float64)
    if electronic_sigma > 0:
        counts += rng.normal(0.0, electronic_sigma, size=counts.shape)
    return (-np.log(np.maximum(counts, 0.5) / photons)).astype(np.float32)


def to_value(line_integral, value: str = "line_integral") -> np.ndarray:
    """Turn line integrals into the requested output: line_integral | intensity | display.

    ``display`` is a log display: log(1 + L) / log(1 + DISPLAY_MAX), clipped to [0, 1] (bone bright,
    air dark; a fixed mapping, so frames of an animation are comparable).
    """
    li = np.asarray(line_integral, dtype=np.float64)
    if value == "line_integral":
        out = li
    elif value == "intensity":
        out = beer_lambert(li)
    elif value == "display":
        out = np.clip(np.log1p(np.maximum(li, 0.0)) / np.log1p(DISPLAY_MAX), 0.0, 1.0)
    else:
        raise CtwinError(f"unknown output value {value!r}; use one of {', '.join(VALUES)}")
    return out.astype(np.float32)
