"""The "ctwin DRR" engine's physics panel: every `ctwin render` physics, sampling and output option,
label materials (UIList + operators), the same frames and sidecar keys as the CLI, one-line errors."""
import json

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")
pytest.importorskip("spekpy", reason="SpekPy is not installed")
pytest.importorskip("xraylib", reason="xraylib is not installed")

from ctwin.core.drr.carm import named_view  # noqa: E402
from ctwin.core.drr.projector import prepare_volume, read_frame, render_drr  # noqa: E402
from ctwin.core.volumes.volume import Volume, affine_from, save_nifti  # noqa: E402

# sidecar keys that name where a frame came from, not what was rendered
SOURCE_KEYS = {"source", "ct_path", "blend", "camera", "pose", "transl_mm", "device", "format"}


@pytest.fixture(scope="module")
def ct_seg(tmp_path_factory):
    """A water box with a bone block and a rod labelled "rod" (label 1) and a "liver" (label 2)."""
    d = np.full((18, 16, 14), -1000, np.int16)
    d[2:-2, 2:-2, 2:-2] = 20
    d[5:9, 6:10, 4:8] = 1200
    lab = np.zeros(d.shape, np.int16)
    lab[10:13, 6:9, 3:11] = 1
    d[lab == 1] = 900
    lab[4:8, 3:6, 3:6] = 2
    aff = affine_from((2.0, 2.0, 2.5), (-17, -15, -16))
    folder = tmp_path_factory.mktemp("ctseg")
    save_nifti(Volume(d, aff), folder / "ct.nii.gz")
    save_nifti(Volume(lab, aff), folder / "seg.nii.gz")
    (folder / "seg.json").write_text(json.dumps({"1": "rod", "2": "liver"}))
    return Volume(d, aff), folder


