# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Changing an existing image in place: grow its virtual size, raise its preallocation.

Every change follows one order, so that a crash at any point leaves an image qemu-img check
accepts (at worst with leaked clusters, never with a corruption):

1. new clusters are appended past everything in use and counted first: new refcount blocks
   (and a new, larger refcount table, switched in with one header write) give them refcount
   1 before anything points at them;
2. new L2 tables and data clusters are written (and allocated on disk per mode);
3. L1 entries are written (a relocated L1 is switched in with one header write);
4. the virtual size is written last;
5. clusters no longer used (an old L1, an old refcount table) are released.

Each step is made durable with fsync before the next begins. The image is held with QEMU's
write locks for the whole operation, and refused if a QEMU holds it.
"""

import os
import struct

from . import constants as C
from . import fileops
from .allocator import div_round_up
from .errors import Qcow2Error
from .header import decode_cluster0
from .refcounts import get_refcount, last_nonzero, set_range
from .tables import progression

_READ_LIMIT = 32 * 1024 * 1024


class Editor(object):
    """An open image with its L1 and refcount table in memory, ready for appends."""

    def __init__(self, fd, path):
        self.fd = fd
        self.path = path
        st = os.fstat(fd)
        self.file_size = st.st_size
        head = os.pread(fd, 2 * 1024 * 1024, 0)
        hdr, exts, backing = decode_cluster0(head)
        self.header = hdr
        self.extensions = exts
        self.backing = backing
        self._refuse_unsafe()
        self.cs = hdr.cluster_size
        self.order = hdr.refcount_order
        self.rb_entries = self.cs * 8 >> self.order
        self.entry_size = C.l2_entry_size(hdr.incompatible_features & C.INCOMPAT_EXTL2)
        self.per_l2 = self.cs // self.entry_size
        self.external = bool(hdr.incompatible_features & C.INCOMPAT_DATA_FILE)
        self.l1 = self._read_entries(hdr.l1_table_offset, hdr.l1_size, "L1 table")
        reft_entries = hdr.refcount_table_clusters * self.cs // 8
        if hdr.refcount_table_clusters * self.cs > C.MAX_REFTABLE_BYTES:
            raise Qcow2Error("%s: refcount table larger than 8 MiB" % path, path=path)
        self.reftable = self._read_entries(hdr.refcount_table_offset, reft_entries,
                                           "refcount table")
        self._blocks = {}

    # ------------------------------------------------------------------ reading
    def _refuse_unsafe(self):
        hdr = self.header
        name = self.path
        if hdr.incompatible_features & ~C.INCOMPAT_MASK:
            raise Qcow2Error("%s: unknown incompatible features %#x; refusing to modify"
                             % (name, hdr.incompatible_features & ~C.INCOMPAT_MASK), path=name)
        if hdr.incompatible_features & C.INCOMPAT_DIRTY:
            raise Qcow2Error("%s: the image is marked dirty (lazy refcounts not yet repaired); "
                             "run 'qemu-img check -r all' before changing it" % name, path=name)
        if hdr.incompatible_features & C.INCOMPAT_CORRUPT:
            raise Qcow2Error("%s: the image is marked corrupt; refusing to modify it" % name,
                             path=name)
        if hdr.crypt_method:
            raise Qcow2Error("%s: encrypted images are not modified by this engine" % name,
                             path=name)

    def _read_entries(self, offset, count, what):
        if count == 0:
            return []
        nbytes = count * 8
        if nbytes > _READ_LIMIT or offset % self.cs or offset + nbytes > max(self.file_size,
                                                                             offset + 8) + self.cs:
            raise Qcow2Error("%s: %s at offset %d with %d entries is not plausible"
                             % (self.path, what, offset, count), path=self.path)
        data = os.pread(self.fd, nbytes, offset)
        data += bytes(nbytes - len(data))
        return list(struct.unpack(">%dQ" % count, data))

    def refblock(self, index):
        """The refcount block for reftable index `index` as a bytearray, or None."""
        if index in self._blocks:
            return self._blocks[index]
        if index >= len(self.reftable) or not self.reftable[index] & C.REFT_OFFSET_MASK:
            return None
        offset = self.reftable[index] & C.REFT_OFFSET_MASK
        data = bytearray(os.pread(self.fd, self.cs, offset))
        data += bytes(self.cs - len(data))
        self._blocks[index] = data
        return data

    def refcount(self, cluster):
        block = self.refblock(cluster // self.rb_entries)
        if block is None:
            return 0
        return get_refcount(block, cluster % self.rb_entries, self.order)

    def first_free_cluster(self):
        """The first cluster past the file's end and past every refcounted cluster."""
        end = div_round_up(self.file_size, self.cs)
        for index in range(len(self.reftable) - 1, -1, -1):
            block = self.refblock(index)
            if block is None:
                continue
            last = last_nonzero(block, self.order, self.rb_entries)
            if last >= 0:
                end = max(end, index * self.rb_entries + last + 1)
                break
        return end

    def read_l2(self, l1_index):
        entry = self.l1[l1_index]
        offset = entry & C.L1E_OFFSET_MASK
        if not offset:
            return None
        if offset + self.cs > self.file_size:
            raise Qcow2Error("%s: L2 table at %d lies past the end of the file"
                             % (self.path, offset), path=self.path)
        return os.pread(self.fd, self.cs, offset)

    # ------------------------------------------------------------------ writing
    def pwrite(self, offset, data):
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def sync(self):
        os.fsync(self.fd)

    def write_chunks(self, offset, chunks):
        buf = []
        size = 0
        for piece in chunks:
            buf.append(piece)
            size += len(piece)
            if size >= 8 * 1024 * 1024:
                self.pwrite(offset, b"".join(buf))
                offset += size
                buf, size = [], 0
        if buf:
            self.pwrite(offset, b"".join(buf))

    def release(self, first, count):
        """Drop the refcount of `count` clusters from `first` to zero (they become free)."""
        touched = {}
        for cluster in range(first, first + count):
            index = cluster // self.rb_entries
            block = self.refblock(index)
            if block is None:
                continue
            set_range(block, cluster % self.rb_entries, cluster % self.rb_entries + 1, 0,
                      self.order)
            touched[index] = block
        for index, block in touched.items():
            self.pwrite(self.reftable[index] & C.REFT_OFFSET_MASK, bytes(block))


