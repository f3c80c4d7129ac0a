"""X-ray physics: HU -> mu tables, spectra, polyenergetic beam hardening, seeded noise, outputs."""
import numpy as np
import pytest

from ctwin.core.drr import physics
from ctwin.core.errors import CtwinError


def test_monoenergetic_tables():
    lut = physics.hu_to_mu_lut()
    hu = np.array([-3000, -1024, -1000, 0, 1000, 3000], np.int16)
    assert np.allclose(lut[hu.view(np.uint16)], [0, 0, 0, 0.02, 0.04, 0.08], atol=1e-8)
    f16 = np.array([0.0, 0.0213, -0.5, np.inf], np.float16)
    assert np.allclose(physics.float16_lut()[f16.view(np.uint16)], [0, 0.0213, 0, 0], atol=1e-5)


def test_spectra_and_attenuation_tables():
    pytest.importorskip("spekpy", reason="SpekPy is not installed")
    e60, w60 = physics.spectrum(60)
    assert w60.sum() == pytest.approx(1.0) and e60.max() < 60
    means = [physics.mean_energy(k) for k in (60, 80, 100, 120)]
    assert all(a < b for a, b in zip(means, means[1:]))
    assert 30 < means[0] < 45 and 45 < means[-1] < 65
    assert physics.mean_energy(80, filter_al_mm=3.0) > means[1]  # filtration hardens the beam
    e = np.array([40.0, 70.0])
    assert np.all(physics.mass_attenuation("bone", e) > physics.mass_attenuation("soft_tissue", e))
    assert np.all(physics.mass_attenuation("metal", e) > physics.mass_attenuation("bone", e))
    with pytest.raises(CtwinError):
        physics.spectrum(20)


def test_material_luts():
    pytest.importorskip("xraylib", reason="xraylib is not installed")
    luts = physics.material_luts()
    hu = np.array([-1000, 0, 250, 1000, 3500], np.int16).view(np.uint16)
    assert all(t[hu[0]] == 0 for t in luts.values())
    assert luts["soft_tissue"][hu[1]] == pytest.approx(1.0, abs=0.03)
    assert 0 < luts["cortical_bone"][hu[2]] < luts["cortical_bone"][hu[3]]
    assert luts["titanium"][hu[4]] > 4 and luts["cortical_bone"][hu[4]] == 0


def test_noise_is_seeded_and_poisson():
    L = np.full((200, 200), 2.0)
    a = physics.add_noise(L, photons=1e4, seed=5)
    assert np.array_equal(a, physics.add_noise(L, photons=1e4, seed=5))
    assert not np.array_equal(a, physics.add_noise(L, photons=1e4, seed=6))
    # Var(L) ~ 1 / (N0 exp(-L)) for Poisson counts
    expected_sd = np.sqrt(1.0 / (1e4 * np.exp(-2.0)))
    assert a.mean() == pytest.approx(2.0, abs=3 * expected_sd)
    assert a.std() == pytest.approx(expected_sd, rel=0.05)
    b = physics.add_noise(L, photons=1e4, electronic_sigma=20.0, seed=5)
    n = 1e4 * np.exp(-2.0)
    assert b.std() == pytest.approx(np.sqrt(n + 20.0 ** 2) / n, rel=0.05)  # variances add


def test_output_values():
    L = np.array([0.0, 1.0, 5.0, 20.0])
    assert np.allclose(physics.to_value(L, "intensity"), np.exp(-L), rtol=1e-6)
    d = physics.to_value(L, "display")
    assert d[0] == 0 and d[-1] == 1 and np.all(np.diff(d) > 0)
    assert np.array_equal(physics.to_value(L, "line_integral"), L.astype(np.float32))
    with pytest.raises(CtwinError):
        physics.to_value(L, "film")
