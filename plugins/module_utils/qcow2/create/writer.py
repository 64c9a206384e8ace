# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Apply a Plan to a file or a block device.

Regular files are created atomically: a temporary file with O_EXCL in the target directory,
made complete and durable (fsync), then renamed into place and the directory fsynced. A
failure at any point removes the temporary file and leaves `path` as it was.

Allocation strategies for the data region:
  metadata: left as holes (qemu-img map then reports the clusters as zero);
  falloc:   one fallocate(2) call over the region; zero writes only where the filesystem
            refuses (EOPNOTSUPP), and the result says which method ran;
  full:     zeros really written in large buffers, then fdatasync.
Block devices are never truncated and, having no zero-initialisation, get every metadata byte
written explicitly.
"""

import errno
import os
import stat
import time

from . import fileops
from ..read import leftovers
from ..read import nodes
from . import zeroscan
from ..format.errors import Qcow2Error
from .planner import metadata_chunks

WRITE_BUFFER = 8 * 1024 * 1024
ZERO_BUFFER = 16 * 1024 * 1024


# The words a result's `method` takes (what a playbook may branch on; prose goes in `detail`):
#   sparse            nothing allocated for the data clusters (holes or no host clusters)
#   fallocate         the data clusters reserved with fallocate(2)
#   zero-writes       zeros written over the data clusters (full, or fallocate refused)
#   copy              a source's data copied, its zero ranges left unallocated or as holes
#   copy-fallocate    the data clusters reserved with fallocate(2), then the data copied
#   copy-zero-writes  the data copied and zeros written elsewhere (full, or fallocate refused)
METHODS = ("sparse", "fallocate", "zero-writes", "copy", "copy-fallocate", "copy-zero-writes")


class WriteResult(object):
    def __init__(self):
        self.method = "sparse"
        self.detail = "no data cluster allocated"
        self.fallocate_refused = False
        self.nocow = False
        self.extent_size_hint = False
        self.bytes_written = 0
        self.seconds = 0.0

    def as_dict(self):
        return {"method": self.method, "method_detail": self.detail,
                "fallocate_refused": self.fallocate_refused, "nocow": self.nocow,
                "extent_size_hint": self.extent_size_hint,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 6)}


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


IOV_MAX = 1024


def _pwritev_all(fd, pieces, offset):
    """Write consecutive `pieces` at `offset` in one system call where possible (no join copy)."""
    if not hasattr(os, "pwritev"):
        _pwrite_all(fd, b"".join(pieces), offset)
        return
    for first in range(0, len(pieces), IOV_MAX):
        group = pieces[first:first + IOV_MAX]
        want = sum(len(p) for p in group)
        done = os.pwritev(fd, group, offset)
        if done < want:
            # A short vectored write: finish the rest piece by piece.
            pos = 0
            for piece in group:
                if pos + len(piece) > done:
                    skip = max(0, done - pos)
                    _pwrite_all(fd, memoryview(piece)[skip:], offset + pos + skip)
                pos += len(piece)
        offset += want


def start_writeback(fd, offset, length):
    """Ask the kernel to start writing [offset, offset+length) to disk now, without waiting.

    Dirty pages would otherwise sit in the page cache until the final fsync (or the dirty
    threshold) and the disk would idle while we generate; starting writeback as we go overlaps
    the two. POSIX_FADV_DONTNEED starts writeback of dirty pages and drops only clean ones, so
    nothing written is lost; it is advice, and any failure is ignored.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or length <= 0:
        return
    try:
        advise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def write_metadata(fd, plan, result, sparse=True, fine=False):
    """Write every metadata region, coalescing chunks into large sequential writes.

    With `sparse` (a new regular file, which reads as zeros) all-zero chunks are skipped, so
    padding stays a hole: fewer bytes written, and qemu-img's detection of metadata
    preallocation (refcounted clusters against allocated blocks) sees what it expects.
    Each batch goes out as one vectored write and its writeback is started at once.
    With `fine` (copies, as qemu-img convert leaves them) the all-zero 4 KiB blocks inside
    chunks are skipped too, e.g. the rest of a 2 MiB header cluster.
    """
    pending = []
    pending_off = None
    pending_len = 0
    zero = bytes(WRITE_BUFFER)

    def flush():
        _pwritev_all(fd, pending, pending_off)
        result.bytes_written += pending_len
        start_writeback(fd, pending_off, pending_len)

    for offset, piece in _fine_chunks(metadata_chunks(plan)) if sparse and fine \
            else metadata_chunks(plan):
        if sparse and len(piece) <= len(zero) and piece == zero[:len(piece)]:
            continue
        if pending and offset != pending_off + pending_len:
            flush()
            pending, pending_len = [], 0
        if not pending:
            pending_off = offset
        pending.append(piece)
        pending_len += len(piece)
        if pending_len >= WRITE_BUFFER:
            flush()
            pending_off += pending_len
            pending, pending_len = [], 0
    if pending:
        flush()


