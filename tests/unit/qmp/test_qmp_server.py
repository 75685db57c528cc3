# -*- coding: utf-8 -*-
"""blockd.qmp.server over real UNIX sockets, with a stand-in daemon.

Byte strings in the assertions are what qemu-storage-daemon 7.2.22 sent for
the same input (the greeting's ``package`` aside, which comes from the
daemon).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import pytest

from blockd.errors import CommandNotFound, QMPError
from blockd.qmp import server as qmp_server
from blockd.qmp.schema import Schema
from blockd.qmp.server import Monitor, MonitorListener, make_event

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}
GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
            b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n')
VERSION_REPLY = (b'{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
                 b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}')
NEGOTIATE = b'{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n'


class StandInDaemon:
    """Test double for blockd's Daemon: the interface the monitor relies on."""

    def __init__(self) -> None:
        self.schema = Schema.default()
        self.monitors: List[Monitor] = []
        self.lock = threading.Lock()
        self.calls: List[Any] = []
        self.deferred: List[Any] = []
        self.gate: Optional[threading.Event] = None
        self.removed = threading.Event()

    def version_info(self) -> Dict[str, Any]:
        return VERSION

    def add_monitor(self, monitor: Monitor) -> None:
        with self.lock:
            self.monitors.append(monitor)

    def remove_monitor(self, monitor: Monitor) -> None:
        with self.lock:
            self.monitors.remove(monitor)
        self.removed.set()

    def emit(self, name: str, data: Optional[dict] = None) -> None:
        msg = make_event(name, data)
        with self.lock:           # like blockd: send_event may run under a lock
            for monitor in self.monitors:
                monitor.send_event(msg)

    def run_deferred(self) -> None:
        while self.deferred:
            self.deferred.pop(0)()

    def execute(self, name: str, args: Dict[str, Any]) -> Any:
        self.calls.append((name, args))
        if name == "x-wait":
            assert self.gate is not None
            self.gate.wait(10)
            return {}
        if name == "x-fail":
            raise QMPError("it failed")
        if name == "x-crash":
            raise RuntimeError("bug")
        if name == "x-none":
            return None
        if name not in self.schema.commands():
            raise CommandNotFound("The command %s has not been found" % name)
        self.schema.validate(name, args)
        if name == "query-version":
            return VERSION
        if name == "quit":
            return {}
        if name == "block-export-del":
            self.deferred.append(lambda: self.emit("BLOCK_EXPORT_DELETED", {"id": args["id"]}))
            return {}
        return []


class Client:
    """A raw QMP client."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, timeout: float = 10) -> bytes:
        """One message including its \\r\\n."""
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def msg(self) -> dict:
        return json.loads(self.line())

    def cmd(self, data: bytes) -> bytes:
        self.send(data)
        return self.line()

    def negotiate(self) -> None:
        assert self.line() == GREETING
        assert self.cmd(b'{"execute":"qmp_capabilities"}') == b'{"return": {}}\r\n'

    def silent(self, wait: float = 0.3) -> bool:
        """Whether nothing arrives within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        self.buf += data
        return False

    def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        self.sock.settimeout(10)
        data = self.buf
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sockdir():
    with tempfile.TemporaryDirectory(prefix="qmpt") as path:  # short: AF_UNIX path limit
        yield path


def _qmp_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qmp-")]


