#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r"""
---
module: image
short_description: Declare a qcow2 disk image and converge it, without qemu-img
version_added: 0.1.0
description:
  - Makes sure a qcow2 image exists at O(path) with the declared size, format options and
    preallocation, or that it does not exist.
  - The module reads the existing image's header and allocation state, compares them with the
    declaration and does only what is missing. A second run reports no change.
  - Changes that keep what the guest reads are made in place and reported; growing the
    virtual size (the new range reads zeros, also over a longer backing file, and is
    preallocated like the rest), raising the preallocation of a used or fresh image
    (C(off) to C(metadata) to C(falloc) to C(full); the guest's data stays where it is),
    upgrading compat 0.10 to 1.1, turning lazy refcounts on or off, reclaiming clusters that
    an interrupted run leaked at the end of the file, and file attributes.
  - Every in-place change first runs a consistency check; an image with corruptions, or one
    marked dirty or corrupt, is refused with the C(qemu-img check -r) command that repairs it,
    and the file is left as it was. A run that fails after it changed the file reports
    C(changed=true) and the steps it completed in RV(actions).
  - Changes that would lose data or change what the guest reads (shrinking over guest data,
    another cluster
    size, refcount width, extended L2, compression type, data file or backing file, a compat
    downgrade, raising the preallocation of an overlay without extended L2 whose clusters
    still read from the backing file, mapping or growing an image with internal snapshots, or
    a file at O(path) that is not a qcow2 image) fail with a message listing each difference,
    unless O(regenerate=on_conflict) (or O(force=true)), which recreates the image from the
    declaration.
  - O(regenerate=always) makes the image again on every run, from the declaration and its
    O(source) if one is given, to re-provision a disk from its template.
  - An image that a running QEMU holds open (QEMU's own lock bytes) is never modified,
    replaced or removed. Its file attributes (owner, group, mode, SELinux context) are still
    changed when they differ from the declaration, with a warning (that touches only the
    file's metadata, never its content).
  - New images are written to a temporary file in the target directory, made durable and
    renamed into place, so a failure leaves either no image or the complete one.
  - Everything runs in pure Python on the managed node; qemu-img is not needed there.
author:
  - vdisk.qcow2 developers (@vdisk-qcow2)
options:
  path:
    description:
      - Absolute path of the qcow2 image on the managed node (a relative path is refused).
      - A symbolic link at O(path) is refused unless O(follow=true).
      - A FIFO, a socket, a character device, a directory or a path through a regular file is
        refused at once with a message naming what it is; such a node is never opened, replaced
        or removed, also with O(force=true), O(state=absent) or O(backup=true). A block device
        is written only when O(force=true) or O(regenerate) recreates the image.
    type: path
    required: true
  state:
    description:
      - V(present) makes sure the image exists as declared; V(absent) removes it (only when
        no QEMU holds it).
    type: str
    choices: [present, absent]
    default: present
  size:
    description:
      - Virtual size of the image, as an integer number of bytes or a string with a binary
        suffix C(k)/C(K), C(M), C(G), C(T), C(P), C(E) (optionally followed by C(B) or
        C(iB), for example C(10G), C(512MiB), C(1.5T)). Rounded up to a multiple of 512
        like qemu-img.
      - Required to create an image unless O(backing_file) gives the size.
      - A number is bytes (C(1.5) is refused; write C(1.5G)).
      - A larger size than the image's grows it in place. A smaller one shrinks it in place
        only when the guest reads zeros past the new end through the whole chain (the image's
        own clusters and, for an overlay, the data of its backing files; a backing file that
        cannot be read refuses). Otherwise it is a conflict, which only recreating the image
        resolves (O(regenerate=on_conflict) or O(force=true)). Check mode says which.
    type: raw
  preallocation:
    description:
      - The least preallocation the image must have. An image at a higher level satisfies a
        lower declaration (V(off) < V(metadata) < V(falloc) < V(full)).
      - V(off) writes only the header and tables (the file stays tiny).
      - V(metadata) writes every L2 table so each guest cluster has a host cluster; data
        clusters are left as holes.
      - V(falloc) is metadata plus one C(fallocate) call reserving the data clusters on disk;
        where the filesystem refuses, zeros are written and RV(actions) says so.
      - V(full) is metadata plus zeros really written (large buffers, then C(fdatasync)).
    type: str
    choices: ['off', metadata, falloc, full]
    default: 'off'
  cluster_size:
    description:
      - Cluster size, a power of two from 512 bytes to 2 MiB (same size syntax as O(size)).
      - New images default to 64 KiB; for an existing image it is only compared when given.
    type: raw
  compat:
    description:
      - qcow2 compatibility level, C('0.10') (also C(v2)) or C('1.1') (also C(v3)).
      - Quote it in YAML; an unquoted C(0.10) arrives as the number C(0.1) and is refused
        with a message saying so.
      - New images default to C(1.1). Declaring C(1.1) upgrades a C(0.10) image in place;
        declaring C(0.10) for a C(1.1) image is a conflict.
    type: raw
  refcount_bits:
    description:
      - Width of a reference count; widths other than 16 need compat 1.1. New images get 16.
    type: int
    choices: [1, 2, 4, 8, 16, 32, 64]
  lazy_refcounts:
    description:
      - Whether the lazy refcounts feature is on (compat 1.1). Changed in place.
    type: bool
  extended_l2:
    description:
      - Whether L2 entries carry subcluster bitmaps (compat 1.1, clusters of 16 KiB or more).
    type: bool
  compression_type:
    description:
      - Compression type recorded in the header (compat 1.1 for V(zstd)). New images get V(zlib).
    type: str
    choices: [zlib, zstd]
  backing_file:
    description:
      - Backing file name to record in the image (relative names are relative to the image's
        directory). Requires O(backing_fmt); the format of a backing file is never guessed.
      - With a backing file, preallocation other than V(off) needs O(extended_l2=true).
      - For an existing image the names are compared by the file they lead to; an absolute
        name for an image that records a relative one (or the reverse) is the same backing
        file, and the recorded name is kept as it is (the header is not rewritten).
    type: str
  backing_fmt:
    description:
      - Format of O(backing_file), for example V(qcow2) or V(raw); a block driver name QEMU
        knows (an unknown name is refused, as qemu-img refuses it).
    type: str
  data_file:
    description:
      - Absolute path of an external data file holding the guest data (compat 1.1).
      - Relative names are refused, because QEMU resolves them against its own working
        directory.
    type: path
  data_file_raw:
    description:
      - Whether the external data file is a valid raw image by itself (implies at least
        V(metadata) preallocation). Requires O(data_file).
    type: bool
  nocow:
    description:
      - Set the no-copy-on-write attribute on the new file (btrfs); ignored elsewhere, like
        qemu-img. Only applied when the file is created.
    type: bool
    default: false
  source:
    description:
      - A file or block device on the managed host whose guest content a new image is made
        from (a golden or cloud image), in O(source_format). Ranges of the source that read
        zeros are not copied.
      - Used only when the image is created or recreated (O(regenerate), O(force=true)). An
        existing image is never compared with its source (the guest has written since); to
        copy the template again over a disk the guest has used, set O(regenerate=always).
        Check mode predicts exactly what a creation would do.
      - O(size) defaults to the source's virtual size; a smaller size is refused.
      - The source is opened read-only and never locked. A corrupt or dirty source, one a
        running QEMU writes to, one with an external data file, a qcow2 source with a backing
        file (unless O(source_backing_chain=true)) and an encrypted one without the passphrase
        that opens it (O(source_passphrase)) are refused before anything is written, in check
        mode too.
      - A template is untrusted by default. Vet a downloaded one with
        M(vdisk.qcow2.image_info) (its C(image.unsafe_reasons) result) before using it.
    type: path
  source_format:
    description:
      - Format of O(source), V(raw) (a file or block device) or V(qcow2) (with compressed,
        zero and extended-L2 clusters; its backing chain is flattened only with
        O(source_backing_chain=true)). Required with O(source); the format is never guessed.
    type: str
    choices: [raw, qcow2]
  source_backing_chain:
    description:
      - Whether a qcow2 O(source) may have a backing file, whose chain is then followed and
        flattened into the new image (as C(qemu-img convert) does).
      - By default such a source is refused, before any backing file is opened or even
        looked up, with a message naming the backing file as recorded and as it resolves.
      - B(Risk:) a backing file name is chosen by whoever made the template. It can name any
        file on the managed host (an absolute path, a relative C(../../) path, or a later
        link of the chain), and with V(true) the new image's guest reads that file's bytes
        (keys, password hashes, other guests' disks). Set it only for templates you built or
        otherwise trust, together with every file of their chain.
      - Raw sources and qcow2 sources without a backing file need no opt-in.
    type: bool
    default: false
  source_passphrase:
    description:
      - The passphrase of a LUKS-encrypted qcow2 O(source) (qcow2's C(crypt_method) 2, as
        C(qemu-img create -o encrypt.format=luks) makes it). Its data is decrypted as it is
        read; the new image is plain unless O(encrypt_format) is declared (then it is encrypted
        with its own master key under O(encrypt_passphrase)).
      - A wrong passphrase, or an encrypted source without one, is refused before anything is
        written, in check mode too. Only the top image of a source's chain may be encrypted.
      - Used as its UTF-8 bytes. Never logged nor returned. Needs the Python package
        C(cryptography) on the managed host.
      - Mutually exclusive with O(source_passphrase_file). Only used with O(source).
    type: str
  source_passphrase_file:
    description:
      - A file on the managed host holding the passphrase of an encrypted O(source), read as
        O(encrypt_passphrase_file) is (its whole content, byte for byte; a regular file of at
        most 64 KiB; an absolute path).
      - Only used with O(source).
    type: path
  encrypt_format:
    description:
      - Encrypt the image's guest data at rest. V(luks) makes a LUKS-encrypted qcow2 image, as
        C(qemu-img create -o encrypt.format=luks) does (the LUKS header in its own clusters,
        qcow2's C(crypt_method) 2). QEMU opens it with C(--object secret,...) and
        C(encrypt.key-secret); libvirt with C(<encryption format='luks'>).
      - Left out, the image is declared unencrypted, and an existing encrypted image is a
        conflict (as is an existing plain image declared encrypted); changing either way
        rewrites the image, so it needs O(regenerate) or O(force).
      - Needs the Python package C(cryptography) on the managed host (C(python3-cryptography)
        on Debian, RHEL and SUSE), only for encrypted images; a missing package is named in
        the error, in check mode too.
      - Every preallocation mode is made; unlike qemu-img's, a new encrypted image's guest
        reads zeros in every mode (its preallocated clusters carry qcow2's zero flag, where
        qemu-img's read decrypted garbage). Compat V(0.10) has no zero flag; there every
        preallocated cluster is written with encrypted zeros, so V(metadata) and V(falloc)
        cost what V(full) costs (about 110 MiB/s here), and such an image is not preallocated
        further in place.
      - With O(source) the copy is encrypted as it is written. Every cluster holding data is
        encrypted whole (its zeros too), the clusters that read zeros stay unallocated or
        carry the zero flag, in every preallocation mode.
      - With an external O(data_file) the data file holds the ciphertext (as QEMU makes it);
        O(data_file_raw) is refused with encryption, since that data file is never a raw image
        of the guest's disk.
      - The passphrase is checked against the image's key slots when the run changes the image
        in place (a wrong one fails before anything is written, in check mode too). A run that
        changes nothing does not derive the key slot (which costs O(encrypt_iter_time)).
    type: str
    choices: [luks]
  encrypt_passphrase:
    description:
      - The passphrase of key slot 0 of a new encrypted image, and the one that must open an
        existing one before it is changed in place. Typically from Ansible Vault.
      - Used as its UTF-8 bytes. Never logged nor returned.
      - Mutually exclusive with O(encrypt_passphrase_file).
    type: str
  encrypt_passphrase_file:
    description:
      - A file on the managed host holding the passphrase, its whole content byte for byte,
        as QEMU's C(secret) object reads a C(file=) (a trailing newline is part of the
        passphrase).
      - Must be a regular file of at most 64 KiB (a FIFO or device node is refused without
        being waited on); an absolute path.
    type: path
  encrypt_cipher_alg:
    description:
      - The cipher of a new encrypted image (C(encrypt.cipher-alg)); QEMU's default
        V(aes-256) when left out. Compared with an existing image only when declared.
      - The values QEMU knows are accepted and compared; images are made with AES only
        (V(aes-128), V(aes-192), V(aes-256)).
    type: str
    choices: [aes-128, aes-192, aes-256, cast5-128, serpent-128, serpent-192, serpent-256,
              twofish-128, twofish-192, twofish-256, sm4]
  encrypt_cipher_mode:
    description:
      - The cipher mode (C(encrypt.cipher-mode)); default V(xts).
    type: str
    choices: [xts, cbc, ecb, ctr]
  encrypt_ivgen_alg:
    description:
      - The IV generator (C(encrypt.ivgen-alg)); default V(plain64).
    type: str
    choices: [plain, plain64, essiv]
  encrypt_ivgen_hash_alg:
    description:
      - The hash of the V(essiv) IV generator (C(encrypt.ivgen-hash-alg)); default V(sha256).
        Only with O(encrypt_ivgen_alg=essiv).
    type: str
    choices: [md5, sha1, sha224, sha256, sha384, sha512, ripemd160]
  encrypt_hash_alg:
    description:
      - The hash of the key slots' PBKDF2 and anti-forensic split (C(encrypt.hash-alg));
        default V(sha256).
    type: str
    choices: [md5, sha1, sha224, sha256, sha384, sha512, ripemd160]
  encrypt_check_passphrase:
    description:
      - Open a key slot of an existing encrypted image with the declared passphrase on every
        run, also when nothing is to be changed, and fail (in check mode too) when it does not
        open, for example after the passphrase in Vault was rotated but the disk's key slot
        was not.
      - Costs one key slot derivation (the image's iteration time, 2 s by QEMU's default) per
        run and image; by default (V(false)) the passphrase is opened only before an in-place
        change.
    type: bool
    default: false
  encrypt_iter_time:
    description:
      - Milliseconds of CPU spent on passphrase processing (C(encrypt.iter-time)); default
        2000, as QEMU. The PBKDF2 rounds are calibrated on the managed host when the image is
        made so that the whole key setup (loading the cipher library, the calibration, the key
        slot's PBKDF2 and the master key digest's, which gets an eighth of the slot's rounds)
        takes this long, and opening the image about as long; at least 1000 rounds each.
      - Only used when an image is made; not compared with an existing one.
    type: int
  backup:
    description:
      - When the file at O(path) is recreated or replaced (O(regenerate), O(force=true)), or
        O(state=absent) removes it, keep the old file under a backup name
        (C(PATH.PID.YYYY-MM-DD@HH:MM:SS~)) and return it in RV(backup_file). The backup is a
        hard link to the old file, so it costs no copy and no space beyond what the old image
        already used (with O(state=absent) that space is therefore not freed).
    type: bool
    default: false
  follow:
    description:
      - When O(path) is a symbolic link, manage the image it points to. By default a link at
        O(path) is refused (it would otherwise lead the change elsewhere, or be replaced).
      - The file attributes returned (C(owner), C(group), C(mode), C(state), C(size)) are
        the managed image's, not the link's.
      - With O(state=absent), the image the link points to is removed and the link is left
        in place, dangling; RV(actions) says so (remove the link with
        M(ansible.builtin.file) if it should go too).
    type: bool
    default: false
  force:
    description:
      - Recreate the image from the declaration when it conflicts with the existing one, or
        replace a file at O(path) that is not a qcow2 image. B(This destroys the image's data.)
      - Options left out take their creation defaults when the image is recreated.
      - Never overrides the refusal to touch an image a running QEMU holds.
      - For O(state=present), O(force=true) is the same as O(regenerate=on_conflict); it
        cannot be combined with O(regenerate=fail). With O(state=absent) it allows removing a
        file that is not a qcow2 image.
    type: bool
    default: false
  regenerate:
    description:
      - When an existing file at O(path) is made again from the declaration (and from
        O(source), when given), destroying its content. Only used with O(state=present); a
        missing image is always created.
      - V(fail) never recreates it; a conflict with the declaration fails with the list of
        differences. This is what happens when neither this option nor O(force) is set.
      - V(on_conflict) recreates it only when it conflicts with the declaration (or is not a
        qcow2 image); changes that keep the guest's data are still made in place. Same as
        O(force=true).
      - V(always) recreates it on every run, even when it matches the declaration, so the
        task always reports a change. With O(source) the template is copied again; this is
        how a disk is re-provisioned from its template. Combine it with O(backup=true) to keep
        the old disk.
      - An image a running QEMU holds is never recreated, whatever this option says; the task
        fails instead. Check mode predicts the recreation, its backup and diff without
        writing anything.
      - When not set, O(force) decides (V(on_conflict) with O(force=true), else V(fail)).
    type: str
    choices: [fail, on_conflict, always]
extends_documentation_fragment:
  - vdisk.qcow2.host_caches
  - ansible.builtin.files
  - ansible.builtin.action_common_attributes
  - action_common_attributes.files
attributes:
  check_mode:
    support: full
    details:
      - Check mode predicts exactly the actions a real run would take (RV(actions)) and
        touches nothing.
  diff_mode:
    support: full
    details:
      - The diff shows the header fields, size, preallocation level and file attributes
        before and after.
  platform:
    platforms: posix
  safe_file_operations:
    support: full
  vault:
    support: none
notes:
  - The image path is opened without following symbolic links, and every write (in place, a
    replacement, a removal, a backup link) first checks that the file at O(path) is still the
    one that was inspected; a path swapped in between is refused, not written through.
  - O(source) and O(backing_file) may be symbolic links, but what they lead to must be a
    regular file or a block device; anything else is refused before it is opened.
  - A warning is given, in check mode too, when O(source_format=raw) names a file that
    starts with a qcow2 header, or O(backing_fmt=raw) a backing file that does (the qcow2
    file itself would become the guest's disk).
  - Growing, raising preallocation and header changes hold QEMU's write locks while they run,
    so a QEMU started meanwhile is refused; a crash part-way leaves a consistent image with
    the guest's old or new view (at worst with leaked clusters at the end of the file, which
    the next run reclaims).
  - See the collection's guides for what each preallocation mode costs and guarantees on
    ext4, XFS, btrfs, NFS, ZFS and block devices.
seealso:
  - module: vdisk.qcow2.image_info
"""

EXAMPLES = r"""
- name: A 20 GiB thin image (preallocation off, like qemu-img create)
  vdisk.qcow2.image:
    path: /var/lib/images/web01.qcow2
    size: 20G
    owner: root
    mode: "0600"

- name: Metadata preallocation (every L2 table written, data clusters as holes)
  vdisk.qcow2.image:
    path: /var/lib/images/db01.qcow2
    size: 100G
    preallocation: metadata

- name: Space reserved on disk with one fallocate call
  vdisk.qcow2.image:
    path: /var/lib/images/db02.qcow2
    size: 64G
    preallocation: falloc

- name: Fully written image (zeros on disk), 2 MiB clusters, no copy-on-write on btrfs
  vdisk.qcow2.image:
    path: /var/lib/images/bench.qcow2
    size: 4G
    preallocation: full
    cluster_size: 2M
    nocow: true

- name: Overlay on a base image (the format of the backing file is always given)
  vdisk.qcow2.image:
    path: /var/lib/images/web02.qcow2
    backing_file: /var/lib/images/base/debian-12.qcow2
    backing_fmt: qcow2

- name: Grow an existing image to 40 GiB (in place; a smaller size shrinks only over zeros)
  vdisk.qcow2.image:
    path: /var/lib/images/web01.qcow2
    size: 40G

- name: Rebuild an image with another cluster size, destroying its content
  vdisk.qcow2.image:
    path: /var/lib/images/scratch.qcow2
    size: 10G
    cluster_size: 2M
    force: true

- name: A VM disk made from a template, 40 GiB, preallocated (copied once, then left alone)
  vdisk.qcow2.image:
    path: /var/lib/images/web03.qcow2
    source: /var/lib/images/templates/debian-12-genericcloud.qcow2
    source_format: qcow2
    size: 40G
    preallocation: metadata

- name: Re-provision a disk from its template, keeping the used disk as a backup
  vdisk.qcow2.image:
    path: /var/lib/images/web03.qcow2
    source: /var/lib/images/templates/debian-12-genericcloud.qcow2
    source_format: qcow2
    size: 40G
    preallocation: metadata
    regenerate: always
    backup: true

- name: A disk from our own layered template, its backing chain flattened (trusted only)
  vdisk.qcow2.image:
    path: /var/lib/images/build07.qcow2
    source: /var/lib/images/templates/debian-12-hardened.qcow2
    source_format: qcow2
    source_backing_chain: true

- name: A LUKS-encrypted disk, its passphrase from Ansible Vault (QEMU's defaults aes-256-xts)
  vdisk.qcow2.image:
    path: /var/lib/images/db01.qcow2
    size: 100G
    preallocation: metadata
    encrypt_format: luks
    encrypt_passphrase: "{{ vault_db01_disk_passphrase }}"

- name: Encrypted, the passphrase in a file on the host (as libvirt's secrets are kept)
  vdisk.qcow2.image:
    path: /var/lib/images/db02.qcow2
    size: 100G
    encrypt_format: luks
    encrypt_passphrase_file: /etc/vdisk/db02.key
    encrypt_cipher_alg: aes-256
    encrypt_cipher_mode: xts
    encrypt_hash_alg: sha512

- name: An encrypted disk made from an encrypted template, each under its own passphrase
  vdisk.qcow2.image:
    path: /var/lib/images/db03.qcow2
    source: /var/lib/images/templates/debian-12-encrypted.qcow2
    source_format: qcow2
    source_passphrase_file: /etc/vdisk/template.key
    encrypt_format: luks
    encrypt_passphrase: "{{ vault_db03_disk_passphrase }}"

- name: Remove an image (refused while a VM runs on it)
  vdisk.qcow2.image:
    path: /var/lib/images/old.qcow2
    state: absent
"""

RETURN = r"""
actions:
  description:
    - Human-readable steps taken, or in check mode the steps a real run would take.
  returned: always
  type: list
  elements: str
  sample:
    - "grow the virtual size from 20 GiB (21474836480 bytes) to 40 GiB (42949672960 bytes) (new
      range: off, reads zeros)"
path:
  description: The path of the image, as given.
  returned: always
  type: str
  sample: /var/lib/images/web01.qcow2
source:
  description: O(source) as given (not compared with an existing image).
  returned: when O(source) is given
  type: str
  sample: /var/lib/images/templates/debian-12.qcow2
backup_file:
  description:
    - The backup of the old file kept by O(backup=true) when it was recreated, replaced or
      removed (not in check mode, which creates nothing).
  returned: when O(backup=true) and the file was recreated, replaced or removed
  type: str
  sample: /var/lib/images/web01.qcow2.4242.2026-12-02@10:15:42~
image:
  description:
    - The image after the change (in check mode, as it is now), the same dict
      M(vdisk.qcow2.image_info) returns. Empty when the image is absent.
  returned: always
  type: dict
  sample:
    format: qcow2
    virtual_size: 21474836480
    cluster_size: 65536
    compat: "1.1"
    refcount_bits: 16
    lazy_refcounts: false
    extended_l2: false
    compression_type: zlib
    backing_file: null
    backing_fmt: null
    data_file: null
    data_file_raw: false
    dirty: false
    corrupt: false
    encrypted: false
    encryption: null
    preallocation: "off"
    actual_size: 200704
    allocated_clusters: 0
    in_use: false
    snapshots: 0
    leaked_clusters: 0
conflicts:
  description:
    - Differences that need the image recreated (present when the module failed because of
      them, or when O(regenerate) or O(force) recreated the image).
  returned: when there are conflicts
  type: list
  elements: str
  sample:
    - "cluster_size is 65536, declared 2097152"
method:
  description:
    - How the data clusters were allocated when an image was created or grown, one word
      (what happened in detail is in RV(actions)).
    - V(sparse) nothing was allocated for the data (no host clusters, or holes).
    - V(fallocate) the data clusters were reserved with one C(fallocate) call.
    - V(zero-writes) zeros were written over the data clusters (V(full), or V(falloc) where
      the filesystem refused C(fallocate), which RV(actions) then says).
    - V(copy) the data of O(source) was copied, its zero ranges left unallocated or as holes
      (V(off), V(metadata)).
    - V(copy-fallocate) the data clusters were reserved with C(fallocate), then the data of
      O(source) copied (V(falloc)).
    - V(copy-zero-writes) the data of O(source) was copied and zeros written elsewhere
      (V(full), or V(falloc) where the filesystem refused C(fallocate)).
  returned: when an image was created or grown
  type: str
  choices: [sparse, fallocate, zero-writes, copy, copy-fallocate, copy-zero-writes]
  sample: fallocate
diff:
  description:
    - With C(--diff), the image before and after in C(before) and C(after)
      (C(state), C(format), C(virtual_size), C(preallocation), C(content), the header fields,
      and the file attributes that change), and C(before_header)/C(after_header) naming the
      path.
    - C(content) is C(guest data) or C(no guest data) for an existing image, and for an image
      the run creates C(a new, empty image) or C(a copy of the template) followed by the
      O(source), with C((the old content is destroyed)) when it replaces a file.
    - Check mode shows the same diff as the real run; C(after) describes the image the
      declaration makes, and a file that does not exist yet has no owner or mode before.
  returned: when diff mode is on
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

# First: the engine's bytecode is cached on the host (module_utils/bytecode_cache.py).
from ansible_collections.vdisk.qcow2.plugins.module_utils import bytecode_cache  # noqa: F401 pylint: disable=unused-import
from ansible_collections.vdisk.qcow2.plugins.module_utils import image_task


def main():
    module = AnsibleModule(
        argument_spec=image_task.argument_spec(),
        required_together=image_task.REQUIRED_TOGETHER,
        required_by=image_task.REQUIRED_BY,
        mutually_exclusive=image_task.MUTUALLY_EXCLUSIVE,
        add_file_common_args=True,
        supports_check_mode=True,
    )
    task = image_task.ImageTask(module, module.params)
    try:
        result = task.converge()
    except image_task.TaskFailed as failed:
        if task.path != task.given:
            image_task.report_target_attributes(module, task.given, task.path)
        module.fail_json(msg=failed.msg, **failed.result)
    if task.path != task.given:
        image_task.report_target_attributes(module, task.given, task.path)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
