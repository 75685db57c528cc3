"""Jobs, blockdev-create and block_resize, run against qsd and blockd alike.

Every expected text and event sequence is what qemu-storage-daemon 7.2 does (the
qsd cases prove it), so blockd passing means a client cannot tell them apart.
"""

import json
import os
import re
import time

import pytest

from helpers import MiB, make_raw_image, nbdinfo_json, qemu_img, run

CREATED = ["created", "running"]
SUCCESS = CREATED + ["waiting", "pending", "concluded"]
FAILURE = CREATED + ["aborting", "concluded"]


def statuses(q, job_id, until, timeout=60):
    """JOB_STATUS_CHANGE statuses of JOB_ID up to (and including) UNTIL."""
    seen = []
    while not seen or seen[-1] != until:
        ev = q.event_wait("JOB_STATUS_CHANGE", timeout=timeout, match={"data": {"id": job_id}})
        seen.append(ev["data"]["status"])
        assert len(seen) < 20, seen
    return seen


def raw_statuses(events, job_id):
    return [e["data"]["status"] for e in events
            if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]


def empty_file(path):
    return make_raw_image(path, 0)


def info(path):
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def check_clean(path):
    out = qemu_img("check", "-f", "qcow2", path).stdout
    assert "No errors were found on the image." in out, out


# --- blockdev-create: lifecycle ------------------------------------------------------------

def test_create_qcow2_lifecycle_and_verbs(daemon, engine, tmp_path):
    img = empty_file(tmp_path / "new.qcow2")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={img}")
    q = d.qmp
    assert q.cmd("blockdev-create", **{"job-id": "j1", "options": {
        "driver": "qcow2", "file": "f0", "size": 64 * MiB}}) == {}
    assert statuses(q, "j1", "concluded") == SUCCESS
    assert q.cmd("query-jobs") == [{"id": "j1", "type": "create", "status": "concluded",
                                    "current-progress": 1, "total-progress": 1}]
    for verb in ("cancel", "finalize", "pause", "complete"):
        assert q.error("job-" + verb, id="j1")["desc"] == \
            f"Job 'j1' in state 'concluded' cannot accept command verb '{verb}'"
    assert q.error("job-resume", id="j1")["desc"] == "Can't resume a job that was not paused"
    # the id stays taken until the job is dismissed
    assert q.error("blockdev-create", **{"job-id": "j1", "options": {
        "driver": "qcow2", "file": "f0", "size": MiB}})["desc"] == "Job ID 'j1' already in use"
    assert q.cmd("job-dismiss", id="j1") == {}
    assert statuses(q, "j1", "null") == ["null"]
    assert q.cmd("query-jobs") == []
    assert q.error("job-dismiss", id="j1")["desc"] == "Job not found"
    check_clean(img)
    assert info(img)["virtual-size"] == 64 * MiB


def test_sync_failure_events_precede_reply(daemon, engine, tmp_path):
    """A create failing before its first I/O is concluded before the command replies."""
    img = empty_file(tmp_path / "x.qcow2")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={img}")
    d.close_qmp()
    with d.raw_qmp() as q:
        q.negotiate()
        reply = q.execute("blockdev-create", {"job-id": "j1", "options": {
            "driver": "qcow2", "file": "f0", "size": MiB, "cluster-size": 1000}})
        assert reply == {"return": {}}
        assert raw_statuses(q.events, "j1") == FAILURE
        jobs = q.execute("query-jobs")["return"]
        assert jobs == [{"id": "j1", "type": "create", "status": "concluded",
                         "current-progress": 1, "total-progress": 1,
                         "error": "Cluster size must be a power of two between 512 and 2048k"}]


