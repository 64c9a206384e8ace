# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Creation options: parse what a user typed, apply qemu-img's rules, refuse by name.

`CreateOptions.from_dict()` accepts the option names of `qemu-img create -f qcow2 -o` (and
their module spellings) and returns a validated, normalised value object. Every refusal is a
Qcow2Error whose `option` names the parameter at fault.
"""

import math
import re

from . import constants as C
from . import encryption
from .errors import Qcow2Error

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_SUFFIXES = {
    "": 0, "b": 0,
    "k": 10, "kb": 10, "kib": 10,
    "m": 20, "mb": 20, "mib": 20,
    "g": 30, "gb": 30, "gib": 30,
    "t": 40, "tb": 40, "tib": 40,
    "p": 50, "pb": 50, "pib": 50,
    "e": 60, "eb": 60, "eib": 60,
}
_TRUE = ("on", "yes", "true", "1")
_FALSE = ("off", "no", "false", "0")


def parse_size(value, option="size"):
    """Bytes from an integer or a string such as '10G', '1.5k', '512MiB' (all binary).

    Suffixes: k/K, M, G, T, P, E with optional 'B' or 'iB'. A bare number is bytes.
    """
    if isinstance(value, bool):
        raise Qcow2Error("%s: expected a size, got a boolean" % option, option=option)
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise Qcow2Error("%s: %r is not a size" % (option, value), option=option)
        if value != int(value):
            raise Qcow2Error("%s: %r is a fraction of a byte; a bare number is bytes (did you "
                             "mean '%sG' or '%sM'?)" % (option, value, value, value),
                             option=option)
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise Qcow2Error("%s: %r is negative; sizes must be between 0 and %d bytes"
                             % (option, value, C.MAX_SIZE), option=option)
        match = _SIZE_RE.match(text)
        suffix = match.group(2).lower() if match else None
        if not match or suffix not in _SUFFIXES:
            raise Qcow2Error(
                "%s: %r is not a size; use a number of bytes or a number with one of the binary "
                "suffixes k, M, G, T, P, E (also KiB, MiB, GiB, TiB, PiB, EiB)" % (option, value),
                option=option)
        digits = match.group(1)
        shift = _SUFFIXES[suffix]
        if "." in digits:
            whole, _dot, frac = digits.partition(".")
            # Exact arithmetic: value = (whole.frac) * 2**shift, truncated like qemu's strtosz.
            scale = 10 ** len(frac)
            number = (int(whole or "0") * scale + int(frac or "0")) * (1 << shift) // scale
            if frac.strip("0") and shift == 0:
                raise Qcow2Error("%s: %r has a fraction of a byte" % (option, value),
                                 option=option)
        else:
            number = int(digits) << shift
    else:
        raise Qcow2Error("%s: expected a size, got %s" % (option, type(value).__name__),
                         option=option)
    if number < 0:
        raise Qcow2Error("%s: %d is negative; sizes must be between 0 and %d bytes"
                         % (option, number, C.MAX_SIZE), option=option)
    if number > C.MAX_SIZE:
        raise Qcow2Error("%s: %d bytes is too large; sizes must be between 0 and %d bytes"
                         % (option, number, C.MAX_SIZE), option=option)
    return number


def parse_bool(value, option):
    """on/off, yes/no, true/false (or a real boolean)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise Qcow2Error("%s: %r is not a boolean (use on/off, yes/no or true/false)"
                     % (option, value), option=option)


def check_backing_fmt(name):
    """Refuse a backing format QEMU does not know (it could never open the image)."""
    if len(name.encode("utf-8")) > C.MAX_BACKING_FMT:
        raise Qcow2Error("backing_fmt: %r is longer than %d bytes" % (name, C.MAX_BACKING_FMT),
                         option="backing_fmt")
    if name not in C.BACKING_FORMATS:
        raise Qcow2Error("backing_fmt: %r is not a format QEMU knows (for example raw, qcow2, "
                         "vmdk, vdi, vhdx, vpc, qed, luks)" % name, option="backing_fmt")


def parse_compat(value):
    if isinstance(value, float) and abs(value - 0.1) < 1e-9:
        raise Qcow2Error("compat: got the number 0.1: an unquoted 0.10 in YAML is a float; quote "
                         "it (compat: '0.10')", option="compat")
    return _parse_compat(value)


def _parse_compat(value):
    """'0.10'/'v2' -> 2, '1.1'/'v3' -> 3."""
    text = str(value).strip().lower()
    if text in ("0.10", "v2", "2"):
        return 2
    if text in ("1.1", "v3", "3"):
        return 3
    raise Qcow2Error("compat: %r is not a qcow2 compatibility level (use 0.10 or 1.1, also v2 or v3)"
                     % (value,), option="compat")


