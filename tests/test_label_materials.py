"""Segmentation labels that override the HU calibration's materials (plain CTs, twins, posed twins),
and the render command's --samples-per-ray and --storage options."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctwin.core.drr import xray
from ctwin.core.drr.carm import Geometry
from ctwin.core.drr.projector import prepare_volume, read_frame, render_drr, render_value
from ctwin.core.errors import CtwinError
from ctwin.core.volumes.volume import Volume, save_nifti

pytest.importorskip("xraylib")
pytest.importorskip("spekpy")

KVP = 80.0


def _rod_phantom():
    """A water-equivalent cylinder (HU 0, radius 18 mm) around a rod (radius 4.5 mm, HU 1200, label 1
    "rod"), axes along z, on a 1 mm grid whose voxel centres are at whole millimetres."""
    shape = (48, 41, 5)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r2 = (x - 24.0) ** 2 + (y - 20.0) ** 2
    hu = np.full(shape, -1000, np.int16)
    hu[r2 <= 18.0 ** 2] = 0
    rod = np.repeat((r2 <= 4.5 ** 2)[:, :, None], shape[2], axis=2)
    hu[rod] = 1200
    ct = Volume(hu, np.eye(4))
    lab = Volume(rod.astype(np.uint16), np.eye(4))
    # parallel rays along +x through the voxel centres: pixel (row k, column j) runs along (y = j, z = k)
    g = Geometry(source_mm=[-500.0, 20.0, 2.0], detector_center_mm=[500.0, 20.0, 2.0], detector_u=[0, 1, 0],
                 detector_v=[0, 0, 1], pixel_spacing_mm=(1.0, 1.0), size_px=(41, 5), parallel=True)
    return ct, lab, g


def _xraylib_mu(nist_name=None, z=None, energies=()):
    """Mass attenuation (cm2/g) straight from xraylib (CS_Total), float64."""
    import xraylib as xr

    if z is not None:
        return np.array([xr.CS_Total(z, float(e)) for e in energies])
    d = xr.GetCompoundDataNISTByName(nist_name)
    return np.array([sum(w * xr.CS_Total(int(zz), float(e)) for zz, w in zip(d["Elements"], d["massFractions"]))
                     for e in energies])


def _spectrum():
    """SpekPy's spectrum for the render's settings (80 kVp, 12 degrees, 2.5 mm Al), float64."""
    import spekpy

    s = spekpy.Spek(kvp=KVP, th=12.0, dk=1.0, mas=1.0)
    s.multi_filter([("Al", 2.5)])
    e, f = s.get_spectrum()
    return np.asarray(e, float), np.asarray(f, float)


def test_titanium_rod_matches_xraylib_and_without_the_label_is_hu_material():
    """DRR through a labelled titanium rod in a water cylinder against a float64 sum over the SpekPy
    spectrum with xraylib's attenuation and the exact voxel chords (ideal detector: energy weighted)."""
    ct, lab, g = _rod_phantom()
    e, f = _spectrum()
    import xraylib as xr

    mu_w70 = _xraylib_mu("Water, Liquid", energies=[70.0])[0] * xr.GetCompoundDataNISTByName("Water, Liquid")["density"]
    mu_st = _xraylib_mu("Tissue, Soft (ICRP)", energies=e)
    rho_st = mu_w70 / _xraylib_mu("Tissue, Soft (ICRP)", energies=[70.0])[0]  # HU 0 at 70 keV (Schneider)
    rho_ti = xr.ElementDensity(22)
    mu_ti = _xraylib_mu(z=22, energies=e)
    rod = lab.data[:, :, 2] > 0                              # (x, y): the rows are along x
    water = (ct.data[:, :, 2] > -500) & ~rod
    l_rod = rod.sum(axis=0) * 0.1                             # cm, per detector column y
    l_w = water.sum(axis=0) * 0.1

    def ref(att_rod):  # energy-weighted transmission per column
        a = np.exp(-np.outer(l_w, mu_st * rho_st) - np.outer(l_rod, att_rod))
        return (a * (f * e)).sum(axis=1) / (f * e).sum()

    setup = xray.XraySetup(kvp=KVP)
    rec = {}
    img = render_value(ct, g, value="intensity", xray=setup, method="siddon", device="cpu", record=rec,
                       labels=(lab, {1: "rod"}), label_materials=["rod=titanium"])
    want = ref(mu_ti * rho_ti)
    through = l_rod > 0
    assert through.sum() >= 7 and np.all(want[through] < 0.2)
    for k in range(5):
        np.testing.assert_allclose(img[k], want, rtol=5e-3)
    assert np.abs(img[2][through] / want[through] - 1).max() < 1e-4  # float32 integrals: far within
    assert rec["label_materials"] == {"rod": "titanium"} and rec["overrides"] == ["titanium"]
    assert rec["override_materials"][0]["density_g_cm3"] == pytest.approx(rho_ti)
    # without the label the rod is the HU table's material: HU 1200 in 120..1600 is muscle and
    # cortical bone by mass fraction, at the density that gives 1200 HU at 70 keV
    t = (1200 - 120) / (1600 - 120)
    m70 = ((1 - t) * _xraylib_mu("Muscle, Skeletal", energies=[70.0])[0]
           + t * _xraylib_mu("Bone, Cortical (ICRP)", energies=[70.0])[0])
    rho = mu_w70 * 2.2 / m70
    mu_mix = (1 - t) * _xraylib_mu("Muscle, Skeletal", energies=e) + t * _xraylib_mu("Bone, Cortical (ICRP)", energies=e)
    plain = render_value(ct, g, value="intensity", xray=xray.XraySetup(kvp=KVP), method="siddon", device="cpu")
    want_hu = ref(mu_mix * rho)
    np.testing.assert_allclose(plain[2], want_hu, rtol=5e-3)
    assert np.all(plain[2][through] > 2.0 * img[2][through])  # titanium stops far more


