"""DRR projector: analytic phantoms, float64 reference, Siddon, scenes, CUDA (simulator), plastimatch, CLI."""
import shutil
import subprocess
import textwrap

import numpy as np
import pytest

from ctwin.core.drr.carm import Geometry, named_view
from ctwin.core.drr.projector import (Scene, PlacedVolume, prepare_volume, reference_drr, render_biplanar,
                                  render_drr, render_drr_batch, render_scene, render_value)
from ctwin.core.volumes.volume import Volume, affine_from

from conftest import cuda_simulator_errors, real_ct_path


def _rot(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _chords(vol: Volume, g: Geometry) -> np.ndarray:
    """Exact length of each pixel ray inside the volume's cell box (slab method in numpy)."""
    o, d, length = g.rays()
    inv = np.linalg.inv(vol.affine)
    p = o @ inv[:3, :3].T + inv[:3, 3]
    q = d @ inv[:3, :3].T
    t0, t1 = np.zeros(length.shape), length.copy()
    for a, n in enumerate(vol.shape):
        with np.errstate(divide="ignore", invalid="ignore"):
            ta, tb = (-0.5 - p[..., a]) / q[..., a], (n - 0.5 - p[..., a]) / q[..., a]
        t0, t1 = np.maximum(t0, np.minimum(ta, tb)), np.minimum(t1, np.maximum(ta, tb))
    return np.clip(t1 - t0, 0, None)


def _rel_err(a, ref):
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def smooth_volume():
    """Random smooth int16 HU volume, rotated, anisotropic, with empty (air) blocks."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    d = ndimage.gaussian_filter(rng.normal(size=(34, 26, 22)), 1.5)
    d = np.clip(d / d.std() * 700 + 100, -1000, 2500).astype(np.int16)
    d[:13] = -1000  # air: empty-space skipping must not change the result
    d[:, :, 18:] = -1024
    return Volume(d, affine_from((1.2, 1.5, 2.0), (-18, -20, -22), _rot(0.3, -0.2, 0.5)))


@pytest.mark.parametrize("method", ["trilinear", "siddon", "exact"])
@pytest.mark.parametrize("parallel", [False, True])
def test_uniform_box_matches_closed_form(method, parallel):
    vol = Volume(np.full((14, 12, 10), 500, np.int16),
                 affine_from((2.0, 1.5, 2.5), (-12, -9, -11), _rot(0.4, 0.3, -0.6)))
    g = named_view("lao25_cran15", vol, size=(16, 12), parallel=parallel, margin=1.3)
    img = render_drr(vol, g, method=method, device="cpu")
    expect = 0.03 * _chords(vol, g)
    assert expect.max() > 0 and (expect == 0).any()  # some rays miss, some cross
    assert _rel_err(img, expect) <= 0.005


def test_gaussian_ellipsoid_matches_closed_form():
    R = _rot(0.2, 0.5, -0.3)
    S = R @ np.diag([9.0, 6.0, 7.5]) ** 2 @ R.T  # covariance (mm^2)
    Si = np.linalg.inv(S)
    A, h, n = 0.04, 1.0, 64
    aff = affine_from((h, h, h), [-(n - 1) * h / 2] * 3)
    vol0 = Volume(np.zeros((n, n, n), np.int16), aff)
    x = vol0.voxel_centers_world()
    mu = A * np.exp(-0.5 * np.einsum("ni,ij,nj->n", x, Si, x)).reshape(n, n, n)
    vol = Volume(np.rint((mu / 0.02 - 1.0) * 1000.0).astype(np.int16), aff)
    g = named_view("rao30_caud10", vol, size=20)
    o, d, _ = g.rays()
    a = np.einsum("hwi,ij,hwj->hw", d, Si, d)
    b = np.einsum("hwi,ij,hwj->hw", d, Si, o)
    c = np.einsum("hwi,ij,hwj->hw", o, Si, o)
    expect = A * np.sqrt(2 * np.pi / a) * np.exp(-0.5 * (c - b * b / a))
    img = render_drr(vol, g, device="cpu")
    assert _rel_err(img, expect) <= 0.005
    assert _rel_err(render_drr(vol, g, method="exact", device="cpu"), expect) <= 0.005


@pytest.mark.parametrize("view,parallel", [("lao40_cran20", False), ("lat_right", True)])
def test_trilinear_matches_float64_reference(smooth_volume, view, parallel):
    g = named_view(view, smooth_volume, size=(14, 11), parallel=parallel)
    ref = reference_drr(smooth_volume, g, step_mm=0.02)
    img = render_drr(smooth_volume, g, device="cpu")
    assert _rel_err(img, ref) <= 0.005
    # the exact mode integrates the same field without a step: only the reference's own error
    assert _rel_err(render_drr(smooth_volume, g, method="exact", device="cpu"), ref) <= 2e-5
    # empty-space skipping is exact: same sums with the occupancy grid switched off
    pv = prepare_volume(smooth_volume)
    occ = pv.occupancy()
    assert 0 < occ.sum() < occ.size
    pv_full = prepare_volume(smooth_volume)
    pv_full.occ = np.ones_like(occ)
    for method in ("trilinear", "exact", "siddon"):
        assert np.allclose(render_drr(pv, g, method=method, device="cpu"),
                           render_drr(pv_full, g, method=method, device="cpu"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("view", ["ap", "lat_left"])
def test_siddon_is_exact_for_the_nearest_voxel_field(smooth_volume, view):
    vol = smooth_volume
    g = named_view(view, vol, size=(9, 8))
    o, d, length = g.rays()
    inv = np.linalg.inv(vol.affine)
    mu = np.maximum(0.02 * (1 + vol.data / 1000.0), 0)
    n = np.array(vol.shape)
    ref = np.zeros(length.shape)
    for r in range(length.shape[0]):
        for c in range(length.shape[1]):
            t = np.arange(0, length[r, c], 0.01) + 0.005
            p = (o[r, c] + t[:, None] * d[r, c]) @ inv[:3, :3].T + inv[:3, 3]
            inside = np.all((p >= -0.5) & (p <= n - 0.5), axis=1)
            ii = np.clip(np.floor(p[inside] + 0.5).astype(int), 0, n - 1)
            ref[r, c] = mu[ii[:, 0], ii[:, 1], ii[:, 2]].sum() * 0.01
    img = render_drr(vol, g, method="siddon", device="cpu")
    assert _rel_err(img, ref) <= 5e-4


def test_float16_mu_volume_matches_int16_hu(smooth_volume):
    mu = np.maximum(0.02 * (1 + smooth_volume.data / 1000.0), 0).astype(np.float16)
    g = named_view("lat_left", smooth_volume, size=10)
    a = render_drr(smooth_volume, g, device="cpu")
    b = render_drr(Volume(mu, smooth_volume.affine), g, device="cpu")
    assert _rel_err(b, a) <= 2e-3


def test_biplanar_pair(smooth_volume):
    pair = render_biplanar(smooth_volume, size=16, device="cpu")
    assert set(pair) == {"ap", "lateral"}
    (ap, gap), (lat, glat) = pair["ap"], pair["lateral"]
    assert np.allclose(gap.extra["isocenter_mm"], glat.extra["isocenter_mm"])
    assert abs(gap.ray_direction @ glat.ray_direction) < 1e-9  # orthogonal beams
    assert np.array_equal(ap, render_drr(smooth_volume, gap, device="cpu"))
    assert np.array_equal(lat, render_drr(smooth_volume, glat, device="cpu"))
    assert ap.max() > 0 and lat.max() > 0
    # the same views in one batched launch
    for method in ("trilinear", "siddon"):
        batch = render_drr_batch(smooth_volume, [gap, glat], method=method, device="cpu")
        assert batch.shape == (2, 16, 16)
        assert np.allclose(batch[1], render_drr(smooth_volume, glat, method=method, device="cpu"), atol=1e-6)


def test_polyenergetic_and_noise_options(smooth_volume):
    g = named_view("ap", smooth_volume, size=12)
    mono = render_value(smooth_volume, g, device="cpu")
    poly = render_value(smooth_volume, g, kvp=80, device="cpu")
    inten = render_value(smooth_volume, g, kvp=80, value="intensity", device="cpu")
    noisy = render_value(smooth_volume, g, photons=1e3, seed=1, device="cpu")
    assert np.allclose(inten, np.exp(-poly), rtol=1e-5)
    m = mono > 0.05 * mono.max()
    assert np.corrcoef(mono[m], poly[m])[0, 1] > 0.95 and not np.allclose(mono, poly)
    assert np.abs(noisy - mono).max() > 0 and np.array_equal(
        noisy, render_value(smooth_volume, g, photons=1e3, seed=1, device="cpu"))


def _cube_world():
    """Water box in air with a dense 'bone' cube (HU 1500), 1.5 mm voxels."""
    d = np.full((22, 20, 18), -1000, np.int16)
    d[2:-2, 2:-2, 2:-2] = 0
    d[6:10, 7:11, 5:9] = 1500
    return Volume(d, affine_from((1.5, 1.5, 1.5), (-15, -14, -12), _rot(0.1, 0.2, 0.0)))


def test_scene_rigid_subvolume_identity_and_motion():
    vol = _cube_world()
    g = named_view("lao20_cran10", vol, size=(12, 10))
    crop = (slice(3, 13), slice(4, 14), slice(2, 12))
    sub_data = vol.data[crop].copy()
    mask = np.zeros_like(sub_data, np.uint8)
    mask[2:8, 2:8, 2:8] = 1  # the cube plus a one-voxel rim of water
    off = vol.index_to_world([3, 4, 2]) - vol.index_to_world([0, 0, 0])
    sub_aff = vol.affine.copy()
    sub_aff[:3, 3] += off
    soft = vol.data.copy()
    soft[6:10, 7:11, 5:9] = 0
    scene = Scene(base=Volume(soft, vol.affine), parts=[PlacedVolume(sub_data, mask, sub_aff)])
    # identity: exactly the DRR of the original CT
    assert _rel_err(render_scene(scene, g, device="cpu"), render_drr(vol, g, device="cpu")) <= 1e-5
    # move the piece by 3 voxels along the volume's i axis: equals the CT with the cube moved
    shift = np.eye(4)
    shift[:3, 3] = 3 * vol.affine[:3, 0]
    scene.set_frame([shift @ sub_aff])
    moved = soft.copy()
    moved[9:13, 7:11, 5:9] = 1500
    expect = render_drr(Volume(moved, vol.affine), g, device="cpu")
    got = render_scene(scene, g, device="cpu")
    assert _rel_err(got, expect) <= 1e-4
    assert _rel_err(got, render_drr(vol, g, device="cpu")) > 0.05  # the motion is visible


def test_scene_inverse_warp_translates_the_base():
    vol = _cube_world()
    g = named_view("ap", vol, size=(12, 10), margin=1.4)
    dvec = np.array([4.0, -2.0, 3.0])  # rest = posed + d: the image content moves by -d
    lo, hi = vol.bbox_world()
    waff = affine_from((6.0, 6.0, 6.0), lo - 12.0)
    wshape = tuple(int(x) for x in np.ceil((hi - lo + 24.0) / 6.0) + 1)
    disp = np.broadcast_to(dvec, wshape + (3,)).astype(np.float32)
    scene = Scene(base=vol, warp=(disp, waff))
    moved_aff = vol.affine.copy()
    moved_aff[:3, 3] -= dvec
    expect = render_drr(Volume(vol.data, moved_aff), g, device="cpu")
    assert _rel_err(render_scene(scene, g, device="cpu"), expect) <= 0.005


CUDASIM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
    from launch import load_package
    load_package("ctwin")
    import numpy as np
    from ctwin.core.drr.carm import named_view
    from ctwin.core.drr.projector import Scene, PlacedVolume, render_drr, render_drr_batch, render_scene
    from ctwin.core.volumes.volume import Volume, affine_from
    rng = np.random.default_rng(0)
    d = rng.normal(200, 400, (16, 16, 16)).astype(np.int16)
    d[:5] = -1000
    vol = Volume(d, affine_from((2.0, 1.5, 2.5), (-15, -12, -20)))
    res = {}
    for par in (False, True):
        g = named_view("lao30_cran10", vol, size=8, parallel=par)
        for m in ("trilinear", "siddon", "exact"):
            a = render_drr(vol, g, method=m, device="cpu")
            b = render_drr(vol, g, method=m, device="cuda")
            res[f"{m}_{par}"] = [float(np.abs(a - b).max()), float(a.max())]
    g = named_view("ap", vol, size=8)
    g2 = named_view("lat_left", vol, size=8)
    a = render_drr_batch(vol, [g, g2], device="cpu")
    b = render_drr_batch(vol, [g, g2], device="cuda")
    res["batch"] = [float(np.abs(a - b).max()), float(a.max())]
    mask = np.zeros((6, 6, 6), np.uint8); mask[1:5, 1:5, 1:5] = 1
    aff = vol.affine.copy(); aff[:3, 3] += [3.0, 1.0, -2.0]
    disp = np.full((4, 4, 4, 3), 1.5, np.float32)
    sc = Scene(base=vol, parts=[PlacedVolume(d[5:11, 5:11, 5:11].copy(), mask, aff)],
               warp=(disp, affine_from((12.0, 12.0, 12.0), (-20, -20, -25))))
    a = render_scene(sc, g, device="cpu")
    b = render_scene(sc, g, device="cuda")
    res["scene"] = [float(np.abs(a - b).max()), float(a.max())]
    print("RESULT" + json.dumps(res))
""")


