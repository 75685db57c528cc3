"""blockdev.fleecing.nbd_server against both engines, through ansible-playbook.

QEMU 7.2 cannot report its NBD server, so the engine is checked by what the
server does: ``block-export-add`` of type nbd works only while it runs, and
real NBD clients (nbdinfo) reach exports at the URI the module returns.
"""

import socket

from helpers import MiB, make_raw_image, nbdinfo_json, require_tool, run
from helpers.pki import pki  # noqa: F401  pylint: disable=unused-import  (a pytest fixture)


def server_running(d):
    """True when the engine's NBD server runs (an nbd export can be added)."""
    reply = d.qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "probe", "node-name": "d0"})
    if "error" in reply:
        assert reply["error"]["desc"] == "NBD server not running", reply
        return False
    d.qmp.cmd("block-export-del", id="probe")
    d.qmp.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "probe"}})
    return True


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_start_check_idempotent_and_stop(engine_with_monitor, ansible, tmp_path):
    img = make_raw_image(tmp_path / "d.img", MiB)
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=d0,filename={img}",
                                  nbd=False)
    path = str(tmp_path / "n.sock")
    args = {"socket": sock, "addr": {"type": "unix", "path": path}}

    checked = ansible.module("nbd_server", args, check=True, diff=True)
    assert not checked.get("failed") and checked["changed"] is True, checked
    assert checked["started"] is True and checked["running"] is True
    assert checked["diff"] == {"before": {}, "after": {
        "running": True, "addr": {"type": "unix", "path": path}}}
    assert not server_running(d), "check mode started the server"

    first = ansible.module("nbd_server", dict(args, max_connections=4), diff=True)
    assert not first.get("failed") and first["changed"] is True and first["started"], first
    assert first["addr"] == {"type": "unix", "path": path}
    assert first["uri"] == f"nbd+unix:///?socket={path}"
    assert first["diff"]["after"]["max_connections"] == 4
    assert server_running(d)
    second = ansible.module("nbd_server", dict(args, max_connections=4), diff=True)
    assert not second.get("failed") and second["changed"] is False, second
    assert second["started"] is False and second["diff"]["before"] == second["diff"]["after"]
    again_check = ansible.module("nbd_server", args, check=True)
    assert again_check["changed"] is False and not again_check.get("failed"), again_check

    # the running server is not where this task wants it: a clear failure, nothing changed
    other = str(tmp_path / "other.sock")
    moved = ansible.module("nbd_server", {"socket": sock, "addr": {"path": other}})
    assert moved["failed"] is True and moved["changed"] is False, moved
    assert moved["msg"] == (f"an NBD server is already running, but nothing listens at {other}: "
                            "it was started with another address; stop it first (state=absent), "
                            "nothing was changed")

    # a client reaches an export through the server's URI
    assert "return" in d.qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "e0",
                                                          "name": "disk", "node-name": "d0"})
    info = nbdinfo_json(f"nbd+unix:///disk?socket={path}")
    assert info["exports"][0]["export-size"] == MiB

    stop = {"socket": sock, "state": "absent"}
    refused = ansible.module("nbd_server", stop)
    assert refused["failed"] is True and refused["changed"] is False, refused
    assert refused["msg"] == ("the NBD server has export(s) e0; stopping it would remove them: "
                              "remove them first or set force=true; nothing was changed")
    forced_check = ansible.module("nbd_server", dict(stop, force=True), check=True, diff=True)
    assert forced_check["changed"] is True and forced_check["removed_exports"] == ["e0"]
    assert forced_check["diff"] == {"before": {"running": True, "nbd_exports": ["e0"]},
                                    "after": {}}
    assert [e["id"] for e in d.qmp.cmd("query-block-exports")] == ["e0"]

    stopped = ansible.module("nbd_server", dict(stop, force=True))
    assert stopped["changed"] is True and stopped["removed_exports"] == ["e0"], stopped
    assert d.qmp.cmd("query-block-exports") == []
    assert d.qmp.error("nbd-server-stop")["desc"] == "NBD server not running"
    again = ansible.module("nbd_server", dict(stop, force=True))
    assert again["changed"] is False and not again.get("failed"), again


