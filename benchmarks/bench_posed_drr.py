"""Posed DRRs from the patient's own CT (issue 8): fidelity and cost. Prints measured numbers.

    .venv/bin/python benchmarks/bench_posed_drr.py [--spacing 3] [--size 256] [--presets a,b,...]
        [--skip-real] [--device auto]

- acquisition pose (identity, through the articulated path) vs the original CT's DRR, AP and
  lateral: on the phantom and on real_ct/abdomen_pelvis (its TotalSegmentator labels);
- target poses: the phantom built at supine_arms_down, posed to each preset with the truth's bone
  transforms (T_B inv(T_A)) and joint deltas from the truth joints, vs the phantom CT at that pose;
- cost: posed DRR time (warp + render_scene) / static DRR time of the same CT, in one run.
Targets (issue 8): acquisition SSIM >= 0.995 & PSNR >= 45 dB; targets SSIM >= 0.95 & PSNR >= 30;
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
from ctwin.core import articulated as A  # noqa: E402
from ctwin.core.carm import default_views  # noqa: E402
from ctwin.core.metrics import drr_similarity  # noqa: E402
from ctwin.core.projector import render_drr  # noqa: E402


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
    a = ap.parse_args(argv)

    from ctwin.core.phantom import generate_phantom
    from ctwin.core.poses import PRESETS

    ph = generate_phantom("supine_arms_down", spacing=a.spacing)
    art = acquisition("phantom", ph.ct, ph.seg, ph.labels, a.size, a.device)

    if not a.skip_real:
        real = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis"
        if real.exists():
            import json

            from ctwin.core.volume import load_nifti

            ct = load_nifti(real / "ct.nii.gz")
            ct = ct.with_data(np.clip(ct.data, -32768, 32767).astype(np.int16))
            seg = load_nifti(real / "seg.nii.gz")
            names = {int(k): v for k, v in json.load(open(real.parent / "labels_totalsegmentator_v2.json")).items()}
            acquisition("abdomen_pelvis", ct, seg, names, a.size, a.device)
        else:
            print(f"[acquisition] abdomen_pelvis: skipped ({real} not found)")

    presets = [p for p in (a.presets.split(",") if a.presets else PRESETS) if p != "supine_arms_down"]
    ta = ph.truth
    views = _views(ph.ct, a.size)
    for pname in presets:
        pb = generate_phantom(pname, spacing=a.spacing)
        tb = pb.truth
        bd = {n: np.asarray(tb["bones"][n]) @ np.linalg.inv(np.asarray(ta["bones"][n]))
              for n in tb["bones"] if n in ta["bones"]}
        jd = A.joint_deltas_between(ta["pose"], ta["joints"], tb["pose"], tb["joints"])
        t = time.perf_counter()
        scene = A.posed_scene(art, bd, jd)
        t_warp = time.perf_counter() - t
        for vname, g in views.items():
            ref = render_drr(pb.ct, g, device=a.device)
            img = A.render_posed(scene, g, device=a.device)
            print(f"[target] {pname:20s} {vname:8s} {_fmt(drr_similarity(img, ref))}  (warp {t_warp:.2f} s, "
                  f"{scene.info.get('unconverged_fraction', 0):.3%} unconverged)")

    # cost: posed DRR (warp + render) vs static DRR of the same CT, one run
    if presets:
        g = views["ap"]
        render_drr(ph.ct, g, device=a.device)
        A.render_posed(scene, g, device=a.device)  # warm-up / JIT
        reps = 3
        t = time.perf_counter()
        for _ in range(reps):
            render_drr(ph.ct, g, device=a.device)
        t_static = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            sc = A.posed_scene(art, bd, jd)
            A.render_posed(sc, g, device=a.device)
        t_posed = (time.perf_counter() - t) / reps
        print(f"[cost] static DRR {t_static * 1000:.0f} ms, posed DRR (warp + render) {t_posed * 1000:.0f} ms, "
              f"ratio {t_posed / t_static:.2f} ({a.size}x{a.size}, device {a.device})")


if __name__ == "__main__":
    main()
