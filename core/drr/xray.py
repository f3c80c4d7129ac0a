"""Realistic X-ray physics: SpekPy spectra, xraylib materials, a stoichiometric CT calibration,
an energy-integrating CsI detector with blur, quantum and electronic noise.

Everything physical comes from the field's libraries, never from a hand-written table:
- Spectra: SpekPy (Poludniowski et al., Med Phys 48:3630, 2021; tungsten anode, validated against
  measured spectra), 1 keV bins, fluence in photons / cm^2 / keV / mAs at the detector distance.
  ``KVP_RANGE`` 40-150 kV is the diagnostic range SpekPy's model covers and validates.
- Attenuation: xraylib (Schoonjans et al., Spectrochim Acta B 66:776, 2011) ``CS_Total`` mass
  attenuation (coherent scattering included) of elements, mixed by mass fraction; tissue
  compositions and densities from xraylib's NIST compound list (ICRP/ICRU tissues, NIST PML).
- CT calibration (``HuTable``): the stoichiometric method of Schneider, Bortfeld & Schlegel
  (Phys Med Biol 45:459, 2000). HU ranges follow the paper's tissue groups (air below -950, lung
  -950..-120, adipose -120..-20, soft tissue -20..120, bone 120..1600 as a soft-tissue/cortical-bone
  mixture); the paper's 24 elemental compositions are not available here, so each range takes the
  ICRP compositions of xraylib's NIST list (named in ``DEFAULT_HU_TABLE``). In a mixed range the
  mass fraction varies linearly with HU; the density is the one that gives the voxel its HU at the
  CT's effective energy (``ct_kev``, 70 keV: the effective energy of a 120 kVp CT beam after the
  bow-tie and patient, e.g. Bushberg, The Essential Physics of Medical Imaging, 3rd ed., ch. 10),
  so HU is honoured exactly at that energy and the spectral behaviour comes from the composition.
  HU >= 3000 is metal at its own density (CT numbers saturate there: 12-bit scanners clip at 3071).
- Detector (``DETECTORS``): energy integrating, absorbed fraction 1 - exp(-mu_CsI(E) rho t) from
  xraylib's "Cesium Iodide" (K-fluorescence escape is ignored: the energy weight is E x absorbed
  fraction). Blur: a Gaussian line-spread function (sigma in mm from the preset) plus the focal
  spot's penumbra, a Gaussian of FWHM = focal spot x (M - 1) at the detector with M = SID / SAD.
- Noise: the detected photon number is drawn from a Poisson law per pixel (before any blur, so the
  blur correlates the noise as a real panel's scintillator does), each photon carrying the pixel's
  mean deposited energy (the Swank factor of the spectrum is ignored); Gaussian electronic noise is
  added after the blur, in units of detected photons at the open field's mean energy.
- Scatter (optional): first-order scatter by thickness-dependent kernels derived from xraylib's
  differential cross sections of water, a multiple-scatter kernel fitted to a Monte Carlo of water
  slabs (``core.drr.scatter_mc``), and a linear anti-scatter grid (see the scatter section below).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.integrate import trapezoid
from scipy.ndimage import gaussian_filter, zoom
from scipy.signal import fftconvolve
import fnmatch
import re

from ..errors import CtwinError
from ..volumes.volume import Volume
# Imported where used, so that importing this module stays light: spekpy, xraylib (heavy or optional third-party packages).

KVP_RANGE = (40.0, 150.0)
INHERENT_AL_MM = 2.5  # IEC 60601-1-3 minimum total filtration of a diagnostic tube above 70 kV
ANODE_ANGLE_DEG = 12.0  # a typical diagnostic tube's target angle (SpekPy's default example)
CT_KEV = 70.0
GRID_LAMELLA_MM = 0.036   # anti-scatter grid lamella thickness (assumed; see the scatter section)
GRID_LINES_PER_CM = 40.0  # default grid line density (see the scatter section)

# --- materials ---------------------------------------------------------------------------------
# short name -> xraylib NIST compound name (composition and density from xraylib)
NIST_MATERIALS = {
    "air": "Air, Dry (near sea level)",
    "water": "Water, Liquid",
    "lung": "Lung (ICRP)",
    "adipose": "Adipose Tissue (ICRP)",
    "soft_tissue": "Tissue, Soft (ICRP)",
    "soft_tissue_icru4": "Tissue, Soft (ICRU four-component)",
    "muscle": "Muscle, Skeletal",
    "blood": "Blood (ICRP)",
    "brain": "Brain (ICRP)",
    "skin": "Skin (ICRP)",
    "cortical_bone": "Bone, Cortical (ICRP)",
    "compact_bone": "Bone, Compact (ICRU)",
    "csi": "Cesium Iodide",
}
# alloys by nominal mass fraction (mid-range of the standard's limits) and density g/cm3
ALLOYS = {
    # ASTM F138 implant stainless steel 316L: Cr 17-19, Ni 13-15, Mo 2.25-3.0, Mn <= 2, Fe balance; 8.0 g/cm3
    "stainless_steel": ({26: 0.640, 24: 0.180, 28: 0.140, 42: 0.025, 25: 0.015}, 8.0),
    # ASTM F75 cast CoCrMo: Cr 27-30, Mo 5-7, Co balance; 8.3 g/cm3
    "cocr": ({27: 0.645, 24: 0.285, 42: 0.060, 14: 0.010}, 8.3),
    # ASTM F136 wrought Ti-6Al-4V ELI: Al 5.5-6.5, V 3.5-4.5, Ti balance; 4.43 g/cm3 (ASM Handbook vol. 2)
    "ti6al4v": ({22: 0.90, 13: 0.06, 23: 0.04}, 4.43),
}
ELEMENTS = {"titanium": 22, "aluminium": 13, "copper": 29, "iodine": 53, "tungsten": 74}
# Contrast-filled vessel: iodine in blood. 10 mg I/ml is a typical arterial-phase concentration: peak
# aortic enhancement of CT angiography is about 250-350 HU (Bae, Radiology 256:32, 2010), and 1 mg I/ml
# adds about 26 HU at the 70 keV CT energy (xraylib: 5.0 cm2/g x 1 mg/ml over water's 0.194 /cm).
# ``iodine_blood:C`` takes another concentration C (mg I/ml) up to IODINE_MAX_MG_PER_ML, the strongest
# marketed contrast agents (e.g. iomeprol 400 mg I/ml), i.e. undiluted contrast.
IODINE_MG_PER_ML = 10.0
IODINE_MAX_MG_PER_ML = 400.0
MAX_DENSITY = 25.0  # g/cm3: above every element's density (osmium 22.6)
ALIASES = {"bone": "cortical_bone", "metal": "titanium", "aluminum": "aluminium", "iodine_blood": "iodine_blood"}


def _known_names() -> str:
    return ", ".join(sorted(set(NIST_MATERIALS) | set(ALLOYS) | set(ELEMENTS) | {"iodine_blood", "bone", "metal"}))


def _number_within(text: str, hi: float, message: str) -> float:
    """``text`` as a number in (0, hi], else ``CtwinError(message)``."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 < v <= hi:
        raise CtwinError(message)
    return v


def material_spec(text) -> str:
    """The canonical name of a material given as ``NAME``, ``iodine_blood:C`` (C mg iodine per ml of
    blood) and optionally ``@RHO`` (its density in g/cm3 instead of the material's own), e.g.
    ``titanium``, ``iodine_blood:20``, ``ti6al4v@4.2``. Checked (one-line error), not yet looked up."""
    t = str(text).strip()
    name, at, rho_s = t.partition("@")
    name, colon, par = name.strip().partition(":")
    name = name.strip()
    if name.lower() in set(NIST_MATERIALS) | set(ALLOYS) | set(ELEMENTS) | set(ALIASES):
        name = name.lower()  # short names in any case; xraylib's NIST names as spelt there
    out = name
    if colon:
        if ALIASES.get(name, name) != "iodine_blood":
            raise CtwinError(f"material {t!r}: only iodine_blood takes a parameter (iodine_blood:MG_PER_ML)")
        c = _number_within(par, IODINE_MAX_MG_PER_ML,
                           f"material {t!r}: the iodine concentration must be within 0-{IODINE_MAX_MG_PER_ML:g} mg/ml")
        out = f"iodine_blood:{c:g}"
    if at:
        rho = _number_within(rho_s, MAX_DENSITY,
                             f"material {t!r}: the density after '@' must be within 0-{MAX_DENSITY:g} g/cm3")
        out += f"@{rho:g}"
    composition(out)
    return out


