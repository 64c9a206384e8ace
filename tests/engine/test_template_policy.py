# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Untrusted templates (issue 16): a qcow2 source whose backing chain names a host file is
refused unless the user opts in (source_backing_chain), in check mode and in the real run,
before anything is written and before the backing file is even looked up; and image_info's
`unsafe_reasons` vets a file before it is used as a template.

The host file is a 'secret' with a recognisable pattern; it is reached from the templates by
an absolute name, a relative ../../ name, and through a second link (template -> middle
qcow2 -> secret raw). With the opt-in the copy equals `qemu-img convert` of the template
(judged by `qemu-img compare`); without it no byte of the secret ever lands anywhere.
"""

import os
import struct

import pytest

import oracle
from oracle import assert_clean, run

from qcow2 import api, reconcile
from qcow2.copy import source
from qcow2.read import vetting
from qcow2.format import constants as C
from qcow2.format.errors import Qcow2Error

pytestmark = pytest.mark.skipif(oracle.QEMU_IMG is None and not os.environ.get("CI"),
                                reason="qemu-img not installed (CI installs it)")

MiB = 1 << 20
PATTERN = b"TOP-SECRET-HOST-FILE:" * 48        # 1008 bytes, repeated through the secret
SIZE = 4 * MiB


def qimg(*args, **kwargs):
    proc = run(oracle.QEMU_IMG, *args, **kwargs)
    assert proc.returncode == 0, "qemu-img %s: %s" % (" ".join(map(str, args)), proc.stderr)
    return proc


def contains_secret(path):
    with open(path, "rb") as handle:
        return PATTERN[:64] in handle.read()


@pytest.fixture
def layout(tmp_path, qemu_img):
    """tmp/host/secret.raw and three templates in tmp/tpl/x/ leading to it; returns a dict."""
    host = tmp_path / "host"
    tpl = tmp_path / "tpl" / "x"
    host.mkdir()
    tpl.mkdir(parents=True)
    secret = str(host / "secret.raw")
    with open(secret, "wb") as handle:
        handle.write((PATTERN * (SIZE // len(PATTERN) + 1))[:SIZE])
    absolute = str(tpl / "absolute.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", absolute, str(SIZE))
    relative = str(tpl / "relative.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "../../host/secret.raw", "-F", "raw", relative,
         str(SIZE))
    middle = str(tpl / "middle.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", middle, str(SIZE))
    top = str(tpl / "two-link.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "middle.qcow2", "-F", "qcow2", top, str(SIZE))
    # Some guest data of the template's own, over the chain's.
    run(oracle.QEMU_IO or "true", "-f", "qcow2", "-c", "write -P 0x61 64k 64k", top)
    out = tmp_path / "out"
    out.mkdir()
    return {
        "secret": secret, "out": str(out),
        "templates": {
            "absolute": (absolute, secret, secret),
            "relative": (relative, "../../host/secret.raw", secret),
            "two-link": (top, "middle.qcow2", middle),
        },
    }


CASES = ("absolute", "relative", "two-link")


def _declared(template, **extra):
    return dict({"source": template, "source_format": "qcow2", "preallocation": "off"}, **extra)


def _assert_refusal(err, template, name, resolved):
    text = str(err)
    assert err.option == "source", (err.option, text)
    assert template in text and repr(name) in text, text
    assert "resolves to %s" % resolved in text, text
    assert "source_backing_chain=true" in text, text


@pytest.mark.parametrize("case", CASES)
def test_check_mode_and_real_run_refuse(layout, case):
    template, name, resolved = layout["templates"][case]
    target = os.path.join(layout["out"], "new.qcow2")
    decision = reconcile.decide(_declared(template), api.observe(target))
    assert [a.kind for a in decision.actions] == ["create"]
    assert decision.actions[0].args["source_backing_chain"] is False
    # Check mode: decide + preflight.
    with pytest.raises(Qcow2Error) as predicted:
        api.preflight(target, decision)
    _assert_refusal(predicted.value, template, name, resolved)
    # The real run: what the module applies, and create_from directly.
    with pytest.raises(Qcow2Error) as applied:
        api.apply(target, decision)
    assert str(applied.value) == str(predicted.value)
    assert not getattr(applied.value, "modified", False)
    with pytest.raises(Qcow2Error) as direct:
        api.create_from(target, {}, template, "qcow2")
    assert str(direct.value) == str(predicted.value)
    with pytest.raises(Qcow2Error):
        api.preflight_create(target, {}, source=template, source_format="qcow2")
    assert os.listdir(layout["out"]) == [], "something was created"


@pytest.mark.parametrize("case", CASES)
def test_the_backing_file_is_never_looked_up(layout, case, monkeypatch):
    """The refusal comes before the backing file is opened or even stat'ed."""
    template, _name, resolved = layout["templates"][case]
    touched = []
    for fname in ("stat", "lstat", "open", "access"):
        real = getattr(os, fname)

        def spy(path, *args, _real=real, **kwargs):
            touched.append(os.fspath(path) if isinstance(path, (str, bytes, os.PathLike))
                           else path)
            return _real(path, *args, **kwargs)
        monkeypatch.setattr(os, fname, spy)
    with pytest.raises(Qcow2Error):
        source.open_source(template, "qcow2")
    monkeypatch.undo()
    assert template in touched
    bad = [p for p in touched if isinstance(p, str) and
           os.path.normpath(os.path.join(os.path.dirname(template), p)) in
           (resolved, layout["secret"])]
    assert bad == [], "the backing chain was looked at: %s" % bad


