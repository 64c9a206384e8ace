#!/usr/bin/env bash
# The benchmark (not part of the default test run): tools/qcow2 against qemu-img, side by side.
#   bash tests/perf/run.sh [--rounds N] [--only convert|fleet] [-- FLEET-OPTIONS]
# Needs ~80 GB free on the disk holding .scratch/bench and several minutes (the provisioning
# rows, `--only convert`, about 20 more at 7 rounds). Writes tests/perf/results/bench-*.json
# and redraws docs/performance.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup-debian.sh >/dev/null
bash scripts/setup-demo.sh
if [ ! -x .venv-perf/bin/python ] || ! .venv-perf/bin/python -c 'import matplotlib' 2>/dev/null; then
    .venv-test/bin/python -m venv .venv-perf
    .venv-perf/bin/python -m pip install -q --disable-pip-version-check 'matplotlib>=3.8'
fi
# `--only fleet` (or `local`, `hosts`) runs the Ansible-level rows of tests/perf/fleet.py
# (ansible-playbook runs against ansible.builtin.stat and qemu-img, on localhost and on 16
# namespace hosts; root for the hosts, about 10 minutes); other names go to bench.py.
# fleet.py's own options (--hosts N, --keep-hosts, --qemu-img-tasks) pass through after `--`.
args=() fleet=() bench=() extra=() rest=0
while [ $# -gt 0 ]; do
    case "$1" in
        --) rest=1 ;;
        --only|--only=*)
            if [ "$1" = --only ]; then names=$2; shift; else names=${1#--only=}; fi
            IFS=, read -ra parts <<<"$names"
            for n in "${parts[@]}"; do
                case "$n" in fleet|local|hosts) fleet+=("$n") ;; *) bench+=("$n") ;; esac
            done ;;
        *) if [ $rest = 1 ]; then extra+=("$1"); else args+=("$1"); fi ;;
    esac
    shift
done
if [ ${#fleet[@]} -eq 0 ] || [ ${#bench[@]} -gt 0 ]; then
    only=()
    [ ${#bench[@]} -gt 0 ] && only=(--only "$(IFS=,; echo "${bench[*]}")")
    .venv-test/bin/python tests/perf/bench.py "${args[@]}" "${only[@]}"
fi
if [ ${#fleet[@]} -gt 0 ]; then
    .venv-test/bin/python tests/perf/fleet.py "${args[@]}" --only "$(IFS=,; echo "${fleet[*]}")" \
        "${extra[@]}"
fi
# Every case from the latest run that has it (a `--only` run replaces just its own cases).
mapfile -t runs < <(find tests/perf/results -name 'bench-*.json' | sort)
.venv-perf/bin/python tests/perf/chart.py "${runs[@]}" docs/performance.png
echo "chart: docs/performance.png (each case from the latest of ${#runs[@]} runs holding it)"
