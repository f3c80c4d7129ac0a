"""Bad input and interruptions: every case is a one-line refusal (exit 2), a clean interrupt (130),
or a correct result; never a traceback, a silently wrong result, or half-written files left behind.

Most cases run the CLI in-process (``cli.main``); interrupts and kills run it as a subprocess. The
inputs are tiny: the session's coarse phantom and twin (conftest), a few-pixel detector.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, real_ct_path
from ctwin import cli
from ctwin.core.errors import CtwinError
from ctwin.core.volumes.volume import Volume, load_nifti, save_nifti

SIZE = "8"


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    """stderr lines that are not progress reports."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[ctwin]")]


def assert_refused(rc, err, *needles):
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = error_lines(err)
    assert rc == 2, err
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def no_partials(*folders):
    """Nothing half-written: no temporary (``.<name>.pid<N>-...``) entries in the folders."""
    left = [p for d in folders if Path(d).is_dir() for p in Path(d).iterdir() if ".pid" in p.name]
    assert not left, left


@pytest.fixture
def twin_copy(twin_dir, tmp_path):
    """A private copy of the session twin (without twin.blend), safe to damage."""
    dst = tmp_path / "twin"
    shutil.copytree(twin_dir, dst, ignore=shutil.ignore_patterns("twin.blend", "*.blend1"))
    return dst


@pytest.fixture(scope="module")
def shifted_ct(coarse_phantoms, tmp_path_factory):
    """The acquisition phantom's CT with its origin moved by (40, 40, 0) mm: a valid CT and a valid
    segmentation that do not belong together."""
    src = coarse_phantoms["supine_arms_down"]
    ct = load_nifti(src / "ct.nii.gz")
    a = ct.affine.copy()
    a[:3, 3] += [40.0, 40.0, 0.0]
    out = tmp_path_factory.mktemp("shifted") / "ct.nii.gz"
    save_nifti(Volume(ct.data, a), out)
    return out


# ------------------------------------------------------------------------------------------------
# build: plausibility before work, safe outputs
# ------------------------------------------------------------------------------------------------
def test_misregistered_ct_and_seg_refused_with_the_offset(capsys, coarse_phantoms, shifted_ct, tmp_path):
    seg = coarse_phantoms["supine_arms_down"] / "seg.nii.gz"
    out = tmp_path / "twin"
    rc, _, err = run_cli(capsys, "build", "--ct", shifted_ct, "--seg", seg, "--out", out, "--no-blend")
    line = assert_refused(rc, err, "bone labels have median", "not aligned", "--force")
    # the offset search finds the shift that was applied: the CT moved by +40 mm in x and y (LPS),
    # so the labels sit 40 mm off the other way
    assert "[-40, -40, 0] mm" in line, line
    assert not out.exists()
    no_partials(tmp_path)


def test_whole_fov_shift_refused(capsys, coarse_phantoms, tmp_path):
    src = coarse_phantoms["supine_arms_down"]
    ct = load_nifti(src / "ct.nii.gz")
    a = ct.affine.copy()
    a[:3, 3] += [0.0, 0.0, 5000.0]
    save_nifti(Volume(ct.data, a), tmp_path / "ct.nii.gz")
    rc, _, err = run_cli(capsys, "build", "--ct", tmp_path / "ct.nii.gz", "--seg", src / "seg.nii.gz",
                         "--out", tmp_path / "twin", "--no-blend")
    assert_refused(rc, err, "does not overlap")
    assert not (tmp_path / "twin").exists()


def _seg_variant(src: Path, dst: Path, edit) -> Path:
    seg = load_nifti(src / "seg.nii.gz")
    names = json.loads((src / "labels.json").read_text())
    data = edit(np.asarray(seg.data).copy(), {int(k): v for k, v in names.items()})
    dst.mkdir(parents=True, exist_ok=True)
    save_nifti(Volume(data, seg.affine), dst / "seg.nii.gz")
    shutil.copy(src / "labels.json", dst / "labels.json")
    return dst / "seg.nii.gz"


