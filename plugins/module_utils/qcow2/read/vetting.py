# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Vetting a file before it is used as an untrusted template (a downloaded cloud image).

`unsafe_reasons(observed, probe, max_size)` is a pure function: from what `api.observe`
gathered and a few bytes of the file (`read_probe`), it lists why the file is not safe to hand
to `image` as a source without trusting whoever made it. An empty list means none was found:
a plain raw file without another format's signature, or a self-contained, clean qcow2 image.

The reasons follow what OpenStack's image inspectors refuse: a backing file or an external data
file (either can name any host file, which the new guest would then read), encryption, feature
bits nobody knows, the corrupt or dirty bit, a header the image model (like QEMU) refuses, an
absurd virtual size, and for a file that is not qcow2, the signature of another disk format
(a file passed off as raw that QEMU, or a later tool, could read as something else).
"""

import os
import stat

from ..format import constants as C

__all__ = ["unsafe_reasons", "read_probe", "signatures", "DEFAULT_MAX_SIZE"]

DEFAULT_MAX_SIZE = 64 << 40             # 64 TiB: far beyond any real template
HEAD_BYTES = 4096                       # read at the start of the file
TAIL_BYTES = 512                        # ... and at its end (VHD footer, DMG trailer)

# (offset, magic, what): signatures at fixed offsets from the start of the file.
_HEAD_SIGNATURES = (
    (0, b"KDMV", "a VMDK sparse extent"),
    (0, b"COWD", "a VMware ESX sparse extent (VMDK)"),
    (0, b"# Disk DescriptorFile", "a VMDK descriptor (it names other files)"),
    (0, b"vhdxfile", "a VHDX image"),
    (0, b"conectix", "a VHD image (header copy of its footer)"),
    (0x40, b"\x7f\x10\xda\xbe", "a VDI (VirtualBox) image"),
    (0, b"<<< Oracle VM VirtualBox Disk Image >>>", "a VDI (VirtualBox) image"),
    (0, b"<<< Sun xVM VirtualBox Disk Image >>>", "a VDI (VirtualBox) image"),
    (0, b"QED\x00", "a QED image"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (0, b"SKUL\xba\xbe", "a LUKS2 encrypted volume (secondary header)"),
    (0, b"Bochs Virtual HD Image", "a Bochs image"),
    (0, b"WithoutFreeSpace", "a Parallels image"),
    (0, b"WithouFreSpacExt", "a Parallels image"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "a cloop image"),
)
_QCOW_MAGIC = C.MAGIC.to_bytes(4, "big")


def read_probe(path):
    """The bytes vetting needs from `path`: a dict with head, tail and size, or None when the
    file is neither a regular file nor a block device (nothing is read from a FIFO) or cannot
    be read. Opens the file read-only and without blocking; reads at most 4.5 KiB."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | \
        getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            return None
        head = os.pread(fd, HEAD_BYTES, 0)
        tail = os.pread(fd, TAIL_BYTES, size - TAIL_BYTES) if size >= TAIL_BYTES else b""
        return {"head": head, "tail": tail, "size": size}
    except OSError:
        return None
    finally:
        os.close(fd)


def signatures(head, tail=b""):
    """The disk formats other than qcow2 version 2 or 3 whose signature `head` (the first
    bytes of a file) or `tail` (its last 512 bytes) carries, as phrases."""
    found = []
    for offset, magic, what in _HEAD_SIGNATURES:
        if head[offset:offset + len(magic)] == magic and what not in found:
            found.append(what)
    if head[:4] == _QCOW_MAGIC:
        version = int.from_bytes(head[4:8], "big") if len(head) >= 8 else None
        if version == 1:
            found.append("a qcow (version 1) image")
        elif version not in (2, 3):
            found.append("a qcow image of unknown version %s" % version)
    if len(tail) == TAIL_BYTES:
        if tail[:8] == b"conectix" or tail[1:9] == b"conectix":
            what = "a VHD image (footer)"
            if what not in found:
                found.append(what)
        if tail[:4] == b"koly":
            found.append("a DMG (Apple disk image) trailer")
    return found


_UNITS = (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))


def _size_text(n):
    for unit, shift in _UNITS:
        if n >= 1 << shift:
            return "%.4g %s" % (n / float(1 << shift), unit)
    return "%d bytes" % n


def _incompatible_bits(head):
    """The incompatible feature bits of a version 3 qcow2 header in `head` (0 otherwise)."""
    if head[:4] != _QCOW_MAGIC or len(head) < 80 or int.from_bytes(head[4:8], "big") < 3:
        return 0
    return int.from_bytes(head[72:80], "big")


def unsafe_reasons(observed, probe=None, max_size=DEFAULT_MAX_SIZE):
    """Why the file `observed` describes (api.observe's dict, None when nothing is there) is
    not safe as an untrusted template: a list of sentences, empty when none was found.

    `probe` is read_probe's dict (None: the signatures are not looked at); `max_size` the
    largest virtual size accepted (0 or None: no limit)."""
    if observed is None:
        return []
    reasons = []
    head = probe["head"] if probe else b""
    tail = probe["tail"] if probe else b""
    if not observed.get("qcow2"):
        if len(head) >= 8 and head[:4] == _QCOW_MAGIC and \
                int.from_bytes(head[4:8], "big") in (2, 3):
            reasons.append("its qcow2 header is refused (QEMU would not open it either): %s"
                           % (observed.get("reason") or "unknown reason"))
        for what in signatures(head, tail):
            reasons.append("it is not a qcow2 image but carries the signature of %s; used as "
                           "a raw template, its content could be read as that format" % what)
        size = probe["size"] if probe else None
        if max_size and size is not None and size > max_size:
            reasons.append("its size %d (%s) is beyond the %d (%s) accepted"
                           % (size, _size_text(size), max_size, _size_text(max_size)))
        return reasons
    if observed.get("backing_file"):
        where = observed.get("backing_file_realpath")
        reasons.append("it has a backing file %r%s (a backing chain can name any host file, "
                       "which a copy would read)"
                       % (observed["backing_file"], " (it resolves to %s)" % where
                          if where and where != observed["backing_file"] else ""))
    bits = _incompatible_bits(head)
    if observed.get("data_file") or bits & C.INCOMPAT_DATA_FILE:
        reasons.append("it keeps its data in an external data file %r (it can name any host "
                       "file)" % (observed.get("data_file") or "(name not recorded)",))
    if observed.get("encrypted"):
        reasons.append("it is encrypted")
    unknown = bits & ~C.INCOMPAT_MASK
    if unknown:
        reasons.append("it sets unknown incompatible feature bits %#x" % unknown)
    if observed.get("corrupt"):
        reasons.append("it is marked corrupt (QEMU found an inconsistency in its metadata)")
    if observed.get("dirty"):
        reasons.append("it is marked dirty (not closed cleanly; its refcounts need repair)")
    size = observed.get("virtual_size")
    if max_size and size is not None and size > max_size:
        reasons.append("its virtual size %d (%s) is beyond the %d (%s) accepted"
                       % (size, _size_text(size), max_size, _size_text(max_size)))
    check = observed.get("check")
    if check and (check.get("corruptions") or check.get("check_errors")):
        first = (check.get("messages") or ["no detail"])[0]
        reasons.append("its consistency check fails (%d corruptions, %d errors; first: %s)"
                       % (check.get("corruptions", 0), check.get("check_errors", 0), first))
    return reasons
