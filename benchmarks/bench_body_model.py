"""Measured figures of the built-in body model: generation/load/forward time, size, shape range,
agreement with smplx, how closely the regressed joints follow the shape space.

Run: .venv/bin/python benchmarks/bench_body_model.py  (uses a temporary cache; ~20 s)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")
from ctwin.core.body import body_model as bm
from ctwin.core import progress
from ctwin.core.body.skeleton import JOINT_INDEX  # noqa: E402


def main():
    import trimesh

    progress.set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CTWIN_CACHE"] = tmp
        t0 = time.perf_counter()
        path = bm.default_body_model_path()
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        pkl = bm.default_body_model_path(".pkl")
        t_pkl = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = bm.load_body_model()
        t_load = time.perf_counter() - t0
        print(f"generate + write .npz: {t_gen:.2f} s ({path.stat().st_size / 1e6:.1f} MB); "
              f".pkl twin: {t_pkl:.2f} s ({pkl.stat().st_size / 1e6:.1f} MB); load .npz: {t_load:.3f} s")

        mesh = trimesh.Trimesh(m.v_template, m.faces, process=False)
        ang = np.degrees(trimesh.triangles.angles(mesh.triangles).min(axis=1))
        print(f"vertices {len(m.v_template)}, faces {len(m.faces)}, watertight {mesh.is_watertight}, "
              f"winding consistent {mesh.is_winding_consistent}, euler {mesh.euler_number}, "
              f"volume {1000 * mesh.volume:.1f} L, height {np.ptp(m.v_template[:, 1]):.3f} m, "
              f"edge length mean {1000 * mesh.edges_unique_length.mean():.1f} mm, "
              f"min triangle angle p1/p50 {np.percentile(ang, 1):.1f}/{np.percentile(ang, 50):.1f} deg")
        nnz = (m.weights > 0).sum(axis=1)
        print("joints per vertex (count of vertices with 1..6):", np.bincount(nnz, minlength=7)[1:].tolist())

        for k, name in enumerate(bm.SHAPE_NAMES):
            row = []
            for b in (-3.0, 3.0):
                betas = np.zeros(m.num_betas)
                betas[k] = b
                v, j = m.rest(betas)
                vol = trimesh.Trimesh(v, m.faces, process=False).volume
                sh = np.linalg.norm(j[JOINT_INDEX["left_shoulder"]] - j[JOINT_INDEX["right_shoulder"]])
                hp = np.linalg.norm(j[JOINT_INDEX["left_hip"]] - j[JOINT_INDEX["right_hip"]])
                row.append(f"b={b:+.0f}: h {np.ptp(v[:, 1]):.3f} m, vol {1000 * vol:5.1f} L, "
                           f"shoulders {100 * sh:.1f} cm, hips {100 * hp:.1f} cm")
            print(f"  {name:15s} " + " | ".join(row))

        designed = bm._rest_joints()
        offs = [bm._shape_joint_offsets(bm._shape_component(k, designed), designed) for k in range(10)]
        rng = np.random.default_rng(0)
        errs = []
        for betas in rng.uniform(-3, 3, size=(200, 10)):
            want = designed + sum(b * o for b, o in zip(betas, offs))
            errs.append(np.linalg.norm(m.rest(betas)[1] - want, axis=1).max())
        print(f"regressed vs designed joints, 200 random betas in [-3, 3]: max over joints, "
              f"median {1000 * np.median(errs):.2f} mm, max {1000 * np.max(errs):.2f} mm")

        pose = rng.normal(scale=0.4, size=72)
        betas = rng.normal(size=10)
        m.forward(pose, betas)
        t0 = time.perf_counter()
        n = 20
        for _ in range(n):
            m.forward(pose, betas, np.zeros(3))
        print(f"BodyModel.forward (numpy float64): {1000 * (time.perf_counter() - t0) / n:.1f} ms per call")

        try:
            import torch
        except ImportError:
            print("smplx comparison skipped: torch not installed")
            return
        import smplx

        sm = smplx.create(str(pkl), num_betas=10, dtype=torch.float64, batch_size=16)
        poses = rng.normal(scale=0.5, size=(16, 72))
        bs = rng.uniform(-3, 3, size=(16, 10))
        out = sm(betas=torch.tensor(bs), global_orient=torch.tensor(poses[:, :3]),
                 body_pose=torch.tensor(poses[:, 3:]), transl=torch.zeros(16, 3, dtype=torch.float64))
        dv = max(np.abs(out.vertices[i].detach().numpy() * 1000 - m.forward(poses[i], bs[i])[0]).max()
                 for i in range(16))
        print(f"max |smplx - BodyModel.forward| over 16 random poses/shapes: {dv:.2e} mm")


if __name__ == "__main__":
    main()
