"""Retargeting on a phantom whose rest skeleton differs from the twin's (``ctwin phantom
--skeleton-variant``): raw pose vectors against retargeted ones. Prints measured numbers.

    .venv/bin/python benchmarks/bench_retarget.py [--spacing 6] [--size 256] [--variant 1]
        [--presets a b ...] [--skip-own] [--out /tmp/bench_retarget]

For the variant phantom (and, unless ``--skip-own``, the project's own phantom of the same seed):
write the phantom at supine_arms_down and at every other preset, build the twin from the
acquisition, then score the twin posed with each preset's ``truth.json`` (SPEC section 6: bone_err
mean/max, SSIM/PSNR AP and lateral) three ways: the raw pose vector ("raw"), retargeted from the
truth's ``rest_joints`` by rest alignment alone ("rest"), and relative to the acquisition truth on
the same skeleton ("acquisition", what ``evaluate`` and ``pose`` do when the twin's input CT has a
truth.json); and, bones only, "same rule": every bone turned by its truth bone's world rotation
change from the acquisition even on the own phantom (whose pose vectors are otherwise used as they
are), so that both bodies are posed by one rule. Targets: retargeted variant within 0.3 mm (mean)
and 1 mm (max) of the own phantom's bone errors, target DRRs SSIM >= 0.99 and PSNR >= 36 dB.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")


def run_body(label, out, variant, args):
    from ctwin.core.twin.evaluation import target_fidelity
    from ctwin.core.phantom.phantom import write_phantom
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.twin.twin import build_twin, load_twin

    acq = out / "phantom_supine_arms_down"
    if not (acq / "truth.json").is_file():
        write_phantom(acq, pose="supine_arms_down", spacing=args.spacing, seed=args.seed, skeleton_variant=variant)
    twin_dir = out / "twin"
    if not (twin_dir / "twin.json").is_file():
        t0 = time.perf_counter()
        build_twin(acq / "ct.nii.gz", acq / "seg.nii.gz", twin_dir)
        print(f"[{label}] build: {time.perf_counter() - t0:.1f} s", flush=True)
    twin = load_twin(twin_dir)
    fit = twin.meta["fit"]
    print(f"[{label}] fit: chamfer {fit.get('chamfer_mm', float('nan')):.2f} mm, enclosure "
          f"{fit.get('enclosure_pct', float('nan')):.2f} %", flush=True)
    presets = args.presets or [p for p in PRESETS if p != "supine_arms_down"]
    rows = {}
    for name in presets:
        d = out / f"phantom_{name}"
        if not (d / "truth.json").is_file():
            write_phantom(d, pose=name, spacing=args.spacing, seed=args.seed, skeleton_variant=variant)
        for mode, arg in (("raw", False), ("rest", "rest"), ("acquisition", True)):
            t = target_fidelity(twin, d, size=args.size, retarget=arg)
            be = t["bone_err_mm"]
            rows[(name, mode)] = t
            print(f"[{label}] {name:20s} {mode:11s} bone mean {be['mean']:6.2f} max {be['max']:6.2f} "
                  f"({be['worst']:>18s})  AP SSIM {t['drr']['ap']['ssim']:.4f} {t['drr']['ap']['psnr_db']:5.1f} dB"
                  f"  LAT SSIM {t['drr']['lateral']['ssim']:.4f} {t['drr']['lateral']['psnr_db']:5.1f} dB"
                  f"  retargeted={t['retargeted']}", flush=True)
        # the acquisition-relative rule applied even where the skeletons agree (the own phantom's
        # pose vectors are used as they are): the same rule on both bodies, bones only
        be = same_rule_bone_error(twin, acq, d)
        rows[(name, "same rule")] = {"bone_err_mm": be}
        print(f"[{label}] {name:20s} {'same rule':11s} bone mean {be['mean']:6.2f} max {be['max']:6.2f} "
              f"({be['worst']:>18s})  worst bones: " + ", ".join(
                  f"{k} {v:.2f}" for k, v in sorted(be["per_bone"].items(), key=lambda kv: -kv[1])[:4]), flush=True)
    return rows


def same_rule_bone_error(twin, acq_dir, truth_dir):
    """SPEC bone_err_mm with every bone turned by its truth bone's world rotation change from the
    acquisition (``core.rig.retarget.acquisition_alignment``), whatever the skeletons."""
    import numpy as np

    from ctwin.core.twin.evaluation import bone_error
    from ctwin.core.fileio import read_json
    from ctwin.core.rig.retarget import acquisition_alignment, apply_alignment

    ta, tb = read_json(acq_dir / "truth.json"), read_json(truth_dir / "truth.json")
    c = acquisition_alignment(np.asarray(ta["pose"], dtype=np.float64), twin.pose0)
    pose = apply_alignment(np.asarray(tb["pose"], dtype=np.float64), c)
    transl = twin.transl0_mm + np.asarray(tb["transl"]) - np.asarray(ta["transl"])
    return bone_error(twin, pose, transl, ta, tb)


def main() -> int:
    from ctwin.core import progress

    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=6.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", type=int, default=1)
    ap.add_argument("--presets", nargs="*", default=None)
    ap.add_argument("--skip-own", action="store_true")
    ap.add_argument("--out", default="/tmp/bench_retarget")
    args = ap.parse_args()
    progress.set_quiet(True)
    out = Path(args.out) / f"s{args.spacing:g}"
    var = run_body(f"variant {args.variant}", out / f"variant{args.variant}", args.variant, args)
    if args.skip_own:
        return 0
    own = run_body("own", out / "own", None, args)
    print("\nretargeted variant minus own phantom (bone error, mm):")
    for (name, mode), t in var.items():
        if mode == "raw":
            continue
        o = own[(name, mode)]["bone_err_mm"]
        b = t["bone_err_mm"]
        print(f"  {name:20s} {mode:11s} mean {b['mean'] - o['mean']:+.2f}  max {b['max'] - o['max']:+.2f}")
    print("retargeted variant (acquisition) minus own phantom (same rule):")
    for (name, mode), t in var.items():
        if mode != "acquisition":
            continue
        o = own[(name, "same rule")]["bone_err_mm"]
        b = t["bone_err_mm"]
        print(f"  {name:20s} mean {b['mean'] - o['mean']:+.2f}  max {b['max'] - o['max']:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
