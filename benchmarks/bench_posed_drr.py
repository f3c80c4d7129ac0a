"""Posed DRRs from the patient's own CT: fidelity and cost. Prints measured numbers.

    .venv/bin/python benchmarks/bench_posed_drr.py [--spacing 3] [--size 256] [--presets a,b,...]
        [--skip-real] [--device auto]

- acquisition pose (identity, through the articulated path) vs the original CT's DRR, AP and
  lateral: on the phantom and on real_ct/abdomen_pelvis (its TotalSegmentator labels);
- target poses: the phantom built at supine_arms_down, posed to each preset with the truth's bone
  transforms (T_B inv(T_A)) and joint deltas from the truth joints, vs the phantom CT at that pose;
- cost, per preset at 256^2 and 512^2 (``--cost-sizes``): a new pose (inverse warp + composition
  + render) against a static ``render_drr`` of the same CT and view, in one run (best of 5 each);
  also against the render of an already prepared CT, and for AP + lateral of one pose (composed
  once) against two static renders. ``--cost-only`` skips the fidelity part.
The inverse warp uses the twins' 12 mm grid (``core.twin.twin.WARP_SPACING_MM``).
Targets: acquisition SSIM >= 0.995 & PSNR >= 45 dB; targets SSIM >= 0.95 & PSNR >= 30;
cost ratio <= 1.5.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")
from ctwin.core.twin import articulated as A
from ctwin.core.drr.carm import default_views  # noqa: E402
from ctwin.core.meshes.metrics import drr_similarity  # noqa: E402
from ctwin.core.drr.projector import render_drr  # noqa: E402


def _views(ct, size):
    return default_views(ct.bbox_world(), size=size)


def _fmt(s):
    return f"SSIM {s['ssim']:.4f}  PSNR {s['psnr_db']:.1f} dB"


def acquisition(name, ct, seg, names, size, device):
    t = time.perf_counter()
    art = A.prepare_articulated(ct, seg, names)
    t_prep = time.perf_counter() - t
    scene = A.posed_scene(art, {}, np.tile(np.eye(4), (24, 1, 1)))
    for vname, g in _views(ct, size).items():
        ref = render_drr(ct, g, device=device)
        img = A.render_posed(scene, g, device=device)
        print(f"[acquisition] {name:16s} {vname:8s} {_fmt(drr_similarity(img, ref))}")
    print(f"[prepare] {name}: {t_prep:.1f} s, {len(art.parts)} parts")
    return art


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--presets", default="")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cost-sizes", default="256,512")
    ap.add_argument("--cost-only", action="store_true", help="only the cost part (no fidelity)")
    a = ap.parse_args(argv)
    _SPACING[0] = a.spacing

    from ctwin.core.phantom.phantom import generate_phantom
    from ctwin.core.rig.poses import PRESETS

    ph = generate_phantom("supine_arms_down", spacing=a.spacing)
    presets = [p for p in (a.presets.split(",") if a.presets else PRESETS) if p != "supine_arms_down"]
    if a.cost_only:
        art = A.prepare_articulated(ph.ct, ph.seg, ph.labels)
        cost(art, ph.ct, ph.truth, presets, a.device, [int(v) for v in a.cost_sizes.split(",")])
        return
    art = acquisition("phantom", ph.ct, ph.seg, ph.labels, a.size, a.device)

    if not a.skip_real:
        real = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis"
        if real.exists():
            import json

            from ctwin.core.volumes.volume import load_nifti

            ct = load_nifti(real / "ct.nii.gz")
            ct = ct.with_data(np.clip(ct.data, -32768, 32767).astype(np.int16))
            seg = load_nifti(real / "seg.nii.gz")
            names = {int(k): v for k, v in json.load(open(real.parent / "labels_totalsegmentator_v2.json")).items()}
            acquisition("abdomen_pelvis", ct, seg, names, a.size, a.device)
        else:
            print(f"[acquisition] abdomen_pelvis: skipped ({real} not found)")

    ta = ph.truth
    views = _views(ph.ct, a.size)
    for pname in presets:
        pb = generate_phantom(pname, spacing=a.spacing)
        tb = _TRUTHS.setdefault(pname, pb.truth)
        bd = {n: np.asarray(tb["bones"][n]) @ np.linalg.inv(np.asarray(ta["bones"][n]))
              for n in tb["bones"] if n in ta["bones"]}
        jd = A.joint_deltas_between(ta["pose"], ta["joints"], tb["pose"], tb["joints"])
        t = time.perf_counter()
        scene = A.posed_scene(art, bd, jd, warp_spacing_mm=WARP_MM)
        t_warp = time.perf_counter() - t
        for vname, g in views.items():
            ref = render_drr(pb.ct, g, device=a.device)
            img = A.render_posed(scene, g, device=a.device)
            print(f"[target] {pname:20s} {vname:8s} {_fmt(drr_similarity(img, ref))}  (warp {t_warp:.2f} s, "
                  f"{scene.info.get('unconverged_fraction', 0):.3%} unconverged)")

    # cost: a new pose (warp + composition + render) vs a static DRR of the same CT, same view, one run
    if presets and a.cost_sizes:
        cost(art, ph.ct, ta, presets, a.device, [int(v) for v in a.cost_sizes.split(",")])


def cost(art, ct, ta, presets, device, sizes, reps=5):
    """Per preset and detector size: the best of ``reps`` wall times of
    - static: ``render_drr(ct, g)`` (a Volume: prepared, empty-space grid built, rendered) and
      ``render_drr(pv, g)`` with the prepared volume reused (the render alone);
    - posed, one view: ``posed_scene`` (inverse warp) + ``render_posed`` (composition + render);
    - posed, AP + lateral: one ``posed_scene`` and both views (the frame is composed once),
      against two static renders.
    """
    from ctwin.core.drr.carm import default_views
    from ctwin.core.drr.projector import prepare_volume

    pv = prepare_volume(ct)
    pv.occupancy()

    def best(f):
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    for size in sizes:
        views = default_views(ct.bbox_world(), size=size)
        g, g2 = views["ap"], views["lateral"]
        for pname in presets:
            tb = _truth(pname)
            bd = {n: np.asarray(tb["bones"][n]) @ np.linalg.inv(np.asarray(ta["bones"][n]))
                  for n in tb["bones"] if n in ta["bones"]}
            jd = A.joint_deltas_between(ta["pose"], ta["joints"], tb["pose"], tb["joints"])
            t_vol = best(lambda: render_drr(ct, g, device=device))
            t_pv = best(lambda: render_drr(pv, g, device=device))
            t_pv2 = best(lambda: render_drr(pv, g2, device=device))
            t_warp = best(lambda: A.posed_scene(art, bd, jd, warp_spacing_mm=WARP_MM))

            def one():
                A.render_posed(A.posed_scene(art, bd, jd, warp_spacing_mm=WARP_MM), g, device=device)

            def two():
                sc = A.posed_scene(art, bd, jd, warp_spacing_mm=WARP_MM)
                A.render_posed(sc, g, device=device)
                A.render_posed(sc, g2, device=device)

            t_one, t_two = best(one), best(two)
            sc = A.posed_scene(art, bd, jd, warp_spacing_mm=WARP_MM)
            grid = np.prod(sc.grid[1]) / np.prod(ct.shape)
            print(f"[cost] {size}^2 {pname:20s} static {t_vol * 1e3:5.0f} ms (prepared {t_pv * 1e3:4.0f}), "
                  f"posed {t_one * 1e3:5.0f} ms (warp {t_warp * 1e3:4.0f}): ratio {t_one / t_vol:4.2f} "
                  f"(vs prepared {t_one / t_pv:4.2f}); AP+lateral ratio {t_two / (2 * t_vol):4.2f} "
                  f"(vs prepared {t_two / (t_pv + t_pv2):4.2f}); posed grid {grid:.2f}x the CT", flush=True)


_TRUTHS = {}


def _truth(pname):
    if pname not in _TRUTHS:
        from ctwin.core.phantom.phantom import generate_phantom

        _TRUTHS[pname] = generate_phantom(pname, spacing=_SPACING[0]).truth
    return _TRUTHS[pname]


_SPACING = [3.0]
WARP_MM = 12.0  # core.twin.twin.WARP_SPACING_MM: what twins render with

if __name__ == "__main__":
    main()
