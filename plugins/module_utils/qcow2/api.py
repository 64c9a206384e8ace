# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The engine's front door: create, grow, raise preallocation.

Callers (the Ansible modules, tools/qcow2) pass plain values and get plain dicts back; every
refusal is a Qcow2Error.
"""

import os
import stat
import struct

from .format import constants as C
from .format.errors import Qcow2Error
from .format.header import decode_cluster0
from .format.options import CreateOptions, check_backing_fmt
from .read import nodes

# Only what observing and deciding need is imported here: the code that creates, edits or
# copies an image is imported inside the functions that use it, so a run that finds the image
# as declared never loads it (see docs/development.md, "Lazy by layout").


def resolve_relative(image_path, name):
    """A backing or data file name as QEMU resolves it: relative to the image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def backing_realpath(image_path, name):
    """The file a backing name leads to (symbolic links resolved), for comparing names."""
    return os.path.realpath(resolve_relative(image_path, name))


def validate_declaration(declared):
    """Check a declaration's own option rules before comparing it with anything: an impossible
    combination is an error naming the option, not a conflict that force could 'fix'. The
    backing file is not read (a missing size is taken as 1 MiB here)."""
    from .reconcile import creation_values
    values = creation_values(declared)
    if values.get("size") is None:
        values["size"] = 1 << 20
    if values.get("backing_fmt"):
        check_backing_fmt(str(values["backing_fmt"]))
    if values.get("backing_file") and values.get("preallocation", "off") != "off" and \
            not values.get("extended_l2"):
        # Adopting an existing overlay may still be possible; the reconciler decides.
        values["preallocation"] = "off"
    return CreateOptions.from_dict(values)


def backing_size(image_path, backing_file, backing_fmt, planned=None):
    """The virtual size of a backing file, read only when the user left size out (or taken
    from `planned`, see preflight)."""
    path = resolve_relative(image_path, backing_file)
    if backing_fmt == "qcow2" and _planned(planned, path):
        return planned[os.path.realpath(path)]["virtual_size"]
    _check_backing(image_path, backing_file, planned)
    # A backing name may be a symbolic link; the node it leads to must be a file or a device.
    fd, st = nodes.open_checked(path, os.O_RDONLY, follow=True, what="backing_file",
                                option="backing_file")
    with os.fdopen(fd, "rb", buffering=0) as handle:
        if backing_fmt == "raw":
            if stat.S_ISBLK(st.st_mode):
                return handle.seek(0, os.SEEK_END)
            return st.st_size
        head = handle.read(2 * 1024 * 1024) if backing_fmt == "qcow2" else None
    if backing_fmt == "qcow2":
        try:
            hdr = decode_cluster0(head)[0]
        except Qcow2Error as exc:
            raise Qcow2Error("backing_file: %s is not a valid qcow2 image: %s" % (path, exc),
                             option="backing_file")
        return hdr.size
    raise Qcow2Error("size: cannot read the size of a %s backing file; give size explicitly"
                     % backing_fmt, option="size")


def parse_options(path, values, planned=None):
    """Validate creation options for an image at `path` (reads the backing file's size only
    when size is left out)."""
    values = dict(values)
    size_from_backing = None
    if values.get("backing_fmt"):
        check_backing_fmt(str(values["backing_fmt"]))
    if values.get("size") is None and values.get("backing_file") and values.get("backing_fmt"):
        size_from_backing = backing_size(path, values["backing_file"], values["backing_fmt"],
                                         planned)
    return CreateOptions.from_dict(values, size_from_backing=size_from_backing)


def plan_for(path, opts):
    """The plan a create at `path` would apply (a device gets zero flags; an encrypted image
    a LUKS header region of the size its key slots take)."""
    from .create.planner import plan_create
    region = bytes(opts.encryption.region_size()) if opts.encryption is not None else None
    return plan_create(opts, zero_flag=is_block_device(path), luks_header=region)


