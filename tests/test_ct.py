"""CT readers: NIfTI / ITK / DICOM paths agree in world space; HU checks; corrupt files."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import real_ct_path
from ctwin.core import progress
from ctwin.core.volumes.ct import load_ct, save_itk
from ctwin.core.errors import CtwinError
from ctwin.core.volumes.volume import Volume, save_nifti


def _ct_like(shape=(20, 16, 12), seed=0):
    """Air with a soft-tissue block and a bone core (HU), random so index mix-ups show."""
    rng = np.random.default_rng(seed)
    d = np.full(shape, -1000, np.int16)
    d[3:-3, 3:-3, 2:-2] = 40
    d[8:12, 6:9, :] = 700
    d += rng.integers(-20, 20, size=shape).astype(np.int16)
    return d


def _oblique_affine():
    """LAS-like flipped, anisotropic, slightly rotated affine (index -> LPS mm)."""
    c, s = np.cos(0.2), np.sin(0.2)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([-1.5, 2.0, 3.0])
    a[:3, 3] = [30.0, -20.0, 100.0]
    return a


def _world_equal(a: Volume, b: Volume):
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_array_equal(a.data, b.data)
    idx = np.array([[0, 0, 0], [5, 3, 2], [a.shape[0] - 1, a.shape[1] - 1, a.shape[2] - 1]])
    np.testing.assert_allclose(a.index_to_world(idx), b.index_to_world(idx), atol=1e-3)


def test_nifti_and_itk_paths_agree_in_world_space(tmp_path):
    vol = Volume(_ct_like(), _oblique_affine())
    nii = tmp_path / "ct.nii.gz"
    save_nifti(vol, nii)
    # An independent reader (ITK's NIfTI IO) converts it to MHA and NRRD; ours must agree.
    img = sitk.ReadImage(str(nii))
    sitk.WriteImage(img, str(tmp_path / "ct.mha"))
    sitk.WriteImage(img, str(tmp_path / "ct.nrrd"))
    a = load_ct(nii)
    _world_equal(a, vol)
    _world_equal(load_ct(tmp_path / "ct.mha"), a)
    _world_equal(load_ct(tmp_path / "ct.nrrd"), a)
    # A voxel's world position from ITK's own transform matches ours.
    p_itk = img.TransformIndexToPhysicalPoint((4, 7, 3))
    np.testing.assert_allclose(a.index_to_world([4, 7, 3]), p_itk, atol=1e-3)


def test_real_nifti_and_mha_agree(tmp_path):
    nii = real_ct_path("abdomen_pelvis", "ct.nii.gz")
    a = load_ct(nii)
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(tmp_path / "ct.mha"))
    b = load_ct(tmp_path / "ct.mha")
    _world_equal(a, b)
    assert a.data.dtype == np.int16
    # RAS file: LPS affine has negative x/y steps
    assert a.affine[0, 0] < 0 and a.affine[1, 1] < 0 and a.affine[2, 2] > 0


def test_save_itk_round_trip(tmp_path):
    vol = Volume(_ct_like(seed=3), _oblique_affine())
    save_itk(vol, tmp_path / "x.nrrd")
    _world_equal(load_ct(tmp_path / "x.nrrd"), vol)


def test_dicom_series_real():
    folder = real_ct_path("chest_dicom", "dicom")
    ct = load_ct(folder)
    assert ct.shape == (512, 512, 20)
    assert ct.data.dtype == np.int16
    np.testing.assert_allclose(ct.spacing, [0.9765625, 0.9765625, 2.0])
    np.testing.assert_allclose(ct.direction, np.eye(3), atol=1e-6)
    assert ct.data.min() == -1024  # stored 0 with intercept -1024: rescale applied
    assert ct.meta["modality"] == "CT"


def _write_series(folder, data, uid, modality="CT", z0=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)).astype(np.int16))
    img.SetSpacing((1.0, 1.0, 2.0))
    img.SetOrigin((0.0, 0.0, z0))
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for k in range(data.shape[2]):
        s = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, val in {
            "0008|0060": modality, "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid,
            "0020|0032": "\\".join(str(p) for p in pos), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k), "0008|0018": f"{uid}.{k}",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
        }.items():
            s.SetMetaData(tag, val)
        w.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        w.Execute(s)


def test_dicom_folder_with_two_series_takes_largest(tmp_path):
    d = tmp_path / "dcm"
    big = _ct_like((12, 10, 6), seed=1)
    _write_series(d, _ct_like((12, 10, 3), seed=2), "1.2.826.0.1.3680043.2.1125.101")
    _write_series(d, big, "1.2.826.0.1.3680043.2.1125.202", z0=50.0)
    msgs = []
    progress.set_sink(lambda m, f: msgs.append(m))
    try:
        ct = load_ct(d)
    finally:
        progress.set_sink(None)
    assert ct.shape == (12, 10, 6)
    np.testing.assert_array_equal(ct.data, big)
    assert ct.origin[2] == pytest.approx(50.0)
    assert any("2 DICOM series" in m and "largest" in m for m in msgs)


def test_mr_dicom_rejected(tmp_path):
    _write_series(tmp_path / "mr", _ct_like((8, 8, 3)), "1.2.826.0.1.3680043.2.1125.303", modality="MR")
    with pytest.raises(CtwinError, match="modality MR"):
        load_ct(tmp_path / "mr")


@pytest.mark.parametrize("kind", ["mr_positive", "normalised", "constant"])
def test_non_hu_volumes_rejected(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "mr_positive":  # MR magnitudes: >= 0
        d = rng.integers(0, 1500, size=(16, 16, 8)).astype(np.int16)
    elif kind == "normalised":  # z-scored intensities
        d = rng.normal(0, 1, size=(16, 16, 8)).astype(np.float32)
    else:
        d = np.full((16, 16, 8), -1000, np.int16)
    save_nifti(Volume(d, np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(CtwinError, match="not a CT in Hounsfield units") as e:
        load_ct(tmp_path / "v.nii.gz")
    assert "\n" not in str(e.value)


def test_rescale_slope_intercept_applied(tmp_path):
    import nibabel as nib

    hu = _ct_like()
    raw = (hu.astype(np.int32) + 1024).astype(np.uint16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "u.nii.gz"))
    ct = load_ct(tmp_path / "u.nii.gz")
    assert ct.data.dtype == np.int16
    np.testing.assert_array_equal(ct.data, hu)


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.mha", "ct.nrrd"])
def test_truncated_files_one_line_error(tmp_path, name):
    vol = Volume(_ct_like((30, 30, 20)), np.eye(4))
    full = tmp_path / ("full_" + name)
    if name.endswith(".nii.gz"):
        save_nifti(vol, full)
    else:
        save_itk(vol, full)
    raw = full.read_bytes()
    bad = tmp_path / name
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CtwinError) as e:
        load_ct(bad)
    msg = str(e.value)
    assert "\n" not in msg and bad.name in msg


def test_garbage_and_missing_files(tmp_path):
    g = tmp_path / "junk.nii.gz"
    g.write_bytes(gzip.compress(b"this is not a nifti file" * 10))
    with pytest.raises(CtwinError):
        load_ct(g)
    with pytest.raises(CtwinError, match="not found"):
        load_ct(tmp_path / "nope.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtwinError, match="no DICOM series"):
        load_ct(tmp_path / "empty")
