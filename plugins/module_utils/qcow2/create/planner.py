# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The layout planner: validated options in, a byte layout out. No I/O.

preallocation=off reproduces qemu-img's layout exactly (see allocator.py).

metadata, falloc and full use one layout computed in closed form, every region contiguous:

    [header][refcount table][refcount blocks][L1][L2 tables][data clusters]

Every cluster of the file is referenced exactly once, so every refcount is 1 and every
L1/L2 entry carries COPIED; the refcount structures are sized by the fixed point of "blocks
that also count themselves". With an external data file the data clusters live there, L2
entries map guest cluster k to data-file offset k (identity) and are not refcounted.
"""

import struct

from ..format import constants as C
from .allocator import QemuCreateModel, div_round_up, refcount_metadata_size
from ..format.errors import Qcow2Error
from ..format.header import Extension, Header, encode_cluster0, standard_extensions
from ..format.tables import padded, progression, refcount_runs, zeros


class Region(object):
    """A run of bytes the writer puts into the image file."""

    __slots__ = ("name", "offset", "length", "source")

    def __init__(self, name, offset, length, source):
        self.name = name
        self.offset = offset
        self.length = length
        self.source = source        # a callable returning an iterator of bytes chunks

    def chunks(self):
        return self.source()

    def describe(self):
        return {"name": self.name, "offset": self.offset, "length": self.length}

    def __repr__(self):
        return "Region(%s, %d, %d)" % (self.name, self.offset, self.length)


class Plan(object):
    """Everything the writer needs, and what the caller may want to report."""

    def __init__(self, options, mode):
        self.options = options
        self.mode = mode                   # effective preallocation mode
        self.cluster_size = options.cluster_size
        self.header = None
        self.regions = []                  # metadata regions, ascending, non-overlapping
        self.data_offset = 0               # host range of the data clusters in the image file
        self.data_length = 0
        self.file_size = 0                 # final length of the image file
        self.data_file_size = 0            # final length of the external data file, if any
        self.zero_flag = False
        self.data_bitmap = None            # extended L2: bitmap of every mapped cluster
        # An encrypted compat 0.10 image has no zero flag: its preallocated data clusters must
        # be written with encrypted zeros (by the caller, which holds the key).
        self.encrypted_zeros = False

    @property
    def guest_clusters(self):
        return div_round_up(self.options.size, self.cluster_size)

    @property
    def allocated_bytes(self):
        """Bytes the filesystem must provide (falloc/full), image and data file together."""
        total = sum(r.length for r in self.regions)
        if self.mode in ("falloc", "full"):
            total += self.data_length
            if self.options.data_file:
                total += self.data_file_size
        return total

    def describe(self):
        return {
            "mode": self.mode,
            "file_size": self.file_size,
            "regions": [r.describe() for r in self.regions],
            "data": {"offset": self.data_offset, "length": self.data_length},
            "data_file_size": self.data_file_size,
        }


def _base_header(opts):
    hdr = Header()
    hdr.version = opts.version
    hdr.cluster_bits = opts.cluster_bits
    hdr.size = opts.size
    hdr.refcount_order = opts.refcount_order
    if opts.version == 2:
        hdr.header_length = C.V2_HEADER_LENGTH
        return hdr
    hdr.header_length = C.V3_HEADER_LENGTH
    if opts.data_file:
        hdr.incompatible_features |= C.INCOMPAT_DATA_FILE
    if opts.compression_type == "zstd":
        hdr.incompatible_features |= C.INCOMPAT_COMPRESSION
        hdr.compression_type = C.COMPRESSION_ZSTD
    if opts.extended_l2:
        hdr.incompatible_features |= C.INCOMPAT_EXTL2
    if opts.lazy_refcounts:
        hdr.compatible_features |= C.COMPAT_LAZY_REFCOUNTS
    if opts.data_file_raw:
        hdr.autoclear_features |= C.AUTOCLEAR_DATA_FILE_RAW
    return hdr


def l1_entries(size, cluster_size, extended_l2):
    """Number of L1 entries QEMU gives an image of `size` bytes."""
    per_l2 = cluster_size // C.l2_entry_size(extended_l2)
    return div_round_up(div_round_up(size, cluster_size), per_l2)


def _cluster0_region(hdr, opts, crypto=None):
    exts = standard_extensions(opts.version, opts.cluster_size, opts.backing_fmt, opts.data_file)
    if crypto is not None:
        exts.insert(0, Extension(C.EXT_CRYPTO, struct.pack(">QQ", *crypto)))
    data = encode_cluster0(hdr, exts, opts.backing_file)
    return Region("header", 0, len(data), lambda: iter((data,)))


def plan_create(opts, zero_flag=False, data_bitmap=None, luks_header=None):
    """Plan a new image for validated CreateOptions.

    `zero_flag` marks preallocated clusters as reading zeros (for targets without zero-init
    such as block devices); it needs compat 1.1.

    `luks_header` (the bytes of a LUKS header region, crypto/luks1.build) makes a LUKS
    encrypted image: the header in its own clusters after the refcount blocks, pointed to by
    the full disk encryption extension. Preallocated clusters then carry the zero flag, so the
    guest reads zeros from them without decrypting anything (`full` writes plain zeros into them
    as well, like any full image: the flag, not the bytes, is what the guest reads). Compat 0.10
    has no zero flag: there the plan asks for encrypted zeros in every preallocated data
    cluster (`encrypted_zeros`), which only the holder of the key can write.
    """
    mode = opts.effective_preallocation
    plan = Plan(opts, mode)
    if opts.data_file:
        plan.data_file_size = opts.size
    if luks_header is not None:
        if opts.data_file_raw:
            raise Qcow2Error("encrypt_format: a LUKS image is planned without data_file_raw "
                             "(see format/options)", option="encrypt_format")
        plan.zero_flag = opts.version >= 3
        plan.encrypted_zeros = opts.version == 2 and mode != "off"
        _plan_prealloc(plan, opts, luks_header)
    elif mode == "off":
        _plan_off(plan, opts)
    else:
        if zero_flag and opts.version == 2:
            if mode == "metadata":
                raise Qcow2Error("preallocation: metadata on a device without "
                                 "zero-initialisation needs compat 1.1 (zero flags do not exist "
                                 "in compat 0.10); falloc and full write zeros instead",
                                 option="preallocation")
            # falloc and full write zeros into every data cluster of a device: no flag needed.
            zero_flag = False
        plan.zero_flag = zero_flag
        plan.data_bitmap = data_bitmap
        _plan_prealloc(plan, opts)
    return plan


def _plan_off(plan, opts):
    """qemu-img's own layout: replay its allocator for the L1 table."""
    cs = opts.cluster_size
    n_l1 = l1_entries(opts.size, cs, opts.extended_l2)
    model = QemuCreateModel(cs, opts.refcount_order).create(n_l1 * 8)
    hdr = _base_header(opts)
    hdr.l1_size = n_l1
    hdr.l1_table_offset = model.l1_offset
    hdr.refcount_table_offset = model.reftable_offset
    hdr.refcount_table_clusters = model.reftable_clusters
    plan.header = hdr
    plan.regions.append(_cluster0_region(hdr, opts))
    contents = model.contents()
    contents.pop(0, None)
    # Coalesce adjacent clusters into regions so the writer issues few large writes.
    run = []
    for index in sorted(contents):
        if run and index != run[-1] + 1:
            plan.regions.append(_run_region(run, contents, cs))
            run = []
        run.append(index)
    if run:
        plan.regions.append(_run_region(run, contents, cs))
    plan.file_size = model.file_size


