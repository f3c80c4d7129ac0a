"""Batched DRRs of many views and rigid poses, fixed samples per ray, float16 storage; CUDA (simulator)."""
import textwrap

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ctwin.core.drr.carm import named_view
from ctwin.core.drr.projector import (half_precision, prepare_volume, render_drr, render_drr_batch)
from ctwin.core.errors import CtwinError
from ctwin.core.volumes.volume import Volume, affine_from

from conftest import cuda_simulator_errors, real_ct_path


def _poses(n, seed=0, deg=12.0, mm=6.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = np.eye(4)
        t[:3, :3] = Rotation.from_rotvec(np.radians(deg) * rng.normal(size=3) / np.sqrt(3)).as_matrix()
        t[:3, 3] = rng.normal(0.0, mm, 3)
        out.append(t)
    return out


@pytest.fixture(scope="module")
def vol():
    """Small smooth int16 HU volume, oblique and anisotropic, with an air slab (empty blocks)."""
    rng = np.random.default_rng(3)
    d = ndimage.gaussian_filter(rng.normal(size=(18, 14, 12)), 1.2)
    d = np.clip(d / d.std() * 600 + 150, -1000, 2500).astype(np.int16)
    d[:6] = -1000
    r = Rotation.from_rotvec([0.2, -0.3, 0.1]).as_matrix()
    return Volume(d, affine_from((1.5, 2.0, 2.5), (-14, -13, -15), r))


@pytest.mark.parametrize("method", ["trilinear", "siddon", "exact"])
def test_batch_of_views_and_poses_equals_per_item_renders(vol, method):
    views = [named_view(n, vol, size=(9, 7), margin=1.3) for n in ("ap", "lat_left", "lao30_cran10")]
    poses = _poses(3)
    got = render_drr_batch(vol, views, transforms=poses, method=method, device="cpu")
    assert got.shape == (3, 7, 9)
    for g, t, img in zip(views, poses, got):
        ref = render_drr(Volume(vol.data, t @ vol.affine), g, method=method, device="cpu")
        assert ref.max() > 0
        assert np.array_equal(img, ref)  # the same kernel code per ray, bit for bit
    # the poses move the image: a batch of one view under several poses differs item to item
    one_view = render_drr_batch(vol, views[:1], transforms=poses, method=method, device="cpu")
    for t, img in zip(poses, one_view):
        assert np.array_equal(img, render_drr(Volume(vol.data, t @ vol.affine), views[0], method=method,
                                              device="cpu"))
    assert np.abs(one_view[0] - one_view[1]).max() > 0.05 * one_view.max()
    # several views of one pose; the identity pose gives the plain batch of views
    assert np.array_equal(render_drr_batch(vol, views, transforms=np.eye(4), method=method, device="cpu"),
                          render_drr_batch(vol, views, method=method, device="cpu"))


def test_batch_rejects_bad_input(vol):
    views = [named_view(n, vol, size=6) for n in ("ap", "lat_left")]
    with pytest.raises(CtwinError, match="geometries and 3 transforms"):
        render_drr_batch(vol, views, transforms=_poses(3), device="cpu")
    with pytest.raises(CtwinError, match="4x4"):
        render_drr_batch(vol, views, transforms=np.eye(3), device="cpu")
    with pytest.raises(CtwinError, match="trilinear"):
        render_drr_batch(vol, views, samples_per_ray=10, method="siddon", device="cpu")
    with pytest.raises(CtwinError, match="either"):
        render_drr(vol, views[0], samples_per_ray=10, step_mm=0.5, device="cpu")
    with pytest.raises(CtwinError, match="whole number"):
        render_drr(vol, views[0], samples_per_ray=0, device="cpu")
    with pytest.raises(CtwinError, match="storage"):
        prepare_volume(vol, storage="bfloat16")


def _midpoint_reference(volume: Volume, g, n: int) -> np.ndarray:
    """n midpoint samples of the SPEC 5 trilinear mu field over each ray's part inside the cell box
    (scipy map_coordinates, order 1, edge values outside the voxel centres)."""
    mu = np.maximum(0.02 * (1 + volume.data.astype(np.float64) / 1000.0), 0.0)
    shape = np.array(mu.shape)
    inv = np.linalg.inv(volume.affine)
    o, d, length = g.rays()
    p = o @ inv[:3, :3].T + inv[:3, 3]
    q = d @ inv[:3, :3].T
    t0, t1 = np.zeros(length.shape), length.copy()
    for a in range(3):
        with np.errstate(divide="ignore", invalid="ignore"):
            ta, tb = (-0.5 - p[..., a]) / q[..., a], (shape[a] - 0.5 - p[..., a]) / q[..., a]
        t0, t1 = np.maximum(t0, np.minimum(ta, tb)), np.minimum(t1, np.maximum(ta, tb))
    h = np.clip(t1 - t0, 0, None) / n
    t = t0[..., None] + (np.arange(n) + 0.5) * h[..., None]
    pts = p[..., None, :] + t[..., None] * q[..., None, :]
    pts = np.clip(pts, 0, shape - 1)
    vals = ndimage.map_coordinates(mu, pts.reshape(-1, 3).T, order=1).reshape(t.shape)
    return vals.sum(axis=-1) * h


def test_samples_per_ray_takes_exactly_that_many_samples(vol):
    g = named_view("lao30_cran10", vol, size=(8, 6), margin=1.2)
    for n in (3, 7):
        got = render_drr(vol, g, samples_per_ray=n, device="cpu")
        ref = _midpoint_reference(vol, g, n)
        other = _midpoint_reference(vol, g, n + 1)
        assert ref.max() > 0
        err = np.abs(got - ref).max() / ref.max()
        assert err <= 1e-5, (n, err)
        assert np.abs(other - ref).max() / ref.max() > 50 * max(err, 1e-7)  # the count is visible
    # many samples converge to the default step's integral
    fine = render_drr(vol, g, samples_per_ray=500, device="cpu")
    default = render_drr(vol, g, device="cpu")
    assert np.abs(fine - default).max() <= 2e-3 * default.max()


def _max_rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def test_float16_storage_keeps_every_pixel_within_0_1_percent(vol):
    pv = prepare_volume(vol)
    h = half_precision(pv)
    assert h.quantity == "mu" and h.flat.dtype == np.int16 and h.flat.nbytes == pv.flat.nbytes
    assert prepare_volume(vol, storage="float16").flat.tobytes() == h.flat.tobytes()
    assert half_precision(h) is h
    views = [named_view(n, vol, size=12) for n in ("ap", "lat_left")]
    a = render_drr_batch(pv, views, transforms=_poses(2), samples_per_ray=64, device="cpu")
    b = render_drr_batch(h, views, transforms=_poses(2), samples_per_ray=64, device="cpu")
    err = _max_rel(b, a)
    assert 0 < err <= 1e-3  # float16 changes the values, within 0.1 % of the image maximum


@pytest.mark.parametrize("which", ["real_ct", "phantom"])
def test_float16_at_nanodrr_settings(which, request):
    """200x200 pixels, 500 samples per ray (nanodrr's benchmark settings), AP and lateral, on the
    real abdomen CT and the phantom (the test session's coarse one; benchmarks/bench_gpu.py
    measures the 1.5 mm phantom)."""
    from ctwin.core.volumes.ct import load_ct

    path = (real_ct_path("abdomen_pelvis", "ct.nii.gz") if which == "real_ct"
            else request.getfixturevalue("coarse_phantoms")["supine_arms_down"] / "ct.nii.gz")
    ct = prepare_volume(load_ct(path))
    views = [named_view(n, ct.bbox_world(), size=200) for n in ("ap", "lat_left")]
    a = render_drr_batch(ct, views, samples_per_ray=500, device="cpu")
    b = render_drr_batch(half_precision(ct), views, samples_per_ray=500, device="cpu")
    assert a.max() > 1.0
    assert 0 < _max_rel(b, a) <= 1e-3


CUDASIM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
    from launch import load_package
    load_package("ctwin")
    import numpy as np
    from ctwin.core.drr.carm import named_view
    from ctwin.core.drr.projector import half_precision, prepare_volume, render_drr_batch
    from ctwin.core.volumes.volume import Volume, affine_from
    rng = np.random.default_rng(0)
    d = rng.normal(200, 400, (12, 10, 9)).astype(np.int16)
    d[:4] = -1000
    vol = prepare_volume(Volume(d, affine_from((2.0, 1.5, 2.5), (-12, -8, -11))))
    views = [named_view(n, vol.bbox_world(), size=6) for n in ("ap", "lat_left", "lao30_cran10")]
    poses = [np.eye(4) for _ in range(3)]
    for i, t in enumerate(poses):
        c, s = np.cos(0.2 * i), np.sin(0.2 * i)
        t[:2, :2] = [[c, -s], [s, c]]
        t[:3, 3] = [2.0 * i, -1.0, 0.5 * i]
    res = {}
    for name, v, kw in (("poses_trilinear", vol, {}), ("poses_siddon", vol, {"method": "siddon"}),
                        ("poses_samples", vol, {"samples_per_ray": 40}),
                        ("float16_samples", half_precision(vol), {"samples_per_ray": 40})):
        a = render_drr_batch(v, views, transforms=poses, device="cpu", **kw)
        b = render_drr_batch(v, views, transforms=poses, device="cuda", **kw)
        res[name] = [float(np.abs(a - b).max()), float(a.max())]
    print("RESULT" + json.dumps(res))
""")


@pytest.mark.cudasim
def test_batched_poses_cuda_matches_cpu_under_simulator(tmp_path):
    cuda_simulator_errors(CUDASIM_SCRIPT, tmp_path, entries=4)
