# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""LUKS1 key slots: make a LUKS header region for a new master key and passphrase, and unlock
one (recover and verify its master key), as the LUKS1 on-disk format defines them and QEMU
lays them out (eight slots of 4 KiB-aligned key material, the payload after them).

The key derivation is PBKDF2 (the standard library's hashlib); the key material is encrypted
with the header's cipher, which needs the `cryptography` package (python3-cryptography on
Debian, RHEL and SUSE) only when an encrypted image is made or unlocked. Supported here:
AES (128 or 256-bit keys) in XTS mode with the plain64 IV generator, QEMU's default.
"""

import hashlib
import hmac
import os
import struct
import uuid

from ..format import luks
from ..format.errors import Qcow2Error

DIGEST_SIZE = 20                # LUKS1's master key digest
SALT_SIZE = 32
ALIGN_SECTORS = 4096 // luks.SECTOR
MIN_ITERATIONS = 1000
XTS_KEY_BYTES = (32, 64)        # AES-128 and AES-256 in XTS: two keys each


def _aes_xts(key, sector, data, encrypt):
    """`data` (whole 512-byte sectors) through AES-XTS, the IV of each sector its number from
    `sector` on (plain64: little-endian in the 16-byte tweak)."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise Qcow2Error("encrypted images need the Python package 'cryptography' on the managed "
                         "host (python3-cryptography on Debian, RHEL and SUSE)",
                         option="encrypt_format")
    out = []
    for k in range(0, len(data), luks.SECTOR):
        tweak = struct.pack("<QQ", sector + k // luks.SECTOR, 0)
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        worker = cipher.encryptor() if encrypt else cipher.decryptor()
        out.append(worker.update(data[k:k + luks.SECTOR]) + worker.finalize())
    return b"".join(out)


def _diffuse(data, hash_name):
    """LUKS1's AF diffusion: each digest-sized block hashed with its big-endian index."""
    size = hashlib.new(hash_name).digest_size
    out = []
    for index in range(0, -(-len(data) // size)):
        block = data[index * size:(index + 1) * size]
        out.append(hashlib.new(hash_name, struct.pack(">I", index) + block).digest()[:len(block)])
    return b"".join(out)


def _xor(a, b):
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def af_split(key, stripes, hash_name, random=os.urandom):
    """The anti-forensic split of `key` into `stripes` blocks."""
    acc = bytes(len(key))
    blocks = []
    for _stripe in range(stripes - 1):
        block = random(len(key))
        blocks.append(block)
        acc = _diffuse(_xor(acc, block), hash_name)
    blocks.append(_xor(acc, key))
    return b"".join(blocks)


def af_merge(material, key_bytes, stripes, hash_name):
    """The key that af_split split into `material`."""
    acc = bytes(key_bytes)
    for stripe in range(stripes - 1):
        acc = _diffuse(_xor(acc, material[stripe * key_bytes:(stripe + 1) * key_bytes]),
                       hash_name)
    return _xor(acc, material[(stripes - 1) * key_bytes:stripes * key_bytes])


def slot_sectors(key_bytes):
    """Sectors of one slot's key material, aligned to 4 KiB as QEMU aligns them."""
    sectors = -(-key_bytes * luks.STRIPES // luks.SECTOR)
    return -(-sectors // ALIGN_SECTORS) * ALIGN_SECTORS


def build(passphrase, key_bytes=64, hash_name="sha256", iterations=None, master_key=None,
          random=os.urandom):
    """(header region bytes, master key): a LUKS1 header for aes-xts-plain64 with key slot 0
    holding `master_key` (random when None) under `passphrase` (bytes); the region's length is
    the payload offset. `iterations` (slot, master key digest): PBKDF2 rounds, at least
    MIN_ITERATIONS."""
    if key_bytes not in XTS_KEY_BYTES:
        raise Qcow2Error("encrypt_cipher_alg: AES-XTS takes keys of %s bytes, not %d"
                         % (", ".join(map(str, XTS_KEY_BYTES)), key_bytes),
                         option="encrypt_cipher_alg")
    if hash_name.encode() not in luks.HASHES or hash_name not in hashlib.algorithms_available:
        raise Qcow2Error("encrypt_hash_alg: %s is not a hash LUKS and this host both know"
                         % hash_name, option="encrypt_hash_alg")
    slot_iters, mk_iters = iterations or (MIN_ITERATIONS, MIN_ITERATIONS)
    slot_iters, mk_iters = max(slot_iters, MIN_ITERATIONS), max(mk_iters, MIN_ITERATIONS)
    master_key = master_key or random(key_bytes)
    per_slot = slot_sectors(key_bytes)
    payload = ALIGN_SECTORS + luks.SLOTS * per_slot
    region = bytearray(payload * luks.SECTOR)
    mk_salt = random(SALT_SIZE)
    mk_digest = hashlib.pbkdf2_hmac(hash_name, master_key, mk_salt, mk_iters, DIGEST_SIZE)
    luks.HEAD.pack_into(region, 0, luks.MAGIC, 1, b"aes", b"xts-plain64", hash_name.encode(),
                        payload, key_bytes, mk_digest, mk_salt, mk_iters,
                        str(uuid.UUID(bytes=random(16), version=4)).encode())
    for index in range(luks.SLOTS):
        start = ALIGN_SECTORS + index * per_slot
        at = luks.SLOTS_AT + 48 * index
        if index:
            luks.SLOT.pack_into(region, at, luks.SLOT_DISABLED, 0, bytes(SALT_SIZE), start,
                                luks.STRIPES)
            continue
        salt = random(SALT_SIZE)
        slot_key = hashlib.pbkdf2_hmac(hash_name, passphrase, salt, slot_iters, key_bytes)
        material = af_split(master_key, luks.STRIPES, hash_name, random)
        material += bytes(-len(material) % luks.SECTOR)
        encrypted = _aes_xts(slot_key, 0, material, True)
        region[start * luks.SECTOR:start * luks.SECTOR + len(encrypted)] = encrypted
        luks.SLOT.pack_into(region, at, luks.SLOT_ENABLED, slot_iters, salt, start, luks.STRIPES)
    return bytes(region), master_key


def unlock(region, passphrase):
    """The master key of the LUKS header `region` (its bytes up to the payload) that
    `passphrase` opens, or a Qcow2Error saying the passphrase opens no key slot."""
    fields = luks.parse(region[:luks.PHDR_SIZE])
    if fields["cipher"] != b"aes" or fields["mode"] != b"xts-plain64":
        raise Qcow2Error("the image is encrypted with %s-%s; this collection opens aes-xts-plain64"
                         % (fields["cipher"].decode("ascii", "replace"),
                            fields["mode"].decode("ascii", "replace")), option="encrypt_format")
    hash_name = fields["hash"].decode("ascii")
    key_bytes = fields["key_bytes"]
    size = -(-key_bytes * luks.STRIPES // luks.SECTOR) * luks.SECTOR
    for slot in fields["slots"]:
        if slot["state"] != luks.SLOT_ENABLED:
            continue
        slot_key = hashlib.pbkdf2_hmac(hash_name, passphrase, slot["salt"], slot["iters"],
                                       key_bytes)
        start = slot["start"] * luks.SECTOR
        material = _aes_xts(slot_key, 0, region[start:start + size], False)
        candidate = af_merge(material, key_bytes, luks.STRIPES, hash_name)
        check = hashlib.pbkdf2_hmac(hash_name, candidate, fields["mk_salt"], fields["mk_iters"],
                                    DIGEST_SIZE)
        if hmac.compare_digest(check, fields["mk_digest"]):
            return candidate
    raise Qcow2Error("encrypt_passphrase: the passphrase opens no key slot of the image",
                     option="encrypt_passphrase")
