"""Guards that keep wrong input and interrupted runs from passing silently.

- Output checks (``check_out_dir``, ``check_out_file``): run before any work, so a read-only
  folder, a file where a folder is meant, or an output that would overwrite a twin's own files
  (``TWIN_OWN``) is one line, not a traceback after minutes of work.
- Partial files (``partial_tag``, ``clean_stale_partials``): temporary names carry the writer's
  process id, ``.<name>.pid<PID>-...``, so the next run removes what a killed run left and never
  touches the files of a run that is still going.
- Numbers (``check_number``, ``check_pose_values``): finite and within sane ranges where they enter.
- Resume (``frame_status``): a frame counts as written only when its image reads back whole and its
  sidecar matches the request.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import json

from .errors import CtwinError
from .progress import report

# The entries of a twin directory that belong to the twin (core.twin.twin writes them).
TWIN_OWN = ("twin.json", "fit.json", "fit.npz", "binding.npz", "twin.blend", "meshes", "volumes")

_PARTIAL = re.compile(r"^\..*\.pid(\d+)-")


def partial_tag() -> str:
    """The process tag that temporary names carry (``pid<PID>-``)."""
    return f"pid{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def stale_partials(folder) -> list[Path]:
    """Temporary files and folders in ``folder`` whose writing process no longer runs."""
    d = Path(folder)
    if not d.is_dir():
        return []
    out = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _PARTIAL.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            out.append(p)
    return sorted(out)


def clean_stale_partials(folder) -> list[Path]:
    """Remove what killed runs left in ``folder`` (see ``stale_partials``); returns the removed paths."""
    removed = []
    for p in stale_partials(folder):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    if removed:
        report(f"removed {len(removed)} partial file(s) left by an interrupted run in {Path(folder)}")
    return removed


def twin_root_of(path) -> tuple[Path, Path] | None:
    """(twin directory, path relative to it) when ``path`` lies inside a twin directory, else None."""
    p = Path(path).resolve()
    for a in (p, *p.parents):
        if (a / "twin.json").is_file():
            return a, p.relative_to(a)
    return None


def refuse_twin_files(path, flag: str = "--out", *, folder: bool = True) -> None:
    """Refuse an output that would overwrite a twin's own files (a subfolder of a twin is fine)."""
    hit = twin_root_of(path)
    if hit is None:
        return
    root, rel = hit
    if not rel.parts:
        if folder:
            raise CtwinError(f"{flag} {path} is a twin directory; write into a new folder "
                             f"(a subfolder such as {root / 'renders'} is fine)")
        return
    if rel.parts[0] in TWIN_OWN:
        raise CtwinError(f"{flag} {path} would overwrite the twin's own {rel.parts[0]} in {root}; "
                         f"choose another folder")


def _writable_dir(d: Path, flag: str, path) -> None:
    """The nearest existing folder at or above ``d`` must be a folder we can write to."""
    a = d
    while not a.exists():
        if a.parent == a:
            break
        a = a.parent
    if not a.is_dir():
        raise CtwinError(f"{flag} {path}: {a} is a file, not a folder")
    if not os.access(a, os.W_OK | os.X_OK):
        raise CtwinError(f"{flag} {path}: permission denied (cannot write in {a})")


def check_out_dir(path, flag: str = "--out", *, twin_ok: bool = False) -> Path:
    """Check an output folder before any work: not an existing file, writable, not a twin's own."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CtwinError(f"{flag} {path} is an existing file; {flag} takes a folder")
    _writable_dir(p, flag, path)
    if not twin_ok:
        refuse_twin_files(p, flag, folder=True)
    return p


def check_out_file(path, flag: str = "--out") -> Path:
    """Check an output file before any work: not a folder, its folder writable, not a twin's own."""
    p = Path(path)
    if p.is_dir():
        raise CtwinError(f"{flag} {path} is a folder; {flag} takes a file name (for example {p / 'metrics.json'})")
    if p.exists() and not os.access(p, os.W_OK):
        raise CtwinError(f"{flag} {path}: permission denied")
    _writable_dir(p.parent, flag, path)
    refuse_twin_files(p, flag, folder=False)
    return p


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------
# Request limits, checked alike by `ctwin render` and the ctwin DRR engine.
# The finest trilinear step: CT voxels are 0.2 mm or more, and a step below a quarter of the
# smallest voxel changes a DRR by less than float32 rounding, while the cost grows as 1 / step
# (a 16x16 image at 1e-6 mm took 5 minutes).
MIN_STEP_MM = 0.05
# More photons per pixel than this makes Poisson noise invisible in float32 (relative sigma 1e-6);
# numpy's Poisson sampler also refuses rates near 1e19.
MAX_PHOTONS = 1.0e12
# A ray through a 512^3 CT at the finest step (MIN_STEP_MM on 0.2 mm voxels) takes about 8,000 samples;
# ten times that bounds the option.
MAX_SAMPLES_PER_RAY = 100000


def check_number(name: str, value, lo=None, hi=None, *, lo_open: bool = False, why: str = ""):
    """``value`` finite and within [lo, hi] (``lo_open``: strictly above lo); None passes."""
    if value is None:
        return None
    v = float(value)
    rng = (f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "") + \
          (" and " if lo is not None and hi is not None else "") + (f"<= {hi:g}" if hi is not None else "")
    tail = f" ({why})" if why else ""
    if not math.isfinite(v):
        raise CtwinError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value}{tail}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise CtwinError(f"{name} must be {rng}, got {value:g}{tail}")
    if hi is not None and v > hi:
        raise CtwinError(f"{name} must be {rng}, got {value:g}{tail}")
    return value


