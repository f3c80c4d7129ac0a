"""X-ray (C-arm) geometry: explicit source/detector geometry, named views, sidecar JSON (SPEC 4-5).

A ``Geometry`` is fully explicit: the source position, the detector centre, the detector's unit
axes ``u`` (increasing column) and ``v`` (increasing row), the pixel spacing (du, dv) and the size
(W, H) in pixels. The centre of pixel (row r, column c) is, exactly as SPEC 4 says::

    detector_center + (c - (W - 1) / 2) du u + (r - (H - 1) / 2) dv v      (world LPS mm)

Cone beam: the ray of a pixel runs from the source to that pixel centre. Parallel beam: every ray
has the direction ``ray_direction`` (the unit vector from the source towards the detector centre)
and runs from the plane through the source (perpendicular to that direction) to the pixel centre.

Named views follow the "as seen from the source" convention (what a Blender camera placed at the
source sees): ``u x v`` points from the source towards the detector, the image's up (-v) is the
patient's superior direction where that makes sense. So AP shows the patient's left on the image's
right, PA is its mirror image (the usual radiology display flips PA images horizontally), the left
lateral (detector on the patient's left) shows anterior on the right.

C-arm obliques use the angiography convention for the *detector* position, starting from the
C-arm's zero position (detector anterior, source posterior, a PA beam): LAO (positive) swings the
detector towards the patient's left, RAO towards the right, cranial tilts it towards the head,
caudal towards the feet. LAO 90 equals the left lateral view.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import CtwinError

SIDECAR_KEYS = ("source_mm", "detector_center_mm", "detector_u", "detector_v", "pixel_spacing_mm",
                "size_px", "projection", "sid_mm", "frame", "value", "device")


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(3)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n < 1e-12:
        raise CtwinError(f"geometry vector has zero length: {v.tolist()}")
    return v / n


# The default C-arm (SPEC 5): source-to-isocentre 1000 mm, source-to-image 1500 mm. A geometry that
# does not say where its isocentre is (a camera, an old sidecar) takes the SAD SID / SID_PER_SAD.
DEFAULT_SAD_MM = 1000.0
DEFAULT_SID_MM = 1500.0
SID_PER_SAD = DEFAULT_SID_MM / DEFAULT_SAD_MM


@dataclass
class Geometry:
    source_mm: np.ndarray
    detector_center_mm: np.ndarray
    detector_u: np.ndarray
    detector_v: np.ndarray
    pixel_spacing_mm: tuple = (1.0, 1.0)
    size_px: tuple = (512, 512)
    parallel: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.source_mm = np.asarray(self.source_mm, dtype=np.float64).reshape(3)
        self.detector_center_mm = np.asarray(self.detector_center_mm, dtype=np.float64).reshape(3)
        self.detector_u = _unit(self.detector_u)
        self.detector_v = _unit(self.detector_v)
        if abs(float(self.detector_u @ self.detector_v)) > 1e-6:
            raise CtwinError("detector_u and detector_v must be orthogonal")
        du, dv = (float(x) for x in self.pixel_spacing_mm)
        if not (du > 0 and dv > 0):
            raise CtwinError(f"pixel spacing must be positive, got {du}, {dv}")
        self.pixel_spacing_mm = (du, dv)
        w, h = (int(x) for x in self.size_px)
        if w < 1 or h < 1:
            raise CtwinError(f"detector size must be at least 1x1 pixels, got {w}x{h}")
        self.size_px = (w, h)
        self.parallel = bool(self.parallel)
        if np.linalg.norm(self.detector_center_mm - self.source_mm) < 1e-9:
            raise CtwinError("source and detector centre coincide")

    # --- derived quantities -------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.size_px[0]

    @property
    def height(self) -> int:
        return self.size_px[1]

    @property
    def normal(self) -> np.ndarray:
        """Unit detector normal u x v."""
        return np.cross(self.detector_u, self.detector_v)

    @property
    def ray_direction(self) -> np.ndarray:
        """Unit vector from the source towards the detector centre (the parallel-beam direction)."""
        return _unit(self.detector_center_mm - self.source_mm)

    @property
    def sid_mm(self) -> float:
        """Source-to-image distance: distance from the source to the detector plane."""
        return float(abs(self.normal @ (self.detector_center_mm - self.source_mm)))

    @property
    def detector_size_mm(self) -> tuple:
        return (self.size_px[0] * self.pixel_spacing_mm[0], self.size_px[1] * self.pixel_spacing_mm[1])

    def pixel_centers(self) -> np.ndarray:
        """World positions of all pixel centres, (H, W, 3)."""
        w, h = self.size_px
        du, dv = self.pixel_spacing_mm
        c = (np.arange(w) - (w - 1) / 2.0) * du
        r = (np.arange(h) - (h - 1) / 2.0) * dv
        return (self.detector_center_mm[None, None, :] + c[None, :, None] * self.detector_u
                + r[:, None, None] * self.detector_v)

    def rays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(origins (H, W, 3), unit directions (H, W, 3), lengths (H, W)) of all pixel rays."""
        pix = self.pixel_centers()
        if self.parallel:
            d = self.ray_direction
            length = (pix - self.source_mm) @ d
            dirs = np.broadcast_to(d, pix.shape).copy()
            return pix - length[..., None] * d, dirs, length
        vec = pix - self.source_mm
        length = np.linalg.norm(vec, axis=-1)
        return np.broadcast_to(self.source_mm, pix.shape).copy(), vec / length[..., None], length

    def packed(self) -> np.ndarray:
        """Float64 parameter vector consumed by the kernels (see core/drr/kernels.py pixel_ray)."""
        g = np.zeros(20, dtype=np.float64)
        g[0:3] = self.source_mm
        g[3:6] = self.detector_center_mm
        g[6:9] = self.detector_u
        g[9:12] = self.detector_v
        g[12:14] = self.pixel_spacing_mm
        g[14:16] = self.size_px
        g[16] = 1.0 if self.parallel else 0.0
        g[17:20] = self.ray_direction
        return g

    def projection_matrix(self) -> np.ndarray:
        """3x4 matrix: world mm (homogeneous) -> homogeneous pixel (col, row, w)."""
        S, C = self.source_mm, self.detector_center_mm
        u, v, n = self.detector_u, self.detector_v, self.normal
        du, dv = self.pixel_spacing_mm
        cx, cy = (self.size_px[0] - 1) / 2.0, (self.size_px[1] - 1) / 2.0
        P = np.zeros((3, 4))
        if not self.parallel:
            h = float(n @ (C - S))
            wrow = np.append(n, -n @ S)
            urow = np.append(u, -u @ S)
            vrow = np.append(v, -v @ S)
            P[0] = (cx + u @ (S - C) / du) * wrow + (h / du) * urow
            P[1] = (cy + v @ (S - C) / dv) * wrow + (h / dv) * vrow
            P[2] = wrow
        else:
            d = self.ray_direction
            nd = float(n @ d)
            # Q = X + t d on the detector plane: t = n.(C - X) / n.d
            for row, (ax, sp, c0) in enumerate(((u, du, cx), (v, dv, cy))):
                lin = ax - (ax @ d) / nd * n
                const = -(ax @ C) + (ax @ d) * (n @ C) / nd
                P[row, :3] = lin / sp
                P[row, 3] = const / sp + c0
            P[2, 3] = 1.0
        return P

    def project(self, xyz) -> np.ndarray:
        """World points (N, 3) -> pixel coordinates (N, 2) as (col, row)."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        h = np.c_[xyz, np.ones(len(xyz))] @ self.projection_matrix().T
        return h[:, :2] / h[:, 2:3]

    @property
    def sad_mm(self) -> float:
        """Source to isocentre (the body's mid-plane) in mm: ``extra["sad_mm"]`` (named views, a render
        sidecar's, the render engine's setting), else SID / ``SID_PER_SAD``. It sets the focal spot's
        magnification and the scatter's air gap (``core.drr.xray``)."""
        sad = self.extra.get("sad_mm")
        return float(self.sid_mm / SID_PER_SAD if sad is None else sad)

    @property
    def magnification(self) -> float:
        """How much larger a structure at the isocentre appears on the detector: SID / SAD (1 for a
        parallel beam)."""
        return 1.0 if self.parallel else self.sid_mm / self.sad_mm

    def with_sad(self, sad_mm: float) -> "Geometry":
        """The same geometry (the same arrays, not re-normalised) with the source-to-isocentre distance
        ``sad_mm``, which a cone beam needs within (0, SID)."""
        sad = float(sad_mm)
        if not (math.isfinite(sad) and sad > 0) or (not self.parallel and sad >= self.sid_mm):
            raise CtwinError(f"the source-to-isocentre distance ({sad:g} mm) must be positive and, in a cone "
                             f"beam, smaller than the SID ({self.sid_mm:g} mm): the detector lies beyond the isocentre")
        g = copy.copy(self)
        g.extra = {**self.extra, "sad_mm": sad}
        return g

    # --- sidecar ----------------------------------------------------------------------------------
    def to_sidecar(self, frame=0, value="line_integral", device="cpu", **extra) -> dict:
        d = {
            "source_mm": self.source_mm.tolist(),
            "detector_center_mm": self.detector_center_mm.tolist(),
            "detector_u": self.detector_u.tolist(),
            "detector_v": self.detector_v.tolist(),
            "pixel_spacing_mm": list(self.pixel_spacing_mm),
            "size_px": list(self.size_px),
            "projection": self.projection_matrix().tolist(),
            "sid_mm": self.sid_mm,
            "frame": int(frame),
            "value": str(value),
            "device": str(device),
            "parallel": self.parallel,
        }
        for k, v in self.extra.items():
            d.setdefault(k, v)
        d.update(extra)
        return d

    @classmethod
    def from_sidecar(cls, d: dict) -> "Geometry":
        try:
            return cls(
                source_mm=d["source_mm"], detector_center_mm=d["detector_center_mm"],
                detector_u=d["detector_u"], detector_v=d["detector_v"],
                pixel_spacing_mm=tuple(d["pixel_spacing_mm"]), size_px=tuple(d["size_px"]),
                parallel=bool(d.get("parallel", False)),
            )
        except KeyError as exc:
            raise CtwinError(f"geometry JSON lacks the key {exc.args[0]!r}") from None

    def with_size(self, width: int, height: int | None = None) -> "Geometry":
        """Same detector area sampled with another number of pixels."""
        height = width if height is None else height
        wmm, hmm = self.detector_size_mm
        return Geometry(self.source_mm, self.detector_center_mm, self.detector_u, self.detector_v,
                        (wmm / width, hmm / height), (width, height), self.parallel, dict(self.extra))

    def transformed(self, T: np.ndarray) -> "Geometry":
        """The geometry moved by a rigid 4x4 world transform."""
        T = np.asarray(T, dtype=np.float64)
        R, t = T[:3, :3], T[:3, 3]
        return Geometry(R @ self.source_mm + t, R @ self.detector_center_mm + t, R @ self.detector_u,
                        R @ self.detector_v, self.pixel_spacing_mm, self.size_px, self.parallel,
                        dict(self.extra))


