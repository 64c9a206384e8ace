# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The encryption a declaration asks for: qemu-img's `encrypt.*` creation options with the
modules' names, the values QEMU accepts and its defaults, validated and refused by name. Pure:
values in, an `Encryption` out (no passphrase here: that is a secret, never an option)."""

from .errors import Qcow2Error
from . import luks

FORMATS = ("luks",)
# What QEMU's LUKS driver accepts for each option (qemu-img 7.2), and its defaults.
CIPHER_ALGS = ("aes-128", "aes-192", "aes-256", "cast5-128", "serpent-128", "serpent-192",
               "serpent-256", "twofish-128", "twofish-192", "twofish-256", "sm4")
CIPHER_MODES = ("xts", "cbc", "ecb", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
HASH_ALGS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
DEFAULTS = {"cipher_alg": "aes-256", "cipher_mode": "xts", "ivgen_alg": "plain64",
            "hash_alg": "sha256", "iter_time": 2000}
# The ciphers this collection encrypts with, and their key sizes (the others are compared,
# never written).
AES_KEY_BYTES = {"aes-128": 16, "aes-192": 24, "aes-256": 32}
WRITTEN_CIPHERS = tuple(sorted(AES_KEY_BYTES))
DIGEST_BYTES = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64,
                "ripemd160": 20}
ESSIV_DEFAULT_HASH = "sha256"       # what QEMU takes for essiv without ivgen-hash-alg

# Option name -> allowed values (None: not a choice).
CHOICES = {"format": FORMATS, "cipher_alg": CIPHER_ALGS, "cipher_mode": CIPHER_MODES,
           "ivgen_alg": IVGEN_ALGS, "ivgen_hash_alg": HASH_ALGS, "hash_alg": HASH_ALGS}
# The properties of an existing image a declaration may pin (iter_time is not one: the
# iterations it gives depend on the host that made the image).
COMPARED = ("format", "cipher_alg", "cipher_mode", "ivgen_alg", "ivgen_hash_alg", "hash_alg")
KEYS = COMPARED + ("iter_time",)


def option(name):
    """The module option of an encryption property: encrypt_<name>."""
    return "encrypt_" + name


class Encryption(object):
    """A validated encryption declaration; every property filled (QEMU's defaults)."""

    __slots__ = KEYS

    def __init__(self, **values):
        for key in KEYS:
            setattr(self, key, values.get(key))

    def as_dict(self):
        return dict((key, getattr(self, key)) for key in KEYS)

    def key_bytes(self):
        """The master key's length: the cipher's key, twice for XTS."""
        return cipher_key(self.cipher_alg, self.cipher_mode, self.ivgen_alg,
                          self.ivgen_hash_alg)[1]

    def region_size(self):
        """Bytes of the LUKS header region (header, eight key slots) as QEMU lays it out."""
        return luks.region_size(self.key_bytes())

    def __repr__(self):
        return "Encryption(%r)" % (self.as_dict(),)


def declared(values):
    """The encryption properties a declaration names ({} when none), checked against the
    values QEMU accepts. `values` maps encrypt_<name> (or <name>) to a value, None for not
    declared."""
    out = {}
    for key in KEYS:
        value = values.get(option(key), values.get(key))
        if value is None:
            continue
        if key == "iter_time":
            try:
                number = int(value)
            except (TypeError, ValueError):
                number = -1
            if isinstance(value, bool) or number < 1 or number > 600000:
                raise Qcow2Error("encrypt_iter_time: %r is not a time in milliseconds from 1 to "
                                 "600000" % (value,), option=option(key))
            out[key] = number
            continue
        text = str(value).strip().lower()
        if text not in CHOICES[key]:
            raise Qcow2Error("%s: %r is not one of %s" % (option(key), value,
                                                          ", ".join(CHOICES[key])),
                             option=option(key))
        out[key] = text
    if out and "format" not in out:
        names = ", ".join(option(key) for key in sorted(out))
        raise Qcow2Error("%s: declared without encrypt_format (set encrypt_format: luks to make "
                         "an encrypted image)" % names, option=option(sorted(out)[0]))
    return out


def resolve(values):
    """The Encryption of a new image (QEMU's defaults filling what was left out), or None when
    no encryption is declared. Refuses combinations QEMU refuses, and ciphers this collection
    does not write, by the option's name."""
    found = declared(values)
    if not found:
        return None
    spec = dict(DEFAULTS, **found)
    if spec["ivgen_alg"] != "essiv" and spec.get("ivgen_hash_alg") is not None:
        raise Qcow2Error("encrypt_ivgen_hash_alg: only the essiv IV generator uses a hash "
                         "(encrypt_ivgen_alg is %s)" % spec["ivgen_alg"],
                         option="encrypt_ivgen_hash_alg")
    spec["ivgen_hash_alg"] = cipher_key(spec["cipher_alg"], spec["cipher_mode"],
                                        spec["ivgen_alg"], spec.get("ivgen_hash_alg"))[2]
    check_makeable(spec["cipher_alg"], spec["cipher_mode"])
    return Encryption(**spec)


def cipher_key(cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg):
    """(AES key bytes, master key bytes, ivgen_hash_alg as QEMU settles it) of a cipher this
    collection encrypts with, or the Qcow2Error naming the option QEMU (or this collection)
    refuses. The master key is two AES keys in XTS mode. The one statement of these rules:
    declarations (resolve) and the sector cipher (crypto/sectors) both ask here."""
    if cipher_alg not in AES_KEY_BYTES:
        known = "a cipher QEMU knows, but this collection supports AES only" \
            if cipher_alg in CIPHER_ALGS else "not a cipher QEMU knows; this collection supports"
        raise Qcow2Error("encrypt_cipher_alg: %s is %s (%s); images encrypted with another "
                         "cipher are inspected and compared, not created nor opened"
                         % (cipher_alg, known, ", ".join(WRITTEN_CIPHERS)),
                         option="encrypt_cipher_alg")
    if cipher_mode not in CIPHER_MODES:
        raise Qcow2Error("encrypt_cipher_mode: %s is not one of %s"
                         % (cipher_mode, ", ".join(CIPHER_MODES)), option="encrypt_cipher_mode")
    if ivgen_alg not in IVGEN_ALGS:
        raise Qcow2Error("encrypt_ivgen_alg: %s is not one of %s"
                         % (ivgen_alg, ", ".join(IVGEN_ALGS)), option="encrypt_ivgen_alg")
    if ivgen_alg == "essiv":
        ivgen_hash_alg = ivgen_hash_alg or ESSIV_DEFAULT_HASH
        digest = DIGEST_BYTES.get(ivgen_hash_alg)
        if digest not in (16, 24, 32):
            raise Qcow2Error("encrypt_ivgen_hash_alg: essiv needs a hash whose digest is an AES "
                             "key (16, 24 or 32 bytes); %s gives %s"
                             % (ivgen_hash_alg, digest or "no digest QEMU knows"),
                             option="encrypt_ivgen_hash_alg")
    aes = AES_KEY_BYTES[cipher_alg]
    return aes, aes * (2 if cipher_mode == "xts" else 1), ivgen_hash_alg


def check_makeable(cipher_alg, cipher_mode):
    """Refuse a cipher whose LUKS key slots QEMU could not open once made: key material
    (the master key times 4000 stripes) that ends inside a sector, which aes-192 outside XTS
    gives (QEMU 7.2 aborts making or opening such a header)."""
    key_bytes = cipher_key(cipher_alg, cipher_mode, "plain64", None)[1]
    if key_bytes * luks.STRIPES % luks.SECTOR:
        raise Qcow2Error("encrypt_cipher_alg: %s is made only with encrypt_cipher_mode xts: in "
                         "%s mode its key slots' material (%d x %d bytes) ends inside a sector, "
                         "and QEMU cannot open such a header"
                         % (cipher_alg, cipher_mode, key_bytes, luks.STRIPES),
                         option="encrypt_cipher_alg")


def compare(want, view):
    """The differences between declared encryption properties `want` (from declared()) and an
    image's encryption view (api.encryption_view: None when the image is not encrypted), as
    conflict texts."""
    if not view:
        if want:
            return ["the image is not encrypted, declared encrypt_format %s" % want["format"]]
        return []
    if not want:
        return ["the image is encrypted (%s), declared without encryption (set encrypt_format "
                "and its passphrase to manage it)" % view.get("format")]
    if view.get("format") != want["format"]:
        return ["the image is encrypted with %s, declared encrypt_format %s"
                % (view.get("format"), want["format"])]
    out = []
    for key in COMPARED[1:]:
        if key in want and want[key] != view.get(key):
            out.append("%s is %s, declared %s" % (option(key), view.get(key) or "unset",
                                                  want[key]))
    return out
