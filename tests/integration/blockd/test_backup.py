"""blockdev-backup (sync full/top/none) and its faults, run against qsd and blockd alike.

Every expected reply, error text and event sequence is what qemu-storage-daemon 7.2 does
(the qsd cases prove it); the data is checked through qemu-img compare and NBD reads.
"""

import subprocess

import pytest

from helpers import MiB, make_raw_image, qemu_img, qemu_io, tmpfs

SIZE = 4 * MiB
CLUSTER = 64 * 1024


# --- helpers -----------------------------------------------------------------------------

def job_events(q, job_id, until="null", timeout=60, nth=1):
    """The events of JOB_ID (JOB_STATUS_CHANGE as its status, BLOCK_JOB_* as (name, data))
    up to the NTH JOB_STATUS_CHANGE to UNTIL."""
    seen = []
    while True:
        ev = _next_event(q, timeout)
        data = ev.get("data", {})
        if ev["event"] == "JOB_STATUS_CHANGE":
            if data["id"] != job_id:
                continue
            seen.append(data["status"])
            if data["status"] == until:
                nth -= 1
                if not nth:
                    return seen
        elif ev["event"].startswith("BLOCK_JOB_"):
            if data.get("device", data.get("id")) != job_id:
                continue
            seen.append((ev["event"], data))
        assert sum(isinstance(x, str) for x in seen) < 50, seen


def _next_event(q, timeout):
    ev = q.pull_event(wait=timeout)
    assert ev is not None, "no event within %ss" % timeout
    return ev


def completed(job_id="j", length=SIZE, offset=None, speed=0, error=None):
    data = {"type": "backup", "device": job_id, "len": length,
            "offset": length if offset is None else offset, "speed": speed}
    if error is not None:
        data["error"] = error
    return ("BLOCK_JOB_COMPLETED", data)


def cancelled(job_id="j", length=SIZE, offset=0, speed=0):
    return ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": job_id, "len": length,
                                    "offset": offset, "speed": speed})


START = ["created", "running", "paused", "running"]


def node_names(q):
    return sorted(n["node-name"] for n in q.cmd("query-named-block-nodes", flat=True))


def pattern_image(path, size=SIZE):
    """A raw image whose every 64 KiB cluster holds a different byte (zero cluster 3)."""
    with open(path, "wb") as f:
        for i in range(size // CLUSTER):
            f.write(bytes([0 if i == 3 else (i % 250) + 1]) * CLUSTER)
    return path


def files(tmp_path, *names):
    return [tmp_path / n for n in names]


def start_two(daemon, engine, tmp_path, nbd=False, target_size=SIZE):
    src, tgt = files(tmp_path, "src.img", "tgt.img")
    pattern_image(src)
    make_raw_image(tgt, target_size)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}", nbd=nbd)
    return d, src, tgt


def start_three(daemon, engine, tmp_path):
    """src (a pattern) and two empty targets, tgt and tgt2."""
    src, tgt, tgt2 = files(tmp_path, "src.img", "tgt.img", "tgt2.img")
    pattern_image(src)
    make_raw_image(tgt, SIZE)
    make_raw_image(tgt2, SIZE)
    return daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
                  "--blockdev", f"driver=file,node-name=tgt,filename={tgt}",
                  "--blockdev", f"driver=file,node-name=tgt2,filename={tgt2}")


def backup(q, **args):
    args.setdefault("job-id", "j")
    args.setdefault("device", "src")
    args.setdefault("target", "tgt")
    return q.cmd("blockdev-backup", **args)


def compare(a, b, fmt_a="raw", fmt_b="raw"):
    return subprocess.run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
                          capture_output=True, text=True, check=False)


# --- sync=full --------------------------------------------------------------------------

