"""Incremental backups over dirty bitmaps, run against qsd and blockd alike.

blockdev-backup sync=incremental/bitmap with bitmap-mode on-success/never/always (the
successor that takes the writes during the job, merged back or installed per mode), the
``bitmaps`` of an NBD export and its ``qemu:dirty-bitmap:NAME`` metadata context.  Every
expected reply, error text, event and bitmap count is what qemu-storage-daemon 7.2 does (the
qsd cases prove it); the data is checked through qemu-img compare and NBD reads.
"""

import json
import subprocess

import pytest

from blockd.nbd import client as nbdc
from helpers import MiB, make_raw_image, qemu_img, qemu_io, tmpfs

SIZE = 4 * MiB
K64 = 64 * 1024


# --- helpers -----------------------------------------------------------------------------

def qok(q, cmd, **args):
    """Run CMD (whose arguments may include ``name``), assert success, return the value."""
    reply = q.cmd_raw(cmd, args)
    assert "return" in reply, (cmd, args, reply)
    return reply["return"]


def job_events(q, job_id="j", until="null", timeout=60):
    """JOB_STATUS_CHANGE statuses and BLOCK_JOB_* (name, data) of JOB_ID up to UNTIL."""
    seen = []
    while True:
        ev = q.pull_event(wait=timeout)
        assert ev is not None, "no event within %ss" % timeout
        data = ev.get("data", {})
        if ev["event"] == "JOB_STATUS_CHANGE" and data["id"] == job_id:
            seen.append(data["status"])
            if data["status"] == until:
                return seen
        elif ev["event"].startswith("BLOCK_JOB_") and data.get("device") == job_id:
            seen.append((ev["event"], data))
        assert len(seen) < 50, seen


def end_event(events):
    """The BLOCK_JOB_COMPLETED/CANCELLED of a job's events, as (name, data)."""
    ends = [e for e in events if isinstance(e, tuple) and e[0] != "BLOCK_JOB_ERROR"]
    assert len(ends) == 1, events
    return ends[0]


def pattern_image(path, size=SIZE):
    """A raw image whose every 64 KiB cluster holds a different byte."""
    with open(path, "wb") as f:
        for i in range(size // K64):
            f.write(bytes([(i % 250) + 1]) * K64)
    return path


def dirty_bitmaps(q, node):
    for n in qok(q, "query-named-block-nodes", flat=True):
        if n["node-name"] == node:
            return n.get("dirty-bitmaps")
    raise AssertionError(node)


def bm(name=None, count=0, recording=True, busy=False, granularity=K64, persistent=False):
    info = {"recording": recording, "persistent": persistent, "busy": busy,
            "granularity": granularity, "count": count}
    if name is not None:
        info = {"name": name, **info}
    return info


def compare(a, b, fmt_a="raw", fmt_b="raw"):
    return subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, str(a),
                           str(b)], capture_output=True, text=True, check=False)


def start(daemon, engine, tmp_path, *extra):
    """src (raw file node, pattern data) and a raw 4 MiB target tgt, NBD server on."""
    src = pattern_image(tmp_path / "src.img")
    tgt = make_raw_image(tmp_path / "tgt.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}", *extra, nbd=True)
    return d, src, tgt


def export_writable(d, node="src"):
    qok(d.qmp, "block-export-add", type="nbd", id="w-" + node, **{"node-name": node},
              writable=True)
    return d.nbd_uri(node)


def backup(q, **args):
    args.setdefault("job-id", "j")
    args.setdefault("device", "src")
    args.setdefault("target", "tgt")
    return q.cmd_raw("blockdev-backup", args)


def completed(length, offset=None, speed=0, error=None):
    data = {"type": "backup", "device": "j", "len": length,
            "offset": length if offset is None else offset, "speed": speed}
    if error is not None:
        data["error"] = error
    return ("BLOCK_JOB_COMPLETED", data)


START = ["created", "running", "paused", "running"]
DONE = ["waiting", "pending"]


# --- blockdev-backup with a bitmap: checks -------------------------------------------------

