# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Paths that are not image files: FIFOs, sockets, device nodes, directories, paths through a
regular file, symbolic links, and a path swapped for a link while the engine works.

The modules themselves run here, each as a child process fed its arguments on stdin the way
Ansible runs a module, with a timeout: a module that blocks on a FIFO fails the test instead of
hanging it. Every refusal must name the node, and the node (type, inode, device number) and
everything else in its directory must be exactly as before.

The race test drives the engine as the image module does (observe, decide, preflight, apply
with the observed identity) while another process keeps swapping the image path between the
real image and a symbolic link to a victim file; the victims' bytes must never change.
"""

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
ENGINE = os.path.join(ROOT, "plugins", "module_utils")
sys.path.insert(0, ENGINE)

from qcow2 import api, reconcile  # noqa: E402
from qcow2.read import nodes  # noqa: E402
from qcow2.format.errors import Qcow2Error  # noqa: E402

TIMEOUT = 30

KINDS = ("fifo", "socket", "chardev", "directory", "under_file", "dangling_link",
         "link_to_fifo")

MESSAGES = {
    "fifo": "is a FIFO (named pipe)",
    "socket": "is a socket",
    "chardev": "is a character device",
    "directory": "is a directory",
    "under_file": "a component of the path is not a directory",
    "dangling_link": "symbolic link",
    "link_to_fifo": "symbolic link",
}


def _ansible_python():
    """An interpreter that can import ansible: $VDISK_ANSIBLE_PYTHON, the checkout's
    .venv-ansible, or this one."""
    candidates = [os.environ.get("VDISK_ANSIBLE_PYTHON"),
                  os.path.join(ROOT, ".venv-ansible", "bin", "python"), sys.executable]
    for candidate in candidates:
        if candidate and os.path.exists(candidate) and subprocess.call(
                [candidate, "-c", "import ansible.module_utils.basic"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def module_runner(tmp_path_factory):
    python = _ansible_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("no interpreter with ansible-core to run the modules with")
        pytest.skip("no interpreter with ansible-core (set VDISK_ANSIBLE_PYTHON)")
    tree = tmp_path_factory.mktemp("collections")
    os.makedirs(str(tree / "ansible_collections" / "vdisk"))
    os.symlink(ROOT, str(tree / "ansible_collections" / "vdisk" / "qcow2"))
    env = dict(os.environ, PYTHONPATH=str(tree))

    def run(module, **args):
        payload = json.dumps({"ANSIBLE_MODULE_ARGS": args})
        try:
            proc = subprocess.run(
                [python, "-m", "ansible_collections.vdisk.qcow2.plugins.modules." + module],
                input=payload.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd=str(tree), timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail("%s did not answer within %d s for %r (it blocked)"
                        % (module, TIMEOUT, args))
        try:
            return json.loads(proc.stdout.decode())
        except ValueError:
            pytest.fail("%s gave no JSON: %s %s" % (module, proc.stdout, proc.stderr))
    return run


@pytest.fixture
def scratch():
    # Short names: a UNIX socket path is limited to 107 bytes.
    directory = tempfile.mkdtemp(prefix="odd", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def make_node(directory, kind, keep):
    """Create a node of `kind` in `directory`; returns the path to give the module."""
    path = os.path.join(directory, "img.qcow2")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        keep.append(sock)
    elif kind == "chardev":
        if os.geteuid() != 0:
            pytest.skip("creating a character device node needs root")
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "under_file":
        parent = os.path.join(directory, "file.txt")
        with open(parent, "wb") as handle:
            handle.write(b"not a directory\n")
        path = os.path.join(parent, "img.qcow2")
    elif kind == "dangling_link":
        os.symlink(os.path.join(directory, "nowhere.qcow2"), path)
    elif kind == "link_to_fifo":
        os.mkfifo(os.path.join(directory, "fifo"))
        os.symlink(os.path.join(directory, "fifo"), path)
    else:
        raise AssertionError(kind)
    return path


def snapshot(directory):
    """Every entry of `directory`: type, inode, device number, size, link target, bytes."""
    out = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        st = os.lstat(full)
        entry = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_rdev)
        if stat.S_ISLNK(st.st_mode):
            entry += (os.readlink(full),)
        elif stat.S_ISREG(st.st_mode):
            with open(full, "rb") as handle:
                entry += (hashlib.sha256(handle.read()).hexdigest(),)
        elif stat.S_ISDIR(st.st_mode):
            entry += (tuple(sorted(os.listdir(full))),)
        out[name] = entry
    return out


def assert_refused(result, expected, what):
    assert result.get("failed") is True, (what, result)
    assert expected in result["msg"], (what, result["msg"])
    assert not result.get("changed"), (what, result)


# ---------------------------------------------------------------------------------------------
# The node as `path`

PATH_CASES = []
for _state in ("present", "absent"):
    for _force in (False, True):
        for _check in (False, True):
            PATH_CASES.append((_state, _force, _check, False))
PATH_CASES.append(("present", True, False, True))     # force with backup
PATH_CASES.append(("present", True, True, True))


@pytest.mark.parametrize("kind", KINDS)
def test_node_as_path_is_refused_and_left_alone(kind, scratch, module_runner):
    keep = []
    try:
        path = make_node(scratch, kind, keep)
        before = snapshot(scratch)
        for state, force, check, backup in PATH_CASES:
            args = {"path": path, "state": state, "force": force, "backup": backup,
                    "_ansible_check_mode": check}
            if state == "present":
                args["size"] = "1M"
            what = "%s %r" % (kind, args)
            assert_refused(module_runner("image", **args), MESSAGES[kind], what)
            assert snapshot(scratch) == before, what
        if kind == "link_to_fifo":
            # Followed, the link leads to a FIFO: refused by that name.
            for state in ("present", "absent"):
                result = module_runner("image", path=path, state=state, follow=True,
                                       force=True, size="1M")
                assert_refused(result, "is a FIFO (named pipe)", state)
                assert snapshot(scratch) == before
    finally:
        for sock in keep:
            sock.close()


@pytest.mark.parametrize("kind", KINDS)
def test_image_info_on_node_answers_and_names_it(kind, scratch, module_runner):
    keep = []
    try:
        path = make_node(scratch, kind, keep)
        before = snapshot(scratch)
        result = module_runner("image_info", path=path)
        if kind in ("dangling_link", "link_to_fifo"):
            # A link is reported, not followed.
            assert result.get("islink") is True and not result.get("failed"), result
            followed = module_runner("image_info", path=path, follow=True)
            if kind == "link_to_fifo":
                assert_refused(followed, "is a FIFO (named pipe)", kind)
                assert followed["exists"] is True
            else:
                assert not followed.get("failed") and followed["exists"] is False, followed
        else:
            assert_refused(result, MESSAGES[kind], kind)
            assert result["exists"] is (kind != "under_file")
            check = module_runner("image_info", path=path, check=True,
                                  _ansible_check_mode=True)
            assert_refused(check, MESSAGES[kind], kind)
        assert snapshot(scratch) == before
    finally:
        for sock in keep:
            sock.close()


# ---------------------------------------------------------------------------------------------
# The node as `source` and as `backing_file`

NAMED = {
    "fifo": "is a FIFO (named pipe)",
    "socket": "is a socket",
    "chardev": "is a character device",
    "directory": "is a directory",
    "under_file": "a component of the path is not a directory",
    "link_to_fifo": "is a FIFO (named pipe)",    # a source or backing name may be a link
}


@pytest.mark.parametrize("kind", sorted(NAMED))
def test_node_as_source_is_refused(kind, scratch, module_runner):
    keep = []
    try:
        node = make_node(scratch, kind, keep)
        target = os.path.join(scratch, "new.qcow2")
        before = snapshot(scratch)
        for fmt in ("raw", "qcow2"):
            for check in (False, True):
                for force in (False, True):
                    result = module_runner("image", path=target, source=node,
                                           source_format=fmt, force=force,
                                           _ansible_check_mode=check)
                    assert_refused(result, NAMED[kind], (kind, fmt, check, force))
                    assert snapshot(scratch) == before
    finally:
        for sock in keep:
            sock.close()


@pytest.mark.parametrize("kind", sorted(NAMED))
def test_node_as_backing_file_is_refused(kind, scratch, module_runner):
    keep = []
    try:
        node = make_node(scratch, kind, keep)
        target = os.path.join(scratch, "overlay.qcow2")
        before = snapshot(scratch)
        for fmt in ("raw", "qcow2"):
            for check in (False, True):
                for size in (None, "1M"):
                    args = {"path": target, "backing_file": node, "backing_fmt": fmt,
                            "_ansible_check_mode": check}
                    if size:
                        args["size"] = size
                    result = module_runner("image", **args)
                    assert_refused(result, NAMED[kind], args)
                    assert snapshot(scratch) == before
    finally:
        for sock in keep:
            sock.close()


# ---------------------------------------------------------------------------------------------
# The engine directly: the helpers

def test_nodes_describe_and_open_checked(scratch):
    fifo = os.path.join(scratch, "fifo")
    os.mkfifo(fifo)
    assert nodes.describe(os.lstat(fifo).st_mode) == "a FIFO (named pipe)"
    assert nodes.describe(os.lstat(scratch).st_mode) == "a directory"
    with pytest.raises(Qcow2Error, match="is a FIFO"):
        nodes.open_checked(fifo, os.O_RDONLY)
    plain = os.path.join(scratch, "plain")
    with open(plain, "wb") as handle:
        handle.write(b"x")
    link = os.path.join(scratch, "link")
    os.symlink(plain, link)
    with pytest.raises(Qcow2Error, match="symbolic link"):
        nodes.open_checked(link, os.O_RDONLY)
    fd, st = nodes.open_checked(link, os.O_RDONLY, follow=True)
    try:
        assert stat.S_ISREG(st.st_mode)
        import fcntl
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)
    with pytest.raises(Qcow2Error, match="a component of the path is not a directory"):
        nodes.check_node(os.path.join(plain, "x"))
    assert nodes.check_node(os.path.join(scratch, "missing")) is None


def test_apply_refuses_a_file_swapped_after_the_look(scratch):
    path = os.path.join(scratch, "a.qcow2")
    api.create(path, {"size": "1M"})
    observed = api.observe(path)
    other = os.path.join(scratch, "b.qcow2")
    api.create(other, {"size": "1M"})
    with open(other, "rb") as handle:
        other_bytes = handle.read()
    os.rename(other, path)          # another file, same name, between the look and the write
    declared = _declared(size=2 << 20)
    decision = reconcile.decide(declared, observed, state="present", force=False)
    assert decision.actions
    for call in (lambda: api.preflight(path, decision, expected=observed["identity"]),
                 lambda: api.apply(path, decision, expected=observed["identity"])):
        with pytest.raises(Qcow2Error, match=nodes.CHANGED):
            call()
    with open(path, "rb") as handle:
        assert handle.read() == other_bytes
    removal = reconcile.decide(_declared(), observed, state="absent", force=False)
    with pytest.raises(Qcow2Error, match=nodes.CHANGED):
        api.apply(path, removal, expected=observed["identity"])
    assert os.path.exists(path)


# ---------------------------------------------------------------------------------------------
# The race: the path swapped for a link to a victim while the engine works

KEYS = ("size", "preallocation", "cluster_size", "compat", "refcount_bits", "lazy_refcounts",
        "extended_l2", "compression_type", "backing_file", "backing_fmt", "data_file",
        "data_file_raw", "nocow", "source", "source_format")


def _declared(**values):
    declared = dict((k, None) for k in KEYS)
    declared.update(preallocation="off", nocow=False)
    declared.update(values)
    return declared


RACER = textwrap.dedent("""
    import os, sys
    path, real, victims, stop = sys.argv[1], sys.argv[2], sys.argv[3:-1], sys.argv[-1]
    tmp_link, tmp_img = path + ".l", path + ".i"
    n = 0
    while not os.path.exists(stop):
        n += 1
        for name in (tmp_link, tmp_img):
            try:
                os.unlink(name)
            except OSError:
                pass
        os.symlink(victims[n % len(victims)], tmp_link)
        os.rename(tmp_link, path)           # the image path is now a link to a victim
        os.link(real, tmp_img)
        os.rename(tmp_img, path)            # ... and the image again
