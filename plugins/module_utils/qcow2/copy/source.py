# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Sources of guest content for an image made from a template: a raw file or block device, or a
qcow2 image with its backing chain flattened, as `qemu-img convert` reads them.

A template is untrusted by default: a qcow2 source with a backing file is refused (its chain
could name any host file) before the backing file is opened or looked up, unless the caller
passes `allow_backing=True` (the module's `source_backing_chain`).

`open_source(path, fmt)` opens every file read-only, refuses what cannot be copied faithfully
before any guest byte is read (encryption without the passphrase that opens it, the corrupt
or dirty bit, a failed consistency check, a running QEMU writing the file, a backing file
without a recorded format, a loop), and
returns a `Source`: the guest's size, its extents (data or surely zeros, from the tables and
SEEK_DATA/SEEK_HOLE, without reading data) and its bytes.

While a Source is open it holds the shared locks a reading QEMU holds (consistent read taken,
write and resize not shared), so a QEMU that would start writing a file of the chain is refused
until the Source is closed, as while `qemu-img convert` reads it. It never takes a writer lock.

A LUKS-encrypted qcow2 source opens with `passphrase` (its key slot gives the master key); its
data clusters are decrypted as they are read (each 512-byte sector with the IV of its host
offset, as QEMU writes them). A hole of its file inside an allocated cluster is not taken for
zeros (it decrypts to garbage, which is what the guest reads). Only the top image of a chain
is opened with the passphrase; an encrypted backing file is refused.
"""

import collections
import errno
import os
import stat
import zlib
from bisect import bisect_right

from ..format import constants as C
from ..read import lock
from ..read import nodes
from ..read.check import check as check_image
from ..format.errors import Qcow2Error
from ..read.image import DECODE_ERRORS, Image, _has_protocol, path_combine
from ..format.l2runs import (COMPRESSED, L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZERO, NORMAL, ZERO_ALLOC,
                             RefcountError, ceil_div, zeros)
from ..read.mapping import (SUB_COMPRESSED, SUB_INVALID, SUB_NORMAL, SUB_ZERO_ALLOC, SUB_ZERO_PLAIN,
                            _run_pieces, _sub_type, seek_segments)

try:  # Python 3.14 and later
    from compression import zstd as _zstd
except ImportError:
    _zstd = None

__all__ = ["open_source", "Source", "FORMATS", "MAX_CHAIN"]

FORMATS = ("raw", "qcow2")
MAX_CHAIN = C.MAX_BACKING_CHAIN         # links in a backing chain, the top image included
L2_CACHE_TABLES = 64                    # L2 tables whose runs a layer keeps
L2_CACHE_RUNS = 1 << 16                 # ... and at most this many runs among them
L1_CHUNK = 8192                         # L1 entries read at a time
MAX_HOLES = 100000                      # holes of a qcow2 file remembered (else: all data)
COMPRESSED_SPAN = 4 << 20               # host bytes of compressed clusters read in one call
COMPRESSED_GAP = 64 << 10               # largest gap bridged between two compressed clusters
ZLIB_WBITS = -12                        # raw deflate with a 4 KiB window, as QEMU writes it

# What a layer says about a guest range.
K_DATA, K_COMP, K_ZERO, K_BELOW = range(4)

_SUB_KIND = {SUB_NORMAL: K_DATA, SUB_COMPRESSED: K_COMP, SUB_ZERO_PLAIN: K_ZERO,
             SUB_ZERO_ALLOC: K_ZERO}

_UNIFORM_BITMAPS = (0, L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZERO)

# Locks a reading QEMU holds: consistent_read taken, write and resize not shared.
_READER_LOCK_BYTES = (lock.PERM_BASE, lock.SHARED_BASE + lock.WRITE,
                      lock.SHARED_BASE + lock.RESIZE)


def _refuse(message, path=None):
    return Qcow2Error("source: " + message, option="source", path=path)


# ---------------------------------------------------------------------------------------------
# Opening files


def _stat_file(path, what):
    """os.stat of a file the source needs: a regular file or a block device, nothing else
    (a FIFO would block the open, a directory has no content). A source or backing name may
    be a symbolic link; the node it leads to is what counts."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise _refuse("cannot open %s%s: a component of the path is not a directory"
                          % (path, what), path=path)
        raise _refuse("cannot open %s%s: %s" % (path, what, exc.strerror or exc), path=path)
    if not nodes.usable(st.st_mode):
        raise _refuse("%s%s is %s, not a regular file; a source is a regular file or a block "
                      "device" % (path, what, nodes.describe(st.st_mode)), path=path)
    return st


