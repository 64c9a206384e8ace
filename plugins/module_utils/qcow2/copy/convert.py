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
  zero ranges stay holes (metadata), fallocated (falloc) or are written as zeros (full).

Zeros are detected at the finest granularity the format and the host offer, like
`qemu-img convert` (which skips zero runs of 4 KiB): within a cluster, aligned all-zero blocks
of the host's block size (4 KiB) are never written, so they stay holes (`off`, `metadata`) or
unwritten (`falloc`); with extended L2 only the subclusters holding data are marked allocated,
the others are left unallocated and read zeros (a copy has no backing file), as qemu-img leaves
them in every preallocation mode. The metadata of `off` copies is written without its all-zero
blocks too.

An encrypted copy (LUKS, `opts.encryption`) has its LUKS header region in its own clusters and
its data clusters encrypted with the master key, each 512-byte sector with the IV of its host
offset (as QEMU's qcow2 driver does for LUKS). A hole or an unwritten block inside an allocated
cluster would decrypt to garbage, so zeros are skipped only by whole clusters (by whole
subclusters with extended L2): a cluster holding any data is encrypted and written whole, zeros
included; the others stay unallocated (`off`) or keep the zero flag the planner gives every
preallocated cluster of an encrypted image (and with extended L2 only the subclusters written
are marked allocated, the others zero).

Into a preallocated layout the data goes out in 2 MiB pieces on a few threads, each piece's
writeback started at once, and a raw source is read into a few reused buffers (see
`_ParallelWrites` and `_RawReader`).
"""

import os
import struct

from ..format import constants as C
from ..create import writer
from ..create import zeroscan
from ..create.allocator import div_round_up
from ..format.errors import Qcow2Error
from ..format.header import Extension, encode_cluster0, standard_extensions
from ..create.planner import _base_header, l1_entries, plan_create
from ..format.tables import padded, progression, refcount_runs

CHUNK = 8 * 1024 * 1024           # bytes read from the source at a time
WRITE_PIECE = 2 * 1024 * 1024     # bytes of data written at a time (qemu-img convert's size)


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


def plan_for_source(opts, luks_header=None):
    """The preallocated plan a copy is written into (None for off). An encrypted copy's plan
    holds `luks_header` (a placeholder of its size when None: for judging the space)."""
    if opts.effective_preallocation == "off":
        return None
    if opts.encryption is not None and luks_header is None:
        luks_header = bytes(opts.encryption.region_size())
    # Extended L2: every subcluster starts unallocated (reads zeros, as qemu-img's copies
    # have it); the subclusters that receive data are marked allocated as they are written.
    return plan_create(opts, luks_header=luks_header)


def check_space(path, opts, source):
    """Refuse up front when the filesystem cannot hold the copy."""
    plan = plan_for_source(opts)
    if plan is not None and plan.mode in ("falloc", "full"):
        need = plan.allocated_bytes
    else:
        need = data_bytes(source) + (plan.file_size - plan.data_length if plan else 0)
        if plan is None and opts.encryption is not None:
            need += opts.encryption.region_size()
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


class _Encrypting(object):
    """What an encrypted copy writes with: the LUKS header region and the sector cipher of its
    master key (luks1.build's pair), and the unit zeros are skipped by (a cluster, or a
    subcluster with extended L2: what an L2 entry says reads zeros). A SectorCipher keeps
    OpenSSL contexts that one thread at a time may use: each writing thread gets its own."""

    def __init__(self, opts, luks):
        import threading
        spec = opts.encryption
        self.region, master_key = luks
        self.args = (spec.cipher_alg, spec.cipher_mode, spec.ivgen_alg, spec.ivgen_hash_alg,
                     master_key)
        self.local = threading.local()
        self.unit = opts.cluster_size // 32 if opts.extended_l2 else opts.cluster_size

    def padded(self, data):
        """`data` (starting on a unit boundary) with zeros up to a unit boundary: the source's
        last cluster is encrypted whole."""
        short = -len(data) % self.unit
        return bytes(data) + bytes(short) if short else data

    def encrypt(self, data, host):
        """The bytes to write at host offset `host` (sector aligned) for plain `data`."""
        cipher = getattr(self.local, "cipher", None)
        if cipher is None:
            from ..crypto.sectors import SectorCipher
            cipher = self.local.cipher = SectorCipher(*self.args)
        return cipher.encrypt(host // 512, bytes(data))


def create_from_source(path, opts, source, replace=False, mode=0o644, luks=None):
    """Create the image at `path` from CreateOptions and an open source; returns a dict.
    An encrypted image (`opts.encryption`) needs `luks`: (LUKS header region, master key)."""
    check_source_fits(opts, source)
    crypt = None
    if opts.encryption is not None:
        if luks is None:
            raise Qcow2Error("encrypt_passphrase: an encrypted copy is made only with a "
                             "passphrase", option="encrypt_passphrase")
        crypt = _Encrypting(opts, luks)
    if writer.is_block_device_path(path):
        raise Qcow2Error("%s: copying a source onto a block device is not supported" % path,
                         path=path)
    check_space(path, opts, source)
    stats = {"copied_bytes": 0, "zero_bytes_skipped": 0}
    plan = plan_for_source(opts, crypt.region if crypt else None)
    if plan is None:
        def apply(fd):
            result = writer.WriteResult()
            _write_sparse(fd, opts, source, stats, crypt)
            result.method = "copy"
            result.detail = "copy of the data clusters (zero ranges left unallocated)"
            result.bytes_written = stats["copied_bytes"]
            return result
        result = writer.create_file(path, None, replace=replace, mode=mode, apply=apply)
        file_size = os.path.getsize(path)
    else:
        def content(fd, plan_, result):
            _copy_into_plan(fd, plan_, source, stats, result, crypt)
        result = writer.create_file(path, plan, replace=replace, mode=mode, content=content)
        file_size = plan.file_size
    out = result.as_dict()
    out.update(stats)
    out.update({"path": path, "file_size": file_size, "preallocation": opts.effective_preallocation,
                "virtual_size": opts.size, "cluster_size": opts.cluster_size,
                "source": source.describe()})
    if crypt is not None:
        out["encrypted"] = True
    return out


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


def _source_chunks(source, align, reader=None):
    """Yield (guest offset, bytes, length) of what the source may hold, in pieces of at most
    CHUNK bytes starting on `align` boundaries, and (offset, None, length) for ranges that
    surely read zeros. `reader(offset, length)` replaces `source.read`."""
    read = reader or source.read
    for off, length, is_data in _aligned_extents(source, align):
        if not is_data:
            yield off, None, length
            continue
        pos = off
        end = off + length
        while pos < end:
            n = min(CHUNK - pos % CHUNK, end - pos)
            yield pos, read(pos, n), n
            pos += n


def _copy_into_plan(fd, plan, source, stats, result, crypt=None):
    """Write the source's data into a preallocated layout (data cluster g at data_offset +
    g * cluster_size); zero ranges per mode; with extended L2 the subclusters holding data
    are marked allocated in the L2 tables (written before, every bitmap 0). Encrypted
    (`crypt`): whole clusters (subclusters) encrypted, and their L2 entries lose the zero
    flag (their zero bits)."""
    opts = plan.options
    cs = plan.cluster_size
    step = crypt.unit if crypt else zeroscan.grain(cs, opts.extended_l2)
    base = plan.data_offset
    full = plan.mode == "full"
    if full and not opts.extended_l2 and not crypt and \
            _copy_raw_in_kernel(fd, plan, source, stats, result):
        return
    bitmaps = _BitmapPatcher(fd, plan) if opts.extended_l2 or crypt else None
    writes = _ParallelWrites(fd, crypt)
    data_end = source.size
    raw_fd = getattr(source, "raw_fd", None)
    reader = _RawReader(source, raw_fd, writes) if raw_fd is not None else None
    try:
        for off, data, length in _source_chunks(source, cs, reader):
            if data is None:
                if full:
                    writes.drain()
                    writer.write_zeros(fd, base + off, length, result)
                continue
            if crypt:
                data = crypt.padded(data)
                data_end = max(data_end, off + len(data))
            runs = [(0, length)] if full and not crypt else zeroscan.nonzero_runs(data, step)
            view = memoryview(data)
            for s, e in runs:
                writes.write(view[s:e], base + off + s)
            if full and crypt:
                # Plain zeros in the clusters left zero-flagged, as a full image has them.
                writes.drain()
                for s, e in _gaps(runs, len(data)):
                    writer.write_zeros(fd, base + off + s, e - s, result)
            n = sum(e - s for s, e in runs)
            stats["copied_bytes"] += n
            result.bytes_written += n
            if bitmaps is not None:
                bitmaps.add(_written_entries(
                    zeroscan.nonzero_runs(data, step) if full and not crypt else runs, off,
                    cs, opts.extended_l2))
        writes.drain()
    finally:
        writes.close()
    if bitmaps is not None:
        bitmaps.flush()
    if full and data_end < plan.data_length:
        writer.write_zeros(fd, base + data_end, plan.data_length - data_end, result)
    _copy_method(plan, result)
    stats["zero_bytes_skipped"] = max(0, plan.options.size - stats["copied_bytes"])


def _gaps(runs, length):
    """The ranges of [0, length) between `runs` (sorted, disjoint)."""
    pos = 0
    for s, e in runs:
        if s > pos:
            yield pos, s
        pos = e
    if pos < length:
        yield pos, length


def _written_entries(runs, base, cs, extended_l2):
    """{cluster index: allocation bitmap} of the L2 entries that `runs` (relative to guest
    offset `base`) write: the subclusters touched with extended L2, else 1 per cluster."""
    if extended_l2:
        return zeroscan.subcluster_bits(runs, base, cs)
    out = {}
    for s, e in runs:
        for c in range((base + s) // cs, div_round_up(base + e, cs)):
            out[c] = 1
    return out


class _ParallelWrites(object):
    """Data written in pieces of WRITE_PIECE bytes on a few threads (`os.pwrite` releases the
    GIL), each piece's writeback started as soon as it is in the page cache.

    Taking a write into the page cache is the kernel's work in the writing thread (page
    allocation, which on a virtual machine whose free memory was handed back to the host
    costs a fault on the host per page, and the copy); qemu-img convert spreads its 2 MiB
    writes over a thread pool, so one thread here was measured 2-10x slower in that part
    on a loaded 2-core machine. At most `4 * threads` pieces are in flight. With `crypt` (see
    _Encrypting) each piece is encrypted in its thread before it is written."""

    def __init__(self, fd, crypt=None):
        import collections
        import concurrent.futures
        self.fd = fd
        self.crypt = crypt
        threads = max(2, min(4, os.cpu_count() or 2))
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
        self.pending = collections.deque()
        self.limit = 4 * threads
        self.owner = None             # the buffer the pieces being submitted come from
        self.owned = {}               # buffer: its pieces' futures

    def _one(self, piece, offset):
        if self.crypt is not None:
            piece = self.crypt.encrypt(piece, offset)
        writer.write_all(self.fd, piece, offset)
        # Start writing it to disk now (the disk works while the next pieces come).
        writer.start_writeback(self.fd, offset, len(piece))

    def write(self, data, offset):
        for pos in range(0, len(data), WRITE_PIECE):
            while len(self.pending) >= self.limit:
                self.pending.popleft().result()
            future = self.pool.submit(self._one, data[pos:pos + WRITE_PIECE], offset + pos)
            self.pending.append(future)
            if self.owner is not None:
                self.owned.setdefault(self.owner, []).append(future)

    def release(self, owner):
        """Wait for the pieces taken from buffer `owner` (before it is read into again)."""
        for future in self.owned.pop(owner, ()):
            future.result()

    def drain(self):
        """Wait for every piece submitted (raising the first failure)."""
        while self.pending:
            self.pending.popleft().result()

    def close(self):
        """Stop: pieces not started are dropped, running ones finish (the descriptor stays
        open until the threads are done)."""
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


class _RawReader(object):
    """Reads of a raw source into a few buffers used in turn (a buffer is read into again once
    the writes taken from it are done), so a copy does not take fresh memory for every chunk:
    fresh anonymous pages cost a page fault each (measured: about 64,000 minor faults for 1 GiB
    copied through new 8 MiB objects, qemu-img about 5,000), and on a VM that gives free memory
    back to its host, a fault on the host as well."""

    COUNT = 4

    def __init__(self, source, fd, writes):
        self.source = source
        self.fd = fd
        self.writes = writes
        self.buffers = []
        self.turn = 0

    def __call__(self, offset, length):
        if length != CHUNK or not hasattr(os, "preadv"):
            self.writes.owner = None
            return self.source.read(offset, length)
        index = self.turn
        self.turn = (index + 1) % self.COUNT
        if index == len(self.buffers):
            self.buffers.append(bytearray(CHUNK))
        self.writes.release(index)
        buf = self.buffers[index]
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                raise Qcow2Error("source: %s ended early at %d"
                                 % (self.source.path, offset + got), option="source")
            got += n
        self.writes.owner = index
        return buf


class _BitmapPatcher(object):
    """Sets the allocation bitmaps of a preallocated layout's extended L2 entries after the
    data is written: entries are rewritten a 4 KiB page at a time (host offsets are computed:
    data cluster g at data_offset + g * cluster_size), so no page is read back from disk.

    In a zero-flagged layout (an encrypted image) the entries written lose the zero flag
    (standard L2) or the zero bits of their allocated subclusters (extended L2); the others
    are rewritten as the planner made them."""

    MAX_SPAN = 1 << 16                # entries rewritten at most in one write (1 MiB at most)

    def __init__(self, fd, plan):
        self.fd = fd
        self.cs = plan.cluster_size
        self.extended = plan.options.extended_l2
        self.esz = C.l2_entry_size(self.extended)
        self.PAGE_ENTRIES = 4096 // self.esz
        self.count = div_round_up(plan.options.size, self.cs)
        self.l2_at = [r.offset for r in plan.regions if r.name == "L2 tables"][0]
        self.zero = plan.zero_flag
        self.first = plan.data_offset | C.OFLAG_COPIED
        self.tail = 0
        if self.zero and self.extended:
            self.tail = 0xFFFFFFFF00000000
        elif self.zero:
            self.first |= C.OFLAG_ZERO
        self.pending = {}
        self.lo = self.hi = None

    def add(self, bits):
        if not bits:
            return
        lo, hi = min(bits), max(bits) + 1
        if self.pending and (lo > self.hi + self.PAGE_ENTRIES or
                             max(hi, self.hi) - self.lo > self.MAX_SPAN):
            self.flush()
        for c, bm in bits.items():
            self.pending[c] = self.pending.get(c, 0) | bm
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)

    def flush(self):
        if not self.pending:
            return
        per = self.PAGE_ENTRIES
        a = self.lo - self.lo % per
        b = min(self.count, div_round_up(self.hi, per) * per)
        esz = self.esz
        buf = bytearray(b"".join(progression(self.first + a * self.cs, self.cs, b - a, esz,
                                             self.tail)))
        for c, bm in self.pending.items():
            if not self.extended:
                struct.pack_into(">Q", buf, (c - a) * esz, (self.first & ~C.OFLAG_ZERO) +
                                 c * self.cs)
                continue
            if self.zero:
                bm |= (~bm & 0xFFFFFFFF) << 32
            struct.pack_into(">Q", buf, (c - a) * esz + 8, bm)
        writer.write_all(self.fd, buf, self.l2_at + a * esz)
        self.pending = {}
        self.lo = self.hi = None


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


def _write_sparse(fd, opts, source, stats, crypt=None):
    """preallocation=off: allocate host clusters only for guest clusters that hold data.
    Encrypted (`crypt`): the LUKS header region follows the header cluster, the L1 table
    after it, and the data clusters are written encrypted and whole."""
    cs = opts.cluster_size
    esz = C.l2_entry_size(opts.extended_l2)
    per_l2 = cs // esz
    n_l1 = l1_entries(opts.size, cs, opts.extended_l2)
    l1_clusters = div_round_up(n_l1 * 8, cs)
    crypto_clusters = div_round_up(len(crypt.region), cs) if crypt else 0
    l1_at = 1 + crypto_clusters
    state = _SparseLayout(fd, cs, esz, per_l2, l1_at + l1_clusters, crypt)
    try:
        l1 = _map_data(state, opts, source, stats, crypt, n_l1)
        state.finish()
    finally:
        state.close()
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
        _write_sparse_bytes(fd, data + bytes(l1_clusters * cs - len(data)), l1_at * cs)
    hdr = _base_header(opts)
    hdr.l1_size = n_l1
    hdr.l1_table_offset = l1_at * cs if n_l1 else 0
    hdr.refcount_table_offset = table_at * cs
    hdr.refcount_table_clusters = table
    exts = standard_extensions(opts.version, cs, opts.backing_fmt, opts.data_file)
    if crypt:
        _write_sparse_bytes(fd, crypt.region, cs)
        hdr.crypt_method = C.CRYPT_LUKS
        exts.insert(0, Extension(C.EXT_CRYPTO, struct.pack(">QQ", cs, len(crypt.region))))
    _write_sparse_bytes(fd, encode_cluster0(hdr, exts, opts.backing_file), 0)
    os.ftruncate(fd, end * cs)
    os.fsync(fd)
    stats["zero_bytes_skipped"] = max(0, opts.size - stats["copied_bytes"])


def _map_data(state, opts, source, stats, crypt, n_l1):
    """Write the source's data clusters through `state` (a _SparseLayout) in guest order;
    returns the L1 table (a list of n_l1 entries)."""
    cs = opts.cluster_size
    per_l2 = state.per_l2
    l1 = [0] * n_l1
    step = crypt.unit if crypt else zeroscan.grain(cs, opts.extended_l2)
    for off, data, _length in _source_chunks(source, cs):
        if data is None:
            continue
        if crypt:
            data = crypt.padded(data)
        runs = zeroscan.nonzero_runs(data, step)
        view = memoryview(data)
        for first, count, pieces in _cluster_groups(runs, off, cs, per_l2):
            # One L2 table at a time: its data clusters follow it on the host.
            bits = None
            if opts.extended_l2:
                bits = zeroscan.subcluster_bits([(s - off, e - off) for s, e in pieces], off, cs)
            table_host = state.map_run(first, count, [(s, view[s - off:e - off])
                                                      for s, e in pieces], bits)
            if table_host is not None:
                l1[first // per_l2] = table_host | C.OFLAG_COPIED
            stats["copied_bytes"] += sum(e - s for s, e in pieces)
    return l1


def _write_chunks(fd, offset, chunks):
    """Write consecutive chunks into the new file, leaving its all-zero blocks holes."""
    for piece in chunks:
        _write_sparse_bytes(fd, piece, offset)
        offset += len(piece)


def _write_sparse_bytes(fd, data, offset):
    """Write `data` at `offset` of a new file (which reads zeros where nothing is written)
    without its all-zero 4 KiB blocks (aligned to the file when `offset` is)."""
    step = zeroscan.BLOCK if offset % zeroscan.BLOCK == 0 else len(data) or 1
    view = memoryview(data)
    for s, e in zeroscan.nonzero_runs(data, step):
        writer.write_all(fd, view[s:e], offset + s)


def _cluster_groups(runs, base, cs, per_l2):
    """Group non-zero runs (relative to guest offset `base`) by the guest clusters they touch:
    yield (first cluster, cluster count, [(guest start, guest end)]) for each range of
    neighbouring clusters holding data, never across an L2 table."""
    group = None
    for s, e in runs:
        s += base
        e += base
        while s < e:
            c0 = s // cs
            table_end = (c0 // per_l2 + 1) * per_l2 * cs
            piece_end = min(e, table_end)
            c1 = div_round_up(piece_end, cs)
            if group is not None and c0 <= group[0] + group[1] and \
                    c0 // per_l2 == group[0] // per_l2:
                group[1] = max(group[1], c1 - group[0])
                group[2].append((s, piece_end))
            else:
                if group is not None:
                    yield tuple(group)
                group = [c0, c1 - c0, [(s, piece_end)]]
            s = piece_end
    if group is not None:
        yield tuple(group)


class _SparseLayout(object):
    """Host clusters handed out in guest order: an L2 table before the first data cluster it
    maps, then runs of data clusters written as they come."""

    def __init__(self, fd, cs, esz, per_l2, first_free, crypt=None):
        self.fd = fd
        # Encrypted data goes out through writer threads (encrypted there, while this thread
        # reads and scans the next chunk).
        self.writes = _ParallelWrites(fd, crypt) if crypt is not None else None
        self.cs = cs
        self.esz = esz
        self.per_l2 = per_l2
        self.next = first_free
        self.table_index = None
        self.table = None
        self.table_host = 0

    def map_run(self, guest, count, pieces, bits=None):
        """Map guest clusters [guest, guest+count) (within one L2 table) to the next host
        clusters and write `pieces` [(guest offset, bytes)] there (what lies between them is
        never written: holes); `bits` are the extended L2 bitmaps {cluster: bitmap}. Returns
        the host offset of an L2 table started for them, or None."""
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
            progression(host | C.OFLAG_COPIED, self.cs, count, self.esz, 0))
        if bits is not None:
            for c, bm in bits.items():
                struct.pack_into(">Q", self.table, pos + (c - guest) * self.esz + 8, bm)
        at = host - guest * self.cs
        for goff, data in pieces:
            if self.writes is not None:
                self.writes.write(data, at + goff)
            else:
                writer.write_all(self.fd, data, at + goff)
        if self.writes is None:
            writer.start_writeback(self.fd, host, count * self.cs)
        return started

    def _flush_table(self):
        if self.table is not None:
            _write_sparse_bytes(self.fd, bytes(self.table), self.table_host)
            self.table = None

    def finish(self):
        self._flush_table()
        self.close()

    def close(self):
        """Wait for the data in flight (raising the first failure) and stop the threads."""
        if self.writes is not None:
            try:
                self.writes.drain()
            finally:
                self.writes.close()
                self.writes = None


__all__ = ["create_from_source", "check_source_fits", "check_space", "data_bytes"]
