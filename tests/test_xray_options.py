"""Options of the realistic physics that the CLI, the Python API and the sidecar share: first-order
scatter alone, the electronic noise actually used, the source-to-isocentre distance."""
import numpy as np
import pytest

from ctwin.core.drr import xray
from ctwin.core.volumes.volume import Volume

pytest.importorskip("spekpy", reason="SpekPy is not installed (pip install -r requirements.txt)")
pytest.importorskip("xraylib", reason="xraylib is not installed (pip install -r requirements.txt)")


def _slab(n=24, cm=20):
    from ctwin.core.drr import scatter_mc

    return scatter_mc.slab_view(cm * 10.0, n, field_mm=300.0, sid_mm=1000.0, gap_mm=50.0)


def test_first_order_scatter_is_an_option():
    """``XraySetup(multiple_scatter=False)``: the same first order as the default's, no multiple-scatter
    term (its SPR part is 0 and the total SPR is the first order's), the default unchanged."""
    g, ints, _ = _slab()
    default = xray.form_image(ints, xray.XraySetup(kvp=80, scatter=True), g)
    both = xray.form_image(ints, xray.XraySetup(kvp=80, scatter=True, multiple_scatter=True), g)
    first = xray.form_image(ints, xray.XraySetup(kvp=80, scatter=True, multiple_scatter=False), g)
    np.testing.assert_array_equal(default["intensity"], both["intensity"])
    a, f = both["sidecar"], first["sidecar"]
    assert a["multiple_scatter"] is True and f["multiple_scatter"] is False
    assert f["scatter_model"]["spr_multiple_mean"] == 0.0 and a["scatter_model"]["spr_multiple_mean"] > 0.5
    assert f["scatter_model"]["spr_single_mean"] == a["scatter_model"]["spr_single_mean"] > 0.2
    assert "multiple" not in f["scatter_model"]["model"] and "multiple" in a["scatter_model"]["model"]
    # a 20 cm slab: multiple scatter is more than half of the scatter (the Monte Carlo's finding)
    assert f["spr"] < 0.5 * a["spr"]
    assert np.all(first["intensity"] < both["intensity"])
    # the first order is the scatter model's single part, on the same primary (grid included)
    prim = xray.form_image(ints, xray.XraySetup(kvp=80, grid_ratio=10.0), g)["intensity"]
    one = xray.form_image(ints, xray.XraySetup(kvp=80, scatter=True, multiple_scatter=False, grid_ratio=10.0), g)
    assert np.all(one["intensity"] > prim) and one["sidecar"]["scatter_model"]["spr_multiple_mean"] == 0.0


def _tiny_ct(tmp_path):
    from ctwin.core.volumes.volume import save_nifti

    d = np.full((16, 14, 12), -1000, np.int16)
    d[2:-2, 2:-2, 2:-2] = 20
    d[6:10, 5:9, 4:8] = 1200
    ct = tmp_path / "ct.nii.gz"
    save_nifti(Volume(d, np.diag([2.0, 2.0, 2.0, 1.0])), ct)
    return ct


def _render(args, capsys):
    from ctwin import cli

    rc = cli.main(["render", *args])
    return rc, capsys.readouterr().err


def test_cli_scatter_first(tmp_path, capsys):
    """``--scatter first`` renders and records the first order alone; a bare ``--scatter`` stays all
    orders; anything else is refused by the parser."""
    from ctwin.core.drr.projector import read_frame

    ct = _tiny_ct(tmp_path)
    base = ["--ct", str(ct), "--view", "ap", "--size", "16", "--device", "cpu", "--kvp", "80"]
    imgs = {}
    for name, flag in (("all", ["--scatter"]), ("first", ["--scatter", "first"]), ("all2", ["--scatter", "all"])):
        rc, err = _render(base + flag + ["--out", str(tmp_path / name)], capsys)
        assert rc == 0, err
        imgs[name] = read_frame(tmp_path / name / "ap_0000")
    (a, sa), (f, sf), (a2, _) = imgs["all"], imgs["first"], imgs["all2"]
    assert sa["scatter"] is True and sa["multiple_scatter"] is True
    assert sf["scatter"] is True and sf["multiple_scatter"] is False
    assert sf["scatter_model"]["spr_multiple_mean"] == 0.0 < sa["scatter_model"]["spr_multiple_mean"]
    np.testing.assert_array_equal(a, a2)
    assert (f > a).any()   # less scatter: a larger line integral
    rc, err = _render(base + ["--scatter", "second", "--out", str(tmp_path / "bad")], capsys)
    assert rc == 2 and "invalid choice" in err


