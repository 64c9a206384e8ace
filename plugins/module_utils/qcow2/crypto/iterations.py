# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""How many PBKDF2 rounds make a new image's key setup cost `encrypt_iter_time` on this host,
QEMU's "time to spend on PBKDF passphrase processing": the master key digest gets an eighth of
the slot's rounds (as QEMU and cryptsetup give it), and the whole setup - loading the cipher
library, this calibration, the slot's and the digest's PBKDF2 - fits in the time asked, so an
encrypted creation costs at most its iteration time more than a plain one. Neither count goes
below LUKS1's minimum.

Measured on this process's CPU clock, not the wall clock, so a busy host does not make the
derivation weaker."""

import hashlib
import time

MIN_ITERATIONS = 1000
_PROBE_SECONDS = 0.025
_DIGEST_BYTES = 20                  # LUKS1's master key digest
_AFTER_SECONDS = 0.02               # the anti-forensic split and the slot's encryption after it


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


def for_time(hash_name, milliseconds, key_bytes, started=None):
    """(slot rounds, master key digest rounds) for a key setup of `milliseconds` of CPU that
    began at `started` (time.process_time(); None: now)."""
    if started is None:
        started = time.process_time()
    rate = rounds_per_second(hash_name, key_bytes)
    size = hashlib.new(hash_name).digest_size
    # A PBKDF2 round costs one HMAC per output block: the digest's rounds (an eighth of the
    # slot's) cost that share of a slot round.
    share = 1.0 + (-(-_DIGEST_BYTES // size)) / (8.0 * -(-key_bytes // size))
    left = milliseconds / 1000.0 - (time.process_time() - started) - _AFTER_SECONDS
    slot = int(rate * max(left, 0.0) / share)
    if slot >= 1 << 32:
        slot = (1 << 32) - 1
    return max(slot, MIN_ITERATIONS), max(slot // 8, MIN_ITERATIONS)
