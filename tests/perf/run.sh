#!/usr/bin/env bash
# The benchmark (not part of the default test run): tools/qcow2 against qemu-img, side by side.
#   bash tests/perf/run.sh [--rounds N] [--only convert]
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
.venv-test/bin/python tests/perf/bench.py "$@"
# Every case from the latest run that has it (a `--only` run replaces just its own cases).
mapfile -t runs < <(find tests/perf/results -name 'bench-*.json' | sort)
.venv-perf/bin/python tests/perf/chart.py "${runs[@]}" docs/performance.png
echo "chart: docs/performance.png (each case from the latest of ${#runs[@]} runs holding it)"
