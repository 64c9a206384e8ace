# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The one path of every in-place change: open read-write under QEMU's write locks, pass the
guard, edit through an `Editor`.

`editing(path)` is the only way the engine opens an existing image for writing. Before it hands
out the editor it runs the guard (`guard_image`): an image that is marked dirty or corrupt, that
is encrypted and not opened by the passphrase given, or whose consistency check finds
corruptions is refused before the first write.
`preflight(path)` runs the same guard without writing and without the lock, so check mode can
predict a refusal. The rules about what a change may do to the guest's view live with the
changes' planners (`resize`), which run against the same model (`Editor` is an `image.Image`).

When an edit fails after it wrote something, the Qcow2Error it raises carries `modified=True`
and `done` (what was completed), so the caller can report a changed file honestly.
"""

import contextlib
import os
import stat
import struct

from ..format import constants as C
from ..format.tables import div_round_up
from ..read.check import check
from ..format.errors import Qcow2Error
from ..read.image import DECODE_ERRORS, Image
from ..format.l2runs import RefcountError
from ..format.refcounts import get_refcount, last_nonzero, set_range

_READ_LIMIT = 32 * 1024 * 1024


def guard_image(img, path, run_check=True, passphrase=None):
    """Refuse an image no in-place change may touch; returns the consistency check's result
    (None when not run). Reads only. A LUKS-encrypted image passes only with a `passphrase`
    (bytes) that opens one of its key slots: a wrong one is refused before any write."""
    hdr = img.header
    if hdr.incompatible_features & C.INCOMPAT_DIRTY:
        raise Qcow2Error(
            "%s: the image is marked dirty (a QEMU using lazy refcounts stopped without "
            "writing its reference counts back), so its refcounts cannot be trusted; it is not "
            "modified. Repair it with 'qemu-img check -r all %s' (or open it once with QEMU), "
            "then run again" % (path, path), path=path)
    if hdr.incompatible_features & C.INCOMPAT_CORRUPT:
        raise Qcow2Error("%s: the image is marked corrupt; it is not modified. Repair it with "
                         "'qemu-img check -r all %s' (back it up first)" % (path, path),
                         path=path)
    if hdr.crypt_method:
        check_key(img, path, passphrase)
    if not run_check:
        return None
    result = check(path, image=img, max_messages=5)
    errors = result.get("corruptions", 0) + result.get("check-errors", 0)
    if errors:
        first = "; ".join(m for m in result.get("messages", []) if not m.startswith("Leaked"))
        raise Qcow2Error(
            "%s: the consistency check found %d corruption(s) and %d other error(s), so the "
            "image is not modified (a change would build on damaged tables). Repair it with "
            "'qemu-img check -r all %s' (back it up first), then run again. First problems: %s"
            % (path, result.get("corruptions", 0), result.get("check-errors", 0), path,
               first or "see qemu-img check"), path=path)
    return result


def check_key(img, path, passphrase):
    """Refuse an encrypted image unless `passphrase` opens it (LUKS only). Reads only; the key
    slot is derived once per process (crypto/luks1.unlock remembers what it opened)."""
    if img.header.crypt_method != C.CRYPT_LUKS:
        raise Qcow2Error("%s: the image is encrypted with qcow's legacy AES method, which QEMU "
                         "no longer opens for writing; it is not modified" % path, path=path)
    if passphrase is None:
        raise Qcow2Error("encrypt_passphrase: %s is LUKS encrypted; changing it in place needs "
                         "its passphrase (encrypt_passphrase or encrypt_passphrase_file)" % path,
                         option="encrypt_passphrase", path=path)
    from ..crypto import luks1
    try:
        luks1.unlock(img.luks_region(), passphrase)
    except Qcow2Error as exc:
        raise Qcow2Error("%s: %s; it is not modified" % (path, exc), option=exc.option,
                         path=path)


def preflight(path, run_check=True, passphrase=None):
    """The guard without writing or locking: raises what `editing` would raise."""
    with Image.open(path) as img:
        return guard_image(img, path, run_check, passphrase)


def _open_locked(path):
    """Open an image read-write and hold QEMU's writer locks; refuse if a QEMU holds it."""
    from ..read.lock import WriteLock  # imported late: lock.py is Linux-only at call time
    from ..read.nodes import check_fd_identity, open_checked
    # Never through a symbolic link, never a FIFO or device node, and only the file that was
    # inspected (the identity api.apply registered for this path), checked before any write.
    fd, st = open_checked(path, os.O_RDWR, doing="cannot open the image for writing")
    try:
        check_fd_identity(path, st)
        lock = WriteLock(fd)
        lock.__enter__()
    except BaseException:
        os.close(fd)
        raise
    return fd, lock


def _close_locked(fd, lock):
    try:
        lock.__exit__(None, None, None)
    finally:
        os.close(fd)


