"""``build``: a twin directory from a CT and its segmentation, or from meshes (SPEC sections 3-4)."""
from __future__ import annotations

HELP = "build a twin directory (meshes, fitted body model, rig, articulated CT, twin.blend) from a CT or from meshes"


def add_arguments(p) -> None:
    p.add_argument("--ct", metavar="PATH", help="CT: .nii/.nii.gz/.nrrd/.mha or a DICOM folder")
    p.add_argument("--seg", metavar="PATH",
                   help="segmentation: multi-label NIfTI (TotalSegmentator v2 ids or a labels.json beside it) "
                        "or a folder of <name>.nii.gz masks")
    p.add_argument("--meshes", metavar="DIR",
                   help="mesh mode, instead of --ct/--seg: a folder of closed per-structure meshes "
                        "(STL/OBJ/PLY, LPS mm, TotalSegmentator names, skin = body surface), "
                        "voxelised into a synthetic CT")
    p.add_argument("--hu", metavar="FILE",
                   help="mesh mode: JSON structure name -> HU, material (soft_tissue, bone, metal, water, "
                        "aluminium, air) or {\"material\": M, \"density\": G_CM3}; default table by kind")
    p.add_argument("--spacing", type=float, metavar="MM",
                   help="mesh mode: voxel size of the synthetic CT (default 3)")
    p.add_argument("--body-model", metavar="PATH", help="a SMPL-format body model (.npz/.pkl); default: built-in")
    p.add_argument("--out", required=True, metavar="DIR", help="twin directory to write")
    p.add_argument("--no-blend", action="store_true", help="skip twin.blend (headless use without Blender)")
    p.add_argument("--force", action="store_true",
                   help="build even when the segmentation does not look like it belongs to the CT "
                        "(bone labels not on bone, labels outside the CT, left and right swapped); "
                        "the problems are recorded in twin.json")


def _finish(args):
    """The build's finishing step: twin.blend (Blender), unless --no-blend."""
    if args.no_blend:
        return None
    from ..operators.twin_blend import finish_build

    return finish_build


def run(args) -> int:
    from ..core.errors import CtwinError

    if args.meshes:
        if args.ct or args.seg:
            raise CtwinError("give either --meshes or --ct with --seg, not both")
        from ..core.twin.twin import build_twin_from_meshes

        build_twin_from_meshes(args.meshes, args.out, body_model_path=args.body_model, hu=args.hu,
                               spacing=args.spacing or 3.0, finish=_finish(args))
        return 0
    if not (args.ct and args.seg):
        raise CtwinError("build needs --ct and --seg (or --meshes DIR for a twin from meshes)")
    if args.hu or args.spacing:
        raise CtwinError("--hu and --spacing apply to mesh mode (--meshes); a CT gives its own")
    from ..core.twin.twin import build_twin

    build_twin(args.ct, args.seg, args.out, body_model_path=args.body_model, finish=_finish(args),
               force=args.force)
    return 0
