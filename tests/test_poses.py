"""Pose presets and pose-file IO (core.rig.poses)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctwin.core.errors import CtwinError
from ctwin.core.rig.poses import ACQUISITION_PRESETS, PRESETS, resolve_pose, write_pose_file
from ctwin.core.body.skeleton import JOINT_INDEX, SUPINE_GLOBAL_ORIENT, forward_kinematics

EXPECTED = ("supine_arms_down", "supine_arms_up", "hip_flexion", "knee_flexion", "sitting",
            "walking_stride", "arm_abducted", "arm_raised_forward")


def test_presets_complete_and_supine():
    assert set(EXPECTED) <= set(PRESETS)
    assert ACQUISITION_PRESETS == ("supine_arms_down", "supine_arms_up")
    for name, p in PRESETS.items():
        assert p.shape == (72,) and np.all(np.isfinite(p)), name
        np.testing.assert_allclose(p[:3], SUPINE_GLOBAL_ORIENT, err_msg=name)
    # presets differ from one another
    keys = list(PRESETS)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert np.abs(PRESETS[keys[i]] - PRESETS[keys[j]]).max() > 0.1, (keys[i], keys[j])


def _joint_dir(pose, a, b):
    """World direction from joint a to joint b for a simple T-pose skeleton."""
    rest = np.zeros((24, 3))
    rest[JOINT_INDEX["left_hip"]] = (90, -40, 0)
    rest[JOINT_INDEX["left_knee"]] = (95, -440, 0)
    rest[JOINT_INDEX["left_ankle"]] = (95, -880, 0)
    rest[JOINT_INDEX["left_shoulder"]] = (180, 480, 0)
    rest[JOINT_INDEX["left_elbow"]] = (500, 480, 0)
    rest[JOINT_INDEX["spine3"]] = (0, 400, 0)
    rest[JOINT_INDEX["spine2"]] = (0, 250, 0)
    rest[JOINT_INDEX["spine1"]] = (0, 120, 0)
    rest[JOINT_INDEX["left_collar"]] = (25, 500, 0)
    _, j = forward_kinematics(pose, rest)
    d = j[JOINT_INDEX[b]] - j[JOINT_INDEX[a]]
    return d / np.linalg.norm(d)


def test_preset_semantics_in_lps():
    # supine, head first: the left upper arm hangs toward the feet (-z) in the acquisition pose
    d = _joint_dir(PRESETS["supine_arms_down"], "left_shoulder", "left_elbow")
    assert d[2] < -0.9
    d = _joint_dir(PRESETS["supine_arms_up"], "left_shoulder", "left_elbow")
    assert d[2] > 0.9
    # sitting: thigh points anterior (-y in LPS), shank toward the feet (-z)
    assert _joint_dir(PRESETS["sitting"], "left_hip", "left_knee")[1] < -0.95
    assert _joint_dir(PRESETS["sitting"], "left_knee", "left_ankle")[2] < -0.95
    # arm raised forward: the left arm points anterior
    assert _joint_dir(PRESETS["arm_raised_forward"], "left_shoulder", "left_elbow")[1] < -0.95


def test_resolve_and_write_roundtrip(tmp_path):
    r = resolve_pose("sitting")
    assert r["transl"] is None
    np.testing.assert_array_equal(r["pose"], PRESETS["sitting"])
    rng = np.random.default_rng(1)
    pose, transl = rng.normal(0, 0.3, 72), np.array([1.0, -2.0, 3.5])
    for name in ("p.json", "p.npz"):
        write_pose_file(tmp_path / name, pose, transl)
        r = resolve_pose(tmp_path / name)
        np.testing.assert_allclose(r["pose"], pose)
        np.testing.assert_allclose(r["transl"], transl)
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"pose": pose.tolist(), "transl": transl.tolist(), "joints": [[0, 0, 0]] * 24,
                                 "bones": {}}))
    np.testing.assert_allclose(resolve_pose(str(truth))["pose"], pose)


def test_resolve_errors(tmp_path):
    with pytest.raises(CtwinError) as e:
        resolve_pose("no_such_pose")
    for name in EXPECTED:
        assert name in str(e.value)
    with pytest.raises(CtwinError):
        resolve_pose(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pose": [0.0] * 71}))
    with pytest.raises(CtwinError, match="72"):
        resolve_pose(bad)
    bad.write_text("{not json")
    with pytest.raises(CtwinError):
        resolve_pose(bad)
    with pytest.raises(CtwinError):
        write_pose_file(tmp_path / "p.txt", np.zeros(72))
