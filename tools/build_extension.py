"""Build the ctwin Blender extension: dist/ctwin-<version>.zip with its bundled wheels.

    .venv/bin/python tools/build_extension.py              # build (downloads missing wheels)
    .venv/bin/python tools/build_extension.py --sync-manifest   # rewrite the manifest's wheel list

The zip is made and checked by Blender's own extension tool (``blender_ext.py build`` and
``validate``, shipped inside the ``bpy`` module as ``addons_core/bl_pkg/cli/blender_ext.py``), so it
is what ``blender --command extension build`` would make. The wheels are Blender-compatible
(CPython 3.11, linux x86_64, binary only), pinned to the versions in requirements.txt, downloaded
once into build/wheels/ (a cache) and hard-linked into wheels/, where the manifest points.
numpy is not bundled (Blender ships it); torch and smplx are not either (test-only).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "blender_manifest.toml"
CACHE = ROOT / "build" / "wheels"
WHEELS = ROOT / "wheels"
DIST = ROOT / "dist"

# Every third-party distribution the extension imports at run time, with their run-time deps.
BUNDLED = (
    "numba", "llvmlite",
    "numba-cuda", "cuda-bindings", "cuda-core", "cuda-pathfinder",
    "scipy",
    "scikit-image", "lazy_loader", "imageio", "tifffile", "pillow", "networkx", "packaging",
    "nibabel", "importlib_resources", "typing_extensions",
    "SimpleITK",
    "trimesh",
)
# Blender 5.0: CPython 3.11 on linux-x64 (manifest "platforms").
PIP_TARGET = [
    "--only-binary=:all:", "--no-deps", "--python-version", "3.11", "--implementation", "cp",
    "--abi", "cp311", "--abi", "abi3", "--abi", "none",
    *[a for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
      for a in ("--platform", tag)],
]


def fail(msg: str) -> None:
    print(f"build_extension: error: {msg}", file=sys.stderr)
    sys.exit(2)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pins() -> dict[str, str]:
    """requirements.txt as {normalised name: version}."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            out[norm(name)] = ver.strip()
    return out


def bundled_requirements() -> list[str]:
    p = pins()
    missing = [n for n in BUNDLED if norm(n) not in p]
    if missing:
        fail(f"not pinned in requirements.txt: {', '.join(missing)}")
    return [f"{n}=={p[norm(n)]}" for n in BUNDLED]


def manifest_wheels() -> list[str]:
    data = tomllib.loads(MANIFEST.read_text())
    return list(data.get("wheels", []))


def blender_ext() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bpy")
    if spec is None or spec.origin is None:
        fail("the bpy module is not installed here; run tools/setup.sh and use .venv/bin/python")
    # bpy/__init__.py lives in bpy/5.0/scripts/modules/bpy/; the package root is four levels up.
    here = Path(spec.origin).resolve()
    for base in here.parents:
        cands = list(base.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if cands:
            return cands[0]
    fail(f"Blender's extension tool (blender_ext.py) not found near {here}")


def download(requirements: list[str]) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"build_extension: downloading {len(requirements)} wheels into {CACHE}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           *PIP_TARGET, "-d", str(CACHE), *requirements]
    r = subprocess.run(cmd)
    if r.returncode != 0:
        fail("pip download of the bundled wheels failed (see above)")


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = Path(filename).name.split("-")
    return norm(parts[0]), parts[1]


def sync_manifest() -> list[str]:
    """Download the pinned wheels and write their file names into the manifest's ``wheels``."""
    reqs = bundled_requirements()
    download(reqs)
    want = {norm(r.split("==")[0]): r.split("==")[1] for r in reqs}
    files = []
    for f in sorted(CACHE.glob("*.whl")):
        name, ver = wheel_name_version(f.name)
        if want.get(name) == ver:
            files.append(f"./wheels/{f.name}")
    got = {wheel_name_version(f)[0] for f in files}
    if got != set(want):
        fail(f"no wheel downloaded for: {', '.join(sorted(set(want) - got))}")
    text = MANIFEST.read_text()
    block = "wheels = [\n" + "".join(f'  "{f}",\n' for f in files) + "]"
    new, n = re.subn(r"(?ms)^wheels = \[.*?^\]", block, text)
    if n != 1:
        fail("blender_manifest.toml has no 'wheels = [ ... ]' block to rewrite")
    MANIFEST.write_text(new)
    print(f"build_extension: manifest lists {len(files)} wheels", file=sys.stderr)
    return files


def check_manifest_against_pins(wheels: list[str]) -> None:
    p = pins()
    listed = {}
    for w in wheels:
        name, ver = wheel_name_version(w)
        listed[name] = ver
        if name == "numpy":
            fail("numpy must not be bundled (Blender ships it)")
        if p.get(name) != ver:
            fail(f"manifest wheel {Path(w).name} does not match requirements.txt "
                 f"({name}=={p.get(name)}); run tools/build_extension.py --sync-manifest")
    missing = sorted(norm(n) for n in BUNDLED if norm(n) not in listed)
    if missing:
        fail(f"manifest lists no wheel for {', '.join(missing)}; run --sync-manifest")


def link_wheels(wheels: list[str]) -> None:
    """Make wheels/ hold exactly the manifest's wheels, hard-linked from the cache."""
    names = [Path(w).name for w in wheels]
    missing = [n for n in names if not (CACHE / n).is_file()]
    if missing:
        p = pins()
        download([f"{wheel_name_version(n)[0]}=={p[wheel_name_version(n)[0]]}" for n in missing])
        still = [n for n in names if not (CACHE / n).is_file()]
        if still:
            fail(f"pip did not provide {', '.join(still)}; run --sync-manifest")
    WHEELS.mkdir(exist_ok=True)
    for f in WHEELS.iterdir():
        if f.suffix == ".whl" and f.name not in names:
            f.unlink(missing_ok=True)
    for n in names:
        dst, src = WHEELS / n, CACHE / n
        if dst.exists() and dst.stat().st_size == src.stat().st_size:
            continue
        # Link (or copy) under a temporary name, then rename: safe with concurrent builds.
        tmp = WHEELS / f".{n}.{os.getpid()}.part"
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def build(out: Path | None = None) -> Path:
    wheels = manifest_wheels()
    check_manifest_against_pins(wheels)
    link_wheels(wheels)
    version = tomllib.loads(MANIFEST.read_text())["version"]
    out = Path(out) if out else DIST / f"ctwin-{version}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    tool = blender_ext()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        tmp_zip = Path(tmp) / out.name
        r = subprocess.run([sys.executable, str(tool), "build", "--source-dir", str(ROOT),
                            "--output-filepath", str(tmp_zip)], capture_output=True, text=True)
        if r.returncode != 0 or not tmp_zip.is_file():
            sys.stderr.write(r.stdout + r.stderr)
            fail("Blender's extension build failed (see above)")
        r = subprocess.run([sys.executable, str(tool), "validate", str(tmp_zip)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stdout + r.stderr)
            fail("Blender's extension validator rejected the zip (see above)")
        os.replace(tmp_zip, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/build_extension.py", description=__doc__.split("\n")[0])
    ap.add_argument("--sync-manifest", action="store_true",
                    help="download the pinned wheels and rewrite the manifest's wheel list first")
    ap.add_argument("--out", type=Path, help="zip path (default dist/ctwin-<version>.zip)")
    args = ap.parse_args(argv)
    if args.sync_manifest:
        sync_manifest()
    out = build(args.out)
    size = out.stat().st_size
    print(f"{out} {size} bytes ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