def test_segmentation_without_bones_refused(capsys, coarse_phantoms, tmp_path):
    from ctwin.core.volumes.labels import is_skeletal

    src = coarse_phantoms["supine_arms_down"]

    def drop_bones(d, names):
        d[np.isin(d, [i for i, n in names.items() if is_skeletal(n)])] = 0
        return d

    seg = _seg_variant(src, tmp_path / "seg", drop_bones)
    rc, _, err = run_cli(capsys, "build", "--ct", src / "ct.nii.gz", "--seg", seg, "--out", tmp_path / "t",
                         "--no-blend")
    assert_refused(rc, err, "no bone labels")


def test_left_right_swapped_labels_refused(capsys, coarse_phantoms, tmp_path):
    src = coarse_phantoms["supine_arms_down"]
    rev = {}

    def swap(d, names):
        ids = {n: i for i, n in names.items()}
        out = d.copy()
        for n, i in ids.items():
            if n.endswith("_left") and n[:-5] + "_right" in ids:
                j = ids[n[:-5] + "_right"]
                out[d == i], out[d == j] = j, i
                rev[n] = True
        return out

    seg = _seg_variant(src, tmp_path / "seg", swap)
    assert len(rev) >= 4
    rc, _, err = run_cli(capsys, "build", "--ct", src / "ct.nii.gz", "--seg", seg, "--out", tmp_path / "t",
                         "--no-blend")
    assert_refused(rc, err, "left/right label pairs lie on the wrong side")


def test_force_records_the_problem(coarse_phantoms, shifted_ct):
    # --force: the check returns its record (written into twin.json as "plausibility" and
    # "warnings" by the build) instead of refusing.
    from ctwin.core.volumes.ct import load_ct
    from ctwin.core.volumes.plausibility import check_ct_segmentation
    from ctwin.core.volumes.segmentation import load_segmentation

    ct = load_ct(shifted_ct)
    lab, names = load_segmentation(coarse_phantoms["supine_arms_down"] / "seg.nii.gz", ct)
    with pytest.raises(CtwinError, match="not aligned"):
        check_ct_segmentation(ct, lab, names)
    rec = check_ct_segmentation(ct, lab, names, force=True)
    assert rec["forced"] and not rec["ok"] and "not aligned" in rec["problems"][0]
    assert rec["measured"]["bone_median_hu"] < 100
    # the aligned pair passes with bone-like numbers
    ct0 = load_ct(coarse_phantoms["supine_arms_down"] / "ct.nii.gz")
    lab0, names0 = load_segmentation(coarse_phantoms["supine_arms_down"] / "seg.nii.gz", ct0)
    ok = check_ct_segmentation(ct0, lab0, names0)
    assert ok["ok"] and ok["measured"]["bone_median_hu"] > 300


@pytest.mark.slow
def test_force_builds_a_misregistered_pair_and_records_it(capsys, coarse_phantoms, shifted_ct, tmp_path):
    seg = coarse_phantoms["supine_arms_down"] / "seg.nii.gz"
    out = tmp_path / "twin"
    rc, _, err = run_cli(capsys, "build", "--ct", shifted_ct, "--seg", seg, "--out", out, "--no-blend", "--force")
    assert rc == 0, err
    assert "Traceback" not in err and "WARNING (--force): bone labels have median" in err, err
    meta = json.loads((out / "twin.json").read_text())
    assert meta["plausibility"]["forced"] is True and not meta["plausibility"]["ok"]
    assert meta["plausibility"]["measured"]["bone_median_hu"] < 100
    assert any(w.startswith("built with --force: bone labels have median") for w in meta["warnings"])
    no_partials(tmp_path, out)


