#!/usr/bin/env bash
# The main job: run the demo playbook against localhost three times, from a clean start.
#   0. remove demo/images/ left by a previous run, so every run shows the creates
#   1. apply the declaration (creates four images, one per preallocation mode);
#      qemu-img check then confirms each image (when qemu-img is available)
#   2. apply again: the recap shows changed=0
#   3. check mode with a changed declaration: predicts the actions, changes no byte
# Installs what it needs: qemu-utils when qemu-img is missing (as root, with apt-get) and the
# controller venv .venv-demo with ansible-core 2.21 (scripts/setup-demo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if ! command -v qemu-img >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "### installing qemu-utils (qemu-img, used only to check the demo's images)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
    else
        echo "### qemu-img is missing and cannot be installed here (needs root and apt-get):"
        echo "    the images will not be checked with qemu-img"
    fi
fi
bash scripts/setup-demo.sh
# The collection is found as ansible_collections/vdisk/qcow2 under .scratch/collections.
mkdir -p .scratch/collections/ansible_collections/vdisk
ln -sfn "$ROOT" .scratch/collections/ansible_collections/vdisk/qcow2
export ANSIBLE_COLLECTIONS_PATH="$ROOT/.scratch/collections"
export ANSIBLE_LOCALHOST_WARNING=false ANSIBLE_INVENTORY_UNPARSED_WARNING=false

PLAYBOOK=(.venv-demo/bin/ansible-playbook -i "localhost," demo/demo.yml)

if [ -e demo/images ]; then
    echo "### 0. start clean: removing demo/images/ (left by a previous run)"
    rm -rf demo/images
fi

echo "### 1. apply (creates the four images)"
"${PLAYBOOK[@]}"
if command -v qemu-img >/dev/null; then
    echo "### qemu-img check on each image (the reference tool reads what the engine wrote)"
    for image in demo/images/*.qcow2; do
        if qemu-img check -q "$image"; then
            echo "$image: no errors, no leaks"
        else
            echo "$image: qemu-img check found problems (exit $?)"
            exit 1
        fi
    done
fi
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
echo "The images stay in demo/images/ to look at; the next run removes them first."
