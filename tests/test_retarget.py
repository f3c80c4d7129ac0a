"""Retargeting poses between rest skeletons, IK from world joints, relative poses, the phantom's
skeleton variant, and AMASS source models."""
import json

import numpy as np
import pytest

from ctwin.core.rig.armature import build_armature
from ctwin.core.body.body_model import default_body_model_path, load_body_model
from ctwin.core.errors import CtwinError
from ctwin.core.rig.motion import load_motion, write_motion_file
from ctwin.core.phantom.phantom import generate_phantom, rest_skeleton
from ctwin.core.phantom.anatomy import build_anatomy
from ctwin.core.rig.poses import PRESETS, resolve_pose
from ctwin.core.rig.retarget import (ik_pose, model_rest_joints_mm, pose_for_twin, relative_pose, rest_alignment,
                                 retarget_pose)
from ctwin.core.body.skeleton import JOINT_INDEX, PARENTS, forward_kinematics, rodrigues, rotation_to_rotvec


@pytest.fixture(scope="module")
def builtin_rest():
    return load_body_model().rest()[1] * 1000.0


@pytest.fixture(scope="module")
def variant():
    """The seed-0 anatomy's rest joints, its variant 3 and the variant's segment maps V."""
    anat = build_anatomy(0)
    jv, v = rest_skeleton(anat, 3)
    return anat.joints, np.asarray(jv), np.asarray(v)


def _random_pose(seed, scale=0.5):
    rng = np.random.default_rng(seed)
    p = rng.normal(0.0, scale, 72)
    p[:3] = [np.pi / 2, 0.1, -0.2]
    return p


def _posed_dirs(pose, rest):
    j = forward_kinematics(pose, rest)[1]
    d = j[1:] - j[PARENTS[1:]]
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _delta_rotations(variant_v):
    """The pure rotation of each variant segment map (V = s R + t)."""
    r = variant_v[:, :3, :3]
    return r / np.cbrt(np.linalg.det(r))[:, None, None]


def test_variant_skeleton_differs_within_bounds(variant):
    j, jv, _ = variant
    d = lambda x: x[1:] - x[PARENTS[1:]]  # noqa: E731
    a, b = d(j), d(jv)
    ang = np.degrees(np.arccos(np.clip((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1), -1, 1)))
    # a bone's direction turns by its parent's rotation (<= 15 deg); lengths within 10 %
    assert ang.max() <= 15.0 + 1e-9 and ang.max() > 5.0
    ratio = np.linalg.norm(b, axis=1) / np.linalg.norm(a, axis=1)
    assert np.all(np.abs(ratio - 1.0) <= 0.10 + 1e-12) and np.abs(ratio - 1.0).max() > 0.02


def test_same_directions_give_the_same_pose_object(builtin_rest):
    p = _random_pose(1)
    # the phantom's canonical skeleton and a uniformly scaled copy point the same way
    for src in (build_anatomy(0).joints, 1.07 * builtin_rest, build_anatomy(2).joints):
        assert retarget_pose(p, src, builtin_rest) is p
    assert retarget_pose(p, None, builtin_rest) is p


def test_retargeted_bones_point_where_the_source_bones_do(variant):
    j, jv, _ = variant
    for seed in range(3):
        p = _random_pose(seed)
        q = retarget_pose(p, jv, j)
        assert q is not p
        np.testing.assert_allclose(_posed_dirs(q, j), _posed_dirs(p, jv), atol=1e-9)


