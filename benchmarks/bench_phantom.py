"""Phantom generation speed, memory and rigidity figures (measured, printed; never run by the tests).

Usage: .venv/bin/python benchmarks/bench_phantom.py [--spacing 3] [--poses supine_arms_down,sitting]
                                                    [--dice] [--fine]
Prints, per pose: grid, wall and CPU seconds of generate_phantom (numba compile excluded: a warm-up
at 8 mm runs first), peak RSS of the process, bytes of the arrays. ``--dice``: Dice of every bone
between supine_arms_down and a pose in which every bone moves (T_B @ inv(T_A) mapping, the test's
measure) at 3 mm: min / median and the bones below 0.9. ``--fine``: the same at 1.5 mm on the hand.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
from launch import load_package  # noqa: E402

load_package("ctwin")
from ctwin.core import progress
from ctwin.core.phantom.phantom import generate_phantom  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--poses", default="supine_arms_down,supine_arms_up,sitting,walking_stride")
    ap.add_argument("--subsamples", type=int, default=2)
    ap.add_argument("--dice", action="store_true")
    ap.add_argument("--fine", action="store_true")
    a = ap.parse_args(argv)
    progress.set_quiet(True)
    t0 = time.perf_counter()
    generate_phantom("supine_arms_down", spacing=8.0)
    print(f"warm-up (numba compile or cache load + 8 mm): {time.perf_counter() - t0:.1f} s")
    for pose in a.poses.split(","):
        w0, c0 = time.perf_counter(), time.process_time()
        ph = generate_phantom(pose, spacing=a.spacing, subsamples=a.subsamples)
        w, c = time.perf_counter() - w0, time.process_time() - c0
        n = ph.ct.shape
        mb = (ph.ct.data.nbytes + ph.seg.data.nbytes) / 2**20
        print(f"{pose:20s} {a.spacing:g} mm grid {n[0]}x{n[1]}x{n[2]} ({np.prod(n) / 1e6:.1f} M voxels): "
              f"wall {w:.1f} s, cpu {c:.1f} s, arrays {mb:.0f} MB, peak RSS {peak_rss_mb():.0f} MB, "
              f"{len(ph.labels)} labels, {len(ph.truth['bones'])} bones")
    if a.dice or a.fine:
        import importlib.util

        spec = importlib.util.spec_from_file_location("tp", ROOT / "tests" / "test_phantom.py")
        sys.modules.setdefault("pytest", __import__("pytest"))
        tp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tp)
    if a.dice:
        pa = generate_phantom("supine_arms_down", spacing=3.0)
        pb = generate_phantom(tp._moved_pose(), spacing=3.0, transl=tp.MOVED_TRANSL)
        ia = {v: k for k, v in pa.labels.items()}
        ib = {v: k for k, v in pb.labels.items()}
        d = {n: tp._dice_mapped(pa.seg, ia[n], pa.truth["bones"][n], pb.seg, ib[n], pb.truth["bones"][n])
             for n in pa.truth["bones"]}
        v = np.array(list(d.values()))
        print(f"Dice at 3 mm over {len(d)} bones: min {v.min():.3f}, median {np.median(v):.3f}, "
              f"{(v >= 0.9).sum()} >= 0.9")
        print("  below 0.9:", ", ".join(f"{k} {x:.3f}" for k, x in sorted(d.items(), key=lambda kv: kv[1]) if x < 0.9))
    if a.fine:
        for name in ("phalanges_hand_left", "metacarpal_left", "carpal_left", "vertebrae_C3", "rib_left_6"):
            pa = generate_phantom("supine_arms_down", spacing=3.0)
            pts = pa.seg.voxel_centers_world(pa.seg.data == {v: k for k, v in pa.labels.items()}[name])
            lo, hi = pts.min(0) - 12.0, pts.max(0) + 12.0
            ta = np.asarray(pa.truth["bones"][name])
            full_b = generate_phantom(tp._moved_pose(), spacing=8.0, transl=tp.MOVED_TRANSL)
            tb = np.asarray(full_b.truth["bones"][name])
            c = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            m = tb @ np.linalg.inv(ta)
            cb = c @ m[:3, :3].T + m[:3, 3]
            fa = generate_phantom("supine_arms_down", spacing=1.5, roi_mm=(lo, hi))
            fb = generate_phantom(tp._moved_pose(), spacing=1.5, transl=tp.MOVED_TRANSL, roi_mm=(cb.min(0), cb.max(0)))
            da = tp._dice_mapped(fa.seg, {v: k for k, v in fa.labels.items()}[name], ta,
                                 fb.seg, {v: k for k, v in fb.labels.items()}[name], tb)
            print(f"Dice at 1.5 mm (region) {name}: {da:.3f}")


if __name__ == "__main__":
    main()