def test_full_backup_copies_everything(daemon, engine, tmp_path):
    d, src, tgt = start_two(daemon, engine, tmp_path)
    q = d.qmp
    before = node_names(q)
    assert backup(q, sync="full") == {}
    assert job_events(q, "j") == START + ["waiting", "pending", completed(), "concluded",
                                          "null"]
    assert q.cmd("query-block-jobs") == []
    assert node_names(q) == before
    assert compare(src, tgt).returncode == 0
    # the nodes are free again
    assert q.cmd("blockdev-del", **{"node-name": "tgt"}) == {}
    assert q.cmd("blockdev-del", **{"node-name": "src"}) == {}


def test_full_backup_manual_finalize_and_dismiss(daemon, engine, tmp_path):
    d, src, tgt = start_two(daemon, engine, tmp_path)
    q = d.qmp
    backup(q, sync="full", **{"auto-finalize": False, "auto-dismiss": False})
    assert job_events(q, "j", until="pending") == START + ["waiting", "pending"]
    assert q.event_wait("BLOCK_JOB_PENDING", timeout=10)["data"] == {"type": "backup",
                                                                     "id": "j"}
    info = q.cmd("query-block-jobs")
    assert info == [{"type": "backup", "device": "j", "len": SIZE, "offset": SIZE,
                     "busy": False, "paused": False, "speed": 0, "io-status": "ok",
                     "ready": False, "status": "pending", "auto-finalize": False,
                     "auto-dismiss": False}]
    assert q.error("block-job-dismiss", id="j")["desc"] == \
        "Job 'j' in state 'pending' cannot accept command verb 'dismiss'"
    # still blocking its target while pending
    assert q.error("blockdev-del", **{"node-name": "tgt"})["desc"] == \
        "Node 'tgt' is busy: block device is in use by block job: backup"
    assert q.cmd("block-job-finalize", id="j") == {}
    assert job_events(q, "j", until="concluded") == [completed(), "concluded"]
    assert q.cmd("query-block-jobs")[0]["status"] == "concluded"
    # concluded: the filter and the blockers are gone already
    assert q.cmd("blockdev-del", **{"node-name": "tgt"}) == {}
    assert q.cmd("block-job-dismiss", id="j") == {}
    assert job_events(q, "j") == ["null"]
    assert q.cmd("query-block-jobs") == []
    assert compare(src, tgt).returncode == 0


# --- sync=none ----------------------------------------------------------------------------

def test_none_backup_copies_before_write_and_cancel_restores_graph(daemon, engine, tmp_path,
                                                                   libnbd):
    d, src, tgt = start_two(daemon, engine, tmp_path, nbd=True)
    q = d.qmp
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "src", "writable": True})
    before = node_names(q)
    exports = q.cmd("query-block-exports")
    assert backup(q, sync="none", **{"filter-node-name": "flt"}) == {}
    assert job_events(q, "j", until="running") == ["created", "running"]
    assert job_events(q, "j", until="running") == ["paused", "running"]
    assert node_names(q) == sorted(before + ["flt"])
    flt = [n for n in q.cmd("query-named-block-nodes", flat=True) if n["node-name"] == "flt"]
    assert flt[0]["drv"] == "copy-before-write"
    assert q.cmd("query-block-jobs") == [{
        "type": "backup", "device": "j", "len": SIZE, "offset": 0, "busy": False,
        "paused": False, "speed": 0, "io-status": "ok", "ready": False, "status": "running",
        "auto-finalize": True, "auto-dismiss": True}]
    h = libnbd.NBD()
    h.connect_uri(d.nbd_uri("src"))
    h.pwrite(b"\xee" * 4096, CLUSTER * 2 + 100)
    h.flush()
    h.shutdown()
    info = q.cmd("query-block-jobs")[0]
    assert (info["offset"], info["len"]) == (CLUSTER, SIZE)
    # the target has the old contents of the written cluster, zeros elsewhere
    data = tgt.read_bytes()
    assert data[2 * CLUSTER:3 * CLUSTER] == bytes([3]) * CLUSTER
    assert data[:2 * CLUSTER] == bytes(2 * CLUSTER)
    assert src.read_bytes()[2 * CLUSTER + 100:2 * CLUSTER + 4196] == b"\xee" * 4096
    assert q.cmd("block-job-cancel", device="j") == {}
    assert job_events(q, "j") == ["aborting", cancelled(offset=CLUSTER), "concluded", "null"]
    assert node_names(q) == before
    assert q.cmd("query-block-exports") == exports
    assert q.cmd("query-block-jobs") == []


