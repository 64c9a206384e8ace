# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Every in-place change, on images in the states guests leave them in, judged by what the
guest reads (issue 11).

The invariant: after an in-place change the guest reads exactly the bytes it read before in
[0, old virtual size) and zeros in [old size, new size), and qemu-img check finds nothing
wrong; or the change is refused with a Qcow2Error and the file is byte-identical (unless the
error says `modified`). The guest view is read with `qemu-img convert -O raw`, through the
backing chain. `qemu-img check` alone cannot see any of this: it proves structure only.

On top of the invariant, EXPECTED states which outcome the issue requires where it requires
one: used disks are adopted in place, overlays keep their base visible, damaged and dirty
images are refused before any write. The last part repeats each case of the issue's
"Reproduced on main" list as a regression test of its own.
"""

import fcntl
import hashlib
import os
import signal
import struct
import sys

import pytest

import oracle
from guest_states import (BASE, BY_NAME, IMG, KiB, MiB, STATES, base, build_steps, guest,
                          image, qemu_io)
from oracle import qemu_check, qemu_info, run

from qcow2.edit import amend
from qcow2 import api, reconcile
from qcow2.format.errors import Qcow2Error

pytestmark = pytest.mark.skipif((oracle.QEMU_IMG is None or oracle.QEMU_IO is None)
                                and not os.environ.get("CI"),
                                reason="qemu-img/qemu-io not installed (CI installs them)")

RANK = {"off": 0, "metadata": 1, "falloc": 2, "full": 3}
GROWTH = 8 * MiB


# ---------------------------------------------------------------------------------------------
# What is observed before and judged after.

def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def guest_view(path):
    """What the guest reads: the whole virtual disk as bytes (through the backing chain)."""
    raw = path + ".view.raw"
    proc = run(oracle.QEMU_IMG, "convert", "-O", "raw", path, raw)
    assert proc.returncode == 0, "qemu-img convert failed: %s" % proc.stderr
    try:
        with open(raw, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(raw)


def check_report(path):
    code, data, err = qemu_check(path)
    assert data is not None, "qemu-img check gave no report (%d): %s" % (code, err)
    return data


def properties(path):
    """What qemu-img info says of the image that in-place changes leave alone (or set)."""
    info = qemu_info(path)
    data = info["format-specific"]["data"]
    return {"virtual-size": info["virtual-size"], "cluster-size": info["cluster-size"],
            "backing": (info.get("backing-filename"), info.get("backing-filename-format")),
            "snapshots": [s["name"] for s in info.get("snapshots", [])],
            "compat": data["compat"], "lazy-refcounts": data.get("lazy-refcounts", False),
            "extended-l2": data.get("extended-l2", False),
            "refcount-bits": data["refcount-bits"]}


class Baseline(object):
    """The file's bytes (hashed), the guest view and qemu-img check before a change."""

    def __init__(self, path):
        self.path = path
        self.sha = sha256(path)
        self.view = guest_view(path)
        self.leaks = check_report(path).get("leaks", 0)
        self.file_size = os.path.getsize(path)
        self.properties = properties(path)

    def untouched(self):
        return sha256(self.path) == self.sha

    def assert_untouched(self, why):
        assert self.untouched(), "%s, but the file changed" % why

    def assert_view_kept(self):
        """[0, old size) reads as before, anything past it reads zeros."""
        after = guest_view(self.path)
        old = len(self.view)
        assert len(after) >= old, "the virtual size shrank from %d to %d" % (old, len(after))
        if after[:old] != self.view:
            at = next(k for k in range(0, old, 512) if after[k:k + 512] != self.view[k:k + 512])
            pytest.fail("the guest view changed at offset %d (guest cluster %d of 64 KiB): "
                        "before %s, after %s" % (at, at // (64 * KiB), self.view[at:at + 8].hex(),
                                                 after[at:at + 8].hex()))
        if after[old:] != bytes(len(after) - old):
            at = old + next(k for k, b in enumerate(after[old:]) if b)
            pytest.fail("the grown range [%d, %d) does not read zeros: offset %d reads %s"
                        % (old, len(after), at, after[at:at + 8].hex()))

    def assert_properties_kept(self, *changed):
        """qemu-img info shows the same image, but for the properties named in `changed`."""
        after = properties(self.path)
        for key in changed:
            after.pop(key)
        assert after == dict((k, v) for k, v in self.properties.items() if k not in changed)

    def assert_clean(self, leaks_allowed=False):
        """No corruption; no leak either, unless the image had leaks before the change."""
        data = check_report(self.path)
        assert not data.get("corruptions") and not data.get("check-errors"), data
        limit = self.leaks if leaks_allowed else 0
        assert data.get("leaks", 0) <= limit, "qemu-img check: %s" % data


