"""Joint centres from bone labels (``core.body.landmarks``): the humeral head's trimmed sphere fit
and the knee centre from the femur's shaft axis and condylar arc, on analytic shapes with known
centres, and on the phantom against its truth joints."""
from __future__ import annotations

import json

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ctwin.core import progress
from ctwin.core.body import landmarks
from ctwin.core.body.skeleton import JOINT_INDEX


def _sphere_cap_with_shaft(rng, centre, radius, n=1500):
    """Points on a sphere's upper cap (polar angle < 110 degrees) and on a narrower cylinder below
    it, off the sphere's centre line, where outside the sphere (a humeral head on its neck and
    shaft)."""
    th = np.arccos(rng.uniform(np.cos(np.radians(110)), 1.0, n))
    ph = rng.uniform(0, 2 * np.pi, n)
    cap = centre + radius * np.column_stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)])
    ph2 = rng.uniform(0, 2 * np.pi, n // 3)
    z = rng.uniform(-35.0, -15.0, n // 3)
    shaft = centre + np.column_stack([8.0 + 14.0 * np.cos(ph2), 14.0 * np.sin(ph2), z])
    shaft = shaft[np.linalg.norm(shaft - centre, axis=1) > radius]   # the surface: outside the head
    return np.concatenate([cap, shaft])


def test_trimmed_sphere_fit_ignores_the_neck_and_shaft():
    rng = np.random.default_rng(0)
    c_true, r_true = np.array([10.0, -20.0, 300.0]), 23.0
    p = _sphere_cap_with_shaft(rng, c_true, r_true)
    p += rng.normal(0, 0.7, p.shape)                     # voxel-centre scatter
    c_plain, _ = landmarks.fit_sphere(p)
    c, r = landmarks.fit_sphere_trimmed(p, 3.0)
    assert np.linalg.norm(c_plain - c_true) > 4.0        # the plain fit is pulled by the shaft
    assert np.linalg.norm(c - c_true) < 1.0
    assert abs(r - r_true) < 0.6


def _voxel_femur(tilt_deg, spacing=2.5):
    """A femur of known geometry, voxelised: a shaft cylinder (radius 13 mm) along its axis from the
    condyles to a femoral head 430 mm up, and two spherical condyles (radius 20 mm) 18 mm either side
    of the axis and 8 mm behind it, their centres 25 mm above the bone's distal end. Tilted by
    ``tilt_deg`` about the antero-posterior and left-right axes. World frame: x left, y posterior,
    z superior (LPS). Returns (voxel centres (N, 3), boundary flags (N,), up, anterior, knee centre:
    the shaft axis at the condyles' centre height)."""
    rot = Rotation.from_euler("xy", [tilt_deg, 0.6 * tilt_deg], degrees=True).as_matrix()
    frame = rot @ np.diag([1.0, -1.0, 1.0])              # columns: the femur's left, anterior, up
    base = np.array([30.0, -10.0, 100.0])
    knee = base + frame @ np.array([0.0, 0.0, 25.0])
    top = base + frame @ np.array([0.0, 0.0, 455.0])
    lo, hi = np.minimum(base, top) - 45.0, np.maximum(base, top) + 45.0
    shape = tuple(np.ceil((hi - lo) / spacing).astype(int))
    g = np.stack(np.meshgrid(*[lo[k] + spacing * (np.arange(shape[k]) + 0.5) for k in range(3)],
                             indexing="ij"), axis=-1)
    q = (g - base) @ frame                               # local coordinates
    shaft = (np.hypot(q[..., 0], q[..., 1]) < 13.0) & (q[..., 2] > 25.0) & (q[..., 2] < 430.0)
    head = np.linalg.norm(q - np.array([0.0, 0.0, 430.0]), axis=-1) < 22.0
    cond = np.zeros(shape, bool)
    for s in (-1.0, 1.0):
        cond |= np.linalg.norm(q - np.array([18.0 * s, -8.0, 25.0]), axis=-1) < 20.0
    m = shaft | head | cond
    b = (m & ~ndimage.binary_erosion(m, border_value=0))[m]
    return g[m], b, np.array([0.0, 0.0, 1.0]), np.array([0.0, -1.0, 0.0]), knee


def test_knee_centre_on_a_voxelised_femur():
    for tilt in (0.0, 12.0):
        p, b, up, anterior, knee = _voxel_femur(tilt)
        c = landmarks.knee_centre(p, b, up, anterior)
        assert c is not None
        assert np.linalg.norm(c - knee) < 1.5, (tilt, c - knee)
        # the distal 45 mm's centroid, a cruder estimate, is farther off
        h = p @ up
        assert np.linalg.norm(p[h < h.min() + 45.0].mean(0) - knee) > np.linalg.norm(c - knee) + 2.0


def test_knee_centre_needs_an_anterior_direction_off_the_shaft():
    p, b, up, _, _ = _voxel_femur(0.0)
    assert landmarks.knee_centre(p, b, up, up) is None


def test_phantom_knee_and_shoulder_centres(phantom_dir):
    """On the default phantom (3 mm): the located knee and shoulder centres against its truth."""
    from ctwin.core.volumes.ct import load_ct
    from ctwin.core.volumes.segmentation import load_segmentation

    progress.set_quiet(True)
    ct = load_ct(phantom_dir / "ct.nii.gz")
    lab, names = load_segmentation(phantom_dir / "seg.nii.gz", ct)
    truth = np.asarray(json.loads((phantom_dir / "truth.json").read_text())["joints"])
    lm = landmarks.extract_landmarks(lab, names)
    for side in ("left", "right"):
        k, s = JOINT_INDEX[f"{side}_knee"], JOINT_INDEX[f"{side}_shoulder"]
        assert "condylar arc" in lm.joint_names[k]
        assert np.linalg.norm(lm.joints[k] - truth[k]) < 3.0
        assert np.linalg.norm(lm.joints[s] - truth[s]) < 1.0
