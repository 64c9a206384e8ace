# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Creating an image whose guest content is copied from a source (a raw file or device, or a
qcow2 image with its backing chain), with the declared options, size and preallocation.

The new image is written like every new image: to a temporary file in the target directory,
made durable, then linked or renamed into place, so a failure or a kill leaves the old state.

Ranges of the source that read zeros are not copied: the source says which ranges surely read
zeros (holes, zero and unallocated clusters) without reading them, and what it must read is
checked for zeros again, piece by piece, before it is written.

- ``off``: only clusters holding data get host clusters. The layout is computed as the copy
  goes, in guest order: header, L1 table, then for each L2 table in turn the table followed by
  its data clusters, and the refcount blocks and table last (every cluster counted once).
- ``metadata``, ``falloc``, ``full``: the preallocated layout of `planner.plan_create` (every
  guest cluster mapped, data clusters contiguous and in guest order); data is written in place,
  zero ranges stay holes (metadata), fallocated (falloc) or are written as zeros (full). With
  extended L2 the mapped clusters' subclusters are marked allocated, so the copied bytes show.
"""

import os
import struct

from ..format import constants as C
from ..create import writer
from ..create.allocator import div_round_up
from ..format.errors import Qcow2Error
from ..format.header import encode_cluster0, standard_extensions
from ..create.planner import _base_header, l1_entries, plan_create
from ..format.tables import padded, progression, refcount_runs

CHUNK = 8 * 1024 * 1024           # bytes read from the source at a time
PIECE = 64 * 1024                 # zero detection granularity (at least one cluster)
ALL_ALLOC = 0xFFFFFFFF            # extended L2 bitmap: every subcluster allocated


def check_source_fits(opts, source):
    """Refuse declarations a source cannot be copied into."""
    if opts.size < source.size:
        raise Qcow2Error("size: %d bytes is smaller than the source's %d bytes (%s); a copy "
                         "never cuts the guest's disk" % (opts.size, source.size, source.path),
                         option="size")
    if opts.backing_file:
        raise Qcow2Error("source: an image made from a source has no backing file (declare "
                         "either source or backing_file)", option="source")
    if opts.data_file:
        raise Qcow2Error("source: copying a source into an image with an external data file "
                         "is not supported", option="source")


def data_bytes(source):
    """Bytes of the source that may hold data (what a copy reads at most)."""
    return sum(n for _off, n, is_data in source.extents() if is_data)


def plan_for_source(opts):
    """The preallocated plan a copy is written into (None for off)."""
    if opts.effective_preallocation == "off":
        return None
    return plan_create(opts, data_bitmap=ALL_ALLOC if opts.extended_l2 else None)


def check_space(path, opts, source):
    """Refuse up front when the filesystem cannot hold the copy."""
    plan = plan_for_source(opts)
    if plan is not None and plan.mode in ("falloc", "full"):
        need = plan.allocated_bytes
    else:
        need = data_bytes(source) + (plan.file_size - plan.data_length if plan else 0)
    directory = os.path.dirname(os.path.abspath(path))
    from ..create import fileops
    try:
        have = fileops.free_bytes(directory)
    except OSError as exc:
        raise Qcow2Error("%s: cannot check the free space in %s: %s"
                         % (path, directory, exc.strerror or exc), path=path)
    if need > have:
        raise Qcow2Error("not enough free space for the copy: it needs up to %d bytes, the "
                         "filesystem holding %s has %d available" % (need, directory, have),
                         option="source")


def create_from_source(path, opts, source, replace=False, mode=0o644):
    """Create the image at `path` from CreateOptions and an open source; returns a dict."""
    check_source_fits(opts, source)
    if writer.is_block_device_path(path):
        raise Qcow2Error("%s: copying a source onto a block device is not supported" % path,
                         path=path)
    check_space(path, opts, source)
    stats = {"copied_bytes": 0, "zero_bytes_skipped": 0}
    plan = plan_for_source(opts)
    if plan is None:
        def apply(fd):
            result = writer.WriteResult()
            _write_sparse(fd, opts, source, stats)
            result.method = "copy"
            result.detail = "copy of the data clusters (zero ranges left unallocated)"
            result.bytes_written = stats["copied_bytes"]
            return result
        result = writer.create_file(path, None, replace=replace, mode=mode, apply=apply)
        file_size = os.path.getsize(path)
    else:
        def content(fd, plan_, result):
            _copy_into_plan(fd, plan_, source, stats, result)
        result = writer.create_file(path, plan, replace=replace, mode=mode, content=content)
        file_size = plan.file_size
    out = result.as_dict()
    out.update(stats)
    out.update({"path": path, "file_size": file_size, "preallocation": opts.effective_preallocation,
                "virtual_size": opts.size, "cluster_size": opts.cluster_size,
                "source": source.describe()})
    return out


def _pieces(data, base, step):
    """Yield (offset, bytes view) of the non-zero pieces of `data` (which starts at guest
    offset `base`), coalescing neighbours; pieces are `step` bytes."""
    view = memoryview(data)
    zero = bytes(step)
    start = None
    for pos in range(0, len(data), step):
        piece = view[pos:pos + step]
        if piece == zero[:len(piece)]:
            if start is not None:
                yield base + start, view[start:pos]
                start = None
        elif start is None:
            start = pos
    if start is not None:
        yield base + start, view[start:]


def _aligned_extents(source, align):
    """The source's extents with data ranges widened to `align` boundaries (within the
    source), merged, and the zero ranges between them: [(offset, length, is_data)]."""
    data = []
    for off, length, is_data in source.extents():
        if not is_data:
            continue
        a = off - off % align
        b = min(div_round_up(off + length, align) * align, source.size)
        if data and a <= data[-1][1]:
            data[-1][1] = max(data[-1][1], b)
        else:
            data.append([a, b])
    pos = 0
    for a, b in data:
        if a > pos:
            yield pos, a - pos, False
        yield a, b - a, True
        pos = b
    if pos < source.size:
        yield pos, source.size - pos, False


def _source_chunks(source, align):
    """Yield (guest offset, bytes, length) of what the source may hold, in pieces of at most
    CHUNK bytes starting on `align` boundaries, and (offset, None, length) for ranges that
    surely read zeros."""
    for off, length, is_data in _aligned_extents(source, align):
        if not is_data:
            yield off, None, length
            continue
        pos = off
        end = off + length
        while pos < end:
            n = min(CHUNK - pos % CHUNK, end - pos)
            yield pos, source.read(pos, n), n
            pos += n


def _copy_into_plan(fd, plan, source, stats, result):
    """Write the source's data into a preallocated layout (data cluster g at data_offset +
    g * cluster_size); zero ranges per mode."""
    step = max(plan.cluster_size, PIECE)
    base = plan.data_offset
    full = plan.mode == "full"
    if full and _copy_raw_in_kernel(fd, plan, source, stats, result):
        return
    for off, data, length in _source_chunks(source, plan.cluster_size):
        if data is None:
            if full:
                writer.write_zeros(fd, base + off, length, result)
            continue
        if full:
            writer.write_all(fd, data, base + off)
            writer.start_writeback(fd, base + off, length)
            stats["copied_bytes"] += length
            result.bytes_written += length
            continue
        for goff, piece in _pieces(data, off, step):
            writer.write_all(fd, piece, base + goff)
            stats["copied_bytes"] += len(piece)
            result.bytes_written += len(piece)
        # Start writing this chunk to disk now (the disk works while the next one is read).
        writer.start_writeback(fd, base + off, length)
    if full and source.size < plan.data_length:
        writer.write_zeros(fd, base + source.size, plan.data_length - source.size, result)
    _copy_method(plan, result)
    stats["zero_bytes_skipped"] = max(0, plan.options.size - stats["copied_bytes"])


def _copy_raw_in_kernel(fd, plan, source, stats, result):
    """full from a raw source: the layout is the source's own, shifted, so its data extents
    go across with copy_file_range (no copy through this process; zeros inside them are
    copied too, which full writes anyway). False when the kernel or the file systems cannot,
    before anything was written. (falloc keeps zero detection: zeros stay unwritten.)"""
    src_fd = getattr(source, "raw_fd", None)
    if src_fd is None or not hasattr(os, "copy_file_range"):
        return False
    base = plan.data_offset
    first = True
    for off, length, is_data in _aligned_extents(source, plan.cluster_size):
        if not is_data:
            if plan.mode == "full":
                writer.write_zeros(fd, base + off, length, result)
            continue
        pos, end = off, off + length
        while pos < end:
            try:
                n = os.copy_file_range(src_fd, fd, min(end - pos, CHUNK * 4), pos, base + pos)
            except OSError:
                if first:
                    return False
                raise
            first = False
            writer.start_writeback(fd, base + pos, n)
            if n <= 0:
                raise Qcow2Error("source: %s ended early at %d" % (source.path, pos),
                                 option="source")
            pos += n
        stats["copied_bytes"] += length
        result.bytes_written += length
    if plan.mode == "full" and source.size < plan.data_length:
        writer.write_zeros(fd, base + source.size, plan.data_length - source.size, result)
    stats["zero_bytes_skipped"] = max(0, plan.options.size - stats["copied_bytes"])
    _copy_method(plan, result, "copy_file_range of the data")
    return True


def _copy_method(plan, result, how="copy of the data"):
    """Set the result's method word and its prose (`detail`) after a copy into a plan."""
    if plan.mode == "metadata":
        result.method = "copy"
        result.detail = how + " into mapped clusters (zero ranges left as holes)"
    elif plan.mode == "falloc" and not result.fallocate_refused:
        result.method = "copy-fallocate"
        result.detail = "fallocate, then " + how
    else:
        result.method = "copy-zero-writes"
        result.detail = how + ", zeros written elsewhere"
        if result.fallocate_refused:
            result.detail += " (fallocate not supported by the filesystem)"


