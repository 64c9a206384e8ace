# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""pytest setup for the engine tests: engine on sys.path, qemu tools required in CI."""

import os
import shutil
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir, "plugins", "module_utils"))

import oracle  # noqa: E402


def pytest_sessionstart(session):
    if os.environ.get("CI"):
        missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
        if missing:
            pytest.exit("CI run without %s: the oracle tests cannot be skipped in CI; install "
                        "qemu-utils (scripts/setup-debian.sh does)" % ", ".join(missing),
                        returncode=1)


@pytest.fixture
def qemu_img():
    if oracle.QEMU_IMG is None:
        pytest.skip("qemu-img is not installed (CI installs it)")
    return oracle.QEMU_IMG


@pytest.fixture
def qemu_io():
    if oracle.QEMU_IO is None:
        pytest.skip("qemu-io is not installed (CI installs it)")
    return oracle.QEMU_IO


def pytest_terminal_summary(terminalreporter):
    counts = oracle.COUNTS
    if any(counts.values()):
        terminalreporter.write_sep("=", "oracle comparisons against qemu-img")
        for key, value in counts.items():
            terminalreporter.write_line("%-28s %d" % (key, value))
        total = counts["off byte-compared"] + counts["modes checked by qemu-img"]
        terminalreporter.write_line("option sets compared in all: %d" % total)
