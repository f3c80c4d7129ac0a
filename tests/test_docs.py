"""The documentation: docs/REFERENCE.md's CLI section matches the argparse parsers, and no file of
the repository names a document (or links a file or a section) that the repository does not have."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import cli_reference  # noqa: E402

# Folders that are not part of the repository's own text (environments, build outputs).
_SKIP_DIRS = {".git", ".venv", ".venv313", "build", "dist", "out", "__pycache__", ".pytest_cache"}


def repo_files() -> list[Path]:
    """The repository's files (tracked, and new ones git does not ignore), or, outside a git checkout, every file but build outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True, timeout=60)
        files = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in ROOT.rglob("*") if p.is_file()
                 and not any(part in _SKIP_DIRS for part in p.relative_to(ROOT).parts)]
    return [p for p in files if p.is_file()]


# --- the CLI section ---------------------------------------------------------------------------
def test_cli_reference_is_current():
    assert cli_reference.main(["--check"]) == 0, "docs/REFERENCE.md is out of date: run tools/cli_reference.py"


def test_cli_reference_lists_every_command_and_option():
    """Independent of the generator: every option string of every command's parser is in the page."""
    sys.path.insert(0, str(ROOT / "tools"))
    from ctwin import cli

    parser, mods = cli.build_parser("ctwin")
    page = (ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in cli.COMMAND_NAMES:
        if name not in mods:
            continue
        assert f"### ctwin {name}" in page, name
        section = page.split(f"### ctwin {name}", 1)[1].split("\n### ", 1)[0]
        for action in sub.choices[name]._actions:
            for opt in action.option_strings:
                if opt in ("-h", "--help"):
                    continue
                assert f"`{opt}`" in section, (name, opt)


def test_cli_reference_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    page = (ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
    head, generated = page.split(cli_reference.BEGIN, 1)
    stale = head + cli_reference.BEGIN + generated.replace("| `--out` |", "| `--output` |", 1)
    assert stale != page
    p = tmp_path / "REFERENCE.md"
    p.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(cli_reference, "PAGE", p)
    monkeypatch.setattr(cli_reference, "ROOT", tmp_path)
    assert cli_reference.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert cli_reference.main([]) == 0  # rewriting makes it current
    assert p.read_text(encoding="utf-8") == page
    assert cli_reference.main(["--check"]) == 0


# --- links and document names ------------------------------------------------------------------
_LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_MD_NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _strip_code_blocks(text: str) -> str:
    """Markdown without its fenced code blocks (their brackets are code, not links)."""
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)


def _strip_code(text: str) -> str:
    """Markdown without code blocks and inline code spans (``G(pA)`` is maths, not a link)."""
    return re.sub(r"`[^`\n]*`", "", _strip_code_blocks(text))


def github_anchors(md: str) -> set:
    """The heading anchors GitHub makes for a markdown page (lowercase, punctuation dropped, spaces
    to hyphens, repeats numbered) plus explicit <a name/id> anchors."""
    seen, out = {}, set()
    for line in _strip_code_blocks(md).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"`([^`]*)`", r"\1", m.group(1))
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", md))
    return out


def _link_problems(files) -> list[str]:
    bad = []
    anchors = {}
    for f in files:
        if f.suffix != ".md":
            continue
        text = _strip_code(f.read_text(encoding="utf-8"))
        for target in _LINK.findall(text):
            if _SCHEME.match(target) or target.startswith("//"):
                continue  # a URL: not checked here
            path, _, frag = target.partition("#")
            dest = f if not path else (f.parent / path).resolve()
            rel = f.relative_to(ROOT)
            if path and not dest.exists():
                bad.append(f"{rel}: link to {target}: no such file")
                continue
            try:
                dest.relative_to(ROOT)
            except ValueError:
                bad.append(f"{rel}: link to {target} leaves the repository")
                continue
            if frag and dest.suffix == ".md":
                if dest not in anchors:
                    anchors[dest] = github_anchors(dest.read_text(encoding="utf-8"))
                if frag not in anchors[dest]:
                    bad.append(f"{rel}: link to {target}: no section #{frag} in {dest.relative_to(ROOT)}")
    return bad


