#!/usr/bin/env bash
# The Ansible test tool chain, installed idempotently and offline-from-the-internet (package
# registries only):
#   - .venv-ansible: ansible-core 2.21, ansible-lint, antsibull-docs, antsibull-changelog,
#     galaxy-importer, pytest (controller Python >= 3.12)
#   - the stand-in for ansible-test's pip bootstrap download (its host is not reachable here)
#   - .scratch/pythons: real pythonX.Y links for every Python 3.9..3.14 found, for ansible-test
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[setup-ansible] %s\n' "$*"; }

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# 1. Real interpreters on PATH for ansible-test (pyenv shims would fail for inactive versions).
mkdir -p .scratch/pythons
for v in 3.9 3.10 3.11 3.12 3.13 3.14; do
    if py=$(find_python "$v"); then
        ln -sfn "$py" ".scratch/pythons/python$v"
    fi
done
log "pythons for ansible-test: $(cd .scratch/pythons && echo python*)"

# 2. The controller venv.
PY=""
for v in 3.13 3.12 3.14; do
    if PY=$(find_python "$v"); then break; fi
done
[ -n "$PY" ] || { log "no Python >= 3.12 found"; exit 1; }
if ! .venv-ansible/bin/ansible-test --version >/dev/null 2>&1 || \
        ! .venv-ansible/bin/python -c 'import galaxy_importer, antsibull_docs' >/dev/null 2>&1; then
    log "creating .venv-ansible with $PY"
    rm -rf .venv-ansible
    "$PY" -m venv .venv-ansible
    .venv-ansible/bin/python -m pip install -q --disable-pip-version-check \
        'ansible-core>=2.21,<2.22' 'ansible-lint>=26,<27' 'antsibull-docs>=2.28,<3' \
        'antsibull-changelog>=0.36' 'galaxy-importer>=0.4.44' 'pytest>=8'
fi
log "$(.venv-ansible/bin/ansible-test --version)"

# 3. ansible-test's pip bootstrap: it downloads get-pip from a host we cannot reach. The
#    stand-in installs the same pinned pip from a wheel fetched through the package index.
PIP_VERSION=$(.venv-ansible/bin/python - <<'PYEOF'
import pathlib, re, ansible_test
text = (pathlib.Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py").read_text()
m = re.search(r"pip='([0-9.]+)'", text)
print(m.group(1) if m else "")
PYEOF
)
[ -n "$PIP_VERSION" ] || { log "cannot find the pip version ansible-test pins"; exit 1; }
CACHE="$HOME/.ansible/test/cache"
STANDIN="$CACHE/get_pip_${PIP_VERSION//./_}.py"
WHEELS="$CACHE/pip-wheels"
mkdir -p "$CACHE" "$WHEELS"
WHEEL=$(find "$WHEELS" -name "pip-$PIP_VERSION-*.whl" | head -1)
if [ -z "$WHEEL" ]; then
    log "fetching pip $PIP_VERSION wheel"
    .venv-ansible/bin/python -m pip download -q --disable-pip-version-check --no-deps \
        "pip==$PIP_VERSION" -d "$WHEELS"
fi
WHEEL=$(find "$WHEELS" -name "pip-$PIP_VERSION-*.whl" | head -1)
cat > "$STANDIN" <<PYEOF
# Stand-in for ansible-test's get-pip bootstrap (written by scripts/setup-ansible.sh):
# install pip $PIP_VERSION from a local wheel instead of downloading a bootstrap script.
import sys
sys.path.insert(0, "$WHEEL")
from pip._internal.cli.main import main
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(main(["install", "--upgrade", "--force-reinstall"] + args))
PYEOF
log "pip bootstrap stand-in: $STANDIN"
