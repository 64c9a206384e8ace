# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The remembered allocation walk (read/memo.py): used again only while the file is provably
unchanged, never trusted from an entry that is not private to the user or not well formed."""

import json
import os
import time

import pytest

import oracle
from qcow2 import api
from qcow2.read import allocation, memo

GiB = 1 << 30
BIG = 128 * GiB          # 256 L2 tables with 64 KiB clusters: big enough to be remembered


@pytest.fixture
def walks(monkeypatch, tmp_path):
    """Count the allocation walks; entries under tmp_path; the settle rule relaxed (a test
    cannot wait for the kernel's clock) unless a test puts it back."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(memo.ENV, raising=False)
    monkeypatch.setattr(memo, "SETTLED_SECONDS", -1e12)
    counted = []
    real = allocation.allocation_state

    def counting(*args, **kwargs):
        counted.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(allocation, "allocation_state", counting)
    return counted


def entries(tmp_path):
    directory = tmp_path / "cache" / "vdisk.qcow2" / "observations"
    return sorted(directory.iterdir()) if directory.is_dir() else []


def big_image(tmp_path):
    path = str(tmp_path / "big.qcow2")
    api.create(path, {"size": BIG, "preallocation": "metadata"})
    return path


def test_unchanged_file_is_not_walked_again(tmp_path, walks):
    path = big_image(tmp_path)
    first = api.observe(path)
    assert len(walks) == 1 and len(entries(tmp_path)) == 1
    assert oct(entries(tmp_path)[0].stat().st_mode & 0o777) == "0o600"
    second = api.observe(path)
    assert len(walks) == 1 and second == first
    assert second["preallocation"] == "metadata" and second["guest_data"] is False


@pytest.mark.skipif(oracle.QEMU_IO is None and not os.environ.get("CI"),
                    reason="qemu-io not installed (CI installs it)")
def test_any_write_is_seen(tmp_path, walks):
    path = big_image(tmp_path)
    api.observe(path)
    before = os.stat(path)
    proc = oracle.run(oracle.QEMU_IO, "-c", "write -P 0x5a 1G 64k", path)
    assert proc.returncode == 0, proc.stderr
    # Even with the old size and mtime put back, the change time moved: walked again.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = api.observe(path)
    assert len(walks) == 2 and after["guest_data"] is True
    # A discard that unmaps a cluster lowers the level: seen too.
    proc = oracle.run(oracle.QEMU_IO, "-c", "discard 2G 64k", path)
    assert proc.returncode == 0, proc.stderr
    lowered = api.observe(path)
    assert len(walks) == 3
    assert lowered == api.observe(path) and len(walks) == 3
    assert lowered["allocated_clusters"] <= after["allocated_clusters"]


def test_a_file_changed_just_now_is_not_remembered(tmp_path, walks, monkeypatch):
    monkeypatch.setattr(memo, "SETTLED_SECONDS", 2.0)
    path = big_image(tmp_path)
    api.observe(path)
    api.observe(path)
    assert len(walks) == 2 and entries(tmp_path) == []
    # Settled: the last change more than SETTLED_SECONDS before the walk.
    monkeypatch.setattr(time, "time", lambda: os.stat(path).st_ctime + 2.5)
    api.observe(path)
    api.observe(path)
    assert len(walks) == 3


def test_small_images_and_disabled_cache_are_walked(tmp_path, walks, monkeypatch):
    small = str(tmp_path / "small.qcow2")
    api.create(small, {"size": 16 * GiB, "preallocation": "metadata"})
    api.observe(small)
    api.observe(small)
    assert len(walks) == 2 and entries(tmp_path) == []
    monkeypatch.setenv(memo.ENV, "off")
    path = big_image(tmp_path)
    api.observe(path)
    api.observe(path)
    assert len(walks) == 4 and entries(tmp_path) == []


def _tamper(entry, how):
    if how == "world-writable":
        os.chmod(str(entry), 0o666)
    elif how == "foreign":
        os.chown(str(entry), 65534, 65534)
    elif how == "garbage":
        entry.write_bytes(b"\x00not json")
    elif how == "link":
        target = entry.with_suffix(".elsewhere")
        os.rename(str(entry), str(target))
        os.symlink(str(target), str(entry))
    else:
        data = json.loads(entry.read_text())
        if how == "level":
            data["state"]["preallocation"] = "everything"
        elif how == "type":
            data["state"]["guest_data"] = "no"
        elif how == "key":
            data["key"][3] += 1
        entry.write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["world-writable", "foreign", "garbage", "link", "level",
                                 "type", "key"])
def test_a_bad_entry_is_ignored(tmp_path, walks, how):
    if how == "foreign" and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root (CI runs as root)")
    path = big_image(tmp_path)
    api.observe(path)
    _tamper(entries(tmp_path)[0], how)
    again = api.observe(path)
    assert len(walks) == 2 and again["preallocation"] == "metadata"