def test_old_style_fleecing(daemon, engine, tmp_path, libnbd):
    """qcow2 target backed by the source, exported read-only: a point-in-time view."""
    src = pattern_image(tmp_path / "src.img")
    fleece = tmp_path / "fleece.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(src), str(fleece))
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=ff,filename={fleece}",
               "--blockdev", "driver=qcow2,node-name=fl,file=ff,backing=src", nbd=True)
    q = d.qmp
    q.cmd_raw("block-export-add", {"type": "nbd", "id": "disk", "name": "disk",
                                   "node-name": "src", "writable": True})
    assert backup(q, sync="none", target="fl") == {}
    assert q.cmd_raw("block-export-add", {"type": "nbd", "id": "view", "name": "view",
                                          "node-name": "fl"}) == {"return": {}}
    original = src.read_bytes()
    w = libnbd.NBD()
    w.connect_uri(d.nbd_uri("disk"))
    r = libnbd.NBD()
    r.connect_uri(d.nbd_uri("view"))
    for off in (0, CLUSTER * 5 + 7, SIZE - 4096):
        w.pwrite(b"\x5a" * 4096, off)
    w.flush()
    assert r.pread(SIZE, 0) == original
    w.shutdown()
    r.shutdown()
    assert q.error("blockdev-del", **{"node-name": "fl"})["desc"] == "Node fl is in use"
    q.cmd("block-export-del", id="view")
    assert q.error("blockdev-del", **{"node-name": "fl"})["desc"] == \
        "Node 'fl' is busy: block device is in use by block job: backup"
    q.cmd("block-job-cancel", device="j")
    assert job_events(q, "j")[-1] == "null"


# --- sync=top -----------------------------------------------------------------------------

def test_top_backup_copies_only_the_top_layer(daemon, engine, tmp_path):
    base = pattern_image(tmp_path / "base.img")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top))
    qemu_io(top, f"write -P 0x77 {CLUSTER} {CLUSTER * 2}",
            f"write -P 0x66 {SIZE - CLUSTER} 512", fmt="qcow2")
    tgt = make_raw_image(tmp_path / "tgt.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=bf,filename={base}",
               "--blockdev", f"driver=file,node-name=tf,filename={top}",
               "--blockdev", "driver=qcow2,node-name=top,file=tf,backing=bf",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}")
    q = d.qmp
    backup(q, sync="top", device="top")
    assert job_events(q, "j") == START + ["waiting", "pending",
                                          completed(length=3 * CLUSTER), "concluded", "null"]
    data = tgt.read_bytes()
    expected = bytearray(SIZE)
    expected[CLUSTER:3 * CLUSTER] = b"\x77" * (2 * CLUSTER)
    last = bytearray(base.read_bytes()[SIZE - CLUSTER:])
    last[:512] = b"\x66" * 512
    expected[SIZE - CLUSTER:] = last
    assert data == bytes(expected)


# --- verbs on a running backup --------------------------------------------------------------

