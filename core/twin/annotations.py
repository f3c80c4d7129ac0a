"""Per-frame annotations for machine-learning datasets: projected label masks (one channel per
structure) and the 2D projections of the joints and of named landmarks.

Masks are the silhouettes of the posed closed meshes on the detector: every triangle is projected
with the frame's 3x4 projection and rasterised (pixel centres inside the projected triangle), so a
mask pixel is set exactly where the pixel's ray crosses the structure. Written next to the DRR:
``NAME_labels.npz`` (``masks`` (S, H, W) uint8, ``names``) and ``NAME_points.json``.
"""
from __future__ import annotations

import numpy as np
from pathlib import Path

from ..fileio import atomic_path, write_json, read_json
from ..body.skeleton import JOINT_NAMES

_RASTER = None


def _raster_kernel():
    global _RASTER
    if _RASTER is None:
        import numba

        @numba.njit(cache=True)
        def raster(px, faces, out):
            h, w = out.shape
            for t in range(faces.shape[0]):
                a, b, c = faces[t, 0], faces[t, 1], faces[t, 2]
                x0, y0 = px[a, 0], px[a, 1]
                x1, y1 = px[b, 0], px[b, 1]
                x2, y2 = px[c, 0], px[c, 1]
                if not (np.isfinite(x0) and np.isfinite(x1) and np.isfinite(x2)):
                    continue
                area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
                if abs(area) < 1e-12:
                    continue
                c0 = max(int(np.ceil(min(x0, x1, x2))), 0)
                c1 = min(int(np.floor(max(x0, x1, x2))), w - 1)
                r0 = max(int(np.ceil(min(y0, y1, y2))), 0)
                r1 = min(int(np.floor(max(y0, y1, y2))), h - 1)
                for r in range(r0, r1 + 1):
                    for col in range(c0, c1 + 1):
                        w0 = ((x1 - col) * (y2 - r) - (x2 - col) * (y1 - r)) / area
                        w1 = ((x2 - col) * (y0 - r) - (x0 - col) * (y2 - r)) / area
                        w2 = 1.0 - w0 - w1
                        if w0 >= 0.0 and w1 >= 0.0 and w2 >= 0.0:
                            out[r, col] = 1

        _RASTER = raster
    return _RASTER


def project_points(geometry, points) -> np.ndarray:
    """World mm (N, 3) -> detector (col, row) (N, 2); points behind the source give NaN."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    h = np.c_[pts, np.ones(len(pts))] @ geometry.projection_matrix().T
    with np.errstate(divide="ignore", invalid="ignore"):
        out = h[:, :2] / h[:, 2:3]
    out[h[:, 2] <= 1e-9] = np.nan
    return out


def mesh_mask(geometry, mesh) -> np.ndarray:
    """Silhouette of a closed mesh on the detector, uint8 (H, W)."""
    out = np.zeros((geometry.height, geometry.width), np.uint8)
    if len(mesh.faces) == 0:
        return out
    px = project_points(geometry, mesh.vertices)
    _raster_kernel()(np.ascontiguousarray(px), np.ascontiguousarray(mesh.faces, dtype=np.int64), out)
    return out


def label_masks(geometry, meshes: dict) -> tuple[np.ndarray, list]:
    """(masks (S, H, W) uint8, names) for the given {name: Mesh} (posed, world mm)."""
    names = sorted(meshes)
    masks = np.zeros((len(names), geometry.height, geometry.width), np.uint8)
    for i, n in enumerate(names):
        masks[i] = mesh_mask(geometry, meshes[n])
    return masks, names


def frame_points(geometry, joints_mm, landmarks_mm: dict) -> dict:
    """2D projections (col, row) of the joints and landmarks, with their world positions."""
    j2 = project_points(geometry, joints_mm)
    out = {"joints": {n: {"px": j2[i].tolist(), "world_mm": np.asarray(joints_mm[i]).tolist()}
                      for i, n in enumerate(JOINT_NAMES)}, "landmarks": {}}
    for name, p in landmarks_mm.items():
        p = np.asarray(p, dtype=np.float64).reshape(3)
        out["landmarks"][name] = {"px": project_points(geometry, p[None])[0].tolist(), "world_mm": p.tolist()}
    return out


def write_annotations(stem, geometry, posed_meshes: dict, joints_mm, landmarks_mm: dict) -> None:
    """Write ``<stem>_labels.npz`` and ``<stem>_points.json`` atomically."""
    stem = Path(stem)
    masks, names = label_masks(geometry, posed_meshes)
    with atomic_path(stem.parent / f"{stem.name}_labels.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, masks=masks, names=np.array(names))
    write_json(stem.parent / f"{stem.name}_points.json", frame_points(geometry, joints_mm, landmarks_mm))


def twin_landmarks(twin, pose, transl_mm=None) -> dict:
    """Named landmarks of a posed twin: femoral head centres (moved with the femur) and vertebral
    body centres (each vertebra's centroid, moved with its bone)."""
    moved = twin.bone_transforms(pose, transl_mm)
    meshes = twin.meshes(include_skin=False)
    out = {}
    fit_json = twin.path / "fit.json"
    lms = {}
    if fit_json.is_file():
        lms = read_json(fit_json).get("landmarks_mm", {})
    for side in ("left", "right"):
        # the fit's hip landmark is the femoral head centre (sphere fit on the femur label)
        p = lms.get(f"{side}_hip")
        if p is not None and f"femur_{side}" in moved:
            T = moved[f"femur_{side}"]
            p = np.asarray(p, dtype=np.float64).reshape(3)
            out[f"femoral_head_{side}"] = T[:3, :3] @ p + T[:3, 3]
    for name, mesh in meshes.items():
        if name.startswith("vertebrae_") and name in moved and len(mesh.vertices):
            T = moved[name]
            c = np.asarray(mesh.vertices, dtype=np.float64).mean(axis=0)
            out[f"{name}_center"] = T[:3, :3] @ c + T[:3, 3]
    return out
