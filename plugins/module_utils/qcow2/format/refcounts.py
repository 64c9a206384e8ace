# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Reading and writing single refcount entries inside a refcount block (any width 1..64).

Widths below 8 bits are packed from the least significant bit of each byte; 8 bits and wider
are big-endian integers.
"""


def get_refcount(block, index, order):
    bits = 1 << order
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(block[index * width:(index + 1) * width], "big")
    per_byte = 8 // bits
    byte = block[index // per_byte]
    return (byte >> ((index % per_byte) * bits)) & ((1 << bits) - 1)


def set_refcount(block, index, value, order):
    """Set entry `index` of the bytearray `block`."""
    bits = 1 << order
    if value < 0 or value >= (1 << bits):
        raise ValueError("refcount %d does not fit in %d bits" % (value, bits))
    if bits >= 8:
        width = bits // 8
        block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte = 8 // bits
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    pos = index // per_byte
    block[pos] = (block[pos] & ~mask & 0xFF) | (value << shift)


def set_range(block, first, stop, value, order):
    """Set entries [first, stop) of `block` to `value`; bulk for byte-aligned widths."""
    bits = 1 << order
    if bits >= 8:
        width = bits // 8
        block[first * width:stop * width] = value.to_bytes(width, "big") * (stop - first)
        return
    for index in range(first, stop):
        set_refcount(block, index, value, order)


def last_nonzero(block, order, entries):
    """Index of the last non-zero entry of `block`, or -1."""
    stripped = bytes(block).rstrip(b"\0")
    if not stripped:
        return -1
    bits = 1 << order
    if bits >= 8:
        return (len(stripped) - 1) // (bits // 8)
    per_byte = 8 // bits
    start = (len(stripped) - 1) * per_byte
    for index in range(min(entries, start + per_byte) - 1, start - 1, -1):
        if get_refcount(block, index, order):
            return index
    return -1