def test_pause_resume_set_speed_cancel(daemon, engine, tmp_path):
    d, src, tgt = start_two(daemon, engine, tmp_path)
    q = d.qmp
    backup(q, sync="none")
    assert job_events(q, "j", until="running") == ["created", "running"]
    assert job_events(q, "j", until="running") == ["paused", "running"]
    assert q.cmd("block-job-pause", device="j") == {}
    assert job_events(q, "j", until="paused") == ["paused"]
    info = q.cmd("query-block-jobs")[0]
    assert (info["status"], info["paused"], info["busy"]) == ("paused", True, False)
    assert q.error("block-job-pause", device="j")["desc"] == "Job is already paused"
    assert q.error("block-job-cancel", device="j")["desc"] == \
        "The block job for device 'j' is currently paused"
    assert q.cmd("block-job-resume", device="j") == {}
    assert job_events(q, "j", until="running") == ["running"]
    assert q.error("block-job-resume", device="j")["desc"] == \
        "Can't resume a job that was not paused"
    assert q.error("block-job-set-speed", device="j", speed=-1)["desc"] == \
        "Parameter 'speed' expects a non-negative value"
    assert q.cmd("block-job-set-speed", device="j", speed=1000) == {}
    assert q.cmd("query-block-jobs")[0]["speed"] == 1000
    assert q.error("block-job-complete", device="j")["desc"] == \
        "Job 'j' in state 'running' cannot accept command verb 'complete'"
    assert q.error("block-job-finalize", id="j")["desc"] == \
        "Job 'j' in state 'running' cannot accept command verb 'finalize'"
    assert q.error("block-job-dismiss", id="j")["desc"] == \
        "Job 'j' in state 'running' cannot accept command verb 'dismiss'"
    # paused, then cancelled with force
    q.cmd("block-job-pause", device="j")
    assert job_events(q, "j", until="paused") == ["paused"]
    assert q.cmd("block-job-cancel", device="j", force=True) == {}
    assert job_events(q, "j") == ["running", "aborting", cancelled(speed=1000), "concluded",
                                  "null"]
    assert q.error("block-job-cancel", device="j") == {
        "class": "DeviceNotActive", "desc": "Block job 'j' not found"}
    assert compare(src, tgt).returncode == 1


def test_speed_limit_then_unlimited(daemon, engine, tmp_path):
    d, src, tgt = start_two(daemon, engine, tmp_path)
    q = d.qmp
    backup(q, sync="full", speed=CLUSTER)
    assert job_events(q, "j", until="running") == ["created", "running"]
    assert job_events(q, "j", until="running") == ["paused", "running"]
    info = q.cmd("query-block-jobs")[0]
    assert info["speed"] == CLUSTER and info["status"] == "running"
    assert info["offset"] < SIZE
    assert q.cmd("block-job-set-speed", device="j", speed=0) == {}
    assert job_events(q, "j") == ["waiting", "pending", completed(), "concluded", "null"]
    assert compare(src, tgt).returncode == 0


# --- argument and graph checks ------------------------------------------------------------

@pytest.mark.parametrize("args,error", [
    ({"target": "src"}, "Source and target cannot be the same"),
    ({"target": "small"}, "Source and target image have different sizes"),
    ({"target": "ro"}, "Could not create node: Block node is read-only"),
    ({"filter-node-name": "tgt"}, "Could not create node: Duplicate nodes with node-name='tgt'"),
    ({"filter-node-name": "bad name"}, "Could not create node: Invalid node-name: 'bad name'"),
    ({"filter-node-name": "x" * 40}, "Could not create node: Node name too long"),
    ({"filter-node-name": "f", "job-id": "bad id"}, "Invalid job ID 'bad id'"),
    ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"target": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
    ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
    ({"bitmap": "b"}, "Bitmap 'b' could not be found"),
    ({"bitmap-mode": "always"}, "Cannot specify bitmap sync mode without a bitmap"),
    ({"compress": True}, "Compression is not supported for this drive "),
    ({"job-id": "bad id"}, "Invalid job ID 'bad id'"),
    ({"job-id": None}, "Invalid job ID ''"),
    ({"x-perf": {"max-workers": 0}}, "max-workers must be between 1 and 2147483647"),
    ({"x-perf": {"max-chunk": -1}},
     "max-chunk must be zero (which means no limit) or positive"),
    ({"x-perf": {"max-chunk": 512}},
     "Required max-chunk (512) is less than backup cluster size (65536)"),
    ({"speed": -1}, "Parameter 'speed' expects a non-negative value"),
])
def test_backup_errors(daemon, engine, tmp_path, args, error):
    src, tgt, small, ro = files(tmp_path, "src.img", "tgt.img", "small.img", "ro.img")
    pattern_image(src)
    make_raw_image(tgt, SIZE)
    make_raw_image(small, SIZE // 2)
    make_raw_image(ro, SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}",
               "--blockdev", f"driver=file,node-name=small,filename={small}",
               "--blockdev", f"driver=file,node-name=ro,read-only=on,filename={ro}")
    q = d.qmp
    before = q.cmd("query-named-block-nodes", flat=True)
    full = {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}
    full.update(args)
    full = {k: v for k, v in full.items() if v is not None}
    assert q.error("blockdev-backup", **full) == {"class": "GenericError", "desc": error}
    assert q.cmd("query-named-block-nodes", flat=True) == before
    assert q.cmd("query-block-jobs") == []
    events = [(e["event"], e["data"]) for e in q.get_events()]
    if "speed" in args:   # job_early_fail(): the job existed for a moment
        assert events == [("JOB_STATUS_CHANGE", {"status": "created", "id": "j"}),
                          ("JOB_STATUS_CHANGE", {"status": "null", "id": "j"})]
    else:
        assert events == []
    assert tgt.read_bytes() == bytes(SIZE)