def is_block_device(path):
    """Whether the node at `path` itself (a link is not followed) is a block device."""
    try:
        return stat.S_ISBLK(os.lstat(path).st_mode)
    except OSError:
        return False


def _planned(planned, path):
    """Whether `planned` (see preflight) says what the file at `path` will be."""
    return bool(planned) and planned.get(os.path.realpath(path)) is not None


def _check_backing(path, backing_file, planned=None):
    """The backing file must exist and be a regular file or a block device (it may be reached
    through a symbolic link); it is not opened here."""
    backing = resolve_relative(path, backing_file)
    if planned and os.path.realpath(backing) in planned:
        if planned[os.path.realpath(backing)] is None:
            raise Qcow2Error("backing_file: %s does not exist" % backing, option="backing_file")
        return
    if nodes.check_node(backing, "backing_file", follow=True, option="backing_file") is None:
        raise Qcow2Error("backing_file: %s does not exist" % backing, option="backing_file")


def starts_with_qcow2_header(path):
    """Whether the regular file or block device `path` (a link is followed) begins with the
    qcow2 magic; False for anything that cannot be read (the real checks say why later)."""
    try:
        fd, _st = nodes.open_checked(path, os.O_RDONLY, follow=True)
    except (Qcow2Error, OSError):
        return False
    try:
        return os.pread(fd, 4, 0) == struct.pack(">I", C.MAGIC)
    except OSError:
        return False
    finally:
        os.close(fd)


def open_source(source, source_format, allow_backing=False, passphrase=None):
    """Open a source of guest content (raw or qcow2, read-only); a Source (close it). A qcow2
    source with a backing file is refused unless `allow_backing` (the chain is trusted). A
    LUKS-encrypted qcow2 source opens only with a `passphrase` (bytes) that unlocks it."""
    from .copy.source import open_source as _open
    if source_format not in ("raw", "qcow2"):
        raise Qcow2Error("source_format: %r is not raw or qcow2 (the format of a source is never "
                         "guessed)" % (source_format,), option="source_format")
    return _open(source, source_format, allow_backing=allow_backing, passphrase=passphrase)


def source_options(path, values, source):
    """CreateOptions for a copy of an open source: the size defaults to the source's."""
    values = dict(values)
    if values.get("size") is None:
        values["size"] = source.size
    opts = parse_options(path, values)
    from .copy.convert import check_source_fits
    check_source_fits(opts, source)
    return opts


def create_from(path, values, source, source_format, replace=False, mode=0o644,
                allow_backing=False, passphrase=None, iterations=None, source_passphrase=None):
    """Create the image at `path` with the guest content of a source. Returns a dict. A qcow2
    source's backing chain is flattened only with `allow_backing`, else refused.

    With encrypt_* options (or a `passphrase` alone: QEMU's defaults) the copy is LUKS
    encrypted as it is written, key slot 0 opening with `passphrase` (as for create);
    `source_passphrase` (bytes) opens an encrypted source."""
    from .copy.convert import create_from_source
    nodes.check_node(path)
    if passphrase is not None and not isinstance(values, CreateOptions) and \
            values.get("encrypt_format") is None:
        values = dict(values, encrypt_format="luks")
    src = open_source(source, source_format, allow_backing=allow_backing,
                      passphrase=source_passphrase)
    try:
        if replace and os.path.lexists(path):
            from .read import lock
            if _in_use(lock, path):
                raise Qcow2Error("%s: the image is in use by a running QEMU; it is not replaced"
                                 % path, path=path)
        opts = source_options(path, values, src)
        from .create import encrypted
        encrypted.check(path, opts, passphrase)
        _check_directory(path, "create the image")
        luks = None
        if opts.encryption is not None:
            luks = encrypted.keys(opts.encryption, passphrase, iterations)
        return create_from_source(path, opts, src, replace=replace, mode=mode, luks=luks)
    finally:
        src.close()


