"""The shared frame loop (core.drr.frames.render_frames): resume, refusal, noise and value, prepare once.

No projector here: a render callback returns a known line integral, so every check is exact.
"""
from __future__ import annotations

import numpy as np
import pytest

from ctwin.core.drr import physics
from ctwin.core.drr.carm import named_view
from ctwin.core.errors import CtwinError
from ctwin.core.drr.frames import FrameView, render_frames
from ctwin.core.drr.projector import read_frame

BOX = (np.array([-50.0, -50.0, -50.0]), np.array([50.0, 50.0, 50.0]))


def _views(out, f, value="line_integral"):
    views = []
    for n in ("ap", "lateral"):
        g = named_view(n, BOX, size=6)
        views.append(FrameView(n, out / f"{n}_{f:04d}", g, g.to_sidecar(frame=f, value=value, device="cpu")))
    return views


def _li(f, v):
    w, h = v.geometry.size_px
    return np.full((h, w), 0.5 + 0.1 * f + (v.name == "ap"), np.float32)


def test_frames_written_kept_and_refused(tmp_path):
    calls, prepared = [], []

    def render(f, v, state, record):
        calls.append((f, v.name, state))
        record["extra"] = f
        return _li(f, v)

    def prepare(f):
        prepared.append(f)
        return f"posed {f}"

    frames = [(f, _views(tmp_path, f)) for f in (0, 1)]
    render_frames(frames, render, prepare=prepare)
    assert prepared == [0, 1] and [c[2] for c in calls] == ["posed 0"] * 2 + ["posed 1"] * 2
    img, sc = read_frame(tmp_path / "ap_0001")
    np.testing.assert_array_equal(img, _li(1, frames[1][1][0]))
    assert sc["extra"] == 1 and sc["frame"] == 1 and sc["size_px"] == [6, 6]
    # resume: every frame holds this request, nothing is posed or rendered again
    calls.clear(), prepared.clear()
    render_frames(frames, render, prepare=prepare)
    assert calls == [] and prepared == []
    # a damaged frame is rendered again (and only its frame is posed)
    (tmp_path / "lateral_0001.tif").write_bytes(b"broken")
    render_frames(frames, render, prepare=prepare)
    assert prepared == [1] and [(c[0], c[1]) for c in calls] == [(1, "lateral")]
    # a frame written for another request is refused, or replaced with overwrite
    other = [(0, _views(tmp_path, 0, value="intensity"))]
    with pytest.raises(CtwinError, match="written for another request"):
        render_frames(other, render, value="intensity")
    images = render_frames(other, render, value="intensity", overwrite=True, keep_images=True)
    np.testing.assert_array_equal(images["ap"], physics.to_value(_li(0, other[0][1][0]), "intensity"))


def test_frames_noise_is_seeded_per_frame(tmp_path):
    frames = [(f, _views(tmp_path / str(f), f)) for f in (3, 4)]
    for f, _ in frames:
        (tmp_path / str(f)).mkdir()
    images = {}
    for f, views in frames:
        images[f] = render_frames([(f, views)], lambda f, v, s, r: _li(0, v), photons=1e4, seed=7,
                                  value="display", keep_images=True)["ap"]
    want = physics.to_value(physics.add_noise(_li(0, frames[0][1][0]), 1e4, 0.0, 7 + 3), "display")
    np.testing.assert_array_equal(images[3], want)
    assert not np.array_equal(images[3], images[4])  # frame 4 draws seed 11
    # keep_images on a resumed frame reads the file back
    again = render_frames([frames[0]], lambda *a: pytest.fail("rendered again"), photons=1e4, seed=7,
                          value="display", keep_images=True)
    np.testing.assert_array_equal(again["ap"], want)
