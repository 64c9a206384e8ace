# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The reconciler: a declaration and an observed image in, a decision out. No I/O.

`observe()` (I/O, read-only) describes what is at a path; `decide()` compares it with the
declaration and returns the actions to take, the conflicts that need `force` (or
`regenerate`), and the before/after views for diff mode. Options left out of the declaration are not compared
(they only matter when an image is created).
"""

from .format import constants as C
from .format import encryption
from .format.errors import Qcow2Error
from .format.options import CreateOptions, parse_bool, parse_compat, parse_size, compat_name

# Image properties the declaration may pin, in the order reports list them.
COMPARED = ("cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2",
            "compression_type", "backing_file", "backing_fmt", "data_file", "data_file_raw")

# When an existing image is made again from its declaration (and its source, if any):
# `fail` never (a conflict fails), `on_conflict` only when it conflicts with the declaration
# (what force=true does), `always` on every run.
REGENERATE = ("fail", "on_conflict", "always")


def regenerate_policy(regenerate=None, force=False):
    """The effective policy: an explicit `regenerate`, else the one `force` implies."""
    if regenerate is None:
        return "on_conflict" if force else "fail"
    if regenerate not in REGENERATE:
        raise Qcow2Error("regenerate: %r is not one of %s" % (regenerate, ", ".join(REGENERATE)),
                         option="regenerate")
    if force and regenerate == "fail":
        raise Qcow2Error("regenerate=fail and force=true contradict each other (force=true "
                         "recreates a conflicting image, regenerate=fail refuses to); drop one",
                         option="regenerate")
    return regenerate


class Action(object):
    """One step: `kind` is machine-readable, `text` is what the user reads."""

    __slots__ = ("kind", "text", "args")

    def __init__(self, kind, text, **args):
        self.kind = kind
        self.text = text
        self.args = args

    def __repr__(self):
        return "Action(%s, %r)" % (self.kind, self.args)


class Decision(object):
    def __init__(self):
        self.actions = []
        self.conflicts = []
        self.failure = None        # a reason that not even force overrides
        self.before = {}
        self.after = {}

    @property
    def changed(self):
        return bool(self.actions)

    def texts(self):
        return [a.text for a in self.actions]


def normalise(declared):
    """Parse the user's values into comparable ones; None means 'not declared'."""
    out = {}
    if declared.get("size") is not None:
        out["size"] = (parse_size(declared["size"], "size") + 511) // 512 * 512
    if declared.get("cluster_size") is not None:
        out["cluster_size"] = parse_size(declared["cluster_size"], "cluster_size")
    if declared.get("compat") is not None:
        out["compat"] = compat_name(parse_compat(declared["compat"]))
    if declared.get("refcount_bits") is not None:
        out["refcount_bits"] = int(declared["refcount_bits"])
    for flag in ("lazy_refcounts", "extended_l2", "data_file_raw", "nocow"):
        if declared.get(flag) is not None:
            out[flag] = parse_bool(declared[flag], flag)
    for name in ("compression_type", "backing_file", "backing_fmt", "data_file",
                 "backing_file_realpath"):
        if declared.get(name) is not None:
            out[name] = str(declared[name])
    out["encryption"] = encryption.declared(declared)
    out["preallocation"] = declared.get("preallocation") or "off"
    if out["preallocation"] not in C.PREALLOC_MODES:
        raise Qcow2Error("preallocation: %r is not one of off, metadata, falloc, full"
                         % out["preallocation"], option="preallocation")
    return out


def creation_values(declared):
    """The option dict for a new image (defaults fill what was left out)."""
    keys = ("size", "cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2",
            "compression_type", "preallocation", "backing_file", "backing_fmt", "data_file",
            "data_file_raw", "nocow") + tuple(encryption.option(k) for k in encryption.KEYS)
    return dict((k, declared[k]) for k in keys if declared.get(k) is not None)


def encryption_summary(view):
    """The encryption properties a diff shows (None for a plain image)."""
    if not view:
        return None
    return dict((key, view.get(key)) for key in encryption.COMPARED
                if view.get(key) is not None)


def human_size(n):
    """A size as people read it: 64 MiB, 1.5 GiB, 512 B."""
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20),
                        ("KiB", 10)):
        if n >= 1 << shift:
            value = n / float(1 << shift)
            text = ("%.2f" % value).rstrip("0").rstrip(".")
            return "%s %s" % (text, unit)
    return "%d B" % n


