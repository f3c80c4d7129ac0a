"""Segmentation readers, resolved onto the CT grid by world coordinates (SPEC section 2).

``load_segmentation(path, ct) -> (labelmap, names)``:

- ``path`` is a multi-label NIfTI (ids are TotalSegmentator v2 ``total`` ids, or ids named by a
  ``labels.json`` sidecar beside the file: ``labels.json`` or ``<stem>.json``, id -> name), or a
  folder of ``<name>.nii.gz`` binary masks (TotalSegmentator's default output). Mask names take
  their id from ``core.volumes.labels.name_to_id()`` where the name is known, else new ids above every
  known id.
- The labels are resampled (nearest neighbour) onto the CT's voxel centres through both grids'
  world affines, so grids with other orientations, spacings or extents are handled.
- ``labelmap`` is a uint16 Volume on the CT grid; ``names`` maps id -> name for the ids present.

Bad input, one-line ``CtwinError``: no world overlap with the CT, no labelled voxel inside the CT,
ids without a name (not TotalSegmentator ids and no sidecar), non-integer or negative label
values, corrupt files. Empty labels (a mask file with no voxel, or a label lying wholly outside
the CT) are not errors: TotalSegmentator writes a mask for every class, most of them empty; they
are reported through ``core.progress`` and left out of ``names``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import labels as _labels
from .ct import is_nifti, read_volume
from ..errors import CtwinError
from ..progress import report
from .volume import Volume, overlap_fraction, resample_onto


def _strip_nifti(name: str) -> str:
    low = name.lower()
    for suf in (".nii.gz", ".nii"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def _find_sidecar(path: Path) -> Path | None:
    for cand in (path.parent / f"{_strip_nifti(path.name)}.json", path.parent / "labels.json"):
        if cand.is_file():
            return cand
    return None


def read_sidecar(path: Path) -> dict[int, str]:
    """Read an id -> name JSON sidecar (also accepts name -> id)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise CtwinError(f"cannot read label sidecar {path.name}: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not raw:
        raise CtwinError(f"label sidecar {path.name} must be a JSON object id -> name")
    out: dict[int, str] = {}
    try:
        for k, v in raw.items():
            if isinstance(v, str):
                out[int(k)] = v
            else:  # name -> id
                out[int(v)] = str(k)
    except (TypeError, ValueError):
        raise CtwinError(f"label sidecar {path.name} must map integer ids to names") from None
    return out


def _as_labels(data: np.ndarray, name: str) -> np.ndarray:
    """Integer label array (uint16) from whatever dtype the file had."""
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise CtwinError(f"segmentation {name} contains NaN or infinite values")
        r = np.rint(data)
        if np.any(np.abs(r - data) > 1e-3):
            raise CtwinError(f"segmentation {name} has non-integer values; it is not a label map")
        data = r
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        raise CtwinError(f"segmentation {name} has non-numeric voxels ({data.dtype})")
    if data.size and data.min() < 0:
        raise CtwinError(f"segmentation {name} has negative label values")
    if data.size and data.max() > 65535:
        raise CtwinError(f"segmentation {name} has label ids above 65535")
    return data.astype(np.uint16, copy=False)


def _resolve(seg: Volume, ct: Volume, name: str) -> np.ndarray:
    """Nearest-neighbour sample of ``seg`` at the CT's voxel centres, checking overlap."""
    if overlap_fraction(ct, seg) <= 0.0:
        clo, chi = ct.bbox_world()
        slo, shi = seg.bbox_world()
        raise CtwinError(
            f"segmentation {name} does not overlap the CT in world space (CT box "
            f"{np.round(clo).tolist()}..{np.round(chi).tolist()} mm, segmentation box "
            f"{np.round(slo).tolist()}..{np.round(shi).tolist()} mm)")
    if seg.shape == ct.shape and np.allclose(seg.affine, ct.affine, atol=1e-4):
        return np.ascontiguousarray(seg.data)
    return resample_onto(seg, ct, order=0, cval=0)


def _finish(lab: np.ndarray, ct: Volume, names: dict[int, str], source: str,
            src_counts: dict[int, int]) -> tuple[Volume, dict[int, str]]:
    counts = np.bincount(lab.reshape(-1), minlength=int(max(names, default=0)) + 1)
    if counts[1:].sum() == 0:
        raise CtwinError(f"segmentation {Path(source).name}: no labelled voxel falls inside the CT")
    present: dict[int, str] = {}
    outside = []
    for i in sorted(names):
        if i < counts.size and counts[i] > 0:
            present[i] = names[i]
        elif src_counts.get(i, 0) > 0:
            outside.append(names[i])
    if outside:
        report(f"warning: {len(outside)} label(s) lie wholly outside the CT and are left out: "
               + ", ".join(outside[:8]) + (" ..." if len(outside) > 8 else ""))
    vol = Volume(lab.astype(np.uint16, copy=False), ct.affine.copy(),
                 {"source": str(source), "names": present, "outside_labels": outside})
    report(f"segmentation {Path(source).name}: {len(present)} labels on the CT grid")
    return vol, present


def _load_multilabel(path: Path, ct: Volume) -> tuple[Volume, dict[int, str]]:
    seg = read_volume(path)
    data = _as_labels(seg.data, path.name)
    seg = Volume(data, seg.affine, seg.meta)
    ids, cnt = np.unique(data, return_counts=True)
    src_counts = {int(i): int(c) for i, c in zip(ids, cnt) if i != 0}
    if not src_counts:
        raise CtwinError(f"segmentation {path.name} is empty (every voxel is 0)")
    sidecar = _find_sidecar(path)
    if sidecar is not None:
        table = read_sidecar(sidecar)
        origin = f"sidecar {sidecar.name}"
    else:
        table = _labels.totalseg_names()
        origin = "TotalSegmentator v2 'total' ids (no labels.json beside it)"
    unknown = sorted(i for i in src_counts if i not in table)
    if unknown:
        shown = ", ".join(str(i) for i in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise CtwinError(f"segmentation {path.name} has label ids without a name ({shown}); "
                         f"names come from {origin}")
    empty = [table[i] for i in table if i not in src_counts]
    if sidecar is not None and empty:
        report(f"warning: {len(empty)} label(s) named in {sidecar.name} have no voxels: "
               + ", ".join(empty[:8]) + (" ..." if len(empty) > 8 else ""))
    names = {i: table[i] for i in src_counts}
    lab = _resolve(seg, ct, path.name)
    return _finish(lab, ct, names, str(path), src_counts)


def _load_mask_folder(folder: Path, ct: Volume) -> tuple[Volume, dict[int, str]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))
    if not files:
        raise CtwinError(f"segmentation folder {folder} holds no .nii/.nii.gz masks")
    known = _labels.name_to_id()
    next_id = max(_labels.all_names()) + 1
    names: dict[int, str] = {}
    src_counts: dict[int, int] = {}
    empty = []
    lab = np.zeros(ct.shape, dtype=np.uint16)
    overlaps = 0
    any_overlap = False
    for n, f in enumerate(files):
        name = _strip_nifti(f.name)
        mask = read_volume(f)
        m = _as_labels(mask.data, f.name) > 0
        if not m.any():
            empty.append(name)
            continue
        if name in known:
            lid = known[name]
        else:
            lid = next_id
            next_id += 1
        names[lid] = name
        src_counts[lid] = int(m.sum())
        mv = Volume(m.astype(np.uint8), mask.affine)
        if overlap_fraction(ct, mv) > 0:
            any_overlap = True
            r = _resolve(mv, ct, f.name) > 0
            overlaps += int(np.count_nonzero(r & (lab > 0)))
            lab[r] = lid
        report(f"mask {f.name}", (n + 1) / len(files))
    if empty:
        report(f"warning: {len(empty)} empty mask(s) left out: "
               + ", ".join(empty[:8]) + (" ..." if len(empty) > 8 else ""))
    if not names:
        raise CtwinError(f"segmentation folder {folder.name}: every mask is empty")
    if not any_overlap:
        raise CtwinError(f"segmentation folder {folder.name} does not overlap the CT in world space")
    if overlaps:
        report(f"warning: masks overlap in {overlaps} voxels; the later file (by name) wins there")
    new = {i: n for i, n in names.items() if i not in _labels.all_names()}
    if new:
        report(f"note: {len(new)} mask name(s) not in the label table got new ids: "
               + ", ".join(f"{n}={i}" for i, n in list(new.items())[:8]))
    return _finish(lab, ct, names, str(folder), src_counts)


def load_segmentation(path, ct: Volume) -> tuple[Volume, dict[int, str]]:
    """Read a segmentation and resolve it onto ``ct``'s grid: (uint16 labelmap, id -> name)."""
    path = Path(path)
    if not path.exists():
        raise CtwinError(f"segmentation not found: {path}")
    if path.is_dir():
        return _load_mask_folder(path, ct)
    return _load_multilabel(path, ct)


def label_hu_stats(ct: Volume, labelmap: Volume, names: dict[int, str]) -> dict[str, dict]:
    """Per-label HU statistics on the CT: voxels, volume_cm3, mean, std, p5, p50, p95."""
    if ct.shape != labelmap.shape:
        raise CtwinError("label statistics need the labelmap on the CT grid")
    lab = labelmap.data.reshape(-1)
    hu = ct.data.reshape(-1)
    nz = np.flatnonzero(lab)
    order = nz[np.lexsort((hu[nz], lab[nz]))]  # by label, then HU
    sl = lab[order]
    shu = hu[order].astype(np.float64)
    bounds = np.searchsorted(sl, np.arange(int(sl.max(initial=0)) + 2))
    vox_cm3 = float(np.prod(ct.spacing)) / 1000.0
    out = {}
    for i, name in names.items():
        if i + 1 >= bounds.size:
            continue
        a, b = bounds[i], bounds[i + 1]
        if b <= a:
            continue
        v = shu[a:b]
        out[name] = {
            "id": int(i), "voxels": int(b - a), "volume_cm3": (b - a) * vox_cm3,
            "mean": float(v.mean()), "std": float(v.std()),
            "p5": float(np.percentile(v, 5)), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)),
        }
    return out
