#!/usr/bin/env bash
# Creates (or refreshes) the project's two isolated environments with pinned versions:
#   .venv     Python 3.11 + bpy 5.0.1 + CPU torch/smplx   (requirements.txt)       Blender 5.0
#   .venv313  Python 3.13 + bpy 5.3.0, numpy 2, no torch  (requirements-py313.txt) Blender 5.1-5.3
# Re-running is a no-op for an environment whose requirements file and this script are unchanged.
# CTWIN_PYTHON / CTWIN_PYTHON313 pick the interpreters (default: python3.11 / python3.13 on PATH,
# else pyenv's, else /usr/bin's). CTWIN_ENVS=311 or CTWIN_ENVS=313 builds only one of them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Print a working interpreter for Python X.Y, or nothing.
find_python() {
    local ver="$1" want="$2" c
    local cands=()
    [ -n "$want" ] && cands+=("$want")
    cands+=("python$ver")
    if command -v pyenv >/dev/null 2>&1; then
        cands+=("$(pyenv root)"/versions/"$ver"*/bin/python"$ver")
    fi
    cands+=("$HOME"/.pyenv/versions/"$ver"*/bin/python"$ver" /usr/bin/python"$ver" /usr/local/bin/python"$ver")
    for c in "${cands[@]}"; do
        if "$c" -c "import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != tuple(map(int, '$ver'.split('.'))))" \
            >/dev/null 2>&1; then
            command -v "$c" 2>/dev/null || echo "$c"
            return 0
        fi
    done
    return 1
}

# torch's CPU build lies on local disk; pip finds it there (never a CUDA build from an index).
findlinks=()
[ -d /opt/wheels ] && findlinks=(--find-links /opt/wheels)
pipq=(-q --disable-pip-version-check --no-input)
# pip's notes about this machine's absent local index folders are noise; real errors pass.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }

# make_env VENV_NAME PYTHON_VERSION REQUIREMENTS BLENDER "import check" PYTHON_OVERRIDE INSTALL_HINT
make_env() {
    local name="$1" ver="$2" req="$3" blender="$4" imports="$5" override="$6" hint="$7"
    local venv="$ROOT/$name" stamp="$ROOT/$name/.ctwin-setup" py want start
    want="$(cat "$ROOT/$req" "$ROOT/tools/setup.sh" | sha256sum | cut -c1-32)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
        echo "ctwin setup: environment in $name is up to date" >&2
        return 0
    fi
    py="$(find_python "$ver" "$override")" || {
        echo "ctwin setup: Python $ver not found (bpy for $blender needs it); install it (e.g. 'pyenv install $ver' or 'apt-get install python$ver python$ver-venv') or set $hint" >&2
        exit 1
    }
    start=$(date +%s)
    # A venv made by another interpreter (or a broken one) is rebuilt from scratch.
    if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$ver'.split('.'))))" 2>/dev/null; then
        echo "ctwin setup: $name is not a working Python $ver environment; recreating it" >&2
        rm -rf "$venv"
    fi
    echo "ctwin setup: creating $name with $("$py" --version 2>&1) ($py) for $blender" >&2
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    rm -f "$stamp"
    quiet "$venv/bin/python" -m pip install "${pipq[@]}" --upgrade "pip==26.3"
    quiet "$venv/bin/python" -m pip install "${pipq[@]}" "${findlinks[@]}" -r "$ROOT/$req"
    "$venv/bin/python" -c "$imports" \
        || { echo "ctwin setup: the environment in $name does not import; see above" >&2; exit 1; }
    echo "$want" > "$stamp"
    echo "ctwin setup: $name done in $(( $(date +%s) - start )) s" >&2
}

envs="${CTWIN_ENVS:-311 313}"
case " $envs " in *" 311 "*)
    make_env .venv 3.11 requirements.txt "Blender 5.0" \
        'import bpy, numpy, numba, scipy, skimage, nibabel, SimpleITK, trimesh, torch, smplx' \
        "${CTWIN_PYTHON:-}" CTWIN_PYTHON ;;
esac
case " $envs " in *" 313 "*)
    make_env .venv313 3.13 requirements-py313.txt "Blender 5.1-5.3" \
        'import bpy, numpy, numba, scipy, skimage, nibabel, SimpleITK, trimesh' \
        "${CTWIN_PYTHON313:-}" CTWIN_PYTHON313 ;;
esac
