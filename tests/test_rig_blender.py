"""Blender rig: armature from the binding, bulk vertex groups, posing matches the core, keyframes."""
import time

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from ctwin.blender import data as bl_data  # noqa: E402
from ctwin.core.rig.armature import build_armature  # noqa: E402
from ctwin.core.rig.binding import bind_structures  # noqa: E402
from ctwin.core.rig.motion import write_motion_file  # noqa: E402
from ctwin.core.rig.pose import bone_deltas, pose_meshes  # noqa: E402
from ctwin.core.body.skeleton import JOINT_NAMES, PARENTS, forward_kinematics, rodrigues  # noqa: E402

from rig_synth import (REST_JOINTS_MM, FakeBodyModel, Mesh, acquisition_pose, box, target_pose,  # noqa: E402
                       truth_scene)

T_A = np.array([5.0, 150.0, -800.0])


@pytest.fixture(scope="module")
def twin():
    rng = np.random.default_rng(7)
    pa = acquisition_pose(rng)
    ja, _, meshes = truth_scene(pa, T_A)
    a, _ = forward_kinematics(pa, REST_JOINTS_MM)
    a[:, :3, 3] += T_A
    for name, y, j in (("vertebrae_L3", 60.0, 0), ("vertebrae_T12", 160.0, 3), ("vertebrae_T6", 270.0, 6)):
        v, f = box((0, y, -30), (15, 8, 15))
        meshes[name] = Mesh(v @ a[j][:3, :3].T + a[j][:3, 3], f, name)
    v, f = box((-60, 200, 30), (50, 40, 40), n=5)
    meshes["liver"] = Mesh(v @ a[6][:3, :3].T + a[6][:3, 3], f, "liver")
    v, f = box(0.5 * (REST_JOINTS_MM[4] + REST_JOINTS_MM[1]), (70, 200, 70), n=6)  # thigh skin over the hip
    meshes["skin"] = Mesh(v @ a[1][:3, :3].T + a[1][:3, 3], f, "skin")
    fit = {"pose": pa, "betas": None, "transl_mm": T_A, "residual_mm": None, "joints_mm": ja}
    return dict(pa=pa, meshes=meshes, binding=bind_structures(meshes, FakeBodyModel(), fit))


def _scene(twin):
    from ctwin.rig.armature import bind_meshes, create_armature

    arm_obj = create_armature(twin["binding"])
    objs = {n: bl_data.mesh_object(n, m.vertices, m.faces) for n, m in twin["meshes"].items()}
    bind_meshes(arm_obj, objs, twin["binding"])
    return arm_obj, objs


def _evaluated_mm(obj):
    dg = bpy.context.evaluated_depsgraph_get()
    ev = obj.evaluated_get(dg)
    me = ev.to_mesh()
    co = np.empty(3 * len(me.vertices), dtype=np.float32)
    me.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3).astype(np.float64)
    mw = np.array(ev.matrix_world)
    ev.to_mesh_clear()
    return (co @ mw[:3, :3].T + mw[:3, 3]) * 1000.0


def test_armature_bones_and_binding_table(twin):
    arm_obj, objs = _scene(twin)
    b = twin["binding"]
    arm = b.armature
    names = [bone.name for bone in arm_obj.data.bones if bone.use_deform]
    assert set(names) == set(JOINT_NAMES) | {"vertebrae_L3", "vertebrae_T12", "vertebrae_T6"}
    assert set(names) == set(b.bone_names())
    for i, n in enumerate(JOINT_NAMES):
        bone = arm_obj.data.bones[n]
        ml = np.array(bone.matrix_local)
        assert np.allclose(ml[:3, 3] * 1000, arm.heads[i], atol=1e-3)
        assert np.allclose(ml[:3, :3], arm.frames[i], atol=1e-4), n  # rolls as the core defines them
        _, roll = bone.AxisRollFromMatrix(bone.matrix_local.to_3x3())
        assert abs(np.angle(np.exp(1j * (roll - arm.rolls[i])))) < 1e-4, n  # Blender's roll = the core's
        assert (bone.parent.name if bone.parent else None) == (None if i == 0 else JOINT_NAMES[PARENTS[i]])
    # rigid structures: exactly one vertex group, weight 1 everywhere
    fem = objs["femur_left"]
    assert [g.name for g in fem.vertex_groups] == ["left_hip"]
    assert np.allclose(bl_data.vertex_group_weights(fem, "left_hip"), 1.0)
    assert [g.name for g in objs["vertebrae_T6"].vertex_groups] == ["vertebrae_T6"]
    assert dict(arm_obj["ctwin_binding"])["tibia_left"] == "left_knee"
    assert fem.parent == arm_obj and fem.modifiers["ctwin_armature"].object == arm_obj