def test_rest_alignment(variant):
    """C aims every target bone along the source's; at the pelvis and spine3 (several children) it
    is the variant's own segment rotation (kept by the phantom in V); at one-child joints it adds
    no twist about the bone to the parent's; leaves and joints whose child was not located take
    their parent's."""
    j, jv, v = variant
    c = rest_alignment(jv, j)
    kids = [[k for k in range(24) if PARENTS[k] == i] for i in range(24)]
    for i in range(24):
        for k in kids[i]:
            a, b = c[i] @ (j[k] - j[i]), jv[k] - jv[i]
            np.testing.assert_allclose(a / np.linalg.norm(a), b / np.linalg.norm(b), atol=1e-9)
        if len(kids[i]) > 1:
            np.testing.assert_allclose(c[i], _delta_rotations(v)[i], atol=1e-9)
        elif len(kids[i]) == 1 and i > 0:
            rel = c[PARENTS[i]].T @ c[i]
            u = (j[kids[i][0]] - j[i]) / np.linalg.norm(j[kids[i][0]] - j[i])
            axis = rotation_to_rotvec(rel)
            assert abs(axis @ u) < 1e-9  # a swing: its axis is normal to the bone
        else:
            np.testing.assert_allclose(c[i], c[PARENTS[i]], atol=0)
    located = [k for k in range(24) if k not in (10, 11, 22, 23)]  # feet and hands not located
    cl = rest_alignment(jv, j, located=located)
    for ankle_or_wrist in (7, 8, 20, 21):
        np.testing.assert_allclose(cl[ankle_or_wrist], cl[PARENTS[ankle_or_wrist]], atol=0)
    np.testing.assert_allclose(cl[:7], c[:7], atol=0)


def test_variant_truth_bones_follow_the_retargeted_armature():
    """Truth of the variant phantom (coarse, to be fast) at two presets; an armature at the
    acquisition joints moves every bone as the truth does when the target pose is retargeted, and
    far from it with the raw pose vector."""
    ta = generate_phantom("supine_arms_down", spacing=20.0, skeleton_variant=3, subsamples=1).truth
    tb = generate_phantom("knee_flexion", spacing=20.0, skeleton_variant=3, subsamples=1).truth
    assert len(ta["bones"]) > 40
    ref = build_anatomy(0).joints
    src = np.asarray(ta["rest_joints"])
    p0 = retarget_pose(np.asarray(ta["pose"]), src, ref)
    arm = build_armature(np.asarray(ta["joints"]), p0, np.asarray(ta["transl"]))
    resolved = resolve_pose(tb)
    pose, transl = pose_for_twin(resolved, arm, ref)
    d = arm.deltas(pose, transl)
    d_raw = arm.deltas(np.asarray(tb["pose"]), np.asarray(tb["transl"]))
    seg = {n: JOINT_INDEX[s] for n, s in ta["bone_segments"].items()}
    pts = np.random.default_rng(0).uniform(-60, 60, (50, 3))
    worst, worst_raw = 0.0, 0.0
    for name, k in seg.items():
        if name not in tb["bones"]:
            continue
        exact = np.asarray(tb["bones"][name]) @ np.linalg.inv(np.asarray(ta["bones"][name]))
        x = pts + np.asarray(ta["joints"])[k]
        tv = x @ exact[:3, :3].T + exact[:3, 3]
        worst = max(worst, np.abs(x @ d[k][:3, :3].T + d[k][:3, 3] - tv).max())
        worst_raw = max(worst_raw, np.abs(x @ d_raw[k][:3, :3].T + d_raw[k][:3, 3] - tv).max())
    assert worst < 1e-6
    assert worst_raw > 20.0

    # a fitted acquisition whose left upper arm is twisted 10 degrees about itself (joint centres
    # cannot show it): rest alignment inherits the twist error, the known acquisition removes it
    k = JOINT_INDEX["left_shoulder"]
    u = arm.joints_rest_mm[JOINT_INDEX["left_elbow"]] - arm.joints_rest_mm[k]
    p0t = np.asarray(p0, dtype=np.float64).reshape(24, 3).copy()
    from ctwin.core.body.skeleton import rotation_to_rotvec as r2v

    p0t[k] = r2v(rodrigues(p0t[k]) @ rodrigues(np.deg2rad(10.0) * u / np.linalg.norm(u)))
    arm_t = build_armature(np.asarray(ta["joints"]), p0t.reshape(72), np.asarray(ta["transl"]))
    errs = {}
    for mode, acq in (("rest", None), ("acquisition", resolve_pose(ta))):
        pose, transl = pose_for_twin(resolved, arm_t, ref, acquisition=acq)
        d = arm_t.deltas(pose, transl)
        e = 0.0
        for name, kk in seg.items():
            if name not in tb["bones"]:
                continue
            exact = np.asarray(tb["bones"][name]) @ np.linalg.inv(np.asarray(ta["bones"][name]))
            x = pts + np.asarray(ta["joints"])[kk]
            e = max(e, np.abs(x @ d[kk][:3, :3].T + d[kk][:3, 3] - (x @ exact[:3, :3].T + exact[:3, 3])).max())
        errs[mode] = e
    assert errs["acquisition"] < 1e-6 and errs["rest"] > 5.0, errs


