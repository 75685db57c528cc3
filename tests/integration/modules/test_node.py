"""blockdev.fleecing.node against both engines, through ansible-playbook.

Every step is checked on the engine itself (``d.qmp`` on the first monitor):
check mode changes nothing, a refused change leaves the graph as it was.
"""

from helpers import MiB, make_raw_image


def nodes(d):
    """{node-name: query-named-block-nodes entry} of the engine's named nodes (no #blockNNN)."""
    return dict((n["node-name"], n) for n in d.qmp.cmd("query-named-block-nodes", flat=True)
                if not n["node-name"].startswith("#"))


def test_node_add_idempotent_check_mode_diff_and_remove(engine_with_monitor, ansible, tmp_path):
    img = make_raw_image(tmp_path / "d.img", 4 * MiB)
    d, sock = engine_with_monitor()
    file_args = {"socket": sock, "node_name": "f0", "driver": "file",
                 "options": {"filename": str(img)}}

    checked = ansible.module("node", file_args, check=True, diff=True)
    assert not checked.get("failed") and checked["changed"] is True, checked
    assert checked["diff"] == {"before": {}, "after": {
        "node_name": "f0", "driver": "file", "filename": str(img), "read_only": False}}
    assert nodes(d) == {}, "check mode added a node"

    first = ansible.module("node", file_args, diff=True)
    assert not first.get("failed") and first["changed"] is True, first
    assert first["node"]["drv"] == "file" and first["node"]["file"] == str(img)
    assert first["diff"]["before"] == {}
    assert first["diff"]["after"] == {"node_name": "f0", "driver": "file", "filename": str(img),
                                      "read_only": False, "virtual_size": 4 * MiB}
    assert set(nodes(d)) == {"f0"}
    second = ansible.module("node", file_args, diff=True)
    assert not second.get("failed") and second["changed"] is False, second
    assert second["diff"]["before"] == second["diff"]["after"] == first["diff"]["after"]

    # a format node on the named child, read-only; compared through the child's file name
    raw_args = {"socket": sock, "node_name": "r0", "driver": "raw",
                "options": {"file": "f0", "read-only": True}}
    assert ansible.module("node", raw_args)["changed"] is True
    again = ansible.module("node", raw_args)
    assert again["changed"] is False and not again.get("failed"), again
    assert again["compared"] == {"driver": "raw", "filename": str(img), "read_only": True}
    assert nodes(d)["r0"]["ro"] is True

    # absent: the child in use first -> the engine's error, nothing removed
    busy = ansible.module("node", {"socket": sock, "node_name": "f0", "state": "absent"})
    assert busy["failed"] is True and busy["changed"] is False, busy
    assert busy["msg"] == "blockdev-del failed: Block device f0 is in use", busy
    assert set(nodes(d)) == {"f0", "r0"}

    gone_check = ansible.module("node", {"socket": sock, "node_name": "r0", "state": "absent"},
                                check=True, diff=True)
    assert gone_check["changed"] is True and gone_check["diff"]["after"] == {}, gone_check
    assert set(nodes(d)) == {"f0", "r0"}, "check mode removed a node"
    gone = ansible.module("node", {"socket": sock, "node_name": "r0", "state": "absent"},
                          diff=True)
    assert gone["changed"] is True and gone["node"] is None, gone
    assert gone["diff"]["before"]["driver"] == "raw" and gone["diff"]["after"] == {}
    assert set(nodes(d)) == {"f0"}
    again = ansible.module("node", {"socket": sock, "node_name": "r0", "state": "absent"})
    assert again["changed"] is False and not again.get("failed"), again