@pytest.fixture
def serve(sockdir, caplog):
    """Start listeners; at teardown close them and check nothing leaked or was logged."""
    caplog.set_level(logging.WARNING, logger="blockd.qmp")
    listeners: List[MonitorListener] = []
    before = set(_qmp_threads())

    def start(daemon: Optional[StandInDaemon] = None, pretty: bool = False, name: str = "qmp"):
        daemon = daemon or StandInDaemon()
        path = os.path.join(sockdir, "%s-%d.sock" % (name, len(listeners)))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.listen(4)
        listener = MonitorListener(daemon, sock, pretty=pretty, name=name)
        listener.start()
        listeners.append(listener)
        return daemon, path, listener

    yield start
    for listener in listeners:
        listener.close()
    for listener in listeners:
        assert listener.join(10)
    deadline = time.monotonic() + 10
    while set(_qmp_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(_qmp_threads()) - before
    assert [r for r in caplog.records if r.levelno >= logging.ERROR
            and "x-crash" not in r.getMessage() and "command failed" not in r.getMessage()] == []


def test_greeting_and_negotiation_mode(serve):
    _, path, _ = serve()
    c = Client(path)
    assert c.line() == GREETING
    assert c.cmd(b'{"execute":"query-version"}') == NEGOTIATE
    assert c.cmd(b'{"execute":"nosuch","id":1}') == (
        b'{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities '
        b'negotiation with \'qmp_capabilities\'"}}\r\n')
    assert c.cmd(b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":1}') == (
        b'{"id": 1, "error": {"class": "GenericError", "desc": "Parameter \'null\' does not '
        b'accept value \'foo\'"}}\r\n')
    assert c.cmd(b'{"exec-oob":"query-version","id":1}') == (
        b'{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' '
        b'is unexpected"}}\r\n')
    assert c.cmd(b'[1]') == (b'{"error": {"class": "GenericError", "desc": "QMP input must be a '
                             b'JSON object"}}\r\n')
    assert c.cmd(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}') == (
        b'{"return": {}, "id": 1}\r\n')
    assert c.cmd(b'{"execute":"qmp_capabilities","id":1}') == (
        b'{"id": 1, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is '
        b'already complete, command ignored"}}\r\n')
    # oob enabled: exec-oob is understood, but no command supports it (qsd 7.2)
    assert c.cmd(b'{"exec-oob":"query-version","id":1}') == (
        b'{"id": 1, "error": {"class": "GenericError", "desc": "The command query-version does '
        b'not support OOB"}}\r\n')
    assert c.cmd(b'{"exec-oob":"nosuch"}') == (
        b'{"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been '
        b'found"}}\r\n')
    assert c.cmd(b'{"exec-oob":"query-version", "execute": "query-version"}') == (
        b'{"error": {"class": "GenericError", "desc": "QMP input member \'execute\' clashes with '
        b'\'exec-oob\'"}}\r\n')
    assert c.cmd(b'{"execute":"query-version","id":2}') == VERSION_REPLY + b', "id": 2}\r\n'
    c.close()


def test_envelope_errors_and_ids(serve):
    daemon, path, _ = serve()
    c = Client(path)
    c.negotiate()
    expect = [
        (b'{"id":2}', b'{"id": 2, "error": {"class": "GenericError", "desc": "QMP input lacks '
                      b'member \'execute\'"}}\r\n'),
        (b'{"execute":1}', b'{"error": {"class": "GenericError", "desc": "QMP input member '
                           b'\'execute\' must be a string"}}\r\n'),
        (b'{"execute":"x","arguments":[]}', b'{"error": {"class": "GenericError", "desc": "QMP '
                                            b'input member \'arguments\' must be an object"}}\r\n'),
        (b'{"execute":"x","foo":1,"bar":2}', b'{"error": {"class": "GenericError", "desc": "QMP '
                                             b'input member \'bar\' is unexpected"}}\r\n'),
        (b'{"execute":"query-version","arguments":{"x":1}}',
         b'{"error": {"class": "GenericError", "desc": "Parameter \'x\' is unexpected"}}\r\n'),
        (b'{"execute":"no-such-cmd"}', b'{"error": {"class": "CommandNotFound", "desc": "The '
                                       b'command no-such-cmd has not been found"}}\r\n'),
        (b'{"execute": }', b'{"error": {"class": "GenericError", "desc": "JSON parse error, '
                           b'expecting value"}}\r\n'),
        (b'{"execute":"query-version","id":{"a":[1]}}', VERSION_REPLY + b', "id": {"a": [1]}}\r\n'),
        (b'{"execute":"query-version","id":null}', VERSION_REPLY + b', "id": null}\r\n'),
        (b'{"execute":"query-version","id":0.1}', VERSION_REPLY + b', "id": 0.10000000000000001}\r\n'),
        (b'{"execute":"query-version","id":"\xc3\xa9"}', VERSION_REPLY + b', "id": "\\u00E9"}\r\n'),
        (b"{'execute':'query-version','id':'sq'}", VERSION_REPLY + b', "id": "sq"}\r\n'),
        (b'{"execute":"x-fail","id":3}', b'{"id": 3, "error": {"class": "GenericError", '
                                         b'"desc": "it failed"}}\r\n'),
        (b'{"execute":"x-none","id":4}', b'{"return": {}, "id": 4}\r\n'),
    ]
    for data, reply in expect:
        assert c.cmd(data) == reply, data
    # the monitor did not validate, the daemon did
    assert ("query-version", {"x": 1}) in daemon.calls
    c.close()