@pytest.mark.parametrize("options,error", [
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"cluster-size": 3 * MiB}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"version": "v2", "lazy-refcounts": True},
     "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 "
     "or greater)"),
    ({"backing-fmt": "qcow2"}, "Backing format cannot be used without backing file"),
    ({"refcount-bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"version": "v2", "refcount-bits": 8},
     "Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
     "version=v3 or greater)"),
    ({"backing-file": "b.qcow2", "preallocation": "metadata"},
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"file": "nonode"}, "Cannot find device='nonode' nor node-name='nonode'"),
    ({"file": "ro"}, "Block node is read-only"),
    ({"file": "fq"}, "Permission conflict on node 'fq': permissions 'write, resize' are both "
                     "required by an unnamed block device (uses node 'fq' as 'root' child) and "
                     "unshared by node 'q' (uses node 'fq' as 'file' child)."),
])
def test_create_qcow2_errors(daemon, engine, tmp_path, options, error):
    empty_file(tmp_path / "x.qcow2")
    make_raw_image(tmp_path / "ro.img", MiB)
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "q.qcow2", "1M")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={tmp_path / 'x.qcow2'}",
               "--blockdev",
               f"driver=file,node-name=ro,read-only=on,filename={tmp_path / 'ro.img'}",
               "--blockdev", f"driver=file,node-name=fq,filename={tmp_path / 'q.qcow2'}",
               "--blockdev", "driver=qcow2,node-name=q,file=fq")
    opts = {"driver": "qcow2", "file": "f0", "size": MiB}
    opts.update(options)
    assert d.qmp.cmd("blockdev-create", **{"job-id": "bad", "options": opts}) == {}
    assert statuses(d.qmp, "bad", "concluded") == FAILURE
    assert d.qmp.cmd("query-jobs")[0]["error"] == error
    d.qmp.cmd("job-dismiss", id="bad")


@pytest.mark.parametrize("options,error", [
    ({"filename": "/nonexistent/dir/x.raw"},
     "Could not create '/nonexistent/dir/x.raw': No such file or directory"),
    ({"extent-size-hint": 1 << 32}, "Extent size hint is too large"),
    ({"preallocation": "metadata"}, "Unsupported preallocation mode: metadata"),
])
def test_create_file_errors(daemon, engine, tmp_path, options, error):
    d = daemon(engine)
    opts = {"driver": "file", "filename": str(tmp_path / "x.raw"), "size": MiB}
    opts.update(options)
    d.qmp.cmd("blockdev-create", **{"job-id": "bad", "options": opts})
    assert statuses(d.qmp, "bad", "concluded") == FAILURE
    assert d.qmp.cmd("query-jobs")[0]["error"] == error


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create_file(daemon, engine, tmp_path, prealloc):
    path = make_raw_image(tmp_path / "x.raw", 4 * MiB, b"\x55")   # truncated first
    d = daemon(engine)
    d.qmp.cmd("blockdev-create", **{"job-id": "c", "options": {
        "driver": "file", "filename": str(path), "size": 3 * MiB, "preallocation": prealloc}})
    assert statuses(d.qmp, "c", "concluded") == SUCCESS
    assert os.path.getsize(path) == 3 * MiB
    assert path.read_bytes() == bytes(3 * MiB)
    allocated = os.stat(path).st_blocks * 512
    assert (allocated >= 3 * MiB) == (prealloc != "off")


def test_create_refusals(daemon, engine):
    q = daemon(engine).qmp
    for drv in ("raw", "null-co", "host_device"):
        assert q.error("blockdev-create", **{"job-id": "j", "options": {"driver": drv}}) == {
            "class": "GenericError", "desc": "Driver does not support blockdev-create"}
    file_opts = {"driver": "file", "filename": "/nonexistent/x", "size": 0}
    for job_id in ("", "bad id!", "1abc"):
        assert q.error("blockdev-create", **{"job-id": job_id, "options": file_opts})["desc"] \
            == f"Invalid job ID '{job_id}'"
    assert q.cmd("query-jobs") == []
    for verb in ("pause", "resume", "cancel", "complete", "finalize", "dismiss"):
        assert q.error("job-" + verb, id="nojob") == {"class": "GenericError",
                                                     "desc": "Job not found"}


