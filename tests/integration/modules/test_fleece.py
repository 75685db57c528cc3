"""blockdev.fleecing.fleece on both engines: point-in-time views, idempotence, bitmaps, rollback."""

import hashlib
import os

from helpers import MiB, make_raw_image, nbdcopy

SIZE = 4 * MiB


def _start(engine_with_monitor, tmp_path, nbd=True):
    disks = [make_raw_image(tmp_path / f"d{i}.img", SIZE, bytes([0x30 + i])) for i in range(2)]
    d, sock = engine_with_monitor(
        *[a for i, p in enumerate(disks)
          for a in ("--blockdev", f"driver=file,node-name=disk{i},filename={p}")], nbd=nbd)
    return d, sock


def _digest(uri, tmp_path, name):
    out = tmp_path / name
    nbdcopy(uri, out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def _write(d, node, offset, data, libnbd):
    """Write through a writable export of NODE (a guest's path to its disk)."""
    if node not in [e["id"] for e in d.qmp.cmd("query-block-exports")]:
        d.qmp.cmd("block-export-add", type="nbd", id=node, writable=True, **{"node-name": node})
    h = libnbd.NBD()
    h.connect_uri(d.nbd_uri(node))
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


def _leftovers(d, tmp_dir):
    q = d.qmp
    return dict(jobs=q.cmd("query-block-jobs"), jobs_all=q.cmd("query-jobs"),
                exports=sorted(e["id"] for e in q.cmd("query-block-exports")
                               if e["id"].startswith("fleece-")),
                nodes=sorted(n["node-name"] for n in q.cmd("query-named-block-nodes")
                             if n["node-name"].startswith("fleece-")),
                files=sorted(os.listdir(tmp_dir)) if os.path.isdir(tmp_dir) else [])


NOTHING = dict(jobs=[], jobs_all=[], exports=[], nodes=[], files=[])


def test_views_hold_the_point_in_time_and_go_away(engine_with_monitor, ansible, tmp_path, libnbd):
    d, sock = _start(engine_with_monitor, tmp_path)
    tmp_dir = str(tmp_path / "views")
    args = {"socket": sock, "name": "t", "disks": ["disk0", "disk1"], "tmp_dir": tmp_dir,
            "nbd_socket": str(d.nbd_address if os.path.isabs(str(d.nbd_address))
                              else d.dir / str(d.nbd_address))}
    before = [hashlib.sha256(bytes([0x30 + i]) * SIZE).hexdigest() for i in range(2)]
    for node in ("disk0", "disk1"):   # the guests' paths to their disks exist before the backup
        d.qmp.cmd("block-export-add", type="nbd", id=node, writable=True, **{"node-name": node})

    checked = ansible.module("fleece", args, check=True)
    assert checked["changed"] is True and not checked["failed"], checked
    assert _leftovers(d, tmp_dir) == NOTHING

    made = ansible.module("fleece", args, diff=True)
    assert made["changed"] is True and not made["failed"], made
    assert [v["node"] for v in made["disks"]] == ["disk0", "disk1"]
    assert all(v["incremental"] is False and v["size"] == SIZE for v in made["disks"])
    # a new writer that would bypass the copy-before-write filter is refused (as qsd does)
    err = d.qmp.error("block-export-add", type="nbd", id="late", writable=True,
                      **{"node-name": "disk0"})
    assert err["desc"].startswith("Permission conflict on node 'disk0': permissions 'write' "), err
    _write(d, "disk0", 0, b"\xee" * (2 * MiB), libnbd)      # the guest keeps writing
    _write(d, "disk1", SIZE - 4096, b"\xdd" * 4096, libnbd)
    got = [_digest(made["uris"][f"disk{i}"], tmp_path, f"v{i}") for i in range(2)]
    assert got == before                                      # the disks as they were
    assert _digest(d.nbd_uri("disk0"), tmp_path, "live0") != before[0]

    again = ansible.module("fleece", args)
    assert again["changed"] is False, again
    assert again["point_in_time"] == made["point_in_time"] and again["uris"] == made["uris"]

    gone = ansible.module("fleece", dict(args, state="absent"), diff=True)
    assert gone["changed"] is True and not gone["failed"], gone
    assert set(gone["diff"]["before"]) == {"disk0", "disk1"} and gone["diff"]["after"] == {}
    assert _leftovers(d, tmp_dir) == NOTHING
    assert ansible.module("fleece", dict(args, state="absent"))["changed"] is False


def test_bitmap_makes_the_next_view_incremental(engine_with_monitor, ansible, tmp_path, libnbd):
    d, sock = _start(engine_with_monitor, tmp_path)
    d.qmp.cmd("block-export-add", type="nbd", id="disk0", writable=True, **{"node-name": "disk0"})
    tmp_dir = str(tmp_path / "views")
    nbd_sock = str(d.dir / "nbd.sock")
    args = {"socket": sock, "name": "b", "disks": ["disk0"], "tmp_dir": tmp_dir,
            "nbd_socket": nbd_sock, "bitmap": "bk"}

    def bitmaps():
        node = [n for n in d.qmp.cmd("query-named-block-nodes") if n["node-name"] == "disk0"][0]
        return {b["name"]: b for b in node.get("dirty-bitmaps", []) if "name" in b}

    first = ansible.module("fleece", args)
    assert not first["failed"], first
    assert first["disks"][0]["incremental"] is False and first["disks"][0]["bitmap"] is None
    assert set(bitmaps()) == {"bk.next"}
    _write(d, "disk0", 0, b"\x01" * 65536, libnbd)           # after the point in time
    assert ansible.module("fleece", dict(args, state="absent"))["changed"] is True
    assert set(bitmaps()) == {"bk"} and bitmaps()["bk"]["count"] == 65536
    assert bitmaps()["bk"]["recording"] is True

    _write(d, "disk0", MiB, b"\x02" * 65536, libnbd)
    second = ansible.module("fleece", args)
    view = second["disks"][0]
    assert view["incremental"] is True and view["bitmap"] == "bk", second
    from helpers import nbdinfo_json  # noqa: PLC0415
    mapped = nbdinfo_json(view["uri"], "--map=qemu:dirty-bitmap:bk")
    dirty = sorted((e["offset"], e["length"]) for e in mapped if e["type"] & 1)
    assert dirty == [(0, 65536), (MiB, 65536)]
    _write(d, "disk0", 2 * MiB, b"\x03" * 65536, libnbd)     # lands in bk.next
    # the backup failed: nothing may be lost, bk holds all three changes
    assert ansible.module("fleece", dict(args, state="absent", success=False))["changed"] is True
    assert set(bitmaps()) == {"bk"} and bitmaps()["bk"]["count"] == 3 * 65536
    assert _leftovers(d, tmp_dir) == NOTHING


def test_failure_midway_leaves_nothing(engine_with_monitor, ansible, tmp_path):
    d, sock = _start(engine_with_monitor, tmp_path, nbd=False)   # no NBD server: exports fail
    tmp_dir = str(tmp_path / "views")
    args = {"socket": sock, "name": "f", "disks": ["disk0", "disk1"], "tmp_dir": tmp_dir}
    res = ansible.module("fleece", args)
    assert res["failed"] is True
    assert res["msg"].startswith("block-export-add failed: ")
    assert res["msg"].endswith("(everything this task created was removed)"), res["msg"]
    assert _leftovers(d, tmp_dir) == NOTHING

    res = ansible.module("fleece", dict(args, disks=["disk0", "nope"]))
    assert res["failed"] is True and res["msg"] == "no block node named nope in the engine"
    assert _leftovers(d, tmp_dir) == NOTHING
