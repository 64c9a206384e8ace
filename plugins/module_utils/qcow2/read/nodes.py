# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What is at a path, looked at before anything opens it, and opened so nothing can block.

An image, a backing file or a source is a regular file or a block device. Anything else given
by name (a FIFO, a socket, a character device, a directory, a path through a regular file) is
refused before it is opened: opening a FIFO for reading blocks until a writer comes, and opening
a device node can have effects of its own. `check_node` looks with lstat (stat when links may be
followed) and names what it found; `open_checked` opens with O_NONBLOCK and O_NOFOLLOW (unless
links may be followed), checks with fstat that the descriptor is a regular file or a block
device and only then clears O_NONBLOCK.

The image path is never followed (the modules resolve `follow: true` before calling the engine).
Backing files and sources are names a user or an image gave and may be symbolic links; the node
they lead to must still be a regular file or a block device.

Identity: `identity(st)` is (st_dev, st_ino). What the reconciler looked at is recorded by
`api.observe`; `api.apply` registers it with `expect(path, identity)`, and every write path
compares what it opened (fstat) or what is at the path (lstat) with it before writing, so a
path swapped between the look and the write is refused instead of written through.
"""

import contextlib
import errno
import os
import stat

from ..format.errors import Qcow2Error

__all__ = ["describe", "check_node", "open_checked", "identity", "expect", "expected",
           "same_identity", "check_identity", "check_fd_identity", "lstat_identity"]

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
)

CHANGED = "changed between the look and the write"


def describe(st_mode):
    """A human name of the node type in `st_mode` ("a FIFO (named pipe)", ...)."""
    for test, name in _KINDS:
        if test(st_mode):
            return name
    return "an unknown kind of file (mode %o)" % stat.S_IFMT(st_mode)


def usable(st_mode):
    """A regular file or a block device: the only nodes an image may live in."""
    return stat.S_ISREG(st_mode) or stat.S_ISBLK(st_mode)


def _prefix(what):
    return "%s: " % what if what else ""


def _error(path, what, text, option=None):
    return Qcow2Error("%s%s %s" % (_prefix(what), path, text), option=option, path=path)


def _os_error(path, what, exc, option=None, doing="cannot inspect"):
    if exc.errno == errno.ENOTDIR:
        return _error(path, what, "cannot be used: a component of the path is not a directory",
                      option)
    if exc.errno == errno.ELOOP:
        return _error(path, what, "cannot be used: too many levels of symbolic links (or a "
                      "symbolic link where none is followed)", option)
    return _error(path, what, "%s: %s" % (doing, exc.strerror or exc), option)


def refuse_kind(path, st_mode, what=None, option=None):
    """The Qcow2Error for a node that is not a regular file or a block device."""
    kind = describe(st_mode)
    if stat.S_ISLNK(st_mode):
        return _error(path, what, "is a symbolic link; it is not followed (give the real path, "
                      "or follow=true); nothing was changed", option)
    return _error(path, what, "is %s, not a regular file or a block device; it is neither "
                  "read nor replaced nor removed" % kind, option)


def check_node(path, what=None, follow=False, option=None):
    """The lstat (stat with `follow`) of `path`, or None when nothing is there.

    Raises a Qcow2Error naming the node when it is anything but a regular file or a block
    device (a symbolic link too, unless `follow`); a dangling link followed is "nothing"."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise _os_error(path, what, exc, option)
    if not usable(st.st_mode):
        raise refuse_kind(path, st.st_mode, what, option)
    return st


def open_checked(path, flags, follow=False, what=None, option=None, doing="cannot open"):
    """Open `path` without blocking and without following a final symbolic link (unless
    `follow`); returns (fd, fstat). Refuses, before and after the open, anything but a regular
    file or a block device. O_NONBLOCK is cleared again before the descriptor is returned."""
    st = check_node(path, what, follow, option)
    if st is None:
        raise _error(path, what, "%s: %s" % (doing, os.strerror(errno.ENOENT)), option)
    extra = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        extra |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | extra)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise _error(path, what, "became a symbolic link before it was opened; it is not "
                         "followed (%s)" % CHANGED, option)
        if exc.errno == errno.ENXIO:
            raise _error(path, what, "is no longer a regular file (%s)" % CHANGED, option)
        raise _os_error(path, what, exc, option, doing)
    try:
        fst = os.fstat(fd)
        if not usable(fst.st_mode):
            raise refuse_kind(path, fst.st_mode, what, option)
        if extra & getattr(os, "O_NONBLOCK", 0):
            import fcntl
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    except OSError as exc:
        os.close(fd)
        raise _os_error(path, what, exc, option, doing)
    except BaseException:
        os.close(fd)
        raise
    return fd, fst


def identity(st):
    """(st_dev, st_ino) of a stat result, or None for None."""
    if st is None:
        return None
    return (st.st_dev, st.st_ino)


def same_identity(expected_id, st):
    return expected_id is None or (st is not None and
                                   tuple(expected_id) == (st.st_dev, st.st_ino))


_EXPECTED = {}


def _key(path):
    return os.path.abspath(path)


@contextlib.contextmanager
def expect(path, ident):
    """While the block runs, every write path for `path` insists on finding `ident` there
    ((st_dev, st_ino) of what was inspected; None registers nothing)."""
    if ident is None:
        yield
        return
    key = _key(path)
    before = _EXPECTED.get(key)
    _EXPECTED[key] = tuple(ident)
    try:
        yield
    finally:
        if before is None:
            _EXPECTED.pop(key, None)
        else:
            _EXPECTED[key] = before


def expected(path):
    """The identity registered for `path` with `expect`, or None."""
    return _EXPECTED.get(_key(path))


def _changed(path, found):
    return Qcow2Error("%s: the file at this path %s (%s is there now); nothing was written "
                      "to it" % (path, CHANGED, found), path=path)


def check_fd_identity(path, fd_stat, ident=None):
    """Refuse when the descriptor opened for `path` is not the file that was inspected."""
    ident = ident if ident is not None else expected(path)
    if ident is not None and not same_identity(ident, fd_stat):
        raise _changed(path, "another file")


def lstat_identity(path):
    try:
        return os.lstat(path)
    except OSError:
        return None


def check_identity(path, ident=None):
    """Right before a rename onto, a link of or an unlink of `path`: refuse when what is at
    `path` now is not what was inspected (a link, another file, or nothing)."""
    ident = ident if ident is not None else expected(path)
    if ident is None:
        return
    st = lstat_identity(path)
    if st is None:
        raise _changed(path, "nothing")
    if not same_identity(ident, st):
        raise _changed(path, describe(st.st_mode) if not stat.S_ISREG(st.st_mode)
                       else "another file")
