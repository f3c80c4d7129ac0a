"""Realistic X-ray physics (core.drr.xray): SpekPy spectra, xraylib materials, stoichiometric CT
calibration, detector blur and noise, DICOM DX output, the render flags."""
import json

import numpy as np
import pytest

from ctwin.core.drr import physics, xray
from ctwin.core.drr.carm import Geometry
from ctwin.core.errors import CtwinError
from ctwin.core.drr.projector import material_integrals
from ctwin.core.volumes.volume import Volume

spekpy = pytest.importorskip("spekpy", reason="SpekPy is not installed (pip install -r requirements.txt)")
xraylib = pytest.importorskip("xraylib", reason="xraylib is not installed (pip install -r requirements.txt)")


def test_materials_from_xraylib():
    # NIST XCOM, water at 60 keV (total with coherent): 0.2059 cm2/g; cortical bone above soft tissue
    assert xray.mass_attenuation("water", 60.0) == pytest.approx(0.2059, rel=0.01)
    e = np.array([40.0, 70.0])
    assert np.all(xray.mass_attenuation("bone", e) > xray.mass_attenuation("soft_tissue", e))
    assert np.all(xray.mass_attenuation("titanium", e) > xray.mass_attenuation("bone", e))
    # iodine's K edge at 33.2 keV shows in iodinated blood and not in blood
    r = xray.mass_attenuation("iodine_blood", [33.0, 33.4]) / xray.mass_attenuation("blood", [33.0, 33.4])
    assert r[1] > 1.5 * r[0]
    for m in ("adipose", "lung", "muscle", "brain", "skin", "stainless_steel", "cocr", "aluminium", "air"):
        z, w, rho, _ = xray.composition(m)
        assert abs(sum(w) - 1) < 1e-3 and rho > 0
    with pytest.raises(CtwinError):
        xray.composition("unobtainium")


def test_hu_calibration_honours_hu_at_ct_energy(tmp_path):
    t = xray.HuTable.default()
    hu = np.array([-999.0, -960, -500, -100, 0, 40, 300, 1000, 1500, 2500])
    pd = t.partial_densities(hu)
    mu = sum(v * xray.mass_attenuation(m, t.ct_kev) for m, v in pd.items())
    mu_w = xray.mass_attenuation("water", t.ct_kev)
    assert np.allclose(1000 * (mu / mu_w - 1), hu, atol=1e-6)
    assert pd["cortical_bone"][6] > 0 and pd["muscle"][6] > 0  # 300 HU: a soft tissue / bone mixture
    assert t.partial_densities([3500.0])["titanium"][0] == pytest.approx(xray.density("titanium"))
    assert all(v[0] == 0 for v in t.partial_densities([-1024.0]).values())
    # a user table
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"segments": [{"hu": [-1000, 500], "materials": ["water"]},
                                          {"hu": [500, 4000], "materials": ["aluminium"], "density": "material"}]}))
    u = xray.HuTable.load(p)
    assert u.partial_densities([0.0])["water"][0] == pytest.approx(1.0)
    p.write_text(json.dumps({"segments": [{"hu": [0, -5], "materials": ["water"]}]}))
    with pytest.raises(CtwinError):
        xray.HuTable.load(p)


def test_spekpy_spectra():
    means = [physics.mean_energy(k) for k in (60, 80, 100, 120)]
    assert all(a < b for a, b in zip(means, means[1:]))
    assert physics.mean_energy(80, filter_cu_mm=0.2) > means[1] + 3  # copper hardens the beam
    e, f = xray.spectrum(120)
    assert e.max() < 120 and f[(e > 58) & (e < 60)].max() > 1.5 * f[(e > 52) & (e < 56)].mean()  # W K-alpha lines
    # heel effect: less fluence towards the anode side (negative x in SpekPy)
    assert xray.spectrum(80, offaxis_mm=-100, distance_mm=1000)[1].sum() < xray.spectrum(80, distance_mm=1000)[1].sum()
    with pytest.raises(CtwinError):
        xray.spectrum(30)


