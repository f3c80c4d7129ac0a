"""``demo``: the main job on the built-in default, end to end.

1. generate the full-body phantom at the acquisition pose (supine, arms down);
2. build the twin from it (import, body-model fit, rig, articulated CT, twin.blend);
3. make a keyframed motion (a walking stride cycle, AMASS-style file) and key it onto the armature
   (``twin_motion.blend``);
4. render it frame by frame, AP with a C-arm sweep (LAO -30 to +30) and lateral, with per-frame
   annotations (projected label masks, 2D joints and landmarks);
5. evaluate the twin (fit, acquisition-pose fidelity, and fidelity at the walking-stride pose against
   the phantom generated at that pose);
6. write ``report.html`` with the pictures and the metrics beside the published method's numbers.

Steps whose outputs already exist are reused, so a re-run only redoes what is missing.
"""
from __future__ import annotations

import time
from pathlib import Path

HELP = "run the whole chain on the built-in phantom and write out/report.html"


def add_arguments(p) -> None:
    p.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out)")
    p.add_argument("--frames", type=int, default=48, help="frames of the motion (default 48)")
    p.add_argument("--size", type=int, default=256, help="detector pixels of the animation (default 256)")
    p.add_argument("--eval-size", type=int, default=512, help="detector pixels of the metric views (default 512)")
    p.add_argument("--spacing", type=float, default=3.0, help="phantom voxel size in mm (default 3)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (body shape)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-blend", action="store_true", help="skip the .blend files (no Blender step)")


def mirrored_pose(pose):
    """The left-right mirror image of a pose (72,): sides swapped, rotations reflected in x."""
    import numpy as np

    from ..core.body.skeleton import JOINT_INDEX, JOINT_NAMES

    p = np.asarray(pose, dtype=np.float64).reshape(24, 3)
    out = np.empty_like(p)
    for i, n in enumerate(JOINT_NAMES):
        other = n.replace("left_", "#").replace("right_", "left_").replace("#", "right_")
        src = p[JOINT_INDEX[other]]
        out[i] = (src[0], -src[1], -src[2])
    out[0] = p[0]  # the root stays as it is (the acquisition orientation)
    return out.reshape(72)


def gait_motion(n_frames: int, fps: float = 24.0):
    """A walking-stride cycle as (poses (T, 72), trans (T, 3) metres) in the SMPL/AMASS convention
    (root fixed; the twin keeps its acquisition orientation)."""
    import numpy as np

    from ..core.rig.poses import PRESETS

    walk = np.asarray(PRESETS["walking_stride"], dtype=np.float64).copy()
    mirror = mirrored_pose(walk)
    poses = np.zeros((n_frames, 72))
    for f in range(n_frames):
        a = 0.5 * (1.0 + np.sin(2.0 * np.pi * f / n_frames))
        poses[f] = a * walk + (1.0 - a) * mirror
        poses[f, :3] = 0.0  # the motion's own root frame: identity (retargeted onto the twin)
    return poses, np.zeros((n_frames, 3))