def test_material_specs_numbers_and_defaults():
    ct, lab, g = _rod_phantom()
    # iodine concentration and density as parameters; canonical names
    assert xray.material_spec("Iodine_Blood:20") == "iodine_blood:20"
    assert xray.material_spec("ti6al4v@4.2") == "ti6al4v@4.2"
    assert xray.density("iodine_blood:20") == pytest.approx(xray.density("blood") + 0.020)
    assert xray.density("iodine_blood") == pytest.approx(xray.density("blood") + 0.010)
    assert xray.density("titanium@4.2") == 4.2
    np.testing.assert_allclose(xray.mass_attenuation("titanium@4.2", [40.0, 80.0]),
                               xray.mass_attenuation("titanium", [40.0, 80.0]))
    mu10, mu20 = (xray.mass_attenuation(m, 50.0) * xray.density(m) for m in ("iodine_blood:10", "iodine_blood:20"))
    mu0 = xray.mass_attenuation("blood", 50.0) * xray.density("blood")
    assert mu20 - mu0 == pytest.approx(2 * (mu10 - mu0), rel=1e-9)  # iodine adds linearly
    for bad in ("titanium:3", "iodine_blood:0", "iodine_blood:900", "iodine_blood:x", "titanium@0",
                "titanium@99", "unobtainium"):
        with pytest.raises(CtwinError):
            xray.material_spec(bad)
    # a label by number; a parametrised material travels as its canonical name
    vol, mats, applied = xray.apply_label_materials(ct, lab, {}, xray.parse_label_materials(["1=iodine_blood:20"]))
    assert mats == ["iodine_blood:20"] and applied == {"1": "iodine_blood:20"}
    assert np.all(vol.data[lab.data > 0] == xray.OVERRIDE_CODE0) and np.all(vol.data[lab.data == 0] == ct.data[lab.data == 0])
    # defaults by the words of the name; an explicit entry wins; "hu" keeps the calibration
    assert xray.default_label_material("screw_left") == "ti6al4v"
    assert xray.default_label_material("Femoral Implants") == "ti6al4v"
    assert xray.default_label_material("stent_cocr") == "cocr"
    assert xray.default_label_material("spinal_cord") is None
    from ctwin.core.volumes.labels import all_names

    assert [n for n in all_names().values() if xray.default_label_material(n)] == []
    _, mats, applied = xray.apply_label_materials(ct, lab, {1: "screw"}, {}, defaults=True)
    assert applied == {"screw": "ti6al4v"}
    _, mats, applied = xray.apply_label_materials(ct, lab, {1: "screw"}, xray.parse_label_materials(["screw=cocr"]),
                                                  defaults=True)
    assert applied == {"screw": "cocr"}
    _, mats, applied = xray.apply_label_materials(ct, lab, {1: "screw"}, xray.parse_label_materials(["screw=hu"]),
                                                  defaults=True)
    assert applied == {} and mats == []
    with pytest.raises(CtwinError, match="no segmentation label matches"):
        xray.apply_label_materials(ct, lab, {1: "rod"}, xray.parse_label_materials(["7=titanium"]))
    with pytest.raises(CtwinError):
        xray.parse_label_materials(["rod=plutonium_x"])
    with pytest.raises(CtwinError, match="HU Volume"):
        xray.apply_label_materials(prepare_volume(ct), lab, {1: "rod"}, {"rod": "titanium"})
    with pytest.raises(CtwinError, match="kvp"):
        render_value(ct, g, labels=(lab, {1: "rod"}), label_materials=["rod=titanium"], device="cpu")