def test_stream_framing_and_recovery(serve):
    _, path, _ = serve()
    c = Client(path)
    c.negotiate()
    c.send(b'{"execute":"query-version","id":1}{"execute":"query-version","id":2} {"exe')
    assert c.line() == VERSION_REPLY + b', "id": 1}\r\n'
    assert c.line() == VERSION_REPLY + b', "id": 2}\r\n'
    c.send(b'cute":"query-')
    assert c.silent()
    c.send(b'version","id":3}')
    assert c.line() == VERSION_REPLY + b', "id": 3}\r\n'
    c.send(b'{"execute": @"query-version"}\xff{"execute":"query-version","id":4}')
    assert c.line() == b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'@\'"}}\r\n'
    assert c.line() == b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'
    assert c.line() == (b'{"error": {"class": "GenericError", "desc": "JSON parse error, '
                        b'stray \'\\uFFFD\'"}}\r\n')
    assert c.line() == VERSION_REPLY + b', "id": 4}\r\n'
    c.close()


def test_pretty(serve):
    _, path, _ = serve(pretty=True)
    c = Client(path)
    c.sock.settimeout(10)
    expected = (b'{\r\n    "QMP": {\r\n        "version": {\r\n            "qemu": {\r\n'
                b'                "micro": 22,\r\n                "minor": 2,\r\n'
                b'                "major": 7\r\n            },\r\n'
                b'            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"\r\n        },\r\n'
                b'        "capabilities": [\r\n            "oob"\r\n        ]\r\n    }\r\n}\r\n')
    data = b""
    while len(data) < len(expected):
        data += c.sock.recv(65536)
    assert data == expected
    c.send(b'{"execute":"qmp_capabilities","id":[1,{},[],{"a":[]}]}')
    expected = (b'{\r\n    "return": {\r\n    },\r\n    "id": [\r\n        1,\r\n        {\r\n'
                b'        },\r\n        [\r\n        ],\r\n        {\r\n            "a": [\r\n'
                b'            ]\r\n        }\r\n    ]\r\n}\r\n')
    data = b""
    while len(data) < len(expected):
        data += c.sock.recv(65536)
    assert data == expected
    c.close()


def test_events_only_after_negotiation(serve):
    daemon, path, _ = serve()
    c = Client(path)
    assert c.line() == GREETING
    while not daemon.monitors:
        time.sleep(0.01)
    daemon.emit("BLOCK_EXPORT_DELETED", {"id": "early"})
    assert c.cmd(b'{"execute":"qmp_capabilities"}') == b'{"return": {}}\r\n'
    assert c.silent()
    daemon.emit("BLOCK_EXPORT_DELETED", {"id": "e0"})
    daemon.emit("SHUTDOWN")
    ev = c.line()
    assert ev.startswith(b'{"timestamp": {"seconds": ')
    assert b'}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}\r\n' in ev
    msg = json.loads(ev)
    assert abs(msg["timestamp"]["seconds"] + msg["timestamp"]["microseconds"] / 1e6
               - time.time()) < 60
    assert json.loads(c.line())["event"] == "SHUTDOWN"
    assert "data" not in make_event("SHUTDOWN")
    assert make_event("X", {"a": 1}, timestamp=1.5) == {
        "timestamp": {"seconds": 1, "microseconds": 500000}, "event": "X", "data": {"a": 1}}
    c.close()


def test_deferred_work_runs_before_the_reply(serve):
    # qsd 7.2 sends BLOCK_EXPORT_DELETED of block-export-del before {"return": {}}
    _, path, _ = serve()
    c = Client(path)
    c.negotiate()
    c.send(b'{"execute":"block-export-del","arguments":{"id":"e0"},"id":1}')
    assert json.loads(c.line())["event"] == "BLOCK_EXPORT_DELETED"
    assert c.line() == b'{"return": {}, "id": 1}\r\n'
    c.close()


def test_events_while_a_command_runs(serve):
    daemon, path, _ = serve()
    daemon.gate = threading.Event()
    c = Client(path)
    c.negotiate()
    c.send(b'{"execute":"x-wait","id":1}{"execute":"query-version","id":2}')
    while not any(call[0] == "x-wait" for call in daemon.calls):
        time.sleep(0.01)
    daemon.emit("JOB_STATUS_CHANGE", {"id": "j", "status": "running"})
    assert json.loads(c.line())["event"] == "JOB_STATUS_CHANGE"
    assert c.silent()     # requests are handled strictly in order
    daemon.gate.set()
    assert c.line() == b'{"return": {}, "id": 1}\r\n'
    assert c.line() == VERSION_REPLY + b', "id": 2}\r\n'
    c.close()


def test_quit_flushes_reply_then_closes(serve):
    daemon, path, listener = serve()
    c = Client(path)
    c.negotiate()
    c.send(b'{"execute":"quit","id":"q"}\n{"execute":"query-version"}')
    assert c.rest() == b'{"return": {}, "id": "q"}\r\n'
    assert [call[0] for call in daemon.calls] == ["quit"]
    assert daemon.removed.wait(10)
    # the listener takes the next client
    c2 = Client(path)
    assert c2.line() == GREETING
    c2.close()