def test_own_phantom_truth_is_not_changed(builtin_rest):
    """A truth.json of the project's own phantom names a skeleton whose bones point as the twin's:
    the pose and translation pass through untouched (bit-identical bone transforms)."""
    roi = (np.array([-30.0, -30.0, -30.0]), np.array([30.0, 30.0, 30.0]))
    tb = generate_phantom("sitting", spacing=8.0, roi_mm=roi).truth
    assert tb["kintree_parents"] == PARENTS.tolist() and np.allclose(tb["rest_joints"][0], 0.0)
    arm = build_armature(np.asarray(tb["joints"]), PRESETS["supine_arms_down"], np.asarray(tb["transl"]))
    resolved = resolve_pose(tb)
    pose, transl = pose_for_twin(resolved, arm, builtin_rest)
    assert pose is resolved["pose"] and transl is resolved["transl"]
    plain = resolve_pose({"pose": tb["pose"], "transl": tb["transl"]})
    assert np.array_equal(arm.deltas(pose, transl), arm.deltas(plain["pose"], plain["transl"]))


def test_pelvis_stays_where_the_source_puts_it(variant, builtin_rest):
    j, jv, _ = variant
    p = _random_pose(4)
    joints_src = forward_kinematics(p, jv)[1] + np.array([5.0, -20.0, 300.0])
    arm = build_armature(forward_kinematics(PRESETS["supine_arms_down"], builtin_rest)[1] + 11.0,
                         PRESETS["supine_arms_down"], np.full(3, 11.0))
    pose, transl = pose_for_twin({"pose": p, "transl": np.array([5.0, -20.0, 300.0]), "rest_joints": jv},
                                 arm, builtin_rest)
    np.testing.assert_allclose(arm.posed_joints(pose, transl)[0], joints_src[0], atol=1e-9)


def test_ik_from_world_joints(builtin_rest):
    p = _random_pose(5, 0.4)
    t = np.array([10.0, 20.0, 30.0])
    jw = forward_kinematics(p, builtin_rest)[1] + t
    # with the true pose as reference the twists are the true ones: the pose itself comes back
    q, tq = ik_pose(jw, builtin_rest, p)
    np.testing.assert_allclose(rodrigues(q.reshape(24, 3)), rodrigues(p.reshape(24, 3)), atol=1e-9)
    np.testing.assert_allclose(tq, t, atol=1e-9)
    # from the acquisition pose as reference, every joint still lands on its target
    q2, t2 = ik_pose(jw, builtin_rest, PRESETS["supine_arms_down"])
    np.testing.assert_allclose(forward_kinematics(q2, builtin_rest)[1] + t2, jw, atol=1e-6)


