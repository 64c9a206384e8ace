# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Differential fuzzing with qemu-img as the oracle (see differential_campaign.py).

Fails when a mutant QEMU refuses to open, or finds corrupt, is called clean by the engine.
VDISK_DIFF_INPUTS sets the number of mutants (default 1500; 2500 or more for a wider run), VDISK_DIFF_SEED the seed.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, os.pardir, "engine"))

import differential_campaign  # noqa: E402
import oracle  # noqa: E402


def test_differential_against_qemu_img():
    if not differential_campaign.QEMU_IMG or not differential_campaign.QEMU_IO:
        oracle.unavailable("differential", "qemu-img or qemu-io is not installed")
    inputs = int(os.environ.get("VDISK_DIFF_INPUTS", "1500"))
    seed = int(os.environ.get("VDISK_DIFF_SEED", "1"))
    totals = differential_campaign.campaign(inputs, 2, seed=seed)
    examples = totals.pop("examples")
    sys.stdout.write("\n[differential] %s\n" % totals)
    for category in ("stricter", "out_of_model"):
        for record in examples.get(category, []):
            sys.stdout.write("[differential] %s: seed %d input %d %s %s | qemu %s | ours %s\n"
                             % (category, record["seed"], record["input"], record["kind"],
                                record["mutation"], record["qemu"], record["ours"]))
    missed = examples.get("missed", [])
    for record in missed:
        sys.stdout.write("[differential] MISSED: seed %d input %d kind %s mutation %s | "
                         "qemu %s | ours %s\n"
                         % (record["seed"], record["input"], record["kind"],
                            record["mutation"], record["qemu"], record["ours"]))
    assert totals["mutants"] == inputs
    assert totals["missed"] == 0, "the engine called clean %d image(s) QEMU refuses: %s" % (
        totals["missed"], missed[:5])
    assert totals["we_crash"] == 0 and totals["we_hang"] == 0, examples.get("crash")
