"""SPEC section 6 metrics: exactness of the geometric kernels, the metric definitions, DRR similarity."""
from __future__ import annotations

import numpy as np
import pytest

from ctwin.core.meshes import metrics
from ctwin.core.errors import CtwinError
from ctwin.core.volumes.volume import Volume, affine_from


def _icosphere(radius=50.0, subdiv=3, center=(0.0, 0.0, 0.0)):
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdiv, radius=radius)
    return np.asarray(m.vertices) + np.asarray(center), np.asarray(m.faces, dtype=np.int64)


def _box(lo, hi):
    import trimesh

    m = trimesh.creation.box(bounds=[lo, hi])
    return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)


def _brute_distance(points, V, F):
    out = np.empty(len(points))
    for i, p in enumerate(points):
        best = np.inf
        for f in F:
            q = metrics._closest_on_triangle(p, V[f[0]], V[f[1]], V[f[2]])
            best = min(best, np.linalg.norm(q - p))
        out[i] = best
    return out


def test_point_to_surface_matches_brute_force():
    V, F = _icosphere(40.0, subdiv=1)
    V = V * np.array([1.0, 0.5, 1.5])  # anisotropic: large uneven triangles stress the candidate search
    rng = np.random.default_rng(3)
    pts = rng.normal(scale=60.0, size=(300, 3))
    d = metrics.point_to_surface(pts, V, F, k=2)
    np.testing.assert_allclose(d, _brute_distance(pts, V, F), atol=1e-9)


def test_point_to_surface_box_analytic():
    V, F = _box([0, 0, 0], [10, 20, 30])
    pts = np.array([[5, 10, 15], [-3, 10, 15], [13, 24, 15], [5, 10, 40], [-1, -2, -2]], float)
    expect = [5.0, 3.0, 5.0, 10.0, 3.0]
    np.testing.assert_allclose(metrics.point_to_surface(pts, V, F), expect, atol=1e-9)


def test_sample_surface_is_area_uniform_and_deterministic():
    V, F = _box([0, 0, 0], [10, 10, 100])  # two 10x10 caps, four 10x100 sides: cap share = 200/4200
    p1 = metrics.sample_surface(V, F, 42000, seed=5)
    p2 = metrics.sample_surface(V, F, 42000, seed=5)
    np.testing.assert_array_equal(p1, p2)
    caps = np.isclose(p1[:, 2], 0) | np.isclose(p1[:, 2], 100)
    assert abs(caps.mean() - 200 / 4200) < 0.006
    d = metrics.point_to_surface(p1[:500], V, F)
    assert d.max() < 1e-9


