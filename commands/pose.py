"""``ctwin pose --twin DIR --pose FILE --out DIR``: the twin's meshes posed, as PLY in world mm.

Bones move rigidly with their bone, soft structures by the transferred LBS weights, and
``body_model.ply`` is the fitted body-model surface moved by the same joint deltas as the bones,
blended with the body model's weights as dual quaternions (``Twin.posed_body``).
Also writes ``pose.json``: the pose, the translation, and each rigid structure's 4x4 transform
(acquisition world mm -> posed world mm) and any joint-range warnings.
"""
from __future__ import annotations


import numpy as np

HELP = "write the twin's meshes posed by a pose file (PLY, world mm)"
DESCRIPTION = ("Pose a twin directory: every structure of meshes/ and the fitted body-model surface, "
               "posed by a pose file (a truth.json, a SMPL pose .npz/.json, or a preset name; retargeted "
               "from the file's rest_joints, solved from world joints, or relative: docs/poses.md), "
               "written as PLY in world mm, with pose.json beside them.")


def add_arguments(parser):
    parser.add_argument("--twin", required=True, help="twin directory (ctwin build output)")
    parser.add_argument("--pose", required=True, help="pose file (truth.json, .npz/.json with pose[, transl]) or preset")
    parser.add_argument("--out", required=True, help="output directory for the posed PLY files")


def pose_twin(twin, pose, transl_mm=None) -> tuple[dict, dict]:
    """Posed meshes {name: Mesh} (``body_model`` included) and the pose.json record.

    ``twin`` is a ``core.twin.twin.Twin`` (``load_twin``): structures and skin by the binding, the body
    model by its own LBS with the fitted betas and residual.
    """
    import warnings

    from ..core.rig.pose import check_joint_limits

    bad = check_joint_limits(pose)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported once above
        posed = twin.posed_meshes(pose, transl_mm)
    posed["body_model"] = twin.posed_body(pose, transl_mm)
    t = twin.transl0_mm if transl_mm is None else np.asarray(transl_mm, dtype=np.float64)
    record = {
        "pose": np.asarray(pose, dtype=np.float64).reshape(72),
        "transl_mm": t,
        "bones": dict(sorted(twin.bone_transforms(pose, transl_mm).items())),
        "binding": twin.binding.table(),
        "joint_range_warnings": bad,
    }
    return posed, record


def run(args) -> int:
    from ..core.fileio import write_json
    from ..core.meshes.mesh import write_ply
    from ..core.progress import report, step
    from ..core.safety import check_out_dir, clean_stale_partials
    from ..core.twin.twin import load_twin

    out = check_out_dir(args.out)
    clean_stale_partials(out)
    with step("reading the twin"):
        twin = load_twin(args.twin)
    pose, transl = twin.resolve_pose(args.pose)
    with step(f"posing {len(twin.meshes())} structures"):
        posed, record = pose_twin(twin, pose, transl)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, mesh) in enumerate(sorted(posed.items())):
        write_ply(mesh, out / f"{name}.ply")
        report(f"wrote {name}.ply", (i + 1) / len(posed))
    write_json(out / "pose.json", record)
    report(f"posed meshes written to {out}")
    return 0
