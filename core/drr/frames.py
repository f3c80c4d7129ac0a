"""The frame loop shared by ``ctwin render`` (plain CT and twin) and the Blender render engine.

Per frame and view: keep a frame already on disk when it reads back whole and its sidecar holds
this request (``core.safety.frame_to_skip``; one written for another request is refused unless
``overwrite``); otherwise render the line integral, add the seeded noise, turn it into the output
value and write the image and its sidecar (``stem.tif`` or ``stem.dcm``, then ``stem.json``, each
atomically). Frame files and sidecar keys: SPEC 3 and 5.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import physics
from ..errors import CtwinError
from ..progress import report
from ..safety import clean_stale_partials, frame_to_skip
from .dicom_dx import read_dx, write_frame_dicom
from .projector import read_frame, write_frame

FORMATS = ("tiff", "dicom")


@dataclass
class FrameView:
    """One frame file to write: ``stem`` (path without extension), the view's ``geometry`` and the
    ``sidecar`` this request writes (what a frame on disk must hold to be kept)."""

    name: str
    stem: Path
    geometry: object
    sidecar: dict


def write_frame_file(stem, image: np.ndarray, sidecar: dict, fmt: str = "tiff") -> None:
    """``stem.tif`` (32-bit float) or ``stem.dcm`` (DICOM DX), then ``stem.json`` beside it."""
    if fmt == "dicom":
        write_frame_dicom(stem, image, sidecar)
    elif fmt == "tiff":
        write_frame(stem, image, sidecar)
    else:
        raise CtwinError(f"unknown frame format {fmt!r}; use tiff or dicom")


def read_frame_image(stem, fmt: str = "tiff") -> np.ndarray:
    """The image of the frame file ``stem.tif`` (float32) or ``stem.dcm`` (the DICOM pixels rescaled,
    within half a rescale step of the values written)."""
    if fmt == "dicom":
        stem = Path(stem)
        return read_dx(stem.with_name(stem.name + ".dcm"))[0].astype(np.float32)
    return read_frame(stem)[0]


def render_frames(frames, render, *, value: str = "line_integral", photons=None, electronic_sigma: float = 0.0,
                  seed: int = 0, xray=None, overwrite: bool = False, fmt: str = "tiff", resume: bool = True,
                  write: bool = True, prepare=None, keep_images: bool = False,
                  remedy: str = "use a new --out or --overwrite to replace it") -> dict:
    """Render and write frames; returns {view name: image} of the last frame when ``keep_images``.

    ``frames``: (frame number, [FrameView]) pairs. ``render(f, view, state, record)`` returns the
    view's line integral (SPEC 5 mu, or -ln(I/I0) through ``xray``, whose physics record it puts
    into ``record``); ``state`` is ``prepare(f)``, called once per frame before its first render
    (e.g. posing the twin) and not at all when every view of the frame is kept. Without ``xray``,
    ``photons`` adds seeded Poisson noise (seed ``seed + f``; ``core.drr.physics.add_noise``); with it,
    the loop sets ``xray.seed = seed + f`` and ``xray.stream`` = the view's index. ``resume``: keep
    frames on disk that hold this request (the folders' stale partial files are removed first);
    ``write``: write the frame files."""
    if fmt not in FORMATS:
        raise CtwinError(f"unknown frame format {fmt!r}; use tiff or dicom")
    frames = [(int(f), list(views)) for f, views in frames]
    total = max(sum(len(v) for _, v in frames), 1)
    ext = "dcm" if fmt == "dicom" else "tif"
    if resume:
        for folder in dict.fromkeys(v.stem.parent for _, views in frames for v in views):
            clean_stale_partials(folder)
    images = {}
    done = 0
    for f, views in frames:
        skip = [resume and frame_to_skip(v.stem, v.sidecar, overwrite, fmt=fmt, remedy=remedy) for v in views]
        state = None
        if prepare is not None and not all(skip):
            state = prepare(f)
        for i, (v, kept) in enumerate(zip(views, skip)):
            done += 1
            if kept:
                report(f"{v.stem.name}: already written, skipped", done / total)
                if keep_images:
                    images[v.name] = read_frame_image(v.stem, fmt)
                continue
            if xray is not None:
                xray.seed, xray.stream = seed + f, i
            record = {}
            li = render(f, v, state, record)
            if xray is None and photons is not None:
                li = physics.add_noise(li, photons, electronic_sigma, seed + f)
            img = physics.to_value(li, value)
            if write:
                write_frame_file(v.stem, img, {**v.sidecar, **record}, fmt)
                w, h = v.geometry.size_px
                report(f"{v.stem.name}.{ext} written ({w}x{h})", done / total)
            if keep_images:
                images[v.name] = img
    return images
