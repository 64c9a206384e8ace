# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A list of images converged in one module run (vdisk.qcow2.images): each item merged over
the shared defaults, validated with the argument spec of vdisk.qcow2.image, then converged by
the same ImageTask, in list order."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

from ansible.module_utils.basic import FILE_COMMON_ARGUMENTS
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.module_utils.errors import UnsupportedError

from ansible_collections.vdisk.qcow2.plugins.module_utils import image_task


def item_validator():
    """The validator of one item: the options of vdisk.qcow2.image and the file attributes."""
    spec = image_task.argument_spec()
    for key, value in FILE_COMMON_ARGUMENTS.items():
        spec.setdefault(key, dict(value))
    return ArgumentSpecValidator(spec, required_together=image_task.REQUIRED_TOGETHER,
                                 required_by=image_task.REQUIRED_BY,
                                 mutually_exclusive=image_task.MUTUALLY_EXCLUSIVE)


def secrets(images, defaults):
    """The values of the no_log options of vdisk.qcow2.image (passphrases) in the items and
    defaults, before any validation: AnsibleModule cannot know them (the items are plain
    dicts), so the module registers them itself, before it logs its invocation."""
    secret_keys = [key for key, spec in image_task.argument_spec().items() if spec.get("no_log")]
    found = set()
    for entry in list(images or []) + [defaults or {}]:
        if not isinstance(entry, dict):
            continue
        for key in secret_keys:
            value = entry.get(key)
            if isinstance(value, str) and value:
                found.add(value)
    return found


def merge(defaults, item):
    """The item over the defaults: the item's own keys win, and a key set to None (null) in
    either is left out, so the option takes the module's own default."""
    merged = dict(defaults or {})
    merged.update(item)
    return dict((k, v) for k, v in merged.items() if v is not None)


def label(index, path):
    return "images[%d] (%s)" % (index, path) if path else "images[%d]" % index


def _key(path):
    return os.path.realpath(path)


def _depends_on(params, path):
    """(option, file) of each file this image is made from: its backing file (resolved
    against the image's directory) and its source."""
    out = []
    if params.get("backing_file"):
        name = params["backing_file"]
        if not os.path.isabs(name):
            name = os.path.join(os.path.dirname(os.path.abspath(path)), name)
        out.append(("backing_file", name))
    if params.get("source"):
        out.append(("source", params["source"]))
    return out


# The keys of an item's result that its summary keeps (the role's qcow2_images_results).
SUMMARY_KEYS = ("changed", "failed", "skipped", "msg", "skip_reason", "actions", "image",
                "conflicts", "backup_file", "method")


def summarise(merged, result):
    """One element of `summary`: the item's declared path and state (after the defaults),
    then the keys of SUMMARY_KEYS its result has."""
    state = merged.get("state") if isinstance(merged, dict) else None
    out = {"path": merged.get("path") if isinstance(merged, dict) else None,
           "state": state or "present"}
    for key in SUMMARY_KEYS:
        if key in result:
            out[key] = result[key]
    return out


class ImageList(object):
    """One run over the list. `run()` returns (results, failures, skips): one result per item
    in list order, and the labels of the failed and skipped items."""

    def __init__(self, module, images, defaults):
        self.module = module
        self.images = images
        self.defaults = defaults or {}
        self.validator = item_validator()
        # Check mode: what the images converged so far will have made of their files, so an
        # overlay of one of them is predicted as the real run makes it.
        self.planned = {} if module.check_mode else None
        self.broken = {}    # real path of a failed or skipped item -> its label

    def run(self):
        results, failures, skips = [], [], []
        self.summary = []
        for index, item in enumerate(self.images):
            result = self.converge_item(index, item)
            where = label(index, result.get("path"))
            if result.get("failed"):
                failures.append("%s: %s" % (where, result.get("msg")))
            elif result.get("skipped"):
                skips.append("%s: %s" % (where, result.get("skip_reason")))
            results.append(result)
            self.summary.append(summarise(merge(self.defaults, item), result))
        return results, failures, skips

    def converge_item(self, index, item):
        merged = merge(self.defaults, item)
        given = merged.get("path")
        where = label(index, given)
        checked = self.validator.validate(merged)
        if checked.error_messages:
            messages = []
            for error in checked.errors.errors:
                text = error.args[0] if error.args else str(error)
                if isinstance(error, UnsupportedError):
                    text = "unsupported parameter: %s" % text
                messages.append(text)
            if isinstance(given, str) and given:
                self.broken[_key(given)] = where
            return dict(path=given, changed=False, failed=True, skipped=False, actions=[],
                        image={}, msg="; ".join(messages))
        params = checked.validated_parameters
        self.module.no_log_values.update(checked._no_log_values)
        path = params["path"]
        for option, name in _depends_on(params, path):
            failed = self.broken.get(_key(name))
            if failed:
                self.broken[_key(path)] = where
                reason = "%s %s is %s, which failed or was skipped in this run" \
                    % (option, params[option], failed)
                return dict(path=path, changed=False, failed=False, skipped=True,
                            skip_reason=reason, actions=[], image={})
        module = self.module

        def warn(message):
            module.warn("%s: %s" % (where, message))
        task = image_task.ImageTask(module, params, warn=warn, planned=self.planned)
        try:
            result = task.converge()
        except image_task.TaskFailed as failed:
            self.broken[_key(task.path)] = where
            if task.path != task.given:
                self.broken[_key(task.given)] = where
            result = dict(failed.result, msg=failed.msg, failed=True)
        else:
            result["failed"] = False
            if self.planned is not None:
                entry = task.planned_entry()
                if entry:
                    self.planned[entry[0]] = entry[1]
        result["skipped"] = False
        return task.result_with_path_info(result)
