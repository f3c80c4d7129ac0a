"""Posing fast path: composed frames reuse their buffers (only what the last frame wrote is restored)
and stay identical to a fresh composition."""
import numpy as np

from ctwin.core.drr.projector import Scene, PlacedVolume, compose_scene
from ctwin.core.volumes.volume import Volume, affine_from


def _rot(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _scene_parts(rng):
    n = (22, 20, 26)
    base = rng.normal(0, 300, n).astype(np.int16)
    base[:4] = -1000
    base[:, :, -5:] = -1000
    aff = affine_from((2.0, 1.5, 2.5), (-20.0, -15.0, -30.0))
    subs = []
    for lo in ((5, 4, 6), (12, 9, 12)):
        sl = tuple(slice(a, a + 7) for a in lo)
        data = rng.normal(1200, 200, (7, 7, 7)).astype(np.int16)
        mask = np.zeros((7, 7, 7), np.uint8)
        mask[1:6, 1:6, 1:6] = 1
        sa = aff.copy()
        sa[:3, 3] = aff[:3, :3] @ np.asarray(lo, float) + aff[:3, 3]
        subs.append((data, mask, sa))
        base[sl][mask > 0] = 40  # the bone's interior filled
    waff = affine_from((6.0, 6.0, 7.5), (-26.0, -21.0, -37.5))
    return base, aff, subs, waff


def _frame(rng, subs, waff, moved):
    aff = []
    for _, _, sa in subs:
        m = np.eye(4)
        if moved:
            m[:3, :3] = _rot(rng.uniform(-0.4, 0.4))
            m[:3, 3] = rng.uniform(-6, 6, 3)
        aff.append(m @ sa)
    disp = np.zeros((10, 10, 10, 3), np.float32)
    if moved:
        a = rng.integers(0, 5, 3)
        disp[a[0]:a[0] + 5, a[1]:a[1] + 4, a[2]:a[2] + 6] = rng.uniform(-5, 5, 3)
        disp[tuple(rng.integers(0, 10, 3))] = np.nan
    return aff, (disp, waff)


def test_composed_frames_reuse_buffers_and_equal_fresh_compositions():
    rng = np.random.default_rng(3)
    base, aff, subs, waff = _scene_parts(rng)

    def new_scene():
        return Scene(base=Volume(base, aff), parts=[PlacedVolume(d, m, a.copy()) for d, m, a in subs], compose=True)

    scene = new_scene()
    restored = 0
    grid = (np.array([-8, -8, -8]), np.array([40, 40, 48]))
    for f in range(10):
        aff_f, warp = _frame(rng, subs, waff, moved=f % 4 != 0)
        g = grid if f % 3 else None  # repeated layouts (restored) and fresh ones
        before = {i: st["layout"] for i, st in scene._buffer_state.items()}
        scene.set_frame(aff_f, warp, g)
        pv = compose_scene(scene)
        fresh = new_scene()
        fresh.set_frame(aff_f, warp, g)
        ref = compose_scene(fresh)
        assert pv.shape == ref.shape
        assert np.array_equal(pv.flat, ref.flat), f"frame {f}"
        assert np.array_equal(pv.occupancy(), ref.occupancy()), f"frame {f}"
        st = scene._buffer_state[id(scene._composed[next(reversed(scene._composed))][2])]
        restored += int(before.get(id(st["buffer"])) == st["layout"])
    assert restored >= 3  # the restore path was exercised, not only full fills


def test_composed_frames_empty_space_grid_is_exact():
    """The composed frame's empty-space grid equals the grid computed from its voxels afterwards
    (``occupancy_grid``), on random frames whose content moves away from occupied blocks of the CT,
    through fresh fills and restored buffers; renders skipping by it equal renders without skipping."""
    from ctwin.core.drr import projector

    rng = np.random.default_rng(5)
    base, aff, subs, waff = _scene_parts(rng)
    scene = Scene(base=Volume(base, aff), parts=[PlacedVolume(d, m, a.copy()) for d, m, a in subs], compose=True)
    grid = (np.array([-8, -8, -8]), np.array([40, 40, 48]))
    cleared = 0
    for f in range(8):
        aff_f, (disp, _) = _frame(rng, subs, waff, moved=f % 4 != 0)
        if f % 4 == 2:  # a large cell of air: the CT's content there goes
            disp[1:6, 1:6, 1:7] = np.nan
        scene.set_frame(aff_f, (disp, waff), grid if f % 3 else None)
        pv = projector.compose_scene(scene)
        exact = projector.occupancy_grid(pv.flat, pv.lut, pv.shape)
        assert np.array_equal(pv.occupancy(), exact), f"frame {f}"
        # blocks that the CT's grid (shifted onto the frame) marks and that the frame left empty
        i0, on = projector.scene_grid(scene)
        clean = projector._base_occupancy(projector.prepare_volume(scene.base), np.asarray(base.shape), on, -i0)[0]
        cleared += int(np.count_nonzero(clean.reshape(-1) > exact))
        if f == 2:
            from ctwin.core.drr.carm import named_view

            g = named_view("ap", pv.bbox_world(), size=24)
            full = projector.PreparedVolume(pv.flat, pv.shape, pv.affine, pv.lut, "hu", np.ones_like(exact), pv.lin)
            img = projector.render_drr(pv, g, device="cpu")
            assert img.max() > 0
            np.testing.assert_allclose(img, projector.render_drr(full, g, device="cpu"), rtol=0,
                                       atol=1e-9 * img.max())
    assert cleared > 20  # the frames did empty blocks that the CT occupies


def test_forward_skinning_equals_a_numpy_blend_of_the_weight_field():
    """The per-pose blended weight field (P, S per weight node) gives sum_j w_j(x) D_j x / sum_j w_j(x)
    with w trilinear in the weight grid (clamped at its faces), as a plain numpy evaluation does."""
    from types import SimpleNamespace

    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    from ctwin.core.twin import articulated as A

    rng = np.random.default_rng(7)
    W = rng.uniform(0, 1, (6, 5, 7, 24)).astype(np.float32)
    W[W < 0.8] = 0  # sparse rows
    W[:2] = 0  # nodes without any weight: the identity there
    waff = affine_from((8.0, 9.0, 7.0), (-20.0, -18.0, -25.0))
    art = SimpleNamespace(weights=W, weight_affine=waff, weight_joints=np.arange(24), _cache={})
    jd = np.tile(np.eye(4), (24, 1, 1))
    jd[:, :3, :3] = Rotation.from_rotvec(rng.normal(0, 0.3, (24, 3))).as_matrix()
    jd[:, :3, 3] = rng.normal(0, 10, (24, 3))
    pts = rng.uniform(-30, 40, (400, 3))
    got = A.forward_lbs(art, pts, jd)
    idx = (pts - waff[:3, 3]) @ np.linalg.inv(waff[:3, :3]).T
    w = np.stack([ndimage.map_coordinates(W[..., j].astype(np.float64), idx.T, order=1, mode="nearest")
                  for j in range(24)], axis=1)
    M = np.einsum("nj,jrc->nrc", w, jd[:, :3])
    tot = w.sum(axis=1)
    M[tot > 0] /= tot[tot > 0, None, None]
    M[tot <= 0] = np.eye(4)[:3]
    ref = np.einsum("nrc,nc->nr", M[:, :, :3], pts) + M[:, :, 3]
    assert (tot <= 0).any() and (tot > 0).sum() > 200
    np.testing.assert_allclose(got, ref, atol=1e-9)
    # a second pose reuses the blended field's arrays and gives that pose's result
    got2 = A.forward_lbs(art, pts, np.tile(np.eye(4), (24, 1, 1)))
    np.testing.assert_allclose(got2, pts, atol=1e-12)


def test_closed_form_affine_inverse_equals_lapack_and_refuses_singular_transforms():
    """``invert_affine`` (per-frame inverses without a LAPACK call) equals ``np.linalg.inv`` for single
    transforms and stacks, and refuses a singular one with a one-line error."""
    import pytest

    from ctwin.core.errors import CtwinError
    from ctwin.core.volumes.volume import invert_affine

    rng = np.random.default_rng(11)
    m = np.tile(np.eye(4), (50, 1, 1))
    m[:, :3, :3] = rng.normal(0, 1, (50, 3, 3)) * rng.uniform(0.3, 3.0, (50, 1, 1))
    m[:, :3, 3] = rng.normal(0, 300, (50, 3))
    ref = np.linalg.inv(m)
    got = invert_affine(m)
    assert got.shape == m.shape
    scale = np.abs(ref).max(axis=(1, 2), keepdims=True)
    assert np.all(np.abs(got - ref) <= 1e-11 * scale)
    np.testing.assert_allclose(invert_affine(m[3]), ref[3], rtol=0, atol=1e-11 * scale[3].item())
    np.testing.assert_array_equal(got[:, 3], np.tile([0.0, 0.0, 0.0, 1.0], (50, 1)))
    a = affine_from((0.8, 0.8, 2.5), (-200.0, -180.0, 40.0))
    ia = invert_affine(a)  # an axis-aligned lattice: its inverse is axis-aligned exactly (the
    np.testing.assert_allclose(ia @ a, np.eye(4), atol=1e-13)  # composition's diagonal fast path)
    assert np.count_nonzero(ia[:3, :3] - np.diag(np.diag(ia[:3, :3]))) == 0
    bad = np.eye(4)
    bad[2, :3] = bad[1, :3]
    with pytest.raises(CtwinError, match="singular"):
        invert_affine(bad)


def test_nearest_skinned_point_per_warp_node_equals_a_brute_force_search():
    """The inverse warp's start: per warp node within R of a forward-skinned point, the nearest point
    (ties: smallest first node coordinate, then smallest index), against a numpy search over all
    pairs. Integer coordinates make exact ties, which the slab-parallel kernel must break the same way."""
    from ctwin.core.twin import articulated as A

    rng = np.random.default_rng(5)
    waff = affine_from((6.0, 5.0, 7.0), (-12.0, 4.0, -21.0))
    wn = np.array([9, 11, 8])
    lo, hi = waff[:3, 3] - 10, waff[:3, 3] + (wn - 1) * np.array([6.0, 5.0, 7.0]) + 10
    # pairs of points mirrored about a node: equally near (half of them with the same first node
    # coordinate, which leaves the index to break the tie)
    centre = np.indices(wn).reshape(3, -1).T[rng.choice(int(np.prod(wn)), 20, replace=False)] @ waff[:3, :3].T + waff[:3, 3]
    off = rng.integers(-3, 4, (20, 3)).astype(float)
    off[::2, 0] = 0.0
    off[np.all(off == 0, axis=1)] = [0.0, 1.0, 2.0]
    pts = np.concatenate([rng.uniform(lo, hi, (60, 3)),  # off the grid: far from some nodes
                          rng.integers(lo.astype(int), hi.astype(int), (60, 3)).astype(float),
                          centre + off, centre - off])
    R = 9.0
    N = int(np.prod(wn))
    best, src = np.full(N, np.inf), np.full(N, -1, np.int64)
    A._nearest_points(pts, waff, wn, R, best, src)

    nodes = np.indices(wn).reshape(3, -1).T @ waff[:3, :3].T + waff[:3, 3]
    d2 = ((nodes[:, None, :] - pts[None, :, :]) ** 2).sum(axis=2)
    g0 = (pts[:, 0] - waff[0, 3]) / 6.0
    want = np.full(N, -1)
    for n in range(N):
        ok = np.flatnonzero(d2[n] <= R * R)
        if len(ok):
            want[n] = ok[np.lexsort((ok, g0[ok], d2[n, ok]))[0]]
    reached = want >= 0
    assert reached.sum() > 100 and (~reached).sum() > 50  # both kinds of node occur
    tied = [n for n in np.flatnonzero(reached) if np.sum(d2[n] == d2[n, want[n]]) > 1]
    assert len(tied) > 10, len(tied)
    np.testing.assert_array_equal(src, want)
    np.testing.assert_allclose(best[reached], d2[np.flatnonzero(reached), want[reached]], rtol=1e-12)
    assert np.all(np.isinf(best[~reached]))