def _fine_chunks(chunks):
    """The non-zero 4 KiB-aligned runs of (offset, bytes) chunks at 4 KiB-aligned offsets."""
    for offset, piece in chunks:
        if offset % zeroscan.BLOCK or len(piece) <= zeroscan.BLOCK:
            yield offset, piece
            continue
        view = memoryview(piece)
        for s, e in zeroscan.nonzero_runs(piece, zeroscan.BLOCK):
            yield offset + s, view[s:e]


def write_zeros(fd, offset, length, result=None):
    """Write `length` zero bytes at `offset` with large buffers.

    Writeback of each buffer is started as soon as it is written, and the pages of the buffer
    before the previous one (written back by then) are dropped from the page cache, so a large
    full preallocation keeps the disk busy from the start and does not flood the cache.
    """
    buf = bytes(min(ZERO_BUFFER, max(length, 0)))
    end = offset + length
    behind = []
    while offset < end:
        n = min(len(buf), end - offset)
        _pwrite_all(fd, buf if n == len(buf) else memoryview(buf)[:n], offset)
        start_writeback(fd, offset, n)
        behind.append((offset, n))
        if len(behind) > 2:
            start_writeback(fd, *behind.pop(0))
        offset += n
        if result is not None:
            result.bytes_written += n


def allocate(fd, offset, length, mode, result, device=False):
    """Allocate [offset, offset+length) in `mode` (metadata leaves it alone)."""
    if length <= 0 or mode in ("off", "metadata"):
        return
    if mode == "falloc" and not device:
        try:
            fileops.fallocate(fd, offset, length)
            result.method = "fallocate"
            result.detail = "data clusters reserved with one fallocate call"
            return
        except OSError as exc:
            if not fileops.is_not_supported(exc):
                raise
        result.method = "zero-writes"
        result.detail = "zeros written (fallocate not supported by the filesystem)"
        result.fallocate_refused = True
        write_zeros(fd, offset, length, result)
        return
    result.method = "zero-writes"
    result.detail = "zeros written over the data clusters"
    write_zeros(fd, offset, length, result)


def apply_to_fd(fd, plan, device=False, nocow=False, extent_size_hint=0, content=None):
    """Write a planned image into an open, empty file (or a block device). `content(fd, plan,
    result)`, when given, writes the data clusters (including the zeros of `full`)."""
    result = WriteResult()
    start = time.monotonic()
    if not device:
        if nocow:
            result.nocow = fileops.set_nocow(fd)
        if extent_size_hint:
            result.extent_size_hint = fileops.set_extent_size_hint(fd, extent_size_hint)
    else:
        size = fileops.device_size(fd)
        if size < plan.file_size:
            raise Qcow2Error("the block device holds %d bytes, the image needs %d"
                             % (size, plan.file_size), option="size")
    if not device:
        # Set the final length first: on ext4, overwriting within the file is markedly faster
        # than extending it write by write (measured: 2 GiB of zeros 3.4 s against 5.4 s).
        os.ftruncate(fd, plan.file_size)
    if plan.mode == "falloc":
        allocate(fd, plan.data_offset, plan.data_length, "falloc", result, device)
    # A copy (content) leaves the metadata's all-zero padding as holes in every mode, as
    # qemu-img convert does (its falloc/full copies leave e.g. the L1 table's tail a hole).
    write_metadata(fd, plan, result, sparse=not device and (
        plan.mode in ("off", "metadata") or content is not None), fine=content is not None)
    if device:
        _zero_gaps(fd, plan, result)
    if content is not None:
        content(fd, plan, result)
    elif plan.mode == "full" or (device and plan.mode == "falloc"):
        allocate(fd, plan.data_offset, plan.data_length, "full", result, device)
    if not device:
        os.ftruncate(fd, plan.file_size)
    if plan.mode in ("off", "metadata") and content is None:
        result.method = "sparse"
        result.detail = "data clusters left as holes" if plan.mode == "metadata" \
            else "no data cluster allocated"
    if plan.mode == "full":
        os.fdatasync(fd)
    os.fsync(fd)
    result.seconds = time.monotonic() - start
    return result


def _zero_gaps(fd, plan, result):
    """On a device, zero every byte of the image that no region writes (except data)."""
    covered = sorted((r.offset, r.offset + r.length) for r in plan.regions)
    if plan.data_length:
        covered.append((plan.data_offset, plan.data_offset + plan.data_length))
        covered.sort()
    pos = 0
    for start, end in covered:
        if start > pos:
            write_zeros(fd, pos, start - pos, result)
        pos = max(pos, end)
    if pos < plan.file_size:
        write_zeros(fd, pos, plan.file_size - pos, result)


