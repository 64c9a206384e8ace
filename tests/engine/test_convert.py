# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Images made from a source (api.create_from), judged by qemu-img.

The sources are built as real templates are (see template_sources.py): a raw disk with a
partition table and an ext4 filesystem holding files; qemu-img's qcow2 conversions of it
(compressed, compat 0.10, extended L2 with subclusters in every state, 512 B and 2 MiB
clusters, a two-link overlay chain with relative names); a sparse raw file; a read-only loop
block device over the raw disk (root and /dev/loop-control; skipped with the reason without
them, except in CI where it fails).

For each source and each preallocation mode, at a declared size 16 MiB larger than the source:
`qemu-img compare` says the new image and the source are identical (zeros past the source's
end), `qemu-img check` is clean, `api.observe` sees the declared size and at least the declared
allocation level, and only the source's data is copied (copied_bytes is about the bytes that
are not zeros, not the disk's size).
"""

import importlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

import oracle
import template_sources as T
from qcow2 import api
from qcow2.format.errors import Qcow2Error

MiB = 1 << 20
MODES = ("off", "metadata", "falloc", "full")
GROW = 16 * MiB
TEMPLATES = ("ext4-raw", "compressed", "compat-0.10", "extended-l2", "cluster-512",
             "cluster-2M", "overlay-chain", "sparse-raw")
LOOP = "loop-device"
# Mostly empty: copying them must cost about their data, not their size.
MOSTLY_EMPTY = set(TEMPLATES)


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, check=False, **kwargs)


def _missing(reason):
    oracle.unavailable("convert", reason, "the copy tests")


class Src(object):
    """A built source and what its guest reads: size, and the bytes that are not zeros."""

    def __init__(self, name, path, fmt, workdir):
        self.name, self.path, self.fmt = name, path, fmt
        proc = run(oracle.QEMU_IMG, "info", "--output=json", "-f", fmt, path)
        assert proc.returncode == 0, proc.stderr
        self.size = json.loads(proc.stdout)["virtual-size"]
        self.allocated = self._allocated()
        st = os.stat(path)
        self.unwritten = st.st_blocks * 512 if stat.S_ISREG(st.st_mode) and fmt == "raw" else 0
        self.nonzero = self._nonzero(workdir)

    def _allocated(self):
        """(offset, length) of what qemu-img map says holds data (zero ranges left out)."""
        proc = run(oracle.QEMU_IMG, "map", "--output=json", "-f", self.fmt, self.path)
        assert proc.returncode == 0, proc.stderr
        return [(e["start"], e["length"]) for e in json.loads(proc.stdout)
                if e["data"] and not e.get("zero")]

    def _nonzero(self, workdir):
        """{granularity: bytes of the aligned pieces of that size that are not all zeros}."""
        view = os.path.join(workdir, "view-%s.raw" % self.name)
        proc = run(oracle.QEMU_IMG, "convert", "-f", self.fmt, "-O", "raw", self.path, view)
        assert proc.returncode == 0, proc.stderr
        grains = (512, 64 * 1024, 2 * MiB)
        counts = dict.fromkeys(grains, 0)
        try:
            with open(view, "rb") as handle:
                pos = 0
                while True:
                    block = handle.read(2 * MiB)
                    if not block:
                        break
                    for grain in grains:
                        zero = bytes(grain)
                        for at in range(0, len(block), grain):
                            piece = block[at:at + grain]
                            if piece != zero[:len(piece)]:
                                counts[grain] += len(piece)
                    pos += len(block)
        finally:
            os.unlink(view)
        return counts

    def allocated_bytes(self, align):
        total = 0
        for off, length in self.allocated:
            a = off - off % align
            b = min(-(-(off + length) // align) * align, self.size)
            total += b - a
        return total


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            _missing("%s is not installed (qemu-utils)" % tool)
    if shutil.which("mkfs.ext4") is None:
        _missing("mkfs.ext4 is not installed (e2fsprogs)")
    work = str(tmp_path_factory.mktemp("templates"))
    built = T.build(work)
    return dict((name, Src(name, path, fmt, work)) for name, (path, fmt) in built.items())


@pytest.fixture(scope="session")
def loop_device(sources):
    """A read-only loop block device over the ext4 raw disk."""
    losetup = shutil.which("losetup")
    if losetup is None:
        _missing("no loop block device: losetup is not installed (util-linux)")
    if os.geteuid() != 0:
        _missing("no loop block device: attaching one needs root (CI runs as root)")
    disk = sources["ext4-raw"]
    proc = run(losetup, "--read-only", "--find", "--show", disk.path)
    dev = proc.stdout.strip()
    if proc.returncode != 0 or not dev:
        _missing("no loop block device: 'losetup --read-only --find --show %s' failed (exit %d): "
                 "%s" % (disk.path, proc.returncode, proc.stderr.strip()))
    try:
        assert stat.S_ISBLK(os.stat(dev).st_mode)
        src = Src(LOOP, dev, "raw", os.path.dirname(disk.path))
        assert src.size == disk.size
        yield src
    finally:
        done = run(losetup, "-d", dev)
        assert done.returncode == 0, "losetup -d %s failed: %s" % (dev, done.stderr)


def get_source(request, sources, name):
    return request.getfixturevalue("loop_device") if name == LOOP else sources[name]


# ---------------------------------------------------------------- oracles

def assert_identical(src, image):
    """qemu-img compare: the new image reads what the source reads, then zeros."""
    proc = run(oracle.QEMU_IMG, "compare", "-f", src.fmt, "-F", "qcow2", src.path, image)
    assert proc.returncode == 0 and "Images are identical" in proc.stdout, \
        "%s: qemu-img compare (exit %d): %s %s" % (src.name, proc.returncode,
                                                   proc.stdout.strip(), proc.stderr.strip())


def assert_clean(image):
    code, data, err = oracle.qemu_check(image)
    assert code == 0, "qemu-img check exit %d: %s %s" % (code, data, err)
    assert not data.get("corruptions") and not data.get("leaks") \
        and not data.get("check-errors"), data
    return data


def assert_level(observed, mode):
    level = observed["preallocation"]
    ok = MODES.index(level) >= MODES.index(mode) or (mode == "full" and level == "falloc")
    assert ok, "declared %s, observed %s" % (mode, level)


def assert_copied(src, result, mode, step):
    """copied_bytes: every byte that is not zero, about nothing more."""
    copied = result["copied_bytes"]
    assert copied >= src.nonzero[512], (copied, src.nonzero)
    if mode == "full":
        # Ranges the source maps are written whole; the rest is written as zeros, not copied.
        # On a raw file, SEEK_DATA also reports an unwritten (fallocated) extent whose pages
        # are in the page cache (once anything read it) as data: those may be written whole
        # too, up to what the filesystem allocated for the file.
        upper = src.allocated_bytes(max(step, 64 * 1024)) + src.unwritten
    else:
        upper = src.nonzero[step] if step in src.nonzero else src.nonzero[2 * MiB]
    assert copied <= upper, "%s/%s: copied %d bytes, expected at most %d (non-zero: %s)" \
        % (src.name, mode, copied, upper, src.nonzero)
    if src.name in MOSTLY_EMPTY:
        assert copied < src.size // 2, "%s/%s: copied %d bytes of a %d byte source" \
            % (src.name, mode, copied, src.size)


def create_and_judge(src, image, values, mode):
    values = dict(values, preallocation=mode)
    declared = values.get("size", src.size)
    # The test's own templates are trusted: the overlay chain is flattened on purpose.
    result = api.create_from(image, values, src.path, src.fmt, allow_backing=True)
    assert result["virtual_size"] == declared
    assert_identical(src, image)
    assert_clean(image)
    observed = api.observe(image)
    assert observed["virtual_size"] == declared
    assert_level(observed, mode)
    assert observed["guest_data"] is True
    assert not observed["dirty"] and observed["backing_file"] is None
    return result, observed


# ---------------------------------------------------------------- every source, every mode

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TEMPLATES + (LOOP,))
def test_copy_is_identical_clean_and_as_declared(request, sources, tmp_path, name, mode):
    src = get_source(request, sources, name)
    image = str(tmp_path / "new.qcow2")
    result, _observed = create_and_judge(src, image, {"size": src.size + GROW}, mode)
    assert_copied(src, result, mode, 64 * 1024)
    assert os.listdir(str(tmp_path)) == ["new.qcow2"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TEMPLATES)
def test_declaration_predicted_applied_and_converged(sources, tmp_path, name, mode):
    """What the module does for each source and mode: the prediction (check mode: decide and
    preflight, nothing written) equals the real run's actions; a second run has nothing to
    do; the template is never compared with the existing image afterwards."""
    from qcow2 import reconcile
    src = sources[name]
    image = str(tmp_path / "new.qcow2")
    declared = {"size": src.size + GROW, "preallocation": mode, "source": src.path,
                "source_format": src.fmt, "source_backing_chain": True}
    predicted = reconcile.decide(declared, api.observe(image))
    api.preflight(image, predicted)
    assert [a.kind for a in predicted.actions] == ["create"], predicted.actions
    assert "copied from %s" % src.path in predicted.actions[0].text
    assert os.listdir(str(tmp_path)) == []
    api.apply(image, predicted)
    assert_identical(src, image)
    again = reconcile.decide(declared, api.observe(image))
    assert (again.actions, again.conflicts, again.failure) == ([], [], None), again.texts()
    other = dict(declared, source=str(tmp_path / "no-such-template.raw"))
    assert reconcile.decide(other, api.observe(image)).actions == []


# Target options other than the defaults, over a raw source and the overlay chain.
VARIANTS = {
    "extended_l2": {"extended_l2": True},
    "compat-0.10": {"compat": "0.10"},
    "cluster-2M": {"cluster_size": 2 * MiB},
    "cluster-4k": {"cluster_size": 4096},
    "refcount-bits-1": {"refcount_bits": 1},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", ("sparse-raw", "overlay-chain"))
def test_copy_with_target_options(sources, tmp_path, name, variant, mode):
    src = sources[name]
    image = str(tmp_path / "new.qcow2")
    values = dict(VARIANTS[variant], size=src.size + GROW)
    result, observed = create_and_judge(src, image, values, mode)
    cs = values.get("cluster_size", 64 * 1024)
    assert observed["cluster_size"] == cs
    assert observed["extended_l2"] == bool(values.get("extended_l2"))
    assert observed["compat"] == values.get("compat", "1.1")
    assert observed["refcount_bits"] == values.get("refcount_bits", 16)
    step = cs if mode == "off" else max(cs, 64 * 1024)
    assert_copied(src, result, mode, step)


@pytest.mark.parametrize("name", ("ext4-raw", "sparse-raw", "compressed", "overlay-chain"))
def test_size_defaults_to_the_sources(sources, tmp_path, name):
    src = sources[name]
    image = str(tmp_path / "new.qcow2")
    result, observed = create_and_judge(src, image, {}, "off")
    assert observed["virtual_size"] == src.size
    assert result["copied_bytes"] <= src.nonzero[64 * 1024]


def test_tool_convert_matches(sources, tmp_path):
    """tools/qcow2 convert, qemu-img-shaped, over the same engine."""
    src = sources["compressed"]
    image = str(tmp_path / "tool.qcow2")
    tool = os.path.join(oracle.ROOT, "tools", "qcow2")
    proc = run(sys.executable, tool, "convert", "-f", "qcow2", "-o",
               "size=%d,preallocation=metadata" % (src.size + GROW), src.path, image)
    assert proc.returncode == 0, proc.stderr
    assert_identical(src, image)
    assert_clean(image)
    assert api.observe(image)["virtual_size"] == src.size + GROW
    # Without --force an existing image is left alone.
    before = os.stat(image)
    proc = run(sys.executable, tool, "convert", "-f", "qcow2", src.path, image)
    assert proc.returncode != 0
    assert os.stat(image).st_mtime_ns == before.st_mtime_ns
    proc = run(sys.executable, tool, "convert", "-f", "qcow2", "--force", src.path, image)
    assert proc.returncode == 0, proc.stderr
    assert api.observe(image)["virtual_size"] == src.size


# ---------------------------------------------------------------- refusals

def refused(image, values, source, source_format, **kwargs):
    """The refusal of create_from, which preflight_create (check mode) predicts exactly;
    nothing is created."""
    directory = os.path.dirname(image)
    before = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
    with pytest.raises(Qcow2Error) as predicted:
        api.preflight_create(image, values, source=source, source_format=source_format,
                             allow_backing=kwargs.get("allow_backing", False))
    with pytest.raises(Qcow2Error) as err:
        api.create_from(image, values, source, source_format, **kwargs)
    assert str(predicted.value) == str(err.value)
    assert predicted.value.option == err.value.option
    after = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
    assert after == before
    return err.value


def test_smaller_size_is_refused(sources, tmp_path):
    for name in ("ext4-raw", "overlay-chain"):
        src = sources[name]
        err = refused(str(tmp_path / "small.qcow2"), {"size": src.size - MiB}, src.path,
                      src.fmt, allow_backing=True)
        assert err.option == "size", err
        assert "smaller" in str(err) and str(src.size) in str(err)


def test_missing_source_is_refused(tmp_path):
    missing = str(tmp_path / "nowhere.raw")
    for fmt in ("raw", "qcow2"):
        err = refused(str(tmp_path / "new.qcow2"), {"size": "16M"}, missing, fmt)
        assert err.option == "source", err
        assert missing in str(err)


def test_wrong_source_format_is_refused(sources, tmp_path):
    src = sources["sparse-raw"]
    err = refused(str(tmp_path / "new.qcow2"), {}, src.path, "qcow2")
    assert err.option in ("source", "source_format"), err
    assert "qcow2" in str(err)
    err = refused(str(tmp_path / "new.qcow2"), {}, src.path, "vmdk")
    assert err.option == "source_format", err


def test_missing_target_directory_is_refused(sources, tmp_path):
    src = sources["sparse-raw"]
    image = str(tmp_path / "missing" / "new.qcow2")
    err = refused(image, {"preallocation": "metadata"}, src.path, src.fmt)
    assert "does not exist" in str(err), err
    assert not os.path.exists(str(tmp_path / "missing"))


def test_existing_image_is_kept_without_replace(sources, tmp_path):
    src = sources["sparse-raw"]
    image = str(tmp_path / "new.qcow2")
    api.create(image, {"size": "1M"})
    with open(image, "rb") as handle:
        before = handle.read()
    with pytest.raises(Qcow2Error, match="exists"):
        api.create_from(image, {}, src.path, src.fmt, allow_backing=True)
    with open(image, "rb") as handle:
        assert handle.read() == before
    result = api.create_from(image, {}, src.path, src.fmt, replace=True, allow_backing=True)
    assert result["virtual_size"] == src.size
    assert_identical(src, image)
    assert sorted(os.listdir(str(tmp_path))) == ["new.qcow2"]


def test_the_source_is_not_written(sources, tmp_path):
    """No byte nor timestamp of any link of a chain changes."""
    src = sources["overlay-chain"]
    links = [src.path, os.path.join(os.path.dirname(src.path), "tmpl", "base.qcow2")]
    stamps = [(os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in links]
    image = str(tmp_path / "new.qcow2")
    api.create_from(image, {"preallocation": "metadata"}, src.path, src.fmt,
                    allow_backing=True)
    assert [(os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in links] == stamps
    assert_identical(src, image)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only filesystem (a tmpfs remounted ro), filled first by fill()."""
    if os.geteuid() != 0:
        _missing("mounting a read-only tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    proc = run("mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mnt))
    if proc.returncode != 0:
        _missing("cannot mount a tmpfs: %s" % proc.stderr.strip())

    def seal():
        done = run("mount", "-o", "remount,ro", str(mnt))
        assert done.returncode == 0, done.stderr

    try:
        yield mnt, seal
    finally:
        run("umount", "-l", str(mnt))


