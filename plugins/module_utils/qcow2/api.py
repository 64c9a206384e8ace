# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The engine's front door: create, grow, raise preallocation.

Callers (the Ansible modules, tools/qcow2) pass plain values and get plain dicts back; every
refusal is a Qcow2Error.
"""

import os
import stat

from . import constants as C
from .errors import Qcow2Error
from .header import decode_cluster0
from .options import CreateOptions
from .planner import plan_create
from . import resize
from . import writer


def resolve_relative(image_path, name):
    """A backing or data file name as QEMU resolves it: relative to the image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def backing_size(image_path, backing_file, backing_fmt):
    """The virtual size of a backing file, read only when the user left size out."""
    path = resolve_relative(image_path, backing_file)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Qcow2Error("backing_file: cannot open %s: %s" % (path, exc.strerror),
                         option="backing_file")
    if backing_fmt == "raw":
        if stat.S_ISBLK(st.st_mode):
            with open(path, "rb") as handle:
                return handle.seek(0, os.SEEK_END)
        return st.st_size
    if backing_fmt == "qcow2":
        with open(path, "rb") as handle:
            head = handle.read(2 * 1024 * 1024)
        try:
            hdr = decode_cluster0(head)[0]
        except Qcow2Error as exc:
            raise Qcow2Error("backing_file: %s is not a valid qcow2 image: %s" % (path, exc),
                             option="backing_file")
        return hdr.size
    raise Qcow2Error("size: cannot read the size of a %s backing file; give size explicitly"
                     % backing_fmt, option="size")


def parse_options(path, values):
    """Validate creation options for an image at `path` (reads the backing file's size only
    when size is left out)."""
    values = dict(values)
    size_from_backing = None
    if values.get("size") is None and values.get("backing_file") and values.get("backing_fmt"):
        size_from_backing = backing_size(path, values["backing_file"], values["backing_fmt"])
    return CreateOptions.from_dict(values, size_from_backing=size_from_backing)


def plan_for(path, opts):
    """The plan a create at `path` would apply (a device gets zero flags)."""
    return plan_create(opts, zero_flag=is_block_device(path))


def is_block_device(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def create(path, values, replace=False, mode=0o644, check_backing=True):
    """Create a qcow2 image at `path` from option values (dict). Returns a result dict."""
    opts = values if isinstance(values, CreateOptions) else parse_options(path, values)
    if opts.backing_file and check_backing:
        backing = resolve_relative(path, opts.backing_file)
        if not os.path.exists(backing):
            raise Qcow2Error("backing_file: %s does not exist" % backing, option="backing_file")
    device = is_block_device(path)
    plan = plan_create(opts, zero_flag=device)
    if device:
        if not replace:
            raise Qcow2Error("%s: is a block device that may hold data; writing an image onto "
                             "it needs force" % path, path=path)
        result = writer.write_device(path, plan)
    else:
        data_path = resolve_relative(path, opts.data_file) if opts.data_file else None
        result = writer.create_file(path, plan, replace=replace, mode=mode,
                                    data_file_path=data_path)
    out = result.as_dict()
    out.update({"path": path, "file_size": plan.file_size, "preallocation": plan.mode,
                "virtual_size": opts.size, "cluster_size": opts.cluster_size})
    return out


def grow(path, size, mode="off"):
    """Raise the virtual size in place; the new range is preallocated per `mode`."""
    data_path = None
    with open(path, "rb") as handle:
        head = handle.read(2 * 1024 * 1024)
    hdr, exts, _ = decode_cluster0(head)
    if hdr.incompatible_features & C.INCOMPAT_DATA_FILE:
        for ext in exts:
            if ext.type == C.EXT_DATA_FILE:
                data_path = resolve_relative(path, ext.data.decode("utf-8", "replace"))
    return resize.grow(path, size, mode, data_file_path=data_path)


def raise_preallocation(path, current, target):
    """Bring an image from preallocation level `current` up to `target` in place."""
    order = C.PREALLOC_MODES
    if order.index(target) <= order.index(current):
        return {"changed": False}
    result = {"changed": True, "steps": []}
    if current == "off":
        step = resize.fill(path, target)
        result["steps"].append(dict(step, action="map every guest cluster"))
    if target in ("falloc", "full"):
        # Also covers clusters that were mapped before: fallocate leaves written blocks
        # alone and zeros go only into holes and unwritten extents.
        step = resize.raise_allocation(path, target)
        result["steps"].append(dict(step, action="allocate data clusters (%s)" % target))
    return result
