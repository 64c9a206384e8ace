#!/usr/bin/env bash
# Sanity and unit tests of the collection against the newest ansible-core pre-release on the
# package index (our stand-in for ansible-core's development branch, which is not reachable
# here), to see deprecations and new sanity rules before they reach a release.
#
# Usage: bash scripts/devel-check.sh
# Installs ansible-core into .venv-ansible-devel (once per version), copies the tree with
# scripts/collection-tree.sh, runs `ansible-test sanity --local` and `ansible-test units`
# (Python 3.13) and prints one result line per step and an overall line. Exit status 0 only
# when both pass. Meant as an optional, separately reported step: a failure here is news
# about a coming ansible-core, not a regression of the collection by itself.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
VENV="$ROOT/.venv-ansible-devel"
log() { printf '[devel-check] %s\n' "$*"; }

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

PY=$(controller_python) || { log "no Python >= 3.12 found"; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || { log "cannot create $VENV"; exit 1; }

# The newest ansible-core on the index, pre-releases included.
WANT=$("$VENV/bin/python" -m pip index versions ansible-core --pre 2>/dev/null |
       sed -n 's/^ansible-core (\(.*\))$/\1/p')
[ -n "$WANT" ] || { log "cannot list ansible-core versions on the package index"; exit 1; }
HAVE=$("$VENV/bin/python" -c 'import ansible; print(ansible.__version__)' 2>/dev/null || true)
if [ "$HAVE" != "$WANT" ]; then
    log "installing ansible-core $WANT into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --pre \
        "ansible-core==$WANT" pytest || { log "installing ansible-core $WANT failed"; exit 1; }
fi
log "$("$VENV/bin/ansible-test" --version)"

# ansible-test's pip bootstrap downloads get-pip from a host we cannot reach: install the pip
# it pins from a wheel fetched through the package index instead (as setup-ansible.sh does).
PIP_VERSION=$("$VENV/bin/python" - <<'PYEOF'
import pathlib, re, ansible_test
text = (pathlib.Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py").read_text()
m = re.search(r"pip='([0-9.]+)'", text)
print(m.group(1) if m else "")
PYEOF
)
if [ -n "$PIP_VERSION" ]; then
    CACHE="$HOME/.ansible/test/cache"
    WHEELS="$CACHE/pip-wheels"
    mkdir -p "$WHEELS"
    WHEEL=$(find "$WHEELS" -name "pip-$PIP_VERSION-*.whl" | head -1)
    if [ -z "$WHEEL" ]; then
        "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
            "pip==$PIP_VERSION" -d "$WHEELS"
        WHEEL=$(find "$WHEELS" -name "pip-$PIP_VERSION-*.whl" | head -1)
    fi
    cat > "$CACHE/get_pip_${PIP_VERSION//./_}.py" <<PYEOF
# Stand-in for ansible-test's get-pip bootstrap (written by scripts/devel-check.sh):
# install pip $PIP_VERSION from a local wheel instead of downloading a bootstrap script.
import sys
sys.path.insert(0, "$WHEEL")
from pip._internal.cli.main import main
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(main(["install", "--upgrade", "--force-reinstall"] + args))
PYEOF
fi

export PATH="$VENV/bin:$ROOT/.scratch/pythons:$PATH"
export ANSIBLE_COLLECTIONS_PATH="$ROOT/.scratch/ac"
export ANSIBLE_LOCALHOST_WARNING=false ANSIBLE_NOCOLOR=1
TREE=$(bash scripts/collection-tree.sh) || { log "cannot copy the tree"; exit 1; }

results=()
status=0
run() {
    local name=$1 start=$SECONDS rc
    shift
    log "---- $name ----"
    (cd "$TREE" && "$@")
    rc=$?
    results+=("$(printf '%-40s %s (%ds)' "$name" "$([ $rc = 0 ] && echo PASS || echo "FAIL (exit $rc)")" $((SECONDS - start)))")
    [ $rc = 0 ] || status=1
}
# The pylint test is run on its own: its requirements may pin a package by a GitHub URL,
# which cannot be fetched here (2.22.0rc1 pins dill so); its failure is then reported apart.
run "sanity except pylint ($WANT)" ansible-test sanity --local --python 3.13 --skip-test pylint
run "sanity pylint ($WANT)" ansible-test sanity --local --python 3.13 --test pylint
run "units ($WANT)" ansible-test units --venv --python 3.13

log "==== against ansible-core $WANT (newest pre-release on the index) ===="
for line in "${results[@]}"; do log "$line"; done
log "overall: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
