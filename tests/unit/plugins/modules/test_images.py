# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""vdisk.qcow2.images: a list converged in one run, in order; check mode predicts what the
real run then does, item by item (also an overlay of a base the list creates first); a failing
item fails the task while the others are converged and its dependents skipped."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import json
import os
import stat

import pytest

from ansible.module_utils.testing import patch_module_args

from ansible_collections.vdisk.qcow2.plugins.modules import image as image_module
from ansible_collections.vdisk.qcow2.plugins.modules import images as images_module
from ansible_collections.vdisk.qcow2.plugins.module_utils.image_list import SUMMARY_KEYS
from ansible_collections.vdisk.qcow2.tests.unit.plugins.modules import module_runs


def run(capsys, module=images_module, **args):
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            module.main()
    return json.loads(capsys.readouterr().out)


def listing(directory):
    return sorted(os.listdir(str(directory)))


def outline(result):
    """What check mode must predict of each item: changed, actions, failed, skipped."""
    return [(r["changed"], r["actions"], r["failed"], r["skipped"]) for r in result["results"]]


warnings_of = module_runs.warnings_of


def check_then_real(capsys, tmp_path, **args):
    """Check mode, then the real run on the same state: both results. Check mode writes
    nothing."""
    before = listing(tmp_path)
    predicted = run(capsys, _ansible_check_mode=True, _ansible_diff=True, **args)
    assert listing(tmp_path) == before
    done = run(capsys, _ansible_diff=True, **args)
    assert outline(predicted) == outline(done)
    assert predicted["changed"] == done["changed"]
    assert predicted.get("failed", False) == done.get("failed", False)
    return predicted, done


def test_list_converged_in_order_then_unchanged(tmp_path, capsys):
    paths = [str(tmp_path / name) for name in ("a.qcow2", "b.qcow2", "c.qcow2")]
    images = [{"path": paths[0], "size": "16M"},
              {"path": paths[1], "size": "16M", "preallocation": "metadata",
               "cluster_size": "4K"},
              {"path": paths[2], "size": "8M", "mode": "0600"}]
    predicted, done = check_then_real(capsys, tmp_path, images=images)
    assert done["changed"] is True
    assert [r["path"] for r in done["results"]] == paths
    assert [r["changed"] for r in done["results"]] == [True, True, True]
    assert done["results"][1]["image"]["cluster_size"] == 4096
    assert done["results"][1]["image"]["preallocation"] == "metadata"
    assert stat.S_IMODE(os.stat(paths[2]).st_mode) == 0o600
    assert done["results"][2]["mode"] == "0600"
    # The diff is per item and the top-level list, like the items of a loop.
    assert len(done["diff"]) == 3
    assert [d["after_header"] for d in done["diff"]] == paths
    assert done["results"][0]["diff"] == done["diff"][0]
    assert predicted["diff"] == done["diff"]
    again = run(capsys, images=images)
    assert again["changed"] is False
    assert [r["changed"] for r in again["results"]] == [False, False, False]
    assert [r["actions"] for r in again["results"]] == [[], [], []]


def test_items_match_what_image_returns(tmp_path, capsys):
    one = str(tmp_path / "one.qcow2")
    two = str(tmp_path / "two.qcow2")
    alone = run(capsys, module=image_module, path=one, size="4M", preallocation="falloc")
    listed = run(capsys, images=[{"path": two, "size": "4M", "preallocation": "falloc"}])
    item = listed["results"][0]
    expected = set(alone) - {"invocation"}
    assert expected <= set(item)
    assert item["actions"] == [a.replace(one, two) for a in alone["actions"]]
    assert item["method"] == alone["method"]


def test_changed_is_any_item(tmp_path, capsys):
    a = str(tmp_path / "a.qcow2")
    b = str(tmp_path / "b.qcow2")
    run(capsys, images=[{"path": a, "size": "4M"}])
    result = run(capsys, images=[{"path": a, "size": "4M"}, {"path": b, "size": "4M"}],
                 _ansible_diff=True)
    assert result["changed"] is True
    assert [r["changed"] for r in result["results"]] == [False, True]
    # The top-level diff lists the changed items' diffs, as the callback shows a loop's.
    assert result["diff"] == [result["results"][1]["diff"]]
    assert result["results"][0]["diff"]["before"] == result["results"][0]["diff"]["after"]


