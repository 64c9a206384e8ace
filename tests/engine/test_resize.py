# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Grow in place and raise preallocation in place, judged by qemu-img and qemu-io."""

import os

import pytest

import oracle
from oracle import COUNTS, assert_clean, qemu_create, qemu_info, qemu_map, run

from qcow2 import api
from qcow2.read import inspector
from qcow2.format.errors import Qcow2Error

pytestmark = pytest.mark.skipif(oracle.QEMU_IMG is None and not os.environ.get("CI"),
                                reason="qemu-img not installed (CI installs it)")

MiB = 1 << 20
GiB = 1 << 30


def _make(path, maker, opts):
    if maker == "ours":
        api.create(str(path), opts)
    else:
        proc = qemu_create(str(path), opts)
        assert proc.returncode == 0, proc.stderr


def _write(path, pattern, offset, length):
    proc = run(oracle.QEMU_IO, "-c", "write -P %d %d %d" % (pattern, offset, length), str(path))
    assert proc.returncode == 0, proc.stderr


def _verify(path, pattern, offset, length):
    proc = run(oracle.QEMU_IO, "-c", "read -P %d %d %d" % (pattern, offset, length), str(path))
    assert "Pattern verification failed" not in proc.stdout, proc.stdout
    assert proc.returncode == 0, proc.stderr


def _grow_cases():
    cases = []
    for maker in ("ours", "qemu"):
        for mode in ("off", "metadata", "falloc", "full"):
            for cs, rb in ((512, 1), (512, 64), (65536, 16), (65536, 64), (2 * MiB, 16)):
                for old, new in ((0, MiB), (100352, 64 * MiB),
                                 (MiB, (40 if cs == 512 else 1100) * MiB)):
                    if mode == "full" and new > 100 * MiB and cs != 65536:
                        continue
                    cases.append((maker, mode, cs, rb, old, new))
    return cases


@pytest.mark.parametrize("maker,mode,cs,rb,old,new", _grow_cases())
def test_grow_keeps_data_and_passes_check(tmp_path, maker, mode, cs, rb, old, new):
    path = tmp_path / "g.qcow2"
    _make(path, maker, {"size": old, "cluster_size": cs, "refcount_bits": rb,
                        "preallocation": mode})
    if old:
        _write(path, 0xAB, 0, 512)
    result = api.grow(str(path), new, mode)
    assert result["changed"] is True
    assert_clean(str(path))
    assert qemu_info(str(path))["virtual-size"] == new
    if old:
        _verify(path, 0xAB, 0, 512)
    state = inspector.allocation_state(str(path))
    if mode != "off":
        # The grown range is preallocated like the rest of the image.
        assert [e for e in qemu_map(str(path)) if e["start"] >= old and not e["present"]] == []
        assert state["preallocation"] in ("metadata", "falloc", "full")
        if maker == "ours" or mode != "metadata":
            assert oracle.map_meaning(qemu_map(str(path)))[-1][2][1] is True
    assert state["preallocation"] == mode or (mode == "falloc" and state["preallocation"] == "full")
    # The grown image can be grown again and written at its end.
    api.grow(str(path), new + 3 * cs, mode)
    _write(path, 0xCD, new + 2 * cs, 512)
    _verify(path, 0xCD, new + 2 * cs, 512)
    assert_clean(str(path))
    COUNTS["grow cases"] += 1


def test_grow_refuses_shrink_and_keeps_file(tmp_path):
    path = tmp_path / "s.qcow2"
    api.create(str(path), {"size": "64M"})
    before = path.read_bytes()
    with pytest.raises(Qcow2Error) as err:
        api.grow(str(path), 32 * MiB)
    assert err.value.option == "size"
    assert path.read_bytes() == before


def test_grow_same_size_is_no_change(tmp_path):
    path = tmp_path / "n.qcow2"
    api.create(str(path), {"size": "64M"})
    before = path.read_bytes()
    assert api.grow(str(path), 64 * MiB)["changed"] is False
    assert path.read_bytes() == before


def test_grow_relocates_a_full_l1_table(tmp_path):
    # 512-byte clusters: 64 L1 entries per cluster; growing past that moves the L1.
    path = tmp_path / "l1.qcow2"
    api.create(str(path), {"size": "1M", "cluster_size": 512})
    _write(path, 0x5A, 4096, 4096)
    api.grow(str(path), 2 * GiB)
    assert_clean(str(path))
    _verify(path, 0x5A, 4096, 4096)
    assert qemu_info(str(path))["virtual-size"] == 2 * GiB


