#!/usr/bin/env bash
# A controller venv for the demo: ansible-core on the newest Python >= 3.12 found.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv-demo/bin/ansible-playbook ]; then
    exit 0
fi
py=""
for v in 3.14 3.13 3.12; do
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" "python$v"; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import venv' >/dev/null 2>&1; then
            py=$(command -v "$cand"); break 2
        fi
    done
done
[ -n "$py" ] || { echo "no Python >= 3.12 found for the Ansible controller"; exit 1; }
echo "[setup-demo] creating .venv-demo with $py (ansible-core 2.21)"
"$py" -m venv .venv-demo
.venv-demo/bin/python -m pip install -q --disable-pip-version-check 'ansible-core>=2.21,<2.22'
