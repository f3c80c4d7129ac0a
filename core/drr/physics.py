"""X-ray physics: attenuation look-up tables, kVp spectra, Beer-Lambert, noise, output values.

Monoenergetic default (SPEC 5): mu = 0.02/mm x (1 + HU/1000), clipped at 0. The kernels read
volumes as 16-bit patterns through a 65536-entry float32 table (``hu_to_mu_lut``), so the
conversion happens on the fly per voxel corner.

Realistic physics (spectra, materials, CT calibration, detector, noise) lives in ``core.drr.xray``
(SpekPy and xraylib); ``mass_attenuation`` and ``spectrum`` here are thin views of it.

Noise (``add_noise``): the expected photon count per pixel is N0 x I / I0; a seeded Poisson draw
(quantum noise) plus a seeded Gaussian (electronic noise, in counts); back to a line integral with
-ln(max(counts, 0.5) / N0).
"""
from __future__ import annotations

import numpy as np

from ..errors import CtwinError
from . import xray

MU_WATER_PER_MM = 0.02
VALUES = ("line_integral", "intensity", "display", "radiograph")
DISPLAY_MAX = 10.0  # line integral mapped to display value 1 by the log display

METAL_HU = 3000.0  # CT numbers at and above this are metal (core.drr.xray.DEFAULT_HU_TABLE)


def mass_attenuation(material: str, energy_kev) -> np.ndarray:
    """mu/rho (cm^2/g) of a named material at the given energies (xraylib, via core.drr.xray)."""
    return xray.mass_attenuation(material, energy_kev)


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


def material_luts(hu_table=None) -> dict:
    """{material: float32[65536]} int16 HU bit pattern -> partial density (g/cm3), from the
    stoichiometric calibration (``core.drr.xray.HuTable``; the default one when None)."""
    return (hu_table or xray.HuTable.default()).luts()


def spectrum(kvp: float, filter_al_mm: float = 0.0, **kw):
    """(energies keV, photon-number weights summing to 1) of the SpekPy spectrum (core.drr.xray)."""
    e, f = xray.spectrum(kvp, filter_al_mm, **kw)
    return e, f / f.sum()


def mean_energy(kvp: float, **kw) -> float:
    e, w = spectrum(kvp, **kw)
    return float((e * w).sum())


def beer_lambert(line_integral) -> np.ndarray:
    """I / I0 = exp(-integral of mu)."""
    return np.exp(-np.asarray(line_integral, dtype=np.float64))


COUNT_FLOOR = 0.5  # counts: a pixel that counted nothing reads half a count (finite line integral)


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
    return (-np.log(np.maximum(counts, COUNT_FLOOR) / photons)).astype(np.float32)


def to_value(line_integral, value: str = "line_integral") -> np.ndarray:
    """Turn line integrals into the requested output: line_integral | intensity | display.

    ``display`` is a log display: log(1 + L) / log(1 + DISPLAY_MAX), clipped to [0, 1] (bone bright,
    air dark; a fixed mapping, so frames of an animation are comparable).
    ``radiograph`` is a "for presentation" image: the log-transformed signal (the line integral)
    windowed per image to its 1st-99.8th percentiles over the pixels the body attenuates (line
    integral above 0.05), as a radiography console's automatic window does; bone bright, [0, 1].
    """
    li = np.asarray(line_integral, dtype=np.float64)
    if value == "line_integral":
        out = li
    elif value == "intensity":
        out = beer_lambert(li)
    elif value == "display":
        out = np.clip(np.log1p(np.maximum(li, 0.0)) / np.log1p(DISPLAY_MAX), 0.0, 1.0)
    elif value == "radiograph":
        body = li[np.isfinite(li) & (li > 0.05)]
        if body.size < 2:
            out = np.zeros_like(li)
        else:
            lo, hi = np.percentile(body, [1.0, 99.8])
            out = np.clip((li - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    else:
        raise CtwinError(f"unknown output value {value!r}; use one of {', '.join(VALUES)}")
    return out.astype(np.float32)