def refused(before, func, *args):
    """Run a change that must be refused: returns the Qcow2Error; the file must not change."""
    what = getattr(func, "__self__", None) or func.__name__     # an Op, or an api function
    try:
        result = func(*args)
    except Qcow2Error as exc:
        before.assert_untouched("%s refused with %r" % (what, str(exc)))
        return exc
    except Exception as exc:  # pylint: disable=broad-except
        pytest.fail("%s raised %r instead of a Qcow2Error; the file %s"
                    % (what, exc, "is unchanged" if before.untouched() else "CHANGED"))
    pytest.fail("%s was not refused (returned %r); the file %s"
                % (what, result, "is unchanged" if before.untouched() else "CHANGED"))


def observed_level(path):
    return api.observe(path)["preallocation"]


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 1


def extent_bytes(path):
    """Bytes in the file's extents, written or not (FIEMAP); None where FIEMAP is missing.

    Unlike st_blocks this leaves out the filesystem's extent tree blocks, which come and go as
    extents split and merge.
    """
    extent_count = 1024
    request = struct.pack("=QQIIII", 0, (1 << 64) - 1, FIEMAP_FLAG_SYNC, 0, extent_count, 0)
    buf = bytearray(request + bytes(56 * extent_count))
    with open(path, "rb") as handle:
        try:
            fcntl.ioctl(handle.fileno(), FS_IOC_FIEMAP, buf)
        except OSError:
            return None
    mapped = struct.unpack_from("=I", buf, 20)[0]
    assert mapped < extent_count, "more extents than the FIEMAP buffer holds"
    return sum(struct.unpack_from("=Q", buf, 32 + 56 * k + 16)[0] for k in range(mapped))


def allocated_bytes(path):
    found = extent_bytes(path)
    return os.stat(path).st_blocks * 512 if found is None else found


def lowest_level(target, path):
    """The lowest level observe() may report after raising to `target`: without FIEMAP
    (tmpfs) unwritten extents are not told from written ones, so full may read as falloc."""
    if target == "full" and extent_bytes(path) is None:
        return "falloc"
    return target


# ---------------------------------------------------------------------------------------------
# The in-place changes.

class Op(object):
    """One in-place change through the engine's Python API."""

    def __init__(self, kind, arg=None):
        self.kind = kind
        self.arg = arg
        self.name = kind if arg is None else "%s-%s" % (kind, str(arg).lower())

    def __repr__(self):
        return self.name

    def applies_to(self, state):
        if self.kind == "raise":
            return RANK[self.arg] > RANK[state.prealloc]
        if self.kind == "compat":
            return state.compat == "0.10"
        if self.kind == "lazy":
            return state.compat == "1.1" and state.lazy != self.arg
        return True

    def new_size(self, state):
        return state.size + GROWTH if self.kind == "grow" else state.size

    def run(self, path, state):
        if self.kind == "raise":
            obs = api.observe(path)
            return api.raise_preallocation(path, obs["preallocation"], self.arg)
        if self.kind == "grow":
            return api.grow(path, self.new_size(state), self.arg)
        if self.kind == "compat":
            return amend.upgrade_compat(path)
        if self.kind == "lazy":
            return amend.set_lazy_refcounts(path, self.arg)
        return api.reclaim_leaks(path)

    def verify(self, path, state, before, result):
        """What the change promised, beyond the invariant."""
        changes = {"grow": ("virtual-size",), "compat": ("compat",), "lazy": ("lazy-refcounts",)}
        before.assert_properties_kept(*changes.get(self.kind, ()))
        after = properties(path)
        if self.kind == "raise":
            level = observed_level(path)
            assert RANK[level] >= RANK[lowest_level(self.arg, path)], \
                "raised to %s, observed %s" % (self.arg, level)
        elif self.kind == "grow":
            assert after["virtual-size"] == self.new_size(state)
        elif self.kind == "compat":
            assert after["compat"] == "1.1"
        elif self.kind == "lazy":
            assert after["lazy-refcounts"] is self.arg
        elif before.leaks:
            assert result["changed"] is True, result
            assert os.path.getsize(path) < before.file_size, "the leaked tail was not truncated"
        else:
            assert result["changed"] is False, result
            before.assert_untouched("nothing leaked and reclaim_leaks succeeded")


