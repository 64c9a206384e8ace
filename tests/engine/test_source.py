# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Sources of an image made from a template (issue 13): raw files, block devices and qcow2
images with their backing chains, judged by `qemu-img convert -O raw` of the same source.

The guest view of a Source is read as a copy would read it: over its extents, in chunks, with
zeros where an extent says the range surely reads zeros. It must be byte-identical to what
qemu-img convert makes of the source. Each refusal (encrypted, dirty, corrupt, damaged, no
recorded backing format, a loop, a running writer) is a Qcow2Error naming `source`, raised by
open_source before any guest byte is read.
"""

import os
import random
import shutil
import signal
import struct
import subprocess
import time

import pytest

import oracle
import sparse_files
from oracle import run

from qcow2.format import constants as C
from qcow2.read import lock
from qcow2.copy import source
from qcow2.format.errors import Qcow2Error
from qcow2.read.image import Image
from qcow2.copy.source import open_source

pytestmark = pytest.mark.skipif((oracle.QEMU_IMG is None or oracle.QEMU_IO is None)
                                and not os.environ.get("CI"),
                                reason="qemu-img/qemu-io not installed (CI installs them)")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB
TEMPLATE_SIZE = 48 * MiB


# ---------------------------------------------------------------------------------------------
# Helpers

def qimg(*args, **kwargs):
    proc = run(oracle.QEMU_IMG, *args, **kwargs)
    assert proc.returncode == 0, "qemu-img %s: %s" % (" ".join(map(str, args)), proc.stderr)
    return proc


def qemu_io(path, *commands, fmt="qcow2"):
    args = [oracle.QEMU_IO, "-f", fmt]
    for command in commands:
        args += ["-c", command]
    proc = run(*(args + [path]))
    assert proc.returncode == 0 and "failed" not in proc.stdout and not proc.stderr, \
        (commands, proc.stdout, proc.stderr)


def oracle_raw(path, fmt, tmp):
    """`qemu-img convert -O raw` of the source: the guest view qemu-img reads."""
    out = os.path.join(str(tmp), "oracle-%s.raw" % os.path.basename(str(path)))
    qimg("convert", "-f", fmt, "-O", "raw", path, out)
    return out


def file_digest(path, size):
    """Digest of the file's first `size` bytes, zeros past its end (holes not read)."""
    return sparse_files.content_digest(str(path), size)


def guest_digest(src):
    """(digest of the guest view as a copy reads it, bytes read, extents): the digest
    file_digest gives a file of the same bytes; only the data extents are read."""
    extents = list(src.extents())
    pos = 0
    for k, (offset, length, is_data) in enumerate(extents):
        assert offset == pos and length > 0, extents[max(0, k - 2):k + 2]
        if k:
            assert extents[k - 1][2] != is_data, "extents not merged: %s" % extents[k - 1:k + 1]
        pos = offset + length
    assert pos == src.size
    step = sparse_files.CHUNK
    digest = sparse_files.chunk_digest(src.size)
    data = [(o, o + n) for o, n, d in extents if d]
    read = 0
    chunk_at = -step
    first = 0                               # the first data extent that ends past chunk_at
    for start, end in data:
        for chunk_at in range(max(start - start % step, chunk_at + step), end, step):
            chunk = bytearray(min(step, src.size - chunk_at))
            while data[first][1] <= chunk_at:
                first += 1
            for d_start, d_end in data[first:]:     # the data extents within this chunk
                if d_start >= chunk_at + len(chunk):
                    break
                lo, hi = max(d_start, chunk_at), min(d_end, chunk_at + len(chunk))
                piece = src.read(lo, hi - lo)
                assert len(piece) == hi - lo
                chunk[lo - chunk_at:hi - chunk_at] = piece
                read += hi - lo
            digest.add(chunk_at, bytes(chunk))
    return digest.hexdigest(), read, extents


