# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""vdisk.qcow2.image with encrypt_*: LUKS images made (empty or as copies, from plain or
encrypted sources), re-checked, grown and refused, every case run in check mode first and
then for real, the prediction matching what the real run does (changed, actions, failure);
no passphrase ever in a result."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import hashlib
import json
import os
import threading

import pytest

from ansible_collections.vdisk.qcow2.plugins.modules import image as image_module
from ansible_collections.vdisk.qcow2.tests.unit.plugins.modules import module_runs

# Encrypted images need cryptography on the managed host: tests/unit/requirements.txt installs
# it for ansible-test units, so these tests run (never skip) there.
import cryptography  # noqa: E402,F401 pylint: disable=unused-import,wrong-import-position

SECRET = "correct horse battery staple"
FAST = dict(encrypt_format="luks", encrypt_passphrase=SECRET, encrypt_iter_time=10)


def _both(capsys, **args):
    """(check-mode result, real result), asserted to agree: changed, actions, the diff's text,
    or the failure."""
    args.setdefault("_ansible_diff", True)
    predicted, done = module_runs.both(image_module, capsys, **args)
    assert predicted.get("failed", False) == done.get("failed", False), (predicted, done)
    assert predicted.get("changed") == done.get("changed"), (predicted, done)
    if not done.get("failed"):
        assert predicted["actions"] == done["actions"]
        assert predicted["diff"] == done["diff"], (predicted["diff"], done["diff"])
    else:
        assert predicted["msg"] == done["msg"]
    for result in (predicted, done):
        assert SECRET not in json.dumps(result)
    return predicted, done


def _with(base, **changes):
    """A copy of the task arguments `base` with `changes`."""
    out = dict(base)
    out.update(changes)
    return out


def _digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
def test_made_then_unchanged(tmp_path, capsys, mode):
    path = str(tmp_path / "enc.qcow2")
    _predicted, done = _both(capsys, path=path, size="16M", preallocation=mode, **FAST)
    assert done["changed"] is True and "encrypted with luks" in done["actions"][0]
    view = done["image"]["encryption"]
    assert done["image"]["encrypted"] is True
    assert (view["format"], view["cipher_alg"], view["cipher_mode"], view["ivgen_alg"],
            view["hash_alg"], view["active_slots"]) == \
        ("luks", "aes-256", "xts", "plain64", "sha256", [0])
    assert done["image"]["preallocation"] == mode
    _predicted, again = _both(capsys, path=path, size="16M", preallocation=mode,
                              encrypt_cipher_alg="aes-256", **FAST)
    assert again["changed"] is False and again["actions"] == []


def test_declared_ciphers_are_made_and_compared(tmp_path, capsys):
    path = str(tmp_path / "cbc.qcow2")
    spec = dict(encrypt_cipher_alg="aes-128", encrypt_cipher_mode="cbc",
                encrypt_ivgen_alg="essiv", encrypt_hash_alg="sha512")
    _predicted, done = _both(capsys, **_with(FAST, path=path, size="8M",
                                             _ansible_diff=True, **spec))
    view = done["image"]["encryption"]
    assert (view["cipher_alg"], view["cipher_mode"], view["ivgen_alg"],
            view["ivgen_hash_alg"], view["hash_alg"]) == \
        ("aes-128", "cbc", "essiv", "sha256", "sha512")
    assert done["diff"]["after"]["encryption"]["cipher_mode"] == "cbc"
    before = _digest(path)
    _predicted, other = _both(capsys, path=path, size="8M", encrypt_cipher_mode="xts",
                              **_with(FAST, encrypt_cipher_alg="aes-128"))
    assert other["failed"] and "encrypt_cipher_mode is cbc, declared xts" in other["msg"]
    assert _digest(path) == before