def _wedge(tmp_path, hu_step, n_steps=5, step_mm=20):
    """Step wedge along z (1 mm voxels), one 4 mm column per step; rays along +z (parallel beam)."""
    L = n_steps * step_mm
    data = np.full((4 * n_steps, 4, L + 4), -1000, np.int16)
    for k in range(n_steps):
        data[4 * k:4 * k + 4, :, 2:2 + (k + 1) * step_mm] = hu_step
    vol = Volume(data, np.eye(4))
    cx, cy = (data.shape[0] - 1) / 2.0, 1.5
    g = Geometry(source_mm=[cx, cy, -200.0], detector_center_mm=[cx, cy, L + 200.0], detector_u=[1, 0, 0],
                 detector_v=[0, 1, 0], pixel_spacing_mm=(4.0, 4.0), size_px=(n_steps, 1), parallel=True)
    return vol, g, np.arange(1, n_steps + 1) * step_mm


@pytest.mark.parametrize("material,hu,formula", [("water", 0, "H2O"), ("aluminium", 2000, "Al")])
def test_beam_hardening_against_float64_reference(tmp_path, material, hu, formula):
    table = xray.HuTable.from_dict({"segments": [{"hu": [-1000, -500], "materials": ["air"]},
                                                 {"hu": [-500, 1000], "materials": ["water"]},
                                                 {"hu": [1000, 4000], "materials": ["aluminium"], "density": "material"}]})
    vol, g, L = _wedge(tmp_path, hu)
    ints = material_integrals(vol, g, table, method="exact", device="cpu")
    for kvp in (70, 120):
        setup = xray.XraySetup(kvp=kvp)
        img = xray.form_image(ints, setup, g)["intensity"][0]
        mu_eff = -np.log(img) / (L / 10.0)  # 1/cm
        # independent float64 reference: SpekPy spectrum, xraylib cross sections by formula
        s = spekpy.Spek(kvp=kvp, th=12, dk=1.0)
        s.filter("Al", 2.5)
        k, f = s.get_spectrum()
        rho = 1.0 if formula == "H2O" else xraylib.ElementDensity(13)
        mu = np.array([xraylib.CS_Total_CP(formula, float(x)) for x in k]) * rho
        w = f * k
        ref = np.array([-np.log((w * np.exp(-mu * t / 10.0)).sum() / w.sum()) for t in L]) / (L / 10.0)
        assert np.max(np.abs(mu_eff / ref - 1)) <= 0.005
        assert np.all(np.diff(mu_eff) < 0)  # the beam hardens with thickness


def _flat(n, pixel_mm=0.1):
    return Geometry(source_mm=[0, 0, -1000.0], detector_center_mm=[0, 0, 500.0], detector_u=[1, 0, 0],
                    detector_v=[0, 1, 0], pixel_spacing_mm=(pixel_mm, pixel_mm), size_px=(n, n),
                    extra={"sad_mm": 1000.0})