@pytest.mark.parametrize("case", CASES)
def test_opt_in_flattens_like_qemu_img(layout, case):
    template, _name, _resolved = layout["templates"][case]
    target = os.path.join(layout["out"], "new.qcow2")
    declared = _declared(template, source_backing_chain=True)
    decision = reconcile.decide(declared, api.observe(target))
    assert decision.actions[0].args["source_backing_chain"] is True
    api.preflight(target, decision)
    assert os.listdir(layout["out"]) == []
    api.apply(target, decision)
    proc = run(oracle.QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", template, target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_clean(target)
    observed = api.observe(target)
    assert observed["backing_file"] is None
    # The guest of the trusted copy does read the chain's bytes (that is what was asked).
    flat = os.path.join(layout["out"], "flat.raw")
    qimg("convert", "-f", "qcow2", "-O", "raw", target, flat)
    assert contains_secret(flat)
    # And create_from with the flag, over an existing file (replace).
    result = api.create_from(target, {}, template, "qcow2", replace=True, allow_backing=True)
    assert result["virtual_size"] == SIZE


def test_without_opt_in_no_secret_byte_lands_anywhere(layout, tmp_path):
    for case in CASES:
        template = layout["templates"][case][0]
        target = os.path.join(layout["out"], case + ".qcow2")
        with pytest.raises(Qcow2Error):
            api.create_from(target, {}, template, "qcow2")
        assert not os.path.lexists(target)
    for root, _dirs, files in os.walk(layout["out"]):
        for name in files:
            assert not contains_secret(os.path.join(root, name))


def test_raw_and_self_contained_sources_need_no_opt_in(layout, tmp_path):
    raw = str(tmp_path / "plain.raw")
    with open(raw, "wb") as handle:
        handle.truncate(2 * MiB)
        handle.seek(MiB)
        handle.write(b"guest data" * 100)
    alone = str(tmp_path / "alone.qcow2")
    qimg("convert", "-f", "raw", "-O", "qcow2", raw, alone)
    for path, fmt in ((raw, "raw"), (alone, "qcow2")):
        target = os.path.join(layout["out"], os.path.basename(path) + ".qcow2")
        decision = reconcile.decide({"source": path, "source_format": fmt}, None)
        api.preflight(target, decision)
        api.apply(target, decision)
        proc = run(oracle.QEMU_IMG, "compare", "-f", fmt, "-F", "qcow2", path, target)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_clean(target)


def test_tool_convert_follows_the_chain_unless_told(layout):
    import subprocess
    import sys
    tool = os.path.join(oracle.ROOT, "tools", "qcow2")
    template = layout["templates"]["relative"][0]
    target = os.path.join(layout["out"], "tool.qcow2")
    proc = subprocess.run([sys.executable, tool, "convert", "-f", "qcow2", "--no-backing-chain",
                           template, target], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, check=False)
    assert proc.returncode == 1 and "source_backing_chain" in proc.stderr, proc.stderr
    assert not os.path.exists(target)
    proc = subprocess.run([sys.executable, tool, "convert", "-f", "qcow2", template, target],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert run(oracle.QEMU_IMG, "compare", template, target).returncode == 0


# ---------------------------------------------------------------------------------------------
# Vetting: image_info's unsafe_reasons


def reasons(path, check=False, max_size=None):
    return api.public_view(api.observe(path, with_check=check), vet_path=path,
                           max_size=max_size)["unsafe_reasons"]


def _set_incompat(path, bit):
    with open(path, "r+b") as handle:
        handle.seek(72)
        value = struct.unpack(">Q", handle.read(8))[0] | bit
        handle.seek(72)
        handle.write(struct.pack(">Q", value))


def _one(found, *words):
    assert len(found) == 1, found
    for word in words:
        assert word in found[0], (word, found)


def test_vetting_clean_and_plain(tmp_path, qemu_img):
    clean = str(tmp_path / "clean.qcow2")
    qimg("create", "-q", "-f", "qcow2", clean, "16M")
    assert reasons(clean) == []
    assert reasons(clean, check=True) == []
    raw = str(tmp_path / "plain.raw")
    with open(raw, "wb") as handle:
        handle.write(os.urandom(4096))      # (the odds of a signature are nil)
        handle.truncate(8 * MiB)
    assert reasons(raw) == []
    empty = str(tmp_path / "empty.raw")
    open(empty, "wb").close()
    assert reasons(empty) == []
    assert api.public_view(api.observe(clean)).get("unsafe_reasons") is None


def test_vetting_backing_and_data_file(layout, tmp_path):
    for case in CASES:
        template, name, resolved = layout["templates"][case]
        _one(reasons(template), "backing file %r" % name)
    _one(reasons(layout["templates"]["relative"][0]), "resolves to %s" % layout["secret"])
    ext = str(tmp_path / "ext.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", ext, "1M",
         cwd=str(tmp_path))
    _one(reasons(ext), "external data file", "ext.data")


def test_vetting_encrypted(tmp_path, qemu_img):
    path = str(tmp_path / "enc.qcow2")
    oracle.qemu_luks(path)
    _one(reasons(path), "encrypted")


def test_vetting_header_bits_and_size(tmp_path, qemu_img):
    for bit, word in ((C.INCOMPAT_DIRTY, "dirty"), (C.INCOMPAT_CORRUPT, "corrupt")):
        path = str(tmp_path / ("%s.qcow2" % word))
        qimg("create", "-q", "-f", "qcow2", path, "1M")
        _set_incompat(path, bit)
        _one(reasons(path), "marked " + word)
    unknown = str(tmp_path / "unknown.qcow2")
    qimg("create", "-q", "-f", "qcow2", unknown, "1M")
    _set_incompat(unknown, 1 << 40)
    _one(reasons(unknown), "qcow2 header is refused", "incompatible")
    huge = str(tmp_path / "huge.qcow2")
    qimg("create", "-q", "-f", "qcow2", huge, "100T")
    _one(reasons(huge), "virtual size", "100 TiB", "64 TiB")
    assert reasons(huge, max_size=0) == []
    assert reasons(huge, max_size=200 << 40) == []
    both = reasons(str(tmp_path / "dirty.qcow2"), max_size=MiB // 2)
    assert len(both) == 2 and "marked dirty" in both[0] and "512 KiB" in both[1], both


def test_vetting_check_corruptions(tmp_path, qemu_img):
    from qcow2.read.image import Image
    damaged = str(tmp_path / "damaged.qcow2")
    qimg("create", "-q", "-f", "qcow2", damaged, "1M")
    if oracle.QEMU_IO is None:
        pytest.skip("qemu-io is not installed")
    run(oracle.QEMU_IO, "-f", "qcow2", "-c", "write -P 7 0 64k", damaged)
    with Image.open(damaged) as img:
        l2 = img.l1_entry(0) & C.L1E_OFFSET_MASK
        data = img.l2_entries_of(img.read_l2(l2))[0][0] & C.L2E_OFFSET_MASK
        cluster = data // img.cluster_size
        refblock = img.reftable_entry(cluster // img.refblock_entries) & C.REFT_OFFSET_MASK
        where = refblock + (cluster % img.refblock_entries) * 2
    with open(damaged, "r+b") as handle:
        handle.seek(where)
        handle.write(b"\0\0")
    assert reasons(damaged) == []           # only the consistency check sees it
    _one(reasons(damaged, check=True), "consistency check fails")


@pytest.mark.parametrize("magic,offset,word", [
    (b"KDMV", 0, "VMDK"),
    (b"# Disk DescriptorFile\n", 0, "VMDK descriptor"),
    (b"vhdxfile", 0, "VHDX"),
    (b"LUKS\xba\xbe\x00\x01", 0, "LUKS"),
    (b"QED\x00", 0, "QED"),
    (b"\x7f\x10\xda\xbe", 0x40, "VDI"),
    (b"QFI\xfb\x00\x00\x00\x01", 0, "qcow (version 1)"),
])
def test_vetting_other_formats_in_a_raw_file(tmp_path, magic, offset, word):
    path = str(tmp_path / "claims-raw.img")
    with open(path, "wb") as handle:
        handle.truncate(MiB)
        handle.seek(offset)
        handle.write(magic)
    _one(reasons(path), "not a qcow2 image", "signature", word)


@pytest.mark.parametrize("fmt,opts,word", [
    ("vmdk", "", "VMDK"), ("vhdx", "", "VHDX"), ("vdi", "", "VDI"), ("qed", "", "QED"),
    ("qcow", "", "qcow (version 1)"), ("vpc", "subformat=fixed", "VHD image (footer)"),
    ("vpc", "subformat=dynamic", "VHD"),
])
def test_vetting_images_qemu_img_makes(tmp_path, qemu_img, fmt, opts, word):
    path = str(tmp_path / ("made." + fmt))
    args = ["-o", opts] if opts else []
    proc = run(oracle.QEMU_IMG, "create", "-q", "-f", fmt, *(args + [path, "4M"]))
    if proc.returncode != 0:
        pytest.skip("qemu-img cannot create %s here: %s" % (fmt, proc.stderr.strip()))
    found = reasons(path)
    assert found and all("not a qcow2 image" in r for r in found), found
    assert any(word in r for r in found), found


def test_vetting_luks_volume_made_by_qemu_img(tmp_path, qemu_img):
    path = str(tmp_path / "volume.luks")
    oracle.qemu_luks(path, fmt="luks")
    _one(reasons(path), "LUKS")


def test_vetting_is_pure_over_observed():
    observed = {"qcow2": True, "virtual_size": MiB, "check": {
        "corruptions": 2, "check_errors": 0, "messages": ["ERROR cluster 5 refcount=0"]}}
    _one(vetting.unsafe_reasons(observed, None), "2 corruptions", "refcount=0")
    assert vetting.unsafe_reasons(None) == []
    assert vetting.unsafe_reasons({"qcow2": True, "virtual_size": MiB}, None) == []
    assert vetting.signatures(b"\0" * 4096, b"\0" * 511 + b"x") == []
    assert vetting.signatures(b"", b"conectix" + b"\0" * 504) == ["a VHD image (footer)"]