def create(path, values, replace=False, mode=0o644, check_backing=True, passphrase=None,
           iterations=None):
    """Create a qcow2 image at `path` from option values (dict). Returns a result dict.

    With encrypt_* options (or a `passphrase` alone: QEMU's defaults) the image is LUKS
    encrypted: key slot 0 opens with `passphrase` (bytes), its PBKDF2 rounds `iterations`
    (slot, master key digest) or calibrated to encrypt_iter_time; its preallocated clusters
    read zeros (zero flag)."""
    from .create import writer
    from .create.planner import plan_create
    # A link at the image path is never followed nor replaced; a FIFO, socket, character
    # device or directory is never opened nor replaced.
    nodes.check_node(path)
    if passphrase is not None and not isinstance(values, CreateOptions) and \
            values.get("encrypt_format") is None:
        values = dict(values, encrypt_format="luks")
    opts = values if isinstance(values, CreateOptions) else parse_options(path, values)
    if opts.backing_file and check_backing:
        _check_backing(path, opts.backing_file)
    device = is_block_device(path)
    from .create import encrypted
    encrypted.check(path, opts, passphrase, device)
    if replace and os.path.lexists(path):
        from .read import lock
        if _in_use(lock, path):
            raise Qcow2Error("%s: the image is in use by a running QEMU; it is not replaced"
                             % path, path=path)
    luks = encrypted.keys(opts.encryption, passphrase, iterations) if opts.encryption else None
    plan = plan_create(opts, zero_flag=device, luks_header=luks[0] if luks else None)
    content = encrypted.zeros_writer(opts.encryption, luks[1]) if plan.encrypted_zeros else None
    if device:
        if not replace:
            raise Qcow2Error("%s: is a block device that may hold data; writing an image onto "
                             "it needs force" % path, path=path)
        result = writer.write_device(path, plan)
    else:
        data_path = resolve_relative(path, opts.data_file) if opts.data_file else None
        if content is not None:
            writer.check_space(os.path.dirname(os.path.abspath(path)), plan)
        result = writer.create_file(path, plan, replace=replace, mode=mode,
                                    data_file_path=data_path, content=content)
    out = result.as_dict()
    out.update({"path": path, "file_size": plan.file_size, "preallocation": plan.mode,
                "virtual_size": opts.size, "cluster_size": opts.cluster_size})
    return out


def verify_passphrase(path, passphrase):
    """Raise the Qcow2Error of the editor's guard unless `passphrase` opens a key slot of the
    LUKS-encrypted image at `path` (nothing to do for a plain image). Reads only; costs one
    key slot derivation, remembered for the rest of the process."""
    from .edit.editor import check_key
    from .read.image import Image
    with Image.open(path) as img:
        if img.header.crypt_method:
            check_key(img, path, passphrase)


def grow(path, size, mode="off", passphrase=None):
    """Raise the virtual size in place; the new range reads zeros and is preallocated per
    `mode`. `passphrase` (bytes): the key of an encrypted image, which is refused without it."""
    from .edit import resize
    return resize.grow(path, size, mode, passphrase=passphrase)


def raise_preallocation(path, current, target, passphrase=None):
    """Bring an image from preallocation level `current` up to `target` in place."""
    order = C.PREALLOC_MODES
    if order.index(target) <= order.index(current):
        return {"changed": False}
    from .edit import resize
    return {"changed": True,
            "steps": resize.raise_level(path, current, target, passphrase=passphrase)}


def reclaim_leaks(path, passphrase=None):
    """Reclaim clusters leaked at the end of the file (what an interrupted run leaves)."""
    from .edit.reclaim import reclaim_leaks as _reclaim
    return _reclaim(path, passphrase=passphrase)


