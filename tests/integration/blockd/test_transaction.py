"""transaction: all-or-nothing, run against qsd and blockd alike.

The expected texts are what qemu-storage-daemon 7.2 answers (the qsd cases
prove it).  The failure-injection test fails every action index in turn and
checks that nothing of the transaction remains.  The one intended difference:
overlay files created by the aborted snapshots stay behind on qsd and are
deleted by blockd.
"""

import hashlib
import os

import pytest

from helpers import MiB, make_raw_image, qemu_img, qemu_io

DISKS = ("a", "b", "c")


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def start(daemon, engine, tmp_path):
    """Three disks, each exported writable (export id = e + name):
    ``a`` raw over the file node ``fa``, ``b`` qcow2, ``c`` raw with an inline file."""
    a = make_raw_image(tmp_path / "a.raw", 2 * MiB, fill=b"a")
    b = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", b, str(2 * MiB))
    qemu_io(b, "write -P 0x62 0 2M", fmt="qcow2")
    c = make_raw_image(tmp_path / "c.raw", 2 * MiB, fill=b"c")
    args = ["--blockdev", f"driver=file,node-name=fa,filename={a}",
            "--blockdev", "driver=raw,node-name=a,file=fa",
            "--blockdev", f"driver=qcow2,node-name=b,file.driver=file,file.filename={b}",
            "--blockdev", f"driver=raw,node-name=c,file.driver=file,file.filename={c}"]
    for name in DISKS:
        args += ["--export", f"type=nbd,id=e{name},node-name={name},name={name},writable=on"]
    d = daemon(engine, *args, nbd=True)
    return d, {"a": a, "b": b, "c": c}


def snap(name, tmp_path, tag, node_name=None):
    return {"type": "blockdev-snapshot-sync",
            "data": {"node-name": name, "snapshot-file": str(tmp_path / f"{tag}-{name}.qcow2"),
                     "snapshot-node-name": node_name or f"{tag}{name}"}}


def state(q):
    return (q.cmd("query-named-block-nodes"), q.cmd("query-block-exports"), q.cmd("query-jobs"))


def test_failure_at_every_index_leaves_nothing(daemon, engine, tmp_path):
    """Snapshots of three disks where action k fails (an abort action, a bad node-name
    refused after the overlay file was created, a name an earlier action took), for every k."""
    d, images = start(daemon, engine, tmp_path)
    q = d.qmp
    sums = {n: md5(p) for n, p in images.items()}
    before = state(q)
    files = set(os.listdir(tmp_path))
    runs = 0
    for how in ("abort", "bad-name", "taken-name"):
        for k in range(len(DISKS) + (how == "abort")):
            if how == "taken-name" and k == 0:
                continue
            tag = f"{how}{k}"
            actions = [snap(n, tmp_path, tag) for n in DISKS]
            if how == "abort":
                actions.insert(k, {"type": "abort", "data": {}})
                error = "Transaction aborted using Abort action"
            elif how == "bad-name":
                actions[k] = snap(DISKS[k], tmp_path, tag, node_name="1bad")
                error = "Invalid node-name: '1bad'"
            else:
                actions[k] = snap(DISKS[k], tmp_path, tag, node_name=f"{tag}{DISKS[0]}")
                error = "New overlay node-name already in use"
            assert q.error("transaction", actions=actions)["desc"] == error, tag
            assert state(q) == before, tag
            assert q.get_events() == []
            leftover = set(os.listdir(tmp_path)) - files
            if engine == "blockd":
                assert leftover == set(), tag
            else:
                # qsd leaves every overlay file it created before the failure
                prepared = [a["data"]["snapshot-file"] for a in actions[:k + (how == "bad-name")]
                            if a["type"] != "abort"]
                assert leftover == {os.path.basename(p) for p in prepared}, tag
                files |= leftover
            assert {n: md5(p) for n, p in images.items()} == sums, tag
            runs += 1
    assert runs == 4 + 3 + 2
    # the same snapshots without the failure all happen
    assert q.cmd("transaction", actions=[snap(n, tmp_path, "ok") for n in DISKS]) == {}
    assert sorted((e["id"], e["node-name"]) for e in q.cmd("query-block-exports")) == \
        [("ea", "oka"), ("eb", "okb"), ("ec", "okc")]
    ro = {n["node-name"]: n["ro"] for n in q.cmd("query-named-block-nodes", flat=True)}
    assert [ro[n] for n in ("a", "b", "c", "oka", "okb", "okc", "fa")] == \
        [True, True, True, False, False, False, False]
    for n in DISKS:
        qemu_io(d.nbd_uri(n), "write -P 0xee 1M 64k")
    d.quit()
    assert {n: md5(p) for n, p in images.items()} == sums
    for n in DISKS:
        qemu_io(tmp_path / f"ok-{n}.qcow2", "read -P 0xee 1M 64k", "read -P %#x 0 64k" % ord(
            "b" if n == "b" else n), fmt="qcow2")