def test_noise_poisson_before_blur():
    n = 512
    g = _flat(n)
    half = np.zeros((n, n))
    half[:, n // 2:] = 5.0  # g/cm3 x mm of water: 0.5 g/cm2 on the right half
    setup = xray.XraySetup(kvp=80, detector="paxscan4030cb", photons=2000.0, electronic_sigma=0.0, seed=3)
    res = xray.form_image({"water": half}, setup, g)
    img = res["intensity"]
    assert np.array_equal(img, xray.form_image({"water": half}, setup, g)["intensity"])  # seeded
    sig = xray.blur_sigma_px(setup, g)
    delta = np.zeros((41, 41))
    delta[20, 20] = 1
    k2 = float((xray.blur(delta, sig) ** 2).sum())
    p = xray.polychromatic({"water": half}, setup, g)
    eta = xray.absorbed_fraction(p["spectrum_kev"], setup.csi)
    n_det = 2000.0 * float((eta * p["spectrum_fluence"]).sum() / p["spectrum_fluence"].sum())
    for sl in (np.s_[8:-8, 8:n // 2 - 8], np.s_[8:-8, n // 2 + 8:-8]):
        q, en = p["quanta"][sl].mean(), p["energy"][sl].mean()
        expected = q * (en / q) ** 2 * k2 / n_det  # Poisson variance of detected photons, blurred
        assert img[sl].mean() == pytest.approx(en, rel=0.01)
        assert img[sl].var() == pytest.approx(expected, rel=0.03)
    # noise added after the blur would have var = q (en/q)^2 / n_det, k2 times larger than this
    assert k2 < 0.5


def test_noise_power_spectrum_follows_mtf():
    n, m = 128, 12
    g = _flat(n, pixel_mm=0.194)  # the PaxScan 4030CB pitch: LSF sigma 0.77 px
    setup = xray.XraySetup(kvp=80, detector="paxscan4030cb", photons=5000.0, electronic_sigma=0.0)
    nps = np.zeros((n, n))
    for s in range(m):
        setup.seed = s
        img = xray.form_image({"water": np.zeros((n, n))}, setup, g)["intensity"]
        d = img - img.mean()
        nps += np.abs(np.fft.fft2(d)) ** 2 / (n * n)
    nps /= m
    sigma_px = xray.blur_sigma_px(setup, g)[0]
    f = np.fft.fftfreq(n)
    fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    mtf2 = np.exp(-4 * np.pi ** 2 * sigma_px ** 2 * fr ** 2)  # Gaussian LSF: MTF = exp(-2 pi^2 s^2 f^2)
    ring = (fr > 0.02) & (fr <= 0.25)  # up to half the Nyquist frequency (0.5 cycles/pixel)
    p = xray.polychromatic({"water": np.zeros((n, n))}, setup, g)
    eta = xray.absorbed_fraction(p["spectrum_kev"], setup.csi)
    white = 1.0 / (5000.0 * float((eta * p["spectrum_fluence"]).sum() / p["spectrum_fluence"].sum()))
    bins = np.linspace(0.02, 0.25, 8)
    ratios = []
    for a, b in zip(bins[:-1], bins[1:]):
        sel = ring & (fr > a) & (fr <= b)
        ratios.append(np.mean(nps[sel]) / (white * np.mean(mtf2[sel])))
    assert np.allclose(ratios, 1.0, atol=0.10), ratios


def test_focal_spot_blur_scales_with_magnification():
    g = _flat(16)
    a = xray.XraySetup(kvp=80, focal_spot_mm=1.2)
    s1 = xray.blur_sigma_px(a, g)[0]
    assert s1 * 0.1 == pytest.approx(1.2 * (1500 / 1000 - 1) / 2.3548, rel=1e-6)
    g2 = Geometry(source_mm=[0, 0, -1000.0], detector_center_mm=[0, 0, 1000.0], detector_u=[1, 0, 0],
                  detector_v=[0, 1, 0], pixel_spacing_mm=(0.1, 0.1), size_px=(16, 16), extra={"sad_mm": 1000.0})
    assert xray.blur_sigma_px(a, g2)[0] == pytest.approx(2 * s1)


def test_detector_absorption():
    e = np.array([30.0, 60.0, 100.0])
    a = xray.absorbed_fraction(e, 600)
    mu = np.array([xraylib.CS_Total_CP("CsI", float(x)) for x in e]) * 4.51
    assert np.allclose(a, 1 - np.exp(-mu * 0.06), rtol=1e-3)
    assert np.all(xray.absorbed_fraction(e, None) == 1)
    with pytest.raises(CtwinError):
        xray.XraySetup(kvp=80, detector="film")


def test_dicom_roundtrip(tmp_path):
    pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed")
    from ctwin.core.drr.dicom_dx import read_dx, write_dx

    img = np.random.default_rng(0).random((20, 30)).astype(np.float32) * 3.0 + 0.5
    sc = {"pixel_spacing_mm": [0.2, 0.3], "sid_mm": 1500.0, "sad_mm": 1000.0, "source_mm": [0, -1000, 0],
          "detector_center_mm": [0, 500, 0], "value": "line_integral", "frame": 0, "kvp": 80, "mas": 2.0}
    write_dx(tmp_path / "f.dcm", img, sc)
    back, ds = read_dx(tmp_path / "f.dcm")
    assert np.max(np.abs(back - img)) <= float(ds.RescaleSlope) * 0.5 + 1e-6
    assert ds.pixel_array.dtype == np.uint16 and ds.Modality == "DX"
    assert float(ds.DistanceSourceToDetector) == 1500 and float(ds.DistanceSourceToPatient) == 1000
    assert [float(x) for x in ds.ImagerPixelSpacing] == [0.3, 0.2]
    # beam towards +y (posterior): source anterior, detector posterior = PA beam? detector behind the
    # patient's back: primary angle 180
    assert abs(abs(float(ds.PositionerPrimaryAngle)) - 180) < 1e-6
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1.1"


def test_radiograph_value():
    L = np.linspace(0, 6, 1000)
    r = physics.to_value(L, "radiograph")
    assert r.min() == 0 and r.max() == 1 and np.all(np.diff(r) >= 0)  # bone (high integral) bright


def test_render_cli_realistic_dicom(tmp_path, capsys):
    pytest.importorskip("pydicom", reason="pydicom is not installed")
    from ctwin import cli
    from ctwin.core.drr.dicom_dx import read_dx
    from ctwin.core.fileio import read_json
    from ctwin.core.volumes.volume import save_nifti

    d = np.full((20, 16, 18), -1000, np.int16)
    d[3:-3, 3:-3, 2:-2] = 20
    d[8:12, 6:10, 4:14] = 1200
    ct = tmp_path / "ct.nii.gz"
    save_nifti(Volume(d, np.diag([2.0, 2.0, 2.0, 1.0])), ct)
    out = tmp_path / "out"
    args = ["render", "--ct", str(ct), "--size", "24", "--out", str(out), "--kvp", "80", "--filter-cu", "0.1",
            "--detector", "paxscan4030cb", "--mas", "0.5", "--focal-spot-mm", "0.6", "--heel",
            "--device", "cpu", "--format", "dicom", "--value", "radiograph", "--scatter", "--grid", "8",
            "--grid-lines", "60", "--electronic-noise", "1.5"]
    assert cli.main(args) == 0
    for view in ("ap", "lateral"):
        sc = read_json(out / f"{view}_0000.json")
        img, ds = read_dx(out / f"{view}_0000.dcm")
        assert img.shape == (24, 24) and 0 <= img.min() and img.max() <= 1 + 1e-6
        assert len(sc["spectrum_kev"]) == len(sc["spectrum_fluence"]) > 50 and max(sc["spectrum_kev"]) < 80
        assert sc["kvp"] == 80 and sc["filter_cu_mm"] == 0.1 and sc["heel"] and sc["detector"] == "paxscan4030cb"
        assert sc["csi_um"] == 600 and sc["mas"] == 0.5 and sc["photons_per_pixel"] > 0
        assert float(ds.KVP) == 80 and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert sc["scatter_model"]["grid_ratio"] == 8 and sc["scatter_model"]["grid_lines_per_cm"] == 60
        assert sc["scatter_model"]["spr_mean"] > 0 and sc["electronic_sigma"] == 1.5
    a = read_dx(out / "ap_0000.dcm")[0]
    assert not np.array_equal(a, read_dx(out / "lateral_0000.dcm")[0])
    # the physics flags need --kvp
    assert cli.main(["render", "--ct", str(ct), "--out", str(tmp_path / "o2"), "--filter-al", "1"]) == 2
    assert "needs --kvp" in capsys.readouterr().err


@pytest.mark.parametrize("grid", [None, 10.0])
def test_scatter_kernels_against_slab_volume_integral(grid):
    """The first-order kernel model (pencil beams, 8 scatter depths each, on a detector image) against a direct
    volume integration of single scatter in a water slab (every depth, the true oblique exit path,
    inverse square): the SPR at the slab centre agrees within 3 %."""
    kev = 60.0
    mu = xray.mass_attenuation("water", kev) / 10.0
    tp, _ = xray.grid_transmission(kev, np.zeros(1), grid)
    for tau in (100.0, 250.0):
        ref = xray.slab_spr_reference(kev, tau, 300.0, (240.0, 240.0), grid_ratio=grid, n=40)
        P = np.full((60, 60), np.exp(-mu * tau))
        s, t = xray.scatter_image(P, kev, (4.0, 4.0), 300.0, grid_ratio=grid, multiple=False)
        assert t[30, 30] == pytest.approx(tau, rel=1e-6)
        assert s[30, 30] / (P[30, 30] * tp) == pytest.approx(ref, rel=0.03)
        assert s[0, 0] < s[30, 30]  # less scatter reaches the field's corner
    if grid:
        assert 0.5 < tp < 0.9


def test_scatter_in_image_formation():
    """SPR grows with thickness, a grid lowers it, and scatter brightens the image behind the body."""
    g = Geometry(source_mm=[0, 0, -1000.0], detector_center_mm=[0, 0, 500.0], detector_u=[1, 0, 0],
                 detector_v=[0, 1, 0], pixel_spacing_mm=(4.0, 4.0), size_px=(64, 64))
    yy, xx = np.mgrid[:64, :64]
    inside = (abs(yy - 31.5) < 24) & (abs(xx - 31.5) < 24)
    sprs = {}
    for tau_cm, grid in ((10, None), (20, None), (20, 10.0)):
        ints = {"water": np.where(inside, tau_cm * 10.0 * 1.0, 0.0)}
        base = xray.form_image(ints, xray.XraySetup(kvp=80), g)["intensity"]
        res = xray.form_image(ints, xray.XraySetup(kvp=80, scatter=True, grid_ratio=grid), g)
        rec = res["sidecar"]["scatter_model"]
        sprs[(tau_cm, grid)] = rec["spr_mean"]
        if grid is None:
            assert np.all(res["intensity"][inside] > base[inside])
            assert res["intensity"][32, 32] / base[32, 32] == pytest.approx(1 + rec["spr_centre"], rel=1e-6)
        else:
            assert rec["grid_primary_transmission"] < 0.9
    assert 0 < sprs[(10, None)] < sprs[(20, None)]
    assert sprs[(20, 10.0)] < 0.5 * sprs[(20, None)]
    with pytest.raises(CtwinError):
        xray.XraySetup(kvp=80, grid_ratio=0.5)


def test_label_overrides_material(tmp_path, capsys):
    """A vessel label becomes iodinated blood and a screw label titanium, whatever their HU; the
    CLI reads the segmentation (a mask folder) and records the overrides."""
    from ctwin import cli
    from ctwin.core.fileio import read_json
    from ctwin.core.drr.projector import read_frame
    from ctwin.core.volumes.volume import save_nifti

    d = np.full((20, 16, 18), -1000, np.int16)
    d[3:-3, 3:-3, 2:-2] = 40
    ct = Volume(d, np.diag([2.0, 2.0, 2.0, 1.0]))
    lab = np.zeros(d.shape, np.uint16)
    lab[8:12, 6:10, 2:-2] = 1   # "aorta": a 8 x 8 mm bar along z
    lab[4:6, 4:6, 6:10] = 2     # "screw"
    vol, mats, applied = xray.apply_label_materials(ct, Volume(lab, ct.affine), {1: "aorta", 2: "screw_left"},
                                                    xray.parse_label_materials(["aort*=iodine_blood", "screw*=titanium"]))
    assert mats == ["iodine_blood", "titanium"] and applied == {"aorta": "iodine_blood", "screw_left": "titanium"}
    g = Geometry(source_mm=[19.0, 15.0, -300.0], detector_center_mm=[19.0, 15.0, 300.0], detector_u=[1, 0, 0],
                 detector_v=[0, 1, 0], pixel_spacing_mm=(1.0, 1.0), size_px=(40, 32), parallel=True)
    ints = material_integrals(vol, g, xray.HuTable.default(), method="exact", device="cpu", overrides=mats)
    # a ray through the bar's middle (x = 19 mm, y = 15 mm): 28 mm of iodinated blood (z 4..32 mm)
    assert ints["iodine_blood"][15, 19] == pytest.approx(28.0 * xray.density("iodine_blood"), rel=0.02)
    assert ints["titanium"].max() > 0 and ints["iodine_blood"][2, 2] == 0
    with pytest.raises(CtwinError):
        xray.apply_label_materials(ct, Volume(lab, ct.affine), {1: "aorta"}, {"liver": "water"})
    with pytest.raises(CtwinError):
        xray.parse_label_materials(["aorta"])
    # the CLI: a mask folder, with and without the override
    ctp = tmp_path / "ct.nii.gz"
    save_nifti(ct, ctp)
    (tmp_path / "seg").mkdir()
    save_nifti(Volume((lab == 1).astype(np.uint8), ct.affine), tmp_path / "seg" / "aorta.nii.gz")
    base = ["render", "--ct", str(ctp), "--size", "24", "--kvp", "70", "--view", "ap", "--device", "cpu",
            "--value", "intensity"]
    assert cli.main(base + ["--out", str(tmp_path / "a")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "b"), "--seg", str(tmp_path / "seg"),
                            "--label-material", "aorta=iodine_blood"]) == 0
    a, _ = read_frame(tmp_path / "a" / "ap_0000")
    b, sc = read_frame(tmp_path / "b" / "ap_0000")
    assert sc["label_materials"] == {"aorta": "iodine_blood"} and b.min() < 0.9 * a.min()
    assert cli.main(base + ["--out", str(tmp_path / "c"), "--label-material", "aorta=iodine_blood"]) == 2
    assert "needs --seg" in capsys.readouterr().err


def test_twin_renders_with_realistic_physics(twin_dir, tmp_path):
    from ctwin.core.drr.projector import read_frame
    from ctwin.core.twin.twin import render_twin

    render_twin(twin_dir, tmp_path / "mono", size=32, device="cpu", view="ap")
    render_twin(twin_dir, tmp_path / "real", size=32, device="cpu", view="ap", kvp=80,
                xray=xray.XraySetup(kvp=80, detector="paxscan4030cb"))
    mono, _ = read_frame(tmp_path / "mono" / "ap_0000")
    real, sc = read_frame(tmp_path / "real" / "ap_0000")
    assert sc["kvp"] == 80 and len(sc["spectrum_kev"]) > 50 and np.all(np.isfinite(real))
    m = mono > 0.05 * mono.max()
    assert np.corrcoef(mono[m], real[m])[0, 1] > 0.95 and not np.allclose(mono, real)
    # DICOM frames for twins, with scatter and a grid
    pytest.importorskip("pydicom", reason="pydicom is not installed")
    from ctwin.core.drr.dicom_dx import read_dx
    from ctwin.core.fileio import read_json

    render_twin(twin_dir, tmp_path / "dcm", size=32, device="cpu", view="ap", fmt="dicom",
                xray=xray.XraySetup(kvp=80, detector="paxscan4030cb", scatter=True, grid_ratio=10))
    img, ds = read_dx(tmp_path / "dcm" / "ap_0000.dcm")
    sc = read_json(tmp_path / "dcm" / "ap_0000.json")
    assert img.shape == (32, 32) and float(ds.KVP) == 80 and sc["format"] == "dicom"
    assert float(ds.DistanceSourceToDetector) == pytest.approx(sc["sid_mm"])
    assert sc["scatter_model"]["spr_mean"] > 0 and not (tmp_path / "dcm" / "ap_0000.tif").exists()


def _bench_gvxr():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_gvxr", Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gvxr.py")
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)
    return B


