"""``register``: the twin's pose from X-ray images (``core.twin.registration``).

``ctwin register --twin DIR --xray IMAGE [--xray IMAGE ...] --out DIR`` writes ``registration.json``
(``pose``, ``transl``, ``joints``, ``rest_joints``, ``kintree_parents``: a pose file that ``ctwin
pose --pose`` and ``ctwin render --pose`` take as it is), ``report.json`` (similarity and time per
stage) and ``overlay_<image>.png`` (the bones' projected contours on each input: red at the start,
green after).
"""
from __future__ import annotations

from pathlib import Path

HELP = "estimate the twin's pose from X-ray images (DRRs or radiographs with geometry)"
DESCRIPTION = ("Articulated 2D/3D registration: pose the twin (72 pose values and the translation) so "
               "that its bones match one or more X-ray images. Each image is a TIFF with its geometry "
               "sidecar JSON (as 'ctwin render' writes) or a DICOM with a sidecar or projection tags.")


def add_arguments(p) -> None:
    p.add_argument("--twin", required=True, metavar="DIR", help="twin directory (from build)")
    p.add_argument("--xray", required=True, action="append", metavar="IMAGE",
                   help="an X-ray image (TIFF + sidecar JSON, or DICOM); repeat for more views")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--init", metavar="POSE", help="start pose: a pose file or preset (default: the acquisition pose)")
    p.add_argument("--rigid", action="store_true", help="the whole twin as one rigid body (baseline)")
    p.add_argument("--refine-geometry", action="store_true",
                   help="also estimate each further view's C-arm pose relative to the patient")
    p.add_argument("--levels", default="64,128,256", metavar="A,B,..",
                   help="image sizes, coarse to fine (default 64,128,256)")
    p.add_argument("--starts", type=int, default=8, help="extra root starts at the coarsest level (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the extra root starts")


def run(args) -> int:
    from ..core.errors import CtwinError
    from ..core.rig.poses import resolve_pose
    from ..core.progress import report, step
    from ..core.twin.registration import bone_cloud, load_xray, register, write_outputs
    from ..core.twin.twin import load_twin

    try:
        levels = tuple(int(v) for v in str(args.levels).split(","))
    except ValueError:
        raise CtwinError(f"--levels must be sizes like 64,128,256, got {args.levels!r}") from None
    if not levels or min(levels) < 16 or max(levels) > 2048:
        raise CtwinError(f"--levels must be sizes between 16 and 2048, got {args.levels!r}")
    with step("reading the twin"):
        twin = load_twin(args.twin)
    xrays = [load_xray(p, twin.ct_bbox_mm) for p in args.xray]
    names = [x.name for x in xrays]
    if len(set(names)) != len(names):
        xrays = [type(x)(f"{i}_{x.name}", x.image, x.geometry, x.value, x.path, x.sidecar) for i, x in enumerate(xrays)]
    init_pose = init_t = None
    if args.init:
        p = resolve_pose(args.init)
        init_pose, init_t = p["pose"], p["transl"]
    with step("bone clouds"):
        cloud = bone_cloud(twin)
    reg = register(twin, xrays, init_pose=init_pose, init_transl_mm=init_t, levels=levels,
                   articulated=not args.rigid, refine_geometry=args.refine_geometry,
                   root_starts=max(0, args.starts), seed=args.seed, cloud=cloud)
    write_outputs(twin, reg, xrays, Path(args.out), cloud)
    report(f"registration written to {args.out} (similarity {reg.similarity:.4f}, {reg.seconds:.1f} s)", 1.0)
    return 0