def test_overlay_after_its_base_predicted_in_check_mode(tmp_path, capsys):
    base = str(tmp_path / "base.qcow2")
    vm = str(tmp_path / "vm.qcow2")
    snap = str(tmp_path / "snap.qcow2")
    images = [{"path": base, "size": "16M"},
              {"path": vm, "backing_file": "base.qcow2", "backing_fmt": "qcow2"},
              {"path": snap, "backing_file": str(tmp_path / "." / "vm.qcow2"),
               "backing_fmt": "qcow2", "size": "32M"}]
    predicted, done = check_then_real(capsys, tmp_path, defaults={"mode": "0640"},
                                      images=images)
    assert "failed" not in done
    assert [r["changed"] for r in done["results"]] == [True, True, True]
    # The overlay's size comes from its base, in check mode from the base's declaration.
    assert predicted["diff"][1]["after"]["virtual_size"] == 16 << 20
    assert predicted["diff"] == done["diff"]
    assert done["results"][1]["image"]["backing_file"] == "base.qcow2"
    assert done["results"][1]["image"]["virtual_size"] == 16 << 20
    assert done["results"][2]["image"]["virtual_size"] == 32 << 20
    again = run(capsys, defaults={"mode": "0640"}, images=images)
    assert again["changed"] is False


def test_overlay_of_a_base_removed_earlier_fails_in_check_mode_too(tmp_path, capsys):
    base = str(tmp_path / "base.qcow2")
    run(capsys, images=[{"path": base, "size": "4M"}])
    images = [{"path": base, "state": "absent"},
              {"path": str(tmp_path / "vm.qcow2"), "backing_file": "base.qcow2",
               "backing_fmt": "qcow2"}]
    predicted, done = check_then_real(capsys, tmp_path, images=images)
    assert done["failed"] is True
    assert [r["failed"] for r in done["results"]] == [False, True]
    assert "does not exist" in predicted["results"][1]["msg"]
    assert predicted["results"][1]["msg"] == done["results"][1]["msg"]


def test_copy_of_an_image_made_earlier_predicted_in_check_mode(tmp_path, capsys):
    tpl = str(tmp_path / "tpl.qcow2")
    vm = str(tmp_path / "vm.qcow2")
    big = str(tmp_path / "big.qcow2")
    images = [{"path": tpl, "size": "16M"},
              {"path": vm, "source": tpl, "source_format": "qcow2"},
              {"path": big, "source": tpl, "source_format": "qcow2", "size": "32M",
               "preallocation": "metadata"}]
    predicted, done = check_then_real(capsys, tmp_path, images=images)
    assert "failed" not in done
    assert [r["changed"] for r in done["results"]] == [True, True, True]
    assert predicted["diff"] == done["diff"]
    assert predicted["diff"][1]["after"]["virtual_size"] == 16 << 20
    assert done["results"][1]["image"]["virtual_size"] == 16 << 20
    assert done["results"][2]["image"]["virtual_size"] == 32 << 20
    assert run(capsys, images=images)["changed"] is False


def test_copy_of_an_image_made_earlier_refused_alike(tmp_path, capsys):
    """What a real run refuses of a source made earlier in the list, check mode refuses too,
    with the same words: a backing file without source_backing_chain, a smaller size."""
    base = str(tmp_path / "base.qcow2")
    overlay = str(tmp_path / "overlay.qcow2")
    images = [{"path": base, "size": "8M"},
              {"path": overlay, "backing_file": "base.qcow2", "backing_fmt": "qcow2"},
              {"path": str(tmp_path / "flat.qcow2"), "source": overlay,
               "source_format": "qcow2"},
              {"path": str(tmp_path / "small.qcow2"), "source": base,
               "source_format": "qcow2", "size": "4M"}]
    predicted, done = check_then_real(capsys, tmp_path, images=images)
    assert [r["failed"] for r in done["results"]] == [False, False, True, True]
    for index in (2, 3):
        assert predicted["results"][index]["msg"] == done["results"][index]["msg"]
    assert "source_backing_chain=true" in done["results"][2]["msg"]
    assert "smaller than the source" in done["results"][3]["msg"]