def _sized(n):
    return "%s (%d bytes)" % (human_size(n), n)


def image_view(image):
    """The before/after shape of an observed image (None when absent)."""
    if image is None:
        return {"state": "absent"}
    if not image.get("qcow2"):
        return {"state": "present", "format": image.get("format", "unknown"),
                "content": "a file that is not a qcow2 image"}
    view = {"state": "present", "format": "qcow2", "virtual_size": image["virtual_size"],
            "preallocation": image["preallocation"],
            "content": "guest data" if image.get("guest_data") else "no guest data"}
    for key in COMPARED:
        if image.get(key) is not None:
            view[key] = image.get(key)
    if image.get("encryption"):
        view["encryption"] = encryption_summary(image["encryption"])
    return view


def decide(declared, image, state="present", force=False, regenerate=None):
    """Compare a declaration with an observed image.

    `regenerate` (see REGENERATE; None: what `force` implies) says when an existing image is
    recreated. With `always` every run recreates it (re-copying its source, if any).

    `image` is None when nothing exists at the path, else a dict from observe() with at least
    `qcow2` (bool) and, for qcow2 images, the COMPARED keys, `virtual_size`,
    `preallocation`, `guest_data`, `in_use`, `dirty`, `corrupt`, `encrypted`.
    """
    d = Decision()
    d.before = image_view(image)
    if state == "absent":
        d.after = {"state": "absent"}
        if image is not None:
            if image.get("in_use"):
                d.failure = "the image is in use by a running QEMU; it is not removed"
            elif not image.get("qcow2") and not force:
                d.conflicts.append("the file at path is not a qcow2 image (%s); it is removed "
                                   "only with force" % _reason(image))
                d.after = d.before
            else:
                d.actions.append(Action("remove", "remove the %s%s" % (
                    "image" if image.get("qcow2") else "file (not a qcow2 image; force)",
                    ", destroying its guest data" if image.get("guest_data") else "")))
        return d

    want = normalise(declared)
    copy = _source_args(declared)
    if image is None:
        if want.get("size") is None and not want.get("backing_file") and not copy:
            d.failure = "size is required to create the image"
        d.actions.append(Action("create", "create the image (%s)%s"
                                % (_summary(want), _source_text(copy)),
                                values=creation_values(declared), **copy))
        d.after = _after_create(want, copy)
        return d

    policy = regenerate_policy(regenerate, force)
    if not image.get("qcow2"):
        d.conflicts.append("the file at path is not a qcow2 image (%s)" % _reason(image))
    else:
        _compare(d, want, image)
    if d.conflicts or policy == "always":
        if image.get("in_use"):
            d.failure = ("the image is in use by a running QEMU and the declaration needs it "
                         "recreated: " + "; ".join(d.conflicts)) if d.conflicts else \
                "the image is in use by a running QEMU; it is not recreated (regenerate=always)"
            d.actions = []
            return d
        if policy == "fail":
            d.after = d.before
            d.actions = []
            return d
        what = "replace the file with a new image" if not image.get("qcow2") else \
            "recreate the image from the declaration"
        if policy == "always":
            why = " (regenerate=always)%s" % (
                ", and it conflicts: " + "; ".join(d.conflicts) if d.conflicts else "")
        else:
            why = " (%s), because: %s" % ("force" if regenerate is None else
                                          "regenerate=on_conflict", "; ".join(d.conflicts))
        d.actions = [Action("recreate", "%s%s, destroying its content%s"
                            % (what, _source_text(copy), why),
                            values=creation_values(declared), **copy)]
        d.after = _after_create(want, copy, replacing=True)
        return d
    leaked = image.get("leaked_clusters") if image.get("qcow2") else None
    if leaked and not image.get("in_use") and not image.get("dirty"):
        d.actions.insert(0, Action("reclaim_leaks", "reclaim %d leaked cluster(s) at the end of "
                                   "the file (left by an interrupted change)" % leaked))
    if d.actions and image.get("in_use"):
        d.failure = "the image is in use by a running QEMU; it is not modified (wanted: %s)" \
                    % "; ".join(d.texts())
        d.actions = []
    return d


