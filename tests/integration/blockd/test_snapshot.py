"""blockdev-snapshot-sync and blockdev-snapshot, run against qsd and blockd alike.

Every expected text, graph and file is what qemu-storage-daemon 7.2 does (the
qsd cases prove it).  The one intended difference: when a snapshot fails after
blockd created the overlay file, blockd deletes it again (qsd leaves it).
"""

import hashlib
import json
import os

import pytest

from helpers import MiB, make_raw_image, qemu_img, qemu_io


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def nodes(q):
    """node-name -> (drv, ro, file, backing_file) of every node."""
    return {n["node-name"]: (n["drv"], n["ro"], n["file"], n.get("backing_file"))
            for n in q.cmd("query-named-block-nodes", flat=True)
            if not n["node-name"].startswith("#")}


def exports(q):
    return {e["id"]: e["node-name"] for e in q.cmd("query-block-exports")}


def img_info(path):
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout)


def start(daemon, engine, tmp_path, *extra):
    """Disk ``a`` (raw over file node ``fa``), exported writable as ``ea``."""
    a = make_raw_image(tmp_path / "a.raw", 4 * MiB, fill=b"A")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=fa,filename={a}",
               "--blockdev", "driver=raw,node-name=a,file=fa",
               "--export", "type=nbd,id=ea,node-name=a,name=ea,writable=on", *extra, nbd=True)
    return d, a


def test_snapshot_sync_under_export(daemon, engine, tmp_path):
    """The overlay takes the export; writes land in it; the old node is unchanged, read-only."""
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    before = md5(a)
    s = tmp_path / "s.qcow2"
    assert q.cmd("blockdev-snapshot-sync", **{"node-name": "a", "snapshot-file": str(s),
                                              "snapshot-node-name": "s"}) == {}
    assert exports(q) == {"ea": "s"}
    assert nodes(q) == {
        "s": ("qcow2", False, str(s), str(a)),
        "a": ("raw", True, str(a), None),
        # a child referenced by name keeps its own read-only flag (qsd's reopen)
        "fa": ("file", False, str(a), None),
    }
    info = img_info(s)
    assert (info["virtual-size"], info["backing-filename"], info["backing-filename-format"]) == \
        (4 * MiB, str(a), "raw")
    qemu_io(d.nbd_uri("ea"), "write -P 0x5a 1M 64k", "read -P 0x41 0 64k",
            "read -P 0x5a 1M 64k")
    # the overlay is held by the export, not by the monitor; the old node by the overlay
    assert q.error("blockdev-del", **{"node-name": "s"})["desc"] == "Node s is in use"
    assert q.error("blockdev-del", **{"node-name": "a"})["desc"] == \
        "Node 'a' is busy: node is used as backing hd of 's'"
    assert q.error("block-export-add", type="nbd", id="e2", **{"node-name": "a", "writable": True}
                   )["desc"] == "Cannot export read-only node as writable"
    assert q.error("blockdev-snapshot-sync", **{"node-name": "a", "snapshot-file": str(s) + "2",
                                                "snapshot-node-name": "s2"})["desc"] == \
        "Node 'a' is busy: node is used as backing hd of 's'"
    d.quit()
    assert md5(a) == before
    qemu_io(s, "read -P 0x5a 1M 64k", "read -P 0x41 0 64k", "read -P 0x41 2M 64k", fmt="qcow2")
    out = qemu_img("check", s).stdout
    assert "No errors were found" in out, out


def test_snapshot_of_a_file_node_under_raw(daemon, engine, tmp_path):
    """A parent edge (raw's ``file``) moves to the overlay too: the export writes into it."""
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    before = md5(a)
    s = tmp_path / "s.qcow2"
    assert q.cmd("blockdev-snapshot-sync", **{"node-name": "fa", "snapshot-file": str(s),
                                              "snapshot-node-name": "s"}) == {}
    assert exports(q) == {"ea": "a"}
    got = nodes(q)
    assert got["s"] == ("qcow2", False, str(s), str(a))
    assert got["fa"] == ("file", True, str(a), None)
    assert got["a"][:2] == ("raw", False)
    assert img_info(s)["backing-filename-format"] == "file"
    qemu_io(d.nbd_uri("ea"), "write -P 0x33 0 64k", "read -P 0x33 0 64k", "read -P 0x41 1M 4k")
    d.quit()
    assert md5(a) == before
    qemu_io(s, "read -P 0x33 0 64k", fmt="qcow2")