def test_grow_image_with_external_data_file(tmp_path):
    path = tmp_path / "d.qcow2"
    # QEMU opens a relative data file name against its working directory: use an absolute one.
    api.create(str(path), {"size": "16M", "data_file": str(tmp_path / "d.raw"),
                           "preallocation": "metadata"})
    _write(path, 0x11, 0, 4096)
    api.grow(str(path), 48 * MiB, "metadata")
    assert (tmp_path / "d.raw").stat().st_size == 48 * MiB
    assert_clean(str(path))
    _verify(path, 0x11, 0, 4096)


@pytest.mark.parametrize("maker", ["ours", "qemu"])
@pytest.mark.parametrize("start,target", [("metadata", "falloc"), ("metadata", "full"),
                                          ("falloc", "full"), ("off", "metadata"),
                                          ("off", "falloc"), ("off", "full")])
def test_raise_preallocation_in_place(tmp_path, maker, start, target):
    path = tmp_path / "r.qcow2"
    size = 96 * MiB
    _make(path, maker, {"size": size, "preallocation": start})
    _write(path, 0x77, MiB, 64 * 1024)
    _write(path, 0x78, 50 * MiB + 512, 4096)
    before = inspector.allocation_state(str(path))
    result = api.raise_preallocation(str(path), before["preallocation"], target)
    assert result["changed"] is True
    assert_clean(str(path))
    _verify(path, 0x77, MiB, 64 * 1024)
    _verify(path, 0x78, 50 * MiB + 512, 4096)
    after = inspector.allocation_state(str(path))
    assert after["preallocation"] == target
    assert after["guest_data"] is True
    if target in ("falloc", "full"):
        assert path.stat().st_blocks * 512 >= size
    COUNTS["prealloc raises"] += 1


def test_raise_never_writes_over_guest_data(tmp_path):
    path = tmp_path / "keep.qcow2"
    api.create(str(path), {"size": "32M", "preallocation": "falloc"})
    _write(path, 0xEE, 0, 32 * MiB)
    api.raise_preallocation(str(path), "falloc", "full")
    _verify(path, 0xEE, 0, 32 * MiB)
    assert inspector.allocation_state(str(path))["preallocation"] == "full"


def test_modifying_an_image_qemu_holds_is_refused(tmp_path):
    import subprocess
    import time
    path = tmp_path / "busy.qcow2"
    api.create(str(path), {"size": "64M"})
    holder = subprocess.Popen([oracle.QEMU_IO, "-c", "sleep 30000", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from qcow2.read import lock
        deadline = time.time() + 10
        while not lock.probe(str(path))["in_use"] and time.time() < deadline:
            time.sleep(0.05)
        before = path.read_bytes()
        with pytest.raises(Qcow2Error, match="in use"):
            api.grow(str(path), 128 * MiB)
        with pytest.raises(Qcow2Error, match="in use"):
            api.raise_preallocation(str(path), "off", "metadata")
        assert path.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("cs", [4096, 65536])
def test_compat_upgrade_and_lazy_refcounts_in_place(tmp_path, cs):
    from qcow2.edit import amend
    path = tmp_path / "v2.qcow2"
    api.create(str(path), {"size": "64M", "compat": "0.10", "cluster_size": cs,
                           "backing_file": "base.qcow2", "backing_fmt": "qcow2"},
               check_backing=False)
    run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "64M")
    _write(path, 0x42, 0, 4096)
    assert amend.upgrade_compat(str(path)) is True
    assert amend.upgrade_compat(str(path)) is False
    info = qemu_info(str(path))
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert amend.set_lazy_refcounts(str(path), True) is True
    assert qemu_info(str(path))["format-specific"]["data"]["lazy-refcounts"] is True
    assert amend.set_lazy_refcounts(str(path), False) is True
    assert qemu_info(str(path))["format-specific"]["data"]["lazy-refcounts"] is False
    assert_clean(str(path))
    _verify(path, 0x42, 0, 4096)
    # qemu-img's own amend gives the same header fields.
    ref = tmp_path / "ref.qcow2"
    qemu_create(str(ref), {"size": "64M", "compat": "0.10", "cluster_size": cs})
    run(oracle.QEMU_IMG, "amend", "-o", "compat=1.1", str(ref))
    mine = inspector.info(str(path))["format-specific"]
    theirs = qemu_info(str(ref))["format-specific"]
    assert mine == theirs
