# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Header-only changes in place: compat 0.10 -> 1.1 and lazy refcounts on/off.

Both rewrite cluster 0 alone (one write, then fsync), as QEMU does for amend; no table moves.
The image is held with QEMU's write locks meanwhile, past the editor's guard (dirty, corrupt
and damaged images are refused).
"""

from ..format import constants as C
from ..format.errors import Qcow2Error
from .editor import editing
from ..format.header import encode_cluster0, feature_table_extension

# QEMU's order of extensions in cluster 0; unknown types go after the known ones.
_ORDER = {C.EXT_BACKING_FORMAT: 0, C.EXT_DATA_FILE: 1, C.EXT_CRYPTO: 2,
          C.EXT_FEATURE_TABLE: 3, C.EXT_BITMAPS: 4}


def _rewrite(path, change, what, passphrase=None):
    with editing(path, passphrase=passphrase) as ed:
        hdr, exts, backing = ed.header, list(ed.extensions), ed.backing_file
        if not change(hdr, exts):
            return False
        exts.sort(key=lambda e: _ORDER.get(e.type, 5))
        ed.pwrite(0, encode_cluster0(hdr, exts, backing))
        ed.sync()
        ed.done.append(what)
        return True


def upgrade_compat(path, passphrase=None):
    """Raise a compat 0.10 (version 2) image to compat 1.1 (version 3)."""
    def change(hdr, exts):
        if hdr.version == 3:
            return False
        hdr.version = 3
        hdr.header_length = C.V3_HEADER_LENGTH
        hdr.incompatible_features = hdr.compatible_features = hdr.autoclear_features = 0
        hdr.refcount_order = 4
        hdr.compression_type = 0
        if hdr.cluster_size > 4096 and not any(e.type == C.EXT_FEATURE_TABLE for e in exts):
            exts.append(feature_table_extension())
        return True
    return _rewrite(path, change, "upgraded compat to 1.1", passphrase)


def set_lazy_refcounts(path, enabled, passphrase=None):
    """Turn the lazy refcounts compatible feature on or off (compat 1.1 only)."""
    def change(hdr, exts):
        if hdr.version < 3:
            raise Qcow2Error("lazy_refcounts: lazy refcounts require compat 1.1",
                             option="lazy_refcounts", path=path)
        current = bool(hdr.compatible_features & C.COMPAT_LAZY_REFCOUNTS)
        if current == bool(enabled):
            return False
        if enabled:
            hdr.compatible_features |= C.COMPAT_LAZY_REFCOUNTS
        else:
            hdr.compatible_features &= ~C.COMPAT_LAZY_REFCOUNTS
        return True
    return _rewrite(path, change, "turned lazy refcounts %s" % ("on" if enabled else "off"),
                    passphrase)
