# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""`allocation_state`: how far an image is preallocated (mapped clusters, host blocks behind
them, unwritten extents) and whether it holds guest data."""

import errno
import os
import stat
import struct

from ..format import constants as C
from ..format.errors import Qcow2Error
from .image import Opened, guard, st_blocks_bytes
from ..format.l2runs import (COMPRESSED, L2_BITMAP_ALL_ALLOC, NORMAL, UNALLOCATED, ZERO_ALLOC,
                             ZERO_PLAIN, ceil_div, decode_refblock, zeros)
from .mapping import guest_runs, seek_segments

try:
    import fcntl
except ImportError:  # pragma: no cover - non-Unix
    fcntl = None

__all__ = ["allocation_state", "tail_leaks", "data_end", "chain_data_end"]

DEFAULT_SCAN_LIMIT = 256 * 1024 * 1024  # bytes of written data allocation_state may read

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HDR = struct.Struct("=QQIIII")
_FIEMAP_EXT = struct.Struct("=QQQQQI12x")
FIEMAP_BATCH = 512


def _is_device(fd):
    try:
        return stat.S_ISBLK(os.fstat(fd).st_mode)
    except OSError:
        return False


def _fiemap(fd, start, end):
    """Yield (logical, length, flags) of the extents overlapping [start, end)."""
    buf = bytearray(_FIEMAP_HDR.size + FIEMAP_BATCH * _FIEMAP_EXT.size)
    pos = start
    while pos < end:
        _FIEMAP_HDR.pack_into(buf, 0, pos, end - pos, 0, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _FIEMAP_HDR.unpack_from(buf, 0)[3]
        if not mapped:
            return
        last_end = pos
        done = False
        for i in range(min(mapped, FIEMAP_BATCH)):
            logical, _phys, length, _r1, _r2, flags = _FIEMAP_EXT.unpack_from(
                buf, _FIEMAP_HDR.size + i * _FIEMAP_EXT.size)
            yield logical, length, flags
            last_end = max(last_end, logical + length)
            if flags & FIEMAP_EXTENT_LAST:
                done = True
        if done or last_end <= pos:
            return
        pos = last_end


def _merge_ranges(ranges):
    ranges.sort()
    merged = []
    for a, b in ranges:
        if merged and a <= merged[-1][1]:
            if b > merged[-1][1]:
                merged[-1][1] = b
        else:
            merged.append([a, b])
    return merged


def _intersect(ranges, a, b):
    """Parts of [a, b) covered by sorted, disjoint `ranges` (list of [x, y])."""
    out = []
    lo, hi = 0, len(ranges)
    while lo < hi:
        mid = (lo + hi) // 2
        if ranges[mid][1] <= a:
            lo = mid + 1
        else:
            hi = mid
    i = lo
    while i < len(ranges) and ranges[i][0] < b:
        x, y = max(a, ranges[i][0]), min(b, ranges[i][1])
        if x < y:
            out.append((x, y))
        i += 1
    return out


def _has_nonzero(img, ranges, budget):
    """(found, exhausted): whether any byte of `ranges` is non-zero, within `budget` bytes."""
    chunk = 1 << 20
    for a, b in ranges:
        pos = a
        while pos < b:
            n = min(chunk, b - pos)
            if budget < n:
                return None
            budget -= n
            if img.read(pos, n) != zeros(n):
                return True
            pos += n
    return False


@guard
def allocation_state(path, image=None, scan_limit=DEFAULT_SCAN_LIMIT):
    """How far the image is preallocated and whether it holds guest data.

    Returns a dict with keys preallocation ("off" < "metadata" < "falloc" < "full", the
    highest level the image satisfies), guest_data, method, mapped_clusters, total_clusters,
    unallocated_host_bytes and unwritten_host_bytes (None without FIEMAP).

    guest_data is True when some data cluster may hold written data. Written host ranges are
    read (up to `scan_limit` bytes) and count only if not all zero; past the limit the answer
    is True. With an external data file only the L2 tables are judged.
    """
    with Opened(path, image) as img:
        cs = img.cluster_size
        total = ceil_div(img.virtual_size, cs)
        mapped = 0
        compressed = False
        host_ranges = []     # host ranges of allocated clusters (normal and zero-alloc)
        data_ranges = []     # host ranges that may hold guest data
        any_data_cluster = False
        fall_through = 0     # clusters that read from the backing file and have no host cluster
        for idx, n, entry, bitmap in guest_runs(img, img.virtual_size):
            ctype = img.cluster_type(entry)
            if ctype == UNALLOCATED and img.backing_file and not img.extended_l2:
                fall_through += n
            if ctype == COMPRESSED:
                mapped += n
                compressed = True
                continue
            if ctype == ZERO_PLAIN and idx == 0 and img.has_data_file:
                # An external data file maps every guest cluster at its own offset: guest
                # cluster 0 flagged zero at host offset 0 is mapped (as an encrypted image's
                # preallocated entries are), though its entry cannot say so.
                mapped += 1
                continue
            if ctype not in (NORMAL, ZERO_ALLOC):
                continue
            mapped += n
            off0 = entry & C.L2E_OFFSET_MASK
            host_ranges.append((off0, off0 + n * cs))
            if img.extended_l2:
                has_data = ctype == NORMAL and bool(bitmap & L2_BITMAP_ALL_ALLOC) and \
                    not (bitmap >> 32) & bitmap
                if has_data and bitmap & L2_BITMAP_ALL_ALLOC != L2_BITMAP_ALL_ALLOC:
                    sub = cs // 32
                    for k in range(n):
                        for sc in range(32):
                            if bitmap & (1 << sc) and not bitmap & (1 << (32 + sc)):
                                base = off0 + k * cs + sc * sub
                                data_ranges.append((base, base + sub))
                    any_data_cluster = True
                    continue
            else:
                has_data = ctype == NORMAL
            if has_data:
                any_data_cluster = True
                data_ranges.append((off0, off0 + n * cs))
        result = {
            "preallocation": "off", "guest_data": False, "method": "",
            "mapped_clusters": mapped, "total_clusters": total,
            "unallocated_host_bytes": None, "unwritten_host_bytes": None,
            "fall_through_clusters": fall_through,
        }
        complete = mapped >= total
        if img.has_data_file:
            result["method"] = "l2 tables only (the external data file is not inspected)"
            result["preallocation"] = "metadata" if complete else "off"
            result["guest_data"] = compressed or any_data_cluster
            return result
        if img.fd is None:
            raise Qcow2Error("allocation_state needs a file descriptor", path=path)
        if _is_device(img.fd):
            # Every block of a device exists and holds bytes: nothing is a hole or unwritten.
            result["method"] = "block device (every block allocated)"
            result["unallocated_host_bytes"] = result["unwritten_host_bytes"] = 0
            result["preallocation"] = "full" if complete else "off"
            found = _has_nonzero(img, _merge_ranges(data_ranges), scan_limit)
            result["guest_data"] = compressed or found is None or found
            return result
        host = _merge_ranges(host_ranges)
        data_merged = _merge_ranges(data_ranges)
        holes = 0
        unwritten = 0
        written = []         # host ranges with written (not hole, not unwritten) bytes
        method = "seek"
        extents = None
        if fcntl is not None and host:
            try:
                extents = []
                for logical, length, flags in _fiemap(img.fd, host[0][0],
                                                      min(host[-1][1], img.file_size)):
                    extents.append((logical, logical + length, flags))
                method = "fiemap"
            except (OSError, IOError) as exc:
                if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL,
                                     errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                    raise
                extents = None
        if extents is not None:
            ext_ranges = _merge_ranges([(a, b) for a, b, _f in extents])
            unw_ranges = _merge_ranges([(a, b) for a, b, f in extents
                                        if f & FIEMAP_EXTENT_UNWRITTEN])
            wr_ranges = _merge_ranges([(a, b) for a, b, f in extents
                                       if not f & FIEMAP_EXTENT_UNWRITTEN])
            for a, b in host:
                covered = sum(y - x for x, y in _intersect(ext_ranges, a, min(b, img.file_size)))
                holes += (b - a) - covered
                unwritten += sum(y - x for x, y in _intersect(unw_ranges, a, b))
            for a, b in data_merged:
                written.extend(_intersect(wr_ranges, a, min(b, img.file_size)))
            result["unwritten_host_bytes"] = unwritten
        else:
            try:
                for a, b in host:
                    for x, y, is_data in seek_segments(img, a, b):
                        if not is_data:
                            holes += y - x
                for a, b in data_merged:
                    for x, y, is_data in seek_segments(img, a, b):
                        if is_data:
                            written.append((x, y))
            except OSError:
                method = "st_blocks"
                need = sum(b - a for a, b in host)
                if st_blocks_bytes(img) < need:
                    holes = need
                written = [(a, min(b, img.file_size)) for a, b in data_merged
                           if a < img.file_size]
        result["unallocated_host_bytes"] = holes
        result["method"] = method if host else "l2 tables (no host data clusters to inspect)"
        if not host:
            result["unwritten_host_bytes"] = 0
        if complete:
            if holes:
                result["preallocation"] = "metadata"
            elif (method == "fiemap" or not host) and not unwritten:
                result["preallocation"] = "full"
            else:
                result["preallocation"] = "falloc"
        if compressed:
            result["guest_data"] = True
        elif written:
            found = _has_nonzero(img, written, scan_limit)
            result["guest_data"] = True if found is None else found
        return result


# ---------------------------------------------------------------------------------------------
# leaks at the end of the file


def _last_refcounted(img):
    """The last host cluster with a non-zero stored refcount (-1 when none)."""
    per = img.refblock_entries
    order = img.header.refcount_order
    for index in range(img.reftable_entries - 1, -1, -1):
        offset = img.reftable_entry(index) & C.REFT_OFFSET_MASK
        if not offset:
            continue
        vals, _big = decode_refblock(img.read(offset, img.cluster_size), order)
        last = len(vals.rstrip(b"\0")) - 1
        if last >= 0:
            return index * per + last
    return -1


class _Highest(object):
    """The highest host cluster a structure references, raised as structures are seen."""

    def __init__(self, cs):
        self.cs = cs
        self.cluster = 0

    def add(self, offset, length):
        if length > 0:
            self.cluster = max(self.cluster, (offset + length - 1) // self.cs)


def _metadata_highest(img):
    hdr = img.header
    cs = img.cluster_size
    top = _Highest(cs)
    top.add(0, cs)
    top.add(hdr.l1_table_offset, hdr.l1_size * 8)
    top.add(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
    top.add(img.crypto_offset, img.crypto_length)
    for index in range(img.reftable_entries):
        top.add(img.reftable_entry(index) & C.REFT_OFFSET_MASK, cs)
    return top


def _l1_reversed(img, chunk=1 << 16):
    """The active L1 entries, last first, read in chunks."""
    hdr = img.header
    for start in reversed(range(0, hdr.l1_size, chunk)):
        n = min(chunk, hdr.l1_size - start)
        data = img.read(hdr.l1_table_offset + start * 8, n * 8)
        yield from reversed(struct.unpack(">%dQ" % n, data))


@guard
def tail_leaks(path, image=None):
    """The cheap scan for clusters leaked at the end of the file (what an interrupted change
    leaves): clusters past the highest one anything references whose refcount is not zero.

    Returns {"clusters": n, "first": first leaked cluster, "end": last refcounted + 1,
    "scanned": True}, or {"scanned": False, "reason": ...} when the scan would not be exact
    (internal snapshots, persistent bitmaps, a dirty image: their references are not walked
    here, or the stored refcounts are stale). The L2 tables are read last to first and the
    walk stops as soon as something references the last refcounted cluster, so an image
    without leaks usually costs one table.
    """
    with Opened(path, image) as img:
        hdr = img.header
        if hdr.nb_snapshots or img.nb_bitmaps or \
                hdr.incompatible_features & C.INCOMPAT_DIRTY:
            return {"scanned": False, "clusters": 0,
                    "reason": "internal snapshots, bitmaps or a dirty image: not scanned"}
        cs = img.cluster_size
        last = _last_refcounted(img)
        top = _metadata_highest(img)
        external = img.has_data_file
        for entry in _l1_reversed(img):
            if top.cluster >= last:
                break
            l2_off = entry & C.L1E_OFFSET_MASK
            if not l2_off:
                continue
            top.add(l2_off, cs)
            if external:
                continue
            for _idx, n, desc, _bitmap in img.l2_runs(img.read_l2(l2_off)):
                ctype = img.cluster_type(desc)
                if ctype == COMPRESSED:
                    top.add(*img.compressed_range(desc))
                elif ctype in (NORMAL, ZERO_ALLOC) and desc & C.L2E_OFFSET_MASK:
                    top.add(desc & C.L2E_OFFSET_MASK, n * cs)
        if last <= top.cluster:
            return {"scanned": True, "clusters": 0, "in_file": 0, "first": top.cluster + 1,
                    "end": last + 1}
        per = img.refblock_entries
        order = hdr.refcount_order
        leaked = 0
        first = top.cluster + 1
        file_clusters = ceil_div(img.file_size, cs)
        in_file = 0
        for index in range(first // per, last // per + 1):
            offset = img.reftable_entry(index) & C.REFT_OFFSET_MASK
            if not offset:
                continue
            vals, _big = decode_refblock(img.read(offset, cs), order)
            lo = max(first, index * per) - index * per
            hi = min(last + 1, (index + 1) * per) - index * per
            leaked += (hi - lo) - vals.count(0, lo, hi)
            hi = min(hi, file_clusters - index * per)
            if hi > lo:
                in_file += (hi - lo) - vals.count(0, lo, hi)
        # Clusters counted past the end of the file are leaks too (a run killed before it
        # extended the file leaves them), though qemu-img check does not count them.
        return {"scanned": True, "clusters": leaked, "in_file": in_file, "first": first,
                "end": last + 1}


# ---------------------------------------------------------------------------------------------
# where guest data ends (for shrinking)


def _segments(img, a, b):
    """(start, end) of the written parts of host bytes [a, b); the whole range when the
    filesystem cannot say."""
    try:
        return [(x, y) for x, y, is_data in seek_segments(img, a, b) if is_data]
    except OSError:
        return [(a, b)]


def _last_nonzero(img, host, length, budget):
    """Bytes from `host` up to and including the last non-zero byte of [host, host+length):
    0 when all read zeros, None when the budget ran out first."""
    chunk = 1 << 20
    for x, y in reversed(_segments(img, host, min(host + length, img.file_size))):
        pos = y
        while pos > x:
            n = min(chunk, pos - x)
            if budget[0] < n:
                return None
            budget[0] -= n
            data = img.read(pos - n, n)
            if data != zeros(n):
                return pos - n + len(data.rstrip(b"\0")) - host
            pos -= n
    return 0


@guard
def data_end(path, image=None, scan_limit=DEFAULT_SCAN_LIMIT):
    """The guest offset just past the last byte that may hold guest data (0: none).

    Compressed clusters count as data; data clusters count up to their last non-zero written
    byte (holes and unwritten extents read zeros and are skipped). At most `scan_limit` bytes
    are read, scanning from the end; past it the answer is conservative (the end of the cluster
    being scanned). With an external data file the tables alone decide.
    """
    with Opened(path, image) as img:
        cs = img.cluster_size
        vsize = img.virtual_size
        runs = []
        for idx, n, entry, bitmap in guest_runs(img, vsize):
            ctype = img.cluster_type(entry)
            if ctype == COMPRESSED:
                runs.append((idx, n, None))
            elif ctype == NORMAL and not (img.extended_l2 and
                                          not bitmap & L2_BITMAP_ALL_ALLOC):
                runs.append((idx, n, entry & C.L2E_OFFSET_MASK))
        budget = [scan_limit]
        for idx, n, host in reversed(runs):
            if host is None or img.has_data_file:
                return min((idx + n) * cs, vsize)
            end = _last_nonzero(img, host, n * cs, budget)
            if end is None:
                return min((idx + n) * cs, vsize)
            if end:
                return min(idx * cs + end, vsize)
        return 0


MAX_CHAIN = C.MAX_BACKING_CHAIN


class _RawLayer(object):
    """A raw backing file seen through the reads `_last_nonzero` makes."""

    def __init__(self, fd, size):
        self.fd = fd
        self.file_size = size

    def read(self, offset, length):
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))


def chain_data_end(img, scan_limit=DEFAULT_SCAN_LIMIT):
    """Like `data_end`, but through the backing chain: where what the guest of `img` reads
    stops holding non-zero bytes, its own clusters and those that fall through to a backing
    file alike. Conservative: the image's zero clusters are not credited with hiding the
    backing file's bytes. Raises Qcow2Error when a backing file cannot be read (then nobody can
    tell what the guest reads there)."""
    end = data_end(img.path, image=img, scan_limit=scan_limit)
    if not img.backing_file:
        return end
    base_end = _backing_data_end(img, 1, scan_limit)
    return max(end, min(base_end, img.virtual_size))


def _backing_data_end(img, depth, scan_limit):
    from .image import Image, _has_protocol, path_combine
    name = img.backing_file
    what = "the backing file %s of %s" % (name, img.path)
    if depth >= MAX_CHAIN:     # the top image is depth 0
        raise Qcow2Error("%s: the backing chain is longer than %d images" % (what, MAX_CHAIN),
                         option="size", path=img.path)
    if name.startswith("json:") or _has_protocol(name):
        raise Qcow2Error("%s is given by a protocol, which this engine does not read" % what,
                         option="size", path=img.path)
    fmt = img.backing_fmt
    path = path_combine(img.path, name)
    if fmt == "raw":
        return _raw_data_end(path, what, scan_limit)
    if fmt != "qcow2":
        raise Qcow2Error("%s has %s; only raw and qcow2 backing files are read"
                         % (what, "no recorded format" if not fmt else "format %r" % fmt),
                         option="size", path=img.path)
    try:
        base = Image.open(path, follow=True)
    except Qcow2Error as exc:
        raise Qcow2Error("%s cannot be read: %s" % (what, exc), option="size", path=img.path)
    with base:
        end = data_end(path, image=base, scan_limit=scan_limit)
        if base.backing_file:
            end = max(end, min(_backing_data_end(base, depth + 1, scan_limit),
                               base.virtual_size))
        return end


def _raw_data_end(path, what, scan_limit):
    from . import nodes
    try:
        fd, st = nodes.open_checked(path, os.O_RDONLY, follow=True)
    except Qcow2Error as exc:
        raise Qcow2Error("%s cannot be read: %s" % (what, exc), option="size")
    try:
        size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        try:
            end = _last_nonzero(_RawLayer(fd, size), 0, size, [scan_limit])
        except OSError as exc:
            raise Qcow2Error("%s cannot be read: %s" % (what, exc.strerror or exc),
                             option="size")
        return size if end is None else end
    finally:
        os.close(fd)
