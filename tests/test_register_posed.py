"""The registration's refinement scored with the twin's posed DRR (core.twin.registration.posed_refine)."""
from __future__ import annotations

import numpy as np
import pytest


def _synthetic_articulated():
    """A 2 mm articulated CT (24 x 18 x 30): a water body in air, one bone block (700 HU) with a
    one-voxel rim in its crop, the soft tissue with the bone filled; a 6 mm weight grid (3 voxels,
    its nodes on the centres of voxels 1, 4, 7, ...), one channel."""
    from ctwin.core.drr.projector import PlacedVolume
    from ctwin.core.twin.articulated import ArticulatedCT

    A = np.diag([2.0, 2.0, 2.0, 1.0])
    A[:3, 3] = (-24.0, -18.0, -30.0)
    i, j, k = np.indices((24, 18, 30))
    ct = np.where(((i - 11.5) / 10) ** 2 + ((j - 8.5) / 7) ** 2 + ((k - 14.5) / 13) ** 2 < 1, 40, -1000).astype(np.int16)
    bone = np.zeros(ct.shape, bool)
    bone[6:13, 5:11, 8:20] = True
    ct[bone] = 700
    soft = ct.copy()
    soft[bone] = 40
    lo, hi = (5, 4, 7), (15, 12, 22)  # the crop: the bone and its rim (and a voxel more)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask = np.zeros(ct.shape, np.uint8)
    mask[5:14, 4:12, 7:21] = 1
    aff = A.copy()
    aff[:3, 3] = A[:3, :3] @ np.asarray(lo, float) + A[:3, 3]
    part = PlacedVolume(ct[sl].copy(), mask[sl].copy(), aff, "block", "bone", None, 0)
    W = np.ones((8, 6, 10, 1), np.float32)
    WA = np.diag([6.0, 6.0, 6.0, 1.0])
    WA[:3, 3] = A[:3, 3] + 2.0
    return ArticulatedCT(A, soft, [part], W, WA, np.array([0])), ct


def test_coarse_articulated_is_the_pooled_ct():
    """Pooled by 3 (onto its weight grid), the articulated CT at rest composes to the CT's 3 x 3 x 3
    block means: its DRR is the pooled CT's DRR, and its voxel centres are the blocks' centres."""
    from ctwin.core.drr.carm import default_views
    from ctwin.core.drr.projector import render_drr
    from ctwin.core.errors import CtwinError
    from ctwin.core.twin.articulated import posed_scene, render_posed
    from ctwin.core.twin.registration import coarse_articulated, weight_cell_voxels
    from ctwin.core.volumes.volume import Volume

    art, ct = _synthetic_articulated()
    assert weight_cell_voxels(art) == 3
    c = coarse_articulated(art, 3)
    assert c.shape == (8, 6, 10) and coarse_articulated(art, 3) is c  # cached
    pooled = ct.astype(np.float64).reshape(8, 3, 6, 3, 10, 3).mean(axis=(1, 3, 5))
    # coarse voxel (0, 0, 0) is the mean of fine voxels 0..2: centred on fine voxel 1
    assert np.allclose(c.affine @ [0, 0, 0, 1], art.affine @ [1, 1, 1, 1])
    assert np.allclose(c.affine[:3, :3], 3 * art.affine[:3, :3])
    ref_vol = Volume(pooled.astype(np.float32), c.affine)
    for g in default_views(ref_vol, size=32).values():
        got = render_posed(posed_scene(c), g, device="cpu")
        ref = render_drr(ref_vol, g, device="cpu")
        assert ref.max() > 0.3
        # int16 rounding of the block means only
        assert np.abs(got - ref).max() < 2e-3 * ref.max(), np.abs(got - ref).max()
    # a factor whose lattice the weight grid is not on stops with one line
    with pytest.raises(CtwinError, match="weight grid"):
        coarse_articulated(art, 2)