def _l1_entries(size, cs, entry_size):
    return div_round_up(div_round_up(size, cs), cs // entry_size)


def open_locked(path):
    """Open an image read-write and hold QEMU's writer locks; refuse if a QEMU holds it."""
    from .lock import WriteLock  # imported late: lock.py is Linux-only at call time
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise Qcow2Error("%s: cannot open the image for writing: %s" % (path, exc.strerror),
                         path=path)
    try:
        lock = WriteLock(fd)
        lock.__enter__()
    except BaseException:
        os.close(fd)
        raise
    return fd, lock


def close_locked(fd, lock):
    try:
        lock.__exit__(None, None, None)
    finally:
        os.close(fd)


def grow(path, new_size, mode="off", data_file_path=None):
    """Raise the virtual size to `new_size` and map the new range per `mode`.

    Returns a dict describing what was done. Shrinking is refused.
    """
    fd, lock = open_locked(path)
    try:
        ed = Editor(fd, path)
        old_size = ed.header.size
        new_size = (new_size + 511) // 512 * 512
        if new_size < old_size:
            raise Qcow2Error("size: %d is smaller than the image's %d bytes; shrinking would "
                             "discard guest data and is refused" % (new_size, old_size),
                             option="size", path=path)
        limit = C.max_virtual_size(ed.cs, ed.entry_size == 16)
        if new_size > limit:
            raise Qcow2Error("size: %d bytes exceeds the maximum of %d for this image's "
                             "cluster size" % (new_size, limit), option="size", path=path)
        if new_size == old_size:
            return {"changed": False, "old_size": old_size, "new_size": new_size}
        first = div_round_up(old_size, ed.cs)
        last = div_round_up(new_size, ed.cs)
        result = _map_range(ed, first, last, mode, new_size)
        if ed.external and data_file_path:
            _grow_data_file(data_file_path, old_size, new_size, mode, result)
        # The size goes in last: until now the image was valid at its old size.
        ed.pwrite(24, struct.pack(">Q", new_size))
        ed.sync()
        result.update({"changed": True, "old_size": old_size, "new_size": new_size})
        return result
    finally:
        close_locked(fd, lock)


def fill(path, mode="metadata"):
    """Map every unmapped guest cluster of the image (off -> metadata/falloc/full)."""
    fd, lock = open_locked(path)
    try:
        ed = Editor(fd, path)
        clusters = div_round_up(ed.header.size, ed.cs)
        return _map_range(ed, 0, clusters, mode, ed.header.size)
    finally:
        close_locked(fd, lock)


def _grow_data_file(data_path, old_size, new_size, mode, result):
    dfd = os.open(data_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        current = os.fstat(dfd).st_size
        if current < new_size:
            os.ftruncate(dfd, new_size)
        if mode == "falloc":
            try:
                fileops.fallocate(dfd, old_size, new_size - old_size)
            except OSError as exc:
                if not fileops.is_not_supported(exc):
                    raise
                _zero_unbacked(dfd, old_size, new_size - old_size)
        elif mode == "full":
            _zero_unbacked(dfd, old_size, new_size - old_size)
        os.fsync(dfd)
        result["data_file_size"] = max(current, new_size)
    finally:
        os.close(dfd)


def _zero_unbacked(fd, offset, length):
    from .writer import write_zeros
    segments, _fiemap = fileops.unbacked_segments(fd, offset, length)
    for off, seg_len in segments:
        write_zeros(fd, off, seg_len)


def _map_range(ed, first, last, mode, new_size):
    """Map guest clusters [first, last) per `mode` and make the L1 big enough for new_size."""
    hdr = ed.header
    cs = ed.cs
    new_l1_size = max(hdr.l1_size, _l1_entries(new_size, cs, ed.entry_size))
    old_l1_clusters = div_round_up(hdr.l1_size * 8, cs) if hdr.l1_size else 0
    new_l1_clusters = div_round_up(new_l1_size * 8, cs)
    relocate_l1 = new_l1_clusters > old_l1_clusters

    prealloc = mode in ("metadata", "falloc", "full")
    new_tables = []          # L1 indices that get a fresh L2 table
    patches = {}             # L1 index -> list of guest clusters to map in an existing table
    to_map = 0
    if prealloc and last > first:
        for l1_index in range(first // ed.per_l2, div_round_up(last, ed.per_l2)):
            lo = max(first, l1_index * ed.per_l2)
            hi = min(last, (l1_index + 1) * ed.per_l2)
            entry = ed.l1[l1_index] if l1_index < len(ed.l1) else 0
            if not entry & C.L1E_OFFSET_MASK:
                new_tables.append(l1_index)
                to_map += hi - lo
                continue
            if not entry & C.OFLAG_COPIED:
                raise Qcow2Error("%s: L2 table %d is shared with a snapshot; refusing to "
                                 "modify it" % (ed.path, l1_index), path=ed.path)
            table = ed.read_l2(l1_index)
            missing = []
            for guest in range(lo, hi):
                pos = (guest - l1_index * ed.per_l2) * ed.entry_size
                value = struct.unpack_from(">Q", table, pos)[0]
                if not value & C.L2E_OFFSET_MASK and not value & C.OFLAG_COMPRESSED:
                    if not (ed.external and value & C.OFLAG_COPIED):
                        missing.append(guest)
            if missing:
                patches[l1_index] = missing
                to_map += len(missing)
    data_clusters = 0 if ed.external else to_map

    # Layout of the appended area, solved to a fixed point for the refcount structures.
    start = ed.first_free_cluster()
    payload = (new_l1_clusters if relocate_l1 else 0) + len(new_tables) + data_clusters
    n_blocks = 0
    reft_clusters = 0
    while True:
        end = start + payload + n_blocks + reft_clusters
        needed = [i for i in range(start // ed.rb_entries, div_round_up(end, ed.rb_entries))
                  if not (i < len(ed.reftable) and ed.reftable[i] & C.REFT_OFFSET_MASK)]
        max_index = div_round_up(end, ed.rb_entries) - 1
        new_reft = 0
        if max_index >= len(ed.reftable):
            new_reft = div_round_up((max_index + 1) * 8, cs)
        if len(needed) == n_blocks and new_reft == reft_clusters:
            break
        n_blocks, reft_clusters = len(needed), new_reft
    if reft_clusters * cs > C.MAX_REFTABLE_BYTES:
        raise Qcow2Error("size: the refcount table would exceed 8 MiB", option="size",
                         path=ed.path)
    if end * cs >= C.MAX_HOST_OFFSET:
        raise Qcow2Error("size: the image file would exceed the qcow2 offset limit",
                         option="size", path=ed.path)
    at = start
    l1_at = None
    if relocate_l1:
        l1_at, at = at, at + new_l1_clusters
    l2_at, at = at, at + len(new_tables)
    data_at, at = at, at + data_clusters
    blocks_at, at = at, at + n_blocks
    reft_at = at

    # Step 1: count every new cluster before anything refers to it.
    if end > start:
        _count_clusters(ed, start, end, needed, blocks_at, reft_at, reft_clusters)

    # Step 2: L2 tables and data.
    flags = C.OFLAG_COPIED
    next_data = data_at
    l2_offsets = {}
    for k, l1_index in enumerate(new_tables):
        lo = max(first, l1_index * ed.per_l2)
        hi = min(last, (l1_index + 1) * ed.per_l2)
        head = (lo - l1_index * ed.per_l2) * ed.entry_size
        if ed.external:
            first_value = (lo * cs) | flags
        else:
            first_value = (next_data * cs) | flags
            next_data += hi - lo
        body = b"".join(progression(first_value, cs, hi - lo, ed.entry_size))
        table = bytes(head) + body
        table += bytes(cs - len(table))
        l2_offsets[l1_index] = (l2_at + k) * cs
        ed.pwrite((l2_at + k) * cs, table)
    for l1_index in sorted(patches):
        table = bytearray(ed.read_l2(l1_index))
        for guest in patches[l1_index]:
            pos = (guest - l1_index * ed.per_l2) * ed.entry_size
            old = struct.unpack_from(">Q", table, pos)[0]
            host = guest * cs if ed.external else next_data * cs
            if not ed.external:
                next_data += 1
            struct.pack_into(">Q", table, pos, host | flags | (old & C.OFLAG_ZERO))
        patches[l1_index] = table
    result = {"method": "none", "mapped_clusters": to_map, "new_l2_tables": len(new_tables)}
    if data_clusters and mode in ("falloc", "full"):
        from .writer import WriteResult, allocate
        wr = WriteResult()
        allocate(ed.fd, data_at * cs, data_clusters * cs, mode, wr)
        result["method"] = wr.method
    if end * cs > ed.file_size:
        os.ftruncate(ed.fd, end * cs)
        ed.file_size = end * cs
    ed.sync()
    # Existing L2 tables are patched only now that their new data clusters exist.
    for l1_index, table in patches.items():
        ed.pwrite(ed.l1[l1_index] & C.L1E_OFFSET_MASK, bytes(table))
    if patches:
        ed.sync()

    # Step 3: the L1 table.
    new_l1 = list(ed.l1) + [0] * (new_l1_size - len(ed.l1))
    for l1_index, offset in l2_offsets.items():
        new_l1[l1_index] = offset | C.OFLAG_COPIED
    old_l1_offset = ed.header.l1_table_offset
    if relocate_l1:
        data = struct.pack(">%dQ" % new_l1_size, *new_l1)
        ed.pwrite(l1_at * cs, data + bytes(new_l1_clusters * cs - len(data)))
        ed.sync()
        ed.pwrite(36, struct.pack(">IQ", new_l1_size, l1_at * cs))
        ed.sync()
        ed.header.l1_table_offset = l1_at * cs
    else:
        if new_l1_size > hdr.l1_size:
            tail = new_l1[hdr.l1_size:]
            ed.pwrite(old_l1_offset + 8 * hdr.l1_size, struct.pack(">%dQ" % len(tail), *tail))
        for l1_index in sorted(l2_offsets):
            if l1_index < hdr.l1_size:
                ed.pwrite(old_l1_offset + 8 * l1_index, struct.pack(">Q", new_l1[l1_index]))
        ed.sync()
        if new_l1_size != hdr.l1_size:
            ed.pwrite(36, struct.pack(">I", new_l1_size))
            ed.sync()
    old_l1_size = hdr.l1_size
    ed.header.l1_size = new_l1_size
    ed.l1 = new_l1

    # Step 5 (after the caller's size write is fine too): release what is no longer used.
    released = 0
    if relocate_l1 and old_l1_size:
        ed.release(old_l1_offset // cs, old_l1_clusters)
        released += old_l1_clusters
    if reft_clusters:
        pass  # released inside _count_clusters right after the switch
    if released:
        ed.sync()
    result["appended_clusters"] = end - start
    return result


def _count_clusters(ed, start, end, needed, blocks_at, reft_at, reft_clusters):
    """Step 1: refcount 1 for clusters [start, end); new blocks at blocks_at.., table at reft_at."""
    cs = ed.cs
    hdr = ed.header
    new_entries = {}
    for k, index in enumerate(needed):
        new_entries[index] = (blocks_at + k) * cs
    # Patch existing blocks that cover part of the range.
    first_index = start // ed.rb_entries
    last_index = div_round_up(end, ed.rb_entries) - 1
    for index in range(first_index, last_index + 1):
        lo = max(start, index * ed.rb_entries) - index * ed.rb_entries
        hi = min(end, (index + 1) * ed.rb_entries) - index * ed.rb_entries
        if index in new_entries:
            block = bytearray(cs)
            set_range(block, lo, hi, 1, ed.order)
            ed.pwrite(new_entries[index], bytes(block))
            ed._blocks[index] = block
        else:
            block = ed.refblock(index)
            set_range(block, lo, hi, 1, ed.order)
            ed.pwrite(ed.reftable[index] & C.REFT_OFFSET_MASK, bytes(block))
    ed.sync()
    if reft_clusters:
        table = list(ed.reftable) + [0] * (reft_clusters * cs // 8 - len(ed.reftable))
        for index, offset in new_entries.items():
            table[index] = offset
        ed.pwrite(reft_at * cs, struct.pack(">%dQ" % len(table), *table))
        ed.sync()
        old_offset, old_clusters = hdr.refcount_table_offset, hdr.refcount_table_clusters
        ed.pwrite(48, struct.pack(">QI", reft_at * cs, reft_clusters))
        ed.sync()
        ed.reftable = table
        hdr.refcount_table_offset = reft_at * cs
        hdr.refcount_table_clusters = reft_clusters
        ed.release(old_offset // cs, old_clusters)
        ed.sync()
    elif new_entries:
        for index, offset in sorted(new_entries.items()):
            ed.reftable[index] = offset
            ed.pwrite(hdr.refcount_table_offset + 8 * index, struct.pack(">Q", offset))
        ed.sync()


def raise_allocation(path, mode):
    """Bring every mapped data cluster to `mode` ('falloc' or 'full') without touching data.

    falloc: fallocate each contiguous host run of data clusters (allocating already
    allocated blocks changes nothing). full: write zeros only into holes and unwritten
    extents of those runs.
    """
    if mode not in ("falloc", "full"):
        raise Qcow2Error("preallocation: can only raise to falloc or full in place",
                         option="preallocation")
    fd, lock = open_locked(path)
    try:
        ed = Editor(fd, path)
        if ed.external:
            raise Qcow2Error("%s: the data lives in an external data file; raise its "
                             "allocation there" % path, path=path)
        runs = list(data_runs(ed))
        method = "fallocate"
        fiemap_used = True
        zero_bytes = 0
        for offset, length in runs:
            if mode == "falloc":
                try:
                    fileops.fallocate(fd, offset, length)
                except OSError as exc:
                    if not fileops.is_not_supported(exc):
                        raise
                    method = "zero-writes into holes (fallocate not supported)"
                    segments = list(_holes(fd, offset, length))
                    for o, n in segments:
                        _write_zeros(fd, o, n)
                        zero_bytes += n
            else:
                segments, used = fileops.unbacked_segments(fd, offset, length)
                fiemap_used = fiemap_used and used
                for o, n in segments:
                    _write_zeros(fd, o, n)
                    zero_bytes += n
                method = "zero-writes into holes and unwritten extents" if fiemap_used \
                    else "zero-writes into holes (no FIEMAP: unwritten extents not seen)"
        os.fsync(fd)
        return {"method": method, "runs": len(runs), "zero_bytes": zero_bytes,
                "data_bytes": sum(n for _off, n in runs)}
    finally:
        close_locked(fd, lock)


def _holes(fd, offset, length):
    pos = offset
    for o, n in fileops.data_segments(fd, offset, length):
        if o > pos:
            yield pos, o - pos
        pos = o + n
    if pos < offset + length:
        yield pos, offset + length - pos


def _write_zeros(fd, offset, length):
    from .writer import write_zeros
    write_zeros(fd, offset, length)


def data_runs(ed):
    """Yield (host offset, length) of contiguous runs of mapped, uncompressed data clusters."""
    cs = ed.cs
    clusters = div_round_up(ed.header.size, cs)
    run_start = run_len = 0
    for l1_index in range(min(len(ed.l1), div_round_up(clusters, ed.per_l2))):
        table = ed.read_l2(l1_index)
        if table is None:
            continue
        count = min(ed.per_l2, clusters - l1_index * ed.per_l2)
        values = struct.unpack(">%dQ" % (count * ed.entry_size // 8),
                               table[:count * ed.entry_size])[::ed.entry_size // 8]
        first = values[0] & C.L2E_OFFSET_MASK
        expected = first + (count - 1) * cs
        if first and (values[-1] & C.L2E_OFFSET_MASK) == expected and \
                not any(v & C.OFLAG_COMPRESSED for v in values[:1]) and \
                _is_progression(values, first, cs):
            offsets = ((first, count),)
        else:
            offsets = []
            for v in values:
                if v & C.OFLAG_COMPRESSED or not v & C.L2E_OFFSET_MASK:
                    continue
                offsets.append((v & C.L2E_OFFSET_MASK, 1))
        for host, n in offsets:
            if run_len and host == run_start + run_len * cs:
                run_len += n
            else:
                if run_len:
                    yield run_start, run_len * cs
                run_start, run_len = host, n
    if run_len:
        yield run_start, run_len * cs


def _is_progression(values, first, cs):
    for k, v in enumerate(values):
        if (v & C.L2E_OFFSET_MASK) != first + k * cs or v & C.OFLAG_COMPRESSED:
            return False
    return True


__all__ = ["grow", "fill", "raise_allocation", "data_runs", "Editor"]
