#!/usr/bin/env bash
# A controller venv for the demo: ansible-core 2.21 on the newest Python >= 3.12 found.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_venv .venv-demo ansible 'ansible-core>=2.21,<2.22'