def test_compass_search_finds_a_quadratics_minimum_within_its_budget():
    from ctwin.core.twin.registration import compass_search

    c = np.array([1.3, -0.7, 0.25])
    calls = []

    def f(x):
        calls.append(1)
        return float(np.sum((np.asarray(x) - c) ** 2 * [1.0, 4.0, 2.0]))

    x, fx, n = compass_search(f, np.zeros(3), [0.5, 0.5, 0.5], 400, min_scale=1e-3)
    assert n == len(calls) <= 400
    assert np.abs(x - c).max() < 2e-3 and fx == pytest.approx(f(x))
    x, fx, n = compass_search(f, np.zeros(3), [0.5, 0.5, 0.5], 7)
    assert n == 7 and fx < f(np.zeros(3))


def test_posed_refinement_recovers_an_offset_of_the_twins_own_pose(twin_dir):
    """Target: the twin's own posed DRRs (AP + lateral, 64 px) at a pose; start: that pose with the
    left shoulder abducted 12 degrees more and the root 8 mm off. The posed refinement moves both
    back and raises the similarity; a budget of one evaluation leaves the pose as it was."""
    from ctwin.core.body.skeleton import JOINT_INDEX
    from ctwin.core.twin.registration import XRay, _Level, _Problem, bone_cloud, posed_drrs, posed_refine
    from ctwin.core.twin.twin import load_twin

    twin = load_twin(twin_dir)
    cloud = bone_cloud(twin)
    js = JOINT_INDEX["left_shoulder"]
    pt = twin.pose0.copy()
    pt[3 * js + 2] += np.radians(-20.0)
    tt = twin.transl0_mm.copy()
    geoms = list(twin.default_views(size=64).values())
    xr = [XRay(f"v{i}", img, g) for i, (img, g) in enumerate(zip(posed_drrs(twin, pt, tt, geoms), geoms))]
    level = _Level(xr, 64, cloud)
    p0 = pt.copy()
    p0[3 * js + 2] += np.radians(12.0)
    t0 = tt + [8.0, 0.0, 0.0]

    prob = _Problem(twin, cloud, xr, p0, t0, True)
    st = posed_refine(prob, level, maxfev=1, joints=("pelvis", "left_shoulder"), decoupled=())
    assert st["evals"] == 1 and np.array_equal(prob.pose, p0) and np.array_equal(prob.transl, t0)

    st = posed_refine(prob, level, maxfev=50, joints=("pelvis", "left_shoulder"), decoupled=())
    assert st["after"] > st["before"] and st["params"] == 9
    err0 = abs(p0[3 * js + 2] - pt[3 * js + 2])
    err = abs(prob.pose[3 * js + 2] - pt[3 * js + 2])
    assert np.degrees(err) < 0.5 * np.degrees(err0), np.degrees(err)
    assert np.linalg.norm(prob.transl - tt) < 0.5 * np.linalg.norm(t0 - tt), prob.transl - tt


def test_decoupled_rotation_keeps_the_childrens_world_orientations():
    from ctwin.core.body.skeleton import JOINT_INDEX, PARENTS, forward_kinematics, rodrigues
    from ctwin.core.twin.registration import decoupled_rotation

    rng = np.random.default_rng(3)
    rest = np.cumsum(rng.normal(0, 50, (24, 3)), axis=0)
    pose = rng.normal(0, 0.3, 72)
    j = JOINT_INDEX["spine3"]
    dR = rodrigues(np.radians([7.0, -4.0, 5.0]))
    moved = decoupled_rotation(pose, j, dR)
    A0, _ = forward_kinematics(pose, rest)
    A1, _ = forward_kinematics(moved, rest)
    kids = np.flatnonzero(PARENTS == j)
    assert len(kids) == 3  # neck and both collars
    assert np.allclose(A1[kids, :3, :3], A0[kids, :3, :3], atol=1e-10)
    assert np.allclose(A1[j, :3, :3], A0[j, :3, :3] @ dR, atol=1e-10)
    others = [k for k in range(24) if k != j and k not in kids]
    assert np.array_equal(moved[np.ravel([[3 * k, 3 * k + 1, 3 * k + 2] for k in others])],
                          pose[np.ravel([[3 * k, 3 * k + 1, 3 * k + 2] for k in others])])
