# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""qemu-img as the oracle: run it, parse its JSON, compare meanings. Tests only."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
ENGINE = os.path.join(ROOT, "plugins", "module_utils")
if ENGINE not in sys.path:
    sys.path.insert(0, ENGINE)

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

# Counters the terminal summary prints (see conftest.py).
COUNTS = {"off byte-compared": 0, "modes checked by qemu-img": 0, "refusals compared": 0,
          "grow cases": 0, "prealloc raises": 0}


def unavailable(tag, reason, what="these tests"):
    """A tool or device the test needs is missing: print why, fail under CI (which must run
    every test), skip elsewhere."""
    import pytest
    sys.stderr.write("\n[%s] %s\n" % (tag, reason))
    if os.environ.get("CI"):
        pytest.fail("%s; CI must run %s" % (reason, what), pytrace=False)
    pytest.skip(reason)


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, check=False, **kwargs)


def option_string(opts):
    parts = []
    for key, value in opts.items():
        if key == "size" or value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append("%s=%s" % (key, str(value).replace(",", ",,")))
    return ",".join(parts)


LUKS_ATTEMPTS = 10
_LUKS_MADE = {}
_LUKS_DIR = []


def qemu_luks(path, size="1M", secret="abc", fmt="qcow2", options=""):
    """A LUKS-encrypted image made by qemu-img (a qcow2 with `fmt` qcow2, a bare LUKS volume
    with `fmt` luks), copied to `path`; asserts it was made.

    qemu-img calibrates its key derivation for every new image (about 2.5 s of CPU here,
    whatever encrypt.iter-time says), so each kind is made once per test session and copied.
    The calibration sometimes fails on a busy machine ("Unable to get accurate CPU usage": its
    CPU clock saw no time pass): tried up to ten times, as the two lanes of scripts/test.sh
    keep both cores busy."""
    key = (size, secret, fmt, options)
    if key not in _LUKS_MADE:
        made = os.path.join(_luks_dir(), "%d.%s" % (len(_LUKS_MADE), fmt))
        opts = "key-secret=sec0,iter-time=10"
        if fmt == "qcow2":
            opts = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
        proc = None
        for _attempt in range(LUKS_ATTEMPTS):
            proc = run(QEMU_IMG, "create", "-q", "--object", "secret,id=sec0,data=" + secret,
                       "-f", fmt, "-o", opts + ("," + options if options else ""), made, size)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            raise AssertionError(proc.stderr)
        _LUKS_MADE[key] = made
    shutil.copyfile(_LUKS_MADE[key], path)


def needs_luks_tools():
    """The LUKS key-slot tests need the cryptography package and qemu-io: fail under CI
    without them, skip elsewhere (see unavailable)."""
    import importlib.util
    if importlib.util.find_spec("cryptography") is None:
        unavailable("luks", "the Python package cryptography is not installed "
                    "(scripts/setup-debian.sh installs it into .venv-test)")
    if QEMU_IO is None:
        unavailable("luks", "qemu-io is not installed")


def _luks_dir():
    """One temporary directory for the session's LUKS images, removed at exit."""
    if not _LUKS_DIR:
        import atexit
        import tempfile
        _LUKS_DIR.append(tempfile.mkdtemp(prefix="vdq-luks-"))
        atexit.register(shutil.rmtree, _LUKS_DIR[0], True)
    return _LUKS_DIR[0]


def qemu_create(path, opts, cwd=None):
    """qemu-img create with the same options; returns the CompletedProcess."""
    cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    ostr = option_string(opts)
    if ostr:
        cmd += ["-o", ostr]
    cmd.append(path)
    if opts.get("size") is not None:
        cmd.append(str(opts["size"]))
    return run(*cmd, cwd=cwd)


def qemu_json(cmd, path, cwd=None):
    proc = run(QEMU_IMG, cmd, "--output=json", path, cwd=cwd)
    data = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, data, proc.stderr


def qemu_info(path, cwd=None):
    code, data, err = qemu_json("info", path, cwd)
    assert code == 0, err
    data.pop("actual-size", None)
    return data


def qemu_check(path, cwd=None):
    return qemu_json("check", path, cwd)


def map_meaning(entries, zero_dont_care=False):
    """Merge a map into runs of equal (present, zero, data), dropping host offsets."""
    runs = []
    for e in entries:
        key = (e["depth"], e["present"], True if zero_dont_care else e["zero"], e["data"])
        if runs and runs[-1][2] == key and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1][1] += e["length"]
        else:
            runs.append([e["start"], e["length"], key])
    return runs


def qemu_map(path, cwd=None):
    code, data, err = qemu_json("map", path, cwd)
    assert code == 0, err
    return data


def assert_clean(path, cwd=None):
    code, data, err = qemu_check(path, cwd)
    assert code == 0, "qemu-img check failed (%d): %s %s" % (code, data, err)
    assert not data.get("corruptions") and not data.get("leaks"), data
    return data