def test_nodes_of_a_running_backup_are_blocked(daemon, engine, tmp_path):
    d = start_three(daemon, engine, tmp_path)
    q = d.qmp
    backup(q, sync="none", **{"filter-node-name": "flt"})
    assert job_events(q, "j", until="running") == ["created", "running"]
    assert job_events(q, "j", until="running") == ["paused", "running"]
    busy = "Node '%s' is busy: block device is in use by block job: backup"
    for args, error in [
            ({"job-id": "k", "target": "tgt"}, busy % "tgt"),
            ({"job-id": "k", "device": "tgt", "target": "tgt2"}, busy % "tgt"),
            ({"job-id": "k", "device": "flt", "target": "tgt2"}, busy % "flt"),
            ({"job-id": "j", "target": "tgt2"}, "Job ID 'j' already in use")]:
        full = {"device": "src", "sync": "none"}
        full.update(args)
        assert q.error("blockdev-backup", **full)["desc"] == error
        # each attempt drains all nodes, then the source: the job pauses and resumes twice
        assert job_events(q, "j", until="running") == ["paused", "running"]
        assert job_events(q, "j", until="running") == ["paused", "running"]
    # a node that does not exist: no drain of the source
    assert q.error("blockdev-backup", device="src", target="nope", sync="none",
                   **{"job-id": "k"})["desc"] == "Cannot find device='nope' nor node-name='nope'"
    assert job_events(q, "j", until="running") == ["paused", "running"]
    for name, error in [("src", "Block device src is in use"), ("tgt", busy % "tgt"),
                        ("flt", busy % "flt")]:
        assert q.error("blockdev-del", **{"node-name": name})["desc"] == error
    for name in ("tgt", "flt"):
        assert q.error("block_resize", **{"node-name": name, "size": SIZE})["desc"] == \
            "Device '(null)' is in use"
    q.cmd("block-job-cancel", device="j")
    assert job_events(q, "j") == ["aborting", cancelled(), "concluded", "null"]
    assert q.cmd("blockdev-del", **{"node-name": "tgt"}) == {}


def test_second_backup_of_the_same_source(daemon, engine, tmp_path):
    d = start_three(daemon, engine, tmp_path)
    q = d.qmp
    before = node_names(q)
    backup(q, sync="none")
    assert job_events(q, "j", until="running") == ["created", "running"]
    assert job_events(q, "j", until="running") == ["paused", "running"]
    backup(q, sync="full", target="tgt2", **{"job-id": "k"})
    assert job_events(q, "k") == START + ["waiting", "pending", completed("k"), "concluded",
                                          "null"]
    assert compare(tmp_path / "src.img", tmp_path / "tgt2.img").returncode == 0
    q.cmd("block-job-cancel", device="j")
    assert job_events(q, "j")[-4:] == ["aborting", cancelled(), "concluded", "null"]
    assert node_names(q) == before


