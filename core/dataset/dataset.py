"""Training datasets of posed DRRs: a spec, a deterministic sampler, sharded output, Ray workers.

A dataset spec (YAML or JSON, ``docs/DATASET.md``) names the twins (built from CT + segmentation
pairs, existing twin folders, or phantoms generated from a seed), a pose sampler, a view sampler,
a physics sampler, the annotations and the sizes. Sample ``i`` belongs to twin
``i // samples_per_twin`` and its parameters are drawn from
``numpy.random.SeedSequence([seed, i])`` alone, so any sample can be rendered alone and the
dataset does not depend on how it is split across workers.

Output folder::

    dataset.json      spec (normalised), its SHA-256, sizes
    index.jsonl       one line per sample: key, shard, twin and every sampled parameter
    twins/<name>/     twins built by the run (reused by later runs)
    inputs/<name>/    generated phantoms (CT, segmentation) the twins are built from
    shards/shard-NNNNNN.tar   WebDataset-style shards (``core.dataset.shards``), ``shard_size`` samples each

Execution (``run_dataset``): in this process (``workers=0``) or on Ray: a local instance by
default, an existing cluster with ``address``. Ray workers are long-lived actors that keep their
twins and the compiled kernels warm; shards go to the actor that already holds the shard's twin.
The driver writes each shard under a temporary name and renames it when complete, so an
interrupted run loses only the shards in flight, and a re-run renders only the missing shards.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from ..errors import CtwinError
from ..fileio import atomic_path, read_json, write_json
from ..progress import report
from ..body.skeleton import JOINT_INDEX
from ..drr import physics
from ..drr.carm import DEFAULT_SAD_MM, DEFAULT_SID_MM, named_view, parse_view
from ..drr.physics import VALUES
from ..drr.projector import resolve_device, frame_volume, xray_line_integral
from ..rig.motion import load_motion, read_motion_file, resample
from ..rig.pose import joint_limit_violations
from ..rig.poses import PRESETS, resolve_pose
from ..twin.articulated import render_posed
from ..twin.twin import build_twin, load_twin
from .shards import json_bytes, npz_bytes, tif_bytes, tar_bytes
from ..drr.xray import DETECTORS, KVP_RANGE, XraySetup
from ..phantom.phantom import write_phantom
from ..twin.annotations import frame_points, twin_landmarks, label_masks
# Imported where used, so that importing this module stays light: numba, ray (heavy or optional third-party packages).

SAMPLER_VERSION = 1  # bump when the draw order changes: old datasets then refuse to resume
SHARD_PATTERN = "shard-{:06d}.tar"

_TOP_KEYS = ("seed", "samples_per_twin", "shard_size", "inputs", "poses", "views", "physics",
             "annotations", "render")
_PHANTOM_KEYS = ("seed", "spacing_mm", "pose", "noise_hu")
_CT_KEYS = ("ct", "seg", "name")
_POSE_KEYS = ("presets", "files", "motions", "random")
_MOTION_KEYS = ("file", "stride", "fps")
_RANDOM_KEYS = ("fraction", "base", "distribution", "joints")
_VIEW_KEYS = ("named", "lao_deg", "cranial_deg", "sad_mm", "sid_mm", "size", "biplanar")
_PHYSICS_KEYS = ("value", "photons", "electronic_noise", "kvp", "detector")
_ANNOTATION_KEYS = ("masks", "points", "geometry")
_RENDER_KEYS = ("step_mm",)

# Default per-joint ranges of random poses (degrees, added to the base pose's rotation vector, per
# axis). A design choice, not literature values: moderate hip and knee flexion, arm abduction and
# elbow flexion that a patient on the table can take. Every draw is also checked against the
# anatomical limits ``core.rig.pose.JOINT_LIMITS_DEG`` and redrawn when it leaves them.
DEFAULT_RANDOM_JOINTS = {
    "left_hip": {"x": [-45.0, 10.0]}, "right_hip": {"x": [-45.0, 10.0]},
    "left_knee": {"x": [0.0, 60.0]}, "right_knee": {"x": [0.0, 60.0]},
    "left_shoulder": {"z": [-10.0, 30.0]}, "right_shoulder": {"z": [-30.0, 10.0]},
    "left_elbow": {"y": [-45.0, 0.0]}, "right_elbow": {"y": [0.0, 45.0]},
}
_MAX_REDRAWS = 100


# ------------------------------------------------------------------------------------------------
# spec
# ------------------------------------------------------------------------------------------------
def _fail(field: str, msg: str):
    raise CtwinError(f"spec field {field}: {msg}")


def _check_keys(d, known, field):
    if not isinstance(d, dict):
        _fail(field, f"must be a mapping, got {type(d).__name__}")
    for k in d:
        if k not in known:
            name = f"{field}.{k}" if field != "spec" else str(k)
            _fail(name, f"unknown key (known: {', '.join(known)})")


def _int(v, field, lo=0):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        _fail(field, f"must be an integer >= {lo}, got {v!r}")
    return int(v)


def _num(v, field, lo=None, hi=None, positive=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(field, f"must be a number, got {v!r}")
    if positive and v <= 0:
        _fail(field, f"must be positive, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(field, f"must be within {lo}..{hi}, got {v!r}")
    return float(v)


def _range(v, field, lo=None, hi=None, positive=False):
    """A number (fixed) or [low, high] (sampled) -> [low, high]."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            _fail(field, f"must be a number or [low, high], got {v!r}")
        a, b = (_num(x, field, lo, hi, positive) for x in v)
        if b < a:
            _fail(field, f"low {a:g} exceeds high {b:g}")
        return [a, b]
    x = _num(v, field, lo, hi, positive)
    return [x, x]


