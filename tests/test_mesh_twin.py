"""Mesh mode: twins built from closed meshes with no CT (core.meshes.mesh_volume, build_twin_from_meshes)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import trimesh

from ctwin.core.meshes import mesh_volume as mv
from ctwin.core.errors import CtwinError
from ctwin.core.meshes.mesh import Mesh, write_ply


def _mesh(tm, name, shift=(0.0, 0.0, 0.0)):
    return Mesh(np.asarray(tm.vertices) + np.asarray(shift), tm.faces, name)


def _sphere(r, name, shift=(0.0, 0.0, 0.0)):
    return _mesh(trimesh.creation.icosphere(subdivisions=4, radius=r), name, shift)


def test_voxelised_volume_equals_mesh_volume():
    """Partial-volume voxelisation: each structure's voxelised volume is its mesh volume, and the
    HU integral is exactly the nesting of the structures (a torus is non-convex, genus 1)."""
    body = _sphere(40.0, "skin", (0.3, -1.1, 0.7))
    torus = _mesh(trimesh.creation.torus(major_radius=22.0, minor_radius=7.0), "liver", (1.0, 2.0, -3.0))
    bone = _sphere(9.0, "femur_left", (1.7, 0.4, 2.2))
    meshes = {"skin": body, "liver": torus, "femur_left": bone}
    table = mv.hu_table(meshes)
    r = mv.voxelise_meshes(meshes, table, spacing=3.0)
    vb, vt, vf = body.volume(), torus.volume(), bone.volume()
    # the bone sits inside the torus's hole, not inside the torus: disjoint from it
    owned = {"skin": vb - vt - vf, "liver": vt, "femur_left": vf}
    for n, v in owned.items():
        assert abs(r.volumes_mm3[n] - v) / v < 0.02, (n, r.volumes_mm3[n], v)
    # HU integral: air outside, each structure's HU over the volume it owns
    h = 3.0 ** 3
    integral = float(((r.hu.astype(np.float64) + 1000.0) * h).sum())
    expect = sum(owned[n] * (table[n]["hu"] + 1000.0) for n in owned)
    assert abs(integral - expect) / expect < 0.02
    # labels: the bone's voxels (majority) match its volume to within a shell of voxels
    lab = r.labelmap.data
    fem_id = next(i for i, n in r.names.items() if n == "femur_left")
    assert abs(np.count_nonzero(lab == fem_id) * h - vf) / vf < 0.25
    assert r.ct.data.dtype == np.int16 and r.ct.shape == lab.shape
    # bones on top of organs: a bone nested inside an organ owns its volume
    inner = _sphere(5.0, "vertebrae_L1", (0.0, 22.0, 0.0))
    organ = _sphere(15.0, "kidney_left", (0.0, 22.0, 0.0))
    r2 = mv.voxelise_meshes({"skin": body, "kidney_left": organ, "vertebrae_L1": inner}, spacing=3.0)
    assert abs(r2.volumes_mm3["vertebrae_L1"] - inner.volume()) / inner.volume() < 0.02
    assert abs(r2.volumes_mm3["kidney_left"] - (organ.volume() - inner.volume())) / organ.volume() < 0.02


def test_materials_and_hu_table(tmp_path):
    assert abs(mv.material_hu("water")) < 1.0   # water is mu_water at the effective energy
    assert mv.material_hu("air") == -1000.0
    st, bone, metal = (mv.material_hu(m) for m in ("soft_tissue", "bone", "metal"))
    assert 0 < st < 100 < 1000 < bone < metal
    # attenuation scales with density: HU + 1000 doubles with twice the density
    d = mv.MATERIAL_DENSITY["bone"]
    assert abs((mv.material_hu("bone", 2 * d) + 1000) / (bone + 1000) - 2.0) < 1e-6
    p = tmp_path / "hu.json"
    p.write_text(json.dumps({"femur_left": "metal", "liver": 70, "skin": {"material": "water"},
                             "kidney_left": {"material": "bone", "density": 1.2}}))
    names = ["skin", "liver", "femur_left", "kidney_left", "vertebrae_L1"]
    t = mv.hu_table(names, mv.load_hu_overrides(p))
    assert t["femur_left"]["hu"] == pytest.approx(metal, abs=0.1) and "metal" in t["femur_left"]["source"]
    assert t["liver"]["hu"] == 70.0 and t["skin"]["hu"] == pytest.approx(0.0, abs=1.0)
    assert t["kidney_left"]["hu"] == pytest.approx(mv.material_hu("bone", 1.2), abs=0.1)
    assert t["vertebrae_L1"]["source"].startswith("default") and t["vertebrae_L1"]["tier"] == 4
    assert t["skin"]["tier"] < t["liver"]["tier"] < t["femur_left"]["tier"]
    with pytest.raises(CtwinError, match="not one of the meshes"):
        mv.hu_table(names, {"femur_rigth": 500})
    with pytest.raises(CtwinError, match="unknown material"):
        mv.hu_table(names, {"liver": "unobtainium"})


def _write_set(d, meshes, fmt="ply"):
    d.mkdir(parents=True, exist_ok=True)
    for n, m in meshes.items():
        if fmt == "ply":
            write_ply(m, d / f"{n}.ply")
        else:
            trimesh.Trimesh(m.vertices, m.faces, process=False).export(d / f"{n}.{fmt}")
    return d


def test_mesh_folder_inputs_and_errors(tmp_path):
    from ctwin.commands import build as build_cmd

    body, bone, organ = _sphere(40.0, "skin"), _sphere(8.0, "femur_left"), _sphere(12.0, "liver", (0, 20, 0))
    # STL repeats vertices per triangle and an inward-wound mesh is flipped: both are accepted
    inward = Mesh(organ.vertices, organ.faces[:, ::-1], "liver")
    d = _write_set(tmp_path / "ok", {"skin": body, "femur_left": bone}, fmt="stl")
    _write_set(d, {"liver": inward, "body_model": _sphere(50.0, "body_model")})
    got = mv.read_mesh_folder(d)
    assert set(got) == {"skin", "femur_left", "liver"}  # a twin's body_model.ply is not anatomy
    assert all(m.is_closed() and m.volume() > 0 for m in got.values())
    assert abs(got["femur_left"].volume() - bone.volume()) < 1e-3 * bone.volume()

    with pytest.raises(CtwinError, match="no skin mesh"):
        mv.read_mesh_folder(_write_set(tmp_path / "noskin", {"femur_left": bone, "liver": organ}))
    with pytest.raises(CtwinError, match="no bone mesh"):
        mv.read_mesh_folder(_write_set(tmp_path / "nobone", {"skin": body, "liver": organ}))
    holed = Mesh(organ.vertices, organ.faces[1:], "liver")
    with pytest.raises(CtwinError, match="mesh liver is not closed"):
        mv.read_mesh_folder(_write_set(tmp_path / "open", {"skin": body, "femur_left": bone, "liver": holed}))
    with pytest.raises(CtwinError, match="no STL/OBJ/PLY"):
        (tmp_path / "empty").mkdir()
        mv.read_mesh_folder(tmp_path / "empty")

    def args(**kw):
        base = dict(ct=None, seg=None, meshes=None, hu=None, spacing=None, body_model=None,
                    out=str(tmp_path / "t"), no_blend=True)
        return argparse.Namespace(**(base | kw))

    with pytest.raises(CtwinError, match="either --meshes or --ct"):
        build_cmd.run(args(meshes=str(d), ct="ct.nii.gz"))
    with pytest.raises(CtwinError, match="needs --ct and --seg"):
        build_cmd.run(args(ct="ct.nii.gz"))
    with pytest.raises(CtwinError, match="mesh mode"):
        build_cmd.run(args(ct="ct.nii.gz", seg="seg.nii.gz", hu="hu.json"))
    assert not (tmp_path / "t").exists()


@pytest.fixture(scope="module")
def mesh_twin(twin_dir, tmp_path_factory):
    """A mesh-mode twin built from the CT twin's meshes (the coarse phantom's), no CT."""
    from ctwin.core.twin.twin import build_twin_from_meshes

    out = tmp_path_factory.mktemp("mesh_twin") / "twin"
    build_twin_from_meshes(twin_dir / "meshes", out, spacing=8.0)
    return out


def test_mesh_twin_renders_like_the_phantom_ct(mesh_twin, coarse_phantoms):
    """At the acquisition pose the mesh twin's DRR (articulated path, default HU table) is close
    to the phantom CT's; at a new pose its bones move rigidly and the DRR stays close to the
    phantom generated at that pose."""
    from ctwin.core.drr.carm import default_views
    from ctwin.core.volumes.ct import load_ct
    from ctwin.core.fileio import read_json
    from ctwin.core.volumes.labels import is_skeletal
    from ctwin.core.meshes.metrics import drr_similarity
    from ctwin.core.drr.projector import render_drr
    from ctwin.core.twin.twin import load_twin

    twin = load_twin(mesh_twin)
    assert twin.meta["mode"] == "mesh"
    table = twin.meta["hu_table"]
    assert table["femur_left"]["source"].startswith("default") and table["skin"]["hu"] == -50.0
    assert "femur_left" in twin.meta["structures"] and twin.meta["binding"]["femur_left"] == "left_hip"
    assert "skin" not in twin.meta["structures"] and (mesh_twin / "meshes" / "skin.ply").is_file()

    acq = coarse_phantoms["supine_arms_down"]
    ct_a = load_ct(acq / "ct.nii.gz")
    for name, g in default_views(ct_a, size=128).items():
        s = drr_similarity(twin.render(g), render_drr(ct_a, g))
        print(f"mesh twin, acquisition pose, {name}: SSIM {s['ssim']:.4f} PSNR {s['psnr_db']:.2f} dB")
        assert s["ssim"] > 0.98 and s["psnr_db"] > 35.0

    tgt = coarse_phantoms["hip_flexion"]
    ta, tb = read_json(acq / "truth.json"), read_json(tgt / "truth.json")
    pose_b = np.asarray(tb["pose"], dtype=np.float64)
    transl = twin.transl0_mm + np.asarray(tb["transl"]) - np.asarray(ta["transl"])
    moved = twin.bone_transforms(pose_b, transl)
    meshes = twin.meshes(include_skin=False)
    errs = {}
    for n, T in moved.items():
        assert is_skeletal(n)
        R = T[:3, :3]
        assert np.allclose(R.T @ R, np.eye(3), atol=1e-6) and abs(np.linalg.det(R) - 1.0) < 1e-6
        if n in ta["bones"] and n in meshes:
            v = meshes[n].vertices
            exact = np.asarray(tb["bones"][n]) @ np.linalg.inv(np.asarray(ta["bones"][n]))
            errs[n] = float(np.linalg.norm((v @ R.T + T[:3, 3]) - (v @ exact[:3, :3].T + exact[:3, 3]),
                                           axis=1).mean())
    fem = meshes["femur_left"].vertices
    T = moved["femur_left"]
    assert np.linalg.norm(fem @ T[:3, :3].T + T[:3, 3] - fem, axis=1).max() > 100.0  # the hip flexed
    print(f"bone error at hip_flexion: mean {np.mean(list(errs.values())):.1f} mm, femur_left "
          f"{errs['femur_left']:.1f} mm")
    assert errs["femur_left"] < 10.0
    ct_b = load_ct(tgt / "ct.nii.gz")
    scene = twin.posed_scene(pose_b, transl)
    from ctwin.core.twin.articulated import render_posed

    for name, g in default_views(ct_b, size=128).items():
        s = drr_similarity(render_posed(scene, g), render_drr(ct_b, g))
        print(f"mesh twin, hip_flexion, {name}: SSIM {s['ssim']:.4f} PSNR {s['psnr_db']:.2f} dB")
        assert s["ssim"] > 0.95 and s["psnr_db"] > 30.0