def test_cancel_of_a_pending_backup(daemon, engine, tmp_path):
    d, src, tgt = start_two(daemon, engine, tmp_path)
    q = d.qmp
    backup(q, sync="full", **{"auto-finalize": False})
    assert job_events(q, "j", until="pending") == START + ["waiting", "pending"]
    assert q.cmd("block-job-cancel", device="j") == {}
    assert job_events(q, "j") == [("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"}),
                                  "aborting", cancelled(offset=SIZE), "concluded", "null"]
    assert q.cmd("query-block-jobs") == []


# --- I/O errors -----------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 5 MiB tmpfs (we run as root); a 2 MiB filler file leaves room for 3 MiB."""
    with tmpfs(tmp_path / "mnt", "5M") as mnt:
        (mnt / "filler").write_bytes(b"\x01" * (2 * MiB))
        yield mnt


def start_on_small_fs(daemon, engine, tmp_path, mnt):
    src = pattern_image(tmp_path / "src.img")
    tgt = make_raw_image(mnt / "tgt.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}")
    return d, src, tgt


def error_event(action, operation="write"):
    return ("BLOCK_JOB_ERROR", {"device": "j", "operation": operation, "action": action})


def test_target_enospc_report(daemon, engine, tmp_path, small_fs):
    d, src, tgt = start_on_small_fs(daemon, engine, tmp_path, small_fs)
    q = d.qmp
    before = node_names(q)
    backup(q, sync="full")
    events = job_events(q, "j")
    assert events[:4] == START
    assert events[4:6] == [error_event("report"), "aborting"]
    name, data = events[6]
    assert name == "BLOCK_JOB_COMPLETED"
    assert data["error"] == "No space left on device"
    assert 0 < data["offset"] < SIZE and data["len"] == SIZE
    assert events[7:] == ["concluded", "null"]
    assert node_names(q) == before
    assert (tmp_path / "src.img").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("policy", ["stop", "enospc", "auto"])
def test_target_enospc_stop_then_resume(daemon, engine, tmp_path, small_fs, policy):
    d, src, tgt = start_on_small_fs(daemon, engine, tmp_path, small_fs)
    q = d.qmp
    backup(q, sync="full", **{"on-target-error": policy})
    assert job_events(q, "j", until="paused", nth=2) == START + [error_event("stop"), "paused"]
    info = q.cmd("query-block-jobs")[0]
    assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "nospace")
    assert 0 < info["offset"] < SIZE
    assert q.error("block-job-cancel", device="j")["desc"] == \
        "The block job for device 'j' is currently paused"
    (small_fs / "filler").unlink()
    assert q.cmd("block-job-resume", device="j") == {}
    assert job_events(q, "j") == ["running", "waiting", "pending", completed(), "concluded",
                                  "null"]
    assert compare(src, tgt).returncode == 0


def test_target_enospc_stop_then_cancel(daemon, engine, tmp_path, small_fs):
    d, src, tgt = start_on_small_fs(daemon, engine, tmp_path, small_fs)
    q = d.qmp
    before = node_names(q)
    backup(q, sync="full", **{"on-target-error": "stop"})
    assert job_events(q, "j", until="paused", nth=2) == START + [error_event("stop"), "paused"]
    offset = q.cmd("query-block-jobs")[0]["offset"]
    assert q.cmd("block-job-cancel", device="j", force=True) == {}
    assert job_events(q, "j") == ["running", "aborting", cancelled(offset=offset),
                                  "concluded", "null"]
    assert node_names(q) == before


