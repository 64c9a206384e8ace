# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Differential campaign: mutated qemu-made images judged by qemu-img and by the engine.

Seeds are images qemu-img and qemu-io make (v2 and v3, extended L2, internal snapshots,
persistent bitmaps, compressed clusters, an external data file, LUKS encryption, 512 B and
2 MiB clusters, guest writes). Each input is one seed with seeded mutations: random byte flips,
boundary values written over header fields, extension headers, table entries and snapshot or
bitmap directory entries, and truncation.

Each mutant goes to `qemu-img check --output=json` (with the LUKS secret, so an encrypted image
can be opened) and, when that finds nothing fatal, to `qemu-img info` (which reads the snapshot
table check mode skips). The engine opens it (`Image`) and checks it (`inspector.check`).

The finding that matters: QEMU refuses the image or finds corruptions, and the engine calls it
clean (opens it and its check finds no corruption and no error). The reverse (the engine refuses
or finds errors where QEMU is content) is counted and shown with examples, not a failure.
Refusals for reasons outside the engine's model (a backing file or data file that cannot be
opened, a LUKS key slot that does not unlock) are counted apart.

The engine's side is bounded by CPU time (ITIMER_PROF), never by wall-clock time.

    python3 tests/reliability/differential_campaign.py --inputs 2500 --workers 2 --seed 1

