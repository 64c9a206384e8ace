# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Temporary files of killed runs: removed by a later run writing in that directory, never a
live writer's file, and the actions say so (check mode predicts the same)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir, "plugins", "module_utils"))
sys.path.insert(0, ENGINE)

from qcow2 import api, reconcile  # noqa: E402
from qcow2.read import leftovers  # noqa: E402

# A create of a `full` image that stops (SIGSTOP) once its temporary file exists, so the test
# can kill it there: what a killed `full` create leaves behind.
_KILLED_CREATE = textwrap.dedent("""
    import os, sys, signal
    sys.path.insert(0, %r)
    from qcow2 import api
    from qcow2.create import writer
    real = writer.apply_to_fd
    def stop_then_write(fd, *args, **kwargs):
        os.pwrite(fd, b"x" * 65536, 0)
        os.kill(os.getpid(), signal.SIGSTOP)
        return real(fd, *args, **kwargs)
    writer.apply_to_fd = stop_then_write
    api.create(%r, {"size": "64M", "preallocation": "full"})
""")


def killed_create(path):
    """Start a create of `path`, kill it once its temporary file exists; its name."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CREATE % (ENGINE, path)])
    directory, name = os.path.split(path)
    try:
        for _i in range(3000):
            temps = [e for e in os.listdir(directory) if e.startswith("." + name + ".")]
            if temps and proc.poll() is None and _stopped(proc.pid):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the create never reached its temporary file")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(path)
    return temps[0]


def _stopped(pid):
    with open("/proc/%d/stat" % pid) as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "T"


def plan(path, declared, state="present", started=None):
    observed = api.observe(path)
    decision = reconcile.decide(declared, observed, state=state)
    return api.add_leftover_cleanup(path, decision, started=started)


def test_state_absent_of_the_same_path_removes_its_leftover(tmp_path):
    path = str(tmp_path / "vm.qcow2")
    temp = killed_create(path)
    started = time.time() + 1           # this "run" starts after the kill
    predicted = plan(path, {}, state="absent", started=started)
    assert [a.kind for a in predicted.actions] == ["remove_leftovers"]
    assert temp in predicted.actions[0].text
    assert os.path.exists(str(tmp_path / temp))     # predicting touched nothing
    results = api.apply(path, predicted)
    assert results[0]["removed_leftovers"] == [temp]
    assert not os.path.exists(str(tmp_path / temp))
    assert not plan(path, {}, state="absent", started=started).actions


def test_create_of_another_path_removes_the_directory_leftovers(tmp_path):
    temp = killed_create(str(tmp_path / "big.qcow2"))
    other = str(tmp_path / "other.qcow2")
    started = time.time() + 1
    decision = plan(other, {"size": "1M"}, started=started)
    assert [a.kind for a in decision.actions] == ["remove_leftovers", "create"]
    api.apply(other, decision)
    assert sorted(os.listdir(str(tmp_path))) == ["other.qcow2"]
    # A re-check that writes nothing does not touch other images' business.
    temp2 = killed_create(str(tmp_path / "big.qcow2"))
    again = plan(other, {"size": "1M"}, started=time.time() + 1)
    assert not again.actions
    assert temp2 in os.listdir(str(tmp_path))


def test_recreate_of_the_same_path_removes_it(tmp_path):
    path = str(tmp_path / "vm.qcow2")
    temp = killed_create(path)
    decision = plan(path, {"size": "2M"}, started=time.time() + 1)
    assert [a.kind for a in decision.actions] == ["remove_leftovers", "create"]
    api.apply(path, decision)
    assert sorted(os.listdir(str(tmp_path))) == ["vm.qcow2"]
    assert temp not in os.listdir(str(tmp_path))


def test_a_live_writer_and_a_newer_file_are_never_taken(tmp_path):
    path = str(tmp_path / "vm.qcow2")
    tmp, fd = leftovers.open_temp(path, 0o644)
    try:
        name = os.path.basename(tmp)
        # Locked by a live writer: not a leftover, however old.
        os.utime(tmp, (time.time() - 3600, time.time() - 3600))
        assert leftovers.find(path, started=time.time()) == []
        assert leftovers.remove(path, [name], started=time.time()) == []
    finally:
        os.close(fd)
    # Unlocked but newer than the run: not taken either.
    os.utime(tmp, None)
    assert leftovers.find(path, started=time.time() - 60) == []
    # Unlocked and older than the run: a leftover.
    assert [e for e, _s in leftovers.find(path, started=time.time() + 1)] == [name]
    # Files that only look alike are never taken: other pattern, a symlink, a FIFO.
    for odd in (".vm.qcow2.x.1.tmp", "vm.qcow2.1.2.tmp"):
        open(str(tmp_path / odd), "w").close()
    os.symlink(tmp, str(tmp_path / ".link.qcow2.1.2.tmp"))
    os.mkfifo(str(tmp_path / ".fifo.qcow2.1.2.tmp"))
    found = [e for e, _s in leftovers.find(path, started=time.time() + 1)]
    assert found == [name]


def test_the_module_decision_in_check_mode_equals_the_real_run(tmp_path):
    """Prediction and real run agree on the cleanup, and a second run converges."""
    path = str(tmp_path / "vm.qcow2")
    killed_create(path)
    started = time.time() + 1
    predicted = plan(path, {"size": "1M"}, started=started)
    real = plan(path, {"size": "1M"}, started=started)
    assert predicted.texts() == real.texts()
    api.apply(path, real)
    assert not plan(path, {"size": "1M"}, started=started).actions