@pytest.mark.parametrize("args,error", [
    ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
    ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
    ({"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"},
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    ({"sync": "incremental", "bitmap": "nope"}, "Bitmap 'nope' could not be found"),
    ({"sync": "bitmap", "bitmap": "b0"}, "Bitmap sync mode must be given when providing a bitmap"),
    ({"sync": "full", "bitmap": "b0"}, "Bitmap sync mode must be given when providing a bitmap"),
    ({"sync": "none", "bitmap": "b0", "bitmap-mode": "always"},
     "sync mode 'none' does not produce meaningful bitmap outputs"),
    ({"sync": "full", "bitmap": "b0", "bitmap-mode": "never"},
     "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"),
    ({"sync": "full", "bitmap-mode": "never"}, "Cannot specify bitmap sync mode without a bitmap"),
    ({"sync": "incremental", "bitmap": "b0", "target": "src"},
     "Source and target cannot be the same"),
    ({"sync": "incremental", "bitmap": "b0", "target": "small"},
     "Source and target image have different sizes"),
    ({"sync": "incremental", "bitmap": "b0", "x-perf": {"max-chunk": 4096}},
     "Required max-chunk (4096) is less than backup cluster size (65536)"),
    ({"sync": "incremental", "bitmap": "b0", "job-id": "1bad"}, "Invalid job ID '1bad'"),
    ({"sync": "incremental", "bitmap": "busy"},
     "Bitmap 'busy' is currently in use by another operation and cannot be used"),
])
def test_bitmap_argument_errors(daemon, engine, tmp_path, args, error):
    d, src, tgt = start(daemon, engine, tmp_path,
                        "--blockdev", "driver=null-co,node-name=small,size=1048576")
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="b0")
    qok(q, "block-dirty-bitmap-add", node="src", name="busy", disabled=True)
    qok(q, "block-export-add", type="nbd", id="e", **{"node-name": "src"}, bitmaps=["busy"])
    reply = backup(q, **args)
    assert reply.get("error", {}).get("desc") == error, reply
    # nothing left behind: the bitmap is free and alone, no job
    assert dirty_bitmaps(q, "src") == [bm("busy", recording=False, busy=True), bm("b0")]
    assert qok(q, "query-block-jobs") == []


# --- the chain: full + bitmap, writes, incremental ------------------------------------------

def test_full_then_incremental_chain(daemon, engine, tmp_path):
    d, src, tgt = start(daemon, engine, tmp_path)
    full = tmp_path / "full.qcow2"
    inc = tmp_path / "inc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(full), str(SIZE))
    q = d.qmp
    qok(q, "blockdev-add", driver="file", filename=str(full), **{"node-name": "fullf"})
    qok(q, "blockdev-add", driver="qcow2", file="fullf", **{"node-name": "full"})
    assert qok(q, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "full",
                                             "sync": "full"}}]) == {}
    assert job_events(q) == START + DONE + [completed(SIZE), "concluded", "null"]
    qok(q, "blockdev-del", **{"node-name": "full"})
    qok(q, "blockdev-del", **{"node-name": "fullf"})
    assert dirty_bitmaps(q, "src") == [bm("b0")]
    qemu_io(export_writable(d), "write -P 7 1M 100k", "write -P 8 3149824 4k",
            "write -z 2M 64k")
    assert dirty_bitmaps(q, "src") == [bm("b0", count=4 * K64)]
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(full), str(inc))
    qok(q, "blockdev-add", driver="qcow2", **{"node-name": "inc"},
          file={"driver": "file", "filename": str(inc)})
    assert backup(q, sync="incremental", bitmap="b0", target="inc") == {"return": {}}
    assert job_events(q) == START + DONE + [completed(4 * K64), "concluded", "null"]
    # on-success: the successor (empty) is the bitmap now
    assert dirty_bitmaps(q, "src") == [bm("b0")]
    qok(q, "blockdev-del", **{"node-name": "inc"})
    assert compare(src, inc, "raw", "qcow2").returncode == 0
    # only the dirty clusters were written to the overlay
    out = subprocess.run(["qemu-img", "map", "--output=json", "-U", str(inc)],
                         capture_output=True, text=True, check=True).stdout
    top = [(e["start"], e["length"]) for e in json.loads(out)
           if e["depth"] == 0 and e["present"]]
    assert top == [(1 * MiB, 2 * K64), (2 * MiB, K64), (3 * MiB, K64)]
    # a second level: more writes, an overlay of the first incremental
    qemu_io(d.nbd_uri("src"), "write -P 6 0 1k", "write -P 5 1M 4k")
    inc2 = tmp_path / "inc2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(inc), str(inc2))
    qok(q, "blockdev-add", driver="qcow2", **{"node-name": "inc2"},
        file={"driver": "file", "filename": str(inc2)})
    assert backup(q, sync="incremental", bitmap="b0", target="inc2") == {"return": {}}
    assert job_events(q) == START + DONE + [completed(2 * K64), "concluded", "null"]
    qok(q, "blockdev-del", **{"node-name": "inc2"})
    assert compare(src, inc2, "raw", "qcow2").returncode == 0
    assert compare(src, inc, "raw", "qcow2").returncode == 1