def test_later_actions_see_earlier_ones(daemon, engine, tmp_path):
    """QEMU appends the overlay in prepare: a second snapshot of the same disk in the same
    transaction goes on top of the first one's overlay."""
    d, images = start(daemon, engine, tmp_path)
    q = d.qmp
    s1, s2 = tmp_path / "s1.qcow2", tmp_path / "s2.qcow2"
    assert q.cmd("transaction", actions=[
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": "a", "snapshot-file": str(s1), "snapshot-node-name": "s1"}},
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": "s1", "snapshot-file": str(s2), "snapshot-node-name": "s2"}},
    ]) == {}
    exports = {e["id"]: e["node-name"] for e in q.cmd("query-block-exports")}
    assert exports["ea"] == "s2"
    backing = {n["node-name"]: n.get("backing_file") for n in
               q.cmd("query-named-block-nodes", flat=True)}
    assert (backing["s2"], backing["s1"]) == (str(s1), str(images["a"]))
    # the same, failing at the end: both undone, in reverse order.  qsd 7.2 trips over its
    # own drain counting here (assertion `bs->quiesce_counter > 0' in bdrv_do_drained_end)
    before = state(q)
    actions = [
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": "s2", "snapshot-file": str(tmp_path / "t1.qcow2"),
            "snapshot-node-name": "t1"}},
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": "t1", "snapshot-file": str(tmp_path / "t2.qcow2"),
            "snapshot-node-name": "t2"}},
        {"type": "abort", "data": {}}]
    if engine == "blockd":
        assert q.error("transaction", actions=actions)["desc"] == \
            "Transaction aborted using Abort action"
        assert state(q) == before
        assert not (tmp_path / "t1.qcow2").exists() and not (tmp_path / "t2.qcow2").exists()
    else:
        d.expect_exit()
        with pytest.raises(Exception):
            q.cmd_raw("transaction", {"actions": actions})
        assert d.wait() != 0
        assert "quiesce_counter > 0" in d.stderr()


GROUPED = {"completion-mode": "grouped"}


