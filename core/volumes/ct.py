"""CT readers: NIfTI, NRRD/MHA (and any single file SimpleITK reads), DICOM series folders.

``load_ct(path) -> Volume`` returns int16 Hounsfield units on an index -> LPS mm affine (SPEC
section 2). NIfTI goes through nibabel (``core.volumes.volume.load_nifti`` converts its RAS affine);
NRRD/MHA/DICOM go through SimpleITK, whose physical space is LPS already, so the affine is built
from its origin, spacing and direction. Rescale slope/intercept are applied by both readers.

Volumes that are not plausibly CT in HU (for example MR, or raw unscaled detector values) are
rejected with a one-line ``CtwinError``, as are corrupt or truncated files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import CtwinError
from ..progress import report
from .volume import Volume, affine_from, load_nifti
from ..fileio import atomic_path
# Imported where used, so that importing this module stays light: SimpleITK (heavy or optional third-party packages).

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
CT_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
MIN_AIR_FRACTION = 0.005
MAX_DENSE_FRACTION_WITHOUT_AIR = 0.10
# A slice gap this much wider than the series' usual spacing is a missing slice.
DICOM_GAP_FACTOR = 1.5


def _quiet_itk() -> None:
    """ITK prints warnings straight to stderr (for example "No Series were found" before our own
    one-line error); the readers here report problems themselves."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def _one_line(exc: Exception, limit: int = 160) -> str:
    """The most informative single line of a (possibly multi-line ITK) exception message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages look like "Exception thrown in SimpleITK ...: /path/file.cxx:123:\nsitk::ERROR: ..."
    for ln in lines:
        if "ERROR" in ln or "rror:" in ln:
            msg = ln.split("ERROR:", 1)[-1].strip()
            break
    else:
        msg = lines[-1] if lines else type(exc).__name__
    msg = re.sub(r"\b\w+\(0x[0-9a-fA-F]+\):\s*", "", " ".join(msg.split()))
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def volume_from_sitk(img, source: str = "") -> Volume:
    """A SimpleITK image (LPS physical space) as a Volume indexed (i, j, k) = ITK (x, y, z)."""
    import SimpleITK as sitk

    if img.GetDimension() != 3:
        raise CtwinError(f"{Path(source).name or 'image'}: expected a 3-D volume, got {img.GetDimension()}-D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise CtwinError(f"{Path(source).name or 'image'}: expected one value per voxel, got "
                         f"{img.GetNumberOfComponentsPerPixel()} (colour or vector image)")
    data = sitk.GetArrayFromImage(img)  # (z, y, x)
    data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    aff = affine_from(img.GetSpacing(), img.GetOrigin(), direction)
    return Volume(data, aff, {"source": str(source)})


def sitk_from_volume(vol: Volume):
    """The inverse of ``volume_from_sitk`` (used to write NRRD/MHA and by tests)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol.data, (2, 1, 0))))
    img.SetSpacing([float(s) for s in vol.spacing])
    img.SetOrigin([float(o) for o in vol.origin])
    img.SetDirection([float(d) for d in vol.direction.reshape(-1)])
    return img


def save_itk(vol: Volume, path) -> None:
    """Write a Volume as NRRD/MHA (LPS physical space), atomically."""
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk_from_volume(vol), str(tmp), True)


def _read_itk_file(path: Path) -> Volume:
    import SimpleITK as sitk

    _quiet_itk()
    if not os.access(path, os.R_OK):
        raise CtwinError(f"cannot read {path}: permission denied")
    try:
        fr = sitk.ImageFileReader()
        fr.SetFileName(str(path))
        fr.ReadImageInformation()
        dicom = any(k.startswith(("0008|", "0020|")) for k in fr.GetMetaDataKeys())
    except RuntimeError:
        dicom = False
    if dicom:
        raise CtwinError(f"{path.name} is a single DICOM file; give the folder that holds its whole "
                         f"series (--ct FOLDER)")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CtwinError(f"cannot read {path.name}: {_one_line(exc)} (corrupt or truncated file?)") from None
    return volume_from_sitk(img, str(path))


