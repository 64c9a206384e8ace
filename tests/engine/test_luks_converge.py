# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Encrypted images changed in place, judged by what the guest reads (QEMU given the key):
images qemu-img made and a guest wrote to and discarded in, grown and raised by ours in every
preallocation mode; the old range reads exactly as before, the grown range zeros, and qemu-img
check (given the key) stays clean. Without the passphrase, or with a wrong one, nothing is
written."""

import hashlib
import os

import pytest

import oracle
from qcow2 import api
from qcow2.format.errors import Qcow2Error

SIZE = 8 << 20
GROWN = 20 << 20
KEY = b"abc"


@pytest.fixture(autouse=True)
def needs_tools():
    oracle.needs_luks_tools()


def _image_opts(path):
    return ["--object", "secret,id=s0,data=abc", "--image-opts",
            "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % path]


def _io(path, *commands):
    args = [oracle.QEMU_IO] + _image_opts(path)
    for command in commands:
        args += ["-c", command]
    proc = oracle.run(*args)
    assert proc.returncode == 0 and "verification failed" not in proc.stdout, \
        proc.stdout + proc.stderr
    return proc


def _guest(path, tmp_path):
    """The bytes the guest reads, through qemu-img convert with the key."""
    raw = str(tmp_path / "guest.raw")
    proc = oracle.run(*([oracle.QEMU_IMG, "convert", "-O", "raw"] + _image_opts(path) + [raw]))
    assert proc.returncode == 0, proc.stderr
    with open(raw, "rb") as handle:
        data = handle.read()
    os.unlink(raw)
    return data


def _checked(path):
    import json
    proc = oracle.run(*([oracle.QEMU_IMG, "check", "--output=json"] + _image_opts(path)))
    result = json.loads(proc.stdout)
    assert not result.get("corruptions") and not result.get("leaks") and \
        not result.get("check-errors"), result
    return result


def _used(tmp_path, options="", name="used.qcow2"):
    """A qemu-img-made encrypted image a guest wrote to, overwrote and discarded in."""
    path = str(tmp_path / name)
    oracle.qemu_luks(path, "8M", options=options)
    _io(path, "write -P 0x11 0 1M", "write -P 0x22 3M 192k", "write -z 3M 64k",
        "discard 0 512k", "write -P 0x33 7936k 256k")
    return path


PROFILES = ["", "preallocation=metadata", "cluster_size=512", "cluster_size=2M",
            "extended_l2=on"]


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("options", PROFILES)
def test_grow_keeps_the_guest_view(tmp_path, options, mode):
    path = _used(tmp_path, options)
    before = _guest(path, tmp_path)
    result = api.grow(path, GROWN, mode, passphrase=KEY)
    assert result["changed"] and result["new_size"] == GROWN
    after = _guest(path, tmp_path)
    assert after[:SIZE] == before
    assert after[SIZE:] == bytes(GROWN - SIZE)
    _checked(path)
    # Then a guest writes across the old end and reads it back.
    _io(path, "write -P 0x44 %d 128k" % (SIZE - (64 << 10)),
        "read -P 0x44 %d 128k" % (SIZE - (64 << 10)), "read -P 0 %d 1M" % (GROWN - (1 << 20)))
    _checked(path)


@pytest.mark.parametrize("target", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("options", ["", "cluster_size=512", "extended_l2=on"])
def test_raise_keeps_the_guest_view(tmp_path, options, target):
    path = _used(tmp_path, options)
    before = _guest(path, tmp_path)
    current = api.observe(path)["preallocation"]
    api.raise_preallocation(path, current, target, passphrase=KEY)
    assert _guest(path, tmp_path) == before
    _checked(path)
    state = api.observe(path)
    assert state["preallocation"] in ("metadata", "falloc", "full")
    assert state["guest_data"] is True


def _digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.mark.parametrize("key,word", [(None, "needs its passphrase"),
                                      (b"abd", "opens no key slot")])
def test_no_or_wrong_passphrase_writes_nothing(tmp_path, key, word):
    path = _used(tmp_path)
    before = _digest(path)
    for change in (lambda: api.grow(path, GROWN, "off", passphrase=key),
                   lambda: api.raise_preallocation(path, "off", "full", passphrase=key)):
        with pytest.raises(Qcow2Error) as err:
            change()
        assert word in str(err.value) and err.value.option == "encrypt_passphrase"
        assert _digest(path) == before


def test_compat_010_grows_thin_and_refuses_preallocation(tmp_path):
    path = str(tmp_path / "v2.qcow2")
    oracle.qemu_luks(path, "8M", options="compat=0.10")
    _io(path, "write -P 0x66 1M 64k")
    before = _guest(path, tmp_path)
    with pytest.raises(Qcow2Error) as err:
        api.grow(path, GROWN, "metadata", passphrase=KEY)
    assert "compat 0.10" in str(err.value) and "zero flag" in str(err.value)
    api.grow(path, GROWN, "off", passphrase=KEY)
    after = _guest(path, tmp_path)
    assert after[:SIZE] == before and after[SIZE:] == bytes(GROWN - SIZE)
    _checked(path)


@pytest.mark.parametrize("options", ["compat=0.10", "compat=1.1"])
def test_made_in_every_mode_reads_zeros(tmp_path, options):
    """Compat 1.1: zero-flagged preallocated clusters. Compat 0.10 has no zero flag: its
    preallocated clusters hold encrypted zeros, so they are written (full) whatever the mode,
    and an inspection without the key cannot tell them from guest data."""
    v2 = options == "compat=0.10"
    for mode in ("off", "metadata", "falloc", "full"):
        path = str(tmp_path / ("%s.qcow2" % mode))
        api.create(path, {"size": SIZE, "preallocation": mode,
                          "compat": options.split("=")[1]},
                   passphrase=KEY, iterations=(1000, 1000))
        assert _guest(path, tmp_path) == bytes(SIZE)
        _checked(path)
        state = api.observe(path)
        assert state["preallocation"] == ("full" if v2 and mode != "off" else mode)
        assert state["guest_data"] is (v2 and mode != "off")
        _io(path, "write -P 0x77 %d 4k" % (SIZE - 4096), "read -P 0x77 %d 4k" % (SIZE - 4096),
            "read -P 0 0 %d" % (SIZE - 4096))


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
def test_external_data_file_made_grown_and_converged(tmp_path, mode, encrypted):
    """An image with an external data file (encrypted too, as QEMU allows): QEMU reads zeros
    and back what it wrote, a grow keeps that, and the declaration converges (a second
    decision has nothing to do)."""
    from qcow2 import reconcile
    path = str(tmp_path / "df.qcow2")
    values = {"size": SIZE, "preallocation": mode, "data_file": path + ".data"}
    key = KEY if encrypted else None
    api.create(path, values, passphrase=key, iterations=(1000, 1000) if key else None)
    opts = _image_opts(path) if encrypted else [path]

    def io(*commands):
        args = [oracle.QEMU_IO] + opts
        for command in commands:
            args += ["-c", command]
        proc = oracle.run(*args)
        assert proc.returncode == 0 and "verification failed" not in proc.stdout, \
            proc.stdout + proc.stderr
    io("read -P 0 0 %d" % SIZE, "write -P 0x5a 1M 64k")
    api.grow(path, GROWN, mode, passphrase=key)
    io("read -P 0x5a 1M 64k", "read -P 0 0 1M", "read -P 0 %d %d" % (SIZE, GROWN - SIZE))
    proc = oracle.run(*([oracle.QEMU_IMG, "check"] + opts))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    declared = dict(values, size=GROWN)
    if encrypted:
        declared["encrypt_format"] = "luks"
    decision = reconcile.decide(declared, api.observe(path))
    assert not decision.actions and not decision.conflicts, (decision.actions,
                                                             decision.conflicts)


def test_data_file_raw_is_refused_with_encryption(tmp_path):
    path = str(tmp_path / "r.qcow2")
    with pytest.raises(Qcow2Error) as err:
        api.create(path, {"size": SIZE, "data_file": path + ".data", "data_file_raw": True},
                   passphrase=KEY, iterations=(1000, 1000))
    assert err.value.option == "data_file_raw" and not os.path.exists(path)


def test_missing_cryptography_is_named_before_any_write(tmp_path, monkeypatch):
    """A host without the cryptography package: the preflight (check mode) and the creation
    name the package, and nothing is made."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "cryptography" else real(name, *rest))
    path = str(tmp_path / "n.qcow2")
    values = {"size": SIZE, "encrypt_format": "luks"}
    for attempt in (lambda: api.preflight_create(path, values, passphrase=KEY),
                    lambda: api.create(path, values, passphrase=KEY)):
        with pytest.raises(Qcow2Error) as err:
            attempt()
        assert "python3-cryptography" in str(err.value) and err.value.option == "encrypt_format"
    assert os.listdir(str(tmp_path)) == []