def _cli(args, capsys):
    from ctwin import cli

    rc = cli.main(["render", *args])
    return rc, capsys.readouterr().err


def test_cli_label_materials_and_bad_input(tmp_path, capsys):
    ct, lab, _ = _rod_phantom()
    save_nifti(ct, tmp_path / "ct.nii.gz")
    save_nifti(lab, tmp_path / "seg.nii.gz")
    (tmp_path / "seg.json").write_text(json.dumps({"1": "rod"}))
    save_nifti(lab, tmp_path / "liver.nii.gz")
    (tmp_path / "liver.json").write_text(json.dumps({"1": "liver"}))
    base = ["--ct", str(tmp_path / "ct.nii.gz"), "--size", "16", "--view", "ap", "--device", "cpu",
            "--value", "intensity"]
    seg = ["--seg", str(tmp_path / "seg.nii.gz")]
    rc, err = _cli(base + ["--kvp", "80", *seg, "--label-material", "1=titanium@4.43", "--out", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    a, sc = read_frame(tmp_path / "a" / "ap_0000")
    assert sc["label_materials"] == {"rod": "titanium@4.43"}
    assert sc["override_materials"][0]["density_g_cm3"] == 4.43
    rc, err = _cli(base + ["--kvp", "80", "--out", str(tmp_path / "b")], capsys)
    b, _ = read_frame(tmp_path / "b" / "ap_0000")
    assert rc == 0 and a.min() < 0.5 * b.min()
    # a label named as an implant takes the default metal without --label-material
    rc, err = _cli(base + ["--kvp", "80", *seg, "--out", str(tmp_path / "c")], capsys)
    c, sc = read_frame(tmp_path / "c" / "ap_0000")
    assert rc == 0 and sc["label_materials"] == {"rod": "ti6al4v"} and c.min() < 0.5 * b.min()
    for extra, msg in (
        (["--kvp", "80", *seg, "--label-material", "9=titanium"], "no segmentation label matches 9"),
        (["--kvp", "80", *seg, "--label-material", "1=kryptonite"], "unknown material"),
        (["--kvp", "80", *seg, "--label-material", "1"], "LABEL=MATERIAL"),
        (["--kvp", "80", "--label-material", "1=titanium"], "needs --seg"),
        (["--label-material", "1=titanium", *seg], "needs --kvp"),
        (["--kvp", "80", "--seg", str(tmp_path / "liver.nii.gz")], "no label of --seg takes a material"),
    ):
        rc, err = _cli(base + extra + ["--out", str(tmp_path / "bad")], capsys)
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert rc == 2 and len(errors) == 1 and msg in errors[0], (extra, err)


def test_cli_samples_per_ray_and_float16_storage(tmp_path, capsys):
    from ctwin.core.drr.carm import named_view

    ct, _, _ = _rod_phantom()
    save_nifti(ct, tmp_path / "ct.nii.gz")
    base = ["--ct", str(tmp_path / "ct.nii.gz"), "--size", "20", "--view", "lateral", "--device", "cpu"]
    g = named_view("lateral", ct, size=20)
    rc, err = _cli(base + ["--samples-per-ray", "64", "--out", str(tmp_path / "s")], capsys)
    assert rc == 0, err
    img, sc = read_frame(tmp_path / "s" / "lateral_0000")
    assert sc["samples_per_ray"] == 64 and sc["storage"] == "auto"
    np.testing.assert_array_equal(img, render_drr(ct, g, samples_per_ray=64, device="cpu"))
    rc, err = _cli(base + ["--storage", "float16", "--out", str(tmp_path / "h")], capsys)
    assert rc == 0, err
    half, sc = read_frame(tmp_path / "h" / "lateral_0000")
    assert sc["storage"] == "float16" and sc["samples_per_ray"] is None
    full = render_drr(ct, g, device="cpu")
    np.testing.assert_array_equal(half, render_drr(prepare_volume(ct, storage="float16"), g, device="cpu"))
    assert np.abs(half - full).max() <= 1e-3 * full.max() and not np.array_equal(half, full)
    # a frame written with other sampling is not taken for this request
    rc, err = _cli(base + ["--out", str(tmp_path / "s")], capsys)
    assert rc == 2 and "samples_per_ray" in err
    for extra, msg in ((["--samples-per-ray", "0"], "within 1.."), (["--samples-per-ray", "8", "--step", "1"], "not both"),
                       (["--samples-per-ray", "8", "--method", "siddon"], "trilinear"),
                       (["--storage", "float16", "--kvp", "80"], "HU volume")):
        rc, err = _cli(base + extra + ["--out", str(tmp_path / "bad")], capsys)
        assert rc == 2 and msg in err, (extra, err)


# --- twins ---------------------------------------------------------------------------------------
def _screw_synth(T=None):
    """test_articulated's leg CT with a screw (label "screw", radius 3 mm, z 10..30 mm) in the femur's
    marrow; ``T`` moves the femur and its screw rigidly (the ground truth of a posed femur)."""
    from test_articulated import synthetic_ct

    ct, seg, names = synthetic_ct(femur_T=T)
    P = ct.voxel_centers_world().reshape(ct.shape + (3,))
    if T is not None:
        inv = np.linalg.inv(T)
        P = P @ inv[:3, :3].T + inv[:3, 3]
    screw = ((P[..., 0] - 5) ** 2 + P[..., 1] ** 2 <= 9.0) & (P[..., 2] > 10) & (P[..., 2] < 30)
    lab = np.asarray(seg.data).copy()
    lab[screw] = 200
    return ct, Volume(lab, seg.affine), {**names, 200: "screw"}


def test_twin_labels_move_with_their_bone():
    from ctwin.core.twin import articulated as A
    from ctwin.core.twin.label_materials import LabelOverrides
    from ctwin.core.drr.projector import material_integrals
    from test_articulated import _rot_about

    ct, seg, names = _screw_synth()
    art = A.prepare_articulated(ct, seg, names, weight_spacing_mm=4.0)
    ov = LabelOverrides(art, seg, names, {"screw": "titanium"})
    assert ov.materials == ["titanium"] and ov.applied == {"screw": "titanium"}
    # at the acquisition pose: exactly the plain CT's codes
    rest = ov.frame(A.posed_scene(art))
    plain, _, _ = xray.apply_label_materials(ct, seg, names, {"screw": "titanium"})
    assert rest.shape == ct.shape
    np.testing.assert_array_equal(rest.flat.reshape(ct.shape), plain.data)
    # posed: the screw goes with the femur (it lies within the femur's part)
    T = _rot_about([np.radians(4.0), np.radians(12.0), np.radians(20.0)], [5.0, 0.0, 2.0])
    T[:3, 3] += [1.3, -2.7, 3.1]
    posed = ov.frame(A.posed_scene(art, {"femur_left": T}))
    tct, tseg, _ = _screw_synth(T)
    truth, _, _ = xray.apply_label_materials(tct, tseg, names, {"screw": "titanium"})
    g = Geometry([0, -1000, 0], [0, 500, 0], [1, 0, 0], [0, 0, -1], (2.0, 2.0), (40, 64), True)
    table = xray.HuTable.default()
    got = material_integrals(posed, g, table, device="cpu", overrides=["titanium"])["titanium"]
    want = material_integrals(truth, g, table, device="cpu", overrides=["titanium"])["titanium"]
    unmoved = material_integrals(plain, g, table, device="cpu", overrides=["titanium"])["titanium"]
    # the screw's mass is kept within resampling (the label's voxels resampled trilinearly and taken
    # where more than half is label: 0.91 of the truth's voxelisation here, 1.5 voxels in radius)
    assert got.sum() == pytest.approx(want.sum(), rel=0.2) and got.sum() == pytest.approx(unmoved.sum(), rel=0.2)
    c_got, c_rest = (np.corrcoef(a.ravel(), want.ravel())[0, 1] for a in (got, unmoved))
    assert c_got > 0.9 and c_got > c_rest + 0.5, (c_got, c_rest)


def test_cli_twin_label_materials_and_sampling(twin_dir, tmp_path, capsys):
    base = ["--twin", str(twin_dir), "--size", "64", "--view", "ap", "--device", "cpu"]
    rc, err = _cli(base + ["--kvp", "80", "--label-material", "femur_left=titanium", "--out", str(tmp_path / "t")], capsys)
    assert rc == 0, err
    rc, err = _cli(base + ["--kvp", "80", "--out", str(tmp_path / "p")], capsys)
    assert rc == 0, err
    t, sc = read_frame(tmp_path / "t" / "ap_0000")
    p, _ = read_frame(tmp_path / "p" / "ap_0000")
    assert sc["label_materials"] == {"femur_left": "titanium"}
    assert (t - p).max() > 1.0 and (t - p).min() > -1e-4  # line integrals through a titanium femur
    left = np.abs(t - p) > 1e-4  # only where the femur is: the lower left of the AP view
    assert 0 < left.mean() < 0.2
    rc, err = _cli(base + ["--kvp", "80", "--label-material", "auto", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "no label of the twin takes a material" in err
    rc, err = _cli(base + ["--kvp", "80", "--seg", str(tmp_path), "--label-material", "femur_left=titanium",
                           "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "--seg is for --ct" in err
    rc, err = _cli(base + ["--samples-per-ray", "200", "--out", str(tmp_path / "s")], capsys)
    assert rc == 0, err
    rc, err = _cli(base + ["--out", str(tmp_path / "d")], capsys)
    s, sc = read_frame(tmp_path / "s" / "ap_0000")
    d, _ = read_frame(tmp_path / "d" / "ap_0000")
    assert sc["samples_per_ray"] == 200 and np.abs(s - d).max() < 0.05 * d.max() and not np.array_equal(s, d)