def _source_args(declared):
    """The source of a copy ({} when the image is created empty)."""
    if not declared.get("source"):
        return {}
    return {"source": str(declared["source"]), "source_format": declared.get("source_format"),
            "source_backing_chain": bool(declared.get("source_backing_chain"))}


def _source_text(copy):
    if not copy:
        return ""
    return ", its guest content copied from %s (%s)" % (copy["source"], copy["source_format"])


def _reason(image):
    reason = image.get("reason", "unknown format")
    prefix = "not a qcow2 image: "
    return reason[len(prefix):] if reason.startswith(prefix) else reason


def _summary(want):
    parts = []
    if want.get("size") is not None:
        parts.append("size %s" % _sized(want["size"]))
    parts.append("preallocation %s" % want["preallocation"])
    for key in COMPARED:
        if want.get(key) is not None:
            parts.append("%s %s" % (key, want[key]))
    if want.get("encryption"):
        parts.append("encrypted with %s" % want["encryption"]["format"])
    return ", ".join(parts)


def content_text(copy, replacing=False):
    """What a new image holds, as the diff says it."""
    text = "a copy of the template %s" % copy["source"] if copy else "a new, empty image"
    return text + (" (the old content is destroyed)" if replacing else "")


def _after_create(want, copy=None, replacing=False):
    """The view of the image a creation makes. Without a declared size (taken from the backing
    file or the source) the size and defaults are filled in by created_fields() once the
    options are resolved (api.preflight, in check mode too)."""
    opts = CreateOptions.from_dict(dict((k, v) for k, v in want.items()
                                        if k in CreateOptions.KEYS and k != "nocow"),
                                   size_from_backing=0) if want.get("size") is not None \
        else None
    view = {"state": "present", "format": "qcow2", "virtual_size": want.get("size"),
            "preallocation": want["preallocation"],
            "content": content_text(copy, replacing)}
    for key in COMPARED:
        value = getattr(opts, key) if opts is not None and hasattr(opts, key) \
            else want.get(key)
        if value is not None:
            view[key] = value
    if opts is not None:
        view.update(created_fields(opts))
    return view


def created_fields(opts):
    """The diff fields of an image created with CreateOptions `opts`."""
    view = {"virtual_size": opts.size, "compat": opts.compat,
            "preallocation": opts.effective_preallocation}
    for key in COMPARED:
        value = getattr(opts, key, None)
        if value is not None:
            view[key] = value
    if opts.encryption is not None:
        view["encryption"] = encryption_summary(opts.encryption.as_dict())
    return view


def _compare(d, want, image):
    after = dict(d.before)
    if image.get("corrupt"):
        d.conflicts.append("the image is marked corrupt")
    d.conflicts.extend(encryption.compare(want.get("encryption") or {},
                                          image.get("encryption") if image.get("encrypted")
                                          else None))
    # Properties that cannot change without rewriting the image.
    for key in ("cluster_size", "refcount_bits", "extended_l2", "compression_type",
                "backing_file", "backing_fmt", "data_file", "data_file_raw"):
        if key == "backing_file" and _same_backing(want, image):
            continue
        if key in want and want[key] != image.get(key):
            d.conflicts.append("%s is %s, declared %s" % (key, _show(image.get(key)),
                                                          _show(want[key])))
    # compat: upgrade in place, never downgrade.
    if "compat" in want and want["compat"] != image["compat"]:
        if want["compat"] == "1.1":
            d.actions.append(Action("upgrade_compat", "upgrade compat 0.10 to 1.1"))
            after["compat"] = "1.1"
        else:
            d.conflicts.append("compat is 1.1, declared 0.10 (a downgrade)")
    if "lazy_refcounts" in want and want["lazy_refcounts"] != image.get("lazy_refcounts"):
        if image["compat"] == "0.10" and after.get("compat") != "1.1":
            d.conflicts.append("lazy_refcounts needs compat 1.1 and the image is compat 0.10 "
                               "(declare compat: '1.1' to upgrade it)")
        else:
            d.actions.append(Action("lazy_refcounts", "turn lazy refcounts %s"
                                    % ("on" if want["lazy_refcounts"] else "off"),
                                    enabled=want["lazy_refcounts"]))
            after["lazy_refcounts"] = want["lazy_refcounts"]
    size = want.get("size")
    mode = want["preallocation"]
    if size is not None and size < image["virtual_size"]:
        blocked = _shrink_blocked(image, size)
        if blocked:
            d.conflicts.append(blocked)
        else:
            d.actions.append(Action("shrink", "shrink the virtual size from %s to %s (the guest "
                                    "reads only zeros past the new end)"
                                    % (_sized(image["virtual_size"]), _sized(size)), size=size))
            after["virtual_size"] = size
    current = image["preallocation"]
    if image.get("data_file") and current == "metadata" and mode in ("falloc", "full"):
        # Only the L2 tables of an image with an external data file are inspected (every
        # cluster mapped: metadata); the data file's own allocation is not judged, nor raised.
        current = mode
    if C.prealloc_rank(mode) > C.prealloc_rank(current):
        blocked = _raise_blocked(image, current, mode)
        if blocked:
            d.conflicts.append(blocked)
        else:
            d.actions.append(Action("raise_preallocation", "raise preallocation from %s to %s%s"
                                    % (current, mode, " (the guest's data stays in place)"
                                       if image.get("guest_data") else ""),
                                    current=current, target=mode))
            after["preallocation"] = mode
    if size is not None and size > image["virtual_size"]:
        grow_mode = max(mode, current, key=C.prealloc_rank)
        blocked = _grow_blocked(image)
        if blocked:
            d.conflicts.append(blocked)
        else:
            d.actions.append(Action("grow", "grow the virtual size from %s to %s (new range: %s, "
                                    "reads zeros)" % (_sized(image["virtual_size"]), _sized(size),
                                                      grow_mode),
                                    size=size, mode=grow_mode))
            after["virtual_size"] = size
    d.after = after


