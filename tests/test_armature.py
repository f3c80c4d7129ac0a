"""Rig maths: armature from fitted joints, posing deltas, Blender pose-bone values."""
import numpy as np
import pytest

from ctwin.core.rig.armature import blender_roll0_matrix, build_armature, unpose_joints
from ctwin.core.rig.binding import bind_structures
from ctwin.core.errors import CtwinError
from ctwin.core.rig.pose import bone_transforms
from ctwin.core.body.skeleton import JOINT_NAMES, PARENTS, forward_kinematics, rodrigues

from rig_synth import REST_JOINTS_MM, acquisition_pose, target_pose, truth_scene

T_A = np.array([12.0, 140.0, -820.0])
T_B = np.array([-30.0, 160.0, -790.0])


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(1)
    pa = acquisition_pose(rng)
    pb = target_pose(rng)
    ja, ta, ma = truth_scene(pa, T_A)
    jb, tb, mb = truth_scene(pb, T_B)
    return dict(pa=pa, pb=pb, ja=ja, jb=jb, ta=ta, tb=tb, ma=ma, mb=mb)


def test_unpose_recovers_rest_joints(scene):
    rest = unpose_joints(scene["ja"], scene["pa"], T_A)
    assert np.allclose(rest, REST_JOINTS_MM, atol=1e-9)
    _, j = forward_kinematics(scene["pa"], rest)
    assert np.allclose(j + T_A, scene["ja"], atol=1e-9)


def test_bone_table(scene):
    arm = build_armature(scene["ja"], scene["pa"], T_A)
    assert arm.names == JOINT_NAMES
    assert np.allclose(arm.heads, scene["ja"])
    # tails point at the primary child
    assert np.allclose(arm.tails[4], scene["ja"][7])  # left_knee -> left_ankle
    assert abs(np.dot(arm.frames[0][:, 1], arm.global_rot0[0][:, 2]) - 1) < 1e-12  # pelvis: forward
    assert np.allclose(arm.tails[9], scene["ja"][12])  # spine3 -> neck
    for i in range(24):
        f = arm.frames[i]
        assert np.allclose(f.T @ f, np.eye(3), atol=1e-9) and np.linalg.det(f) > 0
        y = (arm.tails[i] - arm.heads[i]) / np.linalg.norm(arm.tails[i] - arm.heads[i])
        assert np.allclose(f[:, 1], y, atol=1e-9)
        # roll: Blender's roll-0 frame rotated by the roll about Y gives the frame
        r = rodrigues(arm.rolls[i] * y) @ blender_roll0_matrix(y)
        assert np.allclose(r, f, atol=1e-6), JOINT_NAMES[i]
    # the spine bone's local axes are the joint's rotated canonical axes (z = rotated front)
    g = arm.global_rot0[6]
    assert np.dot(arm.frames[6][:, 2], g[:, 2]) > 0.95


def test_bad_joints_raise():
    with pytest.raises(CtwinError):
        build_armature(np.zeros((23, 3)), np.zeros(72))
    with pytest.raises(CtwinError):
        build_armature(np.zeros((24, 3)), np.zeros(70))


def test_acquisition_pose_is_identity(scene):
    arm = build_armature(scene["ja"], scene["pa"], T_A)
    d = arm.deltas(scene["pa"], T_A)
    assert np.allclose(d, np.eye(4)[None], atol=1e-9)
    assert np.allclose(arm.deltas(scene["pa"], None), np.eye(4)[None], atol=1e-9)


def test_bone_transforms_recover_truth_exactly(scene):
    """Posing a synthetic phantom: bone_transforms == T_B inv(T_A) when given true joints and poses."""
    arm = build_armature(scene["ja"], scene["pa"], T_A)
    binding = bind_structures(scene["ma"], armature=arm)
    bt = bone_transforms(binding, scene["pb"], T_B)
    assert set(bt) == set(scene["ma"])
    for name, t in bt.items():
        expect = scene["tb"][name] @ np.linalg.inv(scene["ta"][name])
        assert np.allclose(t, expect, atol=1e-8), name
        # and the vertices land on the truth's vertices at pose B
        v = scene["ma"][name].vertices @ t[:3, :3].T + t[:3, 3]
        assert np.abs(v - scene["mb"][name].vertices).max() < 1e-6
    assert np.allclose(arm.posed_joints(scene["pb"], T_B), scene["jb"], atol=1e-8)


