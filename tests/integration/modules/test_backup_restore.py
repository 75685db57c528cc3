"""blockdev.fleecing.backup_restore through ansible-playbook: chains pulled from blockd and
qsd exports, restored to raw and qcow2 files and into a writable export of the same engine.

Restored disks are checked with qemu-img compare and sha256 against the source at
each backup's point in time.
"""

import hashlib
import os
import shutil

import pytest

from helpers import MiB
from helpers.backups import (SIZE, Served, check_qcow2, compare, files, img_info, make_source,
                             run_tasks)

from blockd.copy import copy


def sha256(path):
    """sha256 of a whole (raw) file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def chain(daemon, engine, tmp_path):
    """A full and an incremental backup of a disk written in between; the source at
    the full's point in time is kept as src0.raw."""
    src = make_source(tmp_path / "src.raw")
    s = Served(daemon, engine, src)
    b = tmp_path / "b"
    b.mkdir()
    full, inc = b / "full.qcow2", b / "inc1.qcow2"
    copy(s.uri, str(full), "qcow2")
    shutil.copy(src, tmp_path / "src0.raw")
    s.write([(5 * MiB + 4096, 8192, 0x55), (9 * MiB, MiB, 0)])
    copy(s.freeze(), str(inc), "qcow2", base=str(full), dirty_bitmap="b0")
    return s, src, full, inc


