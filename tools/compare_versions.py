"""Compare this tree against an earlier commit: same twins, same DRRs, same speed.

    .venv/bin/python tools/compare_versions.py --base COMMIT [--work DIR] [--spacing 3] [--size 256]
        [--reps 5] [--no-real-ct] [--no-timing]

The earlier commit is checked out as a git worktree (``WORK/base``) and both trees run the same
probe (``tools/_version_probe.py``, copied into the worktree), each in its own process with the
environment running this script. Steps, each printed with its measured figures:

1. The phantom (``--spacing``, seed 0, supine_arms_down) is written by the base tree; twins of it and
   of the real abdomen CT (``../shared/data/real_ct/abdomen_pelvis``, when present) are built by the
   base tree ("old twins") and by this tree ("new twins"), without twin.blend.
2. Old twins, rendered by both trees: the static DRR of the CT and the twin's DRRs at the
   acquisition pose and at posed presets, AP and lateral, line integrals at ``--size``: they must be
   bit-identical (``np.array_equal``).
3. New twins against old twins: chamfer_mm (twin.json), fitted joints (fit.npz ``joints_mm``,
   largest distance), and SSIM (SPEC section 6) of the posed DRRs.
4. Timing, interleaved base / new in fresh processes, best of ``--reps``: the static DRR and a new
   pose (a seeded 2-degree jitter of walking_stride on every body joint per repetition) of the
   phantom twin, one view.

Exit status 0 when every bit-identity and tolerance check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "_version_probe.py"
REAL = ROOT.parent / "shared" / "data" / "real_ct" / "abdomen_pelvis"
PHANTOM_POSES = ("sitting", "knee_flexion", "arm_abducted", "walking_stride")
REAL_POSES = ("hip_flexion", "sitting", "walking_stride")
CHAMFER_TOL_MM, JOINT_TOL_MM, SSIM_MIN, TIME_TOL = 0.05, 0.2, 0.9999, 0.10


def run(cmd, **kw):
    print("  $", " ".join(str(c) for c in cmd), file=sys.stderr)
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kw)


def worktree(base: str, work: Path) -> Path:
    tree = work / "base"
    known = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"],
                           capture_output=True)
    if known.returncode:
        raise SystemExit(f"compare_versions: {base!r} is not a commit of this repository")
    if not tree.exists():
        run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, base])
    shutil.copy(PROBE, tree / "tools" / PROBE.name)
    return tree


def probe(tree: Path, *args) -> dict:
    cmd = [sys.executable, tree / "tools" / PROBE.name, *args]
    print("  $", " ".join(str(c) for c in cmd), file=sys.stderr)
    out = subprocess.run([str(c) for c in cmd], text=True, capture_output=True)
    if out.returncode:
        raise SystemExit(f"probe failed in {tree} (exit {out.returncode}): "
                         + (out.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(tree: Path, ct, seg, out: Path):
    if not (out / "twin.json").is_file():
        run([sys.executable, tree / "tools" / "launch.py", "build", "--ct", ct, "--seg", seg, "--out", out, "--no-blend"],
            cwd=tree)


def ssim(t, r) -> float:
    from skimage.metrics import structural_similarity

    m = float(r.max()) or 1.0
    a, b = np.clip(t / m, 0, 1), np.clip(r / m, 0, 1)
    return float(structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the earlier commit (e.g. the commit before a redesign)")
    ap.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    ap.add_argument("--spacing", type=float, default=3.0, help="phantom voxel size, mm")
    ap.add_argument("--size", type=int, default=256, help="detector pixels per side")
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (best of)")
    ap.add_argument("--no-real-ct", action="store_true", help="skip the real abdomen CT")
    ap.add_argument("--no-timing", action="store_true", help="skip the timing step")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="ctwin-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    base, new = worktree(a.base, work), ROOT
    ok = True

    ph = work / "phantom"
    if not (ph / "ct.nii.gz").is_file():
        run([sys.executable, base / "tools" / "launch.py", "phantom", "--out", ph, "--spacing", a.spacing], cwd=base)
    cases = {"phantom": (ph / "ct.nii.gz", ph / "seg.nii.gz", PHANTOM_POSES)}
    if not a.no_real_ct and (REAL / "ct.nii.gz").is_file():
        cases["real_ct"] = (REAL / "ct.nii.gz", REAL / "seg.nii.gz", REAL_POSES)
    elif not a.no_real_ct:
        print(f"real CT not found at {REAL}: skipped", file=sys.stderr)

    for name, (ct, seg, poses) in cases.items():
        old_twin, new_twin = work / f"{name}_twin_base", work / f"{name}_twin_new"
        build(base, ct, seg, old_twin)
        build(new, ct, seg, new_twin)
        imgs = {}
        for label, tree, twin in (("base/old", base, old_twin), ("new/old", new, old_twin),
                                  ("new/new", new, new_twin)):
            npz = work / f"{name}_{label.replace('/', '_')}.npz"
            probe(tree, "render", twin, npz, a.size, *poses)
            with np.load(npz) as z:
                imgs[label] = {k: z[k] for k in z.files}
        same = [k for k in imgs["base/old"] if np.array_equal(imgs["base/old"][k], imgs["new/old"][k])]
        differ = sorted(set(imgs["base/old"]) - set(same))
        print(f"[{name}] old twin, base vs new code: {len(same)}/{len(imgs['base/old'])} images "
              f"bit-identical" + (f"; DIFFER: {differ}" if differ else ""))
        ok &= not differ
        s = {k: ssim(imgs["new/new"][k], imgs["base/old"][k]) for k in imgs["base/old"]}
        worst = min(s, key=s.get)
        fo, fn = (json.loads((t / "twin.json").read_text())["fit"] for t in (old_twin, new_twin))
        with np.load(old_twin / "fit.npz") as zo, np.load(new_twin / "fit.npz") as zn:
            dj = float(np.linalg.norm(zo["joints_mm"] - zn["joints_mm"], axis=1).max())
        dc = abs(fn["chamfer_mm"] - fo["chamfer_mm"])
        print(f"[{name}] rebuilt twin vs old build: chamfer {fo['chamfer_mm']:.4f} -> {fn['chamfer_mm']:.4f} mm "
              f"(|d| {dc:.4f}, tol {CHAMFER_TOL_MM}); joints max |d| {dj:.4f} mm (tol {JOINT_TOL_MM}); "
              f"DRR SSIM min {s[worst]:.6f} at {worst} (>= {SSIM_MIN})")
        ok &= dc <= CHAMFER_TOL_MM and dj <= JOINT_TOL_MM and s[worst] >= SSIM_MIN

    if not a.no_timing:
        twin = work / "phantom_twin_base"
        best = {"base": {}, "new": {}}
        for r in range(a.reps):
            for label, tree in (("base", base), ("new", new)):
                t = probe(tree, "time", twin, a.size, r)
                for k, v in t.items():
                    best[label][k] = min(best[label].get(k, np.inf), v)
        for k in best["base"]:
            ratio = best["new"][k] / best["base"][k]
            print(f"[timing] {k}: base {best['base'][k] * 1e3:.1f} ms, new {best['new'][k] * 1e3:.1f} ms, "
                  f"new/base {ratio:.3f} (best of {a.reps}, interleaved)")
            ok &= ratio <= 1 + TIME_TOL
    print("RESULT:", "pass" if ok else "FAIL", f"(work folder {work}; remove the earlier tree with "
          f"`git worktree remove {base}`)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