def test_implausible_fit_is_a_warning():
    from ctwin.core.volumes.plausibility import check_fit

    assert check_fit({"chamfer_mm": 1.5, "enclosure_pct": 99.9}) == []
    w = check_fit({"chamfer_mm": 42.0, "enclosure_pct": 60.0})
    assert len(w) == 2 and "chamfer 42.0 mm" in w[0] and "60.0 %" in w[1]
    # the demo report shows the twin's warnings at the top
    import tempfile

    from ctwin.core.twin.report import write_report

    with tempfile.TemporaryDirectory() as d:
        html = write_report(d, {"warnings": w}, []).read_text()
        assert html.index("WARNING: implausible fit: chamfer 42.0 mm") < html.index("<h2>Metrics")


def test_implausible_joint_geometry_is_a_warning(twin_dir):
    """The session twin's fitted joints pass; the same joints tampered (a collapsed femur, a
    stretched arm, mirrored hips, metres read as mm) each give a warning naming the part."""
    from ctwin.core.volumes.plausibility import check_fit, joint_geometry_findings

    j = np.asarray(json.loads((twin_dir / "fit.json").read_text())["joints_mm"], dtype=np.float64)
    assert joint_geometry_findings(j) == []
    short = j.copy()
    short[4] = short[1] + 0.2 * (short[4] - short[1])  # left knee 80 % of the way up to the hip
    w = joint_geometry_findings(short)
    assert any("left femur length" in x for x in w) and any("femur lengths" in x and "differ" in x for x in w)
    long_arm = j.copy()
    long_arm[[19, 21, 23]] += 0.4 * (j[19] - j[17])  # right elbow, wrist and hand moved away together
    w = joint_geometry_findings(long_arm)
    assert len(w) == 1 and "humerus lengths" in w[0], w
    mirrored = j.copy()
    mirrored[:, 0] *= -1.0
    w = joint_geometry_findings(mirrored)
    assert any("left hip lies on the patient's right" in x for x in w) and len(w) == 2
    w = check_fit({"chamfer_mm": 1.2, "enclosure_pct": 99.9}, j / 1000.0)  # metres read as mm
    assert len(w) == 8 and all(" length 0 mm (real bodies" in x for x in w), w
    assert joint_geometry_findings(np.full((24, 3), np.nan)) == ["implausible fit: the fitted joints are not finite"]


def test_built_twin_records_plausibility(twin_dir):
    meta = json.loads((twin_dir / "twin.json").read_text())
    assert meta["plausibility"]["ok"] is True and meta["warnings"] == []


@pytest.mark.parametrize("case", ["existing_file", "inside_twin_meshes"])
def test_build_out_checked_before_work(capsys, coarse_phantoms, twin_dir, tmp_path, case):
    src = coarse_phantoms["supine_arms_down"]
    if case == "existing_file":
        out = tmp_path / "afile"
        out.write_text("mine")
        needle = "is an existing file"
    else:
        out = twin_dir / "meshes" / "twin2"
        needle = "twin"
    t0 = time.perf_counter()
    rc, _, err = run_cli(capsys, "build", "--ct", src / "ct.nii.gz", "--seg", src / "seg.nii.gz",
                         "--out", out, "--no-blend")
    assert_refused(rc, err, needle)
    assert time.perf_counter() - t0 < 20  # refused before the import and the fit
    assert "build 1/6" not in err
    if case == "existing_file":
        assert out.read_text() == "mine"
    else:
        assert not out.exists()


# ------------------------------------------------------------------------------------------------
# outputs that would overwrite a twin's own files
# ------------------------------------------------------------------------------------------------
def test_pose_out_into_twin_meshes_refused(capsys, twin_copy):
    before = sorted(p.name for p in (twin_copy / "meshes").iterdir())
    rc, _, err = run_cli(capsys, "pose", "--twin", twin_copy, "--pose", "hip_flexion",
                         "--out", twin_copy / "meshes")
    assert_refused(rc, err, "twin's own meshes")
    assert sorted(p.name for p in (twin_copy / "meshes").iterdir()) == before


@pytest.mark.parametrize("target, needle", [("twin.json", "twin's own twin.json"),
                                            ("volumes/m.json", "twin's own volumes"),
                                            (".", "is a folder")])
