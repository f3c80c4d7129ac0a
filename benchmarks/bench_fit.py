"""Benchmark of the body-model fit: prints measured figures, asserts nothing.

Cases:
- phantoms: seeds (= body shapes) x acquisition presets (supine_arms_down / supine_arms_up), 3 mm;
  chamfer_mm, enclosure_pct (SPEC section 6), joint-centre error against truth.json's joints
  (mean over all 24 joints, and over the 22 without the hands), fit time;
- real CT abdomen_pelvis (partial FOV, 3 mm): chamfer_mm, enclosure_pct, fit time;
- with --extra: prone feet-first phantoms and an abdomen-pelvis crop of a phantom (partial FOV).
Targets: phantom chamfer <= 5 mm, enclosure >= 99.5 %, mean joint error <= 15 mm;
real CT enclosure >= 99 %; <= 60 s per fit on 2 cores.

    .venv/bin/python benchmarks/bench_fit.py [--seeds 0 1 2 3 4] [--presets ...] [--cache DIR]
    .venv/bin/python benchmarks/bench_fit.py --old-tree DIR [--repeat 5]   # before vs after

``--old-tree`` (a ``git archive`` of an earlier commit) times the fit of the first phantom case
with that tree and with this one, interleaved, best of ``--repeat``, on the same inputs, and
prints both times, their ratio and the differences of the results (chamfer, fitted joints).

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

from ctwin.core import progress
from ctwin.core.body.body_model import load_body_model  # noqa: E402
from ctwin.core.volumes.ct import load_ct  # noqa: E402
from ctwin.core.body.fit import fit_body_model  # noqa: E402
from ctwin.core.meshes.mesh import skin_mesh  # noqa: E402
from ctwin.core.volumes.segmentation import load_segmentation  # noqa: E402


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


def run_volumes(bm, ct, labelmap, names, truth):
    from ctwin.core.meshes.mesh import skin_mesh as _skin

    r = fit_body_model(bm, _skin(ct), labelmap, names)
    tj = np.asarray(truth["joints"], dtype=np.float64)
    err = np.linalg.norm(r.joints_mm - tj, axis=1)
    lo, hi = ct.bbox_world()
    inside = (tj[:, 2] > lo[2]) & (tj[:, 2] < hi[2])
    return {"chamfer_mm": r.metrics.get("chamfer_mm"), "enclosure_pct": r.metrics.get("enclosure_pct"),
            "seconds": r.seconds, "arms": r.detected.get("arms"), "head_first": r.detected.get("head_first"),
            "position": r.detected.get("position"), "joint_err_mean_mm": float(err.mean()),
            "joint_err_mean22_mm": float(err[:22].mean()), "joint_err_max_mm": float(err.max()),
            "joint_err_in_fov_mm": float(err[inside].mean()) if inside.any() else float("nan")}


def extra_cases(bm):
    """Prone feet-first phantoms (orientation detection) and an abdomen-pelvis crop of the default
    phantom (partial FOV; joint error also over the joints inside the FOV)."""
    from ctwin.core.phantom.phantom import generate_phantom
    from ctwin.core.rig.poses import PRESETS
    from ctwin.core.body.skeleton import rotation_to_rotvec
    from ctwin.core.volumes.volume import Volume

    rows = []
    R = np.stack([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]], axis=1)  # left +x, head -z, front +y
    for preset in ("supine_arms_down", "supine_arms_up"):
        pose = PRESETS[preset].copy()
        pose[:3] = rotation_to_rotvec(R)
        ph = generate_phantom(pose=pose, spacing=3.0, seed=1)
        row = run_volumes(bm, ph.ct, ph.seg, ph.labels, ph.truth)
        row["case"] = f"phantom prone feet-first {preset[7:]} s1"
        rows.append(row)
    ph = generate_phantom(pose="supine_arms_up", spacing=3.0, seed=0)
    tj = np.asarray(ph.truth["joints"])
    z0, z1 = tj[1, 2] - 80.0, tj[6, 2] + 90.0  # below the femoral heads to above T12/L1
    k = (ph.ct.world_to_index([[0, 0, z0], [0, 0, z1]])[:, 2]).round().astype(int)
    k0, k1 = max(min(k), 0), min(max(k), ph.ct.shape[2])
    aff = ph.ct.affine.copy()
    aff[:3, 3] = ph.ct.index_to_world([0, 0, k0])
    ct = Volume(np.ascontiguousarray(ph.ct.data[:, :, k0:k1]), aff)
    seg = Volume(np.ascontiguousarray(ph.seg.data[:, :, k0:k1]), aff.copy())
    present = set(np.unique(seg.data).tolist())
    row = run_volumes(bm, ct, seg, {i: n for i, n in ph.labels.items() if i in present}, ph.truth)
    row["case"] = "phantom abdomen crop arms_up s0"
    rows.append(row)
    return rows


def compare_trees(old_tree: Path, case_dir: Path, repeat: int) -> None:
    import importlib.util

    ct = load_ct(case_dir / "ct.nii.gz")
    labelmap, names = load_segmentation(case_dir / "seg.nii.gz", ct)
    skin = skin_mesh(ct)
    spec = importlib.util.spec_from_file_location("ctwin_old", old_tree / "__init__.py",
                                                  submodule_search_locations=[str(old_tree)])
    old = importlib.util.module_from_spec(spec)
    sys.modules["ctwin_old"] = old
    spec.loader.exec_module(old)
    from ctwin_old.core import progress as old_progress
    try:  # core/ in concept subpackages
        from ctwin_old.core.body.body_model import load_body_model as old_load
        from ctwin_old.core.body.fit import fit_body_model as old_fit
    except ImportError:  # the flat core/ of earlier commits
        from ctwin_old.core.body_model import load_body_model as old_load
        from ctwin_old.core.fit import fit_body_model as old_fit

    old_progress.set_quiet(True)
    fits = {"old": (old_fit, old_load()), "new": (fit_body_model, load_body_model())}
    times, results = {"old": [], "new": []}, {}
    for i in range(repeat):
        for tag, (fit, bm) in fits.items():
            t0 = time.perf_counter()
            results[tag] = fit(bm, skin, labelmap, names)
            times[tag].append(time.perf_counter() - t0)
            print(f"  run {i + 1} {tag}: {times[tag][-1]:.1f} s", flush=True)
    o, n = results["old"], results["new"]
    dj = np.linalg.norm(np.asarray(o.joints_mm) - np.asarray(n.joints_mm), axis=1)
    print(f"fit of {case_dir.name}, best of {repeat}: old {min(times['old']):.1f} s, new {min(times['new']):.1f} s "
          f"(new/old {min(times['new']) / min(times['old']):.3f}); chamfer old {o.metrics['chamfer_mm']:.4f} "
          f"new {n.metrics['chamfer_mm']:.4f} mm; fitted joints differ by max {dj.max():.3f} mm, "
          f"mean {dj.mean():.4f} mm")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--presets", nargs="*", default=["supine_arms_down", "supine_arms_up"])
    ap.add_argument("--cache", default="/tmp/ctwin_bench_fit")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--extra", action="store_true", help="also prone feet-first phantoms and an abdomen crop")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--old-tree", type=Path, help="time this tree's fit against the tree at DIR instead")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    progress.set_quiet(True)
    if a.old_tree:
        d = Path(a.cache) / f"{a.presets[0]}_seed{a.seeds[0]}"
        if not (d / "truth.json").exists():
            from ctwin.core.phantom.phantom import write_phantom

            write_phantom(d, pose=a.presets[0], spacing=3.0, seed=a.seeds[0])
        compare_trees(a.old_tree, d, a.repeat)
        return
    bm = load_body_model()
    rows = []
    hdr = f"{'case':34s} {'chamfer':>8s} {'encl%':>8s} {'jerr':>6s} {'jerr22':>6s} {'jmax':>6s} {'sec':>6s}  detected"
    print(hdr)
    for seed in a.seeds:
        for preset in a.presets:
            d = Path(a.cache) / f"{preset}_seed{seed}"
            if not (d / "truth.json").exists():
                from ctwin.core.phantom.phantom import write_phantom

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
    if a.extra:
        for row in extra_cases(bm):
            rows.append(row)
            print(f"{row['case']:34s} {row['chamfer_mm']:8.2f} {row['enclosure_pct']:8.2f} "
                  f"{row['joint_err_mean_mm']:6.1f} {row['joint_err_mean22_mm']:6.1f} {row['joint_err_max_mm']:6.1f} "
                  f"{row['seconds']:6.1f}  arms {row['arms']}, {row['position']}, head_first {row['head_first']}"
                  f", joint error inside the FOV {row['joint_err_in_fov_mm']:.1f} mm", flush=True)
    if not a.no_real:
        d = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis"
        if d.exists():
            row = run_case(bm, d / "ct.nii.gz", d / "seg.nii.gz")
            row["case"] = "real_ct/abdomen_pelvis"
            rows.append(row)
            print(f"{row['case']:34s} {row['chamfer_mm']:8.2f} {row['enclosure_pct']:8.2f} {'-':>6s} {'-':>6s} "
                  f"{'-':>6s} {row['seconds']:6.1f}  arms {row['arms']}, {row['position']}, "
                  f"head_first {row['head_first']}")
    ph = [r for r in rows if r["case"].startswith("phantom") and "joint_err_per_joint_mm" in r]
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
