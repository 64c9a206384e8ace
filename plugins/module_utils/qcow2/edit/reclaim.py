# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Reclaiming clusters leaked at the end of the file, as `qemu-img check -r leaks` would.

An interrupted change (a killed run, a full disk) leaves the clusters it had counted but not yet
linked at the end of the file: refcount 1, referenced by nothing. The cheap scan
(`allocation.tail_leaks`) finds them; here, under the editor's guard (whose consistency check
must agree that every one of them is unreferenced), their refcounts are set to zero and then the
file is cut back to the last referenced cluster. A crash between the two steps leaves free
clusters at the end, which is no leak at all. The guest's view is not touched.
"""

from ..read.allocation import tail_leaks
from .editor import editing
from ..format.errors import Qcow2Error


def reclaim_leaks(path, passphrase=None):
    """Reclaim leaked clusters at the end of the image file; returns a result dict."""
    with editing(path, passphrase=passphrase) as ed:
        scan = tail_leaks(path, image=ed)
        if not scan.get("scanned") or not scan["clusters"]:
            return {"changed": False, "reclaimed_clusters": 0, "truncated_bytes": 0}
        # The check counts the leaks inside the file; those past its end it cannot see.
        leaks = (ed.check_result or {}).get("leaks", 0)
        if leaks < scan["in_file"]:
            raise Qcow2Error("%s: the scan found %d leaked cluster(s) at the end of the file but "
                             "the consistency check only %d; nothing is reclaimed"
                             % (path, scan["in_file"], leaks), path=path)
        first, end = scan["first"], scan["end"]
        ed.release(first, end - first)
        ed.sync()
        truncated = 0
        if not ed.device and ed.file_size > first * ed.cs:
            truncated = ed.file_size - first * ed.cs
            ed.truncate(first * ed.cs)
            ed.sync()
        ed.done.append("reclaimed %d leaked cluster(s)" % scan["clusters"])
        return {"changed": True, "reclaimed_clusters": scan["clusters"],
                "truncated_bytes": truncated}


__all__ = ["reclaim_leaks"]