# --- bitmap modes after success, failure and cancel ------------------------------------------

def _dirty_and_start(q, d, mode, sync="bitmap", **args):
    """b0 with 3 dirty clusters, then a backup with MODE, paused by a speed limit."""
    qok(q, "block-dirty-bitmap-add", node="src", name="b0")
    uri = export_writable(d)
    qemu_io(uri, "write -P 9 0 64k", "write -P 9 1M 128k")
    assert backup(q, sync=sync, bitmap="b0", **{"bitmap-mode": mode}, **args) == {"return": {}}
    assert job_events(q, until="running") == ["created", "running"]
    assert job_events(q, until="running") == ["paused", "running"]
    return uri


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
def test_modes_after_success(daemon, engine, tmp_path, mode):
    d, src, tgt = start(daemon, engine, tmp_path)
    q = d.qmp
    uri = _dirty_and_start(q, d, mode, speed=1)
    qok(q, "block-job-pause", device="j")
    assert job_events(q, until="paused") == ["paused"]
    # during the job: b0 frozen and busy, its successor records, then the copy bitmap
    # (less the first chunk the job may have copied before it sleeps)
    offset = qok(q, "query-block-jobs")[0]["offset"]
    assert offset in (0, K64)
    assert dirty_bitmaps(q, "src") == [bm(None, count=3 * K64 - offset, recording=False),
                                       bm(None, count=0), bm("b0", count=3 * K64, busy=True)]
    err = q.cmd_raw("block-dirty-bitmap-remove", {"node": "src", "name": "b0"})
    assert err["error"]["desc"] == \
        "Bitmap 'b0' is currently in use by another operation and cannot be used"
    qemu_io(uri, "write -P 5 2M 4k")          # lands in the successor
    assert dirty_bitmaps(q, "src")[1:] == [bm(None, count=K64),
                                           bm("b0", count=3 * K64, busy=True)]
    qok(q, "block-job-set-speed", device="j", speed=0)
    qok(q, "block-job-resume", device="j")
    events = job_events(q)
    assert events == ["running"] + DONE + [completed(3 * K64), "concluded", "null"]
    expected = {"on-success": K64, "always": K64, "never": 4 * K64}[mode]
    assert dirty_bitmaps(q, "src") == [bm("b0", count=expected)]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (we run as root) for a target that runs out of space."""
    with tmpfs(tmp_path / "mnt", "1M") as mnt:
        yield mnt


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
def test_modes_after_failure(daemon, engine, tmp_path, tiny_fs, mode):
    src = pattern_image(tmp_path / "src.img")
    tgt = make_raw_image(tiny_fs / "tgt.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}", nbd=True)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="b0")
    qemu_io(export_writable(d), "write -P 9 0 3M")
    assert backup(q, sync="bitmap", bitmap="b0", **{"bitmap-mode": mode}) == {"return": {}}
    events = job_events(q)
    name, data = end_event(events)
    assert name == "BLOCK_JOB_COMPLETED" and data["error"] == "No space left on device"
    assert data["len"] == 3 * MiB and 0 <= data["offset"] < 3 * MiB
    if mode == "always":
        # the successor (empty) plus what was not copied
        expected = 3 * MiB - data["offset"]
    else:
        expected = 3 * MiB
    assert dirty_bitmaps(q, "src") == [bm("b0", count=expected)]


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
def test_modes_after_cancel(daemon, engine, tmp_path, mode):
    d, src, tgt = start(daemon, engine, tmp_path)
    q = d.qmp
    _dirty_and_start(q, d, mode, speed=1)
    qok(q, "block-job-cancel", device="j")
    events = job_events(q)
    name, data = end_event(events)
    assert name == "BLOCK_JOB_CANCELLED"
    assert data["len"] == 3 * K64 and data["offset"] in (0, K64)
    expected = 3 * K64 - data["offset"] if mode == "always" else 3 * K64
    assert dirty_bitmaps(q, "src") == [bm("b0", count=expected)]


def test_sync_full_with_bitmap_always_clears_it(daemon, engine, tmp_path):
    d, src, tgt = start(daemon, engine, tmp_path)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="b0", disabled=True)
    qok(q, "block-dirty-bitmap-add", node="src", name="b1", granularity=4096)
    qok(q, "block-dirty-bitmap-merge", node="src", target="b0", bitmaps=["b1"])
    qok(q, "block-dirty-bitmap-remove", node="src", name="b1")
    qemu_io(export_writable(d), "write 0 4k")
    assert dirty_bitmaps(q, "src") == [bm("b0", recording=False)]
    assert backup(q, sync="full", bitmap="b0", **{"bitmap-mode": "always"}) == {"return": {}}
    assert job_events(q) == START + DONE + [completed(SIZE), "concluded", "null"]
    # the successor takes over, disabled as b0 was
    assert dirty_bitmaps(q, "src") == [bm("b0", recording=False)]
    assert compare(src, tgt).returncode == 0


# --- a bitmap QEMU wrote drives an incremental --------------------------------------------

def test_bitmap_written_by_qemu_drives_incremental(daemon, engine, tmp_path):
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io(img, "write -P 1 0 4M", fmt="qcow2")
    qemu_img("bitmap", "--add", "-g", "128k", str(img), "b0")
    qemu_io(img, "write -P 2 192k 4k", "write -P 3 3M 300k", fmt="qcow2")
    tgt = make_raw_image(tmp_path / "tgt.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={img}",
               "--blockdev", "driver=qcow2,node-name=src,file=f0",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}")
    q = d.qmp
    assert dirty_bitmaps(q, "src") == [bm("b0", count=4 * 128 * 1024, granularity=128 * 1024,
                                          persistent=True)]
    assert backup(q, sync="incremental", bitmap="b0") == {"return": {}}
    # 128 KiB chunks [128k, 256k) and [3M, 3M+384k): the copy bitmap's 64 KiB clusters
    assert job_events(q) == START + DONE + [completed(8 * K64), "concluded", "null"]
    assert dirty_bitmaps(q, "src") == [bm("b0", granularity=128 * 1024, persistent=True)]
    data = tgt.read_bytes()
    assert data[:128 * 1024] == bytes(128 * 1024)
    assert data[128 * 1024:192 * 1024] == b"\x01" * K64
    assert data[192 * 1024:196 * 1024] == b"\x02" * 4096
    assert data[256 * 1024:3 * MiB] == bytes(3 * MiB - 256 * 1024)
    assert data[3 * MiB:3 * MiB + 300 * 1024] == b"\x03" * (300 * 1024)
    assert data[3 * MiB + 300 * 1024:3 * MiB + 384 * 1024] == b"\x01" * (84 * 1024)
    assert data[3 * MiB + 384 * 1024:] == bytes(SIZE - 3 * MiB - 384 * 1024)
    assert d.quit() == 0
    # the (new, empty) b0 is stored back in the image
    out = qemu_img("info", "--output=json", str(img)).stdout
    assert '"name": "b0"' in out


# --- NBD: the bitmaps of an export ------------------------------------------------------------

@pytest.mark.parametrize("bitmaps,writable,error", [
    (["nope"], False, "Bitmap 'nope' is not found"),
    (["b0"], False, "Enabled bitmap 'b0' incompatible with readonly export"),
    ([{"node": "nope", "name": "b0"}], False, "Node 'nope' not found"),
    ([{"node": "src", "name": "x"}], False, "Dirty bitmap 'x' not found"),
    (["off", "off"], False, None),     # one bitmap twice: allowed
    (["busy"], True, "Bitmap 'busy' is currently in use by another operation and cannot be used"),
    (["b0"], True, None),
    ([{"node": "src", "name": "b0"}], False, None),
    (["off", "b0"], True, None),
])
def test_export_bitmap_checks(daemon, engine, tmp_path, bitmaps, writable, error):
    d, src, tgt = start(daemon, engine, tmp_path)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="b0")
    qok(q, "block-dirty-bitmap-add", node="src", name="off", disabled=True)
    qok(q, "block-dirty-bitmap-add", node="src", name="busy", disabled=True)
    qok(q, "block-export-add", type="nbd", id="e0", name="e0", **{"node-name": "src"},
        bitmaps=["busy"])
    reply = q.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                           "writable": writable, "bitmaps": bitmaps})
    if error is not None:
        assert reply.get("error", {}).get("desc") == error, reply
        assert [e["id"] for e in qok(q, "query-block-exports")] == ["e0"]
    else:
        assert reply == {"return": {}}
    names = set(b if isinstance(b, str) else b["name"] for b in bitmaps)
    exported = error is None
    got = {b["name"]: b["busy"] for b in dirty_bitmaps(q, "src") if "name" in b}
    assert got == {"b0": exported and "b0" in names, "off": exported and "off" in names,
                   "busy": True}
    if exported:
        qok(q, "block-export-del", id="e")
        assert q.event_wait("BLOCK_EXPORT_DELETED", timeout=10) is not None
        got = {b["name"]: b["busy"] for b in dirty_bitmaps(q, "src") if "name" in b}
        assert got == {"b0": False, "off": False, "busy": True}


def test_nbd_server_add_bitmap(daemon, engine, tmp_path):
    d, src, tgt = start(daemon, engine, tmp_path)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="b0", disabled=True)
    assert q.cmd_raw("nbd-server-add", {"device": "src", "bitmap": "nope"})["error"]["desc"] \
        == "Bitmap 'nope' is not found"
    assert qok(q, "nbd-server-add", device="src", bitmap="b0") == {}
    assert dirty_bitmaps(q, "src") == [bm("b0", recording=False, busy=True)]


def block_status(h, ctx, size):
    """Every (offset, length, flags) extent of context CTX over [0, SIZE), merged."""
    out = []
    offset = 0
    while offset < size:
        got = []

        def cb(metacontext, off, entries, err, got=got):
            if metacontext == ctx:
                got.extend(entries)
            return 0
        h.block_status(size - offset, offset, cb)
        assert got, "no extents for %s" % ctx
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
                out[-1] = (out[-1][0], out[-1][1] + length, flags)
            else:
                out.append((offset, length, flags))
            offset += length
    return out


def nbdinfo_map(uri, ctx):
    return subprocess.run(["nbdinfo", "--map=" + ctx, uri], capture_output=True, text=True,
                          check=True).stdout


def test_dirty_bitmap_context(daemon, engine, tmp_path, libnbd):
    d, src, tgt = start(daemon, engine, tmp_path)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="b0")
    qok(q, "block-dirty-bitmap-add", node="src", name="b1", granularity=4096)
    qemu_io(export_writable(d), "write 100k 4k", "write 1M 200k", "write 4190208 4k")
    qok(q, "block-dirty-bitmap-disable", node="src", name="b0")
    qok(q, "block-dirty-bitmap-disable", node="src", name="b1")
    qok(q, "block-export-add", type="nbd", id="e", name="ro", **{"node-name": "src"},
        bitmaps=["b1", "b0"], **{"allocation-depth": True})
    uri = d.nbd_uri("ro")
    h = libnbd.NBD()
    h.add_meta_context("qemu:")
    h.set_opt_mode(True)
    h.connect_uri(uri)
    listed = []
    h.opt_list_meta_context(lambda name: listed.append(name) or 0)
    assert listed == ["qemu:allocation-depth", "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"]
    h.opt_abort()
    h = libnbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:b0")
    h.add_meta_context("qemu:dirty-bitmap:b1")
    h.connect_uri(uri)
    assert h.can_meta_context("qemu:dirty-bitmap:b0")
    assert h.can_meta_context("qemu:dirty-bitmap:b1")
    assert block_status(h, "qemu:dirty-bitmap:b0", SIZE) == [
        (0, K64, 0), (K64, K64, 1), (2 * K64, MiB - 2 * K64, 0), (MiB, 4 * K64, 1),
        (MiB + 4 * K64, SIZE - MiB - 5 * K64, 0), (SIZE - K64, K64, 1)]
    assert block_status(h, "qemu:dirty-bitmap:b1", SIZE) == [
        (0, 100 * 1024, 0), (100 * 1024, 4096, 1), (104 * 1024, MiB - 104 * 1024, 0),
        (MiB, 200 * 1024, 1), (MiB + 200 * 1024, SIZE - MiB - 204 * 1024, 0),
        (SIZE - 4096, 4096, 1)]
    h.shutdown()
    # blockd's own NBD client sees the same
    assert nbdc.list_meta_contexts(uri, "ro", ["qemu:dirty-bitmap:"]) == [
        "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"]
    c = nbdc.connect_uri(uri, meta_contexts=["qemu:dirty-bitmap:b0", "base:allocation"])
    try:
        assert [tuple(e) for e in c.map("qemu:dirty-bitmap:b0", 0, 2 * MiB)] == [
            (0, K64, 0), (K64, K64, 1), (2 * K64, MiB - 2 * K64, 0), (MiB, 4 * K64, 1),
            (MiB + 4 * K64, MiB - 4 * K64, 0)]
        one = c.block_status(K64 + 5, MiB, req_one=True)
        assert [tuple(e) for e in one["qemu:dirty-bitmap:b0"]] == [(K64 + 5, K64 - 5, 1)]
        assert len(one["base:allocation"]) == 1
    finally:
        c.close()
    out = nbdinfo_map(uri, "qemu:dirty-bitmap:b1")
    assert out.split("\n")[:3] == [
        "         0      102400    0  clean",
        "    102400        4096    1  dirty",
        "    106496      942080    0  clean"]
    assert dirty_bitmaps(q, "src") == [bm("b1", count=2 * 4096 + 200 * 1024, granularity=4096,
                                          recording=False, busy=True),
                                       bm("b0", count=6 * K64, recording=False, busy=True)]


def test_pull_mode_incremental_fleecing(daemon, engine, tmp_path, libnbd):
    """libvirt/Proxmox pull mode: b0 frozen into a temporary bitmap, a sync=none backup to a
    fleecing overlay, the overlay exported read-only with the temporary bitmap."""
    src = pattern_image(tmp_path / "src.img")
    original = src.read_bytes()
    fleece = tmp_path / "fleece.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(src), str(fleece))
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=ff,filename={fleece}",
               "--blockdev", "driver=qcow2,node-name=fl,file=ff,backing=src", nbd=True)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="b0")
    w = libnbd.NBD()
    w.connect_uri(export_writable(d))
    w.pwrite(b"\x11" * 4096, 5 * K64 + 100)
    w.pwrite(b"\x22" * (3 * K64), 2 * MiB)
    w.flush()
    assert qok(q, "transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "src", "name": "backup", "disabled": True}},
        {"type": "block-dirty-bitmap-merge",
         "data": {"node": "src", "target": "backup", "bitmaps": ["b0"]}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b1"}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "src", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "fl",
                                             "sync": "none"}}]) == {}
    assert job_events(q, until="running") == ["created", "running"]
    assert job_events(q, until="running") == ["paused", "running"]
    qok(q, "block-export-add", type="nbd", id="view", name="view", **{"node-name": "fl"},
        bitmaps=["backup"])
    # guest writes after the point in time: in b1, not in the exported bitmap
    w.pwrite(b"\x33" * 4096, 2 * MiB + K64)
    w.pwrite(b"\x44" * 4096, 3 * MiB)
    w.flush()
    r = libnbd.NBD()
    r.add_meta_context("qemu:dirty-bitmap:backup")
    r.connect_uri(d.nbd_uri("view"))
    dirty = [(o, n) for o, n, f in block_status(r, "qemu:dirty-bitmap:backup", SIZE) if f]
    assert dirty == [(5 * K64, K64), (2 * MiB, 3 * K64)]
    point_in_time = bytearray(original)
    point_in_time[5 * K64 + 100:5 * K64 + 4196] = b"\x11" * 4096
    point_in_time[2 * MiB:2 * MiB + 3 * K64] = b"\x22" * (3 * K64)
    for off, n in dirty:
        assert r.pread(n, off) == bytes(point_in_time[off:off + n])
    r.shutdown()
    w.shutdown()
    got = dirty_bitmaps(q, "src")
    assert [(b.get("name"), b["count"], b["busy"]) for b in got] == [
        # the copy bitmap less the 2 clusters the filter copied, b1 has the 2 new writes
        (None, SIZE - 2 * K64, False), ("b1", 2 * K64, False), ("backup", 4 * K64, True)]
    qok(q, "block-export-del", id="view", mode="hard")   # r may not be gone yet
    assert q.event_wait("BLOCK_EXPORT_DELETED", timeout=10) is not None
    qok(q, "block-job-cancel", device="j")
    assert job_events(q)[-1] == "null"
    assert [(b["name"], b["busy"]) for b in dirty_bitmaps(q, "src")] == [
        ("b1", False), ("backup", False)]


def test_bitmap_exported_twice(daemon, engine, tmp_path):
    """One bitmap listed twice: two contexts of one name; SET selects one (no double map)."""
    d, src, tgt = start(daemon, engine, tmp_path)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="off", disabled=True)
    qok(q, "block-export-add", type="nbd", id="e", **{"node-name": "src"},
        bitmaps=["off", "off"])
    out = subprocess.run(["nbdinfo", "--json", d.nbd_uri("src")], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["exports"][0]["contexts"] == [
        "base:allocation", "qemu:dirty-bitmap:off", "qemu:dirty-bitmap:off"]
    assert nbdinfo_map(d.nbd_uri("src"), "qemu:dirty-bitmap:off") == \
        "         0     4194304    0  clean\n"


def test_transaction_failure_gives_the_bitmap_back(daemon, engine, tmp_path):
    """An incremental backup prepared in a transaction that fails: the job never runs, the
    successor is merged back (backup_abort())."""
    d, src, tgt = start(daemon, engine, tmp_path)
    q = d.qmp
    qok(q, "block-dirty-bitmap-add", node="src", name="b0")
    qemu_io(export_writable(d), "write 0 64k")
    reply = q.cmd_raw("transaction", {"actions": [
        {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "tgt",
                                             "sync": "incremental", "bitmap": "b0"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "nope", "name": "x"}}]})
    assert reply["error"]["desc"] == "Cannot find device='nope' nor node-name='nope'"
    assert job_events(q) == ["created", "aborting", "concluded", "null"]
    assert dirty_bitmaps(q, "src") == [bm("b0", count=K64)]
    assert qok(q, "query-block-jobs") == []
    # and it can drive a backup now
    assert backup(q, sync="incremental", bitmap="b0") == {"return": {}}
    assert job_events(q)[-3:] == [completed(K64), "concluded", "null"]
    assert dirty_bitmaps(q, "src") == [bm("b0")]


@pytest.mark.parametrize("spec", ["bitmaps.0=b0", "bitmaps.0.node=q0,bitmaps.0.name=b0"])
def test_cli_export_of_a_persistent_bitmap(daemon, engine, tmp_path, spec):
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write 1M 4k", fmt="qcow2")
    qemu_img("bitmap", "--disable", str(img), "b0")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={img}",
               "--blockdev", "driver=qcow2,node-name=q0,file=f0",
               "--export", "type=nbd,id=e,node-name=q0,name=disk," + spec, nbd=True)
    assert nbdinfo_map(d.nbd_uri("disk"), "qemu:dirty-bitmap:b0") == (
        "         0     1048576    0  clean\n"
        "   1048576       65536    1  dirty\n"
        "   1114112     3080192    0  clean\n")
    assert dirty_bitmaps(d.qmp, "q0") == [bm("b0", count=K64, recording=False, busy=True,
                                             persistent=True)]


def test_cli_export_of_an_enabled_bitmap_read_only(daemon, engine, tmp_path):
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", str(img), "b0")
    res = daemon.run(engine, "--blockdev", f"driver=file,node-name=f0,filename={img}",
                     "--blockdev", "driver=qcow2,node-name=q0,file=f0",
                     "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
                     "--export", "type=nbd,id=e,node-name=q0,bitmaps.0=b0")
    assert res.returncode == 1
    assert res.stderr.endswith(
        "Enabled bitmap 'b0' incompatible with readonly export\n"), res.stderr


def test_quit_during_incremental_keeps_the_persistent_bitmap(daemon, engine, tmp_path):
    """qsd cancels the job at quit: the successor is merged back and the bitmap is stored
    enabled with its bits."""
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write 0 4k", "write 2M 64k", fmt="qcow2")
    tgt = make_raw_image(tmp_path / "tgt.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={img}",
               "--blockdev", "driver=qcow2,node-name=src,file=f0",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}")
    q = d.qmp
    assert backup(q, sync="incremental", bitmap="b0", speed=1) == {"return": {}}
    assert job_events(q, until="running") == ["created", "running"]
    assert job_events(q, until="running") == ["paused", "running"]
    assert d.quit() == 0
    bitmaps = json.loads(qemu_img("info", "--output=json", str(img)).stdout)[
        "format-specific"]["data"]["bitmaps"]
    assert bitmaps == [{"flags": ["auto"], "name": "b0", "granularity": K64}]
    out = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(tgt)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 1
    # the bits are still there: a new incremental copies both areas
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={img}",
               "--blockdev", "driver=qcow2,node-name=src,file=f0",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}")
    q = d.qmp
    assert dirty_bitmaps(q, "src") == [bm("b0", count=2 * K64, persistent=True)]


def test_inconsistent_bitmap_is_refused(daemon, engine, tmp_path):
    """A bitmap left in-use by a SIGKILL can neither drive a backup nor be exported."""
    img = tmp_path / "u.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", str(img), "b0")
    args = ["--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", "driver=qcow2,node-name=src,file=f0",
            "--blockdev", f"driver=file,node-name=tgt,filename={tmp_path / 'tgt.img'}"]
    make_raw_image(tmp_path / "tgt.img", SIZE)
    d = daemon(engine, *args, nbd=True)
    qemu_io(export_writable(d), "write 2M 64k")
    d.kill()
    d = daemon(engine, *args, nbd=True)
    q = d.qmp
    text = "Bitmap 'b0' is inconsistent and cannot be used"
    for mode in ("on-success", "never"):
        reply = backup(q, sync="bitmap", bitmap="b0", **{"bitmap-mode": mode})
        assert reply["error"]["desc"] == text
    reply = q.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                           "bitmaps": [{"node": "src", "name": "b0"}]})
    assert reply["error"]["desc"] == text
    assert dirty_bitmaps(q, "src") == [{**bm("b0", recording=False, persistent=True),
                                        "inconsistent": True}]


def _read_only_disk(daemon, engine, tmp_path):
    img = tmp_path / "ro.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write 1M 64k", fmt="qcow2")
    tgt = make_raw_image(tmp_path / "tgt.img", SIZE)
    return daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={img},read-only=on",
                  "--blockdev", "driver=qcow2,node-name=src,file=f0,read-only=on",
                  "--blockdev", f"driver=file,node-name=tgt,filename={tgt}", nbd=True)


def test_bitmap_of_a_read_only_image(daemon, engine, tmp_path):
    """An enabled bitmap of a read-only node: exportable read-only, not writable by a backup."""
    d = _read_only_disk(daemon, engine, tmp_path)
    q = d.qmp
    reply = backup(q, sync="bitmap", bitmap="b0", **{"bitmap-mode": "on-success"})
    assert reply["error"]["desc"] == "Bitmap 'b0' is readonly and cannot be modified"
    assert dirty_bitmaps(q, "src") == [bm("b0", count=K64, persistent=True)]
    qok(q, "block-export-add", type="nbd", id="e", **{"node-name": "src"}, bitmaps=["b0"])
    assert nbdinfo_map(d.nbd_uri("src"), "qemu:dirty-bitmap:b0").split("\n")[1] == \
        "   1048576       65536    1  dirty"


def test_never_mode_backup_of_a_read_only_image(daemon, engine, tmp_path):
    """bitmap-mode=never only reads the bitmap: a read-only node can be backed up with it."""
    d = _read_only_disk(daemon, engine, tmp_path)
    q = d.qmp
    assert backup(q, sync="bitmap", bitmap="b0", **{"bitmap-mode": "never"}) == {"return": {}}
    assert job_events(q)[-3:] == [completed(K64), "concluded", "null"]
    assert dirty_bitmaps(q, "src") == [bm("b0", count=K64, persistent=True)]