def assert_same_view(path, fmt, tmp, ranges=8, allow_backing=False):
    """The Source's guest view equals qemu-img convert's; random reads agree too (a backing
    chain is flattened only with `allow_backing`, as the caller trusts it)."""
    expected = oracle_raw(path, fmt, tmp)
    with open_source(str(path), fmt, allow_backing=allow_backing) as src:
        assert src.size == os.path.getsize(expected)
        got, read, extents = guest_digest(src)
        assert got == file_digest(expected, src.size), "guest view differs from qemu-img's"
        rng = random.Random(src.size)
        with open(expected, "rb") as handle:
            for _trial in range(ranges):
                offset = rng.randrange(src.size)
                length = rng.randrange(1, min(3 * MiB, src.size - offset) + 1)
                handle.seek(offset)
                assert src.read(offset, length) == handle.read(length), (offset, length)
    os.unlink(expected)
    return read, extents


def data_bytes(extents):
    return sum(n for _o, n, d in extents if d)


def expect_refusal(path, fmt, *words, allow_backing=False):
    with pytest.raises(Qcow2Error) as info:
        open_source(str(path), fmt, allow_backing=allow_backing)
    err = info.value
    assert err.option == "source", (err.option, str(err))
    text = str(err)
    assert text.startswith("source: "), text
    for word in words:
        assert word in text, (word, text)
    return text


# ---------------------------------------------------------------------------------------------
# A template disk: a partition table and an ext4 file system holding files

