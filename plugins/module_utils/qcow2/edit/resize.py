# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Changing an existing image in place: grow its virtual size, map its clusters (raise
preallocation), allocate its data clusters.

Every change opens the image through `editor.editing` (locks, guard, consistency check) and is
planned before the first write by `guest_rules.plan_map`, a pure function of the open image that decides
each L2 entry with `GuestView.decide`. Those rules keep what the guest reads:

- in the old range, [0, old size), every byte reads as before: a cluster that reads from the
  backing file is never given a host cluster unless extended L2 keeps its subclusters
  unallocated; zero clusters keep their zero flag; compressed and allocated clusters are kept;
- in the grown range every byte reads zeros: with a backing file (whose length is not read) new
  clusters get the zero flag or the extended-L2 zero bits, stale entries past the old end are
  turned into zero clusters, and the unused tail of the old last cluster is zeroed;
- fresh host clusters read zeros: appended past the end of a file, or, on a block device, given
  the zero flag or written with zeros.

A change the rules cannot make is refused before anything is written. Internal snapshots: L2
tables shared with a snapshot are never copied, so growing an image with snapshots, and mapping
clusters of one, are refused (allocating already mapped clusters is allowed).

Writes follow one order, so that a crash at any point leaves an image qemu-img check accepts (at
worst with leaked clusters at the end, which the next run reclaims):

1. new clusters are appended past everything in use and counted first: new refcount blocks
   (and a new, larger refcount table, switched in with one header write) give them refcount
   1 before anything points at them;
2. new L2 tables and data clusters are written (and allocated on disk per mode);
3. existing L2 tables are patched, then L1 entries are written (a relocated L1 is switched in
   with one header write);
