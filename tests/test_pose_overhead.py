"""The per-frame bookkeeping of posing and composition, done for every part at once (stacked
products), equals a plain loop over the parts that follows the definitions one part at a time."""
import numpy as np
from scipy.spatial.transform import Rotation

from ctwin.core.drr import projector as P
from ctwin.core.drr.projector import PlacedVolume, Scene
from ctwin.core.twin import articulated as A
from ctwin.core.volumes.volume import Volume, affine_from


def _parts(rng, aff, n_parts=9):
    """Parts on crops of the CT grid: solid, hollow, empty-masked and all-air ones."""
    parts = []
    for m in range(n_parts):
        shp = tuple(int(v) for v in rng.integers(3, 8, 3))
        data = rng.normal(900, 200, shp).astype(np.int16)
        mask = (rng.random(shp) < 0.6).astype(np.uint8)
        if m == 3:
            mask[:] = 0  # nothing masked
        if m == 4:
            data[:] = -1000  # masked air only
        off = rng.integers(0, 12, 3)
        pa = aff.copy()
        pa[:3, 3] = aff[:3, :3] @ off + aff[:3, 3]
        parts.append(PlacedVolume(data, mask, pa, name=f"p{m}", joint=int(m % 5)))
    return parts


def _rigid(rng, deg, mm):
    t = np.eye(4)
    t[:3, :3] = Rotation.from_rotvec(rng.normal(size=3) * np.deg2rad(deg)).as_matrix()
    t[:3, 3] = rng.normal(size=3) * mm
    return t


def test_posed_scene_places_and_bounds_every_part_like_a_loop_over_the_parts():
    rng = np.random.default_rng(5)
    aff = affine_from((2.0, 1.5, 2.5), (-20.0, 10.0, -30.0))
    soft = rng.normal(0, 200, (20, 18, 24)).astype(np.int16)
    parts = _parts(rng, aff)
    art = A.ArticulatedCT(aff, soft, parts, np.zeros((2, 2, 2, 0), np.float32), np.eye(4), np.zeros(0, np.int64))
    for f in range(6):
        jd = np.stack([np.eye(4)] + [_rigid(rng, 25, 12) for _ in range(23)])
        jd[2] = np.eye(4)  # parts driven by joint 2 stay where they are
        bone = {"p1": _rigid(rng, 40, 20)} if f % 2 else {}
        scene = A.posed_scene(art, bone, jd)
        lo, hi = np.zeros(3), np.asarray(soft.shape, float) - 1.0
        inv = np.linalg.inv(aff)
        for p, q in zip(parts, scene.parts):
            d = bone.get(p.name, jd[p.joint])
            if np.abs(d - np.eye(4)).max() <= 1e-9:
                assert q.affine is p.affine  # unmoved: the acquisition placement itself
                continue
            np.testing.assert_array_equal(q.affine, d @ p.affine)
            m = (p.mask > 0) & (p.data > -900)
            if m.any():  # the moved content's cell box in CT index space
                idx = np.argwhere(m)
                c = np.array([[a, b, cc] for a in (idx[:, 0].min() - 0.5, idx[:, 0].max() + 0.5)
                              for b in (idx[:, 1].min() - 0.5, idx[:, 1].max() + 0.5)
                              for cc in (idx[:, 2].min() - 0.5, idx[:, 2].max() + 0.5)])
                w = c @ (inv @ d @ p.affine)[:3, :3].T + (inv @ d @ p.affine)[:3, 3]
                lo, hi = np.minimum(lo, w.min(axis=0)), np.maximum(hi, w.max(axis=0))
        i0, shape = P._grid_from_bounds(lo, hi, np.asarray(soft.shape))
        assert np.array_equal(scene.grid[0], i0) and np.array_equal(scene.grid[1], shape)
        assert np.any(shape != soft.shape)  # the parts left the CT box: the bounds decided the grid


def test_composition_places_every_part_like_a_loop_over_the_parts():
    rng = np.random.default_rng(8)
    aff = affine_from((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    base = Volume(rng.normal(0, 200, (24, 22, 26)).astype(np.int16), aff)
    parts = _parts(rng, aff, 10)
    for f in range(5):
        placed = []
        for m, p in enumerate(parts):
            if m % 3 == 0:
                t = np.eye(4)
                t[:3, 3] = aff[:3, :3] @ rng.integers(-4, 5, 3)  # whole voxels: copied, not resampled
            elif m == 7:
                t = _rigid(rng, 0, 0)
                t[:3, 3] = [501.0, 0.0, 0.0]  # far outside the grid: no box
            else:
                t = _rigid(rng, 30, 6)
            placed.append(PlacedVolume(p.data, p.mask, t @ p.affine))
        scene = Scene(base, placed, compose=True, grid=(np.array([-8, -8, -16]), np.array([40, 40, 48])))
        pk = scene._pack()
        i0, on = P.scene_grid(scene)
        shift = -i0
        S, aligned, boxes, order = P._subs_frame(scene, pk, pk["base"], np.linalg.inv(aff), shift, on)
        assert np.array_equal(order, np.arange(len(parts))[::-1])
        for i, p in enumerate(placed):
            Si = np.linalg.inv(p.affine) @ aff
            np.testing.assert_allclose(S[i], Si[:3], rtol=0, atol=1e-12)
            t = -Si[:3, 3]
            is_aligned = np.abs(Si[:3, :3] - np.eye(3)).max() <= 1e-9 and np.abs(t - np.rint(t)).max() <= 1e-6
            assert aligned[i, 3] == is_aligned == (i % 3 == 0)
            if is_aligned:
                assert np.array_equal(aligned[i, :3], np.rint(t))
                lo = np.maximum(np.rint(t).astype(int) + shift, 0)
                hi = np.minimum(np.rint(t).astype(int) + shift + np.array(p.data.shape) - 1, on - 1)
            else:
                idx = np.argwhere(p.mask > 0)
                if not len(idx):
                    assert boxes[i, 1] == -1 and boxes[i, 0] == 0
                    continue
                c = np.array([[a, b, cc] for a in (idx[:, 0].min() - 0.5, idx[:, 0].max() + 0.5)
                              for b in (idx[:, 1].min() - 0.5, idx[:, 1].max() + 0.5)
                              for cc in (idx[:, 2].min() - 0.5, idx[:, 2].max() + 0.5)])
                Sinv = np.linalg.inv(aff) @ p.affine
                w = c @ Sinv[:3, :3].T + Sinv[:3, 3]
                lo = np.maximum(np.ceil(w.min(axis=0) - 1e-9).astype(int) + shift, 0)
                hi = np.minimum(np.floor(w.max(axis=0) + 1e-9).astype(int) + shift, on - 1)
            want = [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]] if np.all(hi >= lo) else [0, -1, 0, 0, 0, 0]
            assert list(boxes[i]) == list(want), (f, i)
        assert boxes[7, 1] == -1  # the far part has no box