def _open_file(path, what):
    """Open a source file read-only without blocking; (fd, fstat) of a regular file or a
    block device (checked on the descriptor, after the open)."""
    try:
        return nodes.open_checked(path, os.O_RDONLY, follow=True)
    except Qcow2Error as exc:
        raise _refuse("%s%s: %s" % (path, what, exc.message.replace(path + " ", "", 1)),
                      path=path)


def _hold_reader_locks(fd, path, what):
    """Refuse a file a running QEMU writes; then take the locks a reading QEMU takes."""
    fcntl = lock.fcntl
    if fcntl is None:  # pragma: no cover - non-Unix
        return

    def refuse_if_written():
        try:
            busy = lock.probe_fd(fd)
        except OSError:
            return False            # no OFD locks on this file system: QEMU cannot lock either
        if busy["in_use"]:
            raise _refuse("%s%s is in use by a running QEMU that writes it (it holds the write "
                          "lock): its content is moving; stop the guest or copy from a "
                          "snapshot" % (path, what), path=path)
        return True

    if not refuse_if_written():
        return
    for byte in _READER_LOCK_BYTES:
        try:
            fcntl.fcntl(fd, lock.F_OFD_SETLK, lock._flock(lock.F_RDLCK, byte))
        except OSError:
            break
    refuse_if_written()             # a writer that came between the probe and our locks