def test_overlay_before_its_base_fails_in_both(tmp_path, capsys):
    images = [{"path": str(tmp_path / "early.qcow2"), "backing_file": "late.qcow2",
               "backing_fmt": "qcow2"},
              {"path": str(tmp_path / "late.qcow2"), "size": "1M"}]
    predicted, done = check_then_real(capsys, tmp_path, images=images)
    assert [r["failed"] for r in done["results"]] == [True, False]
    assert done["results"][1]["changed"] is True
    assert "late.qcow2" in done["msg"] and done["msg"].startswith("images[0] (")


def test_failing_item_others_converged_dependents_skipped(tmp_path, capsys):
    bad = str(tmp_path / "bad.qcow2")
    run(capsys, images=[{"path": bad, "size": "4M"}])
    images = [{"path": bad, "size": "4M", "cluster_size": "2M"},       # a conflict
              {"path": str(tmp_path / "vm.qcow2"), "backing_file": "bad.qcow2",
               "backing_fmt": "qcow2"},                                 # made from it
              {"path": str(tmp_path / "snap.qcow2"), "backing_file": "vm.qcow2",
               "backing_fmt": "qcow2"},                                 # made from that
              {"path": str(tmp_path / "copy.qcow2"), "source": bad,
               "source_format": "qcow2"},                               # copied from it
              {"path": str(tmp_path / "fine.qcow2"), "size": "4M"}]
    predicted, done = check_then_real(capsys, tmp_path, images=images)
    assert done["failed"] is True
    assert done["changed"] is True
    assert [r["failed"] for r in done["results"]] == [True, False, False, False, False]
    assert [r["skipped"] for r in done["results"]] == [False, True, True, True, False]
    assert [r["changed"] for r in done["results"]] == [False, False, False, False, True]
    assert "cluster_size is 65536, declared 2097152" in " ".join(done["results"][0]["conflicts"])
    assert done["results"][1]["skip_reason"].startswith("backing_file bad.qcow2 is images[0] (")
    assert "images[1] (" in done["results"][2]["skip_reason"]
    assert done["results"][3]["skip_reason"].startswith("source %s is images[0]" % bad)
    assert done["msg"].startswith("images[0] (%s): " % bad)
    assert "images[1] (%s): " % images[1]["path"] in done["msg"]
    assert os.path.exists(images[4]["path"])
    assert not os.path.exists(images[1]["path"]) and not os.path.exists(images[3]["path"])
    assert predicted["msg"] == done["msg"]
    # The summary (the role's qcow2_images_results): declared path and state, then the outcome.
    summary = done["summary"]
    assert [e["path"] for e in summary] == [i["path"] for i in images]
    assert [e["state"] for e in summary] == ["present"] * 5
    for entry, result in zip(summary, done["results"]):
        assert set(entry) - {"path", "state"} == set(result) & set(SUMMARY_KEYS)
        assert all(entry[k] == result[k] for k in set(entry) - {"path", "state"})
    assert "owner" not in summary[4] and "owner" in done["results"][4]


def test_null_drops_a_default_and_false_is_kept(tmp_path, capsys):
    a = str(tmp_path / "a.qcow2")
    b = str(tmp_path / "b.qcow2")
    c = str(tmp_path / "c.qcow2")
    defaults = {"mode": "0600", "preallocation": "metadata", "cluster_size": "4K",
                "lazy_refcounts": True}
    images = [{"path": a, "size": "4M"},
              {"path": b, "size": "4M", "mode": None, "preallocation": None,
               "cluster_size": None},
              {"path": c, "size": "4M", "lazy_refcounts": False}]
    _predicted, done = check_then_real(capsys, tmp_path, defaults=defaults, images=images)
    first, second, third = done["results"]
    assert first["image"]["preallocation"] == "metadata"
    assert first["image"]["cluster_size"] == 4096
    assert first["image"]["lazy_refcounts"] is True
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    assert second["image"]["preallocation"] == "off"
    assert second["image"]["cluster_size"] == 65536
    assert stat.S_IMODE(os.stat(b).st_mode) != 0o600
    assert third["image"]["lazy_refcounts"] is False


