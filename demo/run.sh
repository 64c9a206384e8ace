#!/usr/bin/env bash
# The main job: run the demo playbook against localhost three times.
#   1. apply the declaration (creates four images, one per preallocation mode)
#   2. apply again: the recap shows changed=0
#   3. check mode with a changed declaration: predicts the actions, changes no byte
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
bash scripts/setup-debian.sh >/dev/null
bash scripts/setup-demo.sh
# The collection is found as ansible_collections/vdisk/qcow2 under .scratch/collections.
mkdir -p .scratch/collections/ansible_collections/vdisk
ln -sfn "$ROOT" .scratch/collections/ansible_collections/vdisk/qcow2
export ANSIBLE_COLLECTIONS_PATH="$ROOT/.scratch/collections"
export ANSIBLE_LOCALHOST_WARNING=false ANSIBLE_INVENTORY_UNPARSED_WARNING=false

PLAYBOOK=(.venv-demo/bin/ansible-playbook -i "localhost," demo/demo.yml)

echo "### 1. apply"
"${PLAYBOOK[@]}"
echo "### 2. apply again (expect changed=0)"
"${PLAYBOOK[@]}" | tee .scratch/demo-second.log
grep -q 'changed=0 ' .scratch/demo-second.log || { echo "second run changed something"; exit 1; }
echo "### 3. check mode with a changed declaration (thin grows to 2G, meta raised to falloc)"
before=$(sha256sum demo/images/*.qcow2)
"${PLAYBOOK[@]}" --check --diff -e demo_grow=true
after=$(sha256sum demo/images/*.qcow2)
if [ "$before" = "$after" ]; then
    echo "check mode changed no byte of the images (sha256 identical)"
else
    echo "check mode modified an image!"
    exit 1
fi
