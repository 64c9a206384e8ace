# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Temporary files of this engine: made locked, and found again when a killed run left them.

A new image (or external data file) is written to `.NAME.PID.STAMP.tmp` in the target
directory and renamed into place. `open_temp` creates that file and takes an exclusive `flock`
on it before anyone could mistake it for a leftover: while the writer lives, the lock is held.
A file of that pattern whose lock can be taken, which is a regular file, and which is older than
the run looking at it (its mtime is before `started`) was left by a killed run: `find` lists
such files and `remove` deletes them (each re-checked under its lock just before the unlink).
"""

import errno
import os
import re
import stat
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - non-Unix
    fcntl = None

# When this process started its work: a module run imports the engine first thing, so files
# older than this were not made by this run.
RUN_STARTED = time.time()

_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<stamp>\d+)\.tmp$")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
    getattr(os, "O_CLOEXEC", 0)
MAX_LISTED = 10000              # directory entries looked at, at most (a bound on hostile dirs)


def temp_name(path):
    directory, name = os.path.split(os.path.abspath(path))
    stamp = int(time.monotonic() * 1e6) % 10 ** 9
    return os.path.join(directory, ".%s.%d.%d.tmp" % (name, os.getpid(), stamp))


def open_temp(path, mode):
    """Create a new temporary file for `path` and lock it; returns (temp path, fd).

    The lock is taken before the file is trusted as ours: if a cleaner removed the file in the
    instant between its creation and the lock, the name no longer leads to our file and we start
    again under a new name."""
    last = None
    for _attempt in range(8):
        tmp = temp_name(path)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     mode)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.lstat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except OSError as exc:
            last = exc
        os.close(fd)
    raise OSError(errno.EAGAIN, "could not create a locked temporary file (%s)"
                  % (last or "removed while being created"))


def owner_name(entry):
    """The image name a temporary file entry belongs to, or None when it is not one of ours."""
    match = _PATTERN.match(entry)
    return match.group("name") if match else None


def _stale(full, started):
    """(size, fd holding the lock) when `full` is a leftover, else None."""
    try:
        st = os.lstat(full)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_mtime >= started:
        return None
    try:
        fd = os.open(full, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_ino != st.st_ino:
            raise OSError(errno.ESTALE, "replaced")
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # held: a live writer owns it
    except OSError:
        os.close(fd)
        return None
    return st.st_size, fd


def find(path, same_name_only=False, started=None):
    """Leftover temporary files in the directory of `path`: a list of (entry name, bytes).

    With `same_name_only`, only those of `path`'s own name. Reads only."""
    started = RUN_STARTED if started is None else started
    directory, name = os.path.split(os.path.abspath(path))
    out = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return out
    for entry in entries[:MAX_LISTED]:
        owner = owner_name(entry)
        if owner is None or (same_name_only and owner != name):
            continue
        found = _stale(os.path.join(directory, entry), started)
        if found is not None:
            size, fd = found
            os.close(fd)
            out.append((entry, size))
    return sorted(out)


def remove(path, entries, started=None):
    """Remove the named leftovers of `path`'s directory that are still leftovers (each checked
    again under its lock); returns the names removed."""
    started = RUN_STARTED if started is None else started
    directory = os.path.dirname(os.path.abspath(path))
    removed = []
    for entry in entries:
        if owner_name(entry) is None:
            continue
        full = os.path.join(directory, entry)
        found = _stale(full, started)
        if found is None:
            continue
        fd = found[1]
        try:
            if os.lstat(full).st_ino == os.fstat(fd).st_ino:
                os.unlink(full)
                removed.append(entry)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
