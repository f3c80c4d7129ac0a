"""The realistic-physics options of ``render`` (SPEC 3: ``--kvp`` and friends) and the frame
output format; shared by the command and kept here so that ``render.py`` stays small.
Not a command itself (cli.py lists its commands by name)."""
from __future__ import annotations


PHYSICS_FLAGS = ("filter_al", "filter_cu", "anode_angle", "heel", "detector", "csi_um", "focal_spot_mm",
                 "hu_table", "mas", "scatter", "grid", "grid_lines", "seg", "label_material")


def add_arguments(p) -> None:
    g = p.add_argument_group("realistic X-ray physics (SpekPy spectra, xraylib materials; needs --kvp)")
    g.add_argument("--kvp", type=float, default=None,
                   help="tube voltage 40-150 kV: polychromatic render; default: monoenergetic SPEC 5 mu")
    g.add_argument("--filter-al", type=float, default=0.0, metavar="MM", help="added aluminium filtration (mm)")
    g.add_argument("--filter-cu", type=float, default=0.0, metavar="MM", help="added copper filtration (mm)")
    g.add_argument("--anode-angle", type=float, default=None, metavar="DEG", help="anode angle (default 12)")
    g.add_argument("--heel", action="store_true", help="heel effect along the detector rows (anode-cathode axis)")
    g.add_argument("--detector", default=None, metavar="NAME",
                   help="ideal (absorbs every photon, default), paxscan4030cb (C-arm flat panel), pixium4343 (radiography)")
    g.add_argument("--csi-um", type=float, default=None, metavar="UM", help="CsI thickness (micrometres), overrides the preset")
    g.add_argument("--focal-spot-mm", type=float, default=None, metavar="MM", help="focal spot size (blur scaled by magnification)")
    g.add_argument("--hu-table", default=None, metavar="FILE", help="JSON HU -> materials calibration (default: stoichiometric, Schneider 2000 ranges)")
    g.add_argument("--mas", type=float, default=None, metavar="MAS", help="tube current-time product: photon count from SpekPy's fluence (noise)")
    g.add_argument("--scatter", nargs="?", const="all", default=None, choices=("all", "first"),
                   help="add scatter: 'all' (the default of a bare --scatter: first-order and multiple-scatter "
                        "kernels fitted to a water-slab Monte Carlo) or 'first' (first-order scatter only); "
                        "the scatter-to-primary ratio goes into the sidecar")
    g.add_argument("--grid", type=float, default=None, metavar="RATIO", help="anti-scatter grid ratio (e.g. 10)")
    g.add_argument("--grid-lines", type=float, default=None, metavar="PER_CM", help="grid line density (default 40 per cm)")
    g.add_argument("--seg", default=None, metavar="PATH",
                   help="segmentation of the --ct (labelmap file or mask folder): its labels take the materials "
                        "of --label-material, and implant-named labels (implant, screw, titanium, stent ...) "
                        "a default metal")
    g.add_argument("--label-material", action="append", default=None, metavar="LABEL=MATERIAL",
                   help="voxels of LABEL (name, pattern such as '*artery*', or number) become MATERIAL "
                        "(titanium, ti6al4v, stainless_steel, cocr, iodine_blood[:MG_PER_ML], any material "
                        "name; '@G_CM3' sets its density; 'hu' keeps the HU calibration); repeatable; "
                        "'auto': only the implant defaults. --ct: needs --seg; --twin: the twin's labels")
    p.add_argument("--format", default="tiff", choices=("tiff", "dicom"),
                   help="frame file: 32-bit float TIFF (default) or DICOM DX (16-bit with rescale)")


def setup_from_args(args):
    """A core.drr.xray.XraySetup from the flags, or None for the monoenergetic default."""
    from ..core.errors import CtwinError

    if args.kvp is None:
        used = [f for f in PHYSICS_FLAGS if getattr(args, f, None) not in (None, False, 0.0)]
        if used:
            raise CtwinError(f"--{used[0].replace('_', '-')} needs --kvp (the monoenergetic default has no spectrum)")
        return None
    from ..core.drr.xray import ANODE_ANGLE_DEG, GRID_LINES_PER_CM, XraySetup

    if args.grid_lines is not None and args.grid is None:
        raise CtwinError("--grid-lines needs --grid RATIO")

    return XraySetup(kvp=args.kvp, filter_al_mm=args.filter_al, filter_cu_mm=args.filter_cu,
                     anode_angle_deg=ANODE_ANGLE_DEG if args.anode_angle is None else args.anode_angle,
                     heel=bool(args.heel), detector=args.detector or "ideal", csi_um=args.csi_um,
                     focal_spot_mm=args.focal_spot_mm or 0.0, mas=args.mas, photons=args.photons,
                     electronic_sigma=args.electronic_noise, seed=args.seed, hu_table=args.hu_table,
                     scatter=args.scatter is not None,
                     multiple_scatter=args.scatter != "first", grid_ratio=args.grid,
                     grid_lines_per_cm=GRID_LINES_PER_CM if args.grid_lines is None else args.grid_lines)


def apply_label_overrides(args, vol, xray):
    """The CT with the --seg / --label-material overrides applied (and recorded in ``xray``), or as it is."""
    from ..core import progress
    from ..core.errors import CtwinError

    if not args.seg:
        if args.label_material:
            raise CtwinError("--label-material with --ct needs --seg PATH (the segmentation of the CT)")
        return vol
    from ..core.volumes.segmentation import load_segmentation
    from ..core.drr.xray import apply_label_materials, parse_label_materials

    mapping = parse_label_materials(args.label_material)
    labelmap, names = load_segmentation(args.seg, vol)
    out, mats, applied = apply_label_materials(vol, labelmap, names, mapping, defaults=True)
    if not applied:
        raise CtwinError("no label of --seg takes a material (no --label-material entry, and no label named as "
                         "an implant); give --label-material LABEL=MATERIAL")
    progress.report("label materials: " + ", ".join(f"{k}={v}" for k, v in applied.items()))
    xray.overrides, xray.label_materials = mats, applied
    return out