@functools.lru_cache(maxsize=None)
def composition(name: str) -> tuple:
    """(Z tuple, mass fraction tuple, density g/cm3, source text) of a named material
    (``material_spec``'s forms: ``iodine_blood:C``, ``NAME@RHO``)."""
    import xraylib as xr

    if "@" in name:
        base, _, rho = name.partition("@")
        zs, ws, _, src = composition(base)
        return zs, ws, float(rho), f"{src} at {float(rho):g} g/cm3"
    key = ALIASES.get(name, name)
    if key.startswith("iodine_blood:"):
        zb, wb, rb, _ = composition("blood")
        mg = float(key.partition(":")[2])
        c = mg / 1000.0  # g/cm3 of iodine
        rho = rb + c
        fr = {z: w * rb / rho for z, w in zip(zb, wb)}
        fr[53] = fr.get(53, 0.0) + c / rho
        return tuple(fr), tuple(fr.values()), rho, f"xraylib NIST Blood (ICRP) + {mg:g} mg/ml iodine"
    if key in NIST_MATERIALS:
        d = xr.GetCompoundDataNISTByName(NIST_MATERIALS[key])
        return tuple(d["Elements"]), tuple(d["massFractions"]), float(d["density"]), f"xraylib NIST {d['name']}"
    if key in ALLOYS:
        fr, rho = ALLOYS[key]
        s = sum(fr.values())
        return tuple(fr), tuple(v / s for v in fr.values()), rho, "nominal standard composition"
    if key in ELEMENTS:
        z = ELEMENTS[key]
        return (z,), (1.0,), float(xr.ElementDensity(z)), f"xraylib element Z={z}"
    if key == "iodine_blood":
        return composition(f"iodine_blood:{IODINE_MG_PER_ML:g}")
    if key in xr.GetCompoundDataNISTList():
        d = xr.GetCompoundDataNISTByName(key)
        return tuple(d["Elements"]), tuple(d["massFractions"]), float(d["density"]), f"xraylib NIST {key}"
    raise CtwinError(f"unknown material {name!r}; use one of {_known_names()} "
                     "or a name from xraylib's NIST compound list")


def material_names() -> list:
    return sorted(set(NIST_MATERIALS) | set(ALLOYS) | set(ELEMENTS) | {"iodine_blood"})


def density(name: str) -> float:
    return composition(name)[2]


@functools.lru_cache(maxsize=256)
def _mass_att(name: str, energies: tuple) -> np.ndarray:
    import xraylib as xr

    zs, ws, _, _ = composition(name)
    out = np.zeros(len(energies))
    for i, e in enumerate(energies):
        out[i] = sum(w * xr.CS_Total(int(z), float(e)) for z, w in zip(zs, ws))
    out.setflags(write=False)
    return out


def mass_attenuation(name: str, energy_kev) -> np.ndarray:
    """mu/rho in cm^2/g (xraylib CS_Total, coherent scattering included) at the given energies."""
    e = np.atleast_1d(np.asarray(energy_kev, dtype=np.float64))
    if np.any(e < 1.0) or np.any(e > 800.0):
        raise CtwinError("energies must be within 1-800 keV")
    out = _mass_att(name, tuple(np.round(e, 6).tolist()))
    return out.copy() if np.ndim(energy_kev) else out[0]


# --- spectra -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _spek_model(kvp, anode_angle, inherent_al, filter_al, filter_cu):
    import spekpy

    s = spekpy.Spek(kvp=kvp, th=anode_angle, dk=1.0, mas=1.0)
    filters = [("Al", inherent_al + filter_al)]
    if filter_cu > 0:
        filters.append(("Cu", filter_cu))
    s.multi_filter(filters)
    return s


@functools.lru_cache(maxsize=256)
def _spek(kvp, anode_angle, inherent_al, filter_al, filter_cu, x_cm, z_cm):
    s = _spek_model(kvp, anode_angle, inherent_al, filter_al, filter_cu)
    k, f = s.get_spectrum(x=x_cm, z=z_cm)
    keep = k >= 5.0  # below 5 keV nothing survives 2.5 mm Al (transmission < 1e-30)
    return np.asarray(k[keep], float), np.asarray(f[keep], float)


def check_kvp(kvp) -> float:
    kvp = float(kvp)
    if not KVP_RANGE[0] <= kvp <= KVP_RANGE[1]:
        raise CtwinError(f"kVp must be within {KVP_RANGE[0]:g}-{KVP_RANGE[1]:g}, got {kvp:g}")
    return kvp


def spectrum(kvp: float, filter_al_mm: float = 0.0, filter_cu_mm: float = 0.0,
             anode_angle_deg: float = ANODE_ANGLE_DEG, inherent_al_mm: float = INHERENT_AL_MM,
             offaxis_mm: float = 0.0, distance_mm: float = 1000.0):
    """(bin centres keV, photons / cm^2 / mAs per 1 keV bin) of a SpekPy tungsten spectrum at
    ``distance_mm`` from the focus and ``offaxis_mm`` along the anode-cathode axis (heel effect)."""
    kvp = check_kvp(kvp)
    for nm, v in (("filter_al_mm", filter_al_mm), ("filter_cu_mm", filter_cu_mm), ("inherent_al_mm", inherent_al_mm)):
        if not (v >= 0 and math.isfinite(v)):
            raise CtwinError(f"{nm} must be >= 0, got {v}")
    if not 5.0 <= anode_angle_deg <= 30.0:
        raise CtwinError(f"anode angle must be within 5-30 degrees, got {anode_angle_deg:g}")
    e, f = _spek(kvp, float(anode_angle_deg), float(inherent_al_mm), float(filter_al_mm),
                 float(filter_cu_mm), round(float(offaxis_mm) / 10.0, 4), float(distance_mm) / 10.0)
    return e.copy(), f.copy()


# --- CT calibration ----------------------------------------------------------------------------
DEFAULT_HU_TABLE = {
    "source": "HU ranges after Schneider, Bortfeld & Schlegel, Phys Med Biol 45:459 (2000); ICRP "
              "compositions from xraylib's NIST list; density from HU at ct_kev",
    "ct_kev": CT_KEV,
    "segments": [
        {"hu": [-1000, -950], "materials": ["air"]},
        {"hu": [-950, -120], "materials": ["lung"]},
        {"hu": [-120, -20], "materials": ["adipose"]},
        {"hu": [-20, 20], "materials": ["soft_tissue"]},
        {"hu": [20, 120], "materials": ["muscle"]},
        {"hu": [120, 1600], "materials": ["muscle", "cortical_bone"]},
        {"hu": [1600, 3000], "materials": ["cortical_bone"]},
        {"hu": [3000, 32767], "materials": ["titanium"], "density": "material"},
    ],
}


