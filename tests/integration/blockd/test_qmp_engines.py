"""QMP behaviour every engine must show, run against qsd and blockd alike.

Expected texts are those qemu-storage-daemon 7.2 gives (the qsd cases of these
same tests prove them), so blockd passing means a client cannot tell the two apart.
"""

import asyncio
import json

import pytest

from helpers import MiB, make_raw_image

NULL = ["--blockdev", "driver=null-co,node-name=n0,size=1048576"]


def err(reply):
    assert "error" in reply, reply
    return reply["error"]["class"], reply["error"]["desc"]


@pytest.mark.parametrize("line,expected", [
    (b'{"execute": }', ("GenericError", "JSON parse error, expecting value")),
    (b"[1,2]", ("GenericError", "QMP input must be a JSON object")),
    (b'"str"', ("GenericError", "QMP input must be a JSON object")),
    (b'{"execute":1}', ("GenericError", "QMP input member 'execute' must be a string")),
    (b'{"execute":"query-version","foo":1}', ("GenericError", "QMP input member 'foo' is unexpected")),
    (b'{"execute":"query-version","arguments":[]}',
     ("GenericError", "QMP input member 'arguments' must be an object")),
    (b'{"execute":"nosuch"}', ("CommandNotFound", "The command nosuch has not been found")),
    (b'{"execute":"query-version","arguments":{"x":1}}', ("GenericError", "Parameter 'x' is unexpected")),
])
def test_malformed_input_gets_qemus_error(daemon, engine, line, expected):
    d = daemon(engine, *NULL)
    d.close_qmp()
    with d.raw_qmp() as q:
        q.negotiate()
        q.send(line)
        reply = q.recv_msg()
        assert err(reply) == expected
        assert "id" not in reply
        # the connection is still usable
        assert "return" in q.execute("query-version", id="after")


def test_missing_execute_echoes_id(daemon, engine):
    d = daemon(engine, *NULL)
    d.close_qmp()
    with d.raw_qmp() as q:
        q.negotiate()
        q.send(b'{"id":2}')
        reply = q.recv_msg()
        assert reply["id"] == 2
        assert err(reply) == ("GenericError", "QMP input lacks member 'execute'")


