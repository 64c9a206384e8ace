#!/usr/bin/env bash
# Run the `image` integration target with ansible-test against namespace host h1 over SSH
# (ansible-test takes one ssh target per run). Expects the hosts to be up with ansible-test's
# key accepted (run-remote-tests.sh does both) and the collection copy from
# scripts/collection-tree.sh.
#   tests/hosts/ansible-test-ssh.sh COLLECTION_COPY_DIR
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TREE=$1
NET=${VDQ_NET:-10.231.0}
PY=$(awk '/^    h1:/{f=1} f && /ansible_python_interpreter/{print $2; exit}' "$HERE/.state/inventory.yml")
VER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# shellcheck source=/dev/null
source "$ROOT/scripts/ansible-env.sh"
cd "$TREE"
echo "ansible-test integration image on root@$NET.11 (Python $VER at $PY)"
ansible-test integration --controller origin:python=venv/3.13 \
    --target "ssh:root@$NET.11,python=$VER@$PY" image