def test_one_client_at_a_time(serve):
    _, path, _ = serve()
    first = Client(path)
    assert first.line() == GREETING
    second = Client(path)
    assert second.silent(0.5)          # connected, but no greeting yet (like qsd)
    first.close()
    assert second.line() == GREETING
    second.close()


def test_crash_in_command_keeps_connection(serve):
    _, path, _ = serve()
    c = Client(path)
    c.negotiate()
    reply = json.loads(c.cmd(b'{"execute":"x-crash","id":1}'))
    assert reply["id"] == 1 and reply["error"]["class"] == "GenericError"
    assert c.cmd(b'{"execute":"query-version","id":2}') == VERSION_REPLY + b', "id": 2}\r\n'
    c.close()


def test_slow_reader_is_disconnected(serve, monkeypatch):
    monkeypatch.setattr(qmp_server, "OUTPUT_LIMIT", 1 << 20)
    daemon, path, _ = serve()
    _, path2, _ = serve(daemon, name="other")
    c = Client(path)
    c.negotiate()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    other = Client(path2)
    other.negotiate()
    stop = threading.Event()
    received = []

    def drain():        # the well-behaved client keeps reading
        other.sock.settimeout(0.2)
        while not stop.is_set():
            try:
                received.append(len(other.sock.recv(1 << 20)))
            except socket.timeout:
                pass
    reader = threading.Thread(target=drain)
    reader.start()
    payload = {"id": "x" * 8192}
    deadline = time.monotonic() + 30
    while len(daemon.monitors) == 2 and time.monotonic() < deadline:
        daemon.emit("BIG", payload)    # never blocks, even for the client that does not read
        time.sleep(0.002)              # (but give the reading client a chance to keep up)
    stop.set()
    reader.join()
    assert len(daemon.monitors) == 1 and sum(received) > (1 << 20)
    # the well-behaved client still works
    other.send(b'{"execute":"query-version","id":"still-here"}')
    while not other.line().endswith(b'"id": "still-here"}\r\n'):
        pass
    other.close()
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:
            c.line()
    c.close()


def test_listener_close_is_clean_and_flushes(serve):
    daemon, path, listener = serve()
    c = Client(path)
    c.negotiate()
    daemon.emit("BLOCK_EXPORT_DELETED", {"id": "e0"})
    listener.close()
    assert listener.join(10)
    data = c.rest()
    assert b'"event": "BLOCK_EXPORT_DELETED"' in data
    with pytest.raises(OSError):
        Client(path)
    c.close()


def test_monitor_on_a_socketpair():
    daemon = StandInDaemon()
    ours, theirs = socket.socketpair()
    monitor = Monitor(daemon, ours, name="pair")
    monitor.start()
    c = Client.__new__(Client)
    c.sock, c.buf = theirs, b""
    c.negotiate()
    assert monitor.negotiated and not monitor.oob_enabled
    assert c.cmd(b'{"execute":"query-version"}') == VERSION_REPLY + b'}\r\n'
    theirs.close()                       # client goes away
    assert monitor.join(10) and monitor.closed
    assert daemon.monitors == []


def test_close_from_inside_a_command():
    daemon = StandInDaemon()
    ours, theirs = socket.socketpair()
    monitor = Monitor(daemon, ours)

    def closing_execute(name, args):
        monitor.close()
        return {"closed": True}
    daemon.execute = closing_execute
    monitor.start()
    c = Client.__new__(Client)
    c.sock, c.buf = theirs, b""
    c.negotiate()
    c.send(b'{"execute":"anything","id":1}{"execute":"anything","id":2}')
    assert c.line() == b'{"return": {"closed": true}, "id": 1}\r\n'
    # the second request is not handled; it is left unread (the client sees a reset)
    with pytest.raises((EOFError, ConnectionResetError)):
        c.line()
    assert monitor.join(10)
    theirs.close()


def test_garbage_never_kills_the_monitor(serve):
    daemon, path, _ = serve()
    c = Client(path)
    c.negotiate()
    import random  # pylint: disable=import-outside-toplevel
    rnd = random.Random(3)
    for _ in range(50):
        c.send(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200))))
    # resynchronise (0xFF and a newline end any token), then it must still answer
    c.send(b'"\xff\n{"execute":"query-version","id":"end"}')
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = c.line()
        if line.endswith(b'"id": "end"}\r\n'):
            break
    else:
        pytest.fail("no reply after garbage")
    assert len(daemon.monitors) == 1
    c.close()
