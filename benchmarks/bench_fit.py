"""Benchmark of the body-model fit (issue 6): prints measured figures, asserts nothing.

Cases:
- phantoms: seeds (= body shapes) x acquisition presets (supine_arms_down / supine_arms_up), 3 mm;
  chamfer_mm, enclosure_pct (SPEC section 6), joint-centre error against truth.json's joints
  (mean over all 24 joints, and over the 22 without the hands), fit time;
- real CT abdomen_pelvis (partial FOV, 3 mm): chamfer_mm, enclosure_pct, fit time.
Targets (issue 6): phantom chamfer <= 5 mm, enclosure >= 99.5 %, mean joint error <= 15 mm;
real CT enclosure >= 99 %; <= 60 s per fit on 2 cores.

    .venv/bin/python benchmarks/bench_fit.py [--seeds 0 1 2 3 4] [--presets ...] [--cache DIR]

Phantoms are generated into --cache (default /tmp/ctwin_bench_fit) once and reused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

import numpy as np  # noqa: E402

from ctwin.core import progress  # noqa: E402
from ctwin.core.body_model import load_body_model  # noqa: E402
from ctwin.core.ct import load_ct  # noqa: E402
from ctwin.core.fit import fit_body_model  # noqa: E402
from ctwin.core.mesh import skin_mesh  # noqa: E402
from ctwin.core.segmentation import load_segmentation  # noqa: E402


def run_case(bm, ct_path, seg_path, truth=None):
    ct = load_ct(ct_path)
    labelmap, names = load_segmentation(seg_path, ct)
    skin = skin_mesh(ct)
    r = fit_body_model(bm, skin, labelmap, names)
    row = {"chamfer_mm": r.metrics.get("chamfer_mm"), "enclosure_pct": r.metrics.get("enclosure_pct"),
           "seconds": r.seconds, "arms": r.detected.get("arms"), "head_first": r.detected.get("head_first"),
           "position": r.detected.get("position")}
    if truth is not None:
        tj = np.asarray(truth["joints"], dtype=np.float64)
        err = np.linalg.norm(r.joints_mm - tj, axis=1)
        row["joint_err_mean_mm"] = float(err.mean())
        row["joint_err_mean22_mm"] = float(err[:22].mean())
        row["joint_err_max_mm"] = float(err.max())
        row["joint_err_per_joint_mm"] = err.round(1).tolist()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--presets", nargs="*", default=["supine_arms_down", "supine_arms_up"])
    ap.add_argument("--cache", default="/tmp/ctwin_bench_fit")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    progress.set_quiet(True)
    bm = load_body_model()
    rows = []
    hdr = f"{'case':34s} {'chamfer':>8s} {'encl%':>8s} {'jerr':>6s} {'jerr22':>6s} {'jmax':>6s} {'sec':>6s}  detected"
    print(hdr)
    for seed in a.seeds:
        for preset in a.presets:
            d = Path(a.cache) / f"{preset}_seed{seed}"
            if not (d / "truth.json").exists():
                from ctwin.core.phantom import write_phantom

                t0 = time.perf_counter()
                write_phantom(d, pose=preset, spacing=3.0, seed=seed)
                print(f"  (generated {d.name} in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            truth = json.loads((d / "truth.json").read_text())
            row = run_case(bm, d / "ct.nii.gz", d / "seg.nii.gz", truth)
            row["case"] = f"phantom {preset} seed {seed}"
            rows.append(row)
            print(f"{row['case']:34s} {row['chamfer_mm']:8.2f} {row['enclosure_pct']:8.2f} "
                  f"{row['joint_err_mean_mm']:6.1f} {row['joint_err_mean22_mm']:6.1f} {row['joint_err_max_mm']:6.1f} "
                  f"{row['seconds']:6.1f}  arms {row['arms']}, {row['position']}, head_first {row['head_first']}",
                  flush=True)
    if not a.no_real:
        d = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis"
        if d.exists():
            row = run_case(bm, d / "ct.nii.gz", d / "seg.nii.gz")
            row["case"] = "real_ct/abdomen_pelvis"
            rows.append(row)
            print(f"{row['case']:34s} {row['chamfer_mm']:8.2f} {row['enclosure_pct']:8.2f} {'-':>6s} {'-':>6s} "
                  f"{'-':>6s} {row['seconds']:6.1f}  arms {row['arms']}, {row['position']}, "
                  f"head_first {row['head_first']}")
    ph = [r for r in rows if r["case"].startswith("phantom")]
    if ph:
        print(f"phantom summary over {len(ph)} cases: chamfer mean {np.mean([r['chamfer_mm'] for r in ph]):.2f} "
              f"max {np.max([r['chamfer_mm'] for r in ph]):.2f} mm; enclosure min "
              f"{np.min([r['enclosure_pct'] for r in ph]):.2f} %; joint error mean "
              f"{np.mean([r['joint_err_mean_mm'] for r in ph]):.1f} mm (worst case "
              f"{np.max([r['joint_err_mean_mm'] for r in ph]):.1f}); fit time max "
              f"{np.max([r['seconds'] for r in ph]):.1f} s")
        names = json.loads((Path(a.cache) / f"{a.presets[0]}_seed{a.seeds[0]}" / "truth.json").read_text())["joint_names"]
        per = np.mean([r["joint_err_per_joint_mm"] for r in ph], axis=0)
        print("per-joint mean error (mm): " + ", ".join(f"{n} {e:.0f}" for n, e in zip(names, per)))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
