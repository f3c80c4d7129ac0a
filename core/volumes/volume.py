"""Volumes on a voxel grid placed in LPS patient space (SPEC section 2).

A ``Volume`` is an array indexed (i, j, k) plus a 4x4 ``affine`` that maps the index of a voxel
centre to LPS world millimetres. Voxels fill their whole cells: index space [-0.5, n - 0.5].
NIfTI stores RAS affines; the conversion happens here, on reading and writing, and the voxel data
stay in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import CtwinError
from ..fileio import atomic_path
# Imported where used, so that importing this module stays light: nibabel (heavy or optional third-party packages).

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def apply_transform(t, points) -> np.ndarray:
    """Apply a 4x4 transform to points (N, 3)."""
    t = np.asarray(t, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ t[:3, :3].T + t[:3, 3]


def invert_affine(m) -> np.ndarray:
    """Inverse of a 4x4 affine transform (last row 0, 0, 0, 1), or of a stack (..., 4, 4), in closed
    form (cofactors). Per-frame code uses this instead of ``np.linalg.inv``: LAPACK through numpy's
    OpenBLAS wakes its thread pool, which collides with numba's OpenMP workers still spinning after a
    parallel kernel; measured on the 2-core machine right after a render, often 4-12 ms for one 4x4
    ``inv`` or ``solve`` (12-29 ms for a stack of 80) against 0.01-0.1 ms otherwise."""
    m = np.asarray(m, dtype=np.float64)
    a = m[..., :3, :3]
    c0 = np.cross(a[..., 1, :], a[..., 2, :])
    c1 = np.cross(a[..., 2, :], a[..., 0, :])
    c2 = np.cross(a[..., 0, :], a[..., 1, :])
    det = np.sum(a[..., 0, :] * c0, axis=-1)
    if np.any(det == 0):
        raise CtwinError("a transform is singular (it cannot be inverted)")
    out = np.zeros(m.shape)
    out[..., :3, :3] = np.stack([c0, c1, c2], axis=-1) / det[..., None, None]
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", out[..., :3, :3], m[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


@dataclass
class Volume:
    data: np.ndarray
    affine: np.ndarray  # index (i, j, k, 1) -> LPS mm
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise CtwinError(f"volume affine must be 4x4, got {self.affine.shape}")
        if self.data.ndim != 3:
            raise CtwinError(f"volume must be 3-D, got shape {self.data.shape}")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise CtwinError("volume affine is singular")

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """Unit world directions of the i, j, k axes (columns)."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """World position of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    def index_to_world(self, ijk) -> np.ndarray:
        return apply_transform(self.affine, ijk)

    def world_to_index(self, xyz) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        return apply_transform(inv, xyz)

    def corners_world(self) -> np.ndarray:
        """The 8 corners of the volume's cell box [-0.5, n - 0.5]^3, in world mm."""
        n = np.asarray(self.shape, dtype=np.float64)
        c = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
        return self.index_to_world(c * n - 0.5)

    def bbox_world(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world bounding box (min, max) of the cell box."""
        c = self.corners_world()
        return c.min(axis=0), c.max(axis=0)

    def center_world(self) -> np.ndarray:
        lo, hi = self.bbox_world()
        return 0.5 * (lo + hi)

    def voxel_centers_world(self, mask: np.ndarray | None = None) -> np.ndarray:
        """World positions of all voxel centres (or those where ``mask`` is true), (N, 3)."""
        idx = np.argwhere(mask) if mask is not None else np.indices(self.shape).reshape(3, -1).T
        return self.index_to_world(idx)

    def with_data(self, data: np.ndarray, **meta) -> "Volume":
        return Volume(data, self.affine.copy(), {**self.meta, **meta})


def affine_from(spacing, origin, direction=None) -> np.ndarray:
    """Build an index->LPS affine from spacing (3,), origin (3,) and a 3x3 direction matrix."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    a = np.eye(4)
    a[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    a[:3, 3] = origin
    return a


def load_nifti(path) -> Volume:
    """Read a NIfTI file into a Volume with an LPS affine (data untouched)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise CtwinError(f"file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise CtwinError(f"cannot read NIfTI {path.name}: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CtwinError(f"{path.name}: expected a 3-D volume, got shape {data.shape}")
    return Volume(np.ascontiguousarray(data), RAS_TO_LPS @ img.affine, {"source": str(path)})


def save_nifti(vol: Volume, path, dtype=None) -> None:
    """Write a Volume as NIfTI (RAS affine on disk), atomically."""
    import nibabel as nib

    data = vol.data if dtype is None else vol.data.astype(dtype)
    img = nib.Nifti1Image(data, RAS_TO_LPS @ vol.affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def resample_onto(src: Volume, ref: Volume, order: int = 0, cval: float = 0.0) -> np.ndarray:
    """Sample ``src`` at the voxel centres of ``ref`` by world coordinates.

    ``order`` 0 is nearest neighbour (labels), 1 trilinear. Points outside ``src`` get ``cval``.
    """
    m = np.linalg.inv(src.affine) @ ref.affine  # ref index -> src index
    out = ndimage.affine_transform(
        src.data, m[:3, :3], offset=m[:3, 3], output_shape=ref.shape, order=order,
        mode="constant", cval=cval, prefilter=False,
        output=src.data.dtype if order == 0 else np.float32,
    )
    return out


def overlap_fraction(a: Volume, b: Volume) -> float:
    """Fraction of ``a``'s world bounding box volume that ``b``'s bounding box covers."""
    alo, ahi = a.bbox_world()
    blo, bhi = b.bbox_world()
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None)
    return float(np.prod(inter) / max(np.prod(ahi - alo), 1e-12))
