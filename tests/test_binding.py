"""Binding: one bone per skeletal structure, vertebrae along the spine, soft weights; posing rigidity."""
import warnings

import numpy as np
import pytest

from ctwin.core.volumes.labels import joint_for_label
from ctwin.core.rig.binding import (SMOOTH, bind_structures, load_binding, save_binding,
                                spine_blend)
from ctwin.core.rig.pose import bone_deltas, check_joint_limits, joint_limit_violations, pose_meshes
from ctwin.core.body.skeleton import JOINT_INDEX, JOINT_NAMES, forward_kinematics, rotation_to_rotvec

from rig_synth import (REST_JOINTS_MM, FakeBodyModel, Mesh, acquisition_pose, best_rigid_deviation, box,
                       target_pose, truth_scene)

T_A = np.array([5.0, 150.0, -800.0])


@pytest.fixture(scope="module")
def twin():
    rng = np.random.default_rng(3)
    pa = acquisition_pose(rng)
    ja, _, meshes = truth_scene(pa, T_A)
    a, _ = forward_kinematics(pa, REST_JOINTS_MM)
    a[:, :3, 3] += T_A

    def place(v, j):
        return v @ a[j][:3, :3].T + a[j][:3, 3]

    # vertebrae along the canonical spine (rest y from -20 to 560), each posed with its segment
    chain = [0, 3, 6, 9, 12, 15]
    names = ["vertebrae_L5", "vertebrae_L3", "vertebrae_L1", "vertebrae_T11", "vertebrae_T8", "vertebrae_T5",
             "vertebrae_T2", "vertebrae_C6", "vertebrae_C3"]
    ys = np.linspace(20, 540, len(names))
    for n, y in zip(names, ys):
        seg = max(k for k in range(len(chain)) if REST_JOINTS_MM[chain[k], 1] <= y) if y > 0 else 0
        v, f = box((0, y, -30), (15, 8, 15))
        meshes[n] = Mesh(place(v, chain[seg]), f, n)
    # ribs: rib 8 follows vertebra T8 (segmented), rib 9 (no T9 here) the spine segment at its height
    for n, y in (("rib_left_8", 330.0), ("rib_right_9", 300.0)):
        v, f = box((60 if "left" in n else -60, y, -20), (40, 6, 10))
        meshes[n] = Mesh(place(v, 6), f, n)
    # a 13th rib (an anatomical variant no rule knows) beside the chest: nearest rigid neighbour
    # (clavicula_left)
    v, f = box((80, 400, 40), (10, 10, 10))
    meshes["rib_left_13"] = Mesh(place(v, 9), f, "rib_left_13")
    # the costal cartilages, beside it: their nearest bound neighbour's bone too (not the rule's spine2)
    v, f = box((80, 420, 45), (10, 8, 10))
    meshes["costal_cartilages"] = Mesh(place(v, 9), f, "costal_cartilages")
    # soft structures: a liver-like box in the trunk, a blob in the left forearm
    v, f = box((-60, 200, 30), (50, 40, 40), n=5)
    meshes["liver"] = Mesh(place(v, 6), f, "liver")
    mid_forearm = 0.5 * (REST_JOINTS_MM[18] + REST_JOINTS_MM[20])
    v, f = box(mid_forearm, (20, 20, 20), n=4)
    meshes["muscle"] = Mesh(place(v, 18), f, "muscle")
    fit = {"pose": pa, "betas": np.zeros(10), "transl_mm": T_A, "residual_mm": None, "joints_mm": ja}
    binding = bind_structures(meshes, FakeBodyModel(), fit)
    return dict(pa=pa, ja=ja, meshes=meshes, binding=binding, fit=fit)


