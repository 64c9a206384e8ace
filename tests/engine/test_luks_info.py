# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What is known of a LUKS-encrypted image without its passphrase (format/luks.py): the
`encrypt` block of our info equals qemu-img info's for images qemu-img made with each kind of
cipher, mode and IV generator, and the modules' `encryption` view says the same."""

import os

import pytest

import oracle
from qcow2 import api
from qcow2.read import inspector

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
