# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Draw the benchmark's results: time against size per mode, ours beside qemu-img, the
inspections of the 1 TiB metadata image side by side, (second row) the copies of a
template per preallocation mode against qemu-img convert + resize, and (third row,
tests/perf/fleet.py) whole ansible-playbook re-runs against ansible.builtin.stat.

    python3 tests/perf/chart.py tests/perf/results/bench-XXXX.json [MORE.json ...] docs/performance.png

With several result files the cases are merged, a later file's case replacing an earlier one of
the same name (for example a full run and a later `--only convert` run).

Needs matplotlib (tests/perf/run.sh installs it into .venv-perf).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(srcs):
    """Merged results of the files (later ones replace cases of the same name), and the
    dates of the runs each kind of case comes from."""
    by_name, when = {}, {}
    for src in srcs:
        with open(src) as handle:
            doc = json.load(handle)
        # A fleet group (local, hosts) is drawn from one run: a later run of the group
        # replaces all of its rows, so no panel mixes runs.
        groups = set(r.get("group") for r in doc["results"] if r["kind"] == "fleet")
        for name in [n for n, r in by_name.items()
                     if r["kind"] == "fleet" and r.get("group") in groups]:
            del by_name[name]
        for r in doc["results"]:
            by_name[r["name"]] = r
            kind = r["kind"] if r["kind"] in ("convert", "fleet") else "create"
            when[kind] = doc["when"]
            if kind == "fleet":
                when["fleet " + r["group"]] = doc["when"]
    return list(by_name.values()), when


def convert_panel(ax, rows, title):
    """Bars per mode: ours beside qemu-img convert + resize, the ratio above ours."""
    modes = ["off", "metadata", "falloc", "full"]
    rows = sorted(rows, key=lambda r: modes.index(r["mode"]))
    xs = range(len(rows))
    ours = ax.bar([x - 0.2 for x in xs], [r["ours_median_s"] for r in rows], 0.4,
                  label="vdisk.qcow2 engine")
    ax.bar([x + 0.2 for x in xs], [r["ref_median_s"] for r in rows], 0.4,
           label="qemu-img 7.2 convert + resize")
    for patch, r in zip(ours, rows):
        ax.annotate("%.2f\u00d7" % r["ratio"], (patch.get_x() + patch.get_width() / 2,
                                                patch.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(["%s\n%d GiB" % (r["mode"], r["size"] // 2 ** 30) for r in rows])
    ax.set_title(title)
    # full writes every byte of the target and takes ten times the others: a log scale from
    # 0.1 s (the same in both panels) keeps both readable.
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.set_ylabel("seconds (median, durable, log scale)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def fleet_panel(ax, rows, title):
    """Bars per playbook (median seconds, min-max whiskers), with each comparison's ratio
    (and its target) above the compared bar."""
    arms, notes = {}, {}
    for r in rows:
        arms.setdefault(r["reference"], r["ref_stats"])
        arms.setdefault(r["ours"], r["ours_stats"])
        arms.setdefault("empty", r["empty_stats"])
        label = "%.2f\u00d7 %s%s" % (r["ratio"], r["reference"],
                                     " (target %.2f)" % r["target"] if "target" in r else "")
        if "tasks" in r and r["reference"] != "stat":
            label = "%.0f\u00d7 qemu-img call" % r["ratio"] if "shell" in r["reference"] \
                else label
        notes.setdefault(r["ours"], []).append(label)
    names = list(arms)
    xs = range(len(names))
    meds = [arms[n]["median_s"] for n in names]
    err = [[m - arms[n]["min_s"] for n, m in zip(names, meds)],
           [arms[n]["max_s"] - m for n, m in zip(names, meds)]]
    ours = ("image", "role", "images")     # the collection's arms; the rest are yardsticks
    colors = ["C0" if n.split()[0] in ours else "C7" if n == "empty" else "C1" for n in names]
    bars = ax.bar(list(xs), meds, 0.6, yerr=err, capsize=3, color=colors)
    for patch, n in zip(bars, names):
        if n in notes:
            ax.annotate("\n".join(notes[n]), (patch.get_x() + patch.get_width() / 2,
                                              arms[n]["max_s"]),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([n.replace(" ", "\n", 1) for n in names], fontsize=8)
    ax.set_ylim(top=max(arms[n]["max_s"] for n in names) * 1.3)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("seconds per ansible-playbook run\n(median, min-max)")
    ax.grid(True, axis="y", alpha=0.3)


def main(srcs, dst):
    results, when = load(srcs)
    creates = [r for r in results if r["kind"] == "create"]
    modes = ["off", "metadata", "falloc", "full"]
    inspections = [r for r in results if r["kind"] in ("check", "state")]
    converts = [r for r in results if r["kind"] == "convert"]
    fleet = [r for r in results if r["kind"] == "fleet"]
    panels = len(modes) + (1 if inspections else 0)
    top = 1 if creates or inspections else 0
    nrows = top + (1 if converts else 0) + (1 if fleet else 0)
    fig = plt.figure(figsize=(4 * max(panels, 3), 4.2 * nrows + 0.4))
    grid = fig.add_gridspec(nrows, 2 * panels)
    axes = [fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(panels)] if top else []
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
    if converts:
        half = panels
        sources = [("raw", "raw"), ("qcow2", "compressed qcow2")]
        for i, (fmt, label) in enumerate(sources):
            rows = [r for r in converts if r.get("source_format") == fmt]
            ax = fig.add_subplot(grid[top, i * half:(i + 1) * half])
            if not rows:
                ax.set_visible(False)
                continue
            convert_panel(ax, rows, "copy of a 2 GiB template (1 GiB data, %s) into a new "
                          "image" % label)
    if fleet:
        row = nrows - 1
        half = panels
        groups = [("local", "localhost: 24 tasks on a 1 TiB metadata image"),
                  ("hosts", "16 namespace hosts x 4 images, forks 16: one re-run")]
        for i, (group, label) in enumerate(groups):
            rows = [r for r in fleet if r.get("group") == group]
            ax = fig.add_subplot(grid[row, i * half:(i + 1) * half])
            if not rows:
                ax.set_visible(False)
                continue
            fleet_panel(ax, rows, "%s (%s)" % (label, when.get("fleet " + group)))
    titles = []
    if top:
        titles.append("create time against size, and inspection (%s)" % when.get("create"))
    if converts:
        titles.append("provisioning from a template, ratio ours/qemu-img above our bars (%s)"
                      % when.get("convert"))
    if fleet:
        titles.append("idempotent Ansible re-runs against ansible.builtin.stat")
    title = "; ".join(titles)
    fig.suptitle(title[:1].upper() + title[1:], fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:-1], sys.argv[-1])