@pytest.mark.cudasim
def test_cuda_kernels_match_cpu_under_simulator(tmp_path):
    cuda_simulator_errors(CUDASIM_SCRIPT, tmp_path, entries=8)


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _identity_direction(vol: Volume) -> Volume:
    """Flip axes so the direction matrix is the identity (plastimatch ignores direction cosines)."""
    A, d = vol.affine.copy(), vol.data
    for ax in range(3):
        if A[ax, ax] < 0:
            d = np.flip(d, axis=ax)
            A[:3, 3] += A[:3, ax] * (d.shape[ax] - 1)
            A[:3, ax] *= -1
    assert np.allclose(A[:3, :3], np.diag(np.diag(A[:3, :3])))
    return Volume(np.ascontiguousarray(d), A)


def test_matches_plastimatch_drr_on_real_ct(tmp_path):
    if shutil.which("plastimatch") is None:
        pytest.skip("plastimatch is not installed (apt-get install plastimatch)")
    from ctwin.core.volumes.ct import load_ct, save_itk

    vol = load_ct(real_ct_path("abdomen_pelvis", "ct.nii.gz"))
    mu = np.maximum(0.02 * (1 + vol.data / 1000.0), 0).astype(np.float32)
    save_itk(_identity_direction(vol.with_data(mu)), tmp_path / "mu.mha")
    pv = prepare_volume(vol)
    for view in ("ap", "lat_left"):
        g = named_view(view, vol, size=128)
        iso = g.extra["isocenter_mm"]
        W, H = g.size_px
        # plastimatch: -n points from the detector towards the source, --vup to the top row,
        # "-P none" integrates the voxel values as given (mu per mm here); output in cm units.
        cmd = ["plastimatch", "drr", "-P", "none", "-t", "raw", "-i", "exact",
               "-o", " ".join(map(str, iso)), "-n", " ".join(map(str, -g.ray_direction)),
               "--vup", " ".join(map(str, -g.detector_v)), "--sad", "1000", "--sid", "1500",
               "-r", f"{H} {W}", "-z", f"{H * g.pixel_spacing_mm[1]} {W * g.pixel_spacing_mm[0]}",
               "-O", str(tmp_path / f"pm_{view}_"), str(tmp_path / "mu.mha")]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        pm = np.fromfile(tmp_path / f"pm_{view}_0000.raw", np.float32).reshape(H, W) * 10.0
        for method in ("trilinear", "siddon"):
            ours = render_drr(pv, g, method=method, device="cpu")
            assert _ncc(ours, pm) >= 0.999, (view, method)
        m = pm > 0.2 * pm.max()
        assert np.median(ours[m] / pm[m]) == pytest.approx(1.0, abs=0.01)


