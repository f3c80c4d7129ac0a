"""Segmentations resolved onto the CT by world coordinates; names; bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import real_ct_path
from ctwin.core.volumes import labels
from ctwin.core import progress
from ctwin.core.volumes.ct import load_ct
from ctwin.core.errors import CtwinError
from ctwin.core.volumes.segmentation import label_hu_stats, load_segmentation
from ctwin.core.volumes.volume import Volume, load_nifti, save_nifti


@pytest.fixture(scope="module")
def chest():
    ct = load_ct(real_ct_path("chest_dicom", "dicom"))
    return ct, real_ct_path("chest_dicom", "seg.nii.gz")


@pytest.fixture(scope="module")
def abdomen():
    ct = load_ct(real_ct_path("abdomen_pelvis", "ct.nii.gz"))
    return ct, real_ct_path("abdomen_pelvis", "seg.nii.gz")


@pytest.fixture
def messages():
    msgs = []
    progress.set_sink(lambda m, f: msgs.append(m))
    yield msgs
    progress.set_sink(None)


def test_chest_las_seg_resolves_t12_onto_bone(chest):
    ct, seg_path = chest
    lab, names = load_segmentation(seg_path, ct)
    assert lab.shape == ct.shape and lab.data.dtype == np.uint16
    np.testing.assert_allclose(lab.affine, ct.affine)
    assert len(names) == 31 and names[32] == "vertebrae_T12"
    t12 = lab.data == 32
    med = float(np.median(ct.data[t12]))
    # The same label taken by array index (ignoring the LAS/LPS flip) lands off the bone.
    raw = load_nifti(seg_path).data
    med_flipped = float(np.median(ct.data[raw == 32]))
    assert med > 100, med
    assert med - med_flipped > 150, (med, med_flipped)
    # The resolution is exactly the j-flip for this grid (same box, opposite y axis).
    np.testing.assert_array_equal(lab.data, raw[:, ::-1, :])
    # Every bone label sits on bone-like HU on average.
    st = label_hu_stats(ct, lab, names)
    for n in ("vertebrae_T11", "vertebrae_T12", "humerus_left", "humerus_right"):
        assert st[n]["p50"] > 100, (n, st[n])


def test_abdomen_same_grid_61_labels(abdomen):
    ct, seg_path = abdomen
    lab, names = load_segmentation(seg_path, ct)
    assert len(names) == 61
    assert names[26] == "vertebrae_S1" and names[75] == "femur_left"
    np.testing.assert_array_equal(lab.data, load_nifti(seg_path).data)


def test_hu_stats_match_numpy(abdomen):
    ct, seg_path = abdomen
    lab, names = load_segmentation(seg_path, ct)
    st = label_hu_stats(ct, lab, names)
    for i in (5, 31, 77):  # liver, L1, hip_left
        v = ct.data[lab.data == i].astype(float)
        s = st[names[i]]
        assert s["voxels"] == v.size
        assert s["mean"] == pytest.approx(v.mean())
        assert s["std"] == pytest.approx(v.std())
        assert s["p5"] == pytest.approx(np.percentile(v, 5))
        assert s["p95"] == pytest.approx(np.percentile(v, 95))


def test_coarser_rotated_segmentation_resolved_by_world(tmp_path):
    """A seg on a coarser, flipped grid lands where its world coordinates say."""
    ct = Volume(np.full((40, 40, 20), -1000, np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    ct.data[10:30, 10:30, 5:15] = 40
    # seg: 2 mm, i axis flipped, origin chosen so seg voxel centres hit CT voxel centres
    aff = np.diag([-2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [38.5, 0.5, 0.0]
    seg = np.zeros((20, 20, 20), np.uint8)
    seg[2:6, 5:10, 5:10] = 5  # world x in [38.5-2*5.5, 38.5-2*1.5] = [27.5, 35.5]
    save_nifti(Volume(seg, aff), tmp_path / "s.nii.gz")
    lab, names = load_segmentation(tmp_path / "s.nii.gz", ct)
    assert names == {5: "liver"}
    xs = ct.index_to_world(np.argwhere(lab.data == 5))
    assert xs[:, 0].min() >= 27.5 - 1e-6 and xs[:, 0].max() <= 35.5 + 1e-6
    assert xs[:, 1].min() >= 9.5 - 1e-6 and xs[:, 1].max() <= 19.5 + 1e-6


def test_mask_folder_names_ids_and_empty(tmp_path, abdomen, messages):
    ct, seg_path = abdomen
    full = load_nifti(seg_path)
    folder = tmp_path / "masks"
    folder.mkdir()
    for i, n in ((5, "liver"), (31, "vertebrae_L1"), (77, "hip_left")):
        save_nifti(full.with_data((full.data == i).astype(np.uint8)), folder / f"{n}.nii.gz")
    # a structure outside the label table and an empty mask (TotalSegmentator writes those)
    save_nifti(full.with_data((full.data == 26).astype(np.uint8)), folder / "my_implant.nii.gz")
    save_nifti(full.with_data(np.zeros(full.shape, np.uint8)), folder / "brain.nii.gz")
    lab, names = load_segmentation(folder, ct)
    by_name = {n: i for i, n in names.items()}
    assert by_name["liver"] == 5 and by_name["vertebrae_L1"] == 31 and by_name["hip_left"] == 77
    assert by_name["my_implant"] > max(labels.all_names())
    assert "brain" not in by_name
    assert any("empty" in m and "brain" in m for m in messages)
    for i, n in ((5, "liver"), (31, "vertebrae_L1"), (26, "my_implant")):
        np.testing.assert_array_equal(lab.data == by_name[n], full.data == i)


def test_sidecar_names(tmp_path, messages):
    ct = Volume(np.full((10, 10, 10), -1000, np.int16), np.eye(4))
    seg = np.zeros((10, 10, 10), np.uint16)
    seg[2:4, 2:4, 2:4] = 200
    seg[5:8, 5:8, 5:8] = 3
    save_nifti(Volume(seg, np.eye(4)), tmp_path / "seg.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps({"3": "kidney_left", "200": "stent", "7": "unused"}))
    lab, names = load_segmentation(tmp_path / "seg.nii.gz", ct)
    assert names == {3: "kidney_left", 200: "stent"}
    assert any("no voxels" in m and "unused" in m for m in messages)


def test_unknown_ids_error(tmp_path):
    ct = Volume(np.full((10, 10, 10), -1000, np.int16), np.eye(4))
    seg = np.zeros((10, 10, 10), np.uint16)
    seg[2:4, 2:4, 2:4] = 250
    seg[5:7, 5:7, 5:7] = 5
    save_nifti(Volume(seg, np.eye(4)), tmp_path / "seg.nii.gz")
    with pytest.raises(CtwinError, match="without a name.*250") as e:
        load_segmentation(tmp_path / "seg.nii.gz", ct)
    assert "\n" not in str(e.value)


def test_no_overlap_error(tmp_path, abdomen):
    ct, seg_path = abdomen
    seg = load_nifti(seg_path)
    moved = seg.affine.copy()
    moved[2, 3] += 2000.0  # 2 m superior
    save_nifti(Volume(seg.data, moved), tmp_path / "far.nii.gz")
    with pytest.raises(CtwinError, match="does not overlap the CT") as e:
        load_segmentation(tmp_path / "far.nii.gz", ct)
    assert "\n" not in str(e.value)


def test_empty_and_bad_segmentations(tmp_path):
    ct = Volume(np.full((8, 8, 8), -1000, np.int16), np.eye(4))
    save_nifti(Volume(np.zeros((8, 8, 8), np.uint8), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(CtwinError, match="empty"):
        load_segmentation(tmp_path / "empty.nii.gz", ct)
    f = np.zeros((8, 8, 8), np.float32)
    f[2:4, 2:4, 2:4] = 0.5
    save_nifti(Volume(f, np.eye(4)), tmp_path / "prob.nii.gz")
    with pytest.raises(CtwinError, match="non-integer"):
        load_segmentation(tmp_path / "prob.nii.gz", ct)
    (tmp_path / "trunc.nii.gz").write_bytes((tmp_path / "empty.nii.gz").read_bytes()[:40])
    with pytest.raises(CtwinError, match="trunc.nii.gz"):
        load_segmentation(tmp_path / "trunc.nii.gz", ct)
    # partly overlapping box but every labelled voxel outside the CT
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[7, 7, 7] = 5
    aff = np.eye(4)
    aff[:3, 3] = 4.0
    save_nifti(Volume(seg, aff), tmp_path / "outside.nii.gz")
    with pytest.raises(CtwinError, match="no labelled voxel falls inside the CT"):
        load_segmentation(tmp_path / "outside.nii.gz", ct)
