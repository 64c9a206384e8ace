# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Draw the benchmark's results: time against size per mode, ours beside qemu-img, and the
inspections of the 1 TiB metadata image side by side.

    python3 tests/perf/chart.py tests/perf/results/bench-XXXX.json docs/performance.png

Needs matplotlib (tests/perf/run.sh installs it into .venv-perf).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src) as handle:
        doc = json.load(handle)
    creates = [r for r in doc["results"] if r["kind"] == "create"]
    modes = ["off", "metadata", "falloc", "full"]
    inspections = [r for r in doc["results"] if r["kind"] != "create"]
    panels = len(modes) + (1 if inspections else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4.2))
    for ax, mode in zip(axes, modes):
        rows = sorted((r for r in creates if r["mode"] == mode and not r["options"]),
                      key=lambda r: r["size"])
        if not rows:
            ax.set_visible(False)
            continue
        sizes = [r["size"] / 2.0 ** 30 for r in rows]
        ax.plot(sizes, [r["ours_median_s"] for r in rows], "o-", label="vdisk.qcow2 engine")
        ax.plot(sizes, [r["ref_median_s"] for r in rows], "s--", label="qemu-img 7.2")
        dd = [r for r in rows if "dd_bs8M_fsync_s" in r]
        if dd:
            ax.plot([r["size"] / 2.0 ** 30 for r in dd], [r["dd_bs8M_fsync_s"] for r in dd],
                    "^:", label="dd bs=8M conv=fsync")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title("preallocation=%s" % mode)
        ax.set_xlabel("virtual size (GiB)")
        ax.set_ylabel("seconds (median, durable)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if inspections:
        ax = axes[len(modes)]
        xs = range(len(inspections))
        ax.bar([x - 0.2 for x in xs], [r["ours_median_s"] for r in inspections], 0.4,
               label="vdisk.qcow2 engine")
        ax.bar([x + 0.2 for x in xs], [r["ref_median_s"] for r in inspections], 0.4,
               label="qemu-img 7.2")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(["%s\nvs %s" % (r["kind"], r["reference"]) for r in inspections],
                           fontsize=8)
        ax.set_title("inspecting the 1 TiB metadata image")
        ax.set_ylabel("seconds (median)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Create time against size, and inspection, %s" % doc["when"])
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
