"""Build the ctwin Blender extension: one zip per platform with its bundled wheels.

    .venv/bin/python tools/build_extension.py                  # dist/ctwin-<version>-<platform>.zip
    .venv/bin/python tools/build_extension.py --platform linux-x64   # one platform only
    .venv/bin/python tools/build_extension.py --sync-manifest  # rewrite the manifest's wheel list

Blender 5.0 runs CPython 3.11; Blender 5.1, 5.2 and 5.3 run CPython 3.13. Each zip therefore
carries the cp311 AND the cp313 wheel of every compiled package (one zip installs in every
Blender from 5.0 on: Blender derives the zip's supported Python versions from its wheels' tags,
and installs the wheels matching the running Python). The zips are split by platform with
Blender's own ``extension build --split-platforms`` (``blender_ext.py``, shipped inside the
``bpy`` module as ``addons_core/bl_pkg/cli/blender_ext.py``), which keeps in each zip only the
wheels for its platform, and each zip is checked with ``blender_ext.py validate``.

The wheels are binary only, pinned to requirements.txt (requirements-py313.txt must pin the same
versions), downloaded once into build/wheels/ (a cache) and hard-linked into wheels/, where the
manifest points. numpy is not bundled (Blender ships it); torch and smplx are not either
(test-only).
"""
from __future__ import annotations

import argparse
import contextlib
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

# CPython versions of the supported Blenders: 5.0 -> 3.11; 5.1, 5.2, 5.3 -> 3.13.
PYTHONS = ("3.11", "3.13")

# Blender platform -> wheel platform tags it accepts, most preferred first. Linux: Blender 5.x
# needs glibc 2.28 (VFX Reference Platform CY2025/CY2026, https://vfxplatform.com). macOS: Blender 5
# is built for Apple Silicon only and needs macOS 13 Ventura (https://www.blender.org/download/
# requirements/), so wheels built for macOS 13.0 or older; pip and packaging expand the tag.
PLATFORMS = {
    "linux-x64": ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
                  "manylinux_2_25_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                  "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("macosx_13_0_arm64",),
}
ALL = tuple(PLATFORMS)
# NVIDIA's CUDA packages exist for linux and windows x86_64 only (macOS has no CUDA).
CUDA_PLATFORMS = ("linux-x64", "windows-x64")

# THE list of third-party distributions the extension imports at run time (with their run-time
# dependencies), and the platforms each is bundled for. A new run-time dependency needs a pin in
# requirements.txt and requirements-py313.txt, an entry here, and `--sync-manifest`.
# Deliberately NOT bundled: numpy (Blender ships it), torch and smplx (tests only), and packages
# only the CLI uses outside Blender (e.g. Ray for a dataset command: hundreds of MB per platform
# and Python; such a command must say in one line that it needs the clone's environment).
BUNDLED: dict[str, tuple[str, ...]] = {
    "numba": ALL, "llvmlite": ALL,
    "numba-cuda": CUDA_PLATFORMS, "cuda-bindings": CUDA_PLATFORMS, "cuda-core": CUDA_PLATFORMS,
    "cuda-pathfinder": CUDA_PLATFORMS,
    "scipy": ALL,
    "scikit-image": ALL, "lazy_loader": ALL, "imageio": ALL, "tifffile": ALL, "pillow": ALL,
    "networkx": ALL, "packaging": ALL,
    "nibabel": ALL, "importlib_resources": ALL, "typing_extensions": ALL,
    "SimpleITK": ALL,
    "trimesh": ALL,
    "spekpy": ALL, "xraylib": ALL, "pydicom": ALL,
    "matplotlib": ALL, "contourpy": ALL, "cycler": ALL, "fonttools": ALL, "kiwisolver": ALL,
    "pyparsing": ALL, "python-dateutil": ALL, "tzdata": ALL,
}
# Data files left out of a bundled wheel, by package (fnmatch patterns of paths in the wheel).
# SpekPy's wheel is 164 MB, nearly all physics tables; ctwin's spectra (core/drr/xray.py: tungsten
# anode, SpekPy's default "casim" model) read only the Z74 (tungsten) tables and the shared
# ones (traced file opens for 40, 80 and 150 kVp with Al and Cu filters, on and off axis). The
# "kqp" model's table (KQP.npz, 91 MB) and the Cu, Mo and Rh anodes' tables (Z29/Z42/Z45, 33 MB)
# are dropped: the trimmed wheel is 38 MB.
TRIM: dict[str, tuple[str, ...]] = {
    "spekpy": ("spekpy/data/tables/advanced/KQP.npz",
               "spekpy/data/tables/advanced/Z29_*", "spekpy/data/tables/advanced/Z42_*",
               "spekpy/data/tables/advanced/Z45_*"),
}
TRIMMED = ROOT / "build" / "trimmed"
# Users download one zip per platform: the build fails when one grows past this size (the
# bundled wheels are most of it).
MAX_ZIP_BYTES = 300 * 10**6