def test_snapshot_of_an_unused_node_drops_the_overlay(daemon, engine, tmp_path):
    """Nothing holds the new overlay: qsd closes it at once, the old node stays read-only."""
    b = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", b, str(2 * MiB))
    d = daemon(engine, "--blockdev", f"driver=qcow2,node-name=b,file.driver=file,"
                                     f"file.filename={b}")
    q = d.qmp
    s = tmp_path / "s.qcow2"
    assert q.cmd("blockdev-snapshot-sync", **{"node-name": "b", "snapshot-file": str(s),
                                              "snapshot-node-name": "s"}) == {}
    assert nodes(q) == {"b": ("qcow2", True, str(b), None)}
    # the inline file child inherited read-only
    assert [n["ro"] for n in q.cmd("query-named-block-nodes", flat=True)] == [True, True]
    assert s.exists() and img_info(s)["backing-filename"] == str(b)
    assert q.cmd("blockdev-del", **{"node-name": "b"}) == {}
    assert q.cmd("query-named-block-nodes") == []


@pytest.mark.parametrize("args, error", [
    ({"node-name": "a", "snapshot-file": "{s}"}, "New overlay node-name missing"),
    ({"device": "a", "snapshot-file": "{s}", "snapshot-node-name": "s"},
     "Cannot find device='a' nor node-name=''"),
    ({"snapshot-file": "{s}", "snapshot-node-name": "s"}, "Cannot find device='' nor node-name=''"),
    ({"node-name": "nope", "snapshot-file": "{s}", "snapshot-node-name": "s"},
     "Cannot find device='' nor node-name='nope'"),
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "fa"},
     "New overlay node-name already in use"),
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "s", "format": "raw"},
     "Backing file not supported for file format 'raw'"),
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "s", "format": "bogus"},
     "Unknown file format 'bogus'"),
    ({"node-name": "a", "snapshot-file": "{d}/nodir/x.qcow2", "snapshot-node-name": "s"},
     "Could not create '{d}/nodir/x.qcow2': No such file or directory"),
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "s", "mode": "existing"},
     "Could not open '{s}': No such file or directory"),
    ({"node-name": "a", "snapshot-file": "{d}/a.raw", "snapshot-node-name": "s"},
     "Error: Trying to create an image with the same filename as the backing file"),
    # an image a node has open (QEMU's image locking; the export does not share resize)
    ({"node-name": "a", "snapshot-file": "{d}/./a.raw", "snapshot-node-name": "s"},
     'Failed to get "resize" lock'),
    ({"node-name": "a", "snapshot-file": "{d}/a.raw", "snapshot-node-name": "s",
      "mode": "existing"}, 'Failed to get "resize" lock'),
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "s", "format": "file"},
     "Backing file not supported for file format 'file'"),
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "s", "format": "vdi"},
     "Backing file not supported for file format 'vdi'"),
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "s", "format": "null-co"},
     "Format driver 'null-co' does not support image creation"),
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "s",
      "format": "throttle"}, "Format driver 'throttle' does not support image creation"),
    # mode=existing opens the file with the format given
    ({"node-name": "a", "snapshot-file": "{r}", "snapshot-node-name": "s", "mode": "existing"},
     "Image is not in qcow2 format"),
    ({"node-name": "a", "snapshot-file": "{r}", "snapshot-node-name": "s", "mode": "existing",
      "format": "raw"}, "The overlay does not support backing images"),
    ({"node-name": "a", "snapshot-file": "{r}", "snapshot-node-name": "s", "mode": "existing",
      "format": "file"}, "The overlay does not support backing images"),
    ({"node-name": "a", "snapshot-file": "{r}", "snapshot-node-name": "s", "mode": "existing",
      "format": "null-co"}, "The only allowed filename for this driver is 'null-co://'"),
    ({"node-name": "a", "snapshot-file": "{r}", "snapshot-node-name": "s", "mode": "existing",
      "format": "bogus"}, "Unknown driver 'bogus'"),
    # created, then refused when opened: qsd leaves the file, blockd deletes it
    ({"node-name": "a", "snapshot-file": "{s}", "snapshot-node-name": "1bad"},
     "Invalid node-name: '1bad'"),
])
def test_snapshot_sync_errors(daemon, engine, tmp_path, args, error):
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    make_raw_image(tmp_path / "r.raw", MiB)
    before_nodes, before_files = q.cmd("query-named-block-nodes"), sorted(os.listdir(tmp_path))
    sub = {"s": str(tmp_path / "s.qcow2"), "d": str(tmp_path), "r": str(tmp_path / "r.raw")}
    args = {k: v.format(**sub) for k, v in args.items()}
    assert q.error("blockdev-snapshot-sync", **args)["desc"] == error.format(**sub)
    assert q.cmd("query-named-block-nodes") == before_nodes
    assert exports(q) == {"ea": "a"}
    leftover = sorted(set(os.listdir(tmp_path)) - set(before_files))
    if engine == "qsd" and "1bad" in args.values():
        assert leftover == ["s.qcow2"]
    else:
        assert leftover == []


