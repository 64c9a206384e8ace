# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Returned values a playbook may branch on are documented words, and what a declaration does
that its author probably did not mean is said with a warning, in check mode as in the real
run."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os
import stat

import pytest
import yaml

from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
from ansible_collections.vdisk.qcow2.plugins.modules import image as image_module
from ansible_collections.vdisk.qcow2.plugins.modules import image_info as info_module
from ansible_collections.vdisk.qcow2.tests.unit.plugins.modules import module_runs

MiB = 1 << 20


run = module_runs.run


def both(capsys, **args):
    """(check-mode result, real result) of the same image task."""
    return module_runs.both(image_module, capsys, **args)


warnings_of = module_runs.warnings_of


def documented_methods():
    doc = yaml.safe_load(image_module.RETURN)
    return doc["method"]["choices"]


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("copy", [False, True])
def test_method_is_a_documented_word(tmp_path, capsys, mode, copy):
    args = dict(path=str(tmp_path / "a.qcow2"), size="2M", preallocation=mode)
    if copy:
        src = tmp_path / "src.raw"
        src.write_bytes(b"\x11" * 65536)
        args.update(source=str(src), source_format="raw")
    predicted, done = both(capsys, **args)
    assert done["method"] in documented_methods(), done["method"]
    assert done["method"].startswith("copy") == copy
    assert predicted["actions"] == done["actions"]


def test_grow_method_is_a_documented_word(tmp_path, capsys):
    path = str(tmp_path / "g.qcow2")
    api.create(path, {"size": MiB})
    done = run(image_module, capsys, path=path, size="2M")
    assert done["changed"] is True
    assert done["method"] in documented_methods(), done["method"]


def test_info_on_a_link_warns_through_module_warn(tmp_path, capsys):
    target = tmp_path / "t.qcow2"
    api.create(str(target), {"size": MiB})
    link = tmp_path / "l.qcow2"
    os.symlink(str(target), str(link))
    result = run(info_module, capsys, path=str(link))
    assert result["islink"] is True
    assert any("symbolic link" in w for w in warnings_of(result)), result
    assert "deprecations" not in result or not result["deprecations"], result


def test_follow_returns_the_images_attributes(tmp_path, capsys):
    target = tmp_path / "t.qcow2"
    link = tmp_path / "l.qcow2"
    os.symlink(str(target), str(link))
    result = run(image_module, capsys, path=str(link), size="1M", follow=True, mode="0640")
    assert result["changed"] is True
    assert result["path"] == str(link)
    assert result["state"] == "file" and result["mode"] == "0640", result
    assert result["size"] == os.path.getsize(str(target))


def test_follow_absent_removes_the_image_and_says_the_link_dangles(tmp_path, capsys):
    target = tmp_path / "t.qcow2"
    api.create(str(target), {"size": MiB})
    link = tmp_path / "l.qcow2"
    os.symlink(str(target), str(link))
    predicted, done = both(capsys, path=str(link), state="absent", follow=True)
    assert predicted["actions"] == done["actions"]
    assert any("dangling" in a for a in done["actions"]), done["actions"]
    assert not target.exists() and os.path.islink(str(link))


def test_raw_source_with_a_qcow2_header_warns(tmp_path, capsys):
    src = tmp_path / "disk.qcow2"
    api.create(str(src), {"size": MiB})
    predicted, done = both(capsys, path=str(tmp_path / "new.qcow2"), source=str(src),
                           source_format="raw")
    for result in (predicted, done):
        assert any("starts with a qcow2 header" in w and "source_format: qcow2" in w
                   for w in warnings_of(result)), result


def test_raw_backing_fmt_on_a_qcow2_base_warns(tmp_path, capsys):
    base = tmp_path / "base.qcow2"
    api.create(str(base), {"size": MiB})
    predicted, done = both(capsys, path=str(tmp_path / "top.qcow2"), backing_file=str(base),
                           backing_fmt="raw")
    for result in (predicted, done):
        assert any("backing_fmt: raw" in w and "backing_fmt: qcow2" in w
                   for w in warnings_of(result)), result


def test_backup_before_removal(tmp_path, capsys):
    path = tmp_path / "gone.qcow2"
    api.create(str(path), {"size": MiB})
    with open(str(path), "rb") as handle:
        content = handle.read()
    predicted, done = both(capsys, path=str(path), state="absent", backup=True)
    assert "backup_file" not in predicted and predicted["changed"] is True
    assert done["changed"] is True and not path.exists()
    with open(done["backup_file"], "rb") as handle:
        assert handle.read() == content


def test_attribute_change_while_in_use_is_applied_and_said(tmp_path, capsys, monkeypatch):
    path = tmp_path / "busy.qcow2"
    api.create(str(path), {"size": MiB})
    os.chmod(str(path), 0o644)
    monkeypatch.setattr(api, "_in_use", lambda _lock, _path: True)
    predicted, done = both(capsys, path=str(path), size="1M", mode="0600")
    for result in (predicted, done):
        assert result["changed"] is True, result
        assert any("in use by a running QEMU" in w and "metadata" in w
                   for w in warnings_of(result)), result
    assert stat.S_IMODE(os.stat(str(path)).st_mode) == 0o600


def test_one_message_for_a_missing_backing_file(tmp_path, capsys):
    messages = []
    for size in (None, "1M"):
        args = dict(path=str(tmp_path / "o.qcow2"), backing_file="nope.qcow2",
                    backing_fmt="qcow2")
        if size:
            args["size"] = size
        predicted, done = both(capsys, **args)
        assert predicted["msg"] == done["msg"]
        messages.append(done["msg"])
    assert messages[0] == messages[1], messages
    assert "does not exist" in messages[0]


def test_allocation_method_of_a_compressed_image_is_documented():
    """An image whose clusters are all compressed reports the 'l2 tables' method; the docs
    must cover that case, not only the image where nothing is mapped."""
    doc = yaml.safe_load(info_module.RETURN)
    text = " ".join(doc["image"]["contains"]["allocation_method"]["description"])
    assert "l2 tables (no host data clusters to inspect)" in text
    assert "compressed" in text
