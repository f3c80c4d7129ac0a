"""DICOM DX (Digital X-Ray) frames, written with pydicom.

``write_dx(path, image, sidecar)`` stores a float image as 16-bit unsigned pixels with
RescaleSlope / RescaleIntercept that recover the floats (within half a slope), and the geometry
tags: DistanceSourceToDetector (SID), DistanceSourceToPatient (source to isocentre),
ImagerPixelSpacing, PositionerPrimaryAngle / PositionerSecondaryAngle, plus the physics in the
ImageComments (the full record stays in the JSON sidecar beside the file).

SOP class: Digital X-Ray Image Storage - For Presentation for ``value == "radiograph"``, For
Processing otherwise (DICOM PS3.4 B.5). Positioner angles follow the XA/DX patient-based
convention (PS3.3 C.8.7.5): 0, 0 has the detector anterior to the patient; the primary angle is
positive towards the patient's left (LAO), the secondary towards the head (cranial). They are
computed from the beam direction d (LPS, source to detector): primary = atan2(d_x, -d_y),
secondary = asin(d_z).
"""
from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np

from ..errors import CtwinError
from ..fileio import atomic_path, write_json
# Imported where used, so that importing this module stays light: pydicom (heavy or optional third-party packages).

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


def positioner_angles(direction) -> tuple:
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    return math.degrees(math.atan2(d[0], -d[1])), math.degrees(math.asin(float(np.clip(d[2], -1, 1))))


def rescale(image) -> tuple:
    """(uint16 pixels, slope, intercept) with pixels x slope + intercept ~ image."""
    img = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(img)):
        raise CtwinError("DICOM output needs finite pixel values")
    lo, hi = float(img.min()), float(img.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    px = np.clip(np.rint((img - lo) / slope), 0, 65535).astype(np.uint16)
    return px, slope, lo


def write_dx(path, image, sidecar: dict) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    img = np.asarray(image)
    if img.ndim != 2:
        raise CtwinError("a DICOM DX frame is one 2D image")
    px, slope, intercept = rescale(img)
    present = sidecar.get("value") == "radiograph"
    sop_class = DX_PRESENTATION if present else DX_PROCESSING
    key = [str(path.name), str(sidecar.get("source", "")), str(sidecar.get("frame", 0))]
    sop_uid = generate_uid(entropy_srcs=key)
    now = datetime.datetime.now(datetime.timezone.utc)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(sidecar.get("source", "")), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(sidecar.get("source", "")), str(sidecar.get("view", "")), "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(sidecar.get("source", "")), "for"])
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID = "ctwin^twin", "ctwin"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, int(sidecar.get("frame", 0)) + 1
    ds.Manufacturer, ds.ManufacturerModelName = "ctwin", "ctwin DRR (simulated)"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION" if present else "FOR PROCESSING"
    ds.PixelIntensityRelationship = "LOG" if sidecar.get("value") in ("line_integral", "radiograph", "display") else "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(px.shape[0]), int(px.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope = f"{slope:.10g}"
    ds.RescaleIntercept = f"{intercept:.10g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{(px.min() + px.max()) / 2.0 * slope + intercept:.6g}"
    ds.WindowWidth = f"{max((px.max() - px.min()) * slope, 1e-6):.6g}"
    du, dv = sidecar.get("pixel_spacing_mm", [1.0, 1.0])
    ds.ImagerPixelSpacing = [f"{dv:.6g}", f"{du:.6g}"]  # row spacing, column spacing
    ds.DistanceSourceToDetector = f"{float(sidecar.get('sid_mm', 0.0)):.6g}"
    if "sad_mm" in sidecar:
        ds.DistanceSourceToPatient = f"{float(sidecar['sad_mm']):.6g}"
    d = np.asarray(sidecar["detector_center_mm"], float) - np.asarray(sidecar["source_mm"], float)
    a1, a2 = positioner_angles(d)
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = f"{a1:.4f}", f"{a2:.4f}"
    ds.ViewPosition = {"ap": "AP", "pa": "PA", "lateral": "LL", "lat_left": "LL", "lat_right": "RL"}.get(
        str(sidecar.get("view", "")), "")
    if sidecar.get("kvp"):
        ds.KVP = f"{float(sidecar['kvp']):.6g}"
        parts = [f"kVp {float(sidecar['kvp']):g}", f"detector {sidecar.get('detector', 'ideal')}"]
        if sidecar.get("mas"):
            ds.ExposureInmAs = float(sidecar["mas"])
            parts.append(f"{float(sidecar['mas']):g} mAs")
        ds.ImageComments = "simulated radiograph: " + ", ".join(parts)[:900]
    else:
        ds.ImageComments = "simulated radiograph: monoenergetic DRR (mu = 0.02/mm (1 + HU/1000))"
    ds.PixelData = px.tobytes()
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def read_dx(path) -> tuple:
    """(float64 image recovered with the rescale, pydicom dataset)."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    img = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return img, ds


def write_frame_dicom(stem, image, sidecar: dict) -> None:
    """``stem.dcm`` (DX) and ``stem.json`` beside it (written last, so it marks a finished frame)."""
    stem = Path(stem)
    sidecar = {**sidecar, "format": "dicom"}
    write_dx(stem.with_name(stem.name + ".dcm"), image, sidecar)
    write_json(stem.with_name(stem.name + ".json"), sidecar)