def test_invalid_item_names_item_and_parameter(tmp_path, capsys):
    good = str(tmp_path / "good.qcow2")
    images = [{"path": str(tmp_path / "x.qcow2"), "size": "1M", "state": "gone"},
              {"path": good, "size": "1M"},
              {"path": str(tmp_path / "y.qcow2"), "sizee": "1M"},
              {"path": str(tmp_path / "z.qcow2"), "backing_file": "x.qcow2"},
              {"size": "1M"}]
    predicted, done = check_then_real(capsys, tmp_path, images=images)
    assert done["failed"] is True
    assert [r["failed"] for r in done["results"]] == [True, False, True, True, True]
    assert "state" in done["results"][0]["msg"] and "gone" in done["results"][0]["msg"]
    assert "images[0] (%s): value of state must be one of" % images[0]["path"] in done["msg"]
    assert "images[2] (%s): unsupported parameter: sizee" % images[2]["path"] in done["msg"]
    assert "images[3] (%s): parameters are required together: backing_file, backing_fmt" \
        % images[3]["path"] in done["msg"]
    assert "images[4]: missing required arguments: path" in done["msg"]
    assert os.path.exists(good) and done["results"][1]["changed"] is True
    assert not os.path.exists(images[0]["path"])


def test_engine_refusal_names_item_and_option(tmp_path, capsys):
    path = str(tmp_path / "g.qcow2")
    result = run(capsys, images=[{"path": path, "size": "12 parsecs"}])
    assert result["failed"] is True
    assert result["results"][0]["option"] == "size"
    assert result["msg"].startswith("images[0] (%s): size:" % path)


def test_path_in_defaults_refused(tmp_path, capsys):
    result = run(capsys, defaults={"path": str(tmp_path / "x")},
                 images=[{"path": str(tmp_path / "a.qcow2"), "size": "1M"}])
    assert result["failed"] is True and "defaults" in result["msg"]
    assert listing(tmp_path) == []


def test_regenerate_backup_force_follow_per_item(tmp_path, capsys):
    a = str(tmp_path / "a.qcow2")
    b = str(tmp_path / "b.qcow2")
    link = tmp_path / "link.qcow2"
    run(capsys, images=[{"path": a, "size": "4M"}, {"path": b, "size": "4M"}])
    link.symlink_to("b.qcow2")
    images = [{"path": a, "size": "4M", "regenerate": "always", "backup": True},
              {"path": str(link), "size": "8M", "follow": True},
              {"path": b, "size": "8M", "cluster_size": "2M", "force": True}]
    predicted, done = check_then_real(capsys, tmp_path, images=images)
    assert "backup_file" not in predicted["results"][0]
    assert os.path.exists(done["results"][0]["backup_file"])
    assert done["results"][1]["image"]["virtual_size"] == 8 << 20
    assert done["results"][1]["path"] == str(link)
    assert done["results"][1]["state"] == "file"
    assert done["results"][2]["image"]["cluster_size"] == 2 << 20
    # Without follow the link is refused, for that item alone.
    refused = run(capsys, images=[{"path": str(link), "size": "8M"},
                                  {"path": str(tmp_path / "c.qcow2"), "size": "1M"}])
    assert "symbolic link" in refused["results"][0]["msg"]
    assert refused["results"][1]["changed"] is True


def test_warnings_name_the_item(tmp_path, capsys):
    raw = tmp_path / "template.raw"
    run(capsys, module=image_module, path=str(raw), size="1M")   # a qcow2 file, named raw
    result = run(capsys, images=[{"path": str(tmp_path / "d.qcow2"), "source": str(raw),
                                  "source_format": "raw"}])
    assert any(w.startswith("images[0] (") and "qcow2 header" in w
               for w in warnings_of(result)), result