def test_negotiation_rules(daemon, engine):
    d = daemon(engine, *NULL)
    d.close_qmp()
    with d.raw_qmp() as q:
        greeting = q.recv_greeting()
        assert greeting["QMP"]["capabilities"] == ["oob"]
        assert set(greeting["QMP"]["version"]) == {"qemu", "package"}
        assert err(q.execute("query-version")) == (
            "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        assert q.execute("qmp_capabilities") == {"return": {}}
        assert err(q.execute("qmp_capabilities")) == (
            "CommandNotFound", "Capabilities negotiation is already complete, command ignored")


def test_framing_ids_and_single_quotes(daemon, engine):
    d = daemon(engine, *NULL)
    d.close_qmp()
    with d.raw_qmp() as q:
        q.negotiate()
        # two objects in one write, no newline; one object split over two writes
        q.send(b'{"execute":"query-version","id":1}{"execute":"query-version","id":{"a":[1]}}')
        first, second = q.recv_line(), q.recv_msg()
        assert first.endswith(b"}\r\n")
        assert json.loads(first)["id"] == 1 and second["id"] == {"a": [1]}
        q.send(b'{"execute":"query-')
        q.send(b'version","id":null}')
        reply = q.recv_msg()
        assert "return" in reply and reply["id"] is None
        q.send(b"{'execute': 'query-version', 'id': 'sq'}")
        assert q.recv_msg()["id"] == "sq"


BLOCKDEV_ERRORS = [
    ({"driver": "file", "node-name": "f1"}, "Parameter 'filename' is missing"),
    ({"driver": "file", "node-name": "f1", "filename": 5},
     "Invalid parameter type for 'filename', expected: string"),
    ({"driver": "raw", "node-name": "f1", "file": 5}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ({"driver": "raw", "node-name": "f1", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
    ({"driver": "raw", "node-name": "f1", "file": {"driver": "file", "filename": "/x", "bogus": 1}},
     "Parameter 'file.bogus' is unexpected"),
    ({"driver": "raw", "node-name": "f1", "file": {"filename": "x"}}, "Parameter 'file.driver' is missing"),
    ({"node-name": "f1"}, "Parameter 'driver' is missing"),
    ({"driver": "bogus", "node-name": "f1"}, "Parameter 'driver' does not accept value 'bogus'"),
    ({"driver": "null-co", "node-name": "f1", "bogus": 1, "size": "x"},
     "Invalid parameter type for 'size', expected: integer"),
    ({"driver": "null-co", "node-name": "f1", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ({"driver": "null-co", "node-name": "f1", "size": 1.5}, "Invalid parameter type for 'size', expected: integer"),
    ({"driver": "null-co", "node-name": "f1", "size": 2 ** 64}, "Invalid parameter type for 'size', expected: integer"),
    ({"driver": "null-co", "node-name": "n0"}, "Duplicate nodes with node-name='n0'"),
    ({"driver": "null-co"}, "'node-name' must be specified for the root node"),
    ({"driver": "null-co", "node-name": "1bad"}, "Invalid node-name: '1bad'"),
    ({"driver": "null-co", "node-name": "a" * 32}, "Node name too long"),
    ({"driver": "raw", "node-name": "r2", "file": "n0", "offset": 1048000, "size": 8192},
     "The sum of offset (1048000) and size (8192) has to be smaller or equal to the  actual size "
     "of the containing file (1048576)"),
    ({"driver": "raw", "node-name": "r4", "file": "nonode"}, "Cannot find device='nonode' nor node-name='nonode'"),
    ({"driver": "file", "node-name": "f9", "filename": "/nonexistent/x"},
     "Could not open '/nonexistent/x': No such file or directory"),
    ({"driver": "file", "node-name": "f9", "filename": "/tmp"}, "Could not open '/tmp': Is a directory"),
]


@pytest.mark.parametrize("args,desc", BLOCKDEV_ERRORS, ids=range(len(BLOCKDEV_ERRORS)))
def test_blockdev_add_errors(daemon, engine, args, desc):
    d = daemon(engine, *NULL)
    assert d.qmp.error("blockdev-add", **args) == {"class": "GenericError", "desc": desc}
    # nothing was added
    names = {n["node-name"] for n in d.qmp.cmd("query-named-block-nodes", flat=True)}
    assert names == {"n0"}


def test_blockdev_del_rules(daemon, engine):
    d = daemon(engine, *NULL, nbd=True)
    q = d.qmp
    q.cmd("blockdev-add", driver="raw", **{"node-name": "r1", "file": "n0", "offset": 4096, "size": 8192})
    q.cmd("blockdev-add", driver="raw", **{"node-name": "r5", "file": {"driver": "null-co", "size": 65536}})
    inline = [n["node-name"] for n in q.cmd("query-named-block-nodes", flat=True)
              if n["node-name"].startswith("#block")]
    assert len(inline) == 1
    assert q.error("blockdev-del", **{"node-name": "nope"})["desc"] == "Failed to find node with node-name='nope'"
    assert q.error("blockdev-del", **{"node-name": "n0"})["desc"] == "Block device n0 is in use"
    assert q.error("blockdev-del", **{"node-name": inline[0]})["desc"] == \
        "Node %s is not owned by the monitor" % inline[0]
    q.cmd("blockdev-del", **{"node-name": "r1"})
    q.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "n0"})
    assert q.error("blockdev-del", **{"node-name": "n0"})["desc"] == "Node n0 is in use"
    q.cmd("block-export-del", id="e1")
    q.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "e1"}})
    q.cmd("blockdev-del", **{"node-name": "r5"})
    q.cmd("blockdev-del", **{"node-name": "n0"})
    assert q.cmd("query-named-block-nodes") == []


def test_export_commands(daemon, engine):
    d = daemon(engine, *NULL)
    q = d.qmp
    assert q.error("block-export-add", type="nbd", id="e1", **{"node-name": "n0"})["desc"] == \
        "NBD server not running"
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.dir / "nbd.sock")}})
    assert q.error("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.dir / "x.sock")}}
                   )["desc"] == "NBD server already running"
    q.cmd("block-export-add", type="nbd", id="e1", writable=True, **{"node-name": "n0"})
    assert q.error("block-export-add", type="nbd", id="e1", **{"node-name": "n0"})["desc"] == \
        "Block export id 'e1' is already in use"
    assert q.error("block-export-add", type="nbd", id="e2", **{"node-name": "n0"})["desc"] == \
        "NBD server already has export named 'n0'"
    assert q.error("block-export-add", type="nbd", id="e2", **{"node-name": "nonode"})["desc"] == \
        "Cannot find device='' nor node-name='nonode'"
    assert q.cmd_raw("block-export-add", {"type": "nbd", "id": "e3", "name": "x3", "node-name": "n0"}) == {"return": {}}
    assert q.cmd("query-block-exports") == [
        {"node-name": "n0", "shutting-down": False, "type": "nbd", "id": "e3"},
        {"node-name": "n0", "shutting-down": False, "type": "nbd", "id": "e1"}]
    assert q.cmd_raw("nbd-server-add", {"device": "n0", "name": "old"}) == {"return": {}}
    assert q.cmd_raw("nbd-server-remove", {"name": "old"}) == {"return": {}}
    q.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "old"}})
    assert q.error("block-export-del", id="nope")["desc"] == "Export 'nope' is not found"
    q.cmd("nbd-server-stop")
    deleted = {q.event_wait("BLOCK_EXPORT_DELETED")["data"]["id"] for _ in range(2)}
    assert deleted == {"e1", "e3"}
    assert q.cmd("query-block-exports") == []
    assert q.error("nbd-server-stop")["desc"] == "NBD server not running"