def test_multiple_scatter_fit_is_a_parameter():
    """The multiple-scatter term's parameters go to the model as a ``MultiScatterFit`` (what
    benchmarks/fit_multiscatter.py varies), not through the module's constants: the default is the fit
    in use, and raising c0 by ln 2 doubles the multiple-scatter part and leaves the first order."""
    g, ints, _ = _slab()
    setup = xray.XraySetup(kvp=80, scatter=True)
    base = xray.form_image(ints, setup, g)
    same = xray.form_image(ints, setup, g, multi_fit=xray.MultiScatterFit.default())
    np.testing.assert_array_equal(base["intensity"], same["intensity"])
    c = xray.MultiScatterFit.default()
    twice = xray.MultiScatterFit((c.coef[0] + np.log(2.0),) + tuple(c.coef[1:]), c.source_mm, c.source_per_tau,
                                 c.cos_power)
    dbl = xray.form_image(ints, setup, g, multi_fit=twice)["sidecar"]["scatter_model"]
    ref = base["sidecar"]["scatter_model"]
    assert dbl["spr_multiple_mean"] == pytest.approx(2 * ref["spr_multiple_mean"], rel=1e-9)
    assert dbl["spr_single_mean"] == ref["spr_single_mean"]
    assert xray.MULTI_FIT == c.coef   # the module's fit is untouched


@pytest.mark.parametrize("physics", [[], ["--kvp", "80", "--detector", "paxscan4030cb"]],
                         ids=["monoenergetic", "paxscan"])
def test_electronic_noise_recorded_as_used_for_ct_and_twin(twin_dir, tmp_path, capsys, physics):
    """``--photons`` without ``--electronic-noise``: ``render --ct`` and ``render --twin`` record the
    same ``electronic_noise``, the sigma the noise was drawn with (0 for the monoenergetic default,
    the detector preset's with --kvp: 2 counts for the PaxScan, ``DETECTORS``); the twin at its
    acquisition pose renders its own CT, so the images agree too."""
    from ctwin.core.drr.projector import read_frame

    common = ["--view", "ap", "--size", "12", "--device", "cpu", "--photons", "2000", "--seed", "4", *physics]
    rc, err = _render(["--ct", str(twin_dir / "volumes" / "ct.nii.gz"), *common, "--out", str(tmp_path / "ct")], capsys)
    assert rc == 0, err
    rc, err = _render(["--twin", str(twin_dir), *common, "--out", str(tmp_path / "twin")], capsys)
    assert rc == 0, err
    ct_img, ct_sc = read_frame(tmp_path / "ct" / "ap_0000")
    tw_img, tw_sc = read_frame(tmp_path / "twin" / "ap_0000")
    want = xray.DETECTORS["paxscan4030cb"]["electronic_sigma"] if physics else 0.0
    assert ct_sc["electronic_noise"] == tw_sc["electronic_noise"] == want
    if physics:
        assert ct_sc["electronic_sigma"] == tw_sc["electronic_sigma"] == want > 0
    np.testing.assert_allclose(ct_img, tw_img, rtol=1e-5, atol=1e-6)
    # given, it is recorded as given on both paths
    rc, err = _render(["--ct", str(twin_dir / "volumes" / "ct.nii.gz"), *common, "--electronic-noise", "0.5",
                       "--out", str(tmp_path / "ct5")], capsys)
    assert rc == 0, err
    assert read_frame(tmp_path / "ct5" / "ap_0000")[1]["electronic_noise"] == 0.5


def test_cli_sad_with_geometry_file(tmp_path, capsys):
    """The source-to-isocentre distance sets the focal spot's magnification and the scatter's air gap;
    ``--geometry FILE`` reuses the file's ``sad_mm`` (so the frame is rendered again exactly),
    ``--sad`` replaces it, and one the SID does not leave room for is refused in one line."""
    from ctwin.core.drr.projector import read_frame

    ct = _tiny_ct(tmp_path)
    phys = ["--ct", str(ct), "--size", "16", "--device", "cpu", "--kvp", "80", "--detector", "paxscan4030cb",
            "--focal-spot-mm", "1.2", "--scatter"]
    rc, err = _render(phys + ["--view", "ap", "--sad", "1100", "--out", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    img, sc = read_frame(tmp_path / "a" / "ap_0000")
    assert sc["sad_mm"] == 1100.0 and sc["scatter_model"]["midplane_to_detector_mm"] == pytest.approx(400.0)
    geo = str(tmp_path / "a" / "ap_0000.json")
    rc, err = _render(phys + ["--geometry", geo, "--out", str(tmp_path / "b")], capsys)
    assert rc == 0, err
    again, sc2 = read_frame(tmp_path / "b" / "ap_0000")
    assert sc2["sad_mm"] == 1100.0 and sc2["blur_sigma_px"] == sc["blur_sigma_px"]
    np.testing.assert_allclose(again, img, rtol=1e-6, atol=1e-7)
    rc, err = _render(phys + ["--geometry", geo, "--sad", "1300", "--out", str(tmp_path / "c")], capsys)
    assert rc == 0, err
    other, sc3 = read_frame(tmp_path / "c" / "ap_0000")
    assert sc3["sad_mm"] == 1300.0 and sc3["scatter_model"]["midplane_to_detector_mm"] == pytest.approx(200.0)
    # less magnification: a narrower focal-spot penumbra
    assert sc3["blur_sigma_px"][0] < sc["blur_sigma_px"][0] and not np.allclose(other, img)
    rc, err = _render(phys + ["--geometry", geo, "--sad", "1600", "--out", str(tmp_path / "d")], capsys)
    assert rc == 2 and "smaller than the SID (1500 mm)" in err and len(err.strip().splitlines()) == 1