def test_blender_pose_matches_core(twin):
    from ctwin.rig.armature import armature_pose, bone_world_matrices_mm, set_pose

    arm_obj, objs = _scene(twin)
    b = twin["binding"]
    pb = target_pose(np.random.default_rng(8))
    tb = T_A + np.array([20.0, -10.0, 40.0])
    set_pose(arm_obj, pb, tb)
    bpy.context.view_layer.update()
    # bones (vertebra bones through their Child Of constraints included) match the core's deltas
    bw = bone_world_matrices_mm(arm_obj)
    bd = bone_deltas(b, pb, tb)
    for name, d in bd.items():
        rest = np.array(arm_obj.data.bones[name].matrix_local)
        rest[:3, 3] *= 1000.0
        assert np.allclose(bw[name], d @ rest, atol=1e-3), name
    # deformed meshes match core.rig.pose.pose_meshes
    core = pose_meshes(b, twin["meshes"], pb, tb)
    for name, obj in objs.items():
        err = np.abs(_evaluated_mm(obj) - core[name].vertices).max()
        assert err < 0.01, (name, err)
    # read the pose back as 72 floats (+ translation)
    pose, transl = armature_pose(arm_obj)
    assert np.allclose(rodrigues(pose.reshape(24, 3)), rodrigues(pb.reshape(24, 3)), atol=1e-5)
    assert np.allclose(transl, tb, atol=1e-3)


def test_motion_keyframes_fast_and_exact(twin, tmp_path):
    from ctwin import blender
    from ctwin.rig import register, unregister
    from ctwin.rig.armature import armature_pose_vector
    from ctwin.rig.animation import load_motion_keyframes
    from ctwin.rig.operators import CTWIN_OT_load_motion

    mine = not CTWIN_OT_load_motion.is_registered  # leave a session-wide registration as it is
    if mine:
        blender.register()  # the scene state (scene.ctwin) Load Motion reads
    register()
    try:
        arm_obj, objs = _scene(twin)
        rng = np.random.default_rng(9)
        n = 100
        poses = np.zeros((n, 72))
        poses[:, :3] = (np.pi / 2, 0, 0)
        base = rng.normal(0, 0.15, 69)
        poses[:, 3:] = base + 0.3 * np.sin(np.linspace(0, 2 * np.pi, n))[:, None] * rng.normal(0, 0.5, 69)
        trans = np.c_[np.linspace(0, 0.5, n), np.zeros(n), np.full(n, 0.9)]
        path = tmp_path / "clip.npz"
        write_motion_file(path, poses, trans, 30.0)
        scene = bpy.context.scene
        scene.render.fps, scene.render.fps_base = 30, 1.0
        t0 = time.perf_counter()
        _, count = load_motion_keyframes(arm_obj, path, scene)
        seconds = time.perf_counter() - t0
        assert count == n and seconds < 5.0, seconds
        assert (scene.frame_start, scene.frame_end) == (1, n)
        from ctwin.core.rig.motion import load_motion

        arm = build_armature(np.asarray(arm_obj["ctwin_joints_mm"]).reshape(24, 3), arm_obj["ctwin_pose0"],
                             arm_obj["ctwin_transl0_mm"])
        expect, expect_t = load_motion(path, fps=30, twin_pose=arm.pose0, twin_transl_mm=arm.transl0_mm)
        for k in (0, 37, 99):
            scene.frame_set(1 + k)
            got = armature_pose_vector(arm_obj)
            assert np.allclose(rodrigues(got.reshape(24, 3)), rodrigues(expect[k].reshape(24, 3)), atol=1e-4), k
        # the UI: binding table rows and the Load Motion operator
        bind_items = [(it.label, it.bone) for it in arm_obj.ctwin_binding_items]
        assert ("femur_left", "left_hip") in bind_items and ("liver", "smooth") in bind_items
        bpy.context.view_layer.objects.active = arm_obj
        assert bpy.ops.ctwin.load_motion(filepath=str(path)) == {"FINISHED"}
        # Load Motion's Source Model: the frames are retargeted from that model's skeleton
        from ctwin.core.phantom.anatomy import build_anatomy
        from ctwin.core.body.body_model import load_body_model
        from ctwin.core.phantom.phantom import rest_skeleton

        model = tmp_path / "variant_model.npz"
        np.savez(model, v_template=np.asarray(rest_skeleton(build_anatomy(0), 3)[0]) / 1000.0,
                 J_regressor=np.eye(24), kintree_table=np.vstack([np.where(PARENTS < 0, 4294967295, PARENTS),
                                                                  np.arange(24)]))
        assert bpy.ops.ctwin.load_motion(filepath=str(path), source_model=str(model)) == {"FINISHED"}
        want = load_motion(path, fps=30, twin_pose=arm.pose0, twin_transl_mm=arm.transl0_mm, check_limits=False,
                           source=(model, load_body_model().rest()[1] * 1000.0))[0]
        scene.frame_set(1 + 37)
        got = rodrigues(armature_pose_vector(arm_obj).reshape(24, 3))
        assert np.allclose(got, rodrigues(want[37].reshape(24, 3)), atol=1e-4)
        assert not np.allclose(got, rodrigues(expect[37].reshape(24, 3)), atol=1e-2)
    finally:
        if mine:
            unregister()
            blender.unregister()


