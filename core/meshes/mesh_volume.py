"""Mesh mode: a synthetic CT and labelmap from closed anatomy meshes (no CT).

``read_mesh_folder(dir)`` reads a folder of per-structure meshes (STL/OBJ/PLY, LPS mm, named by
TotalSegmentator names: ``femur_left.ply``, ``liver.stl``, ...; ``skin`` is the body surface, as
in a twin's ``meshes/``; ``body_model`` is skipped). Each mesh is welded (exactly coincident
vertices merged, as STL files repeat them per triangle), oriented outward (positive volume) and
must be closed; a folder without ``skin`` or without any bone is refused.

``hu_table(names, overrides)`` gives each structure one attenuation, as a mean HU:

- by default from ``DEFAULT_HU`` by structure kind: bones are the mean of cortex and cancellous
  bone over the whole bone (long bones 550, vertebrae 250, skull 800, ...: means measured inside
  TotalSegmentator masks of real CTs are 200-700 HU), organs 30-55, muscle 45, fat -100, lung
  -850, air and gas -1000; ``skin`` (the body surface) encloses the remainder, -50 HU (a mix of
  fat and muscle);
- overridden per structure by a JSON object (``load_hu_overrides``): ``name -> HU``, ``name ->
  material`` (a material of ``core.drr.xray``: ``soft_tissue``, ``bone``, ``metal``, ``water``,
  ``aluminium``, or ``air``) or ``name -> {"material": m, "density": g/cm3}``. A material is
  turned into the HU that gives its attenuation under the SPEC 5 monoenergetic default:
  mu_water = 0.02/mm is water's attenuation at ``EFFECTIVE_KEV`` (~64 keV, xraylib), and
  HU = 1000 (mu_m(E) rho / 0.02 - 1).

``voxelise_meshes(meshes, hu, spacing)`` renders the set into a CT (int16 HU) and a labelmap on
an axis-aligned grid (default: the union of the meshes' bounds plus ``margin_mm``):

- Partial volume: each voxel column is sampled by ``subsamples`` x ``subsamples`` rays along z;
  along each ray the coverage is exact (crossing intervals), so a voxel's value is the mean over
  its sub-columns of the exact z-coverage. Inside/outside is the signed crossing count (the
  winding number of a closed mesh) with the same shared-edge rule as ``core.meshes.metrics``, so no
  crossing is counted twice or missed on a watertight mesh.
- Nesting: where structures overlap, the one of highest priority owns the point (exactly, per
  ray segment): the body surface ``skin`` lowest, then tissue layers (skin tissue, fat, muscles),
  then organs and vessels, then gas (bowel gas, airways), then bones on top. Within one tier the
  order is by name (deterministic). Outside every mesh is air (-1000 HU).
- Labels: each voxel takes the structure covering most of it, or 0 when the remainder inside the
  body (``skin``) and the air outside cover more. Label ids are TotalSegmentator's / the
  project's (``core.volumes.labels``); unknown names get new ids above every known one; ``skin_label``
  (a skin-tissue label exported as a mesh, see ``core.meshes.mesh.import_anatomy``) is the label ``skin``.

Numba, parallel over rows of voxel columns; about ``columns x subsamples^2 x triangles per
column`` edge tests (``benchmarks/bench_mesh_twin.py`` prints the time of a full-body set).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numba as nb
import numpy as np
import time

from ..errors import CtwinError
from ..volumes.labels import is_skeletal, name_to_id
from .metrics import _build_grid, vertical_crossing
from ..progress import report
from ..volumes.volume import Volume, affine_from
from ..drr.physics import MU_WATER_PER_MM, mass_attenuation
from ..drr.xray import composition
from .mesh import Mesh, read_mesh

MESH_SUFFIXES = (".stl", ".obj", ".ply")
SKIN = "skin"
SKIN_LABEL_KEY = "skin_label"
SKIP_NAMES = ("body_model",)  # a twin's fitted body surface: not anatomy
AIR_HU = -1000.0

# --------------------------------------------------------------------------------------------
# structure kinds: default HU and nesting tier
# --------------------------------------------------------------------------------------------
# (regex on the structure name, kind). First match wins; unmatched skeletal names are "bone",
# anything else "organ".
_KIND_RULES = [
    (r"^skin$", "body"),
    (r"^skin_label$", "skin_tissue"),
    (r"^subcutaneous_fat$|fat", "fat"),
    (r"^muscle$|^gluteus_|^autochthon_|^iliopsoas_", "muscle"),
    (r"^lung_", "lung"),
    (r"^trachea$|^bronch|^airway|_gas$|^gas$|^air$", "gas"),
    (r"^skull$", "skull"),
    (r"^(femur|humerus|tibia|fibula|radius|ulna|clavicula)_", "long_bone"),
    (r"^vertebrae_|^sacrum$", "vertebra"),
    (r"^rib_|^sternum$", "rib"),
    (r"^costal_cartilages$", "cartilage"),
    (r"^hip_|^scapula_|^patella_", "flat_bone"),
    (r"^(carpal|metacarpal|phalanges_hand|tarsal|metatarsal|phalanges_feet)_", "small_bone"),
    (r"^liver$", "liver"),
    (r"^spleen$|^pancreas$|^heart$|^thyroid|^adrenal|^prostate$", "organ"),
    (r"^kidney_", "kidney"),
    (r"artery|vein|vena|aorta|trunk|atrial_appendage", "vessel"),
    (r"^brain$|^spinal_cord$", "neural"),
    (r"^urinary_bladder$|^gallbladder$", "fluid"),
    (r"^colon$", "colon"),
    (r"^stomach$|^small_bowel$|^duodenum$|^esophagus$", "bowel"),
    (r"^table$", "table"),
]
DEFAULT_HU = {
    "body": -50.0,        # the remainder inside the body surface: fat and muscle (real abdomen CT
                          # outside its TotalSegmentator labels: mean -68, median -83 HU)
    "skin_tissue": 30.0,
    "fat": -100.0,
    "muscle": 45.0,
    "lung": -850.0,
    "gas": -1000.0,
    "skull": 800.0,
    "long_bone": 550.0,
    "vertebra": 250.0,
    "rib": 250.0,
    "cartilage": 120.0,
    "flat_bone": 300.0,
    "small_bone": 400.0,
    "bone": 400.0,
    "liver": 55.0,
    "organ": 40.0,
    "kidney": 30.0,
    "vessel": 40.0,
    "neural": 30.0,
    "fluid": 10.0,
    "colon": -200.0,      # wall, content and gas together
    "bowel": 20.0,
    "table": -500.0,
}
_TIER = {"body": 0, "table": 0, "skin_tissue": 1, "fat": 1, "muscle": 1, "gas": 3}
TIER_NAMES = {0: "body surface", 1: "tissue layers", 2: "organs and vessels", 3: "gas", 4: "bones"}


def structure_kind(name: str) -> str:
    for pat, kind in _KIND_RULES:
        if re.search(pat, name):
            return kind
    return "bone" if is_skeletal(name) else "organ"


def label_name(name: str) -> str:
    """The label name of a mesh name (``skin_label`` -> ``skin``, the skin-tissue label)."""
    return SKIN if name == SKIN_LABEL_KEY else name


def structure_tier(name: str) -> int:
    """Nesting tier (higher wins where structures overlap): see the module doc."""
    if name != SKIN_LABEL_KEY and is_skeletal(name):
        return 4
    return _TIER.get(structure_kind(name), 2)


# --------------------------------------------------------------------------------------------
# materials -> HU at the monoenergetic default
# --------------------------------------------------------------------------------------------
MATERIAL_DENSITY = {"soft_tissue": 1.06, "bone": 1.92, "metal": 4.5, "water": 1.0, "aluminium": 2.699}


def _effective_kev() -> float:
    """The energy at which water's attenuation is SPEC 5's mu_water (0.02/mm)."""
    target = MU_WATER_PER_MM * 10.0  # 1/mm -> cm^2/g at 1 g/cm^3
    lo, hi = 10.0, 150.0
    for _ in range(60):  # water's mu/rho falls monotonically over 10-150 keV
        mid = math.sqrt(lo * hi)
        if float(mass_attenuation("water", mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


EFFECTIVE_KEV = _effective_kev()


def material_hu(material: str, density: float | None = None) -> float:
    """HU that gives ``material`` (at ``density`` g/cm3, default its own) the attenuation it has
    at ``EFFECTIVE_KEV`` under the SPEC 5 monoenergetic mapping."""
    if material == "air":
        return AIR_HU
    composition(material)  # unknown names raise with the list of known materials
    rho = MATERIAL_DENSITY.get(material, composition(material)[2]) if density is None else float(density)
    if not rho > 0:
        raise CtwinError(f"material {material}: density must be positive, got {density}")
    mu = float(mass_attenuation(material, EFFECTIVE_KEV)) * rho / 10.0  # 1/mm
    return 1000.0 * (mu / MU_WATER_PER_MM - 1.0)


def load_hu_overrides(path) -> dict:
    """Read a JSON object name -> HU | material | {"material": m, "density": rho} | {"hu": x}.

    Names are mesh names: ``skin`` sets the remainder inside the body surface, ``skin_label`` the
    skin-tissue label (or ``skin`` when there is no body remainder to set)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise CtwinError(f"cannot read HU table {p.name}: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(raw, dict):
        raise CtwinError(f"HU table {p.name} must be a JSON object: structure name -> HU or material")
    return raw


def _override_entry(name: str, v) -> dict:
    if isinstance(v, bool):
        raise CtwinError(f"HU table entry {name}: expected a number, a material or an object")
    if isinstance(v, (int, float)):
        return {"hu": float(v), "source": "user HU"}
    if isinstance(v, str):
        return {"hu": material_hu(v), "source": f"material {v} ({MATERIAL_DENSITY.get(v, 0.0):g} g/cm3)"
                if v != "air" else "material air"}
    if isinstance(v, dict):
        if "hu" in v:
            return _override_entry(name, v["hu"])
        if "material" in v:
            rho = v.get("density")
            m = str(v["material"])
            hu = material_hu(m, rho)
            d = MATERIAL_DENSITY.get(m, 1.0) if rho is None else float(rho)
            return {"hu": hu, "source": f"material {m} ({d:g} g/cm3)"}
    raise CtwinError(f"HU table entry {name}: expected a number, a material name or "
                     '{"material": ..., "density": ...}')


def hu_table(names, overrides: dict | None = None) -> dict:
    """{name: {"hu", "source", "kind", "tier"}} for the structures ``names`` (see module doc)."""
    names = list(names)
    out = {}
    for n in names:
        kind = structure_kind(n)
        out[n] = {"hu": DEFAULT_HU[kind], "source": f"default ({kind})", "kind": kind,
                  "tier": structure_tier(n)}
    for k, v in (overrides or {}).items():
        key = SKIN_LABEL_KEY if (k == SKIN and SKIN_LABEL_KEY in out and k not in out) else k
        if key not in out:
            raise CtwinError(f"HU table names {k!r}, which is not one of the meshes")
        out[key].update(_override_entry(k, v))
    for n, e in out.items():
        e["hu"] = float(np.clip(round(e["hu"], 1), -1024.0, 30000.0))
    return out


# --------------------------------------------------------------------------------------------
# reading a folder of meshes
# --------------------------------------------------------------------------------------------
def weld(mesh):
    """Merge exactly coincident vertices (STL repeats them per triangle); drop unused ones and
    degenerate faces."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    uniq, inv = np.unique(v, axis=0, return_inverse=True)
    f = inv.reshape(-1)[mesh.faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    used, f2 = np.unique(f, return_inverse=True)
    return Mesh(uniq[used], f2.reshape(-1, 3), mesh.name, dict(mesh.meta))


def prepare_mesh(mesh):
    """Welded, closed and outward-wound copy of ``mesh`` (CtwinError when it is not closed)."""
    m = weld(mesh)
    if not m.is_closed():
        counts, bal = m._edge_balance()
        open_edges = int(np.count_nonzero(bal != 0))
        raise CtwinError(f"mesh {mesh.name} is not closed ({open_edges} open edges); mesh mode needs "
                         "closed surfaces (fill its holes first)")
    vol = m.volume()
    if abs(vol) < 1e-9:
        raise CtwinError(f"mesh {mesh.name} encloses no volume")
    if vol < 0:
        m.faces = np.ascontiguousarray(m.faces[:, ::-1])
    return m


def read_mesh_folder(folder) -> dict:
    """{name: Mesh} from a folder of per-structure STL/OBJ/PLY files (see module doc)."""
    d = Path(folder)
    if not d.is_dir():
        raise CtwinError(f"mesh folder not found: {d}")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
    meshes = {}
    for p in files:
        name = p.name.split(".")[0]
        if name in SKIP_NAMES:
            continue
        if name in meshes:
            raise CtwinError(f"two files in {d.name} give the structure name {name}")
        meshes[name] = prepare_mesh(read_mesh(p, name=name))
    if not meshes:
        raise CtwinError(f"{d} has no STL/OBJ/PLY mesh")
    if SKIN not in meshes:
        raise CtwinError(f"{d} has no skin mesh (skin.ply/.stl/.obj): mesh mode needs the body surface")
    if not any(n != SKIN_LABEL_KEY and is_skeletal(n) for n in meshes):
        raise CtwinError(f"{d} has no bone mesh (named by TotalSegmentator names, e.g. femur_left.ply): "
                         "a twin needs its skeleton")
    report(f"read {len(meshes)} meshes from {d}")
    return meshes


def label_ids(names) -> dict:
    """{mesh name: label id}: the body surface ``skin`` has none (0, the unlabelled remainder)."""
    known = name_to_id()
    nxt = max(known.values()) + 1
    out = {}
    for n in sorted(names):
        if n == SKIN:
            out[n] = 0
            continue
        ln = label_name(n)
        if ln in known:
            out[n] = known[ln]
        else:
            out[n], nxt = nxt, nxt + 1
    return out


# --------------------------------------------------------------------------------------------
# voxelisation
# --------------------------------------------------------------------------------------------
@nb.njit(cache=True)
def _add_segment(cov, m, za, zb, z0, h, nz, w):
    ka = int(math.floor((za - z0) / h))
    kb = int(math.floor((zb - z0) / h))
    if ka < 0:
        ka = 0
    if kb > nz - 1:
        kb = nz - 1
    for k in range(ka, kb + 1):
        lo = z0 + k * h
        a = za if za > lo else lo
        b = zb if zb < lo + h else lo + h
        if b > a:
            cov[k, m] += w * (b - a) / h


@nb.njit(cache=True, parallel=True)
def _voxelise(V, F, tstruct, start, items, x0, y0, z0, h, nx, ny, nz, s, struct_hu, struct_lab,
              nstruct, bg_hu, hu_out, lab_out, vol_rows):
    w = 1.0 / (s * s)
    for i in nb.prange(nx):
        loc = np.full(nstruct, -1, np.int64)
        for j in range(ny):
            c = i * ny + j
            a0 = start[c]
            a1 = start[c + 1]
            if a1 == a0:
                continue
            nt = a1 - a0
            locs = np.empty(nt, np.int64)
            nl = 0
            for q in range(a0, a1):
                k = tstruct[items[q]]
                if loc[k] < 0:
                    loc[k] = nl
                    locs[nl] = k
                    nl += 1
            cov = np.zeros((nz, nl))
            ez = np.empty(nt)
            ed = np.empty(nt, np.int64)
            es = np.empty(nt, np.int64)
            wind = np.zeros(nl, np.int64)
            for a in range(s):
                px = x0 + (i + (a + 0.5) / s) * h
                for b in range(s):
                    py = y0 + (j + (b + 0.5) / s) * h
                    ne = 0
                    for q in range(a0, a1):
                        t = items[q]
                        z, sign = vertical_crossing(V, F, t, px, py)
                        if sign == 0:
                            continue
                        ez[ne] = z
                        # an outward face seen from below (normal -z) is entered going up
                        ed[ne] = -sign
                        es[ne] = loc[tstruct[t]]
                        ne += 1
                    if ne == 0:
                        continue
                    order = np.argsort(ez[:ne])
                    wind[:] = 0
                    top = -1
                    zprev = 0.0
                    for e in range(ne):
                        o = order[e]
                        zc = ez[o]
                        if top >= 0 and zc > zprev:
                            _add_segment(cov, top, zprev, zc, z0, h, nz, w)
                        wind[es[o]] += ed[o]
                        top = -1
                        best = -1
                        for m in range(nl):
                            if wind[m] > 0 and locs[m] > best:
                                best = locs[m]
                                top = m
                        zprev = zc
            for m in range(nl):
                loc[locs[m]] = -1
            for k in range(nz):
                tot = 0.0
                acc = 0.0
                f0 = 0.0
                bestf = 0.0
                bestlab = 0
                for m in range(nl):
                    f = cov[k, m]
                    if f <= 0.0:
                        continue
                    st = locs[m]
                    tot += f
                    acc += f * struct_hu[st]
                    vol_rows[i, st] += f
                    lab = struct_lab[st]
                    if lab == 0:
                        f0 += f
                    elif f > bestf:
                        bestf = f
                        bestlab = lab
                out = 1.0 - tot
                if out < 0.0:
                    out = 0.0
                f0 += out
                hu_out[i, j, k] = acc + out * bg_hu
                lab_out[i, j, k] = bestlab if bestf > f0 else 0


@dataclass
class MeshVolume:
    """The synthetic CT of a mesh set (``voxelise_meshes``)."""

    ct: Volume                 # int16 HU
    labelmap: Volume           # uint16 label ids on the same grid
    names: dict                # label id -> label name (ids present in ``labelmap`` or owning volume)
    hu: np.ndarray             # float32 HU before rounding (same grid)
    volumes_mm3: dict          # mesh name -> voxelised volume it owns (after nesting), mm^3
    table: dict = field(default_factory=dict)   # hu_table(...) used
    seconds: float = 0.0


def grid_for(meshes: dict, spacing: float, margin_mm: float = 10.0):
    """(lo, shape) of an axis-aligned grid covering every mesh plus ``margin_mm``."""
    lo = np.min([m.vertices.min(0) for m in meshes.values()], axis=0) - margin_mm
    hi = np.max([m.vertices.max(0) for m in meshes.values()], axis=0) + margin_mm
    shape = np.maximum(np.ceil((hi - lo) / spacing - 1e-9).astype(np.int64), 1)
    return lo, tuple(int(n) for n in shape)


def voxelise_meshes(meshes: dict, table: dict | None = None, spacing: float = 3.0, *,
                    margin_mm: float = 10.0, subsamples: int = 4, box=None) -> MeshVolume:
    """Synthetic CT + labelmap of closed, outward-wound meshes ({name: Mesh}, LPS mm).

    ``table``: ``hu_table(...)`` of the meshes (default: the default table). ``box``: (lo, shape)
    of the grid (cell corner lo, mm; voxel counts), default ``grid_for(meshes, spacing,
    margin_mm)``. Voxels fill their cells: voxel (i, j, k) is centred at lo + (i + 0.5) spacing.
    """
    t0 = time.perf_counter()
    spacing = float(spacing)
    if not spacing > 0:
        raise CtwinError(f"voxel spacing must be positive, got {spacing}")
    if not meshes:
        raise CtwinError("no mesh to voxelise")
    table = table or hu_table(meshes)
    missing = [n for n in meshes if n not in table]
    if missing:
        raise CtwinError(f"no HU for {', '.join(missing[:5])}")
    # structures in priority order (index = priority: higher wins)
    order = sorted(meshes, key=lambda n: (table[n]["tier"], n))
    ids = label_ids(order)
    vs, fs, ts = [], [], []
    nv = 0
    for si, n in enumerate(order):
        m = meshes[n]
        vs.append(m.vertices)
        fs.append(m.faces + nv)
        ts.append(np.full(len(m.faces), si, np.int64))
        nv += len(m.vertices)
    V = np.ascontiguousarray(np.concatenate(vs), dtype=np.float64)
    F = np.ascontiguousarray(np.concatenate(fs), dtype=np.int64)
    T = np.ascontiguousarray(np.concatenate(ts))
    if box is None:
        lo, shape = grid_for(meshes, spacing, margin_mm)
    else:
        lo, shape = np.asarray(box[0], dtype=np.float64), tuple(int(n) for n in box[1])
    nx, ny, nz = shape
    start, items = _build_grid(V, F, float(lo[0]), float(lo[1]), spacing, nx, ny)
    struct_hu = np.array([table[n]["hu"] for n in order], dtype=np.float64)
    struct_lab = np.array([ids[n] for n in order], dtype=np.int64)
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint16)
    vol_rows = np.zeros((nx, len(order)))
    s = max(1, int(subsamples))
    _voxelise(V, F, T, start, items, float(lo[0]), float(lo[1]), float(lo[2]), spacing, nx, ny, nz, s,
              struct_hu, struct_lab, len(order), AIR_HU, hu, lab, vol_rows)
    aff = affine_from([spacing] * 3, lo + 0.5 * spacing)
    ct = Volume(np.clip(np.rint(hu), -32768, 32767).astype(np.int16), aff, {"source": "meshes"})
    labelmap = Volume(lab, aff.copy(), {"source": "meshes"})
    vol = vol_rows.sum(axis=0) * spacing ** 3
    volumes = {n: float(vol[i]) for i, n in enumerate(order)}
    present = set(int(i) for i in np.unique(lab)) - {0}
    names = {ids[n]: label_name(n) for n in order if ids[n] in present}
    dt = time.perf_counter() - t0
    report(f"voxelised {len(order)} meshes ({len(F)} triangles) onto {nx}x{ny}x{nz} voxels of "
           f"{spacing:g} mm in {dt:.1f} s")
    return MeshVolume(ct, labelmap, names, hu, volumes, table, dt)
