"""Mid-coronal and mid-sagittal slices of the phantom at several presets -> docs/images/phantom_*.png.

Usage: .venv/bin/python benchmarks/phantom_images.py [--spacing 3] [--out docs/images] [--poses a,b,c]
The coronal plane passes through the femoral heads (y of the hip joints), the sagittal one through
x = 0 (the spine); both are read from the phantom's truth (joints), not hard-coded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")
from ctwin.core.phantom.phantom import generate_phantom  # noqa: E402

DEFAULT_POSES = ("supine_arms_down", "supine_arms_up", "sitting", "walking_stride", "arm_raised_forward")


def window(hu, lo=-1000.0, hi=1600.0):
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def slices(ph):
    ct = ph.ct
    inv = np.linalg.inv(ct.affine)
    hips = np.asarray(ph.truth["joints"])[[1, 2]].mean(0)
    j = int(round((inv[:3, :3] @ hips + inv[:3, 3])[1]))
    i = int(round((inv[:3, :3] @ np.array([0.0, 0.0, 0.0]) + inv[:3, 3])[0]))
    cor = ct.data[:, j, :].T[::-1]           # rows: superior at top; columns: patient right -> left
    sag = ct.data[i, :, :].T[::-1]           # columns: anterior -> posterior
    return window(cor.astype(np.float32)), window(sag.astype(np.float32))


def main(argv=None):
    from PIL import Image

    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    ap.add_argument("--poses", default=",".join(DEFAULT_POSES))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.poses.split(","):
        ph = generate_phantom(name, spacing=a.spacing, seed=0)
        cor, sag = slices(ph)
        h = max(cor.shape[0], sag.shape[0])
        pad = lambda im: np.pad(im, ((0, h - im.shape[0]), (0, 0)))  # noqa: E731
        img = np.concatenate([pad(cor), np.zeros((h, 6), np.uint8), pad(sag)], axis=1)
        p = out / f"phantom_{name}.png"
        Image.fromarray(img).save(p, optimize=True)
        print(f"{p}: {img.shape[1]}x{img.shape[0]} px, {p.stat().st_size / 1024:.0f} kB")


if __name__ == "__main__":
    main()
