# shellcheck shell=bash
# Shared helpers for the setup scripts (source me).

# find_python X.Y: print a working interpreter for that version (pyenv's real binaries first:
# pyenv's shims exist for versions that are not active and then fail).
find_python() {
    local ver=$1 cand
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$ver".*/bin/python"$ver" \
                /root/.pyenv/versions/"$ver".*/bin/python"$ver" "/usr/bin/python$ver" "python$ver"; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import venv' >/dev/null 2>&1; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

# controller_python: the newest Python >= 3.12 (ansible-core 2.20/2.21 controllers).
controller_python() {
    local v
    for v in 3.13 3.12 3.14; do
        if find_python "$v"; then return 0; fi
    done
    return 1
}

# ensure_venv DIR MODULE PACKAGE...: (re)create DIR on the controller Python unless its
# python can import MODULE, and pip-install the packages into it.
ensure_venv() {
    local dir=$1 check=$2 py
    shift 2
    if "$dir/bin/python" -c "import $check" >/dev/null 2>&1; then
        return 0
    fi
    py=$(controller_python) || { echo "no Python >= 3.12 found (pyenv versions or PATH)"; return 1; }
    echo "[setup] creating $dir with $py: $*"
    rm -rf "$dir"
    "$py" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
