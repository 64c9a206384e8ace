#!/usr/bin/env bash
# The remote-host tests: molecule scenarios images_role and safety_remote against namespace
# hosts over SSH (scale too when VDISK_SCALE=1), then ansible-test's ssh target. The hosts are
# always brought down at the end, and the script checks that nothing of the harness is left.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
NSHOSTS=tests/hosts/nshosts.sh
failed=()

cleanup() {
    bash "$NSHOSTS" down >/dev/null 2>&1
    pkill -f "qemu-io -c sleep" 2>/dev/null || true
}
trap cleanup EXIT

bash tests/hosts/setup.sh || { echo "remote test setup failed"; exit 1; }
mkdir -p .scratch/collections/ansible_collections/vdisk
ln -sfn "$ROOT" .scratch/collections/ansible_collections/vdisk/qcow2
export PATH="$ROOT/.venv-molecule/bin:$PATH"
export ANSIBLE_NOCOLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1

scenario() {
    local name=$1 start=$SECONDS
    echo "---- molecule test -s $name"
    if molecule test -s "$name"; then
        echo "---- $name passed in $((SECONDS - start))s"
    else
        echo "---- $name FAILED after $((SECONDS - start))s"
        failed+=("molecule:$name")
    fi
}

scenario images_role
scenario safety_remote
if [ "${VDISK_SCALE:-0}" = 1 ]; then
    scenario scale
fi

# ansible-test's own ssh target: one host, ansible-test's key accepted by the hosts.
if [ -x .venv-ansible/bin/ansible-test ]; then
    [ -f "$HOME/.ansible/test/id_rsa" ] || { mkdir -p "$HOME/.ansible/test"; ssh-keygen -q -t rsa -N '' -f "$HOME/.ansible/test/id_rsa"; }
    start=$SECONDS
    if VDQ_EXTRA_PUBKEY="$HOME/.ansible/test/id_rsa.pub" bash "$NSHOSTS" up 1 &&
            bash tests/hosts/ansible-test-ssh.sh "$(bash scripts/collection-tree.sh)"; then
        echo "---- ansible-test integration --target ssh passed in $((SECONDS - start))s"
    else
        failed+=("ansible-test ssh target")
    fi
    bash "$NSHOSTS" down
else
    echo "ansible-test is not installed (scripts/setup-ansible.sh): ssh target not run"
    failed+=("ansible-test ssh target (not installed)")
fi

cleanup
left_ns=$(ip netns list 2>/dev/null | grep -c '^vdq-' || true)
left_sshd=$(pgrep -fc 'sshd -D -f .*tests/hosts/.state' || true)
echo "after down: $left_ns namespace(s), $left_sshd harness sshd process(es)"
if [ "$left_ns" != 0 ] || [ "$left_sshd" != 0 ]; then
    failed+=("harness left something behind")
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "remote tests FAILED: ${failed[*]}"
    exit 1
fi
echo "remote tests passed"