def test_target_enospc_ignore_retries(daemon, engine, tmp_path, small_fs):
    d, src, tgt = start_on_small_fs(daemon, engine, tmp_path, small_fs)
    q = d.qmp
    backup(q, sync="full", **{"on-target-error": "ignore"})
    assert job_events(q, "j", until="running") == ["created", "running"]
    assert job_events(q, "j", until="running") == ["paused", "running"]
    assert q.event_wait("BLOCK_JOB_ERROR", timeout=30)["data"] == error_event("ignore")[1]
    (small_fs / "filler").unlink()
    events = [e for e in job_events(q, "j") if e != error_event("ignore")]
    assert events == ["waiting", "pending", completed(), "concluded", "null"]
    assert compare(src, tgt).returncode == 0


def corrupt_compressed_qcow2(tmp_path, bad_cluster=5):
    """A compressed qcow2 copy of a pattern image whose cluster BAD_CLUSTER cannot be inflated."""
    raw = pattern_image(tmp_path / "plain.img")
    img = tmp_path / "src.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    with open(img, "r+b") as f:
        hdr = f.read(72)
        cluster_bits = int.from_bytes(hdr[20:24], "big")
        l1_offset = int.from_bytes(hdr[40:48], "big")
        f.seek(l1_offset)
        l2_offset = int.from_bytes(f.read(8), "big") & ((1 << 56) - 1) & ~0x1FF
        f.seek(l2_offset + 8 * bad_cluster)
        entry = int.from_bytes(f.read(8), "big")
        assert entry & (1 << 62), "cluster is not compressed"
        host = entry & ((1 << (62 - (cluster_bits - 8))) - 1)
        f.seek(host)
        f.write(b"\xff" * 64)
    return raw, img


def test_source_read_error_report(daemon, engine, tmp_path):
    raw, img = corrupt_compressed_qcow2(tmp_path)
    tgt = make_raw_image(tmp_path / "tgt.img", SIZE)
    before_src = img.read_bytes()
    d = daemon(engine, "--blockdev", f"driver=file,node-name=sf,filename={img}",
               "--blockdev", "driver=qcow2,node-name=src,file=sf",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}")
    q = d.qmp
    before = node_names(q)
    backup(q, sync="full", **{"on-target-error": "stop"})
    events = job_events(q, "j")
    assert events[:6] == START + [error_event("report", "read"), "aborting"]
    name, data = events[6]
    assert (name, data["error"], data["len"]) == ("BLOCK_JOB_COMPLETED",
                                                  "Input/output error", SIZE)
    assert events[7:] == ["concluded", "null"]
    assert node_names(q) == before
    assert d.quit() == 0
    assert img.read_bytes() == before_src


def test_source_read_error_stop(daemon, engine, tmp_path):
    raw, img = corrupt_compressed_qcow2(tmp_path)
    tgt = make_raw_image(tmp_path / "tgt.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=sf,filename={img}",
               "--blockdev", "driver=qcow2,node-name=src,file=sf",
               "--blockdev", f"driver=file,node-name=tgt,filename={tgt}")
    q = d.qmp
    backup(q, sync="full", **{"on-source-error": "stop"})
    assert job_events(q, "j", until="paused", nth=2) == START + [error_event("stop", "read"),
                                                          "paused"]
    info = q.cmd("query-block-jobs")[0]
    assert (info["status"], info["io-status"]) == ("paused", "failed")
    # resume: the read fails again, the job stops again
    q.cmd("block-job-resume", device="j")
    assert job_events(q, "j", until="paused") == ["running", error_event("stop", "read"),
                                                  "paused"]
    q.cmd("block-job-cancel", device="j", force=True)
    assert job_events(q, "j") == ["running", "aborting", cancelled(offset=info["offset"]),
                                  "concluded", "null"]


