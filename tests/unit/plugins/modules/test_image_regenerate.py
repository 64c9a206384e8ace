# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Re-provisioning (regenerate) and the diff: check mode and the real run, on the same state,
report the same `changed`, `actions` and `diff`; only the real run writes (and keeps a
backup); a second real run converges, except with regenerate=always."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import fcntl
import hashlib
import json
import os

import pytest

from ansible.module_utils.testing import patch_module_args

from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.read import lock
from ansible_collections.vdisk.qcow2.plugins.modules import image as image_module

PATTERN = b"\x5a" * 65536


def run(capsys, **args):
    with patch_module_args(dict(args, _ansible_diff=True)):
        with pytest.raises(SystemExit):
            image_module.main()
    return json.loads(capsys.readouterr().out)


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def tree_digest(directory):
    return sorted((name, digest(os.path.join(directory, name)))
                  for name in os.listdir(directory))


def check_then_real(capsys, directory, **args):
    """Check mode (which must change nothing in `directory`), then the real run."""
    before = tree_digest(directory)
    predicted = run(capsys, _ansible_check_mode=True, **args)
    assert tree_digest(directory) == before, "check mode wrote"
    done = run(capsys, **args)
    assert bool(predicted.get("failed")) == bool(done.get("failed")), (predicted, done)
    assert predicted["changed"] == done["changed"], (predicted, done)
    if done.get("failed"):
        assert predicted["msg"] == done["msg"]
        return predicted, done
    assert predicted["actions"] == done["actions"], (predicted, done)
    assert predicted["diff"]["before"] == done["diff"]["before"], (predicted, done)
    assert predicted["diff"]["after"] == done["diff"]["after"], (predicted, done)
    assert json.dumps(predicted["diff"], sort_keys=True) == \
        json.dumps(done["diff"], sort_keys=True)
    assert "backup_file" not in predicted
    return predicted, done


def converges(capsys, **args):
    again = run(capsys, **args)
    assert again.get("failed") is None, again
    assert again["changed"] is False and again["actions"] == [], again


def template(directory):
    """A raw template whose first cluster holds data."""
    path = os.path.join(directory, "template.raw")
    with open(path, "wb") as handle:
        handle.write(b"\x11" * 65536)
        handle.truncate(4 << 20)
    return path


def guest_writes(path):
    """The guest writes PATTERN at offset 0 (through the engine's model of the image)."""
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.edit import resize
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.read.image import Image
    if api.observe(path)["preallocation"] == "off":
        resize.fill(path, "metadata")
    with Image.open(path) as img:
        l2 = img.read_l2(img.l1_entry(0) & 0x00FFFFFFFFFFFE00)
        host = int.from_bytes(l2[:8], "big") & 0x00FFFFFFFFFFFE00
    with open(path, "r+b") as handle:
        handle.seek(host)
        handle.write(PATTERN)
    assert api.observe(path)["guest_data"] is True


def holds_pattern(path):
    from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.read.image import Image
    with Image.open(path) as img:
        entry = img.l1_entry(0) & 0x00FFFFFFFFFFFE00
        if not entry:
            return False
        host = int.from_bytes(img.read_l2(entry)[:8], "big") & 0x00FFFFFFFFFFFE00
    if not host:
        return False
    with open(path, "rb") as handle:
        handle.seek(host)
        return handle.read(len(PATTERN)) == PATTERN


def test_new_empty_image(tmp_path, capsys):
    args = dict(path=str(tmp_path / "new.qcow2"), size="1M", preallocation="metadata")
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    assert done["changed"] is True
    assert done["diff"]["before"] == {"state": "absent"}
    assert done["diff"]["after"]["content"] == "a new, empty image"
    assert done["diff"]["after"]["preallocation"] == "metadata"
    assert done["diff"]["after"]["virtual_size"] == 1 << 20
    converges(capsys, **args)


def test_new_image_with_owner_and_mode(tmp_path, capsys):
    args = dict(path=str(tmp_path / "owned.qcow2"), size="1M", owner=str(os.getuid()),
                group=str(os.getgid()), mode="0600")
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    assert done["diff"]["before"] == {"state": "absent"}
    after = done["diff"]["after"]
    assert (after["owner"], after["group"], after["mode"]) == \
        (os.getuid(), os.getgid(), "0600"), after
    converges(capsys, **args)


def test_copy_from_a_template(tmp_path, capsys):
    source = template(str(tmp_path))
    args = dict(path=str(tmp_path / "copy.qcow2"), source=source, source_format="raw")
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    after = done["diff"]["after"]
    assert after["content"] == "a copy of the template %s" % source
    assert after["virtual_size"] == 4 << 20 and after["preallocation"] == "off"
    assert after["cluster_size"] == 65536 and after["compat"] == "1.1"
    converges(capsys, **args)


