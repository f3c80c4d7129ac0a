"""Rig benchmark: posing accuracy against the phantom's truth, posing speed, motion import speed.

    .venv/bin/python benchmarks/bench_pose.py [--spacing MM] [--skip-phantom] [--skip-blender]

1. Rig maths against phantom truth (bone_err_mm, with the TRUE joints and poses, i.e.
   the rig alone, without the fit's error): the phantom at the acquisition pose A
   (supine_arms_down) and at every other preset B; the armature is built from truth A's joints,
   pose and translation; each skeletal label's voxel centres at A are bound (core.rig.binding) and
   posed with ``bone_transforms`` to B; bone_err_mm = mean over the label's voxel centres v of
   |posed(v) - T_B inv(T_A) v| (SPEC section 6), reported as mean and max over bones. A spine-bending
   pose is added: there the phantom moves each vertebra with one SMPL segment while the twin
   blends neighbouring segments, so the error measures that modelling difference.
2. ``pose_meshes`` speed on the built-in body-model surface (soft, LBS) plus bones.
3. Motion import into Blender as keyframes: 100 and 1000 frames (AMASS-style .npz).
Prints measured numbers only.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

from ctwin.core import progress
from ctwin.core.rig.armature import build_armature  # noqa: E402
from ctwin.core.rig.binding import bind_structures  # noqa: E402
from ctwin.core.volumes.labels import is_skeletal  # noqa: E402
from ctwin.core.rig.pose import bone_transforms, pose_meshes  # noqa: E402


class _Cloud:
    def __init__(self, v):
        self.vertices = v
        self.faces = np.zeros((0, 3), dtype=np.int64)


def _spine_bend_pose(base):
    p = np.asarray(base, dtype=np.float64).reshape(24, 3).copy()
    for j, a in ((3, 0.25), (6, 0.2), (9, 0.2), (12, 0.15), (15, 0.1)):  # flex the trunk forward
        p[j, 0] += a
    return p.reshape(72)


def bench_phantom(spacing: float) -> None:
    from ctwin.core.phantom.phantom import generate_phantom
    from ctwin.core.rig.poses import PRESETS

    t0 = time.perf_counter()
    pa = generate_phantom("supine_arms_down", spacing=spacing)
    ta = pa.truth
    seg = pa.seg
    clouds = {}
    for lid, name in pa.labels.items():
        if is_skeletal(name) and name in ta["bones"]:
            clouds[name] = _Cloud(seg.voxel_centers_world(seg.data == lid))
    arm = build_armature(np.asarray(ta["joints"]), np.asarray(ta["pose"]), np.asarray(ta["transl"]))
    binding = bind_structures(clouds, armature=arm)
    print(f"phantom A at {spacing:g} mm: {len(clouds)} skeletal labels, {time.perf_counter() - t0:.1f} s")
    targets = {n: p for n, p in PRESETS.items() if n != "supine_arms_down"}
    targets["spine_bend (not a preset)"] = _spine_bend_pose(PRESETS["supine_arms_down"])
    print(f"{'target pose':28s} {'bone_err mean':>14s} {'max':>8s}  worst bone")
    for name, pose in targets.items():
        tb = generate_phantom(pose, spacing=spacing).truth
        bt = bone_transforms(binding, pose, np.asarray(tb["transl"]))
        errs = {}
        for n, c in clouds.items():
            if n not in tb["bones"]:
                continue
            truth = np.asarray(tb["bones"][n]) @ np.linalg.inv(np.asarray(ta["bones"][n]))
            v = c.vertices
            d = v @ bt[n][:3, :3].T + bt[n][:3, 3] - (v @ truth[:3, :3].T + truth[:3, 3])
            errs[n] = float(np.linalg.norm(d, axis=1).mean())
        worst = max(errs, key=errs.get)
        print(f"{name:28s} {np.mean(list(errs.values())):11.3g} mm {errs[worst]:8.3g}  {worst}")


def bench_pose_speed() -> None:
    from ctwin.core.body.body_model import load_body_model
    from ctwin.core.meshes.mesh import Mesh
    from ctwin.core.rig.poses import PRESETS

    bm = load_body_model()
    pose = PRESETS["supine_arms_down"]
    transl = np.array([0.0, 100.0, -800.0])
    verts, joints = bm.forward(pose=pose, transl_mm=transl)
    meshes = {"skin": Mesh(verts, bm.faces, "skin")}
    rng = np.random.default_rng(0)
    for name in ("femur_left", "femur_right", "tibia_left", "humerus_left", "skull", "hip_left", "sacrum"):
        meshes[name] = Mesh(joints[rng.integers(24)] + rng.normal(0, 20, (20000, 3)), np.zeros((0, 3)), name)
    fit = {"pose": pose, "betas": np.zeros(bm.num_betas), "transl_mm": transl, "residual_mm": None,
           "joints_mm": joints}
    t0 = time.perf_counter()
    binding = bind_structures(meshes, bm, fit)
    t_bind = time.perf_counter() - t0
    nv = sum(len(m.vertices) for m in meshes.values())
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        pose_meshes(binding, meshes, PRESETS["sitting"], check_limits=False)
    t_pose = (time.perf_counter() - t0) / reps
    print(f"bind: {t_bind:.2f} s for {len(verts)} soft vertices (weight transfer) + bones")
    print(f"pose_meshes: {1000 * t_pose:.1f} ms per pose for {nv} vertices ({len(verts)} LBS)")


def bench_motion_import() -> None:
    import bpy  # noqa: F401

    from ctwin.core.rig.motion import write_motion_file
    from ctwin.core.body.skeleton import SUPINE_GLOBAL_ORIENT
    from ctwin.core.body.body_model import load_body_model
    from ctwin.core.rig.poses import PRESETS
    from ctwin.rig.animation import load_motion_keyframes
    from ctwin.rig.armature import armature_pose_vector, create_armature

    bm = load_body_model()
    pose = PRESETS["supine_arms_down"]
    _, joints = bm.forward(pose=pose, transl_mm=np.zeros(3))
    binding = bind_structures({}, armature=build_armature(joints, pose, np.zeros(3)))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (100, 1000):
            bpy.ops.wm.read_factory_settings(use_empty=True)
            arm_obj = create_armature(binding)
            poses = np.zeros((n, 156))
            poses[:, :3] = SUPINE_GLOBAL_ORIENT
            poses[:, 3:66] = 0.1 * np.sin(np.linspace(0, 6, n))[:, None] * rng.normal(0, 1, 63)
            path = Path(tmp) / f"clip{n}.npz"
            write_motion_file(path, poses, np.c_[np.linspace(0, 1, n), np.zeros((n, 2))], 120.0)
            scene = bpy.context.scene
            scene.render.fps = 120
            t0 = time.perf_counter()
            _, count = load_motion_keyframes(arm_obj, path, scene)
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            for f in range(1, 21):
                scene.frame_set(f)
                armature_pose_vector(arm_obj)
            dr = (time.perf_counter() - t0) / 20
            print(f"motion import: {count} frames as keyframes in {dt:.3f} s; "
                  f"frame_set + armature_pose_vector {1000 * dr:.2f} ms per frame")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing", type=float, default=4.0, help="phantom voxel size (mm)")
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument("--skip-blender", action="store_true")
    a = ap.parse_args()
    progress.set_quiet(True)
    if not a.skip_phantom:
        bench_phantom(a.spacing)
    bench_pose_speed()
    if not a.skip_blender:
        bench_motion_import()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
