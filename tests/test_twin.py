"""End to end: build a twin from the phantom, pose it, render it (CLI, core and Blender engine), score it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_twin_directory_layout(twin_dir):
    from ctwin.core.volumes.labels import is_skeletal

    meta = json.loads((twin_dir / "twin.json").read_text())
    for key in ("inputs", "body_model", "fit", "binding", "software", "structures"):
        assert key in meta
    assert meta["body_model"]["builtin"] is True
    for key in ("chamfer_mm", "enclosure_pct", "pose", "betas", "transl_mm", "joints_mm"):
        assert key in meta["fit"]
    meshes = {p.stem for p in (twin_dir / "meshes").glob("*.ply")}
    assert {"body_model", "skin"} <= meshes
    assert set(meta["structures"]) <= meshes
    skeletal = [n for n in meta["structures"] if is_skeletal(n)]
    assert len(skeletal) > 50
    # every bone is bound rigidly to exactly one armature bone; soft tissue is smooth
    for n in skeletal:
        assert meta["binding"][n] not in ("smooth", None)
    assert meta["binding"]["skin"] == "smooth"
    for f in ("fit.npz", "fit.json", "binding.npz", "twin.blend", "volumes/ct.nii.gz",
              "volumes/labelmap.nii.gz", "volumes/labels.json"):
        assert (twin_dir / f).is_file(), f
    assert not list(twin_dir.parent.glob(".twin.pid*"))


def test_acquisition_pose_renders_like_the_ct(twin_dir):
    """The articulated path at the identity pose reproduces the original CT's DRR (SPEC 6)."""
    from ctwin.core.meshes.metrics import drr_similarity
    from ctwin.core.drr.projector import render_drr
    from ctwin.core.twin.twin import load_twin

    twin = load_twin(twin_dir)
    for name, g in twin.default_views(size=64).items():
        ref = render_drr(twin.ct, g, device="cpu")
        test = twin.render(g, device="cpu")
        s = drr_similarity(test, ref)
        assert s["ssim"] >= 0.995, (name, s)
        assert s["psnr_db"] >= 45.0, (name, s)


def test_posed_bones_stay_rigid_and_move(twin_dir):
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.twin.twin import load_twin

    twin = load_twin(twin_dir)
    posed = twin.posed_meshes(PRESETS["hip_flexion"])
    rest = twin.meshes()
    moved = 0
    for name in ("femur_left", "tibia_left", "vertebrae_L3"):
        a, b = rest[name].vertices, posed[name].vertices
        # rigid: pairwise distances are kept
        i = np.random.default_rng(0).choice(len(a), size=min(200, len(a)), replace=False)
        da = np.linalg.norm(a[i, None] - a[None, i], axis=2)
        db = np.linalg.norm(b[i, None] - b[None, i], axis=2)
        assert np.abs(da - db).max() < 1e-6
        moved += np.abs(a - b).max() > 1.0
    assert moved >= 2  # the flexed leg moved


def test_render_command_writes_twin_frames(twin_dir, tmp_path):
    out = tmp_path / "frames"
    r = subprocess.run([str(ROOT / "ctwin"), "render", "--twin", str(twin_dir), "--size", "32",
                        "--pose", "hip_flexion", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for view in ("ap", "lateral"):
        sc = json.loads((out / f"{view}_0000.json").read_text())
        assert sc["size_px"] == [32, 32] and sc["value"] == "line_integral"
        import tifffile

        img = tifffile.imread(out / f"{view}_0000.tif")
        assert img.dtype == np.float32 and img.shape == (32, 32) and img.max() > 0


def test_blender_animation_matches_cli(twin_dir, tmp_path):
    """A keyframed motion rendered by the Blender engine equals `ctwin render` for the same frames."""
    import bpy

    from ctwin.core.drr.carm import Geometry
    from ctwin.core.rig.motion import write_motion_file
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.drr.projector import read_frame
    from ctwin.core.twin.twin import render_twin
    from ctwin.rig.animation import load_motion_keyframes
    from ctwin.blender.scene import ensure_registered, twin_armature_object

    n = 3
    start, end = np.asarray(PRESETS["supine_arms_down"]), np.asarray(PRESETS["knee_flexion"])
    poses = np.zeros((n, 72))  # the motion's own root stays fixed (retargeted onto the twin)
    for f in range(n):
        a = f / (n - 1)
        poses[f, 3:] = (1 - a) * start[3:] + a * end[3:]
    motion = tmp_path / "motion.npz"
    write_motion_file(motion, poses, np.zeros((n, 3)), 24.0)

    ensure_registered()
    bpy.ops.wm.open_mainfile(filepath=str(twin_dir / "twin.blend"))
    scene = bpy.context.scene
    assert scene.render.engine == "CTWIN_DRR"
    arm = twin_armature_object(scene)
    load_motion_keyframes(arm, str(motion), scene=scene, frame_start=0)
    scene.frame_start, scene.frame_end = 0, n - 1
    scene.render.resolution_x = scene.render.resolution_y = 24
    scene.render.filepath = str(tmp_path / "blender" / "f_")
    scene.ctwin.device = "cpu"
    bpy.ops.render.render(animation=True)

    cli = tmp_path / "cli"
    for f in range(n):
        img_b, sc = read_frame(tmp_path / "blender" / f"f_{f:04d}")
        g = Geometry.from_sidecar(sc)
        render_twin(twin_dir, cli, motion=motion, frames=(f, f + 1), fps=24.0, geometry=g, device="cpu")
        img_c, _ = read_frame(cli / f"view_{f:04d}")
        assert img_b.shape == img_c.shape == (24, 24)
        assert np.abs(img_b - img_c).max() <= 1e-3 * img_c.max() + 1e-4, f
    # the motion really moved the legs between the first and the last frame
    first, _ = read_frame(cli / "view_0000")
    last, _ = read_frame(cli / f"view_{n - 1:04d}")
    assert np.abs(first - last).max() > 0.05 * first.max()


def test_evaluate_against_truth(twin_dir, coarse_phantoms, tmp_path):
    out = tmp_path / "metrics.json"
    r = subprocess.run([str(ROOT / "ctwin"), "evaluate", "--twin", str(twin_dir), "--truth",
                        str(coarse_phantoms["hip_flexion"]), "--size", "64", "--device", "cpu",
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["acquisition"]["ssim"] >= 0.995
    t = m["target"]
    # looser bounds than the targets (mean 3, max 8 mm, enclosure 99 %; met at 3 mm by
    # benchmarks/bench_twin.py): this phantom is at 8 mm, where the bone landmarks are coarser
    # (measured here: bone mean 5.4, max 18.4 mm, enclosure 97.7 %, SSIM 0.996-0.997)
    assert t["enclosure_pct"] >= 96.0, t["enclosure_pct"]
    assert len(t["bone_err_mm"]["per_bone"]) > 50
    assert t["bone_err_mm"]["mean"] <= 8.0 and t["bone_err_mm"]["max"] <= 25.0, t["bone_err_mm"]
    assert set(t["drr"]) == {"ap", "lateral"}
    for v in t["drr"].values():
        assert v["ssim"] >= 0.97 and v["psnr_db"] >= 30.0, v
