"""The built-in SMPL-format body model: file layout, surface, shape space, loading, LBS vs smplx."""
from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest

from ctwin.core.body import body_model as bm
from ctwin.core.errors import CtwinError
from ctwin.core.body.skeleton import JOINT_INDEX, JOINT_NAMES, PARENTS, kintree_table


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bm") / "SMPL_CTWIN_test.npz"
    bm.write_body_model(path)
    return path


@pytest.fixture(scope="module")
def model(model_file):
    return bm.load_body_model(model_file)


def winding_number(points, v, f):
    """Generalized winding number of points w.r.t. a closed triangle mesh (Van Oosterom)."""
    out = np.zeros(len(points))
    for i, p in enumerate(points):
        a, b, c = v[f[:, 0]] - p, v[f[:, 1]] - p, v[f[:, 2]] - p
        la, lb, lc = (np.linalg.norm(x, axis=1) for x in (a, b, c))
        det = np.einsum("ij,ij->i", a, np.cross(b, c))
        den = la * lb * lc + np.einsum("ij,ij->i", a, b) * lc + np.einsum("ij,ij->i", b, c) * la \
            + np.einsum("ij,ij->i", c, a) * lb
        out[i] = np.sum(2.0 * np.arctan2(det, den)) / (4.0 * np.pi)
    return out


def height(verts):
    return float(verts[:, 1].max() - verts[:, 1].min())


