"""The layers point one way: ``core/`` imports nothing from the Blender layer (``blender/``,
``operators/``, ``rig/``, ``render/``, ``ui/``), the CLI (``cli.py``, ``commands/``) or ``bpy``.

Every import statement in every module under ``core/`` (at any depth, inside functions too) is
resolved against the package tree; a relative import must stay inside ``core``."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLENDER_MODULES = {"bpy", "bpy_extras", "mathutils", "bmesh", "gpu", "blf", "aud", "idprop"}


def _imports(path: Path):
    """(line, target) for each import in ``path``: target as a tuple of names from the package root
    for relative imports (prefixed by "."), the top-level module name for absolute ones."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel[:-1]  # the file's package (for an __init__.py, the package itself)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module.split(".")[0]
                continue
            up = node.level - 1
            if up > len(package):
                yield node.lineno, ("..", "(above the package root)")
                continue
            base = package[: len(package) - up]
            mod = tuple(node.module.split(".")) if node.module else ()
            if mod:
                yield node.lineno, (".",) + base + mod
            else:  # from . import a, b
                for a in node.names:
                    yield node.lineno, (".",) + base + (a.name,)


def test_core_imports_nothing_from_the_blender_layer_or_the_cli():
    files = sorted((ROOT / "core").rglob("*.py"))
    assert len(files) > 20
    bad = []
    for f in files:
        for line, target in _imports(f):
            where = f"{f.relative_to(ROOT)}:{line}"
            if isinstance(target, str):
                if target in BLENDER_MODULES or target == "ctwin":
                    bad.append(f"{where} imports {target}")
            elif target[0] == ".." or target[1] != "core":
                bad.append(f"{where} imports {'.'.join(target[1:])}")
    assert not bad, "core/ must not import the Blender layer, the CLI or bpy:\n" + "\n".join(bad)


def test_the_check_sees_a_wrong_way_import(tmp_path, monkeypatch):
    """The checker itself: a function-local ``from ..operators import x`` in core is found."""
    import test_layers

    fake = tmp_path / "core" / "sub"
    fake.mkdir(parents=True)
    (fake / "m.py").write_text("def f():\n    from ...operators.twin_blend import finish_build\n"
                               "    from ..twin import load_twin\n    import bpy\n")
    monkeypatch.setattr(test_layers, "ROOT", tmp_path)
    found = list(test_layers._imports(fake / "m.py"))
    assert found == [(2, (".", "operators", "twin_blend")), (3, (".", "core", "twin")), (4, "bpy")]