# --- named views -------------------------------------------------------------------------------
# (direction from isocentre to the detector, detector u, detector v) in LPS.
_BASE_VIEWS = {
    "ap": ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "pa": ((0.0, -1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "lat_left": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),
    "lat_right": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
_ALIASES = {"lateral": "lat_left", "lat": "lat_left", "ll": "lat_left", "rl": "lat_right",
            "left_lateral": "lat_left", "right_lateral": "lat_right", "carm": "pa"}
VIEW_NAMES = ("ap", "pa", "lat_left", "lat_right", "lateral")


def _rot(axis: str, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(axis)


def parse_view(name: str) -> tuple[str, float, float]:
    """'ap' | 'lat_left' | 'lao30' | 'rao20_cran15' | 'lao45_caud10' -> (base, lao_deg, cranial_deg)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in _BASE_VIEWS:
        return key, 0.0, 0.0
    m = re.fullmatch(r"(?:(lao|rao)(\d+(?:\.\d+)?))?_?(?:(cran|cranial|caud|caudal)(\d+(?:\.\d+)?))?", key)
    if not m or not (m.group(1) or m.group(3)):
        raise CtwinError(f"unknown view {name!r}; use one of {', '.join(VIEW_NAMES)} or e.g. "
                         "lao30, rao20_cran15, caud10")
    lao = float(m.group(2) or 0.0) * (-1.0 if m.group(1) == "rao" else 1.0)
    cran = float(m.group(4) or 0.0) * (-1.0 if (m.group(3) or "").startswith("caud") else 1.0)
    return "pa", lao, cran


def _bbox_of(volume_or_bbox) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(volume_or_bbox, "bbox_world"):
        lo, hi = volume_or_bbox.bbox_world()
    else:
        lo, hi = volume_or_bbox
    return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


def _corners(lo, hi) -> np.ndarray:
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def named_view(name: str, volume_or_bbox, sad_mm: float = DEFAULT_SAD_MM, sid_mm: float = DEFAULT_SID_MM,
               size=512, pixel_spacing_mm: float | None = None, *, lao: float = 0.0, rao: float = 0.0,
               cranial: float = 0.0, caudal: float = 0.0, isocenter=None, parallel: bool = False,
               margin: float = 1.0) -> Geometry:
    """A named view of a volume (or a (min, max) world bounding box).

    The isocentre defaults to the centre of the bounding box; the source sits ``sad_mm`` from it and
    the detector ``sid_mm`` from the source. ``size`` is W or (W, H). With no ``pixel_spacing_mm``
    the detector is the smallest one with square pixels onto which the whole bounding box projects
    (times ``margin``). Angles (degrees) rotate the C-arm about the isocentre (see module docstring);
    they add to those in the name ('lao30_cran10').
    """
    base, lao0, cran0 = parse_view(name)
    lao_t = lao0 + float(lao) - float(rao)
    cran_t = cran0 + float(cranial) - float(caudal)
    lo, hi = _bbox_of(volume_or_bbox)
    iso = 0.5 * (lo + hi) if isocenter is None else np.asarray(isocenter, dtype=np.float64)
    if sid_mm <= sad_mm and not parallel:
        raise CtwinError(f"SID ({sid_mm} mm) must exceed SAD ({sad_mm} mm)")
    d0, u0, v0 = (np.array(x) for x in _BASE_VIEWS[base])
    R = _rot("z", lao_t) @ _rot("x", -cran_t)
    d, u, v = R @ d0, R @ u0, R @ v0
    src = iso - sad_mm * d
    det = src + sid_mm * d
    w, h = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    g = Geometry(src, det, u, v, (1.0, 1.0), (w, h), parallel,
                 extra={"view": name, "sad_mm": float(sad_mm), "isocenter_mm": iso.tolist(),
                        "lao_deg": lao_t, "cranial_deg": cran_t})
    if pixel_spacing_mm is None:
        pts = _corners(lo, hi)
        if not parallel:
            depth = (pts - src) @ d
            if np.any(depth <= 1e-6):
                raise CtwinError("the volume reaches behind the X-ray source; increase the SAD")
        # With 1 mm pixels, offsets from the detector centre in pixels equal mm on the detector.
        cr = g.project(pts)
        ext_u = np.max(np.abs(cr[:, 0] - (w - 1) / 2.0))
        ext_v = np.max(np.abs(cr[:, 1] - (h - 1) / 2.0))
        sp = max(2.0 * ext_u / w, 2.0 * ext_v / h) * float(margin) * (1 + 1e-9)
        g = Geometry(src, det, u, v, (sp, sp), (w, h), parallel, g.extra)
    else:
        g = Geometry(src, det, u, v, (float(pixel_spacing_mm),) * 2, (w, h), parallel, g.extra)
    return g


def default_views(volume_or_bbox, size=512, **kw) -> dict:
    """SPEC 5 metric views: {'ap': Geometry, 'lateral': Geometry} (SAD 1000, SID 1500, 512^2)."""
    return {"ap": named_view("ap", volume_or_bbox, size=size, **kw),
            "lateral": named_view("lat_left", volume_or_bbox, size=size, **kw)}


def biplanar(volume_or_bbox, size=512, **kw) -> tuple[Geometry, Geometry]:
    """The AP + left-lateral pair sharing one isocentre (training-data setting for X-ray-to-3D)."""
    v = default_views(volume_or_bbox, size=size, **kw)
    return v["ap"], v["lateral"]
