# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Encrypted copies, judged by what the guest reads (QEMU given the key): raw and qcow2
sources with data, zero runs and partly zero clusters copied into LUKS-encrypted images in
every preallocation mode read exactly as the source (qemu-img convert with the target's key)
and pass qemu-img check; an encrypted source (made by qemu-img, written by qemu-io) opens with
its passphrase only, is decrypted as it is read, and copies into a plain image and into an
image encrypted under another passphrase. A wrong or missing source passphrase is refused
before the target exists."""

import json
import os

import pytest

import oracle
from qcow2 import api
from qcow2.format.errors import Qcow2Error

SIZE = 3 << 20
FAST = (1000, 1000)             # PBKDF2 rounds (slot, digest): the least LUKS1 allows


@pytest.fixture(autouse=True)
def needs_tools():
    oracle.needs_luks_tools()


def _image_opts(path, key):
    return ["--object", "secret,id=s0,data=" + key, "--image-opts",
            "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % path]


def _guest(tmp_path, path, key=None, fmt="qcow2"):
    """The bytes the guest reads, through qemu-img convert (with the key when given)."""
    raw = str(tmp_path / "guest.raw")
    if key is None:
        args = [oracle.QEMU_IMG, "convert", "-f", fmt, "-O", "raw", path, raw]
    else:
        args = [oracle.QEMU_IMG, "convert", "-O", "raw"] + _image_opts(path, key) + [raw]
    proc = oracle.run(*args)
    assert proc.returncode == 0, proc.stderr
    with open(raw, "rb") as handle:
        data = handle.read()
    os.unlink(raw)
    return data


def _checked(path, key):
    proc = oracle.run(*([oracle.QEMU_IMG, "check", "--output=json"] + _image_opts(path, key)))
    result = json.loads(proc.stdout)
    assert not result.get("corruptions") and not result.get("leaks") and \
        not result.get("check-errors"), result


def _pattern():
    """Guest bytes with data, zero runs, partly zero clusters (a lone byte, 8 KiB of data
    between zero blocks) and a short tail (the size is not a cluster multiple)."""
    data = bytearray(SIZE - 100)
    data[0:70000] = os.urandom(70000)
    data[200000] = 0x78
    data[(1 << 20) + 12288:(1 << 20) + 20480] = os.urandom(8192)
    data[(2 << 20) + 513:(2 << 20) + 900] = os.urandom(387)
    data[-1000:] = os.urandom(1000)
    return bytes(data)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{kind: (path, format)}: a raw file, and a qcow2 image of it with zero clusters."""
    base = tmp_path_factory.mktemp("luks-copy-sources")
    raw = str(base / "src.raw")
    with open(raw, "wb") as handle:
        handle.write(_pattern())
    qcow = str(base / "src.qcow2")
    proc = oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    assert proc.returncode == 0, proc.stderr
    proc = oracle.run(oracle.QEMU_IO, "-f", "qcow2", "-c", "write -z 64k 64k", "-c",
                      "write -P 0x44 1536k 4k", qcow)
    assert proc.returncode == 0, proc.stderr
    return {"raw": (raw, "raw"), "qcow2": (qcow, "qcow2")}


def _copy_and_judge(tmp_path, source, fmt, values, key="xyz", source_key=None, guest=None):
    target = str(tmp_path / "copy.qcow2")
    result = api.create_from(target, values, source, fmt, passphrase=key.encode(),
                             iterations=FAST, source_passphrase=source_key)
    assert result["encrypted"]
    want = guest if guest is not None else _guest(tmp_path, source, fmt=fmt)
    got = _guest(tmp_path, target, key)
    assert got[:len(want)] == want and not any(got[len(want):])
    _checked(target, key)
    assert api.observe(target)["encrypted"]
    return target


@pytest.mark.parametrize("cluster_size", [65536, 512])
@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_copy_into_an_encrypted_image(tmp_path, sources, kind, mode, cluster_size):
    source, fmt = sources[kind]
    _copy_and_judge(tmp_path, source, fmt, {"preallocation": mode,
                                            "cluster_size": cluster_size})


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_copy_into_an_encrypted_image_with_extended_l2(tmp_path, sources, kind, mode):
    source, fmt = sources[kind]
    _copy_and_judge(tmp_path, source, fmt, {"preallocation": mode, "extended_l2": True,
                                            "cluster_size": 65536})


def test_encrypted_data_clusters_hold_no_plaintext(tmp_path, sources):
    """Every data byte of the copy is ciphertext: the source's random run is nowhere in the
    file, and a cluster whose data is one byte was written whole (no hole inside it)."""
    source, fmt = sources["raw"]
    target = _copy_and_judge(tmp_path, source, fmt, {"cluster_size": 65536})
    with open(source, "rb") as handle:
        plain = handle.read(4096)
    with open(target, "rb") as handle:
        assert plain not in handle.read()


@pytest.fixture
def encrypted_source(tmp_path):
    """A qemu-img-made encrypted image (passphrase abc) a guest wrote to, and its guest view."""
    path = str(tmp_path / "enc-src.qcow2")
    oracle.qemu_luks(path, "4M")
    proc = oracle.run(*([oracle.QEMU_IO] + _image_opts(path, "abc") + [
        "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1100k 10k", "-c", "write -z 64k 64k",
        "-c", "write -P 0x33 3968k 128k"]))
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr
    return path, _guest(tmp_path, path, "abc")


def test_encrypted_source_into_a_plain_image(tmp_path, encrypted_source):
    source, guest = encrypted_source
    target = str(tmp_path / "plain.qcow2")
    api.create_from(target, {}, source, "qcow2", source_passphrase=b"abc")
    assert _guest(tmp_path, target) == guest
    assert not api.observe(target)["encrypted"]
    oracle.assert_clean(target)


@pytest.mark.parametrize("mode", ["off", "falloc"])
def test_encrypted_source_into_one_of_another_key(tmp_path, encrypted_source, mode):
    source, guest = encrypted_source
    _copy_and_judge(tmp_path, source, "qcow2", {"preallocation": mode}, key="other",
                    source_key=b"abc", guest=guest)


@pytest.mark.parametrize("key", [None, b"wrong"])
def test_source_passphrase_missing_or_wrong_is_refused(tmp_path, encrypted_source, key):
    source, _guest_view = encrypted_source
    target = str(tmp_path / "never.qcow2")
    with pytest.raises(Qcow2Error) as err:
        api.preflight_create(target, {}, source=source, source_format="qcow2",
                             source_passphrase=key)
    assert "source_passphrase" in str(err.value)
    with pytest.raises(Qcow2Error) as err:
        api.create_from(target, {"encrypt_format": "luks"}, source, "qcow2",
                        passphrase=b"new", iterations=FAST, source_passphrase=key)
    assert err.value.option in ("source", "source_passphrase")
    assert not os.path.lexists(target)
    assert not [n for n in os.listdir(str(tmp_path)) if n.startswith(".never")]


def test_encrypted_copy_without_a_passphrase_is_refused(tmp_path, sources):
    source, fmt = sources["raw"]
    target = str(tmp_path / "never.qcow2")
    with pytest.raises(Qcow2Error) as err:
        api.preflight_create(target, {"encrypt_format": "luks"}, source=source,
                             source_format=fmt)
    assert err.value.option == "encrypt_passphrase"
    assert not os.path.lexists(target)


@pytest.mark.parametrize("values", [{"extended_l2": True}, {"cluster_size": 512}])
def test_our_encrypted_copy_read_back_as_a_source(tmp_path, sources, values):
    """An encrypted image of ours (subclusters or small clusters partly written) is itself a
    source: decrypted, it reads as the original."""
    source, fmt = sources["qcow2"]
    encrypted = _copy_and_judge(tmp_path, source, fmt, values)
    target = str(tmp_path / "plain.qcow2")
    api.create_from(target, {}, encrypted, "qcow2", source_passphrase=b"xyz")
    assert _guest(tmp_path, target) == _guest(tmp_path, source, fmt=fmt)
