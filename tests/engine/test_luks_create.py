# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""LUKS-encrypted images the engine makes (api.create with a passphrase), judged by QEMU given the
key: qemu-img check clean, the guest reads zeros everywhere (also from preallocated
clusters, which QEMU's own preallocated encrypted images do not), and what qemu-io writes
reads back; without the key our info and check agree with qemu-img's."""

import json
import os

import pytest

import oracle
from qcow2 import api
from qcow2.format.errors import Qcow2Error
from qcow2.read import inspector

SIZE = 24 << 20


@pytest.fixture(autouse=True)
def needs_tools():
    oracle.needs_luks_tools()


def _opts(path, secret="pw"):
    return ["--object", "secret,id=s0,data=%s" % secret, "--image-opts",
            "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % path]


def _qemu_check(path):
    proc = oracle.run(*([oracle.QEMU_IMG, "check", "--output=json"] + _opts(path)))
    return json.loads(proc.stdout)


def _io(path, *commands, secret="pw"):
    args = [oracle.QEMU_IO] + _opts(path, secret)
    for command in commands:
        args += ["-c", command]
    return oracle.run(*args)


KEYS = ("check-errors", "corruptions", "leaks", "image-end-offset", "total-clusters",
        "allocated-clusters")


@pytest.mark.parametrize("cluster_size", ["512", "64K", "2M"])
@pytest.mark.parametrize("mode", ["off", "metadata", "falloc"])
def test_qemu_reads_zeros_and_back_what_it_wrote(tmp_path, mode, cluster_size):
    path = str(tmp_path / "enc.qcow2")
    made = api.create(path, {"size": SIZE, "preallocation": mode,
                             "cluster_size": cluster_size}, passphrase=b"pw",
                      iterations=(1000, 1000))
    assert made["preallocation"] == mode
    fresh = _qemu_check(path)
    assert not fresh.get("corruptions") and not fresh.get("leaks"), fresh
    ours = inspector.check(path)
    assert [ours.get(k, 0) for k in KEYS] == [fresh.get(k, 0) for k in KEYS]
    info = oracle.qemu_info(path)
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    assert inspector.info(path)["format-specific"]["data"]["encrypt"] == \
        info["format-specific"]["data"]["encrypt"]
    proc = _io(path, "read -P 0 0 %d" % SIZE, "write -P 0x5a 1M 192k",
               "read -P 0x5a 1M 192k", "read -P 0 0 1M", "read -P 0 %d 1M" % (SIZE - (1 << 20)))
    assert proc.returncode == 0 and "verification failed" not in proc.stdout, \
        proc.stdout + proc.stderr
    used = _qemu_check(path)
    assert not used.get("corruptions") and not used.get("leaks"), used
    ours = inspector.check(path)
    assert [ours.get(k, 0) for k in KEYS] == [used.get(k, 0) for k in KEYS]
    state = api.observe(path)
    assert state["encrypted"] is True and state["encryption"]["active_slots"] == [0]
    if mode != "off":
        assert state["preallocation"] in ("metadata", "falloc", "full")
    wrong = _io(path, "read 0 512", secret="pv")
    assert wrong.returncode != 0 and "Invalid password" in wrong.stderr


@pytest.mark.parametrize("values,option,word", [
    ({"data_file": "/tmp/x.data", "data_file_raw": True}, "data_file_raw",
     "never a raw image"),
    ({"encrypt_cipher_alg": "twofish-256"}, "encrypt_cipher_alg", "AES only"),
    ({"encrypt_cipher_alg": "aes-192", "encrypt_cipher_mode": "cbc"}, "encrypt_cipher_alg",
     "only with encrypt_cipher_mode xts")])
def test_what_is_not_made_encrypted_is_named(tmp_path, values, option, word):
    path = str(tmp_path / "enc.qcow2")
    with pytest.raises(Qcow2Error) as err:
        api.create(path, dict(values, size=SIZE), passphrase=b"pw", iterations=(1000, 1000))
    assert err.value.option == option and word in str(err.value)
    assert not os.path.exists(path)


@pytest.mark.parametrize("spec", [
    {"encrypt_cipher_alg": "aes-128"},
    {"encrypt_cipher_alg": "aes-192"},
    {"encrypt_cipher_mode": "cbc", "encrypt_ivgen_alg": "essiv"},
    {"encrypt_cipher_alg": "aes-128", "encrypt_cipher_mode": "ctr", "encrypt_hash_alg": "sha1"},
    {"encrypt_cipher_mode": "ecb", "encrypt_hash_alg": "sha512"}])
def test_declared_ciphers_open_in_qemu(tmp_path, spec):
    path = str(tmp_path / "spec.qcow2")
    api.create(path, dict(spec, size=SIZE, preallocation="metadata", encrypt_format="luks"),
               passphrase=b"pw", iterations=(1000, 1000))
    info = oracle.qemu_info(path)["format-specific"]["data"]["encrypt"]
    for key, value in spec.items():
        assert info[key[len("encrypt_"):].replace("_", "-")] == value
    proc = _io(path, "read -P 0 0 %d" % SIZE, "write -P 0x3c 2M 64k", "read -P 0x3c 2M 64k")
    assert proc.returncode == 0 and "verification failed" not in proc.stdout, \
        proc.stdout + proc.stderr
    assert not _qemu_check(path).get("corruptions")
