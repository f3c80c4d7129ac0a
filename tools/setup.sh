#!/usr/bin/env bash
# Creates (or refreshes) the project's isolated environment in .venv with pinned versions.
# Re-running is a no-op when requirements.txt and this script are unchanged.
# CTWIN_PYTHON picks the interpreter (default python3.11: bpy 5.0 needs CPython 3.11).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${CTWIN_PYTHON:-python3.11}"
STAMP="$VENV/.ctwin-setup"
want="$(cat "$ROOT/requirements.txt" "$ROOT/tools/setup.sh" | sha256sum | cut -c1-32)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    echo "ctwin setup: environment in .venv is up to date" >&2
    exit 0
fi
command -v "$PY" >/dev/null || { echo "ctwin setup: $PY not found (Python 3.11 is required by bpy 5.0)" >&2; exit 1; }
start=$(date +%s)
# A venv made by another interpreter (or a broken one) is rebuilt from scratch.
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "ctwin setup: .venv is not a working Python 3.11 environment; recreating it" >&2
    rm -rf "$VENV"
fi
echo "ctwin setup: creating .venv with $("$PY" --version 2>&1)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
rm -f "$STAMP"
# torch's CPU build lies on local disk; pip finds it there (never a CUDA build from an index).
findlinks=()
[ -d /opt/wheels ] && findlinks=(--find-links /opt/wheels)
pipq=(-q --disable-pip-version-check --no-input)
# pip's notes about this machine's absent local index folders are noise; real errors pass.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }
quiet "$VENV/bin/python" -m pip install "${pipq[@]}" --upgrade "pip==26.3"
quiet "$VENV/bin/python" -m pip install "${pipq[@]}" "${findlinks[@]}" -r "$ROOT/requirements.txt"
"$VENV/bin/python" -c 'import bpy, numpy, numba, scipy, skimage, nibabel, SimpleITK, trimesh, torch, smplx' \
    || { echo "ctwin setup: the environment does not import; see above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "ctwin setup: done in $(( $(date +%s) - start )) s" >&2
