"""blockdev.fleecing.transaction against both engines, through ansible-playbook."""

from helpers import MiB, make_raw_image, qemu_img
from helpers.backups import run_tasks


def state(d):
    """(named nodes, {node: bitmap names}, job ids) of the engine."""
    nodes = d.qmp.cmd("query-named-block-nodes", flat=True)
    named = sorted(n["node-name"] for n in nodes if not n["node-name"].startswith("#"))
    bitmaps = {n["node-name"]: sorted(b["name"] for b in n.get("dirty-bitmaps") or [] if "name" in b)
               for n in nodes if not n["node-name"].startswith("#")}
    return named, bitmaps, sorted(j["device"] for j in d.qmp.cmd("query-block-jobs"))


def two_disks(engine_with_monitor, tmp_path, overlays=True):
    """Nodes d0, d1 (raw files) and f0, f1 (qcow2 overlays backed by them, not yet used)."""
    args = []
    for i in range(2):
        img = make_raw_image(tmp_path / f"d{i}.img", 4 * MiB)
        args += ["--blockdev", f"driver=file,node-name=d{i},filename={img}"]
        if overlays:
            tgt = tmp_path / f"f{i}.qcow2"
            qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(img), str(tgt))
            args += ["--blockdev", f"driver=qcow2,node-name=f{i},file.driver=file,"
                                   f"file.filename={tgt},backing=d{i}"]
    return engine_with_monitor(*args)


def test_transaction_two_disks_guarded_and_all_or_nothing(engine_with_monitor, ansible,
                                                          tmp_path):
    d, sock = two_disks(engine_with_monitor, tmp_path)
    acts = [{"type": "blockdev-backup", "data": {"job-id": f"j{i}", "device": f"d{i}",
                                                 "target": f"f{i}", "sync": "none",
                                                 "auto-dismiss": False}} for i in range(2)]
    acts.append({"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b0"}})
    args = {"socket": sock, "actions": acts}
    start = state(d)
    checked = run_tasks(ansible, {"module": "transaction", "args": args, "check": True,
                                  "diff": True})[0]
    assert not checked.get("failed") and checked["changed"] is True, checked
    assert checked["done"] == [False, False, False]
    assert state(d) == start, "check mode changed the engine"
    first, second = run_tasks(ansible, {"module": "transaction", "args": args},
                              {"module": "transaction", "args": args})
    assert first["changed"] is True and first["done"] == [True, True, True], first
    assert second["changed"] is False and second["actions"] == [], second
    nodes, bitmaps, jobs = state(d)
    assert jobs == ["j0", "j1"] and bitmaps["d0"] == ["b0"]

    # part done (one job cancelled): refused, nothing run
    d.qmp.cmd("block-job-cancel", device="j1", force=True)
    d.qmp.event_wait("BLOCK_JOB_CANCELLED", timeout=30)
    d.qmp.cmd("block-job-dismiss", id="j1")
    partly = run_tasks(ansible, {"module": "transaction", "args": args})[0]
    assert partly.get("failed") and "partly done" in partly["msg"], partly
    assert state(d)[2] == ["j0"]


def test_transaction_bad_input_changes_nothing(engine_with_monitor, ansible, tmp_path):
    d, sock = two_disks(engine_with_monitor, tmp_path, overlays=False)
    # a user of d0, which the snapshot's overlay takes over (an unused overlay is dropped)
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"})
    snap = {"type": "blockdev-snapshot-sync",
            "data": {"node-name": "d0", "snapshot-file": str(tmp_path / "s0.qcow2"),
                     "snapshot-node-name": "s0", "format": "qcow2"}}
    bm = {"type": "block-dirty-bitmap-add", "data": {"node": "s0", "name": "b"}}
    bad_node = {"type": "block-dirty-bitmap-add", "data": {"node": "nope", "name": "b"}}
    dup = {"type": "block-dirty-bitmap-add", "data": {"node": "d1", "name": "x"}}
    start = state(d)
    res = run_tasks(
        ansible,
        {"module": "transaction", "args": {"socket": sock, "actions": [snap, bad_node]}},
        {"module": "transaction", "args": {"socket": sock, "actions": [{"type": "bogus"}]}},
        {"module": "transaction", "args": {"socket": sock, "actions": [{"kind": "abort"}]}},
        # the engine refuses the second action (bitmap exists twice): all undone
        {"module": "transaction", "args": {"socket": sock, "actions": [snap, bm, dup, dup]}},
        {"module": "transaction", "args": {"socket": sock, "actions": []}},
        # QEMU allows completion-mode grouped for backup actions only
        {"module": "transaction", "args": {"socket": sock, "actions": [dup],
                                           "completion_mode": "grouped"}},
    )
    assert all(r.get("failed") for r in res), res
    assert "actions[1] (block-dirty-bitmap-add): node 'nope' is not a node" in res[0]["msg"]
    assert "unknown action type 'bogus'" in res[1]["msg"]
    assert "each action is a dict with 'type'" in res[2]["msg"]
    assert "the engine undid all 4 action(s)" in res[3]["msg"], res[3]
    assert "at least one action" in res[4]["msg"]
    assert "does not support Transaction property completion-mode = grouped" in res[5]["msg"]
    assert state(d) == start
    assert not (tmp_path / "s0.qcow2").exists() or d.kind == "qsd"  # qsd leaves the file

    # the same snapshot + bitmap, valid: runs once, then is skipped
    ok, again = run_tasks(ansible,
                          {"module": "transaction", "args": {"socket": sock, "actions": [snap, bm]}},
                          {"module": "transaction", "args": {"socket": sock, "actions": [snap, bm]}})
    assert ok["changed"] is True and ok["done"] == [True, True], ok
    assert again["changed"] is False, again
    assert state(d)[1]["s0"] == ["b"]
    assert d.qmp.cmd("query-block-exports")[0]["node-name"] == "s0"
