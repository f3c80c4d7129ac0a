"""The region similarity of the registration (``core.twin.registration``: ``_region_masks``,
``_RegionLevel``, ``_region_level``): a limb group scored where its bones project."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ctwin.core.drr.carm import Geometry
from ctwin.core.twin import registration as R


def _geometry(n=32):
    return Geometry((0.0, -1000.0, 0.0), (0.0, 500.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, -1.0),
                    (2.0, 2.0), (n, n), False, {"sad_mm": 1000.0})


def test_region_score_is_the_gradient_correlation_over_the_region():
    """Over every pixel the region score is ``_Level``'s; over a box it equals numpy's correlation
    coefficient of the gradients in the box (mean of the two components); a faint object moved
    within its box costs the region score far more than the whole view's score, which a bright
    object's edges dominate."""
    yy, xx = np.mgrid[0:32, 0:32]
    bright = 6.0 * ((xx > 3) & (xx < 14) & (yy > 3) & (yy < 14))

    def faint(dx):
        return 1.5 * ((xx > 19 + dx) & (xx < 25 + dx) & (yy > 19) & (yy < 25))

    target = bright + faint(0)
    cloud = R.BoneCloud(["b"], np.zeros((1, 3)), np.ones(1), np.zeros(1, np.int32), 2.0)
    xr = [R.XRay("v", target, _geometry())]
    level = R._Level(xr, 32, cloud)
    img = target + 0.05 * np.random.default_rng(3).normal(size=target.shape)
    whole = R._RegionLevel(level, [np.ones((32, 32), bool)])
    assert whole.score([img]) == pytest.approx(level.score([img]), abs=1e-12)
    box = np.zeros((32, 32), bool)
    box[15:31, 15:31] = True
    region = R._RegionLevel(level, [box])
    ga, gt = R._grad_pair(img, level.sigma[0]), R._grad_pair(target, level.sigma[0])
    inner = box[1:-1, 1:-1]
    ref = 0.5 * sum(np.corrcoef(a[inner], t[inner])[0, 1] for a, t in zip(ga, gt))
    assert region.score([img]) == pytest.approx(ref, abs=1e-9)
    assert region.size == level.size and region.views is level.views  # the rest is the level's
    moved = bright + faint(3)
    assert region.score([target]) - region.score([moved]) > 5 * (level.score([target]) - level.score([moved])) > 0


class _Toy:
    """A stand-in for ``_Problem``: structure 0 turns about the origin with joint 1's rotation
    vector, structure 1 is fixed."""

    sjoints = [{1}, {2}]

    def __init__(self, level):
        self.pose, self.transl, self.level = np.zeros(72), np.zeros(3), level

    def _terms_of(self, j):
        return np.ones(3), np.full(3, -np.pi), np.full(3, np.pi)

    def transforms(self, pose, transl):
        T = np.tile(np.eye(4), (2, 1, 1))
        T[0, :3, :3] = Rotation.from_rotvec(pose[3:6]).as_matrix()
        return T

    def level_views(self, level):
        return level.views


def test_region_covers_the_moving_bone_within_its_span_and_margin():
    """``_region_masks``: the pixels where the moving bone's splat lands, at its current pose and
    with each axis of its joint turned by +-span, lie inside the region; the fixed bone's do not
    (it is not in the group), and the region reaches about ``margin`` beyond the bone's image."""
    z = np.linspace(-20.0, 0.0, 11)
    bar = np.c_[np.zeros_like(z), np.zeros_like(z), z]  # a bone along -z from the origin
    far = np.array([[24.0, 0.0, 24.0]])
    cloud = R.BoneCloud(["bar", "far"], np.r_[bar, far], np.ones(12), np.r_[np.zeros(11), [1]].astype(np.int32), 2.0)
    xr = [R.XRay("v", np.zeros((64, 64)), _geometry(64))]
    level = R._Level(xr, 64, cloud)
    toy = _Toy(level)
    view = level.views[0]
    masks = R._region_masks(toy, level, [1], 20.0, 4.0)
    m = masks[0]
    for ax in range(3):
        for s in (-20.0, 0.0, 20.0):
            p = np.zeros(72)
            p[3 + ax] = np.radians(s)
            img = R.splat_bones(cloud.points[:11], cloud.weight[:11], np.zeros(11, np.int32),
                                toy.transforms(p, None)[:1], view)
            assert m[img > 0].all()
    img_far = R.splat_bones(far, np.ones(1), np.zeros(1, np.int32), np.eye(4)[None], view)
    assert not m[img_far > 0].any()
    # no span: the bar's own box (1 x 20 mm at the isocentre, x1.5 on the 2 mm pixels) and 4 mm around it
    m0 = R._region_masks(toy, level, [1], 0.0, 4.0)[0]
    rows, cols = np.flatnonzero(m0.any(axis=1)), np.flatnonzero(m0.any(axis=0))
    pad = 4.0 * 1.5 / 2.0
    assert abs(len(rows) - (20 * 1.5 / 2.0 + 2 * pad)) <= 3 and abs(len(cols) - 2 * pad) <= 3
    assert R._region_masks(toy, level, [5], 20.0, 4.0) is None  # no bone moves with joint 5


def test_region_level_scores_only_the_named_groups(monkeypatch):
    """``_region_level``: off by default; with ``REGION_GROUPS`` the named groups' stages (either
    side; "evolve_" for a global search) at ``REGION_LEVELS`` get a ``_RegionLevel``, the root's,
    other groups' and other levels' stages the level itself."""
    cloud = R.BoneCloud(["bar"], np.array([[0.0, 0.0, -10.0]]), np.ones(1), np.zeros(1, np.int32), 2.0)
    level = R._Level([R.XRay("v", np.zeros((32, 32)), _geometry())], 32, cloud)
    toy = _Toy(level)
    assert R._region_level(toy, level, 0, "left_elbow", [1]) is level
    monkeypatch.setattr(R, "REGION_GROUPS", ("elbow", "evolve_arm"))
    monkeypatch.setattr(R, "REGION_LEVELS", (1,))
    assert isinstance(R._region_level(toy, level, 1, "left_elbow", [1]), R._RegionLevel)
    assert isinstance(R._region_level(toy, level, 1, "right_elbow", [1]), R._RegionLevel)
    assert isinstance(R._region_level(toy, level, 1, "evolve_left_arm", [1], 30.0), R._RegionLevel)
    for li, name, joints in ((0, "left_elbow", [1]), (1, "left_hip", [1]), (1, "left_arm_root", [0, 1]),
                             (1, "elbow_x", [1])):
        assert R._region_level(toy, level, li, name, joints) is level
