"""blockdev.fleecing.blockd_info against both engines, through ansible-playbook."""

from helpers import MiB, make_raw_image


def test_info_reads_nodes_jobs_exports_and_bitmaps(engine_with_monitor, ansible, tmp_path):
    img = make_raw_image(tmp_path / "d.img", 4 * MiB)
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=d0,filename={img}")
    d.qmp.cmd_raw("block-dirty-bitmap-add", {"node": "d0", "name": "b0"})
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"})
    r = ansible.module("blockd_info", {"socket": sock}, check=True)
    assert r["changed"] is False and not r["failed"], r
    assert [n["node-name"] for n in r["nodes"]] == ["d0"]
    assert [e["id"] for e in r["exports"]] == ["e0"]
    assert r["jobs"] == []
    assert [b["name"] for b in r["bitmaps"]["d0"]] == ["b0"]
    assert r["version"]["qemu"]["major"] == 7
    only = ansible.module("blockd_info", {"socket": sock, "gather": ["exports"]})
    assert "nodes" not in only and [e["id"] for e in only["exports"]] == ["e0"]


def test_info_without_engine_fails_clearly(ansible, tmp_path):
    r = ansible.module("blockd_info", {"socket": str(tmp_path / "nope.sock")})
    assert r["failed"] is True
    assert r["msg"] == f"QMP socket {tmp_path / 'nope.sock'} does not exist: is the engine running?"


def test_info_on_a_socket_that_is_not_qmp(ansible, tmp_path):
    import socket
    path = tmp_path / "plain.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    try:
        r = ansible.module("blockd_info", {"socket": str(path), "timeout": 2})
    finally:
        srv.close()
    assert r["failed"] is True and r["msg"] == f"{path} did not send a QMP greeting", r
