# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The sector cipher of a LUKS volume as QEMU's LUKS driver applies it: data in 512-byte
sectors, each encrypted on its own with an IV made from its sector number. AES in XTS, CBC,
ECB or CTR mode; IV generators plain (the low 32 bits of the sector number, little-endian),
plain64 (all 64 bits) and essiv (the plain64 IV encrypted with AES-ECB under a hash of the
key). Also the mapping between QEMU's option values (cipher_alg "aes-256", cipher_mode "xts",
ivgen_alg "plain64", ivgen_hash_alg) and the LUKS header's cipher name, mode string and key
size.

AES itself comes from the `cryptography` package, imported only when a cipher is made. Whole
images go through here (template copies, encrypted zeros), so the modes work on many sectors
per call: ECB over a run of blocks is one call into OpenSSL, and the per-block chaining of
XTS and CBC is done for all the sectors of a run at once (XTS tweaks multiplied by alpha on
one big integer holding every sector's tweak; CBC's blocks taken column by column, block j of
every sector in one ECB call). CTR makes one cipher object per sector.
"""

import hashlib
import sys
from array import array

from ..format import encryption, luks
from ..format.errors import Qcow2Error

SECTOR = luks.SECTOR
BLOCK = 16                          # the AES block
PER_SECTOR = SECTOR // BLOCK        # AES blocks in a sector
RUN = 2048                          # sectors handled per step (1 MiB): bounds the memory used

MASKS = {"plain": 0xFFFFFFFF, "plain64": 0xFFFFFFFFFFFFFFFF, "essiv": 0xFFFFFFFFFFFFFFFF}
XTS_POLY = 0x87                     # x^128 = x^7 + x^2 + x + 1 in XTS's GF(2^128)
_ZEROS = bytes(RUN * SECTOR)


def backend():
    """cryptography's (Cipher, algorithms, modes), or the Qcow2Error naming the package."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise Qcow2Error("encrypted images need the Python package 'cryptography' on the managed "
                         "host (python3-cryptography on Debian, RHEL and SUSE)",
                         option="encrypt_format")
    return Cipher, algorithms, modes


def xor_bytes(a, b):
    """a XOR b, two byte strings of one length (as one big integer each: fast in bulk)."""
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def hash_known(name):
    """Whether `name` is a hash both LUKS and this host's hashlib know."""
    if name is None or name.encode("ascii", "replace") not in luks.HASHES:
        return False
    try:
        hashlib.new(name)
    except ValueError:
        return False
    return True


def check_hash(name, option):
    """`name` when hash_known, else the Qcow2Error naming `option`."""
    if not hash_known(name):
        raise Qcow2Error("%s: %s is not a hash LUKS and this host both know" % (option, name),
                         option=option)
    return name


def check_spec(cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg):
    """(AES key bytes, key bytes of the whole cipher key, ivgen_hash_alg as QEMU settles it)
    for these option values (format/encryption.cipher_key, the one statement of the rules),
    the IV hash also known to this host's hashlib; else the Qcow2Error naming the option."""
    aes_key, key_bytes, ivgen_hash_alg = encryption.cipher_key(cipher_alg, cipher_mode,
                                                               ivgen_alg, ivgen_hash_alg)
    if ivgen_hash_alg is not None:
        check_hash(ivgen_hash_alg, "encrypt_ivgen_hash_alg")
    return aes_key, key_bytes, ivgen_hash_alg


def header_names(cipher_alg, cipher_mode, ivgen_alg="plain64", ivgen_hash_alg=None):
    """(cipher name, cipher mode string, key bytes) of the LUKS header for these option values,
    as QEMU writes them: b"aes", b"cbc-essiv:sha256" (the hash after a colon whenever there is
    an IV hash), 64 for aes-256 in XTS."""
    _aes, key_bytes, ivgen_hash_alg = check_spec(cipher_alg, cipher_mode, ivgen_alg,
                                                 ivgen_hash_alg)
    encryption.check_makeable(cipher_alg, cipher_mode)
    mode = "%s-%s" % (cipher_mode, ivgen_alg)
    if ivgen_hash_alg is not None:
        mode += ":" + ivgen_hash_alg
    return b"aes", mode.encode("ascii"), key_bytes


