# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The notes every module of the collection carries about what it keeps on the host."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type


class ModuleDocFragment(object):

    DOCUMENTATION = r"""
options: {}
notes:
  - The module keeps the compiled bytecode of this collection's engine in a cache directory of
    the user it runs as, C($XDG_CACHE_HOME/vdisk.qcow2/bytecode) (by default
    C(~/.cache/vdisk.qcow2/bytecode), mode 0700, at most 128 files), in check mode too; Python
    caches nothing for code shipped in Ansible's module zip, and compiling the engine on every
    run was the largest cost of a re-check after Ansible's own. An entry is used only while its
    source is unchanged and only when it and its directory belong to that user and nobody else
    can write them. Set the environment variable C(VDISK_QCOW2_BYTECODE_CACHE=off) (for example
    with the task's C(environment)) to turn the cache off.
  - For an image with at least 256 L2 tables (128 GiB or more with 64 KiB clusters), the result
    of the walk over every L2 entry that tells its preallocation level is kept beside it, in
    C(~/.cache/vdisk.qcow2/observations) (one small file per image, at most 256, private to the
    user), together with the file's device, inode, size, blocks, modification and change times.
    The next run uses it only when all of these are unchanged, which the kernel guarantees
    after any write, truncation, fallocate or hole punch (the change time cannot be set back),
    and only when the file had not changed for 2 seconds before the walk. Block devices are
    always walked. C(VDISK_QCOW2_OBSERVATION_CACHE=off) turns this off.
"""
