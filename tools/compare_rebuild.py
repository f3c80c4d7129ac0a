"""Compare this tree with an earlier one on the same CT: twin build and DRRs. Prints measured figures.

    git archive <commit> | tar -x -C /tmp/ctwin_old && ln -s "$PWD/.venv" /tmp/ctwin_old/.venv
    .venv/bin/python tools/compare_rebuild.py --old-tree /tmp/ctwin_old --ct ct.nii.gz --seg seg.nii.gz \
        --work /tmp/cmp [--old-twin DIR] [--pose walking_stride] [--size 256]

1. Builds the twin with each tree's ``./ctwin build --no-blend`` (``--old-twin`` reuses an old build).
2. Loads the OLD twin with both trees' ``./ctwin render`` (views ap and lateral, at the acquisition
   pose and at ``--pose``) and reports whether the DRRs are bit-identical.
3. Compares the two builds: fit chamfer (``fit.json``), the largest fitted-joint difference (mm),
   and the SSIM/PSNR (``core.meshes.metrics.drr_similarity``) of each build's DRRs rendered by its own tree.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

import numpy as np  # noqa: E402

from ctwin.core.meshes.metrics import drr_similarity  # noqa: E402
from ctwin.core.drr.projector import read_frame  # noqa: E402

VIEWS = ("ap", "lateral")


def ctwin(tree: Path, *args) -> None:
    cmd = [str(tree / "ctwin"), "--quiet", *map(str, args)]
    subprocess.run(cmd, check=True)


def build(tree: Path, ct, seg, out: Path) -> Path:
    if not (out / "twin.json").exists():
        ctwin(tree, "build", "--ct", ct, "--seg", seg, "--out", out, "--no-blend")
    return out


def render(tree: Path, twin: Path, out: Path, pose, size: int) -> dict:
    """{(pose, view): image} rendered by ``tree`` from ``twin``."""
    images = {}
    for p in (None, pose):
        for view in VIEWS:
            d = out / f"{p or 'acquisition'}_{view}"
            args = ["render", "--twin", twin, "--view", view, "--size", size, "--device", "cpu", "--out", d]
            if p:
                args += ["--pose", p]
            if not any(d.glob("*.tif")):
                ctwin(tree, *args)
            (tif,) = sorted(d.glob("*.tif"))
            images[(p or "acquisition", view)] = read_frame(tif.with_suffix(""))[0]
    return images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-tree", type=Path, required=True)
    ap.add_argument("--ct", required=True)
    ap.add_argument("--seg", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--old-twin", type=Path)
    ap.add_argument("--pose", default="walking_stride")
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    old_twin = a.old_twin or build(a.old_tree, a.ct, a.seg, a.work / "twin_old")
    new_twin = build(ROOT, a.ct, a.seg, a.work / "twin_new")

    old_on_old = render(a.old_tree, old_twin, a.work / "drr_oldcode_oldtwin", a.pose, a.size)
    new_on_old = render(ROOT, old_twin, a.work / "drr_newcode_oldtwin", a.pose, a.size)
    new_on_new = render(ROOT, new_twin, a.work / "drr_newcode_newtwin", a.pose, a.size)

    fo = json.loads((old_twin / "fit.json").read_text())
    fn = json.loads((new_twin / "fit.json").read_text())
    jd = np.linalg.norm(np.asarray(fo["joints_mm"]) - np.asarray(fn["joints_mm"]), axis=1)
    out = {
        "old_twin_bit_identical": {f"{p}/{v}": bool(np.array_equal(old_on_old[p, v], new_on_old[p, v]))
                                   for p, v in old_on_old},
        "chamfer_mm": {"old": fo["chamfer_mm"], "new": fn["chamfer_mm"],
                       "difference": abs(fo["chamfer_mm"] - fn["chamfer_mm"])},
        "enclosure_pct": {"old": fo["enclosure_pct"], "new": fn["enclosure_pct"]},
        "joints_max_difference_mm": float(jd.max()),
        "joints_mean_difference_mm": float(jd.mean()),
        "fit_seconds": {"old": fo["seconds"], "new": fn["seconds"]},
        "rebuilt_drr": {f"{p}/{v}": drr_similarity(new_on_new[p, v], old_on_old[p, v]) for p, v in old_on_old},
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