def test_primary_matches_exact_chords():
    """Water/bone boxes voxelised at 1 mm against the exact ray-box chord lengths (same spectrum
    and materials): with Siddon's exact voxel path lengths the projector and calibration chain
    reproduce the exact primary image; the trilinear projector spreads each edge over about a
    voxel (the interior still agrees)."""
    B = _bench_gvxr()
    boxes, g = B.step_phantom(), B.geometry(96)
    vol, table = B.voxelise(boxes, 1.0), xray.HuTable.from_dict(B.TABLE)
    ints = {m: material_integrals(vol, g, table, method=m, device="cpu") for m in ("siddon", "trilinear")}
    truth_ints = B.analytic_integrals(boxes, g)
    for kvp in (70, 120):
        setup = xray.XraySetup(kvp=kvp)
        truth = xray.form_image(truth_ints, setup, g)["intensity"]
        ours = xray.form_image(ints["siddon"], setup, g)["intensity"]
        mape, zncc, n = B.compare(ours, truth)
        assert n > 1000 and mape < 0.01 and zncc > 0.99999
        tri = xray.form_image(ints["trilinear"], setup, g)["intensity"]
        assert B.compare(tri, truth)[0] < 5.0 and B.compare(tri, truth, interior=True)[0] < 0.05


def test_primary_matches_gvirtualxray():
    """Same boxes, spectrum and geometry through gVirtualXray (optional peer, meshes split into
    short triangles) and ctwin (voxelised at 1 mm, Siddon): MAPE over every attenuated pixel
    <= 1 % and ZNCC >= 0.999 (the issue's criteria; both in fact agree to ~0.001 %)."""
    pytest.importorskip("gvxrPython3", reason="gVirtualXray is not installed (optional peer: pip install gvxr, "
                                              "plus Mesa EGL; see benchmarks/bench_gvxr.py)")
    B = _bench_gvxr()
    boxes, g = B.step_phantom(), B.geometry(96)
    peer = B.gvxr_boxes(boxes, g, (70, 120))
    if not np.any(peer[70] < 0.99):
        pytest.skip("gVirtualXray produced an empty image here (no usable OpenGL/EGL context)")
    ints = material_integrals(B.voxelise(boxes, 1.0), g, xray.HuTable.from_dict(B.TABLE), method="siddon",
                              device="cpu")
    for kvp in (70, 120):
        ours = xray.form_image(ints, xray.XraySetup(kvp=kvp), g)["intensity"]
        mape, zncc, n = B.compare(ours, peer[kvp])
        assert n > 1000 and mape <= 1.0 and zncc >= 0.999
        assert mape < 0.05  # measured ~0.0004 %: any real disagreement shows


