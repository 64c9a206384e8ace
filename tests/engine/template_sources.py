# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Sources for the copy tests, built as real templates are: a raw disk with a partition table
and an ext4 filesystem holding files, and the qcow2 images qemu-img makes of it (compressed as
cloud images ship, compat 0.10, extended L2, 512 B and 2 MiB clusters, an overlay chain), plus
a sparse raw file. Tests only.

The partition table is a DOS (MBR) table written here (one Linux partition from 1 MiB to the
end), so neither sfdisk nor parted is needed; the filesystem is `mkfs.ext4 -d DIR -E offset=`
on the raw file, so no loop device is needed either.
"""

import os
import random
import shutil
import struct
import subprocess

MiB = 1 << 20
DISK_SIZE = 64 * MiB
PART_START = 1 * MiB


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, check=False, **kwargs)


def must(*args, **kwargs):
    proc = run(*args, **kwargs)
    assert proc.returncode == 0, "%s failed (exit %d): %s" % (
        " ".join(str(a) for a in args), proc.returncode, proc.stderr.strip() or proc.stdout)
    return proc


def write_mbr(path, start, end, disk_id=0x7d15c0c2):
    """A DOS partition table with one Linux partition covering [start, end) bytes."""
    first, count = start // 512, (end - start) // 512
    mbr = bytearray(512)
    mbr[440:444] = struct.pack("<I", disk_id)
    # Status, CHS first (unused: LBA), type 0x83, CHS last, LBA first, sectors.
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                               first, count)
    mbr[510:512] = b"\x55\xaa"
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(mbr), 0)
    finally:
        os.close(fd)


def populate(root, seed=1):
    """Files a small system image would hold: text, incompressible binaries, a repeated
    pattern, an empty file, a nested directory."""
    rng = random.Random(seed)
    for sub in ("etc", "usr/bin", "usr/share/doc", "var/log", "home/user"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    with open(os.path.join(root, "etc", "hostname"), "w") as handle:
        handle.write("template\n")
    with open(os.path.join(root, "etc", "fstab"), "w") as handle:
        handle.write("LABEL=root / ext4 defaults 0 1\n")
    for n in range(6):
        with open(os.path.join(root, "usr", "bin", "tool%d" % n), "wb") as handle:
            handle.write(bytes(rng.getrandbits(8) for _i in range(4096)) * (8 + 16 * n))
    with open(os.path.join(root, "usr", "bin", "blob"), "wb") as handle:
        handle.write(os.urandom(700 * 1024))
    with open(os.path.join(root, "usr", "share", "doc", "README"), "w") as handle:
        handle.write("the quick brown fox jumps over the lazy dog\n" * 20000)
    with open(os.path.join(root, "var", "log", "empty.log"), "w"):
        pass
    with open(os.path.join(root, "home", "user", "zeros"), "wb") as handle:
        handle.write(bytes(256 * 1024))


def ext4_disk(path, workdir):
    """A 64 MiB raw disk: an MBR with one partition from 1 MiB, an ext4 filesystem in it made
    from a directory of files (mkfs.ext4 -d). Returns the path."""
    content = os.path.join(workdir, "rootfs")
    if os.path.isdir(content):
        shutil.rmtree(content)
    populate(content)
    with open(path, "wb") as handle:
        handle.truncate(DISK_SIZE)
    fs_size = (DISK_SIZE - PART_START) // 1024
    must("mkfs.ext4", "-q", "-F", "-L", "root", "-d", content, "-E", "offset=%d" % PART_START,
         path, "%dk" % fs_size)
    write_mbr(path, PART_START, DISK_SIZE)
    # The filesystem is sound where the partition table says it is.
    proc = run("e2fsck", "-fn", "%s?offset=%d" % (path, PART_START))
    if proc.returncode not in (0,):
        # Older e2fsprogs do not take ?offset=: check through blkid at least.
        must("blkid", "-p", "-O", str(PART_START), path)
    return path


def qemu_convert(src, dst, *options, src_fmt="raw", cwd=None):
    must("qemu-img", "convert", "-q", "-f", src_fmt, "-O", "qcow2", *(list(options) + [src, dst]),
         cwd=cwd)
    return dst


def qemu_io(path, *commands, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    proc = must(*(args + [path]))
    assert "failed" not in proc.stdout, proc.stdout
    return proc


def ext_l2_image(disk, path):
    """The disk as an extended-L2 qcow2, then guest writes that leave subclusters in every
    state: a small write into an empty cluster (partly allocated), zero writes over part of an
    allocated cluster (zero subclusters), a discard."""
    qemu_convert(disk, path, "-o", "extended_l2=on")
    qemu_io(path,
            "write -P 0x61 %d 2048" % (60 * MiB + 6144),
            "write -P 0x62 %d 3072" % (61 * MiB + 30 * 1024),
            "write -z %d 8192" % (PART_START + 32768),
            "discard %d 4096" % (PART_START + 49152))
    return path


def overlay_chain(disk, workdir):
    """Two links: tmpl/base.qcow2 (the disk plus writes of its own) and overlay.qcow2 over it,
    named relatively ('tmpl/base.qcow2', -F qcow2) and larger than its base (72 MiB), with
    different writes: data over the base's, zeros hiding base data, a discard, data past the
    base's end."""
    tmpl = os.path.join(workdir, "tmpl")
    os.makedirs(tmpl, exist_ok=True)
    base = qemu_convert(disk, os.path.join(tmpl, "base.qcow2"))
    qemu_io(base, "write -P 0x42 %d %d" % (40 * MiB, 128 * 1024),
            "write -P 0x43 %d 512" % (50 * MiB + 512))
    overlay = os.path.join(workdir, "overlay.qcow2")
    # Relative backing name, resolved by QEMU against the overlay's directory (not the cwd).
    must("qemu-img", "create", "-q", "-f", "qcow2", "-b", "tmpl/base.qcow2", "-F", "qcow2",
         "overlay.qcow2", "72M", cwd=workdir)
    qemu_io(overlay,
            "write -P 0x71 %d %d" % (40 * MiB + 64 * 1024, 128 * 1024),
            "write -P 0x72 %d 1024" % (2 * MiB + 4096),
            "write -z %d %d" % (PART_START + 4 * MiB, 256 * 1024),
            "discard %d %d" % (PART_START + 6 * MiB, 128 * 1024),
            "write -P 0x73 %d %d" % (70 * MiB, 64 * 1024))
    return overlay