def test_local_rotations_roundtrip_and_compose_like_blender(scene):
    arm = build_armature(scene["ja"], scene["pa"], T_A)
    q, loc = arm.local_rotations(scene["pb"], T_B)
    for j in range(24):
        assert np.allclose(q[j].T @ q[j], np.eye(3), atol=1e-9)
    pose, transl = arm.pose_from_local_rotations(q, loc)
    assert np.allclose(rodrigues(pose.reshape(24, 3)), rodrigues(scene["pb"].reshape(24, 3)), atol=1e-9)
    assert np.allclose(transl, T_B, atol=1e-9)
    # Blender's composition P_j = P_parent inv(Rest_parent) Rest_j Basis_j reproduces D_j Rest_j
    d = arm.deltas(scene["pb"], T_B)
    rest = np.tile(np.eye(4), (24, 1, 1))
    rest[:, :3, :3] = arm.frames
    rest[:, :3, 3] = arm.heads
    posed = np.zeros((24, 4, 4))
    for j in range(24):
        basis = np.eye(4)
        basis[:3, :3] = q[j]
        if PARENTS[j] < 0:
            basis[:3, 3] = loc
            posed[j] = rest[j] @ basis
        else:
            p = PARENTS[j]
            posed[j] = posed[p] @ np.linalg.inv(rest[p]) @ rest[j] @ basis
        assert np.allclose(posed[j], d[j] @ rest[j], atol=1e-8), JOINT_NAMES[j]


# --- against the phantom's ground truth (core.phantom.phantom) ------------------------------------------
@pytest.fixture(scope="module")
def phantom_pair():
    from ctwin.core.phantom.phantom import generate_phantom

    a = generate_phantom("supine_arms_down", spacing=10.0)
    b = generate_phantom("sitting", spacing=10.0)
    return a, b


def test_phantom_truth_recovered_exactly(phantom_pair):
    """Given the phantom's true joints and poses, the rig moves every bone exactly as the truth does."""
    from ctwin.core.volumes.labels import is_skeletal

    a, b = phantom_pair
    ta, tb = a.truth, b.truth
    clouds = {}
    for lid, name in a.labels.items():
        if is_skeletal(name):
            pts = a.seg.voxel_centers_world(a.seg.data == lid)

            class _Cloud:
                vertices = pts
                faces = np.zeros((0, 3), dtype=np.int64)
            clouds[name] = _Cloud()
    arm = build_armature(np.asarray(ta["joints"]), np.asarray(ta["pose"]), np.asarray(ta["transl"]))
    binding = bind_structures(clouds, armature=arm)
    # the rig's anatomy rules agree with the phantom's segments (vertebrae/ribs: own blended bones)
    for name, seg in ta["bone_segments"].items():
        if name in binding.rigid and not name.startswith(("vertebrae_", "rib_")):
            assert binding.rigid[name] == seg, name
    bt = bone_transforms(binding, np.asarray(tb["pose"]), np.asarray(tb["transl"]))
    checked = 0
    for name, t in bt.items():
        if name not in tb["bones"]:
            continue
        truth = np.asarray(tb["bones"][name]) @ np.linalg.inv(np.asarray(ta["bones"][name]))
        v = clouds[name].vertices
        err = np.linalg.norm(v @ t[:3, :3].T + t[:3, 3] - (v @ truth[:3, :3].T + truth[:3, 3]), axis=1)
        assert err.max() < 1e-6, (name, err.max())
        checked += 1
    assert checked >= 60
