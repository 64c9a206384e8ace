# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""`block_map` (qemu-img map) and the guest walk it shares with allocation_state: which guest
ranges are unallocated, zero, data or compressed, and where they live in the file."""

import errno
import os
import struct

from ..format import constants as C
from ..format.errors import Qcow2Error
from .image import Opened, guard, st_blocks_bytes
from ..format.l2runs import (COMPRESSED, L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZERO, NORMAL, UNALLOCATED,
                             ZERO_ALLOC, ZERO_PLAIN, ceil_div, decode_refblock, progression_run,
                             zeros)

__all__ = ["block_map", "guest_runs"]

# Subcluster types used by the map.
SUB_UNALLOC_PLAIN, SUB_UNALLOC_ALLOC, SUB_ZERO_PLAIN, SUB_ZERO_ALLOC, SUB_NORMAL, \
    SUB_COMPRESSED, SUB_INVALID = range(7)


# L2 tables that follow each other in the file are read this many bytes at a time: few reads
# and comparisons, and a batch still fits the CPU's cache while it is compared (4 MiB batches
# were slower than 256 KiB ones, and than one table at a time).
L2_BATCH_BYTES = 256 << 10


def guest_runs(img, limit_bytes):
    """Yield (first guest cluster, count, descriptor, bitmap) covering the guest clusters of
    [0, limit_bytes), with L1 holes as unallocated runs.

    L2 tables that lie one after the other in the file (what preallocation writes) are read
    in batches of L2_BATCH_BYTES, and a batch that is one progression of allocated clusters
    is recognised with one comparison of all its bytes (l2runs.progression_run); any other
    batch is decoded table by table. Every entry is looked at either way."""
    cs = img.cluster_size
    per_l2 = img.l2_entries
    total = ceil_div(limit_bytes, cs)
    n_l1 = min(img.header.l1_size, ceil_div(total, per_l2))
    batch = max(1, L2_BATCH_BYTES // cs)
    for start, data in img.l1_chunks():
        if start >= n_l1:
            break
        n = min(len(data) // 8, n_l1 - start)
        if data[:n * 8] == zeros(n * 8):
            base = start * per_l2
            count = min(n * per_l2, total - base)
            if count > 0:
                yield base, count, 0, 0
            continue
        vals = struct.unpack(">%dQ" % n, data[:n * 8])
        k = 0
        while k < n:
            entry = vals[k]
            base = (start + k) * per_l2
            count = min(per_l2, total - base)
            l2_off = entry & C.L1E_OFFSET_MASK
            if not l2_off:
                yield base, count, 0, 0
                k += 1
                continue
            if l2_off & (cs - 1):
                raise Qcow2Error("corrupt image: L2 table offset %#x unaligned (L1 index %#x)"
                                 % (l2_off, start + k), path=img.path)
            # The whole tables (all their entries inside the limit) that follow this one in
            # the file, for one read.
            m = 1
            while m < batch and k + m < n and base + (m + 1) * per_l2 <= total and \
                    vals[k + m] & C.L1E_OFFSET_MASK == l2_off + m * cs:
                m += 1
            if m == 1 or count < per_l2:
                for idx, r, e, bm in img.l2_runs(img.read_l2(l2_off)):
                    if idx >= count:
                        break
                    yield base + idx, min(r, count - idx), e, bm
                k += 1
                continue
            tables = img.read(l2_off, m * cs)
            run = progression_run(img, tables)
            if run is not None:
                first, bitmap = run
                for j in range(m):
                    yield base + j * per_l2, per_l2, first + j * per_l2 * cs, bitmap
            else:
                for j in range(m):
                    for idx, r, e, bm in img.l2_runs(tables[j * cs:(j + 1) * cs]):
                        yield base + j * per_l2 + idx, r, e, bm
            k += m
    if n_l1 * per_l2 < total:
        yield n_l1 * per_l2, total - n_l1 * per_l2, 0, 0


def _sub_type(img, ctype, bitmap, sc):
    if ctype == COMPRESSED:
        return SUB_COMPRESSED
    if not img.extended_l2:
        return {ZERO_PLAIN: SUB_ZERO_PLAIN, ZERO_ALLOC: SUB_ZERO_ALLOC, NORMAL: SUB_NORMAL,
                UNALLOCATED: SUB_UNALLOC_PLAIN}[ctype]
    if ctype == NORMAL:
        if (bitmap >> 32) & bitmap:
            return SUB_INVALID
        if bitmap & (1 << (32 + sc)):
            return SUB_ZERO_ALLOC
        if bitmap & (1 << sc):
            return SUB_NORMAL
        return SUB_UNALLOC_ALLOC
    if bitmap & L2_BITMAP_ALL_ALLOC:
        return SUB_INVALID
    if bitmap & (1 << (32 + sc)):
        return SUB_ZERO_PLAIN
    return SUB_UNALLOC_PLAIN


def _run_pieces(img, idx, n, entry, bitmap):
    """Yield (first guest byte, length, subcluster type, host offset or None) for a run."""
    cs = img.cluster_size
    ctype = img.cluster_type(entry)
    host0 = entry & C.L2E_OFFSET_MASK if ctype in (NORMAL, ZERO_ALLOC) else None
    if host0 is not None and host0 & (cs - 1):
        raise Qcow2Error("corrupt image: cluster allocation offset %#x unaligned (guest offset "
                         "%#x)" % (host0, idx * cs), path=img.path)
    uniform = (not img.extended_l2 or ctype == COMPRESSED or
               bitmap in (0, L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZERO) or
               (bitmap >> 32) & bitmap or
               (ctype == UNALLOCATED and bitmap & L2_BITMAP_ALL_ALLOC))
    if uniform:
        t = _sub_type(img, ctype, bitmap, 0)
        if ctype == COMPRESSED:
            for k in range(n):
                yield (idx + k) * cs, cs, t, None
        else:
            yield idx * cs, n * cs, t, host0
        return
    sub = cs // 32
    for k in range(n):
        for sc in range(32):
            t = _sub_type(img, ctype, bitmap, sc)
            host = None if host0 is None else host0 + k * cs + sc * sub
            yield (idx + k) * cs + sc * sub, sub, t, host


def _detect_metadata_prealloc(img):
    """qcow2_detect_metadata_preallocation: many more refcounted clusters than disk blocks."""
    cs = img.cluster_size
    real = st_blocks_bytes(img) // cs
    threshold = max(real * 10 // 9, real + 2)
    end = ceil_div(img.file_size, cs)
    per = img.refblock_entries
    count = 0
    for r in range(ceil_div(end, per)):
        if count >= threshold:
            break
        offset = img.reftable_entry(r) & C.REFT_OFFSET_MASK
        if not offset:
            continue
        if offset & (cs - 1):
            return False
        vals, _width = decode_refblock(img.read(offset, cs), img.header.refcount_order)
        m = min(per, end - r * per)
        count += m - vals.count(0, 0, m)
    return count >= threshold


def seek_segments(img, a, b):
    """Yield (start, end, is_data) for host bytes [a, b) using SEEK_DATA/SEEK_HOLE."""
    fd = img.fd
    size = img.file_size
    pos = a
    while pos < b:
        if pos >= size:
            yield pos, b, False
            return
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                data = size
            else:
                raise
        if data > pos:
            end = min(data, b)
            yield pos, end, False
            pos = end
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        end = min(max(hole, pos + 1), b)
        yield pos, end, True
        pos = end


# ---------------------------------------------------------------------------------------------
# map


@guard
def block_map(path, image=None):
    """A list shaped like `qemu-img map --output=json` (qemu-img 7.2).

    Without opening the backing file, ranges this image leaves unallocated are reported as
    depth 1, present/zero/data false and no offset when there is a backing file. Data clusters
    that QEMU would look up in an external data file (data-file-raw, or metadata-preallocated
    images with a data file) are reported as zero false, since the data file is not opened.
    """
    with Opened(path, image) as img:
        if img.fd is None:
            raise Qcow2Error("block_map needs a file descriptor", path=path)
        vsize = (img.virtual_size // 512) * 512
        backing = bool(img.backing_file)
        crypto = bool(img.header.crypt_method)
        prealloc = _detect_metadata_prealloc(img)
        recurse_local = prealloc and not img.has_data_file
        recurse_external = img.has_data_file and (prealloc or img.data_file_raw)
        out = []

        def emit(start, length, depth, present, zero, data, offset):
            if out:
                cur = out[-1]
                if (cur[2], cur[3], cur[4], cur[5]) == (depth, present, zero, data) and \
                        (cur[6] is None) == (offset is None) and \
                        (offset is None or cur[6] + cur[1] == offset) and \
                        cur[0] + cur[1] == start:
                    cur[1] += length
                    return
            out.append([start, length, depth, present, zero, data, offset])

        for idx, n, entry, bitmap in guest_runs(img, vsize):
            for start, length, t, host in _run_pieces(img, idx, n, entry, bitmap):
                if start >= vsize:
                    break
                length = min(length, vsize - start)
                if t == SUB_INVALID:
                    raise Qcow2Error("corrupt image: invalid subcluster allocation bitmap at "
                                     "guest offset %#x" % start, path=path)
                offset = host if (host is not None and not crypto) else None
                zero = t in (SUB_ZERO_PLAIN, SUB_ZERO_ALLOC)
                data = t in (SUB_NORMAL, SUB_COMPRESSED)
                if not (zero or data):
                    if backing:
                        emit(start, length, 1, False, False, False, None)
                    else:
                        emit(start, length, 0, False, True, False, offset)
                    continue
                if data and offset is not None and recurse_local:
                    for a, b, is_data in seek_segments(img, offset, offset + length):
                        emit(start + a - offset, b - a, 0, True, not is_data, True, a)
                    continue
                if data and offset is not None and recurse_external:
                    emit(start, length, 0, True, False, True, offset)
                    continue
                emit(start, length, 0, True, zero, data, offset)
        if not out:
            out.append([0, 0, 0, False, False, False, None])
        result = []
        for start, length, depth, present, zero, data, offset in out:
            item = {"start": start, "length": length, "depth": depth, "present": present,
                    "zero": zero, "data": data}
            if offset is not None:
                item["offset"] = offset
            result.append(item)
        return result
