"""Corrupted qcow2 images offered to the running daemon: a clear QMP error,
nothing written to the image, the daemon alive and serving."""

import struct

import pytest

from helpers import MiB, qemu_img


def _patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


CORRUPTIONS = {
    "truncated": lambda p: open(p, "r+b").truncate(100),
    "l1-past-end": lambda p: _patch(p, 40, ">Q", 1 << 40),
    "l1-unaligned": lambda p: _patch(p, 40, ">Q", 0x30001),
    "refcount-table-past-end": lambda p: _patch(p, 48, ">Q", 1 << 40),
    "refcount-table-unaligned": lambda p: _patch(p, 48, ">Q", 0x10001),
    "absurd-size": lambda p: _patch(p, 24, ">Q", 1 << 62),
    "absurd-l1-size": lambda p: _patch(p, 36, ">I", 0x7FFFFFFF),
    "bad-cluster-bits": lambda p: _patch(p, 20, ">I", 40),
    "bad-version": lambda p: _patch(p, 4, ">I", 9),
    "unknown-incompatible-feature": lambda p: _patch(p, 72, ">Q", 1 << 40),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_qcow2_is_refused_and_untouched(daemon, tmp_path, case):
    img = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(16 * MiB))
    CORRUPTIONS[case](str(img))
    before = img.read_bytes()
    d = daemon("blockd", "--blockdev", "driver=null-co,node-name=n0,size=1048576")
    for read_only in (False, True):
        err = d.qmp.error("blockdev-add", driver="qcow2", **{
            "node-name": "q", "read-only": read_only,
            "file": {"driver": "file", "filename": str(img), "read-only": read_only}})
        assert err["class"] == "GenericError" and err["desc"], err
    assert img.read_bytes() == before
    names = {n["node-name"] for n in d.qmp.cmd("query-named-block-nodes", flat=True)}
    assert names == {"n0"}
    assert d.qmp.cmd("query-version")["qemu"]["major"] == 7


def test_backing_loop_is_refused(daemon, tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(a), str(MiB))
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(a), str(b))
    qemu_img("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(b), str(a))
    before = (a.read_bytes(), b.read_bytes())
    d = daemon("blockd")
    err = d.qmp.error("blockdev-add", driver="qcow2", **{
        "node-name": "q", "file": {"driver": "file", "filename": str(b)}})
    assert err["desc"]
    assert (a.read_bytes(), b.read_bytes()) == before
    assert d.qmp.cmd("query-named-block-nodes") == []
