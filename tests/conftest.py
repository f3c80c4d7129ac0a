"""Test setup: the repository root is loaded as the package ``ctwin``; Blender is reset per test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

# The ./ctwin launcher that tests run as a subprocess uses the environment running the tests
# (.venv or .venv313), so both halves of a comparison come from the same Python and packages.
# (sys.prefix as given, too: a clone whose .venv/.venv313 are links to another clone's)
if ROOT in (Path(sys.prefix).absolute().parent, Path(sys.prefix).resolve().parent):
    os.environ.setdefault("CTWIN_VENV", Path(sys.prefix).name)

REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"


def real_ct_path(*parts) -> Path:
    """Path inside ../shared/data/real_ct, or skip the test with the reason."""
    p = REAL_CT.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real CT test data not found at {p} (it lives in ../shared beside the clone)")
    return p


def cuda_simulator_errors(script_source: str, tmp_path, entries: int) -> dict:
    """Run a script under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, a fresh process) and
    return the ``RESULT`` JSON it prints: {name: [max |CUDA - CPU|, max CPU]}, checked to hold
    ``entries`` items, each CUDA image within 1e-5 of the CPU image's maximum."""
    import json
    import subprocess

    script = tmp_path / "cudasim.py"
    script.write_text(script_source)
    r = subprocess.run([sys.executable, str(script), str(ROOT)], env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert len(res) == entries
    for key, (diff, vmax) in res.items():
        assert vmax > 0, key
        assert diff <= 1e-5 * vmax, (key, diff, vmax)
    return res


@pytest.fixture(autouse=True)
def factory_fresh_blender():
    """Every test starts from a factory-fresh Blender state when bpy is in use."""
    if "bpy" in sys.modules:
        import bpy

        bpy.ops.wm.read_factory_settings(use_empty=True)
    yield


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """The default phantom (supine_arms_down, 3 mm, seed 0) written once per session:
    ct.nii.gz, seg.nii.gz, labels.json, truth.json."""
    from ctwin.core.phantom.phantom import write_phantom

    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, pose="supine_arms_down", spacing=3.0, seed=0)
    return out


COARSE_MM = 8.0  # phantom spacing for the end-to-end twin tests (speed; the chain is the same)


@pytest.fixture(scope="session")
def coarse_phantoms(tmp_path_factory) -> dict:
    """Coarse phantoms of one body at the acquisition pose and at a target pose."""
    from ctwin.core.phantom.phantom import write_phantom

    out = {}
    for pose in ("supine_arms_down", "hip_flexion"):
        d = tmp_path_factory.mktemp(f"coarse_{pose}")
        write_phantom(d, pose=pose, spacing=COARSE_MM, seed=0)
        out[pose] = d
    return out


@pytest.fixture(scope="session")
def twin_dir(coarse_phantoms, tmp_path_factory) -> Path:
    """A twin built (with twin.blend) from the coarse acquisition phantom, once per session."""
    from ctwin.core.twin.twin import build_twin
    from ctwin.operators.twin_blend import finish_build

    src = coarse_phantoms["supine_arms_down"]
    out = tmp_path_factory.mktemp("twin") / "twin"
    build_twin(src / "ct.nii.gz", src / "seg.nii.gz", out, finish=finish_build)
    return out


@pytest.fixture(scope="module")
def render_registered():
    """Register the scene state and the render layer unless the session already did (then leave
    them registered)."""
    from ctwin import blender, render
    from ctwin.render.engine import CTWIN_DRR_RenderEngine

    mine = not CTWIN_DRR_RenderEngine.is_registered
    if mine:
        blender.register()
        render.register()
    yield
    if mine:
        render.unregister()
        blender.unregister()