@pytest.mark.parametrize("mode", ["off", "metadata"])
@pytest.mark.parametrize("options", ["", "extended_l2=on"])
def test_encrypted_overlay_of_a_plain_template_keeps_the_guest_view(tmp_path, mode, options):
    """An encrypted overlay (qemu-img's) of a plain template that a guest wrote to: grown by
    ours, it reads the template where the overlay has nothing, its own data, and zeros in the
    grown range (past the template's end too)."""
    base = str(tmp_path / "base.qcow2")
    assert oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", base,
                      "8M").returncode == 0
    assert oracle.run(oracle.QEMU_IO, "-c", "write -P 0x5c 0 8M", base).returncode == 0
    path = str(tmp_path / "overlay.qcow2")
    proc = None
    for _attempt in range(oracle.LUKS_ATTEMPTS):
        proc = oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "--object",
                          "secret,id=s0,data=abc", "-b", base, "-F", "qcow2", "-o",
                          "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10" +
                          ("," + options if options else ""), path, "8M")
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr
    _io(path, "write -P 0x11 1M 64k", "write -z 2M 64k")
    before = _guest(path, tmp_path)
    assert before[:1 << 20] == b"\x5c" * (1 << 20)
    api.grow(path, GROWN, mode, passphrase=KEY)
    after = _guest(path, tmp_path)
    assert after[:SIZE] == before and after[SIZE:] == bytes(GROWN - SIZE)
    _checked(path)
    # Raising the overlay's preallocation maps its clusters: only with extended L2 (whose
    # subclusters stay unallocated and read the template); without it refused, unchanged.
    grown = _guest(path, tmp_path)
    current = api.observe(path)["preallocation"]
    if options:
        api.raise_preallocation(path, current, "metadata", passphrase=KEY)
    else:
        with pytest.raises(Qcow2Error) as err:
            api.raise_preallocation(path, current, "metadata", passphrase=KEY)
        assert "backing file" in str(err.value)
    assert _guest(path, tmp_path) == grown
    _checked(path)


