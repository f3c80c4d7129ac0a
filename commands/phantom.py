"""``phantom``: the full-body CT phantom with ground truth (SPEC 3).

Writes ``ct.nii.gz`` (int16 HU), ``seg.nii.gz`` (label ids) with ``labels.json``, and ``truth.json``
(pose, transl, anatomical joints, per-bone 4x4 world transforms) into ``--out``.
"""
from __future__ import annotations

HELP = "write the full-body CT phantom (ct, seg, labels, truth) at a pose"


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--pose", default="supine_arms_down", metavar="NAME|FILE",
                   help="a preset name or a pose file (.json/.npz with pose [, transl], or a truth.json); "
                        "default supine_arms_down")
    p.add_argument("--spacing", type=float, default=3.0, metavar="MM", help="voxel size in mm (default 3; 1.5 option)")
    p.add_argument("--seed", type=int, default=0, help="body shape and texture seed (0 = default adult)")
    p.add_argument("--noise", type=float, default=0.0, metavar="HU", help="Gaussian noise sigma in HU (default 0)")
    p.add_argument("--skeleton-variant", type=int, default=None, metavar="SEED",
                   help="build the anatomy on a variant rest skeleton (bone directions turned by up to 15 "
                        "degrees, lengths changed by up to 10 %%), as another body model's would be; "
                        "truth.json records its rest_joints")


def run(args) -> int:
    from ..core.phantom.phantom import write_phantom
    from ..core.progress import step
    from ..core.safety import check_number, check_out_dir, clean_stale_partials

    from ..core.rig.poses import resolve_pose
    from ..core.safety import check_pose_values

    check_out_dir(args.out)
    clean_stale_partials(args.out)
    pz = resolve_pose(args.pose)
    check_pose_values(pz["pose"], pz.get("transl"), what=f"pose {args.pose}")
    check_number("--spacing", args.spacing, 0.5, 50.0, why="voxel size in mm")
    check_number("--noise", args.noise, 0.0, 1000.0, why="HU")

    with step("phantom"):
        ph = write_phantom(args.out, pose=args.pose, spacing=args.spacing, seed=args.seed, noise_hu=args.noise,
                           skeleton_variant=args.skeleton_variant)
    n = ph.ct.shape
    print(f"wrote {args.out}: ct {n[0]}x{n[1]}x{n[2]} at {args.spacing:g} mm, {len(ph.labels)} labels, "
          f"{len(ph.truth['bones'])} bones", file=__import__("sys").stderr)
    return 0