def test_winding_number_closed_matches_exact_solid_angles():
    V, F = _icosphere(50.0, subdiv=2)
    assert metrics.is_closed(F)
    rng = np.random.default_rng(0)
    pts = rng.uniform(-80, 80, size=(4000, 3))
    fast = metrics.winding_number(pts, V, F)
    exact = metrics.winding_number_exact(pts, V, F)
    np.testing.assert_allclose(fast, np.round(exact), atol=0)
    r = np.linalg.norm(pts, axis=1)
    # away from the faceted surface, inside == inside the sphere
    clear = (r < 45) | (r > 51)
    np.testing.assert_array_equal(fast[clear] >= 0.5, r[clear] < 48)
    # grid-aligned points (ties on shared edges and vertices in projection) are never double counted
    g = np.stack(np.meshgrid(*[np.arange(-60, 61, 5.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    g = g[metrics.point_to_surface(g, V, F) > 1e-6]  # points on the surface itself are ambiguous
    wg = metrics.winding_number(g, V, F)
    assert set(np.unique(wg)) <= {0.0, 1.0}
    np.testing.assert_array_equal(wg, np.round(metrics.winding_number_exact(g, V, F)))


def test_winding_number_nested_and_inverted_and_open():
    V1, F1 = _icosphere(50.0, subdiv=2)
    V2, F2 = _icosphere(20.0, subdiv=2, center=(10, 0, 0))
    V = np.vstack([V1, V2])
    F = np.vstack([F1, F2 + len(V1)])  # overlapping shells: winding 2 in the small one
    pts = np.array([[10.0, 0, 0], [-40.0, 0, 0], [70.0, 0, 0]])
    np.testing.assert_array_equal(metrics.winding_number(pts, V, F), [2, 1, 0])
    np.testing.assert_array_equal(metrics.winding_number(pts, V1, F1[:, ::-1]), [-1, -1, 0])
    # open mesh (one face removed): falls back to the exact solid-angle sum, about 1 deep inside
    w = metrics.winding_number(np.zeros((1, 3)), V1, F1[1:])
    assert not metrics.is_closed(F1[1:])
    assert 0.9 < w[0] < 1.0


def test_winding_number_speed_300k_points():
    import time

    V, F = _icosphere(150.0, subdiv=5)  # 20k triangles
    pts = np.random.default_rng(1).uniform(-160, 160, size=(300_000, 3))
    metrics.winding_number(pts[:10], V, F)  # compile
    t0 = time.perf_counter()
    w = metrics.winding_number(pts, V, F)
    dt = time.perf_counter() - t0
    r = np.linalg.norm(pts, axis=1)
    clear = np.abs(r - 150) > 1.0
    np.testing.assert_array_equal(w[clear] >= 0.5, r[clear] < 150)
    assert dt < 10.0, f"winding number took {dt:.1f} s"


def test_chamfer_definition_on_concentric_boxes():
    # body: box offset 2 mm outward on x/y from the skin box, same z; FOV cuts the caps away
    skin = _box([-50, -30, -200], [50, 30, 200])
    body = _box([-52, -32, -200], [52, 32, 200])
    c, info = metrics.chamfer_mm(body, skin, (-150.0, 150.0), n=20000, details=True)
    # skin samples are all exactly 2 mm from the body; body samples >= 2 mm (more near the edges)
    assert abs(info["skin_to_body_mm"] - 2.0) < 1e-9
    assert 2.0 <= info["body_to_skin_mm"] < 2.05
    assert c == pytest.approx(0.5 * (info["skin_to_body_mm"] + info["body_to_skin_mm"]))
    assert info["n_body"] < 20000 and info["n_skin"] < 20000
    # a Volume gives the FOV from its bounding box (z from -150 to 150 here)
    vol = Volume(np.zeros((2, 2, 100), np.int16), affine_from([1, 1, 3], [0, 0, -148.5]))
    assert 2.0 <= metrics.chamfer_mm(body, skin, vol, n=5000) < 2.03
    assert metrics.chamfer_mm(skin, skin, (-150, 150), n=5000) < 1e-9
    with pytest.raises(CtwinError):
        metrics.chamfer_mm(body, skin, (500.0, 600.0), n=1000)


def test_enclosure_pct_counts_skeletal_voxels_only():
    data = np.zeros((20, 20, 20), np.uint8)
    data[2:6, 8:12, 8:12] = 25     # sacrum (skeletal): 64 voxels
    data[14:18, 8:12, 8:12] = 5    # liver (not skeletal)
    data[12:14, 8:12, 8:12] = 75   # femur_left (skeletal): 32 voxels
    lm = Volume(data, affine_from([2, 2, 2], [0, 0, 0]))
    names = {25: "sacrum", 5: "liver", 75: "femur_left"}
    V, F = _box([0, 0, 0], [13, 40, 40])  # x < 13 mm: voxels i <= 6 inside -> sacrum only
    val, info = metrics.enclosure_pct(V, F, lm, names, details=True)
    assert info["n_points"] == 96
    assert val == pytest.approx(100 * 64 / 96)
    V2, F2 = _box([-1, -1, -1], [41, 41, 41])
    assert metrics.enclosure_pct(V2, F2, lm, names) == 100.0
    with pytest.raises(CtwinError):
        metrics.enclosure_pct(V2, F2, lm, {5: "liver"})


def test_drr_similarity_definition():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 4, size=(64, 64)).astype(np.float32)
    test = ref + rng.normal(scale=0.2, size=ref.shape)
    out = metrics.drr_similarity(test, ref)
    a = np.clip(test / ref.max(), 0, 1)
    b = np.clip(ref / ref.max(), 0, 1)
    assert out["psnr_db"] == pytest.approx(10 * np.log10(1 / np.mean((a - b) ** 2)))
    assert out["ssim"] == pytest.approx(structural_similarity(
        a, b, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
    same = metrics.drr_similarity(ref, ref)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr_db"] == float("inf")
    with pytest.raises(CtwinError):
        metrics.drr_similarity(ref, ref[:10])


def test_closest_points_on_triangles_against_dense_sampling():
    """Every region of the triangle (3 vertices, 3 edges, the face): the closest point is no
    farther than any of 5151 barycentric samples of the triangle, its barycentric coordinates are
    a convex combination that reproduces it, and it is never more than a sample spacing from the
    best sample (an independent, slow reference)."""
    rng = np.random.default_rng(7)
    n = 400
    a, b, c = (rng.normal(0.0, 10.0, (n, 3)) for _ in range(3))
    p = (a + b + c) / 3.0 + rng.normal(0.0, 15.0, (n, 3))
    q, bary = metrics.closest_points_on_triangles(p, a, b, c)
    assert np.all(bary >= -1e-12) and np.allclose(bary.sum(axis=1), 1.0)
    np.testing.assert_allclose(bary[:, :1] * a + bary[:, 1:2] * b + bary[:, 2:] * c, q, atol=1e-9)
    k = 100
    i, j = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
    keep = i + j <= k
    u, v = i[keep] / k, j[keep] / k
    samples = (1 - u - v)[None, :, None] * a[:, None] + u[None, :, None] * b[:, None] + v[None, :, None] * c[:, None]
    d_samples = np.linalg.norm(samples - p[:, None], axis=-1)
    d = np.linalg.norm(q - p, axis=1)
    assert np.all(d <= d_samples.min(axis=1) + 1e-9)
    spacing = np.maximum.reduce([np.linalg.norm(b - a, axis=1), np.linalg.norm(c - a, axis=1),
                                 np.linalg.norm(c - b, axis=1)]) / k
    assert np.all(d_samples.min(axis=1) - d <= spacing)
    # all seven regions were exercised
    region = (bary > 1e-12).astype(int) @ np.array([1, 2, 4])
    assert set(region.tolist()) == {1, 2, 3, 4, 5, 6, 7}
    # the scalar routine used by point_to_surface agrees exactly
    for t in range(0, n, 37):
        np.testing.assert_array_equal(metrics._closest_on_triangle(p[t], a[t], b[t], c[t]), q[t])