def compat_name(version):
    return "0.10" if version == 2 else "1.1"


class CreateOptions(object):
    """A validated set of creation options. Sizes are bytes, flags booleans."""

    KEYS = ("size", "cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2",
            "compression_type", "preallocation", "backing_file", "backing_fmt", "data_file",
            "data_file_raw", "nocow", "extent_size_hint") + \
        tuple(encryption.option(key) for key in encryption.KEYS)

    def __init__(self):
        self.size = None
        self.cluster_size = C.DEFAULT_CLUSTER_SIZE
        self.version = 3
        self.refcount_bits = 16
        self.lazy_refcounts = False
        self.extended_l2 = False
        self.compression_type = "zlib"
        self.preallocation = "off"
        self.backing_file = None
        self.backing_fmt = None
        self.data_file = None
        self.data_file_raw = False
        self.nocow = False
        self.extent_size_hint = 1024 * 1024
        self.encryption = None      # an encryption.Encryption for a LUKS-encrypted image

    # ------------------------------------------------------------------ derived values
    @property
    def compat(self):
        return compat_name(self.version)

    @property
    def cluster_bits(self):
        return self.cluster_size.bit_length() - 1

    @property
    def refcount_order(self):
        return self.refcount_bits.bit_length() - 1

    @property
    def effective_preallocation(self):
        """data_file_raw turns 'off' into 'metadata', as qemu-img does."""
        if self.data_file_raw and self.preallocation == "off":
            return "metadata"
        return self.preallocation

    def as_dict(self):
        out = dict((k, getattr(self, k)) for k in self.KEYS
                   if k != "compat" and not k.startswith("encrypt_"))
        out["compat"] = self.compat
        if self.encryption is not None:
            for key, value in self.encryption.as_dict().items():
                out[encryption.option(key)] = value
        return out

    def __repr__(self):
        return "CreateOptions(%r)" % (self.as_dict(),)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, values, size_from_backing=None):
        """Parse and validate. `values` maps option names to user values (None = default).

        `size_from_backing` is the backing image's virtual size, used when size is omitted.
        """
        opts = cls()
        aliases = {"version": "compat", "cluster-size": "cluster_size",
                   "refcount-bits": "refcount_bits", "lazy-refcounts": "lazy_refcounts",
                   "extended-l2": "extended_l2", "compression-type": "compression_type",
                   "backing-file": "backing_file", "backing-fmt": "backing_fmt",
                   "data-file": "data_file", "data-file-raw": "data_file_raw",
                   "extent-size-hint": "extent_size_hint"}
        for key in encryption.KEYS:
            aliases["encrypt." + key.replace("_", "-")] = encryption.option(key)
            aliases["encrypt." + key] = encryption.option(key)
        clean = {}
        for key, value in values.items():
            key = aliases.get(key, key)
            if key not in cls.KEYS:
                raise Qcow2Error("%s: unknown qcow2 creation option (known: %s)"
                                 % (key, ", ".join(cls.KEYS)), option=key)
            if value is not None:
                clean[key] = value

        if "cluster_size" in clean:
            cs = parse_size(clean["cluster_size"], "cluster_size")
            if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
                raise Qcow2Error("cluster_size: %d is %s; qcow2 clusters are a power of two from "
                                 "512 bytes to 2 MiB (2097152 bytes)"
                                 % (cs, "not a power of two" if cs & (cs - 1) else
                                    "out of range"), option="cluster_size")
            opts.cluster_size = cs
        if "compat" in clean:
            opts.version = parse_compat(clean["compat"])
        if "refcount_bits" in clean:
            raw = clean["refcount_bits"]
            try:
                bits = int(raw)
            except (TypeError, ValueError):
                bits = -1
            if isinstance(raw, bool) or bits not in (1, 2, 4, 8, 16, 32, 64):
                raise Qcow2Error("refcount_bits: %r is not a power of two between 1 and 64"
                                 % (raw,), option="refcount_bits")
            opts.refcount_bits = bits
        for flag in ("lazy_refcounts", "extended_l2", "data_file_raw", "nocow"):
            if flag in clean:
                setattr(opts, flag, parse_bool(clean[flag], flag))
        if "compression_type" in clean:
            ctype = str(clean["compression_type"]).strip().lower()
            if ctype not in ("zlib", "zstd"):
                raise Qcow2Error("compression_type: %r is not supported (use zlib or zstd)"
                                 % (clean["compression_type"],), option="compression_type")
            opts.compression_type = ctype
        if "preallocation" in clean:
            mode = str(clean["preallocation"]).strip().lower()
            if mode not in C.PREALLOC_MODES:
                raise Qcow2Error("preallocation: %r is not a preallocation mode (use off, "
                                 "metadata, falloc or full)" % (clean["preallocation"],),
                                 option="preallocation")
            opts.preallocation = mode
        if "extent_size_hint" in clean:
            hint = parse_size(clean["extent_size_hint"], "extent_size_hint")
            if hint > 0xFFFFFFFF:
                raise Qcow2Error("extent_size_hint: %d is too large (at most 4294967295)" % hint,
                                 option="extent_size_hint")
            opts.extent_size_hint = hint
        for name in ("backing_file", "backing_fmt", "data_file"):
            if name in clean:
                text = clean[name]
                if not isinstance(text, str) or not text:
                    raise Qcow2Error("%s: expected a non-empty string" % name, option=name)
                if "\0" in text:
                    raise Qcow2Error("%s: contains a NUL byte" % name, option=name)
                setattr(opts, name, text)
        opts.encryption = encryption.resolve(clean)

        opts._check_rules()

        if "size" in clean:
            size = parse_size(clean["size"], "size")
        elif opts.backing_file and size_from_backing is not None:
            size = size_from_backing
        else:
            raise Qcow2Error("size: image creation needs a size (or a backing file to take it "
                             "from)", option="size")
        opts.size = (size + 511) // 512 * 512
        limit = C.max_virtual_size(opts.cluster_size, opts.extended_l2)
        if opts.size > limit:
            raise Qcow2Error(
                "size: %d bytes is too large for qcow2 with cluster_size %d%s (at most %d); use a "
                "larger cluster_size" % (opts.size, opts.cluster_size,
                                         " and extended_l2" if opts.extended_l2 else "", limit),
                option="size")
        return opts

    def _check_rules(self):
        """The combination rules of qemu-img create, each refused with the option's name."""
        v2 = self.version == 2
        if v2 and self.refcount_bits != 16:
            raise Qcow2Error("refcount_bits: widths other than 16 require compat 1.1 (v3)",
                             option="refcount_bits")
        if v2 and self.lazy_refcounts:
            raise Qcow2Error("lazy_refcounts: lazy refcounts require compat 1.1 (v3)",
                             option="lazy_refcounts")
        if v2 and self.extended_l2:
            raise Qcow2Error("extended_l2: extended L2 entries require compat 1.1 (v3)",
                             option="extended_l2")
        if self.extended_l2 and self.cluster_size < 16384:
            raise Qcow2Error("extended_l2: extended L2 entries need a cluster_size of at least "
                             "16384 bytes (cluster_size is %d)" % self.cluster_size,
                             option="extended_l2")
        if v2 and self.compression_type != "zlib":
            raise Qcow2Error("compression_type: %s requires compat 1.1 (v3); compat 0.10 only "
                             "knows zlib" % self.compression_type, option="compression_type")
        if self.backing_fmt and not self.backing_file:
            raise Qcow2Error("backing_fmt: a backing format cannot be used without backing_file",
                             option="backing_fmt")
        if self.backing_file and not self.backing_fmt:
            raise Qcow2Error("backing_fmt: backing_file %r needs backing_fmt; the format of a "
                             "backing file is never guessed" % self.backing_file,
                             option="backing_fmt")
        if self.backing_file and len(self.backing_file.encode("utf-8")) > C.MAX_BACKING_NAME:
            raise Qcow2Error("backing_file: name longer than %d bytes" % C.MAX_BACKING_NAME,
                             option="backing_file")
        if self.backing_fmt:
            check_backing_fmt(self.backing_fmt)
        if self.backing_file and self.preallocation != "off" and not self.extended_l2:
            raise Qcow2Error("preallocation: a backing file and preallocation=%s can only be used "
                             "together when extended_l2 is on" % self.preallocation,
                             option="preallocation")
        if self.data_file_raw and not self.data_file:
            raise Qcow2Error("data_file_raw: requires data_file", option="data_file_raw")
        if self.data_file_raw and self.backing_file:
            raise Qcow2Error("data_file_raw: cannot be used together with a backing file",
                             option="data_file_raw")
        if v2 and self.data_file:
            raise Qcow2Error("data_file: external data files require compat 1.1 (v3)",
                             option="data_file")
        if self.encryption is not None:
            if self.data_file_raw:
                raise Qcow2Error("data_file_raw: the data file of an encrypted image holds its "
                                 "ciphertext, which is never a raw image of the guest's disk",
                                 option="data_file_raw")
