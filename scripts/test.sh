#!/usr/bin/env bash
# Run every test of the project. Usage: bash scripts/test.sh [extra pytest args]
# Installs what it needs first (scripts/setup-debian.sh).
#
# The steps run in two lanes side by side, one per core: the pytest suites (engine,
# reliability, Python 3.9) and the Ansible tools (ansible-test, lints, build, remote hosts,
# the demo). Each step's output goes to .scratch/test-logs/<step>.log and is printed whole when
# the step ends, so the lanes' outputs never interleave within a step. A failed step does not
# stop the others; the command ends with the list of failed steps.
#
# Everything temporary (pytest's and ansible-test's temporary directories: TMPDIR) is under
# one directory in /tmp, removed on exit, also on Ctrl-C (VDISK_KEEP_TEST_FILES=1 keeps it, to
# look at a failed test's files). The remote-host tests remove their test hosts, user and sudo
# rule on exit (VDISK_KEEP_TEST_HOSTS=1 keeps the user): see tests/hosts/run-remote-tests.sh.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
export PYTHONDONTWRITEBYTECODE=1
START=$SECONDS

bash scripts/setup-debian.sh || { echo "setup failed"; exit 1; }

RUN_DIR=$(mktemp -d /tmp/vdisk-test.XXXXXX)
LOG_DIR=$ROOT/.scratch/test-logs
rm -rf "$LOG_DIR" && mkdir -p "$LOG_DIR"
: > "$LOG_DIR/results"
LANES=()
BYTECODE_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/vdisk.qcow2
BYTECODE_CACHE_WAS_THERE=0
[ -e "$BYTECODE_CACHE" ] && BYTECODE_CACHE_WAS_THERE=1
cleanup() {
    local pid dev file
    # Each lane is its own process group (set -m below): stop every process of a lane.
    for pid in "${LANES[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null
    done
    wait 2>/dev/null
    # Loop devices a killed test left attached to its files.
    while read -r dev file; do
        case $file in "$RUN_DIR"/*) losetup -d "$dev" 2>/dev/null ;; esac
    done < <(losetup -n -l -O NAME,BACK-FILE 2>/dev/null)
    if [ "${VDISK_KEEP_TEST_FILES:-0}" = 1 ]; then
        echo "temporary files kept in $RUN_DIR (VDISK_KEEP_TEST_FILES=1)"
    else
        rm -rf "$RUN_DIR"
        # The modules' bytecode cache (module_utils/bytecode_cache.py), when this run made it.
        [ "$BYTECODE_CACHE_WAS_THERE" = 1 ] || rm -rf "$BYTECODE_CACHE"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$RUN_DIR/tmp"
export TMPDIR=$RUN_DIR/tmp
# The modules' caches (bytecode, remembered walks) of the local runs go there too.
export XDG_CACHE_HOME=$RUN_DIR/cache

# No cache in the tree; keep pytest's temporary directories only for failed tests (the
# images of a passing run would otherwise fill /tmp, about 15 GB per run).
PYTEST_OPTS=(-p no:cacheprovider -o tmp_path_retention_policy=failed)

# step NAME COMMAND...: run COMMAND with its output in a log file, then print the log, the
# exit code and the time, holding a lock so that the other lane's output does not interleave.
step() {
    local name=$1 rc start=$SECONDS log
    shift
    log=$LOG_DIR/$(printf '%s' "$name" | tr -c 'a-zA-Z0-9' '-' | cut -c1-50).log
    # The CPU time (user + system) of the step's processes, beside its wall time: on two
    # cores, the sum over the steps bounds how short the whole run can be.
    local TIMEFORMAT='%U %S' cpu
    { time "$@" > "$log" 2>&1 < /dev/null; } 2> "$log.cpu"
    rc=$?
    cpu=$(awk '{ printf "%d", $1 + $2 }' "$log.cpu" 2>/dev/null)
    (
        flock 9
        printf '\n==== %s ====\n' "$name"
        cat "$log"
        if [ $rc = 5 ]; then
            echo "!!!! $name: no tests were collected (pytest exit 5): treated as a failure"
        fi
        printf '==== %s: exit %d in %ds, CPU %ss (log: %s) ====\n' "$name" "$rc" \
            $((SECONDS - start)) "${cpu:-?}" "${log#"$ROOT"/}"
        printf '%d\t%d\t%s\t%s\t%s\n' "$rc" $((SECONDS - start)) "$name" "${STEP_KIND:-required}" \
            "${cpu:-?}" >> "$LOG_DIR/results"
    ) 9> "$LOG_DIR/.lock"
    return $rc
}
note() {
    ( flock 9; printf '%s\n' "$*" ) 9> "$LOG_DIR/.lock"
}

# Python 3.9 runs what differs between Python versions: every engine code path (units,
# inspector, block device, template sources and copies, encrypted images made and copied
# (the sector cipher's big-integer XTS, the key slots), the guest-view regression tests and
# every in-place change on the qemu-made images of the `qemu-off` states), not the guest-view
# grids again, which repeat the same code over 30 image states (docs/development.md).
PY39_GRIDS='not (test_in_place_change_keeps_the_guest_view or test_prediction_matches_apply) or qemu-off'

lane_pytest() {
    step "engine tests (pytest, oracle matrix against qemu-img)" \
        .venv-test/bin/python -m pytest "${PYTEST_OPTS[@]}" --basetemp="$RUN_DIR/engine" \
        tests/engine -q -ra "$@"
    step "reliability: faults, kills, races, hostile files (default subset)" \
        .venv-test/bin/python -m pytest "${PYTEST_OPTS[@]}" --basetemp="$RUN_DIR/reliability" \
        tests/reliability -q -ra -s
    if [ -x .venv-py39/bin/python ]; then
        step "engine on Python 3.9: units, inspector, block device, sources, copies, LUKS, guest view (subset)" \
            .venv-py39/bin/python -m pytest "${PYTEST_OPTS[@]}" --basetemp="$RUN_DIR/py39" -q -ra \
            tests/engine/test_units.py tests/engine/test_inspector.py \
            tests/engine/test_guest_view.py tests/engine/test_block_device.py \
            tests/engine/test_source.py tests/engine/test_convert.py \
            tests/engine/test_luks_create.py tests/engine/test_luks_copy.py -k "$PY39_GRIDS"
    else
        note "Python 3.9 is not available: engine tests on 3.9 skipped (setup-debian.sh said why)"
    fi
}

# ---- the collection, as Ansible tools see it (one lane: ansible-test runs in one tree) ----
TREE=
in_tree() { (cd "$TREE" && "$@"); }
build_and_import() {
    local out="$ROOT/.scratch/build"
    rm -rf "$out" && mkdir -p "$out"
    in_tree ansible-galaxy collection build --output-path "$out" &&
        (cd "$out" && python -m galaxy_importer.main vdisk-qcow2-*.tar.gz)
}

lane_ansible() {
    if [ "$ANSIBLE_READY" != 1 ]; then
        note "setting up the Ansible tools failed: the Ansible steps are not run"
        return
    fi
    # shellcheck source=scripts/ansible-env.sh
    source scripts/ansible-env.sh
    # No "No inventory was parsed" warning for the tools that run against localhost.
    export ANSIBLE_INVENTORY_UNPARSED_WARNING=False
    TREE=$(bash scripts/collection-tree.sh)
    step "ansible-test sanity (all tests, Python 3.9-3.13)" in_tree ansible-test sanity --local
    step "ansible-test units on Python 3.9" in_tree ansible-test units --venv --python 3.9
    step "ansible-test units on Python 3.13" in_tree ansible-test units --venv --python 3.13
    step "ansible-test integration (image, image_info, images_module, role_images)" \
        in_tree ansible-test integration --venv --python 3.13 image image_info images_module role_images
    step "ansible-lint --profile production" in_tree ansible-lint --offline --profile production
    step "antsibull-docs lint-collection-docs" \
        in_tree antsibull-docs lint-collection-docs --plugin-docs --skip-rstcheck .
    step "antsibull-changelog lint" in_tree antsibull-changelog lint
    step "ansible-galaxy collection build + galaxy-importer" build_and_import
    step "remote hosts: molecule images_role + safety_remote, ansible-test --target ssh" \
        bash tests/hosts/run-remote-tests.sh
    # The demo has its own venv and collection link (not this lane's tree); it runs in the
    # lane that ends first (measured: engine 353 + reliability 180 + Python 3.9 95 s against
    # this lane's 618 s).
    step "the README's demo (bash demo/run.sh)" bash demo/run.sh
    # Optional: sanity and units against the newest ansible-core pre-release (news about the
    # next release, reported on its own line; it does not fail the command). Last, since it
    # copies the tree again.
    STEP_KIND=optional step "optional: sanity and units against the coming ansible-core" \
        bash scripts/devel-check.sh
}

# Before the lanes: the reliability suite runs the modules with .venv-ansible's ansible-core.
ANSIBLE_READY=0
if step "setup: scripts/setup-ansible.sh" bash scripts/setup-ansible.sh; then
    ANSIBLE_READY=1
fi

# Job control: each lane runs in its own process group, which the exit trap can stop whole
# (a lane's processes ignore Ctrl-C otherwise, as background jobs of a script do).
set -m
lane_pytest "$@" &
LANES+=($!)
lane_ansible &
LANES+=($!)
wait "${LANES[@]}"
LANES=()
set +m

printf '\n==== step times ====\n'
printf ' wall    CPU  step\n'
awk -F'\t' '{ printf "%4ds  %4ss  %s%s\n", $2, $5, $3, ($1 == 0 ? "" : ($4 == "optional" ? "  (failed, exit " $1 ": optional, reported only)" : "  (FAILED, exit " $1 ")")) }' \
    "$LOG_DIR/results"
printf 'total: %ds (the two lanes run side by side); CPU of all steps: %ss on %s cores\n\n' \
    $((SECONDS - START)) "$(awk -F'\t' '{ s += $5 } END { print s + 0 }' "$LOG_DIR/results")" \
    "$(nproc)"
failed=()
while IFS=$'\t' read -r rc _ name kind _cpu; do
    [ "$rc" = 0 ] || [ "$kind" = optional ] || failed+=("$name")
done < "$LOG_DIR/results"
if [ "$(wc -l < "$LOG_DIR/results")" = 0 ]; then
    failed+=("no step ran")
fi
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED steps: %s\n' "$(printf '%s; ' "${failed[@]}")"
    exit 1
fi
echo "all test steps passed"
