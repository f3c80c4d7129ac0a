"""Measure the build's CT/segmentation plausibility check (core.volumes.plausibility) on aligned and
misregistered pairs: the real CTs of ../shared/data/real_ct and a 10 mm phantom, with the CT's origin
shifted by 0-113 mm. Prints, per case, the bone labels' median HU, the fraction above 150 HU, the
verdict and the estimated offset. Run: .venv/bin/python benchmarks/bench_plausibility.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package()
from ctwin.core import progress
from ctwin.core.volumes.ct import load_ct  # noqa: E402
from ctwin.core.volumes.plausibility import ct_segmentation_findings  # noqa: E402
from ctwin.core.volumes.segmentation import load_segmentation  # noqa: E402
from ctwin.core.volumes.volume import Volume  # noqa: E402

progress.set_quiet(True)
REAL = ROOT.parent / "shared" / "data" / "real_ct"


def cases():
    if REAL.exists():
        yield "abdomen_pelvis", REAL / "abdomen_pelvis" / "ct.nii.gz", REAL / "abdomen_pelvis" / "seg.nii.gz"
        yield "chest_dicom", REAL / "chest_dicom" / "dicom", REAL / "chest_dicom" / "seg.nii.gz"
    from ctwin.core.phantom.phantom import write_phantom

    d = Path(tempfile.mkdtemp())
    write_phantom(d, spacing=10.0, seed=0)
    yield "phantom_10mm", d / "ct.nii.gz", d / "seg.nii.gz"


print(f"{'case':16s} {'shift mm':>9s} {'median HU':>9s} {'>150 HU':>8s} {'verdict':8s} {'s':>5s}  estimated offset mm")
for name, ctp, segp in cases():
    ct = load_ct(ctp)
    for shift in (0, 14, 28, 57, 113):
        a = ct.affine.copy()
        a[:3, 3] += [shift / 2 ** 0.5, shift / 2 ** 0.5, 0.0]  # diagonal in x and y
        c2 = Volume(ct.data, a, dict(ct.meta))
        lab, names = load_segmentation(segp, c2)
        t0 = time.perf_counter()
        problems, m = ct_segmentation_findings(c2, lab, names, lab.meta.get("outside_labels", ()))
        dt = time.perf_counter() - t0
        off = m.get("bone_centroid_offset_mm")
        print(f"{name:16s} {shift:9d} {m.get('bone_median_hu', float('nan')):9.0f} "
              f"{100 * m.get('bone_fraction_above_150_hu', float('nan')):7.1f}% "
              f"{'refused' if problems else 'ok':8s} {dt:5.2f}  {off and [round(v) for v in off]}")