def test_blockdev_snapshot(daemon, engine, tmp_path):
    """An existing node becomes the top: QEMU's checks, then the export moves to it."""
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    for name in ("o", "o2", "base", "r"):
        qemu_img("create", "-f", "qcow2", tmp_path / f"{name}.qcow2", str(4 * MiB))
    qemu_img("create", "-f", "qcow2", "-b", tmp_path / "base.qcow2", "-F", "qcow2",
             tmp_path / "hdr.qcow2")
    for name, extra in (("o", {"backing": None}), ("o2", {"backing": None}), ("hdr", {})):
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": name}, **extra,
              file={"driver": "file", "filename": str(tmp_path / f"{name}.qcow2")})
    q.cmd("blockdev-add", driver="raw", **{"node-name": "r"},
          file={"driver": "file", "filename": str(tmp_path / "r.qcow2")})
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": "rov", "read-only": True},
          backing=None, file={"driver": "file", "filename": str(tmp_path / "base.qcow2")})
    q.cmd("block-export-add", type="nbd", id="eo", **{"node-name": "o"})

    def err(node, overlay):
        return q.error("blockdev-snapshot", node=node, overlay=overlay)["desc"]
    assert err("nope", "o") == "Cannot find device='nope' nor node-name='nope'"
    assert err("a", "nope") == "Cannot find device='nope' nor node-name='nope'"
    assert err("a", "o") == "The overlay is already in use"          # exported
    assert err("a", "fa") == "The overlay is already in use"         # a's child
    assert err("a", "r") == "The overlay does not support backing images"
    assert err("a", "hdr") == "The overlay already has a backing image"
    assert err("o2", "o2") == "Making 'o2' a backing child of 'o2' would create a cycle"
    # a read-only overlay cannot take over a writable export
    assert err("a", "rov") == "Block node is read-only"
    assert exports(q) == {"ea": "a", "eo": "o"}


def test_blockdev_snapshot_moves_the_export(daemon, engine, tmp_path):
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    before = md5(a)
    o = tmp_path / "o.qcow2"
    qemu_img("create", "-f", "qcow2", o, str(4 * MiB))
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": "o"}, backing=None,
          file={"driver": "file", "filename": str(o)})
    assert q.cmd("blockdev-snapshot", node="a", overlay="o") == {}
    assert exports(q) == {"ea": "o"}
    got = nodes(q)
    assert got["a"] == ("raw", True, str(a), None)
    assert got["o"][:2] == ("qcow2", False) and got["o"][3] == str(a)
    # no backing file in the header: the filename is a json: description
    assert got["o"][2].startswith("json:")
    qemu_io(d.nbd_uri("ea"), "write -P 0x77 2M 64k", "read -P 0x41 0 64k")
    # the overlay stays monitor-owned: only the export holds it now
    assert q.error("blockdev-del", **{"node-name": "o"})["desc"] == "Node o is in use"
    d.quit()
    assert md5(a) == before
    # no backing in o's header: read it with the backing given explicitly
    qemu_io(f"json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{o}\"}},"
            f"\"backing\":{{\"driver\":\"raw\",\"file\":{{\"driver\":\"file\",\"filename\":\"{a}\"}}}}}}",
            "read -P 0x77 2M 64k", "read -P 0x41 0 64k", fmt="qcow2")


def test_snapshot_sync_existing_file(daemon, engine, tmp_path):
    """mode=existing opens the given image (without its header's backing) and keeps it
    when the transaction fails: only files the snapshot created are deleted."""
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    s = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", a, "-F", "raw", s)
    sums = md5(s)
    before = q.cmd("query-named-block-nodes")
    assert q.error("transaction", actions=[
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": "a", "snapshot-file": str(s), "snapshot-node-name": "s",
            "mode": "existing"}},
        {"type": "abort", "data": {}}])["desc"] == "Transaction aborted using Abort action"
    assert q.cmd("query-named-block-nodes") == before
    assert md5(s) == sums
    assert q.cmd("blockdev-snapshot-sync", **{
        "node-name": "a", "snapshot-file": str(s), "snapshot-node-name": "s",
        "mode": "existing"}) == {}
    assert exports(q) == {"ea": "s"}
    assert nodes(q)["s"] == ("qcow2", False, str(s), str(a))
    qemu_io(d.nbd_uri("ea"), "write -P 0x11 0 4k", "read -P 0x41 4k 4k")
    d.quit()
    qemu_io(s, "read -P 0x11 0 4k", "read -P 0x41 4k 4k", fmt="qcow2")