def add_leftover_cleanup(path, decision, started=None):
    """Put first in `decision` the removal of temporary files that killed runs left in the
    image's directory (not locked by a live writer, older than this run): those of `path`'s own
    name on every run (they belong to the declared image), the directory's others when this run
    writes there anyway. Reads only; check mode shows the same action."""
    from .read import leftovers
    if decision.failure or (decision.conflicts and not decision.actions):
        return decision
    found = leftovers.find(path, same_name_only=not decision.actions, started=started)
    if found:
        from .reconcile import Action, human_size
        total = sum(size for _entry, size in found)
        names = ", ".join(entry for entry, _size in found[:5])
        more = "" if len(found) <= 5 else " and %d more" % (len(found) - 5)
        decision.actions.insert(0, Action(
            "remove_leftovers", "remove %d temporary file(s) that killed runs left in %s (%s in "
            "all): %s%s" % (len(found), os.path.dirname(os.path.abspath(path)),
                            human_size(total), names, more),
            entries=[entry for entry, _size in found], started=started))
    return decision


IN_PLACE = ("grow", "shrink", "raise_preallocation", "upgrade_compat", "lazy_refcounts",
            "reclaim_leaks")


def _not_writable_reason(path):
    """Why `path` (a file or a directory) cannot be written, or None when it can."""
    if os.access(path, os.W_OK):
        return None
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    if os.geteuid() == 0:
        return "not writable even for root (an immutable or append-only attribute, or the " \
               "file system refuses it)"
    return "permission denied"


def _check_directory(path, what):
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        raise Qcow2Error("%s: the directory %s does not exist (it is not created; declare it "
                         "with ansible.builtin.file first)" % (path, parent), path=path)
    if not os.path.isdir(parent):
        raise Qcow2Error("%s: %s is not a directory" % (path, parent), path=path)
    reason = _not_writable_reason(parent)
    if reason:
        raise Qcow2Error("%s: cannot %s in %s: %s" % (path, what, parent, reason), path=path)


def preflight_create(path, values, replace=False, source=None, source_format=None,
                     allow_backing=False, planned=None, passphrase=None, source_passphrase=None):
    """Raise what creating (or replacing) the image at `path` would fail on before its first
    write: options, the directory, the backing file, the source (its backing chain refused
    unless `allow_backing`, an encrypted one unless `source_passphrase` opens it), the
    encryption (`passphrase`), free space. Reads only."""
    nodes.check_node(path)
    if source is not None and passphrase is not None and \
            not isinstance(values, CreateOptions) and values.get("encrypt_format") is None:
        values = dict(values, encrypt_format="luks")
    if source is not None and _planned_source(planned, source):
        return _preflight_planned_copy(path, values, source, source_format, allow_backing,
                                       planned[os.path.realpath(source)], passphrase,
                                       source_passphrase)
    if source is not None:
        from .copy.convert import check_space as check_copy_space
        src = open_source(source, source_format, allow_backing=allow_backing,
                          passphrase=source_passphrase)
        try:
            opts = source_options(path, values, src)
            from .create import encrypted
            encrypted.check(path, opts, passphrase)
            if is_block_device(path):
                raise Qcow2Error("%s: copying a source onto a block device is not supported"
                                 % path, path=path)
            _check_directory(path, "create the image")
            check_copy_space(path, opts, src)
            return opts
        finally:
            src.close()
    opts = values if isinstance(values, CreateOptions) else \
        parse_options(path, values, planned)
    from .create import encrypted
    encrypted.check(path, opts, passphrase, is_block_device(path))
    if is_block_device(path):
        if not replace:
            raise Qcow2Error("%s: is a block device that may hold data; writing an image onto "
                             "it needs force" % path, path=path)
        reason = _not_writable_reason(path)
        if reason:
            raise Qcow2Error("%s: cannot write the device: %s" % (path, reason), path=path)
        return opts
    _check_directory(path, "create the image")
    if opts.backing_file:
        _check_backing(path, opts.backing_file, planned)
    if opts.data_file:
        _check_directory(resolve_relative(path, opts.data_file), "create the data file")
    from .create import writer
    writer.check_space(os.path.dirname(os.path.abspath(path)), plan_for(path, opts))
    return opts


