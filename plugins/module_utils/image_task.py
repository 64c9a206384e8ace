# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""One image declared and converged: the options of vdisk.qcow2.image (its argument spec,
defined once here) and the converge logic that the modules `image` (one image) and `images`
(a list, in one run) share."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os
import traceback

from ansible_collections.vdisk.qcow2.plugins.module_utils import module_support
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.read import nodes
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import reconcile
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.format import encryption
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.format.errors import Qcow2Error


def argument_spec():
    """The options of one image (without the file attributes, which AnsibleModule adds with
    add_file_common_args). A new dict each call, so a caller may change it. The passphrase
    files' options name a path, not a secret: no_log=False says so (else ansible-core warns on
    their names)."""
    return dict(
        path=dict(type="path", required=True),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        size=dict(type="raw"),
        preallocation=dict(type="str", default="off",
                           choices=["off", "metadata", "falloc", "full"]),
        cluster_size=dict(type="raw"),
        compat=dict(type="raw"),
        refcount_bits=dict(type="int", choices=[1, 2, 4, 8, 16, 32, 64]),
        lazy_refcounts=dict(type="bool"),
        extended_l2=dict(type="bool"),
        compression_type=dict(type="str", choices=["zlib", "zstd"]),
        backing_file=dict(type="str"),
        backing_fmt=dict(type="str"),
        data_file=dict(type="path"),
        data_file_raw=dict(type="bool"),
        nocow=dict(type="bool", default=False),
        force=dict(type="bool", default=False),
        regenerate=dict(type="str", choices=list(reconcile.REGENERATE)),
        backup=dict(type="bool", default=False),
        follow=dict(type="bool", default=False),
        source=dict(type="path"),
        source_format=dict(type="str", choices=["raw", "qcow2"]),
        source_backing_chain=dict(type="bool", default=False),
        source_passphrase=dict(type="str", no_log=True),
        source_passphrase_file=dict(type="path", no_log=False),
        encrypt_format=dict(type="str", choices=list(encryption.FORMATS)),
        encrypt_passphrase=dict(type="str", no_log=True),
        encrypt_passphrase_file=dict(type="path", no_log=False),
        encrypt_cipher_alg=dict(type="str", choices=list(encryption.CIPHER_ALGS)),
        encrypt_cipher_mode=dict(type="str", choices=list(encryption.CIPHER_MODES)),
        encrypt_ivgen_alg=dict(type="str", choices=list(encryption.IVGEN_ALGS)),
        encrypt_ivgen_hash_alg=dict(type="str", choices=list(encryption.HASH_ALGS)),
        encrypt_hash_alg=dict(type="str", choices=list(encryption.HASH_ALGS)),
        encrypt_iter_time=dict(type="int"),
        encrypt_check_passphrase=dict(type="bool", default=False, no_log=False),
    )


REQUIRED_TOGETHER = [("backing_file", "backing_fmt"), ("source", "source_format")]
REQUIRED_BY = {"data_file_raw": "data_file", "source_passphrase": "source",
               "source_passphrase_file": "source", "encrypt_passphrase": "encrypt_format",
               "encrypt_passphrase_file": "encrypt_format",
               "encrypt_cipher_alg": "encrypt_format", "encrypt_cipher_mode": "encrypt_format",
               "encrypt_ivgen_alg": "encrypt_format", "encrypt_ivgen_hash_alg": "encrypt_format",
               "encrypt_hash_alg": "encrypt_format", "encrypt_iter_time": "encrypt_format"}
MUTUALLY_EXCLUSIVE = [("encrypt_passphrase", "encrypt_passphrase_file"),
                      ("source_passphrase", "source_passphrase_file")]
# The most a passphrase file may hold (QEMU's secrets are small; a bound keeps a hostile file
# from filling memory).
PASSPHRASE_FILE_LIMIT = 64 * 1024