@dataclass
class HuTable:
    """Piecewise HU -> (material mass fractions, density). Segments cover [lo, hi); below the first
    the first segment's first material applies, above the last the last segment's."""
    segments: list
    ct_kev: float = CT_KEV
    source: str = ""

    @classmethod
    def default(cls) -> "HuTable":
        return cls.from_dict(DEFAULT_HU_TABLE)

    @classmethod
    def from_dict(cls, d: dict) -> "HuTable":
        if not isinstance(d, dict) or not isinstance(d.get("segments"), list) or not d["segments"]:
            raise CtwinError("a HU table is a JSON object with a non-empty 'segments' list")
        segs, last = [], None
        for s in d["segments"]:
            try:
                lo, hi = (float(x) for x in s["hu"])
                mats = [str(m) for m in s["materials"]]
            except (KeyError, TypeError, ValueError):
                raise CtwinError("each HU table segment needs 'hu': [lo, hi] and 'materials': [a] or [a, b]") from None
            if not hi > lo or not 1 <= len(mats) <= 2 or (last is not None and abs(lo - last) > 1e-9):
                raise CtwinError(f"HU table segment {s['hu']}: need lo < hi, contiguous with the previous, 1 or 2 materials")
            for m in mats:
                composition(m)
            dens = s.get("density")
            if dens is not None and dens != "material" and not (isinstance(dens, (int, float)) and dens > 0):
                raise CtwinError(f"HU table segment {s['hu']}: density must be a positive number or 'material'")
            segs.append({"hu": (lo, hi), "materials": mats, "density": dens})
            last = hi
        kev = float(d.get("ct_kev", CT_KEV))
        if not 20.0 <= kev <= 150.0:
            raise CtwinError(f"HU table ct_kev must be within 20-150, got {kev:g}")
        return cls(segs, kev, str(d.get("source", "")))

    @classmethod
    def load(cls, path) -> "HuTable":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise CtwinError(f"cannot read HU table {p.name}: {' '.join(str(exc).split())[:160]}") from None
        t = cls.from_dict(d)
        t.source = t.source or str(p)
        return t

    def to_dict(self) -> dict:
        return {"source": self.source, "ct_kev": self.ct_kev,
                "segments": [{"hu": list(s["hu"]), "materials": s["materials"],
                              **({"density": s["density"]} if s["density"] is not None else {})}
                             for s in self.segments]}

    @property
    def materials(self) -> list:
        out = []
        for s in self.segments:
            out += [m for m in s["materials"] if m not in out]
        return out

    def partial_densities(self, hu) -> dict:
        """{material: partial density g/cm3} for HU values (float64 arrays)."""
        hu = np.asarray(hu, dtype=np.float64)
        mu_w = float(mass_attenuation("water", self.ct_kev)) * density("water")  # 1/cm
        out = {m: np.zeros(hu.shape) for m in self.materials}
        n = len(self.segments)
        for i, s in enumerate(self.segments):
            lo, hi = s["hu"]
            sel = np.ones(hu.shape, bool)
            if i > 0:
                sel &= hu >= lo
            if i < n - 1:
                sel &= hu < hi
            if not np.any(sel):
                continue
            h = hu[sel]
            mats = s["materials"]
            if len(mats) == 1:
                fr = [np.ones(h.shape)]
            else:
                t = np.clip((h - lo) / (hi - lo), 0.0, 1.0)
                fr = [1.0 - t, t]
            if s["density"] == "material":
                rho = np.full(h.shape, density(mats[0]))
            elif s["density"] is not None:
                rho = np.full(h.shape, float(s["density"]))
            else:
                mix = sum(f * float(mass_attenuation(m, self.ct_kev)) for f, m in zip(fr, mats))
                rho = np.maximum(mu_w * (1.0 + h / 1000.0), 0.0) / mix
            for f, m in zip(fr, mats):
                out[m][sel] += f * rho
        return out

    def luts(self, overrides=()) -> dict:
        """{material: float32[65536]} int16 HU bit pattern -> partial density (g/cm3). The reserved
        codes ``OVERRIDE_CODE0 + k`` (far below any CT value) carry ``overrides[k]`` at its density."""
        hu = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.float64)
        out = {m: v.astype(np.float32) for m, v in self.partial_densities(hu).items()}
        for k, m in enumerate(overrides):
            t = out.setdefault(m, np.zeros(65536, np.float32))
            t[np.uint16(np.int16(OVERRIDE_CODE0 + k))] = density(m)
        return out


# Segmentation overrides: voxels of the chosen labels get a reserved code; the code's material
# (at its own density) replaces what the HU calibration would give them.
OVERRIDE_CODE0 = -32700
MAX_OVERRIDES = 16
KEEP_HU = "hu"  # LABEL=hu: the label keeps the HU calibration (e.g. to turn a default off)
# Default materials of labels whose names say what they are made of, applied where no --label-material
# entry names the label. Matched on the words of the name (split at anything but letters and digits,
# a plural "s" dropped), so "screw_left" or "Femoral Implant" match and "spinal_cord" does not match
# "pin". Metal words give that metal; a generic implant word gives Ti-6Al-4V (a common orthopaedic
# implant alloy: screws, stems, plates, nails) and a stent 316L steel (ASTM F138): both are assumptions
# that an explicit --label-material replaces. No TotalSegmentator or ctwin label name matches.
DEFAULT_LABEL_MATERIALS = (
    (("titanium",), "titanium"),
    (("ti6al4v", "tial6v4"), "ti6al4v"),
    (("steel", "stainless", "316l"), "stainless_steel"),
    (("cocr", "cocrmo", "cobalt", "chrome", "chromium"), "cocr"),
    (("stent",), "stainless_steel"),
    (("implant", "prosthesis", "prostheses", "screw", "nail", "rod", "plate", "stem", "endoprosthesis",
      "arthroplasty", "hardware"), "ti6al4v"),
)


def _words(name: str) -> set:
    out = set()
    for w in re.split(r"[^0-9a-z]+", str(name).lower()):
        if w:
            out.add(w)
            if len(w) > 3 and w.endswith("s"):
                out.add(w[:-1])
    return out


def default_label_material(name: str) -> str | None:
    """The default material of a label by the words of its name (``DEFAULT_LABEL_MATERIALS``), or None."""
    words = _words(name)
    for keys, mat in DEFAULT_LABEL_MATERIALS:
        if words & set(keys):
            return mat
    return None


def parse_label_materials(items) -> dict:
    """{label name, pattern or number: material spec} from "LABEL=MATERIAL" strings (fnmatch patterns
    allowed; MATERIAL as in ``material_spec``, or ``hu`` to keep the HU calibration). The item
    ``auto`` adds nothing: it asks for the defaults alone (``default_label_material``)."""
    out = {}
    for it in items or ():
        if str(it).strip().lower() == "auto":
            continue
        name, sep, mat = str(it).partition("=")
        if not sep or not name.strip() or not mat.strip():
            raise CtwinError(f"--label-material takes LABEL=MATERIAL (e.g. aorta=iodine_blood:15, screw=titanium), got {it!r}")
        m = mat.strip()
        out[name.strip()] = KEEP_HU if m.lower() == KEEP_HU else material_spec(m)
    return out


def _label_matches(key: str, lid: int, name: str) -> bool:
    k = key.strip()
    if k.isdigit():
        return int(k) == int(lid)
    return fnmatch.fnmatch(str(name).lower(), k.lower())


def label_codes(labelmap, names: dict, mapping: dict, defaults: bool = True) -> tuple:
    """(int16 array of the labelmap's shape: 0, or 1 + the index of the label's override material;
    the override materials in code order; {label name: material} applied). ``mapping``: {label name,
    fnmatch pattern or number: material} (``parse_label_materials``), matched case-insensitively, the
    first matching entry wins; ``defaults``: labels no entry names take ``default_label_material``.
    An entry that matches no label is an error."""
    lab = np.asarray(getattr(labelmap, "data", labelmap))
    present = [int(i) for i in np.unique(lab) if i != 0]
    names = {int(k): str(v) for k, v in (names or {}).items()}
    out = np.zeros(lab.shape, np.int16)
    mats, applied, used = [], {}, set()
    for i in sorted(set(names) | set(present)):
        nm = names.get(i, str(i))
        mat = None
        for key, m in mapping.items():
            if _label_matches(key, i, nm):
                used.add(key)
                mat = m
                break
        else:
            if defaults:
                mat = default_label_material(nm)
        if mat is None or mat == KEEP_HU or i not in present:
            continue
        if mat not in mats:
            if len(mats) >= MAX_OVERRIDES:
                raise CtwinError(f"at most {MAX_OVERRIDES} override materials")
            mats.append(mat)
        out[lab == i] = mats.index(mat) + 1
        applied[nm] = mat
    unused = [k for k in mapping if k not in used]
    if unused:
        shown = sorted(names.get(i, str(i)) for i in present)
        raise CtwinError(f"no segmentation label matches {', '.join(unused)}; labels: "
                         f"{', '.join(shown[:12])}{' ...' if len(shown) > 12 else ''}")
    return out, mats, applied


def with_codes(ct, codes) -> np.ndarray:
    """int16 HU of ``ct`` with the voxels of override code k (1-based, ``label_codes``) set to the
    reserved value ``OVERRIDE_CODE0 + k - 1``; input values that collide with the reserved codes
    (padding far below air) become air."""
    src = np.asarray(getattr(ct, "data", ct))
    if src.dtype.kind == "f":
        src = np.clip(np.rint(src), -32768, 32767)
    data = np.array(src, dtype=np.int16, copy=True)
    data[(data >= OVERRIDE_CODE0) & (data < OVERRIDE_CODE0 + MAX_OVERRIDES)] = -1024
    sel = codes > 0
    data[sel] = (OVERRIDE_CODE0 - 1 + codes[sel]).astype(np.int16)
    return data