def options_of(fields):
    """The option values (cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg) that
    describe the parsed LUKS header `fields` (format/luks.parse), or the Qcow2Error naming what
    this collection does not open. A mode string without an IV generator (cryptsetup's "ecb")
    reads as plain64, which ECB never uses."""
    cipher = fields["cipher"].decode("ascii", "replace")
    mode_text = fields["mode"].decode("ascii", "replace")
    cipher_mode, _sep, ivgen = mode_text.partition("-")
    ivgen_alg, _sep, ivgen_hash_alg = ivgen.partition(":")
    key_bytes = fields["key_bytes"]
    if cipher_mode == "xts" and key_bytes % 2:
        raise Qcow2Error("encrypt_cipher_alg: the image's XTS key has %d bytes, not two AES keys"
                         % key_bytes, option="encrypt_cipher_alg")
    bits = key_bytes * 8 // (2 if cipher_mode == "xts" else 1)
    cipher_alg = "%s-%d" % (cipher, bits)
    if cipher != "aes":
        raise Qcow2Error("encrypt_cipher_alg: the image is encrypted with %s-%s; this collection "
                         "opens AES only" % (cipher, mode_text), option="encrypt_cipher_alg")
    if not ivgen and cipher_mode == "ecb":
        ivgen_alg = "plain64"
    out = {"cipher_alg": cipher_alg, "cipher_mode": cipher_mode, "ivgen_alg": ivgen_alg,
           "ivgen_hash_alg": ivgen_hash_alg or None,
           "hash_alg": fields["hash"].decode("ascii", "replace")}
    check_spec(out["cipher_alg"], cipher_mode, ivgen_alg, out["ivgen_hash_alg"])
    check_hash(out["hash_alg"], "encrypt_hash_alg")
    return out


def _lanes(count, value):
    """The integer whose `count` 16-byte little-endian lanes each hold `value`."""
    return int.from_bytes(value.to_bytes(BLOCK, "little") * count, "little")


def _columns(data, count):
    """`data` (`count` sectors) split into its PER_SECTOR columns: column j holds block j of
    every sector, in sector order."""
    source = memoryview(data).cast("Q")
    out = []
    for j in range(PER_SECTOR):
        column = bytearray(count * BLOCK)
        target = memoryview(column).cast("Q")
        target[0::2] = source[2 * j::2 * PER_SECTOR]
        target[1::2] = source[2 * j + 1::2 * PER_SECTOR]
        out.append(column)
    return out


def _interleave(columns, count):
    """The sectors whose columns (_columns) are `columns`."""
    out = bytearray(count * SECTOR)
    target = memoryview(out).cast("Q")
    for j, column in enumerate(columns):
        source = memoryview(column).cast("Q")
        target[2 * j::2 * PER_SECTOR] = source[0::2]
        target[2 * j + 1::2 * PER_SECTOR] = source[1::2]
    return out


