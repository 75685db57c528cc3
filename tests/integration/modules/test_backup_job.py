"""blockdev.fleecing.backup_job against both engines, through ansible-playbook.

Several tasks run in one playbook (``run_tasks``) to save ansible-playbook starts; the
engine itself is checked on the first monitor (``d.qmp``) after each playbook.
"""

from helpers import MiB, make_raw_image, qemu_img, qemu_io
from helpers.backups import run_tasks


def jobs(d):
    """{job id: query-block-jobs entry}."""
    return {j["device"]: j for j in d.qmp.cmd("query-block-jobs")}


def filters(d):
    """Names of the copy-before-write filter nodes (a running backup job has one)."""
    return [n["node-name"] for n in d.qmp.cmd("query-named-block-nodes", flat=True)
            if n["drv"] == "copy-before-write"]


def fleecing_engine(engine_with_monitor, tmp_path):
    """src (raw, 4 MiB, written as NBD export 'src') and tgt (qcow2 backed by src)."""
    src = make_raw_image(tmp_path / "s.img", 4 * MiB, fill=b"\x11")
    tgt = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(src), str(tgt))
    d, sock = engine_with_monitor(
        "--blockdev", f"driver=file,node-name=src,filename={src}",
        "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt},"
                      "backing=src")
    d.qmp.cmd("block-export-add", type="nbd", id="src", writable=True, **{"node-name": "src"})
    return d, sock, src, tgt


def test_fleecing_job_idempotent_pause_speed_absent(engine_with_monitor, ansible, tmp_path):
    d, sock, src, tgt = fleecing_engine(engine_with_monitor, tmp_path)
    base = {"socket": sock, "job_id": "j0", "device": "src", "target": "tgt", "sync": "none",
            "auto_dismiss": False}
    res = run_tasks(
        ansible,
        {"module": "backup_job", "args": base, "check": True, "diff": True},      # 0
        {"module": "backup_job", "args": base, "diff": True},                     # 1
        {"module": "backup_job", "args": base, "diff": True},                     # 2
        {"module": "backup_job", "args": {**base, "speed": 1 << 20}, "diff": True},  # 3
        {"module": "backup_job", "args": {**base, "speed": 1 << 20}},             # 4
        {"module": "backup_job", "args": {"socket": sock, "job_id": "j0", "state": "paused"},
         "check": True},                                                          # 5
        {"module": "backup_job", "args": {"socket": sock, "job_id": "j0", "state": "paused"}},
        {"module": "backup_job", "args": {"socket": sock, "job_id": "j0", "state": "paused"}},
    )
    assert not any(r.get("failed") for r in res), res
    checked, first, second, speed, speed2, pcheck, paused, paused2 = res
    assert checked["changed"] is True and checked["actions"][0]["type"] == "blockdev-backup"
    assert checked["diff"]["before"] == {}
    assert checked["diff"]["after"]["status"] == "running"
    # check mode did not start it: the real run after it still changed something
    assert first["changed"] is True and first["job"]["status"] == "running", first
    assert first["job"]["type"] == "backup" and first["job"]["auto-dismiss"] is False
    assert first["diff"]["after"] == {k: first["job"][k] for k in first["diff"]["after"]}
    assert second["changed"] is False and second["actions"] == [], second
    assert speed["changed"] is True and speed["diff"]["before"]["speed"] == 0
    assert speed["diff"]["after"]["speed"] == 1 << 20
    assert speed2["changed"] is False, speed2
    assert pcheck["changed"] is True and pcheck["job"]["status"] == "paused", pcheck
    assert paused["changed"] is True and paused["actions"] == [
        {"type": "block-job-pause", "data": {"device": "j0"}}], paused
    assert paused2["changed"] is False, paused2
    now = jobs(d)["j0"]
    assert now["paused"] is True and now["speed"] == 1 << 20

    # the job still protects the point in time while paused
    qemu_io(d.nbd_uri("src"), "write -P 0x5a 0 64k")
    assert qemu_io(d.nbd_uri("src"), "read -P 0x5a 0 64k").returncode == 0

    gone = {"socket": sock, "job_id": "j0", "state": "absent"}
    res = run_tasks(
        ansible,
        {"module": "backup_job", "args": {"socket": sock, "job_id": "j0", "state": "running"}},
        {"module": "backup_job", "args": gone, "check": True, "diff": True},
        {"module": "backup_job", "args": gone, "diff": True},
        {"module": "backup_job", "args": gone},
    )
    assert not any(r.get("failed") for r in res), res
    resumed, acheck, absent, absent2 = res
    assert resumed["changed"] is True and resumed["job"]["paused"] is False, resumed
    assert acheck["changed"] is True and acheck["diff"]["after"] == {}, acheck
    assert [a["type"] for a in acheck["actions"]] == ["block-job-cancel", "block-job-dismiss"]
    assert absent["changed"] is True and absent["job"] == {}, absent
    assert absent2["changed"] is False, absent2
    assert jobs(d) == {} and filters(d) == []
    # the source took the write; the target holds the old cluster, copied before it
    d.qmp.cmd("blockdev-del", **{"node-name": "tgt"})
    assert qemu_io(str(tgt), "read -P 0x11 0 64k", fmt="qcow2").returncode == 0


