"""The ctwin N-panel's workflow, driven through bpy.ops in background mode on the phantom:
Import CT Anatomy -> Fit Body Model -> Build Rig -> Load Motion -> X-ray Camera -> Render DRR ->
Render Animation. Each step is checked for what it creates."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extension():
    """The whole extension registered (or left as the session registered it)."""
    import ctwin
    from ctwin.blender.scene import ensure_registered

    ensure_registered()
    yield ctwin


def test_panel_lists_every_step(extension):
    import bpy

    assert hasattr(bpy.types, "CTWIN_PT_workflow")
    for op in ("import_ct_anatomy", "import_anatomy_meshes", "fit_body_model", "build_rig", "load_motion",
               "xray_camera", "render_drr", "render_animation"):
        assert hasattr(bpy.ops.ctwin, op), op


def test_workflow_through_operators(extension, coarse_phantoms, tmp_path):
    import bpy

    from ctwin.blender.scene import ensure_registered
    from ctwin.core.rig.motion import write_motion_file
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.drr.projector import read_frame

    src = coarse_phantoms["supine_arms_down"]
    bpy.ops.wm.read_factory_settings(use_empty=True)
    ensure_registered()
    scene = bpy.context.scene

    # 1. import
    assert bpy.ops.ctwin.import_ct_anatomy(filepath=str(src / "ct.nii.gz"),
                                           seg_path=str(src / "seg.nii.gz")) == {"FINISHED"}
    for col in ("Skeleton", "Organs", "Skin"):
        assert len(bpy.data.collections[col].objects) > 0, col
    femur = bpy.data.objects["femur_left"]
    assert femur["label_id"] == 75 and femur["hu_mean"] > 150

    # 2. fit
    assert bpy.ops.ctwin.fit_body_model() == {"FINISHED"}
    body = bpy.data.objects["body_model"]
    assert len(body.data.vertices) > 1000 and scene.ctwin.fit() is not None

    # 3. rig
    assert bpy.ops.ctwin.build_rig() == {"FINISHED"}
    arm = bpy.data.objects["ctwin_rig"]
    assert arm.type == "ARMATURE" and "left_knee" in arm.data.bones
    assert [vg.name for vg in femur.vertex_groups] == ["left_hip"]
    assert femur.modifiers["ctwin_armature"].object == arm

    # 4. motion: 3 frames bending the knees
    n = 3
    poses = np.zeros((n, 72))
    for f in range(n):
        poses[f, 3:] = (f / (n - 1)) * np.asarray(PRESETS["knee_flexion"])[3:]
    motion = tmp_path / "knees.npz"
    write_motion_file(motion, poses, np.zeros((n, 3)), scene.render.fps)
    assert bpy.ops.ctwin.load_motion(filepath=str(motion)) == {"FINISHED"}
    assert scene.frame_end - scene.frame_start + 1 == n
    assert arm.animation_data.action is not None

    # 5. X-ray camera
    assert bpy.ops.ctwin.xray_camera(view="lat_left", pixels=24) == {"FINISHED"}
    assert scene.camera is not None and scene.render.engine == "CTWIN_DRR"
    assert scene.render.resolution_x == 24 and "xray_cone" in bpy.data.objects

    # 6. render DRR of the current frame -> image datablock and frame files
    scene.render.filepath = str(tmp_path / "frames" / "f_")
    scene.ctwin.device = "cpu"
    scene.frame_set(scene.frame_start)
    assert bpy.ops.ctwin.render_drr() == {"FINISHED"}
    im = bpy.data.images["ctwin DRR"]
    assert tuple(im.size) == (24, 24)
    px = np.empty(24 * 24 * 4, np.float32)
    im.pixels.foreach_get(px)
    assert px.reshape(-1, 4)[:, 0].max() > 0.5

    # 7. render the animation: one DRR per frame, and the bent knees change the image
    assert bpy.ops.ctwin.render_animation() == {"FINISHED"}
    first, sc0 = read_frame(tmp_path / "frames" / f"f_{scene.frame_start:04d}")
    last, _ = read_frame(tmp_path / "frames" / f"f_{scene.frame_end:04d}")
    assert sc0["size_px"] == [24, 24]
    assert np.abs(first - last).max() > 0.05 * first.max()

    # 8. realistic physics with a label material on the imported segmentation, posed by the rig
    assert bpy.ops.ctwin.xray_camera(view="ap", pixels=64) == {"FINISHED"}  # pixels finer than the femur
    s = scene.ctwin_drr
    s.kvp, s.value = 80.0, "intensity"
    scene.frame_set(scene.frame_end)
    scene.render.filepath = str(tmp_path / "kv" / "f_")
    assert bpy.ops.ctwin.render_drr() == {"FINISHED"}
    plain, _ = read_frame(tmp_path / "kv" / f"f_{scene.frame_end:04d}")
    assert bpy.ops.ctwin.label_material_add(label="femur_left", material="titanium") == {"FINISHED"}
    scene.render.filepath = str(tmp_path / "ti" / "f_")
    assert bpy.ops.ctwin.render_drr() == {"FINISHED"}
    ti, sc = read_frame(tmp_path / "ti" / f"f_{scene.frame_end:04d}")
    assert sc["label_materials"] == {"femur_left": "titanium"}
    assert (ti < 0.8 * plain).any() and (ti <= plain + 1e-6).all()


def test_mesh_workflow_renders_the_voxelised_anatomy(extension, twin_dir, tmp_path):
    """Mesh mode in Blender: anatomy meshes with no CT -> fit -> rig -> the render engine renders
    the voxelised anatomy (at the rest pose exactly the static DRR of ``scene_mesh_volume``), and
    a bent knee moves the image."""
    import bpy

    from ctwin.blender.scene import anatomy_objects, ensure_registered
    from ctwin.core.drr.carm import Geometry
    from ctwin.core.drr.projector import read_frame, render_drr
    from ctwin.render.providers import scene_mesh_volume

    bpy.ops.wm.read_factory_settings(use_empty=True)
    ensure_registered()
    scene = bpy.context.scene
    mesh_dir = twin_dir / "meshes"
    files = [{"name": p.name} for p in sorted(mesh_dir.glob("*.ply")) if p.stem != "body_model"]
    assert bpy.ops.ctwin.import_anatomy_meshes(directory=str(mesh_dir), files=files) == {"FINISHED"}
    assert not scene.ctwin.ct_path
    assert bpy.ops.ctwin.fit_body_model() == {"FINISHED"}
    assert bpy.ops.ctwin.build_rig() == {"FINISHED"}
    assert bpy.ops.ctwin.xray_camera(view="ap", pixels=24) == {"FINISHED"}
    scene.ctwin.device = "cpu"
    scene.render.filepath = str(tmp_path / "m_")
    scene.frame_set(scene.frame_start)
    assert bpy.ops.ctwin.render_drr() == {"FINISHED"}
    img, sc = read_frame(tmp_path / f"m_{scene.frame_start:04d}")
    ref = render_drr(scene_mesh_volume(anatomy_objects()).ct, Geometry.from_sidecar(sc), device="cpu")
    assert img.max() > 0.5
    assert np.abs(img - ref).max() <= 1e-3 * ref.max() + 1e-4

    arm = bpy.data.objects["ctwin_rig"]
    knee = arm.pose.bones["left_knee"]
    knee.rotation_mode = "XYZ"
    knee.rotation_euler = (1.2, 0.0, 0.0)
    scene.render.filepath = str(tmp_path / "b_")
    assert bpy.ops.ctwin.render_drr() == {"FINISHED"}
    bent, _ = read_frame(tmp_path / f"b_{scene.frame_start:04d}")
    assert np.abs(bent - img).max() > 0.05 * img.max()