def test_sources_on_a_read_only_filesystem(sources, tmp_path, read_only_dir):
    """The source is opened read-only: raw and qcow2 sources on a read-only mount copy."""
    mnt, seal = read_only_dir
    copies = {}
    for name in ("sparse-raw", "compressed"):
        src = sources[name]
        dst = str(mnt / os.path.basename(src.path))
        proc = run("cp", "--sparse=always", src.path, dst)
        assert proc.returncode == 0, proc.stderr
        copies[name] = dst
    seal()
    for name, path in copies.items():
        src = sources[name]
        image = str(tmp_path / ("%s.qcow2" % name))
        api.create_from(image, {"preallocation": "metadata"}, path, src.fmt)
        assert_identical(src, image)
        assert_clean(image)


# ---------------------------------------------------------------- a large disk from a template

@pytest.mark.parametrize("mode", ("off", "metadata"))
@pytest.mark.parametrize("name", ("compressed", "ext4-raw"))
def test_a_large_disk_costs_the_templates_data(sources, tmp_path, name, mode):
    """An 8 GiB disk from a 64 MiB template: the copy reads and writes about the template's
    data, and the file holds little more than that and the metadata."""
    src = sources[name]
    image = str(tmp_path / "big.qcow2")
    result, _observed = create_and_judge(src, image, {"size": 8 << 30}, mode)
    assert result["copied_bytes"] <= src.nonzero[64 * 1024]
    # Metadata of an 8 GiB image with 64 KiB clusters: 1 MiB of L2 tables, the L1 table,
    # refcounts; plus the copied data.
    held = os.stat(image).st_blocks * 512
    assert held <= src.nonzero[64 * 1024] + 4 * MiB, (held, src.nonzero)