4. the virtual size is written last;
5. clusters no longer used (an old L1, an old refcount table) are released.
"""

import os
import struct

from ..format import constants as C
from ..create import fileops
from ..format.tables import div_round_up
from .editor import editing
from ..format.errors import Qcow2Error
from .guest_rules import plan_fill, plan_grow, plan_shrink
from ..format.l2runs import NORMAL, ZERO_ALLOC
from ..format.refcounts import set_range
from ..format.tables import progression


def grow(path, new_size, mode="off", passphrase=None):
    """Raise the virtual size to `new_size`; the new range reads zeros, mapped per `mode`.
    An external data file (named in the header the editor already parsed, relative to the
    image's directory) is grown too. `passphrase`: the key of an encrypted image (the guard
    refuses one without it)."""
    with editing(path, passphrase=passphrase) as ed:
        old_size, new_size, plan = plan_grow(ed, new_size, mode, ed.device)
        if plan is None:
            return {"changed": False, "old_size": old_size, "new_size": new_size}
        l1_needed = _l1_entries(new_size, ed.cs, ed.entry_size)
        result = _apply_map(ed, plan, mode, l1_needed)
        if ed.external and ed.data_file:
            data_path = os.path.join(os.path.dirname(os.path.abspath(path)), ed.data_file)
            _grow_data_file(data_path, old_size, new_size, mode, result)
        # The size goes in last: until now the image was valid at its old size.
        ed.pwrite(24, struct.pack(">Q", new_size))
        ed.sync()
        ed.done.append("grew the virtual size from %d to %d" % (old_size, new_size))
        result.update({"changed": True, "old_size": old_size, "new_size": new_size})
        return result


def fill(path, mode="metadata", passphrase=None):
    """Map every unmapped guest cluster of the image (off -> metadata/falloc/full)."""
    with editing(path, passphrase=passphrase) as ed:
        return _fill(ed, mode)


def raise_level(path, current, target, passphrase=None):
    """Raise the preallocation from `current` to `target` in one editing session (one lock,
    one guard): map the unmapped clusters when coming from off, then allocate the data
    clusters for falloc/full. Returns the list of steps done."""
    steps = []
    with editing(path, passphrase=passphrase) as ed:
        if current == "off":
            steps.append(dict(_fill(ed, target), action="map every guest cluster"))
        if target in ("falloc", "full"):
            # Also covers clusters that were mapped before: fallocate leaves written blocks
            # alone and zeros go only into holes and unwritten extents.
            steps.append(dict(_raise_allocation(ed, target),
                              action="allocate data clusters (%s)" % target))
    return steps


def _fill(ed, mode):
    plan = plan_fill(ed, mode, ed.device)
    if not plan.changes:
        return {"method": "none", "mapped_clusters": 0, "new_l2_tables": 0}
    result = _apply_map(ed, plan, mode, len(ed.l1))
    ed.done.append("mapped %d cluster(s)" % plan.to_map)
    return result


def shrink(path, new_size, passphrase=None):
    """Lower the virtual size when no guest data lies past the new end (plan_shrink refuses
    otherwise). The size goes first (the guest sees the smaller disk), then the clusters past
    the end are unlinked and released, and the file is cut back when its end became free; a
    crash in between leaves at worst leaked clusters."""
    with editing(path, passphrase=passphrase) as ed:
        plan = plan_shrink(ed, new_size)
        if plan is None:
            return {"changed": False}
        cs, esz, per = ed.cs, ed.entry_size, ed.per_l2
        ed.pwrite(24, struct.pack(">Q", plan.new_size))
        ed.sync()
        ed.header.size = plan.new_size
        ed.done.append("shrank the virtual size from %d to %d" % (plan.old_size, plan.new_size))
        l1_offset = ed.header.l1_table_offset
        for l1_index, lo, whole, l2_off in plan.tables:
            if whole:
                ed.l1[l1_index] = 0
                ed.pwrite(l1_offset + 8 * l1_index, bytes(8))
            else:
                table = bytearray(ed.l2_table(l1_index))
                start = (lo - l1_index * per) * esz
                table[start:] = bytes(len(table) - start)
                ed.pwrite(l2_off, bytes(table))
        ed.sync()
        for first, count in plan.release:
            ed.release(first, count)
        for _l1_index, _lo, whole, l2_off in plan.tables:
            if whole:
                ed.release(l2_off // cs, 1)
        ed.sync()
        truncated = 0
        end = (ed.last_refcounted() + 1) * cs
        if not ed.device and ed.file_size > end:
            truncated = ed.file_size - end
            ed.truncate(end)
            ed.sync()
        return {"changed": True, "old_size": plan.old_size, "new_size": plan.new_size,
                "released_clusters": sum(n for _f, n in plan.release),
                "truncated_bytes": truncated}


def _l1_entries(size, cs, entry_size):
    return div_round_up(div_round_up(size, cs), cs // entry_size)


def _grow_data_file(data_path, old_size, new_size, mode, result):
    from ..read.nodes import open_checked
    # The image names its data file; the name may be a link, the node must be a file.
    dfd = open_checked(data_path, os.O_RDWR, follow=True, what="data_file",
                       option="data_file")[0]
    try:
        current = os.fstat(dfd).st_size
        if current < new_size:
            os.ftruncate(dfd, new_size)
        if mode == "falloc":
            try:
                fileops.fallocate(dfd, old_size, new_size - old_size)
            except OSError as exc:
                if not fileops.is_not_supported(exc):
                    raise
                _zero_unbacked(dfd, old_size, new_size - old_size)
        elif mode == "full":
            _zero_unbacked(dfd, old_size, new_size - old_size)
        os.fsync(dfd)
        result["data_file_size"] = max(current, new_size)
    finally:
        os.close(dfd)


def _zero_unbacked(fd, offset, length):
    from ..create.writer import write_zeros
    segments, _fiemap = fileops.unbacked_segments(fd, offset, length)
    for off, seg_len in segments:
        write_zeros(fd, off, seg_len)


def _solve_append(ed, payload):
    """Where `payload` appended clusters go, and the refcount blocks (and table) they need,
    solved to a fixed point. Returns (start, end, needed block indices, table clusters)."""
    cs = ed.cs
    start = ed.first_free_cluster()
    n_blocks = reft_clusters = 0
    while True:
        end = start + payload + n_blocks + reft_clusters
        needed = [i for i in range(start // ed.rb_entries, div_round_up(end, ed.rb_entries))
                  if not (i < len(ed.reftable) and ed.reftable[i] & C.REFT_OFFSET_MASK)]
        max_index = div_round_up(end, ed.rb_entries) - 1
        new_reft = div_round_up((max_index + 1) * 8, cs) if max_index >= len(ed.reftable) else 0
        if len(needed) == n_blocks and new_reft == reft_clusters:
            break
        n_blocks, reft_clusters = len(needed), new_reft
    if reft_clusters * cs > C.MAX_REFTABLE_BYTES:
        raise Qcow2Error("size: the refcount table would exceed 8 MiB", option="size",
                         path=ed.path)
    if end * cs >= C.MAX_HOST_OFFSET:
        raise Qcow2Error("size: the image file would exceed the qcow2 offset limit",
                         option="size", path=ed.path)
    if ed.device and end * cs > ed.file_size:
        raise Qcow2Error("%s: the block device holds %d bytes and the change needs %d; the "
                         "image is not modified" % (ed.path, ed.file_size, end * cs),
                         path=ed.path)
    return start, end, needed, reft_clusters


def _run_bytes(change, n, desc, bitmap, host, esz, cs):
    """The new bytes of n entries whose first old entry is (desc, bitmap): allocated old
    entries are consecutive (desc + k*cs), others all alike; `host` is the first fresh host
    cluster for a "map"."""
    tail = change.bitmap if change.bitmap is not None else bitmap
    if change.kind == "map":
        first = host | C.OFLAG_COPIED | change.flags | (desc & C.OFLAG_ZERO)
        step = cs
    else:
        first = desc | change.flags
        step = cs if desc & C.L2E_OFFSET_MASK else 0
    if step == 0:
        entry = struct.pack(">Q", first) + (struct.pack(">Q", tail) if esz == 16 else b"")
        return entry * n
    return b"".join(progression(first, step, n, esz, tail))


def _apply_map(ed, plan, mode, l1_needed):
    """Write a MapPlan in the crash-safe order; returns a result dict."""
    cs = ed.cs
    esz = ed.entry_size
    hdr = ed.header
    view = plan.view
    new_l1_size = max(hdr.l1_size, l1_needed)
    old_l1_clusters = div_round_up(hdr.l1_size * 8, cs) if hdr.l1_size else 0
    new_l1_clusters = div_round_up(new_l1_size * 8, cs)
    relocate_l1 = new_l1_clusters > old_l1_clusters
    data_clusters = 0 if ed.external else plan.to_map
    new_tables = sorted(plan.new_tables)

    payload = (new_l1_clusters if relocate_l1 else 0) + len(new_tables) + data_clusters
    start, end, needed, reft_clusters = _solve_append(ed, payload)
    at = start
    l1_at = None
    if relocate_l1:
        l1_at, at = at, at + new_l1_clusters
    l2_at, at = at, at + len(new_tables)
    data_at, at = at, at + data_clusters
    blocks_at = at
    reft_at = at + len(needed)

    # Step 1: count every new cluster before anything refers to it.
    if end > start:
        _count_clusters(ed, start, end, needed, blocks_at, reft_at, reft_clusters)

    # Step 2: data clusters, new L2 tables, the old last cluster's tail.
    next_data = [data_at]

    def run_bytes(lo, hi, change, desc, bitmap):
        host = 0
        if change.kind == "map":
            if ed.external:
                host = lo * cs
            else:
                host = next_data[0] * cs
                next_data[0] += hi - lo
        return _run_bytes(change, hi - lo, desc, bitmap, host, esz, cs)

    result = {"method": "sparse", "mapped_clusters": plan.to_map,
              "new_l2_tables": len(new_tables)}
    if end * cs > ed.file_size and not ed.device:
        ed.truncate(end * cs)
    if data_clusters:
        from ..create.writer import WriteResult, allocate
        wr = WriteResult()
        if view.zero_data:
            allocate(ed.fd, data_at * cs, data_clusters * cs, "full", wr, device=True)
        elif mode in ("falloc", "full") and not ed.device:
            allocate(ed.fd, data_at * cs, data_clusters * cs, mode, wr)
        result.update(method=wr.method, method_detail=wr.detail,
                      fallocate_refused=wr.fallocate_refused)
        ed.modified = True
    l2_offsets = {}
    for k, l1_index in enumerate(new_tables):
        base = l1_index * ed.per_l2
        table = bytearray(cs)
        for lo, hi, change, desc, bitmap in plan.new_tables[l1_index]:
            table[(lo - base) * esz:(hi - base) * esz] = run_bytes(lo, hi, change, desc, bitmap)
        l2_offsets[l1_index] = (l2_at + k) * cs
        ed.pwrite((l2_at + k) * cs, table)
    if plan.tail is not None:
        _apply_tail(ed, plan.tail, mode, result)
    ed.sync()

    # Step 3: existing L2 tables, now that their new data clusters exist; then the L1.
    for l1_index in sorted(plan.patches):
        table = bytearray(ed.l2_table(l1_index))
        base = l1_index * ed.per_l2
        for lo, hi, change, desc, bitmap in plan.patches[l1_index]:
            table[(lo - base) * esz:(hi - base) * esz] = run_bytes(lo, hi, change, desc, bitmap)
        ed.pwrite(ed.l1[l1_index] & C.L1E_OFFSET_MASK, bytes(table))
    if plan.patches:
        ed.sync()
    _write_l1(ed, new_l1_size, l1_at, new_l1_clusters, old_l1_clusters, relocate_l1,
              l2_offsets)
    result["appended_clusters"] = end - start
    return result


def _apply_tail(ed, tail, mode, result):
    offset, length, zero_it = tail
    from ..create.writer import write_zeros
    if zero_it:
        write_zeros(ed.fd, offset, length)
        ed.modified = True
    if mode == "full" and not ed.device:
        _zero_unbacked(ed.fd, offset, length)
    elif mode == "falloc" and not ed.device:
        try:
            fileops.fallocate(ed.fd, offset, length)
        except OSError as exc:
            if not fileops.is_not_supported(exc):
                raise
            _zero_unbacked(ed.fd, offset, length)
    result["tail_bytes"] = length


def _write_l1(ed, new_l1_size, l1_at, new_l1_clusters, old_l1_clusters, relocate_l1,
              l2_offsets):
    cs = ed.cs
    hdr = ed.header
    new_l1 = list(ed.l1) + [0] * (new_l1_size - len(ed.l1))
    for l1_index, offset in l2_offsets.items():
        new_l1[l1_index] = offset | C.OFLAG_COPIED
    old_l1_offset = hdr.l1_table_offset
    old_l1_size = hdr.l1_size
    if relocate_l1:
        data = struct.pack(">%dQ" % new_l1_size, *new_l1)
        ed.pwrite(l1_at * cs, data + bytes(new_l1_clusters * cs - len(data)))
        ed.sync()
        ed.pwrite(36, struct.pack(">IQ", new_l1_size, l1_at * cs))
        ed.sync()
        hdr.l1_table_offset = l1_at * cs
    else:
        if new_l1_size > old_l1_size:
            tail = new_l1[old_l1_size:]
            ed.pwrite(old_l1_offset + 8 * old_l1_size, struct.pack(">%dQ" % len(tail), *tail))
        for l1_index in sorted(l2_offsets):
            if l1_index < old_l1_size:
                ed.pwrite(old_l1_offset + 8 * l1_index, struct.pack(">Q", new_l1[l1_index]))
        ed.sync()
        if new_l1_size != old_l1_size:
            ed.pwrite(36, struct.pack(">I", new_l1_size))
            ed.sync()
    hdr.l1_size = new_l1_size
    ed.l1 = new_l1
    # Step 5: release what is no longer used.
    if relocate_l1 and old_l1_size:
        ed.release(old_l1_offset // cs, old_l1_clusters)
        ed.sync()


def _count_clusters(ed, start, end, needed, blocks_at, reft_at, reft_clusters):
    """Step 1: refcount 1 for clusters [start, end); new blocks at blocks_at.., table at reft_at."""
    cs = ed.cs
    hdr = ed.header
    new_entries = {}
    for k, index in enumerate(needed):
        new_entries[index] = (blocks_at + k) * cs
    first_index = start // ed.rb_entries
    last_index = div_round_up(end, ed.rb_entries) - 1
    for index in range(first_index, last_index + 1):
        lo = max(start, index * ed.rb_entries) - index * ed.rb_entries
        hi = min(end, (index + 1) * ed.rb_entries) - index * ed.rb_entries
        if index in new_entries:
            block = bytearray(cs)
            set_range(block, lo, hi, 1, ed.order)
            ed.pwrite(new_entries[index], bytes(block))
            ed._blocks[index] = block
        else:
            block = ed.block_at(index)
            set_range(block, lo, hi, 1, ed.order)
            ed.pwrite(ed.reftable[index] & C.REFT_OFFSET_MASK, bytes(block))
    ed.sync()
    if reft_clusters:
        table = list(ed.reftable) + [0] * (reft_clusters * cs // 8 - len(ed.reftable))
        for index, offset in new_entries.items():
            table[index] = offset
        ed.pwrite(reft_at * cs, struct.pack(">%dQ" % len(table), *table))
        ed.sync()
        old_offset, old_clusters = hdr.refcount_table_offset, hdr.refcount_table_clusters
        ed.pwrite(48, struct.pack(">QI", reft_at * cs, reft_clusters))
        ed.sync()
        ed.reftable = table
        hdr.refcount_table_offset = reft_at * cs
        hdr.refcount_table_clusters = reft_clusters
        ed.release(old_offset // cs, old_clusters)
        ed.sync()
    elif new_entries:
        for index, offset in sorted(new_entries.items()):
            ed.reftable[index] = offset
            ed.pwrite(hdr.refcount_table_offset + 8 * index, struct.pack(">Q", offset))
        ed.sync()


# ---------------------------------------------------------------------------------------------
# Allocating mapped clusters (metadata -> falloc -> full)


def raise_allocation(path, mode, passphrase=None):
    """Bring every mapped data cluster to `mode` ('falloc' or 'full') without touching data.

    falloc: fallocate each contiguous host run of data clusters (allocating already
    allocated blocks changes nothing). full: write zeros only into holes and unwritten
    extents of those runs. A block device has every block already: nothing to do.
    """
    if mode not in ("falloc", "full"):
        raise Qcow2Error("preallocation: can only raise to falloc or full in place",
                         option="preallocation")
    with editing(path, passphrase=passphrase) as ed:
        return _raise_allocation(ed, mode)


def _raise_allocation(ed, mode):
    path = ed.path
    if ed.external:
        raise Qcow2Error("%s: the data lives in an external data file; raise its "
                         "allocation there" % path, path=path)
    if ed.device:
        return {"method": "none (a block device has every block)", "runs": 0,
                "zero_bytes": 0, "data_bytes": 0}
    fd = ed.fd
    runs = list(data_runs(ed))
    method = "fallocate"
    fiemap_used = True
    zero_bytes = 0
    for offset, length in runs:
        ed.modified = True
        if mode == "falloc":
            try:
                fileops.fallocate(fd, offset, length)
            except OSError as exc:
                if not fileops.is_not_supported(exc):
                    raise
                method = "zero-writes into holes (fallocate not supported)"
                for o, n in list(_holes(fd, offset, length)):
                    _write_zeros(fd, o, n)
                    zero_bytes += n
        else:
            segments, used = fileops.unbacked_segments(fd, offset, length)
            fiemap_used = fiemap_used and used
            for o, n in segments:
                _write_zeros(fd, o, n)
                zero_bytes += n
            method = "zero-writes into holes and unwritten extents" if fiemap_used \
                else "zero-writes into holes (no FIEMAP: unwritten extents not seen)"
    os.fsync(fd)
    ed.done.append("allocated the data clusters (%s)" % mode)
    return {"method": method, "runs": len(runs), "zero_bytes": zero_bytes,
            "data_bytes": sum(n for _off, n in runs)}


def _holes(fd, offset, length):
    pos = offset
    for o, n in fileops.data_segments(fd, offset, length):
        if o > pos:
            yield pos, o - pos
        pos = o + n
    if pos < offset + length:
        yield pos, offset + length - pos


def _write_zeros(fd, offset, length):
    from ..create.writer import write_zeros
    write_zeros(fd, offset, length)


def data_runs(ed):
    """Yield (host offset, length) of contiguous runs of host clusters behind guest clusters
    (data and allocated zero clusters; compressed ones excluded)."""
    cs = ed.cs
    clusters = div_round_up(ed.header.size, cs)
    run_start = run_len = 0
    for l1_index in range(min(len(ed.l1), div_round_up(clusters, ed.per_l2))):
        table = ed.l2_table(l1_index)
        if table is None:
            continue
        count = min(ed.per_l2, clusters - l1_index * ed.per_l2)
        for idx, n, desc, _bitmap in ed.l2_runs(table):
            if idx >= count:
                break
            n = min(n, count - idx)
            if ed.cluster_type(desc) not in (NORMAL, ZERO_ALLOC):
                continue
            host = desc & C.L2E_OFFSET_MASK
            if run_len and host == run_start + run_len * cs:
                run_len += n
            else:
                if run_len:
                    yield run_start, run_len * cs
                run_start, run_len = host, n
    if run_len:
        yield run_start, run_len * cs


__all__ = ["grow", "shrink", "fill", "raise_level", "raise_allocation", "data_runs"]