def test_peer_outer_surface_needs_enclosing_skin():
    """gVirtualXray's outer surface attenuates over its chord minus the inner surfaces' chords: an
    inner mesh poking out of the skin (as the phantom's skin-tissue label does along the back)
    takes its outside part off the remainder elsewhere on the ray, while ctwin's voxelisation
    counts both. With ``enclosing_skin`` (the union as the skin) the two agree again."""
    pytest.importorskip("gvxrPython3", reason="gVirtualXray is not installed (optional peer: pip install gvxr, "
                                              "plus Mesa EGL; see benchmarks/bench_gvxr.py)")
    pytest.importorskip("manifold3d", reason="manifold3d is not installed (benchmarks/bench_gvxr.py's mesh union)")
    import trimesh

    from ctwin.core.meshes.mesh import Mesh

    B = _bench_gvxr()
    # a water body and a bone block poking 3 mm out of its back (+y, the beam's exit side)
    boxes = [("water", (-60, -40, -30), (60, 40, 30)), ("cortical_bone", (-20, 30, -10), (20, 43, 10))]
    g = B.geometry(96)
    ours = xray.form_image(material_integrals(B.voxelise(boxes, 1.0), g, xray.HuTable.from_dict(B.TABLE),
                                              method="siddon", device="cpu"), xray.XraySetup(kvp=70), g)["intensity"]
    meshes = {n: Mesh(b.vertices, b.faces, name=n) for n, b in
              (("skin", trimesh.creation.box(bounds=[boxes[0][1], boxes[0][2]])),
               ("bone", trimesh.creation.box(bounds=[boxes[1][1], boxes[1][2]])))}
    union, added = B.enclosing_skin(meshes)
    assert added == pytest.approx(40 * 3 * 20, rel=1e-4)  # the bone's part outside the body, mm^3
    errs = []
    for skin in (meshes["skin"], union):
        gv = B.gvxr_setup(g)
        B.gvxr_add_mesh(gv, "skin", skin.vertices, skin.faces, {"water": xray.density("water")}, outer=True)
        B.gvxr_add_mesh(gv, "bone", meshes["bone"].vertices, meshes["bone"].faces,
                        {"cortical_bone": xray.density("cortical_bone")})
        peer = B.gvxr_image(gv, 70)
        if not np.any(peer < 0.99):
            pytest.skip("gVirtualXray produced an empty image here (no usable OpenGL/EGL context)")
        shadow = (ours < 0.99) & (np.abs(ours - ours[48, 48]) < 0.02 * ours[48, 48])  # behind the bone block
        errs.append(float(np.median(np.abs(peer[shadow] / ours[shadow] - 1))))
    # the 3 mm of water gVirtualXray takes off: exp(0.3 cm x mu_water) - 1, about 6 % at 70 kVp
    assert errs[0] > 0.03 and errs[1] < 0.001