def test_verbs_on_running_create(daemon, engine, tmp_path):
    """pause/resume/cancel while a (slow) create runs; the node it uses is pinned."""
    big = tmp_path / "big.raw"
    d = daemon(engine)
    q = d.qmp
    try:
        q.cmd("blockdev-create", **{"job-id": "j1", "options": {
            "driver": "file", "filename": str(big), "size": 2048 * MiB,
            "preallocation": "full"}})
        assert q.cmd("query-jobs") == [{"id": "j1", "type": "create", "status": "running",
                                        "current-progress": 0, "total-progress": 1}]
        assert q.cmd("job-pause", id="j1") == {}
        assert q.error("job-pause", id="j1")["desc"] == "Job is already paused"
        # a create job has no pause point after it started: it keeps running
        assert q.cmd("query-jobs")[0]["status"] == "running"
        assert q.cmd("job-resume", id="j1") == {}
        assert q.error("job-resume", id="j1")["desc"] == "Can't resume a job that was not paused"
        for verb in ("complete", "finalize", "dismiss"):
            assert q.error("job-" + verb, id="j1")["desc"] == \
                f"Job 'j1' in state 'running' cannot accept command verb '{verb}'"
        assert q.cmd("job-cancel", id="j1") == {}
        assert q.cmd("job-cancel", id="j1") == {}
        assert statuses(q, "j1", "concluded", timeout=120) == FAILURE
        job = q.cmd("query-jobs")[0]
        assert job["error"] == "Operation canceled" and job["current-progress"] == 1
        q.cmd("job-dismiss", id="j1")
    finally:
        if big.exists():
            big.unlink()


def test_quit_cancels_running_jobs_first(daemon, engine, tmp_path):
    big = tmp_path / "big.raw"
    d = daemon(engine)
    d.close_qmp()
    d.expect_exit()
    try:
        with d.raw_qmp(timeout=120) as q:
            q.negotiate()
            assert q.execute("blockdev-create", {"job-id": "j1", "options": {
                "driver": "file", "filename": str(big), "size": 2048 * MiB,
                "preallocation": "full"}}) == {"return": {}}
            assert raw_statuses(q.events, "j1") == CREATED
            q.events.clear()
            assert q.execute("quit") == {"return": {}}
            # the job was cancelled (and, concluded, dismissed) before the reply
            assert raw_statuses(q.events, "j1") == ["aborting", "concluded", "null"]
        assert d.wait(60) == 0
    finally:
        if big.exists():
            big.unlink()


def test_running_qcow2_create_holds_its_file_node(daemon, engine, tmp_path):
    img = empty_file(tmp_path / "big.qcow2")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f0,filename={img}")
    q = d.qmp
    try:
        q.cmd("blockdev-create", **{"job-id": "j1", "options": {
            "driver": "qcow2", "file": "f0", "size": 2048 * MiB, "preallocation": "full"}})
        # qsd's job holds the node through a BlockBackend while it writes the
        # header (microseconds), then through the new image's qcow2 node for
        # the rest (seconds here): ask in the second phase.
        time.sleep(0.5)
        assert q.error("blockdev-del", **{"node-name": "f0"})["desc"] == \
            "Block device f0 is in use"
        desc = q.error("block_resize", **{"node-name": "f0", "size": MiB})["desc"]
        assert re.fullmatch(
            r"Permission conflict on node 'f0': permissions 'resize' are both required by an "
            r"unnamed block device \(uses node 'f0' as 'root' child\) and unshared by node "
            r"'#block\d+' \(uses node 'f0' as 'file' child\)\.", desc), desc
        assert statuses(q, "j1", "concluded", timeout=120) == SUCCESS
        q.cmd("job-dismiss", id="j1")
        assert q.cmd("blockdev-del", **{"node-name": "f0"}) == {}
        check_clean(img)
        assert os.stat(img).st_blocks * 512 >= 2048 * MiB
    finally:
        img.unlink()