class SectorCipher(object):
    """AES over 512-byte sectors as QEMU's LUKS driver uses it, for one key.

    The names are QEMU's option values (check_spec); `key` is the whole cipher key (two AES
    keys in XTS mode, data key first, tweak key second)."""

    def __init__(self, cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, key):
        aes_key, key_bytes, ivgen_hash_alg = check_spec(cipher_alg, cipher_mode, ivgen_alg,
                                                        ivgen_hash_alg)
        if len(key) != key_bytes:
            raise Qcow2Error("encrypt_cipher_alg: %s in %s mode takes a key of %d bytes, not %d"
                             % (cipher_alg, cipher_mode, key_bytes, len(key)),
                             option="encrypt_cipher_alg")
        self.cipher_alg, self.cipher_mode = cipher_alg, cipher_mode
        self.ivgen_alg, self.ivgen_hash_alg = ivgen_alg, ivgen_hash_alg
        self._cipher, self._algorithms, self._modes = backend()
        self._key = bytes(key)
        data_key = self._key[:aes_key]
        self._ecb_enc = self._ecb(data_key).encryptor()
        self._ecb_dec = self._ecb(data_key).decryptor()
        self._tweak = self._ecb(self._key[aes_key:]).encryptor() if cipher_mode == "xts" \
            else None
        self._essiv = None
        if ivgen_alg == "essiv":
            salt = hashlib.new(ivgen_hash_alg, self._key).digest()
            self._essiv = self._ecb(salt).encryptor()

    @classmethod
    def from_fields(cls, fields, key):
        """The cipher of the parsed LUKS header `fields` (format/luks.parse) with `key`."""
        opts = options_of(fields)
        return cls(opts["cipher_alg"], opts["cipher_mode"], opts["ivgen_alg"],
                   opts["ivgen_hash_alg"], key)

    def _ecb(self, key):
        return self._cipher(self._algorithms.AES(key), self._modes.ECB())

    def ivs(self, first, count):
        """The IVs of `count` sectors from sector `first` on, 16 bytes each, concatenated."""
        mask = MASKS[self.ivgen_alg]
        numbers = array("Q", bytes(16 * count))
        numbers[0::2] = array("Q", [number & mask for number in range(first, first + count)])
        if sys.byteorder == "big":
            numbers.byteswap()
        raw = numbers.tobytes()
        return self._essiv.update(raw) if self._essiv is not None else raw

    def encrypt(self, sector, data):
        """`data` (whole sectors, the first one numbered `sector`) encrypted."""
        return self._apply(sector, data, True)

    def decrypt(self, sector, data):
        """`data` (whole sectors, the first one numbered `sector`) decrypted."""
        return self._apply(sector, data, False)

    def _apply(self, sector, data, encrypt):
        if len(data) % SECTOR:
            raise ValueError("sector cipher data of %d bytes: not whole sectors" % len(data))
        if self.cipher_mode == "ecb":
            worker = self._ecb_enc if encrypt else self._ecb_dec
            return worker.update(bytes(data))
        step = {"xts": self._xts, "ctr": self._ctr,
                "cbc": self._cbc_enc if encrypt else self._cbc_dec}[self.cipher_mode]
        view = memoryview(data).cast("B")
        out = []
        for at in range(0, len(data), RUN * SECTOR):
            run = view[at:at + RUN * SECTOR]
            out.append(step(sector + at // SECTOR, run, len(run) // SECTOR, encrypt))
        return out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)

    def _xts(self, first, run, count, encrypt):
        """XTS: C = E_K1(P ^ T) ^ T with T = E_K2(IV) * alpha^j for block j of a sector. The
        tweaks of block j of every sector make one column: one big integer of little-endian
        lanes, multiplied by alpha lane by lane (a shift, each lane's carry out of bit 127
        folded back in as 0x87)."""
        tweak = int.from_bytes(self._tweak.update(self.ivs(first, count)), "little")
        carries = _lanes(count, 1) << 128
        columns = []
        for _j in range(PER_SECTOR):
            columns.append(tweak.to_bytes(count * BLOCK, "little"))
            tweak <<= 1
            carry = tweak & carries
            tweak ^= carry ^ (carry >> 128) * XTS_POLY
        laid = _interleave(columns, count)
        tweaks = int.from_bytes(laid, "little")
        size = count * SECTOR
        if encrypt and run == _ZEROS[:size]:
            mixed = bytes(laid)         # zeros XOR T is T: the common case of encrypted zeros
        else:
            mixed = (int.from_bytes(run, "little") ^ tweaks).to_bytes(size, "little")
        mixed = (self._ecb_enc if encrypt else self._ecb_dec).update(mixed)
        return (int.from_bytes(mixed, "little") ^ tweaks).to_bytes(size, "little")

    def _cbc_enc(self, first, run, count, _encrypt):
        """CBC encryption chains block to block within a sector; the sectors are independent,
        so block j of every sector goes through AES in one call, column by column."""
        previous = self.ivs(first, count)
        out = []
        for column in _columns(run, count):
            previous = self._ecb_enc.update(xor_bytes(column, previous))
            out.append(previous)
        return _interleave(out, count)

    def _cbc_dec(self, first, run, count, _encrypt):
        """CBC decryption: every block decrypted in one call, then XORed with the block before
        it (the sector's IV for its first block)."""
        previous = bytearray(len(run))
        previous[BLOCK:] = run[:-BLOCK]
        target = memoryview(previous).cast("Q")
        ivs = memoryview(self.ivs(first, count)).cast("Q")
        target[0::2 * PER_SECTOR] = ivs[0::2]
        target[1::2 * PER_SECTOR] = ivs[1::2]
        return xor_bytes(self._ecb_dec.update(run), previous)

    def _ctr(self, first, run, count, _encrypt):
        """CTR: each sector's keystream counts up (128 bits, big-endian) from its IV."""
        ivs = self.ivs(first, count)
        algorithm = self._algorithms.AES(self._key)
        out = []
        for index in range(count):
            worker = self._cipher(algorithm, self._modes.CTR(ivs[index * BLOCK:
                                                                 (index + 1) * BLOCK]))
            out.append(worker.encryptor().update(run[index * SECTOR:(index + 1) * SECTOR]))
        return b"".join(out)
