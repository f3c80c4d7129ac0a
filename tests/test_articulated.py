"""Volumetric articulated CT: decomposition, posing, inverse warp, rendering."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctwin.core.twin import articulated as A
from ctwin.core.errors import CtwinError
from ctwin.core.volumes.labels import all_names, name_to_id
from ctwin.core.body.skeleton import JOINT_INDEX, rodrigues
from ctwin.core.volumes.volume import Volume, affine_from


def _similarity(test, ref):
    try:
        from ctwin.core.meshes.metrics import drr_similarity
    except ImportError:  # SPEC 6 formula
        from skimage.metrics import structural_similarity

        a = np.clip(test / ref.max(), 0, 1)
        b = np.clip(ref / ref.max(), 0, 1)
        return {"ssim": structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False),
                "psnr_db": 10 * np.log10(1 / max(np.mean((a - b) ** 2), 1e-30))}
    return drr_similarity(test, ref)


def _rot_about(rotvec, center):
    t = np.eye(4)
    r = rodrigues(np.asarray(rotvec, dtype=np.float64))
    t[:3, :3] = r
    t[:3, 3] = np.asarray(center) - r @ np.asarray(center)
    return t


def synthetic_ct(femur_T=None, spacing=2.0, seed=0):
    """A small leg-like CT (LPS, 2 mm): textured soft tissue with a fat layer, a femur and a tibia
    (cortex + textured marrow), a hip blob, a table slab below. ``femur_T`` (4x4) places the femur
    moved rigidly (evaluated analytically: the ground truth for a moved bone)."""
    rng = np.random.default_rng(seed)
    shape = (40, 36, 60)
    aff = affine_from([spacing] * 3, [-40.0, -40.0, -60.0])
    P = Volume(np.zeros(shape, np.int16), aff).voxel_centers_world().reshape(shape + (3,))
    tex = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5) * 60
    noise = rng.normal(0, 5, shape)
    ids = name_to_id()

    def moved(T):
        if T is None:
            return P, tex
        inv = np.linalg.inv(T)
        Q = P @ inv[:3, :3].T + inv[:3, 3]
        idx = (Q - aff[:3, 3]) / spacing
        t = ndimage.map_coordinates(tex, idx.reshape(-1, 3).T, order=1, mode="nearest").reshape(shape)
        return Q, t

    x, y, z = P[..., 0], P[..., 1], P[..., 2]
    hu = np.full(shape, -1000.0)
    lab = np.zeros(shape, np.uint16)
    e = (x / 30) ** 2 + (y / 24) ** 2
    body = e <= 1.0
    hu[body] = 40 + tex[body]
    fat = body & (e > 0.75)
    hu[fat] = -100 + 0.3 * tex[fat]

    def bone(Q, t, inside, inner, name):
        hu[inside] = 1200
        hu[inner] = 400 + t[inner]
        lab[inside] = ids[name]

    Q, t = moved(femur_T)
    r2 = (Q[..., 0] - 5) ** 2 + Q[..., 1] ** 2
    zf = Q[..., 2]
    bone(Q, t, (r2 <= 64) & (zf > 2) & (zf < 48), (r2 <= 30) & (zf > 4) & (zf < 46), "femur_left")
    r2 = (x - 5) ** 2 + y ** 2
    bone(P, tex, (r2 <= 49) & (z < -4) & (z > -52), (r2 <= 25) & (z < -6) & (z > -50), "tibia_left")
    d2 = (x + 15) ** 2 + (y - 5) ** 2 + (z - 30) ** 2
    bone(P, tex, d2 <= 81, d2 <= 36, "hip_left")
    table = (y > 28) & (y < 34)
    hu[table] = 150
    lab[table] = ids["table"]
    ct = Volume(np.clip(np.rint(hu + noise), -1024, 3000).astype(np.int16), aff)
    seg = Volume(lab, aff.copy())
    names = {int(i): all_names()[int(i)] for i in np.unique(lab) if i}
    return ct, seg, names


def _geom(parallel=True, size=(40, 64), axis="ap"):
    from ctwin.core.drr.carm import Geometry

    if axis == "ap":
        return Geometry([0, -1000, 0], [0, 500, 0], [1, 0, 0], [0, 0, -1], (2.0, 2.0), size, parallel)
    return Geometry([-1000, 0, 0], [500, 0, 0], [0, 1, 0], [0, 0, -1], (2.0, 2.0), size, parallel)


@pytest.fixture(scope="module")
def synth():
    ct, seg, names = synthetic_ct()
    art = A.prepare_articulated(ct, seg, names, weight_spacing_mm=4.0)
    return ct, seg, names, art


def test_decomposition_partitions_the_ct(synth):
    ct, seg, names, art = synth
    kinds = {p.name: p.kind for p in art.parts}
    assert kinds == {"femur_left": "bone", "tibia_left": "bone", "hip_left": "bone", "static": "static"}
    owner = np.zeros(ct.shape, np.int32)
    for i, p in enumerate(art.parts):
        sl = tuple(slice(o, o + n) for o, n in zip(p.offset_on(art.affine), p.data.shape))
        np.testing.assert_array_equal(p.data, ct.data[sl])  # crops carry the real CT
        assert not np.any((owner[sl] > 0) & (p.mask > 0)), "part masks overlap"
        owner[sl][p.mask > 0] = i + 1
    lid = name_to_id()
    for i, p in enumerate(art.parts):  # every label voxel belongs to its own part
        label = lid["table"] if p.kind == "static" else lid[p.name]
        assert np.all(owner[seg.data == label] == i + 1)
        # the rim: the mask is larger than the label (partial-volume edge travels with the bone)
        if p.kind == "bone":
            assert p.mask.sum() > (seg.data == label).sum() * 1.2
    # soft tissue = CT except strictly inside the masks, where bones are replaced by tissue
    interior = ndimage.binary_erosion(owner > 0, np.ones((3, 3, 3), bool), border_value=1)
    np.testing.assert_array_equal(art.soft[~interior], ct.data[~interior])
    bone_vox = np.isin(seg.data, [lid["femur_left"], lid["tibia_left"]]) & interior
    assert art.soft[bone_vox].max() < 300, "bone left a ghost in the soft tissue"
    assert abs(np.median(art.soft[bone_vox]) - 40) < 60
    # weights: channels = joints of the bones, normalised, femur region -> left_hip
    assert set(art.weight_joints.tolist()) == {JOINT_INDEX["left_hip"], JOINT_INDEX["left_knee"],
                                               JOINT_INDEX["pelvis"]}
    np.testing.assert_allclose(art.weights.sum(-1), 1, atol=1e-5)
    c = np.rint(np.linalg.solve(art.weight_affine, [5, 0, 25, 1])[:3]).astype(int)
    ch = list(art.weight_joints).index(JOINT_INDEX["left_hip"])
    assert art.weights[tuple(c)][ch] > 0.95


def test_identity_pose_reproduces_the_ct_exactly(synth, tmp_path):
    ct, seg, names, art = synth
    art.save(tmp_path)
    art2 = A.ArticulatedCT.load(tmp_path)
    assert art2.soft.dtype == np.int16 and art2.parts[0].mask.dtype == np.uint8
    assert np.load(tmp_path / "articulated.npz")["weights"].dtype == np.float16
    for a in (art, art2):
        scene = A.posed_scene(a, {}, np.tile(np.eye(4), (24, 1, 1)))
        assert scene.warp is None
        vol = A.compose_volume(scene)
        assert vol.shape == ct.shape and np.allclose(vol.affine, ct.affine)
        np.testing.assert_array_equal(vol.data, ct.data.astype(np.float32))  # voxel for voxel
    # between voxel centres too (trilinear field), at random points
    rng = np.random.default_rng(3)
    lo, hi = ct.bbox_world()
    pts = lo - 2 + rng.random((100_000, 3)) * (hi - lo + 4)
    np.testing.assert_allclose(A.sample_scene(scene, pts), A.sample_scene(A.static_scene(ct), pts), atol=1e-3)
    # and through the renderers: the projector's scene kernel vs its static kernel, the reference
    g = _geom(parallel=False, axis="lat")
    from ctwin.core.drr.projector import render_drr

    ref = render_drr(ct, g, device="cpu")
    img = A.render_posed(scene, g, device="cpu")  # composed: the CT itself, through the static kernel
    np.testing.assert_array_equal(img, ref)
    img_k = A.render_posed(scene, g, device="cpu", backend="projector")  # the per-sample scene kernel
    np.testing.assert_allclose(img_k, ref, rtol=1e-5, atol=1e-5)
    img_ref = A.render_posed(scene, g, backend="reference", step_mm=0.5)
    np.testing.assert_allclose(img_ref, ref, atol=0.02 * ref.max())
    s = _similarity(img, ref)
    assert s["ssim"] > 0.9999 and s["psnr_db"] > 80


def test_moved_bone_matches_a_ct_built_with_the_bone_moved(synth):
    ct, seg, names, art = synth
    T = _rot_about([np.radians(4.0), np.radians(12.0), np.radians(20.0)], [5.0, 0.0, 2.0])
    T[:3, 3] += [1.3, -2.7, 3.1]
    truth_ct, _, _ = synthetic_ct(femur_T=T)
    scene = A.posed_scene(art, {"femur_left": T})
    assert scene.warp is None  # no joint deltas: the soft tissue stays
    vol = A.compose_volume(scene)
    assert vol.shape == ct.shape  # the moved femur stays inside the CT box
    # the moved marrow texture lands where the truth has it (its core: the 1-voxel cortex blurs
    # when resampled off-grid, which the DRR comparison below covers)
    core = _label_mask(truth_ct, T, radius=4.0)
    err_core = np.abs(vol.data[core] - truth_ct.data[core]).mean()
    err_unmoved = np.abs(ct.data[core] - truth_ct.data[core]).mean()
    assert core.sum() > 80 and err_core < 15 and err_unmoved > 3 * err_core, (err_core, err_unmoved)
    # the vacated place holds tissue, not bone, in the posed scene
    vacated = (seg.data == name_to_id()["femur_left"]) & ~_label_mask(truth_ct, T, dilate=2)
    assert vacated.sum() > 50 and vol.data[vacated].max() < 300
    for axis in ("ap", "lat"):
        g = _geom(parallel=False, axis=axis)
        img = A.render_posed(scene, g, device="cpu")
        from ctwin.core.drr.projector import render_drr

        ref = render_drr(truth_ct, g, device="cpu")
        moved_nowhere = render_drr(ct, g, device="cpu")
        s = _similarity(img, ref)
        s0 = _similarity(moved_nowhere, ref)
        print(f"moved femur {axis}: ssim {s['ssim']:.4f} psnr {s['psnr_db']:.1f} dB "
              f"(unmoved CT: ssim {s0['ssim']:.4f} psnr {s0['psnr_db']:.1f})")
        assert s["ssim"] > 0.95 and s["psnr_db"] > 33
        assert s["psnr_db"] > s0["psnr_db"] + 6 and s["ssim"] > s0["ssim"] + 0.05


def _label_mask(ct, T, dilate=0, radius=8.0):
    """The analytic femur of ``synthetic_ct(femur_T=T)`` (``radius`` < 8: its core)."""
    P = ct.voxel_centers_world().reshape(ct.shape + (3,))
    inv = np.linalg.inv(T)
    Q = P @ inv[:3, :3].T + inv[:3, 3]
    r2 = (Q[..., 0] - 5) ** 2 + Q[..., 1] ** 2
    e = 8.0 - radius
    m = (r2 <= radius ** 2) & (Q[..., 2] > 2 + e) & (Q[..., 2] < 48 - e)
    return ndimage.binary_dilation(m, iterations=dilate) if dilate else m


def _knee_flexion(deg=30.0):
    jd = np.tile(np.eye(4), (24, 1, 1))
    jd[JOINT_INDEX["left_knee"]] = _rot_about([np.radians(deg), 0, 0], [5.0, 0.0, 0.0])
    return jd


def test_inverse_warp_inverts_the_forward_skinning(synth):
    ct, seg, names, art = synth
    jd = _knee_flexion(30.0)
    scene = A.posed_scene(art, {}, jd, warp_spacing_mm=4.0)
    assert scene.info["residual_mm_max"] < 0.5 and scene.info["unconverged_fraction"] == 0
    # at the grid nodes: forward LBS of the recovered rest point returns the posed point
    warp, waff = scene.warp
    n = warp.shape[:3]
    nodes = np.indices(n).reshape(3, -1).T @ waff[:3, :3].T + waff[:3, 3]
    rest = nodes + warp.reshape(-1, 3)
    fin = np.all(np.isfinite(rest), axis=1)  # air nodes are NaN
    idx = np.zeros(rest.shape, int)
    idx[fin] = np.rint(ct.world_to_index(rest[fin])).astype(int)
    ok = fin & np.all((idx >= 0) & (idx < ct.shape), axis=1)
    body = np.zeros(len(rest), bool)
    body[ok] = ct.data[tuple(idx[ok].T)] > -500  # nodes that carry tissue (air nodes may be skipped)
    err = np.linalg.norm(A.forward_lbs(art, rest[body], jd) - nodes[body], axis=1)
    assert body.sum() > 1000 and err.max() < 0.5
    # between nodes (trilinear displacement), inside the posed body
    rng = np.random.default_rng(0)
    # (the table is a static part: the warp need not carry it, the composition pastes it in place)
    rest_pts = ct.voxel_centers_world((ct.data > -500) & (seg.data != name_to_id()["table"]))
    rest_pts = rest_pts[rng.choice(len(rest_pts), 5000, replace=False)]
    posed = A.forward_lbs(art, rest_pts, jd)
    back = A.sample_warp(scene, posed)
    e = np.linalg.norm(A.forward_lbs(art, back, jd) - posed, axis=1)
    print(f"inverse warp between nodes: median {np.median(e):.3f} mm, p95 {np.percentile(e, 95):.3f}, "
          f"max {e.max():.2f}")
    assert np.median(e) < 0.1 and np.percentile(e, 95) < 0.5
    # far from the knee the tissue moves exactly with its bone: shank tissue rigidly with the tibia
    shank = np.array([[5.0, 15.0, -40.0], [-10.0, 0.0, -45.0]])
    np.testing.assert_allclose(A.forward_lbs(art, shank, jd), shank @ jd[4][:3, :3].T + jd[4][:3, 3], atol=1e-6)


def test_posed_knee_renders_bones_rigid_and_table_static(synth):
    ct, seg, names, art = synth
    jd = _knee_flexion(-25.0)  # shank swings anteriorly, away from the table
    bd = {"tibia_left": jd[JOINT_INDEX["left_knee"]]}
    scene = A.posed_scene(art, bd, jd)
    vol = A.compose_volume(scene)
    # the table stays exactly where it was, voxel for voxel (the grid may grow around it)
    table = seg.data == name_to_id()["table"]
    shift = np.rint(np.linalg.solve(vol.affine, ct.affine)[:3, 3]).astype(int)
    sl = tuple(slice(s, s + n) for s, n in zip(shift, ct.shape))
    np.testing.assert_array_equal(vol.data[sl][table], ct.data[table].astype(np.float32))
    # the tibia's marrow sits at its transformed place: sample the posed scene at moved voxels
    tib = ndimage.binary_erosion(seg.data == name_to_id()["tibia_left"], iterations=1)
    pts = ct.voxel_centers_world(tib)
    T = bd["tibia_left"]
    np.testing.assert_allclose(A.sample_scene(scene, pts @ T[:3, :3].T + T[:3, 3]), ct.data[tib], atol=1e-2)
    # the femur did not move
    fem = seg.data == name_to_id()["femur_left"]
    np.testing.assert_allclose(A.sample_scene(scene, ct.voxel_centers_world(fem)), ct.data[fem], atol=1e-3)
    # the per-sample scene kernel and the reference ray marcher agree on the posed scene
    g = _geom(parallel=True, axis="lat")
    ref = A.render_posed(scene, g, backend="reference", step_mm=0.5)
    s = _similarity(A.render_posed(scene, g, device="cpu", backend="projector"), ref)
    assert s["ssim"] > 0.99 and s["psnr_db"] > 40, s
    # the composed frame (the default) nearly: it resamples the moved tibia once (about a voxel of
    # smoothing at its edges), and where the grid grows past the CT's faces (here the shank leaves
    # the bottom face) their outer half-voxel is blurred; these rays run exactly along faces
    s = _similarity(A.render_posed(scene, g, device="cpu"), ref)
    assert s["ssim"] > 0.99 and s["psnr_db"] > 30, s


def test_joint_deltas_between_two_poses_match_forward_kinematics():
    from ctwin.core.body.skeleton import SUPINE_GLOBAL_ORIENT, forward_kinematics

    rng = np.random.default_rng(1)
    rest = rng.normal(0, 200, (24, 3))
    pa = np.concatenate([SUPINE_GLOBAL_ORIENT, rng.normal(0, 0.2, 69)])
    pb = np.concatenate([SUPINE_GLOBAL_ORIENT, rng.normal(0, 0.2, 69)])
    ta, tb = np.array([3.0, 5, 7]), np.array([-20.0, 4, 11])
    Aa, ja = forward_kinematics(pa, rest)
    Ab, jb = forward_kinematics(pb, rest)
    D = A.joint_deltas_between(pa, ja + ta, pb, jb + tb)
    Wa, Wb = Aa.copy(), Ab.copy()
    Wa[:, :3, 3] += ta
    Wb[:, :3, 3] += tb
    np.testing.assert_allclose(D, Wb @ np.linalg.inv(Wa), atol=1e-8)


@pytest.fixture(scope="module")
def phantom_6mm():
    """The phantom at supine_arms_down (6 mm) and its articulated CT."""
    phantom = pytest.importorskip("ctwin.core.phantom.phantom")
    pa = phantom.generate_phantom("supine_arms_down", spacing=6.0)
    return pa, A.prepare_articulated(pa.ct, pa.seg, pa.labels)


def _posed_to(phantom_6mm, preset):
    """(the phantom generated at ``preset``, the articulated phantom posed there with the truth's
    bone transforms and joint deltas)."""
    from ctwin.core.phantom import phantom

    pa, art = phantom_6mm
    pb = phantom.generate_phantom(preset, spacing=6.0)
    ta, tb = pa.truth, pb.truth
    bd = {n: np.asarray(tb["bones"][n]) @ np.linalg.inv(np.asarray(ta["bones"][n]))
          for n in tb["bones"] if n in ta["bones"]}
    jd = A.joint_deltas_between(ta["pose"], ta["joints"], tb["pose"], tb["joints"])
    return pb, A.posed_scene(art, bd, jd)


def test_phantom_posed_to_another_preset_matches_the_phantom_at_that_pose(phantom_6mm):
    from ctwin.core.drr.carm import default_views
    from ctwin.core.drr.projector import render_drr

    pa, art = phantom_6mm
    pb, scene = _posed_to(phantom_6mm, "knee_flexion")
    ident = A.posed_scene(art, {}, np.tile(np.eye(4), (24, 1, 1)))
    for name, g in default_views(pa.ct.bbox_world(), size=96).items():
        ref = render_drr(pb.ct, g, device="cpu")
        s = _similarity(A.render_posed(scene, g, device="cpu"), ref)
        s0 = _similarity(render_drr(pa.ct, g, device="cpu"), ref)  # not posed at all
        print(f"phantom knee_flexion {name}: ssim {s['ssim']:.4f} psnr {s['psnr_db']:.1f} dB "
              f"(unposed: {s0['ssim']:.4f} / {s0['psnr_db']:.1f})")
        assert s["ssim"] >= 0.8 and s["psnr_db"] > s0["psnr_db"]
        acq = _similarity(A.render_posed(ident, g, device="cpu"), render_drr(pa.ct, g, device="cpu"))
        assert acq["ssim"] >= 0.995 and acq["psnr_db"] >= 45


def test_abducted_arm_leaves_no_web_of_stretched_tissue(phantom_6mm):
    """Abducting an arm opens a gap beside the torso. Skinning would reach the gap's warp nodes only
    by stretching the tissue between arm and hip across it (a bright web in the AP view: PSNR 31.2
    dB here before nodes whose best pre-image misses them by 2.5 node spacings became air). The
    phantom at that pose has air there."""
    from ctwin.core.drr.carm import default_views
    from ctwin.core.drr.projector import render_drr

    pa, art = phantom_6mm
    pb, scene = _posed_to(phantom_6mm, "arm_abducted")
    assert scene.info["air_miss_mm"] == pytest.approx(2.5 * 6.0)
    with pytest.raises(CtwinError, match="air_miss_mm"):
        A.posed_scene(art, air_miss_mm=0.0)
    g = default_views(pa.ct.bbox_world(), size=96)["ap"]
    s = _similarity(A.render_posed(scene, g, device="cpu"), render_drr(pb.ct, g, device="cpu"))
    print(f"phantom arm_abducted ap: ssim {s['ssim']:.4f} psnr {s['psnr_db']:.1f} dB")
    assert s["ssim"] >= 0.995 and s["psnr_db"] >= 36.0, s


def test_composed_frame_follows_the_rule_and_is_reused(synth):
    """The composed grid holds the composition rule at its voxel centres; views of a frame share it."""
    from ctwin.core.drr import projector

    ct, seg, names, art = synth
    jd = _knee_flexion(-25.0)
    scene = A.posed_scene(art, {"tibia_left": jd[JOINT_INDEX["left_knee"]]}, jd)
    pv = projector.compose_scene(scene)
    i0, shape = scene.grid
    assert pv.shape == tuple(shape) and np.all(i0 % 8 == 0) and np.all(np.asarray(shape) >= ct.shape)
    vol = pv.flat.reshape(pv.shape).astype(np.float64)
    pts = Volume(vol, pv.affine).voxel_centers_world()
    # (the kernels interpolate mu: HU clamped at -1000 before interpolation, as here)
    # and the warp pulls the soft tissue without the static table's edge: scene.warp_base)
    clamped = projector.Scene(Volume(np.maximum(scene.warp_base, -1000), scene.base.affine),
                              [projector.PlacedVolume(np.maximum(p.data, -1000), p.mask, p.affine)
                               for p in scene.parts], scene.warp)
    want = A.sample_scene(clamped, pts).reshape(pv.shape)
    diff = np.abs(np.maximum(vol, -1000) - np.maximum(want, -1000))  # mu is 0 at and below -1000
    # equal up to rounding to whole HU, but for voxels exactly on a warp-node plane next to an air
    # (NaN) node, which either rule may assign to the air cell
    assert np.mean(diff > 1.0) < 0.005, np.mean(diff > 1.0)
    assert (want > 300).sum() > 100 and np.mean(np.abs(vol[want > 300] - want[want > 300]) > 1) < 0.002
    # the empty-space grid is the exact one of the composed voxels
    exact = projector.occupancy_grid(pv.flat, pv.lut, pv.shape)
    assert np.array_equal(pv.occ, exact)
    # AP and lateral of one frame compose once
    assert projector.compose_scene(scene) is pv
    for axis in ("ap", "lat"):
        A.render_posed(scene, _geom(axis=axis), device="cpu")
        assert projector.compose_scene(scene) is pv


def test_soft_tissue_that_moved_away_leaves_air(synth):
    """A 90 degree knee flexion swings the shank forward: where it was is air, not a ghost."""
    from ctwin.core.drr import projector

    ct, seg, names, art = synth
    jd = _knee_flexion(-90.0)
    T = jd[JOINT_INDEX["left_knee"]]
    scene = A.posed_scene(art, {"tibia_left": T}, jd)
    assert scene.info["air_nodes"] > 0 and np.isnan(scene.warp[0]).any()
    pv = projector.compose_scene(scene)
    vol = Volume(pv.flat.reshape(pv.shape), pv.affine)

    def hu(points):
        idx = np.rint(vol.world_to_index(np.asarray(points, np.float64))).astype(int)
        return vol.data[tuple(idx.T)]

    vacated = np.array([[5.0, 0.0, -40.0], [-5.0, 10.0, -45.0], [15.0, -10.0, -35.0]])
    assert np.all(ct.data[tuple(np.rint(ct.world_to_index(vacated)).astype(int).T)] > -300)  # leg at rest
    assert np.all(hu(vacated) <= -990), hu(vacated)
    # the shank's tissue and tibia are where the flexion took them
    tib = np.array([[5.0, 0.0, -30.0], [5.0, 0.0, -20.0]])
    assert np.all(hu(tib @ T[:3, :3].T + T[:3, 3]) > 300)
    calf = np.array([[-15.0, 5.0, -30.0], [20.0, -8.0, -35.0]])
    assert np.all(np.abs(hu(calf @ T[:3, :3].T + T[:3, 3]) - ct.data[tuple(np.rint(ct.world_to_index(calf)).astype(int).T)]) < 80)


CUDASIM_POSED = """
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from launch import load_package
load_package("ctwin")
import numpy as np
from ctwin.core.twin import articulated as A
from ctwin.core.errors import CtwinError
from ctwin.core.drr.carm import Geometry
from ctwin.core.body.skeleton import JOINT_INDEX
from test_articulated import synthetic_ct, _knee_flexion
ct, seg, names = synthetic_ct()
art = A.prepare_articulated(ct, seg, names, weight_spacing_mm=4.0)
jd = _knee_flexion(-25.0)
scene = A.posed_scene(art, {"tibia_left": jd[JOINT_INDEX["left_knee"]]}, jd)
g = Geometry([-1000, 0, 0.5], [500, 0.5, 0.5], [0, 1, 0], [0, 0, -1], (12.0, 12.0), (6, 10), False)
a = A.render_posed(scene, g, device="cpu")
b = A.render_posed(scene, g, device="cuda")
print("RESULT" + json.dumps([float(np.abs(a - b).max()), float(a.max())]))
"""


@pytest.mark.cudasim
def test_posed_frame_renders_the_same_on_cuda_under_simulator(tmp_path):
    """The composed frame goes through the static CUDA kernel like a CT (numba's simulator)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "cudasim_posed.py"
    script.write_text(CUDASIM_POSED)
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    diff, vmax = json.loads(r.stdout.split("RESULT", 1)[1])
    assert vmax > 0.5 and diff <= 1e-5 * vmax, (diff, vmax)