# A rotation vector longer than one full turn is not produced by any pose fitter or mocap export;
# such values are corrupt input (1e300, a wrong unit).
MAX_ROTVEC_RAD = 2.0 * math.pi
# Translations beyond 100 m are a unit error (metres read as mm are 1000x smaller, not larger).
MAX_TRANSL_MM = 1.0e5


def check_pose_values(pose, transl_mm=None, what: str = "pose") -> None:
    """A pose (..., 72) of finite rotation vectors no longer than a full turn, and a finite sane
    translation (..., 3) in mm."""
    p = np.asarray(pose, dtype=np.float64)
    if p.shape[-1:] != (72,):
        raise CtwinError(f"{what}: a pose has 72 values (24 joints x 3), got shape {p.shape}")
    if not np.isfinite(p).all():
        raise CtwinError(f"{what}: the pose has non-finite values (nan or inf)")
    with np.errstate(over="ignore"):
        ang = np.linalg.norm(p.reshape(*p.shape[:-1], 24, 3), axis=-1)
    if ang.max(initial=0.0) > MAX_ROTVEC_RAD + 1e-9:
        raise CtwinError(f"{what}: a joint rotation of {ang.max():.3g} rad is more than a full turn "
                         f"(2 pi); pose values are axis-angle radians")
    if transl_mm is not None:
        t = np.asarray(transl_mm, dtype=np.float64)
        if t.shape[-1:] != (3,):
            raise CtwinError(f"{what}: the translation has 3 values, got shape {t.shape}")
        if not np.isfinite(t).all() or np.abs(t).max(initial=0.0) > MAX_TRANSL_MM:
            raise CtwinError(f"{what}: the translation must be finite and within {MAX_TRANSL_MM:g} mm")


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------
# Sidecar keys that describe how a frame was produced, not what it is.
_IGNORED = ("device",)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def frame_status(stem, expected: dict, fmt: str = "tiff") -> tuple[str, str]:
    """("missing" | "damaged" | "mismatch" | "ok", reason) for the frame files ``stem.tif`` (or
    ``stem.dcm`` for ``fmt`` "dicom") + ``.json``.

    "ok": the image reads back whole with the requested size and every sidecar key of the request
    (except the device) has the requested value. A frame whose JSON (written last) is absent is an
    interrupted write, "missing"."""
    stem = Path(stem)
    tif = stem.with_name(stem.name + (".dcm" if fmt == "dicom" else ".tif"))
    js = stem.with_name(stem.name + ".json")
    if not js.is_file():
        return "missing", "no sidecar"
    if not tif.is_file():
        return "damaged", "no image"
    try:
        with open(js) as f:
            got = json.load(f)
        if not isinstance(got, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return "damaged", f"unreadable sidecar ({exc})"
    first = ("size_px", "source", "value", "method", "pose", "transl_mm")
    keys = [k for k in first if k in expected] + [k for k in expected if k not in first]
    for k in keys:
        v = expected[k]
        if k in _IGNORED:
            continue
        if k not in got:
            return "mismatch", f"it has no {k!r}"
        if not _same(v, got[k]):
            return "mismatch", f"its {k} is {_short(got[k])}, the request's is {_short(v)}"
    try:
        if fmt == "dicom":
            import pydicom

            img = pydicom.dcmread(tif).pixel_array
        else:
            import tifffile

            img = tifffile.imread(tif)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is not a result
        return "damaged", f"unreadable image ({type(exc).__name__})"
    w, h = (int(x) for x in expected.get("size_px", (img.shape[-1], img.shape[0])))
    want = np.uint16 if fmt == "dicom" else np.float32
    if img.shape != (h, w) or img.dtype != want:
        return "damaged", f"image is {img.shape} {img.dtype}, not ({h}, {w}) {np.dtype(want).name}"
    return "ok", ""


def _short(v) -> str:
    s = json_dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def json_dumps(v) -> str:
    return json.dumps(v, separators=(",", ":"), default=str)


def request_keys(step_mm, photons, electronic_sigma, seed, xray=None) -> dict:
    """Sidecar keys that record the sampling and the noise of a render, so that a resumed render
    can tell whether a frame on disk was made with the same request. ``xray`` (a
    ``core.drr.xray.XraySetup``, seed and stream already set) adds its physics options as its render
    records them (the HU table resolved, as ``core.drr.xray.form_image`` writes it).
    ``electronic_noise`` is the sigma the noise is drawn with: with ``xray`` its own (the detector
    preset's unless given), else ``electronic_sigma`` (None = 0)."""
    d = {"step_mm": None if step_mm is None else float(step_mm), "photons": photons}
    if photons is not None:
        used = xray.electronic if xray is not None else float(electronic_sigma or 0.0)
        d.update(electronic_noise=used, noise_seed=int(seed))
    if xray is not None:
        d.update(xray.to_sidecar())
        d["hu_table"] = xray.table().to_dict()
    return d


def frame_to_skip(stem, expected: dict, overwrite: bool, fmt: str = "tiff",
                  remedy: str = "use a new --out or --overwrite to replace it") -> bool:
    """True when the frame is already written as requested. A damaged or missing frame is
    (re)rendered; a frame written for another request is refused (``remedy`` ends the message)
    unless ``overwrite``."""
    status, why = frame_status(stem, expected, fmt)
    if status == "ok":
        return True
    if status == "mismatch" and not overwrite:
        raise CtwinError(f"{Path(stem).name} was written for another request: {why}; {remedy}")
    if status == "damaged":
        report(f"{Path(stem).name}: {why}, rendering it again")
    return False
