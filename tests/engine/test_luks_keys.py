# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""LUKS1 key slots (crypto/luks1.py) and the sector cipher (crypto/sectors.py), judged by QEMU
and cryptsetup: a header we make opens in qemu-io with its passphrase and only with it, and lays
out as qemu-img's do, for each AES mode and IV generator; headers qemu-img made unlock with
ours; payload sectors qemu-io wrote decrypt with ours and ours read back in qemu-io; the bulk
XTS and CBC equal cryptography's per-sector ciphers; damaged or foreign headers and the specs
QEMU refuses give a clear error naming the option, never a wrong key."""

import hashlib
import os
import random
import shutil
import sys

import pytest

import oracle
from qcow2.format import luks
from qcow2.format.errors import Qcow2Error
from qcow2.read.image import Image

try:
    from qcow2.crypto import luks1, sectors
except ImportError:     # the modules themselves import cryptography only when they encrypt
    luks1 = sectors = None

CRYPTSETUP = "/usr/sbin/cryptsetup"     # outside PATH for some users


@pytest.fixture(autouse=True)
def needs_tools():
    oracle.needs_luks_tools()


def _seeded(seed):
    rng = random.Random(seed)
    return lambda n: bytes(rng.getrandbits(8) for _byte in range(n))


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_bytes", [32, 64])
def test_af_split_merges_back(hash_name, key_bytes):
    key = os.urandom(key_bytes)
    material = luks1.af_split(key, 50, hash_name)
    assert len(material) == 50 * key_bytes
    assert luks1.af_merge(material, key_bytes, 50, hash_name) == key
    broken = bytes([material[0] ^ 1]) + material[1:]
    assert luks1.af_merge(broken, key_bytes, 50, hash_name) != key


def _volume(tmp_path, region, name="ours.luks"):
    path = str(tmp_path / name)
    with open(path, "wb") as handle:
        handle.write(region)
        handle.truncate(len(region) + (1 << 20))
    return path


def _qemu_io(path, secret, *commands):
    args = [oracle.QEMU_IO, "--object", "secret,id=s0,data=%s" % secret, "--image-opts",
            "driver=luks,key-secret=s0,file.filename=%s" % path]
    for command in commands:
        args += ["-c", command]
    return oracle.run(*args)


@pytest.mark.parametrize("cipher_alg,hash_alg",
                         [("aes-256", "sha256"), ("aes-128", "sha1"), ("aes-256", "sha512")])
def test_qemu_opens_our_header_with_its_passphrase_only(tmp_path, cipher_alg, hash_alg):
    region, master = luks1.build(b"s3cret", cipher_alg=cipher_alg, hash_alg=hash_alg,
                                 iterations=(1000, 1000))
    path = _volume(tmp_path, region)
    proc = _qemu_io(path, "s3cret", "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, \
        proc.stdout + proc.stderr
    wrong = _qemu_io(path, "s3cret!", "read 0 512")
    assert wrong.returncode != 0 and "Invalid password" in wrong.stderr
    # Laid out as qemu-img lays out its own: the same payload offset and key offsets.
    ours = luks.describe(luks.parse(region[:luks.PHDR_SIZE]))
    theirs = oracle.qemu_info(path)["format-specific"]["data"]    # a bare volume: no "format"
    assert ours == dict(theirs, format="luks")
    assert luks1.unlock(region, b"s3cret") == master


def test_headers_qemu_img_made_unlock_with_ours(tmp_path):
    volume = str(tmp_path / "q.luks")
    oracle.qemu_luks(volume, fmt="luks")
    with open(volume, "rb") as handle:
        data = handle.read()
    payload = luks.parse(data[:luks.PHDR_SIZE])["payload"] * luks.SECTOR
    assert len(luks1.unlock(data[:payload], b"abc")) == 64
    # The header inside a LUKS-encrypted qcow2 image.
    image_path = str(tmp_path / "q.qcow2")
    oracle.qemu_luks(image_path, "16M")
    image = Image.open(image_path)
    try:
        region = image.read(image.crypto_offset, image.crypto_length)
    finally:
        image.close()
    assert len(luks1.unlock(region, b"abc")) == 64
    with pytest.raises(Qcow2Error) as err:
        luks1.unlock(region, b"abd")
    assert err.value.option == "encrypt_passphrase" and "opens no key slot" in str(err.value)


def _damaged(region, how):
    data = bytearray(region)
    if how == "key material":
        data[4096 + 1000] ^= 0x40
    elif how == "master key digest":
        data[112] ^= 0x01
    elif how == "slot salt":
        data[208 + 8] ^= 0x80
    elif how == "iterations":
        data[208 + 4:208 + 8] = (1001).to_bytes(4, "big")
    elif how == "slot disabled":
        data[208:212] = luks.SLOT_DISABLED.to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("how", ["key material", "master key digest", "slot salt",
                                 "iterations", "slot disabled"])
def test_damaged_header_never_yields_a_key(how):
    region, _master = luks1.build(b"pw", iterations=(1000, 1000), random=_seeded(7))
    with pytest.raises(Qcow2Error) as err:
        luks1.unlock(_damaged(region, how), b"pw")
    assert "opens no key slot" in str(err.value)


def test_other_ciphers_and_sizes_are_named(tmp_path):
    region, _master = luks1.build(b"pw", iterations=(1000, 1000))
    foreign = bytearray(region)
    foreign[8:40] = b"twofish".ljust(32, b"\0")
    with pytest.raises(Qcow2Error) as err:
        luks1.unlock(bytes(foreign), b"pw")
    assert "twofish-xts-plain64" in str(err.value)
    with pytest.raises(Qcow2Error) as err:
        luks1.build(b"pw", master_key=bytes(48))
    assert err.value.option == "encrypt_cipher_alg"
    with pytest.raises(Qcow2Error) as err:
        luks1.build(b"pw", hash_alg="whirlpool")
    assert err.value.option == "encrypt_hash_alg"


def test_missing_cryptography_is_named(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("cryptography")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(Qcow2Error) as err:
        luks1.build(b"pw", iterations=(1000, 1000))
    assert "cryptography" in str(err.value) and "python3-cryptography" in str(err.value)


# The cipher specs judged both ways: (cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg,
# hash_alg), in QEMU's option values.
SPECS = [
    ("aes-256", "xts", "plain64", None, "sha256"),
    ("aes-128", "xts", "plain64", None, "sha1"),
    ("aes-192", "xts", "plain64", None, "sha256"),
    ("aes-256", "cbc", "essiv", "sha256", "sha256"),
    ("aes-128", "cbc", "plain", None, "sha256"),
    ("aes-256", "cbc", "plain64", None, "sha512"),
    ("aes-256", "ecb", "plain64", None, "sha256"),
    ("aes-256", "ctr", "plain64", None, "sha256"),
]
# Judged one way (ours in QEMU): no qemu-img calibration to pay for.
MORE_SPECS = [
    ("aes-128", "cbc", "essiv", "md5", "sha256"),
    ("aes-192", "xts", "essiv", "sha256", "sha1"),
    ("aes-128", "ctr", "plain", None, "sha256"),
]


def _spec_id(spec):
    return "-".join(part for part in spec if part)


def _build_kwargs(spec):
    return dict(zip(("cipher_alg", "cipher_mode", "ivgen_alg", "ivgen_hash_alg", "hash_alg"),
                    spec))


def _reference(mode, key, first, data, encrypt, iv_of):
    """`data` through cryptography's own XTS, CBC or CTR, one cipher object per sector."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    out = []
    for at in range(0, len(data), luks.SECTOR):
        iv = iv_of(first + at // luks.SECTOR)
        cipher = Cipher(algorithms.AES(key), getattr(modes, mode.upper())(iv))
        worker = cipher.encryptor() if encrypt else cipher.decryptor()
        out.append(worker.update(data[at:at + luks.SECTOR]) + worker.finalize())
    return b"".join(out)


def _plain64(sector):
    return sector.to_bytes(16, "little")


@pytest.mark.parametrize("mode,key_bytes", [("xts", 64), ("xts", 32), ("cbc", 32),
                                            ("cbc", 16), ("ctr", 24)])
def test_sector_cipher_matches_cryptography_per_sector(mode, key_bytes):
    """Our bulk XTS and CBC (and per-sector CTR) equal cryptography's per-sector cipher objects,
    both ways, over more sectors than one run and across the 32-bit sector boundary."""
    bits = key_bytes * 8 // (2 if mode == "xts" else 1)
    key = os.urandom(key_bytes)
    data = os.urandom(luks.SECTOR * (sectors.RUN + 77))
    first = (1 << 32) - 1000
    cipher = sectors.SectorCipher("aes-%d" % bits, mode, "plain64", None, key)
    encrypted = cipher.encrypt(first, data)
    assert encrypted == _reference(mode, key, first, data, True, _plain64)
    assert cipher.decrypt(first, encrypted) == data
    assert cipher.decrypt(first, data) == _reference(mode, key, first, data, False, _plain64)


def test_ivgens_plain_and_essiv():
    """plain keeps the low 32 bits of the sector number; essiv encrypts the plain64 IV with
    AES-ECB keyed by the hash of the whole key (both XTS halves)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    key = os.urandom(64)
    data = os.urandom(luks.SECTOR * 40)
    plain = sectors.SectorCipher("aes-256", "xts", "plain", None, key)
    first = (1 << 32) - 20       # wraps to sector 0 halfway
    assert plain.encrypt(first, data) == _reference(
        "xts", key, first, data, True, lambda n: (n & 0xFFFFFFFF).to_bytes(16, "little"))
    essiv = sectors.SectorCipher("aes-256", "xts", "essiv", "sha256", key)
    salt_cipher = Cipher(algorithms.AES(hashlib.sha256(key).digest()), modes.ECB())
    assert essiv.encrypt(7, data) == _reference(
        "xts", key, 7, data, True, lambda n: salt_cipher.encryptor().update(_plain64(n)))
    ecb = sectors.SectorCipher("aes-128", "ecb", "plain64", None, key[:16])
    assert ecb.encrypt(5, data) == ecb.encrypt(9, data)     # ECB takes no IV
    assert ecb.decrypt(0, ecb.encrypt(3, data)) == data


@pytest.mark.parametrize("args,option", [
    (("serpent-256", "xts", "plain64", None), "encrypt_cipher_alg"),
    (("twofish-128", "cbc", "plain64", None), "encrypt_cipher_alg"),
    (("sm4", "cbc", "plain64", None), "encrypt_cipher_alg"),
    (("des-56", "cbc", "plain64", None), "encrypt_cipher_alg"),
    (("aes-256", "gcm", "plain64", None), "encrypt_cipher_mode"),
    (("aes-256", "cbc", "benbi", None), "encrypt_ivgen_alg"),
    (("aes-256", "cbc", "essiv", "sha1"), "encrypt_ivgen_hash_alg"),
    (("aes-256", "cbc", "essiv", "sha512"), "encrypt_ivgen_hash_alg"),
    (("aes-256", "cbc", "essiv", "whirlpool"), "encrypt_ivgen_hash_alg"),
    (("aes-192", "cbc", "plain64", None), "encrypt_cipher_alg"),     # QEMU aborts on these
])
def test_refused_specs_name_the_option(args, option):
    with pytest.raises(Qcow2Error) as err:
        sectors.header_names(*args)
    assert err.value.option == option and option in str(err.value)
    with pytest.raises(Qcow2Error) as err:
        luks1.build(b"pw", *args, iterations=(1000, 1000))
    assert err.value.option == option
    if args[0].startswith(("serpent", "twofish", "sm4")):
        assert "AES only" in str(err.value)


def test_wrong_key_sizes_are_refused():
    with pytest.raises(Qcow2Error) as err:
        sectors.SectorCipher("aes-192", "xts", "plain64", None, bytes(24))
    assert err.value.option == "encrypt_cipher_alg" and "48 bytes" in str(err.value)
    region, _master = luks1.build(b"pw", iterations=(1000, 1000))
    odd = bytearray(region)
    odd[108:112] = (33).to_bytes(4, "big")          # key_bytes: an odd XTS key
    with pytest.raises(Qcow2Error) as err:
        luks1.unlock(bytes(odd), b"pw")
    assert err.value.option == "encrypt_cipher_alg" and "33 bytes" in str(err.value)


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_header_names_as_qemu_writes_them(spec):
    cipher, mode, key_bytes = sectors.header_names(*spec[:4])
    assert cipher == b"aes"
    assert mode == ("%s-%s" % spec[1:3] + (":" + spec[3] if spec[3] else "")).encode()
    assert key_bytes == int(spec[0][4:]) // 8 * (2 if spec[1] == "xts" else 1)
    fields = {"cipher": cipher, "mode": mode, "key_bytes": key_bytes, "hash": spec[4].encode()}
    assert sectors.options_of(fields) == _build_kwargs(spec)
    # essiv without a hash takes sha256, as QEMU does; cryptsetup's bare "ecb" reads back.
    assert sectors.header_names("aes-128", "cbc", "essiv")[1] == b"cbc-essiv:sha256"
    bare = sectors.options_of(dict(fields, mode=b"ecb", key_bytes=32))
    assert bare["cipher_alg"] == "aes-256" and bare["cipher_mode"] == "ecb"


def _data_both_ways(path, secret, region, master):
    """qemu-io reads back what our SectorCipher encrypted into the volume's payload, and what
    qemu-io wrote decrypts with ours to its pattern (bare luks: sector = payload offset / 512).
    """
    fields = luks.parse(region[:luks.PHDR_SIZE])
    cipher = sectors.SectorCipher.from_fields(fields, master)
    payload = fields["payload"] * luks.SECTOR
    ours_at, theirs_at, length = 256 << 10, 640 << 10, 64 << 10
    with open(path, "r+b") as handle:
        handle.seek(payload + ours_at)
        handle.write(cipher.encrypt(ours_at // luks.SECTOR, b"\xc3" * length))
    proc = _qemu_io(path, secret, "read -P 0xc3 %d %d" % (ours_at, length),
                    "write -P 0x5a %d %d" % (theirs_at, length))
    assert proc.returncode == 0 and "verification failed" not in proc.stdout, \
        proc.stdout + proc.stderr
    with open(path, "rb") as handle:
        handle.seek(payload + theirs_at)
        written = handle.read(length)
    assert written != b"\x5a" * length
    assert cipher.decrypt(theirs_at // luks.SECTOR, written) == b"\x5a" * length


@pytest.mark.parametrize("spec", SPECS + MORE_SPECS, ids=_spec_id)
def test_qemu_opens_our_header_of_each_spec(tmp_path, spec):
    region, master = luks1.build(b"s3cret", iterations=(1000, 1000), **_build_kwargs(spec))
    path = _volume(tmp_path, region)
    _data_both_ways(path, "s3cret", region, master)
    wrong = _qemu_io(path, "s3cret!", "read 0 512")
    assert wrong.returncode != 0 and "Invalid password" in wrong.stderr
    ours = luks.describe(luks.parse(region[:luks.PHDR_SIZE]))
    theirs = oracle.qemu_info(path)["format-specific"]["data"]
    assert ours == dict(theirs, format="luks")
    assert luks1.unlock(region, b"s3cret") == master


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_qemu_img_headers_of_each_spec_unlock_with_ours(tmp_path, spec):
    # QEMU's defaults left out: the default spec shares the image made for the test above.
    defaults = ("aes-256", "xts", "plain64", None, "sha256")
    options = ",".join("%s=%s" % (name, value) for name, value, default in zip(
        ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg"), spec,
        defaults) if value != default)
    path = str(tmp_path / "q.luks")
    oracle.qemu_luks(path, fmt="luks", options=options)
    with open(path, "rb") as handle:
        head = handle.read(luks.PHDR_SIZE)
        fields = luks.parse(head)
        handle.seek(0)
        region = handle.read(fields["payload"] * luks.SECTOR)
    assert sectors.options_of(fields) == _build_kwargs(spec)
    assert (fields["cipher"], fields["mode"], fields["key_bytes"]) == \
        sectors.header_names(*spec[:4])
    master = luks1.unlock(region, b"abc")
    _data_both_ways(path, "abc", region, master)
    with pytest.raises(Qcow2Error):
        luks1.unlock(region, b"abd")


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]], ids=_spec_id)
def test_cryptsetup_reads_and_opens_our_header(tmp_path, spec):
    """cryptsetup, LUKS's own tool, agrees: its dump shows our header's fields and slots, and it
    opens slot 0 with the passphrase only (--test-passphrase: no device mapper)."""
    tool = shutil.which("cryptsetup") or (os.path.exists(CRYPTSETUP) and CRYPTSETUP)
    if not tool:
        oracle.unavailable("luks", "cryptsetup is not installed (cryptsetup-bin; "
                           "scripts/setup-debian.sh installs it)")
    region, _master = luks1.build(b"s3cret", iterations=(1000, 1000), **_build_kwargs(spec))
    path = _volume(tmp_path, region)
    dump = oracle.run(tool, "luksDump", path)
    assert dump.returncode == 0, dump.stderr
    fields = dict(line.split(":", 1) for line in dump.stdout.splitlines()
                  if ":" in line and not line.startswith(("\t", " ")))
    fields = {name.strip(): value.strip() for name, value in fields.items()}
    mode = sectors.header_names(*spec[:4])[1].decode()
    assert fields["Version"] == "1" and fields["Cipher name"] == "aes"
    assert fields["Cipher mode"] == mode and fields["Hash spec"] == spec[4]
    assert int(fields["Payload offset"]) * luks.SECTOR == len(region)
    assert fields["Key Slot 0"] == "ENABLED"
    assert [fields["Key Slot %d" % index] for index in range(1, 8)] == ["DISABLED"] * 7
    for secret, code in ((b"s3cret", 0), (b"s3cret!", 2)):
        key_file = tmp_path / "key"
        key_file.write_bytes(secret)
        proc = oracle.run(tool, "luksOpen", "--test-passphrase", "--key-file", key_file, path)
        assert proc.returncode == code, proc.stderr