@pytest.mark.parametrize("extra", [
    {"x-perf": {"max-chunk": 2 * CLUSTER, "max-workers": 1, "use-copy-range": False}},
    {"compress": True},
])
def test_full_backup_to_qcow2_with_options(daemon, engine, tmp_path, extra):
    src = pattern_image(tmp_path / "src.img")
    tgt = tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), str(SIZE))
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=tf,filename={tgt}",
               "--blockdev", "driver=qcow2,node-name=tgt,file=tf")
    q = d.qmp
    assert backup(q, sync="full", **extra) == {}
    assert job_events(q, "j") == START + ["waiting", "pending", completed(), "concluded",
                                          "null"]
    assert d.quit() == 0
    assert compare(src, tgt, fmt_b="qcow2").returncode == 0
    assert "No errors" in qemu_img("check", "-f", "qcow2", str(tgt)).stdout


def test_export_delete_drains_the_job_below(daemon, engine, tmp_path):
    """block-export-del of the fleecing export drains its node twice: the job flaps, as on qsd."""
    src = pattern_image(tmp_path / "src.img")
    fleece = tmp_path / "fleece.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(src), str(fleece))
    other = make_raw_image(tmp_path / "other.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=ff,filename={fleece}",
               "--blockdev", f"driver=file,node-name=other,filename={other}",
               "--blockdev", "driver=qcow2,node-name=fl,file=ff,backing=src", nbd=True)
    q = d.qmp
    backup(q, sync="none", target="fl")
    assert job_events(q, "j", until="running", nth=2)[-1] == "running"
    for export_id, node in (("view", "fl"), ("unrelated", "other")):
        q.cmd_raw("block-export-add", {"type": "nbd", "id": export_id, "name": export_id,
                                       "node-name": node})
        q.get_events()
        q.cmd("block-export-del", id=export_id)
        seen = []
        while not seen or seen[-1][0] != "BLOCK_EXPORT_DELETED":
            ev = _next_event(q, 20)
            seen.append((ev["event"], ev["data"].get("status")))
        seen.pop()
        flaps = [("JOB_STATUS_CHANGE", "paused"), ("JOB_STATUS_CHANGE", "running")] * 2
        assert seen == (flaps if node == "fl" else []), (export_id, seen)
    q.cmd("block-job-cancel", device="j")
    assert job_events(q, "j")[-1] == "null"


# --- push backup from snapshot-access --------------------------------------------------------

def test_push_backup_from_snapshot_access(daemon, engine, tmp_path, libnbd):
    """Modern fleecing with push: cbw + snapshot-access, then blockdev-backup sync=full of the
    snapshot to a third image while the guest keeps writing through the filter."""
    src = pattern_image(tmp_path / "src.img")
    original = src.read_bytes()
    tgt = tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), str(SIZE))
    out = make_raw_image(tmp_path / "out.img", SIZE)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
               "--blockdev", f"driver=file,node-name=tf,filename={tgt}",
               "--blockdev", "driver=qcow2,node-name=tgt,file=tf",
               "--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tgt",
               "--blockdev", "driver=snapshot-access,node-name=snap,file=cbw",
               "--blockdev", f"driver=file,node-name=out,filename={out}",
               "--export", "type=nbd,id=disk,node-name=cbw,name=disk,writable=on", nbd=True)
    q = d.qmp
    w = libnbd.NBD()
    w.connect_uri(d.nbd_uri("disk"))
    w.pwrite(b"\x11" * 4096, 0)          # copied into tgt before the push starts
    assert q.cmd_raw("blockdev-backup", {"job-id": "push", "device": "snap", "target": "out",
                                         "sync": "full", "speed": 4 * MiB}) == {"return": {}}
    for off in range(0, SIZE, 3 * CLUSTER):
        w.pwrite(b"\x22" * 512, off + 100)   # the guest keeps writing during the push
    w.flush()
    events = job_events(q, "push")
    assert events == START + ["waiting", "pending", completed("push", speed=4 * MiB),
                              "concluded", "null"]
    w.shutdown()
    assert out.read_bytes() == original
    assert d.quit() == 0
    data = bytearray(original)
    data[0:4096] = b"\x11" * 4096
    for off in range(0, SIZE, 3 * CLUSTER):
        data[off + 100:off + 612] = b"\x22" * 512
    assert src.read_bytes() == bytes(data)
