"""Blender layer of the import: bl_data bulk helpers and the two import operators."""
from __future__ import annotations

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from ctwin import blender, operators  # noqa: E402
from ctwin.blender import data as bl_data  # noqa: E402
from ctwin.core.meshes.mesh import Mesh, import_anatomy, write_ply  # noqa: E402
from ctwin.core.volumes.volume import Volume, save_nifti  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register the scene state and the operators unless the session already did (then leave them
    registered)."""
    mine = not operators.CTWIN_OT_import_ct_anatomy.is_registered
    if mine:
        blender.register()
        operators.register()
    yield
    if mine:
        operators.unregister()
        blender.unregister()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A small synthetic CT (body, spine, liver, aorta, a table) and its segmentation."""
    d = tmp_path_factory.mktemp("case")
    shape = (40, 36, 24)
    i, j, k = np.indices(shape)
    ct = np.full(shape, -1000, np.int16)
    body = ((i - 20) / 15.0) ** 2 + ((j - 18) / 11.0) ** 2 < 1
    ct[body] = 40
    spine = ((i - 20) ** 2 + (j - 24) ** 2 < 9) & (k >= 2) & (k < 22)
    ct[spine] = 600
    liver = ((i - 12) ** 2 + (j - 15) ** 2 + (k - 12) ** 2) < 25
    aorta = ((i - 20) ** 2 + (j - 18) ** 2 < 3) & (k >= 1)
    ct[aorta] = 200
    ct[:, 33:35, :] = 100  # a flat table slab, posterior, separated by air
    seg = np.zeros(shape, np.uint8)
    seg[spine] = 31  # vertebrae_L1
    seg[liver & body] = 5
    seg[aorta & body] = 52
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = [-60, -50, 100]
    save_nifti(Volume(ct, aff), d / "ct.nii.gz")
    save_nifti(Volume(seg, aff), d / "seg.nii.gz")
    far = aff.copy()
    far[2, 3] += 5000
    save_nifti(Volume(seg, far), d / "far.nii.gz")
    return d


def test_bl_data_round_trip_and_vertex_groups():
    import trimesh

    s = trimesh.creation.icosphere(2, radius=40.0)
    col = bl_data.ensure_collection("Test")
    obj = bl_data.mesh_object("ball", s.vertices, s.faces, col)
    assert obj.name in col.objects
    np.testing.assert_allclose(np.array(obj.data.vertices[3].co), s.vertices[3] / 1000.0, atol=1e-6)
    v, f = bl_data.mesh_arrays(obj)
    np.testing.assert_allclose(v, s.vertices, atol=1e-3)
    np.testing.assert_array_equal(f, s.faces)
    obj.location = (0.1, 0.0, 0.0)
    bpy.context.view_layer.update()
    vw, _ = bl_data.mesh_arrays(obj, world=True)
    np.testing.assert_allclose(vw - v, np.broadcast_to([100.0, 0, 0], v.shape), atol=1e-3)
    w = np.linspace(0, 1, 50)
    bl_data.set_vertex_group(obj, "spine", np.arange(50), w)
    got = bl_data.vertex_group_weights(obj, "spine")
    np.testing.assert_allclose(got[:50], w, atol=1e-4)
    assert not got[50:].any()
    bl_data.set_vertex_coords(obj, v + 1.0)
    np.testing.assert_allclose(bl_data.vertex_coords(obj), v + 1.0, atol=1e-3)


def test_import_ct_anatomy_operator(case):
    r = bpy.ops.ctwin.import_ct_anatomy(filepath=str(case / "ct.nii.gz"), seg_path=str(case / "seg.nii.gz"))
    assert r == {"FINISHED"}
    assert {o.name for o in bpy.data.collections["Skeleton"].objects} == {"vertebrae_L1"}
    assert {o.name for o in bpy.data.collections["Organs"].objects} == {"liver", "aorta"}
    assert {o.name for o in bpy.data.collections["Skin"].objects} == {"skin"}
    spine = bpy.data.objects["vertebrae_L1"]
    assert spine["label_id"] == 31 and spine["tissue"] == "bone"
    assert 500 < spine["hu_mean"] < 700 and spine["hu_p5"] <= spine["hu_mean"] <= spine["hu_p95"]
    assert spine["hu_std"] >= 0
    assert bpy.data.objects["liver"]["label_id"] == 5
    # materials by tissue class: bone and organ differ, vessel has its own
    mats = {n: bpy.data.objects[n].data.materials[0] for n in ("vertebrae_L1", "liver", "aorta", "skin")}
    assert len({m.name for m in mats.values()}) == 4
    assert tuple(mats["vertebrae_L1"].diffuse_color) != tuple(mats["liver"].diffuse_color)
    # Blender world = LPS metres: same vertices as the core import, divided by 1000, no swap
    ct, lab, names, meshes, skin = import_anatomy(case / "ct.nii.gz", case / "seg.nii.gz")
    v, f = bl_data.mesh_arrays(spine)
    np.testing.assert_allclose(v, meshes["vertebrae_L1"].vertices, atol=1e-3)
    np.testing.assert_array_equal(f, meshes["vertebrae_L1"].faces)
    sk = bpy.data.objects["skin"]
    assert sk["tissue"] == "skin" and -100 < sk["hu_mean"] < 200  # body-mask HU, not air
    # the table slab (rows j >= 33 -> LPS y >= 49 mm) is not in the skin
    sv, _ = bl_data.mesh_arrays(bpy.data.objects["skin"])
    assert sv[:, 1].max() < -50 + 3 * 32