def test_read_only_node_cannot_be_exported_writable(daemon, engine, tmp_path):
    img = make_raw_image(tmp_path / "ro.raw", MiB)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={img},read-only=on", nbd=True)
    assert d.qmp.error("block-export-add", type="nbd", id="e", writable=True, **{"node-name": "f"}
                       )["desc"] == "Cannot export read-only node as writable"


def test_qemu_qmp_async_client_and_events(daemon, engine):
    """The PyPI qemu.qmp client: connect, execute, ExecuteError, event listener."""
    from qemu.qmp import ExecuteError, QMPClient

    d = daemon(engine, *NULL, nbd=True)
    d.close_qmp()

    async def session():
        qmp = QMPClient("test")
        await qmp.connect(str(d.dir / "qmp.sock"))
        try:
            version = await qmp.execute("query-version")
            assert version["qemu"]["major"] == 7
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("blockdev-del", {"node-name": "nope"})
            assert info.value.error_class == "GenericError"
            with qmp.listener("BLOCK_EXPORT_DELETED") as listener:
                await qmp.execute("nbd-server-add", {"device": "n0", "name": "x"})
                await qmp.execute("nbd-server-remove", {"name": "x"})
                event = await asyncio.wait_for(listener.get(), 10)
            assert event["data"] == {"id": "x"}
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert {"blockdev-add", "blockdev-del", "query-named-block-nodes", "nbd-server-start",
                    "block-export-add", "query-commands", "quit"} <= names
        finally:
            await qmp.disconnect()

    asyncio.run(session())


def test_several_monitors_see_events(daemon, engine):
    d = daemon(engine, *NULL,
               "--chardev", "socket,path=m1.sock,server=on,wait=off,id=m1", "--monitor", "chardev=m1",
               "--chardev", "socket,path=m2.sock,server=on,wait=off,id=m2", "--monitor", "chardev=m2",
               nbd=True, qmp=False)
    with d.raw_qmp(monitor=0) as a, d.raw_qmp(monitor=1) as b:
        a.negotiate()
        b.negotiate()
        assert "return" in a.execute("nbd-server-add", {"device": "n0", "name": "x"})
        assert "return" in b.execute("nbd-server-remove", {"name": "x"})
        for q in (a, b):
            msg = q.events[0] if q.events else q.recv_msg()
            assert msg["event"] == "BLOCK_EXPORT_DELETED" and msg["data"] == {"id": "x"}


def test_quit(daemon, engine):
    d = daemon(engine, *NULL)
    d.close_qmp()
    d.expect_exit()
    with d.raw_qmp() as q:
        q.negotiate()
        assert q.execute("quit") == {"return": {}}
        assert q.is_closed_by_peer(10)
    assert d.wait(10) == 0


def test_quit_with_exports_announces_their_deletion(daemon, engine):
    d = daemon(engine, *NULL, "--export", "type=nbd,id=e0,node-name=n0", nbd=True)
    d.close_qmp()
    d.expect_exit()
    with d.raw_qmp() as q:
        q.negotiate()
        assert q.execute("quit") == {"return": {}}
        assert [(e["event"], e["data"]) for e in q.events] == [("BLOCK_EXPORT_DELETED", {"id": "e0"})]
    assert d.wait(10) == 0
