"""Dual-quaternion skinning of the twin's body surface (core.rig.pose.dqs_points)."""
import numpy as np
from scipy.spatial.transform import Rotation

from ctwin.core.rig.pose import dqs_points, lbs_points


def _rigid(rotvec, t):
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    m[:3, 3] = t
    return m


def test_one_joint_is_the_rigid_transform():
    rng = np.random.default_rng(0)
    d = np.stack([_rigid(rng.normal(size=3), rng.normal(size=3) * 50) for _ in range(4)])
    p = rng.normal(size=(50, 3)) * 100
    idx = rng.integers(0, 4, size=(50, 1))
    w = np.ones((50, 1))
    np.testing.assert_allclose(dqs_points(d, p, idx, w), lbs_points(d, p, idx, w), atol=1e-9)
    # equal transforms blended are that transform, whatever the weights (and antipodal quaternions)
    same = np.stack([d[0], d[0]])
    w2 = rng.dirichlet([1, 1], size=50)
    idx2 = np.tile([0, 1], (50, 1))
    np.testing.assert_allclose(dqs_points(same, p, idx2, w2), lbs_points(same, p, idx2, w2), atol=1e-9)


def test_twist_keeps_the_radius_where_linear_blending_collapses():
    # points on a ring of radius 30 about the x axis, half-way between a fixed joint and one twisted
    # by 150 degrees about x: linear blending pulls them toward the axis, dual quaternions do not
    ang = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    p = np.stack([np.full_like(ang, 100.0), 30 * np.cos(ang), 30 * np.sin(ang)], axis=1)
    d = np.stack([np.eye(4), _rigid([np.radians(150), 0, 0], [0, 0, 0])])
    idx = np.tile([0, 1], (len(p), 1))
    w = np.full((len(p), 2), 0.5)
    r_dqs = np.linalg.norm(dqs_points(d, p, idx, w)[:, 1:], axis=1)
    r_lbs = np.linalg.norm(lbs_points(d, p, idx, w)[:, 1:], axis=1)
    np.testing.assert_allclose(r_dqs, 30.0, atol=1e-9)
    assert r_lbs.max() < 10.0
