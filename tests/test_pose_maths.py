"""The vectorised pose maths of the registration's cost function against obvious references.

``core.body.skeleton`` (rodrigues, rigid_transforms one tree depth at a time, ForwardKinematics
recomputing only what changed, rotvec_fast), ``core.rig.pose.vertebra_transforms`` (all vertebra
bones in one batch) and ``core.twin.registration`` (the structures' transforms, the Gaussian
gradients and the score): each equals a joint-by-joint (or vertebra-by-vertebra, image-by-image)
loop of the textbook formula bit for bit where it performs the same floating-point operations,
and scipy's rotations (an independent implementation) to 1e-12 otherwise.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation, Slerp

from ctwin.core.body.skeleton import (
    JOINT_INDEX, PARENTS, ForwardKinematics, canonical_joints_mm, depth_levels, forward_kinematics, rigid_transforms,
    rodrigues, rotvec_fast,
)
from ctwin.core.errors import CtwinError


def _bits(a) -> bytes:
    return np.ascontiguousarray(a, dtype=np.float64).tobytes()


def _fk_reference(rots, rest, parents):
    """The chain joint by joint: G_i = G_parent L_i, A_i = G_i T(-J_i)."""
    g = np.zeros((len(parents), 4, 4))
    for i, p in enumerate(parents):
        local = np.eye(4)
        local[:3, :3] = rots[i]
        local[:3, 3] = rest[i] if p < 0 else rest[i] - rest[p]
        g[i] = local if p < 0 else g[p] @ local
    a = g.copy()
    a[:, :3, 3] -= np.einsum("nij,nj->ni", g[:, :3, :3], rest)
    return a, g[:, :3, 3].copy()


def _rodrigues_reference(r):
    """R = I + sin(t) K + (1 - cos(t)) K^2 of one axis-angle vector."""
    t = np.sqrt(np.add.reduce(r * r))
    if t < 1e-12:
        return np.eye(3)
    k = r / t
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(t) * K + (1.0 - np.cos(t)) * (K @ K)


def test_rodrigues_equals_the_per_vector_formula_and_scipy():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(200, 3)) * 10 ** rng.uniform(-13, 0.5, (200, 1))
    r[:3] = 0.0
    batch = rodrigues(r)
    assert all(_bits(batch[i]) == _bits(_rodrigues_reference(r[i])) for i in range(len(r)))
    assert _bits(rodrigues(r[7])) == _bits(batch[7]) and rodrigues(r[7]).shape == (3, 3)
    # (1 - cos t) of a tiny angle cancels: 5e-13 at t ~ 1e-8, the formula's own precision
    assert np.abs(batch - Rotation.from_rotvec(r).as_matrix()).max() < 1e-12


def test_forward_kinematics_by_depth_equals_the_joint_by_joint_chain():
    rng = np.random.default_rng(1)
    rest = canonical_joints_mm()
    for _ in range(50):
        rots = rodrigues(rng.normal(size=(24, 3)))
        a, jp = rigid_transforms(rots, rest)
        ra, rj = _fk_reference(rots, rest, PARENTS)
        assert _bits(a) == _bits(ra) and _bits(jp) == _bits(rj)
    # any tree whose parents precede their children
    parents = np.array([-1, 0, 1, 0, 3, 2, 5, 5, -1, 8])
    rest10 = rng.normal(size=(10, 3)) * 100
    rots = rodrigues(rng.normal(size=(10, 3)))
    assert [list(x) for x in depth_levels(parents)] == [[0, 8], [1, 3, 9], [2, 4], [5], [6, 7]]
    assert _bits(rigid_transforms(rots, rest10, parents)[0]) == _bits(_fk_reference(rots, rest10, parents)[0])
    with pytest.raises(CtwinError, match="does not precede"):
        depth_levels([-1, 2, 0])


def test_incremental_forward_kinematics_equals_a_full_recomputation():
    """An optimiser's sequence of poses, each changing a few joints (or none, or the root):
    ForwardKinematics keeps the unchanged joints' transforms and gives the full chain's bits."""
    rng = np.random.default_rng(2)
    rest = canonical_joints_mm()
    fk = ForwardKinematics(rest)
    pose = rng.normal(size=72) * 0.3
    for step in range(300):
        pose = pose.copy()
        for j in rng.choice(24, size=int(rng.integers(0, 4)), replace=False):
            pose[3 * j:3 * j + 3] += rng.normal(size=3) * 0.2
        a = fk(pose)
        assert _bits(a) == _bits(forward_kinematics(pose, rest)[0]), step
        a[:] = 0.0  # the caller owns the result
    assert _bits(fk(pose)) == _bits(forward_kinematics(pose, rest)[0])


def test_rotvec_fast_equals_scipy():
    rng = np.random.default_rng(3)
    rv = rng.normal(size=(500, 3))
    rv *= rng.uniform(0.0, math.pi - 2e-4, (500, 1)) / np.linalg.norm(rv, axis=1, keepdims=True)
    rv[:2] = [[0.0, 0.0, 0.0], [1e-11, 0.0, 0.0]]
    near = np.array([[math.pi - 1e-5, 0.0, 0.0], [0.0, 0.0, math.pi]])  # the scipy fallback
    R = Rotation.from_rotvec(np.r_[rv, near]).as_matrix()
    got = rotvec_fast(R)
    assert got.shape == (502, 3) and rotvec_fast(R[5]).shape == (3,)
    err = np.abs(got[:500] - rv).max(axis=1)
    ang = np.linalg.norm(rv, axis=1)
    assert err[ang < 2.5].max() < 1e-14 and err[ang < 3.1].max() < 1e-12 and err.max() < 1e-7
    assert np.allclose(np.abs(got[500:]), np.abs(near), atol=1e-9)


def _vertebra_reference(d, lower, upper, w, c):
    """One vertebra bone by scipy's slerp of its joints' rotations, the anchor lerped."""
    da, db = d[lower], d[upper]
    if lower == upper or w <= 0.0:
        return da
    r = db[:3, :3] if w >= 1.0 else Slerp([0.0, 1.0], Rotation.from_matrix([da[:3, :3], db[:3, :3]]))(w).as_matrix()
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = (1.0 - w) * (da[:3, :3] @ c + da[:3, 3]) + w * (db[:3, :3] @ c + db[:3, 3]) - r @ c
    return out


def test_vertebra_transforms_batch_equals_each_vertebra():
    from ctwin.core.rig.binding import VertebraBone
    from ctwin.core.rig.pose import vertebra_transform, vertebra_transforms

    rng = np.random.default_rng(4)
    rest = canonical_joints_mm()
    d = forward_kinematics(rng.normal(size=72) * 0.4, rest)[0]
    s1, s2, s3 = JOINT_INDEX["spine1"], JOINT_INDEX["spine2"], JOINT_INDEX["spine3"]
    lower = [0, s1, s1, s2, s3, s2, s2]
    upper = [s1, s2, s2, s3, s3, s3, s3]
    w = [0.3, 0.0, 0.75, 1.0, 0.5, 0.1, 0.999]
    c = rng.normal(size=(7, 3)) * 200
    for rv in (rotvec_fast, None):
        kw = {} if rv is None else {"rotvec": rv}
        got = vertebra_transforms(d, lower, upper, w, c, **kw)
        for k in range(7):
            assert np.abs(got[k] - _vertebra_reference(d, lower[k], upper[k], w[k], c[k])).max() < 1e-9, k
            one = vertebra_transforms(d, [lower[k]], [upper[k]], [w[k]], [c[k]], **kw)[0]
            assert _bits(one) == _bits(got[k]), k  # a batch is the vertebrae one at a time
    vb = VertebraBone("L3", 0, s1, 0.3, c[0], c[0])
    assert _bits(vertebra_transform(d, vb)) == _bits(vertebra_transforms(d, [0], [s1], [0.3], [c[0]])[0])


def test_structure_transforms_equal_the_renderers_posing():
    """The registration's per-structure 4x4s (joint, vertebra bone, soft-tissue block, table) equal
    core.rig.pose's (the renderer's) to 1e-9 mm, and an optimiser's sequence of poses gives the
    bits of the full recomputation (``arm.world_transforms(pose, t) @ inv(W0)``)."""
    from ctwin.core.rig.armature import build_armature
    from ctwin.core.rig.binding import Binding, VertebraBone
    from ctwin.core.rig.pose import bone_transforms, vertebra_transforms
    from ctwin.core.twin.registration import BoneCloud, _Problem

    rng = np.random.default_rng(5)
    p0 = rng.normal(size=72) * 0.1
    t0 = np.array([3.0, -40.0, 900.0])
    arm = build_armature(forward_kinematics(p0, canonical_joints_mm())[1] + t0, p0, t0)
    s1, s2 = JOINT_INDEX["spine1"], JOINT_INDEX["spine2"]
    vbs = {f"v{k}": VertebraBone(f"v{k}", s1, s2, w, rng.normal(size=3) * 100, np.zeros(3))
           for k, w in enumerate((0.0, 0.4, 0.8, 1.0))}
    rigid = {"femur_left": "left_hip", "tibia_left": "left_knee", "skull": "head", "l1": "v1", "l2": "v2",
             "l3": "v3", "l3_arch": "v3", "l0": "v0"}
    binding = Binding(arm, rigid, vbs)
    names = list(rigid) + ["_soft:left_knee", "_soft:pelvis", "_static"]
    cloud = BoneCloud(names, np.zeros((1, 3)), np.ones(1), np.zeros(1, np.int32), 2.0)
    prob = _Problem(SimpleNamespace(binding=binding), cloud, [], p0, t0, True)
    w0inv = np.linalg.inv(arm.world_transforms(arm.pose0, arm.transl0_mm))
    pose, t = p0.copy(), t0.copy()
    for step in range(40):
        pose = pose.copy()
        for j in rng.choice(24, size=int(rng.integers(1, 3)), replace=False):
            pose[3 * j:3 * j + 3] += rng.normal(size=3) * 0.2
        if step % 5 == 0:
            t = t + rng.normal(size=3) * 10
        idx = None if step % 2 else np.array(sorted(rng.choice(len(names), size=5, replace=False)))
        got = prob.transforms(pose, t, idx)
        sel = range(len(names)) if idx is None else idx
        d = arm.world_transforms(pose, t) @ w0inv
        ref = bone_transforms(binding, pose, t)
        lo, up, w, c = (np.array([getattr(vbs[n], f) for n in vbs]) for f in ("lower", "upper", "w", "anchor_mm"))
        vt = dict(zip(vbs, vertebra_transforms(d, lo, up, w, c, rotvec=rotvec_fast)))
        for k, i in enumerate(sel):
            n = names[i]
            exact = np.eye(4) if n == "_static" else d[JOINT_INDEX[n[6:]]] if n.startswith("_soft:") else \
                vt[rigid[n]] if rigid[n] in vbs else d[JOINT_INDEX[rigid[n]]]
            assert _bits(got[k]) == _bits(exact), (step, n)
            if n.startswith("_soft:"):
                assert np.abs(got[k] - arm.deltas(pose, t)[JOINT_INDEX[n[6:]]]).max() < 1e-9
            elif n != "_static":
                assert np.abs(got[k] - ref[n]).max() < 1e-9, (step, n)


def test_gradients_and_score_equal_the_filtered_reference():
    """_grad_pair equals scipy's gaussian_filter then central differences, and _Level.score the
    gradient correlation of Penney et al. written out, bit for bit."""
    from ctwin.core.twin.registration import _grad_pair, _Level, _normalised

    rng = np.random.default_rng(6)
    for shape, sigma, dtype in (((64, 64), 1.0, np.float64), ((70, 90), 2.37, np.float64), ((33, 40), 1.5, np.float32)):
        img = (rng.normal(size=shape) * 5).astype(dtype)
        s = gaussian_filter(img, sigma, mode="nearest")
        gx, gy = _grad_pair(img, sigma)
        assert gx.dtype == s.dtype
        assert _bits(gx) == _bits(s[1:-1, 2:] - s[1:-1, :-2]) and _bits(gy) == _bits(s[2:, 1:-1] - s[:-2, 1:-1])
    lvl = SimpleNamespace(targets=[], sigma=[])
    imgs, ref = [], 0.0
    for k in range(2):
        tgt = rng.normal(size=(48, 48))
        sig = 1.0 + 0.5 * k
        t = [_normalised(g) for g in _grad_pair(tgt, sig)]
        lvl.targets.append(tuple(t))
        lvl.sigma.append(sig)
        img = (rng.normal(size=(48, 48)), rng.normal(size=(48, 48)) if k else None)
        imgs.append(img)
        s = gaussian_filter(img[0] if img[1] is None else img[0] + img[1], sig, mode="nearest")
        for a, tt in zip((s[1:-1, 2:] - s[1:-1, :-2], s[2:, 1:-1] - s[:-2, 1:-1]), t):
            a = a - a.mean()
            ref += 0.5 * float((a * tt).sum()) / float(np.sqrt((a * a).sum()))
    assert _bits(_Level.score(lvl, imgs)) == _bits(ref)