def _read_dicom_folder(folder: Path) -> Volume:
    import SimpleITK as sitk

    _quiet_itk()
    if not os.access(folder, os.R_OK | os.X_OK):
        raise CtwinError(f"cannot read folder {folder}: permission denied")
    reader = sitk.ImageSeriesReader()
    try:
        ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise CtwinError(f"cannot scan DICOM folder {folder.name}: {_one_line(exc)}") from None
    if not ids:
        raise CtwinError(f"no DICOM series found in folder {folder}")
    series = [(sid, list(reader.GetGDCMSeriesFileNames(str(folder), sid))) for sid in ids]
    series.sort(key=lambda s: -len(s[1]))
    sid, files = series[0]
    if len(series) > 1:
        others = ", ".join(f"{len(f)}" for _, f in series[1:])
        report(f"{folder.name}: {len(series)} DICOM series found; using the largest "
               f"({len(files)} files, series {sid or '<no id>'}); others have {others} files")
    if len(files) < 2:
        raise CtwinError(f"DICOM series in {folder.name} has only {len(files)} slice(s); need a 3-D series")
    # Modality check from the first file's header (MR/PT are not CT in HU).
    try:
        fr = sitk.ImageFileReader()
        fr.SetFileName(files[0])
        fr.LoadPrivateTagsOff()
        fr.ReadImageInformation()
        modality = fr.GetMetaData("0008|0060").strip() if fr.HasMetaDataKey("0008|0060") else ""
    except RuntimeError as exc:
        raise CtwinError(f"cannot read DICOM file {Path(files[0]).name}: {_one_line(exc)}") from None
    if modality and modality.upper() not in ("CT",):
        raise CtwinError(f"DICOM series in {folder.name} has modality {modality}, not CT")
    _check_slice_gaps(files, folder)
    reader.SetFileNames(files)
    try:
        img = reader.Execute()  # GDCM applies rescale slope/intercept per slice
    except RuntimeError as exc:
        raise CtwinError(f"cannot read DICOM series in {folder.name}: {_one_line(exc)}") from None
    vol = volume_from_sitk(img, str(folder))
    vol.meta.update({"dicom_series": sid, "dicom_files": len(files), "modality": modality or "unknown"})
    return vol


def _check_slice_gaps(files, folder: Path) -> None:
    """Refuse a series with a missing slice: ITK would read it with one uniform spacing, putting
    every slice after the gap at the wrong place. Positions come from each file's Image Position
    (Patient) projected on the slice normal (Image Orientation (Patient))."""
    import SimpleITK as sitk

    pos, normal = [], None
    fr = sitk.ImageFileReader()
    fr.LoadPrivateTagsOff()
    for f in files:
        fr.SetFileName(f)
        try:
            fr.ReadImageInformation()
            ipp = [float(v) for v in fr.GetMetaData("0020|0032").replace("\\", " ").split()]
            if normal is None:
                iop = [float(v) for v in fr.GetMetaData("0020|0037").replace("\\", " ").split()]
                normal = np.cross(iop[:3], iop[3:6])
        except (RuntimeError, ValueError, IndexError):
            return  # no positions to check: ITK's own spacing stands
        pos.append(float(np.dot(ipp[:3], normal)))
    if len(pos) < 3:
        return
    d = np.diff(np.sort(np.asarray(pos)))
    typical = float(np.median(d))
    if typical <= 0:
        return
    worst = int(np.argmax(d))
    if d[worst] > DICOM_GAP_FACTOR * typical:
        raise CtwinError(f"DICOM series in {folder.name} has a gap: two slices are {d[worst]:.2f} mm apart "
                         f"where the others are {typical:.2f} mm (about {round(d[worst] / typical) - 1} "
                         f"missing slice(s) after slice {worst + 1} of {len(pos)}); give a complete series")