def test_evaluate_out_checked_before_work(capsys, twin_copy, target, needle):
    before = (twin_copy / "twin.json").read_bytes()
    t0 = time.perf_counter()
    rc, _, err = run_cli(capsys, "evaluate", "--twin", twin_copy, "--out", twin_copy / target)
    assert_refused(rc, err, needle)
    assert time.perf_counter() - t0 < 10  # before the evaluation, not after it
    assert (twin_copy / "twin.json").read_bytes() == before


def test_render_out_checks(capsys, twin_copy, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = run_cli(capsys, "render", "--twin", twin_copy, "--out", f, "--size", SIZE)
    assert_refused(rc, err, "is an existing file")
    rc, _, err = run_cli(capsys, "render", "--twin", twin_copy, "--out", twin_copy / "volumes", "--size", SIZE)
    assert_refused(rc, err, "twin's own volumes")
    rc, _, err = run_cli(capsys, "render", "--twin", twin_copy, "--out", twin_copy, "--size", SIZE)
    assert_refused(rc, err, "is a twin directory")
    # a render folder inside the twin folder is fine
    rc, _, err = run_cli(capsys, "render", "--twin", twin_copy, "--out", twin_copy / "renders", "--size", SIZE,
                         "--view", "ap")
    assert rc == 0, err
    assert (twin_copy / "renders" / "ap_0000.tif").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: file permissions are not enforced")
def test_read_only_out_refused(capsys, twin_copy, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = run_cli(capsys, "render", "--twin", twin_copy, "--out", ro / "x", "--size", SIZE)
        assert_refused(rc, err, "permission denied")
    finally:
        ro.chmod(0o755)


def test_file_system_errors_are_one_line(capsys, monkeypatch):
    # Whatever the command: a PermissionError / IsADirectoryError deep inside is one line, exit 2.
    import types

    def run(args):
        raise PermissionError(13, "Permission denied", "/data/out/ap_0000.tif")

    mod = types.SimpleNamespace(HELP="x", add_arguments=lambda p: None, run=run)
    monkeypatch.setattr(cli, "_command_modules", lambda: {"phantom": mod})
    rc, _, err = run_cli(capsys, "phantom")
    assert_refused(rc, err, "Permission denied: /data/out/ap_0000.tif")


def test_rebuild_over_a_twin_keeps_foreign_files():
    from ctwin.core.twin.twin import _foreign_entries

    # the build's rule for what it replaces: only what a twin writes
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        old, new = Path(d) / "old", Path(d) / "new"
        for p in (old / "meshes", old / "volumes", old / "renders", new / "meshes"):
            p.mkdir(parents=True)
        for n in ("twin.json", "fit.npz", "notes.txt", ".twin.pid1-partial"):
            (old / n).write_text("x")
        (new / "twin.json").write_text("y")
        assert sorted(p.name for p in _foreign_entries(old, new)) == ["notes.txt", "renders"]


# ------------------------------------------------------------------------------------------------
# render: resume only what matches
# ------------------------------------------------------------------------------------------------
def test_resume_refuses_frames_of_another_request(capsys, twin_copy, tmp_path):
    out = tmp_path / "r"
    base = ["render", "--twin", twin_copy, "--out", out, "--view", "ap"]
    rc, _, err = run_cli(capsys, *base, "--size", SIZE)
    assert rc == 0, err
    first = (out / "ap_0000.tif").read_bytes()
    rc, _, err = run_cli(capsys, *base, "--size", SIZE)
    assert rc == 0 and "already written, skipped" in err
    # another size: refused, naming the mismatch; the old frame stays
    rc, _, err = run_cli(capsys, *base, "--size", "12")
    assert_refused(rc, err, "ap_0000", "size_px", "--overwrite")
    assert (out / "ap_0000.tif").read_bytes() == first
    # another pose
    rc, _, err = run_cli(capsys, *base, "--size", SIZE, "--pose", "hip_flexion")
    assert_refused(rc, err, "pose")
    # another source (a plain CT render into the twin's render folder)
    rc, _, err = run_cli(capsys, "render", "--ct", twin_copy / "volumes" / "ct.nii.gz", "--out", out,
                         "--view", "ap", "--size", SIZE)
    assert_refused(rc, err, "source")
    # --overwrite replaces
    rc, _, err = run_cli(capsys, *base, "--size", "12", "--overwrite")
    assert rc == 0, err
    assert json.loads((out / "ap_0000.json").read_text())["size_px"] == [12, 12]
    no_partials(out)


def test_resume_with_realistic_physics(capsys, twin_copy, tmp_path):
    # the physics record (spectrum options, the resolved HU table, noise) matches on a resume
    pytest.importorskip("spekpy", reason="SpekPy is not installed")
    out = tmp_path / "r"
    base = ["render", "--twin", twin_copy, "--out", out, "--view", "ap", "--size", SIZE, "--kvp", "70"]
    rc, _, err = run_cli(capsys, *base, "--photons", "1000")
    assert rc == 0, err
    first = (out / "ap_0000.tif").read_bytes()
    rc, _, err = run_cli(capsys, *base, "--photons", "1000")
    assert rc == 0 and "already written, skipped" in err, err
    rc, _, err = run_cli(capsys, *base, "--photons", "2000")
    assert_refused(rc, err, "ap_0000", "photons")
    assert (out / "ap_0000.tif").read_bytes() == first
    no_partials(out)


@pytest.mark.parametrize("damage", ["empty", "truncated", "no_sidecar"])
def test_damaged_frames_are_rendered_again(capsys, twin_copy, tmp_path, damage):
    out = tmp_path / "r"
    argv = ["render", "--twin", twin_copy, "--out", out, "--view", "ap", "--size", SIZE]
    assert run_cli(capsys, *argv)[0] == 0
    tif, js = out / "ap_0000.tif", out / "ap_0000.json"
    good = tif.read_bytes()
    if damage == "empty":
        tif.write_bytes(b"")
    elif damage == "truncated":
        tif.write_bytes(good[: len(good) // 2])
    else:
        js.unlink()
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert "skipped" not in err
    assert tif.read_bytes() == good and js.is_file()


def test_partials_of_a_killed_run_are_removed(capsys, twin_copy, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = [out / f".ap_0000.tif.pid{dead}-abc.part.tif", out / f".ap_0000.json.pid{dead}-x.part.json"]
    for p in stale:
        p.write_bytes(b"half")
    live = out / f".ap_0001.tif.pid{os.getpid()}-abc.part.tif"  # a writer that still runs
    live.write_bytes(b"busy")
    rc, _, err = run_cli(capsys, "render", "--twin", twin_copy, "--out", out, "--view", "ap", "--size", SIZE)
    assert rc == 0, err
    assert not any(p.exists() for p in stale) and live.exists()
    assert "removed 2 partial file(s)" in err


# ------------------------------------------------------------------------------------------------
# render: inputs validated where they enter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--photons", "nan"], "--photons must be a finite number"),
    (["--photons", "inf"], "--photons must be a finite number"),
    (["--photons", "1e30"], "--photons must be"),
    (["--photons", "0"], "--photons must be"),
    (["--photons", "100", "--seed", "-1"], "--seed must be within"),
    (["--electronic-noise", "-1"], "--electronic-noise must be >= 0"),
    (["--step", "1e-6"], "--step must be >= 0.05"),
    (["--sad", "nan"], "--sad must be a finite number"),
    (["--sid", "500"], "--sid (500 mm) must be larger than --sad"),
    (["--pose", "hip_flexion", "--motion", "m.npz"], "give --pose or --motion, not both"),
])
def test_render_numbers_validated(capsys, twin_dir, tmp_path, extra, needle):
    out = tmp_path / "r"
    t0 = time.perf_counter()
    rc, _, err = run_cli(capsys, "render", "--twin", twin_dir, "--out", out, "--size", SIZE, *extra)
    assert_refused(rc, err, needle)
    assert time.perf_counter() - t0 < 10 and not out.exists()


@pytest.mark.parametrize("content, needle", [
    ([1, 2, 3], "got a JSON list"),
    ({"source_mm": [0, 0], "detector_center_mm": [0, 0, 0]}, "source_mm must be 3 finite numbers"),
    ({"source_mm": [0, 0, 0]}, "lacks the key"),
    ("x", "got a JSON str"),
])
def test_geometry_file_of_the_wrong_shape(capsys, twin_dir, tmp_path, content, needle):
    g = tmp_path / "g.json"
    g.write_text(json.dumps(content))
    rc, _, err = run_cli(capsys, "render", "--twin", twin_dir, "--out", tmp_path / "r", "--geometry", g)
    assert_refused(rc, err, needle)


def test_pose_values_validated(capsys, twin_dir, tmp_path):
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"pose": [1e300] * 72}))
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps({"pose": [0.0] * 71 + [float("nan")]}).replace("NaN", "NaN"))
    for cmd in (["pose", "--twin", twin_dir, "--out", tmp_path / "p"],
                ["render", "--twin", twin_dir, "--out", tmp_path / "r", "--size", SIZE]):
        rc, _, err = run_cli(capsys, *cmd, "--pose", huge)
        assert_refused(rc, err, "more than a full turn")
        rc, _, err = run_cli(capsys, *cmd, "--pose", nan)
        assert rc == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()


