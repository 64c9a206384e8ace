#!/usr/bin/env bash
# Run every test of the project. Usage: bash scripts/test.sh [extra pytest args]
# Installs what it needs first (scripts/setup-debian.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONDONTWRITEBYTECODE=1

bash scripts/setup-debian.sh || { echo "setup failed"; exit 1; }

failed=()
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
    .venv-test/bin/python -m pytest -p no:cacheprovider tests/engine -q -ra "$@"

if [ -x .venv-py39/bin/python ]; then
    step "engine unit and inspector tests on Python 3.9" \
        .venv-py39/bin/python -m pytest -p no:cacheprovider -q -ra \
        tests/engine/test_units.py tests/engine/test_inspector.py
else
    echo "Python 3.9 is not available: engine tests on 3.9 skipped (setup-debian.sh said why)"
fi

printf '\n'
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}"
    exit 1
fi
echo "all test steps passed"
