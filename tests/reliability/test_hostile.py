# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Hostile files: explicit cases with their messages, and the mutation campaign.

The campaign runs 2000 inputs by default and 100 000 with VDISK_FULL_CAMPAIGN=1
(or directly: python3 tests/reliability/fuzz_campaign.py --inputs 100000 --workers 2).
Time limits are CPU time, so a busy machine (other jobs on the cores) slows the run down but
cannot fail it; the slowest inputs are printed with their CPU and wall-clock times.
"""

import builtins
import json
import os
import struct
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir, "plugins", "module_utils"))

import fuzz_campaign  # noqa: E402
from qcow2 import api, reconcile  # noqa: E402
from qcow2.read import inspector  # noqa: E402
from qcow2.format.errors import Qcow2Error  # noqa: E402

FULL = bool(os.environ.get("VDISK_FULL_CAMPAIGN"))


def test_mutation_campaign():
    inputs = 100000 if FULL else 2000
    totals = fuzz_campaign.campaign(inputs, 2, seed=7)
    slowest = totals.pop("slowest")
    sys.stdout.write("\n[fuzz] %s\n" % totals)
    sys.stdout.write("[fuzz] slowest inputs (limits: %.0f s CPU, %.0f s wall): %s\n" % (
        fuzz_campaign.CPU_LIMIT, fuzz_campaign.WALL_LIMIT,
        ", ".join("#%d %.3f s CPU / %.3f s wall (%s)" % (e["input"], e["cpu_s"], e["wall_s"],
                                                         e["outcome"]) for e in slowest)))
    assert totals["inputs"] == inputs
    assert totals["crash"] == 0 and totals["hang"] == 0 and totals["memory"] == 0, totals
    assert totals["ok"] > 0 and totals["error"] > 0


LIMITS_PROBE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import fuzz_campaign
fuzz_campaign.CPU_LIMIT, fuzz_campaign.WALL_LIMIT = 0.3, 1.5
kinds = iter(sys.argv[3:])
def exercise(path):
    kind = next(kinds)
    if kind == "spin":      # a real hang: burns CPU forever
        while True:
            pass
    if kind == "blocked":   # blocked without using CPU: only the wall-clock backstop stops it
        time.sleep(30)
    time.sleep(0.5)         # "slow": waits, uses no CPU: not a hang
    return "ok"
fuzz_campaign.exercise = exercise
print(json.dumps(fuzz_campaign.worker(([b"seed"], 0, len(sys.argv) - 3, 1, sys.argv[2]))))
"""


def test_campaign_limits_stop_real_hangs(tmp_path):
    """The campaign's limits: a loop that never ends is stopped by the CPU limit, an input
    blocked without using CPU by the wall-clock backstop, and an input that only waits (as on a
    busy machine) is not a hang. Run in a child process: the worker sets rlimits and timers."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", LIMITS_PROBE, HERE, str(tmp_path / "failures"),
                          "spin", "slow", "blocked"],
                         check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout
    totals = json.loads(out)
    assert time.monotonic() - start < 20
    assert (totals["inputs"], totals["hang"], totals["ok"]) == (3, 2, 1), totals
    notes = sorted((tmp_path / "failures" / name).read_text().splitlines()[1]
                   for name in ("input-0.txt", "input-2.txt"))
    assert notes == ["over 0.3 s of CPU time", "over 1.5 s of wall-clock time"], notes
    assert totals["slowest_wall_s"] >= 1.5 and totals["slowest_cpu_s"] < 1.0, totals


def _image(tmp_path, **opts):
    path = str(tmp_path / "h.qcow2")
    opts.setdefault("size", "64M")
    api.create(path, opts, check_backing=False)
    return path


def _poke(path, offset, fmt, value):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(fmt, value))


def _peek(path, offset):
    """The big-endian 64-bit field at `offset` (read alone: the image is mostly holes)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return struct.unpack(">Q", handle.read(8))[0]


def _refused(path, text):
    with pytest.raises(Qcow2Error) as err:
        image = inspector.Image.open(path)
        inspector.check(path, image=image)
    assert text in str(err.value), str(err.value)
    return str(err.value)


CASES = []


def case(func):
    CASES.append(func)
    return func


@case
def l1_table_needing_gigabytes(tmp_path):
    path = _image(tmp_path)
    _poke(path, 36, ">I", 0x7FFFFFFF)
    return _refused(path, "L1")


