# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Module logic of vdisk.qcow2.image and image_info, run in-process with patch_module_args."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

from ansible_collections.vdisk.qcow2.plugins.modules import image as image_module
from ansible_collections.vdisk.qcow2.plugins.modules import image_info as info_module
from ansible_collections.vdisk.qcow2.tests.unit.plugins.modules import module_runs


run = module_runs.run


def test_check_mode_predicts_and_creates_nothing(tmp_path, capsys):
    path = str(tmp_path / "a.qcow2")
    result = run(image_module, capsys, path=path, size="64M", _ansible_check_mode=True)
    assert result["changed"] is True
    assert result["actions"][0].startswith("create the image")
    assert not os.path.exists(path)
    assert os.listdir(str(tmp_path)) == []


def test_create_then_unchanged(tmp_path, capsys):
    path = str(tmp_path / "b.qcow2")
    first = run(image_module, capsys, path=path, size="64M", preallocation="metadata")
    assert first["changed"] is True
    assert first["image"]["virtual_size"] == 64 << 20
    assert first["image"]["preallocation"] == "metadata"
    second = run(image_module, capsys, path=path, size=64 << 20, preallocation="metadata")
    assert second["changed"] is False
    assert second["actions"] == []
    lower = run(image_module, capsys, path=path, size="64M", preallocation="off",
                _ansible_check_mode=True)
    assert lower["changed"] is False


def test_conflict_fails_and_names_each_difference(tmp_path, capsys):
    path = str(tmp_path / "c.qcow2")
    run(image_module, capsys, path=path, size="64M")
    before = open(path, "rb").read()
    result = run(image_module, capsys, path=path, size="32M", cluster_size="2M")
    assert result["failed"] is True
    assert "force=true" in result["msg"]
    assert any("cluster_size is 65536, declared 2097152" in c for c in result["conflicts"])
    # The image holds no guest data: the smaller size alone would shrink it in place.
    assert not any("shrinking" in c for c in result["conflicts"])
    assert open(path, "rb").read() == before


def test_force_recreates(tmp_path, capsys):
    path = str(tmp_path / "d.qcow2")
    run(image_module, capsys, path=path, size="64M")
    result = run(image_module, capsys, path=path, size="32M", cluster_size="2M", force=True)
    assert result["changed"] is True
    assert result["image"]["cluster_size"] == 2 << 20
    assert result["image"]["virtual_size"] == 32 << 20


def test_diff_shows_before_and_after(tmp_path, capsys):
    path = str(tmp_path / "e.qcow2")
    run(image_module, capsys, path=path, size="64M")
    result = run(image_module, capsys, path=path, size="128M", _ansible_check_mode=True,
                 _ansible_diff=True)
    assert result["diff"]["before"]["virtual_size"] == 64 << 20
    assert result["diff"]["after"]["virtual_size"] == 128 << 20


def test_symlink_and_relative_data_file_refused(tmp_path, capsys):
    target = tmp_path / "real.qcow2"
    link = tmp_path / "link.qcow2"
    link.symlink_to(target)
    result = run(image_module, capsys, path=str(link), size="1M")
    assert result["failed"] is True and "symbolic link" in result["msg"]
    assert not target.exists()
    result = run(image_module, capsys, path=str(tmp_path / "f.qcow2"), size="1M",
                 data_file="relative.raw")
    assert result["failed"] is True and "absolute" in result["msg"]


def test_bad_size_is_named(tmp_path, capsys):
    result = run(image_module, capsys, path=str(tmp_path / "g.qcow2"), size="12 parsecs")
    assert result["failed"] is True
    assert result["msg"].startswith("size:")
    assert result["option"] == "size"


def test_absent(tmp_path, capsys):
    path = str(tmp_path / "h.qcow2")
    run(image_module, capsys, path=path, size="1M")
    result = run(image_module, capsys, path=path, state="absent")
    assert result["changed"] is True and not os.path.exists(path)
    result = run(image_module, capsys, path=path, state="absent")
    assert result["changed"] is False


def test_image_info(tmp_path, capsys):
    missing = run(info_module, capsys, path=str(tmp_path / "none.qcow2"))
    assert missing["exists"] is False and missing["image"] == {}
    path = str(tmp_path / "i.qcow2")
    run(image_module, capsys, path=path, size="16M", preallocation="falloc")
    info = run(info_module, capsys, path=path, check=True)
    assert info["changed"] is False
    assert info["image"]["preallocation"] in ("falloc", "full")
    assert info["image"]["check"]["corruptions"] == 0
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    info = run(info_module, capsys, path=str(junk))
    assert info["exists"] is True and info["image"]["format"] == "unknown"


def _leak_clusters_at_end(path, count):
    """Do what a run killed mid-grow leaves: clusters counted at the end, linked to nothing."""
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.edit import editor, resize
    with editor.editing(path) as ed:
        start, end, needed, reft = resize._solve_append(ed, count)
        ed.truncate(end * ed.cs)
        resize._count_clusters(ed, start, end, needed, start + count,
                               start + count + len(needed), reft)


def test_leaked_clusters_reclaimed_and_predicted(tmp_path, capsys):
    path = str(tmp_path / "leaky.qcow2")
    run(image_module, capsys, path=path, size="16M", preallocation="metadata")
    size_before = os.path.getsize(path)
    _leak_clusters_at_end(path, 10)
    info = run(info_module, capsys, path=path)
    assert info["image"]["leaked_clusters"] == 10
    predicted = run(image_module, capsys, path=path, size="16M", preallocation="metadata",
                    _ansible_check_mode=True)
    assert predicted["changed"] is True
    assert predicted["actions"] == ["reclaim 10 leaked cluster(s) at the end of the file (left "
                                    "by an interrupted change)"]
    done = run(image_module, capsys, path=path, size="16M", preallocation="metadata")
    assert done["changed"] is True and done["actions"] == predicted["actions"]
    assert done["image"]["leaked_clusters"] == 0
    assert os.path.getsize(path) == size_before
    again = run(image_module, capsys, path=path, size="16M", preallocation="metadata")
    assert again["changed"] is False


def test_failure_after_a_change_reports_changed(tmp_path, capsys, monkeypatch):
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.format.errors import Qcow2Error
    path = str(tmp_path / "half.qcow2")
    run(image_module, capsys, path=path, size="16M")

    def failing_grow(*_args, **_kwargs):
        raise Qcow2Error("no space left for the grown range")
    monkeypatch.setattr(api, "grow", failing_grow)
    result = run(image_module, capsys, path=path, size="32M", preallocation="metadata")
    assert result["failed"] is True
    assert result["changed"] is True
    assert result["actions"] == ["raise preallocation from off to metadata"]
    assert "no space left" in result["msg"] and "changed before the failure" in result["msg"]
    assert result["image"]["preallocation"] == "metadata"
