"""New poses per second on a GPU: the phantom twin posed, composed on the device and rendered there.

    python benchmarks/bench_pose_gpu.py [--spacing 3] [--size 256] [--preset walking_stride]
        [--poses 50] [--reps 5] [--jitter-deg 2] [--seed 0] [--cache DIR] [--device cuda] [--posing device|host]

The phantom (``--seed``, supine_arms_down, ``--spacing`` mm) is decomposed as in bench_pose_cost.py
(``--cache DIR`` keeps it between runs). Every pose is ``--preset`` with a seeded ``--jitter-deg``
rotation on every body joint, so no pose is rendered twice and no per-pose cache counts; the AP view
at ``--size``^2. Posing (``posed_scene``: skinning and the inverse warp) runs where the product
runs it, on the GPU (``posed_scene(..., device="cuda")``, its displacement grid handed to the
composition on the device; ``--posing host``: on the host, for comparison); with
``--device cuda`` the frame is composed on the GPU (``compose_scene(scene, "cuda")``: the base CT,
the bone sub-volumes and the frame buffers stay there; the displacement grid and the parts'
placements go up per frame) and rendered from the device-resident frame. Printed, measured:

1. agreement: one new pose composed on the device and on the CPU (voxels that differ, largest |HU|
   difference: the GPU may fuse a multiply-add and so round a tie the other way), and the DRRs
   (max |device - CPU| / max CPU);
2. static: ``render_drr(ct, g)`` of the CT prepared once (``prepare_volume``: on a GPU it stays
   resident like the posed frames' volumes), best of ``--reps``;
3. one new pose, one view: posing + composition + render, best of ``--reps``, and its ratio to the
   static DRR (target on a GPU: <= 1.2), with the posing (host) and the composition + render
   (device) apart;
4. throughput over ``--poses`` consecutive new poses: poses per second end to end, and of the
   device part alone (the scenes posed beforehand; target: >= 300 per second at 256^2);
5. the host <-> device copies of one new pose posed, composed and rendered
   (``core.drr.device_transfers.count_transfers``): copies and bytes each way, by the code that
   asked for them.

``--device cpu`` runs the same measurements on the CPU path (a check of the script without a GPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pose_cost as B  # noqa: E402  (loads the package ctwin)

from ctwin.core.drr import projector as P  # noqa: E402
from ctwin.core.drr.carm import default_views  # noqa: E402
from ctwin.core.twin import articulated as A  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--preset", default="walking_stride")
    ap.add_argument("--poses", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--jitter-deg", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--posing", default="device", choices=("host", "device"),
                    help="where posed_scene runs (device: the GPU, with --device cuda)")
    a = ap.parse_args(argv)
    dev = P.resolve_device(a.device)
    pose_dev = "cuda" if a.posing == "device" and dev == "cuda" else "cpu"
    where = "host" if pose_dev == "cpu" else "device"
    print(f"[device] {P.device_status() if dev == 'cuda' else 'CPU path (--device cpu)'}", flush=True)
    ct, art = B.load_or_build(a.spacing, a.seed, a.cache)
    ct = P.prepare_volume(ct)
    ta = B.pose_truth("supine_arms_down", a.seed)
    rng = np.random.default_rng([a.seed, a.size, sum(map(ord, a.preset))])
    g = default_views(ct.bbox_world(), size=a.size)["ap"]

    def new_scene():
        p = B.deltas(ta, B.pose_truth(B.jittered(a.preset, a.jitter_deg, rng), a.seed))
        return A.posed_scene(art, *p, warp_spacing_mm=B.WARP_MM, device=pose_dev)

    print(f"[setup] phantom seed {a.seed} at {a.spacing:g} mm, CT {tuple(ct.shape)}, {len(art.parts)} parts; "
          f"{a.preset} + {a.jitter_deg:g} deg jitter per pose; AP view {a.size}^2", flush=True)
    # warm-up: compilation, resident arrays, buffers
    for _ in range(2):
        A.render_posed(new_scene(), g, device=dev)
        P.render_drr(ct, g, device=dev)

    # 1. agreement with the CPU on one new pose
    sc = new_scene()
    pv_d = P.compose_scene(sc, dev).host()
    pv_c = P.compose_scene(sc, "cpu")
    diff = np.abs(pv_d.flat.astype(np.int32) - pv_c.flat.astype(np.int32))
    img_d = A.render_posed(sc, g, device=dev)
    img_c = A.render_posed(sc, g, device="cpu")
    print(f"[agreement] composed frame {pv_c.shape}: {int(np.count_nonzero(diff))} voxels differ "
          f"(largest |HU| difference {int(diff.max())}); DRR max |{dev} - cpu| / max cpu "
          f"{float(np.abs(img_d - img_c).max() / img_c.max()):.2e}", flush=True)

    # 2. + 3. static and one new pose, interleaved, best of reps
    t = {"static": [], "pose": [], "device": [], "one": []}
    for _ in range(a.reps):
        s = time.perf_counter()
        P.render_drr(ct, g, device=dev)
        t["static"].append(time.perf_counter() - s)
        s = time.perf_counter()
        sc = new_scene()
        s1 = time.perf_counter()
        A.render_posed(sc, g, device=dev)
        s2 = time.perf_counter()
        t["pose"].append(s1 - s)
        t["device"].append(s2 - s1)
        t["one"].append(s2 - s)
    b = {k: min(v) for k, v in t.items()}
    r1 = b["one"] / b["static"]
    print(f"[one pose] {a.size}^2 static {b['static'] * 1e3:.2f} ms; new pose {b['one'] * 1e3:.2f} ms = posing "
          f"{b['pose'] * 1e3:.2f} ms ({where}) + composition and render {b['device'] * 1e3:.2f} ms ({dev}); "
          f"ratio {r1:.2f} [{'met' if r1 <= 1.2 else 'NOT met'}: <= 1.2]; composition + render / static "
          f"{b['device'] / b['static']:.2f}", flush=True)

    # 4. throughput: consecutive new poses
    s = time.perf_counter()
    for _ in range(a.poses):
        A.render_posed(new_scene(), g, device=dev)
    e2e = a.poses / (time.perf_counter() - s)
    scenes = [new_scene() for _ in range(a.poses)]
    s = time.perf_counter()
    for sc in scenes:
        A.render_posed(sc, g, device=dev)
    dev_only = a.poses / (time.perf_counter() - s)
    print(f"[throughput] {a.poses} new poses at {a.size}^2: {e2e:.1f} poses/s end to end (posing on the {where}); "
          f"{dev_only:.1f} poses/s composition + render alone ({dev}) "
          f"[{'met' if e2e >= 300 else 'NOT met'} end to end: >= 300/s]", flush=True)

    # 5. what crosses between host and device for one new pose
    from ctwin.core.drr.device_transfers import count_transfers

    with count_transfers() as led:
        A.render_posed(new_scene(), g, device=dev)
    print(f"[transfers] one new pose posed on the {where}, composed and rendered ({dev}), {a.size}^2:\n"
          f"{led.summary()}", flush=True)


if __name__ == "__main__":
    main()