def test_import_ct_anatomy_errors_leave_scene_untouched(case):
    n_obj, n_mesh, n_col = len(bpy.data.objects), len(bpy.data.meshes), len(bpy.data.collections)
    with pytest.raises(RuntimeError, match="does not overlap"):
        bpy.ops.ctwin.import_ct_anatomy(filepath=str(case / "ct.nii.gz"), seg_path=str(case / "far.nii.gz"))
    with pytest.raises(RuntimeError, match="not found"):
        bpy.ops.ctwin.import_ct_anatomy(filepath=str(case / "nope.nii.gz"), seg_path=str(case / "seg.nii.gz"))
    assert (len(bpy.data.objects), len(bpy.data.meshes), len(bpy.data.collections)) == (n_obj, n_mesh, n_col)


def test_operators_are_undoable():
    for op in (operators.CTWIN_OT_import_ct_anatomy, operators.CTWIN_OT_import_anatomy_meshes):
        assert {"REGISTER", "UNDO"} <= set(op.bl_options)


def test_import_anatomy_meshes_operator(tmp_path):
    import trimesh

    s = trimesh.creation.icosphere(2, radius=30.0)
    write_ply(Mesh(s.vertices, s.faces, "femur_left"), tmp_path / "femur_left.ply")
    s.apply_translation([100, 0, 0])
    s.export(tmp_path / "spleen.stl")
    trimesh.creation.box((200, 100, 300)).export(tmp_path / "skin.obj")
    files = [{"name": n} for n in ("femur_left.ply", "spleen.stl", "skin.obj")]
    r = bpy.ops.ctwin.import_anatomy_meshes(directory=str(tmp_path), files=files)
    assert r == {"FINISHED"}
    assert "femur_left" in bpy.data.collections["Skeleton"].objects
    assert "spleen" in bpy.data.collections["Organs"].objects
    assert "skin" in bpy.data.collections["Skin"].objects
    sp = bpy.data.objects["spleen"]
    assert sp["label_id"] == 1  # spleen's TotalSegmentator id
    v, _ = bl_data.mesh_arrays(sp, scale=1.0)
    np.testing.assert_allclose(v.mean(axis=0), [0.1, 0, 0], atol=2e-3)  # 100 mm -> 0.1 m
    # a corrupt file: error, nothing created
    (tmp_path / "bad.stl").write_bytes(b"\x00" * 50)
    n = len(bpy.data.objects)
    with pytest.raises(RuntimeError):
        bpy.ops.ctwin.import_anatomy_meshes(directory=str(tmp_path),
                                            files=[{"name": "spleen.stl"}, {"name": "bad.stl"}])
    assert len(bpy.data.objects) == n


def test_skin_label_and_skin_surface_coexist(tmp_path):
    """A segmentation label called "skin" (the phantom has one) does not clash with the CT skin."""
    d = tmp_path
    shape = (30, 30, 16)
    i, j, k = np.indices(shape)
    r2 = (i - 15) ** 2 + (j - 15) ** 2
    ct = np.where(r2 < 100, 30, -1000).astype(np.int16)
    seg = np.zeros(shape, np.uint8)
    seg[(r2 >= 64) & (r2 < 100)] = 140  # a shell labelled "skin" (sidecar below)
    seg[r2 < 9] = 5
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    save_nifti(Volume(ct, aff), d / "ct.nii.gz")
    save_nifti(Volume(seg, aff), d / "seg.nii.gz")
    (d / "labels.json").write_text('{"140": "skin", "5": "liver"}')
    ct_v, lab, names, meshes, skin = import_anatomy(d / "ct.nii.gz", d / "seg.nii.gz")
    assert set(meshes) == {"skin_label", "liver"} and meshes["skin_label"].meta["label_name"] == "skin"
    r = bpy.ops.ctwin.import_ct_anatomy(filepath=str(d / "ct.nii.gz"), seg_path=str(d / "seg.nii.gz"))
    assert r == {"FINISHED"}
    objs = {o.name for o in bpy.data.collections["Skin"].objects}
    assert objs == {"skin", "skin_label"}
    lab_obj = bpy.data.objects["skin_label"]
    assert lab_obj["label_name"] == "skin" and lab_obj["label_id"] == 140
    assert bpy.data.objects["skin"]["volume_cm3"] > lab_obj["volume_cm3"]


def test_state_of_an_older_blend_moves_into_scene_ctwin(tmp_path):
    """A .blend that kept the workflow's state as loose scene custom properties opens with that
    state in ``scene.ctwin`` (the load handler) and the loose properties gone."""
    scene = bpy.context.scene
    fit = '{"pose": [0.0], "betas": [1.0]}'
    scene["ctwin_ct_path"], scene["ctwin_seg_path"], scene["ctwin_fit"] = "/d/ct.nii.gz", "/d/seg.nii.gz", fit
    scene["ctwin_twin_dir"] = "//twin/"
    scene.ctwin.twin_dir = "//"
    path = tmp_path / "old.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.wm.open_mainfile(filepath=str(path))
    scene = bpy.context.scene
    s = scene.ctwin
    assert (s.ct_path, s.seg_path, s.twin_dir) == ("/d/ct.nii.gz", "/d/seg.nii.gz", "//twin/")
    assert s.fit() == {"pose": [0.0], "betas": [1.0]}
    assert not [k for k in scene.keys() if k.startswith("ctwin_")]