def test_snapshot_under_concurrent_writes(daemon, engine, tmp_path, libnbd):
    """A writer keeps writing through the export while the snapshot is taken: the old node
    holds one instant (a value written before the reply) and never changes after it."""
    import struct
    import threading
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    w = libnbd.NBD()
    w.connect_uri(d.nbd_uri("ea"))
    stop = threading.Event()
    count = [0]

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            w.pwrite(struct.pack(">Q", i) * 512, 0)
            count[0] = i

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while count[0] < 20:
            stop.wait(0.01)
        assert q.cmd("blockdev-snapshot-sync", **{
            "node-name": "a", "snapshot-file": str(tmp_path / "s.qcow2"),
            "snapshot-node-name": "s"}) == {}
        at_reply = count[0]
        assert q.cmd_raw("block-export-add", {"type": "nbd", "id": "old", "name": "old",
                                              "node-name": "a"}) == {"return": {}}
        r = libnbd.NBD()
        r.connect_uri(d.nbd_uri("old"))
        first = set(struct.unpack(">512Q", r.pread(4096, 0)))
        while count[0] < at_reply + 20:
            stop.wait(0.01)
    finally:
        stop.set()
        thread.join()
    assert len(first) == 1 and 1 <= min(first) <= at_reply + 1, (first, at_reply)
    assert set(struct.unpack(">512Q", r.pread(4096, 0))) == first
    last = count[0]
    assert set(struct.unpack(">512Q", w.pread(4096, 0))) == {last}
    r.shutdown()
    w.shutdown()
    d.quit()
    with open(a, "rb") as f:
        assert set(struct.unpack(">512Q", f.read(4096))) == first


def test_overlay_goes_with_the_last_user(daemon, engine, tmp_path):
    """The overlay of blockdev-snapshot-sync belongs to its users, not to the monitor:
    deleting the export closes it, and the old node can be deleted again."""
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    s = tmp_path / "s.qcow2"
    assert q.cmd("blockdev-snapshot-sync", **{"node-name": "a", "snapshot-file": str(s),
                                              "snapshot-node-name": "s"}) == {}
    assert q.cmd("block-export-del", id="ea") == {}
    q.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "ea"}})
    assert nodes(q) == {"a": ("raw", True, str(a), None), "fa": ("file", False, str(a), None)}
    assert q.cmd("blockdev-del", **{"node-name": "a"}) == {}
    assert s.exists()
    d.quit()
    out = qemu_img("check", s).stdout
    assert "No errors were found" in out, out


def test_snapshot_below_a_backup_filter(daemon, engine, tmp_path):
    """qsd moves the copy-before-write filter's ``file`` edge to the overlay; blockd's
    filter keeps per-child state, so blockd refuses (and leaves nothing behind)."""
    d, a = start(daemon, engine, tmp_path)
    q = d.qmp
    t = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", t, str(4 * MiB))
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": "t"}, backing=None,
          file={"driver": "file", "filename": str(t)})
    assert q.cmd("blockdev-backup", device="a", target="t", sync="none", **{"job-id": "j"}) == {}
    before = q.cmd("query-named-block-nodes")
    s = tmp_path / "s.qcow2"
    reply = q.cmd_raw("blockdev-snapshot-sync", {"node-name": "a", "snapshot-file": str(s),
                                                 "snapshot-node-name": "s"})
    if engine == "qsd":
        assert reply == {"return": {}}
        assert nodes(q)["a"][1] is True
    else:
        filt = next(n["node-name"] for n in before if n["drv"] == "copy-before-write")
        assert reply["error"]["desc"] == \
            f"blockd cannot move the 'file' child of node '{filt}' to an overlay"
        assert q.cmd("query-named-block-nodes") == before
        assert not s.exists()


def test_snapshot_of_a_read_only_node_with_a_relative_file(daemon, engine, tmp_path, libnbd):
    """The overlay of a read-only node is read-only; a relative snapshot-file is
    relative to the daemon's working directory and stays relative in the node's name."""
    r = make_raw_image(tmp_path / "r.raw", MiB, fill=b"r")
    d = daemon(engine, "--blockdev",
               f"driver=raw,node-name=r,read-only=on,file.driver=file,file.filename={r}",
               "--export", "type=nbd,id=er,node-name=r,name=er", nbd=True)
    q = d.qmp
    assert q.cmd("blockdev-snapshot-sync", **{"node-name": "r", "snapshot-file": "rel.qcow2",
                                              "snapshot-node-name": "s"}) == {}
    assert nodes(q) == {"s": ("qcow2", True, "rel.qcow2", str(r)),
                        "r": ("raw", True, str(r), None)}
    assert exports(q) == {"er": "s"}
    h = libnbd.NBD()
    h.connect_uri(d.nbd_uri("er"))
    assert h.pread(65536, 0) == b"r" * 65536 and h.is_read_only()
    h.shutdown()
    d.quit()
    assert img_info(d.dir / "rel.qcow2")["backing-filename"] == str(r)
