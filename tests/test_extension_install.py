"""The built extension zip installs into the bpy module's Blender through Blender's own installer.

The zip is made by tools/build_extension.py (once per test session) and installed in a
subprocess whose Blender user resources live in a temporary folder (BLENDER_USER_RESOURCES),
so the user's real Blender configuration is untouched and no test sees another's state. The
subprocess installs, enables, checks, disables and uninstalls the extension twice in a row with
the operator behind Preferences > Install from Disk, then once more with the handler of
`blender --command extension install-file` (the README's command). The first time, the installed
copy renders a DRR through the ctwin DRR engine (F12) and a 2-frame animation of a posed twin.
The test runs in both environments (bpy 5.0.1 on Python 3.11, bpy 5.3.0 on Python 3.13), each
with the linux-x64 zip of its Python line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Runs inside a fresh Python with bpy; prints one JSON line "RESULT {...}" at the end.
IN_BLENDER = r'''
import contextlib, io, json, os, subprocess, sys, time
import bpy

zip_path, numpy_site, twin_dir, work = sys.argv[1:5]
PKG = "bl_ext.user_default.ctwin"
out = {"rounds": []}


def ctwin_classes():
    """Every bpy_struct subclass defined by the extension's package (registered or not)."""
    seen, todo, found = set(), [bpy.types.bpy_struct], []
    while todo:
        c = todo.pop()
        for s in c.__subclasses__():
            if s not in seen:
                seen.add(s)
                todo.append(s)
                if getattr(s, "__module__", "").startswith(PKG):
                    found.append(s)
    return found


def repo_index():
    repos = bpy.context.preferences.extensions.repos
    return next(i for i, r in enumerate(repos) if r.module == "user_default")


def state():
    return {
        "types": sorted(dir(bpy.types)),
        "addons": sorted(a.module for a in bpy.context.preferences.addons),
        "scene_ctwin": hasattr(bpy.types.Scene, "ctwin"),
        "modules": sorted(m for m in sys.modules if m.startswith(PKG)),
    }


