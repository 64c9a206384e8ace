# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Where a re-check spends its time inside the image module.

A re-check is a run of `vdisk.qcow2.image` that finds the image as declared: it imports the
engine, observes the image, decides, and returns without an action. On the managed host the
engine arrives inside AnsiballZ's zip and is compiled from source at every run (no bytecode is
written), so this script packs `plugins/module_utils` of a tree into a zip, and runs the
module's steps (Runner.decide) in a fresh `python -B` per round, the engine imported from the
zip through zipimport. Each step is timed with time.perf_counter; `--profile` adds a cProfile
breakdown of one more round by what the time is spent on.

    python3 tests/perf/recheck.py IMAGE [--tree DIR ...] [--rounds N] [--profile]

IMAGE must exist; the declaration is the image's own options (size, cluster size,
preallocation), so the run decides nothing to do. --tree names a checkout (default: this one);
given more than once, the trees' rounds alternate (A B A B), so a busy machine weighs on them
alike. For a before and after: `git archive REV plugins/module_utils | tar -x -C DIR`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, os.pardir, os.pardir))

CHILD = r"""
import json, sys, time
clocks = (time.perf_counter, time.process_time)
t0 = [c() for c in clocks]
zip_path, path, declared, profile = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
sys.path.insert(0, zip_path)
prof = None
if profile == "1":
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
times = {}


def step(name, start):
    now = [c() for c in clocks]
    times[name] = [b - a for a, b in zip(start, now)]
    return now


t = [c() for c in clocks]
import qcow2.api as api
import qcow2.reconcile as reconcile
t = step("import", t)


def recheck(prefix=""):
    # What the image module does on a run (Runner.decide), in its order.
    t = [c() for c in clocks]
    reconcile.regenerate_policy(None, False)
    api.validate_declaration(declared)
    size = reconcile.normalise(declared).get("size")
    t = step(prefix + "validate", t)
    observed = api.observe(path, size=size)
    t = step(prefix + "observe", t)
    decision = reconcile.decide(declared, observed, state="present")
    view = api.public_view(observed)
    t = step(prefix + "decide+view", t)
    api.add_leftover_cleanup(path, decision)
    t = step(prefix + "leftovers", t)
    api.preflight(path, decision, expected=observed["identity"])
    t = step(prefix + "preflight", t)
    json.dumps({"image": view, "actions": decision.texts()})
    step(prefix + "result", t)
    return observed, decision


observed, decision = recheck()
times["total"] = [c() - a for c, a in zip(clocks, t0)]
if prof is not None:
    prof.disable()
    prof.dump_stats(sys.argv[5])
mods = sorted(m for m in sys.modules if m.startswith("qcow2"))
# Once more in the same process, the engine compiled: the work alone.
w = [c() for c in clocks]
recheck("again: ")
times["again: total"] = [c() - a for c, a in zip(clocks, w)]
print(json.dumps({"times": times, "modules": mods, "actions": decision.texts(),
                  "preallocation": observed.get("preallocation")}))
"""


def _module_names(tree):
    return tuple("." + name[:-3] for _d, _s, files in os.walk(tree) for name in files
                 if name.endswith(".py"))


MODULE_NAMES = _module_names(os.path.join(REPO, "plugins", "module_utils", "qcow2"))


def build_zip(tree, out):
    """The engine as AnsiballZ ships it: sources only, in a zip (ANSIBLE_KEEP_REMOTE_FILES=1
    and `python3 AnsiballZ_image.py explode` show its payload)."""
    base = os.path.join(tree, "plugins", "module_utils")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirs, files in os.walk(os.path.join(base, "qcow2")):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            # AnsiballZ gives every package directory an empty __init__.py.
            zf.writestr(os.path.join(os.path.relpath(dirpath, base), "__init__.py"), "")
            for name in files:
                if name.endswith(".py"):
                    full = os.path.join(dirpath, name)
                    zf.write(full, os.path.relpath(full, base))
    return out


