#!/usr/bin/env bash
# What the remote-host tests need on a Debian machine: sshd, sudo, iproute2 (namespaces) and a
# controller venv with ansible-core 2.21 and molecule 26.
set -euo pipefail
cd "$(dirname "$0")/../.."
VDISK_APT_PACKAGES="qemu-utils openssh-server sudo iproute2 openssh-client" bash scripts/setup-debian.sh >/dev/null
# Debian starts sshd on install: the harness runs its own per namespace, not the machine's.
if [ -x .venv-molecule/bin/molecule ] && .venv-molecule/bin/ansible-playbook --version >/dev/null 2>&1; then
    exit 0
fi
py=""
for v in 3.13 3.12 3.14; do
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" "python$v"; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import venv' >/dev/null 2>&1; then
            py=$(command -v "$cand"); break 2
        fi
    done
done
[ -n "$py" ] || { echo "no Python >= 3.12 found"; exit 1; }
echo "[hosts-setup] creating .venv-molecule with $py"
"$py" -m venv .venv-molecule
.venv-molecule/bin/python -m pip install -q --disable-pip-version-check \
    'ansible-core>=2.21,<2.22' 'molecule>=26,<27'