def test_joint_rules():
    assert joint_for_label("femur_left") == "left_hip"
    assert joint_for_label("patella_right") == "right_knee"
    assert joint_for_label("phalanges_feet_left") == "left_foot"
    assert joint_for_label("metacarpal_right") == "right_wrist"
    assert joint_for_label("scapula_left") == "left_collar"
    assert joint_for_label("rib_right_7") == "spine2" and joint_for_label("rib_left_6") == "spine3"
    assert joint_for_label("sacrum") == "pelvis"
    assert joint_for_label("metatarsal_left") == "left_ankle" and joint_for_label("costal_cartilages") == "spine2"
    assert joint_for_label("vertebrae_C3") == "neck" and joint_for_label("vertebrae_T9") == "spine2"
    assert joint_for_label("vertebrae_L2") == "spine1" and joint_for_label("vertebrae_S1") == "pelvis"
    assert joint_for_label("liver") is None and joint_for_label("femur") is None
    assert joint_for_label("rib_left_13") is None


def test_binding_table(twin):
    b = twin["binding"]
    table = b.table()
    assert table["femur_left"] == "left_hip" and table["tibia_left"] == "left_knee"
    assert table["skull"] == "head" and table["hip_left"] == "pelvis"
    assert table["rib_left_13"] == "left_collar"  # its nearest rigid neighbour, the clavicle
    assert table["costal_cartilages"] == "left_collar"
    assert table["vertebrae_L3"] == "vertebrae_L3" and "vertebrae_L3" in b.bone_names()
    assert table["liver"] == SMOOTH and table["muscle"] == SMOOTH
    assert table["rib_left_8"] == "vertebrae_T8" and table["rib_right_9"] == "spine2"
    # every skeletal structure has exactly one bone
    for n in twin["meshes"]:
        assert (n in b.rigid) != (n in b.soft)


def test_spine_blend_weights():
    cum = np.array([0.0, 100.0, 230.0, 290.0, 500.0, 580.0])
    assert spine_blend(10.0, cum) == (0, 0, 0.0)
    lo, up, w = spine_blend(100.0, cum)  # at spine1: half pelvis segment, half spine1 segment
    assert (lo, up) == (0, 3) and abs(w - 50 / 115) < 1e-12
    lo, up, w = spine_blend(165.0, cum)  # middle of the spine1 segment: fully spine1
    assert (lo, up, w) == (3, 6, 0.0)


