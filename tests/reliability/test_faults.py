# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Faults: full disks, kills at every kind of write, bad paths, races. Nothing may be lost.

Kills are injected deterministically: the engine runs in a child process whose os.pwrite,
os.fsync, os.fdatasync, os.ftruncate, os.link, os.rename, os.replace and fallocate are
wrapped; the child SIGKILLs itself just before the k-th of those calls, with k drawn from a
seeded random generator over the calls an uninterrupted run makes. VDISK_FULL_CAMPAIGN=1 runs
60 trials per operation instead of 12.

The in-place changes (adopting a used disk, growing over a longer backing file, reclaiming the
leaks of a killed run) are also judged by what the guest reads (`qemu-img convert -O raw`):
after a kill at any write it is the old view or the new one, never a third.
"""

import hashlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
ENGINE = os.path.join(ROOT, "plugins", "module_utils")
sys.path.insert(0, ENGINE)

from qcow2 import api, reconcile  # noqa: E402
from qcow2.read import inspector  # noqa: E402
from qcow2.create import writer  # noqa: E402
from qcow2.format.errors import Qcow2Error  # noqa: E402

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
FULL = bool(os.environ.get("VDISK_FULL_CAMPAIGN"))
TRIALS = 60 if FULL else 12
SUMMARY = {}

CHILD = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, %(engine)r)
    from qcow2 import api
    from qcow2.create import fileops
    kill_at, op, path, arg = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    calls = [0]
    def wrap(func):
        def wrapper(*a, **kw):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return func(*a, **kw)
        return wrapper
    for name in ("pwrite", "pwritev", "fsync", "fdatasync", "ftruncate", "link", "rename",
                 "replace"):
        setattr(os, name, wrap(getattr(os, name)))
    fileops.fallocate = wrap(fileops.fallocate)
    key = arg.pop("passphrase", None) if isinstance(arg, dict) else None
    key = key.encode() if key is not None else None
    if op == "create":
        api.create(path, arg, replace=True, passphrase=key,
                   iterations=(1000, 1000) if key else None)
    elif op == "grow":
        api.grow(path, arg["size"], arg["mode"], passphrase=key)
    elif op == "raise":
        api.raise_preallocation(path, arg["current"], arg["target"])
    elif op == "reclaim":
        api.reclaim_leaks(path, passphrase=key)
    elif op == "convert":
        api.create_from(path, arg["values"], arg["src"], arg["fmt"], replace=True)
    else:
        sys.exit("unknown operation %%r" %% op)
    print(json.dumps({"calls": calls[0]}))
""") % {"engine": ENGINE}


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, check=False, **kwargs)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qemu_check(path):
    proc = run(QEMU_IMG, "check", "--output=json", path)
    data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, data


def child(kill_at, op, path, arg):
    return run(sys.executable, "-c", CHILD, kill_at, op, path, json.dumps(arg))


def count_calls(op, path, arg):
    proc = child(0, op, path, arg)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["calls"]


def guest_io(path, command):
    """One qemu-io command, as a guest would issue it."""
    proc = run(QEMU_IO, "-c", command, path)
    assert proc.returncode == 0 and "failed" not in proc.stdout, (command, proc.stdout,
                                                                  proc.stderr)


def write_pattern(path, pattern, offset, length):
    guest_io(path, "write -P %d %d %d" % (pattern, offset, length))


def pattern_intact(path, pattern, offset, length):
    proc = run(QEMU_IO, "-c", "read -P %d %d %d" % (pattern, offset, length), path)
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout


