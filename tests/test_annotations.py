"""Per-frame annotations: projected label masks and 2D landmarks agree with the DRR."""
from __future__ import annotations

import json

import numpy as np
import pytest


def test_mesh_mask_of_a_box_matches_its_projection():
    from ctwin.core.twin.annotations import mesh_mask
    from ctwin.core.drr.carm import named_view
    from ctwin.core.meshes.mesh import Mesh

    # a 100 mm cube at the isocentre, parallel beam AP: its silhouette is a 100 mm square
    v = np.array([[x, y, z] for x in (-50, 50) for y in (-50, 50) for z in (-50, 50)], float)
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    g = named_view("ap", (np.full(3, -100.0), np.full(3, 100.0)), size=64, parallel=True)
    m = mesh_mask(g, Mesh(v, f, "cube"))
    du = g.pixel_spacing_mm[0]
    expect = (100.0 / du) ** 2
    assert abs(m.sum() - expect) <= 4 * (100.0 / du) + 4  # within one pixel ring


@pytest.mark.slow
def test_femur_mask_is_brighter_than_the_tissue_around_it(twin_dir, tmp_path):
    from scipy import ndimage

    from ctwin.core.drr.projector import read_frame
    from ctwin.core.twin.twin import render_twin

    out = tmp_path / "frames"
    render_twin(twin_dir, out, size=192, device="cpu", annotate=True)
    for view in ("ap", "lateral"):
        img, _ = read_frame(out / f"{view}_0000")
        with np.load(out / f"{view}_0000_labels.npz") as z:
            names = [str(n) for n in z["names"]]
            masks = z["masks"]
        femur = masks[names.index("femur_left")] > 0
        assert femur.sum() > 5
        ring = ndimage.binary_dilation(femur, iterations=3) & ~femur & (img > 0)
        assert img[femur].mean() > img[ring].mean(), view
        pts = json.loads((out / f"{view}_0000_points.json").read_text())
        assert set(pts["joints"]) >= {"left_hip", "left_knee"}
        # the femoral head landmark projects onto the femur mask
        if "femoral_head_left" in pts["landmarks"]:
            c, r = np.round(pts["landmarks"]["femoral_head_left"]["px"]).astype(int)
            assert femur[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2].any()
