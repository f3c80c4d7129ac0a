"""Render the same twin folders with two checkouts of ctwin and compare the DRRs bit for bit.

    .venv/bin/python tools/render_compare.py --old /path/to/old/checkout --new . --twin DIR [--twin DIR ...]
        [--size 256] [--presets a,b,...]

Each checkout renders in its own process (its own ``tools/launch.py`` loads it as ``ctwin``), on the
CPU: per twin, static DRRs of its CT (trilinear and exact), the acquisition pose through the
articulated path, every preset through the default (composed) path for AP and lateral, two presets
through the per-sample scene kernel (``backend="projector"``), and the composition rule at 20000
random world points (HU). Prints one line per image and exits 1 when any differs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PRESETS = "supine_arms_up,hip_flexion,knee_flexion,walking_stride,arm_raised_forward"


def render(root: Path, out: Path, twins: list, size: int, presets: list) -> None:
    """Runs inside the checkout ``root``: writes every image into ``out`` (npz)."""
    sys.path.insert(0, str(root / "tools"))
    from launch import load_package

    load_package("ctwin")
    from ctwin.core.twin import articulated as A
    from ctwin.core.drr.projector import render_drr
    from ctwin.core.twin.twin import load_twin

    images = {}
    for td in twins:
        tag = Path(td).name
        tw = load_twin(td)
        views = tw.default_views(size=size)
        for vn, g in views.items():
            images[f"{tag}/static_trilinear/{vn}"] = render_drr(tw.ct, g, device="cpu")
            images[f"{tag}/static_exact/{vn}"] = render_drr(tw.ct, g, method="exact", device="cpu")
            images[f"{tag}/acquisition/{vn}"] = tw.render(g, device="cpu")
        for i, name in enumerate(presets):
            scene = tw.posed_scene(*tw.resolve_pose(name))
            for vn, g in views.items():
                images[f"{tag}/{name}/{vn}"] = A.render_posed(scene, g, device="cpu")
            if i < 2:
                g = tw.default_views(size=64)["ap"]
                images[f"{tag}/{name}/projector_ap64"] = A.render_posed(scene, g, device="cpu", backend="projector")
                lo, hi = scene.bbox_world()
                pts = lo + np.random.default_rng(0).random((20000, 3)) * (hi - lo)
                sample = getattr(A, "sample_scene", None)
                images[f"{tag}/{name}/points_hu"] = sample(scene, pts) if sample else scene.sample(pts)
    np.savez_compressed(out, **images)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="checkout of the earlier commit (e.g. a git worktree)")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--twin", action="append", required=True, help="twin folder (repeatable)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--render-into", help=argparse.SUPPRESS)  # internal: the per-checkout process
    ap.add_argument("--root", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    presets = [p for p in a.presets.split(",") if p]
    if a.render_into:
        render(Path(a.root), Path(a.render_into), a.twin, a.size, presets)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for tag, root in (("old", a.old), ("new", a.new)):
            out = Path(tmp) / f"{tag}.npz"
            cmd = [sys.executable, __file__, "--old", a.old, "--root", str(Path(root).resolve()),
                   "--render-into", str(out), "--size", str(a.size), "--presets", a.presets]
            for t in a.twin:
                cmd += ["--twin", t]
            subprocess.run(cmd, check=True)
            res[tag] = dict(np.load(out))
    old, new = res["old"], res["new"]
    differ = 0
    for k in sorted(set(old) | set(new)):
        if k not in old or k not in new:
            print(f"{k}: only in {'old' if k in old else 'new'}")
            differ += 1
            continue
        same = np.array_equal(old[k], new[k], equal_nan=True)
        diff = 0.0 if same else float(np.nanmax(np.abs(old[k].astype(np.float64) - new[k].astype(np.float64))))
        print(f"{k}: {'identical' if same else f'DIFFERS (max abs {diff:.3g})'}")
        differ += not same
    print(f"{len(set(old) | set(new))} images, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
