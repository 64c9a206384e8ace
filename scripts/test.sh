#!/usr/bin/env bash
# Run every test of the project. Usage: bash scripts/test.sh [extra pytest args]
# Installs what it needs first (scripts/setup-debian.sh).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
export PYTHONDONTWRITEBYTECODE=1

bash scripts/setup-debian.sh || { echo "setup failed"; exit 1; }

failed=()
# No cache in the tree; keep pytest's temporary directories only for failed tests (the
# images of a passing run would otherwise stay in /tmp, about 15 GB per run).
PYTEST_OPTS=(-p no:cacheprovider -o tmp_path_retention_policy=failed)
step() {
    local name=$1
    shift
    printf '\n==== %s ====\n' "$name"
    local start=$SECONDS rc
    "$@"
    rc=$?
    if [ $rc = 5 ]; then
        echo "!!!! $name: no tests were collected (pytest exit 5): treated as a failure"
    fi
    printf '==== %s: exit %d in %ds ====\n' "$name" "$rc" $((SECONDS - start))
    [ $rc = 0 ] || failed+=("$name")
}

step "engine tests (pytest, oracle matrix against qemu-img)" \
    .venv-test/bin/python -m pytest "${PYTEST_OPTS[@]}" tests/engine -q -ra "$@"

step "reliability: faults, kills, races, hostile files (default subset)" \
    .venv-test/bin/python -m pytest "${PYTEST_OPTS[@]}" tests/reliability -q -ra -s

if [ -x .venv-py39/bin/python ]; then
    step "engine unit, inspector, guest-view, block-device, source and copy tests on Python 3.9" \
        .venv-py39/bin/python -m pytest "${PYTEST_OPTS[@]}" -q -ra \
        tests/engine/test_units.py tests/engine/test_inspector.py \
        tests/engine/test_guest_view.py tests/engine/test_block_device.py \
        tests/engine/test_source.py tests/engine/test_convert.py
else
    echo "Python 3.9 is not available: engine tests on 3.9 skipped (setup-debian.sh said why)"
fi

# ---- the collection, as Ansible tools see it ----
if bash scripts/setup-ansible.sh; then
    # shellcheck source=scripts/ansible-env.sh
    source scripts/ansible-env.sh
    TREE=$(bash scripts/collection-tree.sh)
    in_tree() { (cd "$TREE" && "$@"); }
    step "ansible-test sanity (all tests, Python 3.9-3.13)" in_tree ansible-test sanity --local
    step "ansible-test units on Python 3.9" in_tree ansible-test units --venv --python 3.9
    step "ansible-test units on Python 3.13" in_tree ansible-test units --venv --python 3.13
    step "ansible-test integration (image, image_info, role_images)" \
        in_tree ansible-test integration --venv --python 3.13 image image_info role_images
    step "ansible-lint --profile production" in_tree ansible-lint --offline --profile production
    step "antsibull-docs lint-collection-docs" \
        in_tree antsibull-docs lint-collection-docs --plugin-docs --skip-rstcheck .
    step "antsibull-changelog lint" in_tree antsibull-changelog lint
    build_and_import() {
        local out="$ROOT/.scratch/build"
        rm -rf "$out" && mkdir -p "$out"
        in_tree ansible-galaxy collection build --output-path "$out" &&
            (cd "$out" && python -m galaxy_importer.main vdisk-qcow2-*.tar.gz)
    }
    step "ansible-galaxy collection build + galaxy-importer" build_and_import
    step "the README's demo (bash demo/run.sh)" bash demo/run.sh
    step "remote hosts: molecule images_role + safety_remote, ansible-test --target ssh" \
        bash tests/hosts/run-remote-tests.sh
else
    echo "setting up the Ansible tools failed"
    failed+=("setup-ansible")
fi

printf '\n'
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}"
    exit 1
fi
echo "all test steps passed"