def test_build_rig_binds_with_the_fitted_body_model(tmp_path):
    """Fit Body Model with the user's own SMPL file, then Build Rig: the soft structures get their
    weights from that same model (the core's binding with the user's model), not from the built-in
    one. The user's model here is the built-in one 10 % larger, and the skin is that model's
    surface, so the two bindings differ measurably."""
    from ctwin.blender.scene import ensure_registered
    from ctwin.core.body.body_model import default_body_model_path, load_body_model
    from ctwin.core.meshes.mesh import Mesh as CoreMesh
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.body.skeleton import SUPINE_GLOBAL_ORIENT

    builtin = load_body_model()
    with np.load(default_body_model_path()) as z:
        arrays = {k: z[k] for k in z.files if k != "ctwin_generator"}
    arrays["v_template"] = arrays["v_template"] * 1.1
    user_path = tmp_path / "my_smpl.npz"
    np.savez(user_path, **arrays)
    user = load_body_model(user_path)
    pose = np.concatenate([SUPINE_GLOBAL_ORIENT, np.asarray(PRESETS["supine_arms_down"])[3:]])
    v, j = user.forward(pose, np.zeros(user.num_betas), np.array([0.0, 0.0, 900.0]))

    ensure_registered()
    skin = bl_data.mesh_object("skin", v, user.faces, bl_data.ensure_collection("Skin"))
    s = box(j[0] + [0, 40, -30], (20, 20, 20))
    bl_data.mesh_object("sacrum", s[0], s[1], bl_data.ensure_collection("Skeleton"))
    assert bpy.ops.ctwin.fit_body_model(body_model_path=str(user_path), residual=False) == {"FINISHED"}
    assert bpy.ops.ctwin.build_rig() == {"FINISHED"}

    # the core's bindings of the same scene with each model, from the fit stored by Fit Body Model
    stored = bpy.context.scene.ctwin.fit()
    fit = {k: np.asarray(stored[k], dtype=np.float64) for k in ("pose", "betas", "transl_mm", "joints_mm")}
    fit["residual_mm"] = None
    meshes = {"skin": CoreMesh(*bl_data.mesh_arrays(skin, world=True), "skin"),
              "sacrum": CoreMesh(s[0], s[1], "sacrum")}

    want = bind_structures(meshes, user, fit).soft["skin"].dense()
    other = bind_structures(meshes, builtin, fit).soft["skin"].dense()
    cols = np.argsort(-np.abs(want - other).sum(axis=0))[:2]  # the groups the two models disagree on most
    assert np.abs(want - other)[:, cols].max() > 0.2  # the models give measurably different weights
    for c in cols:
        got = bl_data.vertex_group_weights(skin, JOINT_NAMES[c])
        assert np.abs(got - want[:, c]).max() < 2e-3, JOINT_NAMES[c]
