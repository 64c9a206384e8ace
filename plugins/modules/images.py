#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r"""
---
module: images
short_description: Converge a list of qcow2 disk images in one run, without qemu-img
version_added: 0.1.0
description:
  - Converges every image of O(images), in list order, in one module run. Each item is what
    one M(vdisk.qcow2.image) task declares, with the same options, checks, actions and
    results. It is the same code as M(vdisk.qcow2.image), run once per item.
  - Each item is merged over O(defaults) (an item's own key wins; a key set to V(null) in an
    item drops the default for that item, so the option takes the module's own default), then
    validated like the options of M(vdisk.qcow2.image); an invalid item fails with a message
    naming the item (its index and path) and the parameter, and the other items are still
    converged.
  - A failing item fails the task, but the items after it are still converged, as a loop
    would do, except those made from it (an item whose C(backing_file) or
    C(source) is the path of an item that failed or was skipped), which are skipped
    with a result saying why.
  - In check mode an overlay declared after its base in the same list is predicted as the
    real run will make it, also when the base does not exist yet (the module knows the base
    will exist, with its declared size, when it predicts the overlay).
author:
  - vdisk.qcow2 developers (@vdisk-qcow2)
options:
  images:
    description:
      - The images, converged in list order. Each item takes the options of
        M(vdisk.qcow2.image) (O(vdisk.qcow2.image#module:path) is required, and the file
        attributes O(vdisk.qcow2.image#module:owner), O(vdisk.qcow2.image#module:group),
        O(vdisk.qcow2.image#module:mode), the SELinux options,
        O(vdisk.qcow2.image#module:attributes) and O(vdisk.qcow2.image#module:unsafe_writes)
        too), documented there.
      - Per-item O(vdisk.qcow2.image#module:regenerate), O(vdisk.qcow2.image#module:force),
        O(vdisk.qcow2.image#module:backup) and O(vdisk.qcow2.image#module:follow) act on that
        item alone.
      - A key set to V(null) drops the default of O(defaults) for this item; V(false) and
        empty values are passed on.
    type: list
    elements: dict
    required: true
  defaults:
    description:
      - Options shared by every item of O(images) that does not set them itself (for example
        the owner, mode and preallocation of every image). Any option of M(vdisk.qcow2.image)
        but O(vdisk.qcow2.image#module:path).
    type: dict
    default: {}
extends_documentation_fragment:
  - vdisk.qcow2.host_caches
  - ansible.builtin.action_common_attributes
  - action_common_attributes.files
attributes:
  check_mode:
    support: full
    details:
      - Check mode predicts for each item exactly what a real run would do (RV(results[].changed),
        RV(results[].actions), a failure and its message) and touches nothing. An item made
        from an earlier item of the list (its backing file) is predicted from what that item
        will be after the run.
  diff_mode:
    support: full
    details:
      - Each item's diff is in RV(results[].diff), and the top-level RV(diff) is the list of
        the diffs of the items that change, shown one after the other like those of a loop.
  platform:
    platforms: posix
  safe_file_operations:
    support: full
  vault:
    support: none
notes:
  - Unlike a loop over M(vdisk.qcow2.image), the list is sent to the host once and converged
    by one process, which is faster for long lists.
  - Check mode predicts an overlay of an earlier item from that item's declared size only when
    the overlay's O(vdisk.qcow2.image#module:backing_fmt) is V(qcow2). A copy whose
    O(vdisk.qcow2.image#module:source) is an earlier item of the list that this run creates is
    predicted from that item's declaration (its size, its backing file, refused like the real
    run refuses it), with O(vdisk.qcow2.image#module:source_format=qcow2); check mode does not
    judge the copy's free space then, and fails on V(raw) (the real run would copy the qcow2
    file's bytes as guest data, with a warning).
seealso:
  - module: vdisk.qcow2.image
  - module: vdisk.qcow2.image_info
"""

EXAMPLES = r"""
- name: The images of a host, with shared defaults
  vdisk.qcow2.images:
    defaults:
      owner: qemu
      group: qemu
      mode: "0600"
      preallocation: metadata
    images:
      - path: /var/lib/images/db01.qcow2
        size: 100G
      - path: /var/lib/images/db01-wal.qcow2
        size: 16G
        preallocation: falloc
      - path: /var/lib/images/scratch.qcow2
        size: 4G
        mode: null  # the default dropped: the file's mode is left alone
      - path: /var/lib/images/old.qcow2
        state: absent
  register: converged

- name: A base image and a VM disk on it (works with --check before either exists)
  vdisk.qcow2.images:
    images:
      - path: /var/lib/images/base/debian-12.qcow2
        source: /var/lib/images/templates/debian-12-genericcloud.qcow2
        source_format: qcow2
        size: 20G
      - path: /var/lib/images/web01.qcow2
        backing_file: base/debian-12.qcow2  # relative to the overlay's directory
        backing_fmt: qcow2

- name: Show what changed
  ansible.builtin.debug:
    msg: "{{ item.path }}: {{ item.actions | join('; ') if item.changed else 'as declared' }}"
  loop: "{{ converged.results }}"
  loop_control:
    label: "{{ item.path }}"
"""

RETURN = r"""
summary:
  description:
    - One compact element per item of O(images), in list order (what the role
      C(vdisk.qcow2.images) registers as C(qcow2_images_results)) - the item's C(path)
      and C(state) as declared (after O(defaults); V(present) when not given), then
      those of C(changed), C(failed), C(skipped), C(msg), C(skip_reason), C(actions), C(image),
      C(conflicts), C(backup_file) and C(method) that the item's result in RV(results) has.
  returned: always
  type: list
  elements: dict
  sample:
    - path: /var/lib/images/web01.qcow2
      state: present
      changed: false
      failed: false
      skipped: false
      actions: []
      image: {format: qcow2, virtual_size: 21474836480, preallocation: metadata}
results:
  description:
    - One result per item of O(images), in list order, each the dict M(vdisk.qcow2.image)
      returns for it (RV(vdisk.qcow2.image#module:path), RV(vdisk.qcow2.image#module:actions),
      RV(vdisk.qcow2.image#module:image), RV(vdisk.qcow2.image#module:conflicts),
      RV(vdisk.qcow2.image#module:backup_file), RV(vdisk.qcow2.image#module:method),
      RV(vdisk.qcow2.image#module:source), RV(vdisk.qcow2.image#module:diff), the file
      attributes C(owner), C(group), C(mode), C(uid), C(gid), C(state), C(size) of an image
      that exists, and C(msg) and C(option) on a failure), with C(changed), C(failed) and
      C(skipped).
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: The path of the image, as given.
      type: str
      returned: always
      sample: /var/lib/images/web01.qcow2
    changed:
      description: Whether the item changed (in check mode, would change).
      type: bool
      returned: always
    failed:
      description: Whether the item failed; C(msg) says why.
      type: bool
      returned: always
    skipped:
      description:
        - Whether the item was skipped because it is made from an item that failed or was
          skipped (its backing file or source is that item's path); C(skip_reason) says which.
      type: bool
      returned: always
    skip_reason:
      description: Why the item was skipped, naming the item it depends on.
      type: str
      returned: when the item was skipped
      sample: "backing_file base.qcow2 is images[0] (/var/lib/images/base.qcow2), which failed
        or was skipped in this run"
    msg:
      description: Why the item failed (for an invalid item, each parameter's error).
      type: str
      returned: when the item failed
    actions:
      description: The steps taken, or in check mode the steps a real run would take.
      type: list
      elements: str
      returned: always
    image:
      description: The image after the change (in check mode, as it is now); empty when absent.
      type: dict
      returned: always
    diff:
      description: The item's diff, as M(vdisk.qcow2.image) returns it.
      type: dict
      returned: when diff mode is on and the item was converged (did not fail, was not skipped)
  sample:
    - path: /var/lib/images/base.qcow2
      changed: true
      failed: false
      skipped: false
      actions: ["create the image (16 MiB, preallocation off)"]
      image: {format: qcow2, virtual_size: 16777216}
      method: sparse
diff:
  description:
    - With C(--diff), the diffs of the items that changed (in check mode, would change), in
      list order; the callback shows them one after the other, as it shows the diffs of a
      loop's changed items. Every converged item's diff, changed or not, is in its
      RV(results[].diff).
  returned: when diff mode is on
  type: list
  elements: dict
msg:
  description: On a failure, each failed or skipped item with its index, path and message.
  returned: when an item failed
  type: str
  sample: "images[1] (/var/lib/images/db02.qcow2): size: '12 parsecs' is not a size"
"""

from ansible.module_utils.basic import AnsibleModule

# First: the engine's bytecode is cached on the host (module_utils/bytecode_cache.py).
from ansible_collections.vdisk.qcow2.plugins.module_utils import bytecode_cache  # noqa: F401 pylint: disable=unused-import
from ansible_collections.vdisk.qcow2.plugins.module_utils import image_list


class ImagesModule(AnsibleModule):
    """AnsibleModule that knows the items' passphrases (encrypt_passphrase...) are secrets
    before it logs its invocation: they are masked in the host's log and in the result."""

    def _log_invocation(self):
        self.no_log_values.update(image_list.secrets(self.params.get("images"),
                                                     self.params.get("defaults")))
        super(ImagesModule, self)._log_invocation()


def main():
    module = ImagesModule(
        argument_spec=dict(
            images=dict(type="list", elements="dict", required=True),
            defaults=dict(type="dict", default={}),
        ),
        supports_check_mode=True,
    )
    # Also when the invocation is not logged (no_log): the result's copy of the arguments.
    module.no_log_values.update(image_list.secrets(module.params["images"],
                                                   module.params["defaults"]))
    if "path" in module.params["defaults"]:
        module.fail_json(msg="defaults: path is given per item of images, not in defaults")
    runner = image_list.ImageList(module, module.params["images"], module.params["defaults"])
    results, failures, skips = runner.run()
    out = dict(changed=any(r.get("changed") for r in results), results=results,
               summary=runner.summary)
    if module._diff:
        # As the callback shows a loop's diffs: those of the items that changed.
        out["diff"] = [r["diff"] for r in results if r.get("diff") and r.get("changed")]
    if failures:
        module.fail_json(msg="; ".join(failures + skips), **out)
    module.exit_json(**out)


if __name__ == "__main__":
    main()
