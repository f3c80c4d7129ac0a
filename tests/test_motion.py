"""Motion import: AMASS-style .npz, SMPL-H mapping, slerp resampling, root retargeting, errors."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation, Slerp

from ctwin.core.errors import CtwinError
from ctwin.core.rig.motion import load_motion, resample, smpl72, write_motion_file
from ctwin.core.body.skeleton import SUPINE_GLOBAL_ORIENT, rodrigues


def amass_clip(n=100, width=72, seed=0):
    """A z-up walking-like clip: standing root with a turning heading, joints swinging."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 120.0
    poses = np.zeros((n, width))
    heading = 0.7 + 0.5 * t  # radians about z-up
    root = Rotation.from_rotvec(np.c_[np.zeros(n), np.zeros(n), heading]) * Rotation.from_rotvec([np.pi / 2, 0, 0])
    poses[:, :3] = root.as_rotvec()
    poses[:, 3:66] = 0.2 * np.sin(2 * np.pi * t[:, None] + rng.uniform(0, 6, 63))
    if width > 66:
        poses[:, 66:] = rng.normal(0, 0.2, (n, width - 66))
    trans = np.c_[0.8 * t, 0.1 * t, np.full(n, 0.9)]
    return poses, trans


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    poses, trans = amass_clip()
    path = tmp_path_factory.mktemp("motion") / "walk.npz"
    write_motion_file(path, poses, trans, 120.0)
    return path, poses, trans


def test_smplh_mapping():
    p, _ = amass_clip(5, width=156)
    out = smpl72(p)
    assert out.shape == (5, 72)
    assert np.array_equal(out[:, :66], p[:, :66]) and not out[:, 66:].any()
    with pytest.raises(CtwinError):
        smpl72(np.zeros((5, 30)))


def test_resample_exact_at_source_frames_and_slerp_between():
    poses, trans = amass_clip(13)
    down, tdown = resample(poses, trans, 120.0, 30.0)
    assert len(down) == 4  # frames 0, 4, 8, 12
    for k in range(4):
        assert np.allclose(rodrigues(down[k].reshape(24, 3)), rodrigues(poses[4 * k].reshape(24, 3)), atol=1e-9)
        assert np.allclose(tdown[k], trans[4 * k])
    up, tup = resample(poses, trans, 120.0, 240.0)
    assert len(up) == 25
    for j in (0, 4, 16):
        rots = Rotation.from_rotvec(poses[:2, 3 * j:3 * j + 3])
        mid = Slerp([0, 1], rots)([0.5])
        assert np.allclose(rodrigues(up[1, 3 * j:3 * j + 3]), mid.as_matrix()[0], atol=1e-9)
    assert np.allclose(tup[1], 0.5 * (trans[0] + trans[1]))


def test_load_motion_root_keeps_acquisition_orientation(clip_file):
    path, poses, trans = clip_file
    twin_pose = np.zeros(72)
    twin_pose[:3] = SUPINE_GLOBAL_ORIENT
    t0 = np.array([1.0, 2.0, 3.0])
    p, tr = load_motion(path, fps=30, twin_pose=twin_pose, twin_transl_mm=t0)
    assert p.shape == (25, 72) and tr.shape == (25, 3)
    # frame 0: the twin's own orientation and translation (no spin to the mocap heading)
    assert np.allclose(rodrigues(p[0, :3]), rodrigues(SUPINE_GLOBAL_ORIENT), atol=1e-9)
    assert np.allclose(tr[0], t0)
    # later frames: the same body-local root rotation relative to frame 0 as the mocap
    for k in (5, 24):
        rel_twin = rodrigues(p[0, :3]).T @ rodrigues(p[k, :3])
        rel_mocap = rodrigues(poses[0, :3]).T @ rodrigues(poses[4 * k, :3])
        assert np.allclose(rel_twin, rel_mocap, atol=1e-9)
        # displacement length is preserved (metres -> mm) and body joints are untouched
        assert np.isclose(np.linalg.norm(tr[k] - t0), 1000 * np.linalg.norm(trans[4 * k] - trans[0]))
        assert np.allclose(rodrigues(p[k, 3:].reshape(23, 3)), rodrigues(poses[4 * k, 3:].reshape(23, 3)),
                           atol=1e-9)
    # a constant-orientation clip gives a constant root: the body does not spin
    q = np.tile(poses[:1], (10, 1))
    write_motion_file(path.parent / "still.npz", q, np.zeros((10, 3)), 60.0)
    p2, tr2 = load_motion(path.parent / "still.npz", fps=None)
    assert np.allclose(rodrigues(p2[:, :3]), rodrigues(SUPINE_GLOBAL_ORIENT)[None], atol=1e-9)
    assert np.allclose(tr2, 0)


def test_motion_errors(tmp_path):
    with pytest.raises(CtwinError, match="not found"):
        load_motion(tmp_path / "nope.npz")
    np.savez(tmp_path / "norate.npz", poses=np.zeros((3, 72)), trans=np.zeros((3, 3)))
    with pytest.raises(CtwinError, match="frame rate"):
        load_motion(tmp_path / "norate.npz")
    np.savez(tmp_path / "alt.npz", poses=np.zeros((3, 156)), trans=np.zeros((3, 3)), mocap_frame_rate=30.0)
    p, t = load_motion(tmp_path / "alt.npz")
    assert p.shape == (3, 72)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CtwinError):
        load_motion(tmp_path / "junk.npz")
