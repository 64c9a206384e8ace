# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What an experienced Ansible user relies on: check mode predicts failures, failures leave
nothing behind, diffs show destruction, errors name the option. Each case runs in check mode
and for real, and the two must agree."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import hashlib
import os
import stat

from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
from ansible_collections.vdisk.qcow2.plugins.modules import image as image_module
from ansible_collections.vdisk.qcow2.plugins.modules import image_info as info_module
from ansible_collections.vdisk.qcow2.tests.unit.plugins.modules import module_runs


run = module_runs.run


def both(capsys, **args):
    """(check-mode result, real result) of the same image task."""
    return module_runs.both(image_module, capsys, **args)


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def assert_same_outcome(predicted, done):
    assert bool(predicted.get("failed")) == bool(done.get("failed")), (predicted, done)
    assert predicted["changed"] == done["changed"], (predicted, done)
    if not done.get("failed"):
        assert predicted["actions"] == done["actions"], (predicted, done)


def test_failures_are_predicted_and_create_nothing(tmp_path, capsys):
    cases = [
        (dict(path=str(tmp_path / "missing" / "a.qcow2"), size="1M"), "does not exist"),
        (dict(path=str(tmp_path / "b.qcow2"), size="1M", owner="nosuchuser-vdq"),
         "owner: the user 'nosuchuser-vdq' does not exist"),
        (dict(path=str(tmp_path / "c.qcow2"), size="1M", group="nosuchgroup-vdq"),
         "group: the group 'nosuchgroup-vdq' does not exist"),
        (dict(path=str(tmp_path / "d.qcow2"), size="1M", mode="u=rwz"), "mode: 'u=rwz'"),
        (dict(path=str(tmp_path / "e.qcow2"), size="1M", backing_file="nope.qcow2",
              backing_fmt="qcow2"), "does not exist"),
    ]
    for args, fragment in cases:
        predicted, done = both(capsys, **args)
        assert_same_outcome(predicted, done)
        assert done["failed"] is True and done["changed"] is False, done
        assert fragment in done["msg"], done["msg"]
        assert done["actions"] == [] and predicted["actions"] == []
        assert done["path"] == args["path"]
        assert "option" not in done or done["option"] is not None
    assert os.listdir(str(tmp_path)) == []


def test_mode_errors_name_the_path(tmp_path, capsys):
    path = str(tmp_path / "m.qcow2")
    result = run(image_module, capsys, path=path, size="1M", mode="u=rwz")
    assert path in result["msg"]


def test_new_file_never_wider_than_its_final_mode(tmp_path, capsys, monkeypatch):
    modes = []
    real_open = os.open

    def spy(name, flags, mode=0o777, *rest):
        if flags & os.O_CREAT:
            modes.append(mode)
        return real_open(name, flags, mode, *rest)
    monkeypatch.setattr(os, "open", spy)
    path = str(tmp_path / "private.qcow2")
    result = run(image_module, capsys, path=path, size="1M", mode="u=rw,g=,o=")
    assert result["changed"] is True
    assert modes and all(m & 0o077 == 0 for m in modes), [oct(m) for m in modes]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_forced_recreate_diff_shows_destruction_and_keeps_a_backup(tmp_path, capsys):
    path = str(tmp_path / "data.qcow2")
    api.create(path, {"size": 4 << 20})
    _guest_write(path)
    old = digest(path)
    args = dict(path=path, size="4M", cluster_size="2M", force=True, backup=True,
                _ansible_diff=True)
    predicted, done = both(capsys, **args)
    assert_same_outcome(predicted, done)
    for result in (predicted, done):
        diff = result["diff"]
        assert diff["before"]["content"] == "guest data"
        assert "destroyed" in diff["after"]["content"]
        assert diff["before_header"] == path and diff["after_header"] == path
        assert "virtual_size" in diff["before"] and "size" not in diff["before"]
    assert "backup_file" not in predicted
    assert digest(done["backup_file"]) == old
    assert done["image"]["cluster_size"] == 2 << 20


def _guest_write(path):
    """Map cluster 0 of an off image to a new host cluster holding data, as a guest write
    would (through the engine's own model of the image)."""
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.edit import resize
    resize.fill(path, "metadata")
    state = api.observe(path)
    assert state["preallocation"] == "metadata"
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.read.image import Image
    with Image.open(path) as img:
        l2 = img.read_l2(img.l1_entry(0) & 0x00FFFFFFFFFFFE00)
        host = int.from_bytes(l2[:8], "big") & 0x00FFFFFFFFFFFE00
    with open(path, "r+b") as handle:
        handle.seek(host)
        handle.write(b"\xab" * 4096)
    assert api.observe(path)["guest_data"] is True