def _read_secret(path, option="encrypt_passphrase_file"):
    """The bytes of a passphrase file (`option` names it in errors): a regular file (a link
    is followed), opened without blocking (a FIFO or device node is refused, never waited
    on), at most PASSPHRASE_FILE_LIMIT bytes."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise Qcow2Error("%s: cannot open %s: %s" % (option, path, exc.strerror or exc),
                         option=option)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Qcow2Error("%s: %s is not a regular file" % (option, path), option=option)
        if st.st_size > PASSPHRASE_FILE_LIMIT:
            raise Qcow2Error("%s: %s holds %d bytes; a passphrase file holds at most %d"
                             % (option, path, st.st_size, PASSPHRASE_FILE_LIMIT),
                             option=option)
        data = os.read(fd, PASSPHRASE_FILE_LIMIT + 1)
        if len(data) > PASSPHRASE_FILE_LIMIT:
            raise Qcow2Error("%s: %s grew past %d bytes while it was read"
                             % (option, path, PASSPHRASE_FILE_LIMIT), option=option)
        return data
    finally:
        os.close(fd)


class TaskFailed(Exception):
    """An image that failed: `msg` and the result to return with it."""

    def __init__(self, msg, result):
        super(TaskFailed, self).__init__(msg)
        self.msg = msg
        self.result = result


def report_target_attributes(module, given, target):
    """With follow, the file attributes AnsibleModule adds to the result (owner, group, mode,
    state, size) are the managed image's, not the link's: it adds them from the returned
    path, which stays the path as given."""
    original = module.add_path_info

    def target_info(kwargs):
        info = original(dict(kwargs, path=target))
        info["path"] = kwargs.get("path", given)
        kwargs.update(info)
        return kwargs
    module.add_path_info = target_info


def _observe_quietly(path):
    try:
        return api.observe(path)
    except (Qcow2Error, OSError):
        return None


def _declared(params, path):
    declared = dict((k, params[k]) for k in (
        "size", "preallocation", "cluster_size", "compat", "refcount_bits",
        "lazy_refcounts", "extended_l2", "compression_type", "backing_file", "backing_fmt",
        "data_file", "data_file_raw", "nocow", "source", "source_format",
        "source_backing_chain") + tuple(encryption.option(key) for key in encryption.KEYS))
    if declared["backing_file"]:
        declared["backing_file_realpath"] = api.backing_realpath(path, declared["backing_file"])
    return declared


def _copy_text(action):
    """What a copy from a source does with the data and the zeros (added to the action's
    text, so check mode predicts it); None when the action copies nothing."""
    if action.kind in ("create", "recreate") and action.args.get("source"):
        mode = action.args["values"].get("preallocation") or "off"
        return {"off": "copy only the source's data clusters (zero ranges stay unallocated)",
                "metadata": "copy the source's data into mapped clusters (zero ranges stay "
                            "holes)",
                "falloc": "reserve the data clusters with fallocate, then copy the source's "
                          "data",
                "full": "copy the source's data and write zeros everywhere else"}.get(mode)
    return None


class ImageTask(object):
    """One image converged: checks, observation, decision, preflight, apply, report.

    `module` is the AnsibleModule (check mode, diff mode, file attributes), `params` the
    image's options after validation (the module's own params for `image`, one item for
    `images`). `warn` reports a warning (default `module.warn`). `planned` (check mode only)
    maps the real path of each file that earlier items of the same run create, change or
    remove to what it will be (see `planned_entry`), so that an overlay of such a file is
    predicted as the real run will make it. `run` returns the result dict, or raises
    TaskFailed with the failure's message and result."""

    def __init__(self, module, params, warn=None, planned=None):
        self.module = module
        self.params = params
        self.warn = warn or module.warn
        self.planned = planned
        self.decision = None
        self.given = self.params["path"]
        self.path = self.given
        self.result = dict(changed=False, actions=[], image={}, path=self.given)
        self.identity = None    # (st_dev, st_ino) of what observe looked at
        self._passphrase = None
        self._source_passphrase = None
        if self.params.get("source"):
            self.result["source"] = self.params["source"]

    def fail(self, msg, **extra):
        out = dict(self.result)
        out["actions"] = []
        out.update(extra)
        if out.get("option") is None:
            out.pop("option", None)
        raise TaskFailed(msg, out)

    def converge(self):
        """run(), with the engine's refusals and OS errors turned into TaskFailed."""
        try:
            return self.run()
        except Qcow2Error as exc:
            self.fail(str(exc), option=exc.option)
        except OSError as exc:
            self.fail("%s: %s" % (self.path, exc), exception=traceback.format_exc())

    def check_path(self):
        path = self.given
        if not os.path.isabs(path):
            self.fail("path: %r is relative; give an absolute path (a relative one would land "
                      "in the module's working directory on the host)" % path)
        if os.path.islink(path):
            if not self.params["follow"]:
                self.fail("%s is a symbolic link; set follow=true to manage the image it points "
                          "to, or give the real path" % path)
            self.path = os.path.realpath(path)
        if self.params["source"] and not os.path.isabs(self.params["source"]):
            self.fail("source: %r is relative; give the template's absolute path"
                      % self.params["source"], option="source")
        for option in ("encrypt_passphrase_file", "source_passphrase_file"):
            secret_file = self.params.get(option)
            if secret_file and not os.path.isabs(secret_file):
                self.fail("%s: %r is relative; give the absolute path of the file on the host"
                          % (option, secret_file), option=option)
        if self.params["data_file"] and not os.path.isabs(self.params["data_file"]):
            self.fail("data_file must be an absolute path (QEMU resolves relative data file "
                      "names against its own working directory)")

    def passphrase(self):
        """The declared passphrase as bytes, None when none is declared: encrypt_passphrase
        as UTF-8, or the whole content of encrypt_passphrase_file, as QEMU's secret object
        reads a file (a trailing newline is part of it). Read once."""
        if self._passphrase is None:
            self._passphrase = self._secret("encrypt_passphrase")
        return self._passphrase

    def source_passphrase(self):
        """The passphrase of an encrypted source as bytes (source_passphrase or the content of
        source_passphrase_file, as for passphrase), None when none is declared. Read once."""
        if self._source_passphrase is None:
            self._source_passphrase = self._secret("source_passphrase")
        return self._source_passphrase

    def _secret(self, option):
        """The bytes option `option` (or `option`_file) declares, None when neither is set."""
        params = self.params
        if params.get(option) is not None:
            value = params[option].encode("utf-8")
        elif params.get(option + "_file"):
            option += "_file"
            value = _read_secret(params[option], option)
        else:
            return None
        if not value:
            self.fail("%s: the passphrase is empty" % option, option=option)
        return value

    def warn_surprises(self, decision):
        """Warnings for what a declaration does that its author probably did not mean; the
        same in check mode as in a real run."""
        params = self.params
        warn = self.warn
        creates = [a for a in decision.actions if a.kind in ("create", "recreate")]
        if creates and params["source"] and params["source_format"] == "raw" and \
                api.starts_with_qcow2_header(params["source"]):
            warn("source: %s starts with a qcow2 header, but source_format is raw: the qcow2 "
                 "file itself (header, tables and all) becomes the guest's disk. Set "
                 "source_format: qcow2 to copy the guest content it holds."
                 % params["source"])
        if creates and params["backing_file"] and params["backing_fmt"] == "raw" and \
                self._backing_starts_with_qcow2_header():
            warn("backing_fmt: raw, but the backing file %s starts with a qcow2 header: the "
                 "guest will read the qcow2 file itself as its disk (and a size left out is "
                 "the file's length). Set backing_fmt: qcow2 to use the guest content it holds."
                 % params["backing_file"])
        if params["state"] == "absent" and self.path != self.given and \
                any(a.kind == "remove" for a in decision.actions):
            self.result["actions"].append(
                "leave the symbolic link %s dangling (follow=true removes the image it points "
                "to, %s, not the link)" % (self.given, self.path))

    def warn_attributes_in_use(self, observed, attributes_changed):
        """File attributes are changed also while QEMU holds the image: say so."""
        if attributes_changed and observed and observed.get("in_use"):
            self.warn(
                "%s is in use by a running QEMU; the change of its file attributes is applied "
                "all the same, since only the file's metadata (owner, group, mode, SELinux "
                "context) changes, never the image's content (a new owner or mode can still "
                "stop QEMU from opening the file again)" % self.path)

    def decide(self):
        params = self.params
        if params["state"] == "present":
            reconcile.regenerate_policy(params["regenerate"], params["force"])
        declared = _declared(params, self.path)
        if params["state"] == "present":
            api.validate_declaration(declared)
            problem = module_support.file_args_problem(self.module, self.path, params=params)
            if problem:
                self.fail(problem)
        size = reconcile.normalise(declared).get("size") if params["state"] == "present" \
            else None
        observed = api.observe(self.path, size=size)
        self.identity = observed.get("identity") if observed else None
        decision = reconcile.decide(declared, observed, state=params["state"],
                                    force=params["force"], regenerate=params["regenerate"])
        self.result["image"] = api.public_view(observed)
        if decision.failure:
            self.fail("%s: %s" % (self.path, decision.failure), conflicts=decision.conflicts)
        if decision.conflicts and not decision.actions:
            self.fail("%s: the existing file does not match the declaration and changing it "
                      "would lose or rewrite data; set regenerate=on_conflict (or force=true) "
                      "to recreate it (destroying its content). Differences: %s"
                      % (self.path, "; ".join(decision.conflicts)),
                      conflicts=decision.conflicts)
        api.add_leftover_cleanup(self.path, decision)
        secret = self.passphrase() if params["state"] == "present" else None
        if params.get("encrypt_check_passphrase") and observed and observed.get("encrypted") \
                and not decision.failure and not decision.conflicts:
            # Asked for: the declared passphrase must open the image on every run, also when
            # nothing is changed (a rotated secret that no longer matches the disk fails).
            try:
                api.verify_passphrase(self.path, secret)
            except Qcow2Error as exc:
                self.fail(str(exc), option=exc.option, wanted=decision.texts())
        source_secret = self.source_passphrase() if params["state"] == "present" else None
        try:
            if self.planned:
                api.preflight(self.path, decision, expected=self.identity, planned=self.planned,
                              passphrase=secret, source_passphrase=source_secret)
            else:
                api.preflight(self.path, decision, expected=self.identity, passphrase=secret,
                              source_passphrase=source_secret)
        except Qcow2Error as exc:
            self.fail(str(exc), option=exc.option, wanted=decision.texts())
        self.result["actions"] = decision.texts()
        for index, action in enumerate(decision.actions):
            copy_text = _copy_text(action)
            if copy_text:
                self.result["actions"][index] += ": " + copy_text
        self.warn_surprises(decision)
        if decision.conflicts:
            self.result["conflicts"] = decision.conflicts
        return observed, decision

    def backup(self, decision):
        """Keep the old file before a forced recreate or a removal (a hard link: no copy)."""
        if not self.params["backup"] or not os.path.lexists(self.path) or \
                not any(a.kind in ("recreate", "remove") for a in decision.actions):
            return None
        if api.is_block_device(self.path):
            self.fail("backup: a block device cannot be backed up by a link; copy it first")
        name = module_support.backup_name(self.path)
        if not self.module.check_mode:
            # Link the file that was inspected, not whatever the path holds by now.
            nodes.check_identity(self.path, self.identity)
            os.link(self.path, name, follow_symlinks=False)
        return name

    def apply(self, decision):
        backup = self.backup(decision)
        try:
            outcomes = api.apply(self.path, decision,
                                 mode=module_support.creation_mode(self.module, self.params),
                                 expected=self.identity, passphrase=self.passphrase(),
                                 source_passphrase=self.source_passphrase())
        except Qcow2Error as exc:
            if backup and os.path.lexists(backup) and os.path.exists(self.path) and \
                    os.path.samefile(backup, self.path):
                os.unlink(backup)   # nothing was replaced: the old file is still at path
            if not getattr(exc, "modified", False):
                raise
            self.fail("%s (the file was changed before the failure: %s)"
                      % (exc, "; ".join(exc.done) or "partial writes"),
                      changed=True, actions=list(exc.done), option=exc.option,
                      image=api.public_view(_observe_quietly(self.path)))
        if backup and not self.module.check_mode:
            self.result["backup_file"] = backup
        for outcome in outcomes:
            if isinstance(outcome, dict) and outcome.get("method"):
                self.result["method"] = outcome["method"]
                if outcome.get("fallocate_refused"):
                    self.result["actions"].append(
                        "the filesystem refused fallocate: zeros were written instead")

    def predict_attributes(self, decision):
        """(before, after, changed) of the file attributes, from the file as it is before the
        run (the same in check mode and in the real run). A file that does not exist yet has
        no attributes before; after, it has the declared ones."""
        module = self.module
        if self.params["state"] != "present":
            return {}, {}, False
        if decision.before.get("state") == "absent" or not os.path.exists(self.path):
            if not decision.actions:
                return {}, {}, False
            return {}, self.declared_attributes(), False
        file_args = module.load_file_common_arguments(self.params, path=self.path)
        diff = {"before": {}, "after": {}}
        real_check_mode = module.check_mode
        module.check_mode = True    # compare only; the real run changes them after apply
        try:
            changed = module.set_fs_attributes_if_different(file_args, False, diff=diff)
        finally:
            module.check_mode = real_check_mode
        return diff["before"], diff["after"], changed

    def declared_attributes(self):
        """The owner, group and mode a new file gets, as set_fs_attributes_if_different shows
        them in a diff (numeric ids, octal mode)."""
        import grp
        import pwd
        params = self.params
        out = {}
        if params.get("owner") is not None:
            try:
                out["owner"] = int(params["owner"])
            except ValueError:
                out["owner"] = pwd.getpwnam(params["owner"]).pw_uid
        if params.get("group") is not None:
            try:
                out["group"] = int(params["group"])
            except ValueError:
                out["group"] = grp.getgrnam(params["group"]).gr_gid
        if params.get("mode") is not None:
            out["mode"] = "0%03o" % module_support.creation_mode(self.module, params)
        return out

    def run(self):
        module = self.module
        self.check_path()
        observed, decision = self.decide()
        self.decision = decision
        attrs_before, attrs_after, attrs_changed = self.predict_attributes(decision)
        if not module.check_mode and decision.actions:
            self.apply(decision)
        # Observe again only when something was done; otherwise the first look is current.
        after = api.observe(self.path) if decision.actions and not module.check_mode \
            else observed
        # Both diffs come from the decision, so check mode shows what the real run will.
        diff = {"before": dict(decision.before, **attrs_before),
                "after": dict(decision.after, **attrs_after),
                "before_header": self.given, "after_header": self.given}
        changed = decision.changed or attrs_changed
        if self.params["state"] == "present" and not module.check_mode and \
                os.path.exists(self.path):
            file_args = module.load_file_common_arguments(self.params, path=self.path)
            changed = module.set_fs_attributes_if_different(file_args, changed)
        self.warn_attributes_in_use(observed, attrs_changed and not decision.changed)
        self.result["changed"] = changed
        self.result["image"] = api.public_view(after)
        if module._diff:
            self.result["diff"] = diff
        return self.result

    def _backing_starts_with_qcow2_header(self):
        backing = api.resolve_relative(self.path, self.params["backing_file"])
        if self.planned:
            key = os.path.realpath(backing)
            if key in self.planned:
                planned = self.planned[key]
                return bool(planned) and planned.get("format") == "qcow2"
        return api.starts_with_qcow2_header(backing)

    def planned_entry(self):
        """(real path, what it will be) after this image's run, for the `planned` map of the
        images that follow it in check mode; None when the run changes nothing on disk. What
        it will be: None when it is removed, else {"format": "qcow2", "virtual_size": N,
        "backing_file": name or None, "made": whether this run creates or recreates it,
        "encrypted": whether it is declared encrypted}."""
        decision = self.decision
        if decision is None or not decision.actions:
            return None
        key = os.path.realpath(self.path)
        if any(a.kind == "remove" for a in decision.actions):
            return key, None
        made = any(a.kind in ("create", "recreate") for a in decision.actions)
        return key, {"format": "qcow2", "virtual_size": decision.after.get("virtual_size"),
                     "backing_file": decision.after.get("backing_file"), "made": made,
                     "encrypted": bool(decision.after.get("encryption"))}

    def result_with_path_info(self, result):
        """`result` with the file attributes AnsibleModule adds to a module's result for its
        `path` (uid, gid, owner, group, mode, state, size), read from the managed image (the
        link's target with follow), the path staying as given."""
        info = self.module.add_path_info(dict(result, path=self.path))
        info["path"] = result.get("path", self.given)
        return info