def test_soft_weights_transferred(twin):
    b = twin["binding"]
    fw = b.soft["muscle"].dense()
    assert np.allclose(fw.sum(1), 1, atol=1e-6)
    assert (fw[:, JOINT_INDEX["left_elbow"]] > 0.99).all()  # forearm blob takes the forearm's weights
    lw = b.soft["liver"].dense()
    arm = [JOINT_INDEX[n] for n in ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow")]
    assert lw[:, arm].max() == 0  # trunk tissue never takes arm weights


def test_posing_rigid_and_smooth(twin):
    b = twin["binding"]
    pb = target_pose(np.random.default_rng(4))
    tb = T_A + np.array([10.0, -20.0, 30.0])
    posed = pose_meshes(b, twin["meshes"], pb, tb)
    for n, m in posed.items():
        assert m.vertices.shape == twin["meshes"][n].vertices.shape
        if n in b.rigid:
            assert best_rigid_deviation(twin["meshes"][n].vertices, m.vertices) <= 1e-3, n
    # soft tissue in the forearm follows the forearm bone
    d = bone_deltas(b, pb, tb)["left_elbow"]
    v = twin["meshes"]["muscle"].vertices
    assert np.abs(posed["muscle"].vertices - (v @ d[:3, :3].T + d[:3, 3])).max() < 1e-6
    # the acquisition pose changes nothing
    same = pose_meshes(b, twin["meshes"], twin["pa"], T_A)
    for n, m in same.items():
        assert np.abs(m.vertices - twin["meshes"][n].vertices).max() < 1e-8


def test_spine_bends_smoothly(twin):
    """Vertebrae rotate progressively: no step larger than the spine joints' own rotations."""
    b = twin["binding"]
    p = twin["pa"].reshape(24, 3).copy()
    for j in (3, 6, 9, 12):
        p[j] += (0.3, 0.0, 0.0)
    bd = bone_deltas(b, p.reshape(72))
    order = sorted(b.vertebrae.values(), key=lambda v: (v.lower, v.w))
    ang = [np.linalg.norm(rotation_to_rotvec(bd[v.name][:3, :3])) for v in order]
    assert all(np.diff(ang) >= -1e-9)  # monotone increasing bend up the spine
    assert max(np.diff(ang)) < 0.3  # never a whole joint's kink between neighbours
    # each vertebra: rotation on the geodesic between its two segments', anchor lerped
    for v in order:
        da, db, t = bd[JOINT_NAMES[v.lower]], bd[JOINT_NAMES[v.upper]], bd[v.name]
        full = np.linalg.norm(rotation_to_rotvec(da[:3, :3].T @ db[:3, :3]))
        part = np.linalg.norm(rotation_to_rotvec(da[:3, :3].T @ t[:3, :3]))
        assert abs(part - v.w * full) < 1e-9
        c = v.anchor_mm
        lerp = (1 - v.w) * (da[:3, :3] @ c + da[:3, 3]) + v.w * (db[:3, :3] @ c + db[:3, 3])
        assert np.allclose(t[:3, :3] @ c + t[:3, 3], lerp, atol=1e-9)
    assert any(0 < v.w < 1 for v in order)


def test_save_load_roundtrip(twin, tmp_path):
    b = twin["binding"]
    save_binding(b, tmp_path / "binding.npz")
    b2 = load_binding(tmp_path / "binding.npz")
    assert b2.table() == b.table()
    pb = target_pose(np.random.default_rng(5))
    p1 = pose_meshes(b, twin["meshes"], pb)
    p2 = pose_meshes(b2, twin["meshes"], pb)
    for n in p1:
        assert np.abs(p1[n].vertices - p2[n].vertices).max() < 1e-6


def test_joint_limits_warn():
    from ctwin.core.rig.poses import PRESETS

    for name, preset in PRESETS.items():  # the project's own presets are anatomically plausible
        assert joint_limit_violations(preset) == [], name
    p = acquisition_pose().reshape(24, 3).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_joint_limits(p.reshape(72)) == []
    p[JOINT_INDEX["left_knee"], 0] = -1.0  # hyperextended knee
    p[JOINT_INDEX["spine2"]] = (0, 0, 1.5)
    with pytest.warns(UserWarning, match="left_knee"):
        bad = check_joint_limits(p.reshape(72))
    assert len(bad) == 2


# --- the pose command on a small twin directory built from the real (built-in) body model ---------
@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory):
    from ctwin.core.body.body_model import load_body_model
    from ctwin.core.fileio import write_json
    from ctwin.core.meshes.mesh import Mesh as CoreMesh
    from ctwin.core.meshes.mesh import write_ply
    from ctwin.core.rig.poses import PRESETS

    bm = load_body_model()
    pose = PRESETS["supine_arms_down"]
    transl = np.array([3.0, 120.0, -700.0])
    verts, joints = bm.forward(pose=pose, transl_mm=transl)
    _, rest_j = bm.rest()
    a, _ = forward_kinematics(pose, 1000.0 * rest_j)
    a[:, :3, 3] += transl
    d = tmp_path_factory.mktemp("twin")
    bones = {"femur_left": 1, "tibia_right": 5, "humerus_left": 16, "skull": 15, "vertebrae_L3": 3}
    for name, j in bones.items():
        child = {1: 4, 5: 8, 16: 18, 15: 15, 3: 6}[j]
        v, f = box(500.0 * (rest_j[j] + rest_j[child]), (12, 12, 12))
        write_ply(CoreMesh(v @ a[j][:3, :3].T + a[j][:3, 3], f, name), d / "meshes" / f"{name}.ply")
    write_ply(CoreMesh(verts, bm.faces, "skin"), d / "meshes" / "skin.ply")
    write_ply(CoreMesh(verts, bm.faces, "body_model"), d / "meshes" / "body_model.ply")
    fit = dict(pose=pose, betas=np.zeros(bm.num_betas), transl_mm=transl, residual_mm=np.zeros_like(bm.v_template),
               joints_mm=joints)
    np.savez(d / "fit.npz", **fit)
    from ctwin.core.meshes.mesh import read_mesh
    from ctwin.core.twin.twin import TWIN_FORMAT

    meshes = {p.name[:-4]: read_mesh(p) for p in (d / "meshes").glob("*.ply") if p.name != "body_model.ply"}
    binding = bind_structures(meshes, bm, fit)
    save_binding(binding, d / "binding.npz")
    write_json(d / "twin.json", {"format": TWIN_FORMAT, "body_model": {"path": str(bm.path), "builtin": True},
                                 "binding": binding.table(), "structures": sorted(set(meshes) - {"skin"})})
    return d, bm, transl


