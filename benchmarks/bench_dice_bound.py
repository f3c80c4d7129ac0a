"""The best Dice a perfectly rigid thin bone can reach at a given voxel size (the phantom's rigidity check).

    .venv/bin/python benchmarks/bench_dice_bound.py [--spacing 3] [--trials 6]

An ideal capsule (a bone shaft: radius r, length 40 mm) is rasterised twice, under two random rigid
placements, exactly as the phantom labels voxels but better (coverage from 6^3 sub-voxel samples,
label = coverage >= 0.5); then placement A's label is mapped by T_B inv(T_A) onto B's grid as in
tests/test_phantom.py (A's mask resampled trilinearly at the pulled-back voxel centres of B,
threshold 0.5) and scored by Dice. The shape is exactly rigid, so every point lost is the grid's:
this is an upper bound for any phantom's bones of that thickness. Prints Dice per diameter.
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

SUB = 6
HALF_LENGTH = 20.0


def rasterise(T, radius, h, n):
    g = (np.arange(n) - n / 2 + 0.5) * h
    off = (np.arange(SUB) + 0.5) / SUB * h - h / 2
    X, Y, Z = np.meshgrid(g, g, g, indexing="ij")
    cov = np.zeros(X.shape)
    Ti = np.linalg.inv(T)
    for a in off:
        for b in off:
            for c in off:
                p = np.stack([X + a, Y + b, Z + c], -1) @ Ti[:3, :3].T + Ti[:3, 3]
                zc = np.clip(p[..., 2], -HALF_LENGTH, HALF_LENGTH)
                cov += np.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2 + (p[..., 2] - zc) ** 2) < radius
    return cov / SUB ** 3 >= 0.5


def mapped_dice(A, B, TA, TB, h, n):
    idx = np.argwhere(ndimage.binary_dilation(B, iterations=2))
    m = TA @ np.linalg.inv(TB)
    xa = (idx + 0.5 - n / 2) * h @ m[:3, :3].T + m[:3, 3]
    mapped = ndimage.map_coordinates(A.astype(np.float32), (xa / h + n / 2 - 0.5).T, order=1) >= 0.5
    return 2.0 * np.sum(mapped & B[tuple(idx.T)]) / (mapped.sum() + B.sum())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--trials", type=int, default=6)
    args = ap.parse_args()
    h = args.spacing
    n = int(np.ceil((2 * HALF_LENGTH + 30) / h)) + 4
    rng = np.random.default_rng(0)

    def placement():
        T = np.eye(4)
        T[:3, :3] = Rotation.random(random_state=rng).as_matrix()
        T[:3, 3] = rng.uniform(-h, h, 3)
        return T

    print(f"ideal rigid capsule, {h} mm voxels, {args.trials} random placement pairs")
    for diam in (4, 6, 8, 10, 12, 16, 20):
        d = []
        for _ in range(args.trials):
            TA, TB = placement(), placement()
            d.append(mapped_dice(rasterise(TA, diam / 2, h, n), rasterise(TB, diam / 2, h, n), TA, TB, h, n))
        print(f"diameter {diam:3d} mm ({diam / h:4.1f} voxels): Dice mean {np.mean(d):.3f}  min {np.min(d):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