@pytest.mark.parametrize("actions, props, error", [
    ([{"type": "abort", "data": {}}], None, "Transaction aborted using Abort action"),
    # abort checks no completion mode
    ([{"type": "abort", "data": {}}], GROUPED, "Transaction aborted using Abort action"),
    ([{"type": "blockdev-snapshot-sync", "data": {"node-name": "nope", "snapshot-file": "x"}}],
     GROUPED,
     "Action 'blockdev-snapshot-sync' does not support Transaction property completion-mode = "
     "grouped"),
    ([{"type": "blockdev-snapshot", "data": {"node": "a", "overlay": "b"}}], GROUPED,
     "Action 'blockdev-snapshot' does not support Transaction property completion-mode = grouped"),
    ([{"type": "block-dirty-bitmap-remove", "data": {"node": "a", "name": "x"}}], GROUPED,
     "Action 'block-dirty-bitmap-remove' does not support Transaction property completion-mode "
     "= grouped"),
    ([{"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "x"}}], GROUPED,
     "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode "
     "= grouped"),
    ([{"type": "blockdev-snapshot-internal-sync", "data": {"device": "b", "name": "x"}}], GROUPED,
     "Action 'blockdev-snapshot-internal-sync' does not support Transaction property "
     "completion-mode = grouped"),
    # the first failing action's error wins
    ([{"type": "abort", "data": {}},
      {"type": "blockdev-snapshot-sync", "data": {"node-name": "nope", "snapshot-file": "x"}}],
     None, "Transaction aborted using Abort action"),
    ([{"type": "blockdev-snapshot-sync", "data": {"node-name": "nope", "snapshot-file": "x"}},
      {"type": "abort", "data": {}}], None, "Cannot find device='' nor node-name='nope'"),
    ([{"type": "block-dirty-bitmap-remove", "data": {"node": "nope", "name": "x"}}], None,
     "Node 'nope' not found"),
    ([{"type": "block-dirty-bitmap-remove", "data": {"node": "a", "name": "x"}}], None,
     "Dirty bitmap 'x' not found"),
    ([{"type": "block-dirty-bitmap-clear", "data": {"node": "a", "name": "x"}}], None,
     "Dirty bitmap 'x' not found"),
    ([{"type": "block-dirty-bitmap-disable", "data": {"node": "a", "name": "x"}}], None,
     "Dirty bitmap 'x' not found"),
    ([{"type": "block-dirty-bitmap-merge", "data": {"node": "a", "target": "x",
                                                    "bitmaps": ["y"]}}], None,
     "Dirty bitmap 'x' not found"),
    ([{"type": "block-dirty-bitmap-merge", "data": {"node": "nope", "target": "x",
                                                    "bitmaps": ["y"]}}], None,
     "Node 'nope' not found"),
    ([{"type": "block-dirty-bitmap-add", "data": {"node": "nope", "name": "x"}}], None,
     "Cannot find device='nope' nor node-name='nope'"),
    ([{"type": "drive-backup", "data": {"device": "nope", "target": "t.qcow2", "sync": "full"}}],
     None, "Cannot find device='nope' nor node-name='nope'"),
    ([{"type": "blockdev-snapshot-internal-sync", "data": {"device": "nope", "name": "x"}}], None,
     "Cannot find device='nope' nor node-name='nope'"),
])
def test_action_errors(daemon, engine, tmp_path, actions, props, error):
    d, _images = start(daemon, engine, tmp_path)
    q = d.qmp
    before = state(q)
    args = {"actions": actions}
    if props is not None:
        args["properties"] = props
    assert q.error("transaction", **args)["desc"] == error
    assert state(q) == before


def test_empty_transaction(daemon, engine, tmp_path):
    d, _images = start(daemon, engine, tmp_path)
    assert d.qmp.cmd("transaction", actions=[]) == {}
    assert d.qmp.cmd("transaction", actions=[], properties=GROUPED) == {}


def test_actions_blockd_does_not_do(daemon, engine, tmp_path):
    """What qsd does with an existing node and blockd refuses with a clear error."""
    d, _images = start(daemon, engine, tmp_path)
    q = d.qmp
    before = state(q)
    cases = [
        ({"type": "blockdev-snapshot-internal-sync", "data": {"device": "b", "name": "s1"}},
         "Internal snapshots are not supported by blockd"),
        ({"type": "drive-backup", "data": {"device": "a", "target": str(tmp_path / "t.qcow2"),
                                           "sync": "full", "job-id": "j"}},
         "drive-backup is not supported by blockd; use blockdev-backup"),
    ]
    for action, blockd_error in cases:
        reply = q.cmd_raw("transaction", {"actions": [action]})
        if engine == "blockd":
            assert reply["error"]["desc"] == blockd_error
            assert state(q) == before
        else:
            # qsd does them: an internal snapshot, a backup job to a new image
            # (bitmap actions: test_bitmaps.py)
            assert reply == {"return": {}}, reply
    if engine == "qsd":
        q.event_wait("JOB_STATUS_CHANGE", match={"data": {"id": "j", "status": "concluded"}})
        assert (tmp_path / "t.qcow2").exists()


def test_bitmap_enable_of_a_missing_bitmap(daemon, engine, tmp_path):
    """qsd 7.2 crashes here (its abort callback uses the bitmap prepare did not find);
    blockd answers prepare's error."""
    d, _images = start(daemon, engine, tmp_path)
    q = d.qmp
    action = {"type": "block-dirty-bitmap-enable", "data": {"node": "a", "name": "x"}}
    if engine == "blockd":
        assert q.error("transaction", actions=[action])["desc"] == "Dirty bitmap 'x' not found"
        assert q.cmd("query-jobs") == []
    else:
        d.expect_exit()
        with pytest.raises(Exception):
            q.cmd_raw("transaction", {"actions": [action]})
        assert d.wait() != 0


# --- blockdev-backup actions ---------------------------------------------------------------

def backup(dev, job_id, target=None):
    return {"type": "blockdev-backup", "data": {"device": dev, "target": target or "t" + dev,
                                                "sync": "none", "job-id": job_id}}


def add_fleecing_targets(q, tmp_path, disks=("a", "b")):
    """A qcow2 target ``t<disk>`` over each disk (its backing): the fleecing setup."""
    for n in disks:
        qemu_img("create", "-f", "qcow2", tmp_path / f"t{n}.qcow2", str(2 * MiB))
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "t" + n}, backing=n,
              file={"driver": "file", "filename": str(tmp_path / f"t{n}.qcow2")})