def apply_label_materials(ct, labelmap, names: dict, mapping: dict, defaults: bool = False) -> tuple:
    """(a copy of the HU volume with the voxels of the mapped labels set to reserved codes, the list
    of override materials by code, {label: material} actually applied). Labels are matched by name
    (case-insensitive, fnmatch patterns allowed: ``*artery*``) or number; the first matching entry
    wins; ``defaults`` adds ``default_label_material`` for the labels no entry names."""
    if (not hasattr(ct, "data") or (getattr(ct, "meta", None) or {}).get("quantity") == "mu"
            or np.asarray(ct.data).dtype == np.float16):
        raise CtwinError("label materials need the CT as a HU Volume (not a prepared or mu volume)")
    if tuple(labelmap.shape) != tuple(ct.shape):
        raise CtwinError("the labelmap must be on the CT grid (core.volumes.segmentation.load_segmentation resolves it)")
    codes, mats, applied = label_codes(labelmap, names, mapping, defaults)
    return Volume(with_codes(ct, codes), ct.affine, dict(getattr(ct, "meta", {}) or {})), mats, applied


# --- detector ----------------------------------------------------------------------------------
# Presets: values from the manufacturers' published datasheets as quoted in the literature.
DETECTORS = {
    # absorbs every photon, no blur, no electronic noise (for validation)
    "ideal": {"csi_um": None, "pixel_mm": None, "lsf_sigma_mm": 0.0, "electronic_sigma": 0.0,
              "gain": 1.0, "offset": 0.0, "source": "ideal energy integrator"},
    # Varian (Varex) PaxScan 4030CB, the C-arm / CBCT panel: 2048 x 1536 at 0.194 mm, 600 um CsI:Tl
    # (Varian datasheet; Siewerdsen et al., Med Phys 32:241, 2005). The LSF sigma (0.15 mm: a
    # Gaussian MTF exp(-2 pi^2 s^2 f^2) = 0.64 at 1 lp/mm) and the electronic noise are assumed
    # values of the right order, not datasheet figures.
    "paxscan4030cb": {"csi_um": 600.0, "pixel_mm": 0.194, "lsf_sigma_mm": 0.15, "electronic_sigma": 2.0,
                      "gain": 1.0, "offset": 100.0, "source": "Varian PaxScan 4030CB datasheet"},
    # Trixell Pixium 4343RC, a radiography panel: 43 x 43 cm at 0.148 mm pixel pitch, CsI:Tl
    # (Trixell datasheet). The datasheet gives no CsI thickness: 500 um is assumed, within the 150-600 um
    # of the columnar CsI:Tl layers of flat panels (Zhao, Ristic & Rowlands, Med Phys 31:2594, 2004,
    # abstract: samples of 150-600 um; about 600 um is the thickest used in flat panels, Howansky et al.,
    # "Investigation of the screen optics of thick CsI(Tl) detectors", SPIE Medical Imaging, abstract).
    # The LSF sigma and the electronic noise are likewise assumptions, not datasheet values.
    "pixium4343": {"csi_um": 500.0, "pixel_mm": 0.148, "lsf_sigma_mm": 0.10, "electronic_sigma": 1.0,
                   "gain": 1.0, "offset": 100.0, "source": "Trixell Pixium 4343RC datasheet"},
}


def detector_preset(name: str) -> dict:
    key = str(name).lower().replace("-", "").replace("_", "")
    for k, v in DETECTORS.items():
        if k == key:
            return {**v, "name": k}
    raise CtwinError(f"unknown detector {name!r}; use one of {', '.join(DETECTORS)}")


def absorbed_fraction(energies, csi_um) -> np.ndarray:
    """Fraction of photons absorbed by ``csi_um`` micrometres of CsI (1 for an ideal detector)."""
    e = np.asarray(energies, dtype=np.float64)
    if csi_um is None:
        return np.ones_like(e)
    t_cm = float(csi_um) * 1e-4
    return 1.0 - np.exp(-mass_attenuation("csi", e) * density("csi") * t_cm)


# --- setup -------------------------------------------------------------------------------------
@dataclass
class XraySetup:
    """Every physics option of a realistic render (recorded in the sidecar with ``to_sidecar``)."""
    kvp: float = 80.0
    filter_al_mm: float = 0.0
    filter_cu_mm: float = 0.0
    anode_angle_deg: float = ANODE_ANGLE_DEG
    inherent_al_mm: float = INHERENT_AL_MM
    heel: bool = False
    detector: str = "ideal"
    csi_um: float | None = None
    focal_spot_mm: float = 0.0
    mas: float | None = None
    photons: float | None = None
    electronic_sigma: float | None = None
    seed: int = 0
    stream: int = 0  # a second seed key: views of one frame draw independent noise
    hu_table: str | None = None
    label_materials: dict = field(default_factory=dict)  # recorded: {label: material} applied
    overrides: list = field(default_factory=list)         # override materials by reserved code
    scatter: bool = False
    multiple_scatter: bool = True  # with ``scatter``: False keeps the first order alone
    grid_ratio: float | None = None
    grid_lines_per_cm: float = GRID_LINES_PER_CM

    def __post_init__(self):
        self.kvp = check_kvp(self.kvp)
        self.scatter, self.multiple_scatter = bool(self.scatter), bool(self.multiple_scatter)
        preset = detector_preset(self.detector)
        self.detector = preset["name"]
        if self.csi_um is not None and not self.csi_um > 0:
            raise CtwinError(f"CsI thickness must be positive (micrometres), got {self.csi_um}")
        if not self.focal_spot_mm >= 0:
            raise CtwinError(f"focal spot must be >= 0 mm, got {self.focal_spot_mm}")
        if self.mas is not None and self.photons is not None:
            raise CtwinError("give --mas or --photons, not both")
        for nm in ("mas", "photons"):
            v = getattr(self, nm)
            if v is not None and not v > 0:
                raise CtwinError(f"{nm} must be positive, got {v}")
        if self.grid_ratio is not None and not 1.0 <= self.grid_ratio <= 40.0:
            raise CtwinError(f"grid ratio must be within 1-40, got {self.grid_ratio:g}")
        if not 5.0 <= self.grid_lines_per_cm <= 200.0:
            raise CtwinError(f"grid line density must be within 5-200 per cm, got {self.grid_lines_per_cm:g}")
        if self.grid_ratio:
            grid_transmission(60.0, np.zeros(1), self.grid_ratio, self.grid_lines_per_cm)
        spectrum(self.kvp, self.filter_al_mm, self.filter_cu_mm, self.anode_angle_deg, self.inherent_al_mm)

    @property
    def csi(self):
        return self.csi_um if self.csi_um is not None else detector_preset(self.detector)["csi_um"]

    @property
    def electronic(self) -> float:
        """The electronic noise sigma used with noise (detected-photon units): the one given, else the
        detector preset's (0 for the ideal detector)."""
        if self.electronic_sigma is None:
            return float(detector_preset(self.detector)["electronic_sigma"])
        return float(self.electronic_sigma)

    @property
    def noisy(self) -> bool:
        return self.mas is not None or self.photons is not None

    def table(self) -> HuTable:
        return HuTable.load(self.hu_table) if self.hu_table else HuTable.default()

    def to_sidecar(self) -> dict:
        d = asdict(self)
        d["csi_um"] = self.csi
        d["electronic_sigma"] = self.electronic
        d["detector_source"] = detector_preset(self.detector)["source"]
        if self.overrides:
            d["override_materials"] = [{"material": m, "density_g_cm3": density(m), "composition": composition(m)[3]}
                                       for m in self.overrides]
        return d


