"""The built extension zip installs into the bpy module's Blender through Blender's own installer.

The zip is made by tools/build_extension.py (once per test session) and installed in a
subprocess whose Blender user resources live in a temporary folder (BLENDER_USER_RESOURCES),
so the user's real Blender configuration is untouched and no test sees another's state. The
subprocess installs, enables, checks, disables and uninstalls the extension twice in a row with
the operator behind Preferences > Install from Disk, then once more with the handler of
`blender --command extension install-file` (the README's command).
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

zip_path, numpy_site = sys.argv[1], sys.argv[2]
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
    core = __import__(PKG + ".core.volume", fromlist=["Volume"])
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


@pytest.fixture(scope="session")
def extension_zip(tmp_path_factory) -> Path:
    """The zip built by tools/build_extension.py, once per session."""
    out = tmp_path_factory.mktemp("dist") / f"ctwin-{_version()}.zip"
    p = subprocess.run([PY, str(ROOT / "tools" / "build_extension.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.is_file()
    assert str(out) in p.stdout and str(out.stat().st_size) in p.stdout
    yield out
    out.unlink(missing_ok=True)  # 190 MB; pytest keeps its temporary folders


def test_zip_contents(extension_zip):
    manifest = tomllib.loads((ROOT / "blender_manifest.toml").read_text())
    with zipfile.ZipFile(extension_zip) as z:
        names = set(z.namelist())
        zipped_manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
    assert zipped_manifest["id"] == "ctwin" and zipped_manifest["schema_version"] == "1.0.0"
    assert manifest["blender_version_min"] == "5.0.0"
    assert manifest["platforms"] == ["linux-x64"]
    assert {"__init__.py", "cli.py", "properties.py", "core/errors.py"} <= names
    # Every declared wheel is inside, each a cp311/abi3/pure linux-x86_64 wheel; numpy is not.
    for w in manifest["wheels"]:
        assert w.removeprefix("./") in names, w
        tags = Path(w).name[: -len(".whl")].split("-")[-3:]
        assert tags[0] in ("cp311", "py3"), w
        assert tags[2] == "any" or "x86_64" in tags[2], w
    wheel_names = {Path(w).name.split("-")[0].lower() for w in manifest["wheels"]}
    assert "numpy" not in wheel_names and "torch" not in wheel_names and "smplx" not in wheel_names
    assert {"numba", "llvmlite", "numba_cuda", "scipy", "scikit_image", "nibabel", "simpleitk",
            "trimesh"} <= wheel_names
    # Development files stay out of the extension.
    for prefix in ("tests/", "benchmarks/", "tools/", "docs/", ".venv/", "build/", "dist/", ".git/"):
        assert not any(n.startswith(prefix) for n in names), prefix
    assert not any("__pycache__" in n for n in names)


def test_install_enable_disable_uninstall_twice(extension_zip, tmp_path):
    import numpy

    user = tmp_path / "blender_user"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLENDER_")}
    env["BLENDER_USER_RESOURCES"] = str(user)
    numpy_site = str(Path(numpy.__file__).resolve().parent.parent)
    # Only numpy (and its bundled libraries) from this environment: what Blender itself ships.
    blender_site = tmp_path / "blender_python_site"
    blender_site.mkdir()
    for entry in Path(numpy_site).iterdir():
        if entry.name == "numpy" or entry.name.startswith("numpy.libs"):
            (blender_site / entry.name).symlink_to(entry)
    script = tmp_path / "in_blender.py"
    script.write_text(IN_BLENDER)
    p = subprocess.run([PY, str(script), str(extension_zip), str(blender_site)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert not [ln for ln in log.splitlines() if ln.startswith(("ERROR", "Error"))], log[-4000:]
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

    assert bpy.app.version[:2] == (5, 0), bpy.app.version_string  # the pinned bpy 5.0.x
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
