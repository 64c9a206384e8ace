# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""QEMU's image lock protocol: open file description (OFD) locks on single bytes.

A QEMU process that holds permission i locks byte 100+i; one that refuses to share
permission i with others locks byte 200+i. All locks are shared read locks, so probing with a
write-lock query (F_OFD_GETLK, F_WRLCK) sees any of them without taking anything. A running
guest holds 100, 101 (write) and 103 (resize) and refuses sharing 201 and 203.

`probe()` only looks. `WriteLock` takes what a writing QEMU takes, so that a QEMU started
while we change an image is refused, and refuses to start when someone else writes or
forbids writers.
"""

import os
import struct

from ..format.errors import Qcow2Error

try:
    import fcntl
except ImportError:  # pragma: no cover - non-Unix
    fcntl = None

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_RDLCK = getattr(fcntl, "F_RDLCK", 0)
F_WRLCK = getattr(fcntl, "F_WRLCK", 1)
F_UNLCK = getattr(fcntl, "F_UNLCK", 2)

PERM_BASE = 100
SHARED_BASE = 200
PERMISSIONS = ("consistent_read", "write", "write_unchanged", "resize", "graph_mod")
WRITE = 1
RESIZE = 3

# struct flock on Linux x86-64 and aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, padding (32 bytes).
_FLOCK = struct.Struct("hhqqi4x")


def _flock(l_type, start):
    return _FLOCK.pack(l_type, os.SEEK_SET, start, 1, 0)


def _require_fcntl():
    if fcntl is None:
        raise Qcow2Error("image locking needs Linux open file description locks")


def _held_by_other(fd, byte):
    result = fcntl.fcntl(fd, F_OFD_GETLK, _flock(F_WRLCK, byte))
    return _FLOCK.unpack(result)[0] != F_UNLCK


def probe_fd(fd):
    """Which QEMU permissions others hold or refuse to share, seen through `fd`."""
    _require_fcntl()
    held = [name for i, name in enumerate(PERMISSIONS) if _held_by_other(fd, PERM_BASE + i)]
    unshared = [name for i, name in enumerate(PERMISSIONS)
                if _held_by_other(fd, SHARED_BASE + i)]
    return {"held": held, "unshared": unshared, "in_use": "write" in held,
            "writers_blocked": "write" in unshared}


def probe(path):
    """Probe `path` with a fresh read-only descriptor; sets no lock and changes nothing."""
    _require_fcntl()
    from .nodes import open_checked
    fd = open_checked(path, os.O_RDONLY, doing="cannot open to probe locks")[0]
    try:
        return probe_fd(fd)
    except OSError as exc:
        raise Qcow2Error("%s: cannot probe locks: %s" % (path, exc.strerror), path=path)
    finally:
        os.close(fd)


class WriteLock(object):
    """Hold QEMU's writer locks on an open image for the duration of a `with` block."""

    HELD = (PERM_BASE, PERM_BASE + WRITE, PERM_BASE + RESIZE)
    UNSHARED = (SHARED_BASE + WRITE, SHARED_BASE + RESIZE)

    def __init__(self, fd, path=None):
        self.fd = fd
        self.path = path or "image"
        self.taken = []

    def __enter__(self):
        _require_fcntl()
        try:
            busy = probe_fd(self.fd)
            if busy["in_use"] or "resize" in busy["held"] or busy["writers_blocked"] or \
                    "resize" in busy["unshared"]:
                raise Qcow2Error(
                    "%s: the image is in use by another process (a QEMU process holds it "
                    "or forbids writers); refusing to modify it" % self.path, path=self.path)
            for byte in self.HELD + self.UNSHARED:
                fcntl.fcntl(self.fd, F_OFD_SETLK, _flock(F_RDLCK, byte))
                self.taken.append(byte)
            # Someone may have locked between the probe and our locks: look once more.
            busy = probe_fd(self.fd)
            if busy["in_use"] or busy["writers_blocked"]:
                raise Qcow2Error("%s: the image is in use by another process; refusing to "
                                 "modify it" % self.path, path=self.path)
        except Qcow2Error:
            self._release()
            raise
        except OSError as exc:
            self._release()
            raise Qcow2Error("%s: the image is in use by another process (lock refused: %s)"
                             % (self.path, exc.strerror), path=self.path)
        return self

    def __exit__(self, *exc):
        self._release()
        return False

    def _release(self):
        for byte in self.taken:
            try:
                fcntl.fcntl(self.fd, F_OFD_SETLK, _flock(F_UNLCK, byte))
            except OSError:
                pass
        self.taken = []