def read_volume(path) -> Volume:
    """Read any supported volume file or DICOM folder as-is (no HU checks, original dtype)."""
    path = Path(path)
    if not path.exists():
        raise CtwinError(f"file not found: {path}")
    if path.is_dir():
        return _read_dicom_folder(path)
    if not os.access(path, os.R_OK):
        raise CtwinError(f"cannot read {path}: permission denied")
    if is_nifti(path):
        return load_nifti(path)
    if path.suffix.lower() == ".dcm":
        return _read_dicom_folder(path.parent)
    return _read_itk_file(path)


def check_hu(data: np.ndarray, name: str = "volume") -> None:
    """Raise CtwinError unless ``data`` looks like CT in Hounsfield units.

    A CT in HU has air (or at least fat) below -200 HU somewhere in the field of view, spans a
    wide range (air to bone), and stays within a few tens of thousands of HU. MR, PET and raw
    unscaled values (minimum >= 0, narrow range, or normalised) fail these checks.
    """
    flat = data.reshape(-1)
    if flat.size == 0:
        raise CtwinError(f"{name} is empty")
    if not np.issubdtype(flat.dtype, np.number) or np.issubdtype(flat.dtype, np.complexfloating):
        raise CtwinError(f"{name} has non-numeric voxels ({flat.dtype})")
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step].astype(np.float64)
    if not np.all(np.isfinite(sample)):
        raise CtwinError(f"{name} contains NaN or infinite values; not a CT in HU")
    vmin, vmax = float(sample.min()), float(sample.max())
    p1, p50, p99 = np.percentile(sample, [1, 50, 99])
    hint = "not a CT in Hounsfield units (MR or unscaled data?)"
    if vmin >= -200:
        raise CtwinError(f"{name} has no voxel below -200 HU (min {vmin:.0f}, no air or fat): {hint}")
    # The histogram, not the minimum alone: a CT of a body has an air peak (outside the body, lungs,
    # bowel gas; 36-87 % of the voxels below -500 HU in the shared real CTs and the phantom) and
    # few dense voxels (bone above 300 HU: 0.9-1.5 %). MR with background noise dipping below
    # -200 has no air peak and most of its tissue above 300.
    air, dense = float((sample < -500).mean()), float((sample > 300).mean())
    if air < MIN_AIR_FRACTION and dense > MAX_DENSE_FRACTION_WITHOUT_AIR:
        raise CtwinError(f"{name} has no air peak ({100 * air:.2f} % of voxels below -500 HU) and "
                         f"{100 * dense:.0f} % above 300 HU (a CT's bone is a few %): {hint}")
    if p99 - p1 < 300:
        raise CtwinError(f"{name} spans only {p99 - p1:.1f} units between its 1st and 99th percentile: {hint}")
    if vmin < -10000 or vmax > 40000:
        raise CtwinError(f"{name} has values {vmin:.0f}..{vmax:.0f}, far outside the HU range: {hint}")
    if p50 > 2000:
        raise CtwinError(f"{name} has median {p50:.0f}, implausible for HU: {hint}")


def to_hu_int16(vol: Volume, name: str = "CT") -> Volume:
    """Check HU plausibility and convert to int16 (rounded, clipped to the int16 range)."""
    check_hu(vol.data, name)
    data = vol.data
    if data.dtype != np.int16:
        if np.issubdtype(data.dtype, np.floating):
            data = np.rint(data)
        data = np.clip(data, -32768, 32767).astype(np.int16)
    return Volume(np.ascontiguousarray(data), vol.affine, dict(vol.meta))


def load_ct(path) -> Volume:
    """Read a CT (NIfTI, NRRD, MHA, DICOM series folder) as int16 HU with an LPS affine."""
    path = Path(path)
    vol = read_volume(path)
    out = to_hu_int16(vol, f"CT {path.name}")
    out.meta["source"] = str(path)
    report(f"CT {path.name}: {out.shape} voxels, spacing {np.round(out.spacing, 3).tolist()} mm")
    return out
