# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Hostile-input campaign over the inspector and the module's decision logic.

Seeds are real images of many option sets (made by the engine and by qemu-img, some with guest
writes and a snapshot). Each input is a seed with seeded random mutations: byte flips,
boundary values written over header and table fields, truncation and extension. Every input
must end in the engine's error (Qcow2Error) or a valid result, within 2 s of CPU time, and
without the worker's address space growing past 256 MiB over its baseline (RLIMIT_AS).

The limit is CPU time (user + system, ITIMER_PROF), not wall-clock time: an input runs as long
on a busy machine as on an idle one in CPU seconds, so a loaded machine (other jobs sharing the
cores) cannot turn a 0.5 s input into a "hang", while a real hang (a loop that never ends) burns
CPU and is stopped at 2 s. A wall-clock backstop (60 s, ITIMER_REAL) catches an input that
blocks without using CPU. The slowest inputs are reported separately, by CPU and by wall time.

    python3 tests/reliability/fuzz_campaign.py --inputs 100000 --workers 2

Prints one JSON line of totals; exits 1 on any crash, hang or memory blow-up (and writes the
failing inputs to .scratch/fuzz-failures/).
"""

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
sys.path.insert(0, os.path.join(ROOT, "plugins", "module_utils"))

from qcow2 import api, reconcile  # noqa: E402
from qcow2.read import inspector  # noqa: E402
from qcow2.format.errors import Qcow2Error  # noqa: E402

CPU_LIMIT = 2.0  # seconds of CPU time (user + system) per input: the bound that counts
WALL_LIMIT = 60.0  # seconds of wall-clock time per input: only a backstop for blocked inputs
SLOWEST_KEPT = 5  # how many of the slowest inputs (by CPU time) the totals list
MEMORY_LIMIT = 256 << 20
BOUNDARY = (0, 1, 0x1FF, 0x200, 0x10000, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 55, 1 << 56,
            1 << 62, 1 << 63, (1 << 64) - 1)

SEED_OPTIONS = [
    {"size": "4M"},
    {"size": "4M", "compat": "0.10"},
    {"size": "4M", "cluster_size": 512},
    {"size": "4M", "cluster_size": 4096, "refcount_bits": 1},
    {"size": "4M", "refcount_bits": 64, "lazy_refcounts": True},
    {"size": "4M", "extended_l2": True, "compression_type": "zstd"},
    {"size": "4M", "preallocation": "metadata", "cluster_size": 4096},
    {"size": "2M", "preallocation": "full", "cluster_size": 4096},
    {"size": "2M", "preallocation": "falloc", "cluster_size": 16384, "extended_l2": True},
    {"size": "8M", "cluster_size": 2 << 20},
    {"size": "4M", "backing_file": "/etc/shadow", "backing_fmt": "raw"},
    {"size": "4M", "data_file": "DATA"},
]


def make_seeds(directory):
    """Seed images: engine-made, qemu-img-made, with guest writes and a snapshot."""
    seeds = []
    for i, opts in enumerate(SEED_OPTIONS):
        path = os.path.join(directory, "seed%d.qcow2" % i)
        if opts.get("data_file") == "DATA":
            opts = dict(opts, data_file=os.path.join(directory, "seed%d.data" % i))
        api.create(path, opts, check_backing=False)
        seeds.append(path)
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        for i, extra in enumerate(("", "cluster_size=512", "refcount_bits=4,compat=1.1")):
            path = os.path.join(directory, "qseed%d.qcow2" % i)
            cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
            if extra:
                cmd += ["-o", extra]
            subprocess.run(cmd + [path, "4M"], check=True)
            subprocess.run(["qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -z 1M 64k",
                            "-c", "write -c -P 0x22 2M 64k", path], check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run(["qemu-img", "snapshot", "-c", "snap", path], check=True)
            subprocess.run(["qemu-io", "-c", "write -P 0x33 0 4k", path], check=True,
                           stdout=subprocess.DEVNULL)
            seeds.append(path)
    return [open(p, "rb").read() for p in seeds]


def mutate(data, rng):
    buf = bytearray(data)
    for _m in range(rng.randint(1, 6)):
        hot = min(len(buf), 1 << 16)
        kind = rng.random()
        if kind < 0.35 and buf:
            pos = rng.randrange(hot if rng.random() < 0.7 else len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.7 and len(buf) > 8:
            fields = (4, 8, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64, 72, 80, 88, 96, 100, 104)
            if rng.random() < 0.5:
                pos = rng.choice(fields)
            else:
                pos = rng.randrange(0, len(buf) - 8) & ~7
            width = rng.choice((4, 8))
            value = rng.choice(BOUNDARY + (len(buf), len(buf) + 1, len(buf) - 1,
                                           rng.getrandbits(64)))
            value &= (1 << (8 * width)) - 1
            if pos + width <= len(buf):
                buf[pos:pos + width] = value.to_bytes(width, "big")
        elif kind < 0.85:
            del buf[rng.randrange(len(buf) + 1):]
        else:
            buf += bytes(rng.randrange(1, 1 << 16))
    return bytes(buf)


class Hang(BaseException):
    """An input ran out of its CPU time or its wall-clock backstop.

    A BaseException, so that no `except Exception` in the code under test can swallow it."""

    def __init__(self, limit):
        BaseException.__init__(self, limit)
        self.limit = limit


_armed = False


def _expired(signum, frame):
    # A signal already pending when the timers are disarmed must not hit the next input.
    if _armed:
        raise Hang("cpu" if signum == signal.SIGPROF else "wall")


def _arm():
    global _armed
    _armed = True
    signal.setitimer(signal.ITIMER_PROF, CPU_LIMIT)
    signal.setitimer(signal.ITIMER_REAL, WALL_LIMIT)


def _disarm():
    global _armed
    _armed = False
    signal.setitimer(signal.ITIMER_PROF, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)


def _keep_slowest(slowest, entries):
    """The SLOWEST_KEPT entries with the most CPU time (ties by wall time)."""
    merged = sorted(slowest + entries, key=lambda e: (e["cpu_s"], e["wall_s"]), reverse=True)
    return merged[:SLOWEST_KEPT]


def exercise(path):
    """Everything that reads an untrusted image; returns 'error' or 'ok'."""
    try:
        image = inspector.Image.open(path)
        try:
            inspector.info(path, image=image)
            inspector.check(path, image=image)
            inspector.block_map(path, image=image)
            inspector.allocation_state(path, image=image)
        finally:
            close = getattr(image, "close", None)
            if close:
                close()
        observed = api.observe(path)
        decision = reconcile.decide({"size": "8M", "preallocation": "full",
                                     "cluster_size": 65536}, observed)
        # The in-place guard and the guest-view planners, read-only (what check mode runs).
        if observed is not None and observed.get("qcow2"):
            api.preflight(path, decision)
        return "ok"
    except Qcow2Error:
        return "error"


def worker(args):
    seeds, first, count, seed, outdir = args
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as handle:
        baseline = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (baseline + MEMORY_LIMIT, hard))
    signal.signal(signal.SIGPROF, _expired)
    signal.signal(signal.SIGALRM, _expired)
    rng = random.Random(seed)
    totals = {"inputs": 0, "ok": 0, "error": 0, "crash": 0, "hang": 0, "memory": 0,
              "slowest_cpu_s": 0.0, "slowest_wall_s": 0.0, "slowest": []}
    workdir = tempfile.mkdtemp(prefix="fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                               else None)
    path = os.path.join(workdir, "input.qcow2")
    try:
        for n in range(first, first + count):
            data = mutate(rng.choice(seeds), rng)
            with open(path, "wb") as handle:
                handle.write(data)
            start_wall = time.monotonic()
            start_cpu = time.process_time()
            outcome = None
            detail = ""
            try:
                _arm()
                outcome = exercise(path)
            except Hang as exc:
                outcome = "hang"
                detail = ("over %g s of CPU time" % CPU_LIMIT if exc.limit == "cpu"
                          else "over %g s of wall-clock time" % WALL_LIMIT)
            except MemoryError:
                outcome = "memory"
            except Exception as exc:  # noqa: BLE001 - any other exception is a finding
                outcome = "crash"
                detail = "%s: %s" % (type(exc).__name__, exc)
            finally:
                _disarm()
            cpu = time.process_time() - start_cpu
            wall = time.monotonic() - start_wall
            totals["inputs"] += 1
            totals[outcome] += 1
            totals["slowest_cpu_s"] = max(totals["slowest_cpu_s"], cpu)
            totals["slowest_wall_s"] = max(totals["slowest_wall_s"], wall)
            if (len(totals["slowest"]) < SLOWEST_KEPT
                    or cpu > totals["slowest"][-1]["cpu_s"]):
                totals["slowest"] = _keep_slowest(totals["slowest"], [
                    {"input": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                     "outcome": outcome}])
            if outcome in ("crash", "hang", "memory"):
                detail = "%s\ncpu %.3f s, wall %.3f s" % (detail, cpu, wall)
                os.makedirs(outdir, exist_ok=True)
                with open(os.path.join(outdir, "input-%d.qcow2" % n), "wb") as handle:
                    handle.write(data)
                with open(os.path.join(outdir, "input-%d.txt" % n), "w") as handle:
                    handle.write(outcome + "\n" + detail)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return totals


def campaign(inputs, workers, seed=1, outdir=None):
    outdir = outdir or os.path.join(ROOT, ".scratch", "fuzz-failures")
    seeddir = tempfile.mkdtemp(prefix="fuzz-seeds-")
    try:
        seeds = make_seeds(seeddir)
    finally:
        shutil.rmtree(seeddir, ignore_errors=True)
    per = inputs // workers
    jobs = [(seeds, i * per, per + (inputs - per * workers if i == workers - 1 else 0),
             seed * 1000 + i, outdir) for i in range(workers)]
    start = time.monotonic()
    if workers == 1:
        results = [worker(jobs[0])]
    else:
        # forkserver, not fork: the calling process may have threads (pytest's, a Pool's), and
        # a forked child of a threaded process can deadlock (Python 3.12+ warns about it).
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            results = pool.map(worker, jobs)
    totals = {"seeds": len(seeds), "seconds": round(time.monotonic() - start, 1)}
    totals["cpu_limit_s"] = CPU_LIMIT
    totals["wall_limit_s"] = WALL_LIMIT
    slowest = []
    for res in results:
        for key, value in res.items():
            if key == "slowest":
                slowest = _keep_slowest(slowest, value)
            elif key in ("slowest_cpu_s", "slowest_wall_s"):
                totals[key] = round(max(totals.get(key, 0.0), value), 3)
            else:
                totals[key] = totals.get(key, 0) + value
    # Last, so the one-line summary reads totals first.
    totals["slowest"] = slowest
    return totals


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, default=100000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    totals = campaign(args.inputs, args.workers, args.seed)
    print(json.dumps(totals))
    sys.exit(1 if totals["crash"] or totals["hang"] or totals["memory"] else 0)


if __name__ == "__main__":
    main()