# --- image formation ---------------------------------------------------------------------------
def _row_spectra(setup: XraySetup, geometry, energies):
    """(H, nb) photons / cm^2 / mAs per bin at the detector, per detector row (heel effect along
    detector v, the anode-cathode axis) or one row broadcast."""
    sid = geometry.sid_mm if not geometry.parallel else 1000.0
    args = (setup.kvp, setup.filter_al_mm, setup.filter_cu_mm, setup.anode_angle_deg, setup.inherent_al_mm)
    if not setup.heel:
        return spectrum(*args, distance_mm=sid)[1][None, :]
    h = geometry.height
    v = (np.arange(h) - (h - 1) / 2.0) * geometry.pixel_spacing_mm[1]
    knots = np.linspace(v.min(), v.max(), 9) if h > 1 else v
    # SpekPy's x runs along the anode-cathode axis (positive towards the cathode); the field must
    # stay within the anode angle, so clip at 0.9 of the tangent of the angle.
    lim = 0.9 * sid * math.tan(math.radians(setup.anode_angle_deg))
    fl = np.stack([spectrum(*args, offaxis_mm=float(np.clip(x, -lim, lim)), distance_mm=sid)[1] for x in knots])
    if h == 1:
        return fl
    out = np.empty((h, fl.shape[1]))
    for b in range(fl.shape[1]):
        out[:, b] = np.interp(v, knots, fl[:, b])
    return out


