# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The Ansible-level benchmark: idempotent re-runs of the collection against the cheapest thing
a playbook can do on the same paths (ansible.builtin.stat), and against qemu-img, side by side.

    python3 tests/perf/fleet.py [--rounds N] [--hosts 16] [--only local,hosts] [--keep-hosts]
                                [--qemu-img-tasks]

Two groups, each a set of whole `ansible-playbook` runs timed from outside (wall clock, start-up
included), run in rotation within every round (A B C ..., then B C ... A, ...) after one
warm-up round that is not counted:

- local: on localhost, one playbook of 24 re-check tasks of vdisk.qcow2.image on a 1 TiB
  preallocation=metadata image; 24 ansible.builtin.stat tasks on the same path; one shell task
  running `qemu-img info` 24 times (and with --qemu-img-tasks 24 ansible.builtin.command tasks
  of `qemu-img info`); and an empty play (the fixed cost of starting ansible-playbook,
  subtracted to get the cost per task).
- hosts: N network-namespace hosts (tests/hosts/nshosts.sh, its own prefix, network, state
  directory and user, so it never meets the remote tests' hosts) with 4 images each, forks N:
  a vdisk.qcow2.image loop over the 4 paths, an ansible.builtin.stat loop over them, the role
  vdisk.qcow2.images, one vdisk.qcow2.images task per host when that module is in the tree
  (skipped with the reason printed otherwise), and an empty play.

Every image is created once before the timings (by the module itself); every timed run must
report no change and no failure on any host. Ansible's settings are fixed (see ENV below).
Writes tests/perf/results/bench-<timestamp>.json (rows of kind "fleet", merged into the chart
like the other cases) and prints the tables and the targets.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
PLAYBOOK = os.path.join(ROOT, ".venv-ansible", "bin", "ansible-playbook")
ANSIBLE_DOC = os.path.join(ROOT, ".venv-ansible", "bin", "ansible-doc")
QEMU_IMG = shutil.which("qemu-img")
NSHOSTS = os.path.join(ROOT, "tests", "hosts", "nshosts.sh")

# The benchmark's own set of namespace hosts: never the remote tests' (vdq, 10.231.0, vdqtest).
HOSTS_ENV = {
    "VDQ_PREFIX": os.environ.get("FLEET_VDQ_PREFIX", "vdb"),
    "VDQ_NET": os.environ.get("FLEET_VDQ_NET", "10.232.0"),
    "VDQ_STATE": os.environ.get("FLEET_VDQ_STATE", os.path.join(ROOT, ".scratch", "bench-hosts")),
    "VDQ_USER": os.environ.get("FLEET_VDQ_USER", "vdqbench"),
}

TASKS = 24          # local group: tasks per playbook
LOCAL_SIZE = "1T"   # local group: the image re-checked

# The four images of every host: one per preallocation mode (as the scale scenario).
HOST_IMAGES = [
    {"name": "off", "size": "20G", "preallocation": "'off'"},   # quoted: YAML reads off as false
    {"name": "metadata", "size": "20G", "preallocation": "metadata"},
    {"name": "falloc", "size": "256M", "preallocation": "falloc"},
    {"name": "full", "size": "128M", "preallocation": "full"},
]

# (row name, ours, reference, what the target applies to, limit)
TARGETS = [
    ("local: image vs stat, per task", 1.20),
    ("hosts: image loop vs stat loop", 1.15),
    ("hosts: role images vs stat loop", 0.50),
]


def env_for(workdir, forks):
    """Ansible's settings, fixed: nothing from the caller's environment or an ansible.cfg."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    cfg = os.path.join(workdir, "ansible.cfg")
    with open(cfg, "w") as handle:
        handle.write("[defaults]\n")
    coll = os.path.join(ROOT, ".scratch", "collections")
    link = os.path.join(coll, "ansible_collections", "vdisk", "qcow2")
    if not os.path.islink(link) and not os.path.exists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(ROOT, link)
    env.update({
        "ANSIBLE_CONFIG": cfg,
        "ANSIBLE_COLLECTIONS_PATH": coll,
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_GATHERING": "explicit",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        # The default callback printing only task banners, the recap and failures: a few
        # lines per task, not a result per host and item.
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
        "ANSIBLE_DISPLAY_OK_HOSTS": "False",
        "ANSIBLE_DISPLAY_SKIPPED_HOSTS": "False",
        "ANSIBLE_FORKS": str(forks),
        # One master connection per host, kept between the runs; no compression on a local
        # bridge (it only costs CPU).
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=900s",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": os.path.join(workdir, "tmp"),
    })
    return env


def play(hosts, tasks, extra=""):
    head = "- hosts: %s\n  gather_facts: false\n%s" % (hosts, extra)
    return head + ("  tasks:\n" + tasks if tasks else "  tasks: []\n")


def write(path, text):
    with open(path, "w") as handle:
        handle.write(text)
    return path


def local_arms(workdir, image, qemu_img_tasks):
    """{arm: playbook} of the local group."""
    extra = ("  connection: local\n  vars:\n"
             "    ansible_python_interpreter: '{{ ansible_playbook_python }}'\n")
    img = ("    - name: re-check %%d\n      vdisk.qcow2.image: {path: %s, size: %s, "
           "preallocation: metadata}\n" % (image, LOCAL_SIZE))
    stat = ("    - name: stat %%d\n      ansible.builtin.stat: {path: %s, get_checksum: false, "
            "get_mime: false, get_attributes: false}\n" % image)
    info = ("    - name: qemu-img info %%d\n      ansible.builtin.command: "
            "%s info --output=json %s\n      changed_when: false\n" % (QEMU_IMG, image))
    shell = ("    - name: qemu-img info x%d in one shell task\n      ansible.builtin.shell: "
             "for i in $(seq %d); do %s info --output=json %s >/dev/null; done\n"
             "      changed_when: false\n" % (TASKS, TASKS, QEMU_IMG, image))
    arms = {
        "image": "".join(img % i for i in range(TASKS)),
        "stat": "".join(stat % i for i in range(TASKS)),
        "qemu-img info shell": shell,
        "empty": "",
    }
    if qemu_img_tasks:
        arms["qemu-img info tasks"] = "".join(info % i for i in range(TASKS))
    return {name: write(os.path.join(workdir, "local-%s.yml" % name.replace(" ", "-")),
                        play("localhost", tasks, extra))
            for name, tasks in arms.items()}


def images_module_option():
    """(option name, None) of the list option of vdisk.qcow2.images, or (None, reason)."""
    if not os.path.exists(os.path.join(ROOT, "plugins", "modules", "images.py")):
        return None, "plugins/modules/images.py is not in this tree"
    env = env_for_doc()
    proc = subprocess.run([ANSIBLE_DOC, "-t", "module", "-j", "vdisk.qcow2.images"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, check=False)
    if proc.returncode != 0:
        return None, "ansible-doc vdisk.qcow2.images failed: %s" % proc.stderr.strip()[-300:]
    doc = json.loads(proc.stdout)["vdisk.qcow2.images"]["doc"]
    lists = [name for name, spec in doc.get("options", {}).items()
             if spec.get("type") == "list" and spec.get("elements") == "dict"]
    if not lists:
        return None, "vdisk.qcow2.images has no list-of-dicts option"
    # The list of images, by its likely names first.
    for name in ("images", "items", "qcow2_images"):
        if name in lists:
            return name, None
    return lists[0], None


def env_for_doc():
    env = dict(os.environ)
    env["ANSIBLE_COLLECTIONS_PATH"] = os.path.join(ROOT, ".scratch", "collections")
    return env


def host_arms(workdir, option):
    """{arm: playbook} of the hosts group."""
    extra = "  become: true\n  vars:\n    fleet_dir: \"%s/{{ inventory_hostname }}/images\"\n" \
        % HOSTS_ENV["VDQ_STATE"]
    items = "".join("      - {path: \"{{ fleet_dir }}/%s.qcow2\", size: %s, preallocation: %s}\n"
                    % (i["name"], i["size"], i["preallocation"]) for i in HOST_IMAGES)
    # The role as its README shows it first: in the play's roles, the list in its vars.
    role = ("  roles:\n    - role: vdisk.qcow2.images\n      vars:\n        qcow2_images:\n"
            + items.replace("      - ", "          - "))
    loop = "      loop:\n" + items.replace("      - ", "        - ")
    arms = {
        "image loop": "    - name: image loop\n      vdisk.qcow2.image:\n"
                      "        path: \"{{ item.path }}\"\n        size: \"{{ item.size }}\"\n"
                      "        preallocation: \"{{ item.preallocation }}\"\n" + loop,
        "stat loop": "    - name: stat loop\n      ansible.builtin.stat:\n"
                     "        path: \"{{ item.path }}\"\n        get_checksum: false\n"
                     "        get_mime: false\n        get_attributes: false\n" + loop,
        "empty": "",
    }
    if option:
        arms["images module"] = ("    - name: images module\n      vdisk.qcow2.images:\n"
                                 "        %s:\n" % option
                                 + items.replace("      - ", "          - "))
    books = {name: write(os.path.join(workdir, "hosts-%s.yml" % name.replace(" ", "-")),
                         play("nshosts", tasks, extra))
             for name, tasks in arms.items()}
    books["role images"] = write(os.path.join(workdir, "hosts-role-images.yml"),
                                 play("nshosts", "", extra + role).replace("  tasks: []\n", ""))
    return books


RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.M)


def run(playbook, env, inventory, log, expect_hosts, idempotent=True):
    """Seconds of one whole ansible-playbook run; raises when it failed or changed something."""
    cmd = [PLAYBOOK, "-i", inventory, playbook]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              cwd=os.path.dirname(playbook), timeout=900, check=False)
    seconds = time.perf_counter() - start
    with open(log) as handle:
        text = handle.read()
    recap = RECAP.findall(text)
    bad = [r for r in recap if int(r[3]) or int(r[4]) or (idempotent and int(r[2]))]
    if proc.returncode != 0 or bad or (expect_hosts and len(recap) != expect_hosts):
        name = os.path.basename(playbook)
        sys.exit("%s: rc %d, recap %s\n%s" % (name, proc.returncode, recap, text[-3000:]))
    return seconds


def rounds_of(arms, env, inventory, workdir, rounds, expect_hosts):
    """{arm: [seconds per counted round]}, rotating the order every round; round 0 discarded."""
    names = list(arms)
    times = {name: [] for name in names}
    for rnd in range(rounds + 1):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        line = []
        for name in order:
            log = os.path.join(workdir, "last-%s.log" % name.replace(" ", "-"))
            sec = run(arms[name], env, inventory, log, expect_hosts if name != "empty" else 0)
            if rnd:
                times[name].append(sec)
            line.append("%s %.2f" % (name, sec))
        sys.stderr.write("  %s: %s\n" % ("warm-up" if rnd == 0 else "round %d" % rnd,
                                         ", ".join(line)))
    return times


def stats(values):
    med = statistics.median(values)
    return {"median_s": med, "min_s": min(values), "max_s": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "rounds_s": values}


def compare(name, group, times, ours, ref, per_task=None, target=None):
    """A row: ours against ref, whole runs and (per_task=N) per task after the empty play."""
    a, b, empty = times[ours], times[ref], times["empty"]
    row = {"name": name, "kind": "fleet", "group": group, "ours": ours, "reference": ref,
           "ours_median_s": statistics.median(a), "ref_median_s": statistics.median(b),
           "ours_stats": stats(a), "ref_stats": stats(b), "empty_stats": stats(empty)}
    whole = [x / y for x, y in zip(a, b)]
    row["whole_ratio"] = statistics.median(whole)
    row["whole_ratio_min"], row["whole_ratio_max"] = min(whole), max(whole)
    net = [(x - e) / max(y - e, 1e-3) for x, y, e in zip(a, b, empty)]
    row["net_ratio"] = statistics.median(net)
    row["net_ratio_min"], row["net_ratio_max"] = min(net), max(net)
    row["net_ours_s"] = statistics.median([x - e for x, e in zip(a, empty)])
    row["net_ref_s"] = statistics.median([y - e for y, e in zip(b, empty)])
    if per_task:
        row["tasks"] = per_task
        row["ours_per_task_s"] = row["net_ours_s"] / per_task
        row["ref_per_task_s"] = row["net_ref_s"] / per_task
        row["ratio"], row["ratio_min"], row["ratio_max"] = (
            row["net_ratio"], row["net_ratio_min"], row["net_ratio_max"])
        row["ratio_basis"] = "per task (the empty play's time subtracted, paired by round)"
    else:
        row["ratio"], row["ratio_min"], row["ratio_max"] = (
            row["whole_ratio"], row["whole_ratio_min"], row["whole_ratio_max"])
        row["ratio_basis"] = "whole ansible-playbook runs, paired by round"
    if target is not None:
        row["target"] = target
    return row


def hosts_cmd(*args):
    env = dict(os.environ, **HOSTS_ENV)
    subprocess.run(["bash", NSHOSTS] + list(args), env=env, check=True,
                   stdout=sys.stderr)


def run_local(workdir, rounds, qemu_img_tasks):
    env = env_for(workdir, 1)
    image = os.path.join(workdir, "local-1T.qcow2")
    if os.path.exists(image):
        os.unlink(image)
    arms = local_arms(workdir, image, qemu_img_tasks)
    inv = write(os.path.join(workdir, "local-inventory.ini"), "localhost\n")
    sys.stderr.write("local: creating the 1 TiB metadata image (not timed)\n")
    run(arms["image"], env, inv, os.path.join(workdir, "create-local.log"), 1, idempotent=False)
    times = rounds_of(arms, env, inv, workdir, rounds, 1)
    limit = dict(TARGETS)
    rows = [
        compare("local: image vs stat, per task", "local", times, "image", "stat", TASKS,
                limit["local: image vs stat, per task"]),
        # qemu-img's own cost of one inspection: the shell task's time net of the empty
        # play, over 24 (one task's overhead is left in, so this is an upper bound).
        compare("local: image per task vs one qemu-img info call", "local", times, "image",
                "qemu-img info shell", TASKS),
    ]
    if qemu_img_tasks:
        rows += [
            compare("local: image vs qemu-img info command tasks, per task", "local", times,
                    "image", "qemu-img info tasks", TASKS),
            compare("local: stat vs qemu-img info command tasks, per task", "local", times,
                    "stat", "qemu-img info tasks", TASKS),
        ]
    os.unlink(image)
    return rows, {k: stats(v) for k, v in times.items()}


def run_hosts(workdir, rounds, nhosts, keep):
    option, reason = images_module_option()
    skipped = []
    if option is None:
        skipped.append({"name": "hosts: images module vs stat loop", "reason": reason})
        sys.stderr.write("hosts: the images-module row is skipped: %s\n" % reason)
    env = env_for(workdir, nhosts)
    arms = host_arms(workdir, option)
    hosts_cmd("up", str(nhosts))
    try:
        inv = os.path.join(HOSTS_ENV["VDQ_STATE"], "inventory.yml")
        sys.stderr.write("hosts: creating %d images on each of %d hosts (not timed)\n"
                         % (len(HOST_IMAGES), nhosts))
        run(arms["image loop"], env, inv, os.path.join(workdir, "create-hosts.log"), nhosts,
            idempotent=False)
        times = rounds_of(arms, env, inv, workdir, rounds, nhosts)
    finally:
        if not keep:
            hosts_cmd("down")
    limit = dict(TARGETS)
    rows = [
        compare("hosts: image loop vs stat loop", "hosts", times, "image loop", "stat loop",
                target=limit["hosts: image loop vs stat loop"]),
        compare("hosts: role images vs stat loop", "hosts", times, "role images", "stat loop",
                target=limit["hosts: role images vs stat loop"]),
    ]
    if option:
        rows.append(compare("hosts: images module vs stat loop", "hosts", times,
                            "images module", "stat loop"))
    return rows, {k: stats(v) for k, v in times.items()}, skipped, option


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--rounds", type=int, default=None, help="counted rounds of both groups "
                        "(a warm-up round comes first and is discarded); default: local 4, "
                        "hosts 3 (on a busy 2-core machine the local runs vary much more, the "
                        "hosts' runs within a few per cent)")
    parser.add_argument("--local-rounds", type=int, default=4)
    parser.add_argument("--hosts-rounds", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=16, help="namespace hosts (forks as many)")
    parser.add_argument("--only", default="local,hosts",
                        help="groups: local, hosts (`fleet` means both)")
    parser.add_argument("--dir", default=os.path.join(ROOT, ".scratch", "bench", "fleet"))
    parser.add_argument("--qemu-img-tasks", action="store_true",
                        help="local: also 24 ansible.builtin.command tasks of `qemu-img info` "
                        "(about 25 s more per round here)")
    parser.add_argument("--keep-hosts", action="store_true",
                        help="leave the namespace hosts up at the end")
    args, ignored = parser.parse_known_args()
    if args.rounds is not None:
        args.local_rounds = args.hosts_rounds = args.rounds
    if ignored:     # run.sh passes bench.py's options too (--no-e2e, --full-size ...)
        sys.stderr.write("fleet: ignoring %s\n" % " ".join(ignored))
    groups = set(s.strip() for s in args.only.split(",") if s.strip())
    if "fleet" in groups:
        groups |= {"local", "hosts"}
    if not os.path.exists(PLAYBOOK):
        sys.exit("ansible-playbook not found at %s (scripts/setup-ansible.sh)" % PLAYBOOK)
    if QEMU_IMG is None:
        sys.exit("qemu-img is needed as the reference (apt-get install qemu-utils)")
    os.makedirs(os.path.join(args.dir, "tmp"), exist_ok=True)
    load_at_start = list(os.getloadavg())
    started = time.time()
    results, arms, skipped, option = [], {}, [], None
    if "local" in groups:
        rows, local = run_local(args.dir, args.local_rounds, args.qemu_img_tasks)
        results += rows
        arms["local"] = local
    if "hosts" in groups:
        if os.geteuid() != 0:
            sys.exit("the hosts group needs root (network namespaces); --only local runs "
                     "without it")
        rows, hosts, skipped, option = run_hosts(args.dir, args.hosts_rounds, args.hosts,
                                                 args.keep_hosts)
        results += rows
        arms["hosts"] = hosts
    version = subprocess.run([PLAYBOOK, "--version"], stdout=subprocess.PIPE,
                             universal_newlines=True, check=True).stdout.splitlines()[0]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            stdout=subprocess.PIPE, universal_newlines=True,
                            check=False).stdout.strip()
    machine = {"nproc": os.cpu_count(), "kernel": os.uname().release, "ansible": version,
               "qemu_img": subprocess.run([QEMU_IMG, "--version"], stdout=subprocess.PIPE,
                                          universal_newlines=True,
                                          check=True).stdout.splitlines()[0],
               "loadavg_at_start": load_at_start, "loadavg_at_end": list(os.getloadavg()),
               "engine": {"commit": commit}, "wall_s": round(time.time() - started, 1)}
    doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
           "results": results, "fleet": {"rounds": {"local": args.local_rounds,
                                                    "hosts": args.hosts_rounds},
                                         "hosts": args.hosts,
                                         "tasks_local": TASKS, "host_images": HOST_IMAGES,
                                         "arms": arms, "skipped": skipped,
                                         "images_module_option": option},
           "targets": [(r["name"], r["ratio"], r["target"]) for r in results if "target" in r]}
    outdir = os.path.join(HERE, "results")
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "bench-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as handle:
        json.dump(doc, handle, indent=2)
    print("\n| arm | median (s) | min (s) | max (s) | spread |")
    print("|---|---:|---:|---:|---:|")
    for group, table in arms.items():
        for name, s in table.items():
            print("| %s: %s | %.2f | %.2f | %.2f | %.0f %% |" % (
                group, name, s["median_s"], s["min_s"], s["max_s"], 100 * s["spread"]))
    print("\n| comparison | ours (s) | reference (s) | ratio (whole runs) | ratio net of the "
          "empty play | per task, ours / ref (s) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        per_task = "%.3f / %.3f" % (r["ours_per_task_s"], r["ref_per_task_s"]) \
            if "tasks" in r else ""
        print("| %s | %.2f | %.2f | %.2f (%.2f–%.2f) | %.2f (%.2f–%.2f) | %s |" % (
            r["name"], r["ours_median_s"], r["ref_median_s"], r["whole_ratio"],
            r["whole_ratio_min"], r["whole_ratio_max"], r["net_ratio"], r["net_ratio_min"],
            r["net_ratio_max"], per_task))
    for s in skipped:
        print("\nskipped: %s: %s" % (s["name"], s["reason"]))
    print("\n| target | measured | met |")
    print("|---|---:|---|")
    for label, value, limit in doc["targets"]:
        print("| %s <= %s | %.2f | %s |" % (label, limit, value, "yes" if value <= limit else "NO"))
    print("\nload average at start %s, at end %s; %.0f s in all"
          % (load_at_start, machine["loadavg_at_end"], machine["wall_s"]))
    print("results: %s" % path)


if __name__ == "__main__":
    main()
