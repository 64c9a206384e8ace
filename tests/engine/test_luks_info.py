# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What is known of a LUKS-encrypted image without its passphrase (format/luks.py): the
`encrypt` block of our info equals qemu-img info's for images qemu-img made with each kind of
cipher, mode and IV generator, and the modules' `encryption` view says the same."""

import json
import os
import struct

import pytest

import oracle
from qcow2 import api
from qcow2.read import inspector
from qcow2.read.image import Image

pytestmark = pytest.mark.skipif(oracle.QEMU_IMG is None and not os.environ.get("CI"),
                                reason="qemu-img not installed (CI installs it)")

VARIANTS = {
    "default": "",
    "aes-128-cbc-essiv-sha1": "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
                              "encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,"
                              "encrypt.hash-alg=sha1",
    "twofish-256-xts": "encrypt.cipher-alg=twofish-256",
    "serpent-128-cbc-plain": "encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=cbc,"
                             "encrypt.ivgen-alg=plain",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encrypt_block_matches_qemu_img(tmp_path, variant):
    path = str(tmp_path / "enc.qcow2")
    oracle.qemu_luks(path, "16M", options=VARIANTS[variant])
    theirs = oracle.qemu_info(path)["format-specific"]["data"]["encrypt"]
    ours = inspector.info(path)["format-specific"]["data"]["encrypt"]
    assert ours == theirs
    view = api.public_view(api.observe(path))
    enc = view["encryption"]
    assert view["encrypted"] is True and enc["format"] == "luks"
    assert enc["cipher_alg"] == theirs["cipher-alg"] and enc["cipher_mode"] == theirs["cipher-mode"]
    assert enc["ivgen_alg"] == theirs["ivgen-alg"] and enc["hash_alg"] == theirs["hash-alg"]
    assert enc["ivgen_hash_alg"] == theirs.get("ivgen-hash-alg")
    assert enc["payload_offset"] == theirs["payload-offset"] and enc["active_slots"] == [0]
    assert [s["key_offset"] for s in enc["slots"]] == [s["key-offset"] for s in theirs["slots"]]


def test_a_second_key_slot_is_listed(tmp_path):
    path = str(tmp_path / "two-keys.qcow2")
    oracle.qemu_luks(path, "16M")
    proc = oracle.run(oracle.QEMU_IMG, "amend", "--object", "secret,id=s0,data=abc",
                      "--object", "secret,id=s1,data=second", "--image-opts",
                      "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % path,
                      "-o", "encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=3,"
                      "encrypt.iter-time=10")
    assert proc.returncode == 0, proc.stderr
    theirs = oracle.qemu_info(path)["format-specific"]["data"]["encrypt"]
    assert inspector.info(path)["format-specific"]["data"]["encrypt"] == theirs
    assert api.public_view(api.observe(path))["encryption"]["active_slots"] == [0, 3]


def test_plain_image_has_no_encryption(tmp_path):
    path = str(tmp_path / "plain.qcow2")
    api.create(path, {"size": "16M"})
    assert "encrypt" not in inspector.info(path)["format-specific"]["data"]
    view = api.public_view(api.observe(path))
    assert view["encrypted"] is False and view["encryption"] is None


def _qemu_check(path):
    """qemu-img check of a LUKS image (which it opens only with the key)."""
    proc = oracle.run(oracle.QEMU_IMG, "check", "--output=json", "--object",
                      "secret,id=s0,data=abc", "--image-opts",
                      "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % path)
    return json.loads(proc.stdout)


KEYS = ("check-errors", "corruptions", "leaks", "image-end-offset", "total-clusters",
        "allocated-clusters")


def test_check_counts_the_luks_header_clusters_as_qemu_img_does(tmp_path):
    """Our check needs no passphrase; it agrees with qemu-img check (given the key) on a used
    encrypted image, and on one whose LUKS header cluster lost its reference count."""
    path = str(tmp_path / "used.qcow2")
    oracle.qemu_luks(path, "16M")
    proc = oracle.run(oracle.QEMU_IO, "--object", "secret,id=s0,data=abc", "--image-opts",
                      "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % path,
                      "-c", "write -P 0x41 0 1M")
    assert proc.returncode == 0, proc.stderr
    ours, theirs = inspector.check(path), _qemu_check(path)
    assert [ours.get(k, 0) for k in KEYS] == [theirs.get(k, 0) for k in KEYS]
    assert not ours.get("corruptions") and not ours.get("leaks")
    # The first cluster of the LUKS header, its 16-bit refcount set to 0.
    image = Image.open(path)
    try:
        cs, header_cluster = image.cluster_size, image.crypto_offset // image.cluster_size
        refblock = image.reftable_entry(0)
    finally:
        image.close()
    with open(path, "r+b") as handle:
        handle.seek(refblock + 2 * header_cluster)
        handle.write(struct.pack(">H", 0))
    ours, theirs = inspector.check(path), _qemu_check(path)
    assert theirs["corruptions"] >= 1 and cs == 65536
    assert [ours.get(k, 0) for k in KEYS] == [theirs.get(k, 0) for k in KEYS]