def polychromatic(material_integrals: dict, setup: XraySetup, geometry) -> dict:
    """Primary image from per-material integrals of partial density along each ray (g/cm3 x mm).

    Returns {"energy": deposited energy per pixel relative to the open field at the detector centre
    (H, W), "quanta": detected photons per pixel relative to the same, "open_energy": per-row open
    field (H, 1), and the spectrum used}."""
    e, _ = spectrum(setup.kvp, setup.filter_al_mm, setup.filter_cu_mm, setup.anode_angle_deg, setup.inherent_al_mm)
    fl = _row_spectra(setup, geometry, e)                       # (R, nb) R = 1 or H
    eta = absorbed_fraction(e, setup.csi)
    nq = fl * eta[None, :]                                      # detected photons per bin
    ne = nq * e[None, :]                                        # deposited energy per bin
    c = fl.shape[0] // 2
    q0, e0 = nq[c].sum(), ne[c].sum()
    names = list(material_integrals)
    H, W = geometry.height, geometry.width
    A = np.stack([np.asarray(material_integrals[m], np.float64).reshape(H, W) * 0.1 for m in names], -1)  # g/cm2
    mu = np.stack([mass_attenuation(m, e) for m in names], 0)   # (M, nb)
    energy = np.empty((H, W))
    quanta = np.empty((H, W))
    rows = max(1, 16384 // max(W, 1))
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        t = np.exp(-(A[r0:r1] @ mu))                           # (r, W, nb)
        if fl.shape[0] == 1:
            energy[r0:r1] = t @ ne[0] / e0
            quanta[r0:r1] = t @ nq[0] / q0
        else:
            energy[r0:r1] = np.einsum("rwb,rb->rw", t, ne[r0:r1]) / e0
            quanta[r0:r1] = np.einsum("rwb,rb->rw", t, nq[r0:r1]) / q0
    open_energy = (ne.sum(1) / e0)[:, None]
    return {"energy": energy, "quanta": quanta, "open_energy": open_energy,
            "spectrum_kev": e, "spectrum_fluence": fl[c], "mean_detected_kev": float(e0 / q0)}


def blur_sigma_px(setup: XraySetup, geometry) -> tuple:
    """(sigma rows, sigma cols) in pixels of the detector LSF and the focal-spot penumbra."""
    s_det = detector_preset(setup.detector)["lsf_sigma_mm"]
    s_fs = 0.0
    if setup.focal_spot_mm > 0 and not geometry.parallel:
        m = geometry.magnification
        s_fs = setup.focal_spot_mm * max(m - 1.0, 0.0) / 2.3548  # FWHM -> sigma
    s = math.hypot(s_det, s_fs)
    du, dv = geometry.pixel_spacing_mm
    return s / dv, s / du


def blur(img, sigma_px) -> np.ndarray:
    if max(sigma_px) <= 0:
        return np.asarray(img, dtype=np.float64)

    return gaussian_filter(np.asarray(img, dtype=np.float64), sigma=sigma_px, mode="nearest", truncate=4.0)


def photons_per_pixel(setup: XraySetup, geometry) -> float:
    """Incident photons per pixel at the detector centre, open field: --photons, or from --mas."""
    if setup.photons is not None:
        return float(setup.photons)
    sid = geometry.sid_mm if not geometry.parallel else 1000.0
    _, fl = spectrum(setup.kvp, setup.filter_al_mm, setup.filter_cu_mm, setup.anode_angle_deg,
                     setup.inherent_al_mm, distance_mm=sid)
    du, dv = geometry.pixel_spacing_mm
    return float(fl.sum() * setup.mas * (du * dv) / 100.0)  # mm^2 -> cm^2


def noisy_energy(energy, quanta, n_detected_open: float, electronic_sigma: float, sigma_px, rng):
    """Poisson-sampled detected photons (before blur) weighted by each pixel's mean deposited energy,
    blurred, plus electronic noise (detected-photon units). All relative to the open field."""
    lam = np.maximum(quanta, 0.0) * n_detected_open
    counts = rng.poisson(lam).astype(np.float64)
    per_photon = np.where(quanta > 0, energy / np.maximum(quanta, 1e-300), 0.0)
    sig = blur(counts * per_photon, sigma_px) / n_detected_open
    if electronic_sigma > 0:
        sig += rng.normal(0.0, electronic_sigma / n_detected_open, size=sig.shape)
    return sig


def _midplane_to_detector_mm(geometry) -> float:
    if geometry.parallel:
        return 500.0
    return max(geometry.sid_mm - geometry.sad_mm, 50.0)


def add_scatter(energy, quanta, p: dict, setup: XraySetup, geometry, max_px: int = 128,
                multi_fit: MultiScatterFit | None = None):
    """Grid and scatter (first order, plus multiple unless ``setup.multiple_scatter`` is off) on the
    primary images of ``polychromatic``: (energy, quanta, sidecar record with the scatter-to-primary
    ratio). Scatter is smooth, so it is computed on a grid of at most ``max_px`` pixels a side and
    interpolated back."""
    H, W = energy.shape
    rel = energy / p["open_energy"]                          # I/I0 (energy weighted) per row's open field
    body = rel < 0.99
    e_sum, q_sum = float(energy[body].sum()), float(quanta[body].sum())
    kev = p["mean_detected_kev"] * (e_sum / q_sum if body.any() and q_sum > 0 else 1.0)
    tp, _ = grid_transmission(kev, np.zeros(1), setup.grid_ratio, setup.grid_lines_per_cm)
    d = _midplane_to_detector_mm(geometry)
    rec = {"grid_ratio": setup.grid_ratio, "grid_lines_per_cm": setup.grid_lines_per_cm if setup.grid_ratio else None,
           "grid_lamella_mm": GRID_LAMELLA_MM if setup.grid_ratio else None,
           "grid_primary_transmission": float(tp), "effective_kev": float(kev)}
    if not setup.scatter:
        return energy * tp, quanta * tp, {**rec, "model": None, "spr_mean": None}
    f = max(1, int(math.ceil(max(H, W) / max_px)))
    hc, wc = -(-H // f), -(-W // f)
    pad = np.pad(rel, ((0, hc * f - H), (0, wc * f - W)), mode="edge")
    coarse = pad.reshape(hc, f, wc, f).mean(axis=(1, 3))
    e = p["spectrum_kev"]
    deposit = p["spectrum_fluence"] * absorbed_fraction(e, setup.csi) * e
    tau_c, knot_kev = water_equivalent(coarse, e, deposit)
    du, dv = geometry.pixel_spacing_mm
    s1, sm, tau = scatter_parts(coarse, kev, (du * f, dv * f), d, setup.csi, setup.grid_ratio,
                                setup.grid_lines_per_cm, tau=tau_c, knot_kev=knot_kev,
                                multiple=setup.multiple_scatter, multi_fit=multi_fit)
    sc = s1 + sm
    if f > 1:
        sc = zoom(sc, f, order=1, mode="nearest", grid_mode=True)[:H, :W]
    s_e = sc * p["open_energy"]                              # scatter in the energy units of ``energy``
    per_q = (q_sum / e_sum) if e_sum > 0 else float(quanta.sum() / max(energy.sum(), 1e-300))
    e_out = energy * tp + s_e
    q_out = quanta * tp + s_e * per_q
    prim = energy * tp
    spr = s_e / np.maximum(prim, 1e-30)
    cy, cx = H // 2, W // 2
    cbody = coarse < 0.99
    c_prim = float(coarse[cbody].sum())
    model = "first-order kernels from xraylib water cross sections"
    if setup.multiple_scatter:
        model += " + multiple-scatter kernels fitted to a Monte Carlo of water slabs"
    rec.update({"model": model,
                "spr_mean": float(s_e[body].sum() / max(prim[body].sum(), 1e-30)) if body.any() else 0.0,
                "spr_single_mean": float(s1[cbody].sum() / max(c_prim * tp, 1e-30)) if cbody.any() else 0.0,
                "spr_multiple_mean": float(sm[cbody].sum() / max(c_prim * tp, 1e-30)) if cbody.any() else 0.0,
                "spr_median_body": float(np.median(spr[body])) if body.any() else 0.0,
                "spr_centre": float(spr[cy, cx]), "spr_max_body": float(spr[body].max()) if body.any() else 0.0,
                "midplane_to_detector_mm": d, "water_equivalent_mm_max": float(tau.max())})
    return e_out, q_out, rec


def form_image(material_integrals: dict, setup: XraySetup, geometry, multi_fit=None) -> dict:
    """Primary image, detector blur, noise: {"intensity": I/I0 (H, W) float64 (relative to the open
    field at the detector centre), "sidecar": the physics record}. ``multi_fit``: the multiple-scatter
    term's parameters (a ``MultiScatterFit``; default the fit in use), for fitting them."""
    p = polychromatic(material_integrals, setup, geometry)
    energy, quanta = p["energy"], p["quanta"]
    scatter_rec = None
    if setup.scatter or setup.grid_ratio:
        energy, quanta, scatter_rec = add_scatter(energy, quanta, p, setup, geometry, multi_fit=multi_fit)
    sigma = blur_sigma_px(setup, geometry)
    n_inc = None
    if setup.noisy:
        n_inc = photons_per_pixel(setup, geometry)
        eta_mean = float((absorbed_fraction(p["spectrum_kev"], setup.csi) * p["spectrum_fluence"]).sum()
                         / p["spectrum_fluence"].sum())
        rng = np.random.default_rng([int(setup.seed), int(setup.stream)])
        sig = noisy_energy(energy, quanta, n_inc * eta_mean, setup.electronic, sigma, rng)
    else:
        sig = blur(energy, sigma)
    rec = setup.to_sidecar()
    rec.update({"spectrum_kev": p["spectrum_kev"].tolist(), "spectrum_fluence": p["spectrum_fluence"].tolist(),
                "spectrum_fluence_unit": "photons / cm^2 / mAs per 1 keV bin at the detector (SpekPy)",
                "spectrum_source": "SpekPy", "mean_detected_kev": p["mean_detected_kev"],
                "blur_sigma_px": list(sigma), "photons_per_pixel": n_inc, "scatter_model": scatter_rec,
                "spr": None if scatter_rec is None else scatter_rec.get("spr_mean"),
                "hu_table": setup.table().to_dict()})
    return {"intensity": sig, "sidecar": rec}


# --- scatter -----------------------------------------------------------------------------------
# First-order (single) scatter by thickness-dependent convolution kernels, in the form of the kernel
# methods (Ohnesorge, Flohr & Klingenbeck-Regn, Eur Radiol 9:563, 1999; Star-Lack et al., Proc SPIE
# 7258, 2009): each pixel's pencil beam emits scatter in proportion to its primary signal, spread
# over the detector by a kernel that depends on the water-equivalent thickness tau of the pencil,
# tau = ln(I0 / P) / mu_water(E_eff). Nothing is fitted; kernel and amplitude follow from xraylib's
# differential cross sections of water (DCS_Compt: Klein-Nishina with the incoherent scattering
# function; DCS_Rayl: with the atomic form factor):
# - a pencil through tau that scatters once and leaves like a primary carries P x mu_s tau of the
#   primary signal as scatter (first order in depth: I0 e^{-mu z} mu_s dz e^{-mu (tau - z)});
# - scattering at height h above the pencil's exit (8 depths through tau, the body's mid-plane d above
#   the detector), the photon leaves at angle theta with probability (dsigma/dOmega) / sigma_s, lands
#   at r = L tan(theta) on the detector L below (density cos^3(theta) / L^2 per unit area), pays the
#   oblique exit path at its lower (Compton) energy, exp(-(mu'/cos(theta) - mu) h) relative to the
#   primary, and deposits E' eta(E') instead of E eta(E) in the energy-integrating detector.
# Multiple scatter (``multiple_scatter_kernel``): photons scattered more than once spread from a
# virtual point source on the pencil, MULTI_SOURCE_MM + MULTI_SOURCE_PER_TAU x tau above its exit face,
# with the angular distribution (n + 1) / (2 pi) cos^n(theta) per sr about the normal, n =
# MULTI_COS_POWER (higher orders as a broad source inside the phantom, as in Spies et al., Med Phys
# 27:462, 2000), at the energy of two 90-degree Compton scatters (which sets the grid's interspacer
# attenuation and the detector's absorption), through the grid's acceptance at their angle. Its amplitude
# A (multiply scattered energy reaching the detector plane per unit detected primary, ideal detector) is
# ln A = c0 + c1 ln x + c2 x + c3 ln(E / 60 keV) (MULTI_FIT), x = mu_s tau (water's scatter optical
# depth at the beam's energy E behind tau). All of it is fitted to the reference Monte Carlo
# (``core.drr.scatter_mc``; ``benchmarks/fit_multiscatter.py``) of water slabs 5, 10, 15, 20 and 30 cm
# at 70 and 120 kVp (30 x 30 cm field, 50 mm air gap, SID 1000 mm): the source height to its pencil
# beams' radial profiles, A to what its total SPR without a grid leaves beyond the model's first order
# (so A also takes up the first order's shortfall, below), n to its SPR behind the 10:1 grid. The 25 cm
# slabs, other air gaps and other kVps are fitted in no step and check it (``benchmarks/bench_scatter.py``).
# Outside water slabs 5-30 cm and 45-80 keV the fit extrapolates. The first-order part is not fitted:
# against the same Monte Carlo's one-interaction tally it is 5-15 % low without a grid (up to 24 %
# behind it) in this cone beam, where the pencils' tilt (ignored: pencils are taken normal to the
# detector) raises the scatter at the field's centre; in a parallel beam it agrees
# (``tests/test_scatter_mc.py``).
SCATTER_TAU_MM = (0.0, 25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0)  # kernel groups, interpolated
MULTI_FIT = (-1.1840, 1.5597, 0.0731, 0.3187)  # c0..c3, benchmarks/fit_multiscatter.py (rms residual 0.4 %)
MULTI_SOURCE_MM = 40.0      # height of the virtual source above the exit face: MULTI_SOURCE_MM + ...
MULTI_SOURCE_PER_TAU = 0.3  # ... MULTI_SOURCE_PER_TAU x tau, the same fit
MULTI_COS_POWER = 2.0       # angular distribution of the emission about the normal, cos^n, the same fit


@dataclass(frozen=True)
class MultiScatterFit:
    """The multiple-scatter term's fitted parameters: ``coef`` (c0..c3 of ln A), the virtual source's
    height ``source_mm`` + ``source_per_tau`` x tau above the exit face, the emission's power
    ``cos_power``. The defaults, ``default()``, are the fit in use (``MULTI_FIT``, ``MULTI_SOURCE_MM``,
    ``MULTI_SOURCE_PER_TAU``, ``MULTI_COS_POWER``); ``benchmarks/fit_multiscatter.py`` passes others."""
    coef: tuple = MULTI_FIT
    source_mm: float = MULTI_SOURCE_MM
    source_per_tau: float = MULTI_SOURCE_PER_TAU
    cos_power: float = MULTI_COS_POWER

    @classmethod
    def default(cls) -> "MultiScatterFit":
        return cls()
# Anti-scatter grid: a linear focused grid of lead lamellae with aluminium interspacers (the common
# radiography grid, e.g. 40 lines/cm, ratio 10:1). The lamella thickness is not given by the ratio and
# line density; 36 um is assumed (not a datasheet figure). One grid maker states lead strips of 0.05-0.1 mm
# between 0.15-0.35 mm interspacers for its grids (Newheek, https://www.x-raygrid.com/x-ray-grid-6.html),
# thicker than assumed here: at 40 lines/cm that leaves an open fraction of 0.80-0.60 instead of 0.86.
# The Monte Carlo fit behind the grid (MULTI_COS_POWER) used 36 um. Primary transmission:
# open fraction x interspacer attenuation; scatter at angle theta, azimuth phi to the lamellae, passes
# one interspace when r tan(theta) |cos(phi)| < 1 (opaque lamellae; the geometric model of grid
# selectivity, e.g. Day & Dance, Phys Med Biol 28:1429, 1983), averaged over phi.


def _water_dcs(kev: float, theta) -> np.ndarray:
    """Water's differential scattering cross section (coherent + incoherent) in cm^2/g/sr."""
    import xraylib as xr

    zs, ws, _, _ = composition("water")
    # xraylib's S(q) table starts at a small q ~ E theta: the cross sections are flat below that angle
    th = np.maximum(np.asarray(theta, float), max(1e-3, 0.07 / float(kev)))
    out = np.zeros(th.shape)
    for z, w in zip(zs, ws):
        out += w * np.array([xr.DCS_Compt(int(z), float(kev), float(t)) + xr.DCS_Rayl(int(z), float(kev), float(t))
                             for t in th.ravel()]).reshape(th.shape)
    return out


def _compton_kev(kev, theta):
    return kev / (1.0 + kev / 510.99895 * (1.0 - np.cos(theta)))


def grid_transmission(kev: float, theta, ratio: float | None, lines_per_cm: float = GRID_LINES_PER_CM):
    """(primary transmission, transmission at scatter angle theta averaged over azimuth)."""
    th = np.asarray(theta, float)
    if not ratio:
        return 1.0, np.ones(th.shape)
    pitch = 10.0 / float(lines_per_cm)                 # mm
    gap = pitch - GRID_LAMELLA_MM
    if gap <= 0:
        raise CtwinError(f"grid line density {lines_per_cm:g}/cm leaves no interspace for {GRID_LAMELLA_MM * 1000:g} um lamellae")
    h_cm = float(ratio) * gap / 10.0
    mu_al = float(mass_attenuation("aluminium", kev)) * density("aluminium")
    open_frac = gap / pitch
    tp = open_frac * math.exp(-mu_al * h_cm)
    a = float(ratio) * np.tan(np.minimum(th, np.pi / 2 - 1e-6))
    phi0 = np.where(a > 1.0, np.arccos(np.minimum(1.0, 1.0 / np.maximum(a, 1e-12))), 0.0)
    geo = (2.0 / np.pi) * ((np.pi / 2 - phi0) - a * (1.0 - np.sin(phi0)))
    e2 = _compton_kev(kev, th)
    mu2 = mass_attenuation("aluminium", np.clip(e2, 1.0, None)) * density("aluminium")
    ts = open_frac * np.clip(geo, 0.0, 1.0) * np.exp(-mu2 * h_cm / np.cos(np.minimum(th, 1.5)))
    return tp, ts


@functools.lru_cache(maxsize=64)
def _angle_weights_cached(kev: float, csi_um):
    """Angles, and per angle: dcs / sigma_s (1/sr), deposited-energy ratio E'eta(E')/(E eta(E)), mu'."""
    th = np.linspace(1e-3, np.pi / 2 - 1e-3, 1500)
    dcs = _water_dcs(kev, th)
    full = np.linspace(1e-3, np.pi, 3000)
    sig = trapezoid(_water_dcs(kev, full) * 2 * np.pi * np.sin(full), full)   # cm^2/g
    e2 = _compton_kev(kev, th)
    eta = absorbed_fraction(np.r_[kev, e2], csi_um)
    wdet = e2 * eta[1:] / (kev * eta[0])
    mu2 = mass_attenuation("water", e2) * density("water")                  # 1/cm
    return th, dcs / sig, wdet, mu2, sig


def _angle_weights(kev: float, csi_um):
    return _angle_weights_cached(round(float(kev), 2), None if csi_um is None else float(csi_um))


def scatter_kernel(kev: float, tau_mm: float, d_mm: float, shape, spacing_mm, csi_um=None,
                   grid_ratio=None, grid_lines_per_cm: float = GRID_LINES_PER_CM) -> np.ndarray:
    """Detected scatter per unit primary scatter source, on a (2H-1, 2W-1) grid of pixel offsets
    (rows, cols), per pixel: landing density x pixel area x energy and grid weights."""
    H, W = shape
    du, dv = spacing_mm
    y = (np.arange(2 * H - 1) - (H - 1)) * dv
    x = (np.arange(2 * W - 1) - (W - 1)) * du
    r = np.hypot(y[:, None], x[None, :])
    th_tab, p_tab, w_tab, mu2_tab, _ = _angle_weights(kev, csi_um)
    mu = float(mass_attenuation("water", kev)) * density("water")
    _, ts_tab = grid_transmission(kev, th_tab, grid_ratio, grid_lines_per_cm)
    out = np.zeros(r.shape)
    n = 8 if tau_mm > 0 else 1
    for j in range(n):  # scatter depths across the pencil (midpoints), h above the exit surface
        h_mm = tau_mm * (j + 0.5) / n
        dist = d_mm - tau_mm / 2.0 + h_mm
        f_tab = p_tab * w_tab * ts_tab * np.exp(-(mu2_tab / np.cos(th_tab) - mu) * h_mm / 10.0)
        th = np.arctan2(r, dist)
        out += np.interp(th, th_tab, f_tab, right=0.0) * np.cos(th) ** 3 / dist ** 2
    return out / n * du * dv


def multiple_scatter_amplitude(kev: float, tau_mm: float, fit: MultiScatterFit | None = None) -> float:
    """Multiply scattered energy reaching the detector plane per unit detected primary energy (ideal
    detector, no grid) of a pencil through ``tau_mm`` of water at beam energy ``kev``: the fit
    ``MULTI_FIT`` to the Monte Carlo (see the scatter section's comments), or ``fit.coef``."""
    if tau_mm <= 0:
        return 0.0
    *_, sig = _angle_weights(kev, None)
    x = sig * density("water") * tau_mm / 10.0                       # scatter optical depth mu_s tau
    c0, c1, c2, c3 = (fit or MultiScatterFit.default()).coef
    return float(math.exp(c0 + c1 * math.log(x) + c2 * x + c3 * math.log(kev / 60.0)))


def multiple_scatter_kernel(kev: float, tau_mm: float, d_mm: float, shape, spacing_mm, csi_um=None,
                            grid_ratio=None, grid_lines_per_cm: float = GRID_LINES_PER_CM,
                            fit: MultiScatterFit | None = None) -> np.ndarray:
    """Detected multiple scatter per unit primary, on a (2H-1, 2W-1) grid of pixel offsets: the pencil's
    multiply scattered energy (``multiple_scatter_amplitude``) spreads from a virtual point source on the
    pencil, ``MULTI_SOURCE_MM`` + ``MULTI_SOURCE_PER_TAU`` x tau above the slab's exit face, with the
    angular distribution (n + 1) / (2 pi) cos^n(theta) per sr (n = ``MULTI_COS_POWER``), at the energy
    of two 90-degree Compton scatters, through the grid's acceptance. ``fit``: other parameters than
    those constants (``MultiScatterFit``)."""
    fit = fit or MultiScatterFit.default()
    H, W = shape
    du, dv = spacing_mm
    amp = multiple_scatter_amplitude(kev, tau_mm, fit)
    if amp <= 0:
        return np.zeros((2 * H - 1, 2 * W - 1))
    g = max(d_mm - tau_mm / 2.0, 0.0) + fit.source_mm + fit.source_per_tau * tau_mm   # source height, mm
    y = (np.arange(2 * H - 1) - (H - 1)) * dv
    x = (np.arange(2 * W - 1) - (W - 1)) * du
    r = np.hypot(y[:, None], x[None, :])
    th = np.arctan2(r, g)
    e_m = kev / (1.0 + 2.0 * kev / 510.99895)
    eta = absorbed_fraction(np.array([kev, e_m]), csi_um)
    n = fit.cos_power
    land = (n + 1.0) / (2.0 * math.pi * g * g) * np.cos(th) ** (n + 3.0) * du * dv   # landing density x pixel area
    # point sampling misses the density's integral where the source is low beside a pixel: scale to the
    # exact fraction landing within the grid's area taken as a disc (within 1.1 % of the sampled sum
    # at heights of 100-500 mm and 1-10 mm pixels)
    r_eq = math.sqrt(land.size * du * dv / math.pi)
    frac = 1.0 - (g / math.hypot(g, r_eq)) ** (n + 1.0)
    land *= frac / max(float(land.sum()), 1e-300)
    # the Compton shift of the grid's table is small beside the multiple scatter's own spread: the
    # transmission is taken at e_m for every angle
    _, ts_tab = grid_transmission(e_m, th.ravel(), grid_ratio, grid_lines_per_cm)
    k = land * ts_tab.reshape(th.shape) * (eta[1] / eta[0] if eta[0] > 0 else 1.0)
    return amp * k


def scatter_parts(primary, kev: float, spacing_mm, d_mm: float, csi_um=None, grid_ratio=None,
                  grid_lines_per_cm: float = GRID_LINES_PER_CM, tau=None, knot_kev=None, multiple: bool = True,
                  multi_fit: MultiScatterFit | None = None) -> tuple:
    """(single scatter, multiple scatter, water-equivalent thickness mm): ``scatter_image``'s parts.
    The pencils are taken normal to the detector. In a cone beam each pencil is tilted, but its
    scatter kernel stays centred on the pixel the pencil reaches (its forward axis is the pencil), so
    the kernels are not moved towards the principal point; the tilt's second-order effects are left
    out (the Monte Carlo's cone-beam slabs show about 5-10 % more single scatter at the centre than
    its parallel-beam ones; ``benchmarks/bench_scatter.py``)."""
    p = np.clip(np.asarray(primary, np.float64), 1e-30, None)
    knots = np.asarray(SCATTER_TAU_MM)
    if tau is None:
        mu = float(mass_attenuation("water", kev)) * density("water")        # 1/cm
        tau = -np.log(np.minimum(p, 1.0)) / mu * 10.0
    tau = np.clip(np.asarray(tau, np.float64), 0.0, knots[-1])
    kevs = [float(kev)] * len(knots) if knot_kev is None else [float(k) for k in knot_kev]
    single = np.zeros_like(p)
    multi = np.zeros_like(p)
    for k, t in enumerate(knots):
        lo = knots[k - 1] if k > 0 else t
        hi = knots[k + 1] if k + 1 < len(knots) else t
        w = np.zeros_like(tau)
        if hi > t:
            sel = (tau >= t) & (tau <= hi)
            w[sel] = 1.0 - (tau[sel] - t) / (hi - t)
        else:
            w[tau >= t] = 1.0
        if lo < t:
            sel = (tau >= lo) & (tau < t)
            w[sel] = (tau[sel] - lo) / (t - lo)
        if not np.any(w > 0):
            continue
        *_, sig = _angle_weights(kevs[k], csi_um)
        source = p * sig * density("water") * tau / 10.0 * w                  # P x mu_s x tau
        kern = scatter_kernel(kevs[k], t, d_mm, p.shape, spacing_mm, csi_um, grid_ratio, grid_lines_per_cm)
        single += fftconvolve(source, kern, mode="valid")
        if multiple and t > 0:
            km = multiple_scatter_kernel(kevs[k], t, d_mm, p.shape, spacing_mm, csi_um, grid_ratio, grid_lines_per_cm,
                                         multi_fit)
            multi += fftconvolve(p * w, km, mode="valid")
    return np.maximum(single, 0.0), np.maximum(multi, 0.0), tau


def scatter_image(primary, kev: float, spacing_mm, d_mm: float, csi_um=None, grid_ratio=None,
                  grid_lines_per_cm: float = GRID_LINES_PER_CM, tau=None, knot_kev=None, multiple: bool = True,
                  multi_fit: MultiScatterFit | None = None) -> tuple:
    """Scatter (same units as ``primary``, which is I/I0 without the grid) and the water-equivalent
    thickness map (mm). ``d_mm``: the body's mid-plane to the detector. ``multiple=False``: first-order
    scatter only; ``multi_fit``: the multiple-scatter term's parameters (default ``MultiScatterFit.default()``).

    Monoenergetic at ``kev`` unless ``tau`` (the water-equivalent thickness per pixel, from the
    polychromatic transmission) and ``knot_kev`` (the beam's energy behind each of
    ``SCATTER_TAU_MM``) are given."""
    single, multi, tau = scatter_parts(primary, kev, spacing_mm, d_mm, csi_um, grid_ratio, grid_lines_per_cm,
                                       tau, knot_kev, multiple, multi_fit)
    return single + multi, tau


def water_equivalent(rel, spectrum_kev, weights) -> tuple:
    """Water-equivalent thickness (mm) of an energy-weighted transmission ``rel`` for a beam of
    detected-energy ``weights`` per bin (beam hardening included), and the weighted mean energy of
    that beam behind each of ``SCATTER_TAU_MM``."""
    e = np.asarray(spectrum_kev, float)
    wts = np.asarray(weights, float)
    mu = mass_attenuation("water", e) * density("water") / 10.0                # 1/mm
    grid = np.arange(0.0, SCATTER_TAU_MM[-1] + 1.0, 1.0)
    att = np.exp(-np.outer(grid, mu)) * wts[None, :]
    lt = -np.log(att.sum(1) / wts.sum())                                        # increasing in tau
    tau = np.interp(-np.log(np.clip(rel, 1e-30, 1.0)), lt, grid)
    ks = []
    for t in SCATTER_TAU_MM:
        a = np.exp(-mu * t) * wts
        ks.append(float((a * e).sum() / a.sum()))
    return tau, ks


def slab_spr_reference(kev: float, tau_mm: float, d_mm: float, field_mm, csi_um=None, grid_ratio=None,
                       grid_lines_per_cm: float = GRID_LINES_PER_CM, n: int = 200) -> float:
    """Single-scatter SPR at the centre of a water slab (thickness ``tau_mm``, mid-plane ``d_mm`` above
    the detector, parallel beam over a ``field_mm`` (w, h) rectangle) by direct volume integration:
    every depth, incident attenuation at E, the true oblique exit path at E', inverse square and
    obliquity to the central pixel. Slow and obvious; the reference for the kernel model."""
    mu = float(mass_attenuation("water", kev)) * density("water") / 10.0     # 1/mm
    rho = density("water")
    hz = np.linspace(d_mm - tau_mm / 2, d_mm + tau_mm / 2, n + 1)
    hz = 0.5 * (hz[1:] + hz[:-1])
    dz = tau_mm / n
    fx, fy = field_mm[0] / 2.0, field_mm[1] / 2.0
    xs = np.linspace(-fx, fx, 2 * n + 1)
    ys = np.linspace(-fy, fy, 2 * n + 1)
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    R = np.hypot(X, Y)
    dx, dy = xs[1] - xs[0], ys[1] - ys[0]
    th_tab, p_tab, w_tab, mu2_tab, sig = _angle_weights(kev, csi_um)
    _, ts_tab = grid_transmission(kev, th_tab, grid_ratio, grid_lines_per_cm)
    tp, _ = grid_transmission(kev, np.zeros(1), grid_ratio, grid_lines_per_cm)
    dcs = p_tab * sig                                                          # cm^2/g/sr
    total = 0.0
    top = d_mm + tau_mm / 2
    bottom = d_mm - tau_mm / 2
    for h in hz:
        L2 = R ** 2 + h ** 2
        th = np.arctan2(R, h)
        c = np.cos(th)
        inc = math.exp(-mu * (top - h))
        exit_len = (h - bottom) / c                                            # mm inside the slab
        mu2 = np.interp(th, th_tab, mu2_tab) / 10.0
        f = (np.interp(th, th_tab, dcs * w_tab * ts_tab, right=0.0) * rho / 10.0  # per mm per sr
             * np.exp(-mu2 * exit_len) * c / L2)
        total += inc * float(f.sum()) * dx * dy * dz
    primary = math.exp(-mu * tau_mm) * tp
    return total / primary