OPS = ([Op("raise", level) for level in ("metadata", "falloc", "full")] +
       [Op("grow", mode) for mode in ("off", "metadata", "falloc", "full")] +
       [Op("compat"), Op("lazy", True), Op("lazy", False), Op("reclaim")])

SUCCEED, REFUSE, EITHER = "must succeed", "must be refused", "either"


def expected(state, op):
    """The outcome issue 11 requires, and a fragment the refusal's message must contain."""
    if state.damaged:
        return REFUSE, "qemu-img check -r"
    if state.dirty:
        return REFUSE, "dirty"
    if op.kind == "raise":
        if state.backing and not state.xl2 and state.reads_base:
            return REFUSE, "backing"            # a mapped cluster would hide the base
        if state.snapshot and op.arg == "metadata":
            return REFUSE, "snapshot"
        if state.plain or (state.backing and state.xl2):
            return SUCCEED, None                # adopting used disks; xl2 overlays
        return EITHER, None
    if op.kind == "grow":
        if state.backing and state.size % 65536:
            # The last cluster would mix the base's bytes (kept) with bytes past the end (to
            # read zeros); the engine does not read the base to split it, so it refuses.
            return REFUSE, "not a multiple of the cluster size"
        # QEMU refuses to grow a compat 0.10 overlay over a longer base (it cannot zero the
        # grown range); a grow next to a snapshot or leaks may be refused too.
        if state.plain or state.compressed or (state.backing and state.compat == "1.1"):
            return SUCCEED, None
        return EITHER, None
    return SUCCEED, None                        # compat upgrade, lazy refcounts, reclaim


CASES = [(s, op) for s in STATES for op in OPS if op.applies_to(s)]


def test_every_state_is_what_it_claims(tmp_path):
    """The state builders: qemu-img agrees on damage, dirt and leaks; observe on the level."""
    for state in STATES:
        path = state.build(tmp_path / state.name)
        data = check_report(path)
        assert bool(data.get("corruptions")) == (state.damaged or state.dirty), (state, data)
        assert bool(data.get("leaks")) == state.leaks, (state, data)
        info = qemu_info(path)
        assert info.get("dirty-flag", False) == state.dirty, state
        assert info["virtual-size"] == state.size, state
        assert ("backing-filename" in info) == bool(state.backing), state
        fmt = info["format-specific"]["data"]
        assert (fmt["compat"], fmt.get("extended-l2", False)) == (state.compat, state.xl2), state
        if not state.damaged:
            assert observed_level(path) == state.prealloc, state


@pytest.mark.parametrize("state,op", CASES, ids=["%s:%s" % c for c in CASES])
def test_in_place_change_keeps_the_guest_view(tmp_path, state, op):
    path = state.build(tmp_path)
    before = Baseline(path)
    outcome, fragment = expected(state, op)
    if outcome == REFUSE:
        exc = refused(before, op.run, path, state)
        assert fragment in str(exc), "refused, but the message does not mention %r: %s" \
            % (fragment, exc)
        return
    try:
        result = op.run(path, state)
    except Qcow2Error as exc:
        if getattr(exc, "modified", False):
            before.assert_view_kept()
            before.assert_clean(leaks_allowed=True)
        else:
            before.assert_untouched("refused with %r" % str(exc))
        assert outcome != SUCCEED, "%s on %s must succeed; refused: %s" % (op, state, exc)
        return
    before.assert_view_kept()
    before.assert_clean(leaks_allowed=state.leaks and op.kind != "reclaim")
    op.verify(path, state, before, result)


# ---------------------------------------------------------------------------------------------
# Check mode: what the reconciler predicts is what apply does.

PREDICTED_STATES = ["qemu-used", "ours-metadata-discarded", "qemu-off-v2", "overlay-long",
                    "overlay-long-xl2-used", "overlay-long-v2-used", "compressed", "snapshot",
                    "dirty-lazy", "damaged-reftable", "leaked-tail"]