@case
def refcount_table_needing_gigabytes(tmp_path):
    path = _image(tmp_path)
    _poke(path, 56, ">I", 0x7FFFFFFF)
    return _refused(path, "reference count table")


@case
def l1_offset_past_eof(tmp_path):
    path = _image(tmp_path)
    _poke(path, 40, ">Q", 1 << 40)
    return _refused(path, "L1")


@case
def reftable_overlapping_the_header(tmp_path):
    path = _image(tmp_path)
    _poke(path, 48, ">Q", 0)
    return _refused(path, "reference count table")


@case
def l2_entry_pointing_at_the_l1_table(tmp_path):
    path = _image(tmp_path, preallocation="metadata")
    hdr_l1 = _peek(path, 40)
    l1_entry = _peek(path, hdr_l1)
    l2 = l1_entry & 0x00FFFFFFFFFFFE00
    _poke(path, l2, ">Q", hdr_l1 | (1 << 63))
    result = inspector.check(path)
    assert result.get("corruptions", 0) > 0
    return "check: %d corruption(s); %s" % (result["corruptions"], result["messages"][0])


@case
def l1_entries_looping_onto_one_l2_table(tmp_path):
    path = _image(tmp_path, preallocation="metadata", size="2G")
    l1 = _peek(path, 40)
    first = _peek(path, l1)
    _poke(path, l1 + 8, ">Q", first)
    result = inspector.check(path)
    assert result.get("corruptions", 0) > 0
    return "check: %d corruption(s); %s" % (result["corruptions"], result["messages"][0])


@case
def extension_length_past_the_cluster(tmp_path):
    path = _image(tmp_path)
    _poke(path, 112 + 4, ">I", 0x7FFFFFF0)
    return _refused(path, "extension")


@case
def unknown_incompatible_bits(tmp_path):
    path = _image(tmp_path)
    _poke(path, 72, ">Q", 1 << 40)
    return _refused(path, "unknown incompatible feature")


@case
def raw_file_that_looks_like_qcow2_at_offset_512(tmp_path):
    path = str(tmp_path / "raw.img")
    real = _image(tmp_path)
    with open(path, "wb") as handle:
        handle.write(b"\0" * 512 + open(real, "rb").read(4096))
    return _refused(path, "not a qcow2 image")


def test_explicit_hostile_cases(tmp_path):
    lines = []
    for func in CASES:
        sub = tmp_path / func.__name__
        sub.mkdir()
        message = func(sub)
        lines.append("%s: %s" % (func.__name__, message))
    sys.stdout.write("\n" + "\n".join("[hostile] " + line for line in lines) + "\n")


@pytest.mark.parametrize("name", ["/etc/shadow", "/dev/sda", "../../../../etc/passwd"])
def test_backing_and_data_file_names_are_never_opened(tmp_path, monkeypatch, name):
    path = str(tmp_path / "b.qcow2")
    api.create(path, {"size": "8M", "backing_file": name, "backing_fmt": "raw"},
               check_backing=False)
    opened = []
    real_open = builtins.open
    real_os_open = os.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    observed = api.observe(path, with_check=True)
    inspector.block_map(path)
    reconcile.decide({"size": "8M"}, observed)
    monkeypatch.undo()
    assert observed["backing_file"] == name
    assert set(opened) <= {path}, opened


def test_existing_non_qcow2_file_is_never_reinterpreted(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"precious raw disk" + bytes(4096))
    observed = api.observe(str(path))
    assert observed["qcow2"] is False
    decision = reconcile.decide({"size": "1M"}, observed)
    assert decision.conflicts and not decision.actions
    assert path.read_bytes().startswith(b"precious raw disk")


def test_regression_noisy_refblock_with_2m_clusters_is_fast(tmp_path):
    """Found by the campaign: a 2 MiB-cluster image whose refcount block has one stray high
    byte made the check scan a million entries one by one (about 1 s, over 2 s under load).
    Measured in CPU time (this process's user + system), so a busy machine cannot fail it."""
    path = _image(tmp_path, size="8M", cluster_size="2M")
    data = open(path, "rb").read()
    reftable = struct.unpack(">Q", data[48:56])[0]
    refblock = struct.unpack(">Q", data[reftable:reftable + 8])[0]
    _poke(path, refblock + 2 * 1, ">B", 0x7F)
    start = time.process_time()
    result = inspector.check(path)
    inspector.allocation_state(path)
    inspector.block_map(path)
    assert time.process_time() - start < 0.5
    assert result.get("leaks", 0) + result.get("corruptions", 0) >= 1
