"""Import benchmark: time to read, resolve and mesh a CT + segmentation (core.meshes.mesh.import_anatomy).

    .venv/bin/python benchmarks/bench_import.py [--phantom-spacing 3] [--real [--budget N]] [--out DIR]

Prints measured numbers: per-step and total seconds, structures, triangles, the worst mesh volume
error against the voxel volume, non-manifold edges. Parts:
  - the 3 mm phantom (core.phantom.phantom.write_phantom), target < 30 s on 2 cores; skipped with a
    message when core.phantom.phantom does not exist yet;
  - with --real, the real CTs in ../shared/data/real_ct (abdomen_pelvis, chest_dicom).
The numba kernels are compiled (or loaded from cache) before timing.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

import numpy as np  # noqa: E402

from ctwin.core import progress
from ctwin.core.volumes.ct import load_ct  # noqa: E402
from ctwin.core.meshes.mesh import label_meshes, skin_mesh  # noqa: E402
from ctwin.core.volumes.segmentation import load_segmentation  # noqa: E402
from ctwin.core.volumes.volume import Volume  # noqa: E402


def warm_up():
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    label_meshes(Volume(lab, np.eye(4)), {1: "spleen"})


def bench(label: str, ct_path, seg_path, budget: int | None = None) -> dict:
    t = {}
    c0 = time.process_time()
    t0 = time.perf_counter()
    ct = load_ct(ct_path)
    t["read_ct"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    lab, names = load_segmentation(seg_path, ct)
    t["read_seg"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    meshes = label_meshes(lab, names)
    t["label_meshes"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    skin = skin_mesh(ct)
    t["skin"] = time.perf_counter() - t3
    t["total"] = time.perf_counter() - t0
    t["cpu"] = time.process_time() - c0
    load = __import__("os").getloadavg()[0]
    vox = float(np.prod(ct.spacing))
    counts = np.bincount(lab.data.reshape(-1))
    errs = [abs(meshes[n].volume() / (counts[i] * vox) - 1) for i, n in names.items() if n in meshes]
    big = [abs(meshes[n].volume() / (counts[i] * vox) - 1) for i, n in names.items()
           if n in meshes and counts[i] * vox > 5000]
    tris = sum(m.n_faces for m in meshes.values())
    nonman = sum(m.nonmanifold_edges() for m in meshes.values())
    closed = all(m.is_closed() for m in meshes.values()) and skin.is_closed()
    print(f"{label}: grid {ct.shape} @ {np.round(ct.spacing, 2).tolist()} mm, {len(names)} labels -> "
          f"{len(meshes)} meshes, {tris} triangles (+ skin {skin.n_faces}); all closed: {closed}")
    print("  wall seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "cpu")
          + f"; process CPU seconds {t['cpu']:.2f}; load average {load:.1f} on {__import__('os').cpu_count()} cores")
    print(f"  volume error vs voxels: worst {100 * max(errs):.2f} % (all), "
          f"worst {100 * max(big, default=0):.2f} % (> 5 cm^3, {len(big)} structures); "
          f"non-manifold edges {nonman}")
    if budget:
        td = time.perf_counter()
        dec = label_meshes(lab, names, max_triangles=budget)
        td = time.perf_counter() - td
        derr = [abs(dec[n].volume() / (counts[i] * vox) - 1) for i, n in names.items() if n in dec]
        dbig = [abs(dec[n].volume() / (counts[i] * vox) - 1) for i, n in names.items()
                if n in dec and counts[i] * vox > 5000]
        print(f"  decimated to budget {budget}: {sum(m.n_faces for m in dec.values())} triangles, "
              f"{len(dec)}/{len(names)} structures kept, all closed: "
              f"{all(m.is_closed() for m in dec.values())}, {td:.2f} s; volume error median "
              f"{100 * np.median(derr):.2f} %, worst {100 * max(derr):.2f} % "
              f"(> 5 cm^3: worst {100 * max(dbig, default=0):.2f} %)")
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantom-spacing", type=float, default=3.0)
    ap.add_argument("--real", action="store_true", help="also time the real CTs in ../shared")
    ap.add_argument("--budget", type=int, default=None,
                    help="also decimate the real CTs' label meshes to this many triangles")
    ap.add_argument("--out", help="keep the generated phantom here and reuse it on the next run "
                                  "(default: a temp folder)")
    args = ap.parse_args()
    progress.set_quiet(True)
    import numba

    print(f"numba threads: {numba.config.NUMBA_NUM_THREADS}; cores: {__import__('os').cpu_count()}")
    t0 = time.perf_counter()
    warm_up()
    print(f"numba warm-up (compile or cache load): {time.perf_counter() - t0:.2f} s")
    try:
        from ctwin.core.phantom.phantom import write_phantom
    except ImportError as exc:
        print(f"phantom: skipped (core.phantom.phantom not available: {exc})")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(args.out or tmp) / "phantom"
            if (d / "seg.nii.gz").exists() and (d / "ct.nii.gz").exists():
                print(f"phantom: reusing {d}")
            else:
                tg = time.perf_counter()
                write_phantom(d, spacing=args.phantom_spacing)
                print(f"phantom generation ({args.phantom_spacing} mm, not part of the import): "
                      f"{time.perf_counter() - tg:.1f} s")
            t = bench(f"phantom {args.phantom_spacing} mm", d / "ct.nii.gz", d / "seg.nii.gz")
            print(f"  import target < 30 s: {'met' if t['total'] < 30 else 'NOT met'} ({t['total']:.1f} s)")
    if args.real:
        real = ROOT.parent / "shared" / "data" / "real_ct"
        if not real.exists():
            print(f"real CTs: skipped ({real} not found)")
        else:
            bench("abdomen_pelvis", real / "abdomen_pelvis" / "ct.nii.gz", real / "abdomen_pelvis" / "seg.nii.gz",
                  args.budget)
            bench("chest_dicom", real / "chest_dicom" / "dicom", real / "chest_dicom" / "seg.nii.gz")


if __name__ == "__main__":
    main()
