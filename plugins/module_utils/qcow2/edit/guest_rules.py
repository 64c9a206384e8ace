# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The guest-view rules of in-place changes, and the plans they make (pure: reads the image,
never writes).

`GuestView.decide` says what one L2 entry becomes so that the guest reads exactly the same bytes
in the old range and zeros in the grown range; `plan_map` applies it to a range of guest
clusters and returns a `MapPlan` (runs of entries per L2 table, the fresh clusters they need);
`plan_grow` and `plan_fill` validate a grow or a raise and plan it. A change the rules cannot
make raises Qcow2Error before anything is written. The same functions serve check mode
(`api.preflight`, on a read-only `image.Image`) and the real run (`resize`, on the `Editor`).
See `resize` for the rules in prose.
"""

import struct

from ..format import constants as C
from ..format.tables import div_round_up
from ..format.errors import Qcow2Error
from ..format.l2runs import (COMPRESSED, L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZERO, NORMAL, ZERO_ALLOC,
                             ZERO_PLAIN, zeros)

PREALLOC = ("metadata", "falloc", "full")


# ---------------------------------------------------------------------------------------------
# The guest-view rules


class Change(object):
    """What a run of L2 entries becomes.

    kind "map": each entry gets a fresh host cluster, its descriptor ORed with `flags`;
    kind "set": each entry's descriptor is ORed with `flags` (host offsets kept).
    `bitmap` replaces the extended-L2 bitmap (None keeps it).
    """

    __slots__ = ("kind", "flags", "bitmap")

    def __init__(self, kind, flags=0, bitmap=None):
        self.kind = kind
        self.flags = flags
        self.bitmap = bitmap


class GuestView(object):
    """Decides L2 entries so that the guest reads the same in the old range and zeros beyond.

    `img` is an open image (image.Image or editor.Editor); `mode` the preallocation wanted for
    the range; `first_grown` the first guest cluster that lies wholly past the old end.
    """

    def __init__(self, img, mode, first_grown, device=False):
        self.img = img
        self.path = img.path
        self.prealloc = mode in PREALLOC
        self.v2 = img.header.version < 3
        self.extl2 = img.extended_l2
        self.backing = bool(img.backing_file)
        self.device = device
        self.external = img.has_data_file
        self.first_grown = first_grown
        # Fresh clusters on a device hold old bytes: zero them or flag them. In an encrypted
        # image zeros are no help (they decrypt to garbage): the flag it is, in every mode.
        self.encrypted = bool(img.header.crypt_method)
        self.zero_data = device and not self.encrypted and \
            (self.v2 or mode in ("falloc", "full"))
        self.fresh_flag = C.OFLAG_ZERO if (self.encrypted or (device and not self.zero_data)) \
            and not self.extl2 else 0

    def refuse(self, guest, why):
        raise Qcow2Error("%s: %s (guest offset %d); the image is not modified"
                         % (self.path, why, guest * self.img.cluster_size), path=self.path)

    def decide(self, guest, desc, bitmap):
        """None (keep) or a Change for the entry of guest cluster `guest`."""
        ctype = self.img.cluster_type(desc)
        if guest < self.first_grown:
            return self._old(guest, ctype, bitmap)
        return self._grown(guest, ctype, bitmap)

    def _old(self, guest, ctype, bitmap):
        if not self.prealloc or ctype in (NORMAL, ZERO_ALLOC, COMPRESSED):
            return None
        if self.extl2:
            if bitmap & L2_BITMAP_ALL_ALLOC:
                self.refuse(guest, "an unallocated extended L2 entry has allocated subclusters")
            # Mapped with every subcluster left unallocated (or zero, as it was): reads still
            # go to the backing file, or read zeros.
            return Change("map")
        if ctype == ZERO_PLAIN:
            return Change("map", C.OFLAG_ZERO)
        if self.backing:
            self.refuse(guest, "this cluster reads from the backing file, and mapping it would "
                               "hide the backing file's bytes from the guest (an overlay without "
                               "extended_l2 cannot be preallocated)")
        self._no_v2_fresh(guest)
        if self.v2 and self.device and not self.zero_data:
            self.refuse(guest, "internal error: unflagged fresh cluster on a device")
        return Change("map", self.fresh_flag)

    def _no_v2_fresh(self, guest):
        if self.v2 and self.encrypted:
            self.refuse(guest, "an encrypted compat 0.10 image has no zero flag, so a fresh "
                               "host cluster would read as decrypted garbage; declare compat: "
                               "'1.1' to upgrade it first")

    def _grown(self, guest, ctype, bitmap):
        zero_bits = self.extl2 and self.backing
        if ctype == COMPRESSED:
            self.refuse(guest, "a compressed cluster lies past the image's end; growing would "
                               "make its stale bytes visible")
        if ctype in (NORMAL, ZERO_ALLOC):
            if ctype == ZERO_ALLOC or (self.extl2 and bitmap == L2_BITMAP_ALL_ZERO):
                return None
            # A stale data cluster past the end: keep it allocated, read zeros.
            if self.extl2:
                return Change("set", 0, L2_BITMAP_ALL_ZERO)
            if self.v2:
                self.refuse(guest, "a data cluster lies past the end of a compat 0.10 image, "
                                   "which has no zero clusters to hide it")
            return Change("set", C.OFLAG_ZERO)
        # Unallocated or zero (no host cluster).
        if self.prealloc:
            if self.extl2:
                return Change("map", 0, L2_BITMAP_ALL_ZERO if zero_bits else None)
            self._no_v2_fresh(guest)
            return Change("map", C.OFLAG_ZERO if ctype == ZERO_PLAIN else self.fresh_flag)
        if ctype == ZERO_PLAIN or not self.backing:
            return None
        if self.extl2:
            return None if bitmap == L2_BITMAP_ALL_ZERO else Change("set", 0, L2_BITMAP_ALL_ZERO)
        if self.v2:
            # No zero flag in compat 0.10: a fresh host cluster (zeros) hides the backing file.
            self._no_v2_fresh(guest)
            return Change("map", self.fresh_flag)
        return Change("set", C.OFLAG_ZERO)


# ---------------------------------------------------------------------------------------------
# The plan


class MapPlan(object):
    """The L2 work of a change: runs [(lo, hi, Change)] per L1 index, split into tables to
    create and tables to patch, and the number of fresh data clusters they need."""

    def __init__(self):
        self.new_tables = {}     # l1 index -> [(lo, hi, Change)] (an empty table today)
        self.patches = {}        # l1 index -> [(lo, hi, Change)] (entries of an existing table)
        self.to_map = 0
        self.tail = None         # (host offset, length, zero_it) of the old last cluster's tail

    @property
    def changes(self):
        return bool(self.new_tables or self.patches or self.tail)


def plan_map(img, first, last, view):
    """Decide every L2 entry of guest clusters [first, last) (pure: reads the image only)."""
    plan = MapPlan()
    per_l2 = img.l2_entries
    for l1_index in range(first // per_l2, div_round_up(last, per_l2)):
        lo = max(first, l1_index * per_l2)
        hi = min(last, (l1_index + 1) * per_l2)
        base = l1_index * per_l2
        entry = img.l1_entry(l1_index)
        l2_off = entry & C.L1E_OFFSET_MASK
        runs = []
        if not l2_off:
            for a, b in _split(lo, hi, view.first_grown):
                change = view.decide(a, 0, 0)
                if change is not None:
                    runs.append((a, b, change, 0, 0))
            if runs:
                plan.new_tables[l1_index] = runs
                plan.to_map += _mapped(runs)
            continue
        table = img.read_l2(l2_off)
        for idx, n, desc, bitmap in img.l2_runs(table):
            for a, b in _split(max(lo, base + idx), min(hi, base + idx + n), view.first_grown):
                if a >= b:
                    continue
                # Allocated entries of a run are consecutive: entry a is desc + (a - first)*cs.
                first_desc = desc + ((a - base - idx) * img.cluster_size
                                     if desc & C.L2E_OFFSET_MASK else 0)
                change = view.decide(a, first_desc, bitmap)
                if change is not None:
                    runs.append((a, b, change, first_desc, bitmap))
        if runs:
            if not entry & C.OFLAG_COPIED:
                raise Qcow2Error("%s: L2 table %d is shared with an internal snapshot; tables "
                                 "shared with a snapshot are not copied, so the change is refused "
                                 "and the image is not modified" % (img.path, l1_index),
                                 path=img.path)
            plan.patches[l1_index] = runs
            plan.to_map += _mapped(runs)
    return plan


def _mapped(runs):
    return sum(hi - lo for lo, hi, change, _d, _b in runs if change.kind == "map")


def _split(lo, hi, boundary):
    if lo < boundary < hi:
        return ((lo, boundary), (boundary, hi))
    return ((lo, hi),)


def plan_tail(img, old_size, new_size, mode):
    """The old last cluster when the old size is not cluster-aligned: its bytes past the old
    end must read zeros after the grow (and be allocated for falloc/full). Returns
    (host offset, length, zero_it) or None; refuses what cannot be made so."""
    cs = img.cluster_size
    if not old_size % cs or old_size >= new_size:
        return None
    guest = old_size // cs
    if img.backing_file:
        raise Qcow2Error("%s: the old size %d is not a multiple of the cluster size %d and the "
                         "image has a backing file: the last cluster mixes backing bytes with "
                         "bytes past the end, which this engine does not split; growing in "
                         "place is refused and the image is not modified"
                         % (img.path, old_size, cs), path=img.path)
    l2_off = img.l1_entry(guest // img.l2_entries) & C.L1E_OFFSET_MASK
    if not l2_off:
        return None
    pos = (guest % img.l2_entries) * img.l2_entry_size
    desc = struct.unpack_from(">Q", img.read_l2(l2_off), pos)[0]
    ctype = img.cluster_type(desc)
    if ctype == COMPRESSED:
        raise Qcow2Error("%s: the last cluster is compressed and the old size %d is not a "
                         "multiple of the cluster size: its bytes past the end cannot be "
                         "zeroed in place; the image is not modified" % (img.path, old_size),
                         path=img.path)
    if ctype != NORMAL or img.has_data_file:
        return None
    host = desc & C.L2E_OFFSET_MASK
    skip = old_size % cs
    length = cs - skip
    zero_it = img.read(host + skip, length) != zeros(length)
    if zero_it and img.refcount(host // cs) != 1:
        raise Qcow2Error("%s: the last cluster is shared and holds bytes past the old end; "
                         "the image is not modified" % img.path, path=img.path)
    if not zero_it and mode not in ("falloc", "full"):
        return None
    return (host + skip, length, zero_it)


def plan_grow(img, new_size, mode, device=False):
    """Validate a grow and plan it (pure). Returns (old size, new size, MapPlan or None)."""
    old_size = img.header.size
    new_size = (new_size + 511) // 512 * 512
    cs = img.cluster_size
    if new_size < old_size:
        raise Qcow2Error("size: %d is smaller than the image's %d bytes; shrinking would "
                         "discard guest data and is refused" % (new_size, old_size),
                         option="size", path=img.path)
    limit = C.max_virtual_size(cs, img.extended_l2)
    if new_size > limit:
        raise Qcow2Error("size: %d bytes exceeds the maximum of %d for this image's cluster "
                         "size" % (new_size, limit), option="size", path=img.path)
    if new_size == old_size:
        return old_size, new_size, None
    if img.header.nb_snapshots:
        raise Qcow2Error("%s: the image has %d internal snapshot(s); their L2 tables are shared "
                         "and not copied by this engine, so growing in place is refused and the "
                         "image is not modified (delete them with 'qemu-img snapshot -d', or use "
                         "'qemu-img resize')" % (img.path, img.header.nb_snapshots),
                         path=img.path)
    first_grown = div_round_up(old_size, cs)
    tail = plan_tail(img, old_size, new_size, mode)
    view = GuestView(img, mode, first_grown, device)
    # The old last cluster is mapped too when it has no host cluster and the mode maps.
    first = old_size // cs if mode in PREALLOC else first_grown
    plan = plan_map(img, first, div_round_up(new_size, cs), view)
    plan.tail = tail
    plan.view = view
    return old_size, new_size, plan


def plan_fill(img, mode, device=False):
    """Plan mapping every unmapped guest cluster (off -> metadata and above); pure."""
    if img.has_data_file:
        raise Qcow2Error("%s: the data lives in an external data file; its clusters are not "
                         "mapped in place" % img.path, path=img.path)
    size = img.header.size
    view = GuestView(img, mode, div_round_up(size, img.cluster_size), device)
    plan = plan_map(img, 0, div_round_up(size, img.cluster_size), view)
    if plan.changes and img.header.nb_snapshots:
        raise Qcow2Error("%s: the image has %d internal snapshot(s) and unmapped clusters; the "
                         "L2 tables it shares with them are not copied by this engine, so "
                         "mapping its clusters is refused and the image is not modified"
                         % (img.path, img.header.nb_snapshots), path=img.path)
    plan.view = view
    return plan


class ShrinkPlan(object):
    """What a shrink unlinks: L2 tables (whole, or their entries from `lo`) and host runs."""

    def __init__(self, old_size, new_size):
        self.old_size = old_size
        self.new_size = new_size
        self.tables = []         # (l1 index, first guest cluster cleared, whole table, L2 offset)
        self.release = []        # (first host cluster, count) of data clusters let go


def plan_shrink(img, new_size):
    """Validate shrinking to `new_size` and plan it (pure). None when nothing shrinks.

    Refused when guest data lies past the new end (the guest would lose it; for an overlay,
    the backing chain's data counts, and a backing file that cannot be read refuses), with internal
    snapshots (their tables are shared), an external data file, or compressed clusters past the
    end."""
    from ..read.allocation import chain_data_end
    old_size = img.header.size
    new_size = (new_size + 511) // 512 * 512
    if new_size >= old_size:
        return None
    path = img.path
    if img.header.nb_snapshots:
        raise Qcow2Error("size: the image has internal snapshots; it is not shrunk in place",
                         option="size", path=path)
    if img.has_data_file:
        raise Qcow2Error("size: the image has an external data file; it is not shrunk in place",
                         option="size", path=path)
    try:
        end = chain_data_end(img)
    except Qcow2Error as exc:
        raise Qcow2Error("size: what the guest reads past the declared size %d cannot be told "
                         "(%s), so the image is not shrunk" % (new_size, exc), option="size",
                         path=path)
    if end > new_size:
        raise Qcow2Error("size: guest data lies up to byte %d%s, past the declared size %d; "
                         "shrinking would discard it, so the image is not modified"
                         % (end, " (the image's own or its backing file's)"
                            if img.backing_file else "", new_size), option="size", path=path)
    cs = img.cluster_size
    per = img.l2_entries
    first_gone = div_round_up(new_size, cs)
    plan = ShrinkPlan(old_size, new_size)
    for l1_index in range(first_gone // per, div_round_up(div_round_up(old_size, cs), per)):
        entry = img.l1_entry(l1_index)
        l2_off = entry & C.L1E_OFFSET_MASK
        if not l2_off:
            continue
        if not entry & C.OFLAG_COPIED:
            raise Qcow2Error("%s: L2 table %d is shared; the image is not shrunk in place"
                             % (path, l1_index), path=path)
        base = l1_index * per
        lo = max(first_gone, base)
        for idx, n, desc, _bitmap in img.l2_runs(img.read_l2(l2_off)):
            a = max(lo, base + idx)
            b = base + idx + n
            if a >= b:
                continue
            ctype = img.cluster_type(desc)
            if ctype == COMPRESSED:
                raise Qcow2Error("%s: a compressed cluster lies past the new end; the image is "
                                 "not shrunk in place" % path, path=path)
            if ctype in (NORMAL, ZERO_ALLOC) and desc & C.L2E_OFFSET_MASK:
                host = (desc & C.L2E_OFFSET_MASK) + (a - base - idx) * cs
                plan.release.append((host // cs, b - a))
        plan.tables.append((l1_index, lo, lo == base, l2_off))
    return plan


__all__ = ["Change", "GuestView", "MapPlan", "ShrinkPlan", "plan_map", "plan_tail", "plan_grow",
           "plan_fill", "plan_shrink", "PREALLOC"]
