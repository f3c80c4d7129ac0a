"""The "ctwin DRR" Blender render engine: camera <-> geometry, F12 and animation renders, resume."""
import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from ctwin.core.drr.carm import named_view  # noqa: E402
from ctwin.core.drr.projector import read_frame, render_drr  # noqa: E402
from ctwin.core.volumes.volume import Volume, affine_from, save_nifti  # noqa: E402


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    d = np.full((20, 18, 16), -1000, np.int16)
    d[2:-2, 2:-2, 2:-2] = 0
    d[6:10, 7:11, 5:9] = 1200
    vol = Volume(d, affine_from((2.0, 2.0, 2.5), (-19, -17, -18)))
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    save_nifti(vol, path)
    return vol, path


def _scene_with_camera(geometry):
    from ctwin.render.camera import setup_xray_camera

    scene = bpy.context.scene
    cam = bpy.data.objects.new("xray", bpy.data.cameras.new("xray"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    setup_xray_camera(cam, geometry, scene)
    return scene, cam


def _same_geometry(a, b):
    assert np.allclose(a.source_mm, b.source_mm, atol=1e-3)
    assert np.allclose(a.detector_center_mm, b.detector_center_mm, atol=1e-2)
    assert np.allclose(a.detector_u, b.detector_u, atol=1e-6)
    assert np.allclose(a.detector_v, b.detector_v, atol=1e-6)
    assert np.allclose(a.pixel_spacing_mm, b.pixel_spacing_mm, rtol=1e-5)
    assert tuple(a.size_px) == tuple(b.size_px) and a.parallel == b.parallel


@pytest.mark.parametrize("view,parallel", [("lao20_cran10", False), ("lat_left", True)])
def test_camera_geometry_round_trip(render_registered, ct_file, view, parallel):
    from ctwin.render.camera import geometry_from_camera

    vol, _ = ct_file
    g = named_view(view, vol, size=(24, 20), parallel=parallel)
    scene, cam = _scene_with_camera(g)
    assert cam.data.type == ("ORTHO" if parallel else "PERSP")
    if not parallel:
        assert cam.data.lens == pytest.approx(1500.0)  # lens = SID
        assert cam.data.sensor_width == pytest.approx(24 * g.pixel_spacing_mm[0])  # = detector width
    _same_geometry(geometry_from_camera(scene), g)


def test_f12_and_animation_render_with_resume(render_registered, ct_file, tmp_path):
    from ctwin.render import scene_volumes

    vol, path = ct_file
    g = named_view("ap", vol, size=(24, 20))
    scene, cam = _scene_with_camera(g)
    scene.render.engine = "CTWIN_DRR"
    scene.ctwin.ct_path = str(path)
    scene.render.filepath = str(tmp_path / "drr" / "frame_")
    scene_volumes.clear_cache()

    # F12 (still): the image goes to the render result and to frame_0001.tif + .json
    scene.frame_set(1)
    bpy.ops.render.render()
    img, sc = read_frame(tmp_path / "drr" / "frame_0001")
    expect = render_drr(vol, g, device="cpu")
    assert img.shape == (20, 24) and expect.max() > 0
    tol = 2e-4 * expect.max()  # Blender keeps the camera in float32
    assert np.abs(img - expect).max() <= tol
    assert sc["frame"] == 1 and sc["value"] == "line_integral"
    assert np.allclose(sc["projection"], g.projection_matrix(), rtol=1e-5, atol=1e-3)
    exr = tmp_path / "result.exr"
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_depth = "32"
    bpy.data.images["Render Result"].save_render(filepath=str(exr))
    im = bpy.data.images.load(str(exr))
    px = np.array(im.pixels[:], np.float32).reshape(20, 24, 4)
    assert np.abs(px[::-1, :, 0] - img).max() <= 1e-5 * expect.max()

    # animation: the camera moves 30 mm along x between frames 1 and 3
    cam.keyframe_insert("location", frame=1)
    cam.location.x += 0.03
    cam.keyframe_insert("location", frame=3)
    scene.frame_start, scene.frame_end = 1, 3
    (tmp_path / "drr" / "frame_0001.tif").unlink()
    bpy.ops.render.render(animation=True)
    frames = {f: read_frame(tmp_path / "drr" / f"frame_{f:04d}") for f in (1, 2, 3)}
    assert len([k for k in scene_volumes._CACHE if k[0] == "ct"]) == 1  # loaded once, resident
    assert np.abs(frames[1][0] - expect).max() <= tol
    assert np.abs(frames[3][0] - expect).max() > 0.05 * expect.max()
    assert frames[3][1]["source_mm"][0] == pytest.approx(g.source_mm[0] + 30.0, abs=1e-3)
    # resume: written frames are skipped, a missing one is rendered again
    (tmp_path / "drr" / "frame_0002.tif").unlink()
    m1 = (tmp_path / "drr" / "frame_0001.tif").stat().st_mtime_ns
    bpy.ops.render.render(animation=True)
    assert (tmp_path / "drr" / "frame_0001.tif").stat().st_mtime_ns == m1
    assert np.allclose(read_frame(tmp_path / "drr" / "frame_0002")[0], frames[2][0])
    assert not list((tmp_path / "drr").glob(".*part*"))
    names = sorted(p.name for p in (tmp_path / "drr").iterdir() if p.suffix in (".tif", ".json"))
    assert names == [f"frame_000{f}.{e}" for f in (1, 2, 3) for e in ("json", "tif")]


def test_render_engine_realistic_physics(render_registered, ct_file, tmp_path):
    pytest.importorskip("spekpy", reason="SpekPy is not installed")
    from ctwin.core.drr.projector import render_value
    from ctwin.core.drr.xray import XraySetup
    from ctwin.render import scene_volumes

    vol, path = ct_file
    g = named_view("ap", vol, size=(24, 20))
    scene, cam = _scene_with_camera(g)
    scene.render.engine = "CTWIN_DRR"
    s = scene.ctwin_drr
    scene.ctwin.ct_path = str(path)
    s.kvp, s.detector, s.filter_cu_mm, s.value = 90.0, "paxscan4030cb", 0.1, "intensity"
    s.scatter, s.grid_ratio = True, 10.0
    scene.render.filepath = str(tmp_path / "drr" / "frame_")
    scene_volumes.clear_cache()
    scene.frame_set(1)
    bpy.ops.render.render()
    img, sc = read_frame(tmp_path / "drr" / "frame_0001")
    expect = render_value(vol, g, value="intensity", device="cpu",
                          xray=XraySetup(kvp=90, detector="paxscan4030cb", filter_cu_mm=0.1, scatter=True,
                                         grid_ratio=10))
    assert np.abs(img - expect).max() <= 2e-3 and expect.min() < 0.9
    assert sc["kvp"] == 90 and sc["detector"] == "paxscan4030cb" and len(sc["spectrum_kev"]) > 50
    assert sc["scatter"] and sc["grid_ratio"] == 10 and sc["spr"] > 0
    # an animation over the same frame resumes it: the physics record matches the request
    scene.frame_start = scene.frame_end = 1
    tif = tmp_path / "drr" / "frame_0001.tif"
    m1 = tif.stat().st_mtime_ns
    bpy.ops.render.render(animation=True)
    assert tif.stat().st_mtime_ns == m1
    s.filter_cu_mm = 0.2
    msg = r"its filter_cu_mm is 0.1\d*, the request's is 0.2\d*; set another output path or turn on Overwrite"
    with pytest.raises(RuntimeError, match=msg):
        bpy.ops.render.render(animation=True)


def test_animation_resume_matches_the_request(render_registered, ct_file, tmp_path):
    """A resumed animation keeps a frame only when it reads back whole and its sidecar matches the
    request: a damaged frame is rendered again, one made with other settings stops the render with
    an error (the frames stay as they were) unless "Overwrite frames" is on."""
    from ctwin.render import scene_volumes

    vol, path = ct_file
    g = named_view("ap", vol, size=(12, 10))
    scene, cam = _scene_with_camera(g)
    scene.render.engine = "CTWIN_DRR"
    scene.ctwin.ct_path = str(path)
    out = tmp_path / "drr"
    scene.render.filepath = str(out / "frame_")
    scene.frame_start, scene.frame_end = 1, 2
    scene_volumes.clear_cache()
    bpy.ops.render.render(animation=True)
    first = {f: read_frame(out / f"frame_{f:04d}") for f in (1, 2)}
    assert first[1][0].shape == (10, 12) and first[1][1]["step_mm"] is None

    # damaged: a truncated image is rendered again, the intact frame is skipped
    tif1, tif2 = out / "frame_0001.tif", out / "frame_0002.tif"
    tif1.write_bytes(tif1.read_bytes()[:100])
    m2 = tif2.stat().st_mtime_ns
    bpy.ops.render.render(animation=True)
    assert np.array_equal(read_frame(out / "frame_0001")[0], first[1][0])
    assert tif2.stat().st_mtime_ns == m2

    # another request (step): refused, the frames on disk are untouched
    scene.ctwin_drr.step_mm = 0.7
    m1 = tif1.stat().st_mtime_ns
    with pytest.raises(RuntimeError, match=r"frame_0001 was written for another request: its step_mm"):
        bpy.ops.render.render(animation=True)
    assert tif1.stat().st_mtime_ns == m1 and tif2.stat().st_mtime_ns == m2

    # overwrite: both frames replaced with the new request recorded
    scene.ctwin_drr.overwrite_frames = True
    bpy.ops.render.render(animation=True)
    for f in (1, 2):
        assert read_frame(out / f"frame_{f:04d}")[1]["step_mm"] == pytest.approx(0.7)
    # and a resume with the same request skips them
    scene.ctwin_drr.overwrite_frames = False
    m1 = tif1.stat().st_mtime_ns
    bpy.ops.render.render(animation=True)
    assert tif1.stat().st_mtime_ns == m1
    assert not list(out.glob(".*pid*"))