def test_forced_recreate(tmp_path, capsys):
    path = str(tmp_path / "forced.qcow2")
    api.create(path, {"size": 4 << 20})
    guest_writes(path)
    os.chmod(path, 0o644)
    args = dict(path=path, size="4M", cluster_size="2M", force=True, mode="0600")
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    # The new file replaces one whose mode was 0644: that is what the diff compares with.
    assert done["diff"]["before"]["mode"] == "0644" and done["diff"]["after"]["mode"] == "0600"
    assert done["diff"]["before"]["content"] == "guest data"
    assert done["diff"]["after"]["content"] == \
        "a new, empty image (the old content is destroyed)"
    assert done["diff"]["after"]["cluster_size"] == 2 << 20
    assert "(force), because: cluster_size is 65536" in done["actions"][-1]
    converges(capsys, **args)


def test_forced_recreate_from_a_source(tmp_path, capsys):
    source = template(str(tmp_path))
    path = str(tmp_path / "forced-copy.qcow2")
    api.create(path, {"size": 4 << 20})
    guest_writes(path)
    args = dict(path=path, source=source, source_format="raw", cluster_size="2M", force=True)
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    assert done["diff"]["after"]["content"] == \
        "a copy of the template %s (the old content is destroyed)" % source
    assert done["diff"]["after"]["virtual_size"] == 4 << 20
    assert not holds_pattern(path)
    converges(capsys, **args)


@pytest.mark.parametrize("backup", [False, True])
def test_regenerate_always_recopies_the_template(tmp_path, capsys, backup):
    source = template(str(tmp_path))
    path = str(tmp_path / "disk.qcow2")
    args = dict(path=path, source=source, source_format="raw", preallocation="metadata")
    run(capsys, **args)
    guest_writes(path)
    old = digest(path)
    args.update(regenerate="always", backup=backup)
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    assert done["changed"] is True
    assert len(done["actions"]) == 1, done["actions"]
    assert done["actions"][0].startswith("recreate the image from the declaration, its guest "
                                         "content copied from %s (raw), destroying its content "
                                         "(regenerate=always)" % source)
    assert done["diff"]["before"]["content"] == "guest data"
    assert done["diff"]["after"]["content"] == \
        "a copy of the template %s (the old content is destroyed)" % source
    assert done["diff"]["after"]["preallocation"] == "metadata"
    assert not holds_pattern(path)
    if backup:
        assert digest(done["backup_file"]) == old
        assert holds_pattern(done["backup_file"])
    else:
        assert "backup_file" not in done
        assert sorted(os.listdir(str(tmp_path))) == ["disk.qcow2", "template.raw"]
    # always means every run
    args["backup"] = False
    again = run(capsys, **args)
    assert again["changed"] is True and again["actions"] == done["actions"]
    # and without it, the disk converges
    args.pop("regenerate")
    converges(capsys, **args)


def test_regenerate_always_creates_a_missing_image(tmp_path, capsys):
    args = dict(path=str(tmp_path / "fresh.qcow2"), size="1M", regenerate="always",
                backup=True)
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    assert done["actions"][0].startswith("create the image")
    assert "backup_file" not in done


def test_regenerate_fail_refuses_a_conflict(tmp_path, capsys):
    path = str(tmp_path / "kept.qcow2")
    api.create(path, {"size": 4 << 20})
    old = digest(path)
    args = dict(path=path, size="4M", cluster_size="2M", regenerate="fail", backup=True)
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    assert done["failed"] is True and done["changed"] is False
    assert "regenerate=on_conflict" in done["msg"]
    assert done["conflicts"] == ["cluster_size is 65536, declared 2097152"]
    assert digest(path) == old and os.listdir(str(tmp_path)) == ["kept.qcow2"]


def test_regenerate_fail_contradicts_force(tmp_path, capsys):
    path = str(tmp_path / "both.qcow2")
    result = run(capsys, path=path, size="1M", regenerate="fail", force=True)
    assert result["failed"] is True and "contradict" in result["msg"]
    assert not os.path.exists(path)


def test_regenerate_on_conflict_is_force(tmp_path, capsys):
    path = str(tmp_path / "oc.qcow2")
    api.create(path, {"size": 4 << 20})
    args = dict(path=path, size="4M", regenerate="on_conflict")
    converges(capsys, **args)   # no conflict: nothing to do
    args["cluster_size"] = "2M"
    predicted, done = check_then_real(capsys, str(tmp_path), **args)
    assert "(regenerate=on_conflict), because: cluster_size" in done["actions"][-1]
    converges(capsys, **args)


def test_regenerate_always_never_touches_an_image_in_use(tmp_path, capsys):
    path = str(tmp_path / "running.qcow2")
    api.create(path, {"size": 4 << 20})
    old = digest(path)
    fd = os.open(path, os.O_RDWR)
    try:
        # What a running QEMU holds: the write permission byte.
        fcntl.fcntl(fd, lock.F_OFD_SETLK, lock._flock(lock.F_WRLCK, lock.PERM_BASE + 1))
        args = dict(path=path, size="4M", regenerate="always", backup=True)
        predicted, done = check_then_real(capsys, str(tmp_path), **args)
        assert done["failed"] is True and done["changed"] is False
        assert "in use by a running QEMU" in done["msg"]
    finally:
        os.close(fd)
    assert digest(path) == old and os.listdir(str(tmp_path)) == ["running.qcow2"]
