# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Kills during the creation and the growth of encrypted images (the injection of
test_faults: the engine in a child that SIGKILLs itself before its k-th write, fsync, rename
or fallocate). Judged by QEMU given the key: after any kill the path holds the old file or the
new encrypted image (create), or an image qemu-img check finds no corruption in whose guest
reads the old view or the grown one (grow); the next run converges."""

import hashlib
import json
import os
import random
import signal

import pytest

from test_faults import FULL, _print_summary, child, count_calls, record, run, sha256  # noqa: F401 pylint: disable=unused-import

TRIALS = 40 if FULL else 8
KEY = "kill campaign"
MiB = 1 << 20


def _key_opts(path):
    return ["--object", "secret,id=s0,data=" + KEY, "--image-opts",
            "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % path]


def _checked(path, where):
    proc = run(*(["qemu-img", "check", "--output=json"] + _key_opts(path)))
    data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode not in (0, 3) or data.get("corruptions") or data.get("check-errors"):
        pytest.fail("%s: qemu-img check (with the key) exit %d: %s %s"
                    % (where, proc.returncode, data, proc.stderr))
    return data


def _view(path):
    """(virtual size, sha256) of what the guest reads, through QEMU with the key."""
    out = path + ".view.raw"
    proc = run(*(["qemu-img", "convert", "-O", "raw"] + _key_opts(path) + [out]))
    try:
        assert proc.returncode == 0, proc.stderr
        return os.path.getsize(out), sha256(out)
    finally:
        if os.path.exists(out):
            os.unlink(out)


def _io(path, *commands):
    args = ["qemu-io"] + _key_opts(path)
    for command in commands:
        args += ["-c", command]
    proc = run(*args)
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr


def _zeros_digest(size, prefix_path=None):
    digest = hashlib.sha256()
    if prefix_path:
        with open(prefix_path, "rb") as handle:
            data = handle.read()
        digest.update(data)
        size -= len(data)
    digest.update(bytes(size))
    return digest.hexdigest()


@pytest.mark.parametrize("mode", ["metadata", "full"])
def test_kill_during_encrypted_create_leaves_old_or_new(tmp_path, mode):
    from qcow2 import api
    path = str(tmp_path / "img.qcow2")
    arg = {"size": "24M", "preallocation": mode, "passphrase": KEY}

    def old_image():
        if os.path.exists(path):
            os.unlink(path)
        api.create(path, {"size": "8M"})
        return sha256(path)
    old = old_image()
    total = count_calls("create", path, dict(arg))
    rng = random.Random("encrypted-create-" + mode)
    zeros = _zeros_digest(24 * MiB)
    for trial in range(TRIALS):
        assert old_image() == old
        kill_at = rng.randint(1, total)
        where = "trial %d (kill at call %d of %d)" % (trial, kill_at, total)
        proc = child(kill_at, "create", path, dict(arg))
        assert proc.returncode == -signal.SIGKILL, (where, proc.stderr)
        if sha256(path) == old:
            record("encrypted create/" + mode, "old")
        else:
            _checked(path, where)
            if _view(path) != (24 * MiB, zeros):
                record("encrypted create/" + mode, "lost")
                pytest.fail("%s: a new encrypted image that does not read zeros" % where)
            record("encrypted create/" + mode, "new")
        proc = child(0, "create", path, dict(arg))
        assert proc.returncode == 0, (where, proc.stderr)
        assert _view(path) == (24 * MiB, zeros)
        assert [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")] == []


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An 8 MiB encrypted image made by qemu-img, once: its key derivation calibration takes
    seconds and sometimes fails on a busy machine ("Unable to get accurate CPU usage"), so it
    is tried up to ten times."""
    path = str(tmp_path_factory.mktemp("qemu-made") / "made.qcow2")
    proc = None
    for _attempt in range(10):
        proc = run("qemu-img", "create", "-q", "-f", "qcow2", "--object",
                   "secret,id=s0,data=" + KEY, "-o",
                   "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                   path, "8M")
        if proc.returncode == 0:
            return path
    raise AssertionError(proc.stderr)


@pytest.mark.parametrize("mode", ["off", "metadata", "full"])
def test_kill_during_encrypted_grow_keeps_the_guest_view(tmp_path, mode, made):
    original = str(tmp_path / "used.qcow2")
    proc = run("cp", made, original)
    assert proc.returncode == 0, proc.stderr
    _io(original, "write -P 0x11 0 1M", "write -P 0x22 5M 64k", "discard 0 256k")
    raw = str(tmp_path / "old.raw")
    proc = run(*(["qemu-img", "convert", "-O", "raw"] + _key_opts(original) + [raw]))
    assert proc.returncode == 0, proc.stderr
    views = {8 * MiB: sha256(raw), 16 * MiB: _zeros_digest(16 * MiB, raw)}
    path = original + ".work"
    arg = {"size": 16 * MiB, "mode": mode, "passphrase": KEY}

    def restore():
        proc = run("cp", "--sparse=always", original, path)
        assert proc.returncode == 0, proc.stderr
    restore()
    total = count_calls("grow", path, dict(arg))
    rng = random.Random("encrypted-grow-" + mode)
    for trial in range(TRIALS):
        restore()
        kill_at = rng.randint(1, total)
        where = "trial %d (kill at call %d of %d)" % (trial, kill_at, total)
        proc = child(kill_at, "grow", path, dict(arg))
        assert proc.returncode == -signal.SIGKILL, (where, proc.stderr)
        _checked(path, where)
        size, digest = _view(path)
        if views.get(size) != digest:
            record("encrypted grow/" + mode, "lost")
            pytest.fail("%s: the guest reads a third view (virtual size %d)" % (where, size))
        record("encrypted grow/" + mode, "new" if size == 16 * MiB else "old")
        proc = child(0, "reclaim", path, {"passphrase": KEY})
        assert proc.returncode == 0, (where, proc.stderr)
        assert _view(path) == (size, digest), where
        proc = child(0, "grow", path, dict(arg))
        assert proc.returncode == 0, (where, proc.stderr)
        data = _checked(path, where + ", after the next run")
        assert not data.get("leaks"), (where, data)
        assert _view(path) == (16 * MiB, views[16 * MiB]), where
