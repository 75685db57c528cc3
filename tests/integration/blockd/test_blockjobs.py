"""query-block-jobs and the block-job-* commands, run against qsd and blockd alike.

The expected replies, error classes and texts are what qemu-storage-daemon 7.2 does (the qsd
cases prove it).  A backup with sync=none is the long-running block job used here.
"""

import pytest

from helpers import MiB, make_raw_image

SIZE = 4 * MiB


_PENDING = {}


def statuses(q, job_id, until, nth=1, timeout=30, others=None):
    """JOB_STATUS_CHANGE statuses of JOB_ID up to the NTH change to UNTIL.

    Events of other jobs are kept for later calls; the other events of JOB_ID on the
    way are appended to OTHERS (a list) if given."""
    buf = _PENDING.setdefault(id(q), [])
    seen = []
    while True:
        ev = None
        for i, cand in enumerate(buf):
            data = cand.get("data", {})
            if data.get("id", data.get("device")) == job_id:
                ev = buf.pop(i)
                break
        if ev is None:
            ev = q.pull_event(wait=timeout)
            assert ev is not None
            data = ev.get("data", {})
            if data.get("id", data.get("device")) != job_id:
                buf.append(ev)
                continue
        if ev["event"] != "JOB_STATUS_CHANGE":
            if others is not None:
                others.append((ev["event"], ev["data"]))
            continue
        seen.append(ev["data"]["status"])
        if seen[-1] == until:
            nth -= 1
            if not nth:
                return seen
        assert len(seen) < 30, seen


@pytest.fixture
def two_disks(tmp_path):
    paths = []
    for name in ("src.img", "tgt.img", "tgt2.img"):
        paths.append(make_raw_image(tmp_path / name, SIZE, b"\x11" if name == "src.img" else None))
    return paths


def start(daemon, engine, two_disks, *extra):
    src, tgt, tgt2 = two_disks
    return daemon(engine, "--blockdev", f"driver=file,node-name=src,filename={src}",
                  "--blockdev", f"driver=file,node-name=tgt,filename={tgt}",
                  "--blockdev", f"driver=file,node-name=tgt2,filename={tgt2}", *extra)


def none_backup(q, job_id="j", target="tgt", **extra):
    args = {"job-id": job_id, "device": "src", "target": target, "sync": "none"}
    args.update(extra)
    assert q.cmd("blockdev-backup", **args) == {}
    assert statuses(q, job_id, "running", nth=2) == ["created", "running", "paused", "running"]


@pytest.mark.parametrize("command,args", [
    ("block-job-cancel", {"device": "x"}),
    ("block-job-cancel", {"device": "x", "force": True}),
    ("block-job-pause", {"device": "x"}),
    ("block-job-resume", {"device": "x"}),
    ("block-job-complete", {"device": "x"}),
    ("block-job-set-speed", {"device": "x", "speed": 0}),
    ("block-job-set-speed", {"device": "x", "speed": -1}),
    ("block-job-finalize", {"id": "x"}),
    ("block-job-dismiss", {"id": "x"}),
])
def test_unknown_block_job(daemon, engine, command, args):
    d = daemon(engine)
    assert d.qmp.error(command, **args) == {"class": "DeviceNotActive",
                                            "desc": "Block job 'x' not found"}
    assert d.qmp.cmd("query-block-jobs") == []


def test_create_job_is_not_a_block_job(daemon, engine, tmp_path):
    d = daemon(engine)
    q = d.qmp
    q.cmd("blockdev-create", **{"job-id": "c", "options": {
        "driver": "file", "filename": str(tmp_path / "new.raw"), "size": MiB}})
    assert statuses(q, "c", "concluded")[-1] == "concluded"
    assert q.cmd("query-block-jobs") == []
    for command, args in [("block-job-dismiss", {"id": "c"}),
                          ("block-job-cancel", {"device": "c"}),
                          ("block-job-pause", {"device": "c"})]:
        assert q.error(command, **args) == {"class": "DeviceNotActive",
                                            "desc": "Block job 'c' not found"}
    assert q.cmd("job-dismiss", id="c") == {}


def test_query_block_jobs_and_query_jobs(daemon, engine, two_disks):
    d = start(daemon, engine, two_disks)
    q = d.qmp
    none_backup(q, "j1", **{"auto-dismiss": False, "speed": 123})
    none_backup(q, "j2", target="tgt2", **{"auto-finalize": False})
    # the second backup drained j1 twice (drain all, then the shared source)
    assert statuses(q, "j1", "running", nth=2) == ["paused", "running", "paused", "running"]
    common = {"type": "backup", "len": SIZE, "offset": 0, "busy": False, "paused": False,
              "io-status": "ok", "ready": False, "status": "running"}
    assert q.cmd("query-block-jobs") == [
        dict(common, device="j2", speed=0, **{"auto-finalize": False, "auto-dismiss": True}),
        dict(common, device="j1", speed=123, **{"auto-finalize": True, "auto-dismiss": False})]
    assert q.cmd("query-jobs") == [
        {"id": "j2", "type": "backup", "status": "running", "current-progress": 0,
         "total-progress": SIZE},
        {"id": "j1", "type": "backup", "status": "running", "current-progress": 0,
         "total-progress": SIZE}]
    # job-* verbs work on block jobs too
    assert q.cmd("job-pause", id="j2") == {}
    assert statuses(q, "j2", "paused") == ["paused"]
    assert q.cmd("query-block-jobs")[0]["paused"] is True
    assert q.cmd("job-resume", id="j2") == {}
    assert statuses(q, "j2", "running") == ["running"]
    assert q.error("job-complete", id="j2")["desc"] == \
        "Job 'j2' in state 'running' cannot accept command verb 'complete'"
    # cancelled, not dismissed: concluded with the cancel as error
    assert q.cmd("block-job-cancel", device="j1") == {}
    assert statuses(q, "j1", "concluded") == ["aborting", "concluded"]
    info = q.cmd("query-block-jobs")[1]
    assert info == dict(common, device="j1", speed=123, status="concluded",
                        error="Operation canceled",
                        **{"auto-finalize": True, "auto-dismiss": False})
    for command, verb in [("block-job-cancel", "cancel"), ("block-job-pause", "pause"),
                          ("block-job-complete", "complete")]:
        assert q.error(command, device="j1")["desc"] == \
            f"Job 'j1' in state 'concluded' cannot accept command verb '{verb}'"
    assert q.error("block-job-set-speed", device="j1", speed=5)["desc"] == \
        "Job 'j1' in state 'concluded' cannot accept command verb 'set-speed'"
    assert q.error("block-job-resume", device="j1")["desc"] == \
        "Can't resume a job that was not paused"
    assert q.error("block-job-finalize", id="j1")["desc"] == \
        "Job 'j1' in state 'concluded' cannot accept command verb 'finalize'"
    assert q.cmd("block-job-dismiss", id="j1") == {}
    assert statuses(q, "j1", "null") == ["null"]
    # a job with auto-finalize off that is cancelled needs no finalize
    assert q.cmd("job-cancel", id="j2") == {}
    assert statuses(q, "j2", "null") == ["aborting", "concluded", "null"]
    assert q.cmd("query-block-jobs") == []
    assert q.cmd("query-jobs") == []


