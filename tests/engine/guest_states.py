# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Images in the states guests and tools leave them in, for the guest-view tests. Tests only.

A state is a list of build steps run in an empty directory: the image is always `img.qcow2`
there and a backing file `base.qcow2` beside it (named relatively, so QEMU and the engine
resolve it against the image's directory). Each State also records what the tests need to
know to expect an outcome: its virtual size, the preallocation level it is at, its compat, and
flags for backing files, snapshots, damage and so on.
"""

import os
import struct

import oracle
from oracle import run

from qcow2 import api

KiB = 1 << 10
MiB = 1 << 20
IMG = "img.qcow2"
BASE = "base.qcow2"


# ---------------------------------------------------------------------------------------------
# Build steps: callables taking the directory.

def _ok(proc, what):
    assert proc.returncode == 0, "%s failed (%d): %s %s" % (
        what, proc.returncode, proc.stdout, proc.stderr)


def _create_args(opts):
    ostr = oracle.option_string(opts)
    return ["-o", ostr] if ostr else []


def image(maker, size, backing=False, **opts):
    """Create img.qcow2 with qemu-img ("qemu") or the engine ("ours")."""
    def step(d):
        if maker == "ours":
            values = dict(opts, size=size)
            if backing:
                values.update(backing_file=BASE, backing_fmt="qcow2")
            api.create(os.path.join(d, IMG), values)
            return
        cmd = [oracle.QEMU_IMG, "create", "-q", "-f", "qcow2"] + _create_args(opts)
        if backing:
            cmd += ["-b", BASE, "-F", "qcow2"]
        _ok(run(*(cmd + [IMG, size]), cwd=d), "qemu-img create")
    return step


def base(size, *commands):
    """Create base.qcow2 with qemu-img and run qemu-io commands on it."""
    def step(d):
        _ok(run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", BASE, size, cwd=d),
            "qemu-img create base")
        qemu_io(d, BASE, commands)
    return step


def qemu_io(d, name, commands, crash=False):
    if not commands:
        return
    cmd = [oracle.QEMU_IO]
    for command in commands:
        cmd += ["-c", command]
    proc = run(*(cmd + [name]), cwd=d)
    if crash:
        assert proc.returncode != 0, "qemu-io was expected to abort: %s" % proc.stdout
    else:
        _ok(proc, "qemu-io %s" % " / ".join(commands))
        assert "failed" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def guest(*commands):
    """The guest runs qemu-io commands on img.qcow2."""
    return lambda d: qemu_io(d, IMG, commands)


def guest_crashes(*commands):
    """The guest runs qemu-io commands, the last one being `abort`: the image stays dirty."""
    return lambda d: qemu_io(d, IMG, commands + ("abort",), crash=True)


def snapshot(name):
    return lambda d: _ok(run(oracle.QEMU_IMG, "snapshot", "-c", name, IMG, cwd=d),
                         "qemu-img snapshot")


def compress(d):
    """Replace img.qcow2 by `qemu-img convert -c` of it: every data cluster compressed."""
    _ok(run(oracle.QEMU_IMG, "convert", "-c", "-O", "qcow2", IMG, "c.qcow2", cwd=d),
        "qemu-img convert -c")
    os.replace(os.path.join(d, "c.qcow2"), os.path.join(d, IMG))


class Fields(object):
    """The header fields the damaging steps need, read from img.qcow2."""

    def __init__(self, path):
        with open(path, "rb") as handle:
            head = handle.read(104)
        self.cluster_size = 1 << struct.unpack_from(">I", head, 20)[0]
        (self.l1_size, self.l1_offset, self.reftable_offset,
         _clusters) = struct.unpack_from(">IQQI", head, 36)
        version = struct.unpack_from(">I", head, 4)[0]
        self.refcount_order = struct.unpack_from(">I", head, 96)[0] if version == 3 else 4


def _poke(path, offset, value):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(">Q", value))


def _peek(path, offset):
    with open(path, "rb") as handle:
        handle.seek(offset)
        return struct.unpack(">Q", handle.read(8))[0]


def damage_reftable(d):
    """The first refcount table entry points far past the end of the file."""
    path = os.path.join(d, IMG)
    _poke(path, Fields(path).reftable_offset, 1 << 50)


def damage_l2(d):
    """Guest cluster 10 is mapped onto the refcount table's cluster (referenced twice)."""
    path = os.path.join(d, IMG)
    f = Fields(path)
    l2 = _peek(path, f.l1_offset) & 0x00FFFFFFFFFFFE00
    assert l2, "damage_l2 needs an L2 table for guest cluster 10"
    _poke(path, l2 + 10 * 8, (1 << 63) | f.reftable_offset)


def leak_tail(count):
    """Give `count` clusters past the end of the file refcount 1 and extend the file over
    them: leaked clusters at the end, as a killed preallocating grow leaves them."""
    def step(d):
        path = os.path.join(d, IMG)
        f = Fields(path)
        assert f.refcount_order == 4, "leak_tail handles 16-bit refcounts only"
        block = _peek(path, f.reftable_offset)
        first = -(-os.path.getsize(path) // f.cluster_size)
        assert first + count <= f.cluster_size // 2, "the leak must fit refcount block 0"
        with open(path, "r+b") as handle:
            handle.seek(block + 2 * first)
            handle.write(struct.pack(">%dH" % count, *([1] * count)))
            handle.truncate((first + count) * f.cluster_size)
    return step


def build_steps(d, *steps):
    """Run build steps in directory `d` (made if missing); returns the image's path."""
    os.makedirs(str(d), exist_ok=True)
    for step in steps:
        step(str(d))
    return os.path.join(str(d), IMG)


# ---------------------------------------------------------------------------------------------
# The states.

class State(object):
    """A named image state: build steps and what is known about the result."""

    def __init__(self, name, size, steps, prealloc="off", compat="1.1", xl2=False, lazy=False,
                 backing=None, reads_base=False, compressed=False, snapshot=False, dirty=False,
                 damaged=False, leaks=False):
        self.name = name
        self.size = size                # virtual size in bytes
        self.steps = steps
        self.prealloc = prealloc        # the level observe() must report
        self.compat = compat
        self.xl2 = xl2
        self.lazy = lazy
        self.backing = backing          # None, "shorter" or "longer" than the image
        self.reads_base = reads_base    # some guest cluster still reads from the backing file
        self.compressed = compressed
        self.snapshot = snapshot
        self.dirty = dirty
        self.damaged = damaged          # qemu-img check reports corruptions
        self.leaks = leaks              # qemu-img check reports leaked clusters

    def __repr__(self):
        return self.name

    @property
    def plain(self):
        """A clean image without backing file, compressed clusters or snapshots."""
        return not (self.backing or self.compressed or self.snapshot or self.dirty or
                    self.damaged or self.leaks)

    def build(self, d):
        return build_steps(d, *self.steps)


# What a guest does to a disk: data of assorted sizes, patterns and alignments, a discard,
# zero writes with and without unmap (over data, so they change the mapping).
USE = ("write -P 0xab 0 100k", "write -P 0x5c 3M 4k", "write -P 0x17 1049088 512",
       "write -P 0x29 2097664 1536", "write -P 0x3e 4M 256k", "discard 4160k 64k",
       "write -z 4224k 64k", "write -z -u 4288k 64k", "write -P 0x71 7M 1M")
# Discarding part of a preallocated disk unmaps those clusters (on v3 images).
DISCARD = ("write -P 0xd1 64k 128k", "discard 1M 1M", "write -P 0xd2 5M 4k")
# Writes into an overlay: whole clusters, part of a cluster, part of a subcluster.
OVERLAY_USE = ("write -P 0xab 0 64k", "write -P 0x5c 3M 4k", "write -P 0x17 1049088 512",
               "write -P 0x71 7M 1M")
FILL_BASE_16M = base("16M", "write -P 0x33 0 16M")     # longer than the 8 MiB overlays
FILL_BASE_4M = base("4M", "write -P 0x34 0 4M")        # shorter
UNALIGNED = 4 * MiB + 3 * 512

STATES = [
    # Fresh images, by qemu-img and by us.
    State("qemu-off", 8 * MiB, [image("qemu", "8M")]),
    State("qemu-metadata", 8 * MiB, [image("qemu", "8M", preallocation="metadata")],
          prealloc="metadata"),
    State("ours-off", 8 * MiB, [image("ours", "8M")]),
    State("ours-metadata", 8 * MiB, [image("ours", "8M", preallocation="metadata")],
          prealloc="metadata"),
    State("qemu-off-v2", 8 * MiB, [image("qemu", "8M", compat="0.10")], compat="0.10"),
    State("ours-metadata-v2", 8 * MiB, [image("ours", "8M", compat="0.10",
                                              preallocation="metadata")],
          prealloc="metadata", compat="0.10"),
    State("qemu-off-xl2", 8 * MiB, [image("qemu", "8M", extended_l2=True)], xl2=True),
    State("ours-metadata-xl2", 8 * MiB, [image("ours", "8M", extended_l2=True,
                                               preallocation="metadata")],
          prealloc="metadata", xl2=True),
    # Used by a guest.
    State("qemu-used", 8 * MiB, [image("qemu", "8M"), guest(*USE)]),
    State("qemu-used-v2", 8 * MiB, [image("qemu", "8M", compat="0.10"), guest(*USE)],
          compat="0.10"),
    State("qemu-used-xl2", 8 * MiB, [image("qemu", "8M", extended_l2=True), guest(*USE)],
          xl2=True),
    State("qemu-used-unaligned", UNALIGNED, [image("qemu", str(UNALIGNED)),
                                             guest("write -P 0x5c 0 64k",
                                                   "write -P 0x6d 4M 1536")]),
    State("ours-metadata-discarded", 8 * MiB, [image("ours", "8M", preallocation="metadata"),
                                               guest(*DISCARD)]),
    State("qemu-metadata-discarded", 8 * MiB, [image("qemu", "8M", preallocation="metadata"),
                                               guest(*DISCARD)]),
    State("qemu-lazy-used", 8 * MiB, [image("qemu", "8M", lazy_refcounts=True), guest(*USE)],
          lazy=True),
    # Overlays over a shorter and over a longer base (filled with a pattern everywhere).
    State("overlay-short", 8 * MiB, [FILL_BASE_4M, image("qemu", "8M", backing=True)],
          backing="shorter", reads_base=True),
    State("overlay-short-used", 8 * MiB, [FILL_BASE_4M, image("qemu", "8M", backing=True),
                                          guest(*OVERLAY_USE)],
          backing="shorter", reads_base=True),
    State("overlay-long", 8 * MiB, [FILL_BASE_16M, image("qemu", "8M", backing=True)],
          backing="longer", reads_base=True),
    State("overlay-long-used", 8 * MiB, [FILL_BASE_16M, image("qemu", "8M", backing=True),
                                         guest(*OVERLAY_USE)],
          backing="longer", reads_base=True),
    State("overlay-long-unaligned", UNALIGNED, [FILL_BASE_16M,
                                                image("qemu", str(UNALIGNED), backing=True)],
          backing="longer", reads_base=True),
    State("overlay-short-xl2-used", 8 * MiB, [FILL_BASE_4M, image("qemu", "8M", backing=True,
                                                                  extended_l2=True),
                                              guest(*OVERLAY_USE)],
          backing="shorter", reads_base=True, xl2=True),
    State("overlay-long-xl2", 8 * MiB, [FILL_BASE_16M, image("ours", "8M", backing=True,
                                                             extended_l2=True)],
          backing="longer", reads_base=True, xl2=True),
    State("overlay-long-xl2-used", 8 * MiB, [FILL_BASE_16M, image("qemu", "8M", backing=True,
                                                                  extended_l2=True),
                                             guest(*OVERLAY_USE)],
          backing="longer", reads_base=True, xl2=True),
    State("overlay-long-v2-used", 8 * MiB, [FILL_BASE_16M, image("qemu", "8M", backing=True,
                                                                 compat="0.10"),
                                            guest(*OVERLAY_USE)],
          backing="longer", reads_base=True, compat="0.10"),
    # Special clusters and tables.
    State("compressed", 8 * MiB, [image("qemu", "8M"), guest(*USE), compress],
          compressed=True),
    State("snapshot", 8 * MiB, [image("qemu", "8M"), guest("write -P 0xab 0 100k"),
                                snapshot("snap1"),
                                guest("write -P 0xcd 64k 64k", "write -P 0xce 5M 64k")],
          snapshot=True),
    State("dirty-lazy", 8 * MiB, [image("qemu", "8M", lazy_refcounts=True),
                                  guest_crashes("write -P 1 0 64k")],
          lazy=True, dirty=True),
    State("damaged-reftable", 8 * MiB, [image("qemu", "8M"), guest("write -P 0xab 0 200k"),
                                        damage_reftable],
          damaged=True),
    State("damaged-l2-v2", 8 * MiB, [image("qemu", "8M", compat="0.10"),
                                     guest("write -P 0xab 0 200k"), damage_l2],
          damaged=True, compat="0.10"),
    State("leaked-tail", 16 * MiB, [image("ours", "16M", preallocation="metadata"),
                                    guest("write -P 0xab 0 100k"), leak_tail(48)],
          prealloc="metadata", leaks=True),
]

BY_NAME = dict((s.name, s) for s in STATES)
