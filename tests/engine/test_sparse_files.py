# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The test helper that reads files without their holes agrees with plain reads."""

import os
import random

import sparse_files


def _write(path, size, pieces, sparse):
    with open(path, "wb") as handle:
        if sparse:
            handle.truncate(size)
        else:
            handle.write(bytes(size))
        for offset, data in pieces:
            handle.seek(offset)
            handle.write(data)


def test_sparse_reads_equal_plain_reads(tmp_path):
    rng = random.Random(7)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for _trial in range(50):
        size = rng.randrange(0, 3 * sparse_files.CHUNK)
        pieces = []
        for _k in range(rng.randrange(4) if size else 0):
            offset = rng.randrange(size)
            length = rng.randrange(1, min(300000, size - offset) + 1)
            pieces.append((offset, bytes([rng.randrange(1, 256)]) * length))
        _write(a, size, pieces, sparse=True)
        _write(b, size, pieces, sparse=False)
        with open(a, "rb") as handle:
            plain = handle.read()
        assert sparse_files.read_file(a) == plain == sparse_files.read_file(b)
        assert sparse_files.content_digest(a) == sparse_files.content_digest(b)
        assert sparse_files.first_difference(a, b) is None
        if size:
            at = rng.randrange(size)
            with open(b, "r+b") as handle:
                handle.seek(at)
                handle.write(bytes([plain[at] ^ 0x5A]))
            assert sparse_files.first_difference(a, b) == at
            assert sparse_files.content_digest(a) != sparse_files.content_digest(b)
        with open(a, "ab") as handle:               # one more zero byte: another length
            handle.write(b"\0")
        assert sparse_files.content_digest(a) != sparse_files.content_digest(b)
        # Zeros past the end: the digest of a file read to a larger size.
        assert sparse_files.content_digest(b, size + 4096) != sparse_files.content_digest(b)
        os.unlink(a)
        os.unlink(b)
