"""blockdev.fleecing.nbd_export against both engines, through ansible-playbook.

What query-block-exports cannot show (name, description, bitmaps, read-only)
is checked with a real NBD client (nbdinfo) at the URI the module returns.
"""

from helpers import MiB, make_raw_image, nbdinfo_json


def exports(d):
    """{id: node-name} of the engine's block exports."""
    return dict((e["id"], e["node-name"]) for e in d.qmp.cmd("query-block-exports"))


def test_export_add_check_idempotent_and_remove(engine_with_monitor, ansible, tmp_path):
    img = make_raw_image(tmp_path / "d.img", 2 * MiB)
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=d0,filename={img}")
    assert "return" in d.qmp.cmd_raw("block-dirty-bitmap-add", {"node": "d0", "name": "b0",
                                                                "disabled": True})
    args = {"socket": sock, "id": "e0", "node_name": "d0", "name": "disk", "bitmaps": ["b0"],
            "description": "the disk", "server": {"type": "unix", "path": d.nbd_socket}}
    uri = f"nbd+unix:///disk?socket={d.nbd_socket}"

    checked = ansible.module("nbd_export", args, check=True, diff=True)
    assert not checked.get("failed") and checked["changed"] is True, checked
    assert checked["uri"] == uri and checked["export"] is None
    assert checked["diff"] == {"before": {}, "after": {"id": "e0", "type": "nbd",
                                                       "node_name": "d0"}}
    assert exports(d) == {}, "check mode added an export"

    first = ansible.module("nbd_export", args, diff=True)
    assert not first.get("failed") and first["changed"] is True, first.get("msg")
    assert first["uri"] == uri and first["name"] == "disk"
    assert first["export"] == {"id": "e0", "type": "nbd", "node-name": "d0",
                               "shutting-down": False}
    assert first["diff"]["after"] == {"id": "e0", "type": "nbd", "node_name": "d0"}
    info = nbdinfo_json(first["uri"])["exports"][0]
    assert info["export-name"] == "disk" and info["description"] == "the disk"
    assert info["is_read_only"] is True and info["export-size"] == 2 * MiB
    assert "qemu:dirty-bitmap:b0" in info["contexts"], info
    second = ansible.module("nbd_export", args, diff=True)
    assert not second.get("failed") and second["changed"] is False, second
    assert second["diff"]["before"] == second["diff"]["after"]

    gone_args = {"socket": sock, "id": "e0", "state": "absent"}
    gone_check = ansible.module("nbd_export", gone_args, check=True, diff=True)
    assert gone_check["changed"] is True and gone_check["diff"]["after"] == {}, gone_check
    assert exports(d) == {"e0": "d0"}, "check mode removed the export"
    gone = ansible.module("nbd_export", gone_args, diff=True)
    assert gone["changed"] is True and gone["export"] is None, gone
    assert gone["diff"]["before"]["id"] == "e0"
    assert exports(d) == {}
    # gone means gone: the id is free at once
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"})
    d.qmp.cmd("block-export-del", id="e0")
    d.qmp.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "e0"}})
    again = ansible.module("nbd_export", gone_args)
    assert again["changed"] is False and not again.get("failed"), again


def test_export_conflicts_recreate_filters_and_bad_input(engine_with_monitor, ansible, tmp_path,
                                                         libnbd):
    a = make_raw_image(tmp_path / "a.img", MiB)
    b = make_raw_image(tmp_path / "b.img", MiB)
    d, sock = engine_with_monitor(
        "--blockdev", f"driver=file,node-name=a0,filename={a}",
        "--blockdev", f"driver=file,node-name=b0,filename={b}",
        "--blockdev", "driver=null-co,node-name=t0,size=1048576",
        "--blockdev", f"driver=file,node-name=ro0,filename={b},read-only=on")
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "a0"})

    # a backup job's copy-before-write filter takes the export over: still the same node
    d.qmp.cmd("blockdev-backup", **{"job-id": "j0", "device": "a0", "target": "t0",
                                    "sync": "none", "filter-node-name": "cbw0"})
    assert exports(d) == {"e0": "cbw0"}
    same = ansible.module("nbd_export", {"socket": sock, "id": "e0", "node_name": "a0"})
    assert same["changed"] is False and not same.get("failed"), same
    d.qmp.cmd("block-job-cancel", device="j0")
    d.qmp.event_wait("BLOCK_JOB_CANCELLED", match={"data": {"device": "j0"}})

    args = {"socket": sock, "id": "e0", "node_name": "b0"}
    conflict = ansible.module("nbd_export", args)
    assert conflict["failed"] is True and conflict["changed"] is False, conflict
    assert conflict["msg"] == ("export 'e0' exists on node 'a0' (type nbd), not on node 'b0'; "
                               "set recreate=true to replace it; nothing was changed")
    assert conflict["diff"]["before"]["node_name"] == "a0"
    assert conflict["diff"]["after"]["node_name"] == "b0"

    # recreate, safe mode, with a client connected: refused, nothing changed
    h = libnbd.NBD()
    h.connect_uri(d.nbd_uri("a0"))
    try:
        busy = ansible.module("nbd_export", dict(args, recreate=True))
        assert busy["failed"] is True and busy["changed"] is False, busy
        assert busy["msg"] == ("block-export-del failed: export 'e0' still in use (clients are "
                               "connected; mode=hard disconnects them); nothing was changed")
        assert exports(d) == {"e0": "a0"}
        hard = ansible.module("nbd_export", dict(args, recreate=True, mode="hard"), diff=True)
        assert hard["changed"] is True and hard["recreated"] is True, hard
        assert hard["diff"]["before"]["node_name"] == "a0"
        assert hard["diff"]["after"]["node_name"] == "b0"
        assert exports(d) == {"e0": "b0"}
    finally:
        del h  # python libnbd closes the handle when it is freed
    assert nbdinfo_json(d.nbd_uri("b0"))["exports"][0]["export-size"] == MiB

    bad = [
        ({"id": "e1", "node_name": "nosuch"}, "node 'nosuch' does not exist; nothing was changed"),
        ({"id": "e1", "node_name": "ro0", "writable": True},
         "block-export-add failed: Cannot export read-only node as writable; nothing was changed"),
        ({"id": "e1", "node_name": "a0", "name": "b0"},
         "block-export-add failed: NBD server already has export named 'b0'; nothing was changed"),
        ({"id": "e1", "node_name": "a0", "server": {"type": "inet", "host": "h"}},
         "server.type is inet but server.host or server.port is missing"),
        ({"id": "e1"}, "state is present but all of the following are missing: node_name"),
    ]
    for extra, msg in bad:
        r = ansible.module("nbd_export", dict({"socket": sock}, **extra))
        assert r["failed"] is True and r["changed"] is False and r["msg"] == msg, r
    assert exports(d) == {"e0": "b0"}

    d.qmp.cmd("nbd-server-stop")
    d.qmp.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "e0"}})
    r = ansible.module("nbd_export", {"socket": sock, "id": "e1", "node_name": "a0"})
    assert r["failed"] is True
    assert r["msg"] == "block-export-add failed: NBD server not running; nothing was changed"
    assert exports(d) == {} and d.alive()