def _write_sparse(fd, opts, source, stats):
    """preallocation=off: allocate host clusters only for guest clusters that hold data."""
    cs = opts.cluster_size
    esz = C.l2_entry_size(opts.extended_l2)
    per_l2 = cs // esz
    n_l1 = l1_entries(opts.size, cs, opts.extended_l2)
    l1_clusters = div_round_up(n_l1 * 8, cs)
    state = _SparseLayout(fd, cs, esz, per_l2, 1 + l1_clusters, opts.extended_l2)
    l1 = [0] * n_l1
    span = per_l2 * cs
    for off, data, _length in _source_chunks(source, cs):
        if data is None:
            continue
        for goff, piece in _pieces(data, off, cs):
            # One L2 table at a time: its data clusters follow it on the host.
            pos = 0
            while pos < len(piece):
                start = goff + pos
                n = min(len(piece) - pos, (start // span + 1) * span - start)
                table_host = state.map_run(start // cs, div_round_up(n, cs), piece[pos:pos + n])
                if table_host is not None:
                    l1[start // span] = table_host | C.OFLAG_COPIED
                stats["copied_bytes"] += n
                pos += n
    state.finish()
    total_data = state.next
    # Refcount blocks and table at the end; every cluster [0, end) has refcount 1.
    rb_entries = cs * 8 >> opts.refcount_order
    blocks = table = 0
    while True:
        end = total_data + blocks + table
        new_blocks = div_round_up(end, rb_entries)
        new_table = div_round_up(new_blocks * 8, cs)
        if (new_blocks, new_table) == (blocks, table):
            break
        blocks, table = new_blocks, new_table
    if table * cs > C.MAX_REFTABLE_BYTES:
        raise Qcow2Error("size: the refcount table of the copy would exceed 8 MiB; use a larger "
                         "cluster_size", option="size")
    blocks_at, table_at = total_data, total_data + blocks
    _write_chunks(fd, blocks_at * cs,
                  refcount_runs(((0, end),), opts.refcount_order, blocks * cs))
    _write_chunks(fd, table_at * cs, padded(progression(blocks_at * cs, cs, blocks),
                                            table * cs))
    if n_l1:
        data = struct.pack(">%dQ" % n_l1, *l1)
        writer.write_all(fd, data + bytes(l1_clusters * cs - len(data)), cs)
    hdr = _base_header(opts)
    hdr.l1_size = n_l1
    hdr.l1_table_offset = cs if n_l1 else 0
    hdr.refcount_table_offset = table_at * cs
    hdr.refcount_table_clusters = table
    exts = standard_extensions(opts.version, cs, opts.backing_fmt, opts.data_file)
    writer.write_all(fd, encode_cluster0(hdr, exts, opts.backing_file), 0)
    os.ftruncate(fd, end * cs)
    os.fsync(fd)
    stats["zero_bytes_skipped"] = max(0, opts.size - stats["copied_bytes"])


def _write_chunks(fd, offset, chunks):
    for piece in chunks:
        writer.write_all(fd, piece, offset)
        offset += len(piece)


class _SparseLayout(object):
    """Host clusters handed out in guest order: an L2 table before the first data cluster it
    maps, then runs of data clusters written as they come."""

    def __init__(self, fd, cs, esz, per_l2, first_free, extended_l2):
        self.fd = fd
        self.cs = cs
        self.esz = esz
        self.per_l2 = per_l2
        self.next = first_free
        self.tail = ALL_ALLOC if extended_l2 else 0
        self.table_index = None
        self.table = None
        self.table_host = 0

    def map_run(self, guest, count, data):
        """Map guest clusters [guest, guest+count) (within one L2 table) to the next host
        clusters and write `data` there; returns the host offset of an L2 table started for
        them, or None."""
        started = None
        index = guest // self.per_l2
        if index != self.table_index:
            self._flush_table()
            self.table_index = index
            self.table = bytearray(self.cs)
            self.table_host = self.next * self.cs
            self.next += 1
            started = self.table_host
        host = self.next * self.cs
        self.next += count
        pos = (guest % self.per_l2) * self.esz
        self.table[pos:pos + count * self.esz] = b"".join(
            progression(host | C.OFLAG_COPIED, self.cs, count, self.esz, self.tail))
        writer.write_all(self.fd, data, host)
        writer.start_writeback(self.fd, host, len(data))
        return started

    def _flush_table(self):
        if self.table is not None:
            writer.write_all(self.fd, bytes(self.table), self.table_host)
            self.table = None

    def finish(self):
        self._flush_table()


__all__ = ["create_from_source", "check_source_fits", "check_space", "data_bytes"]