def test_joints_only_pose_file_solves_ik(tmp_path, builtin_rest):
    p = PRESETS["knee_flexion"]
    jw = forward_kinematics(p, builtin_rest)[1] + 7.0
    path = tmp_path / "joints.json"
    path.write_text(json.dumps({"joints": jw.tolist()}))
    r = resolve_pose(str(path))
    assert r["pose"] is None
    arm = build_armature(forward_kinematics(PRESETS["supine_arms_down"], builtin_rest)[1] + 7.0,
                         PRESETS["supine_arms_down"], np.full(3, 7.0))
    pose, transl = pose_for_twin(r, arm, builtin_rest)
    np.testing.assert_allclose(arm.posed_joints(pose, transl), jw, atol=1e-6)
    with pytest.raises(CtwinError, match="absolute pose"):
        generate_phantom(str(path), spacing=8.0)


def test_relative_pose(tmp_path, builtin_rest):
    p0 = PRESETS["supine_arms_down"]
    t0 = np.array([1.0, 2.0, 3.0])
    pose, t = relative_pose(np.zeros(72), p0, t0)
    np.testing.assert_allclose(pose, p0, atol=1e-12)
    np.testing.assert_allclose(t, t0)
    delta = np.zeros((24, 3))
    delta[JOINT_INDEX["left_knee"]] = [np.deg2rad(40.0), 0.0, 0.0]
    path = tmp_path / "rel.json"
    path.write_text(json.dumps({"relative": True, "pose": delta.tolist(), "transl": [0.0, 0.0, 25.0]}))
    arm = build_armature(forward_kinematics(p0, builtin_rest)[1] + t0, p0, t0)
    pose, t = pose_for_twin(resolve_pose(str(path)), arm, builtin_rest)
    np.testing.assert_allclose(t, t0 + [0.0, 0.0, 25.0])
    d = arm.deltas(pose, t)
    k = JOINT_INDEX["left_knee"]
    # only the left knee's subtree turns, by 40 degrees
    ang = np.degrees(np.arccos(np.clip((np.trace(d[k][:3, :3]) - 1) / 2, -1, 1)))
    assert abs(ang - 40.0) < 1e-6
    np.testing.assert_allclose(d[JOINT_INDEX["right_knee"]][:3, :3], np.eye(3), atol=1e-12)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"relative": True, "pose": delta.tolist(), "rest_joints": builtin_rest.tolist()}))
    with pytest.raises(CtwinError, match="relative pose"):
        resolve_pose(str(bad))


def test_bad_source_skeleton_is_a_clear_error(builtin_rest):
    with pytest.raises(CtwinError, match="kintree_parents"):
        resolve_pose({"pose": np.zeros(72), "rest_joints": builtin_rest, "kintree_parents": list(range(-1, 23))})
    with pytest.raises(CtwinError, match="rest_joints"):
        resolve_pose({"pose": np.zeros(72), "rest_joints": [1.0, 2.0]})
    with pytest.raises(CtwinError, match="'pose' key"):
        resolve_pose({"transl": [0, 0, 0]})


def test_model_rest_joints(tmp_path, builtin_rest):
    np.testing.assert_allclose(model_rest_joints_mm(default_body_model_path()), builtin_rest, atol=1e-9)
    # a SMPL+H-like model: 22 body joints, then two finger roots under each wrist
    joints = np.vstack([builtin_rest[:22], builtin_rest[20] + [[30, 0, 10], [30, 0, -10]],
                        builtin_rest[21] + [[-30, 0, 10], [-30, 0, -10]]]) / 1000.0
    parents = np.r_[PARENTS[:22], 20, 20, 21, 21]
    path = tmp_path / "smplh_like.npz"
    np.savez(path, v_template=joints, J_regressor=np.eye(26), kintree_table=np.vstack([parents, np.arange(26)]))
    r = model_rest_joints_mm(path)
    np.testing.assert_allclose(r[:22], builtin_rest[:22], atol=1e-9)
    np.testing.assert_allclose(r[22], builtin_rest[20] + [30, 0, 0], atol=1e-9)
    with pytest.raises(CtwinError, match="not found"):
        model_rest_joints_mm(tmp_path / "none.npz")