def test_pose_command_writes_posed_meshes(twin_dir, tmp_path):
    from ctwin.cli import main
    from ctwin.core.fileio import read_json
    from ctwin.core.meshes.mesh import read_mesh
    from ctwin.core.rig.poses import PRESETS

    d, bm, transl = twin_dir
    out = tmp_path / "posed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["pose", "--twin", str(d), "--pose", "knee_flexion", "--out", str(out)]) == 0
    names = {p.name for p in out.glob("*.ply")}
    assert names == {"femur_left.ply", "tibia_right.ply", "humerus_left.ply", "skull.ply", "vertebrae_L3.ply",
                     "skin.ply", "body_model.ply"}
    rec = read_json(out / "pose.json")
    assert rec["binding"]["tibia_right"] == "right_knee" and rec["binding"]["skin"] == SMOOTH
    target = PRESETS["knee_flexion"]
    # bones: rigid copies of the acquisition meshes, moved by the recorded transforms
    for n in ("femur_left", "tibia_right", "vertebrae_L3"):
        src = read_mesh(d / "meshes" / f"{n}.ply").vertices
        dst = read_mesh(out / f"{n}.ply").vertices
        t = np.asarray(rec["bones"][n])
        assert np.abs(src @ t[:3, :3].T + t[:3, 3] - dst).max() < 1e-2  # float32 PLY
        assert best_rigid_deviation(src, dst) < 1e-2
    tib = read_mesh(out / "tibia_right.ply").vertices
    src = read_mesh(d / "meshes" / "tibia_right.ply").vertices
    assert np.linalg.norm(tib.mean(0) - src.mean(0)) > 100  # the shank really moved (90 deg knee flexion)
    # body_model.ply: the fitted surface moved by the joint deltas, blended as dual quaternions
    # (Twin.posed_body): where one joint drives a vertex that is the body model's own LBS; in the
    # bent knees DQS keeps the flesh's volume where LBS collapses it, so they differ there only
    verts, _ = bm.forward(pose=target, transl_mm=transl)
    body = read_mesh(out / "body_model.ply").vertices
    single = np.asarray(bm.weights).max(axis=1) > 0.999
    assert single.mean() > 0.3
    assert np.abs(body[single] - verts[single]).max() < 1e-2
    blend_err = np.linalg.norm(body - verts, axis=1)
    print("body_model.ply (DQS) vs LBS (mm): p95 %.2f max %.2f" % (np.percentile(blend_err, 95), blend_err.max()))
    assert 0.1 < blend_err.max() < 40.0  # differs (knees bent 90 deg), but only by the blending
    # skin = the body surface itself: its transferred weights reproduce the body model's own LBS
    skin = read_mesh(out / "skin.ply").vertices
    err = np.linalg.norm(skin - verts, axis=1)
    print("skin vs body-model LBS (mm): median %.2f p95 %.2f max %.2f" % (np.median(err), np.percentile(err, 95), err.max()))
    assert err.max() < 1.0  # the surface takes back its own weights (top-4 truncation only)


def test_pose_command_errors(tmp_path, capsys):
    from ctwin.cli import main

    assert main(["pose", "--twin", str(tmp_path), "--pose", "sitting", "--out", str(tmp_path / "o")]) == 2
    assert "twin.json" in capsys.readouterr().err
