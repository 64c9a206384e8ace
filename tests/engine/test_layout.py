# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The engine's layout: subpackages by job, import arrows pointing down only, and a re-check
(an existing image found as declared) that never loads the code of creating, editing or
copying."""

import ast
import json
import os
import struct
import subprocess
import sys

import pytest

from qcow2 import api

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_UTILS = os.path.normpath(os.path.join(HERE, os.pardir, os.pardir, "plugins",
                                             "module_utils"))
ENGINE = os.path.join(MODULE_UTILS, "qcow2")

# A subpackage may import its own modules and those of a lower rank; subpackages of the same
# rank (read and crypto; edit and copy) never import each other. The top (api, reconcile) is
# the door the modules use.
RANK = {"format": 0, "read": 1, "crypto": 1, "create": 2, "edit": 3, "copy": 3, "": 4}
LAZY = ("create", "edit", "copy", "crypto")


def _engine_modules():
    """{dotted name below qcow2: path} of every engine module."""
    found = {}
    for dirpath, _dirs, files in os.walk(ENGINE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), ENGINE)[:-3]
                found[rel.replace(os.sep, ".")] = os.path.join(dirpath, name)
    return found


def _imports(name, path):
    """(imported engine module, line) for every import in the file, those inside functions
    too (the ones AnsiballZ's finder also sees)."""
    modules = _engine_modules()
    package = name.split(".")[:-1]
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith(("qcow2", "ansible")), \
                    "%s:%d imports %s absolutely" % (path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                assert not (node.module or "").startswith(("qcow2", "ansible")), \
                    "%s:%d imports %s absolutely" % (path, node.lineno, node.module)
                continue
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            assert node.level - 1 <= len(package), \
                "%s:%d: import above qcow2" % (path, node.lineno)
            target = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                whole = ".".join(target + [alias.name])
                out.append((whole if whole in modules else ".".join(target), node.lineno))
    return out


def _package(module):
    return module.split(".")[0] if "." in module else ""


def test_every_module_sits_in_a_known_subpackage():
    for name in _engine_modules():
        assert _package(name) in RANK, name
        assert name.count(".") <= 1, name


def test_import_arrows_point_down_and_have_no_cycles():
    modules = _engine_modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for target, line in _imports(name, path):
            assert target in modules, "%s:%d imports %s, no engine module" % (path, line, target)
            src, dst = _package(name), _package(target)
            if src != dst:
                assert RANK[dst] < RANK[src], "%s:%d: %s imports %s (an arrow up or sideways)" \
                    % (path, line, name, target)
            if target != name:
                graph[name].add(target)
    # Depth-first search for a cycle among modules (lazy imports count too).
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: %s" % " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


RECHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
path, declared = sys.argv[2], json.loads(sys.argv[3])
# What the image module does on a run (Runner.decide), in its order.
from qcow2 import api, reconcile
from qcow2.read import nodes
from qcow2.format.errors import Qcow2Error
reconcile.regenerate_policy(None, False)
api.validate_declaration(declared)
size = reconcile.normalise(declared).get("size")
observed = api.observe(path, size=size)
decision = reconcile.decide(declared, observed, state="present")
view = api.public_view(observed)
api.add_leftover_cleanup(path, decision)
api.preflight(path, decision, expected=observed["identity"])
print(json.dumps({"actions": decision.texts(), "conflicts": decision.conflicts,
                  "preallocation": view["preallocation"],
                  "modules": sorted(m for m in sys.modules if m.startswith("qcow2"))}))
"""


def _declaration(**values):
    declared = dict.fromkeys((
        "size", "preallocation", "cluster_size", "compat", "refcount_bits", "lazy_refcounts",
        "extended_l2", "compression_type", "backing_file", "backing_fmt", "data_file",
        "data_file_raw", "nocow", "source", "source_format", "source_backing_chain"))
    declared.update(values)
    return declared


@pytest.mark.parametrize("preallocation", ["off", "metadata"])
def test_recheck_loads_no_create_edit_or_copy_code(tmp_path, preallocation):
    path = str(tmp_path / "disk.qcow2")
    declared = _declaration(size="1G", preallocation=preallocation, cluster_size="64K")
    api.create(path, dict((k, v) for k, v in declared.items() if v is not None))
    out = subprocess.run([sys.executable, "-B", "-c", RECHECK, MODULE_UTILS, path,
                          json.dumps(declared)], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["actions"] == [] and seen["conflicts"] == []
    assert seen["preallocation"] == preallocation
    loaded = [m for m in seen["modules"] if m.split(".")[1:2] and m.split(".")[1] in LAZY]
    assert loaded == [], "a re-check imported %s" % ", ".join(loaded)
    assert "qcow2.read.allocation" in seen["modules"]   # the image was really observed


# ---------------------------------------------------------------------------------------------
# The cheaper observation: L2 tables that follow each other are read and compared in batches,
# and what is reported stays exact.


def _guest_runs(path, batch_bytes, monkeypatch):
    from qcow2.read import mapping
    from qcow2.read.image import Image
    monkeypatch.setattr(mapping, "L2_BATCH_BYTES", batch_bytes)
    with Image.open(path) as img:
        return list(mapping.guest_runs(img, img.virtual_size))


@pytest.mark.parametrize("damage", [None, "zeroed", "flag", "last"])
def test_batched_l2_walk_sees_every_entry(tmp_path, monkeypatch, damage):
    from qcow2.read import inspector
    from qcow2.read.image import Image
    path = str(tmp_path / "m.qcow2")
    # 64 KiB clusters: one L2 table maps 512 MiB; 5 GiB + 64 KiB leaves a partial last table.
    api.create(path, {"size": (5 << 30) + (64 << 10), "preallocation": "metadata",
                      "cluster_size": "64K"})
    with Image.open(path) as img:
        l1 = img.header.l1_table_offset
        l2 = [struct.unpack(">Q", img.read(l1 + 8 * i, 8))[0] & ((1 << 56) - 512)
              for i in range(img.header.l1_size)]
    assert all(b - a == 65536 for a, b in zip(l2, l2[1:]))     # one contiguous run
    where = {"zeroed": l2[6] + 8 * 4097, "flag": l2[3] + 8 * 12, "last": l2[9] + 8 * 8191}
    if damage:
        with open(path, "r+b") as handle:
            handle.seek(where[damage])
            entry = struct.unpack(">Q", handle.read(8))[0]
            handle.seek(where[damage])
            # zeroed: unallocated (a discard); flag: the zero flag (still mapped); last: the
            # last entry of a whole table unallocated.
            handle.write(struct.pack(">Q", entry | 1 if damage == "flag" else 0))
    one_by_one = _guest_runs(path, 1, monkeypatch)
    batched = _guest_runs(path, 256 << 10, monkeypatch)
    assert _merged(batched) == _merged(one_by_one)
    state = inspector.allocation_state(path)
    total = ((5 << 30) + (64 << 10)) // 65536
    missing = 1 if damage in ("zeroed", "last") else 0
    assert state["mapped_clusters"] == total - missing
    assert state["preallocation"] == ("off" if missing else "metadata")


def _merged(runs):
    """Runs with consecutive host clusters and the same type joined (the batched walk yields
    one run per table where the table-by-table walk may split differently)."""
    out = []
    for idx, n, entry, bitmap in runs:
        if out:
            pidx, pn, pentry, pbm = out[-1]
            step = 65536 if pentry & ((1 << 56) - 512) else 0
            if pidx + pn == idx and pbm == bitmap and entry == pentry + pn * step:
                out[-1] = (pidx, pn + n, pentry, pbm)
                continue
        out.append((idx, n, entry, bitmap))
    return out