def test_create_add_export_flow(daemon, engine, tmp_path):
    """blockdev-create (file, then qcow2 on it) + blockdev-add + export, then I/O over NBD."""
    path = tmp_path / "disk.qcow2"
    d = daemon(engine, nbd=True)
    q = d.qmp
    q.cmd("blockdev-create", **{"job-id": "c1", "options": {
        "driver": "file", "filename": str(path), "size": 0}})
    statuses(q, "c1", "concluded")
    q.cmd("job-dismiss", id="c1")
    q.cmd("blockdev-add", driver="file", filename=str(path), **{"node-name": "f0"})
    q.cmd("blockdev-create", **{"job-id": "c2", "options": {
        "driver": "qcow2", "file": "f0", "size": 32 * MiB, "cluster-size": 65536}})
    assert statuses(q, "c2", "concluded") == SUCCESS
    q.cmd("job-dismiss", id="c2")
    q.cmd("blockdev-add", driver="qcow2", file="f0", **{"node-name": "q0"})
    q.cmd_raw("block-export-add", {"type": "nbd", "id": "e0", "name": "disk", "writable": True,
                                   "node-name": "q0"})
    uri = d.nbd_uri("disk")
    assert nbdinfo_json(uri)["exports"][0]["export-size"] == 32 * MiB
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", uri])
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 2M", "-c", "read -P 0 0 1M", uri])
    assert q.error("blockdev-del", **{"node-name": "f0"})["desc"] == "Block device f0 is in use"
    q.cmd("block-export-del", id="e0")
    q.cmd("blockdev-del", **{"node-name": "q0"})
    q.cmd("blockdev-del", **{"node-name": "f0"})
    d.quit()
    check_clean(path)
    assert info(path)["format-specific"]["data"]["compat"] == "1.1"


# --- block_resize ----------------------------------------------------------------------------

RESIZE_ARGS = [
    "--blockdev", "driver=file,node-name=fr,filename={d}/r0.img",
    "--blockdev", "driver=raw,node-name=r,file=fr",
    "--blockdev", "driver=file,node-name=fq,filename={d}/q0.qcow2",
    "--blockdev", "driver=qcow2,node-name=q,file=fq",
    "--blockdev", "driver=qcow2,node-name=base,file.driver=file,file.filename={d}/base.qcow2",
    "--blockdev", "driver=qcow2,node-name=top,backing=base,file.driver=file,"
                  "file.filename={d}/top.qcow2",
    "--blockdev", "driver=file,node-name=fro,filename={d}/ro.img,read-only=on",
    "--blockdev", "driver=file,node-name=fe,filename={d}/e.img",
    "--blockdev", "driver=raw,node-name=rwin,offset=4096,file.driver=file,"
                  "file.filename={d}/w.img",
    "--blockdev", "driver=raw,node-name=rfix,offset=0,size=512,file.driver=file,"
                  "file.filename={d}/w2.img",
    "--blockdev", "driver=null-co,node-name=nul,size=1048576",
    "--export", "type=nbd,id=e1,node-name=fe,name=e1,writable=on",
]

RESIZE_CASES = [
    ({"size": MiB}, "Cannot find device='' nor node-name=''"),
    ({"device": "nosuch", "size": MiB}, "Cannot find device='nosuch' nor node-name=''"),
    ({"node-name": "nosuch", "size": MiB}, "Cannot find device='' nor node-name='nosuch'"),
    ({"device": "r", "size": MiB}, "Cannot find device='r' nor node-name=''"),
    ({"node-name": "r", "size": -1}, "Parameter 'size' expects a >0 size"),
    ({"node-name": "base", "size": 4 * MiB}, "Device '(null)' is in use"),
    ({"device": "x", "node-name": "base", "size": 4 * MiB}, "Device 'x' is in use"),
    ({"node-name": "fq", "size": 10 * MiB},
     "Permission conflict on node 'fq': permissions 'resize' are both required by an unnamed "
     "block device (uses node 'fq' as 'root' child) and unshared by node 'q' (uses node 'fq' "
     "as 'file' child)."),
    ({"node-name": "fe", "size": 4 * MiB},
     "Permission conflict on node 'fe': permissions 'resize' are both required by an unnamed "
     "block device (uses node 'fe' as 'root' child) and unshared by an unnamed block device "
     "(uses node 'fe' as 'root' child)."),
    ({"node-name": "fro", "size": 4 * MiB}, "Image is read-only"),
    ({"node-name": "q", "size": 1000}, "The new size must be a multiple of 512"),
    ({"node-name": "rfix", "size": 1024}, "Cannot resize fixed-size raw disks"),
    ({"node-name": "nul", "size": 4 * MiB}, "Image format driver does not support resize"),
    # successes
    ({"device": "r", "node-name": "r", "size": 2 * MiB}, None),
    ({"node-name": "r", "size": 1000}, None),
    ({"node-name": "fr", "size": 8192}, None),
    ({"node-name": "q", "size": 4 * MiB}, None),
    ({"node-name": "top", "size": 3 * MiB}, None),
    ({"node-name": "rwin", "size": 4 * MiB}, None),
]


