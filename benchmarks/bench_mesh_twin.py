"""Mesh mode figures on the phantom: a twin built from meshes only (no CT) against the phantom CT.

    .venv/bin/python benchmarks/bench_mesh_twin.py [--spacing 3] [--mesh-spacing 3] [--size 512]
        [--presets hip_flexion knee_flexion walking_stride] [--out /tmp/bench_mesh_twin] [--real]

1. The phantom at the acquisition pose is generated, and its anatomy imported as meshes
   (``core.meshes.mesh.import_anatomy``: one closed mesh per label and the skin), written as PLY files:
   the mesh folder. The CT is not used again except as the reference.
2. Voxelisation of the whole set (time, triangles, grid), and the static DRR of the synthetic CT
   (default HU table) against the phantom CT's DRR.
3. ``build_twin_from_meshes`` (default table), time; its DRR through the articulated path at the
   acquisition pose against the phantom CT's DRR (SPEC section 6 similarity, AP and lateral).
4. For each target preset: the phantom generated there, the mesh twin posed to it (the truth's
   translation change carried over, as ``ctwin evaluate`` does), bone error (SPEC section 6) and
   DRR similarity; the time of a posed DRR against a static DRR of the synthetic CT.
5. ``--real``: the real abdomen CT's anatomy (its TotalSegmentator labels and skin) as meshes,
   voxelised with the default table, against the CT's DRR with the table outside the body set to
   air (the meshes have no table). The real remainder inside the body and outside the labels (fat
   and muscle) is printed beside the default -50 HU.
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


def _fmt(s):
    return f"SSIM {s['ssim']:.4f} PSNR {s['psnr_db']:6.2f} dB"


def main() -> int:
    from ctwin.core import progress
    from ctwin.core.twin.articulated import render_posed
    from ctwin.core.drr.carm import default_views
    from ctwin.core.volumes.ct import load_ct
    from ctwin.core.fileio import read_json
    from ctwin.core.meshes.mesh import import_anatomy, write_ply
    from ctwin.core.meshes.mesh_volume import hu_table, read_mesh_folder, voxelise_meshes
    from ctwin.core.meshes.metrics import drr_similarity
    from ctwin.core.phantom.phantom import write_phantom
    from ctwin.core.drr.projector import render_drr
    from ctwin.core.twin.twin import build_twin_from_meshes, load_twin

    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", type=float, default=3.0, help="phantom voxel size, mm")
    ap.add_argument("--mesh-spacing", type=float, default=3.0, help="synthetic CT voxel size, mm")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", nargs="*", default=["hip_flexion", "knee_flexion", "walking_stride"])
    ap.add_argument("--out", default="/tmp/bench_mesh_twin")
    ap.add_argument("--real", action="store_true", help="also the real abdomen CT (../shared/data/real_ct)")
    args = ap.parse_args()
    progress.set_quiet(True)
    out = Path(args.out)
    if args.real:
        real_ct(args)

    def phantom(pose):
        d = out / f"phantom_{pose}"
        if not (d / "truth.json").is_file():
            write_phantom(d, pose=pose, spacing=args.spacing, seed=args.seed)
        return d

    acq = phantom("supine_arms_down")
    mesh_dir = out / "meshes"
    if not (mesh_dir / "skin.ply").is_file():
        ct, labelmap, names, meshes, skin = import_anatomy(acq / "ct.nii.gz", acq / "seg.nii.gz")
        mesh_dir.mkdir(parents=True, exist_ok=True)
        for n, m in meshes.items():
            write_ply(m, mesh_dir / f"{n}.ply")
        write_ply(skin, mesh_dir / "skin.ply")
    ct_a = load_ct(acq / "ct.nii.gz")
    views = default_views(ct_a, size=args.size)
    refs = {n: render_drr(ct_a, g) for n, g in views.items()}

    meshes = read_mesh_folder(mesh_dir)
    ntri = sum(m.n_faces for m in meshes.values())
    voxelise_meshes(meshes, spacing=args.mesh_spacing * 4)  # compile / load the kernels first
    t = time.perf_counter()
    table = hu_table(meshes)
    r = voxelise_meshes(meshes, table, spacing=args.mesh_spacing)
    tv = time.perf_counter() - t
    print(f"mesh set: {len(meshes)} meshes, {ntri} triangles (phantom {args.spacing:g} mm)")
    print(f"voxelisation: {tv:.2f} s onto {'x'.join(map(str, r.ct.shape))} voxels of {args.mesh_spacing:g} mm")
    for n, g in views.items():
        print(f"static synthetic CT, default HU table, {n:8s}: {_fmt(drr_similarity(render_drr(r.ct, g), refs[n]))}")

    twin_dir = out / f"mesh_twin_{args.mesh_spacing:g}"
    t = time.perf_counter()
    build_twin_from_meshes(mesh_dir, twin_dir, spacing=args.mesh_spacing)
    print(f"mesh twin build (default table, no twin.blend): {time.perf_counter() - t:.1f} s")
    twin = load_twin(twin_dir)
    for n, g in views.items():
        print(f"mesh twin, acquisition pose (articulated path), {n:8s}: {_fmt(drr_similarity(twin.render(g), refs[n]))}")

    truth_a = read_json(acq / "truth.json")
    meshes_t = twin.meshes(include_skin=False)
    print(f"{'target pose':16s} {'bone mean':>9s} {'bone max':>9s} {'SSIM ap':>8s} {'SSIM lat':>8s} "
          f"{'PSNR ap':>8s} {'PSNR lat':>8s}")
    t_posed = t_static = None
    for preset in args.presets:
        d = phantom(preset)
        truth_b = read_json(d / "truth.json")
        pose_b = np.asarray(truth_b["pose"], dtype=np.float64)
        transl = twin.transl0_mm + np.asarray(truth_b["transl"]) - np.asarray(truth_a["transl"])
        errs = []
        for n, T in twin.bone_transforms(pose_b, transl).items():
            if n in truth_a["bones"] and n in truth_b["bones"] and n in meshes_t:
                v = meshes_t[n].vertices
                ex = np.asarray(truth_b["bones"][n]) @ np.linalg.inv(np.asarray(truth_a["bones"][n]))
                errs.append(np.linalg.norm(v @ T[:3, :3].T + T[:3, 3] - (v @ ex[:3, :3].T + ex[:3, 3]),
                                           axis=1).mean())
        ct_b = load_ct(d / "ct.nii.gz")
        scene = twin.posed_scene(pose_b, transl)
        sims = {}
        for n, g in default_views(ct_b, size=args.size).items():
            ref = render_drr(ct_b, g)
            t = time.perf_counter()
            img = render_posed(scene, g)
            tp = time.perf_counter() - t
            t = time.perf_counter()
            render_drr(twin.ct, g)
            ts = time.perf_counter() - t
            t_posed, t_static = tp, ts
            sims[n] = drr_similarity(img, ref)
        print(f"{preset:16s} {np.mean(errs):9.1f} {np.max(errs):9.1f} {sims['ap']['ssim']:8.4f} "
              f"{sims['lateral']['ssim']:8.4f} {sims['ap']['psnr_db']:8.2f} {sims['lateral']['psnr_db']:8.2f}")
    if t_posed is not None:
        print(f"posed DRR {t_posed:.2f} s, static DRR of the synthetic CT {t_static:.2f} s "
              f"({args.size}^2, last view; ratio {t_posed / t_static:.1f})")
    return 0


def real_ct(args) -> None:
    """The real abdomen CT's anatomy as meshes (its labels and skin), voxelised with the default
    table, against the CT's DRR with everything outside the body (the table) set to air."""
    import numpy as np

    from ctwin.core.drr.carm import default_views
    from ctwin.core.meshes.mesh import body_mask, import_anatomy
    from ctwin.core.meshes.mesh_volume import hu_table, prepare_mesh, voxelise_meshes
    from ctwin.core.meshes.metrics import drr_similarity
    from ctwin.core.drr.projector import render_drr

    d = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis"
    if not d.is_dir():
        print(f"real CT not found at {d}")
        return
    ct, lab, names, meshes, skin = import_anatomy(d / "ct.nii.gz", d / "seg.nii.gz")
    meshes = {n: prepare_mesh(m) for n, m in (meshes | {"skin": skin}).items()}
    r = voxelise_meshes(meshes, hu_table(meshes), spacing=args.mesh_spacing)
    body = body_mask(ct)
    ref_ct = ct.with_data(np.where(body, ct.data, -1000).astype(np.int16))
    print(f"real abdomen CT: {len(meshes)} meshes, remainder inside the body outside the labels: "
          f"mean {ct.data[body & (lab.data == 0)].mean():.0f} HU")
    for n, g in default_views(ct, size=args.size).items():
        s = drr_similarity(render_drr(r.ct, g), render_drr(ref_ct, g))
        print(f"real abdomen CT, static synthetic CT (default table) vs the CT without its table, {n:8s}: {_fmt(s)}")


if __name__ == "__main__":
    raise SystemExit(main())
