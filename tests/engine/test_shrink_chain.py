# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Shrinking an overlay: the backing file's data counts.

A smaller declared size is applied in place only when the guest reads zeros past the new end
through the whole chain. Each case builds a real chain with qemu-img/qemu-io, asks the module's
decision (observe + decide + preflight, what check mode runs), then the real run, and judges
by what the guest reads (`qemu-img convert -O raw` before and after)."""

import os

import pytest

from oracle import QEMU_IMG, QEMU_IO, run, unavailable

from qcow2 import api, reconcile
from qcow2.format.errors import Qcow2Error

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools():
    if not QEMU_IMG or not QEMU_IO:
        unavailable("shrink-chain", "qemu-img/qemu-io not installed", "the overlay shrink tests")


def qemu(*args):
    proc = run(QEMU_IMG, *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def qio(path, cmd, fmt="qcow2"):
    proc = run(QEMU_IO, "-f", fmt, "-c", cmd, path)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def guest(path, tmp_path, tag):
    out = str(tmp_path / ("view-%s.raw" % tag))
    qemu("convert", "-O", "raw", path, out)
    with open(out, "rb") as handle:
        data = handle.read()
    os.unlink(out)
    return data


def decide_and_run(path, size):
    """(decision after preflight or the refusal, real-run outcome); check mode = the first."""
    declared = {"size": size}
    want = reconcile.normalise(declared)["size"]
    observed = api.observe(path, size=want)
    decision = reconcile.decide(declared, observed)
    predicted = None
    if decision.conflicts:
        predicted = "conflict: " + "; ".join(decision.conflicts)
    else:
        try:
            api.preflight(path, decision)
        except Qcow2Error as exc:
            predicted = "refused: %s" % exc
    if predicted is not None:
        return decision, predicted, None
    api.apply(path, decision)
    return decision, None, api.observe(path)


def overlay_of(tmp_path, base, fmt, size="64M"):
    path = str(tmp_path / "overlay.qcow2")
    qemu("create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, path, size)
    return path


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_base_data_past_the_new_end_refuses(tmp_path, fmt):
    """The issue's case: base data at 56 MiB of a 64 MiB overlay, declared 32M: refused in
    the prediction and never applied; the guest keeps reading the base's bytes."""
    base = str(tmp_path / ("base." + fmt))
    qemu("create", "-q", "-f", fmt, base, "64M")
    qio(base, "write -P 0x5c 56M 1M", fmt)
    path = overlay_of(tmp_path, base, fmt)
    qio(path, "write -P 0x11 0 64k")
    before = guest(path, tmp_path, "before")
    decision, predicted, after = decide_and_run(path, "32M")
    assert predicted is not None and "backing file" in predicted, predicted
    assert after is None and not decision.actions
    assert guest(path, tmp_path, "after") == before
    # The engine's own guard refuses too, whoever calls it.
    from qcow2.edit import resize
    with pytest.raises(Qcow2Error) as err:
        resize.shrink(path, 32 * MiB)
    assert "guest data lies up to byte" in str(err.value)
    assert guest(path, tmp_path, "after-guard") == before


def test_two_link_chain_data_counts(tmp_path):
    """Data two links down (base <- middle <- overlay) counts as well."""
    base = str(tmp_path / "base.qcow2")
    qemu("create", "-q", "-f", "qcow2", base, "64M")
    qio(base, "write -P 0x7e 60M 64k")
    middle = str(tmp_path / "middle.qcow2")
    qemu("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", middle, "64M")
    path = overlay_of(tmp_path, middle, "qcow2")
    _decision, predicted, _after = decide_and_run(path, "32M")
    assert predicted and "guest data lies up to byte" in predicted, predicted


@pytest.mark.parametrize("case", ["shorter-base", "base-zeros-there", "base-written-zeros"])
def test_shrink_allowed_when_the_chain_reads_zeros_there(tmp_path, case):
    base = str(tmp_path / "base.qcow2")
    if case == "shorter-base":
        qemu("create", "-q", "-f", "qcow2", base, "16M")
        qio(base, "write -P 0x33 15M 1M")
    else:
        qemu("create", "-q", "-f", "qcow2", base, "64M")
        qio(base, "write -P 0x33 4M 1M")
        if case == "base-written-zeros":
            # Real zero bytes in allocated clusters of the base past the new end.
            qio(base, "write -P 0 48M 1M")
    path = overlay_of(tmp_path, base, "qcow2")
    qio(path, "write -P 0x44 1M 64k")
    before = guest(path, tmp_path, "before")
    decision, predicted, after = decide_and_run(path, "32M")
    assert predicted is None, predicted
    assert [a.kind for a in decision.actions] == ["shrink"]
    assert after["virtual_size"] == 32 * MiB
    assert guest(path, tmp_path, "after") == before[:32 * MiB]
    assert run(QEMU_IMG, "check", path).returncode == 0
    # Converged: the same declaration again changes nothing.
    again = reconcile.decide({"size": "32M"}, api.observe(path, size=32 * MiB))
    assert not again.actions and not again.conflicts


@pytest.mark.parametrize("defect", ["missing", "no-format", "fifo"])
def test_unreadable_base_refuses(tmp_path, defect):
    """When the backing file cannot be read, nobody can say what the guest reads past the
    new end: refused, in the prediction and by the engine, without blocking on a FIFO."""
    base = str(tmp_path / "base.qcow2")
    qemu("create", "-q", "-f", "qcow2", base, "64M")
    path = str(tmp_path / "overlay.qcow2")
    if defect == "no-format":
        # qemu-img refuses to record no format; write the name alone with our own writer.
        api.create(path, {"size": "64M", "backing_file": base, "backing_fmt": "qcow2"})
        with open(path, "r+b") as handle:
            data = handle.read(65536)
            pos = data.find(b"qcow2", 112)
            assert pos > 0
            handle.seek(pos - 8)
            handle.write(b"\0" * 8)       # the backing-format extension becomes the end mark
    else:
        qemu("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path, "64M")
        os.unlink(base)
        if defect == "fifo":
            os.mkfifo(base)
    _decision, predicted, after = decide_and_run(path, "32M")
    assert predicted and "cannot be told" in predicted, predicted
    assert after is None
    from qcow2.edit import resize
    with pytest.raises(Qcow2Error):
        resize.shrink(path, 32 * MiB)