def _planned_source(planned, source):
    """Whether `source` is a file that an earlier image of this run (check mode of a list)
    makes anew or removes: then what the real run will copy is not on disk yet."""
    if not planned or os.path.realpath(source) not in planned:
        return False
    entry = planned[os.path.realpath(source)]
    return entry is None or entry.get("made") or not os.path.lexists(source)


def _preflight_planned_copy(path, values, source, source_format, allow_backing, entry,
                            passphrase=None, source_passphrase=None):
    """preflight_create for a copy whose source an earlier image of the run makes (`entry`,
    see preflight): the options and the refusals a real run meets, judged from that image's
    declaration. The copy's free space is not judged (the source's data is not known yet)."""
    if entry is None:
        raise Qcow2Error("source: %s does not exist (an earlier image of this run removes it)"
                         % source, option="source")
    if source_format != "qcow2":
        raise Qcow2Error("source: %s is a qcow2 image that an earlier image of this run makes; "
                         "declare source_format: qcow2 to copy the guest content it will hold"
                         % source, option="source")
    if entry.get("backing_file") and not allow_backing:
        from .copy.source import backing_refusal
        raise Qcow2Error("source: " + backing_refusal(source, entry["backing_file"]),
                         option="source", path=source)
    if entry.get("encrypted") and source_passphrase is None:
        # (A passphrase given is judged by the real run: the key slot is not made yet.)
        raise Qcow2Error("source: %s is LUKS encrypted; give its passphrase (source_passphrase "
                         "or source_passphrase_file) to copy it" % source, option="source",
                         path=source)

    class _Planned(object):
        size = entry["virtual_size"]
        path = source
    values = dict(values)
    if values.get("size") is None:
        values["size"] = _Planned.size
    opts = parse_options(path, values)
    from .create import encrypted
    encrypted.check(path, opts, passphrase)
    from .copy.convert import check_source_fits
    check_source_fits(opts, _Planned)
    if is_block_device(path):
        raise Qcow2Error("%s: copying a source onto a block device is not supported" % path,
                         path=path)
    _check_directory(path, "create the image")
    return opts


def preflight_remove(path):
    """Raise what removing the image at `path` would fail on. Reads only."""
    _check_directory(path, "remove the image")


def preflight(path, decision, expected=None, planned=None, passphrase=None,
              source_passphrase=None):
    """Raise the Qcow2Error that applying `decision` in place would raise before its first
    write: the editor's guard (dirty, corrupt, damaged) and the planners' guest-view rules.
    Reads only; check mode runs it so its prediction matches the real run. `expected` is the
    identity observe() recorded: what is at `path` now must still be that file. A creation's
    resolved options complete `decision.after`. `planned` (check mode of a list of images)
    maps the real path of a file that an earlier image of the same run makes, changes or
    removes to what it will be: None (removed) or {"format": ..., "virtual_size": N}; a
    backing file found there is taken as that, not looked up. `passphrase`: as for apply (an
    encrypted image's key slot is opened with it here, so a wrong one fails in check mode
    too). `source_passphrase`: the key of an encrypted source a creation copies."""
    nodes.check_identity(path, expected)
    for action in decision.actions:
        if action.kind in ("create", "recreate"):
            opts = preflight_create(path, action.args["values"],
                                    replace=action.kind == "recreate",
                                    source=action.args.get("source"),
                                    source_format=action.args.get("source_format"),
                                    allow_backing=bool(action.args.get("source_backing_chain")),
                                    planned=planned, passphrase=passphrase,
                                    source_passphrase=source_passphrase)
            # The size a source or backing file gives, and the defaults, are known only now:
            # the diff's `after` shows the image the creation will make (check mode too).
            from .reconcile import created_fields
            decision.after.update(created_fields(opts))
        elif action.kind == "remove":
            preflight_remove(path)
    kinds = [a for a in decision.actions if a.kind in IN_PLACE]
    if not kinds:
        return
    reason = _not_writable_reason(path)
    if reason:
        raise Qcow2Error("%s: cannot be changed in place: %s" % (path, reason), path=path)
    from .edit import guest_rules
    from .edit.editor import guard_image
    from .format.l2runs import RefcountError
    from .read.image import DECODE_ERRORS, Image
    with Image.open(path) as img:
        nodes.check_fd_identity(path, os.fstat(img.fd), expected)
        guard_image(img, path, passphrase=passphrase)
        device = is_block_device(path)
        try:
            for action in kinds:
                if action.kind == "grow":
                    guest_rules.plan_grow(img, action.args["size"], action.args["mode"], device)
                elif action.kind == "shrink":
                    guest_rules.plan_shrink(img, action.args["size"])
                elif action.kind == "raise_preallocation" and action.args["current"] == "off":
                    guest_rules.plan_fill(img, action.args["target"], device)
        except DECODE_ERRORS + (RefcountError,) as exc:
            raise Qcow2Error("corrupt image %s: %s" % (path, exc), path=path)