def _run_region(run, contents, cs):
    data = b"".join(contents[i] for i in run)
    return Region("metadata", run[0] * cs, len(data), lambda: iter((data,)))


def _plan_prealloc(plan, opts, luks_header=None):
    cs = opts.cluster_size
    cluster_count = div_round_up(opts.size, cs)
    entry_size = C.l2_entry_size(opts.extended_l2)
    per_l2 = cs // entry_size
    n_l1 = div_round_up(cluster_count, per_l2)
    # An encrypted image with preallocation off: an empty L1 table, no L2 tables, no data.
    allocate = plan.mode != "off"
    n_l2 = n_l1 if allocate else 0
    l1_clusters = div_round_up(n_l1 * 8, cs)
    external = bool(opts.data_file)
    data_clusters = 0 if external or not allocate else cluster_count
    crypto_clusters = div_round_up(len(luks_header), cs) if luks_header is not None else 0
    counted = 1 + crypto_clusters + l1_clusters + n_l2 + data_clusters
    # With clusters smaller than a filesystem block, start the data on a 4 KiB boundary so no
    # block holds both metadata and (hole) data clusters; the gap clusters stay free.
    align = max(1, 4096 // cs)
    gap = 0
    while True:
        blocks, table = refcount_metadata_size(counted + gap, cs, opts.refcount_order, False)
        data_at = 1 + table + blocks + crypto_clusters + l1_clusters + n_l2
        new_gap = (-data_at) % align if data_clusters else 0
        if new_gap == gap:
            break
        gap = new_gap
    if table * cs > C.MAX_REFTABLE_BYTES:
        raise Qcow2Error("size: the refcount table for this image would exceed 8 MiB; use a "
                         "larger cluster_size", option="size")
    total = counted + gap + blocks + table
    if total * cs >= C.MAX_HOST_OFFSET:
        raise Qcow2Error("size: a preallocated image this large would exceed the qcow2 host "
                         "offset limit", option="size")

    reftable_at = 1
    refblocks_at = reftable_at + table
    crypto_at = refblocks_at + blocks
    l1_at = crypto_at + crypto_clusters
    l2_at = l1_at + l1_clusters
    data_at = l2_at + n_l2 + gap
    end = data_at + data_clusters

    hdr = _base_header(opts)
    hdr.l1_size = n_l1
    hdr.l1_table_offset = l1_at * cs if n_l1 else 0
    hdr.refcount_table_offset = reftable_at * cs
    hdr.refcount_table_clusters = table
    plan.header = hdr
    crypto = None
    if luks_header is not None:
        hdr.crypt_method = C.CRYPT_LUKS
        crypto = (crypto_at * cs, len(luks_header))
    plan.regions.append(_cluster0_region(hdr, opts, crypto))

    order = opts.refcount_order
    plan.regions.append(Region(
        "refcount table", reftable_at * cs, table * cs,
        lambda: padded(progression(refblocks_at * cs, cs, blocks), table * cs)))
    plan.regions.append(Region(
        "refcount blocks", refblocks_at * cs, blocks * cs,
        lambda: refcount_runs(((0, data_at - gap), (data_at, end)), order, blocks * cs)))
    if crypto_clusters:
        padded_header = luks_header + bytes(crypto_clusters * cs - len(luks_header))
        plan.regions.append(Region("encryption header", crypto_at * cs, len(padded_header),
                                   lambda: iter((padded_header,))))
    if n_l1 and not allocate:
        plan.regions.append(Region("L1 table", l1_at * cs, l1_clusters * cs,
                                   lambda: zeros(l1_clusters * cs)))
    elif n_l1:
        plan.regions.append(Region(
            "L1 table", l1_at * cs, l1_clusters * cs,
            lambda: padded(progression((l2_at * cs) | C.OFLAG_COPIED, cs, n_l1),
                           l1_clusters * cs)))
        zero = plan.zero_flag
        if opts.extended_l2:
            # Bitmap: all subclusters "allocated" would expose host bytes; leave them
            # unallocated (reads fall through to zeros or the backing file) like QEMU, or
            # mark them as zero for targets without zero-initialisation.
            tail = 0xFFFFFFFF00000000 if zero else 0
            if plan.data_bitmap is not None:
                tail = plan.data_bitmap   # a copy: the data written into the clusters shows
            flags = C.OFLAG_COPIED
        else:
            tail = 0
            flags = C.OFLAG_COPIED | (C.OFLAG_ZERO if zero else 0)
        first_data = 0 if external else data_at * cs
        plan.regions.append(Region(
            "L2 tables", l2_at * cs, n_l2 * cs,
            lambda: padded(progression(first_data | flags, cs, cluster_count,
                                       entry_size, tail), n_l2 * cs)))
    plan.data_offset = data_at * cs
    plan.data_length = data_clusters * cs
    plan.file_size = end * cs


def metadata_chunks(plan):
    """Yield (offset, bytes) for every metadata region, in file order."""
    for region in plan.regions:
        offset = region.offset
        for piece in region.chunks():
            yield offset, piece
            offset += len(piece)


__all__ = ["Plan", "Region", "plan_create", "metadata_chunks", "l1_entries", "zeros"]
