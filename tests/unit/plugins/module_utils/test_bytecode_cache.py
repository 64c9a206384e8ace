# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The bytecode cache of module_utils/bytecode_cache.py, as a module run from a zip uses it.

Each case builds a zip laid out like an AnsiballZ payload (this collection's module_utils under
ansible_collections/vdisk/qcow2/plugins/module_utils) and runs a fresh interpreter on it that
imports the engine the way the image module does."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import json
import os
import subprocess
import sys
import zipfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_UTILS = os.path.abspath(os.path.join(HERE, "..", "..", "..", "..", "plugins",
                                            "module_utils"))
PACKAGE = "ansible_collections/vdisk/qcow2/plugins/module_utils"

# Imports the engine as a module does, then reports what the cache did. With `no_compile`,
# compiling any module the cache serves (those imported after it) is an error: the run passes
# only on cached code.
RUNNER = r"""
import builtins, json, sys
sys.path.insert(0, sys.argv[1])
real_compile = builtins.compile
compiled = []
def spy(source, filename, *args, **kwargs):
    name = str(filename)
    if "/module_utils/" in name and not name.endswith(("/module_utils/__init__.py",
                                                        "/bytecode_cache.py")):
        compiled.append(filename)
        if sys.argv[2] == "no_compile":
            raise RuntimeError("compiled " + filename)
    return real_compile(source, filename, *args, **kwargs)
builtins.compile = spy
from ansible_collections.vdisk.qcow2.plugins.module_utils import bytecode_cache
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2 import api
from ansible_collections.vdisk.qcow2.plugins.module_utils.qcow2.format import constants
print(json.dumps({"compiled": len(compiled), "marker": getattr(constants, "MARKER", None),
                  "api_file": api.validate_declaration.__code__.co_filename,
                  "cached": type(api.__loader__).__name__}))
"""


def make_zip(path, marker=None):
    """The module_utils in a zip; `marker` adds MARKER = marker to format/constants.py."""
    with zipfile.ZipFile(path, "w") as archive:
        parts = PACKAGE.split("/")
        for depth in range(1, len(parts) + 1):
            archive.writestr("/".join(parts[:depth]) + "/__init__.py", "")
        for folder, _dirs, files in os.walk(MODULE_UTILS):
            rel_folder = os.path.relpath(folder, MODULE_UTILS).replace(os.sep, "/")
            if rel_folder != "." and "__init__.py" not in files:
                # Packages without __init__.py get an empty one, as in Ansible's payloads.
                archive.writestr(PACKAGE + "/" + rel_folder + "/__init__.py", "")
            for name in files:
                if not name.endswith(".py"):
                    continue
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, MODULE_UTILS).replace(os.sep, "/")
                with open(full) as handle:
                    text = handle.read()
                if marker is not None and rel == "qcow2/format/constants.py":
                    text += "\nMARKER = %r\n" % marker
                archive.writestr(PACKAGE + "/" + rel, text)
    return path


def run(zip_path, cache_home, mode="compile", **env):
    environ = dict(os.environ)
    environ.pop("VDISK_QCOW2_BYTECODE_CACHE", None)
    environ.update(env, XDG_CACHE_HOME=str(cache_home))
    proc = subprocess.run([sys.executable, "-B", "-c", RUNNER, str(zip_path), mode],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ,
                          check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def ok(result):
    code, out, err = result
    assert code == 0, err
    return json.loads(out)


def entries(cache_home):
    directory = os.path.join(str(cache_home), "vdisk.qcow2", "bytecode")
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, n) for n in os.listdir(directory))


@pytest.fixture
def payload(tmp_path):
    return make_zip(str(tmp_path / "payload.zip"))


def test_second_run_compiles_nothing(tmp_path, payload):
    first = ok(run(payload, tmp_path / "cache"))
    assert first["compiled"] >= 5 and first["cached"] == "_CachingLoader"
    stored = entries(tmp_path / "cache")
    assert len(stored) == first["compiled"]
    for path in stored + [os.path.dirname(stored[0])]:
        assert os.stat(path).st_mode & 0o077 == 0, path      # private to the user
    # Another payload path (Ansible uses a new temporary directory every run), same source.
    other = make_zip(str(tmp_path / "other.zip"))
    second = ok(run(other, tmp_path / "cache", "no_compile"))
    assert second["compiled"] == 0
    assert second["api_file"].startswith(other)             # tracebacks name this run's zip
    assert entries(tmp_path / "cache") == stored


def test_changed_source_is_compiled_again(tmp_path, payload):
    ok(run(payload, tmp_path / "cache"))
    changed = make_zip(str(tmp_path / "changed.zip"), marker="v2")
    result = ok(run(changed, tmp_path / "cache"))
    assert result["marker"] == "v2" and result["compiled"] == 1
    code, _out, err = run(changed, tmp_path / "cache", "no_compile")
    assert code == 0, err


def test_bad_entries_are_compiled_over(tmp_path, payload):
    ok(run(payload, tmp_path / "cache"))
    stored = entries(tmp_path / "cache")
    with open(stored[0], "wb") as handle:
        handle.write(b"not bytecode at all")
    if os.geteuid() == 0:
        os.chown(stored[1], 65534, 65534)                    # another user's
    else:
        os.chmod(stored[1], 0o660)                           # writable by the group
    os.chmod(stored[2], 0o666)                               # writable by others
    result = ok(run(payload, tmp_path / "cache"))
    assert result["compiled"] == 3


def test_unsafe_or_disabled_cache_is_not_used(tmp_path, payload):
    cache = tmp_path / "cache"
    directory = cache / "vdisk.qcow2" / "bytecode"
    os.makedirs(str(directory))
    os.chmod(str(directory), 0o777)
    result = ok(run(payload, cache))
    assert result["cached"] == "zipimporter" and entries(cache) == []
    off = ok(run(payload, tmp_path / "off", VDISK_QCOW2_BYTECODE_CACHE="off"))
    assert off["cached"] == "zipimporter" and entries(tmp_path / "off") == []
    link = tmp_path / "link"
    os.makedirs(str(link / "vdisk.qcow2"))
    os.symlink(str(tmp_path / "elsewhere"), str(link / "vdisk.qcow2" / "bytecode"))
    os.makedirs(str(tmp_path / "elsewhere"), 0o700)
    linked = ok(run(payload, link))
    assert linked["cached"] == "zipimporter" and os.listdir(str(tmp_path / "elsewhere")) == []


def test_unwritable_home_still_runs(tmp_path, payload):
    result = ok(run(payload, "/proc/vdisk-no-such-dir"))
    assert result["cached"] == "zipimporter" and result["compiled"] >= 5


def test_imported_from_files_it_does_nothing(tmp_path):
    """Imported from files (ansible-test, a checkout), Python's own __pycache__ applies."""
    collections = os.path.abspath(os.path.join(MODULE_UTILS, "..", "..", "..", ".."))
    if os.path.basename(collections) != "ansible_collections":
        pytest.skip("not run from an ansible_collections tree (ansible-test units runs it)")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from ansible_collections.vdisk.qcow2.plugins.module_utils import bytecode_cache\n"
            "print(any(isinstance(f, bytecode_cache._Finder) for f in sys.meta_path))"
            % os.path.dirname(collections))
    environ = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-B", "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=environ, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == "False" and entries(tmp_path) == []
