"""nbd_copy restore (blockd.copy.restore): backup chains pulled from a blockd export,
restored to standalone raw/qcow2 images and into writable NBD exports of blockd and
qemu-storage-daemon 7.2; results checked with qemu-img compare/check/info.
"""

import json
import os
import shutil

import pytest

from helpers import MiB, qemu_img, qemu_io

from blockd.copy import CopyError, copy, restore, restore_to_nbd
from blockd.nbd.client import connect_uri

from integration.copy.test_nbd_copy import SIZE, check_qcow2, cli, compare, make_source, serve

#: Writes between backups: (offset, length, fill byte). The second set zeroes data
#: of the full backup (block 0, 10 MiB) and writes into a hole.
WRITES = [
    [(5 * MiB + 4096, 8192, 0x11), (20 * MiB, 3 * MiB, 0x22), (63 * MiB, MiB, 0)],
    [(0, MiB, 0), (10 * MiB, 2 * MiB, 0), (41 * MiB + 512, 1024, 0x33), (21 * MiB, 4096, 0x44)],
]


def _write(uri, writes):
    with connect_uri(uri) as c:
        for off, n, fill in writes:
            c.pwrite(off, bytes([fill]) * n)
        c.flush()


def make_chain(daemon, tmp_path):
    """Full backup + two incrementals (qcow2) from a blockd export of a disk written
    between backups, a raw full backup, and the disk content at each backup's time.

    :return: ``(backups, expected)``: lists of paths, backup i holds expected[i].
    """
    src = make_source(tmp_path / "src.raw")
    _d, uri = serve(daemon, "blockd", src, writable=True)
    backups, expected = [], []
    for i in range(3):
        if i:
            _write(uri, WRITES[i - 1])
        b = tmp_path / ("b%d.qcow2" % i)
        if i == 0:
            copy(uri, str(b), "qcow2")
        else:
            copy(uri, str(b), "qcow2", base=str(backups[-1]),
                 extents=[(o, n) for o, n, _f in WRITES[i - 1]])
        exp = tmp_path / ("exp%d.raw" % i)
        shutil.copyfile(src, exp)  # the export flushed: the file holds the disk
        backups.append(b)
        expected.append(exp)
    raw = tmp_path / "b2full.raw"
    copy(uri, str(raw), "raw")
    return backups, expected, raw


def _data_map(path):
    """``qemu-img map`` data ranges of a qcow2 image, merged."""
    out = []
    for e in json.loads(qemu_img("map", "--output=json", path).stdout):
        if e["data"]:
            if out and out[-1][1] == e["start"]:
                out[-1][1] += e["length"]
            else:
                out.append([e["start"], e["start"] + e["length"]])
    return out


def test_restore_chain_to_images(daemon, tmp_path):
    backups, expected, raw_full = make_chain(daemon, tmp_path)
    assert open(expected[0], "rb").read() != open(expected[2], "rb").read()
    for i, b in enumerate(backups):
        for fmt in ("raw", "qcow2"):
            dest = tmp_path / ("r%d.%s" % (i, fmt))
            res = restore(str(b), str(dest), fmt)
            assert res["status"] == "ok" and res["verified"] and res["size"] == SIZE, res
            man = json.loads((tmp_path / ("b%d.qcow2.manifest.json" % i)).read_text())
            assert res["disk_sha256"] == man["disk_sha256"]
            compare(expected[i], "raw", dest, fmt)
            if fmt == "qcow2":
                check_qcow2(dest)
                info = json.loads(qemu_img("info", "--output=json", dest).stdout)
                assert "backing-filename" not in info and info["virtual-size"] == SIZE
                # allocates what qemu-img convert allocates when flattening the chain
                ref = tmp_path / ("ref%d.qcow2" % i)
                qemu_img("convert", "-O", "qcow2", b, ref)
                assert _data_map(dest) == _data_map(ref)
            else:
                assert os.stat(dest).st_blocks * 512 < SIZE // 2  # sparse
            assert not (tmp_path / ("r%d.%s.partial" % (i, fmt))).exists()
    # the CLI, from a raw full backup and from the chain top
    rc, res = cli("restore", raw_full, tmp_path / "c.qcow2", "--format", "qcow2", check=0)
    assert res["status"] == "ok" and res["format"] == "qcow2"
    compare(expected[2], "raw", tmp_path / "c.qcow2", "qcow2")
    check_qcow2(tmp_path / "c.qcow2")
    rc, res = cli("restore", backups[1], tmp_path / "c.raw", check=0)
    compare(expected[1], "raw", tmp_path / "c.raw", "raw")