def test_cancel_events_and_force(daemon, engine, two_disks):
    d = start(daemon, engine, two_disks)
    q = d.qmp
    none_backup(q, speed=77)
    assert q.cmd("block-job-pause", device="j") == {}
    assert statuses(q, "j", "paused") == ["paused"]
    assert q.error("block-job-cancel", device="j", force=False) == {
        "class": "GenericError", "desc": "The block job for device 'j' is currently paused"}
    assert q.cmd("block-job-cancel", device="j", force=True) == {}
    events = []
    assert statuses(q, "j", "null", others=events) == ["running", "aborting", "concluded",
                                                       "null"]
    assert events == [("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "j", "len": SIZE,
                                               "offset": 0, "speed": 77})]
    assert q.error("block-job-cancel", device="j") == {
        "class": "DeviceNotActive", "desc": "Block job 'j' not found"}


def test_blockdev_del_while_a_job_runs(daemon, engine, two_disks):
    d = start(daemon, engine, two_disks)
    q = d.qmp
    none_backup(q, **{"filter-node-name": "f"})
    busy = "Node '%s' is busy: block device is in use by block job: backup"
    assert q.error("blockdev-del", **{"node-name": "src"})["desc"] == \
        "Block device src is in use"
    assert q.error("blockdev-del", **{"node-name": "tgt"})["desc"] == busy % "tgt"
    assert q.error("blockdev-del", **{"node-name": "f"})["desc"] == busy % "f"
    assert q.cmd("blockdev-del", **{"node-name": "tgt2"}) == {}
    q.cmd("block-job-cancel", device="j")
    assert statuses(q, "j", "null")[-1] == "null"
    for name in ("tgt", "src"):
        assert q.cmd("blockdev-del", **{"node-name": name}) == {}
    assert q.cmd("query-named-block-nodes") == []


def test_quit_cancels_a_running_backup_first(daemon, engine, two_disks):
    d = start(daemon, engine, two_disks)
    d.close_qmp()
    d.expect_exit()
    with d.raw_qmp(timeout=30) as q:
        q.negotiate()
        assert q.execute("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                             "sync": "none"}) == {"return": {}}
        # blockdev-backup replies after the job started (and its drain flap)
        assert [(e["event"], e["data"]) for e in q.events] == [
            ("JOB_STATUS_CHANGE", {"status": s, "id": "j"})
            for s in ("created", "running", "paused", "running")]
        q.events.clear()
        assert q.execute("quit") == {"return": {}}
        # qsd drains all nodes first (the job pauses and resumes), then cancels
        assert [(e["event"], e["data"]) for e in q.events] == [
            ("JOB_STATUS_CHANGE", {"status": "paused", "id": "j"}),
            ("JOB_STATUS_CHANGE", {"status": "running", "id": "j"}),
            ("JOB_STATUS_CHANGE", {"status": "aborting", "id": "j"}),
            ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "j", "len": SIZE, "offset": 0,
                                     "speed": 0}),
            ("JOB_STATUS_CHANGE", {"status": "concluded", "id": "j"}),
            ("JOB_STATUS_CHANGE", {"status": "null", "id": "j"})]
    assert d.wait(30) == 0


def test_backups_of_one_source_drain_each_other(daemon, engine, two_disks):
    """A second backup of the source pauses the first one while it starts (drain all,
    then the source) and while its filter is dropped at the end."""
    d = start(daemon, engine, two_disks)
    q = d.qmp
    none_backup(q, "j")
    assert q.cmd("blockdev-backup", **{"job-id": "k", "device": "src", "target": "tgt2",
                                       "sync": "full"}) == {}
    k_events = []
    assert statuses(q, "k", "null", others=k_events) == [
        "created", "running", "paused", "running", "waiting", "pending", "concluded", "null"]
    assert [name for name, _data in k_events] == ["BLOCK_JOB_COMPLETED"]
    assert statuses(q, "j", "running", nth=3) == ["paused", "running"] * 3
    q.cmd("block-job-cancel", device="j")
    assert statuses(q, "j", "null") == ["aborting", "concluded", "null"]
    assert sorted(n["node-name"] for n in q.cmd("query-named-block-nodes")) == [
        "src", "tgt", "tgt2"]