# ---------------------------------------------------------------------------------------------
def test_deterministic_default_path_and_pkl_twin(model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CTWIN_CACHE", str(tmp_path / "cache"))
    p = bm.default_body_model_path()
    assert p.suffix == ".npz" and p.parent.parent == tmp_path / "cache"
    assert p.name.startswith("SMPL_")  # smplx.create infers the model type from this prefix
    # generated twice (the module fixture and the cache): the same bytes
    assert p.read_bytes() == model_file.read_bytes()
    mtime = p.stat().st_mtime_ns
    assert bm.default_body_model_path() == p and p.stat().st_mtime_ns == mtime  # cached
    pkl = bm.default_body_model_path(".pkl")
    assert pkl.with_suffix(".npz") == p
    a, b = bm.load_body_model(p), bm.load_body_model(pkl)
    assert a.builtin and b.builtin and bm.load_body_model().path == p
    for key in ("v_template", "faces", "J_regressor", "weights", "posedirs", "shapedirs"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_file_layout(model_file):
    with np.load(model_file, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    nv = len(d["v_template"])
    assert 6890 < nv <= 10000  # above smplx's largest keypoint vertex id, SMPL-like size
    assert d["v_template"].shape == (nv, 3)
    assert d["f"].shape[1] == 3 and d["f"].max() == nv - 1
    assert d["J_regressor"].shape == (24, nv)
    assert d["weights"].shape == (nv, 24)
    assert d["posedirs"].shape == (nv, 3, 207)
    assert d["shapedirs"].shape == (nv, 3, 10)
    np.testing.assert_array_equal(d["kintree_table"], kintree_table())
    assert len(d["shape_names"]) == 10


def test_surface_watertight_outward_and_adult(model):
    import trimesh

    m = trimesh.Trimesh(model.v_template, model.faces, process=False)
    assert m.is_watertight and m.is_winding_consistent
    assert m.euler_number == 2 and len(m.split(only_watertight=False)) == 1  # one closed sphere
    assert m.volume > 0.05  # outward (positive) and adult-sized, in m^3 (~ litres / 1000)
    assert not np.any(m.area_faces < 1e-10)
    ext = m.extents
    assert 1.70 < height(model.v_template) < 1.80
    assert 1.70 < ext[0] < 1.95  # arm span of a T-pose
    assert 0.25 < ext[2] < 0.40  # front-back extent: body depth with the feet
    # canonical frame: feet at the bottom, flat soles, toes in front
    v = model.v_template
    sole = v[v[:, 1] < v[:, 1].min() + 0.003]
    assert len(sole) > 20 and np.ptp(sole[:, 2]) > 0.15
    j = model.rest()[1]
    assert j[JOINT_INDEX["left_foot"], 2] > j[JOINT_INDEX["left_ankle"], 2]
    # smplx's keypoint vertices sit at their landmarks
    kp = {n: v[i] for n, i in bm.SMPLX_KEYPOINT_IDS.items()}
    assert kp["nose"][2] > 0.1 and abs(kp["nose"][0]) < 0.01 and kp["nose"][1] > j[JOINT_INDEX["head"], 1]
    assert kp["lthumb"][0] > 0.7 and kp["rthumb"][0] < -0.7
    assert kp["LHeel"][2] < kp["LBigToe"][2] and kp["RHeel"][2] < kp["RBigToe"][2]


def test_joints_anatomical_and_inside(model):
    v, j = model.rest()
    np.testing.assert_allclose(j[0], 0.0, atol=1e-6)  # pelvis at the origin
    for name in JOINT_NAMES:
        if name.startswith("left_"):
            jl, jr = j[JOINT_INDEX[name]], j[JOINT_INDEX["right_" + name[5:]]]
            assert jl[0] > 0.02 and jr[0] < -0.02  # the collars sit at the sternoclavicular joints
            np.testing.assert_allclose(jl * [-1, 1, 1], jr, atol=1e-3)  # symmetric
    y = {n: j[JOINT_INDEX[n], 1] for n in JOINT_NAMES}
    assert y["left_ankle"] < y["left_knee"] < y["left_hip"] < y["pelvis"] < y["spine1"] < y["spine2"] \
        < y["spine3"] < y["neck"] < y["head"]
    thigh = np.linalg.norm(j[JOINT_INDEX["left_knee"]] - j[JOINT_INDEX["left_hip"]])
    upper_arm = np.linalg.norm(j[JOINT_INDEX["left_elbow"]] - j[JOINT_INDEX["left_shoulder"]])
    assert 0.36 < thigh < 0.46 and 0.25 < upper_arm < 0.33
    # every joint lies inside the body, at rest and for extreme shapes
    rng = np.random.default_rng(1)
    for betas in [None, *rng.uniform(-3, 3, size=(3, 10))]:
        vs, js = model.rest(betas)
        wn = winding_number(js, vs, model.faces)
        assert np.all(wn > 0.5), (betas, [JOINT_NAMES[i] for i in np.flatnonzero(wn <= 0.5)])


def test_regressor_and_weights(model):
    jr, w = model.J_regressor, model.weights
    assert jr.min() >= 0 and np.allclose(jr.sum(axis=1), 1.0)
    assert (jr > 0).sum(axis=1).min() >= 4  # spread over the vertices around each joint
    v, j = model.rest()
    designed = bm._rest_joints()
    np.testing.assert_allclose(j, designed, atol=1e-5)
    assert w.min() >= 0 and np.allclose(w.sum(axis=1), 1.0)
    nnz = (w > 0).sum(axis=1)
    assert nnz.max() <= 6 and np.mean(nnz <= 3) > 0.9
    # the dominant joint is the body part: finger tips -> hand, heels -> ankle, nose -> head
    dom = np.argmax(w, axis=1)
    for kp, joint in [("lindex", "left_hand"), ("rmiddle", "right_hand"), ("LHeel", "left_ankle"),
                      ("RHeel", "right_ankle"), ("nose", "head")]:
        assert dom[bm.SMPLX_KEYPOINT_IDS[kp]] == JOINT_INDEX[joint], kp
    # left limbs never take weight from right limbs
    lx = v[:, 0] > 0.12
    right = [i for i, n in enumerate(JOINT_NAMES) if n.startswith("right_")]
    assert w[np.ix_(lx, right)].max() == 0
    # regressed joints follow the shape space (the designed joints move with the bones)
    rng = np.random.default_rng(2)
    for betas in rng.uniform(-2, 2, size=(3, 10)):
        want = designed + sum(b * bm._shape_joint_offsets(bm._shape_component(k, designed), designed)
                              for k, b in enumerate(betas))
        assert np.abs(model.rest(betas)[1] - want).max() < 0.01


def test_shape_space_spans_height_and_proportions(model):
    def rest(**kw):
        b = np.zeros(10)
        for name, val in kw.items():
            b[bm.SHAPE_NAMES.index(name)] = val
        return model.rest(b)

    def dist(j, a, b):
        return np.linalg.norm(j[JOINT_INDEX[a]] - j[JOINT_INDEX[b]])

    assert height(rest(stature=-3)[0]) <= 1.505 and height(rest(stature=3)[0]) >= 1.95
    h0 = height(model.v_template)
    j0 = model.rest()[1]

    import trimesh

    def volume(vv):
        return trimesh.Trimesh(vv, model.faces, process=False).volume

    assert volume(rest(girth=2)[0]) > 1.2 * volume(model.v_template) > 1.44 * volume(rest(girth=-2)[0])
    j = rest(shoulder_width=2)[1]
    assert dist(j, "left_shoulder", "right_shoulder") > dist(j0, "left_shoulder", "right_shoulder") + 0.04
    j = rest(hip_width=2)[1]
    assert dist(j, "left_hip", "right_hip") > dist(j0, "left_hip", "right_hip") + 0.015
    vv, j = rest(arm_length=2)
    assert dist(j, "left_wrist", "left_shoulder") > 1.07 * dist(j0, "left_wrist", "left_shoulder")
    assert abs(height(vv) - h0) < 0.005
    vv, j = rest(leg_length=2)
    assert dist(j, "left_ankle", "left_hip") > 1.08 * dist(j0, "left_ankle", "left_hip")
    assert abs(height(vv) - h0) < 0.03  # a ratio: the trunk shortens
    vv, j = rest(torso_length=2)
    assert dist(j, "neck", "pelvis") > 1.08 * dist(j0, "neck", "pelvis") and height(vv) > h0 + 0.04
    vv, _ = rest(head_size=2)
    assert height(vv) > h0 + 0.015
    vv, _ = rest(belly=2)
    front = (np.abs(model.v_template[:, 1] - j0[JOINT_INDEX["spine1"], 1]) < 0.03)
    assert vv[front, 2].max() > model.v_template[front, 2].max() + 0.015
    # any shape stays a closed, outward surface of positive volume
    for betas in np.random.default_rng(3).uniform(-3, 3, size=(3, 10)):
        assert volume(model.rest(betas)[0]) > 0.02


@pytest.mark.parametrize("via", ["pkl", "npz"])
def test_smplx_forward_matches(model, model_file, tmp_path, via):
    torch = pytest.importorskip("torch")
    smplx = pytest.importorskip("smplx")
    if via == "pkl":  # smplx reads a plain pickle from model_path directly
        pkl = tmp_path / "SMPL_CTWIN.pkl"
        bm._write_arrays(pkl, bm._read_model_file(model_file))
        sm = smplx.create(str(pkl), num_betas=10, dtype=torch.float64, batch_size=3)
        ours = bm.load_body_model(pkl)
    else:  # smplx's SMPL reads only pickles: the .npz goes in as data_struct
        sm = model.to_smplx(dtype=torch.float64, batch_size=3)
        ours = model
    assert sm.num_betas == 10 and sm.v_template.shape[0] == len(ours.v_template)
    rng = np.random.default_rng(0)
    betas = rng.uniform(-2.5, 2.5, size=(3, 10))
    pose = rng.normal(scale=0.5, size=(3, 72))
    transl = rng.normal(scale=300.0, size=(3, 3))
    out = sm(betas=torch.tensor(betas), global_orient=torch.tensor(pose[:, :3]),
             body_pose=torch.tensor(pose[:, 3:]), transl=torch.tensor(transl / 1000.0))
    for i in range(3):
        v, j = ours.forward(pose[i], betas[i], transl[i])
        assert np.abs(out.vertices[i].detach().numpy() * 1000.0 - v).max() < 1e-3  # < 1e-6 m
        assert np.abs(out.joints[i, :24].detach().numpy() * 1000.0 - j).max() < 1e-3
        assert np.abs(v - 1000.0 * ours.v_template - transl[i]).max() > 50  # it did move


def test_forward_rest_residual_and_skinning(model):
    t = np.array([10.0, -20.0, 30.0])
    v, j = model.forward(transl_mm=t)
    np.testing.assert_allclose(v, 1000 * model.v_template + t, atol=1e-9)
    res = np.zeros_like(model.v_template)
    res[:10] = [0.0, 0.0, 5.0]
    v2, j2 = model.forward(transl_mm=t, residual_mm=res)
    np.testing.assert_allclose(v2 - v, res, atol=1e-9)
    np.testing.assert_allclose(j2, j)
    # a posed vertex bound fully to one joint moves by that joint's skinning transform
    pose = np.random.default_rng(4).normal(scale=0.4, size=72)
    betas = np.linspace(-1, 1, 10)
    a = model.skinning(pose, betas)
    vp, jp = model.forward(pose, betas, transl_mm=t)
    vs, _ = model.rest(betas)
    i = int(np.flatnonzero(model.weights[:, JOINT_INDEX["head"]] == 1.0)[0])
    np.testing.assert_allclose(vp[i], a[JOINT_INDEX["head"], :3, :3] @ (1000 * vs[i])
                               + a[JOINT_INDEX["head"], :3, 3] + t, atol=1e-6)
    # bones keep their lengths
    js = model.rest(betas)[1]
    for c in range(1, 24):
        np.testing.assert_allclose(np.linalg.norm(jp[c] - jp[PARENTS[c]]),
                                   1000 * np.linalg.norm(js[c] - js[PARENTS[c]]), rtol=1e-9)
    with pytest.raises(CtwinError):
        model.forward(np.zeros(10))
    with pytest.raises(CtwinError):
        model.rest(np.zeros(11))


def test_pkl_with_plain_numpy_and_sparse_loads(model, tmp_path):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    d = {k: v for k, v in model.arrays().items()}
    d["J_regressor"] = scipy_sparse.csc_matrix(d["J_regressor"])  # as in SMPL's own files
    d["bs_style"] = "lbs"
    path = tmp_path / "user_model.pkl"
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    m = bm.load_body_model(path)
    assert not m.builtin and m.num_betas == 10
    np.testing.assert_array_equal(m.J_regressor, model.J_regressor)
    pose = np.random.default_rng(5).normal(scale=0.3, size=72)
    np.testing.assert_allclose(m.forward(pose, np.ones(10))[0], model.forward(pose, np.ones(10))[0])


def test_pkl_with_chumpy_arrays_without_chumpy(model, tmp_path, monkeypatch):
    """A pickled chumpy array is read from its state; an unreadable one asks for an .npz."""
    if "chumpy" in sys.modules:
        pytest.skip("chumpy is installed")
    mod, sub = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:  # what chumpy pickles: the class and a state dict holding the array as 'x'
        def __init__(self, x):
            self.x = x

        def __getstate__(self):
            return {"x": self.x, "_dirty_vars": set()}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    sub.Ch = Ch
    monkeypatch.setitem(sys.modules, "chumpy", mod)
    monkeypatch.setitem(sys.modules, "chumpy.ch", sub)
    d = dict(model.arrays())
    d["shapedirs"] = Ch(d["shapedirs"])
    path = tmp_path / "chumpy_model.pkl"
    path.write_bytes(pickle.dumps(d, protocol=2))
    d["shapedirs"] = Ch(None)
    bad = tmp_path / "bad_chumpy.pkl"
    bad.write_bytes(pickle.dumps(d, protocol=2))
    monkeypatch.delitem(sys.modules, "chumpy")
    monkeypatch.delitem(sys.modules, "chumpy.ch")
    m = bm.load_body_model(path)
    np.testing.assert_array_equal(m.shapedirs, model.shapedirs)
    with pytest.raises(CtwinError, match="npz"):
        bm.load_body_model(bad)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(CtwinError, match="not found"):
        bm.load_body_model(tmp_path / "missing.npz")
    p = tmp_path / "x.npz"
    np.savez(p, v_template=np.zeros((5, 3)))
    with pytest.raises(CtwinError, match="missing"):
        bm.load_body_model(p)
    p = tmp_path / "junk.pkl"
    p.write_bytes(b"not a pickle at all")
    with pytest.raises(CtwinError):
        bm.load_body_model(p)
    p = tmp_path / "model.obj"
    p.write_text("v 0 0 0\n")
    with pytest.raises(CtwinError, match=r"\.npz or \.pkl"):
        bm.load_body_model(p)
    with pytest.raises(CtwinError):
        bm.write_body_model(tmp_path / "model.obj")


def test_rest_skeleton_shared_with_the_phantom(model):
    """One canonical rest convention: the body model's rest bones point exactly as the phantom's
    (any seed: the phantom scales segments, never turns them), and the phantom's spine joints sit
    on its intervertebral discs."""
    from ctwin.core.phantom import anatomy
    from ctwin.core.body.skeleton import PARENTS, canonical_joints_mm

    _, j = model.rest()
    for seed in (0, 3):
        ja = anatomy.build_anatomy(seed).joints
        for i in range(1, len(JOINT_NAMES)):
            u, w = j[i] - j[PARENTS[i]], ja[i] - ja[PARENTS[i]]
            cos = u @ w / np.linalg.norm(u) / np.linalg.norm(w)
            assert cos > np.cos(np.radians(0.1)), (seed, JOINT_NAMES[i], np.degrees(np.arccos(min(cos, 1.0))))
    _, discs = anatomy._spine_layout()
    ja = anatomy.build_anatomy(0).joints
    for joint, disc in (("spine1", ("L4", "L3")), ("spine2", ("L1", "T12")), ("spine3", ("T7", "T6")),
                        ("neck", ("T1", "C7"))):
        np.testing.assert_allclose(ja[JOINT_INDEX[joint]] - ja[0], discs[disc] - canonical_joints_mm()[0], atol=1e-6)


def test_lbs_on_a_vertex_subset_with_sparse_weights_matches_forward(model):
    """``lbs`` on a vertex subset with sparse weights (the fit's fast path) gives the vertices of
    ``BodyModel.forward``."""
    import scipy.sparse as sp

    rng = np.random.default_rng(5)
    pose = rng.normal(0.0, 0.3, 72)
    betas = rng.normal(0.0, 1.0, model.num_betas)
    full, joints = model.forward(pose, betas)
    idx = np.sort(rng.choice(len(model.v_template), 500, replace=False))
    v_shaped, joints_rest = model.rest(betas)
    verts, jp, _, _ = bm.lbs(pose, v_shaped[idx], joints_rest, model.posedirs[idx].reshape(-1, 207),
                             sp.csr_matrix(model.weights[idx]), model.parents)
    np.testing.assert_allclose(1000.0 * verts, full[idx], atol=1e-9)
    np.testing.assert_allclose(1000.0 * jp, joints, atol=1e-9)
