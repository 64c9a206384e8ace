#!/usr/bin/env bash
# The benchmark (not part of the default test run): tools/qcow2 against qemu-img, side by side.
#   bash tests/perf/run.sh [--rounds N]
# Needs ~80 GB free on the disk holding .scratch/bench and several minutes. Writes
# tests/perf/results/bench-*.json and redraws docs/performance.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup-debian.sh >/dev/null
bash scripts/setup-demo.sh
if [ ! -x .venv-perf/bin/python ] || ! .venv-perf/bin/python -c 'import matplotlib' 2>/dev/null; then
    .venv-test/bin/python -m venv .venv-perf
    .venv-perf/bin/python -m pip install -q --disable-pip-version-check 'matplotlib>=3.8'
fi
.venv-test/bin/python tests/perf/bench.py "$@"
latest=$(find tests/perf/results -name 'bench-*.json' | sort | tail -1)
.venv-perf/bin/python tests/perf/chart.py "$latest" docs/performance.png
echo "chart: docs/performance.png (from $latest)"
