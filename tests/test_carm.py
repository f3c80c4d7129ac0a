"""C-arm geometry: SPEC 4 pixel centres, projection matrix, named views, sidecar round trip."""
import json

import numpy as np
import pytest

from ctwin.core.drr.carm import SIDECAR_KEYS, Geometry, biplanar, default_views, named_view, parse_view
from ctwin.core.errors import CtwinError

BOX = (np.array([-150.0, -120.0, -300.0]), np.array([170.0, 110.0, 250.0]))


def _oblique(parallel=False):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return Geometry(source_mm=[10, -900, 40], detector_center_mm=q[:, 2] * 30 + [0, 500, 0],
                    detector_u=q[:, 0], detector_v=q[:, 1], pixel_spacing_mm=(0.7, 1.3),
                    size_px=(9, 6), parallel=parallel)


@pytest.mark.parametrize("parallel", [False, True])
def test_pixel_centres_project_to_their_indices(parallel):
    g = _oblique(parallel)
    pix = g.pixel_centers()
    W, H = g.size_px
    # SPEC 4 formula written out independently
    r, c = 4, 7
    expect = (g.detector_center_mm + (c - (W - 1) / 2) * g.pixel_spacing_mm[0] * g.detector_u
              + (r - (H - 1) / 2) * g.pixel_spacing_mm[1] * g.detector_v)
    assert np.allclose(pix[r, c], expect)
    cr = g.project(pix.reshape(-1, 3)).reshape(H, W, 2)
    cc, rr = np.meshgrid(np.arange(W), np.arange(H))
    assert np.allclose(cr[..., 0], cc, atol=1e-9) and np.allclose(cr[..., 1], rr, atol=1e-9)
    # any point on a pixel's ray projects onto that pixel
    o, d, length = g.rays()
    pts = o[r, c] + np.outer([0.1, 0.5, 0.9], d[r, c]) * length[r, c]
    assert np.allclose(g.project(pts), [[c, r]] * 3, atol=1e-9)


def test_named_views_geometry_and_fit():
    views = {n: named_view(n, BOX, size=64) for n in ("ap", "pa", "lat_left", "lat_right", "lao30_cran20")}
    iso = 0.5 * (BOX[0] + BOX[1])
    ap = views["ap"]
    assert np.allclose(ap.source_mm, iso + [0, -1000, 0])  # anterior source
    assert np.allclose(ap.detector_center_mm, iso + [0, 500, 0])
    assert np.allclose(ap.detector_u, [1, 0, 0]) and np.allclose(ap.detector_v, [0, 0, -1])
    assert np.allclose(views["lat_left"].source_mm, iso + [-1000, 0, 0])
    for name, g in views.items():
        assert g.sid_mm == pytest.approx(1500.0)
        # as seen from the source: u x v points towards the detector (a Blender camera's frame)
        assert g.normal @ (g.detector_center_mm - g.source_mm) > 0, name
        lo, hi = BOX
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        cr = g.project(corners)
        assert cr.min() >= -0.5 - 1e-6 and cr.max() <= 63.5 + 1e-6, name
        # tight: the extreme corner touches an edge
        assert np.abs(cr - 31.5).max() == pytest.approx(32.0, rel=1e-6), name
    # LAO 90 is the left lateral; RAO 90 the right lateral
    for a, b in (("lao90", "lat_left"), ("rao90", "lat_right")):
        ga, gb = named_view(a, BOX, size=32), named_view(b, BOX, size=32)
        assert np.allclose(ga.source_mm, gb.source_mm) and np.allclose(ga.detector_u, gb.detector_u)
    # cranial tilt moves the detector towards the head
    assert views["lao30_cran20"].detector_center_mm[2] > iso[2] + 100
    assert parse_view("rao20_caud15") == ("pa", -20.0, -15.0)


def test_default_views_biplanar_and_sidecar_round_trip():
    v = default_views(BOX)
    assert set(v) == {"ap", "lateral"} and v["ap"].size_px == (512, 512)
    ap, lat = biplanar(BOX, size=(40, 30))
    assert lat.size_px == (40, 30) and np.allclose(ap.extra["isocenter_mm"], lat.extra["isocenter_mm"])
    sc = json.loads(json.dumps(ap.to_sidecar(frame=3, value="display", device="cpu")))
    assert set(SIDECAR_KEYS) <= set(sc)
    assert sc["frame"] == 3 and sc["value"] == "display" and sc["sid_mm"] == pytest.approx(1500)
    g2 = Geometry.from_sidecar(sc)
    assert np.allclose(g2.projection_matrix(), ap.projection_matrix())
    assert np.allclose(np.array(sc["projection"]), ap.projection_matrix())


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(CtwinError):
        named_view("sideways", BOX)
    with pytest.raises(CtwinError):
        named_view("ap", BOX, sad_mm=1000, sid_mm=900)
    with pytest.raises(CtwinError):
        Geometry([0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0])
    with pytest.raises(CtwinError):
        Geometry.from_sidecar({"source_mm": [0, 0, 0]})