def observe(path, with_check=False, size=None):
    """Read-only description of what is at `path` for the reconciler (None when absent).

    Never writes and takes no lock, so it works on images a running VM holds.
    """
    from .read import lock, memo
    from .read.allocation import allocation_state, chain_data_end, tail_leaks
    from .read.image import Image
    from .read.info import info as image_info
    # Looked at with lstat before anything opens it: a FIFO, socket, character device,
    # directory or symbolic link is refused with its name, never opened.
    st = nodes.check_node(path)
    if st is None:
        return None
    seen = {"identity": nodes.identity(st), "node": nodes.describe(st.st_mode)}
    try:
        image = Image.open(path)
    except Qcow2Error as exc:
        nodes.check_identity(path, seen["identity"])
        out = {"qcow2": False, "reason": str(exc), "format": "unknown",
               "in_use": _in_use(lock, path)}
        out.update(seen)
        return out
    try:
        # What was read is what was looked at (the path was not swapped in between).
        nodes.check_fd_identity(path, os.fstat(image.fd), seen["identity"])
        info = image_info(path, image=image)
        # A big image's walk is remembered while the file is provably unchanged (read/memo).
        token = memo.prepare(image)
        state = memo.recall(token)
        if state is None:
            state = allocation_state(path, image=image)
            memo.remember(token, image, state)
        try:
            tail = tail_leaks(path, image=image)
        except Qcow2Error:
            tail = {"scanned": False}   # damage the scan trips on is for check to report
        data = info["format-specific"]["data"]
        hdr = image.header
        out = {
            "qcow2": True,
            "format": "qcow2",
            "virtual_size": info["virtual-size"],
            "cluster_size": info["cluster-size"],
            "compat": data["compat"],
            "refcount_bits": data["refcount-bits"],
            "lazy_refcounts": bool(data.get("lazy-refcounts", False)),
            "extended_l2": bool(data.get("extended-l2", False)),
            "compression_type": data.get("compression-type", "zlib"),
            "backing_file": info.get("backing-filename"),
            "backing_fmt": info.get("backing-filename-format"),
            "data_file": data.get("data-file"),
            "data_file_raw": bool(data.get("data-file-raw", False)),
            "dirty": bool(info.get("dirty-flag")),
            "corrupt": bool(data.get("corrupt", False)),
            "encrypted": bool(hdr.crypt_method),
            "encryption": encryption_view(data.get("encrypt")),
            "preallocation": state["preallocation"],
            "guest_data": bool(state["guest_data"]),
            "actual_size": info.get("actual-size", 0),
            "allocated_clusters": state.get("mapped_clusters", 0),
            "allocation_method": state.get("method"),
            "in_use": _in_use(lock, path),
            "snapshots": hdr.nb_snapshots,
            "backing_file_realpath": backing_realpath(path, info["backing-filename"])
            if info.get("backing-filename") else None,
            "fall_through_clusters": state.get("fall_through_clusters", 0),
            "leaked_clusters": tail["clusters"] if tail.get("scanned") else None,
        }
        out.update(seen)
        if size is not None and size < out["virtual_size"]:
            # Only asked when a smaller size is declared: where the guest's data ends.
            # For an overlay the backing chain's data counts too.
            try:
                out["data_end"] = chain_data_end(image)
            except Qcow2Error as exc:
                out["data_end"] = None
                out["data_end_unknown"] = str(exc)
        if with_check:
            from .read.check import check     # the consistency check only when asked for
            result = check(path, image=image)
            out["check"] = {
                "check_errors": result.get("check-errors", 0),
                "corruptions": result.get("corruptions", 0),
                "leaks": result.get("leaks", 0),
                "image_end_offset": result.get("image-end-offset", 0),
                "allocated_clusters": result.get("allocated-clusters", 0),
                "messages": result.get("messages", []),
            }
        return out
    finally:
        image.close()


