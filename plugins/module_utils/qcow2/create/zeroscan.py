# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Zero detection for copies: which aligned blocks of a buffer hold something other than zeros,
and which subclusters of a cluster they touch.

A copy writes only the runs `nonzero_runs` returns, so every aligned all-zero block stays a
hole in the new file (like `qemu-img convert`, which skips zero runs of 4 KiB), and with
extended L2 only the subclusters holding data are marked allocated (`subcluster_bits`); an
unallocated subcluster of an image without a backing file reads zeros.

A buffer without a run of a block's length of zeros anywhere is recognised by one C-level
`bytes.find` of a zero block (about 1.5 ms per 8 MiB here); otherwise each aligned block
from the first such run on is compared with a zero block (a slice and a `memcmp`, which stops
at the first non-zero byte).
"""

BLOCK = 4096                      # holes inside a cluster: the host's block size

_ZERO_CACHE = {}


def _zero(n):
    block = _ZERO_CACHE.get(n)
    if block is None:
        block = _ZERO_CACHE[n] = bytes(n)
    return block


def grain(cluster_size, extended_l2):
    """Zero-detection granularity: a host block (never more than a cluster), and with
    extended L2 never more than a subcluster."""
    g = min(cluster_size, BLOCK)
    if extended_l2:
        g = min(g, cluster_size // 32)
    return g


def nonzero_runs(data, block):
    """[(start, end)] of `data` (bytes or bytearray, its offset 0 aligned to `block`) without the
    `block`-aligned blocks that are all zeros (a short last block counts when all zeros)."""
    n = len(data)
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)
    zero = _zero(block)
    # Fast path, one C-level pass: no run of `block` zeros anywhere, so no zero block.
    first = data.find(zero)
    full = n - n % block
    if first < 0:
        if full < n and data[full:] == zero[:n - full]:
            return [(0, full)] if full else []
        return [(0, n)] if n else []
    first -= first % block
    out = []
    start = 0 if first else None
    pos = first
    while pos < full:
        if data[pos:pos + block] == zero:
            if start is not None:
                out.append((start, pos))
                start = None
            pos += block
            continue
        if start is None:
            start = pos
        # Inside data: jump with one C-level search to the next aligned block that can be all
        # zeros (any such block starts at or after the next run of `block` zero bytes).
        nxt = data.find(zero, pos + 1)
        if nxt < 0 or nxt >= full:
            pos = full
        else:
            pos = max(pos + block, nxt + (-nxt) % block)
    if full < n and data[full:] != zero[:n - full]:
        if start is None:
            start = full
    elif full < n and start is not None:
        out.append((start, full))
        start = None
    if start is not None:
        out.append((start, n))
    return out


def subcluster_bits(runs, base, cluster_size):
    """{cluster index: allocation bitmap} of the subclusters touched by `runs` (offsets
    relative to guest offset `base`)."""
    sc = cluster_size // 32
    out = {}
    for s, e in runs:
        gs, ge = base + s, base + e
        c = gs // cluster_size
        while c * cluster_size < ge:
            lo = max(gs, c * cluster_size) - c * cluster_size
            hi = min(ge, (c + 1) * cluster_size) - c * cluster_size
            first, last = lo // sc, (hi - 1) // sc
            out[c] = out.get(c, 0) | (((1 << (last - first + 1)) - 1) << first)
            c += 1
    return out


__all__ = ["BLOCK", "grain", "nonzero_runs", "subcluster_bits"]
