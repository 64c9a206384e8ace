# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What making a LUKS-encrypted image needs beyond its plan: the checks that come before any
write (passphrase, file, the cryptography package), the key slot region and master key, and
the writer of encrypted zeros for images without a zero flag. The crypto itself is in crypto/,
imported only when an encrypted image is made."""

from ..format.errors import Qcow2Error


def check(path, opts, passphrase, device=False):
    """Raise what making the encrypted image `opts` declares would fail on before its first
    write (check mode runs it too): no passphrase, a block device, no cryptography. An
    encrypted image is made empty or as a copy of a source alike."""
    if opts.encryption is None:
        return
    if passphrase is None:
        raise Qcow2Error("encrypt_passphrase: an encrypted image is made only with a passphrase "
                         "(encrypt_passphrase, or encrypt_passphrase_file on the host)",
                         option="encrypt_passphrase")
    if device:
        raise Qcow2Error("encrypt_format: %s is a block device; an encrypted image is made in a "
                         "file only here" % path, option="encrypt_format")
    import importlib.util
    if importlib.util.find_spec("cryptography") is None:
        raise Qcow2Error("encrypt_format: encrypted images need the Python package "
                         "'cryptography' on the managed host (python3-cryptography on Debian, "
                         "RHEL and SUSE)", option="encrypt_format")


def keys(spec, passphrase, iterations=None):
    """(LUKS header region, master key) of a new image: a random master key in key slot 0
    under `passphrase`, the rounds calibrated to spec.iter_time unless `iterations` are
    given. The master key encrypts what the creation writes (a copy's data, compat 0.10's
    zeros)."""
    import time
    started = time.process_time()
    from ..crypto import luks1
    if iterations is None:
        from ..crypto.iterations import for_time
        from ..crypto.sectors import backend
        backend()       # loading the cipher library counts in the time asked
        iterations = for_time(spec.hash_alg, spec.iter_time, spec.key_bytes(), started)
    return luks1.build(passphrase, cipher_alg=spec.cipher_alg, cipher_mode=spec.cipher_mode,
                       ivgen_alg=spec.ivgen_alg, ivgen_hash_alg=spec.ivgen_hash_alg,
                       hash_alg=spec.hash_alg, iterations=iterations)


def zeros_writer(spec, master_key):
    """The writer's `content` for an encrypted image without zero flags (compat 0.10): every
    preallocated data cluster gets zeros encrypted with the image's key (the IV of a sector is
    its host offset, as QEMU's LUKS qcow2 uses), so the guest reads zeros from it."""
    def write(fd, plan, result):
        from . import writer
        from ..crypto.sectors import RUN, SectorCipher
        cipher = SectorCipher(spec.cipher_alg, spec.cipher_mode, spec.ivgen_alg,
                              spec.ivgen_hash_alg, master_key)
        step = RUN * 512
        zero = bytes(step)
        offset, end = plan.data_offset, plan.data_offset + plan.data_length
        while offset < end:
            n = min(step, end - offset)
            writer.write_all(fd, cipher.encrypt(offset // 512, zero[:n]), offset)
            writer.start_writeback(fd, offset, n)
            result.bytes_written += n
            offset += n
        result.method = "zero-writes"
        result.detail = "encrypted zeros written over the data clusters (compat 0.10 has no " \
                        "zero flag)"
    return write
