# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The read-only inspector against qemu-img 7.2 as the oracle."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import pytest

_MODULE_UTILS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "plugins",
                             "module_utils")
if _MODULE_UTILS not in sys.path:
    sys.path.insert(0, _MODULE_UTILS)

from qcow2.read import check as check_module  # noqa: E402
from qcow2.read import inspector  # noqa: E402
from qcow2.format.errors import Qcow2Error  # noqa: E402

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.skipif(not QEMU_IMG or not QEMU_IO, reason="qemu-img/qemu-io needed")

CS = 65536


def run(*args, **kwargs):
    return subprocess.run(list(args), capture_output=True, text=True, check=False, **kwargs)


def create(path, size, opts="", *extra):
    cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if opts:
        cmd += ["-o", opts]
    cmd += list(extra) + [str(path), str(size)]
    res = run(*cmd)
    assert res.returncode == 0, res.stderr
    return str(path)


def qemu_io(path, *commands):
    cmd = [QEMU_IO]
    for c in commands:
        cmd += ["-c", c]
    res = run(*(cmd + [str(path)]))
    assert res.returncode == 0, res.stderr


def qemu_json(sub, path, cwd=None):
    res = run(QEMU_IMG, sub, "--output=json", path, cwd=cwd)
    if not res.stdout.strip():
        return None
    return json.loads(res.stdout)


def assert_info(path, cwd=None):
    theirs = qemu_json("info", path, cwd)
    ours = inspector.info(path) if cwd is None else _in_dir(cwd, inspector.info, path)
    theirs.pop("actual-size")
    assert ours.pop("actual-size") >= 0
    assert ours == theirs


def _in_dir(cwd, func, *args):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return func(*args)
    finally:
        os.chdir(old)


def assert_check(path):
    theirs = qemu_json("check", path)
    ours = inspector.check(path)
    messages = ours.pop("messages")
    assert isinstance(messages, list)
    assert ours == theirs
    return ours, messages


def assert_map(path):
    theirs = qemu_json("map", path)
    ours = inspector.block_map(path)
    assert ours == theirs


