"""Segmentation labels as materials (core.drr.xray.label_codes, core.twin.label_materials): what an
override changes on the real pelvis CT's femoral implant, and what it costs on a plain CT and on a
posed articulated CT.

    .venv/bin/python benchmarks/bench_label_materials.py [--size 256] [--repeat 3]

The real abdomen/pelvis CT (shared/data/real_ct) has a metal implant in the left proximal femur that
TotalSegmentator does not label; here the implant is the voxels above 2000 HU within 15 mm of the
femur_left label, added as a label "implant" (a stand-in for a segmentation that has one).
1. AP at 80 kVp (ideal detector): line integral through the implant with the HU calibration (HU >= 3000
   is titanium at its density, 120-3000 HU bone) and with implant=cocr and implant=titanium; the
   implant's own voxels, the pixels it covers, the median difference there.
2. Cost, CPU: the plain CT rendered with and without the override (best of --repeat).
3. Cost, CPU: the articulated CT posed (left femur turned 20 degrees): composing the frame alone
   and with the override (one indicator scene per material), best of --repeat, new pose each time.
Timings are on whatever machine runs it (say whether it was loaded); only measured numbers are printed.
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

from scipy import ndimage  # noqa: E402

from ctwin.core.drr import xray  # noqa: E402
from ctwin.core.drr.carm import named_view  # noqa: E402
from ctwin.core.drr.projector import frame_volume, prepare_volume, xray_line_integral  # noqa: E402
from ctwin.core.body.skeleton import rodrigues  # noqa: E402
from ctwin.core.twin import articulated as A  # noqa: E402
from ctwin.core.twin.label_materials import LabelOverrides  # noqa: E402
from ctwin.core.volumes.ct import load_ct  # noqa: E402
from ctwin.core.volumes.segmentation import load_segmentation  # noqa: E402
from ctwin.core.volumes.volume import Volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis"


def best(fn, n):
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    ct = load_ct(DATA / "ct.nii.gz")
    lab, names = load_segmentation(DATA / "seg.nii.gz", ct)
    fid = next(i for i, n in names.items() if n == "femur_left")
    near = ndimage.distance_transform_edt(lab.data != fid, sampling=ct.spacing) <= 15.0
    implant = near & (np.asarray(ct.data) > 2000)
    data = np.asarray(lab.data).copy()
    data[implant] = 250
    lab = Volume(data, lab.affine)
    names = {**names, 250: "implant"}
    hu = np.asarray(ct.data)[implant]
    print(f"implant: {implant.sum()} voxels ({implant.sum() * np.prod(ct.spacing) / 1000:.1f} cm3), "
          f"HU median {np.median(hu):.0f}, max {hu.max()}, {np.mean(hu >= 3000) * 100:.0f} % >= 3000 HU")
    g = named_view("ap", ct, size=a.size)
    pv = prepare_volume(ct)
    li = {}
    for mat in (None, "cocr", "titanium"):
        setup = xray.XraySetup(kvp=80)
        vol = pv
        if mat:
            v, setup.overrides, setup.label_materials = xray.apply_label_materials(ct, lab, names, {"implant": mat})
            vol = prepare_volume(v)
        li[mat] = xray_line_integral(vol, g, setup, device="cpu")
    cover = np.abs(li["cocr"] - li[None]) > 1e-3
    print(f"AP {a.size}^2, 80 kVp: the implant covers {cover.sum()} pixels; -ln(I/I0) median there: "
          f"HU calibration {np.median(li[None][cover]):.3f}, implant=titanium {np.median(li['titanium'][cover]):.3f}, "
          f"implant=cocr {np.median(li['cocr'][cover]):.3f} (max {li[None][cover].max():.2f} / "
          f"{li['titanium'][cover].max():.2f} / {li['cocr'][cover].max():.2f})")
    setup = xray.XraySetup(kvp=80)
    t_plain = best(lambda i: xray_line_integral(pv, g, setup, device="cpu"), a.repeat)
    setup_o = xray.XraySetup(kvp=80)

    def with_override(i):
        v, setup_o.overrides, setup_o.label_materials = xray.apply_label_materials(ct, lab, names, {"implant": "cocr"})
        xray_line_integral(prepare_volume(v), g, setup_o, device="cpu")

    t_over = best(with_override, a.repeat)
    print(f"plain CT, AP {a.size}^2 80 kVp, CPU: {t_plain:.2f} s without, {t_over:.2f} s with implant=cocr "
          f"(override applied each time; {t_over / t_plain:.2f}x)")
    art = A.prepare_articulated(ct, lab, names)
    ov = LabelOverrides(art, lab, names, {"implant": "cocr"})
    part = next(p for p in art.parts if p.name == "femur_left")
    centre = part.affine[:3, :3] @ (np.asarray(part.data.shape) / 2.0) + part.affine[:3, 3]

    def pose(i):
        t = np.eye(4)
        r = rodrigues(np.array([np.radians(20.0 + i), 0.0, 0.0]))
        t[:3, :3] = r
        t[:3, 3] = centre - r @ centre
        return A.posed_scene(art, {"femur_left": t})

    t_frame = best(lambda i: frame_volume(pose(i)), a.repeat)
    t_ov = best(lambda i: ov.frame(pose(i + 100)), a.repeat)
    print(f"articulated CT, new pose (left femur turned), CPU: frame {t_frame:.2f} s, frame with the override "
          f"{t_ov:.2f} s ({t_ov / t_frame:.2f}x; posing included in both)")
    posed = ov.frame(pose(0))
    n = int(np.sum(posed.flat == xray.OVERRIDE_CODE0))
    print(f"posed implant: {n} voxels carry cocr ({n / max(implant.sum(), 1):.2f} of the label's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