def sparse_raw(path, size=DISK_SIZE + 1536):
    """A sparse raw file whose size is not a multiple of the cluster size: a few data ranges
    (one ending at the file's end), and an allocated range of written zeros."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, b"\xeb\x63\x90" + b"S" * 4093, 0)
        os.pwrite(fd, b"\x5a" * 1000, 5 * MiB + 512)
        os.pwrite(fd, os.urandom(MiB), 33 * MiB)
        os.pwrite(fd, bytes(2 * MiB), 20 * MiB)          # data on disk that reads zeros
        os.pwrite(fd, b"\xa5" * 4096 + b"\x01" * 1536, size - 4096 - 1536)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def build(workdir):
    """Every source, built in `workdir`: {name: (path, format)}."""
    disk = ext4_disk(os.path.join(workdir, "disk.raw"), workdir)
    out = {"ext4-raw": (disk, "raw")}
    out["compressed"] = (qemu_convert(disk, os.path.join(workdir, "c.qcow2"), "-c"), "qcow2")
    out["compat-0.10"] = (qemu_convert(disk, os.path.join(workdir, "v2.qcow2"), "-o",
                                       "compat=0.10"), "qcow2")
    out["extended-l2"] = (ext_l2_image(disk, os.path.join(workdir, "xl2.qcow2")), "qcow2")
    out["cluster-512"] = (qemu_convert(disk, os.path.join(workdir, "c512.qcow2"), "-o",
                                       "cluster_size=512"), "qcow2")
    out["cluster-2M"] = (qemu_convert(disk, os.path.join(workdir, "c2m.qcow2"), "-o",
                                      "cluster_size=2M"), "qcow2")
    out["overlay-chain"] = (overlay_chain(disk, workdir), "qcow2")
    out["sparse-raw"] = (sparse_raw(os.path.join(workdir, "sparse.raw")), "raw")
    # Written back before anything looks at them: until then the filesystem may still turn
    # unwritten extents into written ones (SEEK_DATA answers change meanwhile).
    os.sync()
    return out
