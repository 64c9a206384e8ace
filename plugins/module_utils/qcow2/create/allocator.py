# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A pure model of the cluster allocator qemu-img uses while creating an image.

`preallocation=off` images must be byte-identical to `qemu-img create`. For most images that
is plain arithmetic (header, reftable, one refblock, L1), but when the L1 table outgrows what
the first refcount block covers (small clusters, narrow refcount blocks, huge sizes) QEMU
appends refcount blocks one retry at a time and may move the refcount table, leaving a stale
copy behind. This module replays that algorithm on an in-memory refcount array: first-fit
search from a moving free index, refcount blocks that describe themselves, restarts when new
metadata lands where the caller wanted to allocate, and reftable growth to the next
refblock-aligned boundary with 50 % spare entries.

It does no I/O. The result is a map of cluster contents and a final file length.
The work is proportional to the number of clusters the metadata occupies (at most a few
hundred thousand), never to the virtual size.
"""

import struct

from ..format.errors import Qcow2Error
from ..format.tables import div_round_up

EAGAIN = "EAGAIN"


def refcount_metadata_size(clusters, cluster_size, refcount_order, generous):
    """Refcount blocks and table clusters needed to count `clusters` clusters plus themselves.

    The count is self-referential (refcount structures are counted too), so iterate to the
    fixed point. `generous` adds half the table once more, as QEMU does when it grows the
    reftable without an exact target. Returns (blocks, table_clusters).
    """
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = div_round_up(clusters + table + blocks, per_block)
        table = div_round_up(blocks, per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            if generous:
                clusters += div_round_up(table, 2)
                generous = False
                n = 0
                continue
            return blocks, table


def pack_refcounts(counts, refcount_order):
    """Serialise a sequence of refcounts (ints) as one refcount block's bytes."""
    bits = 1 << refcount_order
    if bits >= 8:
        fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
        return struct.pack(">%d%s" % (len(counts), fmt), *counts)
    per_byte = 8 // bits
    out = bytearray(div_round_up(len(counts), per_byte))
    for i, value in enumerate(counts):
        if value:
            out[i // per_byte] |= value << ((i % per_byte) * bits)
    return bytes(out)


class QemuCreateModel(object):
    """Replays qemu-img's allocations for a new image up to its L1 table.

    After `create(l1_bytes)`: `reftable_offset`, `reftable_clusters`, `l1_offset` and
    `contents()` (cluster index -> bytes for every non-zero metadata cluster) describe the file,
    and `file_size` its length.
    """

    def __init__(self, cluster_size, refcount_order):
        self.cs = cluster_size
        self.cluster_bits = cluster_size.bit_length() - 1
        self.refcount_order = refcount_order
        self.rb_entries = cluster_size * 8 >> refcount_order
        self.rb_bits = self.rb_entries.bit_length() - 1
        self.rc = bytearray()          # refcount per host cluster (0 or 1 during creation)
        self.free_index = 0
        # The minimal image qemu-img writes before it reopens the file: header at cluster 0,
        # one reftable cluster at 1 whose first entry points at an empty refblock at 2.
        self.reftable = [0] * (cluster_size // 8)
        self.reftable[0] = 2 * cluster_size
        self.reftable_offset = cluster_size
        self.reftable_clusters = 1
        self.max_table_index = 0
        self.refblocks = {0: 2}        # reftable index -> cluster of the block
        # Bytes written to the file, in order: (byte offset, bytes or None for "a refblock").
        self.writes = [(cluster_size, self._reftable_bytes()), (2 * cluster_size, None)]
        self.file_end = 3 * cluster_size
        self.l1_offset = 0

    # ------------------------------------------------------------------ refcount array
    def _ensure(self, end):
        if len(self.rc) < end:
            self.rc.extend(bytes(end - len(self.rc)))

    def _find_free_run(self, start, n):
        self._ensure(start + n)
        pos = self.rc.find(bytes(n), start)
        if pos < 0:
            # The run starts after the last allocated cluster at or beyond `start`.
            tail = self.rc.rstrip(b"\0")
            pos = max(start, len(tail))
        return pos

    def _reftable_bytes(self):
        return struct.pack(">%dQ" % len(self.reftable), *self.reftable)

    # ------------------------------------------------------------------ QEMU's algorithm
    def alloc_clusters_noref(self, n):
        pos = self._find_free_run(self.free_index, n)
        self.free_index = pos + n
        return pos

    def alloc_clusters(self, n):
        while True:
            start = self.alloc_clusters_noref(n)
            if self.update_refcount(start, n, 1) != EAGAIN:
                return start

    def update_refcount(self, start, n, addend):
        last_index = -1
        c = start
        end = start + n
        while c < end:
            index = c >> self.rb_bits
            if index != last_index:
                if self.alloc_refcount_block(c) == EAGAIN:
                    if self.free_index > start:
                        self.free_index = start
                    if c > start:
                        self.update_refcount(start, c - start, -addend)
                    return EAGAIN
                last_index = index
            seg_end = min(end, (index + 1) << self.rb_bits)
            self._ensure(seg_end)
            if addend > 0:
                if any(self.rc[c:seg_end]):
                    raise Qcow2Error("internal error: allocator model double allocation")
                self.rc[c:seg_end] = b"\1" * (seg_end - c)
            else:
                self.rc[c:seg_end] = bytes(seg_end - c)
                if c < self.free_index:
                    self.free_index = c
            c = seg_end
        return None

    def alloc_refcount_block(self, cluster_index):
        index = cluster_index >> self.rb_bits
        if index < len(self.reftable) and self.reftable[index]:
            return None
        new_block = self.alloc_clusters_noref(1)
        if new_block == 0:
            raise Qcow2Error("internal error: allocator model placed a refblock at cluster 0")
        if (new_block >> self.rb_bits) == index:
            # The new block describes itself.
            self._ensure(new_block + 1)
            self.rc[new_block] = 1
        else:
            if self.update_refcount(new_block, 1, 1) == EAGAIN:
                return EAGAIN
        self.refblocks[index] = new_block
        self.writes.append((new_block * self.cs, None))
        self.file_end = max(self.file_end, (new_block + 1) * self.cs)
        if index < len(self.reftable):
            self.reftable[index] = new_block * self.cs
            self.max_table_index = max(self.max_table_index, index)
            entry = struct.pack(">Q", new_block * self.cs)
            self.writes.append((self.reftable_offset + index * 8, entry))
            return EAGAIN
        # The reftable is too small: build new self-describing structures at the next
        # refblock-aligned boundary past everything in use.
        blocks_used = div_round_up(max(cluster_index + 1, new_block + 1), self.rb_entries)
        self.refcount_area(blocks_used * self.rb_entries, index, new_block)
        return EAGAIN

    def refcount_area(self, start, new_index, new_block):
        blocks, _table = refcount_metadata_size(start, self.cs, self.refcount_order, True)
        total = blocks
        area_index = start // self.rb_entries
        table_size = total + div_round_up(total, 2)
        per_cluster = self.cs // 8
        table_size = div_round_up(table_size, per_cluster) * per_cluster
        table_clusters = table_size // per_cluster
        if table_size * 8 > 8 * 1024 * 1024:
            raise Qcow2Error("the refcount table would exceed 8 MiB", option="size")
        new_table = [0] * table_size
        keep = min(self.max_table_index + 1, table_size, len(self.reftable))
        new_table[:keep] = self.reftable[:keep]
        new_table[new_index] = new_block * self.cs
        missing = sum(1 for i in range(area_index, total) if not new_table[i])
        table_start = start + missing
        end = table_start + table_clusters
        block = start
        for i in range(area_index, total):
            if not new_table[i]:
                new_table[i] = block * self.cs
                self.refblocks[i] = block
                self.writes.append((block * self.cs, None))
                block += 1
            first = i * self.rb_entries
            if first < end:
                j = start - first if first < start else 0
                stop = min(end - first, self.rb_entries)
                self._ensure(first + stop)
                self.rc[first + j:first + stop] = b"\1" * (stop - j)
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        self.reftable = new_table
        self.reftable_offset = table_start * self.cs
        self.reftable_clusters = table_clusters
        self.max_table_index = max(i for i, v in enumerate(new_table) if v)
        self.writes.append((self.reftable_offset, self._reftable_bytes()))
        self.file_end = max(self.file_end, end * self.cs)
        self.update_refcount(old_offset // self.cs, old_clusters, -1)

    # ------------------------------------------------------------------ the create sequence
    def create(self, l1_bytes):
        """Run qemu-img's sequence: count clusters 0-2, then allocate and write the L1."""
        if self.alloc_clusters(3) != 0:
            raise Qcow2Error("internal error: allocator model did not start at cluster 0")
        if l1_bytes:
            clusters = div_round_up(l1_bytes, self.cs)
            self.l1_offset = self.alloc_clusters(clusters) * self.cs
            self.writes.append((self.l1_offset, l1_bytes))
            self.file_end = max(self.file_end, self.l1_offset + l1_bytes)
        return self

    def contents(self):
        """Cluster index -> bytes of its final content, for clusters that are not all zero.

        Later writes win; refblocks are written with their final counts (QEMU flushes its
        refcount cache last). An integer in a write means that many zero bytes.
        """
        out = {}
        cs = self.cs
        block_index = dict((c, i) for i, c in self.refblocks.items())
        for offset, data in self.writes:
            if data is None:
                first = block_index[offset // cs] * self.rb_entries
                counts = list(self.rc[first:first + self.rb_entries])
                counts += [0] * (self.rb_entries - len(counts))
                data = pack_refcounts(counts, self.refcount_order)
            if isinstance(data, int):
                length = data
                payload = None
            else:
                length = len(data)
                payload = data
            pos = 0
            while pos < length:
                cluster = (offset + pos) // cs
                within = (offset + pos) % cs
                take = min(cs - within, length - pos)
                if payload is None and within == 0 and take == cs:
                    out.pop(cluster, None)
                else:
                    buf = bytearray(out.get(cluster, bytes(cs)))
                    if payload is None:
                        buf[within:within + take] = bytes(take)
                    else:
                        buf[within:within + take] = payload[pos:pos + take]
                    if any(buf):
                        out[cluster] = bytes(buf)
                    else:
                        out.pop(cluster, None)
                pos += take
        return out

    @property
    def file_size(self):
        return self.file_end