def run(args) -> int:
    import numpy as np

    from ..core import progress
    from ..core.drr.carm import named_view
    from ..core.errors import CtwinError
    from ..core.twin.evaluation import evaluate_twin
    from ..core.fileio import read_json, write_json
    from ..core.rig.motion import write_motion_file
    from ..core.phantom.phantom import write_phantom
    from ..core.drr.projector import read_frame
    from ..core.twin.report import overlay, save_gif, save_png, strip, to_gray8, write_report
    from ..core.twin.twin import build_twin, load_twin, render_twin

    if args.frames < 2:
        raise CtwinError("--frames must be at least 2")
    t_all = time.perf_counter()
    from ..core.safety import check_out_dir

    out = check_out_dir(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def step(key, title):
        progress.report(f"demo: {title}")
        timings[key] = time.perf_counter()

    def done(key):
        timings[key] = round(time.perf_counter() - timings[key], 1)

    acq = out / "phantom_supine_arms_down"
    step("phantom", "1/6 phantom at the acquisition pose")
    if not (acq / "truth.json").is_file():
        write_phantom(acq, pose="supine_arms_down", spacing=args.spacing, seed=args.seed)
    done("phantom")

    twin_dir = out / "twin"
    step("build", "2/6 build the twin")
    if not (twin_dir / "twin.json").is_file():
        build_twin(acq / "ct.nii.gz", acq / "seg.nii.gz", twin_dir, finish=_finish_build(args))
    done("build")
    twin = load_twin(twin_dir)

    step("motion", "3/6 keyframed motion (walking stride)")
    motion = out / "motion" / "walking_stride.npz"
    fps = 24.0
    poses, trans = gait_motion(args.frames, fps)
    write_motion_file(motion, poses, trans, fps)
    if not args.no_blend and (twin_dir / "twin.blend").is_file():
        _key_motion_blend(twin_dir / "twin.blend", motion, out / "twin_motion.blend", args.frames)
    done("motion")

    step("render", f"4/6 render {args.frames} frames, AP sweep and lateral, {args.size}x{args.size}")
    lo, hi = twin.ct_bbox_mm
    frames_dir = out / "frames"
    n = args.frames

    def ap_sweep(f):
        lao = -30.0 + 60.0 * f / max(n - 1, 1)
        return named_view("ap", (lo, hi), size=args.size, lao=lao)

    views = {"ap": ap_sweep, "lateral": named_view("lateral", (lo, hi), size=args.size)}
    render_twin(twin_dir, frames_dir, motion=motion, frames=(0, n), fps=fps, device=args.device,
                annotate=True, views=views)
    done("render")

    step("evaluate", "5/6 evaluate (fit, acquisition pose, walking-stride pose vs phantom truth)")
    target = out / "phantom_walking_stride"
    if not (target / "truth.json").is_file():
        write_phantom(target, pose="walking_stride", spacing=args.spacing, seed=args.seed)
    metrics_path = out / "metrics.json"
    metrics = evaluate_twin(twin_dir, target, size=args.eval_size, device=args.device)
    write_json(metrics_path, metrics)
    done("evaluate")

    step("report", "6/6 report")
    img_dir = out / "images"
    img_dir.mkdir(exist_ok=True)
    sections = []
    # frames: strip, GIF, overlays
    li = {v: [read_frame(frames_dir / f"{v}_{f:04d}")[0] for f in range(n)] for v in views}
    vmax = {v: float(np.percentile(np.stack(li[v]), 99.7)) for v in views}
    gif = [strip([to_gray8(li["ap"][f], vmax["ap"]), to_gray8(li["lateral"][f], vmax["lateral"])]) for f in range(n)]
    save_gif(gif, img_dir / "motion.gif", fps=12)
    picks = np.linspace(0, n - 1, min(8, n)).round().astype(int)
    for v in views:
        save_png(strip([to_gray8(li[v][f], vmax[v]) for f in picks]), img_dir / f"strip_{v}.png")
    ov = []
    for v in views:
        with np.load(frames_dir / f"{v}_{0:04d}_labels.npz") as z:
            masks, names = z["masks"], [str(s) for s in z["names"]]
        from ..core.volumes.labels import is_skeletal

        ov.append(overlay(li[v][0], masks, names, vmax=vmax[v], only=is_skeletal))
    save_png(strip(ov), img_dir / "overlay_frame0.png")
    sections.append({"title": "The motion: walking stride, AP with a C-arm sweep and lateral",
                     "text": f"{n} frames at {args.size}x{args.size} rendered from the twin's own CT "
                             "(bones rigid, soft tissue warped). Per-frame annotations (label masks, 2D joints "
                             "and landmarks) are next to each frame in frames/.",
                     "images": [("images/motion.gif", "animation (AP sweep | lateral)"),
                                ("images/strip_ap.png", "AP frames"), ("images/strip_lateral.png", "lateral frames"),
                                ("images/overlay_frame0.png", "projected bone labels on frame 0 (AP | lateral)")]})
    # acquisition and target comparisons at the metric views
    comp = []
    from ..core.drr.projector import render_drr
    from ..core.twin.articulated import render_posed
    from ..core.drr.carm import default_views
    from ..core.volumes.ct import load_ct

    g = twin.default_views(size=args.size)["ap"]
    ref = render_drr(twin.ct, g, device=args.device)
    test = twin.render(g, device=args.device)
    vm = float(np.percentile(ref, 99.7))
    save_png(strip([to_gray8(ref, vm), to_gray8(test, vm),
                    to_gray8(np.abs(test - ref) * 10.0, vm)]), img_dir / "acquisition_ap.png")
    comp.append(("images/acquisition_ap.png", "acquisition pose, AP: original CT | twin (articulated path) | 10x |difference|"))
    ctb = load_ct(target / "ct.nii.gz")
    tb = read_json(target / "truth.json")
    ta = read_json(acq / "truth.json")
    transl = twin.transl0_mm + (np.asarray(tb["transl"]) - np.asarray(ta["transl"]))
    scene = twin.posed_scene(np.asarray(tb["pose"]), transl)
    for v, gb in default_views(ctb, size=args.size).items():
        rb = render_drr(ctb, gb, device=args.device)
        tt = render_posed(scene, gb, device=args.device)
        vm = float(np.percentile(rb, 99.7))
        save_png(strip([to_gray8(rb, vm), to_gray8(tt, vm)]), img_dir / f"target_{v}.png")
        comp.append((f"images/target_{v}.png", f"walking stride, {v}: phantom generated at that pose | twin posed to it"))
    sections.append({"title": "Fidelity", "text": "Left: the ground truth; right: the twin.", "images": comp})
    metrics["warnings"] = list(twin.meta.get("warnings", []))
    path = write_report(out, metrics, sections)
    done("report")
    metrics["timings_s"] = timings
    metrics["demo_seconds"] = round(time.perf_counter() - t_all, 1)
    write_json(metrics_path, metrics)
    progress.report(f"demo: report written to {path} ({metrics['demo_seconds']:.0f} s in all)")
    return 0


def _finish_build(args):
    """The twin build's finishing step: twin.blend, unless --no-blend."""
    if args.no_blend:
        return None
    from ..operators.twin_blend import finish_build

    return finish_build


def _key_motion_blend(blend, motion, out_blend, n_frames) -> None:
    """Open twin.blend, key the motion onto the armature and save it as ``out_blend``."""
    import bpy

    from ..rig.animation import load_motion_keyframes
    from ..blender.scene import ensure_registered

    bpy.ops.wm.open_mainfile(filepath=str(blend))
    ensure_registered()
    arm = next(o for o in bpy.data.objects if o.type == "ARMATURE")
    scene = bpy.context.scene
    load_motion_keyframes(arm, str(motion), scene=scene, frame_start=0)
    scene.frame_start, scene.frame_end = 0, n_frames - 1
    scene.ctwin.twin_dir = "//" + Path(blend).parent.name + "/"
    bpy.ops.wm.save_as_mainfile(filepath=str(out_blend), check_existing=False, compress=True)