def test_node_conflict_fails_with_diff_unless_recreate(engine_with_monitor, ansible, tmp_path):
    a = make_raw_image(tmp_path / "a.img", 4 * MiB)
    b = make_raw_image(tmp_path / "b.img", 2 * MiB)
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=f0,filename={a}")
    args = {"socket": sock, "node_name": "f0", "driver": "file", "options": {"filename": str(b)}}

    conflict = ansible.module("node", args)
    assert conflict["failed"] is True and conflict["changed"] is False, conflict
    assert conflict["msg"] == (f"node 'f0' exists with other settings (filename: '{a}', wanted "
                               f"'{b}'); set recreate=true to replace it")
    assert conflict["differences"] == {"filename": [str(a), str(b)]}
    assert conflict["diff"]["before"]["filename"] == str(a)
    assert conflict["diff"]["after"]["filename"] == str(b)
    assert nodes(d)["f0"]["file"] == str(a)

    recreate = dict(args, recreate=True)
    checked = ansible.module("node", recreate, check=True)
    assert checked["changed"] is True and checked["recreated"] is True, checked
    assert nodes(d)["f0"]["file"] == str(a), "check mode recreated the node"

    # recreate of a node in use (exported): the engine refuses, nothing changes
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "f0"})
    busy = ansible.module("node", recreate)
    assert busy["failed"] is True and busy["changed"] is False, busy
    assert busy["msg"] == "blockdev-del failed: Node f0 is in use (exported as e0)", busy
    assert nodes(d)["f0"]["file"] == str(a)
    assert [e["id"] for e in d.qmp.cmd("query-block-exports")] == ["e0"]
    in_use = ansible.module("node", {"socket": sock, "node_name": "f0", "state": "absent"},
                            check=True)
    assert in_use["failed"] is True and in_use["msg"] == "node 'f0' is in use (exported as e0)"
    d.qmp.cmd("block-export-del", id="e0")
    d.qmp.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "e0"}})

    done = ansible.module("node", recreate, diff=True)
    assert done["changed"] is True and done["recreated"] is True, done
    assert done["diff"]["before"]["filename"] == str(a)
    assert done["diff"]["after"]["filename"] == str(b)
    assert done["diff"]["after"]["virtual_size"] == 2 * MiB
    assert nodes(d)["f0"]["file"] == str(b)
    again = ansible.module("node", recreate)
    assert again["changed"] is False and again["recreated"] is False, again


def test_node_bad_input(engine_with_monitor, ansible, tmp_path):
    img = make_raw_image(tmp_path / "d.img", MiB)
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=f0,filename={img}")

    missing = ansible.module("node", {"socket": sock, "node_name": "r0", "driver": "qcow2",
                                      "options": {"file": "f0", "backing": "nosuch"}})
    assert missing["failed"] is True, missing
    assert missing["msg"] == ("options.backing names node 'nosuch', which does not exist; "
                              "nothing was changed")
    assert set(nodes(d)) == {"f0"}

    clash = ansible.module("node", {"socket": sock, "node_name": "r0", "driver": "raw",
                                    "options": {"driver": "qcow2", "file": "f0"}})
    assert clash["failed"] is True
    assert clash["msg"] == "options.driver ('qcow2') conflicts with driver ('raw')"

    refused = ansible.module("node", {"socket": sock, "node_name": "x0", "driver": "file",
                                      "options": {"filename": str(tmp_path / "none.img")}})
    assert refused["failed"] is True and refused["changed"] is False, refused
    assert refused["msg"] == (f"blockdev-add failed: Could not open '{tmp_path / 'none.img'}': "
                              "No such file or directory")
    no_driver = ansible.module("node", {"socket": sock, "node_name": "x0"})
    assert no_driver["failed"] is True
    assert no_driver["msg"] == "state is present but all of the following are missing: driver"
    assert set(nodes(d)) == {"f0"}
    assert d.alive()


def test_node_socket_from_module_defaults_and_no_engine(engine_with_monitor, ansible, tmp_path):
    img = make_raw_image(tmp_path / "d.img", MiB)
    d, sock = engine_with_monitor()
    r = ansible.module("node", {"node_name": "f0", "driver": "file",
                                "options": {"filename": str(img)}},
                       module_defaults={"group/blockdev.fleecing.blockd": {"socket": sock}})
    assert r["changed"] is True and not r.get("failed"), r
    assert set(nodes(d)) == {"f0"}
    nope = str(tmp_path / "nope.sock")
    r = ansible.module("node", {"node_name": "f0", "state": "absent"},
                       module_defaults={"group/blockdev.fleecing.blockd": {"socket": nope}})
    assert r["failed"] is True
    assert r["msg"] == f"QMP socket {nope} does not exist: is the engine running?"
