# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Unit tests of the codec, the option rules and the pure planner (no qemu-img, no disk)."""

import struct

import pytest

from qcow2.format import constants as C
from qcow2.create.allocator import QemuCreateModel, pack_refcounts, refcount_metadata_size
from qcow2.format.errors import Qcow2Error
from qcow2.format.header import Header, decode_cluster0, encode_cluster0, standard_extensions
from qcow2.format.options import CreateOptions, parse_size
from qcow2.create.planner import metadata_chunks, plan_create
from qcow2.format.refcounts import get_refcount, set_refcount
from qcow2.format.tables import ones_refblocks, progression, refcount_runs


def test_header_round_trip_v3_with_extensions():
    hdr = Header(size=1 << 30, l1_size=2, l1_table_offset=3 << 16,
                 refcount_table_offset=1 << 16, refcount_table_clusters=1,
                 incompatible_features=C.INCOMPAT_COMPRESSION, compression_type=1)
    exts = standard_extensions(3, 65536, backing_fmt="qcow2", data_file=None)
    cluster = encode_cluster0(hdr, exts, "base.qcow2")
    assert len(cluster) == 65536
    back, back_exts, backing = decode_cluster0(cluster)
    assert back == hdr
    assert backing == "base.qcow2"
    assert [e.type for e in back_exts] == [C.EXT_BACKING_FORMAT, C.EXT_FEATURE_TABLE]
    assert back_exts[0].data == b"qcow2"


def test_v2_header_is_72_bytes_and_has_no_feature_table():
    hdr = Header(version=2, header_length=72)
    cluster = encode_cluster0(hdr, standard_extensions(2, 65536), None)
    assert cluster[72:80] == b"\0" * 8
    assert decode_cluster0(cluster)[0].version == 2


def test_feature_table_only_above_4k_clusters():
    assert not standard_extensions(3, 4096)
    assert len(standard_extensions(3, 8192)[0].data) == 8 * 48


def test_decode_rejects_garbage():
    with pytest.raises(Qcow2Error, match="not a qcow2"):
        decode_cluster0(b"\0" * 512)
    with pytest.raises(Qcow2Error, match="not a qcow2"):
        decode_cluster0(b"QFI")
    bad = bytearray(encode_cluster0(Header(), [], None))
    struct.pack_into(">I", bad, 4, 7)
    with pytest.raises(Qcow2Error, match="version 7"):
        decode_cluster0(bytes(bad))
    long_ext = bytearray(encode_cluster0(Header(), [], None))
    struct.pack_into(">II", long_ext, 112, 0x12345678, 1 << 30)
    with pytest.raises(Qcow2Error, match="extension"):
        decode_cluster0(bytes(long_ext))


def test_header_too_big_for_cluster_names_cluster_size():
    hdr = Header(cluster_bits=9)
    with pytest.raises(Qcow2Error) as err:
        encode_cluster0(hdr, standard_extensions(3, 512, "qcow2"), "x" * 600)
    assert err.value.option == "cluster_size"


@pytest.mark.parametrize("text,expect", [
    ("0", 0), ("512", 512), ("1k", 1024), ("1K", 1024), ("1.5k", 1536), ("2M", 2 << 20),
    ("3G", 3 << 30), ("1T", 1 << 40), ("2P", 2 << 50), ("1E", 1 << 60), ("10GiB", 10 << 30),
    ("4 MiB", 4 << 20), (123, 123)])
def test_parse_size(text, expect):
    assert parse_size(text) == expect


