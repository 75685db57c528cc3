# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""plugins/module_utils/qmp_client.py against a real blockd engine.

Protocol violations a real engine never commits (a peer that greets with
something else, or stops answering) are played by a tiny socket server.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import json
import os
import socket
import threading

import pytest

from ansible_collections.blockdev.fleecing.plugins.module_utils.qmp_client import (
    QMPClient, QMPCommandError, QMPConnectError, QMPError, QMPTimeout)


def test_connect_negotiates_and_executes(blockd_engine):
    with QMPClient(blockd_engine.qmp_path, timeout=10) as qmp:
        assert qmp.version["qemu"]["major"] == 7
        assert qmp.version["package"].startswith("blockd")
        assert qmp.execute("query-version")["qemu"] == qmp.version["qemu"]
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})
        assert sorted(n["node-name"] for n in nodes) == ["disk0", "file0"]
        # Arguments travel as given: a new node appears, then goes.
        assert qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"}) == {}
        node = [n for n in qmp.execute("query-named-block-nodes", {"flat": True})
                if n["node-name"] == "disk0"][0]
        assert [b["name"] for b in node["dirty-bitmaps"]] == ["b0"]


def test_command_errors_carry_class_and_text_and_keep_the_session(blockd_engine):
    with QMPClient(blockd_engine.qmp_path, timeout=10) as qmp:
        with pytest.raises(QMPCommandError) as err:
            qmp.execute("no-such-command")
        assert err.value.klass == "CommandNotFound"
        assert err.value.desc == "The command no-such-command has not been found"
        assert err.value.command == "no-such-command"
        assert str(err.value) == "no-such-command: The command no-such-command has not been found"
        with pytest.raises(QMPCommandError) as err:
            qmp.execute("block-dirty-bitmap-add", {"node": "nope", "name": "b0"})
        assert err.value.klass == "GenericError"
        assert "nope" in err.value.desc
        assert isinstance(err.value, QMPError)
        # The session goes on after an error.
        assert qmp.execute("query-block-jobs") == []


def test_events_are_kept_and_waited_for(blockd_engine):
    nbd_path = os.path.join(blockd_engine.dir, "nbd.sock")
    with QMPClient(blockd_engine.qmp_path, timeout=10) as qmp:
        qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_path}}})
        qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk0"})
        qmp.execute("block-export-del", {"id": "e0"})
        event = qmp.wait_event(lambda e: e.get("event") == "BLOCK_EXPORT_DELETED")
        assert event["data"] == {"id": "e0"}
        assert all(e.get("event") != "BLOCK_EXPORT_DELETED" for e in qmp.events)
        assert qmp.execute("query-block-exports") == []


def test_close_is_idempotent_and_a_closed_client_says_so(blockd_engine):
    qmp = QMPClient(blockd_engine.qmp_path, timeout=10).connect()
    qmp.close()
    qmp.close()
    with pytest.raises(QMPConnectError) as err:
        qmp.execute("query-version")
    assert str(err.value) == "not connected to %s" % blockd_engine.qmp_path
    # The monitor is free again for the next client.
    with QMPClient(blockd_engine.qmp_path, timeout=10) as again:
        assert again.execute("query-block-exports") == []


def test_engine_that_quits_mid_session(blockd_engine):
    qmp = QMPClient(blockd_engine.qmp_path, timeout=10).connect()
    try:
        qmp.execute("quit")
        assert blockd_engine.proc.wait(30) == 0
        with pytest.raises(QMPConnectError) as err:
            qmp.execute("query-version")
        assert blockd_engine.qmp_path in str(err.value)
    finally:
        qmp.close()


def test_busy_monitor_does_not_greet_a_second_client(blockd_engine):
    """A monitor serves one client at a time (as qemu-storage-daemon's does)."""
    with QMPClient(blockd_engine.qmp_path, timeout=10):
        with pytest.raises(QMPConnectError) as err:
            QMPClient(blockd_engine.qmp_path, timeout=0.5).connect()
        assert str(err.value) == "%s did not send a QMP greeting" % blockd_engine.qmp_path


def test_missing_socket(tmp_path):
    path = str(tmp_path / "nope.sock")
    with pytest.raises(QMPConnectError) as err:
        QMPClient(path).connect()
    assert str(err.value) == "QMP socket %s does not exist: is the engine running?" % path


def test_stale_socket_refuses(tmp_path):
    path = str(tmp_path / "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()
    with pytest.raises(QMPConnectError) as err:
        QMPClient(path).connect()
    assert str(err.value) == ("cannot connect to QMP socket %s: Connection refused: "
                              "is the engine running?" % path)


class _Peer:
    """A one-connection UNIX socket server that sends LINES, then reads until closed."""

    def __init__(self, path, lines, answer_capabilities=False):
        self.path = path
        self.lines = lines
        self.answer_capabilities = answer_capabilities
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve)
        self.thread.daemon = True
        self.thread.start()

    def _serve(self):
        conn, _addr = self.server.accept()
        with conn:
            for line in self.lines:
                conn.sendall(line)
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                if self.answer_capabilities and b"qmp_capabilities" in buf:
                    msg = json.loads(buf.split(b"\n")[0])
                    conn.sendall(json.dumps({"return": {}, "id": msg["id"]}).encode() + b"\r\n")
                    self.answer_capabilities = False

    def close(self):
        """Stop listening."""
        self.server.close()


GREETING = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}\r\n'


def test_peer_that_is_not_qmp(tmp_path):
    path = str(tmp_path / "other.sock")
    peer = _Peer(path, [b'{"hello": "world"}\n'])
    try:
        with pytest.raises(QMPConnectError) as err:
            QMPClient(path, timeout=5).connect()
        assert str(err.value) == "%s is not a QMP monitor (greeting {'hello': 'world'})" % path
    finally:
        peer.close()


def test_peer_that_stops_answering_times_out(tmp_path):
    path = str(tmp_path / "mute.sock")
    peer = _Peer(path, [GREETING], answer_capabilities=True)
    qmp = QMPClient(path, timeout=1).connect()
    try:
        with pytest.raises(QMPTimeout) as err:
            qmp.execute("query-version")
        assert str(err.value) == "no answer from %s within 1 s" % path
    finally:
        qmp.close()
        peer.close()
