"""Probe run by tools/compare_versions.py inside one tree (this one or an earlier commit's).

    python tools/_version_probe.py render TWIN OUT.npz SIZE POSE [POSE ...]
    python tools/_version_probe.py time TWIN SIZE SEED

Imports go through the public names that both layouts have (the flat core/ of earlier commits and
the core/ subpackages), so that the same probe runs in both. The last stdout line is JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import load_package  # noqa: E402

load_package("ctwin")
try:  # core/ in concept subpackages
    from ctwin.core.drr.projector import render_drr  # noqa: E402
    from ctwin.core.twin.twin import load_twin  # noqa: E402
except ImportError:  # the flat core/ of earlier commits
    from ctwin.core.projector import render_drr  # noqa: E402
    from ctwin.core.twin import load_twin  # noqa: E402


def jittered_walk(twin, seed: int, deg: float = 2.0) -> np.ndarray:
    """walking_stride with a seeded ``deg``-degree rotation about a random axis on joints 1-23."""
    from scipy.spatial.transform import Rotation

    pose, _ = twin.resolve_pose("walking_stride")
    p = np.array(pose, dtype=np.float64).reshape(24, 3)
    rng = np.random.default_rng(1000 + seed)
    for j in range(1, 24):
        axis = rng.normal(size=3)
        jit = Rotation.from_rotvec(np.radians(deg) * axis / np.linalg.norm(axis))
        p[j] = (Rotation.from_rotvec(p[j]) * jit).as_rotvec()
    return p.reshape(-1)


def main(argv) -> dict:
    mode, twin_dir = argv[0], argv[1]
    twin = load_twin(twin_dir)
    if mode == "render":
        out, size, poses = argv[2], int(argv[3]), argv[4:]
        images = {}
        for view, g in twin.default_views(size=size).items():
            images[f"static_{view}"] = render_drr(twin.ct, g, device="cpu")
            images[f"acquisition_{view}"] = twin.render(g, device="cpu")
            for name in poses:
                pose, transl = twin.resolve_pose(name)
                images[f"{name}_{view}"] = twin.render(g, pose, transl, device="cpu")
        np.savez(out, **images)
        return {"images": len(images)}
    size, seed = int(argv[2]), int(argv[3])
    g = twin.default_views(size=size)["ap"]
    render_drr(twin.ct, g, device="cpu")
    twin.render(g, jittered_walk(twin, 999), device="cpu")  # compile / load kernels
    t0 = time.perf_counter()
    render_drr(twin.ct, g, device="cpu")
    t1 = time.perf_counter()
    twin.render(g, jittered_walk(twin, seed), device="cpu")
    t2 = time.perf_counter()
    return {"static_drr": t1 - t0, "new_pose_drr": t2 - t1}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