Prints one JSON line of totals; exits 1 when the engine called clean what QEMU refused.
"""

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
sys.path.insert(0, os.path.join(ROOT, "plugins", "module_utils"))

from qcow2.read import inspector  # noqa: E402
from qcow2.format.errors import Qcow2Error  # noqa: E402

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
SECRET = "pw"
CPU_LIMIT = 5.0          # CPU seconds for the engine's side of one input
EXAMPLES = 8             # examples kept per category
BOUNDARY = (0, 1, 7, 8, 0x1FF, 0x200, 0x10000, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
            1 << 55, 1 << 56, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
# Refusals caused by things the engine does not model: other files, or decryption.
OUT_OF_MODEL = ("Could not open backing file", "No such file or directory", "backing file",
                "Invalid password", "cannot unlock", "Is a directory", "Permission denied",
                "json:", "Unknown driver", "Unknown protocol")

# (kind, qemu-img create options, size, extra steps)
SEEDS = (
    ("v3-64k", [], "4M", ["write"]),
    ("v2", ["compat=0.10"], "4M", ["write"]),
    ("v3-512b", ["cluster_size=512"], "1M", ["write"]),
    ("v3-2m", ["cluster_size=2M"], "8M", ["write"]),
    ("extl2", ["extended_l2=on", "cluster_size=64k"], "4M", ["write"]),
    ("refbits1", ["refcount_bits=1", "cluster_size=4k"], "2M", ["write"]),
    ("refbits64", ["refcount_bits=64", "lazy_refcounts=on"], "4M", ["write"]),
    ("snapshot", [], "4M", ["write", "snapshot", "write2"]),
    ("snapshot-v2", ["compat=0.10"], "4M", ["write", "snapshot"]),
    ("bitmap", [], "4M", ["write", "bitmap"]),
    ("compressed", ["cluster_size=4k"], "2M", ["cwrite"]),
    ("zstd", ["compression_type=zstd", "cluster_size=4k"], "2M", ["cwrite"]),
    ("datafile", ["data_file=SEED.data"], "2M", ["write"]),
    ("datafile-raw", ["data_file=SEED.data", "data_file_raw=on"], "2M", ["write"]),
    ("luks", ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=50"],
     "2M", []),
)


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, errors="replace",
                          check=False,
                          **kwargs)


def _opts(path):
    return ["--object", "secret,id=sec0,data=%s" % SECRET, "--image-opts",
            "driver=qcow2,file.filename=%s,encrypt.key-secret=sec0" % path]


def make_seeds(directory):
    """[(kind, image bytes, {side file name: bytes}, fields)]"""
    seeds = []
    for kind, opts, size, steps in SEEDS:
        name = "%s.qcow2" % kind
        path = os.path.join(directory, name)
        opts = [o.replace("SEED", kind) for o in opts]
        cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
        if kind == "luks":
            cmd += ["--object", "secret,id=sec0,data=%s" % SECRET]
        cmd += ["-o", ",".join(opts)] if opts else []
        for _attempt in range(10):  # LUKS key derivation timing can fail on a busy machine
            proc = run(*(cmd + [name, size]), cwd=directory)
            if not proc.returncode:
                break
        if proc.returncode:
            raise RuntimeError("qemu-img create %s: %s" % (kind, proc.stderr))
        for step in steps:
            if step == "write":
                _io(directory, name, "write -P 0x5a 0 96k", "write -z 512k 64k",
                    "write -P 0x11 768k 8k")
            elif step == "write2":
                _io(directory, name, "write -P 0x33 64k 64k")
            elif step == "cwrite":
                _io(directory, name, "write -c -P 0x41 0 16k", "write -c -P 0x42 64k 4k")
            elif step == "snapshot":
                _ok(run(QEMU_IMG, "snapshot", "-c", "snap1", name, cwd=directory))
            elif step == "bitmap":
                _ok(run(QEMU_IMG, "bitmap", "--add", name, "bm0", cwd=directory))
                _ok(run(QEMU_IMG, "bitmap", "--add", "-g", "128k", name, "bm1",
                        cwd=directory))
        with open(path, "rb") as handle:
            data = handle.read()
        side = {}
        if kind.startswith("datafile"):
            with open(os.path.join(directory, "%s.data" % kind), "rb") as handle:
                side["%s.data" % kind] = handle.read()
        seeds.append((kind, data, side, fields_of(path, data)))
    return seeds


def _io(directory, name, *commands):
    args = [QEMU_IO, "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    _ok(run(*(args + [name]), cwd=directory))


def _ok(proc):
    if proc.returncode:
        raise RuntimeError("%s%s" % (proc.stdout, proc.stderr))


def fields_of(path, data):
    """Places worth mutating: [(what, offset, width)] over the header, the extension
    headers, the first table entries, snapshot and bitmap directory entries, the LUKS header."""
    fields = [("header+%d" % off, off, width) for off, width in (
        (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
        (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1))]
    img = inspector.Image.open(path)
    try:
        hdr = img.header
        cs = img.cluster_size
        pos = hdr.header_length
        while pos + 8 <= cs:
            ext_type, length = struct.unpack_from(">II", data, pos)
            fields.append(("ext@%d.type" % pos, pos, 4))
            fields.append(("ext@%d.len" % pos, pos + 4, 4))
            if ext_type == 0:
                break
            for off in range(0, min(length, 24), 8):
                fields.append(("ext@%d.data+%d" % (pos, off), pos + 8 + off, 8))
            pos += 8 + ((length + 7) & ~7)
        for i in range(min(hdr.l1_size, 4)):
            fields.append(("l1[%d]" % i, hdr.l1_table_offset + 8 * i, 8))
        for i in range(4):
            fields.append(("reftable[%d]" % i, hdr.refcount_table_offset + 8 * i, 8))
        if hdr.nb_snapshots:
            base = hdr.snapshots_offset
            for off, width in ((0, 8), (8, 4), (12, 2), (14, 2), (32, 4), (36, 4), (40, 8),
                               (48, 8)):
                fields.append(("snapshot0+%d" % off, base + off, width))
        if img.nb_bitmaps:
            base = img.bitmap_directory_offset
            for off, width in ((0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4)):
                fields.append(("bitmapdir0+%d" % off, base + off, width))
            for bm in img.bitmaps()[:1]:
                fields.append(("bitmaptable0[0]", bm["table_offset"], 8))
        if img.crypto_offset:
            base = img.crypto_offset
            for off, width in ((0, 4), (4, 2), (6, 2), (104, 4), (108, 4), (168, 4),
                               (208, 4), (212, 4)):
                fields.append(("luks+%d" % off, base + off, width))
    finally:
        img.close()
    return [f for f in fields if f[1] + f[2] <= len(data)]


def mutate(seed, rng):
    """One mutant of `seed` and the list of what was done to it."""
    _kind, data, _side, fields = seed
    buf = bytearray(data)
    done = []
    for _m in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.3 and buf:
            hot = min(len(buf), 1 << 16)
            pos = rng.randrange(hot if rng.random() < 0.6 else len(buf))
            bit = rng.randrange(8)
            buf[pos] ^= 1 << bit
            done.append("flip byte %d bit %d" % (pos, bit))
        elif kind < 0.9 and fields:
            what, pos, width = rng.choice(fields)
            if pos + width > len(buf):
                continue
            old = int.from_bytes(bytes(buf[pos:pos + width]), "big")
            value = rng.choice(BOUNDARY + (old + 1, old - 1, old ^ (1 << rng.randrange(
                8 * width)), old + 512, old + 8, len(buf), rng.getrandbits(64)))
            value &= (1 << (8 * width)) - 1
            buf[pos:pos + width] = value.to_bytes(width, "big")
            done.append("%s (offset %d) %#x -> %#x" % (what, pos, old, value))
        else:
            cut = rng.randrange(len(buf) + 1)
            del buf[cut:]
            done.append("truncate to %d" % cut)
    return bytes(buf), done


def _reason(text):
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for line in lines:
        if line.startswith("qemu-img:") or line.startswith("ERROR"):
            return line[:200]
    return (lines[0][:200] if lines else "")


def qemu_verdict(path, cwd):
    """('refused'|'check-error'|'corrupt'|'leaks'|'clean', reason)"""
    proc = run(QEMU_IMG, "check", "--output=json", *_opts(path), cwd=cwd)
    code = proc.returncode
    data = None
    if proc.stdout.strip():
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            data = None
    if code == 2:
        return "corrupt", _reason(proc.stderr)
    if code not in (0, 3):
        if data is not None and data.get("check-errors"):
            return "check-error", _reason(proc.stderr)
        return "refused", _reason(proc.stderr) or "exit %d" % code
    info = run(QEMU_IMG, "info", "--output=json", *_opts(path), cwd=cwd)
    if info.returncode:
        return "refused", _reason(info.stderr) or "info exit %d" % info.returncode
    return ("leaks" if code == 3 else "clean"), ""


class Hang(BaseException):
    """The engine's side ran out of CPU time."""


