"""The ctwin CLI (SPEC section 3): ./ctwin from a clone, the same handler as `blender -c ctwin`."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

from ctwin import cli
from ctwin.core.errors import CtwinError

ROOT = Path(__file__).resolve().parent.parent
CTWIN = str(ROOT / "ctwin")


def run_ctwin(*args, timeout=300):
    return subprocess.run([CTWIN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def implemented() -> list[str]:
    return [n for n in cli.COMMAND_NAMES if (ROOT / "commands" / f"{n}.py").is_file()]


def listed_commands(help_text: str) -> list[str]:
    """Command names in the 'commands' section of --help."""
    lines = help_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("commands"))
    names = []
    for ln in lines[start + 1:]:
        if not ln.startswith("  "):
            break
        if len(ln) - len(ln.lstrip()) > 4:
            continue  # a wrapped help text, not a command's line
        word = ln.split()[0]
        if word in cli.COMMAND_NAMES:
            names.append(word)
    return names


@pytest.fixture(scope="module")
def help_run():
    return run_ctwin("--help")


def test_help_lists_exactly_the_implemented_commands(help_run):
    assert help_run.returncode == 0, help_run.stderr
    assert help_run.stdout.startswith("usage: ctwin")
    assert listed_commands(help_run.stdout) == implemented()


def test_each_command_help():
    for name in implemented():
        p = run_ctwin(name, "--help")
        assert p.returncode == 0, (name, p.stderr)
        assert p.stdout.startswith(f"usage: ctwin {name}"), (name, p.stdout[:200])


@pytest.mark.parametrize("args, needle", [
    (["nosuchcommand"], "unknown command 'nosuchcommand'"),
    (["--no-such-option"], "unrecognized arguments"),
    ([], "no command given"),
])
def test_bad_input_exits_2_with_one_line(args, needle):
    p = run_ctwin(*args)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ctwin: error: ") and needle in lines[0]


def test_version_matches_manifest():
    p = run_ctwin("--version")
    want = tomllib.loads((ROOT / "blender_manifest.toml").read_text())["version"]
    assert p.returncode == 0 and p.stdout.strip() == f"ctwin {want}"


# In-process checks of the dispatcher with a stand-in command module, so that they do not depend
# on which real commands exist yet.
@pytest.fixture
def fake_command(monkeypatch):
    calls = []

    def add_arguments(parser):
        parser.add_argument("--out", required=True)
        parser.add_argument("--size", type=int, default=4)
        parser.add_argument("--fail", choices=["user", "bug"])

    def run(args):
        calls.append(args)
        if args.fail == "user":
            raise CtwinError("no such file:\n  /nowhere/ct.nii.gz")
        if args.fail == "bug":
            raise RuntimeError("a bug")
        return 0

    mod = types.SimpleNamespace(HELP="a stand-in command", add_arguments=add_arguments, run=run)
    monkeypatch.setattr(cli, "_command_modules", lambda: {"phantom": mod})
    return calls


def test_dispatch_runs_the_command(fake_command, capsys):
    assert cli.main(["phantom", "--out", "x", "--size", "7"]) == 0
    assert fake_command[0].out == "x" and fake_command[0].size == 7
    assert cli.main(["--quiet", "phantom", "--out", "y"]) == 0
    assert fake_command[1].quiet is True


@pytest.mark.parametrize("argv, needle", [
    (["phantom"], "the following arguments are required: --out"),
    (["phantom", "--out", "x", "--size", "big"], "invalid int value: 'big'"),
    (["phantom", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["render"], "unknown command 'render' (commands: phantom)"),
    (["phantom", "--out", "x", "--fail", "user"], "no such file: /nowhere/ct.nii.gz"),
])
def test_dispatch_bad_input_is_one_line_exit_2(fake_command, capsys, argv, needle):
    assert cli.main(argv, prog="blender -c ctwin") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("blender -c ctwin") and needle in err


def test_dispatch_help_returns_instead_of_exiting(fake_command, capsys):
    # Blender's command handler needs a return value, not SystemExit.
    assert cli.main(["--help"], prog="blender -c ctwin") == 0
    assert cli.main(["phantom", "--help"], prog="blender -c ctwin") == 0
    out, _ = capsys.readouterr()
    assert "usage: blender -c ctwin phantom" in out and "--size" in out
    assert fake_command == []


def test_a_bug_is_not_hidden(fake_command):
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["phantom", "--out", "x", "--fail", "bug"])


def test_readme_commands_and_ci():
    readme = (ROOT / "README.md").read_text().splitlines()
    code = [ln.strip() for ln in readme if ln.strip().startswith("tools/setup.sh")]
    assert code[:2] == ["tools/setup.sh && ./ctwin demo --out out",
                        "tools/setup.sh && tools/test.sh -q"]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci[-1] == code[1]


def test_launcher_runs_without_bpy():
    # The CLI and core import no bpy: `./ctwin --help` works in a plain Python as well.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from launch import load_package;"
            "load_package(); from ctwin import cli; rc = cli.main(['--help']);"
            "assert 'bpy' not in sys.modules, 'bpy imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(ROOT / "tools")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