# (id, size, options, extra args, expected preallocation level)
VARIANTS = [
    ("default", "64M", "", (), "off"),
    ("compat010", "64M", "compat=0.10", (), "off"),
    ("lazy", "64M", "lazy_refcounts=on", (), "off"),
    ("refbits1", "16M", "refcount_bits=1,preallocation=metadata", (), "metadata"),
    ("refbits2", "16M", "refcount_bits=2,preallocation=metadata", (), "metadata"),
    ("refbits4", "16M", "refcount_bits=4,preallocation=metadata", (), "metadata"),
    ("refbits8", "16M", "refcount_bits=8,preallocation=metadata", (), "metadata"),
    ("refbits32", "16M", "refcount_bits=32,preallocation=metadata", (), "metadata"),
    ("refbits64", "16M", "refcount_bits=64,preallocation=metadata", (), "metadata"),
    ("refbits1_off", "16M", "refcount_bits=1", (), "off"),
    ("extl2", "64M", "extended_l2=on", (), "off"),
    ("extl2_meta", "64M", "extended_l2=on,preallocation=metadata", (), "metadata"),
    ("zstd", "64M", "compression_type=zstd", (), "off"),
    ("cs512", "16M", "cluster_size=512,preallocation=metadata", (), "metadata"),
    ("cs512_off", "1G", "cluster_size=512", (), "off"),
    ("cs512_12M", "12M", "cluster_size=512,preallocation=metadata", (), "metadata"),
    ("cs4k", "16M", "cluster_size=4096,preallocation=falloc", (), "falloc"),
    ("cs2m", "16M", "cluster_size=2M,preallocation=full", (), "full"),
    ("off", "64M", "preallocation=off", (), "off"),
    ("metadata", "64M", "preallocation=metadata", (), "metadata"),
    ("falloc", "64M", "preallocation=falloc", (), "falloc"),
    ("full", "64M", "preallocation=full", (), "full"),
    ("meta_3g", "3G", "preallocation=metadata", (), "metadata"),
    ("falloc_1g", "1G", "preallocation=falloc", (), "falloc"),
    ("odd_size", "100000", "preallocation=metadata", (), "metadata"),
    ("size0", "0", "", (), "full"),
    ("size0_full", "0", "preallocation=full", (), "full"),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("variants")
    made = {}
    for name, size, opts, extra, level in VARIANTS:
        made[name] = (create(base / (name + ".qcow2"), size, opts, *extra), level)
    return made


@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_matches_qemu(images, name):
    path, level = images[name]
    assert_info(path)
    assert_check(path)
    assert_map(path)
    state = inspector.allocation_state(path)
    assert state["preallocation"] == level
    assert state["guest_data"] is False
    assert set(state) == {"preallocation", "guest_data", "method", "mapped_clusters",
                          "total_clusters", "unallocated_host_bytes", "unwritten_host_bytes",
                          "fall_through_clusters"}


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
def test_guest_data_after_write(tmp_path, mode):
    path = create(tmp_path / "w.qcow2", "64M", "preallocation=" + mode)
    assert inspector.allocation_state(path)["guest_data"] is False
    qemu_io(path, "write -P 0xab 0 64k")
    state = inspector.allocation_state(path)
    assert state["guest_data"] is True
    assert state["preallocation"] == mode
    assert_check(path)
    assert_map(path)


def test_written_images_match(tmp_path):
    """Data, zero clusters, fragmentation across L2 tables, snapshots, compression."""
    path = create(tmp_path / "w.qcow2", "2G")
    qemu_io(path, "write -P 0xab 600M 64k", "write -P 1 0 64k", "write -P 1 1M 64k",
            "write -P 2 512M 128k", "write -z 3M 64k", "write -z -u 5M 64k",
            "write -P 3 70k 1k")
    assert_info(path)
    result, _proc = assert_check(path)
    assert result["fragmented-clusters"] >= 1
    assert_map(path)
    assert run(QEMU_IMG, "snapshot", "-c", "s1", path).returncode == 0
    qemu_io(path, "write -P 7 0 128k")
    assert run(QEMU_IMG, "snapshot", "-c", "s2", path).returncode == 0
    assert_info(path)
    assert_check(path)
    assert_map(path)

    src = create(tmp_path / "src.qcow2", "16M")
    qemu_io(src, "write -P 0xab 0 4M", "write -P 0 8M 1M")
    for name, opts in (("comp.qcow2", []), ("compz.qcow2", ["-o", "compression_type=zstd"])):
        dst = str(tmp_path / name)
        res = run(QEMU_IMG, "convert", "-c", "-O", "qcow2", *(opts + [src, dst]))
        assert res.returncode == 0, res.stderr
        assert_info(dst)
        result, _proc = assert_check(dst)
        assert result["compressed-clusters"] > 0
        assert_map(dst)
        assert inspector.allocation_state(dst)["guest_data"] is True


def test_extended_l2_subclusters(tmp_path):
    path = create(tmp_path / "e.qcow2", "64M", "extended_l2=on")
    qemu_io(path, "write -P 0xab 0 4k", "write -z 8k 4k", "write -P 1 1M 64k",
            "write -P 2 2M 2k")
    assert_info(path)
    assert_check(path)
    assert_map(path)
    assert inspector.allocation_state(path)["guest_data"] is True
    meta = create(tmp_path / "em.qcow2", "64M", "extended_l2=on,preallocation=metadata")
    qemu_io(meta, "write -P 0xab 64k 4k")
    assert_check(meta)
    assert_map(meta)
    state = inspector.allocation_state(meta)
    assert state["guest_data"] is True and state["preallocation"] == "metadata"


def test_persistent_bitmaps(tmp_path):
    path = create(tmp_path / "b.qcow2", "64M")
    for args in (["b0"], ["-g", "128k", "b1"], ["-g", "512", "b2"]):
        res = run(QEMU_IMG, "bitmap", "--add", *(args[:-1] + [path, args[-1]]))
        assert res.returncode == 0, res.stderr
    qemu_io(path, "write -P 1 1M 64k")
    assert run(QEMU_IMG, "bitmap", "--disable", path, "b1").returncode == 0
    assert_info(path)
    assert_check(path)
    assert_map(path)
    assert len(inspector.info(path)["format-specific"]["data"]["bitmaps"]) == 3


def test_metadata_after_writes(tmp_path):
    path = create(tmp_path / "m.qcow2", "1G", "preallocation=metadata")
    qemu_io(path, "write -P 0xab 0 64k", "write -P 0 128k 64k", "write -z 1M 64k")
    assert_check(path)
    assert_map(path)
    state = inspector.allocation_state(path)
    assert state["preallocation"] == "metadata"
    assert state["guest_data"] is True
    # A cluster written with zeros only is not guest data.
    path2 = create(tmp_path / "m2.qcow2", "64M", "preallocation=metadata")
    qemu_io(path2, "write -P 0 0 64k")
    assert inspector.allocation_state(path2)["guest_data"] is False
    assert inspector.allocation_state(path2, scan_limit=0)["guest_data"] is True


def test_large_metadata_image(tmp_path):
    """Many L2 tables and refblocks; also check the windowed counter gives the same answer."""
    path = create(tmp_path / "big.qcow2", "128G", "preallocation=metadata")
    qemu_io(path, "write -P 1 100G 64k")
    result, _proc = assert_check(path)
    assert_map(path)
    old = check_module.WINDOW_CLUSTERS
    try:
        check_module.WINDOW_CLUSTERS = 100003
        windowed = inspector.check(path)
    finally:
        check_module.WINDOW_CLUSTERS = old
    windowed.pop("messages")
    assert windowed == result


def test_backing_file(tmp_path):
    sub = tmp_path / "dir"
    sub.mkdir()
    create(sub / "base.qcow2", "64M")
    top = create(sub / "top.qcow2", "64M", "", "-b", "base.qcow2", "-F", "qcow2")
    assert_info(top)
    assert_info("dir/top.qcow2", cwd=str(tmp_path))
    assert_info("top.qcow2", cwd=str(sub))
    ours = _in_dir(str(tmp_path), inspector.info, "dir/top.qcow2")
    assert ours["full-backing-filename"] == "dir/base.qcow2"
    assert ours["backing-filename-format"] == "qcow2"
    absolute = create(tmp_path / "abs.qcow2", "64M", "", "-b", str(sub / "base.qcow2"),
                      "-F", "qcow2")
    assert_info(absolute)
    assert_check(top)
    # Documented: without opening the backing file, unallocated ranges are depth 1 and
    # nothing is claimed about them.
    assert inspector.block_map(top) == [{"start": 0, "length": 64 << 20, "depth": 1,
                                         "present": False, "zero": False, "data": False}]
    ext = create(tmp_path / "bp.qcow2", "64M", "extended_l2=on,preallocation=metadata",
                 "-b", str(sub / "base.qcow2"), "-F", "qcow2")
    assert_info(ext)
    assert_check(ext)


def test_data_file(tmp_path):
    path = create(tmp_path / "df.qcow2", "64M", "data_file=" + str(tmp_path / "d.raw"))
    assert_info(path)
    assert_check(path)
    assert_map(path)
    qemu_io(path, "write -P 0xab 0 64k")
    assert_check(path)
    assert_map(path)
    raw = create(tmp_path / "dfr.qcow2", "64M",
                 "data_file=%s,data_file_raw=on" % (tmp_path / "d2.raw"))
    assert_info(raw)
    assert_check(raw)
    meta = create(tmp_path / "dfm.qcow2", "64M",
                  "data_file=%s,preallocation=metadata" % (tmp_path / "d3.raw"))
    assert_info(meta)
    assert_check(meta)
    state = inspector.allocation_state(meta)
    assert state["preallocation"] == "metadata"
    assert "data file" in state["method"]
    assert inspector.allocation_state(path)["preallocation"] == "off"


def test_image_api(tmp_path):
    path = create(tmp_path / "a.qcow2", "64M", "preallocation=metadata")
    with inspector.Image.open(path) as img:
        assert img.cluster_size == CS
        assert img.virtual_size == 64 << 20
        assert img.backing_file is None and img.data_file is None
        assert img.file_size == os.path.getsize(path)
        assert img.header.l1_size == 1
        entry = img.l1_entry(0)
        assert entry >> 63 == 1
        table = img.read_l2(entry & ((1 << 56) - 512))
        runs = img.l2_runs(table)
        assert runs == [(0, 1024, entry & ~(CS - 1) and runs[0][2], 0), (1024, 7168, 0, 0)]
        assert runs[0][2] >> 63 == 1
        assert len(img.l2_entries_of(table)) == CS // 8
        assert inspector.info(path, image=img)["virtual-size"] == 64 << 20
        assert inspector.check(path, image=img)["allocated-clusters"] == 1024
    with open(path, "rb") as f:
        img = inspector.Image(f, os.path.getsize(path), path=path)
        assert inspector.check(path, image=img)["check-errors"] == 0
    data = open(path, "rb").read(4 * CS)
    img = inspector.Image(io.BytesIO(data), os.path.getsize(path))
    assert img.refcount(0) == 1
    assert inspector.info("x", image=img)["cluster-size"] == CS


# ---- corruption --------------------------------------------------------------------------


def _base(path):
    """64 MiB image: 0 header, 1 reftable, 2 refblock, 3 L1, 4 L2, 5-6 data."""
    create(path, "64M")
    qemu_io(path, "write -P 0xab 0 64k", "write -P 1 1M 64k")
    return str(path)


def _rd(path, off, fmt):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _wr(path, off, fmt, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


L2 = 4 * CS
COPIED = 1 << 63

CORRUPTIONS = {
    "l2_copied": lambda p: _wr(p, L2, ">Q", _rd(p, L2, ">Q") & ~COPIED),
    "l1_copied": lambda p: _wr(p, 3 * CS, ">Q", _rd(p, 3 * CS, ">Q") & ~COPIED),
    "bump_refcount": lambda p: _wr(p, 2 * CS + 5 * 2, ">H", 2),
    "leak": lambda p: _wr(p, 2 * CS + 3 * 2, ">H", 2),
    "zero_l2_refcount": lambda p: _wr(p, 2 * CS + 4 * 2, ">H", 0),
    "l2_past_eof": lambda p: _wr(p, L2 + 8 * 5, ">Q", COPIED | (100 * CS)),
    "l2_reserved": lambda p: _wr(p, L2, ">Q", _rd(p, L2, ">Q") | (1 << 56)),
    "l1_reserved": lambda p: _wr(p, 3 * CS, ">Q", _rd(p, 3 * CS, ">Q") | (1 << 57)),
    "l2_unaligned": lambda p: _wr(p, L2, ">Q", _rd(p, L2, ">Q") + 2048),
    "compressed_copied": lambda p: _wr(p, L2 + 8 * 7, ">Q", COPIED | (1 << 62) | (5 * CS)),
    "reftable_reserved": lambda p: _wr(p, CS + 8, ">Q", 3 * CS | 1),
    "refblock_outside": lambda p: _wr(p, CS + 8, ">Q", 200 * CS),
    "double_reference": lambda p: _wr(p, L2 + 8 * 3, ">Q", _rd(p, L2, ">Q")),
    "zero_alloc": lambda p: _wr(p, L2, ">Q", _rd(p, L2, ">Q") | 1),
    "l2_on_header": lambda p: _wr(p, 3 * CS + 8, ">Q", COPIED),
    "unknown_incompat": lambda p: _wr(p, 72, ">Q", 1 << 20),
    "huge_l1_size": lambda p: _wr(p, 36, ">I", 0x7FFFFFFF),
    "l1_too_small": lambda p: _wr(p, 36, ">I", 0),
    "reftable_past_eof": lambda p: _wr(p, 48, ">Q", 1000 * CS),
    "reftable_zero_clusters": lambda p: _wr(p, 56, ">I", 0),
    "reftable_too_large": lambda p: _wr(p, 56, ">I", 1000),
    "extension_too_long": lambda p: _wr(p, 116, ">I", 70000),
    "cluster_bits": lambda p: _wr(p, 20, ">I", 22),
    "cluster_bits_low": lambda p: _wr(p, 20, ">I", 8),
    "refcount_order": lambda p: _wr(p, 96, ">I", 7),
    "l1_unaligned": lambda p: _wr(p, 40, ">Q", 3 * CS + 512),
    "l1_on_header": lambda p: _wr(p, 40, ">Q", 0),
    "version": lambda p: _wr(p, 4, ">I", 4),
    "compression_bit_missing": lambda p: _wr(p, 104, ">B", 1),
    "compression_bit_extra": lambda p: _wr(p, 72, ">Q", 1 << 3),
    "crypt_method": lambda p: _wr(p, 32, ">I", 5),
    "snapshots": lambda p: _wr(p, 60, ">I", 70000),
    "extl2_small_cluster": None,
    "raw_zeros": None,
    "empty": None,
    "ten_bytes": None,
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption(tmp_path, name):
    path = str(tmp_path / (name + ".qcow2"))
    if name == "raw_zeros":
        with open(path, "wb") as f:
            f.write(bytes(1 << 20))
    elif name == "empty":
        open(path, "wb").close()
    elif name == "ten_bytes":
        with open(path, "wb") as f:
            f.write(b"QFI\xfb\0\0\0\3\0\0")
    elif name == "extl2_small_cluster":
        create(path, "16M", "cluster_size=4096")
        _wr(path, 72, ">Q", 1 << 4)
    else:
        _base(path)
        CORRUPTIONS[name](path)
    theirs = qemu_json("check", path)
    # QEMU opens these for checking; the inspector refuses them when opening (by design).
    stricter = ("reftable_past_eof", "reftable_zero_clusters", "l1_on_header")
    if theirs is None or name in stricter:
        with pytest.raises(Qcow2Error) as err:
            inspector.check(path)
        assert err.value.message
        if name in ("raw_zeros", "empty", "ten_bytes"):
            assert "not a qcow2 image" in str(err.value)
        for func in (inspector.info, inspector.block_map, inspector.allocation_state,
                     inspector.Image.open):
            with pytest.raises(Qcow2Error):
                func(path)
        return
    ours = inspector.check(path)
    messages = ours.pop("messages")
    assert ours == theirs
    if ours.get("corruptions") or ours.get("leaks"):
        assert messages
    if name == "l2_copied":
        assert any("OFLAG_COPIED" in m for m in messages)
    if name == "l2_past_eof":
        assert any("exceeding the end of the file" in m for m in messages)


def test_named_unknown_feature(tmp_path):
    path = _base(tmp_path / "f.qcow2")
    # Rename the feature table record of incompatible bit 4 to an unknown bit 5 named "foo".
    record = 112 + 8 + 4 * 48
    assert _rd(path, record, ">B") == 0 and _rd(path, record + 1, ">B") == 4
    with open(path, "r+b") as f:
        f.seek(record)
        f.write(struct.pack(">BB46s", 0, 5, b"foo"))
    _wr(path, 72, ">Q", 1 << 5)
    with pytest.raises(Qcow2Error) as err:
        inspector.Image.open(path)
    assert "unsupported qcow2 feature(s): foo" in str(err.value)
    _wr(path, 72, ">Q", (1 << 5) | (1 << 9))
    with pytest.raises(Qcow2Error) as err:
        inspector.info(path)
    assert "foo" in str(err.value) and "unknown incompatible feature bit 9" in str(err.value)


def test_refcount_overflow(tmp_path):
    """More references than a 1-bit refcount can hold."""
    path = create(tmp_path / "o.qcow2", "16M", "refcount_bits=1")
    qemu_io(path, "write -P 1 0 64k")
    l1 = _rd(path, 40, ">Q")
    l2 = _rd(path, l1, ">Q") & ((1 << 56) - 512)
    _wr(path, l2 + 8, ">Q", _rd(path, l2, ">Q"))
    assert_check(path)


# ---- fuzzing ------------------------------------------------------------------------------


def _fuzz_base():
    directory = tempfile.mkdtemp(prefix="inspector-fuzz-")
    path = os.path.join(directory, "base.qcow2")
    create(path, "4M", "cluster_size=4096")
    qemu_io(path, "write -P 0xab 0 64k", "write -P 1 1M 4k", "write -z 2M 4k")
    with open(path, "rb") as f:
        data = f.read()
    shutil.rmtree(directory)
    return data


_FUZZ = {}


def _exercise(path):
    funcs = (inspector.Image.open, inspector.info, inspector.check, inspector.block_map,
             inspector.allocation_state)
    for number, func in enumerate(funcs):
        start = time.time()
        try:
            result = func(path)
        except Qcow2Error as exc:
            assert exc.message
            continue
        finally:
            assert time.time() - start < 2.0
        if number == 0:
            result.close()
        else:
            assert isinstance(result, (dict, list))


if given is not None:
    @settings(max_examples=200, deadline=4000, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.integers(0, 8 * 4096 - 1), st.integers(0, 255)),
                    min_size=1, max_size=12),
           st.booleans())
    def test_fuzz_mutations(mutations, table_clusters):
        if "data" not in _FUZZ:
            _FUZZ["data"] = _fuzz_base()
        data = bytearray(_FUZZ["data"])
        for pos, value in mutations:
            if not table_clusters:
                pos %= min(len(data), 4096)   # the header cluster
            if pos < len(data):
                data[pos] = value
        with tempfile.NamedTemporaryFile(suffix=".qcow2") as f:
            f.write(data)
            f.flush()
            _exercise(f.name)


def test_python39(tmp_path):
    py39 = "/root/.pyenv/versions/3.9.18/bin/python3.9"
    if not os.path.exists(py39):
        pytest.skip("python3.9 not installed")
    path = create(tmp_path / "p.qcow2", "64M", "preallocation=metadata")
    qemu_io(path, "write -P 1 0 64k")
    script = (
        "import sys, json; sys.path.insert(0, %r)\n"
        "from qcow2.read import inspector as I\n"
        "p = %r\n"
        "print(json.dumps([I.info(p), I.check(p), I.block_map(p), I.allocation_state(p)]))\n"
        % (os.path.abspath(_MODULE_UTILS), path))
    res = run(py39, "-c", script)
    assert res.returncode == 0, res.stderr
    info, chk, bmap, state = json.loads(res.stdout)
    chk.pop("messages")
    assert chk == qemu_json("check", path)
    assert bmap == qemu_json("map", path)
    assert state["preallocation"] == "metadata" and state["guest_data"] is True