_armed = False


def _expired(signum, frame):
    if _armed:
        raise Hang()


def our_verdict(path):
    """('refused'|'errors'|'clean'|'hang'|'crash', reason), the engine's side, CPU bounded."""
    global _armed
    _armed = True
    signal.setitimer(signal.ITIMER_PROF, CPU_LIMIT)
    try:
        try:
            image = inspector.Image.open(path)
        except Qcow2Error as exc:
            return "refused", str(exc)[:200]
        try:
            result = inspector.check(path, image=image)
        except Qcow2Error as exc:
            return "errors", str(exc)[:200]
        finally:
            image.close()
        if result.get("corruptions") or result.get("check-errors"):
            return "errors", "; ".join(result.get("messages", [])[:1])[:200]
        return "clean", ""
    except Hang:
        return "hang", "over %g s of CPU time" % CPU_LIMIT
    except Exception as exc:  # noqa: BLE001 - any other exception is a finding
        return "crash", "%s: %s" % (type(exc).__name__, exc)
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)


def _out_of_model(reason):
    low = reason.lower()
    return any(word.lower() in low for word in OUT_OF_MODEL)


def worker(args):
    seeds, first, count, seed = args
    signal.signal(signal.SIGPROF, _expired)
    rng = random.Random(seed)
    totals = {"mutants": 0, "qemu_refused": 0, "qemu_check_error": 0, "qemu_corrupt": 0,
              "qemu_leaks": 0, "qemu_clean": 0, "qemu_out_of_model": 0, "we_refused": 0,
              "we_errors": 0, "we_clean": 0, "we_hang": 0, "we_crash": 0,
              "missed": 0, "stricter": 0}
    examples = {"missed": [], "stricter": [], "out_of_model": [], "crash": []}
    workdir = tempfile.mkdtemp(prefix="diff-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                               else None)
    path = os.path.join(workdir, "input.qcow2")
    written_sides = set()
    try:
        for n in range(first, first + count):
            chosen = rng.choice(seeds)
            kind, _data, side, _fields = chosen
            for name, content in side.items():
                if name not in written_sides:
                    with open(os.path.join(workdir, name), "wb") as handle:
                        handle.write(content)
                    written_sides.add(name)
            data, done = mutate(chosen, rng)
            with open(path, "wb") as handle:
                handle.write(data)
            theirs, their_reason = qemu_verdict(path, workdir)
            ours, our_reason = our_verdict(path)
            totals["mutants"] += 1
            totals["qemu_" + theirs.replace("-", "_")] += 1
            totals["we_" + ours] += 1
            record = {"input": n, "seed": seed, "kind": kind, "mutation": done,
                      "qemu": "%s: %s" % (theirs, their_reason),
                      "ours": "%s: %s" % (ours, our_reason)}
            if ours in ("hang", "crash"):
                _keep(examples["crash"], record)
            if theirs in ("refused", "check-error", "corrupt") and ours == "clean":
                if theirs != "corrupt" and _out_of_model(their_reason):
                    totals["qemu_out_of_model"] += 1
                    _keep(examples["out_of_model"], record)
                else:
                    totals["missed"] += 1
                    examples["missed"].append(record)
            elif theirs in ("clean", "leaks") and ours in ("refused", "errors"):
                totals["stricter"] += 1
                _keep(examples["stricter"], record)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    totals["examples"] = examples
    return totals


def _keep(bucket, record):
    if len(bucket) < EXAMPLES:
        bucket.append(record)


def campaign(inputs, workers, seed=1):
    seeddir = tempfile.mkdtemp(prefix="diff-seeds-")
    try:
        seeds = make_seeds(seeddir)
    finally:
        shutil.rmtree(seeddir, ignore_errors=True)
    per = inputs // workers
    jobs = [(seeds, i * per, per + (inputs - per * workers if i == workers - 1 else 0),
             seed * 1000 + i) for i in range(workers)]
    start = time.monotonic()
    if workers == 1:
        results = [worker(jobs[0])]
    else:
        # forkserver, not fork: the calling process may have threads (pytest's, a Pool's), and
        # a forked child of a threaded process can deadlock (Python 3.12+ warns about it).
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            results = pool.map(worker, jobs)
    totals = {"seed": seed, "seeds": len(seeds), "seconds": 0.0}
    examples = {}
    for res in results:
        for key, value in res.items():
            if key == "examples":
                for cat, records in value.items():
                    bucket = examples.setdefault(cat, [])
                    bucket.extend(records if cat == "missed"
                                  else records[:max(0, EXAMPLES - len(bucket))])
            else:
                totals[key] = totals.get(key, 0) + value
    totals["seconds"] = round(time.monotonic() - start, 1)
    totals["examples"] = examples
    return totals


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int,
                        default=int(os.environ.get("VDISK_DIFF_INPUTS", "1500")))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("VDISK_DIFF_SEED", "1")))
    args = parser.parse_args()
    totals = campaign(args.inputs, args.workers, args.seed)
    print(json.dumps(totals))
    sys.exit(1 if totals["missed"] or totals["we_crash"] or totals["we_hang"] else 0)


if __name__ == "__main__":
    main()
