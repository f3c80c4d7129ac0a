"""End-to-end twin figures on the phantom: build at the acquisition pose, then for every other
preset score the posed twin against the phantom generated at that preset (SPEC section 6), and
time a posed DRR against a static DRR of the same CT.

    .venv/bin/python benchmarks/bench_twin.py [--spacing 3] [--size 512] [--out /tmp/bench_twin]

Prints one row per preset (bone_err mean/max, enclosure at the target pose, SSIM/PSNR AP and
lateral) and the cost ratio. Targets: bone_err mean <= 3 mm and max <= 8 mm,
enclosure >= 99 %, SSIM >= 0.95, PSNR >= 30 dB, posed/static time <= 1.5.
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


def main() -> int:
    from ctwin.core import progress
    from ctwin.core.twin.evaluation import acquisition_fidelity, target_fidelity
    from ctwin.core.phantom.phantom import write_phantom
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.drr.projector import render_drr
    from ctwin.core.twin.twin import build_twin, load_twin

    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/bench_twin")
    ap.add_argument("--presets", nargs="*", default=None)
    args = ap.parse_args()
    progress.set_quiet(True)
    out = Path(args.out)
    acq = out / "phantom_supine_arms_down"
    if not (acq / "truth.json").is_file():
        write_phantom(acq, pose="supine_arms_down", spacing=args.spacing, seed=args.seed)
    twin_dir = out / "twin"
    t0 = time.perf_counter()
    if not (twin_dir / "twin.json").is_file():
        build_twin(acq / "ct.nii.gz", acq / "seg.nii.gz", twin_dir)
        print(f"build: {time.perf_counter() - t0:.1f} s")
    twin = load_twin(twin_dir)
    fit = twin.meta["fit"]
    print(f"fit: chamfer {fit.get('chamfer_mm', float('nan')):.2f} mm, enclosure "
          f"{fit.get('enclosure_pct', float('nan')):.2f} %")
    a = acquisition_fidelity(twin, size=args.size)
    print(f"acquisition pose: SSIM {a['ssim']:.4f}, PSNR "
          f"{'inf (identical)' if a.get('identical') else format(a['psnr_db'], '.2f') + ' dB'}")

    presets = args.presets or [p for p in PRESETS if p != "supine_arms_down"]
    print(f"{'target pose':22s} {'bone mean':>9s} {'bone max':>9s} {'worst bone':>22s} {'encl %':>7s} "
          f"{'SSIM ap':>8s} {'SSIM lat':>8s} {'PSNR ap':>8s} {'PSNR lat':>8s}")
    for name in presets:
        d = out / f"phantom_{name}"
        if not (d / "truth.json").is_file():
            write_phantom(d, pose=name, spacing=args.spacing, seed=args.seed)
        t = target_fidelity(twin, d, size=args.size)
        be = t["bone_err_mm"]
        print(f"{name:22s} {be['mean']:9.2f} {be['max']:9.2f} {be['worst']:>22s} {t['enclosure_pct']:7.2f} "
              f"{t['drr']['ap']['ssim']:8.4f} {t['drr']['lateral']['ssim']:8.4f} "
              f"{t['drr']['ap']['psnr_db']:8.2f} {t['drr']['lateral']['psnr_db']:8.2f}")

    # cost: a new pose (inverse warp + composition + render) against a static DRR of the same CT,
    # same view, in one run (best of 5); and AP + lateral of one pose (composed once) against two
    from ctwin.core.drr.projector import prepare_volume

    views = twin.default_views(size=args.size)
    g, g2 = views["ap"], views["lateral"]
    pose = PRESETS["walking_stride"]

    def best(f, reps=5):
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    ct = twin.ct
    pv = prepare_volume(ct)
    pv.occupancy()
    static = best(lambda: render_drr(ct, g))
    static_pv = best(lambda: render_drr(pv, g)) + best(lambda: render_drr(pv, g2))
    posed = best(lambda: twin.render(g, pose))

    def two():
        scene = twin.posed_scene(pose)
        from ctwin.core.twin.articulated import render_posed

        render_posed(scene, g)
        render_posed(scene, g2)

    posed2 = best(two)
    print(f"cost at {args.size}^2 (walking_stride): static {static:.3f} s, posed {posed:.3f} s "
          f"(ratio {posed / static:.2f}); AP + lateral: posed {posed2:.3f} s vs 2 static (ratio "
          f"{posed2 / (2 * static):.2f}; vs the render of a prepared CT {posed2 / static_pv:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
