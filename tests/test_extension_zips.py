"""Every zip tools/build_extension.py makes: one per CPython line (3.11: Blender 5.0; 3.13:
Blender 5.1+) and Blender platform (linux-x64, windows-x64, macos-arm64).

Only linux-x64 can run here, so the other zips are checked by what they hold: Blender's validator
passes (the build runs it; this test runs it again with this environment's Blender), every wheel
is for the zip's platform and CPython line (checked on the file name's tags, and with Blender's
own functions that decide what an installer accepts), every run-time package is there exactly
once, and no CUDA-only package is where CUDA is absent (macOS). A second test runs the package
with the CUDA packages made unimportable, as on macOS: registering, the device line and a CPU DRR.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT / "tools"))
import build_extension as bx  # noqa: E402

pytestmark = pytest.mark.slow

PLATFORM_TAG = {  # an independent reading of each Blender platform's wheel tags
    "linux-x64": lambda t: t.startswith(("manylinux", "linux")) and t.endswith("x86_64"),
    "windows-x64": lambda t: t == "win_amd64",
    "macos-arm64": lambda t: t.startswith("macosx_") and t.endswith(("_arm64", "_universal2"))
    and int(t.split("_")[1]) <= 13,  # Blender 5 needs macOS 13
}
COMPILED = {"numba", "llvmlite", "scipy", "scikit_image", "pillow", "simpleitk"}
CUDA_ONLY = {"numba_cuda", "cuda_bindings", "cuda_core", "cuda_pathfinder"}


def _blender_ext_module():
    spec = importlib.util.spec_from_file_location("ctwin_test_blender_ext", bx.blender_ext())
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zips")
    p = subprocess.run([PY, str(ROOT / "tools" / "build_extension.py"), "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    found = {}
    for z in out.glob("*.zip"):
        found[z.name] = z
    yield found
    for z in found.values():
        z.unlink(missing_ok=True)


def test_every_platform_zip(zips):
    version = bx.manifest()["version"]
    expect = {f"ctwin-{version}-py{py.replace('.', '')}-{plat.replace('-', '_')}.zip": (py, plat)
              for py in ("3.11", "3.13") for plat in ("linux-x64", "windows-x64", "macos-arm64")}
    assert set(zips) == set(expect)
    be = _blender_ext_module()
    tool = bx.blender_ext()
    sizes = {}
    for name, (py, plat) in sorted(expect.items()):
        z = zips[name]
        sizes[name] = z.stat().st_size
        assert sizes[name] < 300e6, (name, sizes[name])
        r = subprocess.run([PY, str(tool), "validate", str(z)], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stdout + r.stderr)
        with zipfile.ZipFile(z) as f:
            names = f.namelist()
            m = tomllib.loads(f.read("blender_manifest.toml").decode())
        # The Blender range of the CPython line, and Blender's split-platform stamp.
        lo, hi = {"3.11": ("5.0.0", "5.1.0"), "3.13": ("5.1.0", None)}[py]
        assert m["blender_version_min"] == lo and m.get("blender_version_max") == hi, name
        assert m["platforms"] == [plat] and m["build"]["generated"]["platforms"] == [plat], name
        wheels = [w.removeprefix("./") for w in m["wheels"]]
        assert sorted(wheels) == sorted(n for n in names if n.endswith(".whl")), name
        assert sorted(m["build"]["generated"]["wheels"]) == sorted(m["wheels"]), name
        dists = [bx.norm(Path(w).name.split("-")[0]) for w in wheels]
        assert len(dists) == len(set(dists)), (name, dists)  # one wheel per package
        cp = "cp" + py.replace(".", "")
        for w in wheels:
            pyt, abi, plats = Path(w).name[: -len(".whl")].split("-")[-3:]
            assert plats == "any" or any(PLATFORM_TAG[plat](t) for t in plats.split(".")), (name, w)
            assert {cp, "py3"} & set(pyt.split(".")) or abi == "abi3", (name, w)
            # Blender's own reading of the same file name.
            assert be.blender_platform_compatible_with_wheel_platform_from_filepath(plat, w), (name, w)
        # What Blender's installer compares with the running Python ("isn't compatible with").
        pyver = tuple(int(x) for x in py.split("."))
        assert be.python_versions_from_wheels(wheels) == {pyver}, name
        # Everything the extension imports is bundled; numpy/torch/smplx are not.
        want = {bx.norm(n) for n, plats in bx.BUNDLED.items() if plat in plats}
        assert set(dists) == want, (name, sorted(set(dists) ^ want))
        assert COMPILED <= set(dists), name
        assert not {"numpy", "torch", "smplx"} & set(dists), name
        if plat in bx.CUDA_PLATFORMS:
            assert CUDA_ONLY <= set(dists), name
        else:
            assert not CUDA_ONLY & set(dists), name
        assert {"__init__.py", "cli.py", "core/drr/projector.py", "render/engine.py", "render/providers.py",
                "blender/__init__.py", "blender/data.py", "blender/properties.py", "blender/scene.py",
                "operators/twin_blend.py", "ui/__init__.py", "ui/panel.py"} <= set(names)
        top = {n for n in names if "/" not in n and n.endswith(".py")}
        assert top == {"__init__.py", "cli.py"}, (name, sorted(top))  # the Blender layer lives in packages
        assert not any(n.startswith(("tests/", "tools/", "docs/", "benchmarks/", "."))
                       for n in names), name
    print("zip sizes (bytes):", json.dumps(sizes))


# Runs in a fresh Python: the CUDA packages cannot be imported (as on macOS, where the zip has
# none); the package registers, says so in one line, and renders with device "auto" on the CPU.
NO_CUDA = textwrap.dedent(r'''
    import contextlib, importlib.abc, io, json, sys
    BLOCKED = ("numba_cuda", "cuda", "cuda_core", "_numba_cuda_redirector")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not available on this platform")
            return None

    sys.meta_path.insert(0, Block())
    sys.path.insert(0, sys.argv[1])
    from launch import load_package
    ctwin = load_package("ctwin")
    import numpy as np
    import bpy
    from ctwin.core.drr.projector import device_status, render_drr, resolve_device
    from ctwin.core.drr.carm import named_view
    from ctwin.core.volumes.volume import Volume, affine_from, save_nifti
    ctwin.register()
    out = {"line": device_status(), "auto": resolve_device("auto")}
    d = np.full((12, 10, 8), -1000, np.int16)
    d[3:9, 3:7, 2:6] = 800
    vol = Volume(d, affine_from((2.0, 2.0, 2.0), (-12, -10, -8)))
    g = named_view("ap", vol, size=(16, 12))
    out["max"] = float(render_drr(vol, g, device="auto").max())
    save_nifti(vol, sys.argv[2] + "/ct.nii.gz")
    import ctwin.core.drr.projector as projector
    projector._cpu_fallback_reported = False  # said once per process; a CLI run is a new one
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out["cli_rc"] = ctwin._cli_entry(["render", "--ct", sys.argv[2] + "/ct.nii.gz",
                                          "--view", "ap", "--size", "16x12", "--out", sys.argv[2] + "/r"])
    out["cli_err"] = err.getvalue()
    ctwin.unregister()
    # (the venv's numba-cuda .pth imports _numba_cuda_redirector at start-up: not counted)
    out["cuda_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED[:3])
    print("RESULT " + json.dumps(out))
''')


def test_cpu_path_alone_without_cuda_packages(tmp_path):
    pytest.importorskip("bpy")
    script = tmp_path / "no_cuda.py"
    script.write_text(NO_CUDA)
    p = subprocess.run([PY, str(script), str(ROOT / "tools"), str(tmp_path)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "Traceback" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-4000:]
    res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert res["line"].startswith("GPU path unavailable: numba-cuda is not installed"), res
    assert res["auto"] == "cpu" and res["max"] > 0
    assert res["cli_rc"] == 0, res["cli_err"]
    assert res["line"] in res["cli_err"]  # the CLI says it in one line
    assert res["cuda_modules"] == []
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["ap_0000.json", "ap_0000.tif"]


def test_unbundled_package_is_one_clear_line():
    from ctwin.core.errors import CtwinError
    from ctwin.core.optional import require

    assert require("json", "json", "x").dumps([1]) == "[1]"
    with pytest.raises(CtwinError) as e:
        require("ctwin_no_such_module_xyz", "nosuchdist", "'ctwin dataset'")
    msg = str(e.value)
    assert "\n" not in msg and "'ctwin dataset' needs nosuchdist" in msg and "does not bundle" in msg


def test_trimmed_spekpy_gives_the_full_wheels_spectra(tmp_path):
    """The zips carry SpekPy without the tables ctwin's spectra never read (TRIM): installed alone,
    the trimmed wheel gives the same spectra as the full package, on and off axis."""
    pytest.importorskip("spekpy")
    whl = [w for w in bx.check_manifest() if bx.wheel_name_version(w)[0] == "spekpy"]
    assert whl, "spekpy is not bundled"
    trimmed = bx.trimmed_wheel(Path(whl[0]).name)
    assert trimmed.stat().st_size < 0.3 * (bx.CACHE / trimmed.name).stat().st_size
    site = tmp_path / "site"
    with zipfile.ZipFile(trimmed) as z:
        z.extractall(site)
    code = textwrap.dedent("""
        import json, sys, spekpy
        out = {}
        for kvp in (40, 80, 150):
            s = spekpy.Spek(kvp=kvp, th=12, dk=1.0, mas=1.0)
            s.multi_filter([("Al", 2.5), ("Cu", 0.1)])
            for x in (0.0, 8.0):
                k, f = s.get_spectrum(x=x, z=100.0)
                out[f"{kvp}-{x}"] = [list(map(float, k)), list(map(float, f))]
        print(json.dumps({"file": spekpy.__file__, "spectra": out}))
    """)
    full = json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)
    env = dict(os.environ, PYTHONPATH=str(site))
    small = json.loads(subprocess.run([PY, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n" + code],
                                      capture_output=True, text=True, env=env, check=True).stdout)
    assert small["file"].startswith(str(site))
    assert small["spectra"] == full["spectra"]
