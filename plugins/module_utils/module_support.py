# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Glue shared by the modules: file attributes checked before anything is written, the mode a
new file is created with, backup names. (The qcow2 engine itself lives in `qcow2/` and imports
nothing from Ansible.)"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import grp
import os
import pwd
import stat
import time


class _FakeStat(object):
    def __init__(self, mode):
        self.st_mode = mode


def _umask():
    current = os.umask(0)
    os.umask(current)
    return current


def file_args_problem(module, path, params=None):
    """Why owner, group or mode cannot be applied to `path`, or None. Checked before an
    image is created, so a bad value never leaves a new image behind. `params` are the
    image's options (default: the module's)."""
    params = module.params if params is None else params
    owner, group, mode = params.get("owner"), params.get("group"), params.get("mode")
    if owner is not None and not str(owner).isdigit():
        try:
            pwd.getpwnam(str(owner))
        except KeyError:
            return "owner: the user %r does not exist on the host (for %s)" % (owner, path)
    if group is not None and not str(group).isdigit():
        try:
            grp.getgrnam(str(group))
        except KeyError:
            return "group: the group %r does not exist on the host (for %s)" % (group, path)
    if mode is not None:
        try:
            creation_mode(module, params)
        except (ValueError, TypeError) as exc:
            return "mode: %r is not a valid mode for %s (%s; use octal like '0640' or symbolic " \
                   "like 'u=rw,g=r,o=')" % (mode, path, exc)
    return None


def creation_mode(module, params=None):
    """The permission bits a new image file gets from the start (never wider than final).
    `params` are the image's options (default: the module's)."""
    mode = (module.params if params is None else params).get("mode")
    base = 0o666 & ~_umask()
    if mode is None:
        return base
    if isinstance(mode, int):
        return mode & 0o7777
    text = str(mode)
    if text.isdigit():
        return int(text, 8) & 0o7777
    return module._symbolic_mode_to_octal(_FakeStat(stat.S_IFREG | base), text) & 0o7777


def backup_name(path):
    """Where a backup of `path` goes, named like Ansible's backups."""
    return "%s.%s.%s" % (path, os.getpid(), time.strftime("%Y-%m-%d@%H:%M:%S~"))
