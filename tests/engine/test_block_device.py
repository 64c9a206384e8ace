# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A loop block device as the image: create, raise in place and grow, judged by qemu-img.

A block device has no zero-initialisation and no holes. Every test fills its device with 0xff
first, so a byte the engine should have written (a table, a zero flag, zeros in a data cluster)
and did not shows up as 0xff in what the guest reads. The guest's view is what
`qemu-img convert -f qcow2 -O raw` produces; qemu tools always get `-f qcow2` here (probing a
device is not what a user does).

The loop devices need root and /dev/loop-control: without them these tests are skipped with
the reason, except in CI (CI set), where they fail.
"""

import hashlib
import json
import os
import shutil
import sys

import pytest

import oracle
from oracle import run

from qcow2 import api
from qcow2.format import constants as C
from qcow2.format.errors import Qcow2Error

MiB = 1 << 20
DEVICE_SIZE = 64 * MiB
IMAGE_SIZE = 16 * MiB
GROWN_SIZE = 24 * MiB
MODES = C.PREALLOC_MODES
# Guest writes made through qemu-io before an in-place change: a whole 64 KiB range and a small
# one that leaves the rest of its cluster (64 KiB clusters) to read zeros.
GUEST_WRITES = ((0x5a, 1 * MiB, 64 * 1024), (0xa5, 13 * MiB + 512, 3072))


# ---------------------------------------------------------------- the device

def _unavailable(reason):
    oracle.unavailable("block-device", "no loop block device: %s" % reason,
                       "the block-device tests (as root, with /dev/loop-control)")


def _fill(dev, byte):
    chunk = byte * MiB
    fd = os.open(dev, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for offset in range(0, DEVICE_SIZE, MiB):
            os.pwrite(fd, chunk, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def device(tmp_path, request, qemu_img, qemu_io):
    """A 64 MiB loop device over a file in tmp_path, filled with 0xff; detached afterwards."""
    losetup = shutil.which("losetup")
    if losetup is None:
        _unavailable("losetup is not installed (util-linux)")
    if os.geteuid() != 0:
        _unavailable("attaching a loop device needs root (CI runs as root)")
    backing = tmp_path / "device.img"
    with open(str(backing), "wb") as handle:
        handle.truncate(DEVICE_SIZE)
    proc = run(losetup, "--find", "--show", str(backing))
    dev = proc.stdout.strip()
    if proc.returncode != 0 or not dev:
        _unavailable("'losetup --find --show %s' failed (exit %d): %s"
                     % (backing, proc.returncode, proc.stderr.strip()))

    def detach():
        done = run(losetup, "-d", dev)
        assert done.returncode == 0, "losetup -d %s failed: %s" % (dev, done.stderr)

    request.addfinalizer(detach)
    _fill(dev, b"\xff")
    return dev


# ---------------------------------------------------------------- oracles

def _digest(dev):
    digest = hashlib.sha256()
    with open(dev, "rb") as handle:
        for block in iter(lambda: handle.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def _qemu_io(dev, command):
    proc = run(oracle.QEMU_IO, "-f", "qcow2", "-c", command, dev)
    assert proc.returncode == 0 and "failed" not in proc.stdout, (command, proc.stdout,
                                                                  proc.stderr)


def _assert_check_clean(dev):
    proc = run(oracle.QEMU_IMG, "check", "-f", "qcow2", "--output=json", dev)
    data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    assert proc.returncode == 0 and not data.get("corruptions") and not data.get("leaks"), \
        "qemu-img check on %s (exit %d): %s %s" % (dev, proc.returncode, data, proc.stderr)


def _virtual_size(dev):
    proc = run(oracle.QEMU_IMG, "info", "-f", "qcow2", "--output=json", dev)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["virtual-size"]


def _guest_view(dev, tmp_path):
    out = tmp_path / "view.raw"
    proc = run(oracle.QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", dev, str(out))
    assert proc.returncode == 0, proc.stderr
    with open(str(out), "rb") as handle:
        data = handle.read()
    os.unlink(str(out))
    return data


def _describe_difference(expected, actual):
    """Where two guest views first differ, for assertion messages (never the whole bytes)."""
    if len(expected) != len(actual):
        return "length %d, expected %d" % (len(actual), len(expected))
    for offset in range(0, len(expected), MiB):
        if expected[offset:offset + MiB] != actual[offset:offset + MiB]:
            for k in range(offset, min(offset + MiB, len(expected))):
                if expected[k] != actual[k]:
                    return "first difference at byte %d: %#04x, expected %#04x (%d bytes of 0xff " \
                           "garbage in the view)" % (k, actual[k], expected[k],
                                                     actual.count(b"\xff"))
    return "no difference"


def _assert_view(actual, expected, what):
    same = actual == expected  # compared outside the assert: no 16 MiB assertion diff
    assert same, "%s changed the guest view: %s" % (what, _describe_difference(expected, actual))


def _written_view(size):
    """The view GUEST_WRITES leave on an image that read zeros before."""
    view = bytearray(size)
    for pattern, offset, length in GUEST_WRITES:
        view[offset:offset + length] = bytes([pattern]) * length
    return bytes(view)


def _make_used(dev, tmp_path, values):
    """Create an image on the device, write GUEST_WRITES through qemu-io; returns the view."""
    api.create(dev, values, replace=True)
    for pattern, offset, length in GUEST_WRITES:
        _qemu_io(dev, "write -P %d %d %d" % (pattern, offset, length))
    view = _guest_view(dev, tmp_path)
    _assert_view(view, _written_view(values["size"]), "create + guest writes (harness check)")
    return view


def _level(dev):
    observed = api.observe(dev)
    assert observed and observed.get("qcow2"), observed
    return observed["preallocation"]


# ---------------------------------------------------------------- create

@pytest.mark.parametrize("cluster_size", [65536, 512])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("mode", MODES)
def test_create_over_a_dirty_device_reads_zeros(device, tmp_path, mode, compat, cluster_size):
    before = _digest(device)
    values = {"size": IMAGE_SIZE, "preallocation": mode, "compat": compat,
              "cluster_size": cluster_size}
    try:
        api.create(device, values, replace=True)
    except Qcow2Error as exc:
        # compat 0.10 has no zero flag: a preallocated image over bytes that are not zeros
        # can only be refused (or have its data written). A refusal must name the reason
        # and write nothing.
        assert compat == "0.10" and mode == "metadata", "create %s refused: %s" % (values, exc)
        assert "compat" in str(exc), "refusal does not say why: %s" % exc
        assert _digest(device) == before, "a refused create wrote to the device"
        sys.stdout.write("\n[block-device] create %s refused: %s\n" % (values, exc))
        return
    _assert_check_clean(device)
    assert _virtual_size(device) == IMAGE_SIZE
    _assert_view(_guest_view(device, tmp_path), bytes(IMAGE_SIZE), "create %s" % mode)
    level = _level(device)
    if mode == "off":
        assert level == "off", "observe() reports %r for an image created with off" % level
    else:
        # Every block of a device exists: a fully mapped image there is at the top level,
        # so a declared falloc or full is met on the next run (no raise planned again).
        assert level == "full", "observe() reports %r for an image created with %s" \
            % (level, mode)


# ---------------------------------------------------------------- raise in place

@pytest.mark.parametrize("cluster_size", [65536, 512])
@pytest.mark.parametrize("target", ["metadata", "falloc", "full"])
def test_raise_in_place_keeps_the_guest_view(device, tmp_path, target, cluster_size):
    before = _make_used(device, tmp_path, {"size": IMAGE_SIZE, "preallocation": "off",
                                           "cluster_size": cluster_size})
    api.raise_preallocation(device, "off", target)
    _assert_view(_guest_view(device, tmp_path), before, "raise off -> %s" % target)
    _assert_check_clean(device)
    level = _level(device)
    assert MODES.index(level) >= MODES.index(target), \
        "observe() reports %r after raising to %s" % (level, target)


# ---------------------------------------------------------------- grow

@pytest.mark.parametrize("cluster_size", [65536, 512])
@pytest.mark.parametrize("mode", MODES)
def test_grow_on_a_device_with_room(device, tmp_path, mode, cluster_size):
    before = _make_used(device, tmp_path, {"size": IMAGE_SIZE, "preallocation": mode,
                                           "cluster_size": cluster_size})
    digest = _digest(device)
    try:
        api.grow(device, GROWN_SIZE, mode)
    except (Qcow2Error, OSError) as exc:
        unchanged = _digest(device) == digest
        # The device holds 64 MiB: the only honest reason to refuse is that it is a device.
        said_why = isinstance(exc, Qcow2Error) and "device" in str(exc).lower()
        assert unchanged and said_why, "grow to %d (%s) failed with %r; the device was %s" \
            % (GROWN_SIZE, mode, exc, "left unchanged" if unchanged else "MODIFIED")
        sys.stdout.write("\n[block-device] grow %s refused: %s\n" % (mode, exc))
        return
    _assert_check_clean(device)
    assert _virtual_size(device) == GROWN_SIZE
    after = _guest_view(device, tmp_path)
    _assert_view(after, before + bytes(GROWN_SIZE - IMAGE_SIZE), "grow (%s)" % mode)
    if mode != "off":
        level = _level(device)
        assert level != "off", "observe() reports %r after a grow with %s" % (level, mode)