# ---------------------------------------------------------------- sources that are refused

def _zstd_available():
    try:
        importlib.import_module("compression.zstd")     # Python 3.14+
        return True
    except ImportError:
        return False


def test_zstd_compressed_source(sources, tmp_path):
    """A zstd-compressed template copies where the host's Python has compression.zstd, and
    is refused before anything is written otherwise, saying so."""
    src = sources["sparse-raw"]
    zstd = str(tmp_path / "zstd.qcow2")
    proc = run(oracle.QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
               "compression_type=zstd", src.path, zstd)
    if proc.returncode != 0:
        _missing("qemu-img cannot write zstd-compressed images: %s" % proc.stderr.strip())
    out = tmp_path / "out"
    out.mkdir()
    image = str(out / "new.qcow2")
    if _zstd_available():
        api.create_from(image, {"preallocation": "metadata"}, zstd, "qcow2")
        assert_identical(Src("zstd", zstd, "qcow2", str(tmp_path)), image)
        assert_clean(image)
    else:
        err = refused(image, {"preallocation": "metadata"}, zstd, "qcow2")
        assert err.option == "source", err
        assert "zstd" in str(err), err
        assert os.listdir(str(out)) == []


def test_a_dirty_source_is_refused_before_anything_is_written(sources, tmp_path):
    src = sources["compressed"]
    dirty = str(tmp_path / "dirty.qcow2")
    shutil.copyfile(src.path, dirty)
    with open(dirty, "r+b") as handle:
        handle.seek(72)                       # incompatible features: bit 0, dirty
        features = int.from_bytes(handle.read(8), "big")
        handle.seek(72)
        handle.write((features | 1).to_bytes(8, "big"))
    out = tmp_path / "out"
    out.mkdir()
    err = refused(str(out / "new.qcow2"), {}, dirty, "qcow2")
    assert err.option == "source", err
    assert "dirty" in str(err), err
    assert os.listdir(str(out)) == []


