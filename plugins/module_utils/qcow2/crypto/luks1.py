# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""LUKS1 key slots: make a LUKS header region for a new master key and passphrase, and unlock
one (recover and verify its master key), as the LUKS1 on-disk format defines them and QEMU
lays them out (eight slots of 4 KiB-aligned key material, the payload after them).

The key derivation is PBKDF2 (the standard library's hashlib); the key material is encrypted
with the header's own sector cipher (crypto/sectors.py), which needs the `cryptography`
package (python3-cryptography on Debian, RHEL and SUSE) only when an encrypted image is made
or unlocked. Supported: AES (128, 192 or 256-bit keys) in XTS, CBC, ECB or CTR mode with the
plain, plain64 or essiv IV generator; QEMU's default is aes-256 xts plain64 with sha256.
"""

import hashlib
import hmac
import os
import struct
import uuid

from ..format import luks
from ..format.errors import Qcow2Error
from .sectors import SectorCipher, check_hash, header_names, options_of, xor_bytes

DIGEST_SIZE = 20                # LUKS1's master key digest
SALT_SIZE = 32
MIN_ITERATIONS = 1000


def _diffuse(data, hash_name):
    """LUKS1's AF diffusion: each digest-sized block hashed with its big-endian index."""
    size = hashlib.new(hash_name).digest_size
    out = []
    for index in range(0, -(-len(data) // size)):
        block = data[index * size:(index + 1) * size]
        out.append(hashlib.new(hash_name, struct.pack(">I", index) + block).digest()[:len(block)])
    return b"".join(out)


def af_split(key, stripes, hash_name, random=os.urandom):
    """The anti-forensic split of `key` into `stripes` blocks."""
    acc = bytes(len(key))
    blocks = []
    for _stripe in range(stripes - 1):
        block = random(len(key))
        blocks.append(block)
        acc = _diffuse(xor_bytes(acc, block), hash_name)
    blocks.append(xor_bytes(acc, key))
    return b"".join(blocks)


def af_merge(material, key_bytes, stripes, hash_name):
    """The key that af_split split into `material`."""
    acc = bytes(key_bytes)
    for stripe in range(stripes - 1):
        acc = _diffuse(xor_bytes(acc, material[stripe * key_bytes:(stripe + 1) * key_bytes]),
                       hash_name)
    return xor_bytes(acc, material[(stripes - 1) * key_bytes:stripes * key_bytes])


def build(passphrase, cipher_alg="aes-256", cipher_mode="xts", ivgen_alg="plain64",
          ivgen_hash_alg=None, hash_alg="sha256", iterations=None, master_key=None,
          random=os.urandom):
    """(header region bytes, master key): a LUKS1 header for the cipher these option values
    name (QEMU's: crypto/sectors.check_spec) with key slot 0 holding `master_key` (random when
    None) under `passphrase` (bytes); the region's length is the payload offset. `hash_alg`
    hashes the passphrase (PBKDF2) and the anti-forensic split; `iterations` (slot, master key
    digest): PBKDF2 rounds, at least MIN_ITERATIONS. Raises Qcow2Error naming the option for a
    combination QEMU refuses or this collection does not support."""
    cipher_name, mode_name, key_bytes = header_names(cipher_alg, cipher_mode, ivgen_alg,
                                                     ivgen_hash_alg)
    check_hash(hash_alg, "encrypt_hash_alg")
    if master_key is not None and len(master_key) != key_bytes:
        raise Qcow2Error("encrypt_cipher_alg: %s in %s mode takes a master key of %d bytes, "
                         "not %d" % (cipher_alg, cipher_mode, key_bytes, len(master_key)),
                         option="encrypt_cipher_alg")
    slot_iters, mk_iters = iterations or (MIN_ITERATIONS, MIN_ITERATIONS)
    slot_iters, mk_iters = max(slot_iters, MIN_ITERATIONS), max(mk_iters, MIN_ITERATIONS)
    master_key = master_key or random(key_bytes)
    per_slot = luks.key_sectors(key_bytes)
    region = bytearray(luks.region_size(key_bytes))
    payload = len(region) // luks.SECTOR
    mk_salt = random(SALT_SIZE)
    mk_digest = hashlib.pbkdf2_hmac(hash_alg, master_key, mk_salt, mk_iters, DIGEST_SIZE)
    luks.HEAD.pack_into(region, 0, luks.MAGIC, 1, cipher_name, mode_name, hash_alg.encode(),
                        payload, key_bytes, mk_digest, mk_salt, mk_iters,
                        str(uuid.UUID(bytes=random(16), version=4)).encode())
    for index in range(luks.SLOTS):
        start = luks.HEADER_SECTORS + index * per_slot
        at = luks.SLOTS_AT + 48 * index
        if index:
            luks.SLOT.pack_into(region, at, luks.SLOT_DISABLED, 0, bytes(SALT_SIZE), start,
                                luks.STRIPES)
            continue
        salt = random(SALT_SIZE)
        slot_key = hashlib.pbkdf2_hmac(hash_alg, passphrase, salt, slot_iters, key_bytes)
        material = af_split(master_key, luks.STRIPES, hash_alg, random)
        material += bytes(-len(material) % luks.SECTOR)
        cipher = SectorCipher(cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, slot_key)
        encrypted = cipher.encrypt(0, material)
        region[start * luks.SECTOR:start * luks.SECTOR + len(encrypted)] = encrypted
        luks.SLOT.pack_into(region, at, luks.SLOT_ENABLED, slot_iters, salt, start, luks.STRIPES)
    return bytes(region), master_key


# Master keys already recovered in this process, by the digest of (header region, passphrase):
# a run derives a key slot (encrypt_iter_time long) once, though its check mode preflight and
# its real run both open the image (the guard of an in-place change, a copy's source). Lives
# and dies with the module's process.
_OPENED = {}


def unlock(region, passphrase):
    """The master key of the LUKS header `region` (its bytes up to the payload) that
    `passphrase` opens, or a Qcow2Error saying the passphrase opens no key slot (or naming
    the cipher this collection does not open)."""
    proof = hashlib.sha256(hashlib.sha256(bytes(region)).digest() + passphrase).digest()
    if proof not in _OPENED:
        _OPENED[proof] = _recover(region, passphrase)
    return _OPENED[proof]


def _recover(region, passphrase):
    fields = luks.parse(region[:luks.PHDR_SIZE])
    hash_name = options_of(fields)["hash_alg"]
    key_bytes = fields["key_bytes"]
    size = -(-key_bytes * luks.STRIPES // luks.SECTOR) * luks.SECTOR
    for slot in fields["slots"]:
        if slot["state"] != luks.SLOT_ENABLED:
            continue
        slot_key = hashlib.pbkdf2_hmac(hash_name, passphrase, slot["salt"], slot["iters"],
                                       key_bytes)
        start = slot["start"] * luks.SECTOR
        material = SectorCipher.from_fields(fields, slot_key).decrypt(
            0, region[start:start + size])
        candidate = af_merge(material, key_bytes, luks.STRIPES, hash_name)
        check = hashlib.pbkdf2_hmac(hash_name, candidate, fields["mk_salt"], fields["mk_iters"],
                                    DIGEST_SIZE)
        if hmac.compare_digest(check, fields["mk_digest"]):
            return candidate
    raise Qcow2Error("encrypt_passphrase: the passphrase opens no key slot of the image",
                     option="encrypt_passphrase")