@pytest.mark.parametrize("text", ["", "abc", "1Q", "1.2.3", "-5", True, None, "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(Qcow2Error) as err:
        parse_size(text)
    assert err.value.option == "size"


def test_options_defaults_and_rounding():
    opts = CreateOptions.from_dict({"size": 1000})
    assert opts.size == 1024
    assert (opts.cluster_size, opts.version, opts.refcount_bits) == (65536, 3, 16)
    assert opts.preallocation == "off"
    raw = CreateOptions.from_dict({"size": "1M", "data_file": "d", "data_file_raw": "on"})
    assert raw.effective_preallocation == "metadata"


def test_unknown_option_is_named():
    with pytest.raises(Qcow2Error) as err:
        CreateOptions.from_dict({"size": 1, "encryption": "on"})
    assert err.value.option == "encryption"


@pytest.mark.parametrize("clusters,cs,order,expect_blocks,expect_table", [
    (3, 65536, 4, 1, 1), (32766, 65536, 4, 1, 1), (32767, 65536, 4, 2, 1),
    (100000, 512, 6, None, None)])
def test_refcount_metadata_fixed_point(clusters, cs, order, expect_blocks, expect_table):
    blocks, table = refcount_metadata_size(clusters, cs, order, False)
    per_block = cs * 8 >> order
    total = clusters + blocks + table
    # Exact: enough blocks to count everything including themselves, and not one more.
    assert blocks * per_block >= total
    assert (blocks - 1) * per_block < total
    assert table * (cs // 8) >= blocks
    assert (table - 1) * (cs // 8) < blocks
    if expect_blocks is not None:
        assert (blocks, table) == (expect_blocks, expect_table)


def test_refcount_packing_all_widths():
    for order in range(7):
        bits = 1 << order
        block = bytearray(64)
        entries = 64 * 8 // bits
        for i in range(entries):
            set_refcount(block, i, (i * 7) % (1 << bits), order)
        for i in range(entries):
            assert get_refcount(block, i, order) == (i * 7) % (1 << bits)
        counts = [(i * 7) % (1 << bits) for i in range(entries)]
        assert pack_refcounts(counts, order) == bytes(block)
    block = bytearray(1)
    set_refcount(block, 0, 1, 2)
    assert block == bytearray(b"\x01")  # sub-byte widths fill from the low bits


@pytest.mark.parametrize("entry_size", [8, 16])
def test_progression_matches_struct(entry_size):
    first, step, count = (5 << 16) | C.OFLAG_COPIED, 65536, 10000
    data = b"".join(progression(first, step, count, entry_size, tail=7, chunk_bytes=4096))
    words = struct.unpack(">%dQ" % (len(data) // 8), data)
    if entry_size == 8:
        assert list(words) == [first + k * step for k in range(count)]
    else:
        assert list(words[0::2]) == [first + k * step for k in range(count)]
        assert set(words[1::2]) == {7}


@pytest.mark.parametrize("order", range(7))
def test_ones_refblocks(order):
    total = 1000
    data = b"".join(ones_refblocks(total, order, 65536, chunk_bytes=1024))
    assert len(data) == 65536
    for i in (0, 1, total - 1):
        assert get_refcount(data, i, order) == 1
    assert get_refcount(data, total, order) == 0


def _simulated_refcounts(plan):
    """Apply the plan's bytes to a dict and count references the way qemu-img check does."""
    image = bytearray(plan.file_size if plan.file_size < (64 << 20) else 0)
    for offset, piece in metadata_chunks(plan):
        image[offset:offset + len(piece)] = piece
    return bytes(image)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("cs,order,size", [(512, 0, 3 << 20), (4096, 6, 50 << 20),
                                           (65536, 4, 64 << 20), (65536, 4, 100352)])
def test_planned_prealloc_layout_is_self_consistent(mode, cs, order, size):
    opts = CreateOptions.from_dict({"size": size, "cluster_size": cs,
                                    "refcount_bits": 1 << order, "preallocation": mode})
    plan = plan_create(opts)
    image = _simulated_refcounts(plan)
    hdr = decode_cluster0(image[:cs])[0]
    total = plan.file_size // cs
    refs = [0] * total
    refs[0] += 1
    rt = hdr.refcount_table_offset // cs
    for c in range(rt, rt + hdr.refcount_table_clusters):
        refs[c] += 1
    entries = struct.unpack(">%dQ" % (hdr.refcount_table_clusters * cs // 8),
                            image[hdr.refcount_table_offset:
                                  hdr.refcount_table_offset + hdr.refcount_table_clusters * cs])
    per_block = cs * 8 >> order
    counts = {}
    for i, e in enumerate(entries):
        if e:
            refs[e // cs] += 1
            block = image[e:e + cs]
            for j in range(per_block):
                if i * per_block + j < total:
                    counts[i * per_block + j] = get_refcount(block, j, order)
    l1_end = hdr.l1_table_offset + 8 * hdr.l1_size
    l1 = struct.unpack(">%dQ" % hdr.l1_size, image[hdr.l1_table_offset:l1_end])
    for c in range(hdr.l1_table_offset // cs, -(-(hdr.l1_table_offset + 8 * hdr.l1_size) // cs)):
        refs[c] += 1
    guest = -(-size // cs)
    seen = 0
    for e in l1:
        assert e & C.OFLAG_COPIED
        off = e & C.L1E_OFFSET_MASK
        refs[off // cs] += 1
        table = struct.unpack(">%dQ" % (cs // 8), image[off:off + cs])
        for v in table:
            if seen < guest and v:
                assert v & C.OFLAG_COPIED and not v & C.OFLAG_ZERO
                refs[(v & C.L2E_OFFSET_MASK) // cs] += 1
                seen += 1
    assert seen == guest
    # Every cluster is referenced exactly once and counted once, except the few free
    # clusters that align the data region to 4 KiB when clusters are smaller than that.
    free = [c for c in range(total) if refs[c] == 0]
    assert all(refs[c] == 1 and counts.get(c) == 1 for c in range(total) if c not in free)
    assert all(counts.get(c) == 0 for c in free)
    assert len(free) < max(1, 4096 // cs)
    assert plan.data_offset % 4096 == 0 or cs >= 4096
    assert plan.data_length == guest * cs


def test_planner_does_no_io(monkeypatch):
    import builtins
    import os

    def forbidden(*args, **kwargs):
        raise AssertionError("the planner must not do I/O")

    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(os, "open", forbidden)
    monkeypatch.setattr(os, "stat", forbidden)
    for mode in C.PREALLOC_MODES:
        plan = plan_create(CreateOptions.from_dict({"size": "8T", "preallocation": mode}))
        assert plan.file_size > 0


def test_allocator_model_matches_known_qemu_layouts():
    # 1 GiB at 512-byte clusters: L1 of 512 clusters at 3..514, refblocks appended at 515, 516.
    model = QemuCreateModel(512, 4).create(32768 * 8)
    assert model.l1_offset == 3 * 512
    assert sorted(model.refblocks.values()) == [2, 515, 516]
    assert model.file_size == 517 * 512
    # 64 MiB at 64 KiB clusters: 3 clusters plus an 8-byte L1.
    small = QemuCreateModel(65536, 4).create(8)
    assert small.file_size == 196616


def test_metadata_8t_plan_is_closed_form_and_small_in_memory():
    plan = plan_create(CreateOptions.from_dict({"size": "8T", "preallocation": "metadata"}))
    assert plan.data_length == 8 << 40
    l2 = [r for r in plan.regions if r.name == "L2 tables"][0]
    assert l2.length == (8 << 40) // 65536 * 8


@pytest.mark.parametrize("order", range(7))
def test_refcount_runs_with_gaps(order):
    runs = ((0, 13), (17, 18), (21, 1000))
    data = b"".join(refcount_runs(runs, order, 65536, chunk_bytes=64))
    assert len(data) == 65536
    for i in range(1100):
        inside = any(a <= i < b for a, b in runs)
        assert get_refcount(data, i, order) == (1 if inside else 0), i


def test_vectored_write_survives_short_writes_and_missing_pwritev(tmp_path, monkeypatch):
    """_pwritev_all must land every byte in place when the kernel writes only part of a
    vector, and fall back to one joined write where os.pwritev does not exist."""
    import os

    from qcow2.create import writer

    pieces = [bytes([i]) * (1000 + 37 * i) for i in range(1, 40)]
    expect = b"".join(pieces)
    real = os.pwritev
    calls = []

    def short(fd, bufs, offset):
        calls.append(len(bufs))
        # Write just over half of what was asked, ending inside a piece.
        total = sum(len(b) for b in bufs)
        data = b"".join(bufs)[:total // 2 + 3]
        return real(fd, [data], offset)

    path = tmp_path / "v.bin"
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        monkeypatch.setattr(os, "pwritev", short)
        writer._pwritev_all(fd, pieces, 4096)
        assert calls == [len(pieces)]
        monkeypatch.delattr(os, "pwritev")
        writer._pwritev_all(fd, pieces, 4096 + len(expect))
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[4096:4096 + len(expect)] == expect
    assert data[4096 + len(expect):] == expect


def test_zero_writes_start_writeback_on_every_buffer(tmp_path, monkeypatch):
    """write_zeros advises the kernel after each buffer (start writeback) and again for the
    buffer two behind (drop its clean pages), and the bytes are zeros where asked."""
    import os

    from qcow2.create import writer

    monkeypatch.setattr(writer, "ZERO_BUFFER", 4096)
    advice = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, n, how: (advice.append((off, n, how)),
                                                 real(fd, off, n, how))[1])
    path = tmp_path / "z.bin"
    path.write_bytes(b"\xff" * 8 * 4096)
    fd = os.open(str(path), os.O_RDWR)
    try:
        writer.write_zeros(fd, 4096, 5 * 4096)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data == b"\xff" * 4096 + bytes(5 * 4096) + b"\xff" * 2 * 4096
    started = [a[0] for a in advice]
    assert all(a[2] == os.POSIX_FADV_DONTNEED for a in advice)
    # Every buffer is advised when written; buffers 0..2 are advised a second time later.
    assert sorted(set(started)) == [4096 * k for k in range(1, 6)]
    assert len(advice) == 5 + 3


class _TableImage(object):
    """Just what the progression tests of the inspector read from an image."""

    def __init__(self, cluster_bits, entry_size):
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_entry_size = entry_size
        self._matcher = None
        self._last_progression = None
        self._delta_cache = {}


def _entries_are_progression(table, n, first, bitmap, entry_size, cluster_size):
    words = struct.unpack(">%dQ" % (len(table) // 8), table)
    step = entry_size // 8
    for k in range(n):
        if words[k * step] != first + k * cluster_size:
            return False
        if step == 2 and words[k * step + 1] != bitmap:
            return False
    return True


@pytest.mark.parametrize("cluster_bits", range(9, 22))
@pytest.mark.parametrize("entry_size", [8, 16])
def test_l2_progression_test_agrees_with_entry_by_entry(cluster_bits, entry_size):
    """The byte-template matcher and the big-integer test decide exactly like a loop over
    the entries: on progressions that cross a template period and change their high bytes,
    on tables cut short, with flags, and on tables with one bit flipped anywhere."""
    import random

    from qcow2.format import l2runs

    rnd = random.Random(cluster_bits * 100 + entry_size)
    cs = 1 << cluster_bits
    per_table = cs // entry_size
    img = _TableImage(cluster_bits, entry_size)
    decided = {True: 0, False: 0}
    for trial in range(40):
        n = per_table if trial % 3 else rnd.randint(1, min(per_table, 5000))
        n = min(n, 1 << 14)
        if trial % 4 == 0:
            offset = rnd.randrange(1 << 20) * cs
        else:
            # Just below a boundary of the template period or a byte of the offset.
            bit = rnd.randrange(cluster_bits, 48)
            offset = max(0, (1 << bit) - rnd.randrange(1, n + 2) * cs)
        flags = rnd.choice([0, C.OFLAG_COPIED, C.OFLAG_ZERO, C.OFLAG_COPIED | C.OFLAG_ZERO,
                            1 << 1])
        first = offset | flags
        bitmap = rnd.choice([0, 0xFFFFFFFF, rnd.getrandbits(64)]) if entry_size == 16 else 0
        words = []
        for k in range(n):
            words.append(first + k * cs)
            if entry_size == 16:
                words.append(bitmap)
        table = bytearray(struct.pack(">%dQ" % len(words), *words))
        if trial % 2:
            pos = rnd.randrange(len(table))
            table[pos] ^= 1 << rnd.randrange(8)
        table = bytes(table) + bytes((per_table - n) * entry_size)
        want = _entries_are_progression(table, n, first, bitmap, entry_size, cs)
        assert l2runs._is_progression(img, table, n, first, bitmap) == want
        assert l2runs._is_progression_bigint(img, table, n, first, bitmap) == want
        decided[want] += 1
    assert decided[True] and decided[False]


def test_l2_progression_matcher_declines_what_it_cannot_do_cheaply():
    from qcow2.format import l2runs

    cs = 1 << 16
    matcher = l2runs._ProgressionMatcher(16, 16)
    table = struct.pack(">4Q", (5 * cs) | 2, 7, (6 * cs) | 2, 7)
    assert matcher.matches(table, 2, (5 * cs) | 2, 7) is None      # reserved low bits
    for bitmap in range(matcher.MAX_TEMPLATE_BUILDS):
        table = struct.pack(">4Q", 5 * cs, bitmap, 6 * cs, bitmap)
        assert matcher.matches(table, 2, 5 * cs, bitmap) is True
    table = struct.pack(">4Q", 5 * cs, 99, 6 * cs, 99)
    assert matcher.matches(table, 2, 5 * cs, 99) is None          # template budget spent
    img = _TableImage(16, 16)
    img._matcher = matcher
    assert l2runs._is_progression(img, table, 2, 5 * cs, 99) is True


@pytest.mark.parametrize("cluster_bits", [9, 12, 16, 21])
@pytest.mark.parametrize("entry_size", [8, 16])
def test_progression_from_template_equals_struct(cluster_bits, entry_size):
    """Long power-of-two progressions come from a template; they must be exactly what
    struct packs, across template periods, high-byte carries and every start alignment."""
    import random

    from qcow2.format import tables

    rnd = random.Random(cluster_bits * 10 + entry_size)
    step = 1 << cluster_bits
    period_bits = tables.template_period_bits(cluster_bits)
    for trial in range(6):
        count = (4 << period_bits) + rnd.randrange(3 << period_bits)
        bit = rnd.randrange(cluster_bits + period_bits, 52)
        first = max(0, (1 << bit) - rnd.randrange(1, count) * step)
        first |= rnd.choice([0, C.OFLAG_COPIED, C.OFLAG_COPIED | C.OFLAG_ZERO])
        tail = rnd.choice([0, 0xFFFFFFFF00000000, rnd.getrandbits(64)])
        pieces = list(tables.progression(first, step, count, entry_size, tail))
        assert max(len(p) for p in pieces) <= tables.TEMPLATE_PIECE
        assert len(pieces) > 1
        data = b"".join(pieces)
        words = struct.unpack(">%dQ" % (len(data) // 8), data)
        if entry_size == 8:
            assert list(words) == list(range(first, first + count * step, step))
        else:
            assert list(words[0::2]) == list(range(first, first + count * step, step))
            assert set(words[1::2]) == {tail}


def test_progression_refuses_entries_past_64_bits():
    with pytest.raises(ValueError):
        list(progression((1 << 64) - (1 << 16), 1 << 16, 2))
    with pytest.raises(ValueError):
        list(progression(0, 1 << 16, 2, entry_size=12))