def _mention_problems(files) -> list[str]:
    bad = []
    for f in files:
        if f.suffix not in (".py", ".md") or f == Path(__file__).resolve():
            continue  # (this file's own names are test fixtures)
        text = f.read_text(encoding="utf-8")
        for name in set(_MD_NAME.findall(text)):
            if _SCHEME.match(name):
                continue
            where = (ROOT / name, f.parent / name, ROOT / "docs" / name)
            if not any(p.is_file() for p in where):
                bad.append(f"{f.relative_to(ROOT)} names {name}, which the repository does not have")
    return bad


def test_no_link_to_a_missing_file_or_section():
    files = repo_files()
    assert any(f.name == "REFERENCE.md" for f in files)
    assert _link_problems(files) == []


def test_no_mention_of_a_missing_document():
    files = repo_files()
    assert _mention_problems(files) == []
    # "SPEC section N" / "SPEC §N" in the code and the docs cite docs/SPEC.md
    citing = [f for f in files if f.suffix in (".py", ".md") and re.search(r"\bSPEC\b", f.read_text(encoding="utf-8"))]
    assert citing and (ROOT / "docs" / "SPEC.md").is_file()


def test_the_checks_catch_what_they_should(tmp_path, monkeypatch):
    """The checkers report a missing file, a missing section and a missing named document."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "A.md").write_text("# Title\n\n## Some `code` section\n", encoding="utf-8")
    good = tmp_path / "good.md"
    good.write_text("[a](docs/A.md) [`b`](docs/A.md#some-code-section) [u](https://x.org/y.md) [s](#top)\n"
                    "# top\nsee docs/A.md and A.md; `G[j](pA)`\n```\n[not](a/link.png)\n```\n", encoding="utf-8")
    bad = tmp_path / "bad.md"
    bad.write_text("[a](docs/B.md) [b](docs/A.md#nope)\n", encoding="utf-8")
    code = tmp_path / "mod.py"
    code.write_text('"""See docs/SPEC.md section 3 and docs/A.md."""\n', encoding="utf-8")
    assert _link_problems([good]) == []
    assert _mention_problems([good]) == []
    assert len(_link_problems([bad])) == 2
    assert _mention_problems([code]) == ["mod.py names docs/SPEC.md, which the repository does not have"]


def test_readme_and_architecture_cite_the_reference():
    assert "](docs/REFERENCE.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](REFERENCE.md)" in (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")


# --- the reference covers what the code writes -------------------------------------------------
def _section(start: str, end: str) -> str:
    page = (ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
    return page.split(start, 1)[1].split(end, 1)[0]


def test_every_sidecar_key_is_documented():
    """The sidecar keys the core produces (geometry, named view, request, realistic physics with
    scatter and grid, noise) are each named in section 5 of docs/REFERENCE.md."""
    import numpy as np

    from ctwin.core.drr.carm import named_view
    from ctwin.core.safety import request_keys
    from ctwin.core.drr.xray import XraySetup, form_image

    g = named_view("ap", (np.full(3, -100.0), np.full(3, 100.0)), size=8)
    x = XraySetup(kvp=80, scatter=True, grid_ratio=10, mas=1.0, detector="paxscan4030cb")
    physics = form_image({"water": np.full((8, 8), 10.0)}, x, g)["sidecar"]
    keys = (set(g.to_sidecar()) | set(request_keys(None, 1e5, 1.0, 0, x)) | set(physics)
            | set(physics["scatter_model"]) | set(physics["hu_table"]))
    text = _section("## 5. Rendered frames", "## 6. Metrics")
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert missing == [], f"sidecar keys not in docs/REFERENCE.md section 5: {missing}"


def test_every_dicom_tag_is_documented(tmp_path):
    import pydicom
    import numpy as np

    from ctwin.core.drr.dicom_dx import write_dx

    side = {"value": "line_integral", "source": "ct.nii.gz", "frame": 0, "view": "ap", "kvp": 80.0, "mas": 1.0,
            "pixel_spacing_mm": [1.0, 1.0], "sid_mm": 1500.0, "sad_mm": 1000.0,
            "source_mm": [0.0, -1000.0, 0.0], "detector_center_mm": [0.0, 500.0, 0.0]}
    write_dx(tmp_path / "f.dcm", np.arange(12.0).reshape(3, 4), side)
    ds = pydicom.dcmread(tmp_path / "f.dcm")
    tags = {e.keyword for e in ds if e.keyword}
    assert {"KVP", "ExposureInmAs", "PositionerPrimaryAngle"} <= tags
    text = _section("### 5.3 DICOM DX tags", "### 5.4")
    missing = sorted(t for t in tags if f"`{t}`" not in text)
    assert missing == [], f"DICOM tags not in docs/REFERENCE.md section 5.3: {missing}"


def _named(text: str, names) -> list:
    return sorted(n for n in names if f"`{n}`" not in text)


def test_every_file_and_key_of_a_twin_and_a_phantom_is_documented(twin_dir, coarse_phantoms):
    """Every file of a built twin directory and of a phantom folder, every key of their JSON files
    and every array of their .npz files is named in section 3 of docs/REFERENCE.md (the fixtures
    are the session's shared coarse phantom and twin)."""
    import json

    import numpy as np

    twin_text = _section("### 3.2 Twin directory", "### 3.3")
    meta = json.loads((twin_dir / "twin.json").read_text())
    files = []
    for p in sorted(twin_dir.rglob("*")):
        rel = p.relative_to(twin_dir).as_posix()
        if p.is_file() and not (rel.startswith("meshes/") and p.stem in [*meta["structures"], "skin_label"]):
            files.append(rel)
    assert _named(twin_text, files) == []
    assert "`meshes/<label>.ply`" in twin_text

    def keys(obj, nested=()):
        out = set(obj)
        for k in nested:
            out |= set(obj.get(k) or {})
        return out

    assert _named(twin_text, keys(meta, ("inputs", "ct", "body_model", "fit", "plausibility", "software"))
                  - {"numpy", "numba", "scipy", "scikit-image", "nibabel", "SimpleITK", "trimesh", "bpy",
                     "blender", "python", "ctwin_format"}) == []
    fit = json.loads((twin_dir / "fit.json").read_text())
    assert _named(twin_text, keys(fit, ("losses", "detected", "metrics"))) == []
    art = json.loads((twin_dir / "volumes" / "articulated" / "articulated.json").read_text())
    assert _named(twin_text, keys(art, ("params",)) | set(art["parts"][0])) == []

    def arrays(path):
        with np.load(path) as z:
            return {re.sub(r"_\d+$", "_<i>", k) for k in z.files}

    for npz in ("fit.npz", "binding.npz", "volumes/articulated/articulated.npz"):
        assert _named(twin_text, arrays(twin_dir / npz)) == [], npz

    ph_text = _section("### 3.1 Phantom folder", "### 3.2")
    ph = coarse_phantoms["supine_arms_down"]
    assert _named(ph_text, [p.name for p in ph.iterdir()]) == []
    truth = json.loads((ph / "truth.json").read_text())
    assert _named(ph_text, set(truth)) == []


def test_reference_tables_are_well_formed():
    """Every row of every table in docs/REFERENCE.md has its header's number of cells (an unescaped
    pipe, even inside a code span, splits a GitHub table cell)."""
    bad, cells = [], None
    text = _strip_code_blocks((ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8"))
    for n, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("|"):
            cells = None
            continue
        count = len(re.findall(r"(?<!\\)\|", line.strip()))
        if cells is None:
            cells = count
        elif count != cells:
            bad.append(f"line {n}: {count - 1} cells, header {cells - 1}: {line[:80]}")
    assert bad == []


def test_readme_python_imports_resolve():
    """Every ``import`` line of the README's Python examples (and docs/) imports: the names it
    shows exist where it says."""
    lines = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", md.read_text(encoding="utf-8"), re.S):
            lines += [ln.split("#")[0].strip() for ln in block.splitlines()
                      if re.match(r"\s*(from ctwin[\w.]* import |import ctwin)", ln)]
    assert len(lines) >= 8, lines
    code = "\n".join(["import sys", f"sys.path.insert(0, {str(ROOT / 'tools')!r})",
                      "from launch import load_package", "load_package('ctwin')", *lines])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr.strip().splitlines()[-1]
