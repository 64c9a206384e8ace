#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r"""
---
module: image_info
short_description: Inspect a qcow2 image without qemu-img and without taking a lock
version_added: 0.1.0
description:
  - Reads the header, tables and allocation state of the qcow2 image at O(path) and returns
    them, including the preallocation level the image actually satisfies (judged from its
    tables and from the filesystem) and whether a running QEMU holds it.
  - Never writes and takes no lock, so it works on images a running VM holds open.
  - A file that is not a qcow2 image, or a damaged one, gives a result that says so
    (RV(image.error)) rather than a failure.
  - A FIFO, a socket, a character device, a directory or a path through a regular file at
    O(path) is never opened (it could block or have effects of its own); the module fails
    at once with a message naming what the node is, and RV(exists) tells whether a node is
    there.
author:
  - vdisk.qcow2 developers (@vdisk-qcow2)
options:
  path:
    description:
      - Path of the image on the managed node.
    type: path
    required: true
  check:
    description:
      - Also run the full consistency check (like C(qemu-img check)) and return RV(image.check).
    type: bool
    default: false
  follow:
    description:
      - When O(path) is a symbolic link, inspect the image it points to. By default (like
        M(ansible.builtin.stat)) the link itself is reported (RV(islink)) and not followed.
    type: bool
    default: false
  max_size:
    description:
      - The largest virtual size (a raw file's length) that RV(image.unsafe_reasons) accepts
        for a template, in bytes or with a binary suffix (V(64T), V(500GiB)). V(0) turns
        the limit off.
      - A template claiming a larger size is reported, because creating, checking or
        copying such an image can exhaust the host's disk or memory.
    type: str
    default: 64T
extends_documentation_fragment:
  - vdisk.qcow2.host_caches
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details:
      - This module only reads; it behaves the same in check mode.
  diff_mode:
    support: N/A
    details:
      - This module never changes anything.
  platform:
    platforms: posix
notes:
  - Backing files and external data files are never opened.
  - RV(image.unsafe_reasons) vets a file before it is used as an untrusted template (the
    O(vdisk.qcow2.image#module:source) of M(vdisk.qcow2.image)); see the templates guide.
seealso:
  - module: vdisk.qcow2.image
"""

EXAMPLES = r"""
- name: Read an image's properties
  vdisk.qcow2.image_info:
    path: /var/lib/images/web01.qcow2
  register: web01

- name: Show the preallocation the image really has
  ansible.builtin.debug:
    msg: "{{ web01.image.preallocation }} ({{ web01.image.virtual_size | human_readable }})"

- name: Check consistency like qemu-img check
  vdisk.qcow2.image_info:
    path: /var/lib/images/web01.qcow2
    check: true
  register: checked
  # image.check is there only for a qcow2 image: a raw file or a missing path has none.
  failed_when: (checked.image.check.corruptions | default(0)) > 0

- name: Vet a downloaded template before using it
  vdisk.qcow2.image_info:
    path: /var/lib/images/templates/download.qcow2
    check: true
  register: template

- name: Refuse a template that is not safe to copy
  ansible.builtin.assert:
    that: template.image.unsafe_reasons == []
    fail_msg: "{{ template.image.unsafe_reasons | join('; ') }}"
"""

RETURN = r"""
path:
  description: The path as given.
  returned: always
  type: str
islink:
  description: Whether O(path) is a symbolic link (inspected only with O(follow=true)).
  returned: always
  type: bool
exists:
  description: Whether a file exists at O(path).
  returned: always
  type: bool
  sample: true
image:
  description:
    - What the image is. Empty when nothing exists at O(path).
  returned: always
  type: dict
  contains:
    format:
      description: C(qcow2), or C(unknown) for a file that is not a valid qcow2 image.
      type: str
      sample: qcow2
    unsafe_reasons:
      description:
        - Why the file is not safe to use as an untrusted template (the source of a new
          image), one sentence each; an empty list when no reason was found.
        - Reasons are a backing file (named; its chain could lead to any host file), an
          external data file, encryption, unknown incompatible feature bits, the corrupt or
          dirty bit, a qcow2 header that QEMU would refuse (the message says why), a virtual
          size above O(max_size), corruptions found by O(check=true), and for a file that is
          not qcow2, the signature of another disk format (VMDK, VHD, VHDX, VDI, QED, LUKS,
          qcow version 1, and others), so that a file passed off as raw is caught.
        - A plain raw file without such a signature, or a clean self-contained qcow2 image,
          gives V([]).
      returned: when a file exists at O(path)
      type: list
      elements: str
      sample:
        - "it has a backing file '/etc/shadow' (a backing chain can name any host file,
          which a copy would read)"
    error:
      description: Why the file is not a valid qcow2 image.
      type: str
      returned: when RV(image.format) is C(unknown)
    virtual_size:
      description: Virtual size in bytes.
      type: int
      sample: 21474836480
    cluster_size:
      description: Cluster size in bytes.
      type: int
      sample: 65536
    compat:
      description: Compatibility level, C(0.10) or C(1.1).
      type: str
      sample: "1.1"
    refcount_bits:
      description: Width of a reference count.
      type: int
      sample: 16
    lazy_refcounts:
      description: Whether lazy refcounts are on.
      type: bool
    extended_l2:
      description: Whether L2 entries have subcluster bitmaps.
      type: bool
    compression_type:
      description: C(zlib) or C(zstd).
      type: str
    backing_file:
      description: The backing file name recorded in the image, or null.
      type: str
    backing_fmt:
      description: The backing file format recorded in the image, or null.
      type: str
    data_file:
      description: The external data file name recorded in the image, or null.
      type: str
    data_file_raw:
      description: Whether the external data file is a raw image by itself.
      type: bool
    dirty:
      description: Whether the dirty bit is set (refcounts need repair).
      type: bool
    corrupt:
      description: Whether QEMU marked the image corrupt.
      type: bool
    encrypted:
      description: Whether the image is encrypted.
      type: bool
    encryption:
      description:
        - How the image is encrypted, read from its headers without the passphrase (the
          C(encrypt) block of C(qemu-img info)); V(null) when it is not encrypted. An image
          with the legacy AES method has only RV(image.encryption.format).
      type: dict
      contains:
        format:
          description: V(luks), or V(aes) for the legacy method QEMU no longer opens.
          type: str
        cipher_alg:
          description: Cipher and key size, as qemu-img names them (V(aes-256)).
          type: str
        cipher_mode:
          description: Cipher mode (V(xts), V(cbc), V(ecb), V(ctr)).
          type: str
        ivgen_alg:
          description: IV generator (V(plain64), V(plain), V(essiv)).
          type: str
        ivgen_hash_alg:
          description: Hash of the V(essiv) IV generator; V(null) for the others.
          type: str
        hash_alg:
          description: Hash of the key derivation (PBKDF2) and of the key digest.
          type: str
        uuid:
          description: The UUID in the LUKS header.
          type: str
        payload_offset:
          description: Byte offset of the encrypted payload within the LUKS volume.
          type: int
        master_key_iters:
          description: PBKDF2 iterations of the master key digest.
          type: int
        active_slots:
          description: Indexes (0-7) of the key slots that hold a key.
          type: list
          elements: int
        slots:
          description: The eight key slots, as qemu-img lists them.
          type: list
          elements: dict
          contains:
            active:
              description: Whether the slot holds a key.
              type: bool
            key_offset:
              description: Byte offset of the slot's key material within the LUKS volume.
              type: int
            iters:
              description: PBKDF2 iterations of the slot's key (active slots only).
              type: int
            stripes:
              description: Anti-forensic stripes of the slot's key (active slots only).
              type: int
    preallocation:
      description:
        - The highest preallocation level the image satisfies, from its tables and the
          filesystem (C(off) < C(metadata) < C(falloc) < C(full)).
      type: str
      sample: metadata
    actual_size:
      description: Bytes the file occupies on disk.
      type: int
    allocated_clusters:
      description: Guest clusters mapped to host clusters.
      type: int
    in_use:
      description: Whether a QEMU process holds the image open for writing (its lock bytes).
      type: bool
    guest_data:
      description:
        - Whether the guest has written data into the image (compressed clusters, or data
          clusters whose written host bytes are not all zeros; at most 256 MiB are read,
          past that the answer is V(true)).
      type: bool
      sample: false
    allocation_method:
      description:
        - How the preallocation level was judged from the host file, one of
          C(fiemap) (extents, including unwritten ones), C(seek) (C(SEEK_DATA)/C(SEEK_HOLE)),
          C(st_blocks) (the block count only), C(l2 tables (no host data clusters to inspect))
          (no guest cluster has a host cluster of its own; none is mapped, or every mapped
          one is compressed), C(l2 tables only (the external data file is not inspected)),
          or C(block device (every block allocated)).
      type: str
      sample: fiemap
    snapshots:
      description: Number of internal snapshots.
      type: int
    leaked_clusters:
      description:
        - Clusters leaked at the end of the file (counted but referenced by nothing), as the
          cheap scan that runs on every inspection sees them. An interrupted change leaves
          them; M(vdisk.qcow2.image) reclaims them on its next run. Leaks elsewhere in the
          file are counted only by O(check=true).
        - V(null) when the scan is not exact for this image (internal snapshots, persistent
          bitmaps, or a dirty image).
      type: int
    check:
      description:
        - Consistency check like C(qemu-img check).
      returned: when O(check=true) and the file is a qcow2 image
      type: dict
      contains:
        check_errors:
          description: Errors that stopped the check.
          type: int
        corruptions:
          description: Corruptions found.
          type: int
        leaks:
          description: Leaked clusters.
          type: int
        image_end_offset:
          description: End of the last cluster in use.
          type: int
        allocated_clusters:
          description: Allocated guest clusters, as qemu-img counts them.
          type: int
        messages:
          description: The first problems found, one line each.
          type: list
          elements: str
"""

import os
import traceback

from ansible.module_utils.basic import AnsibleModule

# First: the engine's bytecode is cached on the host (module_utils/bytecode_cache.py).
from ansible_collections.vdisk.qcow2.plugins.module_utils import bytecode_cache  # noqa: F401 pylint: disable=unused-import
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.format.errors import Qcow2Error
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.format.options import parse_size


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            check=dict(type="bool", default=False),
            follow=dict(type="bool", default=False),
            max_size=dict(type="str", default="64T"),
        ),
        supports_check_mode=True,
    )
    given = module.params["path"]
    path = given
    islink = os.path.islink(given)
    if islink:
        if not module.params["follow"]:
            module.warn("%s is a symbolic link; set follow=true to inspect the image it points "
                        "to" % given)
            module.exit_json(changed=False, exists=True, islink=True, path=given, image={})
        path = os.path.realpath(given)
    try:
        max_size = parse_size(module.params["max_size"], "max_size")
    except Qcow2Error as exc:
        module.fail_json(msg=str(exc), path=given, image={})
    try:
        observed = api.observe(path, with_check=module.params["check"])
    except Qcow2Error as exc:
        module.fail_json(msg=str(exc), exists=os.path.lexists(path), islink=islink, path=given,
                         image={})
    except OSError as exc:
        module.fail_json(msg="%s: %s" % (given, exc), exception=traceback.format_exc(),
                         path=given)
    module.exit_json(changed=False, exists=observed is not None, islink=islink, path=given,
                     image=api.public_view(observed, vet_path=path, max_size=max_size))


if __name__ == "__main__":
    main()