def fail(msg: str) -> None:
    print(f"build_extension: error: {msg}", file=sys.stderr)
    sys.exit(2)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pins(path: Path | None = None) -> dict[str, str]:
    """A requirements file (default requirements.txt) as {normalised name: version}."""
    out = {}
    for line in (path or ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            out[norm(name)] = ver.strip()
    return out


def bundled_pins() -> dict[str, str]:
    """{normalised name: version} of BUNDLED, the same in both requirements files."""
    p311, p313 = pins(), pins(ROOT / "requirements-py313.txt")
    missing = [n for n in BUNDLED if norm(n) not in p311 or norm(n) not in p313]
    if missing:
        fail(f"not pinned in requirements.txt and requirements-py313.txt: {', '.join(missing)}")
    differ = [f"{n} ({p311[norm(n)]} vs {p313[norm(n)]})" for n in BUNDLED
              if p311[norm(n)] != p313[norm(n)]]
    if differ:
        fail(f"bundled packages pinned differently for Python 3.11 and 3.13: {', '.join(differ)}")
    return {norm(n): p311[norm(n)] for n in BUNDLED}


def supported_tags(python: str, platform: str) -> list[str]:
    """Wheel tags 'interpreter-abi-platform' for CPython ``python`` on a Blender platform,
    most preferred first (packaging's own tag order)."""
    from packaging import tags

    ver = tuple(int(x) for x in python.split("."))
    plats = list(PLATFORMS[platform])
    if platform.startswith("macos"):
        major, minor = (int(x) for x in plats[0].split("_")[1:3])
        plats = list(tags.mac_platforms((major, minor), "arm64"))
    out = [str(t) for t in tags.cpython_tags(ver, platforms=plats)]
    out += [str(t) for t in tags.compatible_tags(ver, platforms=plats)]
    return out


def wheel_tags(filename: str) -> set[str]:
    from packaging.utils import parse_wheel_filename

    return {str(t) for t in parse_wheel_filename(Path(filename).name)[3]}


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = Path(filename).name.split("-")
    return norm(parts[0]), parts[1]


def select_wheel(files: list[str], python: str, platform: str) -> str | None:
    """The file pip would install for ``python`` on ``platform`` among one package's wheels."""
    rank = {t: i for i, t in enumerate(supported_tags(python, platform))}
    best = None
    for f in files:
        r = min((rank[t] for t in wheel_tags(f) if t in rank), default=None)
        if r is not None and (best is None or r < best[0]):
            best = (r, f)
    return best[1] if best else None


def blender_ext() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bpy")
    if spec is None or spec.origin is None:
        fail("the bpy module is not installed here; run tools/setup.sh and use .venv/bin/python")
    # bpy/__init__.so lives in site-packages/bpy/; the tool is under bpy/<version>/scripts/.
    here = Path(spec.origin).resolve()
    for base in here.parents:
        cands = list(base.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if cands:
            return cands[0]
    fail(f"Blender's extension tool (blender_ext.py) not found near {here}")


@contextlib.contextmanager
def cache_lock():
    """Held while the wheel cache is filled: two builds at once (the test suites of both
    environments run side by side) must not download the same wheels into it together, nor
    read a wheel that the other is still writing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: builds there run one at a time
        yield
        return
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download(requirements: list[str], python: str, platform: str) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    cp = "cp" + python.replace(".", "")
    target = ["--only-binary=:all:", "--no-deps", "--python-version", python,
              "--implementation", "cp", "--abi", cp, "--abi", "abi3", "--abi", "none"]
    for tag in PLATFORMS[platform]:
        target += ["--platform", tag]
    target += ["--platform", "any"]
    print(f"build_extension: downloading {len(requirements)} wheels for CPython {python} "
          f"{platform} into {CACHE}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           *target, "-d", str(CACHE), *requirements]
    r = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    err = "".join(ln for ln in r.stderr.splitlines(True) if "is ignored: it is neither" not in ln)
    sys.stderr.write(err)
    if r.returncode != 0:
        fail(f"pip download of the bundled wheels for CPython {python} {platform} failed (see above)")


def wanted_wheels(fetch: bool) -> dict[tuple[str, str, str], str]:
    """{(package, python, platform): wheel file name} for every bundled package; downloads the
    missing ones when ``fetch`` (under ``cache_lock``)."""
    if fetch:
        with cache_lock():
            return _wanted_wheels(True)
    return _wanted_wheels(False)


def _wanted_wheels(fetch: bool) -> dict[tuple[str, str, str], str]:
    want = bundled_pins()
    out: dict[tuple[str, str, str], str] = {}
    for platform in PLATFORMS:
        for python in PYTHONS:
            names = [n for n in BUNDLED if platform in BUNDLED[n]]

            def pick(name):
                files = [f.name for f in CACHE.glob("*.whl")
                         if wheel_name_version(f.name) == (norm(name), want[norm(name)])]
                return select_wheel(files, python, platform)

            missing = [n for n in names if pick(n) is None]
            if missing and fetch:
                download([f"{n}=={want[norm(n)]}" for n in missing], python, platform)
                missing = [n for n in names if pick(n) is None]
            if missing:
                fail(f"no wheel for CPython {python} {platform}: {', '.join(missing)}"
                     + ("" if fetch else "; run --sync-manifest"))
            for n in names:
                out[(norm(n), python, platform)] = pick(n)
    return out


def manifest() -> dict:
    return tomllib.loads(MANIFEST.read_text())


def sync_manifest() -> list[str]:
    """Download the pinned wheels; write their file names and the platforms into the manifest."""
    files = sorted({f"./wheels/{f}" for f in wanted_wheels(fetch=True).values()})
    text = MANIFEST.read_text()
    block = "wheels = [\n" + "".join(f'  "{f}",\n' for f in files) + "]"
    new, n = re.subn(r"(?ms)^wheels = \[.*?^\]", block, text)
    if n != 1:
        fail("blender_manifest.toml has no 'wheels = [ ... ]' block to rewrite")
    plats = "platforms = [" + ", ".join(f'"{p}"' for p in PLATFORMS) + "]"
    new, n = re.subn(r"(?m)^platforms = \[.*\]$", plats, new)
    if n != 1:
        fail("blender_manifest.toml has no one-line 'platforms = [...]' to rewrite")
    MANIFEST.write_text(new)
    print(f"build_extension: manifest lists {len(files)} wheels", file=sys.stderr)
    return files


def check_manifest() -> list[str]:
    """The manifest's wheels, which must be exactly the selection for every Python x platform."""
    m = manifest()
    if list(m.get("platforms", [])) != list(PLATFORMS):
        fail(f"manifest platforms {m.get('platforms')} are not {list(PLATFORMS)}; run --sync-manifest")
    wheels = list(m.get("wheels", []))
    for w in wheels:
        if wheel_name_version(w)[0] == "numpy":
            fail("numpy must not be bundled (Blender ships it)")
    want = sorted({f"./wheels/{f}" for f in wanted_wheels(fetch=True).values()})
    if sorted(wheels) != want:
        extra = sorted(set(wheels) - set(want))
        lack = sorted(set(want) - set(wheels))
        fail("manifest wheels do not match requirements.txt and BUNDLED "
             f"(extra: {', '.join(extra) or '-'}; missing: {', '.join(lack) or '-'}); "
             "run tools/build_extension.py --sync-manifest")
    return wheels


def trimmed_wheel(name: str) -> Path:
    """The cached wheel ``name``, or for a package in TRIM a copy without the TRIM files (and
    without their RECORD lines), made once in build/trimmed/."""
    import fnmatch
    import zipfile

    src = CACHE / name
    drop = TRIM.get(wheel_name_version(name)[0])
    if not drop:
        return src
    dst = TRIMMED / name
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    TRIMMED.mkdir(parents=True, exist_ok=True)
    tmp = TRIMMED / f".{name}.{os.getpid()}.part"
    gone = lambda f: any(fnmatch.fnmatch(f, pat) for pat in drop)  # noqa: E731
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            if gone(info.filename):
                continue
            data = zi.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(ln for ln in data.decode().splitlines(True)
                               if not gone(ln.split(",", 1)[0])).encode()
            zo.writestr(info, data)
    os.replace(tmp, dst)
    return dst


def link_wheels(wheels: list[str]) -> None:
    """Make wheels/ hold exactly the manifest's wheels, hard-linked from the cache."""
    names = [Path(w).name for w in wheels]
    WHEELS.mkdir(exist_ok=True)
    for f in WHEELS.iterdir():
        if f.suffix == ".whl" and f.name not in names:
            f.unlink(missing_ok=True)
    for n in names:
        dst, src = WHEELS / n, trimmed_wheel(n)
        if dst.exists() and dst.stat().st_size == src.stat().st_size:
            continue
        # Link (or copy) under a temporary name, then rename: safe with concurrent builds.
        tmp = WHEELS / f".{n}.{os.getpid()}.part"
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def validate(zip_path: Path, tool: Path | None = None) -> None:
    tool = tool or blender_ext()
    r = subprocess.run([sys.executable, str(tool), "validate", str(zip_path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        fail(f"Blender's extension validator rejected {zip_path.name} (see above)")


# Blender versions per CPython line of the zips (manifest blender_version_min/max; max is
# exclusive): a zip installed in the wrong Blender is refused with a message naming the range.
BLENDER_RANGE = {"3.11": ("5.0.0", "5.1.0"), "3.13": ("5.1.0", None)}


def zip_name(version: str, python: str, platform: str) -> str:
    return f"ctwin-{version}-py{python.replace('.', '')}-{platform.replace('-', '_')}.zip"


def _manifest_for(text: str, wheels: list[str], platforms: list[str], python: str) -> str:
    """The manifest text for one CPython line: its wheels, platforms and Blender range."""
    block = "wheels = [\n" + "".join(f'  "{w}",\n' for w in wheels) + "]"
    text = re.sub(r"(?ms)^wheels = \[.*?^\]", block, text)
    text = re.sub(r"(?m)^platforms = \[.*\]$",
                  "platforms = [" + ", ".join(f'"{p}"' for p in platforms) + "]", text)
    lo, hi = BLENDER_RANGE[python]
    rng = f'blender_version_min = "{lo}"' + (f'\nblender_version_max = "{hi}"' if hi else "")
    text, n = re.subn(r'(?m)^blender_version_min = ".*"$', rng, text)
    if n != 1:
        fail("blender_manifest.toml has no blender_version_min line")
    return text


def build(out_dir: Path | None = None, platforms: list[str] | None = None,
          pythons: list[str] | None = None) -> list[Path]:
    """Build and validate ctwin-<version>-py<XY>-<platform>.zip for each CPython line and
    platform: one zip per Blender platform (Blender's --split-platforms) and Python line (the
    cp311 and cp313 wheels together would make the linux-x64 zip over MAX_ZIP_BYTES)."""
    check_manifest()
    chosen = wanted_wheels(fetch=False)
    link_wheels(sorted({f"./wheels/{f}" for f in chosen.values()}))
    version = manifest()["version"]
    out_dir = Path(out_dir) if out_dir else DIST
    out_dir.mkdir(parents=True, exist_ok=True)
    platforms = [p for p in PLATFORMS if p in (platforms or PLATFORMS)]
    pythons = [p for p in PYTHONS if p in (pythons or PYTHONS)]
    tool = blender_ext()
    outs = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        src = Path(tmp) / "src"
        # The extension's own files, without the development ones (the manifest's
        # paths_exclude_pattern drops the rest); wheels/ is linked, not copied.
        shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
            ".*", "__pycache__", "build", "dist", "out", "wheels", "tests", "benchmarks", "docs",
            "*.zip"))
        (src / "wheels").symlink_to(WHEELS, target_is_directory=True)
        text = MANIFEST.read_text()
        for python in pythons:
            for platform in platforms:
                # One platform per build (so that pure-Python wheels of packages bundled only
                # for other platforms, e.g. cuda-pathfinder, stay out), split the Blender way.
                wheels = sorted({f"./wheels/{f}" for (_, py, plat), f in chosen.items()
                                 if py == python and plat == platform})
                (src / "blender_manifest.toml").write_text(
                    _manifest_for(text, wheels, [platform], python))
                base = Path(tmp) / f"ctwin-{version}-py{python.replace('.', '')}.zip"
                r = subprocess.run([sys.executable, str(tool), "build", "--source-dir", str(src),
                                    "--output-filepath", str(base), "--split-platforms"],
                                   capture_output=True, text=True)
                name = zip_name(version, python, platform)
                z = Path(tmp) / name
                if r.returncode != 0 or not z.is_file():
                    sys.stderr.write(r.stdout + r.stderr)
                    fail(f"Blender's extension build of {name} failed (see above)")
                validate(z, tool)
                if z.stat().st_size > MAX_ZIP_BYTES:
                    fail(f"{name} is {z.stat().st_size / 1e6:.0f} MB, "
                         f"over {MAX_ZIP_BYTES / 1e6:.0f} MB")
                os.replace(z, out_dir / name)
                outs.append(out_dir / name)
    return outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/build_extension.py", description=__doc__.split("\n")[0])
    ap.add_argument("--sync-manifest", action="store_true",
                    help="download the pinned wheels and rewrite the manifest's wheel list first")
    ap.add_argument("--platform", action="append", choices=list(PLATFORMS),
                    help="build only this platform (repeatable; default: all)")
    ap.add_argument("--python", action="append", choices=list(PYTHONS),
                    help="build only for this CPython line (repeatable; default: all): "
                         "3.11 for Blender 5.0, 3.13 for Blender 5.1 and newer")
    ap.add_argument("--out-dir", type=Path, help="folder for the zips (default dist/)")
    args = ap.parse_args(argv)
    if args.sync_manifest:
        sync_manifest()
    for out in build(args.out_dir, args.platform, args.python):
        size = out.stat().st_size
        print(f"{out} {size} bytes ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
