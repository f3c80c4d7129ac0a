#!/usr/bin/env bash
# Creates (or refreshes) the project's isolated environment in .venv with pinned versions.
# Re-running is a no-op when requirements.txt and this script are unchanged.
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
echo "ctwin setup: creating .venv with $("$PY" --version 2>&1)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt" >&2
echo "$want" > "$STAMP"
echo "ctwin setup: done in $(( $(date +%s) - start )) s" >&2
