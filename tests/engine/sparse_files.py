# Copyright: contributors to the vdisk.qcow2 collection
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading test files without reading their holes. Tests only.

A hole costs nothing to store but a lot to read: the kernel builds a zeroed page-cache page for
every 4 KiB of it (here about 13 s for a 1 GiB sparse file read once). These helpers ask the
file system where the data is (SEEK_DATA/SEEK_HOLE) and read only that; a hole reads as zeros,
as it does through read(2), so the results equal those of reading the whole file."""

import errno
import hashlib
import os

CHUNK = 1 << 20
_ZERO = bytes(CHUNK)


def data_ranges(fd, size):
    """[(start, end)] of the file's data; the whole file where the file system cannot say."""
    ranges = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:        # no data past pos
                break
            return [(0, size)]
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= size:
            break
        ranges.append((start, end))
        pos = end
    return ranges


def _offsets(fd, size):
    """The offset of every CHUNK-aligned chunk that holds data, in order."""
    last = -CHUNK
    for start, end in data_ranges(fd, size):
        for offset in range(max(start - start % CHUNK, last + CHUNK), end, CHUNK):
            last = offset
            yield offset


def _chunks(fd, size):
    """(offset, bytes) of every CHUNK-aligned chunk that holds data; chunks are the same for
    the same content whatever the layout of holes, so digests compare across files."""
    for offset in _offsets(fd, size):
        yield offset, os.pread(fd, min(CHUNK, size - offset), offset)


def read_file(path):
    """The file's bytes (a bytearray), holes not read."""
    size = os.path.getsize(path)
    buf = bytearray(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, data in _chunks(fd, size):
            buf[offset:offset + len(data)] = data
    finally:
        os.close(fd)
    return buf


def content_digest(path, size=None):
    """A digest of the file's length and bytes that skips all-zero chunks (read or hole): equal
    digests mean equal content. With `size`, of the file's first `size` bytes, zeros past its
    end (the guest view of a raw file of that length)."""
    length = os.path.getsize(path)
    size = length if size is None else size
    digest = chunk_digest(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, data in _chunks(fd, min(size, length)):
            digest.add(offset, data.ljust(min(CHUNK, size - offset), b"\0"))
    finally:
        os.close(fd)
    return digest.hexdigest()


class chunk_digest(object):
    """The digest content_digest computes, fed chunk by chunk: `add(offset, data)` for each
    CHUNK-aligned chunk that may hold data (the others read zeros), in order."""

    def __init__(self, size):
        self._hash = hashlib.sha256(b"%d:" % size)

    def add(self, offset, data):
        if data != _ZERO[:len(data)]:
            self._hash.update(b"%d:" % offset)
            self._hash.update(data)

    def hexdigest(self):
        return self._hash.hexdigest()


def first_difference(path_a, path_b):
    """None when both files hold the same bytes and length, else the first differing offset
    (the shorter file's length when one is a prefix of the other)."""
    size_a, size_b = os.path.getsize(path_a), os.path.getsize(path_b)
    fd_a, fd_b = os.open(path_a, os.O_RDONLY), os.open(path_b, os.O_RDONLY)
    try:
        size = min(size_a, size_b)
        offsets = sorted(set(_offsets(fd_a, size)) | set(_offsets(fd_b, size)))
        for offset in offsets:
            n = min(CHUNK, size - offset)
            a, b = os.pread(fd_a, n, offset), os.pread(fd_b, n, offset)
            if a != b:
                return offset + next(k for k in range(n) if a[k] != b[k])
    finally:
        os.close(fd_a)
        os.close(fd_b)
    return None if size_a == size_b else min(size_a, size_b)