def test_plain_and_encrypted_conflict_both_ways(tmp_path, capsys):
    plain = str(tmp_path / "plain.qcow2")
    module_runs.run(image_module, capsys, path=plain, size="8M")
    _predicted, done = _both(capsys, path=plain, size="8M", **FAST)
    assert done["failed"] and "the image is not encrypted, declared encrypt_format luks" in \
        done["msg"]
    enc = str(tmp_path / "enc.qcow2")
    module_runs.run(image_module, capsys, path=enc, size="8M", **FAST)
    before = _digest(enc)
    _predicted, done = _both(capsys, path=enc, size="8M")
    assert done["failed"] and "the image is encrypted (luks), declared without encryption" in \
        done["msg"]
    assert _digest(enc) == before
    _predicted, forced = _both(capsys, path=enc, size="8M", force=True)
    assert forced["changed"] and forced["actions"][0].startswith("recreate the image")
    assert forced["image"]["encrypted"] is False


@pytest.mark.parametrize("mode", ["off", "metadata", "full"])
def test_grown_with_its_passphrase_only(tmp_path, capsys, mode):
    path = str(tmp_path / "grow.qcow2")
    module_runs.run(image_module, capsys, path=path, size="8M", preallocation=mode, **FAST)
    before = _digest(path)
    wrong = _with(FAST, encrypt_passphrase=SECRET + "!", path=path, size="24M",
                  preallocation=mode)
    _predicted, refused = _both(capsys, **wrong)
    assert refused["failed"] and "opens no key slot" in refused["msg"]
    assert refused.get("option") == "encrypt_passphrase"
    assert _digest(path) == before
    _predicted, grown = _both(capsys, path=path, size="24M", preallocation=mode, **FAST)
    assert grown["changed"] and grown["actions"][0].startswith("grow the virtual size")
    assert grown["image"]["virtual_size"] == 24 << 20
    assert grown["image"]["preallocation"] == mode
    _predicted, again = _both(capsys, path=path, size="24M", preallocation=mode, **FAST)
    assert again["changed"] is False


def test_passphrase_file(tmp_path, capsys):
    key = tmp_path / "disk.key"
    key.write_bytes(b"from a file\n")
    path = str(tmp_path / "f.qcow2")
    args = dict(path=path, size="8M", encrypt_format="luks", encrypt_iter_time=10)
    _predicted, done = _both(capsys, encrypt_passphrase_file=str(key), **args)
    assert done["changed"]
    # The trailing newline is part of the passphrase, as for QEMU's secret file=.
    _predicted, nl = _both(capsys, **_with(args, encrypt_passphrase="from a file", size="9M"))
    assert nl["failed"] and "opens no key slot" in nl["msg"]
    _predicted, ok = _both(capsys, **_with(args, encrypt_passphrase="from a file\n", size="9M"))
    assert ok["changed"] and ok["image"]["virtual_size"] == 9 << 20


def test_passphrase_file_attacks_refused(tmp_path, capsys):
    path = str(tmp_path / "x.qcow2")
    args = dict(path=path, size="8M", encrypt_format="luks", encrypt_iter_time=10)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    outcome = {}

    def attempt():
        outcome["result"] = module_runs.run(image_module, capsys,
                                            encrypt_passphrase_file=fifo, **args)
    worker = threading.Thread(target=attempt)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "a FIFO as passphrase file blocked the module"
    result = outcome["result"]
    assert result["failed"] and "not a regular file" in result["msg"]
    # A link is followed (secrets often live behind one), but to a device node it is refused.
    link = tmp_path / "device.key"
    os.symlink("/dev/zero", str(link))
    result = module_runs.run(image_module, capsys, encrypt_passphrase_file=str(link), **args)
    assert result["failed"] and "not a regular file" in result["msg"]
    big = tmp_path / "big.key"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    result = module_runs.run(image_module, capsys, encrypt_passphrase_file=str(big), **args)
    assert result["failed"] and "at most 65536" in result["msg"]
    result = module_runs.run(image_module, capsys, encrypt_passphrase_file="rel.key", **args)
    assert result["failed"] and "relative" in result["msg"]
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    result = module_runs.run(image_module, capsys, encrypt_passphrase_file=str(empty), **args)
    assert result["failed"] and "empty" in result["msg"]
    assert not os.path.exists(path)


