# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bulk generation of table bytes without a Python loop per entry.

Preallocated tables are arithmetic progressions: L2 entry k points at data cluster
`first + k`, L1 entry i at L2 table `first + i`, reftable entry i at refblock `first + i`.

Long progressions whose step is a power of two (a cluster size) are cut out of a template:
an entry is (q << c) | low with q counting up by one; below a byte boundary s a little above
c its bytes repeat every 2**(s-c) entries, above s they are constant over such a period. One
period's worth of entries is made once, and each period of output is a copy of it with the
few non-zero constant high bytes filled in by strided slice assignments: memory copies, no
arithmetic per entry.

Other progressions (and short ones) are produced with big integers: a chunk of entries is
packed once with struct, read as one integer, and every later chunk is that integer plus a
multiple of a "one in every field" pattern. Fields never carry into each other because
offsets stay below 2**56.
"""

import struct

CHUNK_BYTES = 8 * 1024 * 1024


def div_round_up(a, b):
    return -(-a // b)


# Template periods are at least 2**11 entries and at most 2**18.
_PERIOD_MIN_BITS = 11
# Template output comes in pieces of at most this many bytes.
TEMPLATE_PIECE = 1 << 20


def progression(first, step, count, entry_size=8, tail=0, chunk_bytes=64 * 1024):
    """Yield the big-endian bytes of `count` entries `first + k*step`, in chunks.

    With entry_size 16 each entry is followed by a 64-bit `tail` word (extended L2 bitmaps).
    Chunks are bytes-like (bytes or bytearray) and never changed after they are yielded; they
    hold at most max(chunk_bytes, 1 MiB) bytes.
    """
    if count <= 0:
        return
    if entry_size not in (8, 16):
        raise ValueError("entry_size must be 8 or 16")
    if first < 0 or first + (count - 1) * step >= 1 << 64:
        raise ValueError("progression entries must fit in 64 bits")
    if step > 0 and not step & (step - 1):
        c = step.bit_length() - 1
        if c + template_period_bits(c) < 64 and count >= 4 << template_period_bits(c):
            template = ProgressionTemplate(c, entry_size, first & (step - 1), tail)
            yield from template.pieces(first >> c, count)
            return
    yield from _progression_bigint(first, step, count, entry_size, tail, chunk_bytes)


def template_period_bits(step_bits):
    """p of the template period 2**p for steps of 2**step_bits: the smallest p >= 11 that
    puts step_bits + p on a byte boundary."""
    return (step_bits + _PERIOD_MIN_BITS + 7) // 8 * 8 - step_bits


class ProgressionTemplate(object):
    """Entries `(q << c) | low` (each followed by `tail` when entry_size is 16), cut out of
    one period made once.

    Below the byte boundary s = c + p an entry's bytes repeat every 2**p values of q; above
    it they hold q >> p, constant over a period. A piece of output is a copy of its slice of
    the period with the non-zero high bytes filled in by strided slice assignments.
    """

    def __init__(self, step_bits, entry_size, low=0, tail=0):
        self.c = step_bits
        self.p = template_period_bits(step_bits)
        self.period = 1 << self.p
        self.entry_size = entry_size
        self.high_bytes = 8 - (step_bits + self.p) // 8
        self.view = memoryview(b"".join(_progression_bigint(
            low, 1 << step_bits, self.period, entry_size, tail, 1 << 20)))

    def pieces(self, q, count):
        """Yield the bytes of the `count` entries from q on, in pieces of at most
        TEMPLATE_PIECE bytes that never cross a period."""
        esz, hb = self.entry_size, self.high_bytes
        cap = max(1, TEMPLATE_PIECE // esz)
        while count > 0:
            j = q & (self.period - 1)
            m = min(count, self.period - j, cap)
            piece = self.view[j * esz:(j + m) * esz]
            high = q >> self.p
            if high:
                piece = bytearray(piece)
                for k in range(hb):
                    v = (high >> (8 * (hb - 1 - k))) & 0xFF
                    if v:
                        piece[k::esz] = bytes((v,)) * m
            else:
                piece = piece.tobytes()
            yield piece
            q += m
            count -= m


def _progression_bigint(first, step, count, entry_size, tail, chunk_bytes):
    per_chunk = max(1, chunk_bytes // entry_size)
    m = min(per_chunk, count)
    if entry_size == 8:
        base = struct.pack(">%dQ" % m, *range(first, first + m * step, step))
        unit = (b"\0" * 7 + b"\1") * m
    else:
        values = []
        for value in range(first, first + m * step, step):
            values.append(value)
            values.append(tail)
        base = struct.pack(">%dQ" % (2 * m), *values)
        unit = (b"\0" * 7 + b"\1" + b"\0" * 8) * m
    current = int.from_bytes(base, "big")
    delta = int.from_bytes(unit, "big") * (m * step)
    done = 0
    chunk = 0
    while done < count:
        n = min(m, count - done)
        if chunk == 0:
            data = base
        else:
            current += delta
            data = current.to_bytes(m * entry_size, "big")
        if n < m:
            data = data[:n * entry_size]
        yield data
        done += n
        chunk += 1


def ones_refblocks(count, refcount_order, total_bytes, chunk_bytes=CHUNK_BYTES):
    """Yield `total_bytes` of refcount block content: `count` refcounts of 1, then zeros."""
    return refcount_runs(((0, count),), refcount_order, total_bytes, chunk_bytes)


def refcount_runs(runs, refcount_order, total_bytes, chunk_bytes=CHUNK_BYTES):
    """Yield `total_bytes` of refcount blocks: refcount 1 for the clusters inside each
    (start, end) run (sorted, disjoint), 0 for every other cluster."""
    writer = _RefcountStream(refcount_order, chunk_bytes)
    pos = 0
    for start, end in runs:
        if end <= start:
            continue
        yield from writer.emit(0, start - pos)
        yield from writer.emit(1, end - start)
        pos = end
    emitted = writer.emitted
    for piece in writer.flush():
        emitted += len(piece)
        yield piece
    yield from zeros(total_bytes - emitted, chunk_bytes)


class _RefcountStream(object):
    """Packs a stream of runs of equal refcounts (0 or 1) into bytes, any width."""

    def __init__(self, order, chunk_bytes):
        self.bits = 1 << order
        self.per_byte = max(1, 8 // self.bits)
        self.width = max(1, self.bits // 8)
        self.chunk = chunk_bytes
        self.cur = 0
        self.cur_n = 0
        self.emitted = 0
        full = 0
        for i in range(self.per_byte):
            full |= 1 << (i * self.bits)
        self.one = bytes([full]) if self.bits < 8 else b"\0" * (self.width - 1) + b"\1"

    def emit(self, value, count):
        if count <= 0:
            return
        if self.bits >= 8:
            unit = self.one if value else b"\0" * self.width
            yield from self._repeat(unit, count)
            return
        while count and self.cur_n:
            self.cur |= value << (self.cur_n * self.bits)
            self.cur_n += 1
            count -= 1
            if self.cur_n == self.per_byte:
                self.emitted += 1
                yield bytes([self.cur])
                self.cur = self.cur_n = 0
        whole = count // self.per_byte
        yield from self._repeat(self.one if value else b"\0", whole)
        for i in range(count - whole * self.per_byte):
            self.cur |= value << (i * self.bits)
            self.cur_n += 1

    def _repeat(self, unit, count):
        block = unit * max(1, min(count, self.chunk // len(unit)))
        per = len(block) // len(unit)
        while count > 0:
            n = min(count, per)
            piece = block if n == per else block[:n * len(unit)]
            self.emitted += len(piece)
            yield piece
            count -= n

    def flush(self):
        if self.cur_n:
            yield bytes([self.cur])
            self.cur = self.cur_n = 0


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
    yield from zeros(total_bytes - done)


def clusters_for(nbytes, cluster_size):
    return div_round_up(nbytes, cluster_size)