def _camera_scene(geometry, tmp_path):
    from ctwin.render import scene_volumes
    from ctwin.render.camera import setup_xray_camera

    scene = bpy.context.scene
    cam = bpy.data.objects.new("xray", bpy.data.cameras.new("xray"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    setup_xray_camera(cam, geometry, scene)
    scene.render.engine = "CTWIN_DRR"
    scene.render.filepath = str(tmp_path / "engine" / "frame_")
    scene.ctwin.device = "cpu"
    scene.frame_set(1)
    scene_volumes.clear_cache()
    return scene


def _cli(args, capsys):
    from ctwin import cli

    rc = cli.main(["render", *args])
    return rc, capsys.readouterr().err


@pytest.fixture
def camera_geometry(monkeypatch):
    """`ctwin render --geometry FILE` given the engine's camera geometry itself: a Geometry read
    back from a sidecar re-normalises the detector axes, which can move their last bit and the
    image's by an ulp (4.8e-7 on 0.7), so the comparison hands the CLI the very same object."""
    from ctwin.commands import render as render_cmd
    from ctwin.render.camera import geometry_from_camera

    def use(scene):
        cam = scene.camera.evaluated_get(bpy.context.evaluated_depsgraph_get())  # as the engine reads it
        g = geometry_from_camera(scene, cam)
        monkeypatch.setattr(render_cmd, "geometry_from_file", lambda path, sc: g)
        return g

    return use


def _same_request(engine: dict, cli: dict):
    """Every key that says what was rendered has the same value in both sidecars."""
    keys = (set(engine) | set(cli)) - SOURCE_KEYS
    assert keys - set(engine) == set() and keys - set(cli) == set(), (keys - set(engine), keys - set(cli))
    for k in sorted(keys):
        a, b = engine[k], cli[k]
        if isinstance(a, float) or (isinstance(a, list) and a and isinstance(a[0], float)):
            np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=k)
        else:
            assert a == b, k


def test_panel_options_equal_the_cli_on_a_plain_ct(render_registered, ct_seg, tmp_path, capsys, camera_geometry):
    """kVp with every tube, detector, scatter, noise and calibration option and a label material:
    the engine's frame equals `ctwin render --ct --seg ... --geometry <the engine's sidecar>` and
    records the same request; then the same as DICOM."""
    from ctwin.core.drr.dicom_dx import read_dx
    from ctwin.core.drr.xray import HuTable

    vol, folder = ct_seg
    g = named_view("ap", vol, size=(20, 16))
    scene = _camera_scene(g, tmp_path)
    scene.ctwin.ct_path = str(folder / "ct.nii.gz")
    scene.ctwin.seg_path = str(folder / "seg.nii.gz")
    table = tmp_path / "hu.json"
    table.write_text(json.dumps(HuTable.default().to_dict()))
    s = scene.ctwin_drr
    s.kvp, s.filter_al_mm, s.filter_cu_mm, s.anode_angle_deg, s.heel = 85.0, 1.0, 0.1, 14.0, True
    s.detector, s.csi_um, s.focal_spot_mm, s.hu_table = "paxscan4030cb", 450.0, 0.6, str(table)
    s.scatter, s.grid_ratio, s.grid_lines, s.mas, s.seed = True, 8.0, 60.0, 0.5, 3
    s.value = "intensity"
    assert bpy.ops.ctwin.label_material_add(label="rod", material="titanium@4.43") == {"FINISHED"}
    assert s.use_label_materials and len(s.label_materials) == 1
    bpy.ops.render.render(write_still=False)
    img, sc = read_frame(tmp_path / "engine" / "frame_0001")
    assert sc["label_materials"] == {"rod": "titanium@4.43"} and sc["mas"] == 0.5 and sc["heel"] is True
    assert sc["anode_angle_deg"] == 14.0 and sc["csi_um"] == 450.0 and sc["grid_lines_per_cm"] == 60.0
    assert sc["samples_per_ray"] is None and sc["storage"] == "auto" and sc["spr"] > 0

    geo = tmp_path / "engine" / "frame_0001.json"
    camera_geometry(scene)
    args = ["--ct", str(folder / "ct.nii.gz"), "--seg", str(folder / "seg.nii.gz"), "--geometry", str(geo),
            "--frames", "1:2", "--device", "cpu", "--value", "intensity", "--kvp", "85", "--filter-al", "1",
            "--filter-cu", "0.1", "--anode-angle", "14", "--heel", "--detector", "paxscan4030cb",
            "--csi-um", "450", "--focal-spot-mm", "0.6", "--hu-table", str(table), "--scatter", "--grid", "8",
            "--grid-lines", "60", "--mas", "0.5", "--seed", "3", "--label-material", "rod=titanium@4.43"]
    rc, err = _cli(args + ["--out", str(tmp_path / "cli")], capsys)
    assert rc == 0, err
    cimg, csc = read_frame(tmp_path / "cli" / "frame_0001")
    _same_request(sc, csc)
    np.testing.assert_array_equal(img, cimg)
    # the label's material changed the image: without it the rod is the HU calibration's
    # (no --seg either: a label named "rod" takes the implant default, Ti-6Al-4V)
    drop = {"--seg", str(folder / "seg.nii.gz"), "--label-material", "rod=titanium@4.43"}
    rc, err = _cli([a for a in args if a not in drop] + ["--out", str(tmp_path / "plain")], capsys)
    plain, _ = read_frame(tmp_path / "plain" / "frame_0001")
    assert rc == 0 and (img < plain - 0.05).any()

    # DICOM frames: the same image file format as --format dicom, resumed by an animation render
    s.file_format = "dicom"
    s.overwrite_frames = True
    bpy.ops.render.render(write_still=False)
    dcm, _ = read_dx(tmp_path / "engine" / "frame_0001.dcm")
    rc, err = _cli(args + ["--format", "dicom", "--overwrite", "--out", str(tmp_path / "cli")], capsys)
    assert rc == 0, err
    cdcm, _ = read_dx(tmp_path / "cli" / "frame_0001.dcm")
    np.testing.assert_array_equal(dcm, cdcm)
    assert np.abs(dcm - img).max() <= (img.max() - img.min()) / 65535 + 1e-7
    s.overwrite_frames = False
    scene.frame_start = scene.frame_end = 1
    (tmp_path / "engine" / "frame_0001.tif").unlink()  # the TIFF frame of the first render
    m = (tmp_path / "engine" / "frame_0001.dcm").stat().st_mtime_ns
    bpy.ops.render.render(animation=True)
    assert (tmp_path / "engine" / "frame_0001.dcm").stat().st_mtime_ns == m
    assert not (tmp_path / "engine" / "frame_0001.tif").exists()
    # the kept frame is read back into the render result from its DICOM file
    exr = tmp_path / "result.exr"
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_depth = "32"
    bpy.data.images["Render Result"].save_render(filepath=str(exr))
    px = np.array(bpy.data.images.load(str(exr)).pixels[:], np.float32).reshape(16, 20, 4)
    np.testing.assert_allclose(px[::-1, :, 0], dcm, atol=1e-6)
    # another label material is another request: refused, naming the difference
    s.label_materials[0].material = "cocr"
    with pytest.raises(RuntimeError, match="label_materials"):
        bpy.ops.render.render(animation=True)


def test_samples_per_ray_and_float16_storage_equal_the_cli(render_registered, ct_seg, tmp_path, capsys, camera_geometry):
    vol, folder = ct_seg
    g = named_view("lateral", vol, size=(18, 14))
    scene = _camera_scene(g, tmp_path)
    scene.ctwin.ct_path = str(folder / "ct.nii.gz")
    s = scene.ctwin_drr
    s.samples_per_ray = 40
    bpy.ops.render.render(write_still=False)
    img, sc = read_frame(tmp_path / "engine" / "frame_0001")
    assert sc["samples_per_ray"] == 40
    geo = str(tmp_path / "engine" / "frame_0001.json")
    gc = camera_geometry(scene)
    base = ["--ct", str(folder / "ct.nii.gz"), "--geometry", geo, "--frames", "1:2", "--device", "cpu"]
    rc, err = _cli(base + ["--samples-per-ray", "40", "--out", str(tmp_path / "s")], capsys)
    assert rc == 0, err
    cimg, csc = read_frame(tmp_path / "s" / "frame_0001")
    np.testing.assert_array_equal(img, cimg)
    _same_request(sc, csc)
    assert not np.array_equal(img, render_drr(vol, g, device="cpu"))

    s.samples_per_ray, s.storage = 0, "float16"
    scene.render.filepath = str(tmp_path / "half" / "frame_")
    bpy.ops.render.render(write_still=False)
    half, sc = read_frame(tmp_path / "half" / "frame_0001")
    rc, err = _cli(base + ["--storage", "float16", "--out", str(tmp_path / "h")], capsys)
    assert rc == 0, err
    chalf, csc = read_frame(tmp_path / "h" / "frame_0001")
    np.testing.assert_array_equal(half, chalf)
    _same_request(sc, csc)
    np.testing.assert_array_equal(half, render_drr(prepare_volume(vol, storage="float16"), gc, device="cpu"))


def test_label_material_list_and_bad_input_are_one_line_reports(render_registered, ct_seg, tmp_path):
    """The UIList's operators, and each input `ctwin render` refuses refused here with its one line."""
    vol, folder = ct_seg
    scene = _camera_scene(named_view("ap", vol, size=(8, 8)), tmp_path)
    scene.ctwin.ct_path = str(folder / "ct.nii.gz")
    s = scene.ctwin_drr
    # add / remove through the operators the panel's buttons call
    bpy.ops.ctwin.label_material_add(label="rod", material="Titanium")
    bpy.ops.ctwin.label_material_add(label="liver", material="iodine_blood:20")
    assert [(i.label, i.material) for i in s.label_materials] == [("rod", "titanium"), ("liver", "iodine_blood:20")]
    assert s.label_materials_index == 1
    with pytest.raises(RuntimeError, match=r"^Error: unknown material 'kryptonite'[^\n]*\n?$"):
        bpy.ops.ctwin.label_material_add(label="rod", material="kryptonite")
    assert len(s.label_materials) == 2
    bpy.ops.ctwin.label_material_remove()
    assert [i.label for i in s.label_materials] == ["rod"] and s.label_materials_index == 0
    bpy.ops.ctwin.label_material_remove()
    assert len(s.label_materials) == 0
    assert not bpy.ops.ctwin.label_material_remove.poll()
    def fails(msg):
        with pytest.raises(RuntimeError, match=msg) as e:
            bpy.ops.render.render(write_still=False)
        assert "\n" not in str(e.value).strip() and "Traceback" not in str(e.value)

    s.kvp = 80.0
    it = s.label_materials.add()
    it.label, it.material = "rod", ""
    s.use_label_materials = True
    fails("label material 1: give both a label")
    it.material = "titanium"
    fails("Segmentation|segmentation")  # a plain CT needs its segmentation for label materials
    scene.ctwin.seg_path = str(folder / "seg.nii.gz")
    it.label = "femur"
    fails("no segmentation label matches femur")
    it.label, it.material = "rod", "hu"  # the implant default of "rod" turned off: nothing left
    fails("no label of the segmentation takes a material")
    s.use_label_materials = False
    s.mas, s.photons = 1.0, 100.0
    fails("give mAs or Photons/pixel, not both")
    s.photons, s.hu_table = 0.0, str(tmp_path / "missing.json")
    fails("HU table not found")
    s.hu_table, s.storage = "", "float16"
    fails("float16 storage holds SPEC 5 mu")
    s.storage, s.kvp = "auto", 0.0
    fails("mAs needs a kVp")
    s.mas, s.use_label_materials = 0.0, True
    fails("label materials need the realistic physics")
    s.use_label_materials, s.samples_per_ray, s.step_mm = False, 10, 1.0
    fails("Step or Samples per ray, not both")
    s.step_mm, s.method = 0.0, "siddon"
    fails("Samples per ray applies to the trilinear method")


def test_engine_sad_and_first_order_scatter_equal_the_cli(render_registered, ct_seg, tmp_path, capsys,
                                                          camera_geometry):
    """The engine's SAD (source to isocentre) sets the focal spot's magnification and the scatter's air
    gap as `ctwin render --sad` does: the frame and its sidecar (``sad_mm``) equal the CLI's given the
    same SAD; 0 is SID / 1.5, as the CLI's default; a SAD beyond the SID is a one-line error. First-order
    scatter alone (Multiple scatter off) is `--scatter first`."""
    vol, folder = ct_seg
    scene = _camera_scene(named_view("ap", vol, size=(20, 16)), tmp_path)
    scene.ctwin.ct_path = str(folder / "ct.nii.gz")
    s = scene.ctwin_drr
    s.kvp, s.detector, s.focal_spot_mm, s.value = 80.0, "paxscan4030cb", 1.2, "intensity"
    s.scatter, s.multiple_scatter, s.sad_mm = True, False, 1200.0
    bpy.ops.render.render(write_still=False)
    img, sc = read_frame(tmp_path / "engine" / "frame_0001")
    assert sc["sad_mm"] == 1200.0 and sc["multiple_scatter"] is False
    assert sc["scatter_model"]["midplane_to_detector_mm"] == pytest.approx(sc["sid_mm"] - 1200.0)
    assert sc["scatter_model"]["spr_multiple_mean"] == 0.0
    geo = str(tmp_path / "engine" / "frame_0001.json")
    camera_geometry(scene)
    args = ["--ct", str(folder / "ct.nii.gz"), "--geometry", geo, "--frames", "1:2", "--device", "cpu",
            "--value", "intensity", "--kvp", "80", "--detector", "paxscan4030cb", "--focal-spot-mm", "1.2",
            "--scatter", "first"]
    rc, err = _cli(args + ["--sad", "1200", "--out", str(tmp_path / "cli")], capsys)
    assert rc == 0, err
    cimg, csc = read_frame(tmp_path / "cli" / "frame_0001")
    _same_request(sc, csc)
    np.testing.assert_array_equal(img, cimg)

    s.sad_mm = 0.0  # SID / 1.5
    scene.render.filepath = str(tmp_path / "default" / "frame_")
    bpy.ops.render.render(write_still=False)
    dimg, dsc = read_frame(tmp_path / "default" / "frame_0001")
    assert dsc["sad_mm"] == pytest.approx(dsc["sid_mm"] / 1.5, rel=1e-12)
    assert dsc["blur_sigma_px"][0] > sc["blur_sigma_px"][0] and not np.array_equal(dimg, img)
    rc, err = _cli(args + ["--out", str(tmp_path / "cli_default")], capsys)
    assert rc == 0, err
    cimg, csc = read_frame(tmp_path / "cli_default" / "frame_0001")
    _same_request(dsc, csc)
    np.testing.assert_array_equal(dimg, cimg)

    s.sad_mm = 2000.0
    with pytest.raises(RuntimeError, match="smaller than the SID") as e:
        bpy.ops.render.render(write_still=False)
    assert "\n" not in str(e.value).strip()


def test_engine_can_ask_for_no_electronic_noise_with_a_detector_preset(render_registered, ct_seg, tmp_path,
                                                                        capsys, camera_geometry):
    """With kVp and a preset detector, Electronic noise 0 is the preset's sigma (Pixium: 1.0) while
    "Detector's electronic noise" is on; off, it is exactly 0, as `ctwin render --electronic-noise 0`."""
    vol, folder = ct_seg
    scene = _camera_scene(named_view("ap", vol, size=(20, 16)), tmp_path)
    scene.ctwin.ct_path = str(folder / "ct.nii.gz")
    s = scene.ctwin_drr
    s.kvp, s.detector, s.photons, s.seed, s.value = 80.0, "pixium4343", 400.0, 5, "intensity"
    assert s.detector_electronic_noise and s.electronic_noise == 0.0
    bpy.ops.render.render(write_still=False)
    preset_img, sc = read_frame(tmp_path / "engine" / "frame_0001")
    assert sc["electronic_noise"] == 1.0

    s.detector_electronic_noise = False
    scene.render.filepath = str(tmp_path / "none" / "frame_")
    bpy.ops.render.render(write_still=False)
    img, sc = read_frame(tmp_path / "none" / "frame_0001")
    assert sc["electronic_noise"] == 0.0 and not np.array_equal(img, preset_img)
    camera_geometry(scene)
    args = ["--ct", str(folder / "ct.nii.gz"), "--geometry", str(tmp_path / "none" / "frame_0001.json"),
            "--frames", "1:2", "--device", "cpu", "--value", "intensity", "--kvp", "80", "--detector",
            "pixium4343", "--photons", "400", "--seed", "5", "--electronic-noise", "0"]
    rc, err = _cli(args + ["--out", str(tmp_path / "cli")], capsys)
    assert rc == 0, err
    cimg, csc = read_frame(tmp_path / "cli" / "frame_0001")
    _same_request(sc, csc)
    np.testing.assert_array_equal(img, cimg)


@pytest.mark.slow
def test_engine_twin_physics_and_label_material_equal_the_cli(twin_dir, tmp_path, monkeypatch):
    """A posed twin (twin.blend) with realistic physics and a label material: the engine's frame
    equals `render_twin` (what `ctwin render --twin` runs) with the same options, bit for bit. Both
    get the very same pose and geometry: the armature keeps its pose in single precision, so a pose
    file's float64 pose moves a few composed voxels by an ulp (5 of 672 pixels by 4e-7 here), and a
    sidecar's geometry re-normalises the detector axes."""
    from ctwin.blender.scene import ensure_registered, twin_armature_object
    from ctwin.core.drr.xray import XraySetup
    from ctwin.core.rig.motion import write_motion_file
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.twin import twin as twin_mod
    from ctwin.render.camera import geometry_from_camera
    from ctwin.rig.animation import load_motion_keyframes
    from ctwin.rig.armature import armature_pose

    poses = np.zeros((1, 72))
    poses[0, 3:] = np.asarray(PRESETS["hip_flexion"])[3:]
    motion = tmp_path / "motion.npz"
    write_motion_file(motion, poses, np.zeros((1, 3)), 24.0)
    ensure_registered()
    bpy.ops.wm.open_mainfile(filepath=str(twin_dir / "twin.blend"))
    scene = bpy.context.scene
    arm = twin_armature_object(scene)
    load_motion_keyframes(arm, str(motion), scene=scene, frame_start=0)
    scene.frame_set(0)
    scene.render.resolution_x, scene.render.resolution_y = 28, 24
    scene.render.filepath = str(tmp_path / "engine" / "f_")
    scene.ctwin.device = "cpu"
    s = scene.ctwin_drr
    s.kvp, s.detector, s.photons, s.seed, s.value = 80.0, "pixium4343", 5000.0, 7, "intensity"
    bpy.ops.ctwin.label_material_add(label="femur_left", material="titanium")
    bpy.ops.render.render(write_still=False)
    img, sc = read_frame(tmp_path / "engine" / "f_0000")
    assert sc["label_materials"] == {"femur_left": "titanium"}

    dg = bpy.context.evaluated_depsgraph_get()
    g = geometry_from_camera(scene, scene.camera.evaluated_get(dg))
    pose, transl = armature_pose(arm.evaluated_get(dg))
    monkeypatch.setattr(twin_mod, "frame_poses", lambda *a, **k: [(0, pose, transl)])
    xray = XraySetup(kvp=80, detector="pixium4343", photons=5000.0, seed=7)
    render_twin = twin_mod.render_twin
    render_twin(twin_dir, tmp_path / "cli", geometry=g, device="cpu", value="intensity", photons=5000.0, seed=7,
                xray=xray, label_materials=["femur_left=titanium"])
    cimg, csc = read_frame(tmp_path / "cli" / "view_0000")
    _same_request(sc, csc)
    np.testing.assert_array_equal(img, cimg)
    # the titanium femur darkens the image where it lies
    render_twin(twin_dir, tmp_path / "plain", geometry=g, device="cpu", value="intensity",
                xray=XraySetup(kvp=80, detector="pixium4343"))
    plain, _ = read_frame(tmp_path / "plain" / "view_0000")
    assert (cimg < 0.8 * plain).any()


class _Layout:
    """Records what a panel's draw() puts in its layout (Blender draws panels only with a window)."""

    def __init__(self, log):
        self.log, self.active, self.use_property_split = log, True, False

    def column(self, **kw):
        return _Layout(self.log)

    row = column

    def prop(self, data, name, **kw):
        assert name in data.bl_rna.properties, name
        self.log.append(("prop", name))

    def template_list(self, list_type, list_id, data, prop, active_data, active_prop, **kw):
        assert getattr(bpy.types, list_type, None) is not None
        self.log += [("list", prop), ("list", active_prop)]

    def operator(self, idname, **kw):
        mod, name = idname.split(".")
        assert hasattr(getattr(bpy.ops, mod), name)
        self.log.append(("op", idname))


def test_panel_draws_every_setting(render_registered):
    from types import SimpleNamespace

    from ctwin.render.engine import CTWIN_DRR_PT_settings

    log = []
    panel = SimpleNamespace(layout=_Layout(log))
    CTWIN_DRR_PT_settings.draw(panel, SimpleNamespace(scene=bpy.context.scene))
    drawn = {name for _, name in log}
    settings = set(bpy.context.scene.ctwin_drr.bl_rna.properties.keys()) - {"rna_type", "name"}
    assert settings <= drawn, settings - drawn
    assert {"ctwin.label_material_add", "ctwin.label_material_remove"} <= drawn
