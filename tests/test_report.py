"""The demo report: metrics beside the published numbers, pictures written whole."""
from __future__ import annotations

import numpy as np


def test_report_table_and_pictures(tmp_path):
    from PIL import Image

    from ctwin.core.twin.report import PUBLISHED, overlay, save_gif, save_png, strip, write_report

    metrics = {"fit": {"chamfer_mm": 1.25, "enclosure_pct": 99.9},
               "acquisition": {"ssim": 1.0, "psnr_db": None, "identical": True},
               "target": {"pose": "sitting", "enclosure_pct": 97.0, "ssim": 0.98, "psnr_db": 35.5,
                          "bone_err_mm": {"mean": 2.5, "max": 7.0}}}
    img = np.linspace(0, 5, 32 * 48, dtype=np.float32).reshape(32, 48)
    masks = np.zeros((2, 32, 48), np.uint8)
    masks[0, 5:10, 5:10] = 1
    ov = overlay(img, masks, ["femur_left", "liver"])
    assert ov.shape == (32, 48, 3) and ov.dtype == np.uint8
    assert not np.array_equal(ov[5:10, 5:10, 0], ov[5:10, 5:10, 1])  # tinted
    s = strip([img.astype(np.uint8), ov, ov])
    assert s.shape == (32, 3 * 48 + 2 * 4, 3)
    save_png(s, tmp_path / "images" / "s.png")
    save_gif([ov, ov[::-1]], tmp_path / "images" / "a.gif")
    assert Image.open(tmp_path / "images" / "a.gif").n_frames == 2
    page = write_report(tmp_path, metrics, [{"title": "Pictures", "text": "x",
                                             "images": [("images/s.png", "a strip")]}]).read_text()
    assert "1.250" in page and "99.900" in page and "inf (identical images)" in page
    assert str(PUBLISHED["chamfer_mm"]) in page and str(PUBLISHED["acq_ssim"]) in page
    assert "2.50 / 7.00" in page and "images/s.png" in page
    assert not list(tmp_path.rglob("*.part*"))