def render_checks():
    """F12 on a small CT and a 2-frame animation of a posed twin, all through the installed copy."""
    import numpy as np
    ext = lambda name: __import__(PKG + "." + name, fromlist=["_"])
    vol_m, carm, proj = ext("core.volumes.volume"), ext("core.drr.carm"), ext("core.drr.projector")
    camera, anim, tb = ext("render.camera"), ext("rig.animation"), ext("blender.scene")
    poses_m, motion_m = ext("core.rig.poses"), ext("core.rig.motion")
    res = {"device_line": proj.device_status()}
    # F12: a 20x18x16 CT with a bone block, AP view, compared with the core's CPU render.
    d = np.full((20, 18, 16), -1000, np.int16)
    d[2:-2, 2:-2, 2:-2] = 0
    d[6:10, 7:11, 5:9] = 1200
    vol = vol_m.Volume(d, vol_m.affine_from((2.0, 2.0, 2.5), (-19, -17, -18)))
    ct = os.path.join(work, "ct.nii.gz")
    vol_m.save_nifti(vol, ct)
    bpy.ops.wm.read_homefile(use_empty=True)
    scene = bpy.context.scene
    g = carm.named_view("ap", vol, size=(24, 20))
    cam = bpy.data.objects.new("xray", bpy.data.cameras.new("xray"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    camera.setup_xray_camera(cam, g, scene)
    scene.render.engine = "CTWIN_DRR"
    scene.ctwin.ct_path = ct
    scene.ctwin.device = "cpu"
    scene.render.filepath = os.path.join(work, "f12", "frame_")
    scene.frame_set(1)
    res["f12"] = sorted(bpy.ops.render.render())
    img, sc = proj.read_frame(os.path.join(work, "f12", "frame_0001"))
    expect = proj.render_drr(vol, g, device="cpu")
    res["f12_shape"] = list(img.shape)
    res["f12_max"] = float(expect.max())
    res["f12_err"] = float(np.abs(img - expect).max())
    # A posed twin: open its twin.blend, key 2 frames of knee flexion, render the animation.
    bpy.ops.wm.open_mainfile(filepath=os.path.join(twin_dir, "twin.blend"))
    scene = bpy.context.scene
    res["twin_engine"] = scene.render.engine
    n = 2
    poses = np.zeros((n, 72))
    poses[1, 3:] = np.asarray(poses_m.PRESETS["knee_flexion"])[3:]
    motion = os.path.join(work, "knees.npz")
    motion_m.write_motion_file(motion, poses, np.zeros((n, 3)), 24.0)
    arm = tb.twin_armature_object(scene)
    anim.load_motion_keyframes(arm, motion, scene=scene, frame_start=0)
    scene.frame_start, scene.frame_end = 0, n - 1
    scene.render.resolution_x = scene.render.resolution_y = 24
    scene.render.filepath = os.path.join(work, "anim", "f_")
    scene.ctwin.device = "cpu"
    res["anim"] = sorted(bpy.ops.render.render(animation=True))
    frames = [proj.read_frame(os.path.join(work, "anim", "f_%04d" % f))[0] for f in range(n)]
    res["anim_shapes"] = [list(f.shape) for f in frames]
    res["anim_max"] = [float(f.max()) for f in frames]
    res["anim_diff"] = float(np.abs(frames[0] - frames[1]).max())
    res["anim_files"] = sorted(f for f in os.listdir(os.path.join(work, "anim"))
                               if f.endswith((".tif", ".json")))  # beside Blender's own images
    bpy.ops.wm.read_homefile(use_empty=True)
    return res


baseline = state()
repo_dir = bpy.context.preferences.extensions.repos[repo_index()].directory
# Twice through the operator behind Preferences > Install from Disk, then once through the
# handler of `blender --command extension install-file ...` (the README's command).
import bl_pkg
for rnd, how in enumerate(("operator", "operator", "command")):
    r = {"how": how}
    t0 = time.perf_counter()
    if how == "operator":
        r["install"] = sorted(bpy.ops.extensions.package_install_files(
            filepath=zip_path, repo="user_default", enable_on_install=True))
    else:
        rc = bl_pkg.cli_extension(["install-file", "--repo", "user_default", "--enable", zip_path])
        r["install"] = ["FINISHED"] if rc == 0 else ["rc=%r" % rc]
    r["install_s"] = time.perf_counter() - t0
    mod = sys.modules.get(PKG)
    r["module_file"] = getattr(mod, "__file__", None)
    r["enabled"] = PKG in bpy.context.preferences.addons
    classes = ctwin_classes()
    r["classes"] = sorted(c.__name__ for c in classes if getattr(c, "is_registered", False))
    r["scene_ctwin"] = hasattr(bpy.types.Scene, "ctwin") and hasattr(bpy.context.scene, "ctwin")
    r["cli_handle"] = type(getattr(mod, "_cli_handle", None)).__name__
    # The function registered as the `ctwin` CLI command, called as `blender -c ctwin ...` would.
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        r["help_rc"] = mod._cli_entry(["--help"])
        r["bad_rc"] = mod._cli_entry(["nosuchcommand"])
    r["help_out"] = buf_out.getvalue()
    r["bad_err"] = buf_err.getvalue()
    # The installed package's own code imports (relative imports, core without bpy).
    core = __import__(PKG + ".core.volumes.volume", fromlist=["Volume"])
    r["core_file"] = core.__file__
    site = os.path.join(os.path.dirname(repo_dir), ".local", "lib",
                        "python%d.%d" % sys.version_info[:2], "site-packages")
    r["site_packages"] = site
    r["wheel_dirs"] = sorted(os.listdir(site)) if os.path.isdir(site) else []
    if rnd == 0:
        # The bundled wheels alone (plus numpy, which Blender ships) import in a clean Python.
        code = (
            "import sys, json; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
            "import _numba_cuda_redirector;"
            "import numba, llvmlite, scipy.ndimage, skimage.measure, nibabel, SimpleITK,"
            " trimesh, tifffile, PIL.Image, imageio, networkx;"
            "from numba import cuda;"
            "mods = [numba, llvmlite, scipy, skimage, nibabel, SimpleITK, trimesh, tifffile, PIL,"
            " imageio, networkx, cuda];"
            "print(json.dumps({m.__name__: m.__file__ for m in mods}))"
        )
        p = subprocess.run([sys.executable, "-I", "-S", "-c", code, site, numpy_site],
                           capture_output=True, text=True, env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})
        r["wheels_rc"], r["wheels_err"] = p.returncode, p.stderr[-2000:]
        r["wheels_files"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
        r["render"] = render_checks()

    bpy.ops.preferences.addon_disable(module=PKG)
    r["disabled_addons"] = PKG in bpy.context.preferences.addons
    r["disabled_registered"] = sorted(c.__name__ for c in classes if c.is_registered)
    r["disabled_handle"] = repr(getattr(mod, "_cli_handle", "missing"))
    if how == "operator":
        r["uninstall"] = sorted(bpy.ops.extensions.package_uninstall(
            repo_index=repo_index(), pkg_id="ctwin"))
    else:
        rc = bl_pkg.cli_extension(["remove", "user_default.ctwin"])
        r["uninstall"] = ["FINISHED"] if rc == 0 else ["rc=%r" % rc]
    r["ext_dir_left"] = os.path.exists(os.path.join(repo_dir, "ctwin"))
    r["wheel_dirs_left"] = sorted(os.listdir(site)) if os.path.isdir(site) else []
    r["after"] = state()
    r["after_registered"] = sorted(c.__name__ for c in ctwin_classes() if c.is_registered)
    out["rounds"].append(r)

out["baseline"] = baseline
print("RESULT " + json.dumps(out))
'''


def _version() -> str:
    return tomllib.loads((ROOT / "blender_manifest.toml").read_text())["version"]


PYLINE = "%d.%d" % sys.version_info[:2]
# The bpy each environment pins (tools/setup.sh): Blender 5.0 on Python 3.11, 5.3 on 3.13.
BPY_FOR_PYTHON = {"3.11": (5, 0), "3.13": (5, 3)}


@pytest.fixture(scope="session")
def extension_zip(tmp_path_factory) -> Path:
    """The linux-x64 zip for this Python line, built by tools/build_extension.py once per session."""
    out_dir = tmp_path_factory.mktemp("dist")
    p = subprocess.run([PY, str(ROOT / "tools" / "build_extension.py"), "--platform", "linux-x64",
                        "--python", PYLINE, "--out-dir", str(out_dir)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    out = out_dir / f"ctwin-{_version()}-py{PYLINE.replace('.', '')}-linux_x64.zip"
    assert out.is_file(), p.stdout
    assert sorted(out_dir.glob("*.zip")) == [out]
    assert str(out) in p.stdout and str(out.stat().st_size) in p.stdout
    yield out
    out.unlink(missing_ok=True)  # 200 MB; pytest keeps its temporary folders


def test_zip_contents(extension_zip):
    with zipfile.ZipFile(extension_zip) as z:
        names = set(z.namelist())
        manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
    assert manifest["id"] == "ctwin" and manifest["schema_version"] == "1.0.0"
    lo, hi = {"3.11": ("5.0.0", "5.1.0"), "3.13": ("5.1.0", None)}[PYLINE]
    assert manifest["blender_version_min"] == lo and manifest.get("blender_version_max") == hi
    assert manifest["platforms"] == ["linux-x64"]
    assert manifest["build"]["generated"]["platforms"] == ["linux-x64"]
    assert {"__init__.py", "cli.py", "blender/properties.py", "ui/panel.py", "core/errors.py"} <= names
    # Every declared wheel is inside, each a wheel for this CPython (or abi3/pure) on linux x86_64.
    cp = "cp" + PYLINE.replace(".", "")
    for w in manifest["wheels"]:
        assert w.removeprefix("./") in names, w
        tags = Path(w).name[: -len(".whl")].split("-")[-3:]
        assert {cp, "py3"} & set(tags[0].split(".")) or tags[1] == "abi3", w
        assert tags[2] == "any" or "x86_64" in tags[2], w
    assert {n for n in names if n.endswith(".whl")} == {w.removeprefix("./") for w in manifest["wheels"]}
    wheel_names = {Path(w).name.split("-")[0].lower() for w in manifest["wheels"]}
    assert "numpy" not in wheel_names and "torch" not in wheel_names and "smplx" not in wheel_names
    assert {"numba", "llvmlite", "numba_cuda", "scipy", "scikit_image", "nibabel", "simpleitk",
            "trimesh"} <= wheel_names
    # Development files stay out of the extension.
    for prefix in ("tests/", "benchmarks/", "tools/", "docs/", ".venv/", "build/", "dist/", ".git/"):
        assert not any(n.startswith(prefix) for n in names), prefix
    assert not any("__pycache__" in n for n in names)


def test_install_enable_disable_uninstall_twice(extension_zip, twin_dir, tmp_path):
    import numpy

    user = tmp_path / "blender_user"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLENDER_")}
    env["BLENDER_USER_RESOURCES"] = str(user)
    # The installed copy is a fresh path, so its numba kernels compile in this subprocess (no
    # cache to reuse): at LLVM optimisation level 1 instead of the default 3 the compiles take
    # about a third of the time; the rendered images are compared with the core's render made in
    # the same process (same level), so the checks are the same.
    env["NUMBA_OPT"] = "1"
    numpy_site = str(Path(numpy.__file__).resolve().parent.parent)
    # Only numpy (and its bundled libraries) from this environment: what Blender itself ships.
    blender_site = tmp_path / "blender_python_site"
    blender_site.mkdir()
    for entry in Path(numpy_site).iterdir():
        if entry.name == "numpy" or entry.name.startswith("numpy.libs"):
            (blender_site / entry.name).symlink_to(entry)
    script = tmp_path / "in_blender.py"
    script.write_text(IN_BLENDER)
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run([PY, str(script), str(extension_zip), str(blender_site), str(twin_dir),
                        str(work)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert not [ln for ln in log.splitlines() if ln.startswith(("ERROR", "Error"))], log[-4000:]
    # Installing, registering, rendering and removing print no warning (Blender's or Python's).
    assert not [ln for ln in log.splitlines()
                if "warning" in ln.lower() and not ln.startswith("RESULT ")], log[-4000:]
    res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    base = res["baseline"]
    assert not base["scene_ctwin"] and not base["modules"]
    assert [r["how"] for r in res["rounds"]] == ["operator", "operator", "command"]
    for r in res["rounds"]:
        assert r["install"] == ["FINISHED"]
        # It is the installed copy from the zip that runs, not this clone.
        assert r["module_file"].startswith(str(user)), r["module_file"]
        assert r["core_file"].startswith(str(user)), r["core_file"]
        assert r["enabled"]
        assert "CtwinSceneSettings" in r["classes"]
        assert r["scene_ctwin"]
        assert r["cli_handle"] == "PyCapsule"
        assert r["help_rc"] == 0 and "usage: blender -c ctwin" in r["help_out"]
        assert r["bad_rc"] == 2 and len(r["bad_err"].strip().splitlines()) == 1
        assert "unknown command 'nosuchcommand'" in r["bad_err"]
        for pkg in ("numba", "scipy", "skimage", "nibabel", "SimpleITK", "trimesh"):
            assert pkg in r["wheel_dirs"], (pkg, r["wheel_dirs"])
        # Disabled: nothing of it stays registered.
        assert not r["disabled_addons"]
        assert r["disabled_registered"] == []
        assert r["disabled_handle"] == "None"
        # Uninstalled: files gone, Blender's type registry and add-on list as before.
        assert r["uninstall"] == ["FINISHED"]
        assert not r["ext_dir_left"]
        assert set(r["wheel_dirs_left"]) <= {"__pycache__"}, r["wheel_dirs_left"]
        assert r["after_registered"] == []
        assert r["after"]["types"] == base["types"]
        assert r["after"]["addons"] == base["addons"]
        assert not r["after"]["scene_ctwin"]
    first = res["rounds"][0]
    # The installed extension renders: F12 on a small CT equals the core's CPU render (Blender
    # keeps the camera in float32), and a posed twin's 2-frame animation moves the knees.
    rr = first["render"]
    assert rr["f12"] == ["FINISHED"] and rr["f12_shape"] == [20, 24] and rr["f12_max"] > 0
    assert rr["f12_err"] <= 2e-4 * rr["f12_max"], rr
    assert rr["twin_engine"] == "CTWIN_DRR"
    assert rr["anim"] == ["FINISHED"] and rr["anim_shapes"] == [[24, 24], [24, 24]]
    assert rr["anim_files"] == ["f_0000.json", "f_0000.tif", "f_0001.json", "f_0001.tif"]
    assert min(rr["anim_max"]) > 0 and rr["anim_diff"] > 0.05 * rr["anim_max"][0], rr
    assert rr["device_line"].startswith(("GPU: ", "GPU path unavailable")), rr["device_line"]
    assert first["wheels_rc"] == 0, first["wheels_err"]
    site = first["site_packages"]
    for name, f in first["wheels_files"].items():
        assert f.startswith(site), (name, f)
    # The user's real Blender configuration was not used.
    assert all(r["site_packages"].startswith(str(user)) for r in res["rounds"])


# conftest's autouse fixture resets Blender to factory settings before each test: the first test
# leaves state behind on purpose, the second (run right after it) must not see any of it.
_dirtied = []


def test_factory_fresh_state_a_dirty_it():
    import bpy

    # The bpy this environment pins: 5.0.x on Python 3.11, 5.3.x on Python 3.13.
    assert bpy.app.version[:2] == BPY_FOR_PYTHON[PYLINE], bpy.app.version_string
    bpy.ops.wm.read_factory_settings(use_empty=True)  # make sure bpy is in use in this process
    mesh = bpy.data.meshes.new("ctwin_leak")
    bpy.context.scene.collection.objects.link(bpy.data.objects.new("ctwin_leak", mesh))
    bpy.context.scene.frame_current = 77
    bpy.data.texts.new("ctwin_leak")
    assert "ctwin_leak" in bpy.data.objects
    _dirtied.append(True)


def test_factory_fresh_state_b_is_clean():
    import bpy

    if not _dirtied:
        pytest.skip("runs right after test_factory_fresh_state_a_dirty_it")
    assert len(bpy.data.objects) == 0 and len(bpy.data.meshes) == 0 and len(bpy.data.texts) == 0
    assert bpy.context.scene.frame_current == 1