@pytest.mark.parametrize("into", ["header", "key material", "last sector"])
def test_truncated_encrypted_image_is_refused_unchanged(tmp_path, into):
    """An encrypted image cut short inside its LUKS header clusters (a download that stopped):
    inspected as not a usable qcow2 image with the defect named, never grown, never unlocked
    into a wrong key; QEMU refuses the first cut too (the later ones it opens, reading zeros
    past the end; we are stricter)."""
    from qcow2.crypto import luks1
    from qcow2.read.image import Image
    whole = str(tmp_path / "whole.qcow2")
    api.create(whole, {"size": SIZE}, passphrase=KEY, iterations=(1000, 1000))
    with Image.open(whole) as img:
        start, length = img.crypto_offset, img.crypto_length
        region = img.read(start, length)
    cut = {"header": start + 300, "key material": start + 4096 + 1000,
           "last sector": start + length - 512}[into]
    path = str(tmp_path / "cut.qcow2")
    with open(whole, "rb") as handle, open(path, "wb") as out:
        out.write(handle.read(cut))
    before = _digest(path)
    state = api.observe(path)
    assert state["qcow2"] is False and "corrupt" in state["reason"], state
    with pytest.raises(Qcow2Error) as err:
        api.grow(path, GROWN, "off", passphrase=KEY)
    assert "corrupt" in str(err.value)
    assert _digest(path) == before
    cut_region = region[:cut - start] + bytes(length - (cut - start))
    if into == "last sector":
        # Only the last (inactive) slot's material is missing: slot 0 still gives the key.
        assert luks1.unlock(cut_region, KEY) == luks1.unlock(region, KEY)
    else:
        with pytest.raises(Qcow2Error):
            luks1.unlock(cut_region, KEY)
    if into == "header":
        proc = oracle.run(oracle.QEMU_IMG, "info", path)
        assert proc.returncode != 0 and "corrupted" in proc.stderr