def check_space(directory, plan):
    """Refuse up front when the filesystem cannot hold a falloc/full image."""
    if plan.mode not in ("falloc", "full"):
        return
    need = plan.allocated_bytes
    have = fileops.free_bytes(directory)
    if need > have:
        raise Qcow2Error(
            "not enough free space for preallocation=%s: the image needs %d bytes, the "
            "filesystem holding %s has %d available" % (plan.mode, need, directory, have),
            option="preallocation")


def remove_stale_temp_files(path):
    """Remove temporary files that killed runs left for `path` (same name, no lock held);
    returns the names removed. A live writer holds its file's lock, so it is never touched."""
    now = time.time()
    found = leftovers.find(path, same_name_only=True, started=now)
    return leftovers.remove(path, [entry for entry, _size in found], started=now)


def write_all(fd, data, offset):
    """pwrite all of `data` at `offset` (short writes continued)."""
    _pwrite_all(fd, data, offset)


def is_block_device_path(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def create_file(path, plan, replace=False, mode=0o644, data_file_path=None, apply=None,
                content=None):
    """Create the image at `path` atomically. Returns a WriteResult.

    replace=False refuses when `path` exists (checked again at the final link, so a file that
    appears meanwhile is never overwritten). `data_file_path` is where the external data file
    goes, for plans that have one. `apply(fd)` replaces writing the plan (plan may then be
    None); `content(fd, plan, result)` writes guest data into the planned layout.
    """
    opts = plan.options if plan is not None else None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise Qcow2Error("%s: the directory %s does not exist" % (path, directory), path=path)
    if not replace and os.path.lexists(path):
        raise Qcow2Error("%s: a file already exists at this path" % path, path=path)
    if replace:
        _check_replaceable(path)
    remove_stale_temp_files(path)
    if opts is not None and opts.data_file and data_file_path:
        remove_stale_temp_files(data_file_path)
    if plan is not None and content is None:
        check_space(directory, plan)
    data_tmp = data_fd = None
    tmp = None
    fd = None
    # The temporary files stay open (and so locked) until they are renamed into place: a
    # cleaner of another run never takes a live writer's file for a leftover.
    try:
        if opts is not None and opts.data_file:
            data_tmp, data_fd = _create_data_file(data_file_path, plan, replace, mode)
        tmp, fd = leftovers.open_temp(path, mode)
        os.fchmod(fd, mode & ~_umask())
        if apply is not None:
            result = apply(fd)
        else:
            result = apply_to_fd(fd, plan, nocow=opts.nocow,
                                 extent_size_hint=opts.extent_size_hint, content=content)
        if data_tmp:
            if replace:
                _check_replaceable(data_file_path, expect=False)
            _install(data_tmp, data_file_path, replace)
            data_tmp = None
        if replace:
            _check_replaceable(path)   # once more, as close to the rename as it gets
        _install(tmp, path, replace)
        tmp = None
        fileops.fsync_dir(path)
        return result
    except OSError as exc:
        raise Qcow2Error("%s: cannot create the image: %s" % (path, exc.strerror or exc),
                         path=path)
    finally:
        for handle in (fd, data_fd):
            if handle is not None:
                os.close(handle)
        for leftover in (tmp, data_tmp):
            if leftover and os.path.lexists(leftover):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass


def _check_replaceable(path, expect=True):
    """Before a file replaces `path`: only a regular file (or nothing) is ever replaced, and
    only the file that was inspected (the identity registered with nodes.expect)."""
    st = nodes.check_node(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise nodes.refuse_kind(path, st.st_mode)
    if expect:
        nodes.check_identity(path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _install(tmp, path, replace):
    """Move a finished temporary file to `path`; without replace never clobber."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise Qcow2Error("%s: a file appeared at this path while the image was being "
                             "created; it was left untouched" % path, path=path)
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(path):
            raise Qcow2Error("%s: a file already exists at this path" % path, path=path)
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _create_data_file(data_path, plan, replace, mode):
    """Write the external data file to a temporary name; returns that name and its open
    (locked) descriptor, which the caller closes after the rename."""
    if not replace and os.path.lexists(data_path):
        raise Qcow2Error("%s: the data file already exists" % data_path, option="data_file",
                         path=data_path)
    tmp, fd = leftovers.open_temp(data_path, mode)
    try:
        os.fchmod(fd, mode & ~_umask())
        result = WriteResult()
        if plan.mode in ("falloc", "full"):
            allocate(fd, 0, plan.data_file_size, plan.mode, result)
        os.ftruncate(fd, plan.data_file_size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return tmp, fd


def write_device(device_path, plan):
    """Write a planned image onto a block device (no truncate, every byte explicit)."""
    fd, st = nodes.open_checked(device_path, os.O_RDWR,
                                doing="cannot open the device for writing")
    try:
        nodes.check_fd_identity(device_path, st)
        if not fileops.is_block_device(fd):
            raise Qcow2Error("%s: not a block device" % device_path, path=device_path)
        return apply_to_fd(fd, plan, device=True)
    finally:
        os.close(fd)