def test_motion_with_a_wrong_width_refused(capsys, twin_dir, tmp_path):
    m = tmp_path / "m70.npz"
    np.savez(m, poses=np.zeros((4, 70)), trans=np.zeros((4, 3)), mocap_framerate=24.0)
    rc, _, err = run_cli(capsys, "render", "--twin", twin_dir, "--out", tmp_path / "r", "--size", SIZE,
                         "--motion", m)
    assert_refused(rc, err, "70 values per frame")


def test_frames_default_is_documented():
    parser, _ = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["render"].format_help()
    assert "with --motion every frame" in " ".join(text.split())


# ------------------------------------------------------------------------------------------------
# damaged twins
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, name, readers", [
    ("missing", "binding.npz", "render pose"), ("missing", "fit.npz", "render pose"),
    ("missing", "volumes/articulated/articulated.npz", "render"),
    ("truncated", "twin.json", "render pose"), ("truncated", "binding.npz", "render pose"),
    ("truncated", "fit.npz", "pose"), ("truncated", "volumes/articulated/articulated.npz", "render"),
    ("truncated", "meshes/skin.ply", "pose"),
])
def test_damaged_twin_is_one_line(capsys, twin_copy, tmp_path, damage, name, readers):
    """A missing file is refused on loading; a truncated one by the command that reads it (the
    others give their correct result without it)."""
    p = twin_copy / name
    if damage == "missing":
        p.unlink()
    else:
        b = p.read_bytes()
        p.write_bytes(b[: len(b) // 3])
    stem = Path(name).name.split(".")[0]
    for cmd in (["render", "--twin", twin_copy, "--out", tmp_path / "r", "--size", SIZE, "--view", "ap"],
                ["pose", "--twin", twin_copy, "--pose", "hip_flexion", "--out", tmp_path / "p"]):
        rc, _, err = run_cli(capsys, *cmd)
        if cmd[0] not in readers.split():
            assert rc == 0, err
            continue
        line = assert_refused(rc, err, "rebuild")
        assert stem in line, line


# ------------------------------------------------------------------------------------------------
# CT inputs
# ------------------------------------------------------------------------------------------------
def _ctwin(*args, timeout=300, **kw):
    return subprocess.run([str(ROOT / "ctwin"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_folder_without_dicom_as_ct_is_one_line(tmp_path):
    d = tmp_path / "notdicom"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    p = _ctwin("render", "--ct", d, "--out", tmp_path / "r", "--size", SIZE)
    line = assert_refused(p.returncode, p.stderr, "no DICOM series")
    assert "GDCMSeriesFileNames" not in p.stderr, p.stderr  # no raw ITK warning before it
    assert line.startswith("ctwin render: error:")


def _chest_files():
    d = real_ct_path("chest_dicom", "dicom")
    return sorted(d.iterdir())


def test_dicom_series_with_a_gap_refused(capsys, tmp_path):
    files = _chest_files()
    d = tmp_path / "gap"
    d.mkdir()
    for i, f in enumerate(files):
        if i != 10:
            shutil.copy(f, d / f.name)
    rc, _, err = run_cli(capsys, "render", "--ct", d, "--out", tmp_path / "r", "--size", SIZE)
    assert_refused(rc, err, "has a gap", "4.00 mm apart", "2.00 mm", "1 missing slice")


def test_single_dicom_file_refused(capsys, tmp_path):
    f = _chest_files()[3]
    d = tmp_path / "one"
    d.mkdir()
    shutil.copy(f, d / "slice")
    rc, _, err = run_cli(capsys, "render", "--ct", d / "slice", "--out", tmp_path / "r", "--size", SIZE)
    assert_refused(rc, err, "single DICOM file", "series")


def test_mr_with_noise_below_minus_200_refused(capsys, tmp_path):
    rng = np.random.default_rng(0)
    mr = np.zeros((48, 48, 24))
    mr[8:40, 8:40, :] = rng.uniform(300, 1200, (32, 32, 24))
    mr += rng.normal(0, 80, mr.shape)  # background noise reaches below -300
    assert mr.min() < -200
    save_nifti(Volume(mr.astype(np.float32), np.eye(4)), tmp_path / "mr.nii.gz")
    rc, _, err = run_cli(capsys, "render", "--ct", tmp_path / "mr.nii.gz", "--out", tmp_path / "r", "--size", SIZE)
    assert_refused(rc, err, "no air peak", "not a CT in Hounsfield units")


# ------------------------------------------------------------------------------------------------
# interrupts, exit codes
# ------------------------------------------------------------------------------------------------
def test_keyboard_interrupt_is_130_and_one_line(capsys, monkeypatch):
    import types

    def run(args):
        import io
        import zipfile

        z = zipfile.ZipFile(io.BytesIO(), "w")  # an open archive torn down by the interrupt
        with z.open("a.npy", "w") as f:
            f.write(b"x" * 10)
            raise KeyboardInterrupt

    mod = types.SimpleNamespace(HELP="x", add_arguments=lambda p: None, run=run)
    monkeypatch.setattr(cli, "_command_modules", lambda: {"phantom": mod})
    rc, _, err = run_cli(capsys, "phantom")
    assert rc == 130 and err.strip() == "ctwin phantom: interrupted", err


def test_exit_codes_in_help(capsys):
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0" in out and "2 refused" in out and "130 interrupted" in out


def _popen(args, **kw):
    # Ctrl-C's default action in the child (a background job of a shell would ignore SIGINT)
    return subprocess.Popen([str(ROOT / "ctwin"), *map(str, args)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _kill_when(p, needle: str, sig, delay: float = 0.0) -> str:
    """Send ``sig`` ``delay`` s after the progress line containing ``needle``; returns stderr."""
    lines = []
    for ln in p.stderr:
        lines.append(ln)
        if needle in ln:
            time.sleep(delay)
            p.send_signal(sig)
            break
    lines.append(p.stderr.read())
    p.wait(timeout=120)
    return "".join(lines)


def _tree(d: Path, skip=("twin.blend",)) -> dict:
    """{relative path: bytes} of every file, with the timing fields of the JSON records removed."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name not in skip:
            b = p.read_bytes()
            if p.name in ("twin.json", "fit.json"):
                j = json.loads(b)
                for k in ("build_seconds", "seconds", "software"):
                    j.pop(k, None)
                    if isinstance(j.get("fit"), dict):
                        j["fit"].pop(k, None)
                    if isinstance(j.get("mesh_volume"), dict):
                        j["mesh_volume"].pop(k, None)
                b = json.dumps(j, sort_keys=True).encode()
            out[str(p.relative_to(d))] = b
    return out


@pytest.mark.slow
def test_fault_injection_render(twin_dir, tmp_path):
    """Kill a 4-frame render at seeded random points (SIGKILL twice, then Ctrl-C), each some time
    after its first frame line; the resumed result is byte-identical to an uninterrupted render,
    and no partial file remains."""
    args = ["render", "--twin", twin_dir, "--size", SIZE, "--view", "ap", "--frames", "0:4"]
    ref = tmp_path / "ref"
    p = _ctwin(*args, "--out", ref)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    rng = np.random.default_rng(20)
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGINT):
        q = _popen([*args, "--out", out])
        err = _kill_when(q, "written", sig, float(rng.uniform(0.0, 2.0)))
        assert "Traceback" not in err and "Exception ignored" not in err, err
        if sig == signal.SIGINT and q.returncode != 0:
            assert q.returncode == 130 and error_lines(err) == ["ctwin render: interrupted"], err
    p = _ctwin(*args, "--out", out)
    assert p.returncode == 0, p.stderr
    no_partials(out)
    assert _tree(out) == _tree(ref)


@pytest.mark.slow
def test_fault_injection_build(coarse_phantoms, twin_dir, tmp_path):
    """Kill builds at seeded random points (SIGKILL while importing, Ctrl-C while fitting); the next
    build removes what they left, rebuilds over the old twin keeping the user's file, and gives the
    same twin as an uninterrupted build (the session's, built by the same code)."""
    src = coarse_phantoms["supine_arms_down"]
    out = tmp_path / "twin"
    shutil.copytree(twin_dir, out)
    (out / "notes.txt").write_text("mine")
    argv = ["build", "--ct", src / "ct.nii.gz", "--seg", src / "seg.nii.gz", "--out", out, "--no-blend"]
    rng = np.random.default_rng(20)
    q = _popen(argv)
    _kill_when(q, "build 1/6", signal.SIGKILL, float(rng.uniform(0.0, 2.0)))
    assert q.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".twin.pid*"))  # the killed build left its partial folder
    q = _popen(argv)
    err = _kill_when(q, "build 2/6", signal.SIGINT, float(rng.uniform(0.0, 3.0)))
    assert q.returncode == 130, err
    assert error_lines(err) == ["ctwin build: interrupted"], err
    assert "Exception ignored" not in err and "Traceback" not in err
    assert "removed 1 partial file(s)" in err  # the SIGKILLed build's folder
    p = _ctwin(*argv)
    assert p.returncode == 0, p.stderr
    assert "replacing the existing twin" in p.stderr and "notes.txt" in p.stderr
    assert not list(tmp_path.glob(".twin.pid*"))
    assert (out / "notes.txt").read_text() == "mine"
    got, ref = _tree(out, skip=("twin.blend", "notes.txt")), _tree(twin_dir)
    assert got.keys() == ref.keys()
    diff = [k for k in ref if got[k] != ref[k]]
    assert not diff, diff


def test_render_warns_on_joint_ranges_like_pose(twin_dir, tmp_path, capsys):
    from ctwin.core.rig.pose import joint_limit_violations
    from ctwin.core.body.skeleton import JOINT_INDEX
    from ctwin.core.twin.twin import frame_poses, load_twin

    twin = load_twin(twin_dir)
    p = np.asarray(twin.pose0, dtype=np.float64).copy()
    k = JOINT_INDEX["left_knee"]
    p[3 * k] -= 3.0  # the knee turned by 3 rad (172 degrees) about x: beyond any knee range
    assert joint_limit_violations(p)
    f = tmp_path / "bad_knee.json"
    f.write_text(json.dumps({"pose": p.tolist()}))
    with pytest.warns(UserWarning, match="outside anatomical joint ranges"):
        todo = frame_poses(twin, pose=str(f))
    assert len(todo) == 1
    assert "outside anatomical joint ranges" in capsys.readouterr().err