def test_server_inet_and_bad_input(engine_with_monitor, ansible, tmp_path):
    img = make_raw_image(tmp_path / "d.img", MiB)
    d, sock = engine_with_monitor("--blockdev", f"driver=file,node-name=d0,filename={img}",
                                  nbd=False)
    port = free_port()
    args = {"socket": sock, "addr": {"type": "inet", "host": "127.0.0.1", "port": port}}

    bad = [
        ({"addr": {"type": "unix"}}, "addr.type is unix but addr.path is missing"),
        ({"addr": {"type": "inet", "host": "127.0.0.1", "port": 70000}},
         "addr.port must be between 1 and 65535, not 70000"),
        ({"addr": {"type": "inet", "host": "::1", "port": 1, "path": "/x"}},
         "addr.path conflicts with addr.type=inet"),
        ({"addr": {"path": str(tmp_path / "no" / "dir" / "n.sock")}},
         "nbd-server-start failed: "),
    ]
    for extra, msg in bad:
        r = ansible.module("nbd_server", dict({"socket": sock}, **extra))
        assert r["failed"] is True and r["changed"] is False, r
        assert r["msg"].startswith(msg) if msg.endswith(": ") else r["msg"] == msg, r
    authz = ansible.module("nbd_server", dict(args, tls_authz="authz0"))
    assert authz["failed"] is True
    assert authz["msg"] == "missing parameter(s) required by 'tls_authz': tls_creds"
    assert not server_running(d)

    first = ansible.module("nbd_server", args)
    assert first["changed"] is True and first["uri"] == f"nbd://127.0.0.1:{port}/", first
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"})
    assert nbdinfo_json(f"nbd://127.0.0.1:{port}/d0")["exports"][0]["export-size"] == MiB
    d.qmp.cmd("block-export-del", id="e0")
    d.qmp.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "e0"}})
    second = ansible.module("nbd_server", args)
    assert second["changed"] is False and not second.get("failed"), second
    # with its address, check mode can tell that the server runs even without exports
    stop = dict(args, state="absent")
    assert ansible.module("nbd_server", stop, check=True)["changed"] is True
    assert server_running(d)
    assert ansible.module("nbd_server", stop)["changed"] is True
    assert not server_running(d)
    assert d.alive()

    nope = str(tmp_path / "nope.sock")
    r = ansible.module("nbd_server", dict(args, socket=nope))
    assert r["failed"] is True
    assert r["msg"] == f"QMP socket {nope} does not exist: is the engine running?"


def test_server_with_tls_and_export_uri(engine_with_monitor, ansible, tmp_path, pki):
    img = make_raw_image(tmp_path / "d.img", MiB)
    d, sock = engine_with_monitor(
        "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=on",
        "--blockdev", f"driver=file,node-name=d0,filename={img}", nbd=False)
    path = str(tmp_path / "n.sock")
    args = {"socket": sock, "addr": {"path": path}, "tls_creds": "tls0"}

    wrong = ansible.module("nbd_server", dict(args, tls_creds="nosuch"))
    assert wrong["failed"] is True and wrong["changed"] is False, wrong
    assert wrong["msg"].startswith("nbd-server-start failed: "), wrong
    assert not server_running(d)

    started = ansible.module("nbd_server", args)
    assert started["changed"] is True and started["uri"] == f"nbds+unix:///?socket={path}"
    exp = ansible.module("nbd_export", {"socket": sock, "id": "e0", "node_name": "d0",
                                        "server": dict(started["addr"], tls=True)})
    assert exp["changed"] is True and exp["uri"] == f"nbds+unix:///d0?socket={path}", exp
    tls_uri = exp["uri"] + f"&tls-certificates={pki}&tls-hostname=localhost"
    assert nbdinfo_json(tls_uri)["exports"][0]["export-size"] == MiB
    plain = run([require_tool("nbdinfo", "libnbd-bin"), f"nbd+unix:///d0?socket={path}"],
                check=False)
    assert plain.returncode != 0, "the server answered a client without TLS"
    again = ansible.module("nbd_server", args)
    assert again["changed"] is False and not again.get("failed"), again