def test_render_command_ct_path(tmp_path, capsys):
    from ctwin import cli
    from ctwin.core.drr.projector import read_frame
    from ctwin.core.volumes.volume import save_nifti

    vol = _cube_world()
    ct = tmp_path / "ct.nii.gz"
    save_nifti(vol, ct)
    out = tmp_path / "out"
    assert cli.main(["render", "--ct", str(ct), "--size", "24x20", "--device", "cpu", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["ap_0000.json", "ap_0000.tif", "lateral_0000.json", "lateral_0000.tif"]
    img, sc = read_frame(out / "ap_0000")
    assert img.dtype == np.float32 and img.shape == (20, 24) and img.max() > 0
    g = Geometry.from_sidecar(sc)
    assert np.allclose(img, render_drr(vol, g, device="cpu"), rtol=1e-5, atol=1e-6)
    # resume: frames already written are skipped
    mtime = (out / "ap_0000.tif").stat().st_mtime_ns
    assert cli.main(["render", "--ct", str(ct), "--size", "24x20", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "ap_0000.tif").stat().st_mtime_ns == mtime
    # --geometry reuses the exact geometry
    out2 = tmp_path / "out2"
    assert cli.main(["render", "--ct", str(ct), "--geometry", str(out / "lateral_0000.json"),
                     "--device", "cpu", "--value", "display", "--out", str(out2)]) == 0
    img2, sc2 = read_frame(out2 / "lateral_0000")
    assert sc2["projection"] == read_frame(out / "lateral_0000")[1]["projection"] and sc2["value"] == "display"
    assert 0 <= img2.min() and img2.max() <= 1
    assert not list(out2.glob(".*part*"))  # no temporary files left behind
    # bad input: one-line errors, exit 2
    capsys.readouterr()
    assert cli.main(["render", "--ct", str(ct), "--size", "0x5", "--out", str(out)]) == 2
    assert cli.main(["render", "--ct", str(ct), "--pose", "x.json", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("error" in e for e in err)


def test_composed_frame_buffers_are_reused_and_freed():
    """A posed scene's frame buffers: a free one big enough is reused, free ones too small are
    dropped, and buffers of cached frames are never handed out."""
    from ctwin.core.drr.projector import _buffer
    from ctwin.core.volumes.volume import Volume, affine_from

    scene = Scene(base=Volume(np.zeros((4, 4, 4), np.int16), affine_from((1.0, 1.0, 1.0), (0, 0, 0))))
    used = np.zeros(6, np.int16)  # same size as a free one: arrays must be told apart by identity
    small1, small2 = np.zeros(5, np.int16), np.zeros(6, np.int16)
    scene._composed["frame"] = (None, None, used)
    scene._buffers[:] = [small1, used, small2]
    b = _buffer(scene, 50)
    assert b.size >= 50 and b is not used
    assert [id(x) for x in scene._buffers] == [id(used), id(b)]
    assert _buffer(scene, 40) is b  # free and big enough: reused
