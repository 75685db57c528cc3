"""blockdev.fleecing.backup_verify through ansible-playbook, on backups of blockd and qsd exports.

The backups are pulled with the copy engine (blockd.copy.copy) from real
exports; the module must pass good ones, and fail corrupted ones (data,
manifest, chain) with one clear message naming the bad extents.
"""

import json
import shutil

import pytest

from helpers import MiB, qemu_img
from helpers.backups import SIZE, Served, make_source, run_tasks

from blockd.copy import copy


def _corrupt_guest_offset(image, guest_offset, fmt="qcow2"):
    """Overwrite 4 KiB of IMAGE's file where guest offset GUEST_OFFSET is stored."""
    host = guest_offset
    if fmt == "qcow2":
        extents = json.loads(qemu_img("map", "-U", "--output=json", "-f", "qcow2",
                                      image).stdout)
        ext = next(e for e in extents if e["start"] <= guest_offset < e["start"] + e["length"]
                   and e.get("offset") is not None and e["depth"] == 0)
        host = ext["offset"] + guest_offset - ext["start"]
    with open(image, "r+b") as f:
        f.seek(host)
        f.write(b"\xde\xad" * 2048)


@pytest.mark.timeout(900)
def test_verify_chain_against_export_and_corruption(daemon, engine, ansible, tmp_path):
    src = make_source(tmp_path / "src.raw")
    s = Served(daemon, engine, src)
    b = tmp_path / "b"
    b.mkdir()
    full, inc, raw = b / "full.qcow2", b / "inc1.qcow2", b / "r.raw"
    copy(s.uri, str(full), "qcow2")
    copy(s.uri, str(raw), "raw")
    s.write([(5 * MiB, 4096, 0x55)])
    snap = s.freeze()
    res = copy(snap, str(inc), "qcow2", base=str(full), dirty_bitmap="b0")

    r = run_tasks(
        ansible,
        {"module": "backup_verify", "args": {"backup": str(inc), "chain": True}, "check": True},
        {"module": "backup_verify", "args": {"backup": str(inc), "against": snap}},
        {"module": "backup_verify", "args": {"backup": str(full), "against": s.uri}},
        {"module": "backup_verify", "args": {"backup": str(raw)}},
    )
    ok = r[0]
    assert not ok.get("failed") and ok["changed"] is False, ok
    assert ok["disk_sha256"] == res["disk_sha256"] and ok["size"] == SIZE
    assert [c["backup"] for c in ok["chain"]] == [str(inc), str(full)]
    assert ok["format"] == "qcow2" and ok["manifest"] == str(inc) + ".manifest.json"
    assert not r[1].get("failed") and r[1]["against"] == snap and r[1]["changed"] is False, r[1]
    assert r[2]["failed"] is True and r[2]["error"] == "verify", r[2]   # the disk moved on
    assert r[2]["msg"] == f"{full} differs from the export, first at offset {5 * MiB}", r[2]
    assert not r[3].get("failed") and r[3]["format"] == "raw", r[3]

    # damage: data of the raw backup, data of the base of the chain, the manifest
    _corrupt_guest_offset(raw, 3 * MiB + 65536, "raw")
    _corrupt_guest_offset(full, 9 * MiB + 8192)
    inc2 = b / "inc2.qcow2"
    shutil.copy(inc, inc2)
    man = json.loads((b / "inc1.qcow2.manifest.json").read_text())
    man["size"] += 512
    (b / "inc2.qcow2.manifest.json").write_text(json.dumps(man))
    r = run_tasks(
        ansible,
        {"module": "backup_verify", "args": {"backup": str(raw)}},
        {"module": "backup_verify", "args": {"backup": str(full)}},
        {"module": "backup_verify", "args": {"backup": str(inc)}},
        {"module": "backup_verify", "args": {"backup": str(inc2)}},
    )
    assert r[0]["failed"] is True and r[0]["changed"] is False and r[0]["error"] == "verify"
    assert r[0]["msg"] == (
        f"{raw} differs from its manifest in 1 extent(s), first at offset {3 * MiB}: data extent "
        f"at {3 * MiB} (2097152 bytes; first bad 1 MiB block at {3 * MiB}, 1 bad)"), r[0]
    assert r[0]["bad_extents"] == [{"offset": 3 * MiB, "length": 2 * MiB, "type": "data",
                                    "first_bad_offset": 3 * MiB, "bad_blocks": 1}], r[0]
    assert r[0]["bad_extents_total"] == 1
    assert r[1]["failed"] is True and f"first at offset {9 * MiB}: data extent at {9 * MiB}" \
        in r[1]["msg"], r[1]
    # the incremental reads its unchanged blocks from the damaged base
    assert r[2]["failed"] is True and f"first at offset {9 * MiB}: unchanged extent" \
        in r[2]["msg"], r[2]
    assert r[3]["failed"] is True and r[3]["error"] == "manifest", r[3]
    assert r[3]["msg"] == f"corrupted manifest {inc2}.manifest.json: checksum mismatch", r[3]


@pytest.mark.timeout(900)
def test_verify_bad_input(daemon, ansible, tmp_path):
    src = make_source(tmp_path / "src.raw")
    s = Served(daemon, "blockd", src)
    b = tmp_path / "b"
    b.mkdir()
    full, inc = b / "full.qcow2", b / "inc1.qcow2"
    copy(s.uri, str(full), "qcow2")
    s.write([(5 * MiB, 4096, 0x55)])
    copy(s.freeze(), str(inc), "qcow2", base=str(full), dirty_bitmap="b0")
    good = json.loads((b / "inc1.qcow2.manifest.json").read_text())
    (b / "full.qcow2").rename(b / "moved.qcow2")
    r = run_tasks(
        ansible,
        {"module": "backup_verify", "args": {"backup": str(b / "none.qcow2")}},
        {"module": "backup_verify", "args": {"backup": str(inc), "chain": True}},
        {"module": "backup_verify", "args": {"backup": str(inc), "against": "nbd+unix:///x"}},
        {"module": "backup_verify",
         "args": {"backup": str(inc), "against": f"nbd+unix:///x?socket={tmp_path}/no.sock"}},
    )
    assert r[0]["failed"] is True and r[0]["error"] == "manifest", r[0]
    assert r[0]["msg"].startswith(f"cannot read manifest {b}/none.qcow2.manifest.json: "), r[0]
    assert r[1]["failed"] is True and r[1]["error"] == "base", r[1]
    assert r[1]["msg"] == f"base backup {full} of {inc} is missing", r[1]
    assert r[2]["failed"] is True, r[2]
    assert r[2]["msg"] == "against: NBD URI 'nbd+unix:///x': missing ?socket=PATH", r[2]
    assert r[3]["failed"] is True and r[3]["error"] == "base", r[3]  # chain checked first
    (b / "moved.qcow2").rename(full)
    r = run_tasks(ansible, {"module": "backup_verify", "args": {
        "backup": str(inc), "against": f"nbd+unix:///x?socket={tmp_path}/no.sock"}})
    assert r[0]["failed"] is True and r[0]["error"] == "source", r[0]
    assert r[0]["msg"].startswith(f"connecting to nbd+unix:///x?socket={tmp_path}/no.sock "
                                  "failed: "), r[0]
    # nothing was changed by any of it
    assert json.loads((b / "inc1.qcow2.manifest.json").read_text()) == good
