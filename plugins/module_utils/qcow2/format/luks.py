# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The LUKS version 1 header that a LUKS-encrypted qcow2 image keeps in its own clusters: its
layout, the checks QEMU makes when it opens one, and what `qemu-img info` says of it. Nothing
here needs the passphrase or a cipher: the header is plain data. Pure: bytes in, values out."""

import struct

PHDR_SIZE = 592
MAGIC = b"LUKS\xba\xbe"
SLOTS = 8
STRIPES = 4000
HEADER_SECTORS = 4096 // 512     # key material may not start inside the first 4 KiB
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
SECTOR = 512
# Ciphers (with their key sizes), modes, IV generators and hashes QEMU's LUKS driver knows.
CIPHERS = {b"aes": (16, 24, 32), b"serpent": (16, 24, 32), b"twofish": (16, 24, 32),
           b"cast5": (16,), b"sm4": (16,)}
MODES = (b"ecb", b"cbc", b"xts", b"ctr")
HASHES = (b"md5", b"sha1", b"sha224", b"sha256", b"sha384", b"sha512", b"ripemd160", b"sm3")

# The header's fields, then each key slot's (at SLOTS_AT + 48 * index): shared by the parser
# here and by crypto/luks1, which writes headers.
HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
SLOT = struct.Struct(">II32sII")
SLOTS_AT = 208


def key_sectors(key_bytes):
    """Sectors of one key slot's material (STRIPES copies of the key), aligned to 4 KiB as
    QEMU aligns them."""
    sectors = -(-key_bytes * STRIPES // SECTOR)
    return -(-sectors // HEADER_SECTORS) * HEADER_SECTORS


def region_size(key_bytes):
    """Bytes of a LUKS header region QEMU lays out for a master key of `key_bytes`: the
    header's 4 KiB, then eight key slots; the payload (the qcow2's data) is not in it."""
    return (HEADER_SECTORS + SLOTS * key_sectors(key_bytes)) * SECTOR


def _text(raw):
    return raw.split(b"\0", 1)[0]


def parse(phdr):
    """The fields of a LUKS1 header (PHDR_SIZE bytes), as read: a dict with bytes for the
    names and ints for the numbers. Raises ValueError for another magic or version."""
    (magic, version, cipher, mode, digest, payload, key_bytes, mk_digest, mk_salt, mk_iters,
     uuid) = HEAD.unpack_from(phdr, 0)
    if magic != MAGIC:
        raise ValueError("it is not in LUKS format")
    if version != 1:
        raise ValueError("unsupported LUKS version %d" % version)
    slots = []
    for index in range(SLOTS):
        active, iters, salt, start, stripes = SLOT.unpack_from(phdr, SLOTS_AT + 48 * index)
        slots.append({"state": active, "iters": iters, "salt": salt, "start": start,
                      "stripes": stripes})
    return {"cipher": _text(cipher), "mode": _text(mode), "hash": _text(digest),
            "payload": payload, "key_bytes": key_bytes, "mk_digest": mk_digest,
            "mk_salt": mk_salt, "mk_iters": mk_iters, "uuid": _text(uuid), "slots": slots}


def problem(fields):
    """What QEMU refuses in the parsed header (its text, for an error), or None."""
    cipher, mode, key_bytes = fields["cipher"], fields["mode"], fields["key_bytes"]
    xts = mode.startswith(b"xts")
    cipher_key = key_bytes // 2 if xts else key_bytes
    if (xts and key_bytes % 2) or cipher_key not in CIPHERS.get(cipher, ()):
        return "LUKS cipher %r with a key of %d bytes is not supported" % (
            cipher.decode("ascii", "replace"), key_bytes)
    if mode.split(b"-", 1)[0] not in MODES or fields["hash"] not in HASHES:
        return "LUKS cipher mode %r or hash %r is not supported" % (
            mode.decode("ascii", "replace"), fields["hash"].decode("ascii", "replace"))
    stripe_sectors = -(-key_bytes * STRIPES // SECTOR)
    taken = []
    for index, slot in enumerate(fields["slots"]):
        start = slot["start"]
        found = None
        if slot["stripes"] != STRIPES:
            found = "has %d stripes, not %d" % (slot["stripes"], STRIPES)
        elif slot["state"] not in (SLOT_ENABLED, SLOT_DISABLED):
            found = "has a corrupted state"
        elif start < HEADER_SECTORS:
            found = "overlaps the LUKS header"
        elif fields["payload"] < start + stripe_sectors:
            found = "overlaps the encrypted payload"
        else:
            for other, (o_start, o_end) in enumerate(taken):
                if start < o_end and o_start < start + stripe_sectors:
                    found = "overlaps key slot %d" % other
                    break
        if found:
            return "LUKS key slot %d %s" % (index, found)
        taken.append((start, start + stripe_sectors))
    return None


def describe(fields):
    """The `encrypt` block of `qemu-img info --output=json` for this header (qemu-img 7.2's
    keys and values): cipher with its key size, mode, IV generator, hashes, slots, payload."""
    mode, _sep, ivgen = fields["mode"].decode("ascii", "replace").partition("-")
    ivgen_alg, _sep, ivgen_hash = ivgen.partition(":")
    key_bits = fields["key_bytes"] * 8 // (2 if mode == "xts" else 1)
    out = {
        "format": "luks",
        "cipher-alg": "%s-%d" % (fields["cipher"].decode("ascii", "replace"), key_bits),
        "cipher-mode": mode,
        "ivgen-alg": ivgen_alg,
        "hash-alg": fields["hash"].decode("ascii", "replace"),
        "uuid": fields["uuid"].decode("ascii", "replace"),
        "payload-offset": fields["payload"] * SECTOR,
        "master-key-iters": fields["mk_iters"],
        "slots": [],
    }
    if ivgen_hash:
        out["ivgen-hash-alg"] = ivgen_hash
    for slot in fields["slots"]:
        entry = {"active": slot["state"] == SLOT_ENABLED, "key-offset": slot["start"] * SECTOR}
        if entry["active"]:
            entry["iters"] = slot["iters"]
            entry["stripes"] = slot["stripes"]
        out["slots"].append(entry)
    return out
