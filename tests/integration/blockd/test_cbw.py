"""copy-before-write + snapshot-access, run against qsd and blockd alike.

A source is exported writable through a copy-before-write filter, its
snapshot-access node read-only; writes through the filter change the source and
leave the snapshot export as the disk was when the filter opened.  Every expected
text, error and number below is what qemu-storage-daemon 7.2 does (the qsd cases
prove it).
"""

import hashlib
import os

import pytest

from helpers import MiB, del_export, make_raw_image, nbdcopy, nbdinfo_json, qemu_img, tmpfs

CL = 64 * 1024
SIZE = 4 * MiB


def sha(data):
    return hashlib.sha256(data).hexdigest()


def make_source(tmp_path, fmt):
    """A 4 MiB source: random data except a hole at [2 MiB, 3 MiB)."""
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(2 * MiB))
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    if fmt == "raw":
        return raw, "raw"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_path / "src.qcow2"))
    return tmp_path / "src.qcow2", "qcow2"


def make_target(tmp_path, fmt, size=SIZE):
    if fmt == "raw":
        return make_raw_image(tmp_path / "tgt.raw", size), "raw"
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), str(size))
    return tmp_path / "tgt.qcow2", "qcow2"


def fleecing_args(src, sfmt, tgt, tfmt, cbw_extra=""):
    return ("--blockdev", f"driver=file,node-name=srcf,filename={src}",
            "--blockdev", f"driver={sfmt},node-name=src,file=srcf",
            "--blockdev", f"driver=file,node-name=tgtf,filename={tgt}",
            "--blockdev", f"driver={tfmt},node-name=tgt,file=tgtf",
            "--blockdev", f"driver=copy-before-write,node-name=cbw,file=src,target=tgt{cbw_extra}",
            "--blockdev", "driver=snapshot-access,node-name=snap,file=cbw",
            "--export", "type=nbd,id=e-cbw,node-name=cbw,name=cbw,writable=on",
            "--export", "type=nbd,id=e-snap,node-name=snap,name=snap")


def type_of(extents, lo, hi):
    """The set of nbdinfo --map types over [lo, hi)."""
    return {e["type"] for e in extents
            if e["offset"] < hi and lo < e["offset"] + e["length"]}


def connect(libnbd, uri):
    h = libnbd.NBD()
    h.connect_uri(uri)
    return h


@pytest.mark.parametrize("sfmt,tfmt", [("raw", "raw"), ("raw", "qcow2"), ("qcow2", "qcow2"),
                                       ("qcow2", "raw")])
