"""``ctwin dataset`` throughput (prints measured numbers).

    .venv/bin/python benchmarks/bench_dataset.py [--work DIR] [--samples 32] [--size 128]
        [--render-calls 2] [--twin DIR]

One twin (the 8 mm phantom, built once into ``--work``, or ``--twin``), ``--samples`` samples
(three presets, AP/lateral, masks and points), shards of 4, in one run:

- Ray, 1 worker x 1 numba thread; 2 workers x 1 thread; 1 worker x 2 threads. Each from a fresh
  output folder (the twin is reused). Reported: steady samples/s (after every worker has written
  its first shard, so start-up and kernel compilation are excluded), the end-to-end rate, time to
  the first shard (Ray start, actor start, twin load, compilation, four samples), worker RSS.
- A loop of ``ctwin render --twin`` calls, one per sample (same twin, pose, view and size; a
  subset of ``--render-calls`` samples, each call a new process): seconds per call.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")
from ctwin.core.dataset import dataset as D
from ctwin.core import progress


def spec_for(work: Path, twin: Path, samples: int, size: int) -> Path:
    spec = {"seed": 0, "samples_per_twin": samples, "shard_size": 4, "inputs": {"twins": [str(twin)]},
            "poses": {"presets": ["supine_arms_down", "hip_flexion", "knee_flexion"]},
            "views": {"named": ["ap", "lateral"], "size": size}}
    p = work / "bench_spec.json"
    p.write_text(json.dumps(spec))
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/ctwin_bench_dataset")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--render-calls", type=int, default=2)
    ap.add_argument("--twin", default=None)
    ap.add_argument("--configs", default="1x1,2x1,1x2", help="WORKERSxTHREADS,...")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    progress.set_quiet(True)
    if a.twin:
        twin = Path(a.twin)
    else:
        twin = work / "twins" / "phantom_s0_8mm_supine_arms_down"
        if not (twin / "twin.json").is_file():
            t = time.perf_counter()
            D.build_one_twin(work, {"kind": "phantom", "seed": 0, "spacing_mm": 8.0, "pose": "supine_arms_down",
                                    "noise_hu": 0.0, "name": twin.name})
            print(f"twin built in {time.perf_counter() - t:.1f} s")
    spec_path = spec_for(work, twin, a.samples, a.size)
    spec = D.load_spec(spec_path)
    rows = {}
    for cfg in a.configs.split(","):
        w, t = (int(x) for x in cfg.split("x"))
        out = work / f"run_{cfg}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        s = D.run_dataset(spec_path, out, workers=w, threads=t)
        wall = time.perf_counter() - t0
        rows[cfg] = s
        rss = ", ".join(f"{v:.0f}" for v in s.get("worker_rss_mb", {}).values())
        print(f"{w} worker(s) x {t} thread(s): steady {s['steady_samples_per_s'] or float('nan'):.2f} samples/s, "
              f"end-to-end {s['samples'] / wall:.3f} samples/s ({s['samples']} samples in {wall:.1f} s), "
              f"first shard after {s['first_shard_s']:.1f} s (from actor start), worker RSS MB [{rss}]",
              flush=True)
    # the same samples through a loop of `ctwin render` calls
    per_call = []
    for i in range(min(a.render_calls, a.samples)):
        p = D.sample_params(spec, i)
        out = work / "render_loop"
        shutil.rmtree(out, ignore_errors=True)
        view = p["view"]["name"]
        cmd = [str(ROOT / "ctwin"), "--quiet", "render", "--twin", str(twin), "--pose", p["pose"]["name"],
               "--view", view, "--size", str(a.size), "--out", str(out), "--device", "cpu"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        per_call.append(time.perf_counter() - t0)
        if r.returncode != 0:
            print(r.stderr)
            return 1
        # the loop renders the same image as the dataset (annotations aside)
        import tifffile

        from ctwin.core.dataset.shards import iter_samples

        ref = next(x for x in iter_samples(work / f"run_{a.configs.split(',')[0]}") if x["key"] == p["key"])
        same = (tifffile.imread(out / f"{view}_0000.tif") == ref["image"]).all()
        print(f"ctwin render call {i}: {per_call[-1]:.1f} s, image identical to the dataset's: {bool(same)}",
              flush=True)
    loop_rate = len(per_call) / sum(per_call) if per_call else None
    one = rows.get("1x1")
    print("\nsummary (machine load: see uptime below)")
    for cfg, s in rows.items():
        print(f"  {cfg}: steady {s['steady_samples_per_s'] or float('nan'):.3f} samples/s")
    if one and rows.get("2x1") and one["steady_samples_per_s"] and rows["2x1"]["steady_samples_per_s"]:
        print(f"  2 workers / 1 worker (1 thread each): {rows['2x1']['steady_samples_per_s'] / one['steady_samples_per_s']:.2f}x")
    if loop_rate:
        print(f"  ctwin render loop: {loop_rate:.4f} samples/s ({sum(per_call) / len(per_call):.1f} s per call)")
    if one and one["steady_samples_per_s"] and loop_rate:
        print(f"  1 worker steady / render loop: {one['steady_samples_per_s'] / loop_rate:.1f}x")
        e2e = one["samples"] / one["seconds"]
        print(f"  1 worker end-to-end (start-up and compilation included) / render loop: {e2e / loop_rate:.1f}x")
    print("  " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