def _in_use(lock, path):
    try:
        return bool(lock.probe(path)["in_use"])
    except (Qcow2Error, OSError):
        return False


def apply(path, decision, mode=0o644, expected=None, passphrase=None, source_passphrase=None):
    """Carry out a reconciler decision's actions in order; returns per-action results.

    `expected` is the identity (st_dev, st_ino) observe() recorded for `path`: every write
    path compares what it opened or is about to replace or remove with it and refuses a file
    that changed between the look and the write. None (nothing was there) leaves the create
    to its no-clobber install.

    When an action fails after the file was changed (by it or by an earlier action), the
    Qcow2Error carries modified=True and `done`: the texts of what was completed.

    `passphrase` (bytes): the key of the encrypted image the decision declares: a new one is
    made with it, an existing one is changed only when it opens a key slot.
    `source_passphrase` (bytes): the key of an encrypted source a creation copies."""
    results = []
    done = []
    ident = expected
    for action in decision.actions:
        try:
            with nodes.expect(path, ident):
                results.append(_apply_one(path, action, mode, passphrase, source_passphrase))
        except Qcow2Error as exc:
            exc.done = done + list(getattr(exc, "done", []))
            exc.modified = bool(done) or bool(getattr(exc, "modified", False))
            raise
        done.append(action.text)
        if action.kind in ("create", "recreate"):
            # The path now holds the file just made, which later actions may edit.
            ident = nodes.identity(nodes.lstat_identity(path))
    return results


def _apply_one(path, action, mode, passphrase=None, source_passphrase=None):
    key = passphrase
    if action.kind in ("create", "recreate"):
        if action.args.get("source"):
            return create_from(path, action.args["values"], action.args["source"],
                               action.args["source_format"],
                               replace=action.kind == "recreate", mode=mode,
                               allow_backing=bool(action.args.get("source_backing_chain")),
                               passphrase=key, source_passphrase=source_passphrase)
        return create(path, action.args["values"], replace=action.kind == "recreate", mode=mode,
                      passphrase=key)
    if action.kind == "remove":
        _remove_unheld(path)
        return {"removed": path}
    if action.kind == "grow":
        return grow(path, action.args["size"], action.args["mode"], passphrase=key)
    if action.kind == "shrink":
        from .edit import resize
        return resize.shrink(path, action.args["size"], passphrase=key)
    if action.kind == "raise_preallocation":
        return raise_preallocation(path, action.args["current"], action.args["target"],
                                   passphrase=key)
    if action.kind == "upgrade_compat":
        from .edit.amend import upgrade_compat
        return {"changed": upgrade_compat(path, passphrase=key)}
    if action.kind == "lazy_refcounts":
        from .edit.amend import set_lazy_refcounts
        return {"changed": set_lazy_refcounts(path, action.args["enabled"], passphrase=key)}
    if action.kind == "reclaim_leaks":
        return reclaim_leaks(path, passphrase=key)
    if action.kind == "remove_leftovers":
        from .read import leftovers
        return {"removed_leftovers": leftovers.remove(path, action.args["entries"],
                                                      started=action.args.get("started"))}
    raise Qcow2Error("internal error: unknown action %s" % action.kind)


