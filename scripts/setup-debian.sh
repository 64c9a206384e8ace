#!/usr/bin/env bash
# Install what the tests and the demo need on a Debian machine, idempotently:
#   - qemu-utils (qemu-img and qemu-io: the test oracle, never a runtime dependency)
#   - cryptsetup-bin (cryptsetup: a second judge of the LUKS headers the engine makes; tests only)
#   - Python virtual environments with the test tools, on the newest Python >= 3.12 found
#     (pyenv's or the system's), plus a Python 3.9 one for the oldest managed-node Python.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

apt_updated=0
need_pkg() {
    local pkg=$1
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "package $pkg is missing and cannot be installed here (needs root and apt-get)"
        return 1
    fi
    if [ $apt_updated = 0 ]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    log "installing $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
}

for pkg in ${VDISK_APT_PACKAGES:-qemu-utils cryptsetup-bin shellcheck}; do
    need_pkg "$pkg"
done

# Find a Python by minor version: PATH first, then pyenv's installs.
# shellcheck source=scripts/lib.sh
source scripts/lib.sh


make_venv() {
    local dir=$1 py=$2
    shift 2
    if [ ! -x "$dir/bin/python" ]; then
        log "creating $dir with $py"
        "$py" -m venv "$dir"
    fi
    if ! "$dir/bin/python" -c 'import sys; sys.exit(0)' 2>/dev/null; then
        rm -rf "$dir"
        "$py" -m venv "$dir"
    fi
    log "installing into $dir: $*"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

PY_CTRL=$(controller_python) || { log "no Python >= 3.12 found (pyenv versions or PATH)"; exit 1; }
# cryptography: the LUKS key-slot tests (crypto/luks1.py needs it only for encrypted images).
make_venv .venv-test "$PY_CTRL" 'pytest>=8' 'hypothesis>=6.100' 'cryptography>=41'
if PY39=$(find_python 3.9); then
    # cryptography: the encrypted-image tests on the oldest managed-node Python too.
    make_venv .venv-py39 "$PY39" 'pytest>=8' 'hypothesis>=6.100' 'cryptography>=41'
else
    log "no Python 3.9 found: the oldest managed-node Python is not tested on this machine"
fi
log "done"