@pytest.mark.timeout(900)
def test_restore_to_files_and_into_an_export(daemon, engine, ansible, tmp_path):
    s, src, full, inc = chain(daemon, engine, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    to_raw = {"backup": str(inc), "dest": str(out / "r.raw")}
    to_qcow2 = {"backup": str(inc), "dest": str(out / "r.qcow2"), "format": "qcow2"}
    full_raw = {"backup": str(full), "dest": str(out / "f.raw")}
    steps = [{"module": "backup_restore", "args": a, "diff": True}
             for a in (to_raw, to_qcow2, full_raw)]

    checked = run_tasks(ansible, *(dict(st, check=True) for st in steps))
    assert files(out) == set(), "check mode wrote something"
    for r in checked:
        assert not r.get("failed") and r["changed"] is True and r["diff"]["before"] == {}, r
    first = run_tasks(ansible, *steps)
    for r in first:
        assert not r.get("failed") and r["changed"] is True and r["verified"] is True, r
        assert r["diff"]["after"]["disk_sha256"] == r["disk_sha256"] and r["size"] == SIZE
    second = run_tasks(ansible, *steps)
    for r in second:
        assert not r.get("failed") and r["changed"] is False, r
        assert r["diff"]["before"] == r["diff"]["after"], r
    assert files(out) == {"r.raw", "r.qcow2", "f.raw"}
    assert sha256(out / "r.raw") == sha256(src)          # the disk at the incremental's time
    assert sha256(out / "f.raw") == sha256(tmp_path / "src0.raw")  # ... and at the full's
    compare(src, "raw", out / "r.qcow2", "qcow2")
    check_qcow2(out / "r.qcow2")
    assert "backing-filename" not in img_info(out / "r.qcow2")
    assert first[0]["disk_sha256"] == first[1]["disk_sha256"] != first[2]["disk_sha256"]

    # into a writable export of the engine: a blank disk of the same size
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    t = Served(daemon, engine, target, bitmap=False)
    into = [{"module": "backup_restore", "args": {"backup": str(full), "to_nbd": t.uri},
             "diff": True},
            {"module": "backup_restore", "args": {"backup": str(full), "to_nbd": t.uri}}]
    r = run_tasks(ansible, dict(into[0], check=True), *into)
    assert r[0]["changed"] is True and r[0]["target"] == t.uri, r[0]
    assert r[1]["changed"] is True and r[1]["diff"]["before"]["disk_sha256"] != \
        r[1]["diff"]["after"]["disk_sha256"], r[1]
    assert r[2]["changed"] is False, r[2]
    compare(tmp_path / "src0.raw", "raw", target, "raw")
    r = run_tasks(ansible, {"module": "backup_restore",
                            "args": {"backup": str(inc), "to_nbd": t.uri}})
    assert r[0]["changed"] is True and r[0]["disk_sha256"] == first[0]["disk_sha256"], r[0]
    compare(src, "raw", target, "raw")


@pytest.mark.timeout(900)
def test_restore_conflicts_and_bad_input(daemon, ansible, tmp_path):
    s, src, full, inc = chain(daemon, "blockd", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "d.raw"
    dest.write_bytes(b"precious" * 1000)
    bad = tmp_path / "b" / "bad.qcow2"          # a copy of the full with damaged data
    shutil.copy(full, bad)
    shutil.copy(str(full) + ".manifest.json", str(bad) + ".manifest.json")
    with open(bad, "r+b") as f:
        f.seek(-4096, os.SEEK_END)              # the last data cluster of the image
        f.write(b"\xde\xad" * 2048)
    small = tmp_path / "small.raw"
    with open(small, "wb") as f:
        f.truncate(SIZE // 2)
    t = Served(daemon, "blockd", small, bitmap=False)
    r = run_tasks(
        ansible,
        {"module": "backup_restore", "args": {"backup": str(full), "dest": str(dest)},
         "diff": True},
        {"module": "backup_restore", "args": {"backup": str(tmp_path / "none.qcow2"),
                                              "dest": str(out / "x.raw")}},
        {"module": "backup_restore", "args": {"backup": str(bad), "dest": str(out / "y.raw")}},
        {"module": "backup_restore", "args": {"backup": str(full), "dest": str(out / "z.raw"),
                                              "to_nbd": t.uri}},
        {"module": "backup_restore", "args": {"backup": str(full), "to_nbd": t.uri}},
        {"module": "backup_restore", "args": {"backup": str(full),
                                              "to_nbd": s.d.nbd_uri("snap")}},
    )
    assert r[0]["failed"] is True and r[0]["error"] == "dest", r[0]
    assert r[0]["msg"].startswith(f"dest {dest} exists and differs from the backup (8000 bytes, "
                                  f"not {SIZE}; another disk content (digest "), r[0]
    assert r[0]["msg"].endswith("): refusing to overwrite it; force=true replaces it"), r[0]
    assert dest.read_bytes() == b"precious" * 1000
    assert r[1]["failed"] is True and r[1]["msg"] == \
        f"backup {tmp_path}/none.qcow2 is missing", r[1]
    assert r[2]["failed"] is True and r[2]["error"] == "verify", r[2]
    assert r[2]["msg"].startswith(f"backup {bad} differs from its manifest, first at offset "), r[2]
    assert r[3]["failed"] is True and "mutually exclusive: dest|to_nbd" in r[3]["msg"], r[3]
    assert r[4]["failed"] is True and r[4]["msg"] == \
        f"export {t.uri} is {SIZE // 2} bytes, the backup {SIZE}", r[4]
    assert r[5]["failed"] is True and r[5]["msg"] == \
        f"export {s.d.nbd_uri('snap')} is read-only", r[5]
    assert files(out) == {"d.raw"}    # nothing half-written left behind

    unverified = {"backup": str(inc), "dest": str(out / "u.qcow2"), "format": "qcow2",
                  "verify": False, "manifest": str(tmp_path / "none.json")}
    r = run_tasks(ansible,
                  {"module": "backup_restore",
                   "args": {"backup": str(full), "dest": str(dest), "force": True},
                   "diff": True},
                  {"module": "backup_restore", "args": unverified},
                  {"module": "backup_restore", "args": unverified})
    assert r[0]["changed"] is True and r[0]["diff"]["before"]["size"] == 8000, r[0]
    assert sha256(dest) == sha256(tmp_path / "src0.raw")
    # verify=false needs no manifest: the digest comes from reading the backup
    assert r[1]["changed"] is True and r[1]["verified"] is False, r[1]
    assert r[2]["changed"] is False and r[2]["disk_sha256"] == r[1]["disk_sha256"], r[2]
    compare(src, "raw", out / "u.qcow2", "qcow2")
