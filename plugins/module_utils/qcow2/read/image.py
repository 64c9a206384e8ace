# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The model of an open qcow2 image: header, extensions and tables, every number checked.

`Image` reads (inspection); `editor.Editor` extends it with guarded writes. Nothing here opens a
backing or external data file, and nothing trusts a header number before checking it.
"""

import os
import stat
import struct

from ..format import constants as C
from ..format.errors import Qcow2Error
from ..format import luks
from ..format.header import decode_cluster0, find_extension
from ..format.l2runs import (  # noqa: F401  (cluster types are part of this module's interface)
    UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED, RefcountError, l2_runs,
    refcount_at, ceil_div)

READ_CHUNK = 8 * 1024 * 1024            # largest single read of a table

_Q = struct.Struct(">Q")
_SNAP = struct.Struct(">QIHHIIQII")     # the 40 fixed bytes of a snapshot table entry
_CRYPTO = struct.Struct(">QQ")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS
MAX_BITMAP_TABLE = 0x8000000
BME_RESERVED_MASK = 0xFF000000000001FE
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
MAX_BITMAP_PHYS = 0x20000000
MAX_BITMAP_NAME = 1023
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
BME_RESERVED_FLAGS = 0xFFFFFFFC
BITMAP_TYPE_DIRTY = 1
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * C.MAX_SNAPSHOTS


DECODE_ERRORS = (struct.error, ValueError, OverflowError, IndexError, UnicodeError,
                 MemoryError, TypeError)


# ---------------------------------------------------------------------------------------------
# The image


class Image(object):
    """A qcow2 image opened for reading, with every header number validated.

    `Image.open(path)` opens the file itself (and `close()` closes it); `Image(fileobj,
    file_size)` reads through an already open binary file object, which stays the caller's.
    """

    def __init__(self, fileobj, file_size, path=None):
        self._file = fileobj
        self._owns_file = False
        self.path = path
        try:
            self._fd = fileobj.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None
        self.file_size = int(file_size)
        self._refblock_cache = {}
        self._last_progression = None
        self._delta_cache = {}
        self._matcher = None
        self._snapshots = None
        try:
            self._parse()
        except Qcow2Error:
            raise
        except OSError as exc:
            raise Qcow2Error("cannot read %s: %s" % (path or "image", exc.strerror or exc),
                             path=path)
        except DECODE_ERRORS as exc:
            raise Qcow2Error("corrupt image: %s" % exc, path=path)

    @classmethod
    def open(cls, path, follow=False):
        """Open the image at `path` read-only. The final name is not followed when it is a
        symbolic link unless `follow` (backing files and sources may be links); anything but a
        regular file or a block device is refused before it is read, and nothing blocks."""
        from .nodes import open_checked
        fd, st = open_checked(path, os.O_RDONLY, follow=follow)
        try:
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                size = st.st_size
            fileobj = os.fdopen(fd, "rb", buffering=0)
        except OSError as exc:
            os.close(fd)
            raise Qcow2Error("cannot open %s: %s" % (path, exc.strerror or exc), path=path)
        except BaseException:
            os.close(fd)
            raise
        try:
            img = cls(fileobj, size, path=path)
        except BaseException:
            fileobj.close()
            raise
        img._owns_file = True
        return img

    def close(self):
        if self._owns_file and self._file is not None:
            self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def fd(self):
        return self._fd

    # -- raw reads ------------------------------------------------------------------------

    def read(self, offset, length):
        """`length` bytes at `offset`; bytes beyond the end of the file read as zeros."""
        if length <= 0:
            return b""
        if offset < 0:
            raise Qcow2Error("corrupt image: negative offset %d" % offset, path=self.path)
        avail = min(length, max(0, self.file_size - offset))
        data = b""
        if avail > 0:
            if self._fd is not None:
                parts = []
                got = 0
                while got < avail:
                    piece = os.pread(self._fd, avail - got, offset + got)
                    if not piece:
                        break
                    parts.append(piece)
                    got += len(piece)
                data = b"".join(parts) if len(parts) != 1 else parts[0]
            else:
                self._file.seek(offset)
                data = self._file.read(avail) or b""
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    # -- header ---------------------------------------------------------------------------

    def _parse(self):
        path = self.path
        if self.file_size == 0:
            raise Qcow2Error("not a qcow2 image: the file is empty", path=path)
        first = self.read(0, min(self.file_size, 1 << C.MAX_CLUSTER_BITS))
        if first[:4] != struct.pack(">I", C.MAGIC):
            raise Qcow2Error("not a qcow2 image: no qcow2 magic at the start of the file",
                             path=path)
        try:
            hdr, exts, backing = decode_cluster0(first)
        except Qcow2Error as exc:
            exc.path = path
            raise
        self.header = hdr
        self.extensions = exts
        self.backing_file = backing
        cs = hdr.cluster_size
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = cs

        if hdr.version >= 3 and hdr.refcount_order > 6:
            raise Qcow2Error("corrupt header: refcount_order %d is above 6 (refcount widths "
                             "may not exceed 64 bits)" % hdr.refcount_order, path=path)
        if hdr.crypt_method not in (C.CRYPT_NONE, C.CRYPT_AES, C.CRYPT_LUKS):
            raise Qcow2Error("unsupported encryption method %d" % hdr.crypt_method, path=path)

        unknown = hdr.incompatible_features & ~C.INCOMPAT_MASK
        if unknown:
            names = self.feature_names()
            parts = []
            for bit in range(64):
                if unknown & (1 << bit):
                    name = names.get((C.FEATURE_INCOMPAT, bit))
                    parts.append(name if name else "unknown incompatible feature bit %d" % bit)
            raise Qcow2Error("unsupported qcow2 feature(s): %s" % ", ".join(parts), path=path)

        if hdr.version >= 3:
            if hdr.header_length > C.V3_MIN_HEADER_LENGTH and \
                    hdr.compression_type not in C.COMPRESSION_NAMES:
                raise Qcow2Error("unknown compression type %d" % hdr.compression_type, path=path)
            has_bit = bool(hdr.incompatible_features & C.INCOMPAT_COMPRESSION)
            if hdr.compression_type != C.COMPRESSION_ZLIB and not has_bit:
                raise Qcow2Error("corrupt header: compression type %d without the compression "
                                 "type incompatible feature bit" % hdr.compression_type,
                                 path=path)
            if has_bit and hdr.compression_type == C.COMPRESSION_ZLIB:
                raise Qcow2Error("corrupt header: the compression type incompatible feature bit "
                                 "is set but the compression type is zlib", path=path)

        self.extended_l2 = bool(hdr.incompatible_features & C.INCOMPAT_EXTL2)
        if self.extended_l2 and hdr.cluster_bits < 14:
            raise Qcow2Error("corrupt header: extended L2 entries need a cluster size of at least "
                             "16384 bytes, not %d" % cs, path=path)
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_entries = cs // self.l2_entry_size
        self.refcount_bits = 1 << hdr.refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.refblock_entries = cs * 8 // self.refcount_bits
        self.has_data_file = bool(hdr.incompatible_features & C.INCOMPAT_DATA_FILE)
        self.data_file_raw = bool(hdr.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW)
        if self.data_file_raw and not self.has_data_file:
            raise Qcow2Error("corrupt header: data-file-raw is set without an external data file",
                             path=path)

        # Extensions.
        fmt = find_extension(exts, C.EXT_BACKING_FORMAT)
        if fmt is not None and len(fmt) > C.MAX_BACKING_FMT:
            raise Qcow2Error("corrupt header: backing format name of %d bytes is too long"
                             % len(fmt), path=path)
        self.backing_fmt = fmt.decode("utf-8", "replace") if fmt else None
        data_file = find_extension(exts, C.EXT_DATA_FILE)
        self.data_file = data_file.decode("utf-8", "replace") if data_file is not None else None
        if self.has_data_file and not (data_file or b"").split(b"\0", 1)[0]:
            raise Qcow2Error("corrupt header: the image needs an external data file but names "
                             "none (QEMU: 'data-file' is required for this image)", path=path)
        self.crypto_offset = self.crypto_length = 0
        self.luks = None
        crypto_seen = False
        for ext in exts:
            if ext.type != C.EXT_CRYPTO:
                continue
            crypto_seen = True
            if hdr.crypt_method != C.CRYPT_LUKS:
                raise Qcow2Error("corrupt header: encryption header extension in an image that "
                                 "is not LUKS encrypted", path=path)
            if len(ext.data) != _CRYPTO.size:
                raise Qcow2Error("corrupt header: encryption header extension has %d bytes, "
                                 "expected 16" % len(ext.data), path=path)
            self.crypto_offset, self.crypto_length = _CRYPTO.unpack(ext.data)
            if self.crypto_offset % cs:
                raise Qcow2Error("corrupt header: encryption header offset %#x is not cluster "
                                 "aligned" % self.crypto_offset, path=path)
            self._check_luks_header()
        if hdr.crypt_method == C.CRYPT_LUKS and not crypto_seen:
            raise Qcow2Error("corrupt header: LUKS encrypted image without an encryption header "
                             "extension (QEMU: missing CRYPTO header)", path=path)

        self._parse_bitmaps_extension()

        # Reference count table (QEMU validates it before the snapshot and L1 tables).
        if hdr.refcount_table_clusters < 1:
            raise Qcow2Error("corrupt header: the image has no reference count table", path=path)
        rt_bytes = hdr.refcount_table_clusters * cs
        self._validate_table("reference count table", hdr.refcount_table_offset,
                             hdr.refcount_table_clusters, cs, C.MAX_REFTABLE_BYTES)
        self._check_table("reference count table", hdr.refcount_table_offset, rt_bytes)

        # Snapshot table: the offset is checked even when there are no snapshots.
        self._validate_table("snapshot table", hdr.snapshots_offset, hdr.nb_snapshots,
                             _SNAP.size, _SNAP.size * C.MAX_SNAPSHOTS)

        # Virtual size and the L1 table (its offset is checked even when it is empty).
        self.virtual_size = hdr.size
        self._validate_table("L1 table", hdr.l1_table_offset, hdr.l1_size, 8, C.MAX_L1_BYTES)
        shift = hdr.cluster_bits + (self.l2_entries.bit_length() - 1)
        needed = (hdr.size + (1 << shift) - 1) >> shift
        if needed > C.INT_MAX:
            raise Qcow2Error("corrupt header: virtual size %d is too large (QEMU: image is too "
                             "big)" % hdr.size, path=path)
        if hdr.l1_size < needed:
            raise Qcow2Error("corrupt header: L1 table too small (%d entries for a virtual size "
                             "needing %d)" % (hdr.l1_size, needed), path=path)
        if hdr.size > C.MAX_SIZE:
            raise Qcow2Error("corrupt header: virtual size %d is too large" % hdr.size, path=path)
        if hdr.l1_size:
            self._check_table("L1 table", hdr.l1_table_offset, hdr.l1_size * 8)

        self.reftable_entries = rt_bytes // 8
        self._reftable = self.read(hdr.refcount_table_offset, rt_bytes)

        # QEMU reads the snapshot table and loads the bitmap directory when it opens an image.
        self.snapshots()
        self._bitmap_list = None
        if self.nb_bitmaps:
            self._bitmap_list = self._load_bitmaps()

    def _validate_table(self, name, offset, entries, entry_len, max_bytes):
        """QEMU's check of a table's place in the header: not too many entries, a cluster
        aligned offset (whatever the count) and an end that a signed 64-bit offset can hold."""
        if entries > max_bytes // entry_len:
            raise Qcow2Error("corrupt header: %s too large (%d entries, at most %d)"
                             % (name, entries, max_bytes // entry_len), path=self.path)
        if offset % self.cluster_size or C.MAX_SIZE - entries * entry_len < offset:
            raise Qcow2Error("corrupt header: %s offset invalid (%#x%s)"
                             % (name, offset, " is not cluster aligned"
                                if offset % self.cluster_size else " is out of range"),
                             path=self.path)

    def _check_luks_header(self):
        """The LUKS header, as far as QEMU checks it at open without a passphrase: inside the
        extension's area, LUKS version 1, a cipher, mode and hash QEMU knows, key slots that
        overlap nothing (format/luks.py). Kept parsed in self.luks."""
        if self.crypto_length < luks.PHDR_SIZE:
            raise Qcow2Error("corrupt header: the encryption header area (%d bytes) is smaller "
                             "than a LUKS header" % self.crypto_length, path=self.path)
        try:
            fields = luks.parse(self.read(self.crypto_offset, luks.PHDR_SIZE))
        except ValueError as exc:
            raise Qcow2Error("corrupt image: the encryption header at %#x: %s"
                             % (self.crypto_offset, exc), path=self.path)
        found = luks.problem(fields)
        if found:
            raise Qcow2Error("corrupt image: " + found, path=self.path)
        self.luks = fields

    def luks_region(self):
        """The bytes of the LUKS header region (header and key slots), what crypto/luks1
        unlocks; the parsed header is in self.luks."""
        return self.read(self.crypto_offset, self.crypto_length)

    def _parse_bitmaps_extension(self):
        """The bitmaps extension. Its length is checked always; the rest only when the
        autoclear 'bitmaps' bit is set (QEMU ignores the extension otherwise). The last such
        extension counts, as in QEMU."""
        self.nb_bitmaps = 0
        self.bitmap_directory_offset = self.bitmap_directory_size = 0
        for ext in self.extensions:
            if ext.type != C.EXT_BITMAPS:
                continue
            if len(ext.data) != _BITMAPS_EXT.size:
                raise Qcow2Error("corrupt header: bitmaps extension has %d bytes, expected 24"
                                 % len(ext.data), path=self.path)
            if not self.header.autoclear_features & C.AUTOCLEAR_BITMAPS:
                continue
            nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(ext.data)
            if reserved:
                raise Qcow2Error("corrupt header: reserved field of the bitmaps extension is "
                                 "not zero", path=self.path)
            if nb > MAX_BITMAPS:
                raise Qcow2Error("corrupt header: bitmaps extension claims %d bitmaps, more "
                                 "than %d" % (nb, MAX_BITMAPS), path=self.path)
            if nb == 0:
                raise Qcow2Error("corrupt header: bitmaps extension with zero bitmaps",
                                 path=self.path)
            if dir_offset % self.cluster_size:
                raise Qcow2Error("corrupt header: bitmap directory offset %#x is not cluster "
                                 "aligned" % dir_offset, path=self.path)
            if dir_size > MAX_BITMAP_DIRECTORY:
                raise Qcow2Error("corrupt header: bitmap directory size %d exceeds the maximum "
                                 "of %d" % (dir_size, MAX_BITMAP_DIRECTORY), path=self.path)
            self.nb_bitmaps = nb
            self.bitmap_directory_offset = dir_offset
            self.bitmap_directory_size = dir_size

    def bitmaps(self):
        """The bitmap directory: a list of dicts (name, granularity_bits, flags, type,
        table_offset, table_size), as validated when the image was opened."""
        return [dict(bm) for bm in self._bitmap_list or ()]

    def _load_bitmaps(self):
        """Read and check the bitmap directory and the tables of the bitmaps in use, the way
        QEMU does when it opens an image; raises Qcow2Error naming the first defect."""
        size = self.bitmap_directory_size
        cs = self.cluster_size
        if size == 0:
            raise Qcow2Error("corrupt image: bitmap directory size is zero", path=self.path)
        data = self.read(self.bitmap_directory_offset, size)
        result = []
        pos = 0
        while pos < size:
            if pos + _BITMAP_ENTRY.size > size:
                raise Qcow2Error("corrupt image: broken bitmap directory (an entry is cut off)",
                                 path=self.path)
            if len(result) >= self.nb_bitmaps:
                raise Qcow2Error("corrupt image: more bitmaps in the directory than the bitmaps "
                                 "extension says (%d)" % self.nb_bitmaps, path=self.path)
            (table_offset, table_size, flags, btype, gran_bits, name_size,
             extra_size) = _BITMAP_ENTRY.unpack_from(data, pos)
            end = pos + _BITMAP_ENTRY.size + extra_size + name_size
            nxt = (end + 7) & ~7
            if nxt > size:
                raise Qcow2Error("corrupt image: broken bitmap directory (an entry runs past "
                                 "its end)", path=self.path)
            if extra_size:
                raise Qcow2Error("corrupt image: bitmap directory entry with extra data (not "
                                 "supported by QEMU)", path=self.path)
            raw_name = data[end - name_size:end]
            name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
            reason = self._bitmap_entry_defect(table_offset, table_size, flags, btype,
                                               gran_bits, name_size)
            if reason:
                raise Qcow2Error("corrupt image: bitmap %r is invalid: %s" % (name, reason),
                                 path=self.path)
            result.append({"name": name, "granularity_bits": gran_bits, "flags": flags,
                           "type": btype, "table_offset": table_offset,
                           "table_size": table_size})
            pos = nxt
        if len(result) != self.nb_bitmaps:
            raise Qcow2Error("corrupt image: fewer bitmaps in the directory (%d) than the "
                             "bitmaps extension says (%d)" % (len(result), self.nb_bitmaps),
                             path=self.path)
        seen = set()
        for bm in result:
            if bm["flags"] & BME_FLAG_IN_USE and bm["name"] in seen:
                continue        # QEMU skips an in-use bitmap whose name it already loaded
            if bm["name"] in seen:
                raise Qcow2Error("corrupt image: two bitmaps are named %r" % bm["name"],
                                 path=self.path)
            seen.add(bm["name"])
            if bm["flags"] & BME_FLAG_IN_USE:
                continue        # QEMU does not read the table of an in-use bitmap
            table = self.read(bm["table_offset"], bm["table_size"] * 8)
            for (entry,) in _Q.iter_unpack(table):
                offset = entry & BME_OFFSET_MASK
                if entry & BME_RESERVED_MASK or (offset and (entry & 1 or offset % cs)):
                    raise Qcow2Error("corrupt image: bitmap %r has an invalid bitmap table "
                                     "entry %#x" % (bm["name"], entry), path=self.path)
            if self.virtual_size:
                longs = ((self.virtual_size - 1) >> (bm["granularity_bits"] + 6)) + 1
                want = ceil_div(longs * 8, cs)
                if want != bm["table_size"]:
                    raise Qcow2Error("corrupt image: bitmap %r has a table of %d entries where "
                                     "its size and granularity need %d"
                                     % (bm["name"], bm["table_size"], want), path=self.path)
        return result

    def _bitmap_entry_defect(self, table_offset, table_size, flags, btype, gran_bits,
                             name_size):
        """Why QEMU rejects a bitmap directory entry, or None."""
        cs = self.cluster_size
        if table_size == 0 or table_offset == 0 or table_offset % cs:
            return "bitmap table offset %#x or size %d invalid" % (table_offset, table_size)
        if table_size > MAX_BITMAP_TABLE:
            return "bitmap table of %d entries is too large" % table_size
        if not MIN_GRANULARITY_BITS <= gran_bits <= MAX_GRANULARITY_BITS:
            return "granularity bits %d outside %d..%d" % (
                gran_bits, MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS)
        if flags & BME_RESERVED_FLAGS:
            return "reserved flags %#x set" % (flags & BME_RESERVED_FLAGS)
        if name_size > MAX_BITMAP_NAME:
            return "name of %d bytes is too long" % name_size
        if btype != BITMAP_TYPE_DIRTY:
            return "unknown bitmap type %d" % btype
        phys = table_size * cs
        if phys > MAX_BITMAP_PHYS:
            return "bitmap data of %d bytes is too large" % phys
        if not flags & BME_FLAG_IN_USE and self.virtual_size > (phys * 8) << gran_bits:
            return "bitmap table too small for the virtual size"
        return None

    def _check_table(self, name, offset, nbytes):
        cs = self.cluster_size
        if offset & (cs - 1):
            raise Qcow2Error("corrupt header: %s offset %#x is not cluster aligned"
                             % (name, offset), path=self.path)
        if offset < cs:
            raise Qcow2Error("corrupt header: %s at offset %#x overlaps the header cluster"
                             % (name, offset), path=self.path)
        if offset >= self.file_size:
            raise Qcow2Error("corrupt header: %s offset %#x is past the end of the file (%d "
                             "bytes)" % (name, offset, self.file_size), path=self.path)
        if offset + nbytes > C.MAX_SIZE:
            raise Qcow2Error("corrupt header: %s at %#x of %d bytes is out of range"
                             % (name, offset, nbytes), path=self.path)

    def feature_names(self):
        """{(type, bit): name} from the image's feature name table extension."""
        names = {}
        data = find_extension(self.extensions, C.EXT_FEATURE_TABLE) or b""
        for pos in range(0, len(data) - C.FEATURE_RECORD_LEN + 1, C.FEATURE_RECORD_LEN):
            ftype, bit = data[pos], data[pos + 1]
            raw = data[pos + 2:pos + C.FEATURE_RECORD_LEN].split(b"\0", 1)[0]
            names.setdefault((ftype, bit), raw.decode("utf-8", "replace"))
        return names

    # -- tables ---------------------------------------------------------------------------

    @property
    def total_clusters(self):
        """Guest clusters as qemu-img check counts them (size rounded down to 512 first)."""
        return ceil_div((self.virtual_size // 512) * 512, self.cluster_size)

    def l1_chunks(self, chunk_entries=READ_CHUNK // 8):
        """Yield (first index, bytes) of the active L1 table, at most chunk_entries at a time."""
        hdr = self.header
        for start in range(0, hdr.l1_size, chunk_entries):
            n = min(chunk_entries, hdr.l1_size - start)
            yield start, self.read(hdr.l1_table_offset + start * 8, n * 8)

    def l1_entry(self, index):
        if not 0 <= index < self.header.l1_size:
            return 0
        return _Q.unpack(self.read(self.header.l1_table_offset + index * 8, 8))[0]

    def read_l2(self, offset):
        """The bytes of the L2 table at `offset` (one cluster)."""
        return self.read(offset, self.cluster_size)

    def l2_entries_of(self, table):
        """[(descriptor, bitmap)] of an L2 table (bitmap 0 for standard entries)."""
        n = len(table) // 8
        vals = struct.unpack(">%dQ" % n, table[:n * 8])
        if self.extended_l2:
            return list(zip(vals[0::2], vals[1::2]))
        return [(v, 0) for v in vals]

    def reftable_entry(self, index):
        if not 0 <= index < self.reftable_entries:
            return 0
        return _Q.unpack_from(self._reftable, index * 8)[0]

    def refblock(self, offset):
        """Bytes of the refblock at `offset` (a small cache keeps the last few)."""
        cache = self._refblock_cache
        block = cache.get(offset)
        if block is None:
            block = self.read(offset, self.cluster_size)
            if len(cache) >= 64:
                cache.clear()
            cache[offset] = block
        return block

    def refcount(self, cluster):
        """The stored refcount of host cluster `cluster`; RefcountError if unreadable."""
        idx, pos = divmod(cluster, self.refblock_entries)
        entry = self.reftable_entry(idx)
        offset = entry & C.REFT_OFFSET_MASK
        if not offset:
            return 0
        if offset & (self.cluster_size - 1):
            raise RefcountError("refblock offset %#x unaligned (reftable index %#x)"
                                % (offset, idx))
        return refcount_at(self.refblock(offset), pos, self.header.refcount_order)

    def snapshots(self):
        """The snapshot table: a list of dicts, plus the table's size in bytes (cached)."""
        if self._snapshots is None:
            self._snapshots = self._read_snapshots()
        return self._snapshots

    def _read_snapshots(self):
        hdr = self.header
        result = []
        pos = hdr.snapshots_offset
        end_limit = hdr.snapshots_offset + MAX_SNAPSHOTS_SIZE
        window = [0, b""]

        def read(offset, length):
            """Reads through a 1 MiB window: the table is read once, not field by field."""
            start, data = window
            if offset < start or offset + length > start + len(data):
                window[0] = offset
                window[1] = data = self.read(offset, max(length, 1 << 20))
                start = offset
            return data[offset - start:offset - start + length]

        for i in range(hdr.nb_snapshots):
            pos = (pos + 7) & ~7
            fixed = read(pos, _SNAP.size)
            (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, clock_ns, vm_state,
             extra_len) = _SNAP.unpack(fixed)
            pos += _SNAP.size
            if extra_len > MAX_SNAPSHOT_EXTRA:
                raise Qcow2Error("corrupt image: too much extra metadata in snapshot table entry "
                                 "%d" % i, path=self.path)
            extra = read(pos, extra_len)
            pos += extra_len
            ident = read(pos, id_len)
            pos += id_len
            name = read(pos, name_len)
            pos += name_len
            if pos > end_limit:
                raise Qcow2Error("corrupt image: snapshot table too large", path=self.path)
            if pos > self.file_size:
                raise Qcow2Error("corrupt image: snapshot table runs past the end of the file",
                                 path=self.path)
            icount = -1
            if extra_len >= 8:
                vm_state = _Q.unpack_from(extra, 0)[0]
            if extra_len >= 24:
                icount = _Q.unpack_from(extra, 16)[0]
                if icount >= 1 << 63:
                    icount -= 1 << 64
            result.append({
                "l1_table_offset": l1_off, "l1_size": l1_size,
                "id": ident.decode("utf-8", "replace"), "name": name.decode("utf-8", "replace"),
                "date_sec": date_sec, "date_nsec": date_nsec, "vm_clock_nsec": clock_ns,
                "vm_state_size": vm_state, "icount": icount, "extra_data_size": extra_len,
            })
        size = pos - hdr.snapshots_offset if hdr.nb_snapshots else 0
        return result, size

    # -- classification -------------------------------------------------------------------

    def cluster_type(self, entry):
        """The cluster type of an L2 descriptor, as QEMU decides it."""
        if entry & C.OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & C.OFLAG_ZERO and not self.extended_l2:
            return ZERO_ALLOC if entry & C.L2E_OFFSET_MASK else ZERO_PLAIN
        if not entry & C.L2E_OFFSET_MASK:
            if self.has_data_file and entry & C.OFLAG_COPIED:
                return NORMAL
            return UNALLOCATED
        return NORMAL

    def compressed_range(self, entry):
        """(host byte offset, byte length) of a compressed cluster descriptor."""
        shift = 62 - (self.cluster_bits - 8)
        coffset = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return coffset, sectors * 512 - (coffset & 511)

    def l2_runs(self, table):
        """Split an L2 table into runs: [(first index, count, descriptor, bitmap)].

        Within a run every entry has the same type, flags and bitmap, and allocated entries
        point at consecutive host clusters (descriptor k = first descriptor + k*cluster size).
        Compressed entries are runs of one.
        """
        return l2_runs(self, table)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the public functions


class Opened(object):
    """Context manager giving an Image: the caller's, or one opened (and closed) here."""

    def __init__(self, path, image):
        self.path = path
        self.image = image
        self.opened = None

    def __enter__(self):
        if self.image is not None:
            return self.image
        self.opened = Image.open(self.path)
        return self.opened

    def __exit__(self, *exc):
        if self.opened is not None:
            self.opened.close()


def guard(func):
    """Turn every unexpected decoding failure into a Qcow2Error."""
    def wrapper(path, *args, **kwargs):
        try:
            return func(path, *args, **kwargs)
        except Qcow2Error:
            raise
        except OSError as exc:
            raise Qcow2Error("cannot read %s: %s" % (path, exc.strerror or exc), path=path)
        except DECODE_ERRORS + (RefcountError,) as exc:
            raise Qcow2Error("corrupt image %s: %s" % (path, exc), path=path)
    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def path_combine(base, name):
    """The backing name resolved against the image path as QEMU does it."""
    if name.startswith("/") or _has_protocol(name):
        return name
    slash = base.rfind("/")
    if slash < 0:
        return name
    return base[:slash + 1] + name


def _has_protocol(name):
    colon = name.find(":")
    if colon <= 0:
        return False
    slash = name.find("/")
    return slash < 0 or colon < slash


def st_blocks_bytes(img):
    if img.fd is None:
        return 0
    try:
        return os.fstat(img.fd).st_blocks * 512
    except (OSError, AttributeError):
        return 0