def job_events(q, until_null=(), until_count=0):
    """(id, status) of the JOB_STATUS_CHANGE events, waiting until every job of UNTIL_NULL
    reached null and at least UNTIL_COUNT events came."""
    out = []
    while True:
        nulls = {i for i, s in out if s == "null"}
        if set(until_null) <= nulls and len(out) >= until_count:
            break
        ev = q.pull_event(wait=10)
        if ev["event"] == "JOB_STATUS_CHANGE":
            out.append((ev["data"]["id"], ev["data"]["status"]))
    return out + [(e["data"]["id"], e["data"]["status"]) for e in q.get_events()
                  if e["event"] == "JOB_STATUS_CHANGE"]


UNSTARTED = ["created", "aborting", "concluded", "null"]


@pytest.mark.parametrize("mode", ["individual", "grouped"])
def test_backup_failure_at_every_index(daemon, engine, tmp_path, mode):
    """Two backups and an abort action at every index: the prepared jobs are cancelled
    unstarted (created, aborting, concluded, null, in reverse order), filters removed."""
    d, images = start(daemon, engine, tmp_path)
    q = d.qmp
    add_fleecing_targets(q, tmp_path)
    before = state(q)
    # qsd 7.2 hangs when a grouped transaction with two prepared backups aborts
    # (job_cancel_sync of the first waits for the second forever): k=2 is run on blockd only
    ks = [0, 1, 2] if mode == "individual" or engine == "blockd" else [0, 1]
    for k in ks:
        actions = [backup("a", "ja"), backup("b", "jb")]
        actions.insert(k, {"type": "abort", "data": {}})
        assert q.error("transaction", actions=actions,
                       properties={"completion-mode": mode})["desc"] == \
            "Transaction aborted using Abort action"
        prepared = [a["data"]["job-id"] for a in actions[:k]]
        events = job_events(q, until_null=prepared)
        if mode == "individual" or k < 2:
            assert events == [(j, "created") for j in prepared] + \
                [(j, s) for j in reversed(prepared) for s in UNSTARTED[1:]], k
        else:
            for j in prepared:
                assert [s for i, s in events if i == j] == UNSTARTED, events
        assert state(q) == before, k
    # a bad argument in the second action
    assert q.error("transaction", actions=[backup("a", "ja"), backup("b", "jb", "nope")],
                   properties={"completion-mode": mode})["desc"] == \
        "Cannot find device='nope' nor node-name='nope'"
    assert job_events(q, until_null=["ja"]) == [("ja", s) for s in UNSTARTED]
    assert state(q) == before


