# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""How many PBKDF2 rounds make a key slot cost `encrypt_iter_time` on this host, as QEMU
calibrates them: the slot's rounds take that long, the master key digest's an eighth of it
(so all eight slots together cost about one slot), and neither goes below LUKS1's minimum.

Measured on this process's CPU clock, not the wall clock, so a busy host does not make the
derivation weaker."""

import hashlib
import time

MIN_ITERATIONS = 1000
_PROBE_SECONDS = 0.05


def rounds_per_second(hash_name, key_bytes):
    """PBKDF2-`hash_name` rounds per CPU second here (a probe of about 50 ms)."""
    rounds = 1 << 12
    while True:
        start = time.process_time()
        hashlib.pbkdf2_hmac(hash_name, b"probe", b"\0" * 32, rounds, key_bytes)
        spent = time.process_time() - start
        if spent >= _PROBE_SECONDS or rounds >= 1 << 26:
            return rounds / max(spent, 1e-6)
        rounds *= 2


def for_time(hash_name, milliseconds, key_bytes):
    """(slot rounds, master key digest rounds) for a key slot derivation of `milliseconds`."""
    rate = rounds_per_second(hash_name, key_bytes)
    slot = int(rate * milliseconds / 1000.0)
    if slot >= 1 << 32:
        slot = (1 << 32) - 1
    return max(slot, MIN_ITERATIONS), max(slot // 8, MIN_ITERATIONS)