DECLARATIONS = {
    "metadata": lambda s: {"preallocation": "metadata"},
    "full": lambda s: {"preallocation": "full"},
    "grow": lambda s: {"size": s.size + GROWTH},
    "grow-falloc": lambda s: {"size": s.size + GROWTH, "preallocation": "falloc"},
    "compat-lazy": lambda s: {"compat": "1.1", "lazy_refcounts": True},
    "as-is": lambda s: {},
}


@pytest.mark.parametrize("declared", sorted(DECLARATIONS))
@pytest.mark.parametrize("name", PREDICTED_STATES)
def test_prediction_matches_apply(tmp_path, name, declared):
    state = BY_NAME[name]
    values = DECLARATIONS[declared](state)
    path = state.build(tmp_path)
    before = Baseline(path)
    d = reconcile.decide(values, api.observe(path))
    if state.leaks and not state.damaged:
        assert "reclaim_leaks" in [a.kind for a in d.actions], \
            "leaked clusters at the end are not reclaimed: %s %s" % (d.actions, d.conflicts)
    if d.failure or d.conflicts:
        return                                  # nothing to apply; check mode says so
    kinds = [a.kind for a in d.actions]
    if not kinds:
        assert api.apply(path, d) == []
        before.assert_untouched("nothing to do")
        return
    try:
        api.preflight(path, d)
        predicted = None
    except Qcow2Error as exc:
        predicted = exc
        before.assert_untouched("preflight refused with %r" % str(exc))
    try:
        api.apply(path, d)
        outcome = None
    except Qcow2Error as exc:
        outcome = exc
    assert (predicted is None) == (outcome is None), \
        "check mode predicted %s, apply %s (actions %s)" \
        % ("refusal: %s" % predicted if predicted else "success",
           "refused: %s" % outcome if outcome else "succeeded", kinds)
    if outcome is not None:
        before.assert_untouched("apply refused with %r" % str(outcome))
        return
    before.assert_view_kept()
    before.assert_clean(leaks_allowed=state.leaks and "reclaim_leaks" not in kinds)
    again = reconcile.decide(values, api.observe(path))
    pending = [a for a in again.actions if not unobservable(a, path)]
    assert (pending, again.conflicts, again.failure) == ([], [], None), \
        "not converged after apply(%s): %s %s %s" % (
            kinds, pending, again.conflicts, again.failure)


def unobservable(action, path):
    """A raise from falloc to full where the filesystem cannot show full (see lowest_level)."""
    return action.kind == "raise_preallocation" and action.args["target"] == "full" and \
        lowest_level("full", path) == action.args["current"]


# ---------------------------------------------------------------------------------------------
# Issue 11, "Reproduced on main": one regression test per case.

def assert_reads(path, pattern, offset, length):
    proc = run(oracle.QEMU_IO, "-c", "read -P %d %d %d" % (pattern, offset, length), path)
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, \
        "[%d, +%d) does not read 0x%02x: %s" % (offset, length, pattern, proc.stdout[-300:])


@pytest.mark.parametrize("target", ["metadata", "falloc", "full"])
def test_issue11_1_overlay_content_is_not_hidden(tmp_path, target):
    path = BY_NAME["overlay-long"].build(tmp_path)
    before = Baseline(path)
    declared = {"backing_file": BASE, "backing_fmt": "qcow2", "preallocation": target}
    d = reconcile.decide(declared, api.observe(path))
    assert "raise_preallocation" not in [a.kind for a in d.actions], d.actions
    assert any("backing" in c for c in d.conflicts), d.conflicts
    exc = refused(before, api.raise_preallocation, path, "off", target)
    assert "backing" in str(exc), exc
    before.assert_view_kept()


# A 128 MiB base with data in its first MiB and everywhere past 64 MiB.
BASE_128M = base("128M", "write -P 0x65 0 1M", "write -P 0x66 64M 64M")


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
def test_issue11_2_grow_over_a_longer_base_reads_zeros(tmp_path, mode):
    path = build_steps(tmp_path, BASE_128M, image("qemu", "64M", backing=True))
    result = api.grow(path, 96 * MiB, mode)
    assert result["changed"] is True
    assert qemu_info(path)["virtual-size"] == 96 * MiB
    assert_reads(path, 0x65, 0, MiB)
    assert_reads(path, 0, 64 * MiB, 32 * MiB)
    oracle.assert_clean(path)


