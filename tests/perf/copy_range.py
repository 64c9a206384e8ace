# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""One-off micro-benchmark for issue 13: would `os.copy_file_range` copy a raw source into the
contiguous layout of a preallocated image (data cluster g at data_offset + g * cluster_size)
faster than the engine's read + pwrite?

Copies 1 GiB of data (a file written once, compressible like a filesystem's content) to a
cluster-aligned offset of a second file on the same filesystem, in turns (A B C ... B C A ...,
the order turning every round):

- ``pread+pwrite``: 8 MiB `os.pread` then `os.pwrite` (what convert.py does, without its zero
  check);
- ``pread+zerocheck+pwrite``: the same with the engine's 64 KiB zero comparison of every piece;
- ``pread+pwrite+writeback``: the same as the first, plus `posix_fadvise(DONTNEED)` after every
  write (what the engine does for its metadata and zeros: writeback starts at once);
- ``copy_file_range``: 8 MiB `os.copy_file_range` calls (the kernel copies, no user-space
  buffer);
- ``copy_file_range+writeback``: the same plus the writeback kick.

The destination is made before the timing either as a hole (``metadata``: the file's length
set first), fallocated (``falloc``) or empty, so every write extends it (``extend``: how the
``off`` layout grows, data after its tables); every timing ends with fsync of the destination. The source is read into the page
cache before every timing (``warm``) or dropped from it (``cold``).

    python3 tests/perf/copy_range.py [--rounds 3] [--dir DIR] [--cache warm,cold]

Prints a table and writes tests/perf/results/copy-range-<timestamp>.json.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the template's content recipe)

GiB = 1 << 30
CHUNK = 8 << 20
PIECE = 64 << 10
SIZE = GiB
DATA_OFFSET = 5 * (64 << 10)   # a cluster-aligned data_offset, as in a small preallocated image


def make_source(path):
    if os.path.exists(path) and os.path.getsize(path) == SIZE:
        return
    pool = bench.template_pool()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, SIZE, len(pool)):
            os.pwrite(fd, pool[:SIZE - off], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def kick(fd, offset, length):
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def copy_rw(src, dst, zerocheck=False, writeback=False):
    zero = bytes(PIECE)
    for off in range(0, SIZE, CHUNK):
        data = os.pread(src, CHUNK, off)
        if zerocheck:
            view = memoryview(data)
            for pos in range(0, len(data), PIECE):
                if view[pos:pos + PIECE] == zero:
                    pass
        os.pwrite(dst, data, DATA_OFFSET + off)
        if writeback:
            kick(dst, DATA_OFFSET + off, len(data))


def copy_cfr(src, dst, writeback=False):
    off = 0
    while off < SIZE:
        n = os.copy_file_range(src, dst, min(CHUNK, SIZE - off), off, DATA_OFFSET + off)
        if n <= 0:
            raise OSError("copy_file_range returned %d at %d" % (n, off))
        if writeback:
            kick(dst, DATA_OFFSET + off, n)
        off += n


METHODS = {
    "pread+pwrite": copy_rw,
    "pread+zerocheck+pwrite": functools.partial(copy_rw, zerocheck=True),
    "pread+pwrite+writeback": functools.partial(copy_rw, writeback=True),
    "copy_file_range": copy_cfr,
    "copy_file_range+writeback": functools.partial(copy_cfr, writeback=True),
}


def one(method, src_path, dst_path, layout, cache):
    if os.path.exists(dst_path):
        os.unlink(dst_path)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT, 0o644)
    src = os.open(src_path, os.O_RDONLY)
    try:
        if layout != "extend":
            os.ftruncate(dst, DATA_OFFSET + SIZE + (1 << 20))
        if layout == "falloc":
            os.posix_fallocate(dst, DATA_OFFSET, SIZE)
        os.fsync(dst)
        if cache == "warm":
            bench.warm_cache(src_path)
        else:
            os.posix_fadvise(src, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        METHODS[method](src, dst)
        os.fsync(dst)
        elapsed = time.perf_counter() - start
    finally:
        os.close(src)
        os.close(dst)
        os.unlink(dst_path)
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=os.path.join(ROOT, ".scratch", "bench"))
    parser.add_argument("--cache", default="warm,cold")
    parser.add_argument("--layouts", default="metadata,falloc,extend")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, "copy-src.raw")
    dst = os.path.join(args.dir, "copy-dst.img")
    make_source(src)
    rows = []
    for cache in args.cache.split(","):
        for layout in args.layouts.split(","):
            times = {m: [] for m in METHODS}
            names = list(METHODS)
            for rnd in range(args.rounds):
                # The order turns every round, so no method always runs first (right after
                # the source is read into the cache, or after the previous layout's files).
                for method in names[rnd % len(names):] + names[:rnd % len(names)]:
                    times[method].append(one(method, src, dst, layout, cache))
            for method, ts in times.items():
                med = statistics.median(ts)
                rows.append({"cache": cache, "layout": layout, "method": method, "s": ts,
                             "median_s": med, "mb_per_s": SIZE / med / 1e6})
                sys.stderr.write("%s %s %s: %.2f s\n" % (cache, layout, method, med))
    doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bytes": SIZE,
           "chunk": CHUNK, "data_offset": DATA_OFFSET, "rounds": args.rounds,
           "kernel": os.uname().release, "python": sys.version.split()[0], "rows": rows}
    path = os.path.join(HERE, "results", "copy-range-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as handle:
        json.dump(doc, handle, indent=2)
    print("| source cache | destination | method | median (s) | MB/s |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        print("| %s | %s | %s | %.2f | %.0f |" % (
            r["cache"], r["layout"], r["method"], r["median_s"], r["mb_per_s"]))
    print("\nresults: %s" % path)
    os.unlink(src)


if __name__ == "__main__":
    main()