def test_amass_motion_on_variant_skeleton_moves_the_twin_as_the_builtin_one(tmp_path, variant, builtin_rest):
    """One motion made on the built-in skeleton and made on the variant skeleton (each bone turned
    in the world as the built-in's, through the phantom's own segment rotations V): with the
    variant's model file as the source model, the twin's bones move the same."""
    j, jv, v = variant
    r = _delta_rotations(v)
    rng = np.random.default_rng(7)
    n = 6
    poses_b = rng.normal(0.0, 0.3, (n, 72))
    poses_b[:, :3] = [np.pi / 2, 0.0, 0.0]
    trans = np.c_[np.linspace(0, 0.1, n), np.zeros(n), np.full(n, 0.9)]
    rot_b = rodrigues(poses_b.reshape(n, 24, 3))
    rot_v = np.empty_like(rot_b)
    for k in range(24):
        pk = PARENTS[k]
        rot_v[:, k] = rot_b[:, k] @ r[k].T if pk < 0 else r[pk] @ rot_b[:, k] @ r[k].T
    poses_v = rotation_to_rotvec(rot_v).reshape(n, 72)
    write_motion_file(tmp_path / "builtin.npz", poses_b, trans, 30.0)
    write_motion_file(tmp_path / "variant.npz", poses_v, trans, 30.0)
    model = tmp_path / "variant_model.npz"
    np.savez(model, v_template=jv / 1000.0, J_regressor=np.eye(24), shapedirs=np.zeros((24, 3, 10)),
             kintree_table=np.vstack([np.where(PARENTS < 0, 4294967295, PARENTS), np.arange(24)]))
    p0 = PRESETS["supine_arms_down"]
    arm = build_armature(forward_kinematics(p0, builtin_rest)[1] + 5.0, p0, np.full(3, 5.0))
    pb, tb = load_motion(tmp_path / "builtin.npz", twin_pose=p0, twin_transl_mm=arm.transl0_mm, check_limits=False)
    pv, tv = load_motion(tmp_path / "variant.npz", twin_pose=p0, twin_transl_mm=arm.transl0_mm, check_limits=False,
                         source=(model, builtin_rest))
    pr, _ = load_motion(tmp_path / "variant.npz", twin_pose=p0, twin_transl_mm=arm.transl0_mm, check_limits=False)
    pts = arm.joints_mm[:, None, :] + rng.uniform(-80, 80, (24, 40, 3))
    worst, worst_raw = 0.0, 0.0
    # bone motion: each frame's bone transforms relative to the first frame's (a leaf's rest frame
    # relative to its parent is not in the joints, so leaves agree up to a constant offset)
    rel = lambda d, d0: d @ np.linalg.inv(d0)  # noqa: E731
    db0, dv0, dr0 = arm.deltas(pb[0], tb[0]), arm.deltas(pv[0], tv[0]), arm.deltas(pr[0], tv[0])
    for f in range(1, n):
        db, dv, dr = (rel(arm.deltas(pb[f], tb[f]), db0), rel(arm.deltas(pv[f], tv[f]), dv0),
                      rel(arm.deltas(pr[f], tv[f]), dr0))
        pts_f = np.einsum("kij,knj->kni", db0[:, :3, :3], pts) + db0[:, None, :3, 3]
        mv = lambda d, x: np.einsum("kij,knj->kni", d[:, :3, :3], x) + d[:, None, :3, 3]  # noqa: E731
        worst = max(worst, np.linalg.norm(mv(db, pts_f) - mv(dv, pts_f), axis=-1).max())
        worst_raw = max(worst_raw, np.linalg.norm(mv(db, pts_f) - mv(dr, pts_f), axis=-1).max())
    assert worst < 1.0
    assert worst_raw > 30.0


