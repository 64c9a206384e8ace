# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Read-only inspection of a qcow2 image: info, check, map and preallocation state.

Everything here opens the image O_RDONLY, takes no lock, never opens a backing or external data
file and never trusts a header number before checking it. The results are plain dicts and lists
shaped like the JSON output of qemu-img 7.2 (`info`, `check`, `map`), plus `allocation_state`,
which judges how far an image is preallocated.

Each job lives in its own module; this one gathers their public functions:

- `image`: the open-image model (`Image`), header and table parsing, shared by the editor;
- `l2runs`: cluster types, runs of L2 entries, refcount block decoding;
- `info`, `check` (consistency, in bounded windows), `mapping` (`block_map` and the guest walk),
  `allocation` (`allocation_state`, including the cheap scan for leaks at the end of the file).
"""

from .allocation import allocation_state, chain_data_end, data_end, tail_leaks
from .check import check
from .image import Image
from .info import info
from .mapping import block_map

__all__ = ["Image", "info", "check", "block_map", "allocation_state", "tail_leaks", "data_end",
           "chain_data_end"]
