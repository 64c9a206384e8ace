#!/usr/bin/env bash
# Copy the working tree (tracked and untracked-but-not-ignored files) to
# .scratch/ac/ansible_collections/vdisk/qcow2, where ansible-test insists on running,
# and print that path. A symlinked tree is refused by ansible-test, hence a real copy.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEST="$ROOT/.scratch/ac/ansible_collections/vdisk/qcow2"
rm -rf "$DEST"
mkdir -p "$DEST"
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
    [ -e "$f" ] || continue
    mkdir -p "$DEST/$(dirname "$f")"
    cp -p "$f" "$DEST/$f"
done
# Its own git repository: ansible-test lists files through git, and the enclosing checkout
# ignores .scratch/.
git -C "$DEST" init -q
echo "$DEST"
