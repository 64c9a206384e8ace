# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Untrusted templates (issue 16): image refuses a qcow2 source with a backing file unless
source_backing_chain=true, in check mode and for real, creating nothing; image_info reports
unsafe_reasons."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

import pytest

from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
from ansible_collections.vdisk.qcow2.plugins.modules import image as image_module
from ansible_collections.vdisk.qcow2.plugins.modules import image_info as info_module
from ansible_collections.vdisk.qcow2.tests.unit.plugins.modules import module_runs

PATTERN = b"HOST-SECRET-BYTES!" * 4


run = module_runs.run


@pytest.fixture
def chains(tmp_path):
    """A secret host file and templates leading to it: absolute, relative, two links."""
    host = tmp_path / "host"
    tpl = tmp_path / "tpl" / "x"
    out = tmp_path / "out"
    for d in (host, tpl, out):
        d.mkdir(parents=True)
    secret = str(host / "secret.raw")
    with open(secret, "wb") as handle:
        handle.write(PATTERN * (1 << 14))
    size = os.path.getsize(secret)
    absolute = str(tpl / "absolute.qcow2")
    api.create(absolute, {"size": size, "backing_file": secret, "backing_fmt": "raw"})
    relative = str(tpl / "relative.qcow2")
    api.create(relative, {"size": size, "backing_file": "../../host/secret.raw",
                          "backing_fmt": "raw"})
    middle = str(tpl / "middle.qcow2")
    api.create(middle, {"size": size, "backing_file": secret, "backing_fmt": "raw"})
    top = str(tpl / "two-link.qcow2")
    api.create(top, {"size": size, "backing_file": "middle.qcow2", "backing_fmt": "qcow2"})
    return {"out": str(out), "secret": secret, "cases": [
        (absolute, secret), (relative, "../../host/secret.raw"), (top, "middle.qcow2")]}


def test_default_refuses_in_check_mode_and_for_real(chains, capsys):
    for template, name in chains["cases"]:
        args = dict(path=os.path.join(chains["out"], "new.qcow2"), source=template,
                    source_format="qcow2")
        predicted = run(image_module, capsys, _ansible_check_mode=True, **args)
        done = run(image_module, capsys, **args)
        for result in (predicted, done):
            assert result["failed"] is True and result["changed"] is False, result
            assert result["option"] == "source", result
            assert repr(name) in result["msg"] and "source_backing_chain=true" in result["msg"]
            assert result["actions"] == []
        assert predicted["msg"] == done["msg"]
        assert os.listdir(chains["out"]) == []


def test_opt_in_flattens_the_chain(chains, capsys):
    for k, (template, _name) in enumerate(chains["cases"]):
        path = os.path.join(chains["out"], "new%d.qcow2" % k)
        args = dict(path=path, source=template, source_format="qcow2",
                    source_backing_chain=True)
        predicted = run(image_module, capsys, _ansible_check_mode=True, **args)
        assert predicted["changed"] is True and not predicted.get("failed"), predicted
        assert not os.path.exists(path)
        done = run(image_module, capsys, **args)
        assert done["changed"] is True and not done.get("failed"), done
        assert done["actions"] == predicted["actions"]
        with api.open_source(path, "qcow2") as src:
            assert src.read(0, len(PATTERN)) == PATTERN
        again = run(image_module, capsys, **args)
        assert again["changed"] is False, again


def test_raw_and_self_contained_sources_need_no_opt_in(tmp_path, capsys):
    raw = str(tmp_path / "t.raw")
    with open(raw, "wb") as handle:
        handle.write(b"x" * 65536)
    alone = str(tmp_path / "alone.qcow2")
    api.create(alone, {"size": "1M"})
    for k, (src, fmt) in enumerate(((raw, "raw"), (alone, "qcow2"))):
        done = run(image_module, capsys, path=str(tmp_path / ("n%d.qcow2" % k)), source=src,
                   source_format=fmt)
        assert done["changed"] is True and not done.get("failed"), done


def test_option_is_documented():
    import yaml
    doc = yaml.safe_load(image_module.DOCUMENTATION)
    option = doc["options"]["source_backing_chain"]
    assert option["type"] == "bool" and option["default"] is False
    assert any("any file" in line for line in option["description"])
    ret = yaml.safe_load(info_module.RETURN)
    assert ret["image"]["contains"]["unsafe_reasons"]["elements"] == "str"


def test_image_info_unsafe_reasons(chains, tmp_path, capsys):
    template, name = chains["cases"][1]
    result = run(info_module, capsys, path=template)
    assert len(result["image"]["unsafe_reasons"]) == 1, result
    assert repr(name) in result["image"]["unsafe_reasons"][0]
    clean = str(tmp_path / "clean.qcow2")
    api.create(clean, {"size": "1M"})
    assert run(info_module, capsys, path=clean, check=True)["image"]["unsafe_reasons"] == []
    assert run(info_module, capsys, path=chains["secret"])["image"]["unsafe_reasons"] == []
    fake = str(tmp_path / "fake.raw")
    with open(fake, "wb") as handle:
        handle.write(b"KDMV" + bytes(65532))
    found = run(info_module, capsys, path=fake)["image"]["unsafe_reasons"]
    assert len(found) == 1 and "VMDK" in found[0], found
    big = str(tmp_path / "big.qcow2")
    api.create(big, {"size": "2G"})
    found = run(info_module, capsys, path=big, max_size="1G")["image"]["unsafe_reasons"]
    assert len(found) == 1 and "virtual size" in found[0], found
    assert run(info_module, capsys, path=big)["image"]["unsafe_reasons"] == []
    bad = run(info_module, capsys, path=big, max_size="lots")
    assert bad["failed"] is True and "max_size" in bad["msg"]