METHOD_WORDS = {"off": "copy", "metadata": "copy", "falloc": "copy-fallocate",
                "full": "copy-zero-writes"}


@pytest.mark.parametrize("mode", MODES)
def test_copy_method_is_a_documented_word(tmp_path, mode):
    """`method` is one word of writer.METHODS (a playbook may branch on it); the prose of
    what ran is in `method_detail`."""
    from qcow2.create import writer
    src = tmp_path / "src.raw"
    with open(str(src), "wb") as handle:
        handle.truncate(4 * MiB)
        handle.seek(MiB)
        handle.write(b"\x5a" * 65536)
    out = api.create_from(str(tmp_path / "new.qcow2"), {"preallocation": mode}, str(src), "raw")
    assert out["method"] == METHOD_WORDS[mode], out
    assert out["method"] in writer.METHODS
    assert out["method_detail"] and out["method_detail"] != out["method"]


@pytest.mark.parametrize("mode", MODES)
def test_create_and_grow_methods_are_documented_words(tmp_path, mode):
    from qcow2.create import writer
    path = str(tmp_path / "new.qcow2")
    out = api.create(path, {"size": 4 * MiB, "preallocation": mode})
    assert out["method"] == {"off": "sparse", "metadata": "sparse", "falloc": "fallocate",
                             "full": "zero-writes"}[mode], out
    grown = api.grow(path, 8 * MiB, mode)
    assert grown["method"] in writer.METHODS, grown


def test_fallocate_refused_is_zero_writes_and_said(tmp_path, monkeypatch):
    import errno as _errno
    from qcow2.create import fileops

    def refuse(*_args):
        raise OSError(_errno.EOPNOTSUPP, "not supported")
    monkeypatch.setattr(fileops, "fallocate", refuse)
    out = api.create(str(tmp_path / "a.qcow2"), {"size": 4 * MiB, "preallocation": "falloc"})
    assert out["method"] == "zero-writes" and out["fallocate_refused"] is True, out
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * MiB)
    out = api.create_from(str(tmp_path / "b.qcow2"), {"preallocation": "falloc"}, str(src),
                          "raw")
    assert out["method"] == "copy-zero-writes" and out["fallocate_refused"] is True, out