def test_a_run_derives_each_key_slot_once(tmp_path, monkeypatch):
    """Check mode's preflight and the real run both open the image (the guard of a grow, the
    source of a copy), yet the passphrase's PBKDF2 runs once: crypto/luks1 remembers what it
    opened for the rest of the process."""
    import hashlib
    from qcow2 import reconcile
    from qcow2.crypto import luks1
    monkeypatch.setattr(luks1, "_OPENED", {})
    derived = []
    real = hashlib.pbkdf2_hmac

    def counting(name, secret, *rest, **kw):
        if secret == KEY:
            derived.append(name)
        return real(name, secret, *rest, **kw)
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    path = _used(tmp_path)
    before = _guest(path, tmp_path)
    decision = reconcile.decide({"size": GROWN, "encrypt_format": "luks"}, api.observe(path))
    assert [a.kind for a in decision.actions] == ["grow"]
    api.preflight(path, decision, passphrase=KEY)
    api.apply(path, decision, passphrase=KEY)
    assert len(derived) == 1, derived
    assert _guest(path, tmp_path)[:SIZE] == before
    copy = str(tmp_path / "copy.qcow2")
    values = {"preallocation": "off"}
    api.preflight_create(copy, values, source=path, source_format="qcow2",
                         source_passphrase=KEY)
    api.create_from(copy, values, path, "qcow2", source_passphrase=KEY)
    assert len(derived) == 1, derived            # the grow's derivation served the copy too
    proc = oracle.run(oracle.QEMU_IMG, "convert", "-O", "raw", copy, str(tmp_path / "c.raw"))
    assert proc.returncode == 0, proc.stderr
    with open(str(tmp_path / "c.raw"), "rb") as handle:
        assert handle.read(SIZE) == before


def test_encrypted_template_naming_a_host_file_is_refused_before_reading_it(tmp_path):
    """An encrypted template whose backing file is a host file (a secret): with its passphrase
    it is still refused as a template with a backing chain, naming the file, and nothing is
    made: the same policy as for a plain template (test_template_policy shows the backing file
    is never opened)."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"host secret " * 1000)
    path = str(tmp_path / "tpl.qcow2")
    proc = None
    for _attempt in range(oracle.LUKS_ATTEMPTS):
        proc = oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "--object",
                          "secret,id=s0,data=abc", "-b", str(secret), "-F", "raw", "-o",
                          "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                          path, "1M")
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr
    target = str(tmp_path / "new.qcow2")
    for attempt in (lambda: api.preflight_create(target, {}, source=path,
                                                 source_format="qcow2", source_passphrase=KEY),
                    lambda: api.create_from(target, {}, path, "qcow2", source_passphrase=KEY)):
        with pytest.raises(Qcow2Error) as err:
            attempt()
        assert str(secret) in str(err.value) and "source_backing_chain" in str(err.value)
    assert not os.path.exists(target)
