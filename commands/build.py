"""``build``: a twin directory from a CT and its segmentation (SPEC sections 3-4)."""
from __future__ import annotations

HELP = "build a twin directory (meshes, fitted body model, rig, articulated CT, twin.blend)"


def add_arguments(p) -> None:
    p.add_argument("--ct", required=True, metavar="PATH", help="CT: .nii/.nii.gz/.nrrd/.mha or a DICOM folder")
    p.add_argument("--seg", required=True, metavar="PATH",
                   help="segmentation: multi-label NIfTI (TotalSegmentator v2 ids or a labels.json beside it) "
                        "or a folder of <name>.nii.gz masks")
    p.add_argument("--body-model", metavar="PATH", help="a SMPL-format body model (.npz/.pkl); default: built-in")
    p.add_argument("--out", required=True, metavar="DIR", help="twin directory to write")
    p.add_argument("--no-blend", action="store_true", help="skip twin.blend (headless use without Blender)")


def run(args) -> int:
    from ..core.twin import build_twin

    build_twin(args.ct, args.seg, args.out, body_model_path=args.body_model, write_blend=not args.no_blend)
    return 0
