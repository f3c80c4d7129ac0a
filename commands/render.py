"""``render``: DRRs of a twin or of a plain CT (SPEC 3, 5).

``--ct PATH`` renders a plain CT through core.projector (views "ap" and "lateral" by default, or
``--view NAME``, or ``--geometry FILE`` = the sidecar JSON of an earlier render, reused exactly).
Frames are written as ``<view>_<frame:04d>.tif`` (32-bit float, one channel, rows = detector rows)
with ``<view>_<frame:04d>.json`` beside them; frames already written are skipped (resume).
``--twin DIR`` hands over to ``core.twin.render_twin``.
"""
from __future__ import annotations

from pathlib import Path

HELP = "render DRRs of a twin (posed, animated) or of a plain CT"


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--twin", metavar="DIR", help="twin directory (from build)")
    src.add_argument("--ct", metavar="PATH", help="a plain CT (.nii/.nii.gz/.nrrd/.mha or DICOM folder)")
    p.add_argument("--pose", metavar="FILE", help="pose file (twin only); default: acquisition pose")
    p.add_argument("--motion", metavar="FILE", help="motion file (twin only)")
    p.add_argument("--source-model", metavar="PATH",
                   help="SMPL or SMPL+H model file the --motion was made on (shaped by the file's betas); "
                        "default: the built-in body model's skeleton, betas ignored")
    p.add_argument("--frames", metavar="A:B", help="frame range, B exclusive (default 0:1)")
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
    p.add_argument("--value", default="line_integral", choices=("line_integral", "intensity", "display", "radiograph"))
    p.add_argument("--photons", type=float, default=None, help="unattenuated photons per pixel: adds seeded Poisson noise")
    p.add_argument("--electronic-noise", type=float, default=None, metavar="SIGMA",
                   help="Gaussian electronic noise (counts; with --kvp default: the detector preset's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (frame number is added)")
    p.add_argument("--sad", type=float, default=1000.0, help="source-to-isocentre mm (default 1000)")
    p.add_argument("--sid", type=float, default=1500.0, help="source-to-image mm (default 1500)")
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


def options(args) -> dict:
    """Rendering options shared by the --ct and --twin paths."""
    return dict(method=args.method, step_mm=args.step, value=args.value, kvp=args.kvp,
                photons=args.photons, electronic_sigma=args.electronic_noise or 0.0, seed=args.seed)


def run(args) -> int:
    from ..core import progress
    from ..core.carm import Geometry, named_view
    from ..core.errors import CtwinError
    from ..core.fileio import read_json
    from ..core.projector import prepare_volume, render_value, resolve_device
    from .xray_args import frame_written, setup_from_args, write_output

    size = parse_size(args.size)
    frames = parse_frames(args.frames)
    out = Path(args.out)
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
        geometry = Geometry.from_sidecar(sc)
        if size is not None:
            geometry = geometry.with_size(*size)
    if args.twin:
        try:
            from ..core.twin import render_twin
        except ImportError:
            raise CtwinError("rendering a twin needs core.twin.render_twin, which this build does not "
                             "have yet; use --ct to render a plain CT") from None
        if args.seg or args.label_material:
            raise CtwinError("--seg/--label-material work with --ct; a twin's labels are not overridden yet")
        if args.motion and not args.source_model:
            progress.report("motion: no --source-model, so its source skeleton is the built-in body "
                            "model's (the file's betas are not used)")
        if args.source_model and not args.motion:
            raise CtwinError("--source-model names the model a --motion was made on; give --motion too")
        return int(render_twin(args.twin, out_dir=out, pose=args.pose, motion=args.motion,
                               source_model=args.source_model, frames=frames, view=args.view,
                               geometry=geometry, size=size,
                               device=args.device, sad_mm=args.sad, sid_mm=args.sid,
                               parallel=args.parallel, xray=xray, fmt=args.format, **options(args)) or 0)
    if args.pose or args.motion or args.source_model:
        raise CtwinError("--pose, --motion and --source-model need --twin (a plain CT has no skeleton to pose)")
    if frames is not None and frames[1] - frames[0] != 1:
        raise CtwinError("a plain CT is static: --frames takes a single frame (A:A+1) with --ct")
    frame = 0 if frames is None else frames[0]
    device = resolve_device(args.device)
    ctp = Path(args.ct)
    if not ctp.exists():
        raise CtwinError(f"CT not found: {ctp}")
    try:
        from ..core.ct import load_ct
    except ImportError:
        from ..core.volume import load_nifti as load_ct
    vol = load_ct(ctp)
    if xray is not None:
        from .xray_args import apply_label_overrides

        vol = apply_label_overrides(args, vol, xray)
    pv = prepare_volume(vol)
    if geometry is not None:
        name = Path(args.geometry).name.split(".")[0].rsplit("_", 1)[0] or "view"
        views = {name: geometry}
    else:
        names = [args.view] if args.view else ["ap", "lateral"]
        views = {n: named_view(n, vol, sad_mm=args.sad, sid_mm=args.sid, size=size or 512,
                               parallel=args.parallel) for n in names}
    for i, (name, g) in enumerate(views.items()):
        stem = out / f"{name}_{frame:04d}"
        if frame_written(stem, args.format):
            progress.report(f"{stem.name}: already written, skipped", (i + 1) / len(views))
            continue
        rec = {}
        if xray is not None:
            xray.seed = args.seed + frame
            xray.stream = i
        img = render_value(pv, g, device=device, **{**options(args), "seed": args.seed + frame},
                           xray=xray, record=rec)
        sidecar = g.to_sidecar(frame=frame, value=args.value, device=device, source=str(ctp),
                               method=args.method, **{"kvp": args.kvp, "photons": args.photons, **rec})
        write_output(stem, img, sidecar, args.format)
        ext = "dcm" if args.format == "dicom" else "tif"
        progress.report(f"{stem.name}.{ext} written ({g.width}x{g.height})", (i + 1) / len(views))
    return 0
