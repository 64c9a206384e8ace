# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The allocation walk of a big image, remembered while the file is provably unchanged.

Reporting a preallocation level exactly means looking at every L2 entry: 128 MiB of tables
for a 1 TiB image, the largest cost of a re-check after Python's start. A re-check usually
finds the file exactly as the last run left it, and the kernel says whether it is: every
write, truncation, fallocate or hole punch sets the file's change time (ctime), which no
user can set back (unlike mtime). So the result of a walk is kept with the file's identity
and times (device, inode, size, blocks, mtime and ctime in nanoseconds) and used again only
when all of them are still the same.

The one trap is a write within the same tick of the kernel's clock as the walk, which would
leave the times unchanged: a walk is remembered only when the file's last change is more than
SETTLED_SECONDS in the past, and only when the file did not change during the walk. Only
regular files are remembered (writes to a block device do not change its node's times), and
only images with at least MIN_L2_TABLES L2 tables (for smaller ones walking is cheaper than
remembering).

Entries live in `$XDG_CACHE_HOME/vdisk.qcow2/observations` (default `~/.cache/...`), one
small JSON file per inode, in a directory private to the user; an entry that is not private
to the user, not valid JSON or not the expected shape is ignored. VDISK_QCOW2_OBSERVATION_CACHE
=off turns this off.
"""

import hashlib
import json
import os
import stat
import time

from ..format.errors import Qcow2Error

ENV = "VDISK_QCOW2_OBSERVATION_CACHE"
VERSION = 1
MIN_L2_TABLES = 256
SETTLED_SECONDS = 2.0
MAX_ENTRY_BYTES = 1 << 16
MAX_ENTRIES = 256
LEVELS = ("off", "metadata", "falloc", "full")
# The result's keys and the types each must have.
SHAPE = {"preallocation": str, "guest_data": bool, "method": str, "mapped_clusters": int,
         "total_clusters": int, "unallocated_host_bytes": (int, type(None)),
         "unwritten_host_bytes": (int, type(None)), "fall_through_clusters": int}


def _directory():
    if os.environ.get(ENV, "").lower() in ("0", "off", "no", "false"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    return os.path.join(base, "vdisk.qcow2", "observations")


def _owned(st, is_kind):
    return is_kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _entry(image):
    """(entry path, key) for this image, or None when it is not to be remembered."""
    if image.fd is None or image.header.l1_size < MIN_L2_TABLES:
        return None
    directory = _directory()
    if directory is None:
        return None
    st = os.fstat(image.fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    key = [VERSION, st.st_dev, st.st_ino, st.st_size, st.st_blocks, st.st_mtime_ns,
           st.st_ctime_ns]
    name = hashlib.sha256(("%d:%d" % (st.st_dev, st.st_ino)).encode()).hexdigest()[:40]
    return os.path.join(directory, name + ".json"), key


def prepare(image):
    """Taken before the walk: the entry this image would use and the file's key then, or
    None when the image is not to be remembered."""
    try:
        found = _entry(image)
    except (OSError, Qcow2Error):
        return None
    return None if found is None else (found[0], found[1], time.time())


def recall(token):
    """The remembered allocation_state for `token` (from prepare), or None."""
    if token is None:
        return None
    path, key, _started = token
    try:
        if not _owned(os.lstat(os.path.dirname(path)), stat.S_ISDIR):
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if not _owned(os.fstat(fd), stat.S_ISREG):
                return None
            data = os.read(fd, MAX_ENTRY_BYTES + 1)
        finally:
            os.close(fd)
        entry = json.loads(data.decode("utf-8")) if len(data) <= MAX_ENTRY_BYTES else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    state = entry.get("state")
    if not isinstance(state, dict) or set(state) != set(SHAPE) or \
            state["preallocation"] not in LEVELS:
        return None
    for name, kind in SHAPE.items():
        value = state[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return None
    return state


def remember(token, image, state):
    """Keep `state`, the allocation_state walked after prepare() gave `token`, when the file
    had been settled for SETTLED_SECONDS before the walk and did not change during it. Never
    raises: remembering only saves time."""
    if token is None or set(state) != set(SHAPE):
        return
    path, key, started = token
    if started - key[-1] / 1e9 <= SETTLED_SECONDS:
        return
    directory = os.path.dirname(path)
    temp = "%s.%d.tmp" % (path, os.getpid())
    try:
        try:
            os.makedirs(directory, 0o700)
        except OSError:
            pass
        if not _owned(os.lstat(directory), stat.S_ISDIR):
            return
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        try:
            os.write(fd, json.dumps({"key": key, "state": state}).encode("utf-8"))
        finally:
            os.close(fd)
        if _entry(image) == (path, key):        # the file did not change during the walk
            os.rename(temp, path)
            _trim(directory)
        else:
            os.unlink(temp)
    except (OSError, ValueError, TypeError, Qcow2Error):
        try:
            os.unlink(temp)
        except OSError:
            pass


def _trim(directory):
    """At most MAX_ENTRIES entries: the least recently written go."""
    names = [n for n in os.listdir(directory) if n.endswith(".json")]
    if len(names) > MAX_ENTRIES:
        names.sort(key=lambda n: os.lstat(os.path.join(directory, n)).st_mtime)
        for name in names[:len(names) - MAX_ENTRIES]:
            os.unlink(os.path.join(directory, name))