def declaration(image):
    """The image's own options, as a declaration that matches it."""
    sys.path.insert(0, os.path.join(REPO, "plugins", "module_utils"))
    from qcow2 import api
    seen = api.observe(image)
    return {"size": seen["virtual_size"], "cluster_size": seen["cluster_size"],
            "preallocation": seen["preallocation"], "compat": seen["compat"],
            "refcount_bits": seen["refcount_bits"], "lazy_refcounts": None,
            "extended_l2": None, "compression_type": None, "backing_file": None,
            "backing_fmt": None, "data_file": None, "data_file_raw": None, "nocow": None,
            "source": None, "source_format": None, "source_backing_chain": None}


def run(zip_path, image, declared, profile=None):
    cmd = [sys.executable, "-B", "-c", CHILD, zip_path, image, json.dumps(declared),
           "1" if profile else "0"] + ([profile] if profile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout)


# What a profile's time is spent on: (label, predicate over (file, function name)).
CATEGORIES = [
    ("compile (zipimport, source to code)",
     lambda f, n: n in ("<built-in method builtins.compile>", "_compile_source")),
    ("L1/L2 table reads and decoding", lambda f, n: n in ("guest_runs",)),
    ("FIEMAP / SEEK_DATA of the host ranges", lambda f, n: n in ("_fiemap", "seek_segments")),
    ("header, extensions, refcount table (Image.open)", lambda f, n: n == "open" and
     f.endswith("image.py")),
    ("tail leak scan", lambda f, n: n == "tail_leaks"),
    ("lock probe", lambda f, n: n == "_in_use"),
    ("leftover search", lambda f, n: n == "add_leftover_cleanup"),
    ("stat, lstat, fstat calls",
     lambda f, n: n in ("<built-in method posix.stat>", "<built-in method posix.lstat>",
                        "<built-in method posix.fstat>")),
    ("result building (public_view, json)", lambda f, n: n in ("public_view", "dumps")),
]


def categorise(stats_path):
    import pstats
    stats = pstats.Stats(stats_path).stats
    out = []
    for label, pred in CATEGORIES:
        total = 0.0
        for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.items():
            if pred(filename, name):
                total += ct
        out.append((label, total))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("image")
    parser.add_argument("--tree", action="append")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    image = os.path.abspath(args.image)
    declared = declaration(image)
    trees = args.tree or [REPO]
    with tempfile.TemporaryDirectory() as tmp:
        zips = [build_zip(tree, os.path.join(tmp, "module_utils-%d.zip" % i))
                for i, tree in enumerate(trees)]
        for zip_path in zips:
            run(zip_path, image, declared)      # page cache warm, as on a re-run
        rounds = [[] for _tree in trees]
        for _round in range(args.rounds):
            for i, zip_path in enumerate(zips):
                rounds[i].append(run(zip_path, image, declared))
        for tree, zip_path, done in zip(trees, zips, rounds):
            first = done[0]
            if first["actions"]:
                sys.exit("the declaration does not match the image: %s" % first["actions"])
            print("tree %s, image %s (preallocation %s), %d rounds, median (min-max):"
                  % (tree, image, first["preallocation"], args.rounds))
            print("  engine modules imported: %d (%d packages)"
                  % (len([m for m in first["modules"] if m.endswith(MODULE_NAMES)]),
                     len([m for m in first["modules"] if not m.endswith(MODULE_NAMES)])))
            print("  %-20s %-24s %s" % ("step", "wall ms: median (min)", "CPU ms: median (min)"))
            for key in first["times"]:
                cols = []
                for clock in (0, 1):
                    values = [r["times"][key][clock] for r in done]
                    cols.append("%7.1f (%.1f)" % (1000 * statistics.median(values),
                                                  1000 * min(values)))
                print("  %-20s %-24s %s" % (key, cols[0], cols[1]))
            if args.profile:
                stats = os.path.join(tmp, "recheck.prof")
                run(zip_path, image, declared, profile=stats)
                print("  cProfile of one round (cumulative, with the profiler's overhead):")
                for label, seconds in categorise(stats):
                    print("    %-50s %8.1f ms" % (label, 1000 * seconds))


if __name__ == "__main__":
    main()