def test_snapshot_export_keeps_the_old_bytes(daemon, engine, tmp_path, libnbd, sfmt, tfmt):
    src, sfmt = make_source(tmp_path, sfmt)
    tgt, tfmt = make_target(tmp_path, tfmt)
    d = daemon(engine, *fleecing_args(src, sfmt, tgt, tfmt), nbd=True)
    w = connect(libnbd, d.nbd_uri("cbw"))
    r = connect(libnbd, d.nbd_uri("snap"))
    before = w.pread(SIZE, 0)
    assert r.pread(SIZE, 0) == before
    shadow = bytearray(before)
    writes = [(100, b"\x11" * 10), (CL - 3, b"\x22" * 7), (3 * MiB - 512, b"\x33" * 4096),
              (2 * MiB + 5 * CL, b"\x44" * CL)]
    for off, data in writes:
        w.pwrite(data, off)
        shadow[off:off + len(data)] = data
    zeroed = sfmt == "raw"
    if zeroed:
        # qsd 7.2 with a qcow2 source loses the old bytes of a cluster a write-zeroes
        # through the filter covers (its snapshot then reads zeroes there): not tested
        w.zero(2 * CL, MiB + 7)          # count, offset
        shadow[MiB + 7:MiB + 7 + 2 * CL] = bytes(2 * CL)
    w.flush()
    assert w.pread(SIZE, 0) == bytes(shadow)
    assert r.pread(SIZE, 0) == before
    out = tmp_path / "snap.out"
    nbdcopy(d.nbd_uri("snap"), out)
    assert sha(out.read_bytes()) == sha(before)
    # what the snapshot export says about allocation: data where the old disk had data
    extents = nbdinfo_json(d.nbd_uri("snap"), "--map")
    # Only ranges no write touched are compared: for clusters already copied qsd 7.2
    # reports the live source's status (snapshot-access has no block status of its own
    # in 7.2), blockd the target's, i.e. the snapshot's.
    for lo, hi, kind in ((2 * CL, 2 * MiB, 0), (2 * MiB, 2 * MiB + 5 * CL, 3),
                         (2 * MiB + 6 * CL, 3 * MiB - 2 * CL, 3), (3 * MiB + CL, SIZE, 0)):
        if zeroed and lo == 2 * CL:
            lo = MiB + 3 * CL
        assert type_of(extents, lo, hi) == {kind}, (lo, hi)
    # the clusters written to: 0, 1, 16-18 (the zeroes), 37, 47, 48
    nodes = {n["node-name"]: n for n in d.qmp.cmd("query-named-block-nodes", flat=True)}
    assert nodes["cbw"]["dirty-bitmaps"] == [
        {"recording": False, "persistent": False, "busy": False, "granularity": CL,
         "count": SIZE},
        {"recording": False, "persistent": False, "busy": False, "granularity": CL,
         "count": (8 if zeroed else 5) * CL}]
    assert nodes["src"]["dirty-bitmaps"] == [
        {"recording": False, "persistent": False, "busy": False, "granularity": CL,
         "count": SIZE - (8 if zeroed else 5) * CL}]
    w.shutdown()
    r.shutdown()
    d.quit()
    # the target holds exactly the copied clusters, with the old bytes
    tgt_img = tmp_path / "tgt.img"
    qemu_img("convert", "-q", "-f", tfmt, "-O", "raw", str(tgt), str(tgt_img))
    copied = tgt_img.read_bytes()
    for c in range(SIZE // CL):
        copied_here = c in (0, 1, 37, 47, 48) or (zeroed and c in (16, 17, 18))
        want = before[c * CL:(c + 1) * CL] if copied_here else bytes(CL)
        assert copied[c * CL:(c + 1) * CL] == want, c


def test_query_while_inserted(daemon, engine, tmp_path):
    src, sfmt = make_source(tmp_path, "qcow2")
    tgt, tfmt = make_target(tmp_path, "raw")
    d = daemon(engine, *fleecing_args(src, sfmt, tgt, tfmt), nbd=True)
    nodes = {n["node-name"]: n for n in d.qmp.cmd("query-named-block-nodes")}
    cbw, snap = nodes["cbw"], nodes["snap"]
    assert (cbw["drv"], cbw["file"], cbw["ro"], cbw["backing_file_depth"]) == \
        ("copy-before-write", str(src), False, 1)
    # the filtered child is shown as the backing image
    assert (cbw["image"]["backing-image"]["format"], cbw["image"]["backing-image"]["filename"]) \
        == ("qcow2", str(src))
    assert {k: cbw["image"][k] for k in ("virtual-size", "filename", "format", "cluster-size",
                                         "dirty-flag")} == \
        {"virtual-size": SIZE, "filename": str(src), "format": "copy-before-write",
         "cluster-size": CL, "dirty-flag": False}
    assert "format-specific" not in cbw["image"]
    assert (snap["drv"], snap["file"], snap["image"]["filename"]) == \
        ("snapshot-access", str(src), str(src))
    assert "dirty-flag" not in snap["image"] and "dirty-bitmaps" not in snap
    assert d.qmp.cmd("query-block-exports") == [
        {"node-name": "snap", "shutting-down": False, "type": "nbd", "id": "e-snap"},
        {"node-name": "cbw", "shutting-down": False, "type": "nbd", "id": "e-cbw"}]


def test_setup_errors(daemon, engine, tmp_path, libnbd):
    src, sfmt = make_source(tmp_path, "raw")
    tgt, tfmt = make_target(tmp_path, "qcow2")
    make_raw_image(tmp_path / "small.raw", MiB)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=srcf,filename={src}",
               "--blockdev", f"driver={sfmt},node-name=src,file=srcf",
               "--blockdev", f"driver=file,node-name=tgtf,filename={tgt}",
               "--blockdev", f"driver={tfmt},node-name=tgt,file=tgtf",
               "--blockdev", f"driver=file,node-name=small,filename={tmp_path / 'small.raw'}",
               nbd=True)
    q = d.qmp

    def err(**args):
        return q.error("blockdev-add", **args)["desc"]

    cbw = {"driver": "copy-before-write", "file": "src"}
    assert err(**{"node-name": "c0"}, **cbw) == "Parameter 'target' is missing"
    assert err(**{"node-name": "c0", "target": "nope"}, **cbw) == \
        "Cannot find device='nope' nor node-name='nope'"
    assert err(**{"node-name": "src", "target": "tgt"}, **cbw) == \
        "Duplicate nodes with node-name='src'"
    assert err(**{"node-name": "c0", "target": "tgt", "bitmap": {"node": "src", "name": "b"}},
               **cbw) == "Dirty bitmap 'b' not found"
    assert err(**{"node-name": "c0", "target": "tgt", "bitmap": {"node": "x", "name": "b"}},
               **cbw) == "Node 'x' not found"
    # a smaller target is accepted (QEMU 7.2 checks sizes only in backup)
    assert q.cmd("blockdev-add", **{"node-name": "c1", "target": "small"}, **cbw) == {}
    assert q.cmd("blockdev-del", **{"node-name": "c1"}) == {}
    assert q.cmd("blockdev-add", **{"node-name": "c2", "target": "tgt"}, **cbw) == {}
    # snapshot-access opens over any node; reads of a node without the snapshot API fail
    assert q.cmd("blockdev-add", driver="snapshot-access", **{"node-name": "s0"},
                 file="src") == {}
    assert q.cmd("blockdev-add", driver="snapshot-access", **{"node-name": "s2"},
                 file="c2") == {}
    for name in ("c2", "tgt", "src"):
        assert q.error("blockdev-del", **{"node-name": name})["desc"] == \
            f"Block device {name} is in use"
    q.cmd("block-export-add", type="nbd", id="x0", **{"node-name": "s0"})
    q.cmd("block-export-add", type="nbd", id="x2", **{"node-name": "s2"})
    assert q.error("blockdev-del", **{"node-name": "s2"})["desc"] == "Node s2 is in use"
    h = connect(libnbd, d.nbd_uri("s0"))
    with pytest.raises(libnbd.Error) as e:
        h.pread(512, 0)
    # qsd sends the driver's ENOTSUP; blockd's NBD server sends ENOTSUP only for
    # FAST_ZERO write-zeroes, EINVAL otherwise (nbd/proto.py nbd_errno)
    assert e.value.errno == ("ENOTSUP" if engine == "qsd" else "EINVAL")
    h2 = connect(libnbd, d.nbd_uri("s2"))
    assert h2.pread(512, 0) == src.read_bytes()[:512]
    h2.shutdown()
    del_export(q, "x2")
    assert q.cmd("blockdev-del", **{"node-name": "s2"}) == {}
    assert q.cmd("blockdev-del", **{"node-name": "c2"}) == {}


