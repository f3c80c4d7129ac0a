"""Per-joint errors of registrations recorded by ``bench_register.py --json``: which joints are
wrong, and whether along the beam (the depth one view cannot see) or across it.

    .venv/bin/python benchmarks/diag_register_joints.py --twin DIR RUN.json [RUN2.json ...]

For each run (row) and each limb and trunk joint: the angle (degrees) between the estimated and the
true direction of the joint's bone (the joint to its child joint, world, the twin's armature posed
by each pose vector), and that difference split into its component along the AP view's central ray
(``depth``, mm at the child joint, with the root's error removed) and the component across it
(``plane``). The truth is the case's pose vector, rebuilt from the run's arguments as the benchmark
built it (``random_pose`` with its seed; the presets). With two files, their rows of the same case
side by side (the first file's, then the second's).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from launch import load_package  # noqa: E402

load_package("ctwin")

JOINTS = ("left_hip", "left_knee", "right_hip", "right_knee", "left_shoulder", "left_elbow",
          "right_shoulder", "right_elbow", "spine1", "neck")


def truth_poses(args: dict) -> dict:
    from bench_register import random_pose
    from ctwin.core.rig.poses import PRESETS

    rng = np.random.default_rng(args["seed"])
    out = {f"random_{i}": random_pose(PRESETS["supine_arms_down"], rng) for i in range(args["random"])}
    presets = [p for p in PRESETS if p != "supine_arms_down"] if args["presets"] == ["all"] else \
        ([] if args["presets"] == ["none"] else args["presets"])
    out.update({p: np.asarray(PRESETS[p], dtype=np.float64) for p in presets})
    return out


def joint_errors(arm, est_pose, true_pose, beam) -> dict:
    """{joint: (angle deg, depth mm, plane mm)} of each joint's bone, root error removed."""
    from ctwin.core.body.skeleton import JOINT_INDEX, PARENTS

    pe = arm.posed_joints(est_pose, np.zeros(3))
    pt = arm.posed_joints(true_pose, np.zeros(3))
    out = {}
    for name in JOINTS:
        j = JOINT_INDEX[name]
        child = int(np.flatnonzero(PARENTS == j)[0])
        ve, vt = pe[child] - pe[j], pt[child] - pt[j]
        ang = np.degrees(np.arccos(np.clip(ve @ vt / np.linalg.norm(ve) / np.linalg.norm(vt), -1, 1)))
        d = ve - vt
        depth = float(d @ beam)
        out[name] = (float(ang), depth, float(np.linalg.norm(d - depth * beam)))
    return out


def main() -> int:
    from ctwin.core.twin.twin import load_twin

    ap = argparse.ArgumentParser()
    ap.add_argument("--twin", required=True)
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args()
    twin = load_twin(Path(a.twin))
    arm = twin.binding.armature
    beam = twin.default_views(size=64)["ap"].ray_direction
    tables = []
    for f in a.runs:
        d = json.loads(Path(f).read_text())
        truth = truth_poses(d["args"])
        tables.append({r["case"]: (r, joint_errors(arm, np.asarray(r["pose"]), truth[r["case"]], beam))
                       for r in d["rows"]})
    print(f"beam (AP central ray) {np.round(beam, 3).tolist()}; per joint: bone angle error deg / "
          "depth error mm (along the beam) / in-plane error mm")
    for case in tables[0]:
        cols = [t[case] for t in tables if case in t]
        print(f"{case}: bone_err mean " + " -> ".join(f"{r['mean']:.2f}" for r, _ in cols))
        for name in JOINTS:
            cells = "   ".join(f"{e[name][0]:6.1f} {e[name][1]:7.1f} {e[name][2]:6.1f}" for _, e in cols)
            print(f"  {name:<15} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
