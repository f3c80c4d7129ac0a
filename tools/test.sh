#!/usr/bin/env bash
# Runs the test suite in both environments that tools/setup.sh makes: .venv (Python 3.11,
# bpy 5.0.1: Blender 5.0) and .venv313 (Python 3.13, bpy 5.3.0: Blender 5.1+).
# Arguments go to pytest in both (e.g. -q, -x, a test file). Exits non-zero if either run fails;
# each runs to its end even when the other fails. CTWIN_ENVS=311 or CTWIN_ENVS=313 runs only one.
#
# The two suites run at the same time: each spends much of its time on one core (imports, numba
# compilation, Blender, subprocesses starting), so together they use both cores of a 2-core
# machine. The first suite's output is live; the second's goes to a temporary file and is printed
# once both have finished. CTWIN_TEST_SERIAL=1 runs them one after the other with live output.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

envs=(${CTWIN_ENVS:-311 313})
venvs=()
for env in "${envs[@]}"; do
    case "$env" in
        311) venv=.venv ;;
        313) venv=.venv313 ;;
        *) echo "ctwin test: unknown environment '$env' (use 311 or 313)" >&2; exit 2 ;;
    esac
    if [ ! -x "$venv/bin/python" ]; then
        echo "ctwin test: no environment in $venv; run tools/setup.sh first" >&2
        exit 2
    fi
    venvs+=("$venv")
done

describe() {
    echo "ctwin test: $("$1/bin/python" -c 'import sys, bpy; print("Python %d.%d" % sys.version_info[:2], "bpy", bpy.app.version_string)' 2>/dev/null) ($1)"
}

# One suite: its header line, pytest, its timing line (all on stderr, pytest's output as it is).
run_one() {
    local venv=$1 start rc=0
    shift
    describe "$venv" >&2
    start=$(date +%s)
    "$venv/bin/python" -m pytest "$@" || rc=1
    echo "ctwin test: $venv finished in $(( $(date +%s) - start )) s" >&2
    return $rc
}

rc=0
if [ "${#venvs[@]}" -eq 1 ] || [ "${CTWIN_TEST_SERIAL:-0}" = 1 ]; then
    for venv in "${venvs[@]}"; do
        run_one "$venv" "$@" || rc=1
    done
    exit $rc
fi

logs="$(mktemp -d "${TMPDIR:-/tmp}/ctwin-test.XXXXXX")"
pids=()
show() {  # the buffered suites' output (the first suite's was live)
    for i in "${!venvs[@]}"; do
        [ "$i" -eq 0 ] || cat "$logs/$i.out" 2>/dev/null
    done
}
stop() {  # Ctrl-C or a kill: interrupt the suites this script started (pytest tears down), show them
    trap - INT TERM
    for p in "${pids[@]}"; do
        kill -INT -- "-$p" 2>/dev/null
    done
    wait
    show
    exit 130
}
trap stop INT TERM
trap 'rm -rf "$logs"' EXIT
echo "ctwin test: running ${venvs[*]} at the same time; ${venvs[0]}'s output is live, the other's follows when both have finished" >&2
for i in "${!venvs[@]}"; do
    # a process group of its own (set -m), so that an interrupt ends the whole suite
    set -m
    if [ "$i" -eq 0 ]; then
        run_one "${venvs[$i]}" "$@" &
    else
        run_one "${venvs[$i]}" "$@" >"$logs/$i.out" 2>&1 &
    fi
    pids+=($!)
    set +m
done
for i in "${!venvs[@]}"; do
    wait "${pids[$i]}" || rc=1
done
show
exit $rc