@pytest.mark.parametrize("extra,word", [
    ({"encrypt_passphrase": None}, "encrypt_passphrase: an encrypted image is made only"),
    ({"encrypt_cipher_alg": "serpent-256"}, "AES only"),
    ({"encrypt_ivgen_hash_alg": "sha256"}, "only the essiv IV generator uses a hash"),
    ({"encrypt_ivgen_alg": "essiv", "encrypt_ivgen_hash_alg": "sha512"}, "digest is an AES"),
    ({"data_file": "/tmp/never-made.raw", "data_file_raw": True},
     "data_file_raw: the data file of an encrypted image holds its ciphertext"),
])
def test_refusals_named_before_anything_is_made(tmp_path, capsys, extra, word):
    path = str(tmp_path / "r.qcow2")
    args = dict(FAST, path=path, size="8M")
    args.update(extra)
    args = dict((k, v) for k, v in args.items() if v is not None)
    _predicted, done = _both(capsys, **args)
    assert done["failed"] and word in done["msg"], done["msg"]
    assert os.listdir(str(tmp_path)) == []


SOURCE_SECRET = "the template's own passphrase"


def _guest_bytes(path, secret=None):
    """The guest content of the image at `path`, read by the engine (decrypted with
    `secret`)."""
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
    key = secret.encode("utf-8") if secret is not None else None
    with api.open_source(path, "qcow2", passphrase=key) as src:
        return src.read(0, src.size)


def _template(tmp_path):
    """A raw template: data, a zero run, a partly zero cluster."""
    data = bytearray(3 << 20)
    data[:100000] = os.urandom(100000)
    data[(2 << 20) + 7] = 1
    source = tmp_path / "t.raw"
    source.write_bytes(bytes(data))
    return str(source), bytes(data)


@pytest.mark.parametrize("mode", ["off", "falloc"])
def test_copy_into_an_encrypted_image(tmp_path, capsys, mode):
    source, data = _template(tmp_path)
    path = str(tmp_path / "c.qcow2")
    _predicted, done = _both(capsys, path=path, source=source, source_format="raw",
                             preallocation=mode, **FAST)
    assert done["changed"] is True and done["image"]["encrypted"] is True
    assert _guest_bytes(path, SECRET) == data
    _predicted, again = _both(capsys, path=path, source=source, source_format="raw",
                              preallocation=mode, **FAST)
    assert again["changed"] is False


def _encrypted_template(tmp_path, capsys):
    source, data = _template(tmp_path)
    template = str(tmp_path / "template.qcow2")
    done = module_runs.run(image_module, capsys, path=template, source=source,
                           source_format="raw", encrypt_format="luks",
                           encrypt_passphrase=SOURCE_SECRET, encrypt_iter_time=10)
    assert done["changed"] is True, done
    return template, data


def _both_secret(capsys, **args):
    """_both, the source's passphrase never in a result either."""
    results = _both(capsys, **args)
    for result in results:
        assert SOURCE_SECRET not in json.dumps(result)
    return results


@pytest.mark.parametrize("encrypted_target", [False, True])
def test_copy_from_an_encrypted_source(tmp_path, capsys, encrypted_target):
    template, data = _encrypted_template(tmp_path, capsys)
    path = str(tmp_path / "c.qcow2")
    extra = FAST if encrypted_target else {}
    _predicted, done = _both_secret(capsys, path=path, source=template, source_format="qcow2",
                                    source_passphrase=SOURCE_SECRET, **extra)
    assert done["changed"] is True and done["image"]["encrypted"] is encrypted_target
    assert _guest_bytes(path, SECRET if encrypted_target else None) == data


