"""Multi-label surface nets: closed meshes, shared boundaries, volumes, skin without table, IO."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import real_ct_path
from ctwin.core.volumes import labels
from ctwin.core.errors import CtwinError
from ctwin.core.meshes.mesh import (Mesh, body_mask, import_anatomy, label_meshes, read_mesh, skin_mesh,
                             surface_nets, write_ply)
from ctwin.core.volumes.volume import Volume


def _shared_faces(a: Mesh, b: Mesh, decimals=6):
    """Triangles of a that appear reversed in b (as world coordinates)."""
    def keyset(m, rev):
        f = m.faces[:, ::-1] if rev else m.faces
        tri = np.round(m.vertices[f], decimals)
        # canonical rotation: start at the lexicographically smallest vertex
        out = set()
        for t in tri:
            t = [tuple(p) for p in t]
            r = t.index(min(t))
            out.add(tuple(t[r:] + t[:r]))
        return out
    return keyset(a, False) & keyset(b, True)


def _two_blocks():
    lab = np.zeros((14, 12, 10), np.uint16)
    lab[2:7, 2:10, 2:8] = 31  # vertebrae_L1
    lab[7:12, 3:9, 2:8] = 32  # vertebrae_T12, touching L1 along x
    lab[4:6, 4:6, 8:9] = 31  # a bump
    aff = np.diag([-1.5, 2.0, 3.0, 1.0])  # mirroring affine: windings must still point outward
    aff[:3, 3] = [10, -5, 40]
    return Volume(lab, aff)


def test_two_labels_share_their_boundary_exactly():
    vol = _two_blocks()
    names = {31: "vertebrae_L1", 32: "vertebrae_T12"}
    for it in (0, 10):
        ms = label_meshes(vol, names, smooth_iterations=it)
        a, b = ms["vertebrae_L1"], ms["vertebrae_T12"]
        for m in (a, b):
            assert m.is_closed() and m.nonmanifold_edges() == 0
            assert m.volume() > 0  # outward normals despite det(affine) < 0
        # the contact face: 6 x 6 voxel faces = 72 triangles, each in both meshes, reversed
        assert len(_shared_faces(a, b)) == 72
        if it == 0:  # unsmoothed surface nets = the voxel boundary: exact volumes
            for i, n in names.items():
                assert ms[n].volume() == pytest.approx(np.count_nonzero(vol.data == i) * 9.0, rel=1e-9)


def test_smoothing_keeps_volume_and_moves_vertices():
    z, y, x = np.mgrid[:30, :30, :30]
    lab = (((x - 14.5) ** 2 + (y - 14.5) ** 2 + (z - 14.5) ** 2) < 10 ** 2).astype(np.uint8) * 5
    vol = Volume(lab, np.eye(4))
    rough = label_meshes(vol, {5: "liver"}, smooth_iterations=0)["liver"]
    smooth = label_meshes(vol, {5: "liver"}, smooth_iterations=10)["liver"]
    v0 = np.count_nonzero(lab)
    assert abs(smooth.volume() / v0 - 1) <= 0.02
    # smoothing really happened: the surface got closer to the sphere (area shrinks from staircase)
    assert smooth.area() < 0.85 * rough.area()
    r = np.linalg.norm(smooth.vertices - 14.5, axis=1)
    assert r.std() < np.linalg.norm(rough.vertices - 14.5, axis=1).std()


def test_thin_structure_volume_bounded():
    lab = np.zeros((40, 8, 8), np.uint8)
    lab[2:38, 3, 3] = 1  # a 1-voxel-thick rod: plain smoothing would shrink it a lot
    cx = surface_nets(lab, np.eye(4), smooth_iterations=20)
    v = cx.label_volumes()[1]
    assert abs(v / 36.0 - 1) <= 0.015 + 1e-9


def test_diagonal_contacts_become_manifold():
    import trimesh

    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2, 2, 2:6] = 1
    lab[3, 3, 2:6] = 1  # touches the first rod only along an edge
    lab[4, 4, 6] = 1  # touches the second rod only at a corner
    lab[2, 3, 4] = 2  # another label in the pinch
    vol = Volume(lab, np.eye(4))
    ms = label_meshes(vol, {1: "rib_left_1", 2: "rib_left_2"}, smooth_iterations=0)
    for i, m in zip((1, 2), ms.values()):
        assert m.is_closed() and m.nonmanifold_edges() == 0
        t = trimesh.Trimesh(m.vertices, m.faces, process=False)
        assert t.is_watertight and t.is_winding_consistent
        assert m.volume() == pytest.approx(np.count_nonzero(lab == i))


def test_decimation_meets_budget_keeps_sharing():
    vol = _two_blocks()
    names = {31: "vertebrae_L1", 32: "vertebrae_T12"}
    full = label_meshes(vol, names)
    budget = sum(m.n_faces for m in full.values()) // 3
    ms = label_meshes(vol, names, max_triangles=budget)
    assert sum(m.n_faces for m in ms.values()) <= budget
    for m in ms.values():
        assert m.is_closed()
        assert m.volume() > 0
    assert len(_shared_faces(ms["vertebrae_L1"], ms["vertebrae_T12"])) > 0
    with pytest.raises(CtwinError, match="too small"):
        label_meshes(vol, names, max_triangles=3)


def test_empty_labelmap_error():
    with pytest.raises(CtwinError, match="no labelled voxel"):
        label_meshes(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4)), {1: "spleen"})


@pytest.fixture(scope="module")
def abdomen_import():
    ct_path = real_ct_path("abdomen_pelvis", "ct.nii.gz")
    seg_path = real_ct_path("abdomen_pelvis", "seg.nii.gz")
    return import_anatomy(ct_path, seg_path)


def test_abdomen_every_label_meshed_closed_and_volume(abdomen_import):
    ct, labelmap, names, meshes, skin = abdomen_import
    assert len(names) == 61 and set(meshes) == set(names.values())
    vox = float(np.prod(ct.spacing))
    counts = np.bincount(labelmap.data.reshape(-1))
    checked = 0
    for i, n in names.items():
        m = meshes[n]
        assert m.is_closed() and m.nonmanifold_edges() == 0, n
        v_label = counts[i] * vox
        rel = m.volume() / v_label - 1
        assert abs(rel) <= 0.02, (n, rel)  # smoothing bound
        if v_label > 5000.0:  # > 5 cm^3: the acceptance bound
            assert abs(rel) <= 0.03
            checked += 1
        # mesh lies in world mm on the label: its centroid is near the label's voxel centroid
        c_lab = ct.index_to_world(np.argwhere(labelmap.data == i)).mean(axis=0)
        assert np.linalg.norm(m.vertices.mean(axis=0) - c_lab) < 0.5 * np.ptp(m.vertices, axis=0).max() + 3
    assert checked >= 40
    # neighbouring vertebrae share their boundary
    assert len(_shared_faces(meshes["vertebrae_L1"], meshes["vertebrae_L2"], 4)) > 50
    assert len(_shared_faces(meshes["hip_left"], meshes["sacrum"], 4)) > 10


def test_abdomen_skin_has_no_table(abdomen_import):
    ct, labelmap, names, meshes, skin = abdomen_import
    m = ct.data > -500
    # The curved table lies at the posterior edge (j small: LPS y is large there) and curves up
    # at the sides, well clear of the body. Its voxels in the posterior-lateral corners:
    table = np.zeros_like(m)
    table[:22, :10] = m[:22, :10]
    table[100:, :10] = m[100:, :10]
    assert table.sum() > 100  # the data has a table there
    body = body_mask(ct)
    assert not (body & table).any()
    assert m[:, :2].sum() > 50 and not body[:, :2].any()  # the table's own rows are not body
    ijk = ct.world_to_index(skin.vertices)
    assert ijk[:, 1].min() > 1.0, ijk[:, 1].min()  # no skin vertex in the table rows (j 0-1)
    tv = ct.index_to_world(np.argwhere(table))
    from scipy.spatial import cKDTree

    d, _ = cKDTree(tv).query(skin.vertices)
    assert d.min() > 4.0, d.min()
    assert skin.is_closed()
    assert abs(skin.volume() / (body.sum() * np.prod(ct.spacing)) - 1) < 0.02
    # the skin encloses the labelled anatomy: most label voxels are in the body mask
    assert (body[labelmap.data > 0]).mean() > 0.99


def test_write_read_ply_and_other_formats(tmp_path):
    import trimesh

    s = trimesh.creation.icosphere(2, radius=20.0)
    m = Mesh(s.vertices + [1, 2, 3], s.faces, "liver")
    write_ply(m, tmp_path / "liver.ply")
    r = read_mesh(tmp_path / "liver.ply")
    assert r.name == "liver"
    np.testing.assert_allclose(r.vertices, m.vertices, atol=1e-4)
    np.testing.assert_array_equal(r.faces, m.faces)
    assert r.is_closed() and r.volume() == pytest.approx(m.volume(), rel=1e-5)
    for ext in ("stl", "obj"):
        s.export(tmp_path / f"femur_left.{ext}")
        r = read_mesh(tmp_path / f"femur_left.{ext}")
        assert r.name == "femur_left" and r.volume() == pytest.approx(s.volume, rel=1e-4)
    (tmp_path / "bad.stl").write_bytes(b"\x00" * 90)
    with pytest.raises(CtwinError):
        read_mesh(tmp_path / "bad.stl")
    (tmp_path / "liver.vtk").write_text("# vtk DataFile Version 3.0\n")
    with pytest.raises(CtwinError, match="unsupported"):
        read_mesh(tmp_path / "liver.vtk")


def test_write_ply_nothing_half_written(tmp_path):
    bad = Mesh(np.zeros((3, 3)), np.array([[0, 1, 7]]), "x")
    with pytest.raises(CtwinError):
        write_ply(bad, tmp_path / "x.ply")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("ctwin.core.phantom.phantom") is None,
                    reason="core.phantom.phantom not written yet")
def test_phantom_every_bone_imported(tmp_path):
    from ctwin.core.phantom.phantom import write_phantom

    ph = write_phantom(tmp_path / "ph", spacing=6.0)
    ct, labelmap, names, meshes, skin = import_anatomy(tmp_path / "ph" / "ct.nii.gz",
                                                       tmp_path / "ph" / "seg.nii.gz")
    bones = {n for i, n in ph.labels.items() if labels.is_skeletal(n) and np.any(ph.seg.data == i)}
    assert bones and bones <= set(meshes)
    assert all(meshes[b].is_closed() and meshes[b].nonmanifold_edges() == 0 for b in bones)
    # the phantom's table lies right under the body; it must not be part of the skin
    inv = {n: i for i, n in ph.labels.items()}
    body = body_mask(ct)
    if "table" in inv:
        table = labelmap.data == inv["table"]
        assert table.any() and not (body & table).any()
        from scipy.spatial import cKDTree

        d, _ = cKDTree(ct.index_to_world(np.argwhere(table))).query(skin.vertices)
        assert d.min() >= 0.5 * ct.spacing.min() - 1e-6
    # labelled anatomy above the body threshold is in the body (coarse partial-volume fat
    # voxels below -500 HU cannot be)
    anatomy = (labelmap.data > 0) & (labelmap.data != inv.get("table", -1)) & (ct.data > -500)
    assert body[anatomy].mean() > 0.999


def test_chest_body_keeps_both_arms_drops_table():
    from ctwin.core.volumes.ct import load_ct
    from ctwin.core.volumes.segmentation import load_segmentation

    ct = load_ct(real_ct_path("chest_dicom", "dicom"))
    lab, names = load_segmentation(real_ct_path("chest_dicom", "seg.nii.gz"), ct)
    body = body_mask(ct)
    inv = {n: i for i, n in names.items()}
    for arm in ("humerus_left", "humerus_right"):
        assert body[lab.data == inv[arm]].mean() > 0.99, arm
    assert body[lab.data > 0].mean() > 0.999
    # the curved table: dense voxels below (posterior of) the body's lowest labelled row + 3 cm
    post = np.argwhere(lab.data > 0)[:, 1].max() + int(30 / ct.spacing[1])
    table = np.zeros_like(body)
    table[:, post:] = ct.data[:, post:] > -500
    assert table.sum() > 1000 and not (body & table).any()


def _body_on_pad(sink_rows: int, flip_y: bool):
    """A trunk-like ellipse (2 mm voxels; muscle, a fat ring, a one-voxel skin layer) lying on a
    -200 HU pad on a table (450 HU shells, -850 HU foam core), its back sunk ``sink_rows`` into
    the pad so that the pad rises beside its lowest rows. Rows run anterior -> posterior (LPS
    y), or the other way with ``flip_y``."""
    from scipy import ndimage

    ni, nj, nk = 200, 64, 4
    i, j = np.mgrid[:ni, :nj].astype(float)
    bottom = 44  # the body's lowest row
    body = (((i - 100) / 60) ** 2 + ((j - 26) / 22) ** 2 <= 1.0) & (j <= bottom)
    inner = ndimage.binary_erosion(body)
    hu = np.full((ni, nj), -1000.0)
    hu[body] = 45.0
    hu[inner & ~ndimage.binary_erosion(inner, iterations=3)] = -100.0
    skin = body & ~inner
    hu[skin] = 30.0
    hu[(j > bottom - sink_rows) & (j <= bottom + 3) & (i >= 4) & (i < ni - 4) & ~body] = -200.0
    hu[j == bottom + 4] = 450.0
    hu[(j > bottom + 4) & (j < bottom + 9)] = -850.0
    hu[j == bottom + 9] = 450.0
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    if flip_y:
        hu, skin, body = hu[:, ::-1], skin[:, ::-1], body[:, ::-1]
        aff[1, 1], aff[1, 3] = -2.0, 2.0 * (nj - 1)
    rep = lambda a: np.repeat(np.ascontiguousarray(a)[:, :, None], nk, axis=2)  # noqa: E731
    return Volume(rep(np.rint(hu)).astype(np.int16), aff), rep(skin), rep(body), rep(hu == -200)


@pytest.mark.parametrize("flip_y", [False, True])
def test_body_mask_keeps_skin_lying_on_the_pad(flip_y):
    # The pad rises one row beside the body's lowest (skin) row, so the table's top rows include
    # the skin's: the flat-table cut must spare the skin layer and still take the pad and table.
    ct, skin, body, pad = _body_on_pad(1, flip_y)
    got = body_mask(ct)
    lowest = skin & ~np.roll(body, -1 if not flip_y else 1, axis=1)  # skin with pad below it
    assert lowest.sum() > 100
    assert got[skin].all() and got[body].all()
    assert not (got & ~body).any()  # no pad, no table
    assert pad.sum() > 1000 and not (got & pad).any()
    # a table top of soft-tissue HU over the whole flat band (pad and top shell at 40 HU) is
    # table: cut with the body's rows in it, as before
    data = ct.data.copy()
    top = pad | (ct.data == 450) & np.roll(pad, 1 if not flip_y else -1, axis=1)
    data[top] = 40
    fused = body_mask(Volume(data, ct.affine))
    assert not (fused & top).any()
    assert fused[body].mean() > 0.95
