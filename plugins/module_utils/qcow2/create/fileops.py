# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Thin wrappers over the Linux calls the writer needs: fallocate, file flags, fsync.

Only the standard library: `fallocate(2)` through ctypes (os.posix_fallocate would fall back
to glibc's one-byte-per-block emulation on filesystems that refuse, which we never want).
"""

import errno
import os
import stat
import struct

try:
    import fcntl
except ImportError:  # pragma: no cover - non-Unix
    fcntl = None

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_EXTSIZE = 0x00000800
_FSXATTR = struct.Struct("=IIIII8x")

_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL,
                  getattr(errno, "ENOTSUP", errno.EOPNOTSUPP))

_libc = None


def _get_libc():
    global _libc
    if _libc is None:
        import ctypes  # late: only needed when allocating, and it is slow to import
        # The running interpreter already links the C library: no library search (which
        # would spawn ldconfig) is needed.
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.fallocate  # noqa: B018 - probe the symbol
        except (OSError, AttributeError):
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        func = getattr(_libc, "fallocate64", None) or _libc.fallocate
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        _libc.vdisk_fallocate = func
    return _libc


def fallocate(fd, offset, length, mode=0):
    """One fallocate(2) call. Raises OSError (EOPNOTSUPP when the filesystem refuses)."""
    if length <= 0:
        return
    try:
        libc = _get_libc()
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "fallocate is not available on this system")
    if libc.vdisk_fallocate(fd, mode, offset, length) != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def is_not_supported(exc):
    return isinstance(exc, OSError) and exc.errno in _NOT_SUPPORTED


def set_nocow(fd):
    """Set FS_NOCOW_FL (btrfs). Returns True when set, False where the filesystem has none."""
    if fcntl is None:
        return False
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("=l", 0))
        flags = struct.unpack("=l", buf)[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("=l", flags | FS_NOCOW_FL))
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("=l", 0))
        return bool(struct.unpack("=l", buf)[0] & FS_NOCOW_FL)
    except OSError:
        return False


def set_extent_size_hint(fd, hint):
    """Set the XFS extent size hint like qemu-img does; False where unsupported."""
    if fcntl is None or not hint:
        return False
    try:
        buf = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
        xflags, _extsize, nextents, projid, cowext = _FSXATTR.unpack(buf)
        new = _FSXATTR.pack(xflags | FS_XFLAG_EXTSIZE, hint, nextents, projid, cowext)
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, new)
        return True
    except OSError:
        return False


def fsync_dir(path):
    """fsync the directory holding `path` so a rename survives a crash."""
    dirname = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(dirname, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_block_device(fd):
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def device_size(fd):
    return os.lseek(fd, 0, os.SEEK_END)


def free_bytes(path):
    """Bytes available to this user in the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")
if _FIEMAP_HEAD.size != 32 or _FIEMAP_EXTENT.size != 56:  # pragma: no cover
    raise ImportError("unexpected struct fiemap layout")


def fiemap(fd, start, length, batch=512):
    """Yield (logical, length, flags) extents of the file overlapping [start, start+length).

    Raises OSError (ENOTTY/EOPNOTSUPP) where the filesystem has no FIEMAP.
    """
    if fcntl is None:
        raise OSError(errno.ENOTTY, "no ioctl support")
    end = start + length
    pos = start
    while pos < end:
        buf = bytearray(_FIEMAP_HEAD.size + batch * _FIEMAP_EXTENT.size)
        _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, FIEMAP_FLAG_SYNC, 0, batch, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return
        last_end = pos
        for i in range(mapped):
            logical, _physical, ext_len, flags = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
            yield logical, ext_len, flags
            last_end = logical + ext_len
            if flags & FIEMAP_EXTENT_LAST:
                return
        if last_end <= pos:
            return
        pos = last_end


def data_segments(fd, start, length):
    """Yield (offset, length) ranges inside [start, start+length) that hold data (not holes)."""
    end = start + length
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def unbacked_segments(fd, start, length):
    """Ranges in [start, start+length) that are holes or unwritten extents.

    These are the only places where writing zeros can never overwrite data. Uses FIEMAP;
    falls back to SEEK_HOLE (holes only) where FIEMAP is unavailable, and then reports
    fiemap=False so callers can say how they judged.
    """
    end = start + length
    out = []
    try:
        pos = start
        for logical, ext_len, flags in fiemap(fd, start, length):
            lo = max(logical, start)
            hi = min(logical + ext_len, end)
            if lo > pos:
                out.append((pos, lo - pos))
            if flags & FIEMAP_EXTENT_UNWRITTEN and hi > lo:
                out.append((lo, hi - lo))
            pos = max(pos, hi)
        if pos < end:
            out.append((pos, end - pos))
        return _merge(out), True
    except OSError as exc:
        if not is_not_supported(exc):
            raise
    pos = start
    for off, seg_len in data_segments(fd, start, length):
        if off > pos:
            out.append((pos, off - pos))
        pos = off + seg_len
    if pos < end:
        out.append((pos, end - pos))
    return _merge(out), False


def _merge(ranges):
    merged = []
    for off, length in sorted(ranges):
        if merged and merged[-1][0] + merged[-1][1] >= off:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            merged.append((off, length))
    return merged