def test_full_backup_waits_and_is_kept_until_absent(engine_with_monitor, ansible, tmp_path):
    src = make_raw_image(tmp_path / "s.img", 4 * MiB, fill="random")
    dst = tmp_path / "full.img"
    qemu_img("create", "-f", "raw", str(dst), "4M")
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=src,filename={src}",
                                  "--blockdev", f"driver=file,node-name=dst,filename={dst}")
    full = {"socket": sock, "job_id": "full", "device": "src", "target": "dst", "sync": "full",
            "auto_dismiss": False, "wait": True}
    res = run_tasks(ansible,
                    {"module": "backup_job", "args": full},
                    {"module": "backup_job", "args": full},
                    {"module": "backup_job", "args": {**full, "state": "absent", "wait": False}},
                    {"module": "backup_job", "args": {**full, "state": "absent", "wait": False}})
    assert not any(r.get("failed") for r in res), res
    first, again, dismissed, dismissed2 = res
    assert first["changed"] is True and first["job"]["status"] == "concluded", first
    assert first["job"]["offset"] == first["job"]["len"] == 4 * MiB
    assert "error" not in first["job"]
    assert again["changed"] is False and again["actions"] == [], again
    assert dismissed["actions"] == [{"type": "block-job-dismiss", "data": {"id": "full"}}]
    assert dismissed["changed"] is True and dismissed2["changed"] is False
    assert jobs(d) == {}
    d.qmp.cmd("blockdev-del", **{"node-name": "dst"})
    assert qemu_img("compare", "-f", "raw", "-F", "raw", str(src), str(dst)).returncode == 0


def test_bad_input_changes_nothing(engine_with_monitor, ansible, tmp_path):
    d, sock, dummy, dummy2 = fleecing_engine(engine_with_monitor, tmp_path)
    other = make_raw_image(tmp_path / "o.img", 4 * MiB)
    d.qmp.cmd("blockdev-add", driver="file", **{"node-name": "other", "filename": str(other)})
    base = {"socket": sock, "job_id": "j0", "device": "src", "target": "tgt", "sync": "none",
            "auto_dismiss": False}
    res = run_tasks(
        ansible,
        {"module": "backup_job", "args": {**base, "device": "nope"}},                 # 0
        {"module": "backup_job", "args": {**base, "target": "nope"}},                 # 1
        {"module": "backup_job", "args": {k: v for k, v in base.items() if k != "sync"}},
        {"module": "backup_job", "args": {**base, "sync": "incremental"}},            # 3
        {"module": "backup_job", "args": {**base, "sync": "none", "wait": True}},     # 4
        {"module": "backup_job", "args": {**base, "speed": -1}},                      # 5
        {"module": "backup_job", "args": {**base, "socket": str(tmp_path / "no.sock")}},
        {"module": "backup_job", "args": {**base, "target": "src"}},                  # 7 engine
    )
    assert all(r.get("failed") for r in res), res
    msgs = [r["msg"] for r in res]
    assert "device: node 'nope' does not exist" in msgs[0]
    assert "target: node 'nope' does not exist" in msgs[1]
    assert "starting it needs sync" in msgs[2]
    assert "sync=incremental needs a bitmap" in msgs[3]
    assert "never ends by itself" in msgs[4]
    assert "Invalid parameter 'speed'" in msgs[5]
    assert "no.sock" in msgs[6]
    assert "blockdev-backup failed" in msgs[7], msgs[7]
    assert jobs(d) == {} and filters(d) == []

    # an existing job of another source, or with other settings, is a conflict
    d.qmp.cmd("blockdev-backup", **{"job-id": "j0", "device": "src", "target": "tgt",
                                    "sync": "none", "auto-dismiss": False})
    res = run_tasks(
        ansible,
        {"module": "backup_job", "args": {**base, "device": "other"}, "diff": True},
        {"module": "backup_job", "args": {**base, "auto_dismiss": True}, "diff": True},
        {"module": "backup_job", "args": base},
    )
    wrong_dev, wrong_opt, right = res
    assert wrong_dev.get("failed") and "not node 'other'" in wrong_dev["msg"], wrong_dev
    assert wrong_opt.get("failed") and "auto_dismiss is False, requested True" in wrong_opt["msg"]
    assert wrong_opt["diff"]["after"]["auto-dismiss"] is True
    assert right["changed"] is False and not right.get("failed"), right
    assert list(jobs(d)) == ["j0"] and jobs(d)["j0"]["status"] == "running"

    # a job that ended with an error fails the task until it is removed
    d.qmp.cmd("block-job-cancel", device="j0", force=True)
    d.qmp.event_wait("BLOCK_JOB_CANCELLED", timeout=30)
    res = run_tasks(ansible,
                    {"module": "backup_job", "args": base},
                    {"module": "backup_job", "args": {**base, "state": "absent"}},
                    {"module": "backup_job", "args": base})
    ended, removed, restarted = res
    assert ended.get("failed") and "ended with an error" in ended["msg"], ended
    assert removed["changed"] is True and not removed.get("failed"), removed
    assert restarted["changed"] is True and restarted["job"]["status"] == "running", restarted