def _mbr(size):
    """A DOS partition table with one Linux partition from 1 MiB to the end."""
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x63\x90"
    start = 2048
    count = size // 512 - start
    entry = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0x83, b"\xfe\xff\xff", start, count)
    sector[446:446 + 16] = entry
    sector[440:444] = b"\x13\x57\x9b\xdf"
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _files(tree):
    rng = random.Random(13)
    os.makedirs(os.path.join(tree, "etc", "conf.d"))
    os.makedirs(os.path.join(tree, "usr", "lib"))
    with open(os.path.join(tree, "etc", "hostname"), "w") as handle:
        handle.write("template\n")
    for k in range(40):
        with open(os.path.join(tree, "etc", "conf.d", "f%02d.conf" % k), "w") as handle:
            handle.write(("option%d = %d\n" % (k, rng.randrange(1 << 30))) * (k * 7 + 1))
    for k, size in enumerate((300 * KiB, 1 * MiB + 7, 4 * MiB, 9 * MiB + 4096)):
        with open(os.path.join(tree, "usr", "lib", "lib%d.so" % k), "wb") as handle:
            # Half random (incompressible), half text-like, a zero block inside.
            handle.write(rng.randbytes(size // 2) if hasattr(rng, "randbytes")
                         else os.urandom(size // 2))
            handle.write(bytes(64 * KiB))
            handle.write((b"compressible text %d " % k) * ((size - size // 2) // 20))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A raw disk (TEMPLATE_SIZE) with holes: MBR, ext4 with files at 1 MiB (if mkfs.ext4 is
    there; else written patterns)."""
    tmp = tmp_path_factory.mktemp("template")
    disk = str(tmp / "disk.raw")
    with open(disk, "wb") as handle:
        handle.truncate(TEMPLATE_SIZE)
        handle.write(_mbr(TEMPLATE_SIZE))
    mkfs = shutil.which("mkfs.ext4") or (os.path.exists("/sbin/mkfs.ext4") and "/sbin/mkfs.ext4")
    if mkfs:
        tree = str(tmp / "tree")
        _files(tree)
        fs = str(tmp / "fs.img")
        proc = run(mkfs, "-q", "-F", "-E", "lazy_itable_init=1", "-d", tree, fs,
                   "%dK" % ((TEMPLATE_SIZE - MiB) // KiB))
        assert proc.returncode == 0, proc.stderr
        # Copy the file system in at 1 MiB, leaving its zero blocks as holes.
        with open(fs, "rb") as src, open(disk, "r+b") as dst:
            pos = 0
            while True:
                block = src.read(64 * KiB)
                if not block:
                    break
                if block.count(0) != len(block):
                    dst.seek(MiB + pos)
                    dst.write(block)
                pos += len(block)
        os.unlink(fs)
    else:
        with open(disk, "r+b") as dst:
            for k, offset in enumerate((MiB, 5 * MiB + 4096, 20 * MiB, 40 * MiB - 512)):
                dst.seek(offset)
                dst.write(bytes([k + 1]) * (700 * KiB) + os.urandom(300 * KiB))
    return disk


# ---------------------------------------------------------------------------------------------
# Raw sources

def test_raw_template(template, tmp_path, qemu_img):
    read, extents = assert_same_view(template, "raw", tmp_path)
    # The holes are reported: a copy reads the MBR and the file system's blocks, not 48 MiB.
    assert any(not d for _o, _n, d in extents)
    assert read == data_bytes(extents) < TEMPLATE_SIZE
    with open_source(template, "raw") as src:
        assert src.read(510, 2) == b"\x55\xaa"
        assert src.describe() == {"path": template, "format": "raw", "size": TEMPLATE_SIZE}


def test_sparse_raw_reads_about_its_data(tmp_path, qemu_img):
    path = str(tmp_path / "sparse.raw")
    size = 256 * MiB + 1536
    written = 0
    with open(path, "wb") as handle:
        handle.truncate(size)
        for k, (offset, length) in enumerate(((0, 4096), (3 * MiB + 512, MiB),
                                              (100 * MiB, 2 * MiB), (size - 1000, 1000))):
            handle.seek(offset)
            handle.write(bytes([0x41 + k]) * length)
            written += length
    with open_source(path, "raw") as src:
        assert src.size == size                 # the file's length, unaligned
        got, read, extents = guest_digest(src)
        assert got == file_digest(path, size)
        assert written <= read <= written + 4 * 256 * KiB, (read, extents)
        assert src.read(size - 2, 2) == b"DD"
        # A range within a hole reads zeros; extents of a sub-range are clipped to it.
        assert src.read(50 * MiB, 4096) == bytes(4096)
        sub = list(src.extents(2 * MiB, 5 * MiB))
        assert sub[0][0] == 2 * MiB and sum(n for _o, n, _d in sub) == 3 * MiB
    # qemu-img sees the size rounded up to 512 bytes, with zeros past the end of the file.
    expected = oracle_raw(path, "raw", tmp_path)
    assert file_digest(expected, os.path.getsize(expected)) == \
        file_digest(path, os.path.getsize(expected))


def test_raw_empty_and_dense(tmp_path):
    empty = str(tmp_path / "empty.raw")
    open(empty, "wb").close()
    with open_source(empty, "raw") as src:
        assert src.size == 0 and list(src.extents()) == [] and src.read(0, 0) == b""
    dense = str(tmp_path / "dense.raw")
    with open(dense, "wb") as handle:
        handle.write(os.urandom(3 * MiB))
    with open_source(dense, "raw") as src:
        assert list(src.extents()) == [(0, 3 * MiB, True)]
        with pytest.raises(ValueError):
            src.read(3 * MiB - 1, 2)
        with pytest.raises(ValueError):
            src.extents(0, 3 * MiB + 1)
        assert os.pread(src.raw_fd, 16, MiB) == src.read(MiB, 16)
    assert src.raw_fd is None


def _unavailable(reason):
    oracle.unavailable("source", "no loop block device: %s" % reason,
                       "the block-device tests (as root, with /dev/loop-control)")


def test_loop_block_device(template, tmp_path, qemu_img):
    losetup = shutil.which("losetup") or "/sbin/losetup"
    if not os.path.exists(losetup):
        _unavailable("losetup is not installed (util-linux)")
    if os.geteuid() != 0:
        _unavailable("attaching a loop device needs root (CI runs as root)")
    # The template as a device, and a qcow2 image of it as a device (Image opens devices).
    qcow = str(tmp_path / "template.qcow2")
    qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", template, qcow)
    devices = []
    try:
        for backing in (template, qcow):
            proc = run(losetup, "--find", "--show", "--read-only", backing)
            dev = proc.stdout.strip()
            if proc.returncode != 0 or not dev:
                _unavailable("'losetup --find --show %s' failed (exit %d): %s"
                             % (backing, proc.returncode, proc.stderr.strip()))
            devices.append(dev)
        with open_source(devices[0], "raw") as src:
            assert src.size == TEMPLATE_SIZE
            assert list(src.extents()) == [(0, TEMPLATE_SIZE, True)]
            got, read, _extents = guest_digest(src)
            assert got == file_digest(template, TEMPLATE_SIZE) and read == TEMPLATE_SIZE
        with open_source(devices[1], "qcow2") as src:
            got, read, _extents = guest_digest(src)
            assert got == file_digest(template, TEMPLATE_SIZE) and read < TEMPLATE_SIZE
    finally:
        for dev in devices:
            done = run(losetup, "-d", dev)
            assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# qcow2 sources made by qemu-img convert from the template

CONVERTS = {
    "default": [],
    "compressed": ["-c"],
    "compat-0.10": ["-o", "compat=0.10"],
    "compressed-compat-0.10": ["-c", "-o", "compat=0.10"],
    "extended_l2": ["-o", "extended_l2=on"],
    "compressed-extended_l2": ["-c", "-o", "extended_l2=on"],
    "cluster-512": ["-o", "cluster_size=512"],
    "compressed-cluster-512": ["-c", "-o", "cluster_size=512"],
    "cluster-2M": ["-o", "cluster_size=2M"],
    "compressed-cluster-2M": ["-c", "-o", "cluster_size=2M"],
    "refcount-bits-1": ["-o", "refcount_bits=1"],
}


@pytest.mark.parametrize("name", sorted(CONVERTS))
def test_converted_template(name, template, tmp_path, qemu_img):
    path = str(tmp_path / ("%s.qcow2" % name))
    qimg("convert", "-f", "raw", "-O", "qcow2", *(CONVERTS[name] + [template, path]))
    read, extents = assert_same_view(path, "qcow2", tmp_path)
    # qemu-img convert skips zero ranges: they are holes in the image, not data to read.
    assert read == data_bytes(extents) < TEMPLATE_SIZE
    with open_source(path, "qcow2") as src:
        assert src.describe() == {"path": path, "format": "qcow2", "size": TEMPLATE_SIZE,
                                  "chain": [(path, "qcow2")]}


def test_zstd_compressed(template, tmp_path, qemu_img, monkeypatch):
    path = str(tmp_path / "zstd.qcow2")
    proc = run(oracle.QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
               "compression_type=zstd", template, path)
    if proc.returncode != 0:
        pytest.skip("this qemu-img cannot write zstd: %s" % proc.stderr.strip())
    monkeypatch.setattr(source, "_zstd", None)
    expect_refusal(path, "qcow2", path, "zstd-compressed clusters need Python 3.14's "
                   "compression.zstd")
    # Without compressed clusters a zstd image is no problem.
    plain = str(tmp_path / "zstd-plain.qcow2")
    qimg("convert", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", template,
         plain)
    assert_same_view(plain, "qcow2", tmp_path, ranges=1)
    try:
        from compression import zstd
    except ImportError:
        try:
            from backports import zstd
        except ImportError:
            pytest.skip("neither compression.zstd (Python 3.14) nor backports.zstd: zstd "
                        "decompression not exercised")
    monkeypatch.setattr(source, "_zstd", zstd)
    assert_same_view(path, "qcow2", tmp_path)


# ---------------------------------------------------------------------------------------------
# qcow2 images written by qemu-io

WRITES = (
    "write -P 0x01 0 512",
    "write -P 0x02 3000 5000",
    "write -P 0x03 1M 64k",
    "write -P 0x04 2099712 200k",
    "write -z 4M 128k",
    "write -P 0x05 6M 1M",
    "write -z 6400k 64k",
    "discard 6656k 64k",
    "write -c -P 0x06 8M 64k",
    "write -c -P 0x07 8256k 64k",
    "write -P 0x08 8288k 4k",
    "write -P 0x09 15M 1M",
)


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on",
                                  "cluster_size=4096", "cluster_size=2M"])
def test_qemu_io_writes(opts, tmp_path, qemu_img):
    path = str(tmp_path / "written.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", opts, path, "16M")
    writes = WRITES if "2M" not in opts else tuple(w for w in WRITES if " -c " not in w)
    qemu_io(path, *writes)
    _read, extents = assert_same_view(path, "qcow2", tmp_path, ranges=16)
    assert data_bytes(extents) < 16 * MiB


def test_extended_l2_subclusters_over_a_backing_file(tmp_path, qemu_img):
    base = str(tmp_path / "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0xaa 0 4M")
    top = str(tmp_path / "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "base.qcow2",
         "-F", "qcow2", top, "6M")
    qemu_io(top, "write -P 0x01 4k 4k", "write -z 68k 8k", "discard 132k 4k",
            "write -P 0x02 1M 64k", "write -z 2M 64k", "write -c -P 0x03 3M 64k",
            "write -P 0x04 3136k 2k", "write -P 0x05 4104k 2k", "write -z 256k 1k")
    _read, extents = assert_same_view(top, "qcow2", tmp_path, ranges=24, allow_backing=True)
    with open_source(top, "qcow2", allow_backing=True) as src:
        # Unallocated subclusters of an allocated cluster read the backing file.
        assert src.read(0, 4096) == b"\xaa" * 4096
        assert src.read(4096, 4096) == b"\x01" * 4096
        assert src.read(68 * KiB, 8 * KiB) == bytes(8 * KiB)
        assert src.read(76 * KiB, 4 * KiB) == b"\xaa" * 4096
        # Past the backing file's 4 MiB: zeros, known without reading.
        assert src.read(5 * MiB, 4096) == bytes(4096)
        assert extents[-1] == (4 * MiB + 10 * KiB, 2 * MiB - 10 * KiB, False), extents


# ---------------------------------------------------------------------------------------------
# Backing chains

def _chain(tmp_path):
    """top.qcow2 -> mid/mid.qcow2 -> base/base.raw, relative names, shrinking sizes."""
    (tmp_path / "mid").mkdir()
    (tmp_path / "base").mkdir()
    base = str(tmp_path / "base" / "base.raw")
    with open(base, "wb") as handle:
        handle.truncate(8 * MiB)
        handle.seek(0)
        handle.write(b"\x11" * (3 * MiB))
        handle.seek(6 * MiB)
        handle.write(os.urandom(MiB))
    mid = str(tmp_path / "mid" / "mid.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "../base/base.raw", "-F", "raw", mid, "12M")
    qemu_io(mid, "write -P 0x22 1M 1M", "write -z 2560k 256k", "write -P 0x23 9M 1M",
            "write -c -P 0x24 10M 64k")
    top = str(tmp_path / "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "mid/mid.qcow2", "-F", "qcow2", top, "16M")
    qemu_io(top, "write -P 0x33 1536k 64k", "write -z 6M 512k", "write -P 0x34 9728k 4k",
            "write -P 0x35 15M 512k")
    return top, mid, base


def test_chain_two_links_and_raw_base(tmp_path, qemu_img):
    top, mid, base = _chain(tmp_path)
    _read, extents = assert_same_view(top, "qcow2", tmp_path, ranges=24, allow_backing=True)
    with open_source(top, "qcow2", allow_backing=True) as src:
        assert src.describe()["chain"] == [
            (top, "qcow2"), (os.path.join(str(tmp_path), "mid/mid.qcow2"), "qcow2"),
            (os.path.join(str(tmp_path), "mid/../base/base.raw"), "raw")]
        assert src.read(6 * MiB, 512 * KiB) == bytes(512 * KiB)     # zero flag hides base
        assert src.read(0, 4) == b"\x11" * 4
        assert src.read(1536 * KiB, 4) == b"\x33" * 4
        # 12-16 MiB is past mid's end (except top's write at 15 MiB): zeros, not data.
        assert any(not d and o <= 12 * MiB and o + n >= 15 * MiB for o, n, d in extents), \
            extents
        # The raw base's hole (3-6 MiB, where nothing above wrote) is not data either.
        assert any(not d and o <= 3 * MiB + 512 * KiB < o + n for o, n, d in extents)
    # Opened by a relative path from another directory, relative names resolve the same way.
    cwd = os.getcwd()
    os.chdir(str(tmp_path / "base"))
    try:
        with open_source("../top.qcow2", "qcow2", allow_backing=True) as src:
            assert src.describe()["chain"][1] == ("../mid/mid.qcow2", "qcow2")
            assert guest_digest(src)[0] == file_digest(oracle_raw(top, "qcow2", tmp_path),
                                                       16 * MiB)
    finally:
        os.chdir(cwd)


def test_backing_smaller_and_zero_clusters(tmp_path, qemu_img):
    base = str(tmp_path / "b.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "3M")
    qemu_io(base, "write -P 0x5a 0 3M")
    for compat in ("1.1", "0.10"):
        top = str(tmp_path / ("t-%s.qcow2" % compat))
        qimg("create", "-q", "-f", "qcow2", "-o", "compat=" + compat, "-b", "b.qcow2",
             "-F", "qcow2", top, "8M")
        qemu_io(top, "write -z 64k 128k", "write -z 1M 4k", "write -P 1 7M 4k")
        assert_same_view(top, "qcow2", tmp_path, ranges=12, allow_backing=True)
        with open_source(top, "qcow2", allow_backing=True) as src:
            assert src.read(64 * KiB, 128 * KiB) == bytes(128 * KiB)
            assert src.read(0, 64 * KiB) == b"\x5a" * (64 * KiB)
            assert src.read(3 * MiB - 2, 4) == b"\x5a\x5a\0\0"


def test_mostly_empty_images_report_holes(tmp_path, qemu_img):
    big = str(tmp_path / "big.qcow2")
    qimg("create", "-q", "-f", "qcow2", big, "40G")
    qemu_io(big, "write -P 0x61 0 2M", "write -P 0x62 20G 1M", "write -z 30G 1G")
    with open_source(big, "qcow2") as src:
        extents = list(src.extents())
        assert extents == [(0, 2 * MiB, True), (2 * MiB, 20 * GiB - 2 * MiB, False),
                           (20 * GiB, MiB, True), (20 * GiB + MiB, 20 * GiB - MiB, False)]
        assert src.read(20 * GiB + MiB - 2, 4) == b"\x62\x62\0\0"
    # Metadata preallocation maps every cluster, but the file's holes read zeros: not data.
    meta = str(tmp_path / "meta.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", meta, "1G")
    qemu_io(meta, "write -P 0x63 512M 1M")
    with open_source(meta, "qcow2") as src:
        extents = list(src.extents())
        assert MiB <= data_bytes(extents) <= MiB + 128 * KiB, extents
        assert src.read(512 * MiB, 2) == b"\x63\x63"
    assert_same_view(meta, "qcow2", tmp_path, ranges=2)


# ---------------------------------------------------------------------------------------------
# Refusals: each before any guest byte is read

def test_refuses_bad_format_and_non_files(tmp_path):
    with pytest.raises(Qcow2Error) as info:
        open_source(str(tmp_path), "vmdk")
    assert info.value.option == "source_format"
    expect_refusal(tmp_path, "raw", str(tmp_path), "directory")
    link = str(tmp_path / "link")
    os.symlink(str(tmp_path), link)
    expect_refusal(link, "qcow2", link, "directory")
    expect_refusal(tmp_path / "missing.raw", "raw", "missing.raw", "No such file")
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    expect_refusal(fifo, "raw", fifo, "not a regular file")
    notq = str(tmp_path / "plain.raw")
    with open(notq, "wb") as handle:
        handle.write(b"\1" * 4096)
    expect_refusal(notq, "qcow2", notq, "not a qcow2 image")


def test_refuses_encrypted(tmp_path, qemu_img):
    path = str(tmp_path / "enc.qcow2")
    oracle.qemu_luks(path)
    expect_refusal(path, "qcow2", path, "encrypted")


def test_refuses_dirty(tmp_path, qemu_img):
    path = str(tmp_path / "dirty.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "1M")
    run(oracle.QEMU_IO, "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", path)
    with Image.open(path) as img:
        assert img.header.incompatible_features & C.INCOMPAT_DIRTY
    expect_refusal(path, "qcow2", path, "dirty")


def _set_incompat(path, bit):
    with open(path, "r+b") as handle:
        handle.seek(72)
        value = struct.unpack(">Q", handle.read(8))[0] | bit
        handle.seek(72)
        handle.write(struct.pack(">Q", value))


def test_refuses_corrupt_bit_and_damage(tmp_path, qemu_img):
    marked = str(tmp_path / "marked.qcow2")
    qimg("create", "-q", "-f", "qcow2", marked, "1M")
    _set_incompat(marked, C.INCOMPAT_CORRUPT)
    expect_refusal(marked, "qcow2", marked, "marked corrupt")
    # Damage qemu-img check sees: the refcount of a data cluster set to 0.
    damaged = str(tmp_path / "damaged.qcow2")
    qimg("create", "-q", "-f", "qcow2", damaged, "1M")
    qemu_io(damaged, "write -P 7 0 64k")
    with Image.open(damaged) as img:
        l2 = img.l1_entry(0) & C.L1E_OFFSET_MASK
        data = img.l2_entries_of(img.read_l2(l2))[0][0] & C.L2E_OFFSET_MASK
        cluster = data // img.cluster_size
        refblock = img.reftable_entry(cluster // img.refblock_entries) & C.REFT_OFFSET_MASK
        where = refblock + (cluster % img.refblock_entries) * 2
    with open(damaged, "r+b") as handle:
        handle.seek(where)
        handle.write(b"\0\0")
    code, data, _err = oracle.qemu_check(damaged)
    assert data["corruptions"] >= 1
    expect_refusal(damaged, "qcow2", damaged, "consistency check", "corruptions", "refcount=0")


def test_refuses_backing_without_format(tmp_path, qemu_img):
    base = str(tmp_path / "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "1M")
    top = str(tmp_path / "ov.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1M")
    # Turn the backing format extension into an unknown one (QEMU ignores those).
    with open(top, "r+b") as handle:
        head = handle.read(4096)
        pos = head.find(struct.pack(">I", C.EXT_BACKING_FORMAT))
        assert pos > 0
        handle.seek(pos)
        handle.write(struct.pack(">I", 0x7e57da7a))
    with Image.open(top) as img:
        assert img.backing_file == "base.qcow2" and img.backing_fmt is None
    expect_refusal(top, "qcow2", top, "without a recorded backing format",
                   "the format is never probed", allow_backing=True)
    # A backing format that is neither raw nor qcow2, and a missing backing file.
    odd = str(tmp_path / "odd.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "base.vmdk", "-F", "vmdk", odd, "1M")
    expect_refusal(odd, "qcow2", odd, "'vmdk'", allow_backing=True)
    gone = str(tmp_path / "gone.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F", "qcow2", gone,
         "1M")
    expect_refusal(gone, "qcow2", "nowhere.qcow2", "backing file of %s" % gone,
                   allow_backing=True)


def test_refuses_loops_and_long_chains(tmp_path, qemu_img):
    a = str(tmp_path / "a.qcow2")
    b = str(tmp_path / "b.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a, "1M")
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
    expect_refusal(a, "qcow2", "loops", allow_backing=True)
    selfish = str(tmp_path / "self.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2", selfish,
         "1M")
    expect_refusal(selfish, "qcow2", "loops", allow_backing=True)
    prev = None
    for k in range(source.MAX_CHAIN + 1):
        path = str(tmp_path / ("l%02d.qcow2" % k))
        args = ["-b", prev, "-F", "qcow2"] if prev else []
        qimg("create", "-q", "-f", "qcow2", *(args + [path, "1M"]))
        prev = os.path.basename(path)
    expect_refusal(path, "qcow2", "longer than %d" % source.MAX_CHAIN, allow_backing=True)
    below = str(tmp_path / ("l%02d.qcow2" % (source.MAX_CHAIN - 1)))
    with open_source(below, "qcow2", allow_backing=True) as src:
        assert len(src.describe()["chain"]) == source.MAX_CHAIN


def test_refuses_external_data_file(tmp_path, qemu_img):
    path = str(tmp_path / "ext.qcow2")
    # (qemu-img creates a relative data file name in its working directory)
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", path, "1M",
         cwd=str(tmp_path))
    expect_refusal(path, "qcow2", path, "external data file")


def _hold(path, *flags):
    """A qemu-io process holding `path` open (sleeping), once its locks are visible."""
    proc = subprocess.Popen([oracle.QEMU_IO] + list(flags) + ["-c", "sleep 60000", path],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while not lock.probe(path)["held"]:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError("qemu-io did not take its locks: %s"
                                 % proc.communicate()[1])
        time.sleep(0.05)
    return proc


def _stop(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_refuses_a_source_a_qemu_writes(tmp_path, qemu_img, template):
    path = str(tmp_path / "busy.qcow2")
    qimg("create", "-q", "-f", "qcow2", path, "1M")
    raw = str(tmp_path / "busy.raw")
    shutil.copyfile(template, raw)
    for target, fmt in ((path, "qcow2"), (raw, "raw")):
        writer = _hold(target, "-f", fmt)
        try:
            expect_refusal(target, fmt, target, "in use by a running QEMU")
        finally:
            _stop(writer)
        # A QEMU that only reads it (a guest's read-only backing file) is no obstacle.
        reader = _hold(target, "-r", "-f", fmt)
        try:
            with open_source(target, fmt) as src:
                assert src.read(0, 512) is not None
        finally:
            _stop(reader)
    # A writer deeper in the chain is refused too.
    top = str(tmp_path / "over.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "busy.qcow2", "-F", "qcow2", top, "1M")
    writer = _hold(path, "-f", "qcow2")
    try:
        expect_refusal(top, "qcow2", path, "backing file of %s" % top, "in use",
                       allow_backing=True)
    finally:
        _stop(writer)


def test_open_source_keeps_writers_out(tmp_path, qemu_img):
    path = str(tmp_path / "held.qcow2")
    qimg("create", "-q", "-f", "qcow2", path, "1M")
    with open_source(path, "qcow2"):
        proc = run(oracle.QEMU_IO, "-f", "qcow2", "-c", "write 0 512", path)
        assert proc.returncode != 0 and "lock" in proc.stderr, (proc.stdout, proc.stderr)
        # Readers share it.
        proc = run(oracle.QEMU_IO, "-r", "-f", "qcow2", "-c", "read 0 512", path)
        assert proc.returncode == 0, proc.stderr
    qemu_io(path, "write 0 512")


def test_undecompressable_cluster_is_an_error_naming_the_source(tmp_path, qemu_img):
    path = str(tmp_path / "garbled.qcow2")
    qimg("create", "-q", "-f", "qcow2", path, "1M")
    qemu_io(path, "write -c -P 0x42 64k 64k")
    with Image.open(path) as img:
        l2 = img.l1_entry(0) & C.L1E_OFFSET_MASK
        entry = img.l2_entries_of(img.read_l2(l2))[1][0]
        offset, length = img.compressed_range(entry)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * length)          # structure intact: the check passes
    with open_source(path, "qcow2") as src:
        assert list(src.extents()) == [(0, 64 * KiB, False), (64 * KiB, 64 * KiB, True),
                                       (128 * KiB, 896 * KiB, False)]
        with pytest.raises(Qcow2Error) as info:
            src.read(64 * KiB, 4096)
    assert info.value.option == "source"
    assert "cannot be decompressed" in str(info.value) and path in str(info.value)
