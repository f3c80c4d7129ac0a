#!/usr/bin/env bash
# Runs the test suite in both environments that tools/setup.sh makes, one after the other:
# .venv (Python 3.11, bpy 5.0.1: Blender 5.0) and .venv313 (Python 3.13, bpy 5.3.0: Blender 5.1+).
# Arguments go to pytest in both (e.g. -q, -x, a test file). Exits non-zero if either run fails;
# the second runs even when the first fails. CTWIN_ENVS=311 or CTWIN_ENVS=313 runs only one.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
rc=0
for env in ${CTWIN_ENVS:-311 313}; do
    case "$env" in
        311) venv=.venv ;;
        313) venv=.venv313 ;;
        *) echo "ctwin test: unknown environment '$env' (use 311 or 313)" >&2; exit 2 ;;
    esac
    if [ ! -x "$venv/bin/python" ]; then
        echo "ctwin test: no environment in $venv; run tools/setup.sh first" >&2
        exit 2
    fi
    echo "ctwin test: $("$venv/bin/python" -c 'import sys, bpy; print("Python %d.%d" % sys.version_info[:2], "bpy", bpy.app.version_string)' 2>/dev/null) ($venv)" >&2
    start=$(date +%s)
    "$venv/bin/python" -m pytest "$@" || rc=1
    echo "ctwin test: $venv finished in $(( $(date +%s) - start )) s" >&2
done
exit $rc
