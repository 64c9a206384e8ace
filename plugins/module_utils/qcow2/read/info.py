# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""`info`: what qemu-img info --output=json says of an image, read without opening any other
file."""

from ..format import constants as C
from ..format import luks
from .image import BME_FLAG_AUTO, BME_FLAG_IN_USE, Opened, guard, path_combine, st_blocks_bytes

__all__ = ["info"]


@guard
def info(path, image=None):
    """A dict shaped like `qemu-img info --output=json` (qemu-img 7.2)."""
    with Opened(path, image) as img:
        hdr = img.header
        result = {
            "virtual-size": (img.virtual_size // 512) * 512,
            "filename": path,
            "format": "qcow2",
            "actual-size": st_blocks_bytes(img),
            "dirty-flag": bool(hdr.incompatible_features & C.INCOMPAT_DIRTY),
            "cluster-size": img.cluster_size,
        }
        if hdr.version == 2:
            data = {"compat": "0.10", "compression-type": "zlib",
                    "refcount-bits": img.refcount_bits}
        else:
            data = {
                "compat": "1.1",
                "compression-type": C.COMPRESSION_NAMES.get(hdr.compression_type, "zlib"),
                "lazy-refcounts": bool(hdr.compatible_features & C.COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": img.refcount_bits,
                "corrupt": bool(hdr.incompatible_features & C.INCOMPAT_CORRUPT),
                "extended-l2": img.extended_l2,
            }
            bitmaps = []
            for bm in img.bitmaps():
                flags = []
                if bm["flags"] & BME_FLAG_IN_USE:
                    flags.append("in-use")
                if bm["flags"] & BME_FLAG_AUTO:
                    flags.append("auto")
                bitmaps.append({"flags": flags, "name": bm["name"],
                                "granularity": 1 << bm["granularity_bits"]})
            if bitmaps:
                data["bitmaps"] = bitmaps
            if img.data_file is not None:
                data["data-file"] = img.data_file
            if img.has_data_file:
                data["data-file-raw"] = img.data_file_raw
        result["format-specific"] = {"type": "qcow2", "data": data}
        if hdr.crypt_method:
            result["encrypted"] = True
            data["encrypt"] = luks.describe(img.luks) if img.luks is not None else \
                {"format": "aes" if hdr.crypt_method == C.CRYPT_AES else "luks"}
        if img.backing_file:
            result["backing-filename"] = img.backing_file
            result["full-backing-filename"] = path_combine(path, img.backing_file)
            if img.backing_fmt:
                result["backing-filename-format"] = img.backing_fmt
        if hdr.nb_snapshots:
            snaps = []
            for sn in img.snapshots()[0]:
                entry = {
                    "id": sn["id"], "name": sn["name"], "vm-state-size": sn["vm_state_size"],
                    "date-sec": sn["date_sec"], "date-nsec": sn["date_nsec"],
                    "vm-clock-sec": sn["vm_clock_nsec"] // 1000000000,
                    "vm-clock-nsec": sn["vm_clock_nsec"] % 1000000000,
                }
                if sn["icount"] != -1:
                    entry["icount"] = sn["icount"]
                snaps.append(entry)
            result["snapshots"] = snaps
        return result