def test_snapshot_discard(daemon, engine, tmp_path, libnbd):
    src, sfmt = make_source(tmp_path, "raw")
    tgt, tfmt = make_target(tmp_path, "raw")
    args = list(fleecing_args(src, sfmt, tgt, tfmt))
    args[args.index("driver=snapshot-access,node-name=snap,file=cbw")] += ",discard=unmap"
    args[args.index("type=nbd,id=e-snap,node-name=snap,name=snap")] += ",writable=on"
    d = daemon(engine, *args, nbd=True)
    r = connect(libnbd, d.nbd_uri("snap"))
    before = r.pread(SIZE, 0)
    r.trim(CL, CL)                # cluster 1 leaves the snapshot
    assert r.pread(CL, 0) == before[:CL]
    with pytest.raises(libnbd.Error) as e:
        r.pread(512, CL)
    # the driver fails with EACCES: qsd sends it as EINVAL, blockd's NBD server as
    # EPERM (nbd/proto.py maps EACCES to NBD_EPERM)
    assert e.value.errno == ("EINVAL" if engine == "qsd" else "EPERM")
    with pytest.raises(libnbd.Error) as e:
        r.pwrite(b"x", 0)
    assert e.value.errno == ("ENOTSUP" if engine == "qsd" else "EINVAL")     # ENOTSUP
    nodes = {n["node-name"]: n for n in d.qmp.cmd("query-named-block-nodes", flat=True)}
    assert [b["count"] for b in nodes["cbw"]["dirty-bitmaps"]] == [SIZE - CL, 0]
    assert [b["count"] for b in nodes["src"]["dirty-bitmaps"]] == [SIZE - CL]


