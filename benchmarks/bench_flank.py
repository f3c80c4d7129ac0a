"""The soft tissue beside an abducted arm: where the posed-air rules of the inverse warp put air, and
what two alternatives would change. Prints measured numbers and writes a difference image.

    .venv/bin/python benchmarks/bench_flank.py [--spacing 3] [--size 256] [--presets arm_abducted ...]
        [--bodies own variant1] [--out /tmp/bench_retarget] [--png flank.png]

Reuses the phantoms and twins of ``bench_retarget.py`` (same ``--out``; run that first). For each
body (the project's phantom, seed 0, and its skeleton variant 1) and preset, the twin is posed with
the truth's pose (retargeted as ``evaluate`` does) and rendered AP and lateral four ways:

- "today": ``posed_scene`` as it is. The samplers read a warp cell with an air (NaN) node as air
  throughout, so air reaches up to one node spacing (12 mm) into tissue next to an air node;
- "half cell": the same nodes on a grid of half the spacing, a new node taking the trilinear blend
  of the solved coarse nodes around it (renormalised) and air where air nodes hold more than half
  of its weight (``half_cell_air``): exact where a cell has no air node, and the air border half
  way between an air node and a tissue node;
- "stretch": nodes whose inverse warp squeezes a node spacing to under 0.3 of itself in some
  direction (smallest singular value of the Jacobian of node -> pre-image) also air: skinning
  stretches the tissue it pulls across an opening gap;
- "both".

For each: SSIM / PSNR against the phantom CT's DRR at that pose, and the excess and missing line
integral (sum over pixels of the posed-minus-truth difference above and below 0; excess beside the
arm is a web of stretched tissue, missing is tissue taken for air).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

STRETCH_MIN = 0.3


def half_cell_air(warp, waff):
    """(warp, affine) on a grid of half the node spacing with the air border half way between air and
    tissue nodes (see the module docstring)."""
    w = np.asarray(warp, dtype=np.float64)
    ok = ~np.isnan(w).any(axis=-1)
    v = np.where(ok[..., None], w, 0.0)
    m = ok.astype(np.float64)[..., None]
    for ax in range(3):
        n = v.shape[ax]
        shp = list(v.shape)
        shp[ax] = 2 * n - 1
        fv, fm = np.empty(shp), np.empty(shp[:3] + [1])
        ev, od, lo, hi = ([slice(None)] * 4 for _ in range(4))
        ev[ax], od[ax], lo[ax], hi[ax] = slice(0, None, 2), slice(1, None, 2), slice(0, n - 1), slice(1, n)
        ev, od, lo, hi = tuple(ev), tuple(od), tuple(lo), tuple(hi)
        fv[ev], fm[ev] = v, m
        fv[od], fm[od] = 0.5 * (v[lo] + v[hi]), 0.5 * (m[lo] + m[hi])
        v, m = fv, fm
    keep = m[..., 0] >= 0.5
    out = np.full(v.shape, np.nan, dtype=np.float32)
    out[keep] = v[keep] / m[keep]
    fa = np.array(waff, dtype=np.float64, copy=True)
    fa[:3, :3] *= 0.5
    return out, fa


def stretch_air(warp, waff, smin=STRETCH_MIN):
    """The warp with nodes whose node -> pre-image map squeezes below ``smin`` set to air; the count."""
    w = np.asarray(warp, dtype=np.float64)
    ok = ~np.isnan(w).any(axis=-1)
    sp = np.linalg.norm(waff[:3, :3], axis=0)
    J = np.full(w.shape[:3] + (3, 3), np.nan)
    for ax in range(3):
        a, b = [slice(None)] * 3, [slice(None)] * 3
        a[ax], b[ax] = slice(0, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        d = (w[b] - w[a]) / sp[ax]
        d[~(ok[a] & ok[b])] = np.nan
        fwd, bwd = np.full(w.shape, np.nan), np.full(w.shape, np.nan)
        fwd[a], bwd[b] = d, d
        g = np.where(np.isnan(fwd), bwd, fwd)
        g[..., ax] += 1.0
        J[..., :, ax] = g
    good = ok & ~np.isnan(J).any(axis=(-1, -2))
    bad = np.zeros(ok.shape, bool)
    bad[good] = np.linalg.svd(J[good], compute_uv=False)[:, -1] < smin
    out = np.array(warp, dtype=np.float32, copy=True)
    out[bad] = np.nan
    return out, int(bad.sum())


def main() -> int:
    from ctwin.core import progress
    from ctwin.core.twin.articulated import render_posed
    from ctwin.core.drr.carm import default_views
    from ctwin.core.volumes.ct import load_ct
    from ctwin.core.twin.evaluation import _source_truth
    from ctwin.core.fileio import read_json
    from ctwin.core.meshes.metrics import drr_similarity
    from ctwin.core.drr.projector import render_drr
    from ctwin.core.rig.retarget import retarget_pose
    from ctwin.core.twin.twin import load_twin

    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--presets", nargs="*", default=["arm_abducted"])
    ap.add_argument("--bodies", nargs="*", default=["own", "variant1"])
    ap.add_argument("--out", default="/tmp/bench_retarget")
    ap.add_argument("--png", default="")
    args = ap.parse_args()
    progress.set_quiet(True)
    panels = []
    for body in args.bodies:
        d = Path(args.out) / f"s{args.spacing:g}" / body
        if not (d / "twin" / "twin.json").is_file():
            print(f"{d}/twin: no twin; run bench_retarget.py --spacing {args.spacing:g} --out {args.out} first")
            return 2
        twin = load_twin(d / "twin")
        ta = _source_truth(twin)
        for name in args.presets:
            tb = read_json(d / f"phantom_{name}" / "truth.json")
            pose = np.asarray(tb["pose"], dtype=np.float64)
            acq = (np.asarray(ta["rest_joints"]), np.asarray(ta["pose"]), twin.pose0)
            pose = np.asarray(retarget_pose(pose, np.asarray(tb["rest_joints"]), twin.skeleton_rest_mm(),
                                            acquisition=acq, located=twin.located_joints()), dtype=np.float64)
            transl = twin.transl0_mm + np.asarray(tb["transl"]) - np.asarray(ta["transl"])
            ct_b = load_ct(d / f"phantom_{name}" / "ct.nii.gz")
            views = default_views(ct_b, size=args.size)
            refs = {v: render_drr(ct_b, g) for v, g in views.items()}
            imgs = {}
            for mode in ("today", "half cell", "stretch", "both"):
                scene = twin.posed_scene(pose, transl)
                extra = ""
                if scene.warp is not None and mode in ("stretch", "both"):
                    scene.warp, n = stretch_air(scene.warp, scene.warp_affine)
                    extra = f"  +{n} stretch nodes"
                if scene.warp is not None and mode in ("half cell", "both"):
                    scene.warp, scene.warp_affine = half_cell_air(scene.warp, scene.warp_affine)
                line = [f"{body:8s} {args.spacing:g} mm {name:18s} {mode:9s}"]
                for v, g in views.items():
                    img = render_posed(scene, g)
                    diff = img - refs[v]
                    s = drr_similarity(img, refs[v])
                    line.append(f"{v} {s['ssim']:.4f} {s['psnr_db']:5.2f} dB excess {diff[diff > 0].sum():7.1f} "
                                f"missing {-diff[diff < 0].sum():6.1f}")
                    if v == "ap":
                        imgs[mode] = img
                print(" | ".join(line) + extra, flush=True)
            panels.append((f"{body} {name}", refs["ap"], imgs))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        modes = list(panels[0][2])
        fig, axs = plt.subplots(len(panels), 1 + len(modes), figsize=(3.2 * (1 + len(modes)), 3.4 * len(panels)),
                                squeeze=False)
        for r, (title, ref, imgs) in enumerate(panels):
            big = np.argwhere(np.abs(imgs["today"] - ref) > 0.05 * ref.max())
            lo = np.maximum(big.min(0) - 20, 0) if len(big) else np.zeros(2, int)
            hi = np.minimum(big.max(0) + 20, ref.shape) if len(big) else np.asarray(ref.shape)
            crop = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
            axs[r, 0].imshow(ref[crop], cmap="gray", vmin=0, vmax=0.6 * ref.max())
            axs[r, 0].set_title(f"{title}: truth AP", fontsize=8)
            vmax = 0.1 * ref.max()
            for c, m in enumerate(modes):
                axs[r, c + 1].imshow((imgs[m] - ref)[crop], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
                axs[r, c + 1].set_title(f"{m}: posed - truth (red excess)", fontsize=8)
        for a in axs.ravel():
            a.axis("off")
        plt.tight_layout()
        plt.savefig(args.png, dpi=72)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