def test_variant_flesh_rule_blends_across_joints():
    """The variant's flesh near a joint follows a blend of the two segments: the same placement as
    the rigid rule at the rest pose, a partial turn (about the joint) when the joint bends."""
    from ctwin.core.phantom.phantom import _packed, _posed_rows, _flesh_blend_table

    anat, fprims = _packed(0)[:2]
    table = _flesh_blend_table(anat, fprims)
    assert table and all(0.0 < w <= 0.5 for *_, w in table)
    rest_T, rest_all, fp = _posed_rows(anat, fprims, np.zeros(72), np.zeros(3), 3)
    for f, _, _, _ in table:
        np.testing.assert_allclose(rest_all[int(fp[f, 1])], rest_T[int(fprims[f, 1])], atol=1e-9)
    T, t_all, fp = _posed_rows(anat, fprims, PRESETS["knee_flexion"], np.zeros(3), 3)
    knee = [(f, w) for f, j, o, w in table if j == JOINT_INDEX["left_ankle"] or (j == JOINT_INDEX["left_knee"])]
    assert knee
    for f, w in knee:
        own = T[int(fprims[f, 1])][:3, :3]
        own = own / np.cbrt(np.linalg.det(own))  # the variant's segment scale
        blended = t_all[int(fp[f, 1])][:3, :3]
        blended = blended / np.cbrt(np.linalg.det(blended))
        assert np.degrees(np.arccos(np.clip((np.trace(own.T @ blended) - 1) / 2, -1, 1))) > 1.0


def test_cli_source_model_needs_a_motion(tmp_path, capsys):
    from ctwin.cli import main

    rc = main(["render", "--twin", str(tmp_path), "--source-model", str(tmp_path / "m.npz"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--motion" in capsys.readouterr().err
    rc = main(["render", "--ct", str(tmp_path / "ct.nii.gz"), "--source-model", "m.npz", "--out", str(tmp_path / "o")])
    assert rc == 2


def test_twin_reads_its_acquisition_source_and_located_joints(tmp_path, variant):
    from ctwin.core.twin.twin import Twin

    j, jv, _ = variant
    (tmp_path / "ct").mkdir()
    (tmp_path / "twin").mkdir()
    truth = {"pose": PRESETS["supine_arms_down"].tolist(), "transl": [0.0, 0.0, 0.0],
             "rest_joints": (jv - jv[0]).tolist(), "kintree_parents": PARENTS.tolist()}
    (tmp_path / "ct" / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "twin" / "fit.json").write_text(json.dumps({"joint_sources": {"left_hip": "x", "neck": "y"}}))
    twin = Twin(tmp_path / "twin", {"inputs": {"ct": str(tmp_path / "ct" / "ct.nii.gz")}})
    acq = twin.source_acquisition()
    np.testing.assert_allclose(acq["rest_joints"], jv - jv[0])
    assert twin.located_joints() == [JOINT_INDEX["left_hip"], JOINT_INDEX["neck"]]
    bare = Twin(tmp_path / "twin2", {"inputs": {}})
    assert bare.source_acquisition() is None and bare.located_joints() is None


def test_apply_alignment_turns_every_world_bone_by_its_alignment():
    from ctwin.core.rig.retarget import acquisition_alignment, apply_alignment, global_rotations

    pa, pb, t0 = _random_pose(1), _random_pose(2), _random_pose(3, 0.2)
    c = acquisition_alignment(pa, t0)
    gt = global_rotations(apply_alignment(pb, c))
    # each twin bone turns in the world by its source bone's rotation change from the acquisition
    want = np.einsum("jab,jcb->jac", global_rotations(pb), global_rotations(pa))
    got = np.einsum("jab,jcb->jac", gt, global_rotations(t0))
    assert np.abs(got - want).max() < 1e-9
    assert np.abs(apply_alignment(pb, np.tile(np.eye(3), (24, 1, 1))) - pb).max() < 1e-9
