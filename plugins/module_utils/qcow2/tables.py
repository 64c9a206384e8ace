# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bulk generation of table bytes without a Python loop per entry.

Preallocated tables are arithmetic progressions: L2 entry k points at data cluster
`first + k`, L1 entry i at L2 table `first + i`, reftable entry i at refblock `first + i`.
A chunk of such entries is produced once with struct, read as one big integer, and every
later chunk is that integer plus a multiple of a "one in every field" pattern: big-integer
addition in C instead of millions of Python-level packs. Fields never carry into each other
because offsets stay below 2**56.
"""

import struct

from .allocator import div_round_up

CHUNK_BYTES = 8 * 1024 * 1024


def progression(first, step, count, entry_size=8, tail=0, chunk_bytes=CHUNK_BYTES):
    """Yield the big-endian bytes of `count` entries `first + k*step`, in chunks.

    With entry_size 16 each entry is followed by a 64-bit `tail` word (extended L2 bitmaps).
    """
    if count <= 0:
        return
    per_chunk = max(1, chunk_bytes // entry_size)
    m = min(per_chunk, count)
    if entry_size == 8:
        base = struct.pack(">%dQ" % m, *range(first, first + m * step, step))
        unit = (b"\0" * 7 + b"\1") * m
    elif entry_size == 16:
        values = []
        for value in range(first, first + m * step, step):
            values.append(value)
            values.append(tail)
        base = struct.pack(">%dQ" % (2 * m), *values)
        unit = (b"\0" * 7 + b"\1" + b"\0" * 8) * m
    else:
        raise ValueError("entry_size must be 8 or 16")
    base_int = int.from_bytes(base, "big")
    unit_int = int.from_bytes(unit, "big")
    done = 0
    chunk = 0
    while done < count:
        n = min(m, count - done)
        if chunk == 0:
            data = base
        else:
            data = (base_int + chunk * m * step * unit_int).to_bytes(m * entry_size, "big")
        if n < m:
            data = data[:n * entry_size]
        yield data
        done += n
        chunk += 1


def ones_refblocks(count, refcount_order, total_bytes, chunk_bytes=CHUNK_BYTES):
    """Yield `total_bytes` of refcount block content: `count` refcounts of 1, then zeros."""
    bits = 1 << refcount_order
    if bits >= 8:
        width = bits // 8
        one = b"\0" * (width - 1) + b"\1"
        full_bytes = count * width
        partial = b""
    else:
        per_byte = 8 // bits
        field_one = 1
        full_byte = 0
        for i in range(per_byte):
            full_byte |= field_one << (i * bits)
        one = bytes([full_byte])
        full_bytes = count // per_byte
        rest = count % per_byte
        partial_value = 0
        for i in range(rest):
            partial_value |= 1 << (i * bits)
        partial = bytes([partial_value]) if rest else b""
    block = one * max(1, chunk_bytes // len(one))
    left = full_bytes
    while left > 0:
        piece = block[:min(left, len(block))]
        yield piece
        left -= len(piece)
    written = full_bytes
    if partial:
        yield partial
        written += 1
    zeros = total_bytes - written
    zero_chunk = bytes(min(zeros, chunk_bytes)) if zeros > 0 else b""
    while zeros > 0:
        piece = zero_chunk[:min(zeros, len(zero_chunk))]
        yield piece
        zeros -= len(piece)


def zeros(total_bytes, chunk_bytes=CHUNK_BYTES):
    """Yield `total_bytes` of zeros in chunks."""
    if total_bytes <= 0:
        return
    chunk = bytes(min(total_bytes, chunk_bytes))
    while total_bytes > 0:
        piece = chunk if total_bytes >= len(chunk) else chunk[:total_bytes]
        yield piece
        total_bytes -= len(piece)


def padded(chunks, total_bytes):
    """Yield `chunks`, then zeros up to `total_bytes` in all."""
    done = 0
    for piece in chunks:
        done += len(piece)
        yield piece
    for piece in zeros(total_bytes - done):
        yield piece


def clusters_for(nbytes, cluster_size):
    return div_round_up(nbytes, cluster_size)
