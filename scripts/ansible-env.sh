# shellcheck shell=bash
# Source me: PATH with .venv-ansible and real interpreters, collection search path.
VDISK_ROOT=${VDISK_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export PATH="$VDISK_ROOT/.venv-ansible/bin:$VDISK_ROOT/.scratch/pythons:$PATH"
export ANSIBLE_COLLECTIONS_PATH="$VDISK_ROOT/.scratch/ac"
export ANSIBLE_LOCALHOST_WARNING=false
export ANSIBLE_NOCOLOR=1