def _remove_unheld(path):
    """Remove an image unless a QEMU holds it (checked while we hold its lock)."""
    from .read.lock import WriteLock
    # Opened without following a link and without blocking; only a regular file or a block
    # device is opened, and only the file that was inspected is removed (compared on the
    # descriptor and again on the name right before the unlink).
    fd, st = nodes.open_checked(path, os.O_RDONLY, doing="cannot remove it")
    try:
        nodes.check_fd_identity(path, st)
        if not stat.S_ISREG(st.st_mode):
            raise Qcow2Error("%s: is %s; an image path is never a reason to remove a device "
                             "node" % (path, nodes.describe(st.st_mode)), path=path)
        with WriteLock(fd):
            nodes.check_identity(path, nodes.identity(st))
            os.unlink(path)
    except OSError as exc:
        raise Qcow2Error("%s: cannot remove it: %s" % (path, exc.strerror or exc), path=path)
    finally:
        os.close(fd)


IMAGE_KEYS = ("format", "virtual_size", "cluster_size", "compat", "refcount_bits",
              "lazy_refcounts", "extended_l2", "compression_type", "backing_file", "backing_fmt",
              "data_file", "data_file_raw", "dirty", "corrupt", "encrypted", "encryption",
              "preallocation",
              "actual_size", "allocated_clusters", "in_use", "snapshots", "leaked_clusters")


def encryption_view(encrypt):
    """qemu-img info's `encrypt` block with the modules' names (None when not encrypted):
    what is known without the passphrase."""
    if not encrypt:
        return None
    view = {"format": encrypt.get("format")}
    if view["format"] != "luks":
        return view
    for key in ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "uuid",
                "payload-offset", "master-key-iters"):
        view[key.replace("-", "_")] = encrypt.get(key)
    view["slots"] = [dict((k.replace("-", "_"), v) for k, v in slot.items())
                     for slot in encrypt.get("slots", [])]
    view["active_slots"] = [k for k, slot in enumerate(view["slots"]) if slot.get("active")]
    return view


def public_view(observed, vet_path=None, max_size=None):
    """The `image` dict the modules return, from observe()'s result (None when absent).

    With `vet_path` (the path observed) it also holds `unsafe_reasons`: why the file is not
    safe as an untrusted template (vetting.unsafe_reasons; `max_size` bounds the virtual size,
    None for the default limit, 0 for none)."""
    if observed is None:
        return {}
    if not observed.get("qcow2"):
        view = {"format": observed.get("format", "unknown"), "error": observed.get("reason"),
                "in_use": observed.get("in_use", False)}
    else:
        view = _qcow2_view(observed)
    if vet_path is not None:
        from .read import vetting
        limit = vetting.DEFAULT_MAX_SIZE if max_size is None else max_size
        view["unsafe_reasons"] = vetting.unsafe_reasons(observed, vetting.read_probe(vet_path),
                                                        limit)
    return view


def _qcow2_view(observed):
    view = dict((k, observed.get(k)) for k in IMAGE_KEYS)
    view["guest_data"] = observed.get("guest_data")
    view["allocation_method"] = observed.get("allocation_method")
    if "check" in observed:
        view["check"] = dict((k, v) for k, v in observed["check"].items() if k != "messages")
        view["check"]["messages"] = observed["check"].get("messages", [])[:20]
    return view
