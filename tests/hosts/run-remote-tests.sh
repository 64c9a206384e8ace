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
    pkill -f "qemu-io -c sleep 120000" 2>/dev/null || true  # only the holder safety_remote starts
}
# On exit the hosts are down and, unless VDISK_KEEP_TEST_HOSTS=1, the test user with its sudo
# rule, the /run/netns mount and the empty /var/lib/images are removed (nshosts.sh clean).
on_exit() {
    cleanup
    if [ "${VDISK_KEEP_TEST_HOSTS:-0}" != 1 ]; then
        bash "$NSHOSTS" clean
    else
        echo "VDISK_KEEP_TEST_HOSTS=1: the test user and its sudo rule are kept"
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bash tests/hosts/setup.sh || { echo "remote test setup failed"; exit 1; }
mkdir -p .scratch/collections/ansible_collections/vdisk
ln -sfn "$ROOT" .scratch/collections/ansible_collections/vdisk/qcow2
export PATH="$ROOT/.venv-molecule/bin:$PATH"
export ANSIBLE_NOCOLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1
# Before `create` brings the hosts up, the scenarios' inventory does not exist: an inventory
# with the empty group keeps ansible-playbook from warning that it cannot parse it, that the
# group does not exist and that only localhost is left (the destroy and create playbooks run
# on localhost).
export ANSIBLE_LOCALHOST_WARNING=False
if [ ! -f tests/hosts/.state/inventory.yml ]; then
    mkdir -p tests/hosts/.state
    printf -- '---\nnshosts:\n  hosts: {}\n' > tests/hosts/.state/inventory.yml
fi

scenario() {
    local name=$1 start=$SECONDS
    echo "---- molecule test -s $name"
    # molecule looks for a `default` scenario (shared state) and logs "CRITICAL
    # 'extensions/molecule/default/molecule.yml' glob failed.  Exiting." when there is none;
    # it goes on without shared state, as these scenarios mean: that one line is dropped.
    if molecule test -s "$name" 2>&1 | { grep -v "molecule/default/molecule.yml' glob failed" || true; }; then
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
# Only this set's (another VDQ_PREFIX/VDQ_STATE, a benchmark's hosts, may be running).
left_ns=$(ip netns list 2>/dev/null | grep -c "^${VDQ_PREFIX:-vdq}-h" || true)
left_sshd=$(pgrep -fc "sshd -D -f ${VDQ_STATE:-$ROOT/tests/hosts/.state}/" || true)
echo "after down: $left_ns namespace(s), $left_sshd harness sshd process(es)"
if [ "$left_ns" != 0 ] || [ "$left_sshd" != 0 ]; then
    failed+=("harness left something behind")
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "remote tests FAILED: ${failed[*]}"
    exit 1
fi
echo "remote tests passed"