def _same_backing(want, image):
    """The declared and the recorded backing names lead to the same file (the recorded name
    is kept as it is: the header is not rewritten)."""
    declared = want.get("backing_file_realpath")
    recorded = image.get("backing_file_realpath")
    return bool(declared and recorded and declared == recorded)


def _raise_blocked(image, current, mode):
    """Why raising preallocation in place would change the guest's view (None: it would not)."""
    if image.get("data_file"):
        return ("preallocation is %s, declared %s, and the image has an external data file "
                "(its allocation is not raised in place)" % (current, mode))
    if current != "off":
        return None
    if image.get("fall_through_clusters"):
        return ("preallocation is off, declared %s, and %d cluster(s) of this overlay still read "
                "from its backing file: giving them host clusters would hide the backing file's "
                "bytes from the guest. An overlay can be preallocated only with extended_l2 "
                "(clusters are mapped and their subclusters left unallocated, as qemu-img does); "
                "keep preallocation off for it, or recreate it with extended_l2: true"
                % (mode, image["fall_through_clusters"]))
    if image.get("snapshots"):
        return ("preallocation is off, declared %s, and the image has %d internal snapshot(s): "
                "the L2 tables it shares with them are not copied in place, so its clusters are "
                "not mapped (delete the snapshots first)" % (mode, image["snapshots"]))
    return None


def _shrink_blocked(image, size):
    """Why shrinking in place is refused (None: no guest data lies past the new end)."""
    base = "size is %d, declared %d (shrinking would discard data" % (image["virtual_size"], size)
    highest = image.get("data_end")
    if highest is None:
        if image.get("data_end_unknown"):
            return base + "; what the guest reads past the new end cannot be told: %s)" \
                % image["data_end_unknown"]
        return base + ")"
    if image.get("snapshots"):
        return base + "; the image has internal snapshots)"
    if image.get("data_file"):
        return base + "; the image has an external data file)"
    if highest > size:
        return base + ": guest data lies up to byte %d%s)" % (
            highest, " (the image's own or its backing file's)" if image.get("backing_file")
            else "")
    return None


def _grow_blocked(image):
    """Why growing in place is refused (None: it is not)."""
    if image.get("snapshots"):
        return ("size is %d, declared larger, and the image has %d internal snapshot(s): their "
                "L2 tables are shared and not copied in place, so it is not grown (delete the "
                "snapshots first, or use qemu-img resize)"
                % (image["virtual_size"], image["snapshots"]))
    if image.get("backing_file") and image["virtual_size"] % image["cluster_size"]:
        return ("size is %d, declared larger, and that size is not a multiple of the cluster "
                "size %d while the image has a backing file: its last cluster mixes backing "
                "bytes with bytes past the end, so it is not grown in place"
                % (image["virtual_size"], image["cluster_size"]))
    return None


def _show(value):
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