@contextlib.contextmanager
def editing(path, run_check=True, passphrase=None):
    """Yield an Editor for `path` that has passed the guard (`passphrase`: the key of an
    encrypted image); failures carry `modified`."""
    fd, lock = _open_locked(path)
    ed = None
    try:
        ed = Editor(fd, path)
        ed.check_result = guard_image(ed, path, run_check, passphrase)
        yield ed
    except Qcow2Error as exc:
        _mark(exc, ed)
        raise
    except OSError as exc:
        err = Qcow2Error("%s: %s while changing the image in place%s"
                         % (path, exc.strerror or exc,
                            "" if ed is None or not ed.modified else
                            " (it was left consistent: what was written is counted, at "
                            "worst as leaked clusters the next run reclaims)"), path=path)
        _mark(err, ed)
        raise err
    except DECODE_ERRORS + (RefcountError,) as exc:
        err = Qcow2Error("corrupt image %s: %s" % (path, exc), path=path)
        _mark(err, ed)
        raise err
    finally:
        _close_locked(fd, lock)


def _mark(exc, ed):
    exc.modified = bool(ed is not None and ed.modified)
    exc.done = list(ed.done) if ed is not None else []


class Editor(Image):
    """An image open for writing: the read model plus the L1 and refcount table in memory, the
    refcount blocks it touches, and write primitives that record that the file changed."""

    def __init__(self, fd, path):
        st = os.fstat(fd)
        self.device = stat.S_ISBLK(st.st_mode)
        size = os.lseek(fd, 0, os.SEEK_END) if self.device else st.st_size
        self.modified = False
        self.done = []
        self.check_result = None
        Image.__init__(self, os.fdopen(fd, "rb", buffering=0, closefd=False), size, path=path)
        hdr = self.header
        self.cs = self.cluster_size
        self.order = hdr.refcount_order
        self.rb_entries = self.refblock_entries
        self.entry_size = self.l2_entry_size
        self.per_l2 = self.l2_entries
        self.external = self.has_data_file
        self.l1 = self._read_entries(hdr.l1_table_offset, hdr.l1_size, "L1 table")
        self.reftable = list(struct.unpack(">%dQ" % self.reftable_entries, self._reftable))
        self._blocks = {}

    def _read_entries(self, offset, count, what):
        if count == 0:
            return []
        nbytes = count * 8
        if nbytes > _READ_LIMIT:
            raise Qcow2Error("%s: %s at offset %d with %d entries is not plausible"
                             % (self.path, what, offset, count), path=self.path)
        return list(struct.unpack(">%dQ" % count, self.read(offset, nbytes)))

    # ------------------------------------------------------------------ the model, kept current
    def l1_entry(self, index):
        return self.l1[index] if 0 <= index < len(self.l1) else 0

    def reftable_entry(self, index):
        return self.reftable[index] if 0 <= index < len(self.reftable) else 0

    def block_at(self, index):
        """The refcount block for reftable index `index` as a bytearray, or None."""
        if index in self._blocks:
            return self._blocks[index]
        if index >= len(self.reftable) or not self.reftable[index] & C.REFT_OFFSET_MASK:
            return None
        data = bytearray(self.read(self.reftable[index] & C.REFT_OFFSET_MASK, self.cs))
        self._blocks[index] = data
        return data

    def refcount(self, cluster):
        block = self.block_at(cluster // self.rb_entries)
        if block is None:
            return 0
        return get_refcount(block, cluster % self.rb_entries, self.order)

    def last_refcounted(self):
        for index in range(len(self.reftable) - 1, -1, -1):
            block = self.block_at(index)
            if block is None:
                continue
            last = last_nonzero(block, self.order, self.rb_entries)
            if last >= 0:
                return index * self.rb_entries + last
        return -1

    def first_free_cluster(self):
        """The first cluster past every refcounted cluster (and, for a file, past its end:
        appended clusters then read zeros until written)."""
        end = self.last_refcounted() + 1
        if not self.device:
            end = max(end, div_round_up(self.file_size, self.cs))
        return end

    def l2_table(self, l1_index):
        """The bytes of the L2 table of L1 entry `l1_index`, or None when unmapped."""
        offset = self.l1_entry(l1_index) & C.L1E_OFFSET_MASK
        if not offset:
            return None
        if offset + self.cs > self.file_size:
            raise Qcow2Error("%s: L2 table at %d lies past the end of the file"
                             % (self.path, offset), path=self.path)
        return self.read(offset, self.cs)

    # ------------------------------------------------------------------ writing
    def pwrite(self, offset, data):
        self.modified = True
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def truncate(self, length):
        self.modified = True
        os.ftruncate(self.fd, length)
        self.file_size = length

    def sync(self):
        os.fsync(self.fd)

    def release(self, first, count):
        """Drop the refcount of `count` clusters from `first` to zero (they become free)."""
        touched = {}
        for index in range(first // self.rb_entries,
                           div_round_up(first + count, self.rb_entries)):
            block = self.block_at(index)
            if block is None:
                continue
            lo = max(first, index * self.rb_entries) - index * self.rb_entries
            hi = min(first + count, (index + 1) * self.rb_entries) - index * self.rb_entries
            set_range(block, lo, hi, 0, self.order)
            touched[index] = block
        for index, block in sorted(touched.items()):
            self.pwrite(self.reftable[index] & C.REFT_OFFSET_MASK, bytes(block))


__all__ = ["editing", "preflight", "guard_image", "Editor"]