def test_source_passphrase_file(tmp_path, capsys):
    template, data = _encrypted_template(tmp_path, capsys)
    secret_file = tmp_path / "template.key"
    secret_file.write_bytes(SOURCE_SECRET.encode("utf-8"))
    path = str(tmp_path / "c.qcow2")
    _predicted, done = _both_secret(capsys, path=path, source=template, source_format="qcow2",
                                    source_passphrase_file=str(secret_file))
    assert done["changed"] is True and _guest_bytes(path) == data


@pytest.mark.parametrize("given", [None, "not the passphrase"])
def test_encrypted_source_refused_without_its_passphrase(tmp_path, capsys, given):
    template, _data = _encrypted_template(tmp_path, capsys)
    path = str(tmp_path / "c.qcow2")
    extra = {"source_passphrase": given} if given else {}
    _predicted, done = _both_secret(capsys, path=path, source=template, source_format="qcow2",
                                    **extra)
    assert done["failed"] and "source_passphrase" in done["msg"]
    assert given is None or given not in json.dumps(done)
    assert not os.path.exists(path)


def test_source_passphrase_needs_a_source(tmp_path, capsys):
    result = module_runs.run(image_module, capsys, path=str(tmp_path / "n.qcow2"), size="8M",
                             source_passphrase=SOURCE_SECRET)
    assert result["failed"] and "source" in result["msg"]
    assert SOURCE_SECRET not in json.dumps(result)


def test_cipher_options_need_the_format(tmp_path, capsys):
    result = module_runs.run(image_module, capsys, path=str(tmp_path / "n.qcow2"), size="8M",
                             encrypt_cipher_alg="aes-256")
    assert result["failed"] and "encrypt_format" in result["msg"]


def test_images_masks_item_passphrases_in_log_and_result(tmp_path, capsys, monkeypatch):
    from ansible.module_utils import basic
    from ansible_collections.vdisk.qcow2.plugins.modules import images as images_module
    logged = []
    monkeypatch.setattr(basic.AnsibleModule, "log",
                        lambda self, msg, log_args=None: logged.append((msg, log_args)))
    other = "another secret passphrase"
    args = dict(images=[dict(path=str(tmp_path / "a.qcow2"), size="8M", **FAST),
                        dict(path=str(tmp_path / "b.qcow2"), size="8M",
                             encrypt_passphrase=other)],
                defaults=dict(encrypt_format="luks", encrypt_iter_time=10))
    predicted, done = module_runs.both(images_module, capsys, **args)
    assert [r["changed"] for r in done["results"]] == [True, True], done
    assert [r["changed"] for r in predicted["results"]] == [True, True]
    assert logged, "the invocation was not logged"
    for text in [json.dumps(predicted), json.dumps(done), repr(logged)]:
        assert SECRET not in text and other not in text
    assert "'encrypt_passphrase': '********'" in repr(logged)


def test_check_passphrase_on_every_run_when_asked(tmp_path, capsys):
    """A rotated passphrase that no longer opens the image: unnoticed by a run that changes
    nothing, unless encrypt_check_passphrase asks; then it fails in check mode and for real
    alike, and the right one passes unchanged."""
    path = str(tmp_path / "rot.qcow2")
    module_runs.run(image_module, capsys, path=path, size="8M", **FAST)
    rotated = _with(FAST, path=path, size="8M", encrypt_passphrase="rotated in vault")
    _predicted, quiet = _both(capsys, **rotated)
    assert quiet["changed"] is False and not quiet.get("failed")
    _predicted, checked = _both(capsys, encrypt_check_passphrase=True, **rotated)
    assert checked["failed"] and "opens no key slot" in checked["msg"]
    assert checked.get("option") == "encrypt_passphrase"
    _predicted, right = _both(capsys, encrypt_check_passphrase=True,
                              **_with(FAST, path=path, size="8M"))
    assert right["changed"] is False and not right.get("failed")