class SequenceWriter:
    """Writes sequence number i (as 512 big-endian u64) at offset 0 of disk a, then of
    disk b, then i+1...: any single instant shows a = b or a = b + 1."""

    def __init__(self, libnbd, d):
        import threading
        self.handles = []
        for n in ("a", "b"):
            h = libnbd.NBD()
            h.connect_uri(d.nbd_uri(n))
            self.handles.append(h)
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        import struct
        i = 0
        while not self.stop.is_set():
            i += 1
            block = struct.pack(">Q", i) * 512
            for h in self.handles:
                h.pwrite(block, 0)
            self.count = i

    def wait_for(self, n):
        while self.count < n:
            self.stop.wait(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for h in self.handles:
            h.shutdown()


def read_seq(libnbd, d, export_name):
    import struct
    r = libnbd.NBD()
    r.connect_uri(d.nbd_uri(export_name))
    values = set(struct.unpack(">512Q", r.pread(4096, 0)))
    r.shutdown()
    assert len(values) == 1, values
    return values.pop()


def export_ro(q, export_id, node):
    assert q.cmd_raw("block-export-add", {"type": "nbd", "id": export_id, "name": export_id,
                                          "node-name": node}) == {"return": {}}


def test_snapshots_share_one_point_in_time(daemon, engine, tmp_path, libnbd):
    """Snapshots of two disks in one transaction, under writes: the old nodes (read-only
    from then on) show one instant."""
    d, _images = start(daemon, engine, tmp_path)
    q = d.qmp
    with SequenceWriter(libnbd, d) as w:
        w.wait_for(20)
        assert q.cmd("transaction", actions=[snap(n, tmp_path, "s") for n in ("a", "b")]) == {}
        at_reply = w.count
        for n in ("a", "b"):
            export_ro(q, "old" + n, n)
        w.wait_for(at_reply + 20)
    seen = {n: read_seq(libnbd, d, "old" + n) for n in ("a", "b")}
    assert seen["a"] - seen["b"] in (0, 1), seen
    assert 1 <= seen["b"] and seen["a"] <= at_reply + 1, (seen, at_reply)
    assert read_seq(libnbd, d, "a") == w.count


def test_backups_share_one_point_in_time(daemon, engine, tmp_path, libnbd):
    """As above with two sync=none backups (fleecing targets exported read-only)."""
    d, _images = start(daemon, engine, tmp_path)
    q = d.qmp
    add_fleecing_targets(q, tmp_path)
    with SequenceWriter(libnbd, d) as w:
        w.wait_for(20)
        assert q.cmd("transaction", actions=[backup("a", "ja"), backup("b", "jb")]) == {}
        at_reply = w.count
        w.wait_for(at_reply + 20)
    for n in ("a", "b"):
        export_ro(q, "f" + n, "t" + n)
    seen = {n: read_seq(libnbd, d, "f" + n) for n in ("a", "b")}
    assert seen["a"] - seen["b"] in (0, 1), seen
    assert 1 <= seen["b"] and seen["a"] <= at_reply + 1 < w.count, (seen, at_reply, w.count)
    events = job_events(q, until_count=8)
    # qsd's order: both created, each started (and paused: its source is drained) at
    # commit, and resumed when the transaction's drains end
    assert events[:8] == [("ja", "created"), ("jb", "created"), ("ja", "running"),
                          ("ja", "paused"), ("jb", "running"), ("jb", "paused"),
                          ("ja", "running"), ("jb", "running")]


def test_two_snapshots_into_one_file(daemon, engine, tmp_path):
    """The second action meets the overlay the first one opened (QEMU's image lock)."""
    d, images = start(daemon, engine, tmp_path)
    q = d.qmp
    before = state(q)
    x = str(tmp_path / "x.qcow2")
    assert q.error("transaction", actions=[
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": "a", "snapshot-file": x, "snapshot-node-name": "xa"}},
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": "b", "snapshot-file": x, "snapshot-node-name": "xb"}},
    ])["desc"] == 'Failed to get "write" lock'
    assert state(q) == before
    # the overlay file of the first action: left by qsd, deleted by blockd
    assert os.path.exists(x) == (engine == "qsd")


@pytest.mark.parametrize("mode", ["individual", "grouped"])
def test_grouped_backups_are_cancelled_together(daemon, engine, tmp_path, mode):
    """completion-mode=grouped puts the jobs in one JobTxn: cancelling one cancels both."""
    d, _images = start(daemon, engine, tmp_path)
    q = d.qmp
    add_fleecing_targets(q, tmp_path)
    before = state(q)
    assert q.cmd("transaction", actions=[backup("a", "ja"), backup("b", "jb")],
                 properties={"completion-mode": mode}) == {}
    assert job_events(q, until_count=8)[-2:] == [("ja", "running"), ("jb", "running")]
    assert q.cmd("job-cancel", id="ja") == {}
    if mode == "grouped":
        assert job_events(q, until_null=["ja", "jb"]) == [
            ("ja", "aborting"), ("jb", "aborting"), ("jb", "concluded"), ("jb", "null"),
            ("ja", "concluded"), ("ja", "null")]
        assert state(q) == before
    else:
        assert job_events(q, until_null=["ja"]) == [
            ("ja", "aborting"), ("ja", "concluded"), ("ja", "null")]
        assert [j["id"] for j in q.cmd("query-jobs")] == ["jb"]


def test_mixed_failure_at_every_index(daemon, engine, tmp_path):
    """Snapshot of a, backup of b, snapshot of c; action k fails (an abort action at k, or a
    bad argument in action k), for every k: nothing of the transaction remains."""
    d, images = start(daemon, engine, tmp_path)
    q = d.qmp
    add_fleecing_targets(q, tmp_path, disks=("b",))
    sums = {n: md5(p) for n, p in images.items()}
    before = state(q)
    files = set(os.listdir(tmp_path))

    def actions_for(tag):
        return [snap("a", tmp_path, tag), backup("b", "jb"), snap("c", tmp_path, tag)]
    bad = [(lambda tag: snap("a", tmp_path, tag, node_name="1bad"), "Invalid node-name: '1bad'"),
           (lambda tag: backup("b", "jb", "nope"), "Cannot find device='nope' nor node-name='nope'"),
           (lambda tag: snap("nope", tmp_path, tag), "Cannot find device='' nor node-name='nope'")]
    cases = [("abort", k) for k in range(4)] + [("bad", k) for k in range(3)]
    for how, k in cases:
        tag = f"{how}{k}"
        actions = actions_for(tag)
        if how == "abort":
            actions.insert(k, {"type": "abort", "data": {}})
            error = "Transaction aborted using Abort action"
        else:
            make, error = bad[k]
            actions[k] = make(tag)
        assert q.error("transaction", actions=actions)["desc"] == error, tag
        prepared_jobs = [a["data"]["job-id"] for a in actions[:k]
                         if a["type"] == "blockdev-backup"]
        assert job_events(q, until_null=prepared_jobs) == \
            [(j, s) for j in prepared_jobs for s in UNSTARTED], tag
        assert state(q) == before, tag
        leftover = set(os.listdir(tmp_path)) - files
        if engine == "blockd":
            assert leftover == set(), tag
        else:
            created = [a["data"]["snapshot-file"] for a in actions[:k + (how == "bad")]
                       if a["type"] == "blockdev-snapshot-sync" and a["data"]["node-name"] != "nope"]
            assert leftover == {os.path.basename(p) for p in created}, tag
            files |= leftover
        assert {n: md5(p) for n, p in images.items()} == sums, tag
    assert q.cmd("transaction", actions=actions_for("ok")) == {}
    roots = {e["id"]: e["node-name"] for e in q.cmd("query-block-exports")}
    # eb now sits on the backup's copy-before-write filter (a generated #blockNNN name)
    assert (roots["ea"], roots["ec"], roots["eb"][:6]) == ("oka", "okc", "#block")
    assert [j["id"] for j in q.cmd("query-jobs")] == ["jb"]


def test_running_jobs_see_the_transaction_drain(daemon, engine, tmp_path):
    """qmp_transaction() starts with bdrv_drain_all(): a running backup pauses and resumes,
    for a snapshot command (a one-action transaction) and for a failing transaction alike."""
    d, _images = start(daemon, engine, tmp_path)
    q = d.qmp
    add_fleecing_targets(q, tmp_path, disks=("b",))
    assert q.cmd("blockdev-backup", **backup("b", "jb")["data"]) == {}
    job_events(q, until_count=4)  # created, running, paused, running (qsd's blockdev-backup)
    assert q.cmd("blockdev-snapshot-sync", **snap("a", tmp_path, "s")["data"]) == {}
    assert job_events(q, until_count=2) == [("jb", "paused"), ("jb", "running")]
    assert q.error("transaction", actions=[{"type": "abort", "data": {}}])["desc"] == \
        "Transaction aborted using Abort action"
    assert job_events(q, until_count=2) == [("jb", "paused"), ("jb", "running")]