class _RawLayer(object):
    """A raw file or block device: guest offset = file offset."""

    fmt = "raw"

    def __init__(self, path, what=""):
        _stat_file(path, what)
        fd = _open_file(path, what)[0]
        self.fd = fd
        self.path = path
        try:
            st = os.fstat(fd)
            self.is_device = stat.S_ISBLK(st.st_mode)
            if self.is_device:
                self.size = os.lseek(fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
            else:
                raise _refuse("%s%s is not a regular file or a block device" % (path, what),
                              path=path)
            self.key = (st.st_dev, st.st_ino)
            _hold_reader_locks(fd, path, what)
        except OSError as exc:
            self.close()
            raise _refuse("cannot read %s%s: %s" % (path, what, exc.strerror or exc), path=path)
        except BaseException:
            self.close()
            raise
        self.file_size = self.size          # for mapping.seek_segments
        self.seek_works = not self.is_device

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def pieces(self, start, end, precise):
        if not (precise and self.seek_works):
            yield start, end - start, K_DATA, start
            return
        pos = start
        try:
            for a, b, is_data in seek_segments(self, start, end):
                yield a, b - a, (K_DATA if is_data else K_ZERO), a
                pos = b
        except OSError:
            self.seek_works = False         # no SEEK_DATA here: the rest is data
            if pos < end:
                yield pos, end - pos, K_DATA, pos


class _Qcow2Layer(object):
    """One qcow2 image of the chain: its guest ranges as data, compressed, zero or below."""

    fmt = "qcow2"

    def __init__(self, path, what="", passphrase=None):
        _stat_file(path, what)
        try:
            img = Image.open(path, follow=True)
        except Qcow2Error as exc:
            raise _refuse("%s%s: %s" % (path, what, exc.message), path=path)
        self.img = img
        self.path = path
        self.cipher = None              # the sector cipher of an encrypted image
        try:
            self._validate(what, passphrase)
        except BaseException:
            img.close()
            raise
        self.fd = img.fd
        self.size = img.virtual_size
        self.cs = img.cluster_size
        self.span = img.cluster_size * img.l2_entries      # guest bytes per L2 table
        self.zstd = img.header.compression_type == C.COMPRESSION_ZSTD
        self._l1 = (0, ())
        self._l2 = collections.OrderedDict()
        self._l2_runs = 0
        self._holes = None

    def _validate(self, what, passphrase=None):
        img, path = self.img, self.path
        st = os.fstat(img.fd)
        self.key = (st.st_dev, st.st_ino)
        self.is_device = stat.S_ISBLK(st.st_mode)
        _hold_reader_locks(img.fd, path, what)
        hdr = img.header
        if hdr.crypt_method == C.CRYPT_LUKS and not what and passphrase is not None:
            self.cipher = _unlock(img, path, passphrase)
        elif hdr.crypt_method == C.CRYPT_LUKS:
            raise _refuse("%s%s is LUKS encrypted; %s" % (
                path, what, "an encrypted backing file is not supported" if what else
                "give its passphrase (source_passphrase or source_passphrase_file) to copy "
                "it"), path=path)
        elif hdr.crypt_method:
            raise _refuse("%s%s is encrypted with qcow's legacy AES method; such sources are "
                          "not supported" % (path, what), path=path)
        if hdr.incompatible_features & C.INCOMPAT_CORRUPT:
            raise _refuse("%s%s is marked corrupt (QEMU found an inconsistency in its metadata); "
                          "repair it with 'qemu-img check -r all' before copying from it"
                          % (path, what), path=path)
        if hdr.incompatible_features & C.INCOMPAT_DIRTY:
            raise _refuse("%s%s is marked dirty (it was not closed cleanly, or a QEMU has it "
                          "open with lazy refcounts); repair it with 'qemu-img check -r all' "
                          "when nothing uses it" % (path, what), path=path)
        if img.has_data_file:
            raise _refuse("%s%s keeps its data in an external data file (%s); such sources are "
                          "not supported" % (path, what, img.data_file or "name not recorded"),
                          path=path)
        try:
            result = check_image(path, image=img)
        except Qcow2Error as exc:
            raise _refuse("%s%s fails its consistency check: %s" % (path, what, exc.message),
                          path=path)
        bad = result.get("corruptions", 0), result.get("check-errors", 0)
        if any(bad):
            first = result.get("messages") or ["(no detail)"]
            raise _refuse("%s%s fails its consistency check (%d corruptions, %d errors; first: "
                          "%s); repair it with 'qemu-img check -r all' before copying from it"
                          % (path, what, bad[0], bad[1], first[0]), path=path)
        if self.cipher is not None and result.get("compressed-clusters"):
            raise _refuse("%s%s is encrypted and holds compressed clusters, which QEMU never "
                          "writes into an encrypted image; refusing it" % (path, what),
                          path=path)
        if hdr.compression_type == C.COMPRESSION_ZSTD and _zstd is None and \
                result.get("compressed-clusters"):
            raise _refuse(_ZSTD_MISSING % (path + what), path=path)

    def close(self):
        if self.img is not None:
            self.img.close()
            self.img = None
            self.fd = None

    # -- tables ---------------------------------------------------------------------------

    def _l1_entry(self, index):
        start, vals = self._l1
        if not start <= index < start + len(vals):
            img = self.img
            n = img.header.l1_size
            if not 0 <= index < n:
                return 0
            start = index - index % L1_CHUNK
            count = min(L1_CHUNK, n - start)
            raw = img.read(img.header.l1_table_offset + start * 8, count * 8)
            vals = tuple(int.from_bytes(raw[k:k + 8], "big") for k in range(0, len(raw), 8))
            self._l1 = (start, vals)
        return vals[index - start]

    def _runs(self, l1_index):
        """(first cluster of each run, runs) of the L2 table of `l1_index`, or None."""
        cache = self._l2
        hit = cache.get(l1_index)
        if hit is not None:
            cache.move_to_end(l1_index)
            return hit[0]
        l2_off = self._l1_entry(l1_index) & C.L1E_OFFSET_MASK
        if not l2_off:
            value = None
            count = 1
        else:
            if l2_off & (self.cs - 1):
                raise Qcow2Error("corrupt image: L2 table offset %#x unaligned (L1 index %#x)"
                                 % (l2_off, l1_index), path=self.path)
            runs = self.img.l2_runs(self.img.read_l2(l2_off))
            value = ([r[0] for r in runs], runs)
            count = len(runs)
        while cache and (len(cache) >= L2_CACHE_TABLES or
                         self._l2_runs + count > L2_CACHE_RUNS):
            _key, (_v, n) = cache.popitem(last=False)
            self._l2_runs -= n
        cache[l1_index] = (value, count)
        self._l2_runs += count
        return value

    def _host_holes(self):
        """(starts, holes): the holes of the image file, or ([], []) when unknown or none."""
        if self._holes is None:
            holes = []
            if not self.is_device:
                try:
                    for a, b, is_data in seek_segments(self.img, 0, self.img.file_size):
                        if not is_data:
                            holes.append((a, b))
                            if len(holes) > MAX_HOLES:
                                holes = []
                                break
                except OSError:
                    holes = []
            self._holes = ([h[0] for h in holes], holes)
        return self._holes

    # -- the guest view -------------------------------------------------------------------

    def pieces(self, start, end, precise):
        """Yield (guest offset, length, kind, arg) covering [start, end) in order: arg is the
        host offset for K_DATA, the descriptor for K_COMP."""
        cs, span, img = self.cs, self.span, self.img
        pos = start
        while pos < end:
            l1_index = pos // span
            tbase = l1_index * span
            tend = min(end, tbase + span)
            found = self._runs(l1_index)
            if found is None:
                yield pos, tend - pos, K_BELOW, None
                pos = tend
                continue
            starts, runs = found
            k = bisect_right(starts, (pos - tbase) // cs) - 1
            first = l1_index * img.l2_entries
            while pos < tend:
                idx, n, entry, bitmap = runs[k]
                k += 1
                b = min(tend, tbase + (idx + n) * cs)
                ca = (pos - tbase) // cs
                cb = ceil_div(b - tbase, cs)
                ctype = img.cluster_type(entry)
                if ctype == COMPRESSED:
                    yield pos, b - pos, K_COMP, entry
                    pos = b
                    continue
                if ca > idx and ctype in (NORMAL, ZERO_ALLOC):
                    entry += (ca - idx) * cs
                if not img.extended_l2 or bitmap in _UNIFORM_BITMAPS:
                    # The whole piece is of one type (the common case): no subclusters.
                    sub = _sub_type(img, ctype, bitmap, 0)
                    if sub == SUB_INVALID:
                        raise Qcow2Error("corrupt image: invalid subcluster allocation bitmap "
                                         "at guest offset %#x" % pos, path=self.path)
                    kind = _SUB_KIND.get(sub, K_BELOW)
                    if kind != K_DATA:
                        yield pos, b - pos, kind, None
                    else:
                        host = entry & C.L2E_OFFSET_MASK
                        if host & (cs - 1):
                            raise Qcow2Error("corrupt image: cluster allocation offset %#x "
                                             "unaligned (guest offset %#x)"
                                             % (host, tbase + ca * cs), path=self.path)
                        host += pos - tbase - ca * cs
                        if precise:
                            yield from self._split_holes(pos, b - pos, host)
                        else:
                            yield pos, b - pos, K_DATA, host
                    pos = b
                    continue
                for s, length, sub, host in _run_pieces(img, first + ca, cb - ca, entry, bitmap):
                    e = min(s + length, b)
                    if s < pos:
                        if host is not None:
                            host += pos - s
                        s = pos
                    if s >= e:
                        continue
                    if sub == SUB_INVALID:
                        raise Qcow2Error("corrupt image: invalid subcluster allocation bitmap "
                                         "at guest offset %#x" % s, path=self.path)
                    kind = _SUB_KIND.get(sub, K_BELOW)
                    if kind == K_DATA:
                        if precise:
                            yield from self._split_holes(s, e - s, host)
                            continue
                        yield s, e - s, K_DATA, host
                    else:
                        yield s, e - s, kind, None
                pos = b

    def _split_holes(self, s, n, host):
        starts, holes = self._host_holes() if self.cipher is None else ([], [])
        if not holes:
            yield s, n, K_DATA, host
            return
        end = host + n
        i = max(0, bisect_right(starts, host) - 1)
        pos = host
        while pos < end and i < len(holes):
            a, b = holes[i]
            i += 1
            if b <= pos:
                continue
            if a >= end:
                break
            if a > pos:
                yield s + pos - host, a - pos, K_DATA, pos
                pos = a
            stop = min(b, end)
            yield s + pos - host, stop - pos, K_ZERO, None
            pos = stop
        if pos < end:
            yield s + pos - host, end - pos, K_DATA, pos


def _unlock(img, path, passphrase):
    """The SectorCipher of the LUKS image `img` that `passphrase` opens, or the refusal."""
    from ..crypto import luks1
    from ..crypto.sectors import SectorCipher
    try:
        key = luks1.unlock(img.luks_region(), passphrase)
        return SectorCipher.from_fields(img.luks, key)
    except Qcow2Error as exc:
        message = exc.message.split(": ", 1)[-1] if exc.option == "encrypt_passphrase" else \
            exc.message
        raise Qcow2Error("source_passphrase: %s: %s (the source is not read)"
                         % (path, message.replace("the image", "the source")),
                         option="source_passphrase", path=path)


def _decrypted(layer, n, host):
    """The n guest bytes of an encrypted layer's data at host offset `host`: the whole sectors
    around them read and decrypted."""
    lo = host - host % 512
    hi = -(-(host + n) // 512) * 512
    plain = layer.cipher.decrypt(lo // 512, _pread(layer.fd, hi - lo, lo))
    if lo == host and hi == host + n:
        return plain
    return plain[host - lo:host - lo + n]


_ZSTD_MISSING = ("%s holds zstd-compressed clusters; zstd-compressed clusters need Python "
                 "3.14's compression.zstd, which this host's Python does not have (convert the "
                 "source to zlib compression or to uncompressed with qemu-img first)")


# ---------------------------------------------------------------------------------------------
# Decompression


def _inflate(data, cs):
    """A zlib (raw deflate) cluster as QEMU decompresses it: exactly cs bytes, the stream may
    end early in the input (sector padding follows) or not end at all once cs bytes are out."""
    try:
        out = zlib.decompress(data, ZLIB_WBITS, cs)
        if len(out) == cs:
            return out
    except zlib.error:
        pass
    try:
        out = zlib.decompressobj(ZLIB_WBITS).decompress(data, cs)
    except zlib.error as exc:
        raise ValueError("deflate error: %s" % exc)
    if len(out) != cs:
        raise ValueError("it decompresses to %d bytes, not %d" % (len(out), cs))
    return out


def _unzstd(data, cs):
    """A zstd cluster as QEMU decompresses it: one or more frames giving exactly cs bytes,
    the last frame complete."""
    if _zstd is None:
        raise _refuse(_ZSTD_MISSING % "the source")
    parts = []
    got = 0
    while True:
        dec = _zstd.ZstdDecompressor()
        try:
            piece = dec.decompress(data, max_length=cs - got)
        except _zstd.ZstdError as exc:
            raise ValueError("zstd error: %s" % exc)
        parts.append(piece)
        got += len(piece)
        if not dec.eof:
            raise ValueError("the zstd frame does not end within the cluster"
                             if got >= cs else "the zstd data is truncated")
        if got >= cs:
            return b"".join(parts)
        data = dec.unused_data
        if not data:
            raise ValueError("it decompresses to %d bytes, not %d" % (got, cs))


# ---------------------------------------------------------------------------------------------
# The source


class Source(object):
    """A read-only view of a source's guest content (made by open_source).

    path, format ('raw' or 'qcow2') and size (the virtual size in bytes: a raw file's length,
    a block device's size, a qcow2 image's virtual size); extents() and read() give the guest
    view, describe() what was opened. A context manager; close() releases every file.
    """

    def __init__(self, path, fmt, layers):
        self.path = path
        self.format = fmt
        self._layers = layers
        self.size = layers[0].size
        # A raw source's descriptor (guest offset = file offset), e.g. for copy_file_range.
        self.raw_fd = layers[0].fd if fmt == "raw" else None
        self._last_cluster = None       # (layer, descriptor, bytes): a cluster split by reads
        self._chain = [(layer.path, layer.fmt) for layer in layers]

    def close(self):
        self.raw_fd = None
        layers, self._layers = self._layers, []
        for layer in layers:
            layer.close()
        self._last_cluster = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self):
        info = {"path": self.path, "format": self.format, "size": self.size}
        if self.format == "qcow2":
            info["chain"] = list(self._chain)
        return info

    # -- the flattened view ---------------------------------------------------------------

    def _flat(self, depth, start, end, precise):
        """Yield (offset, length, kind, arg, layer) for [start, end), never K_BELOW."""
        layer = self._layers[depth]
        lend = min(end, layer.size)
        if start < lend:
            for s, n, kind, arg in layer.pieces(start, lend, precise):
                if kind != K_BELOW:
                    yield s, n, kind, arg, layer
                elif depth + 1 < len(self._layers):
                    yield from self._flat(depth + 1, s, s + n, precise)
                else:
                    yield s, n, K_ZERO, None, None
        tail = max(start, lend)
        if tail < end:                  # past the end of a backing file: zeros
            yield tail, end - tail, K_ZERO, None, None

    def _layer_error(self, exc, layer):
        path = getattr(exc, "path", None) or (layer.path if layer is not None else self.path)
        if isinstance(exc, Qcow2Error):
            if exc.option == "source":
                return exc
            message = "%s: %s" % (path, exc.message)
        elif isinstance(exc, OSError):
            message = "cannot read %s: %s" % (path, exc.strerror or exc)
        else:
            message = "corrupt image %s: %s" % (path, exc)
        return _refuse(message, path=path)

    def _check_range(self, start, end):
        if not self._layers:
            raise ValueError("the source is closed")
        if start < 0 or end > self.size or start > end:
            raise ValueError("range [%d, %d) is outside the source's %d bytes"
                             % (start, end, self.size))

    def extents(self, start=0, end=None):
        """Yield (offset, length, is_data) covering [start, end) (end defaults to size) in
        order, merged where adjacent ones agree. is_data False: the range surely reads zeros
        (a hole, zero or unallocated clusters with nothing below, past a backing file's end);
        True: it must be read. From the tables and SEEK_DATA/SEEK_HOLE, no data is read."""
        end = self.size if end is None else end
        self._check_range(start, end)
        return self._extents(start, end)

    def _extents(self, start, end):
        cur = None
        try:
            for s, n, kind, _arg, _layer in self._flat(0, start, end, True):
                is_data = kind != K_ZERO
                if cur is not None and cur[2] == is_data:
                    cur[1] += n
                    continue
                if cur is not None:
                    yield tuple(cur)
                cur = [s, n, is_data]
        except (Qcow2Error, OSError, RefcountError) + DECODE_ERRORS as exc:
            raise self._layer_error(exc, None)
        if cur is not None:
            yield tuple(cur)

    def read(self, offset, length):
        """The guest's bytes of [offset, offset+length), within [0, size)."""
        if length <= 0:
            return b""
        self._check_range(offset, offset + length)
        layer = None
        try:
            ops = []
            for s, n, kind, arg, layer in self._flat(0, offset, offset + length, False):
                if ops:
                    last = ops[-1]
                    if kind == K_ZERO and last[0] == K_ZERO:
                        last[1] += n
                        continue
                    if kind == K_DATA and last[0] == K_DATA and last[2] is layer and \
                            last[3] + last[1] == arg:
                        last[1] += n
                        continue
                ops.append([kind, n, layer, arg, s])
            parts = []
            i = 0
            while i < len(ops):
                kind, n, layer, arg, s = ops[i]
                if kind == K_ZERO:
                    parts.append(zeros(n))
                elif kind == K_DATA and getattr(layer, "cipher", None) is not None:
                    parts.append(_decrypted(layer, n, arg))
                elif kind == K_DATA:
                    parts.append(_pread(layer.fd, n, arg))
                else:
                    j = i + 1
                    while j < len(ops) and ops[j][0] == K_COMP and ops[j][2] is layer:
                        j += 1
                    self._read_compressed(layer, ops[i:j], parts)
                    i = j
                    continue
                i += 1
        except (Qcow2Error, OSError, RefcountError) + DECODE_ERRORS as exc:
            raise self._layer_error(exc, layer)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_compressed(self, layer, ops, parts):
        """Append the bytes of compressed pieces `ops` (all of one layer), reading the host
        bytes of neighbouring clusters in one call."""
        img, cs = layer.img, layer.cs
        ranges = [img.compressed_range(op[3]) for op in ops]
        i = 0
        while i < len(ops):
            lo, length = ranges[i]
            hi = lo + length
            j = i + 1
            while j < len(ops):
                o, m = ranges[j]
                if o < lo or o > hi + COMPRESSED_GAP or max(hi, o + m) - lo > COMPRESSED_SPAN:
                    break
                hi = max(hi, o + m)
                j += 1
            buf = memoryview(img.read(lo, hi - lo))
            cached = self._last_cluster
            todo = []
            for k in range(i, j):
                entry, s = ops[k][3], ops[k][4]
                if not (cached is not None and cached[0] is layer and cached[1] == entry):
                    o, m = ranges[k]
                    todo.append((k, entry, buf[o - lo:o - lo + m], s - s % cs))
            # zlib and zstd release the GIL while they work: several clusters decompress at
            # once on several cores.
            done = dict(zip([t[0] for t in todo],
                            _map(lambda t: self._decompress(layer, t[1], t[2], t[3]), todo)))
            for k in range(i, j):
                _kind, n, _layer, entry, s = ops[k]
                skip = s % cs
                if k in done:
                    data = done[k]
                    if skip or n != cs:
                        self._last_cluster = (layer, entry, data)
                else:
                    data = cached[2]
                parts.append(data if (not skip and n == cs) else data[skip:skip + n])
            i = j

    def _decompress(self, layer, entry, data, guest):
        try:
            if layer.zstd:
                return _unzstd(data, layer.cs)
            return _inflate(data, layer.cs)
        except ValueError as exc:
            raise _refuse("%s: the compressed cluster at guest offset %#x (descriptor %#x) "
                          "cannot be decompressed: %s" % (layer.path, guest, entry, exc),
                          path=layer.path)


_POOL = []


def _map(func, items):
    """map() over a small thread pool when there is enough work, in order."""
    if len(items) < 4:
        return [func(item) for item in items]
    if not _POOL:
        import concurrent.futures
        _POOL.append(concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, min(4, os.cpu_count() or 2))))
    return list(_POOL[0].map(func, items))


def _pread(fd, n, offset):
    """n bytes at offset; bytes past the end of the file read as zeros."""
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        piece = os.pread(fd, n - got, offset + got)
        if not piece:
            parts.append(zeros(n - got))
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# open_source


def open_source(path, fmt, allow_backing=False, passphrase=None):
    """Open `path` read-only as a source of guest content in format `fmt` ('raw' or 'qcow2').

    A qcow2 source with a backing file is refused unless `allow_backing` is true: a template
    is untrusted by default, and its backing chain could name any file on this host, whose
    bytes the copy would then read. The refusal comes before any backing file is opened or
    looked up. With `allow_backing` the chain is followed and flattened, as qemu-img does.

    A LUKS-encrypted qcow2 source opens only with a `passphrase` (bytes) that unlocks it
    (Qcow2Error with option 'source_passphrase' otherwise); a raw source ignores it.

    Returns a Source. Raises Qcow2Error(option='source', 'source_format' or
    'source_passphrase') when it cannot be used; nothing of the guest content has been read
    then.
    """
    if fmt not in FORMATS:
        raise Qcow2Error("source_format: must be raw or qcow2, not %r (the format of a source is "
                         "never probed)" % (fmt,), option="source_format", path=path)
    if not isinstance(path, str) or not path:
        raise _refuse("the path must be a non-empty string")
    if fmt == "raw":
        return Source(path, fmt, [_RawLayer(path)])
    layers = []
    try:
        _open_chain(path, layers, allow_backing, passphrase)
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return Source(path, fmt, layers)


def _open_chain(path, layers, allow_backing=False, passphrase=None):
    """Open `path` and its backing files into `layers`, top first (the top only, and a
    refusal when it has a backing file, unless `allow_backing`); `passphrase` opens the top
    image when it is encrypted."""
    cur, fmt, what = path, "qcow2", ""
    seen = {}
    while True:
        if len(layers) >= MAX_CHAIN:
            raise _refuse("the backing chain of %s is longer than %d images; refusing it"
                          % (path, MAX_CHAIN), path=path)
        if fmt == "qcow2":
            layer = _Qcow2Layer(cur, what, passphrase if not layers else None)
        else:
            layer = _RawLayer(cur, what)
        layers.append(layer)
        if layer.key in seen:
            raise _refuse("the backing chain of %s loops: %s%s is %s again"
                          % (path, cur, what, seen[layer.key]), path=cur)
        seen[layer.key] = cur
        if fmt == "raw":
            return
        img = layer.img
        name = img.backing_file
        if not name:
            return
        if not allow_backing:
            raise _untrusted_backing(cur, name)
        if not img.backing_fmt:
            raise _refuse("%s%s has a backing file (%s) without a recorded backing format; the "
                          "format is never probed: record it with 'qemu-img rebase -u -b %s -F "
                          "<format>'" % (cur, what, name, name), path=cur)
        if img.backing_fmt not in FORMATS:
            raise _refuse("%s%s has a backing file %s of format %r; only raw and qcow2 backing "
                          "files are supported" % (cur, what, name, img.backing_fmt), path=cur)
        if name.startswith("json:") or _has_protocol(name):
            raise _refuse("%s%s has a backing file %s given by a protocol; only files on this "
                          "host are supported" % (cur, what, name), path=cur)
        what = " (backing file of %s)" % cur
        cur, fmt = path_combine(cur, name), img.backing_fmt


def backing_refusal(path, name):
    """The words of the refusal of a source `path` whose backing file is `name`: the name as
    recorded, where it leads (worked out from the names alone, nothing is looked up), the risk
    and the way to accept it."""
    if name.startswith("json:") or _has_protocol(name):
        where = "a protocol, not a file"
    else:
        where = os.path.normpath(path_combine(os.path.abspath(path), name))
    return ("%s has a backing file %r (it resolves to %s); a template's backing chain can name "
            "any file on this host, and the new image's guest would read that file's bytes. "
            "The backing file was not opened. If the template and its whole chain are trusted, "
            "set source_backing_chain=true to flatten the chain into the new image; otherwise "
            "flatten it yourself (qemu-img convert) where it is safe" % (path, name, where))


def _untrusted_backing(path, name):
    return _refuse(backing_refusal(path, name), path=path)