def record(kind, outcome):
    entry = SUMMARY.setdefault(kind, {"trials": 0, "old": 0, "new": 0, "corrupt": 0, "lost": 0})
    entry["trials"] += 1
    entry[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _print_summary():
    yield
    for kind, entry in sorted(SUMMARY.items()):
        sys.stdout.write("\n[faults] %-26s trials=%d old=%d new=%d corrupt=%d lost=%d"
                         % (kind, entry["trials"], entry["old"], entry["new"], entry["corrupt"],
                            entry["lost"]))
    sys.stdout.write("\n")


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_kill_during_create_leaves_old_or_new(tmp_path, mode):
    path = str(tmp_path / "img.qcow2")
    arg = {"size": "48M", "preallocation": mode}
    api.create(path, {"size": "16M"})
    write_pattern(path, 0x33, 0, 65536)
    old = sha256(path)
    total = count_calls("create", path, arg)
    rng = random.Random("create-" + mode)
    for trial in range(TRIALS):
        # Back to the old image before each trial.
        os.unlink(path)
        api.create(path, {"size": "16M"})
        write_pattern(path, 0x33, 0, 65536)
        assert sha256(path) == old
        kill_at = rng.randint(1, total)
        proc = child(kill_at, "create", path, arg)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr)
        if sha256(path) == old:
            record("create/" + mode, "old")
        else:
            code, data = qemu_check(path)
            info = inspector.info(path)
            if code == 0 and info["virtual-size"] == 48 << 20:
                record("create/" + mode, "new")
            else:
                record("create/" + mode, "corrupt")
                pytest.fail("trial %d (kill at call %d): half an image: %s" % (trial, kill_at, data))
        # The next run converges and removes the killed run's temporary file.
        api.create(path, arg, replace=True)
        assert qemu_check(path)[0] == 0
        leftovers = [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")]
        assert leftovers == []


@pytest.mark.parametrize("mode", ["off", "metadata", "full"])
def test_kill_during_grow_never_corrupts(tmp_path, mode):
    path = str(tmp_path / "g.qcow2")
    arg = {"size": 96 << 20, "mode": mode}
    base = str(tmp_path / "base.qcow2")
    api.create(base, {"size": "32M", "preallocation": mode, "cluster_size": 65536})
    write_pattern(base, 0x44, 1 << 20, 65536)
    with open(base, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    total = count_calls("grow", path, arg)
    rng = random.Random("grow-" + mode)
    for trial in range(TRIALS):
        with open(base, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        kill_at = rng.randint(1, total)
        proc = child(kill_at, "grow", path, arg)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr)
        code, data = qemu_check(path)
        if code not in (0, 3) or data.get("corruptions"):
            record("grow/" + mode, "corrupt")
            pytest.fail("trial %d (kill at call %d): corruption %s" % (trial, kill_at, data))
        if not pattern_intact(path, 0x44, 1 << 20, 65536):
            record("grow/" + mode, "lost")
            pytest.fail("trial %d (kill at call %d): guest data lost" % (trial, kill_at))
        size = inspector.info(path)["virtual-size"]
        record("grow/" + mode, "new" if size == 96 << 20 else "old")
        # Running the operation again converges; leaked clusters are reclaimable.
        api.grow(path, 96 << 20, mode)
        assert inspector.info(path)["virtual-size"] == 96 << 20
        run(QEMU_IMG, "check", "-r", "leaks", path)
        assert qemu_check(path)[0] == 0
        assert pattern_intact(path, 0x44, 1 << 20, 65536)


def test_kill_during_raise_to_full_never_writes_over_data(tmp_path):
    path = str(tmp_path / "r.qcow2")
    base = str(tmp_path / "base.qcow2")
    api.create(base, {"size": "32M", "preallocation": "metadata"})
    write_pattern(base, 0x55, 3 << 20, 1 << 20)
    arg = {"current": "metadata", "target": "full"}
    with open(base, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    # Keep the copy sparse like the original: holes must stay holes for the test to mean much.
    run("cp", "--sparse=always", base, path)
    total = count_calls("raise", path, arg)
    rng = random.Random("raise")
    for trial in range(TRIALS):
        run("cp", "--sparse=always", base, path)
        kill_at = rng.randint(1, total)
        proc = child(kill_at, "raise", path, arg)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr)
        code, data = qemu_check(path)
        if code != 0:
            record("raise/metadata->full", "corrupt")
            pytest.fail("trial %d: %s" % (trial, data))
        if not pattern_intact(path, 0x55, 3 << 20, 1 << 20):
            record("raise/metadata->full", "lost")
            pytest.fail("trial %d (kill at call %d): guest data lost" % (trial, kill_at))
        level = inspector.allocation_state(path)["preallocation"]
        record("raise/metadata->full", "new" if level == "full" else "old")
        api.raise_preallocation(path, level, "full")
        assert inspector.allocation_state(path)["preallocation"] == "full"
        assert pattern_intact(path, 0x55, 3 << 20, 1 << 20)


# ---------------------------------------------------------------- in-place changes: guest view

MiB = 1 << 20
MODES = ("off", "metadata", "falloc", "full")
PROBE_LIMIT = 64 << 30


def guest_view(path, grown_to=None):
    """What the guest reads (qemu-img convert -O raw): (virtual size, sha256, grown sha256).

    The grown digest, with grown_to, is that of the view followed by zeros up to grown_to
    bytes: what a grow must show.
    """
    out = path + ".view.raw"
    proc = run(QEMU_IMG, "convert", "-O", "raw", path, out)
    try:
        assert proc.returncode == 0, proc.stderr
        size = os.path.getsize(out)
        digest = sha256(out)
        grown = None
        if grown_to is not None:
            os.truncate(out, grown_to)
            grown = sha256(out)
        return size, digest, grown
    finally:
        if os.path.exists(out):
            os.unlink(out)


def refcount_coverage(path):
    """(cluster size, bytes of host file the image's refcount blocks cover), from the raw file."""
    with open(path, "rb") as handle:
        head = handle.read(104)
        version, = struct.unpack_from(">I", head, 4)
        cluster_bits, = struct.unpack_from(">I", head, 20)
        reft_offset, reft_clusters = struct.unpack_from(">QI", head, 48)
        order = struct.unpack_from(">I", head, 96)[0] if version >= 3 else 4
        cs = 1 << cluster_bits
        handle.seek(reft_offset)
        table = handle.read(reft_clusters * cs)
    entries = struct.unpack(">%dQ" % (len(table) // 8), table[:len(table) // 8 * 8])
    used = [i for i, e in enumerate(entries) if e & 0x00fffffffffffe00]
    return cs, (used[-1] + 1) * (cs * 8 >> order) * cs if used else 0


def leaks_everywhere(path):
    """Leaked clusters, counting those whose refcounts lie past the end of the file.

    qemu-img check judges clusters up to the file's end only: a killed run can leave
    refcounts for clusters it never wrote, invisible until a later run extends the file over
    them and they show up as leaks. The probe is a sparse copy of the image extended over all
    its refcount blocks cover. Returns (count, where they are: for failure messages).
    """
    probe = path + ".probe"
    proc = run("cp", "--sparse=always", path, probe)
    assert proc.returncode == 0, proc.stderr
    try:
        end = os.path.getsize(probe)
        cs, coverage = refcount_coverage(probe)
        os.truncate(probe, max(end, min(coverage, PROBE_LIMIT)))
        proc = run(QEMU_IMG, "check", probe)
        assert proc.returncode in (0, 3), "check of the extended copy: %s" % proc.stderr
    finally:
        os.unlink(probe)
    leaked = [int(n) for n in re.findall(r"Leaked cluster (\d+) ", proc.stderr + proc.stdout)]
    if not leaked:
        return 0, "no leaks"
    ranges = []
    for cluster in leaked:
        if ranges and ranges[-1][1] + 1 == cluster:
            ranges[-1][1] = cluster
        else:
            ranges.append([cluster, cluster])
    spans = ", ".join("%d-%d" % (lo, hi) for lo, hi in ranges[:8])
    return len(leaked), "%d leaked clusters (%s%s); the file ends at cluster %d" \
        % (len(leaked), spans, ", ..." if len(ranges) > 8 else "", -(-end // cs))


def check_corruptions(path, what):
    """qemu-img check's JSON; fails on corruptions or check errors (leaks are allowed)."""
    code, data = qemu_check(path)
    assert code in (0, 3) and not data.get("corruptions") and not data.get("check-errors"), \
        "%s: qemu-img check exit %d: %s" % (what, code, data)
    return data


def level_reached(target):
    return lambda path, size, leaks: (MODES.index(api.observe(path)["preallocation"])
                                      >= MODES.index(target))


def kill_campaign(kind, original, op, arg, views, reached):
    """Kill `op` at random writes on copies of `original`; judge each outcome by the guest.

    views maps a virtual size to the digest of the one guest view allowed at that size (the
    old view at the old size, the new one at the new size); reached(path, size, leaks) tells
    whether the killed run got to the new state. After each kill: no corruption and an
    allowed view; api.reclaim_leaks then removes every leak the kill left without changing
    the view, and a fresh run of the same operation converges to the new view, leak-free.
    """
    path = original + ".work"
    new_size = max(views)

    def restore():
        proc = run("cp", "--sparse=always", original, path)
        assert proc.returncode == 0, proc.stderr

    restore()
    total = count_calls(op, path, arg)
    assert total > 0, "%s: an uninterrupted run made no write at all" % kind
    rng = random.Random(kind)
    for trial in range(TRIALS):
        restore()
        kill_at = rng.randint(1, total)
        where = "%s trial %d (kill at call %d of %d)" % (kind, trial, kill_at, total)
        proc = child(kill_at, op, path, arg)
        assert proc.returncode == -signal.SIGKILL, (where, proc.stderr)
        code, data = qemu_check(path)
        if code not in (0, 3) or data.get("corruptions") or data.get("check-errors"):
            record(kind, "corrupt")
            pytest.fail("%s: qemu-img check exit %d: %s" % (where, code, data))
        size, digest, _grown = guest_view(path)
        if views.get(size) != digest:
            record(kind, "lost")
            pytest.fail("%s: the guest reads a third view: virtual size %d, neither the old nor "
                        "the new content for that size (allowed sizes %s)"
                        % (where, size, sorted(views)))
        record(kind, "new" if reached(path, size, leaks_everywhere(path)[0]) else "old")
        # What the kill left over is reclaimed, without touching what the guest reads.
        api.reclaim_leaks(path)
        assert guest_view(path)[:2] == (size, digest), \
            "%s: reclaim_leaks changed the guest view" % where
        check_corruptions(path, where + ", after reclaim_leaks")
        leaks, detail = leaks_everywhere(path)
        assert leaks == 0, "%s: after reclaim_leaks: %s" % (where, detail)
        # A fresh, un-killed run of the same operation converges.
        proc = child(0, op, path, arg)
        assert proc.returncode == 0, "%s: the next run failed: %s" % (where, proc.stderr)
        check_corruptions(path, where + ", after the next run")
        leaks, detail = leaks_everywhere(path)
        assert leaks == 0, "%s: after the next run: %s" % (where, detail)
        size, digest, _grown = guest_view(path)
        assert (size, digest) == (new_size, views[new_size]), \
            "%s: the next run did not converge to the new guest view (virtual size %d%s)" \
            % (where, size, ", other content" if size == new_size else "")
        assert reached(path, size, leaks), "%s: the next run did not reach the new state" % where


def used_disk(path):
    """A 32 MiB disk made by qemu-img (preallocation off) that a guest wrote and discarded."""
    proc = run(QEMU_IMG, "create", "-q", "-f", "qcow2", path, "32M")
    assert proc.returncode == 0, proc.stderr
    write_pattern(path, 0x11, 0, 64 * 1024)
    write_pattern(path, 0x22, 5 * MiB + 4096, 12 * 1024)
    write_pattern(path, 0x33, 17 * MiB, MiB)
    write_pattern(path, 0x44, 31 * MiB + 60 * 1024, 8192)
    guest_io(path, "discard %d %d" % (17 * MiB + 128 * 1024, 256 * 1024))


@pytest.mark.parametrize("target", ["metadata", "full"])
def test_kill_during_adopt_keeps_the_guest_view(tmp_path, target):
    original = str(tmp_path / "used.qcow2")
    used_disk(original)
    size, digest, _grown = guest_view(original)
    kill_campaign("adopt/off->" + target, original, "raise",
                  {"current": "off", "target": target}, {size: digest}, level_reached(target))


@pytest.mark.parametrize("mode", ["off", "metadata"])
def test_kill_during_grow_over_a_longer_base_keeps_the_guest_view(tmp_path, mode):
    base = str(tmp_path / "base.qcow2")
    proc = run(QEMU_IMG, "create", "-q", "-f", "qcow2", base, "48M")
    assert proc.returncode == 0, proc.stderr
    write_pattern(base, 0x77, 0, 48 * MiB)
    original = str(tmp_path / "overlay.qcow2")
    proc = run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", original,
               "16M")
    assert proc.returncode == 0, proc.stderr
    write_pattern(original, 0x12, MiB, 64 * 1024)
    write_pattern(original, 0x34, 15 * MiB + 512, 1024)
    old_size, old, new = guest_view(original, grown_to=40 * MiB)
    kill_campaign("grow over longer base/" + mode, original, "grow",
                  {"size": 40 * MiB, "mode": mode}, {old_size: old, 40 * MiB: new},
                  lambda path, size, leaks: size == 40 * MiB)


def leaky_image(path):
    """A 16 MiB image with leaked clusters at its end: a full grow to 256 MiB killed partway.

    The earliest kill after which qemu-img check reports leaks is used: it keeps the file small.
    Returns qemu-img check's leak count.
    """
    pristine = path + ".pristine"
    api.create(pristine, {"size": "16M"})
    write_pattern(pristine, 0x66, 0, 64 * 1024)
    write_pattern(pristine, 0x67, 9 * MiB, 4096)
    arg = {"size": 256 * MiB, "mode": "full"}
    run("cp", "--sparse=always", pristine, path)
    total = count_calls("grow", path, arg)
    for kill_at in range(1, total + 1):
        run("cp", "--sparse=always", pristine, path)
        proc = child(kill_at, "grow", path, arg)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr)
        data = check_corruptions(path, "making a leaky image (kill at call %d)" % kill_at)
        if data.get("leaks") and inspector.info(path)["virtual-size"] == 16 * MiB:
            return data["leaks"]
    pytest.fail("no kill of a 16 MiB -> 256 MiB full grow (%d calls) left leaked clusters"
                % total)


def test_kill_during_reclaim_keeps_the_guest_view(tmp_path):
    original = str(tmp_path / "leaky.qcow2")
    leaks = leaky_image(original)
    sys.stdout.write("\n[faults] reclaim: the killed grow left %s (qemu-img check: %d)"
                     % (leaks_everywhere(original)[1], leaks))
    size, digest, _grown = guest_view(original)
    kill_campaign("reclaim", original, "reclaim", None, {size: digest},
                  lambda path, size, leaks: leaks == 0)


# ---------------------------------------------------------------- full disks

@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_refused_up_front(small_fs):
    path = str(small_fs / "big.qcow2")
    for mode in ("falloc", "full"):
        with pytest.raises(Qcow2Error) as err:
            api.create(path, {"size": "128M", "preallocation": mode})
        assert err.value.option == "preallocation"
        assert "not enough free space" in str(err.value)
        assert os.listdir(str(small_fs)) == []


def test_enospc_mid_write_cleans_up_and_keeps_the_old_image(small_fs, monkeypatch):
    monkeypatch.setattr(writer, "check_space", lambda directory, plan: None)
    path = str(small_fs / "img.qcow2")
    with pytest.raises(Qcow2Error) as err:
        api.create(path, {"size": "128M", "preallocation": "full"})
    assert "No space left" in str(err.value)
    assert os.listdir(str(small_fs)) == []
    api.create(path, {"size": "8M", "preallocation": "full"})
    write_pattern(path, 0x66, 0, 65536)
    before = sha256(path)
    for mode in ("full", "falloc"):
        with pytest.raises(Qcow2Error):
            api.create(path, {"size": "128M", "preallocation": mode}, replace=True)
        assert sha256(path) == before
        assert sorted(os.listdir(str(small_fs))) == ["img.qcow2"]


def test_enospc_during_grow_keeps_a_consistent_image(small_fs):
    path = str(small_fs / "g.qcow2")
    api.create(path, {"size": "16M", "preallocation": "full"})
    write_pattern(path, 0x77, 0, 65536)
    with pytest.raises(Qcow2Error) as err:
        api.grow(path, 256 << 20, "full")
    # The grow counted and allocated clusters before the disk filled up: it says so.
    assert "No space left" in str(err.value)
    assert err.value.modified is True
    code, data = qemu_check(path)
    assert code in (0, 3) and not data.get("corruptions"), data
    assert pattern_intact(path, 0x77, 0, 65536)
    # The next run sees the leaked clusters and reclaims them; the guest's data stays.
    observed = api.observe(path)
    decision = reconcile.decide({"size": "16M"}, observed)
    if data.get("leaks"):
        assert observed["leaked_clusters"], observed
        assert [a.kind for a in decision.actions] == ["reclaim_leaks"], decision.actions
    api.apply(path, decision)
    code, data = qemu_check(path)
    assert code == 0 and not data.get("leaks") and not data.get("corruptions"), data
    assert pattern_intact(path, 0x77, 0, 65536)


# ---------------------------------------------------------------- bad paths

def test_bad_paths_give_clear_messages_and_create_nothing(tmp_path):
    with pytest.raises(Qcow2Error, match="does not exist"):
        api.create(str(tmp_path / "missing" / "x.qcow2"), {"size": "1M"})
    (tmp_path / "dir.qcow2").mkdir()
    with pytest.raises(Qcow2Error, match="is a directory"):
        api.create(str(tmp_path / "dir.qcow2"), {"size": "1M"})
    dangling = tmp_path / "dangling.qcow2"
    dangling.symlink_to(tmp_path / "nowhere.qcow2")
    with pytest.raises(Qcow2Error, match="symbolic link"):
        api.create(str(dangling), {"size": "1M"})
    assert not (tmp_path / "nowhere.qcow2").exists()
    devlink = tmp_path / "dev.qcow2"
    devlink.symlink_to("/dev/null")
    with pytest.raises(Qcow2Error, match="symbolic link"):
        api.create(str(devlink), {"size": "1M"})
    with pytest.raises(Qcow2Error, match="is a directory"):
        api.observe(str(tmp_path / "dir.qcow2"))
    assert sorted(os.listdir(str(tmp_path))) == ["dangling.qcow2", "dev.qcow2", "dir.qcow2"]


def test_read_only_filesystem(small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(Qcow2Error, match="Read-only file system"):
        api.create(str(small_fs / "ro.qcow2"), {"size": "1M"})


@pytest.fixture
def request_cleanup():
    actions = []
    yield actions
    for action in actions:
        action()


def test_permission_denied(request_cleanup):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user (CI runs as root)")
    import tempfile
    import shutil
    # pytest's own tmp dirs are private to root: use a world-traversable, root-owned one.
    top = tempfile.mkdtemp(prefix="vdisk-perm-", dir="/tmp")
    os.chmod(top, 0o755)
    request_cleanup.append(lambda: shutil.rmtree(top, ignore_errors=True))
    from pathlib import Path
    locked = Path(top) / "locked"
    locked.mkdir(mode=0o755)
    code = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, %r)
        # Import everything first: the interpreter's own files may not be readable by nobody.
        from qcow2 import api
        from qcow2.create import writer, planner, fileops
        from qcow2.format import options
        from qcow2.read import lock, inspector
        from qcow2.edit import resize
        from qcow2.format.errors import Qcow2Error
        os.setgid(65534); os.setuid(65534)
        try:
            api.create(%r, {"size": "1M"})
        except Qcow2Error as exc:
            print("REFUSED", exc)
    """) % (ENGINE, str(locked / "x.qcow2"))
    proc = run(sys.executable, "-c", code)
    assert "REFUSED" in proc.stdout and "Permission denied" in proc.stdout, proc.stdout + proc.stderr
    assert os.listdir(str(locked)) == []


# ---------------------------------------------------------------- races

def test_two_creates_racing_one_wins(tmp_path):
    path = str(tmp_path / "race.qcow2")
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        from qcow2 import api
        from qcow2.format.errors import Qcow2Error
        try:
            api.create(%r, {"size": "256M", "preallocation": "full"})
            print("WON")
        except Qcow2Error as exc:
            print("LOST", exc)
    """) % (ENGINE, path)
    for _round in range(3):
        if os.path.exists(path):
            os.unlink(path)
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  universal_newlines=True) for _i in range(2)]
        outs = [p.communicate()[0] for p in procs]
        assert sum("WON" in o for o in outs) == 1, outs
        assert any("exists" in o or "appeared" in o for o in outs if "LOST" in o), outs
        assert qemu_check(path)[0] == 0
        assert [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")] == []


def test_qemu_started_during_our_grow_is_refused(tmp_path):
    path = str(tmp_path / "busy.qcow2")
    api.create(path, {"size": "64M", "preallocation": "full"})
    code = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from qcow2.create import fileops
        from qcow2 import api
        real = fileops.fallocate
        import os
        slow_write = os.pwrite
        def slow(*a, **kw):
            time.sleep(0.002)
            return slow_write(*a, **kw)
        os.pwrite = slow
        api.grow(%r, 2 << 30, "full")
        print("GROWN")
    """) % (ENGINE, path)
    grower = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              universal_newlines=True)
    try:
        from qcow2.read import lock
        seen = False
        for _i in range(400):
            if lock.probe(path)["in_use"]:
                seen = True
                break
            import time
            time.sleep(0.01)
        assert seen, "our grow never showed QEMU's write lock"
        proc = run(QEMU_IO, "-c", "read 0 512", path)
        assert proc.returncode != 0 and "lock" in proc.stderr, proc.stderr
    finally:
        out = grower.communicate(timeout=600)[0]
    assert "GROWN" in out
    assert qemu_check(path)[0] == 0


# ---------------------------------------------------------------- copies from a source

def template(tmp_path, fmt, size=32 * MiB):
    """A sparse raw template with data ranges (one at its end), or its compressed qcow2."""
    raw = str(tmp_path / "template.raw")
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, b"\x5a" * (2 * MiB), 0)
        os.pwrite(fd, os.urandom(MiB), 9 * MiB + 4096)
        os.pwrite(fd, b"\x6b" * 3072, 20 * MiB + 512)
        os.pwrite(fd, b"\x7c" * 65536, size - 65536)
    finally:
        os.close(fd)
    if fmt == "raw":
        return raw
    path = str(tmp_path / "template.qcow2")
    proc = run(QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2", raw, path)
    assert proc.returncode == 0, proc.stderr
    return path


def same_guest(src, fmt, path):
    """qemu-img compare: `path` reads what the source reads (then zeros)."""
    proc = run(QEMU_IMG, "compare", "-f", fmt, "-F", "qcow2", src, path)
    return proc.returncode == 0 and "Images are identical" in proc.stdout


def temp_files(directory):
    return sorted(n for n in os.listdir(str(directory)) if n.endswith(".tmp"))


@pytest.mark.parametrize("fmt,mode", [("raw", "off"), ("raw", "metadata"), ("raw", "full"),
                                      ("qcow2", "off"), ("qcow2", "falloc")])
def test_kill_during_convert_leaves_old_or_new(tmp_path, fmt, mode):
    """A copy killed at any write over an existing image (replace): the path holds the old
    image byte for byte or the complete new one, never half; the next run removes the
    killed run's temporary file."""
    src = template(tmp_path, fmt)
    work = tmp_path / "images"
    work.mkdir()
    path = str(work / "img.qcow2")
    arg = {"values": {"size": "48M", "preallocation": mode}, "src": src, "fmt": fmt}
    kind = "convert/%s/%s" % (fmt, mode)

    def old_image():
        if os.path.exists(path):
            os.unlink(path)
        api.create(path, {"size": "16M"})
        write_pattern(path, 0x33, 0, 65536)

    old_image()
    old = sha256(path)
    total = count_calls("convert", path, arg)
    assert same_guest(src, fmt, path) and qemu_check(path)[0] == 0
    # A copy makes few writes (its data goes in large pieces): every one of them is a kill
    # point when there are few, else a seeded random sample that always has the last one.
    if total <= 2 * TRIALS:
        points = list(range(1, total + 1))
    else:
        points = sorted(random.Random(kind).sample(range(1, total), TRIALS - 1)) + [total]
    stale = 0
    for trial, kill_at in enumerate(points):
        old_image()
        assert sha256(path) == old
        where = "%s trial %d (kill at call %d of %d)" % (kind, trial, kill_at, total)
        proc = child(kill_at, "convert", path, arg)
        assert proc.returncode == -signal.SIGKILL, (where, proc.stderr)
        if temp_files(work):
            stale += 1
        if sha256(path) == old:
            record(kind, "old")
        else:
            code, data = qemu_check(path)
            if code == 0 and inspector.info(path)["virtual-size"] == 48 * MiB \
                    and same_guest(src, fmt, path):
                record(kind, "new")
            else:
                record(kind, "corrupt")
                pytest.fail("%s: half an image: check exit %d %s" % (where, code, data))
        # The next run converges and removes the killed run's temporary file.
        api.create_from(path, arg["values"], src, fmt, replace=True)
        assert qemu_check(path)[0] == 0, where
        assert same_guest(src, fmt, path), where
        assert temp_files(work) == [], where
        assert sorted(os.listdir(str(work))) == ["img.qcow2"], where
    assert stale, "%s: no kill left a temporary file (%d trials): the campaign tests nothing " \
        "of the cleanup" % (kind, len(points))


def data_template(path, size):
    """A raw file that is data from end to end (nothing for zero detection to skip)."""
    chunk = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as handle:
        for _i in range(size // MiB):
            handle.write(chunk)
    return path


def test_enospc_convert_refused_up_front(small_fs, tmp_path):
    """A copy that cannot fit is refused before anything is written, naming the space (and
    check mode's preflight says the same)."""
    small = template(tmp_path, "raw", size=16 * MiB)
    big = data_template(str(tmp_path / "big.raw"), 96 * MiB)
    path = str(small_fs / "new.qcow2")
    cases = [({"size": "128M", "preallocation": "falloc"}, small),
             ({"size": "128M", "preallocation": "full"}, small),
             ({"preallocation": "off"}, big),
             ({"preallocation": "metadata"}, big)]
    for values, src in cases:
        with pytest.raises(Qcow2Error) as predicted:
            api.preflight_create(path, values, source=src, source_format="raw")
        with pytest.raises(Qcow2Error) as err:
            api.create_from(path, values, src, "raw")
        assert "not enough free space" in str(err.value), (values, str(err.value))
        assert str(predicted.value) == str(err.value)
        assert os.listdir(str(small_fs)) == [], values


def test_enospc_mid_convert_cleans_up_and_keeps_the_old_image(small_fs, tmp_path, monkeypatch):
    """Forced past the space check, a copy that fills the filesystem fails cleanly: nothing
    left behind, an existing image untouched."""
    from qcow2.copy import convert
    monkeypatch.setattr(convert, "check_space", lambda path, opts, source: None)
    small = template(tmp_path, "raw", size=16 * MiB)
    big = data_template(str(tmp_path / "big.raw"), 96 * MiB)
    path = str(small_fs / "img.qcow2")
    cases = [({"preallocation": "off"}, big),
             ({"preallocation": "metadata"}, big),
             ({"size": "128M", "preallocation": "full"}, small),
             ({"size": "128M", "preallocation": "falloc"}, small)]
    for values, src in cases:
        with pytest.raises(Qcow2Error) as err:
            api.create_from(path, values, src, "raw")
        assert "No space left" in str(err.value), (values, str(err.value))
        assert os.listdir(str(small_fs)) == [], values
    api.create(path, {"size": "8M", "preallocation": "full"})
    write_pattern(path, 0x66, 0, 65536)
    before = sha256(path)
    for values, src in cases:
        with pytest.raises(Qcow2Error) as err:
            api.create_from(path, values, src, "raw", replace=True)
        assert "No space left" in str(err.value), (values, str(err.value))
        assert sha256(path) == before, values
        assert sorted(os.listdir(str(small_fs))) == ["img.qcow2"], values
    # With the space back, the same copy succeeds in place of the old image.
    api.create_from(path, {"preallocation": "metadata"}, small, "raw", replace=True)
    assert same_guest(small, "raw", path) and qemu_check(path)[0] == 0