def _path(v, field, base: Path, kind="file") -> str:
    if not isinstance(v, str) or not v:
        _fail(field, f"must be a path, got {v!r}")
    p = Path(v).expanduser()
    p = p if p.is_absolute() else base / p
    if kind == "file" and not p.exists():
        _fail(field, f"not found: {p}")
    if kind == "twin" and not (p / "twin.json").is_file():
        _fail(field, f"not a twin directory (no twin.json): {p}")
    return str(p.resolve())


def read_spec_file(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CtwinError(f"spec file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise CtwinError("reading a YAML spec needs PyYAML (pip install -r requirements.txt); "
                                 "or write the spec as .json") from None
            data = yaml.safe_load(text)
    except CtwinError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise CtwinError(f"{p.name} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                         f"{' '.join(str(exc).split())}") from None
    return data


def load_spec(path_or_dict, base_dir=None) -> dict:
    """Read and validate a spec; returns it normalised (defaults filled, paths absolute, ranges as
    [low, high]). Any bad field raises ``CtwinError`` naming it."""
    if isinstance(path_or_dict, dict):
        raw, base = path_or_dict, Path(base_dir or ".").resolve()
    else:
        raw, base = read_spec_file(path_or_dict), Path(path_or_dict).resolve().parent
    _check_keys(raw, _TOP_KEYS, "spec")
    for k in ("inputs", "poses", "samples_per_twin"):
        if k not in raw:
            _fail(k, "missing (required)")
    spec = {"sampler": SAMPLER_VERSION, "seed": _int(raw.get("seed", 0), "seed"),
            "samples_per_twin": _int(raw["samples_per_twin"], "samples_per_twin", 1),
            "shard_size": _int(raw.get("shard_size", 100), "shard_size", 1)}

    # inputs
    inp = raw["inputs"]
    _check_keys(inp, ("phantoms", "cts", "twins"), "inputs")
    twins = []
    for i, ph in enumerate(inp.get("phantoms") or []):
        f = f"inputs.phantoms[{i}]"
        _check_keys(ph, _PHANTOM_KEYS, f)
        d = {"kind": "phantom", "seed": _int(ph.get("seed", 0), f + ".seed"),
             "spacing_mm": _num(ph.get("spacing_mm", 3.0), f + ".spacing_mm", 0.5, 20.0),
             "pose": str(ph.get("pose", "supine_arms_down")),
             "noise_hu": _num(ph.get("noise_hu", 0.0), f + ".noise_hu", 0.0)}

        if d["pose"] not in PRESETS:
            _fail(f + ".pose", f"unknown preset {d['pose']!r} (presets: {', '.join(PRESETS)})")
        d["name"] = f"phantom_s{d['seed']}_{d['spacing_mm']:g}mm_{d['pose']}" + \
            (f"_n{d['noise_hu']:g}" if d["noise_hu"] else "")
        twins.append(d)
    for i, c in enumerate(inp.get("cts") or []):
        f = f"inputs.cts[{i}]"
        _check_keys(c, _CT_KEYS, f)
        for k in ("ct", "seg"):
            if k not in c:
                _fail(f"{f}.{k}", "missing (required)")
        d = {"kind": "ct", "ct": _path(c["ct"], f + ".ct", base), "seg": _path(c["seg"], f + ".seg", base)}
        stem = Path(d["ct"]).name.split(".")[0]
        d["name"] = str(c.get("name") or f"ct_{stem}_{hashlib.sha256(d['ct'].encode()).hexdigest()[:8]}")
        twins.append(d)
    for i, t in enumerate(inp.get("twins") or []):
        p = _path(t, f"inputs.twins[{i}]", base, kind="twin")
        twins.append({"kind": "twin", "path": p, "name": Path(p).name})
    if not twins:
        _fail("inputs", "no twin to render (give phantoms, cts or twins)")
    names = [t["name"] for t in twins]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        _fail("inputs", f"two inputs make the same twin {dup[0]!r} (give each CT a distinct name)")
    spec["inputs"] = twins

    # poses
    po = raw["poses"]
    _check_keys(po, _POSE_KEYS, "poses")
    cands = []

    for i, name in enumerate(po.get("presets") or []):
        if name not in PRESETS:
            _fail(f"poses.presets[{i}]", f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
        cands.append({"source": "preset", "name": str(name)})
    for i, fp in enumerate(po.get("files") or []):
        cands.append({"source": "file", "file": _path(fp, f"poses.files[{i}]", base)})
    for i, m in enumerate(po.get("motions") or []):
        f = f"poses.motions[{i}]"
        m = {"file": m} if isinstance(m, str) else m
        _check_keys(m, _MOTION_KEYS, f)
        if "file" not in m:
            _fail(f + ".file", "missing (required)")
        mp = _path(m["file"], f + ".file", base)
        stride = _int(m.get("stride", 1), f + ".stride", 1)
        fps = None if m.get("fps") is None else _num(m["fps"], f + ".fps", positive=True)

        poses, trans, rate = read_motion_file(mp)
        n = len(resample(poses, trans, rate, fps)[0])
        for fr in range(0, n, stride):
            cands.append({"source": "motion", "file": mp, "fps": fps, "frame": fr})
    rnd = po.get("random")
    if rnd is not None:
        rnd = {} if rnd is True else rnd
        _check_keys(rnd, _RANDOM_KEYS, "poses.random")
        r = {"fraction": _num(rnd.get("fraction", 1.0 if not cands else 0.5), "poses.random.fraction", 0.0, 1.0),
             "base": str(rnd.get("base", "supine_arms_down")),
             "distribution": str(rnd.get("distribution", "uniform"))}
        if r["base"] not in PRESETS:
            _fail("poses.random.base", f"unknown preset {r['base']!r}")
        if r["distribution"] not in ("uniform", "normal"):
            _fail("poses.random.distribution", f"must be uniform or normal, got {r['distribution']!r}")

        joints = rnd.get("joints", DEFAULT_RANDOM_JOINTS)
        if not isinstance(joints, dict) or not joints:
            _fail("poses.random.joints", "must map joint names to {x|y|z: [low, high]} degrees")
        r["joints"] = {}
        for jn in sorted(joints):
            if jn not in JOINT_INDEX or jn == "pelvis":
                _fail(f"poses.random.joints.{jn}", "unknown joint (SMPL joint names, not pelvis)")
            ax = joints[jn]
            _check_keys(ax, ("x", "y", "z"), f"poses.random.joints.{jn}")
            r["joints"][jn] = {a: _range(ax[a], f"poses.random.joints.{jn}.{a}", -180.0, 180.0) for a in sorted(ax)}
        if not cands and r["fraction"] < 1.0:
            _fail("poses.random.fraction", "must be 1 when no preset, file or motion pose is given")
        spec_random = r
    else:
        spec_random = None
    if not cands and spec_random is None:
        _fail("poses", "the pose set is empty (give presets, files, motions or random)")
    spec["poses"] = {"candidates": cands, "random": spec_random}

    # views
    vw = raw.get("views", {}) or {}
    _check_keys(vw, _VIEW_KEYS, "views")
    named = vw.get("named", ["ap"])
    if isinstance(named, str):
        named = [named]
    if not isinstance(named, list) or not named:
        _fail("views.named", "must be a non-empty list of view names")

    for i, n in enumerate(named):
        try:
            parse_view(str(n))
        except CtwinError as exc:
            _fail(f"views.named[{i}]", str(exc))
    size = vw.get("size", 256)
    size = [size, size] if not isinstance(size, (list, tuple)) else list(size)
    if len(size) != 2:
        _fail("views.size", f"must be W or [W, H], got {vw.get('size')!r}")
    size = [_int(s, "views.size", 1) for s in size]
    if max(size) > 16384:
        _fail("views.size", "at most 16384 pixels a side")
    v = {"named": [str(n) for n in named],
         "lao_deg": _range(vw.get("lao_deg", 0.0), "views.lao_deg", -180.0, 180.0),
         "cranial_deg": _range(vw.get("cranial_deg", 0.0), "views.cranial_deg", -90.0, 90.0),
         "sad_mm": _range(vw.get("sad_mm", DEFAULT_SAD_MM), "views.sad_mm", positive=True),
         "sid_mm": _range(vw.get("sid_mm", DEFAULT_SID_MM), "views.sid_mm", positive=True),
         "size": size, "biplanar": bool(vw.get("biplanar", False))}
    if v["sid_mm"][0] <= v["sad_mm"][1]:
        _fail("views.sid_mm", f"the smallest SID ({v['sid_mm'][0]:g}) must exceed the largest SAD ({v['sad_mm'][1]:g})")
    spec["views"] = v

    # physics
    ph = raw.get("physics", {}) or {}
    _check_keys(ph, _PHYSICS_KEYS, "physics")

    values = ph.get("value", "line_integral")
    values = [values] if isinstance(values, str) else values
    if not isinstance(values, list) or not values:
        _fail("physics.value", f"must be one of {', '.join(VALUES)} or a list of them")
    for x in values:
        if x not in VALUES:
            _fail("physics.value", f"unknown value {x!r} (use {', '.join(VALUES)})")
    spec["physics"] = {
        "value": list(values),
        "photons": None if ph.get("photons") is None else _range(ph["photons"], "physics.photons", positive=True),
        "electronic_noise": _range(ph.get("electronic_noise", 0.0), "physics.electronic_noise", 0.0)}
    if ph.get("kvp") is not None:  # realistic physics (core.drr.xray), as ctwin render --kvp

        spec["physics"]["kvp"] = _range(ph["kvp"], "physics.kvp", *KVP_RANGE)
        det = ph.get("detector", "ideal")
        det = [det] if isinstance(det, str) else det
        if not isinstance(det, list) or not det or any(d not in DETECTORS for d in det):
            _fail("physics.detector", f"must be one of {', '.join(DETECTORS)} or a list of them")
        spec["physics"]["detector"] = list(det)
    elif ph.get("detector") is not None:
        _fail("physics.detector", "needs physics.kvp (a detector is part of the realistic physics)")
    if spec["physics"]["photons"] is None and spec["physics"]["electronic_noise"][1] > 0:
        _fail("physics.electronic_noise", "needs physics.photons (noise is simulated in photon counts)")

    an = raw.get("annotations", {}) or {}
    _check_keys(an, _ANNOTATION_KEYS, "annotations")
    spec["annotations"] = {k: bool(an.get(k, True)) for k in _ANNOTATION_KEYS}
    rd = raw.get("render", {}) or {}
    _check_keys(rd, _RENDER_KEYS, "render")
    spec["render"] = {"step_mm": None if rd.get("step_mm") is None
                      else _num(rd["step_mm"], "render.step_mm", positive=True)}
    return spec


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def n_samples(spec) -> int:
    return len(spec["inputs"]) * spec["samples_per_twin"]


def n_shards(spec) -> int:
    return -(-n_samples(spec) // spec["shard_size"])


def shard_indices(spec, shard: int) -> range:
    s = spec["shard_size"]
    return range(shard * s, min((shard + 1) * s, n_samples(spec)))


def sample_key(index: int) -> str:
    return f"{index:08d}"


# ------------------------------------------------------------------------------------------------
# sampling: (spec, index) -> parameters
# ------------------------------------------------------------------------------------------------
def _uniform(rng, r):
    lo, hi = r
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


def _random_pose(rng, r) -> tuple[list, int]:
    """A random pose: the base preset plus per-joint, per-axis offsets (degrees) drawn uniformly in
    the ranges (or normally: mean the range's centre, sigma a quarter of its width, clipped to it),
    redrawn while the pose leaves the anatomical limits."""
    base = PRESETS[r["base"]].reshape(24, 3)
    for attempt in range(_MAX_REDRAWS):
        p = base.copy()
        for jn, axes in r["joints"].items():
            for a, (lo, hi) in axes.items():
                if r["distribution"] == "normal":
                    x = float(np.clip(rng.normal(0.5 * (lo + hi), 0.25 * (hi - lo)), lo, hi)) if hi > lo else lo
                else:
                    x = _uniform(rng, (lo, hi))
                p[JOINT_INDEX[jn], "xyz".index(a)] += math.radians(x)
        if not joint_limit_violations(p.reshape(72)):
            return p.reshape(72).tolist(), attempt
    raise CtwinError(f"poses.random: no pose within the anatomical limits after {_MAX_REDRAWS} draws; "
                     "narrow the joint ranges")


def sample_params(spec: dict, index: int) -> dict:
    """Every sampled parameter of sample ``index`` (JSON-ready), from (spec seed, index) alone."""
    if not 0 <= index < n_samples(spec):
        raise CtwinError(f"sample index {index} is outside 0..{n_samples(spec) - 1}")
    rng = np.random.default_rng(np.random.SeedSequence([spec["seed"], index]))
    twin = spec["inputs"][index // spec["samples_per_twin"]]["name"]
    po = spec["poses"]
    cands, rnd = po["candidates"], po["random"]
    use_random = rnd is not None and (not cands or rng.random() < rnd["fraction"])
    if use_random:
        pose, redraws = _random_pose(rng, rnd)
        pose_p = {"source": "random", "base": rnd["base"], "pose": pose, "redraws": redraws}
    else:
        pose_p = dict(cands[int(rng.integers(len(cands)))])
    v = spec["views"]
    view = {"name": v["named"][int(rng.integers(len(v["named"])))],
            "lao_deg": _uniform(rng, v["lao_deg"]), "cranial_deg": _uniform(rng, v["cranial_deg"]),
            "sad_mm": _uniform(rng, v["sad_mm"]), "sid_mm": _uniform(rng, v["sid_mm"]),
            "size": list(v["size"]), "biplanar": v["biplanar"]}
    ph = spec["physics"]
    phys = {"value": ph["value"][int(rng.integers(len(ph["value"])))], "photons": None,
            "electronic_noise": 0.0, "noise_seed": None}
    if ph["photons"] is not None:
        lo, hi = ph["photons"]  # log-uniform: photon counts span decades
        phys["photons"] = float(lo) if lo == hi else float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        phys["electronic_noise"] = _uniform(rng, ph["electronic_noise"])
        phys["noise_seed"] = int(rng.integers(2 ** 31 - 1))
    if ph.get("kvp") is not None:  # drawn last: specs without kvp keep their parameters
        phys["kvp"] = _uniform(rng, ph["kvp"])
        phys["detector"] = ph["detector"][int(rng.integers(len(ph["detector"])))]
    return {"index": index, "key": sample_key(index), "shard": index // spec["shard_size"],
            "twin": twin, "pose": pose_p, "view": view, "physics": phys}


# ------------------------------------------------------------------------------------------------
# twins
# ------------------------------------------------------------------------------------------------
def twin_dir(out: Path, entry: dict) -> Path:
    return Path(entry["path"]) if entry["kind"] == "twin" else Path(out) / "twins" / entry["name"]


def build_one_twin(out, entry: dict) -> str:
    """Build the twin of one spec input under ``out/twins`` unless it is there; returns its path."""
    out = Path(out)
    td = twin_dir(out, entry)
    if (td / "twin.json").is_file():
        return str(td)
    if entry["kind"] == "phantom":
        src = out / "inputs" / entry["name"]
        if not (src / "truth.json").is_file():
            tmp = src.parent / f".{src.name}.partial-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write_phantom(tmp, pose=entry["pose"], spacing=entry["spacing_mm"], seed=entry["seed"],
                          noise_hu=entry["noise_hu"])
            shutil.rmtree(src, ignore_errors=True)
            tmp.rename(src)
        ct, seg = src / "ct.nii.gz", src / "seg.nii.gz"
    else:
        ct, seg = entry["ct"], entry["seg"]
    td.parent.mkdir(parents=True, exist_ok=True)
    build_twin(ct, seg, td)
    return str(td)


# ------------------------------------------------------------------------------------------------
# rendering one sample
# ------------------------------------------------------------------------------------------------
def _pose_of(twin, pose_p: dict):
    """(pose (72,), transl_mm or None) of a sampled pose for this twin."""
    src = pose_p["source"]
    if src == "random":
        return np.asarray(pose_p["pose"], dtype=np.float64), None
    if src == "preset":
        return PRESETS[pose_p["name"]].copy(), None
    if src == "file":
        r = resolve_pose(pose_p["file"])
        return r["pose"], r["transl"]

    poses, transl = load_motion(pose_p["file"], fps=pose_p["fps"], twin_pose=twin.pose0,
                                twin_transl_mm=twin.transl0_mm, check_limits=False)[:2]
    return poses[pose_p["frame"]], transl[pose_p["frame"]]


def _geometries(twin, view: dict) -> list:
    kw = dict(sad_mm=view["sad_mm"], sid_mm=view["sid_mm"], size=tuple(view["size"]),
              cranial=view["cranial_deg"])
    out = [named_view(view["name"], twin.ct_bbox_mm, lao=view["lao_deg"], **kw)]
    if view["biplanar"]:  # the orthogonal partner: the C-arm turned 90 degrees further LAO
        out.append(named_view(view["name"], twin.ct_bbox_mm, lao=view["lao_deg"] + 90.0, **kw))
    return out


def render_sample(twin, spec: dict, params: dict, device: str = "cpu") -> dict:
    """Render one sample: {ext: bytes} for ``tif``, ``masks.npz`` (when asked) and ``json``."""
    pose, transl = _pose_of(twin, params["pose"])
    geos = _geometries(twin, params["view"])
    scene = twin.posed_scene(pose, transl, resolve_device(device))
    ph = params["physics"]
    images = []
    records = []
    for k, g in enumerate(geos):
        if ph.get("kvp") is not None:
            xray = XraySetup(kvp=ph["kvp"], detector=ph["detector"], photons=ph["photons"],
                             electronic_sigma=ph["electronic_noise"] if ph["photons"] is not None else None)
            xray.seed, xray.stream = ph["noise_seed"] or 0, k
            rec = {}
            li = xray_line_integral(frame_volume(scene), g, xray, step_mm=spec["render"]["step_mm"],
                                    device=device, record=rec)
            records.append(rec)
        else:
            li = render_posed(scene, g, step_mm=spec["render"]["step_mm"], device=device)
            if ph["photons"] is not None:
                li = physics.add_noise(li, ph["photons"], ph["electronic_noise"], ph["noise_seed"] + k)
        images.append(physics.to_value(li, ph["value"]))
    an = spec["annotations"]
    meta = {"key": params["key"], "index": params["index"], "twin": params["twin"], "params": params,
            "pose": np.asarray(pose).tolist(),
            "transl_mm": None if transl is None else np.asarray(transl).tolist()}
    if records:
        meta["xray"] = records  # per view: every physics option and the spectrum used
    files = {"tif": tif_bytes(images[0] if len(images) == 1 else np.stack(images))}
    if an["masks"]:
        posed = twin.posed_meshes(pose, transl)
        posed.pop("skin", None)
        stacks = [label_masks(g, posed) for g in geos]
        masks = stacks[0][0] if len(stacks) == 1 else np.stack([s[0] for s in stacks])
        files["masks.npz"] = npz_bytes(masks=masks, names=np.array(stacks[0][1]))
    if an["points"]:
        joints = twin.binding.armature.posed_joints(pose, transl)
        marks = twin_landmarks(twin, pose, transl)
        meta["points"] = [frame_points(g, joints, marks) for g in geos]
    if an["geometry"]:
        meta["geometry"] = [g.to_sidecar(frame=params["index"], value=ph["value"], device=device,
                                         source=params["twin"], method="trilinear") for g in geos]
    files["json"] = json_bytes(meta)
    return files


class SampleRenderer:
    """Renders samples of one dataset, keeping the twins it has loaded (the worker's state)."""

    def __init__(self, out, spec: dict, device: str = "cpu", threads: int | None = None, keep_twins: int = 2):
        self.out, self.spec, self.keep = Path(out), spec, keep_twins
        if threads:
            import numba

            numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
        self.device = resolve_device(device)
        self._twins: dict = {}
        self._entries = {e["name"]: e for e in spec["inputs"]}

    def twin(self, name: str):
        if name not in self._twins:
            while len(self._twins) >= self.keep:
                self._twins.pop(next(iter(self._twins)))
            self._twins[name] = load_twin(twin_dir(self.out, self._entries[name]))
        return self._twins[name]

    def loaded(self) -> list:
        return list(self._twins)

    def render(self, index: int) -> dict:
        p = sample_params(self.spec, index)
        return render_sample(self.twin(p["twin"]), self.spec, p, self.device)

    def render_shard(self, shard: int) -> bytes:
        """The shard's tar bytes. A failing sample raises ``SampleError`` naming its index."""
        samples = []
        for i in shard_indices(self.spec, shard):
            try:
                samples.append((sample_key(i), self.render(i)))
            except Exception as exc:  # noqa: BLE001 - reported with the sample index
                raise SampleError(i, f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
        return tar_bytes(samples)


class SampleError(Exception):
    def __init__(self, index: int, message: str):
        super().__init__(f"sample {index}: {message}")
        self.index = index

    def __reduce__(self):
        return (SampleError, (self.index, str(self).split(": ", 1)[1]))


# ------------------------------------------------------------------------------------------------
# the output folder
# ------------------------------------------------------------------------------------------------
def shard_path(out, shard: int) -> Path:
    return Path(out) / "shards" / SHARD_PATTERN.format(shard)


def prepare_output(spec: dict, out, overwrite: bool = False) -> None:
    """Write (or check) ``dataset.json`` and ``index.jsonl``. A dataset folder started from
    another spec is refused unless ``overwrite`` (then its shards and index are removed; built
    twins are kept)."""
    out = Path(out)
    h = spec_hash(spec)
    man = out / "dataset.json"
    if man.is_file():
        try:
            old = read_json(man).get("spec_sha256")
        except ValueError:
            old = None
        if old != h:
            if not overwrite:
                raise CtwinError(f"{out} holds a dataset from another spec (spec hash {str(old)[:12]} != "
                                 f"{h[:12]}); use --overwrite to start over, or another --out")
            shutil.rmtree(out / "shards", ignore_errors=True)
            for f in ("index.jsonl", "dataset.json"):
                (out / f).unlink(missing_ok=True)
    elif overwrite:
        shutil.rmtree(out / "shards", ignore_errors=True)
    elif out.exists() and any(p.name not in ("twins", "inputs", "samples") for p in out.iterdir()):
        raise CtwinError(f"{out} exists and is not a ctwin dataset folder; choose an empty or new folder")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for stale in (out / "shards").glob(".shard-*"):
        stale.unlink(missing_ok=True)
    if not man.is_file():
        write_json(man, {"format": 1, "spec_sha256": h, "samples": n_samples(spec),
                         "shard_size": spec["shard_size"], "shards": n_shards(spec),
                         "twins": [e["name"] for e in spec["inputs"]], "spec": spec})
    idx = out / "index.jsonl"
    if not idx.is_file():
        with atomic_path(idx) as tmp:
            with open(tmp, "w") as f:
                for i in range(n_samples(spec)):
                    f.write(json.dumps(sample_params(spec, i), sort_keys=True) + "\n")


def write_shard(out, shard: int, data: bytes) -> None:
    """Write a shard under a temporary name and rename it when complete."""
    p = shard_path(out, shard)
    tmp = p.with_name(f".{p.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def missing_shards(spec, out) -> list:
    return [s for s in range(n_shards(spec)) if not shard_path(out, s).is_file()]


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
class _Progress:
    """One progress line per completed shard: samples done, samples/s and ETA."""

    def __init__(self, total: int, done: int):
        self.total, self.done0, self.done = total, done, done
        self.t0 = time.perf_counter()
        self.first = None
        self.timeline = []  # (seconds since start, samples, worker)

    def add(self, n: int, note: str = "", worker: int = 0) -> None:
        self.done += n
        dt = time.perf_counter() - self.t0
        self.timeline.append((round(dt, 4), n, worker))
        if self.first is None:
            self.first = dt
        rate = (self.done - self.done0) / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        report(f"dataset {self.done}/{self.total} samples, {rate:.2f} samples/s, ETA {eta:.0f} s{note}",
               self.done / self.total if self.total else 1.0)

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.done - self.done0) / dt if dt > 0 else 0.0

    def steady_rate(self) -> float | None:
        """Samples/s once every worker has finished its first shard (start-up and compilation
        excluded); None when too few shards were rendered to tell."""
        seen, start = set(), None
        workers = {w for _, _, w in self.timeline}
        for k, (t, _, w) in enumerate(self.timeline):
            seen.add(w)
            if seen == workers:
                start = k
                break
        if start is None or start >= len(self.timeline) - 1:
            return None
        t0 = self.timeline[start][0]
        n = sum(x for _, x, _ in self.timeline[start + 1:])
        dt = self.timeline[-1][0] - t0
        return n / dt if dt > 0 else None


def render_only(spec_path, out, index: int, device: str = "cpu", threads: int | None = None) -> Path:
    """Render one sample alone into ``out/samples/KEY.*`` (building its twin if needed)."""
    spec = load_spec(spec_path)
    p = sample_params(spec, index)
    entry = next(e for e in spec["inputs"] if e["name"] == p["twin"])
    build_one_twin(out, entry)
    files = SampleRenderer(out, spec, device, threads).render(index)
    d = Path(out) / "samples"
    d.mkdir(parents=True, exist_ok=True)
    for ext, data in files.items():
        with atomic_path(d / f"{p['key']}.{ext}") as tmp:
            tmp.write_bytes(data)
    return d / f"{p['key']}.tif"


def run_dataset(spec_path, out, *, workers: int | None = None, threads: int | None = None,
                address: str | None = None, device: str = "auto", overwrite: bool = False,
                max_shards: int | None = None) -> dict:
    """Build the missing twins, then render the missing shards. ``workers=0`` renders in this
    process; otherwise on Ray (a local instance, or the cluster at ``address``). Returns a
    summary (samples rendered, seconds, samples/s, time to the first shard, workers)."""
    spec = load_spec(spec_path)
    out = Path(out).resolve()
    prepare_output(spec, out, overwrite)
    todo = missing_shards(spec, out)
    if max_shards is not None:
        todo = todo[:max_shards]
    total = n_samples(spec)
    skipped = n_shards(spec) - len(missing_shards(spec, out))
    if skipped:
        report(f"dataset: {skipped} of {n_shards(spec)} shards already written, skipped")
    t0 = time.perf_counter()
    if workers == 0:
        summary = _run_local(spec, out, todo, device, threads)
    else:
        summary = _run_ray(spec, out, todo, workers, threads, address, device)
    summary.update(seconds=round(time.perf_counter() - t0, 3), shards_written=len(todo),
                   shards_total=n_shards(spec), samples_total=total)
    report(f"dataset: {summary['samples']} samples in {len(todo)} shards written to {out}/shards "
           f"({summary['samples_per_s']:.2f} samples/s after the twins)", 1.0)
    return summary


def _needed_twins(spec, todo) -> list:
    names = []
    for s in todo:
        for i in shard_indices(spec, s):
            n = spec["inputs"][i // spec["samples_per_twin"]]["name"]
            if n not in names:
                names.append(n)
    return [e for e in spec["inputs"] if e["name"] in names]


def _run_local(spec, out, todo, device, threads) -> dict:
    t0 = time.perf_counter()
    for e in _needed_twins(spec, todo):
        build_one_twin(out, e)
    t1 = time.perf_counter()
    r = SampleRenderer(out, spec, device, threads)
    n = sum(len(shard_indices(spec, s)) for s in todo)
    prog = _Progress(n_samples(spec), n_samples(spec) - n)
    for s in todo:
        write_shard(out, s, r.render_shard(s))
        prog.add(len(shard_indices(spec, s)))
    return {"samples": n, "samples_per_s": prog.rate, "steady_samples_per_s": prog.steady_rate(),
            "twin_seconds": round(t1 - t0, 3), "first_shard_s": prog.first, "workers": 0,
            "timeline": prog.timeline}


_SETUP_HOOK_SRC = '''
def ctwin_worker_setup():
    """Load the ctwin package (a clone's root, not installed) under the driver's package name."""
    import importlib.util, os, sys, types
    name, root = os.environ["CTWIN_RAY_PACKAGE"], os.environ["CTWIN_RAY_ROOT"]
    if name in sys.modules:
        return
    parts = name.split(".")
    for i in range(1, len(parts)):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
'''


def _setup_hook():
    """The worker set-up hook, defined outside any importable module so that Ray ships it by
    value: it makes the package importable in every worker before an actor is created."""
    ns = {"__name__": "ctwin_ray_setup"}
    exec(_SETUP_HOOK_SRC, ns)  # noqa: S102 - fixed source above
    return ns["ctwin_worker_setup"]


class _Worker:
    """A Ray actor: one ``SampleRenderer`` kept warm across shards."""

    def __init__(self, out, spec, device, threads):
        self.r = SampleRenderer(out, spec, device, threads)

    def info(self) -> dict:
        import numba

        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.r.device,
                "threads": numba.get_num_threads(), "node": ray.get_runtime_context().get_node_id()[:8]}

    def render_shard(self, shard: int):
        return shard, self.r.render_shard(shard)

    def memory_mb(self) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")


def _build_task(out, entry):
    return build_one_twin(out, entry)


def _ray_init(address, workers, threads):
    import ray

    pkg = __name__.rsplit(".core.", 1)[0]
    root = str(Path(__file__).resolve().parents[2])
    env = {"CTWIN_RAY_PACKAGE": pkg, "CTWIN_RAY_ROOT": root,
           "NUMBA_NUM_THREADS": str(max(int(threads or 1), os.cpu_count() or 1))}
    runtime_env = {"worker_process_setup_hook": _setup_hook(), "env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
    else:
        cpus = max(os.cpu_count() or 1, (workers or 1) * (threads or 1))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env,
                 object_store_memory=256 * 2 ** 20, log_to_driver=False, logging_level="ERROR")
    return ray


def _run_ray(spec, out, todo, workers, threads, address, device) -> dict:
    if importlib.util.find_spec("ray") is None:
        raise CtwinError("ray is not installed: pip install -r requirements.txt (or use --workers 0)")
    t0 = time.perf_counter()
    if not todo:
        return {"samples": 0, "samples_per_s": 0.0, "steady_samples_per_s": None, "twin_seconds": 0.0,
                "first_shard_s": None, "workers": 0, "timeline": []}
    ray = _ray_init(address, workers, threads)
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0)) if device != "cpu" else 0
        if workers is None:
            workers = gpus or max(1, int(res.get("CPU", 1)) // max(int(threads or 1), 1))
        workers = max(1, min(int(workers), len(todo)))
        if threads is None:
            threads = 1 if gpus else max(1, int(res.get("CPU", 1)) // workers)
        dev = "cuda" if gpus else ("cpu" if device == "auto" else device)

        # twins: one build task each, in parallel
        need = [e for e in _needed_twins(spec, todo) if not (twin_dir(out, e) / "twin.json").is_file()]
        if need:
            report(f"dataset: building {len(need)} twin(s) on Ray")
            build = ray.remote(num_cpus=1, max_retries=1)(_build_task)
            ray.get([build.remote(str(out), e) for e in need])
        t1 = time.perf_counter()

        actor_cls = ray.remote(_Worker)
        opts = {"num_cpus": 1 if gpus else threads, "num_gpus": 1 if gpus else 0}

        def start():
            a = actor_cls.options(**opts).remote(str(out), spec, dev, threads)
            return a

        actors = [start() for _ in range(workers)]
        infos = ray.get([a.info.remote() for a in actors])
        for k, inf in enumerate(infos):
            report(f"dataset: worker {k} ready (pid {inf['pid']} on {inf['host']}, node {inf['node']}, "
                   f"{inf['device']}, {inf['threads']} thread(s))")
        n = sum(len(shard_indices(spec, s)) for s in todo)
        prog = _Progress(n_samples(spec), n_samples(spec) - n)
        twin_of = {s: spec["inputs"][shard_indices(spec, s)[0] // spec["samples_per_twin"]]["name"] for s in todo}
        pending = list(todo)
        attempts = {s: 0 for s in todo}
        last_twin = {k: None for k in range(len(actors))}
        inflight = {}
        free = list(range(len(actors)))
        mem = {}
        while pending or inflight:
            while free and pending:
                k = free.pop(0)
                pick = next((s for s in pending if twin_of[s] == last_twin[k]), pending[0])
                pending.remove(pick)
                last_twin[k] = twin_of[pick]
                inflight[actors[k].render_shard.remote(pick)] = (k, pick)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            k, s = inflight.pop(ref)
            try:
                _, data = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                why = f"worker {k} died ({type(exc).__name__})"
                actors[k] = start()
                last_twin[k] = None
                _retry(s, attempts, pending, why, shard_indices(spec, s))
                free.append(k)
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, SampleError):
                    why = f"worker {k}: {Exception.__str__(cause)}"
                else:
                    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                    why = f"worker {k}: {lines[-1].strip() if lines else type(exc).__name__}"
                _retry(s, attempts, pending, why, shard_indices(spec, s))
                free.append(k)
                continue
            write_shard(out, s, data)
            prog.add(len(shard_indices(spec, s)), worker=k)
            free.append(k)
        try:
            mem = {k: ray.get(a.memory_mb.remote(), timeout=30) for k, a in enumerate(actors)}
        except Exception:  # noqa: BLE001 - a memory figure is optional
            mem = {}
        return {"samples": n, "samples_per_s": prog.rate, "steady_samples_per_s": prog.steady_rate(),
                "twin_seconds": round(t1 - t0, 3), "first_shard_s": prog.first, "workers": len(actors),
                "threads": threads, "device": dev, "worker_rss_mb": mem, "timeline": prog.timeline}
    finally:
        ray.shutdown()


def _retry(shard, attempts, pending, why, indices) -> None:
    attempts[shard] += 1
    span = f"samples {indices[0]}-{indices[-1]}"
    if attempts[shard] > 1:
        raise CtwinError(f"shard {shard} ({span}) failed twice: {why}")
    report(f"dataset: shard {shard} ({span}) failed, retrying once: {why}")
    pending.insert(0, shard)