def test_restore_into_nbd_export(daemon, engine, tmp_path):
    backups, expected, _raw = make_chain(daemon, tmp_path)
    # target disk full of garbage: holes of the backup must be zeroed
    tgt = tmp_path / "tgt.raw"
    tgt.write_bytes(b"\x5a" * SIZE)
    d, uri = serve(daemon, engine, tgt, name="t", writable=True)
    res = restore_to_nbd(str(backups[1]), uri)
    assert res["status"] == "ok" and res["verified"], res
    compare(expected[1], "raw", tgt, "raw")
    rc, res = cli("restore", backups[2], "--to-nbd", uri, check=0)
    assert res["status"] == "ok", res
    compare(expected[2], "raw", tgt, "raw")
    # a qcow2 target image, exported through the qcow2 driver
    q = tmp_path / "tgt.qcow2"
    qemu_img("create", "-f", "qcow2", q, str(SIZE))
    qemu_io(q, "write -P 0x77 0 %d" % SIZE, fmt="qcow2")
    d2, quri = serve(daemon, engine, q, fmt="qcow2", name="q", writable=True)
    restore_to_nbd(str(backups[0]), quri)
    compare(expected[0], "raw", quri, "raw")  # qsd holds the qcow2 write lock
    d2.stop()
    compare(expected[0], "raw", q, "qcow2")
    check_qcow2(q)
    # an export of another size, a read-only export: refused, nothing written
    small = tmp_path / "small.raw"
    small.write_bytes(b"\x01" * (SIZE - MiB))
    _d3, suri = serve(daemon, engine, small, name="s", writable=True)
    rc, res = cli("restore", backups[2], "--to-nbd", suri, check=4)
    assert "is %d bytes, the backup %d" % (SIZE - MiB, SIZE) in res["message"], res
    assert small.read_bytes() == b"\x01" * (SIZE - MiB)
    _d4, ruri = serve(daemon, engine, small, name="ro", writable=False)
    with pytest.raises(CopyError) as err:
        restore_to_nbd(str(backups[2]), ruri)
    assert err.value.kind == "dest" and "read-only" in err.value.message


def test_restore_corrupted_backup(daemon, tmp_path):
    backups, expected, raw_full = make_chain(daemon, tmp_path)
    with open(raw_full, "r+b") as f:  # flip one data byte of the raw backup at 20 MiB + 5
        f.seek(20 * MiB + 5)
        f.write(b"\x00")
    rc, res = cli("restore", raw_full, tmp_path / "r.raw", check=2)
    assert "first at offset %d" % (20 * MiB) in res["message"], res
    assert not list(tmp_path.glob("r.raw*"))
    # corrupt the middle of the chain: b1 gets data where b2 does not cover it
    qemu_io(backups[1], "write -P 0x99 %d 4096" % (30 * MiB), fmt="qcow2")
    for fmt in ("raw", "qcow2"):
        with pytest.raises(CopyError) as err:
            restore(str(backups[2]), str(tmp_path / ("r." + fmt)), fmt)
        assert err.value.kind == "verify", err.value.message
        assert "first at offset %d" % (30 * MiB) in err.value.message
        assert not list(tmp_path.glob("r.%s*" % fmt))
    # into an export: checked before anything is written
    tgt = tmp_path / "tgt.raw"
    tgt.write_bytes(b"\x5a" * SIZE)
    _d, uri = serve(daemon, "blockd", tgt, name="t", writable=True)
    rc, res = cli("restore", backups[2], "--to-nbd", uri, check=2)
    assert "first at offset %d" % (30 * MiB) in res["message"], res
    assert tgt.read_bytes() == b"\x5a" * SIZE
    # --no-verify restores what the chain holds
    rc, res = cli("restore", backups[2], tmp_path / "nv.raw", "--no-verify", check=0)
    assert res["verified"] is False
    out = qemu_img("compare", "-f", "raw", "-F", "raw", expected[2], tmp_path / "nv.raw",
                   check=False)
    assert out.returncode == 1 and "%d" % (30 * MiB) in out.stdout, out.stdout


def test_restore_missing_base_and_existing_dest(daemon, tmp_path):
    backups, expected, _raw = make_chain(daemon, tmp_path)
    dest = tmp_path / "r.raw"
    dest.write_bytes(b"precious")
    rc, res = cli("restore", backups[2], dest, check=4)
    assert "refusing to overwrite" in res["message"], res
    assert dest.read_bytes() == b"precious"
    rc, res = cli("restore", backups[2], dest, "--overwrite", check=0)
    compare(expected[2], "raw", dest, "raw")
    rc, res = cli("restore", backups[2], check=1)  # neither DEST nor --to-nbd
    assert res["error"] == "usage"
    man = tmp_path / "b2.qcow2.manifest.json"
    good = man.read_bytes()
    doc = json.loads(good)
    doc["disk_sha256"] = "0" * 64  # edited without resealing
    man.write_text(json.dumps(doc))
    rc, res = cli("restore", backups[2], tmp_path / "m.raw", check=5)
    assert "checksum mismatch" in res["message"], res
    man.write_bytes(good)
    os.rename(backups[0], tmp_path / "moved.qcow2")
    rc, res = cli("restore", backups[2], tmp_path / "m.raw", check=6)
    assert res["error"] == "base" and "b0.qcow2" in res["message"], res
    assert not list(tmp_path.glob("m.raw*"))
    rc, res = cli("restore", tmp_path / "nope.qcow2", tmp_path / "m.raw", check=1)
    assert "missing" in res["message"], res
