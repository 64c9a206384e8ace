# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""`check`: the consistency check, counted like qemu-img check (references per host cluster,
compared with the stored refcounts), in windows so memory stays bounded."""

import struct

from ..format import constants as C
from ..format.errors import Qcow2Error
from .image import BME_OFFSET_MASK, BME_RESERVED_MASK, READ_CHUNK, Opened, guard
from ..format.l2runs import (COMPRESSED, L2_BITMAP_ALL_ALLOC, NORMAL, UNALLOCATED, ZERO_ALLOC,
                             RefcountError, ceil_div, decode_refblock, zeros)

__all__ = ["check"]

WINDOW_CLUSTERS = 1 << 25               # host clusters counted per pass of check
MAX_MESSAGES = 100
_ZEROS = bytes(1 << 20)
_Q = struct.Struct(">Q")
_ONES = b"\1" * (1 << 20)

_INC_TABLE = bytes(list(range(1, 256)) + [255])
_BELOW = [bytes(range(t)) for t in range(256)]


class _Checker(object):
    """One `qemu-img check` run; counts references per host cluster window by window."""

    def __init__(self, img, max_messages):
        self.img = img
        self.cs = img.cluster_size
        self.cb = img.cluster_bits
        self.file_size = img.file_size
        self.nb_clusters = ceil_div(self.file_size, self.cs)
        self.max_messages = max_messages
        self.messages = []
        self.dropped = 0
        self.corruptions = self.leaks = self.check_errors = 0
        self.allocated = self.fragmented = self.compressed = 0
        self.highest = 0
        self.refmax = img.refcount_max
        self.fast_thr = min(self.refmax, 254)
        # Host clusters references can touch: those of the file, plus one partly past EOF.
        self.limit = self.nb_clusters + 1
        self.array_size = self.nb_clusters

    def msg(self, text):
        if len(self.messages) < self.max_messages:
            self.messages.append(text)
        else:
            self.dropped += 1

    def corrupt(self, text, count=1):
        self.corruptions += count
        self.msg(text)
        for _index in range(min(count - 1, self.max_messages)):
            self.msg(text)
        if count - 1 > self.max_messages:
            self.dropped += count - 1 - self.max_messages

    # -- counting ------------------------------------------------------------------------

    def inc_range(self, start, n):
        """Add one reference to host clusters start..start+n-1 (window part only)."""
        lo, hi = self.lo, self.hi
        a = max(start, lo)
        b = min(start + n, hi)
        counts = self.counts
        while a < b:
            e = min(b, a + len(_ZEROS))
            m = e - a
            seg = counts[a - lo:e - lo]
            if seg == _ZEROS[:m]:
                counts[a - lo:e - lo] = _ONES[:m]
            elif not seg.translate(None, _BELOW[self.fast_thr]):
                counts[a - lo:e - lo] = seg.translate(_INC_TABLE)
            else:
                self._inc_slow(a, e)
            a = e

    def _inc_slow(self, a, b):
        lo, counts, big = self.lo, self.counts, self.big
        for j in range(a, b):
            v = counts[j - lo]
            if v == 255:
                v = big[j]
            if v >= self.refmax:
                self.corrupt("ERROR: overflow cluster offset=%#x" % (j << self.cb))
                continue
            v += 1
            if v >= 255:
                counts[j - lo] = 255
                big[j] = v
            else:
                counts[j - lo] = v

    def inc(self, offset, size):
        """qcow2_inc_refcounts_imrt: count one reference to the byte range."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            if self.first:
                self.corrupt("ERROR: counting reference for region exceeding the end of the file "
                             "by one cluster or more: offset %#x size %#x" % (offset, size))
            return
        start = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        if last + 1 > self.array_size:
            self.array_size = last + 1
        self.inc_range(start, last - start + 1)

    def inc_clusters(self, off0, n):
        """References to n consecutive clusters of cluster_size bytes starting at off0."""
        cs = self.cs
        valid = max(0, min(n, ceil_div(self.file_size - off0, cs)))
        if valid < n and self.first:
            for k in range(valid, n):
                self.corrupt("ERROR: counting reference for region exceeding the end of the file "
                             "by one cluster or more: offset %#x size %#x" % (off0 + k * cs, cs))
        if valid <= 0:
            return
        start = off0 >> self.cb
        aligned = not off0 & (cs - 1)
        last = start + valid - 1 + (0 if aligned else 1)
        if last + 1 > self.array_size:
            self.array_size = last + 1
        self.inc_range(start, valid)
        if not aligned:
            self.inc_range(start + 1, valid)

    def count_at(self, cluster):
        v = self.counts[cluster - self.lo]
        return self.big[cluster] if v == 255 else v

    # -- stored refcounts ----------------------------------------------------------------

    def load_stored(self):
        img = self.img
        lo, hi = self.lo, self.hi
        self.stored = stored = bytearray(hi - lo)
        self.stored_big = {}
        self.bad_ranges = []
        per = img.refblock_entries
        order = img.header.refcount_order
        for r in range(lo // per, ceil_div(hi, per)):
            offset = img.reftable_entry(r) & C.REFT_OFFSET_MASK
            if not offset:
                continue
            a = max(lo, r * per)
            b = min(hi, (r + 1) * per)
            if offset & (self.cs - 1):
                self.bad_ranges.append((a, b))
                continue
            vals, big = decode_refblock(img.read(offset, self.cs), order)
            stored[a - lo:b - lo] = vals[a - r * per:b - r * per]
            for k, v in big.items():
                c = r * per + k
                if a <= c < b:
                    self.stored_big[c] = v

    def is_bad(self, cluster):
        for a, b in self.bad_ranges:
            if a <= cluster < b:
                return True
        return False

    def stored_at(self, cluster):
        """Stored refcount of a cluster, from the window or read directly; None on error."""
        if self.lo <= cluster < self.hi:
            if self.bad_ranges and self.is_bad(cluster):
                return None
            v = self.stored[cluster - self.lo]
            return self.stored_big[cluster] if v == 255 else v
        try:
            return self.img.refcount(cluster)
        except RefcountError:
            return None

    def owns(self, cluster):
        """Whether this pass judges checks keyed by `cluster` (each cluster in one pass)."""
        if self.lo <= cluster < self.hi:
            return True
        return self.first and not 0 <= cluster < self.limit

    def check_copied_range(self, off0, n, copied, what):
        """OFLAG_COPIED: the flag must equal (refcount == 1) for n clusters from off0."""
        cb = self.cb
        if self.img.has_data_file:
            if not copied and self.first:
                for k in range(n):
                    self.corrupt("ERROR OFLAG_COPIED %s: l2_entry=%x refcount=1"
                                 % (what, (off0 + k * self.cs)))
            return
        c0 = off0 >> cb
        # Part inside the window: bulk.
        a = max(c0, self.lo)
        b = min(c0 + n, self.hi)
        if a < b:
            seg = self.stored[a - self.lo:b - self.lo]
            ones = seg.count(1)
            bad = (b - a - ones) if copied else ones
            if bad or self.bad_ranges:
                for c in range(a, b):
                    v = self.stored_at(c)
                    if v is None:
                        continue
                    if (v == 1) != copied:
                        self.corrupt("ERROR OFLAG_COPIED %s: offset=%#x refcount=%d"
                                     % (what, c << cb, v))
        # Parts outside every window (beyond the file): first pass, one by one.
        if self.first and c0 + n > self.limit:
            for c in range(max(c0, self.limit), c0 + n):
                v = self.stored_at(c)
                if v is not None and (v == 1) != copied:
                    self.corrupt("ERROR OFLAG_COPIED %s: offset=%#x refcount=%d"
                                 % (what, c << cb, v))

    # -- walking ---------------------------------------------------------------------------

    def walk_l1(self, l1_offset, l1_size, active):
        img = self.img
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8)
        chunk = READ_CHUNK // 8
        for start in range(0, l1_size, chunk):
            n = min(chunk, l1_size - start)
            data = img.read(l1_offset + start * 8, n * 8)
            if data == zeros(len(data)):
                continue
            vals = struct.unpack(">%dQ" % n, data)
            for k, entry in enumerate(vals):
                if entry:
                    self.walk_l1_entry(start + k, entry, active)

    def walk_l1_entry(self, index, entry, active):
        if entry & C.L1E_RESERVED_MASK and self.first:
            self.corrupt("ERROR found L1 entry with reserved bits set: %x" % entry)
        l2_off = entry & C.L1E_OFFSET_MASK
        self.inc(l2_off, self.cs)
        if l2_off & (self.cs - 1) and self.first:
            self.corrupt("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted"
                         % l2_off)
        table = self.img.read_l2(l2_off)
        self.walk_l2(table, active)
        if active and l2_off:
            cluster = l2_off >> self.cb
            if self.owns(cluster):
                v = self.stored_at(cluster)
                if v is not None and (v == 1) != bool(entry & C.OFLAG_COPIED):
                    self.corrupt("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x "
                                 "refcount=%d" % (index, entry, v))

    def walk_l2(self, table, active):
        img = self.img
        cs = self.cs
        first = self.first
        next_contig = 0
        for idx, n, entry, bitmap in img.l2_runs(table):
            ctype = img.cluster_type(entry)
            if ctype != COMPRESSED and entry & C.L2E_STD_RESERVED_MASK and first:
                self.corrupt("ERROR found l2 entry with reserved bits set: %x" % entry, n)
            if ctype == COMPRESSED:
                if entry & C.OFLAG_COPIED:
                    if first:
                        self.corrupt("ERROR: coffset=%#x: copied flag must never be set for "
                                     "compressed clusters" % img.compressed_range(entry)[0])
                    entry &= ~C.OFLAG_COPIED
                if img.has_data_file:
                    if first:
                        self.corrupt("ERROR compressed cluster %d with data file, entry=%#x"
                                     % (idx, entry))
                    continue
                if bitmap:
                    if first:
                        self.corrupt("ERROR compressed cluster %d with non-zero subcluster "
                                     "allocation bitmap, entry=%#x" % (idx, entry))
                    continue
                coffset, csize = img.compressed_range(entry)
                self.inc(coffset, csize)
                if active and first:
                    self.allocated += 1
                    self.compressed += 1
                    self.fragmented += 1
            elif ctype in (NORMAL, ZERO_ALLOC):
                off0 = entry & C.L2E_OFFSET_MASK
                if first:
                    if (bitmap >> 32) & bitmap:
                        self.corrupt("ERROR offset=%x: Allocated cluster has corrupted "
                                     "subcluster allocation bitmap" % off0, n)
                    if off0 & (cs - 1):
                        if img.extended_l2:
                            data = bool(bitmap & L2_BITMAP_ALL_ALLOC)
                        else:
                            data = not entry & C.OFLAG_ZERO
                        kind = "Data" if data else "Preallocated"
                        self.corrupt("ERROR offset=%x: %s cluster is not properly aligned; L2 "
                                     "entry corrupted." % (off0, kind), n)
                    if active:
                        self.allocated += n
                        if next_contig and off0 != next_contig:
                            self.fragmented += 1
                next_contig = off0 + n * cs
                if not img.has_data_file:
                    self.inc_clusters(off0, n)
                if active:
                    self.check_copied_range(off0, n, bool(entry & C.OFLAG_COPIED),
                                            "data cluster")
            elif ctype == UNALLOCATED:
                if bitmap & L2_BITMAP_ALL_ALLOC and first:
                    self.corrupt("ERROR: Unallocated cluster has non-zero subcluster allocation "
                                 "bitmap", n)

    def walk(self):
        img = self.img
        hdr = img.header
        self.inc(0, self.cs)
        self.walk_l1(hdr.l1_table_offset, hdr.l1_size, True)
        if hdr.nb_snapshots:
            snaps, snap_bytes = img.snapshots()
            if img.has_data_file and self.first:
                self.corrupt("ERROR %d snapshots in image with data file" % hdr.nb_snapshots)
            for index, sn in enumerate(snaps):
                if hdr.version >= 3 and sn.get("extra_data_size", 16) < 16 and self.first:
                    self.corrupt("ERROR snapshot table entry %d is incomplete (%d bytes of extra "
                                 "data, a version 3 image needs 16)"
                                 % (index, sn["extra_data_size"]))
                if sn["l1_table_offset"] & (self.cs - 1):
                    if self.first:
                        self.corrupt("ERROR snapshot %s (%s) l1_offset=%#x: L1 table is not "
                                     "cluster aligned; snapshot table entry corrupted"
                                     % (sn["id"], sn["name"], sn["l1_table_offset"]))
                    continue
                if sn["l1_size"] > C.MAX_L1_ENTRIES:
                    if self.first:
                        self.corrupt("ERROR snapshot %s (%s) l1_size=%#x: L1 table is too large; "
                                     "snapshot table entry corrupted"
                                     % (sn["id"], sn["name"], sn["l1_size"]))
                    continue
                self.walk_l1(sn["l1_table_offset"], sn["l1_size"], False)
            self.inc(hdr.snapshots_offset, snap_bytes)
        self.inc(hdr.refcount_table_offset, hdr.refcount_table_clusters * self.cs)
        if img.crypto_length:
            self.inc(img.crypto_offset, img.crypto_length)
        if img.nb_bitmaps:
            self.walk_bitmaps()
        self.walk_refblocks()

    def walk_bitmaps(self):
        img = self.img
        cs = self.cs
        self.inc(img.bitmap_directory_offset, img.bitmap_directory_size)
        try:
            bitmaps = img.bitmaps()
        except Qcow2Error as exc:
            if self.first:
                self.corrupt("ERROR bitmap directory: %s" % exc)
            return
        for bm in bitmaps:
            nbytes = bm["table_size"] * 8
            self.inc(bm["table_offset"], nbytes)
            # Entries past the end of the file read as zeros: only the rest is read.
            inside = max(0, min(nbytes, self.file_size - bm["table_offset"]))
            chunk = READ_CHUNK
            for start in range(0, inside, chunk):
                data = img.read(bm["table_offset"] + start, min(chunk, nbytes - start))
                if data == zeros(len(data)):
                    continue
                for entry in struct.unpack(">%dQ" % (len(data) // 8), data):
                    offset = entry & BME_OFFSET_MASK
                    if entry & BME_RESERVED_MASK or (offset and (entry & 1 or
                                                                 offset & (cs - 1))):
                        if self.first:
                            self.corrupt("ERROR bitmap %s: invalid bitmap table entry %#x"
                                         % (bm["name"], entry))
                        continue
                    if offset:
                        self.inc(offset, cs)

    def walk_refblocks(self):
        img = self.img
        rt = img._reftable
        cs = self.cs
        for i in range(img.reftable_entries):
            entry = _Q.unpack_from(rt, i * 8)[0]
            if not entry:
                continue
            if entry & C.REFT_RESERVED_MASK:
                if self.first:
                    self.corrupt("ERROR refcount table entry %d has reserved bits set" % i)
                continue
            offset = entry & C.REFT_OFFSET_MASK
            if offset & (cs - 1):
                if self.first:
                    self.corrupt("ERROR refcount block %d is not cluster aligned; refcount table "
                                 "entry corrupted" % i)
                continue
            cluster = offset >> self.cb
            if cluster >= self.array_size:
                if self.first:
                    self.corrupt("ERROR refcount block %d is outside image" % i)
                continue
            self.inc(offset, cs)
            if self.lo <= cluster < self.hi:
                v = self.count_at(cluster)
                if v != 1:
                    self.corrupt("ERROR refcount block %d refcount=%d" % (i, v))

    def compare(self):
        lo = self.lo
        end = min(self.hi, self.array_size)
        step = 1 << 16
        for a in range(lo, end, step):
            b = min(end, a + step)
            cseg = self.counts[a - lo:b - lo]
            sseg = self.stored[a - lo:b - lo]
            bad = self.bad_ranges and any(x < b and a < y for x, y in self.bad_ranges)
            if cseg == sseg and not bad and 255 not in cseg:
                used = len(cseg.rstrip(b"\0"))
                if used:
                    self.highest = a + used - 1
                continue
            for c in range(a, b):
                if bad and self.is_bad(c):
                    self.check_errors += 1
                    self.msg("Can't get refcount for cluster %d: Input/output error" % c)
                    continue
                stored = self.stored_at(c)
                refs = self.count_at(c)
                if stored or refs:
                    self.highest = c
                if stored != refs:
                    if stored < refs:
                        self.corruptions += 1
                        self.msg("ERROR cluster %d refcount=%d reference=%d" % (c, stored, refs))
                    else:
                        self.leaks += 1
                        self.msg("Leaked cluster %d refcount=%d reference=%d" % (c, stored, refs))

    def run(self):
        window = WINDOW_CLUSTERS
        self.first = True
        lo = 0
        while True:
            self.lo = lo
            self.hi = min(self.limit, lo + window)
            self.counts = bytearray(self.hi - lo)
            self.big = {}
            self.load_stored()
            self.walk()
            self.compare()
            self.counts = self.stored = None
            self.first = False
            lo = self.hi
            if lo >= self.limit:
                break


@guard
def check(path, image=None, max_messages=MAX_MESSAGES):
    """A dict like `qemu-img check --output=json`, plus "messages" (our own key)."""
    with Opened(path, image) as img:
        chk = _Checker(img, max_messages)
        chk.run()
        result = {"filename": path, "format": "qcow2", "check-errors": chk.check_errors}
        values = (
            ("image-end-offset", (chk.highest + 1) * img.cluster_size),
            ("total-clusters", img.total_clusters),
            ("allocated-clusters", chk.allocated),
            ("fragmented-clusters", chk.fragmented),
            ("compressed-clusters", chk.compressed),
            ("corruptions", chk.corruptions),
            ("leaks", chk.leaks),
        )
        for key, value in values:
            if value:
                result[key] = value
        messages = list(chk.messages)
        if chk.dropped:
            messages.append("... and %d more problems" % chk.dropped)
        result["messages"] = messages
        return result