def test_force_on_a_file_that_is_not_qcow2_says_replace(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text(u"precious\n")
    result = run(image_module, capsys, path=str(path), size="1M", force=True,
                 _ansible_check_mode=True)
    assert result["actions"][0].startswith("replace the file with a new image")
    assert "left alone" not in result["actions"][0]
    assert "not a qcow2 image (not a qcow2 image" not in result["actions"][0]


def test_impossible_declaration_is_an_error_not_a_conflict(tmp_path, capsys):
    path = str(tmp_path / "x.qcow2")
    api.create(path, {"size": 4 << 20, "cluster_size": 16384})
    before = digest(path)
    for force in (False, True):
        result = run(image_module, capsys, path=path, size="4M", extended_l2=True,
                     cluster_size="4K", force=force)
        assert result["failed"] is True
        assert result["msg"].startswith("extended_l2:"), result["msg"]
        assert "force=true" not in result["msg"]
        assert digest(path) == before


def test_backing_fmt_is_validated(tmp_path, capsys):
    api.create(str(tmp_path / "base.qcow2"), {"size": 1 << 20})
    for size in ("1M", None):
        args = dict(path=str(tmp_path / "ov.qcow2"), backing_file="base.qcow2",
                    backing_fmt="vmdkx")
        if size:
            args["size"] = size
        predicted, done = both(capsys, **args)
        assert_same_outcome(predicted, done)
        assert done["failed"] is True and done["msg"].startswith("backing_fmt:"), done["msg"]
        assert done["option"] == "backing_fmt"
    assert not (tmp_path / "ov.qcow2").exists()


def test_same_backing_file_spelled_differently_is_kept(tmp_path, capsys):
    api.create(str(tmp_path / "base.qcow2"), {"size": 1 << 20})
    path = str(tmp_path / "ov.qcow2")
    api.create(path, {"backing_file": "base.qcow2", "backing_fmt": "qcow2"})
    before = digest(path)
    predicted, done = both(capsys, path=path, backing_file=str(tmp_path / "base.qcow2"),
                           backing_fmt="qcow2")
    assert_same_outcome(predicted, done)
    assert done["changed"] is False and not done.get("failed"), done
    assert done["image"]["backing_file"] == "base.qcow2"
    assert digest(path) == before
    other = run(image_module, capsys, path=path, backing_file=str(tmp_path / "other.qcow2"),
                backing_fmt="qcow2")
    assert other["failed"] is True and "backing_file is base.qcow2" in other["msg"]


def test_absent_refuses_a_file_that_is_not_qcow2(tmp_path, capsys):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x00" * 4096 + b"MBR")
    predicted, done = both(capsys, path=str(path), state="absent")
    assert_same_outcome(predicted, done)
    assert done["failed"] is True and "not a qcow2 image" in done["msg"]
    assert path.exists()
    forced = run(image_module, capsys, path=str(path), state="absent", force=True)
    assert forced["changed"] is True and not path.exists()


def test_relative_path_is_refused(capsys):
    result = run(image_module, capsys, path="relative.qcow2", size="1M")
    assert result["failed"] is True and "relative" in result["msg"]
    assert result["path"] == "relative.qcow2"
    assert not os.path.exists("relative.qcow2")


def test_traps_get_a_message_that_says_what_to_do(tmp_path, capsys):
    path = str(tmp_path / "t.qcow2")
    result = run(image_module, capsys, path=path, size="1M", compat=0.1)
    assert result["failed"] is True and "quote it" in result["msg"]
    result = run(image_module, capsys, path=path, size=1.5)
    assert result["failed"] is True and result["option"] == "size"
    assert "1.5G" in result["msg"]
    result = run(image_module, capsys, path=path, size="1M", cluster_size="4M")
    assert result["failed"] is True and "out of range" in result["msg"]
    assert "not a power of two" not in result["msg"]
    assert not os.path.exists(path)


def test_shrink_in_place_is_predicted(tmp_path, capsys):
    path = str(tmp_path / "s.qcow2")
    api.create(path, {"size": 8 << 20})
    predicted, done = both(capsys, path=path, size="4M")
    assert_same_outcome(predicted, done)
    assert done["changed"] is True and done["actions"][0].startswith("shrink the virtual size")
    assert done["image"]["virtual_size"] == 4 << 20
    again = run(image_module, capsys, path=path, size="4M")
    assert again["changed"] is False


def test_follow(tmp_path, capsys):
    target = str(tmp_path / "real.qcow2")
    api.create(target, {"size": 1 << 20})
    link = tmp_path / "link.qcow2"
    link.symlink_to(target)
    info = run(info_module, capsys, path=str(link))
    assert info["islink"] is True and info["image"] == {}
    info = run(info_module, capsys, path=str(link), follow=True)
    assert info["image"]["virtual_size"] == 1 << 20
    refused = run(image_module, capsys, path=str(link), size="2M")
    assert refused["failed"] is True and "follow=true" in refused["msg"]
    grown = run(image_module, capsys, path=str(link), size="2M", follow=True)
    assert grown["changed"] is True and os.path.islink(str(link))
    assert api.observe(target)["virtual_size"] == 2 << 20