def _resize_images(tmp_path):
    make_raw_image(tmp_path / "r0.img", MiB)
    for name in ("ro.img", "e.img", "w.img", "w2.img"):
        make_raw_image(tmp_path / name, MiB)
    for name in ("q0.qcow2", "base.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / name, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2", "1M")


def test_block_resize(daemon, engine, tmp_path):
    _resize_images(tmp_path)
    d = daemon(engine, *[a.format(d=tmp_path) for a in RESIZE_ARGS], nbd=True)
    got = []
    for args, _error in RESIZE_CASES:
        reply = d.qmp.cmd_raw("block_resize", args)
        got.append(reply["error"]["desc"] if "error" in reply else None)
    assert got == [error for _args, error in RESIZE_CASES]
    nodes = {n["node-name"]: n for n in d.qmp.cmd("query-named-block-nodes")}
    assert nodes["q"]["image"]["virtual-size"] == 4 * MiB
    assert nodes["top"]["image"]["virtual-size"] == 3 * MiB
    # the export keeps its size (the node cannot be resized under it anyway)
    assert nbdinfo_json(d.nbd_uri("e1"))["exports"][0]["export-size"] == MiB
    d.quit()
    assert os.path.getsize(tmp_path / "r0.img") == 8192
    assert os.path.getsize(tmp_path / "w.img") == 4 * MiB + 4096
    for name in ("q0.qcow2", "top.qcow2"):
        check_clean(tmp_path / name)
    assert info(tmp_path / "top.qcow2")["virtual-size"] == 3 * MiB


def test_resize_after_export_removed(daemon, engine, tmp_path):
    make_raw_image(tmp_path / "r.img", MiB)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=fr,filename={tmp_path / 'r.img'}",
               "--blockdev", "driver=raw,node-name=r,file=fr",
               "--export", "type=nbd,id=e1,node-name=r,name=e1", nbd=True)
    q = d.qmp
    desc = q.error("block_resize", **{"node-name": "fr", "size": 2 * MiB})["desc"]
    assert desc == ("Permission conflict on node 'fr': permissions 'resize' are both required by "
                    "an unnamed block device (uses node 'fr' as 'root' child) and unshared by "
                    "node 'r' (uses node 'fr' as 'file' child).")
    q.cmd("block-export-del", id="e1")
    q.event_wait("BLOCK_EXPORT_DELETED")
    assert q.cmd("block_resize", **{"node-name": "r", "size": 6 * MiB}) == {}
    assert q.cmd_raw("block-export-add", {"type": "nbd", "id": "e1", "name": "e1",
                                          "node-name": "r"}) == {"return": {}}
    assert nbdinfo_json(d.nbd_uri("e1"))["exports"][0]["export-size"] == 6 * MiB


def test_qcow2_shrink_discards_data(daemon, engine, tmp_path):
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 4M", img])
    d = daemon(engine, "--blockdev",
               f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}")
    assert d.qmp.cmd("block_resize", **{"node-name": "q", "size": MiB}) == {}
    assert d.qmp.cmd("block_resize", **{"node-name": "q", "size": 8 * MiB}) == {}
    d.quit()
    check_clean(img)
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x55 0 1M", "-c", "read -P 0 1M 7M", img])
