"""``ctwin dataset``: spec validation, deterministic sampling, byte-reproducible shards, Ray runs
(local, killed and resumed, a two-node cluster), and equality with samples rendered alone.

The Ray tests share one reference run of ``examples/dataset_tiny.yaml`` (two phantoms at 8 mm,
three poses, two views, 64x64, two workers); later runs copy its built twins so that they render
only. Every process that renders pays numba's compilation of the render kernels once.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from ctwin import cli
from ctwin.core.dataset import dataset as D
from ctwin.core.dataset import shards as S
from ctwin.core.errors import CtwinError

# Ray is pinned only in the Python 3.11 environment (.venv, the CLI's; requirements.txt): the
# Python 3.13 one (Blender 5.1+, whose extension does not bundle Ray) runs the rest of this module.
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed in this environment (only in .venv, Python 3.11)")

ROOT = Path(__file__).resolve().parent.parent
CTWIN = str(ROOT / "ctwin")
TINY = ROOT / "examples" / "dataset_tiny.yaml"
BIN = Path(sys.executable).parent


def tiny_raw() -> dict:
    import yaml

    return yaml.safe_load(TINY.read_text())


# ------------------------------------------------------------------------------------------------
# spec validation: one line naming the field
# ------------------------------------------------------------------------------------------------
def _bad(tmp_path, mutate):
    raw = tiny_raw()
    mutate(raw)
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(raw))
    return p


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.update(colour="red"), "spec field colour: unknown key"),
    (lambda r: r["views"].update(zoom=2), "spec field views.zoom: unknown key"),
    (lambda r: r["inputs"].update(cts=[{"ct": "missing_ct.nii.gz", "seg": "missing_seg.nii.gz"}]),
     "spec field inputs.cts[0].ct: not found"),
    (lambda r: r.update(samples_per_twin=-3), "spec field samples_per_twin: must be an integer >= 1"),
    (lambda r: r.update(shard_size=0), "spec field shard_size: must be an integer >= 1"),
    (lambda r: r.update(poses={"presets": []}), "spec field poses: the pose set is empty"),
    (lambda r: r["poses"].update(presets=["cartwheel"]), "spec field poses.presets[0]: unknown preset"),
    (lambda r: r["views"].update(sad_mm=[900, 1600]), "spec field views.sid_mm"),
    (lambda r: r["physics"].update(kvp=200), "spec field physics.kvp"),
    (lambda r: r["physics"].update(detector="paxscan4030cb"), "spec field physics.detector: needs physics.kvp"),
    (lambda r: r["physics"].update(kvp=80, detector="film"), "spec field physics.detector: must be one of"),
    (lambda r: r["poses"].update(random={"joints": {"left_knee": {"x": [10, 5]}}}),
     "spec field poses.random.joints.left_knee.x: low 10 exceeds high 5"),
])
def test_bad_spec_names_the_field(tmp_path, mutate, field):
    p = _bad(tmp_path, mutate)
    with pytest.raises(CtwinError, match="^" + field.replace("[", r"\[").replace("]", r"\]")):
        D.load_spec(p)


def test_bad_spec_cli_one_line_exit_2(tmp_path, capsys):
    p = _bad(tmp_path, lambda r: r.update(samples_per_twin=-1))
    rc = cli.main(["dataset", "--spec", str(p), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("ctwin dataset: error: spec field samples_per_twin:")
    assert not (tmp_path / "o").exists()


def test_changed_spec_refused_unless_overwrite(tmp_path):
    spec = D.load_spec(TINY)
    D.prepare_output(spec, tmp_path / "o")
    raw = tiny_raw()
    raw["seed"] = 1
    other = D.load_spec(raw, base_dir=ROOT / "examples")
    with pytest.raises(CtwinError, match="another spec .*--overwrite"):
        D.prepare_output(other, tmp_path / "o")
    (tmp_path / "o" / "shards" / "shard-000000.tar").write_bytes(b"old")
    D.prepare_output(other, tmp_path / "o", overwrite=True)
    assert not (tmp_path / "o" / "shards" / "shard-000000.tar").exists()
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["spec_sha256"] == D.spec_hash(other)


# ------------------------------------------------------------------------------------------------
# sampling and shards (no rendering)
# ------------------------------------------------------------------------------------------------
def test_sample_params_depend_on_seed_and_index_only():
    spec = D.load_spec(TINY)
    fwd = [D.sample_params(spec, i) for i in range(D.n_samples(spec))]
    back = [D.sample_params(spec, i) for i in reversed(range(D.n_samples(spec)))][::-1]
    assert fwd == back
    assert {p["twin"] for p in fwd[:6]} == {"phantom_s0_8mm_supine_arms_down"}
    assert {p["twin"] for p in fwd[6:]} == {"phantom_s1_8mm_supine_arms_down"}
    # the draws cover the spec's sets, and another master seed changes them
    assert {p["pose"]["name"] for p in fwd} <= {"supine_arms_down", "hip_flexion", "knee_flexion"}
    assert len({p["pose"]["name"] for p in fwd}) >= 2 and len({p["view"]["name"] for p in fwd}) == 2
    raw = tiny_raw()
    raw["seed"] = 7
    other = D.load_spec(raw, base_dir=ROOT / "examples")
    assert [D.sample_params(other, i) for i in range(12)] != fwd


def test_random_poses_stay_within_joint_limits_and_ranges():
    from ctwin.core.rig.pose import joint_limit_violations
    from ctwin.core.rig.poses import PRESETS

    raw = tiny_raw()
    raw["poses"] = {"random": {"joints": {"left_knee": {"x": [0, 90]}, "right_hip": {"x": [-60, 0]}}}}
    raw["samples_per_twin"] = 40
    spec = D.load_spec(raw, base_dir=ROOT / "examples")
    base = PRESETS["supine_arms_down"].reshape(24, 3)
    knee = []
    for i in range(D.n_samples(spec)):
        p = np.asarray(D.sample_params(spec, i)["pose"]["pose"]).reshape(24, 3)
        assert not joint_limit_violations(p.reshape(72))
        d = np.degrees(p - base)
        assert -60 - 1e-9 <= d[2, 0] <= 1e-9  # right_hip x
        knee.append(d[4, 0])  # left_knee x
        changed = np.flatnonzero(np.abs(d).sum(1) > 1e-12)
        assert set(changed) <= {2, 4}
    assert 0 <= min(knee) and max(knee) <= 90 and max(knee) - min(knee) > 45  # spread over the range


def test_shard_bytes_are_reproducible_and_readable(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.random((5, 7), dtype=np.float32)
    masks = (rng.random((2, 5, 7)) > 0.5).astype(np.uint8)

    def make():
        return S.tar_bytes([("00000003", {"json": S.json_bytes({"b": 1, "a": [1.5]}),
                                          "tif": S.tif_bytes(img),
                                          "masks.npz": S.npz_bytes(masks=masks, names=np.array(["x", "y"]))})])

    a = make()
    time.sleep(1.1)  # any clock in the bytes would now differ
    assert make() == a
    (tmp_path / "s.tar").write_bytes(a)
    import tarfile

    with tarfile.open(tmp_path / "s.tar") as tf:
        ms = tf.getmembers()
    assert [m.name for m in ms] == ["00000003.tif", "00000003.masks.npz", "00000003.json"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in ms)
    (s,) = list(S.iter_samples(tmp_path / "s.tar"))
    assert s["key"] == "00000003" and s["meta"] == {"a": [1.5], "b": 1}
    assert s["image"].dtype == np.float32 and np.array_equal(s["image"], img)
    assert np.array_equal(s["masks"], masks) and s["mask_names"] == ["x", "y"]


# ------------------------------------------------------------------------------------------------
# Ray runs
# ------------------------------------------------------------------------------------------------
def _env(ray_tmp: Path) -> dict:
    env = dict(os.environ)
    env["RAY_TMPDIR"] = str(ray_tmp)  # this test's Ray sessions live here: cleaned up by path below
    env["RAY_AUTH_MODE"] = "disabled"  # 127.0.0.1 only; a token shared with other users' clusters is not wanted
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def _procs_under(marker: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(d.name))
    return out


def _kill_started(pgids=(), marker: str | None = None) -> None:
    """Kill what this test started: its process groups, and Ray processes under its temp dir."""
    for g in pgids:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if marker:
        for pid in _procs_under(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(args, ray_tmp, log: Path) -> subprocess.Popen:
    return subprocess.Popen([CTWIN, *args], cwd=ROOT, env=_env(ray_tmp), stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), start_new_session=True)


def _run(args, ray_tmp, log: Path, timeout=900) -> int:
    p = _start(args, ray_tmp, log)
    try:
        return p.wait(timeout=timeout)
    finally:
        _kill_started([p.pid])


def _wait_for(cond, proc, timeout=600, what=""):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _shards(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("shard-*.tar"))}


def _copy_twins(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "twins", dst / "twins")


@pytest.fixture(scope="module")
def ray_tmp():
    d = Path(tempfile.mkdtemp(prefix="ctwr-", dir="/tmp"))  # short: Ray's socket paths are limited
    yield d
    _kill_started(marker=str(d))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_tmp):
    """The tiny spec through local Ray with two workers (twins built by the run)."""
    out = tmp_path_factory.mktemp("ds") / "ref"
    log = out.parent / "ref.log"
    t0 = time.perf_counter()
    rc = _run(["dataset", "--spec", str(TINY), "--out", str(out), "--workers", "2", "--threads", "1"], ray_tmp, log)
    assert rc == 0, log.read_text()[-3000:]
    return {"out": out, "log": log.read_text(), "seconds": time.perf_counter() - t0}


@needs_ray
@pytest.mark.slow
def test_local_ray_two_workers(reference):
    out, log = reference["out"], reference["log"]
    assert "worker 0 ready" in log and "worker 1 ready" in log
    assert "samples/s, ETA" in log
    sh = _shards(out)
    assert list(sh) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = list(S.iter_samples(out))
    assert [s["key"] for s in samples] == [f"{i:08d}" for i in range(12)]
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    spec = D.load_spec(TINY)
    for s, row in zip(samples, index):
        assert s["image"].shape == (64, 64) and s["image"].dtype == np.float32
        assert np.isfinite(s["image"]).all() and s["image"].max() > 1.0  # a body in the beam
        assert s["meta"]["params"] == row == D.sample_params(spec, row["index"])
        assert s["masks"].shape[1:] == (64, 64) and s["masks"].shape[0] == len(s["mask_names"]) > 10
        # the femur's mask lies where the DRR is dense
        k = s["mask_names"].index("femur_left")
        assert s["image"][s["masks"][k] > 0].mean() > s["image"][s["image"] > 0].mean()
        assert "pelvis" in s["meta"]["points"][0]["joints"]
        assert s["meta"]["geometry"][0]["size_px"] == [64, 64]
    assert (out / "twins" / "phantom_s1_8mm_supine_arms_down" / "twin.json").is_file()


@needs_ray
@pytest.mark.slow
def test_each_sample_equals_the_sample_rendered_alone(reference):
    """Two samples (one per twin) rendered alone through the Python API in this process."""
    out = reference["out"]
    raw = dict(S.iter_raw(out))
    for i in (1, 10):
        tif = D.render_only(TINY, out, i, device="cpu")
        key = f"{i:08d}"
        assert tif.read_bytes() == raw[key]["tif"]
        assert (tif.parent / f"{key}.masks.npz").read_bytes() == raw[key]["masks.npz"]
        assert (tif.parent / f"{key}.json").read_bytes() == raw[key]["json"]


@needs_ray
@pytest.mark.slow
def test_driver_killed_then_resumed_gives_the_same_shards(reference, ray_tmp, tmp_path):
    """SIGKILL of the driver after its first shard; the re-run (a second run of the same spec in
    a new process) completes with shards byte-identical to the uninterrupted run's."""
    out = tmp_path / "b"
    _copy_twins(reference["out"], out)
    args = ["dataset", "--spec", str(TINY), "--out", str(out), "--workers", "1", "--threads", "1"]
    p = _start(args, ray_tmp, tmp_path / "b1.log")
    try:
        _wait_for(lambda: (out / "shards" / "shard-000000.tar").exists(), p, what="the first shard")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        _kill_started([p.pid])
    written = _shards(out)
    assert "shard-000002.tar" not in written  # killed in the middle
    assert written["shard-000000.tar"] == _shards(reference["out"])["shard-000000.tar"]
    rc = _run(args[:-4] + ["--workers", "2", "--threads", "1"], ray_tmp, tmp_path / "b2.log")
    log = (tmp_path / "b2.log").read_text()
    assert rc == 0, log[-3000:]
    assert f"{len(written)} of 3 shards already written, skipped" in log
    assert _shards(out) == _shards(reference["out"])
    assert not list((out / "shards").glob(".shard-*"))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster(ray_tmp):
    """A head and a worker node (one CPU each) started with `ray start --block` on 127.0.0.1."""
    ray = str(BIN / "ray")
    gcs, *ports = _free_ports(17)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--block", "--disable-usage-stats"]

    def node_ports(p):
        return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--min-worker-port", str(p[2]), "--max-worker-port", str(p[2] + 0),
                "--dashboard-agent-listen-port", str(p[3]), "--dashboard-agent-grpc-port", str(p[4]),
                "--metrics-export-port", str(p[5]), "--runtime-env-agent-port", str(p[6])]

    wlo = 20000 + (os.getpid() * 37) % 20000  # worker ports: a range of its own per node
    head_cmd = [ray, "start", "--head", "--port", str(gcs), "--include-dashboard", "false",
                "--object-store-memory", str(100 * 2 ** 20),
                *common, *node_ports(ports[:7])]
    head_cmd[head_cmd.index("--min-worker-port") + 1:head_cmd.index("--max-worker-port") + 2] = [
        str(wlo), "--max-worker-port", str(wlo + 40)]
    work_cmd = [ray, "start", "--address", f"127.0.0.1:{gcs}", "--object-store-memory", str(100 * 2 ** 20),
                *common, *node_ports(ports[7:14])]
    work_cmd[work_cmd.index("--min-worker-port") + 1:work_cmd.index("--max-worker-port") + 2] = [
        str(wlo + 50), "--max-worker-port", str(wlo + 90)]
    env = _env(ray_tmp)
    procs = []
    try:
        procs.append(subprocess.Popen(head_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        _wait_port(gcs, procs[0])
        procs.append(subprocess.Popen(work_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        time.sleep(3)
        assert procs[1].poll() is None, "the worker node did not start"
        yield f"127.0.0.1:{gcs}"
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _kill_started([p.pid for p in procs], marker=str(ray_tmp))


def _wait_port(port, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"ray start --head exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError("the Ray head did not open its port")


@needs_ray
@pytest.mark.slow
def test_two_node_cluster_with_a_killed_worker(reference, cluster, ray_tmp, tmp_path):
    """The tiny spec (two samples a shard) on a two-node cluster through --address; one worker
    actor is killed (SIGKILL) mid-run: its shard is retried and every sample equals the reference."""
    raw = tiny_raw()
    raw["shard_size"] = 2
    spec = tmp_path / "tiny2.json"
    spec.write_text(json.dumps(raw))
    out = tmp_path / "c"
    _copy_twins(reference["out"], out)
    log = tmp_path / "c.log"
    p = _start(["dataset", "--spec", str(spec), "--out", str(out), "--address", cluster, "--workers", "2",
                "--threads", "1"], ray_tmp, log)
    try:
        _wait_for(lambda: (out / "shards" / "shard-000000.tar").exists()
                  or (out / "shards" / "shard-000001.tar").exists(), p, what="the first shard")
        pids = [int(ln.split("(pid ")[1].split()[0]) for ln in log.read_text().splitlines() if "ready (pid" in ln]
        assert len(pids) == 2, log.read_text()
        os.kill(pids[0], signal.SIGKILL)
        rc = p.wait(timeout=600)
    finally:
        _kill_started([p.pid])
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "failed, retrying once: worker 0 died" in text
    nodes = {ln.split("node ")[1].split(",")[0] for ln in text.splitlines() if "ready (pid" in ln}
    assert len(nodes) == 2, text  # the workers ran on both nodes
    got = dict(S.iter_raw(out))
    ref = dict(S.iter_raw(reference["out"]))
    assert list(got) == list(ref)

    def without_shard(b):  # the sample's shard number is among its parameters; shards hold 2, not 4
        d = json.loads(b)
        d["params"].pop("shard")
        return d

    for k in ref:
        assert got[k]["tif"] == ref[k]["tif"] and got[k]["masks.npz"] == ref[k]["masks.npz"], k
        assert without_shard(got[k]["json"]) == without_shard(ref[k]["json"]), k
    assert len(_shards(out)) == 6


def test_help_does_not_import_ray_or_yaml():
    code = ("import sys; sys.path.insert(0, 'tools'); from launch import load_package; load_package('ctwin'); "
            "from ctwin import cli; cli.main(['--help']) if False else cli.build_parser(); "
            "print(sorted(m for m in ('ray', 'yaml') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@needs_ray
@pytest.mark.slow
def test_failing_sample_is_reported_and_retried_once(tmp_path, ray_tmp, monkeypatch):
    """A twin folder without its rig: every sample fails at once (no rendering). The run reports
    the sample index, retries the shard once, then stops with one line."""
    tw = tmp_path / "broken_twin"
    tw.mkdir()
    (tw / "twin.json").write_text(json.dumps({"format": 1, "ct": {"bbox_mm": [[0, 0, 0], [300, 200, 900]]}}))
    raw = tiny_raw()
    raw["inputs"] = {"twins": [str(tw)]}
    raw["samples_per_twin"] = 2
    spec = tmp_path / "broken.json"
    spec.write_text(json.dumps(raw))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    lines = []
    from ctwin.core import progress

    progress.set_sink(lambda m, f: lines.append(m))
    try:
        with pytest.raises(CtwinError, match=r"shard 0 \(samples 0-1\) failed twice: worker 0: sample 0: "
                                             r"\w+Error: .*broken_twin"):
            D.run_dataset(spec, tmp_path / "o", workers=1, threads=1)
    finally:
        progress.set_sink(None)
    assert sum("shard 0 (samples 0-1) failed, retrying once: worker 0: sample 0: " in m for m in lines) == 1, lines
    assert not list((tmp_path / "o" / "shards").iterdir())


@pytest.mark.slow
def test_realistic_physics_sample_is_reproducible(twin_dir, tmp_path):
    """physics.kvp renders a sample with the realistic chain (core.drr.xray) and records its spectrum;
    the pose and view are those of the same spec without kvp; rendering again gives the same bytes."""
    pytest.importorskip("spekpy")
    import tifffile

    raw = tiny_raw()
    raw["inputs"] = {"phantoms": [{"seed": 0, "spacing_mm": 8}]}
    raw["samples_per_twin"] = 1
    raw["views"]["size"] = 32
    specs = {}
    for name, extra in (("mono", {}), ("real", {"kvp": [70, 90], "detector": "paxscan4030cb"}),
                        ("noisy", {"kvp": [70, 90], "detector": "paxscan4030cb", "photons": 1e5})):
        r = json.loads(json.dumps(raw))
        r["physics"].update(extra)
        specs[name] = tmp_path / f"{name}.json"
        specs[name].write_text(json.dumps(r))
    pm, pr = (D.sample_params(D.load_spec(specs[n]), 0) for n in ("mono", "real"))
    assert pm["pose"] == pr["pose"] and pm["view"] == pr["view"]
    assert 70 <= pr["physics"]["kvp"] <= 90 and pr["physics"]["detector"] == "paxscan4030cb"
    out = tmp_path / "ds"  # one folder: the twin is built once
    # That twin (phantom seed 0, 8 mm, supine_arms_down) is the session's: the same phantom built
    # by the same build_twin (test_reliability.test_fault_injection_build checks the CLI's build
    # gives the same files); twin.blend aside, which the dataset does not write.
    entry = next(e for e in D.load_spec(specs["mono"])["inputs"])
    assert entry["name"] == "phantom_s0_8mm_supine_arms_down" and entry["noise_hu"] == 0
    shutil.copytree(twin_dir, out / "twins" / entry["name"], ignore=shutil.ignore_patterns("twin.blend"))
    img = {}
    for name in ("mono", "real", "noisy"):
        tif = D.render_only(specs[name], out, 0)
        img[name] = tifffile.imread(tif)
        if name == "real":
            rec = json.loads(tif.with_suffix(".json").read_text())["xray"][0]
            assert rec["kvp"] == pr["physics"]["kvp"] and rec["detector"] == "paxscan4030cb"
            assert len(rec["spectrum_kev"]) == len(rec["spectrum_fluence"]) > 10
        if name == "noisy":
            noisy = tif.read_bytes()
            assert D.render_only(specs[name], out, 0).read_bytes() == noisy
    # the same anatomy seen with another spectrum: a different image of the same picture
    body = img["mono"] > 0.5
    assert not np.array_equal(img["real"], img["mono"])
    assert np.corrcoef(img["real"][body], img["mono"][body])[0, 1] > 0.99
    assert not np.array_equal(img["noisy"], img["real"])
