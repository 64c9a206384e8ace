#!/usr/bin/env bash
# What the remote-host tests need on a Debian machine: sshd, sudo, iproute2 (namespaces) and a
# controller venv with ansible-core 2.21 and molecule 26.
set -euo pipefail
cd "$(dirname "$0")/../.."
VDISK_APT_PACKAGES="qemu-utils openssh-server sudo iproute2 openssh-client" \
    bash scripts/setup-debian.sh >/dev/null
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_venv .venv-molecule molecule 'ansible-core>=2.21,<2.22' 'molecule>=26,<27'
.venv-molecule/bin/ansible-playbook --version >/dev/null