""")

ALLOWED = ("symbolic link", nodes.CHANGED, "appeared at this path",
           "a file already exists at this path")


def test_swapping_the_path_for_a_link_never_writes_the_victim(scratch):
    path = os.path.join(scratch, "img.qcow2")
    real = os.path.join(scratch, "real.qcow2")
    api.create(real, {"size": "4M"})
    victim_raw = os.path.join(scratch, "victim.raw")
    with open(victim_raw, "wb") as handle:
        handle.write(bytes(range(256)) * 4096)
    victim_qcow2 = os.path.join(scratch, "victim.qcow2")
    api.create(victim_qcow2, {"size": "4M"})
    victims = (victim_raw, victim_qcow2)

    def fingerprint():
        out = []
        for victim in victims:
            st = os.lstat(victim)
            with open(victim, "rb") as handle:
                out.append((st.st_ino, stat.S_IFMT(st.st_mode),
                            hashlib.sha256(handle.read()).hexdigest()))
        return out

    before = fingerprint()
    os.link(real, path)
    stop = os.path.join(scratch, "stop")
    racer = subprocess.Popen([sys.executable, "-c", RACER, path, real] + list(victims)
                             + [stop])
    outcomes = {"done": 0, "refused": 0, "nothing": 0}
    try:
        for i in range(160):
            kind = i % 4
            if kind == 0:       # grow
                declared, state, force = _declared(size=(5 << 20) + (i << 20)), "present", False
            elif kind == 1:     # grow and raise preallocation
                declared = _declared(size=(5 << 20) + (i << 20),
                                     preallocation=("metadata", "falloc")[i // 4 % 2])
                state, force = "present", False
            elif kind == 2:     # remove
                declared, state, force = _declared(), "absent", False
            else:               # force a recreate with another cluster size
                declared = _declared(size="4M", cluster_size=(65536, 131072)[i // 4 % 2])
                state, force = "present", True
            try:
                observed = api.observe(path)
                ident = observed.get("identity") if observed else None
                decision = reconcile.decide(declared, observed, state=state, force=force)
                if decision.failure or (decision.conflicts and not force) or \
                        not decision.actions:
                    outcomes["nothing"] += 1
                    continue
                api.preflight(path, decision, expected=ident)
                api.apply(path, decision, expected=ident)
                outcomes["done"] += 1
            except Qcow2Error as exc:
                assert any(text in str(exc) for text in ALLOWED), str(exc)
                outcomes["refused"] += 1
            assert fingerprint() == before, (i, outcomes)
    finally:
        with open(stop, "w"):
            pass
        racer.wait(timeout=TIMEOUT)
    assert racer.returncode == 0
    assert fingerprint() == before
    print("race outcomes:", outcomes)
    # Both outcomes happened: the race was real, and work still got done.
    assert outcomes["refused"] > 0 and outcomes["done"] > 0, outcomes