def test_permissions_and_resize(daemon, engine, tmp_path):
    src = make_raw_image(tmp_path / "src.raw", SIZE)
    tgt = make_raw_image(tmp_path / "tgt.raw", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=srcf,filename={src}",
               "--blockdev", "driver=raw,node-name=src,file=srcf",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}",
               "--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tgt",
               nbd=True)
    q = d.qmp

    def resize(node):
        reply = q.cmd_raw("block_resize", {"node-name": node, "size": 2 * SIZE})
        return reply.get("error", {}).get("desc", reply.get("return"))

    def conflict(node, other, role):
        return (f"Permission conflict on node '{node}': permissions 'resize' are both required "
                f"by an unnamed block device (uses node '{node}' as 'root' child) and unshared "
                f"by {other} (uses node '{node}' as '{role}' child).")

    assert resize("tgt") == conflict("tgt", "node 'cbw'", "target")
    # while the filter has no user, its source may grow (and the filter with it)
    assert resize("src") == {} and resize("cbw") == {}
    q.cmd("block-export-add", type="nbd", id="x", **{"node-name": "cbw"}, writable=True)
    assert resize("src") == conflict("src", "node 'cbw'", "file")
    assert resize("cbw") == conflict("cbw", "an unnamed block device", "root")
    q.cmd("block-export-add", type="nbd", id="y", **{"node-name": "tgt"}, writable=True)
    assert q.cmd("blockdev-add", driver="snapshot-access", **{"node-name": "sa"},
                 file="cbw") == {}
    assert resize("sa") == "Image format driver does not support resize"
    sizes = {n["node-name"]: n["image"]["virtual-size"]
             for n in q.cmd("query-named-block-nodes", flat=True)}
    assert sizes == {"sa": 2 * SIZE, "cbw": 2 * SIZE, "tgt": SIZE, "src": 2 * SIZE,
                     "srcf": 2 * SIZE}


# --- copy failures: the target on a full file system --------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (we run as root): a 4 MiB sparse target there fills up after 2 MiB."""
    with tmpfs(tmp_path / "mnt", "2M") as mnt:
        yield mnt


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_copy_failure_policies(daemon, engine, tmp_path, libnbd, small_fs, policy):
    src, sfmt = make_source(tmp_path, "raw")
    tgt = make_raw_image(small_fs / "tgt.raw", SIZE)
    d = daemon(engine, *fleecing_args(src, sfmt, tgt, "raw", f",on-cbw-error={policy}"),
               nbd=True)
    w = connect(libnbd, d.nbd_uri("cbw"))
    r = connect(libnbd, d.nbd_uri("snap"))
    before = bytes(r.pread(SIZE, 0))
    for off in range(0, MiB, CL):                     # 1 MiB of copies fit
        w.pwrite(b"\x77" * 512, off)
    assert r.pread(MiB, 0) == before[:MiB]
    failed = []
    for off in range(MiB, SIZE, CL):                  # past 2 MiB the target is full
        try:
            w.pwrite(b"\x88" * 512, off)
        except libnbd.Error as exc:
            failed.append((off, exc.errno))
    now = bytes(w.pread(SIZE, 0))
    if policy == "break-guest-write":
        assert failed and {e for _, e in failed} == {"ENOSPC"}
        assert failed[-1][0] == SIZE - CL
        for off, _ in failed:                       # failed writes left the source alone
            assert now[off:off + CL] == before[off:off + CL]
        # what was copied is still readable; the failed clusters too (from the source)
        assert r.pread(SIZE, 0) == before
    else:
        assert failed == []
        assert all(now[off:off + 512] == b"\x88" * 512 for off in range(MiB, SIZE, CL))
        with pytest.raises(libnbd.Error) as e:
            r.pread(512, 0)
        assert e.value.errno == ("EINVAL" if engine == "qsd" else "EPERM")     # EACCES


def test_writable_export_below_a_used_filter_is_refused(daemon, engine, tmp_path):
    """A writer attaching to the source under a cbw filter would bypass the copy: refused."""
    src = make_raw_image(tmp_path / "src.raw", 4 * MiB)
    tgt = make_raw_image(tmp_path / "tgt.raw", 4 * MiB)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src0,filename={src}",
               "--blockdev", f"driver=file,node-name=tgt0,filename={tgt}",
               "--blockdev", "driver=copy-before-write,node-name=cbw0,file=src0,target=tgt0",
               nbd=True)
    q = d.qmp
    q.cmd_raw("block-export-add", {"type": "nbd", "id": "w", "node-name": "cbw0",
                                   "writable": True})
    err = q.error("block-export-add", type="nbd", id="bad", **{"node-name": "src0"},
                  writable=True)
    assert err["desc"] == (
        "Permission conflict on node 'src0': permissions 'write' are both required by an "
        "unnamed block device (uses node 'src0' as 'root' child) and unshared by node 'cbw0' "
        "(uses node 'src0' as 'file' child).")
    assert [e["id"] for e in q.cmd("query-block-exports")] == ["w"]
    # read-only is fine
    q.cmd_raw("block-export-add", {"type": "nbd", "id": "ro", "node-name": "src0"})
    assert sorted(e["id"] for e in q.cmd("query-block-exports")) == ["ro", "w"]
