# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Numbers of the qcow2 format, named once.

Everything here is a fact of the on-disk format (docs/interop/qcow2.txt in QEMU) or a limit
QEMU enforces when it opens or creates an image. No logic lives here.
"""

MAGIC = 0x514649FB

# Header sizes: a version 2 header is exactly 72 bytes; QEMU writes 112-byte v3 headers
# (104 mandatory bytes, the compression type byte and 7 bytes of padding).
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_SIZE = 65536

# Limits QEMU enforces (block/qcow2.h).
MAX_L1_BYTES = 32 * 1024 * 1024          # QCOW_MAX_L1_SIZE
MAX_L1_ENTRIES = MAX_L1_BYTES // 8
MAX_REFTABLE_BYTES = 8 * 1024 * 1024     # QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
# Images in a backing chain this engine follows, the top image included (a bound of ours:
# reading a template's chain and judging a shrink over an overlay stop there).
MAX_BACKING_CHAIN = 16
MAX_BACKING_FMT = 15                      # the format name must be shorter than 16 bytes
# The block drivers qemu-img 7.2 knows (`qemu-img --help`, "Supported formats"): a backing
# format must name one of them, or QEMU cannot open the image.
BACKING_FORMATS = (
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http",
    "https", "iscsi", "iser", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels",
    "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication",
    "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat")
MAX_SNAPSHOTS = 65536
MAX_SIZE = (1 << 63) - 1                  # qemu-img refuses sizes above INT64_MAX
INT_MAX = (1 << 31) - 1                   # QEMU refuses images needing more L1 entries
MAX_HOST_OFFSET = 1 << 56                 # L1/L2/reftable offsets are 56-bit

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPAT_MASK = 0x1
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

FEATURE_INCOMPAT = 0
FEATURE_COMPAT = 1
FEATURE_AUTOCLEAR = 2

# The feature name table QEMU 7.2 writes, in its order: (type, bit, name).
FEATURE_TABLE = (
    (FEATURE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_INCOMPAT, 2, "external data file"),
    (FEATURE_INCOMPAT, 3, "compression type"),
    (FEATURE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)
FEATURE_NAME_LEN = 46
FEATURE_RECORD_LEN = 48

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

EXTENSION_NAMES = {
    EXT_BACKING_FORMAT: "backing format",
    EXT_FEATURE_TABLE: "feature name table",
    EXT_BITMAPS: "bitmaps",
    EXT_CRYPTO: "full disk encryption header pointer",
    EXT_DATA_FILE: "external data file name",
}

# Compression types (header byte 104).
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# Table entry bits and masks.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
L2E_EXT_RESERVED_MASK = 0x3F000000000001FF   # bit 0 is reserved with extended L2
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# Preallocation levels, lowest first: an image at a level satisfies every lower one.
PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def prealloc_rank(mode):
    """Order of a preallocation mode: off < metadata < falloc < full."""
    return PREALLOC_MODES.index(mode)


def l2_entry_size(extended_l2):
    """Bytes per L2 entry: 8, or 16 with extended L2 (descriptor plus subcluster bitmap)."""
    return 16 if extended_l2 else 8


def max_virtual_size(cluster_size, extended_l2=False):
    """The largest virtual size QEMU accepts for a cluster size (the L1 table limit)."""
    entries_per_l2 = cluster_size // l2_entry_size(extended_l2)
    return min(MAX_L1_ENTRIES * entries_per_l2 * cluster_size, MAX_SIZE)