def test_issue11_3_damaged_image_is_refused_before_any_write(tmp_path):
    state = BY_NAME["damaged-reftable"]
    path = state.build(tmp_path)
    before = Baseline(path)
    declared = {"size": state.size + GROWTH, "preallocation": "metadata"}
    d = reconcile.decide(declared, api.observe(path))
    if not (d.failure or d.conflicts):
        exc = refused(before, api.preflight, path, d)
        assert "qemu-img check -r" in str(exc), exc
        exc = refused(before, api.apply, path, d)
        assert "qemu-img check -r" in str(exc), exc
    for func, args in ((api.grow, (path, state.size + GROWTH, "metadata")),
                       (api.raise_preallocation, (path, "off", "metadata"))):
        exc = refused(before, func, *args)
        assert "qemu-img check -r" in str(exc), exc


@pytest.mark.parametrize("tool", ["engine", "qemu-img"])
@pytest.mark.parametrize("mode", ["falloc", "full"])
@pytest.mark.parametrize("delta", [16 * KiB, 48 * KiB, 80 * KiB])
def test_issue11_4_preallocated_grow_leaves_no_hole(tmp_path, tool, mode, delta):
    """qemu-img resize is the reference: writes into a falloc/full grown range add no blocks."""
    old = 2 * MiB - 48 * KiB
    path = build_steps(tmp_path, image("ours", str(old), preallocation="metadata"))
    if tool == "engine":
        api.grow(path, old + delta, mode)
    else:
        proc = run(oracle.QEMU_IMG, "resize", "-q", "--preallocation=" + mode, path, old + delta)
        assert proc.returncode == 0, proc.stderr
    allocated = allocated_bytes(path)
    qemu_io(str(tmp_path), IMG, ["write -P 0x5a %d %d" % (old, delta)])
    assert allocated_bytes(path) <= allocated, \
        "a guest write into the %s-grown range allocated host blocks" % mode
    assert_reads(path, 0x5a, old, delta)
    oracle.assert_clean(path)


def test_issue11_5_killed_full_grow_leaves_leaks_that_are_reclaimed(tmp_path):
    # The fault suite's child process: it SIGKILLs itself before its k-th write, sync,
    # truncate or fallocate.
    sys.path.insert(0, os.path.join(oracle.ROOT, "tests", "reliability"))
    from test_faults import child, count_calls
    steps = (image("ours", "16M", preallocation="metadata"), guest("write -P 0xab 0 100k"))
    arg = {"size": 144 * MiB, "mode": "full"}
    total = count_calls("grow", build_steps(tmp_path / "probe", *steps), arg)
    tried = []
    for kill_at in (total // 2, total * 2 // 3, total // 3, total * 3 // 4):
        path = build_steps(tmp_path / str(kill_at), *steps)
        proc = child(kill_at, "grow", path, arg)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        tried.append((kill_at, check_report(path).get("leaks", 0)))
        if tried[-1][1]:
            break
    else:
        pytest.fail("no kill point of %d calls left leaked clusters: %s" % (total, tried))
    before = Baseline(path)
    obs = api.observe(path)
    leaked = obs.get("leaked_clusters")
    assert leaked and leaked > 0, "observe() does not report the leaked tail: %s" % obs
    d = reconcile.decide({}, obs)
    assert "reclaim_leaks" in [a.kind for a in d.actions], d.actions
    api.apply(path, d)
    before.assert_view_kept()
    before.assert_clean()
    assert os.path.getsize(path) < before.file_size


@pytest.mark.parametrize("target", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("name", ["qemu-used", "ours-metadata-discarded",
                                  "qemu-metadata-discarded"])
def test_issue11_6_used_disk_is_adopted_in_place(tmp_path, name, target):
    path = BY_NAME[name].build(tmp_path)
    before = Baseline(path)
    d = reconcile.decide({"preallocation": target}, api.observe(path))
    assert not d.conflicts and not d.failure, (d.conflicts, d.failure)
    assert "raise_preallocation" in [a.kind for a in d.actions], d.actions
    api.apply(path, d)
    before.assert_view_kept()
    before.assert_clean()
    assert RANK[observed_level(path)] >= RANK[lowest_level(target, path)]
