# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Every condition under which QEMU refuses to open a qcow2 image, one case each.

Each case makes an image with qemu-img, changes it so that exactly one condition holds, shows
that qemu-img 7.2 refuses it (`qemu-img info` or `qemu-img check`, exit code and message), and
that the engine refuses it too: `Image.open` raises a Qcow2Error naming the defect,
`inspector.check` does not call it clean and `editor.preflight` refuses it.

Where a change also upsets the records after it (an extension length), QEMU names the first
defect it meets and the engine may name the next one; both refuse.

The conditions (QEMU 7.2 and 10.x alike unless noted):

| name                      | condition                                                       |
|---------------------------|-----------------------------------------------------------------|
| bad_magic                 | the first four bytes are not the qcow2 magic                    |
| version_1 / version_4     | version is not 2 or 3                                           |
| cluster_bits_8 / _22      | cluster_bits outside 9..21                                      |
| header_too_short          | version 3 header_length below 104                               |
| header_past_cluster       | header_length larger than the cluster                           |
| backing_offset_past       | backing file offset past the first cluster                      |
| compression_unknown       | compression type other than zlib (0) or zstd (1)                |
| compression_bit_zlib      | compression incompatible bit set with zlib                      |
| compression_zstd_no_bit   | zstd without the compression incompatible bit                   |
| unknown_incompatible      | an incompatible feature bit QEMU does not know                  |
| refcount_order_7          | refcount_order above 6                                          |
| crypt_method_3            | encryption method other than none, AES or LUKS                  |
| no_refcount_table         | refcount_table_clusters is 0 (refused by info; check counts it) |
| reftable_too_large        | refcount table above 8 MiB                                      |
| reftable_misaligned       | refcount table offset not cluster aligned                       |
| snapshots_misaligned_none | snapshot table offset misaligned, even with 0 snapshots         |
| snapshots_offset_range    | snapshot table end beyond INT64_MAX, even with 0 snapshots      |
| snapshots_too_many        | more than 65536 snapshots                                       |
| l1_misaligned_empty       | L1 table offset misaligned, even with l1_size 0                 |
| l1_too_large              | L1 table above 32 MiB                                           |
| image_too_big             | the virtual size needs more than INT_MAX L1 entries             |
| l1_too_small              | L1 table smaller than the virtual size needs                    |
| ext_header_crosses_end    | an extension record crosses the end of the extension area       |
| ext_length_too_large      | an extension length runs past the extension area                |
| backing_fmt_too_long      | backing format name of 16 bytes or more                         |
| backing_name_too_long     | backing file name longer than 1023 bytes or the cluster         |
| crypto_ext_not_luks       | encryption header extension in an image that is not LUKS        |
| crypto_ext_length         | encryption header extension not 16 bytes long                   |
| crypto_offset_misaligned  | encryption header offset not cluster aligned                    |
| luks_without_crypto_ext   | LUKS image without the encryption header extension              |
| luks_bad_magic            | the LUKS header has no LUKS magic                               |
| luks_bad_version          | the LUKS header version is not 1                                |
| luks_key_size             | cipher key size the cipher does not support                     |
| luks_stripes              | a key slot with a stripe count other than 4000                  |
| data_file_missing_name    | external data file bit without a data file name                 |
| data_file_raw_alone       | data-file-raw without an external data file (check refuses)    |
| extl2_small_clusters      | extended L2 entries with clusters below 16 KiB                  |
| bitmaps_ext_length        | bitmaps extension not 24 bytes (even with autoclear bit clear)  |
| bitmaps_reserved          | bitmaps extension reserved field not zero                       |
| bitmaps_zero              | bitmaps extension with 0 bitmaps                                |
| bitmaps_too_many          | bitmaps extension with more than 65535 bitmaps                  |
| bitmaps_dir_misaligned    | bitmap directory offset not cluster aligned                     |
| bitmaps_dir_too_large     | bitmap directory larger than QEMU's maximum                     |
| bitmaps_dir_zero_size     | bitmap directory size 0                                         |
| bitmap_fewer_entries      | directory holds fewer bitmaps than the extension says           |
| bitmap_extra_data         | a directory entry with extra data                               |
| bitmap_bad_granularity    | granularity bits outside 9..31                                  |
| bitmap_bad_type           | bitmap type other than 1 (dirty tracking)                       |
| bitmap_reserved_flags     | reserved bitmap flags set                                       |
| bitmap_table_size         | bitmap table size not what the virtual size needs               |
| bitmap_table_entry        | bitmap table entry with reserved bits                           |
| snapshot_extra_too_large  | snapshot entry with more than 1024 bytes of extra data          |
"""

import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import oracle  # noqa: E402
from qcow2.edit import editor  # noqa: E402
from qcow2.read import inspector  # noqa: E402
from qcow2.format.errors import Qcow2Error  # noqa: E402

SECRET = ["--object", "secret,id=sec0,data=pw"]


def _make(tmp_path, kind="plain", opts=""):
    if not oracle.QEMU_IMG:
        oracle.unavailable("refusals", "qemu-img is not installed")
    path = str(tmp_path / "img.qcow2")
    if kind == "luks":
        oracle.qemu_luks(path, "16M", secret="pw")
    else:
        cmd = [oracle.QEMU_IMG, "create", "-q", "-f", "qcow2"]
        if opts:
            cmd += ["-o", opts]
        proc = oracle.run(*(cmd + [path, "16M"]))
        assert proc.returncode == 0, proc.stderr
    if kind == "bitmap":
        proc = oracle.run(oracle.QEMU_IMG, "bitmap", "--add", path, "bm0")
        assert proc.returncode == 0, proc.stderr
    if kind == "snapshot":
        proc = oracle.run(oracle.QEMU_IMG, "snapshot", "-c", "s1", path)
        assert proc.returncode == 0, proc.stderr
    return path


def _poke(path, offset, fmt, value):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(fmt, value))


def _u(path, offset, fmt):
    with open(path, "rb") as handle:
        handle.seek(offset)
        return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


def _ext(path, ext_type):
    """Offset of the 8-byte record header of the first extension of `ext_type`."""
    with open(path, "rb") as handle:
        data = handle.read(65536)
    pos = struct.unpack_from(">I", data, 100)[0]
    while pos + 8 <= len(data):
        etype, length = struct.unpack_from(">II", data, pos)
        if etype == ext_type:
            return pos
        if etype == 0:
            break
        pos += 8 + ((length + 7) & ~7)
    raise AssertionError("no extension %#x" % ext_type)


def _bitmap_dir(path):
    pos = _ext(path, 0x23852875)
    return _u(path, pos + 24, ">Q")


def _luks(path):
    pos = _ext(path, 0x0537BE77)
    return _u(path, pos + 8, ">Q")


def _add_ext(path, ext_type, payload):
    """Insert an extension record before the first one (the area has room in QEMU images)."""
    with open(path, "r+b") as handle:
        handle.seek(112)
        rest = handle.read(4096 - 112)
        pad = (-len(payload)) % 8
        record = struct.pack(">II", ext_type, len(payload)) + payload + b"\0" * pad
        handle.seek(112)
        handle.write((record + rest)[:4096 - 112])


# name: (base kind, create options, mutation, qemu-img subcommand, QEMU message, our words)
CASES = {
    "bad_magic": ("plain", "", lambda p: _poke(p, 0, ">I", 0x514649FA), "info",
                  "not in qcow2 format", "not a qcow2 image"),
    "version_1": ("plain", "", lambda p: _poke(p, 4, ">I", 1), "info",
                  "Unsupported qcow2 version", "version"),
    "version_4": ("plain", "", lambda p: _poke(p, 4, ">I", 4), "info",
                  "Unsupported qcow2 version", "version"),
    "cluster_bits_8": ("plain", "", lambda p: _poke(p, 20, ">I", 8), "info",
                       "Unsupported cluster size", "cluster_bits"),
    "cluster_bits_22": ("plain", "", lambda p: _poke(p, 20, ">I", 22), "info",
                        "Unsupported cluster size", "cluster_bits"),
    "header_too_short": ("plain", "", lambda p: _poke(p, 100, ">I", 96), "info",
                         "header too short", "header_length"),
    "header_past_cluster": ("plain", "cluster_size=512", lambda p: _poke(p, 100, ">I", 520),
                            "info", "exceeds cluster size", "header_length"),
    "backing_offset_past": ("plain", "", lambda p: _poke(p, 8, ">Q", 65537), "info",
                            "Invalid backing file offset", "backing file offset"),
    "compression_unknown": ("plain", "", lambda p: _poke(p, 104, ">B", 2), "info",
                            "unknown compression type", "compression type"),
    "compression_bit_zlib": ("plain", "", lambda p: _poke(p, 72, ">Q", 8), "info",
                             "must not be set", "compression type"),
    "compression_zstd_no_bit": ("plain", "", lambda p: _poke(p, 104, ">B", 1), "info",
                                "must be set", "compression type"),
    "unknown_incompatible": ("plain", "", lambda p: _poke(p, 72, ">Q", 1 << 20), "info",
                             "Unsupported qcow2 feature", "unsupported qcow2 feature"),
    "refcount_order_7": ("plain", "", lambda p: _poke(p, 96, ">I", 7), "info",
                         "Reference count entry width too large", "refcount_order"),
    "crypt_method_3": ("plain", "", lambda p: _poke(p, 32, ">I", 3), "info",
                       "Unsupported encryption method", "encryption method"),
    "no_refcount_table": ("plain", "", lambda p: _poke(p, 56, ">I", 0), "info",
                          "does not contain a reference count table",
                          "no reference count table"),
    "reftable_too_large": ("plain", "", lambda p: _poke(p, 56, ">I", 129), "info",
                           "Reference count table too large", "reference count table too large"),
    "reftable_misaligned": ("plain", "", lambda p: _poke(p, 48, ">Q", 0x10008), "info",
                            "Reference count table offset invalid",
                            "reference count table offset invalid"),
    "snapshots_misaligned_none": ("plain", "", lambda p: _poke(p, 64, ">Q", 0x10008), "info",
                                  "Snapshot table offset invalid",
                                  "snapshot table offset invalid"),
    "snapshots_offset_range": ("plain", "", lambda p: _poke(p, 64, ">Q", 1 << 63), "info",
                               "Snapshot table offset invalid", "snapshot table offset invalid"),
    "snapshots_too_many": ("plain", "", lambda p: _poke(p, 60, ">I", 65537), "info",
                           "Snapshot table too large", "snapshot table too large"),
    "l1_misaligned_empty": ("plain", "", lambda p: (_poke(p, 24, ">Q", 0), _poke(p, 36, ">I", 0),
                                                    _poke(p, 40, ">Q", 0x30008)), "info",
                            "Active L1 table offset invalid", "L1 table offset invalid"),
    "l1_too_large": ("plain", "", lambda p: _poke(p, 36, ">I", (32 << 20) // 8 + 1), "info",
                     "Active L1 table too large", "L1 table too large"),
    "image_too_big": ("plain", "", lambda p: _poke(p, 24, ">Q", 1 << 62), "info",
                      "Image is too big", "too large"),
    "l1_too_small": ("plain", "", lambda p: _poke(p, 24, ">Q", 1 << 40), "info",
                     "L1 table is too small", "L1 table too small"),
    "ext_header_crosses_end": ("plain", "", lambda p: (_poke(p, 8, ">Q", 116),
                                                       _poke(p, 16, ">I", 0)), "info",
                               "Header extension too large", "header extension too large"),
    "ext_length_too_large": ("plain", "", lambda p: _poke(p, 116, ">I", 65536), "info",
                             "Header extension too large", "header extension too large"),
    "backing_fmt_too_long": ("plain", "", lambda p: _add_ext(p, 0xE2792ACA, b"q" * 16), "info",
                             "too large", "backing format"),
    "backing_name_too_long": ("plain", "", lambda p: (_poke(p, 8, ">Q", 2048),
                                                      _poke(p, 16, ">I", 1024)), "info",
                              "Backing file name too long", "backing file name too long"),
    "crypto_ext_not_luks": ("plain", "", lambda p: _add_ext(p, 0x0537BE77, bytes(16)), "info",
                            "only expected with LUKS", "not LUKS"),
    "crypto_ext_length": ("luks", "", lambda p: _poke(p, _ext(p, 0x0537BE77) + 4, ">I", 8),
                          "info", "CRYPTO header extension size", "extension"),
    "crypto_offset_misaligned": ("luks", "", lambda p: _poke(
        p, _ext(p, 0x0537BE77) + 8, ">Q", _luks(p) + 512), "info", "not a multiple of cluster",
        "not cluster aligned"),
    "luks_without_crypto_ext": ("luks", "", lambda p: _poke(p, _ext(p, 0x0537BE77), ">I",
                                                            0x12345678), "check",
                                "Missing CRYPTO header", "without an encryption header"),
    "luks_bad_magic": ("luks", "", lambda p: _poke(p, _luks(p), ">I", 0x4C554B54), "info",
                       "not in LUKS format", "not in LUKS format"),
    "luks_bad_version": ("luks", "", lambda p: _poke(p, _luks(p) + 6, ">H", 2), "info",
                         "LUKS version", "LUKS version"),
    "luks_key_size": ("luks", "", lambda p: _poke(p, _luks(p) + 108, ">I", 20), "info",
                      "not supported", "not supported"),
    "luks_stripes": ("luks", "", lambda p: _poke(p, _luks(p) + 208 + 44, ">I", 3999), "info",
                     "stripes", "stripes"),
    "data_file_missing_name": ("plain", "", lambda p: _poke(p, 72, ">Q", 4), "check",
                               "'data-file' is required", "names none"),
    "data_file_raw_alone": ("plain", "", lambda p: _poke(p, 88, ">Q", 2), "check",
                            "data-file-raw requires a data file", "data-file-raw"),
    "extl2_small_clusters": ("plain", "cluster_size=8k", lambda p: _poke(p, 72, ">Q", 16),
                             "info", "Unsupported subcluster size", "extended L2"),
    "bitmaps_ext_length": ("bitmap", "", lambda p: (_poke(p, 88, ">Q", 0), _poke(
        p, _ext(p, 0x23852875) + 4, ">I", 16)), "info", "Invalid extension length",
        "extension"),
    "bitmaps_reserved": ("bitmap", "", lambda p: _poke(p, _ext(p, 0x23852875) + 12, ">I", 1),
                         "info", "Reserved field is not zero", "reserved field"),
    "bitmaps_zero": ("bitmap", "", lambda p: _poke(p, _ext(p, 0x23852875) + 8, ">I", 0),
                     "info", "zero bitmaps", "zero bitmaps"),
    "bitmaps_too_many": ("bitmap", "", lambda p: _poke(p, _ext(p, 0x23852875) + 8, ">I", 65536),
                         "info", "exceeding the QEMU supported maximum", "65535"),
    "bitmaps_dir_misaligned": ("bitmap", "", lambda p: _poke(
        p, _ext(p, 0x23852875) + 24, ">Q", _bitmap_dir(p) + 8), "info",
        "invalid bitmap directory offset", "not cluster aligned"),
    "bitmaps_dir_too_large": ("bitmap", "", lambda p: _poke(
        p, _ext(p, 0x23852875) + 16, ">Q", 64 * 1024 * 1024), "info",
        "exceeds the maximum supported size", "exceeds the maximum"),
    "bitmaps_dir_zero_size": ("bitmap", "", lambda p: _poke(p, _ext(p, 0x23852875) + 16, ">Q",
                                                            0), "info",
                              "bitmap directory size is zero", "size is zero"),
    "bitmap_fewer_entries": ("bitmap", "", lambda p: _poke(p, _ext(p, 0x23852875) + 8, ">I", 2),
                             "info", "Less bitmaps found", "fewer bitmaps"),
    "bitmap_extra_data": ("bitmap", "", lambda p: (
        _poke(p, _bitmap_dir(p) + 20, ">I", 8),
        _poke(p, _ext(p, 0x23852875) + 16, ">Q", 40)), "info",
        "extra data is not supported", "extra data"),
    "bitmap_bad_granularity": ("bitmap", "", lambda p: _poke(p, _bitmap_dir(p) + 17, ">B", 8),
                               "info", "doesn't satisfy the constraints", "granularity"),
    "bitmap_bad_type": ("bitmap", "", lambda p: _poke(p, _bitmap_dir(p) + 16, ">B", 2),
                        "info", "doesn't satisfy the constraints", "bitmap type"),
    "bitmap_reserved_flags": ("bitmap", "", lambda p: _poke(p, _bitmap_dir(p) + 12, ">I", 4),
                              "info", "doesn't satisfy the constraints", "reserved flags"),
    "bitmap_table_size": ("bitmap", "", lambda p: _poke(p, _bitmap_dir(p) + 8, ">I", 2),
                          "info", "Could not read bitmap", "table of 2 entries"),
    "bitmap_table_entry": ("bitmap", "", lambda p: _poke(p, _u(p, _bitmap_dir(p), ">Q"), ">Q",
                                                         2), "info",
                           "Could not read bitmap_table", "invalid bitmap table entry"),
    "snapshot_extra_too_large": ("snapshot", "", lambda p: _poke(p, _u(p, 64, ">Q") + 36, ">I",
                                                                 1025), "info",
                                 "Too much extra metadata", "too much extra metadata"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_qemu_refusal_is_ours(tmp_path, name):
    kind, opts, mutation, command, theirs, ours = CASES[name]
    path = _make(tmp_path, kind, opts)
    mutation(path)
    args = [oracle.QEMU_IMG, command]
    if command == "check":
        args.append("--output=json")
    proc = oracle.run(*(args + SECRET + ["--image-opts",
                                         "driver=qcow2,file.filename=%s,encrypt.key-secret=sec0"
                                         % path]))
    assert proc.returncode != 0, "qemu-img %s opened %s" % (command, name)
    assert theirs.lower() in proc.stderr.lower(), proc.stderr
    with pytest.raises(Qcow2Error) as err:
        inspector.Image.open(path)
    assert ours.lower() in str(err.value).lower(), str(err.value)
    with pytest.raises(Qcow2Error):
        inspector.check(path)
    with pytest.raises(Qcow2Error):
        editor.preflight(path)
