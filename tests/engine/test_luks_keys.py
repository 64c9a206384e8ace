# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""LUKS1 key slots (crypto/luks1.py), judged by QEMU: a header we make opens in qemu-io with its
passphrase and only with it, and lays out as qemu-img's do; headers qemu-img made unlock with
ours; damaged or foreign headers give a clear error, never a wrong key."""

import os
import random
import sys

import pytest

import oracle
from qcow2.format import luks
from qcow2.format.errors import Qcow2Error
from qcow2.read.image import Image

try:
    from qcow2.crypto import luks1
except ImportError:     # the module itself imports cryptography only when it encrypts
    luks1 = None


@pytest.fixture(autouse=True)
def needs_tools():
    oracle.needs_luks_tools()


def _seeded(seed):
    rng = random.Random(seed)
    return lambda n: bytes(rng.getrandbits(8) for _byte in range(n))


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_bytes", [32, 64])
def test_af_split_merges_back(hash_name, key_bytes):
    key = os.urandom(key_bytes)
    material = luks1.af_split(key, 50, hash_name)
    assert len(material) == 50 * key_bytes
    assert luks1.af_merge(material, key_bytes, 50, hash_name) == key
    broken = bytes([material[0] ^ 1]) + material[1:]
    assert luks1.af_merge(broken, key_bytes, 50, hash_name) != key


def _volume(tmp_path, region, name="ours.luks"):
    path = str(tmp_path / name)
    with open(path, "wb") as handle:
        handle.write(region)
        handle.truncate(len(region) + (1 << 20))
    return path


def _qemu_io(path, secret, *commands):
    args = [oracle.QEMU_IO, "--object", "secret,id=s0,data=%s" % secret, "--image-opts",
            "driver=luks,key-secret=s0,file.filename=%s" % path]
    for command in commands:
        args += ["-c", command]
    return oracle.run(*args)


@pytest.mark.parametrize("key_bytes,hash_name", [(64, "sha256"), (32, "sha1"), (64, "sha512")])
def test_qemu_opens_our_header_with_its_passphrase_only(tmp_path, key_bytes, hash_name):
    region, master = luks1.build(b"s3cret", key_bytes=key_bytes, hash_name=hash_name,
                                 iterations=(1000, 1000))
    path = _volume(tmp_path, region)
    proc = _qemu_io(path, "s3cret", "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, \
        proc.stdout + proc.stderr
    wrong = _qemu_io(path, "s3cret!", "read 0 512")
    assert wrong.returncode != 0 and "Invalid password" in wrong.stderr
    # Laid out as qemu-img lays out its own: the same payload offset and key offsets.
    ours = luks.describe(luks.parse(region[:luks.PHDR_SIZE]))
    theirs = oracle.qemu_info(path)["format-specific"]["data"]    # a bare volume: no "format"
    assert ours == dict(theirs, format="luks")
    assert luks1.unlock(region, b"s3cret") == master


def test_headers_qemu_img_made_unlock_with_ours(tmp_path):
    volume = str(tmp_path / "q.luks")
    oracle.qemu_luks(volume, fmt="luks")
    with open(volume, "rb") as handle:
        data = handle.read()
    payload = luks.parse(data[:luks.PHDR_SIZE])["payload"] * luks.SECTOR
    assert len(luks1.unlock(data[:payload], b"abc")) == 64
    # The header inside a LUKS-encrypted qcow2 image.
    image_path = str(tmp_path / "q.qcow2")
    oracle.qemu_luks(image_path, "16M")
    image = Image.open(image_path)
    try:
        region = image.read(image.crypto_offset, image.crypto_length)
    finally:
        image.close()
    assert len(luks1.unlock(region, b"abc")) == 64
    with pytest.raises(Qcow2Error) as err:
        luks1.unlock(region, b"abd")
    assert err.value.option == "encrypt_passphrase" and "opens no key slot" in str(err.value)


def _damaged(region, how):
    data = bytearray(region)
    if how == "key material":
        data[4096 + 1000] ^= 0x40
    elif how == "master key digest":
        data[112] ^= 0x01
    elif how == "slot salt":
        data[208 + 8] ^= 0x80
    elif how == "iterations":
        data[208 + 4:208 + 8] = (1001).to_bytes(4, "big")
    elif how == "slot disabled":
        data[208:212] = luks.SLOT_DISABLED.to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("how", ["key material", "master key digest", "slot salt",
                                 "iterations", "slot disabled"])
def test_damaged_header_never_yields_a_key(how):
    region, _master = luks1.build(b"pw", iterations=(1000, 1000), random=_seeded(7))
    with pytest.raises(Qcow2Error) as err:
        luks1.unlock(_damaged(region, how), b"pw")
    assert "opens no key slot" in str(err.value)


def test_other_ciphers_and_sizes_are_named(tmp_path):
    region, _master = luks1.build(b"pw", iterations=(1000, 1000))
    foreign = bytearray(region)
    foreign[8:40] = b"twofish".ljust(32, b"\0")
    with pytest.raises(Qcow2Error) as err:
        luks1.unlock(bytes(foreign), b"pw")
    assert "twofish-xts-plain64" in str(err.value)
    with pytest.raises(Qcow2Error) as err:
        luks1.build(b"pw", key_bytes=48)
    assert err.value.option == "encrypt_cipher_alg"
    with pytest.raises(Qcow2Error) as err:
        luks1.build(b"pw", hash_name="whirlpool")
    assert err.value.option == "encrypt_hash_alg"


def test_missing_cryptography_is_named(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("cryptography")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(Qcow2Error) as err:
        luks1.build(b"pw", iterations=(1000, 1000))
    assert "cryptography" in str(err.value) and "python3-cryptography" in str(err.value)
