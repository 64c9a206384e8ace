# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The qcow2 header and its extensions: parse and serialise, nothing else.

`Header` holds the fixed fields; `Extension` one type-length-value record; `encode_cluster0`
produces the whole first cluster the way QEMU 7.2 writes it, and `decode_cluster0` reads it back
with every length and offset checked before use.
"""

import struct

from . import constants as C
from .errors import Qcow2Error

# Big-endian layout of the fixed header (bytes 0..103), named once.
_V2 = struct.Struct(">IIQIIQIIQQIIQ")          # 72 bytes
_V3_TAIL = struct.Struct(">QQQII")            # bytes 72..103
_EXT = struct.Struct(">II")
if _V2.size != 72 or _V3_TAIL.size != 32:  # pragma: no cover
    raise ImportError("unexpected qcow2 header layout")


class Header(object):
    """The fixed fields of a qcow2 header (names as in the specification)."""

    FIELDS = (
        "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
        "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
        "refcount_table_clusters", "nb_snapshots", "snapshots_offset",
        "incompatible_features", "compatible_features", "autoclear_features",
        "refcount_order", "header_length", "compression_type",
    )

    def __init__(self, **kwargs):
        self.version = 3
        self.backing_file_offset = 0
        self.backing_file_size = 0
        self.cluster_bits = 16
        self.size = 0
        self.crypt_method = 0
        self.l1_size = 0
        self.l1_table_offset = 0
        self.refcount_table_offset = 0
        self.refcount_table_clusters = 0
        self.nb_snapshots = 0
        self.snapshots_offset = 0
        self.incompatible_features = 0
        self.compatible_features = 0
        self.autoclear_features = 0
        self.refcount_order = 4
        self.header_length = C.V3_HEADER_LENGTH
        self.compression_type = 0
        # Header bytes beyond the fields we know (header_length > 112), kept verbatim.
        self.unknown_tail = b""
        for key, value in kwargs.items():
            if key not in self.FIELDS and key != "unknown_tail":
                raise TypeError("unknown header field %s" % key)
            setattr(self, key, value)

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self):
        return 1 << self.refcount_order

    def copy(self):
        new = Header()
        new.__dict__.update(self.__dict__)
        return new

    def as_dict(self):
        return dict((name, getattr(self, name)) for name in self.FIELDS)

    def __eq__(self, other):
        return isinstance(other, Header) and self.__dict__ == other.__dict__

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return "Header(%s)" % ", ".join("%s=%r" % kv for kv in sorted(self.as_dict().items()))

    def pack(self):
        """The header bytes: 72 for version 2, header_length for version 3."""
        head = _V2.pack(
            C.MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset)
        if self.version == 2:
            return head
        tail = _V3_TAIL.pack(
            self.incompatible_features, self.compatible_features, self.autoclear_features,
            self.refcount_order, self.header_length)
        data = head + tail
        if self.header_length > C.V3_MIN_HEADER_LENGTH:
            data += struct.pack(">B7x", self.compression_type)
            data += self.unknown_tail
        if len(data) < self.header_length:
            data += b"\0" * (self.header_length - len(data))
        return data[:max(self.header_length, C.V3_MIN_HEADER_LENGTH)]

    @classmethod
    def unpack(cls, buf):
        """Parse the fixed header from the start of `buf`; checks only what decoding needs."""
        if len(buf) < _V2.size:
            raise Qcow2Error("not a qcow2 image: file is shorter than a qcow2 header (%d bytes)"
                             % len(buf))
        fields = _V2.unpack_from(buf, 0)
        if fields[0] != C.MAGIC:
            raise Qcow2Error("not a qcow2 image: bad magic %#010x" % fields[0])
        hdr = cls()
        (_magic, hdr.version, hdr.backing_file_offset, hdr.backing_file_size, hdr.cluster_bits,
         hdr.size, hdr.crypt_method, hdr.l1_size, hdr.l1_table_offset,
         hdr.refcount_table_offset, hdr.refcount_table_clusters, hdr.nb_snapshots,
         hdr.snapshots_offset) = fields
        if hdr.version not in (2, 3):
            raise Qcow2Error("unsupported qcow2 version %d (only 2 and 3 exist)" % hdr.version)
        if hdr.version == 2:
            hdr.incompatible_features = hdr.compatible_features = hdr.autoclear_features = 0
            hdr.refcount_order = 4
            hdr.header_length = C.V2_HEADER_LENGTH
            hdr.compression_type = 0
            return hdr
        if len(buf) < C.V3_MIN_HEADER_LENGTH:
            raise Qcow2Error("corrupt header: version 3 header truncated at %d bytes" % len(buf))
        (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
         hdr.refcount_order, hdr.header_length) = _V3_TAIL.unpack_from(buf, 72)
        if hdr.header_length < C.V3_MIN_HEADER_LENGTH:
            raise Qcow2Error("corrupt header: header_length %d is below the minimum of 104"
                             % hdr.header_length)
        if hdr.header_length > len(buf):
            raise Qcow2Error("corrupt header: header_length %d exceeds the first cluster"
                             % hdr.header_length)
        if hdr.header_length > C.V3_MIN_HEADER_LENGTH:
            hdr.compression_type = buf[104]
        if hdr.header_length > C.V3_HEADER_LENGTH:
            hdr.unknown_tail = bytes(buf[C.V3_HEADER_LENGTH:hdr.header_length])
        return hdr


class Extension(object):
    """One header extension: a type and its payload (padding not included)."""

    __slots__ = ("type", "data")

    def __init__(self, ext_type, data):
        self.type = ext_type
        self.data = bytes(data)

    def pack(self):
        pad = (-len(self.data)) % 8
        return _EXT.pack(self.type, len(self.data)) + self.data + b"\0" * pad

    def __eq__(self, other):
        return isinstance(other, Extension) and (self.type, self.data) == (other.type, other.data)

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return "Extension(%#010x, %r)" % (self.type, self.data)


def feature_table_extension():
    """The 8-record feature name table QEMU 7.2 writes into version 3 images."""
    records = b"".join(
        struct.pack(">BB46s", ftype, bit, name.encode("ascii"))
        for ftype, bit, name in C.FEATURE_TABLE)
    return Extension(C.EXT_FEATURE_TABLE, records)


def standard_extensions(version, cluster_size, backing_fmt=None, data_file=None):
    """The extensions QEMU writes at creation, in its order."""
    exts = []
    if backing_fmt:
        exts.append(Extension(C.EXT_BACKING_FORMAT, backing_fmt.encode("utf-8")))
    if data_file:
        exts.append(Extension(C.EXT_DATA_FILE, data_file.encode("utf-8")))
    if version >= 3 and cluster_size > 4096:
        exts.append(feature_table_extension())
    return exts


def encode_cluster0(header, extensions, backing_name=None):
    """The whole first cluster: header, extensions, END, backing name, zero fill.

    Sets header.backing_file_offset/backing_file_size to match `backing_name`.
    """
    cs = header.cluster_size
    ext_bytes = b"".join(ext.pack() for ext in extensions) + _EXT.pack(C.EXT_END, 0)
    header_len = C.V2_HEADER_LENGTH if header.version == 2 else header.header_length
    name = backing_name.encode("utf-8") if backing_name else b""
    if name:
        header.backing_file_offset = header_len + len(ext_bytes)
        header.backing_file_size = len(name)
    else:
        header.backing_file_offset = 0
        header.backing_file_size = 0
    data = header.pack() + ext_bytes + name
    if len(data) > cs:
        raise Qcow2Error(
            "the header, its extensions and the backing file name need %d bytes, more than one "
            "cluster of %d bytes: use a larger cluster_size or shorter names" % (len(data), cs),
            option="cluster_size")
    return data + b"\0" * (cs - len(data))


def decode_cluster0(buf):
    """Parse the first cluster: returns (header, extensions, backing_name or None).

    `buf` holds at most one cluster (less if the file is shorter). Every extension length is
    checked against the space left, so a hostile header cannot make this read outside `buf`.
    Unknown extension types are kept; no END marker before the end of the area is tolerated,
    as QEMU does, but a record that crosses the end of the area is refused, as QEMU does.
    """
    hdr = Header.unpack(buf)
    if not C.MIN_CLUSTER_BITS <= hdr.cluster_bits <= C.MAX_CLUSTER_BITS:
        raise Qcow2Error("corrupt header: cluster_bits %d is outside 9..21" % hdr.cluster_bits)
    cs = hdr.cluster_size
    buf = buf[:cs]
    if hdr.header_length > cs:
        raise Qcow2Error("corrupt header: header_length %d is larger than the cluster size %d"
                         % (hdr.header_length, cs))
    if hdr.backing_file_offset:
        if hdr.backing_file_offset > cs:
            raise Qcow2Error("corrupt header: backing file offset %d is outside the first "
                             "cluster" % hdr.backing_file_offset)
        if hdr.backing_file_size > C.MAX_BACKING_NAME or \
                hdr.backing_file_size > cs - hdr.backing_file_offset:
            raise Qcow2Error("corrupt header: backing file name too long (%d bytes)"
                             % hdr.backing_file_size)
        end = hdr.backing_file_offset
    else:
        end = cs
    # Bytes past the end of a short file read as zeros, as they do for QEMU.
    buf = bytes(buf[:cs])
    if len(buf) < cs:
        buf += bytes(cs - len(buf))
    exts = []
    pos = hdr.header_length
    # QEMU walks the extensions up to the backing file name (or the end of the cluster); every
    # record, the END marker included, must fit before that point ("Header extension too
    # large" otherwise).
    while pos < end:
        if pos + _EXT.size > end:
            raise Qcow2Error("corrupt header: header extension too large (an extension header "
                             "at offset %d crosses the end of the extension area at %d)"
                             % (pos, end))
        ext_type, length = _EXT.unpack_from(buf, pos)
        pos += _EXT.size
        if length > end - pos:
            raise Qcow2Error("corrupt header: header extension too large (extension %#010x "
                             "has length %d, past the end of the extension area)"
                             % (ext_type, length))
        if ext_type == C.EXT_END:
            break
        exts.append(Extension(ext_type, buf[pos:pos + length]))
        pos += (length + 7) & ~7
    backing = None
    if hdr.backing_file_offset:
        stop = hdr.backing_file_offset + hdr.backing_file_size
        backing = bytes(buf[hdr.backing_file_offset:stop]).decode("utf-8", "replace")
    return hdr, exts, backing


def find_extension(extensions, ext_type):
    """The payload of the first extension of `ext_type`, or None."""
    for ext in extensions:
        if ext.type == ext_type:
            return ext.data
    return None
