"""QMP clients for tests.

* ``QMP``: synchronous client on top of ``qemu.qmp.legacy.QEMUMonitorProtocol``
  (qemu.qmp 0.0.6), with a connect timeout and event helpers.
* ``RawQMP``: a plain-socket client for byte-level tests (exact framing,
  malformed input, ordering of replies and events).

qemu-storage-daemon serves ONE client per monitor socket at a time: a second
connection gets no greeting until the first one closes.  Close one client
before opening another on the same socket (or give the daemon two monitors).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional


class QMPTimeout(AssertionError):
    """A QMP reply or event did not arrive in time."""


class QMP:
    """Synchronous QMP client (qemu.qmp's legacy API plus timeouts).

    >>> q = QMP("qmp.sock")          # connects and negotiates
    >>> q.cmd("query-version")       # return value; raises ExecuteError on error
    >>> q.cmd_raw("blockdev-del", {"node-name": "x"})   # the whole reply dict
    >>> q.error("blockdev-del", **{"node-name": "x"})    # asserts failure -> error dict
    >>> q.event_wait("JOB_STATUS_CHANGE", match={"data": {"status": "concluded"}})
    """

    def __init__(self, address: str | Path | tuple[str, int], *, negotiate: bool = True,
                 timeout: float = 10.0):
        # Imported here so that conftest stays importable without qemu.qmp.
        from qemu.qmp.legacy import QEMUMonitorProtocol  # pylint: disable=import-outside-toplevel

        self.address = address if isinstance(address, tuple) else str(address)
        self.timeout = timeout
        self._m = QEMUMonitorProtocol(self.address)
        self._m.settimeout(timeout)
        # legacy connect() has no timeout (it waits forever for a greeting that a
        # busy single-client monitor never sends); apply ours to the same coroutine.
        qmp = self._m._qmp  # pylint: disable=protected-access
        qmp.await_greeting = negotiate
        qmp.negotiate = negotiate
        try:
            self._m._sync(qmp.connect(self.address), timeout)  # pylint: disable=protected-access
        except Exception:
            self._m.close()
            raise
        self.greeting: Optional[dict] = self._m._get_greeting()  # pylint: disable=protected-access

    # --- commands -------------------------------------------------------------
    def cmd(self, name: str, **args: Any) -> Any:
        """Execute NAME; return its ``return`` value, raise ``qemu.qmp.ExecuteError`` on error.

        QMP argument names with dashes: ``q.cmd("blockdev-add", **{"node-name": "n0", ...})``.
        """
        return self._m.cmd(name, **args)

    def cmd_raw(self, name: str, args: Optional[dict] = None) -> dict:
        """Execute NAME and return the raw reply (``{"return": ...}`` or ``{"error": ...}``)."""
        return self._m.cmd_raw(name, args)

    def cmd_obj(self, obj: dict) -> dict:
        """Send a whole command object (``execute``, ``arguments``, ``id``...) as is."""
        return self._m.cmd_obj(obj)

    def error(self, name: str, **args: Any) -> dict:
        """Execute NAME, assert it FAILS, return its ``error`` dict (``class``, ``desc``)."""
        reply = self.cmd_raw(name, args)
        assert "error" in reply, f"{name} {args} unexpectedly succeeded: {reply}"
        return reply["error"]

    # --- events ---------------------------------------------------------------
    def pull_event(self, wait: bool | float = False) -> Optional[dict]:
        """Next queued event; WAIT=False: None if none, True: forever, number: seconds."""
        if wait is not True and wait is not False:
            wait = float(wait)  # qemu.qmp 0.0.6 treats an int timeout as "forever"
        try:
            return self._m.pull_event(wait)
        except TimeoutError as exc:  # asyncio.TimeoutError is TimeoutError on 3.11
            raise QMPTimeout(f"no QMP event within {wait}s") from exc

    def get_events(self) -> list[dict]:
        """All queued events (without waiting), clearing the queue."""
        return self._m.get_events(wait=False)

    def clear_events(self) -> None:
        self._m.clear_events()

    def event_wait(self, name: str, timeout: float = 10.0,
                   match: Optional[dict] = None,
                   predicate: Optional[Callable[[dict], bool]] = None) -> dict:
        """Wait for event NAME whose fields contain MATCH (recursively) and satisfy PREDICATE.

        Non-matching events are dropped.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout(f"no {name} event matching {match} within {timeout}s")
            ev = self.pull_event(wait=left)
            if (ev and ev.get("event") == name and _contains(ev, match or {})
                    and (predicate is None or predicate(ev))):
                return ev

    def close(self) -> None:
        """Disconnect.  A peer that already went away (e.g. after ``quit``) is not an error."""
        try:
            self._m.close()
        except (EOFError, OSError):
            pass

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _contains(obj: Any, pattern: Any) -> bool:
    """True if every key/value of PATTERN (a dict, recursively) is in OBJ."""
    if isinstance(pattern, dict):
        return isinstance(obj, dict) and all(k in obj and _contains(obj[k], v)
                                             for k, v in pattern.items())
    return obj == pattern


class RawQMP:
    """A byte-level QMP client on a plain socket.

    Each message the server sends is one JSON text terminated by CRLF; ``recv_line``
    returns it as raw bytes (terminator included), ``recv_msg`` parsed.  Events seen
    while ``execute`` waits for its reply are kept in ``self.events``.
    """

    def __init__(self, address: str | Path | tuple[str, int], timeout: float = 10.0):
        family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
        self.timeout = timeout
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address if isinstance(address, tuple) else str(address))
        self._buf = bytearray()
        self.events: list[dict] = []
        self.greeting: Optional[dict] = None

    # --- bytes ---------------------------------------------------------------
    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def send_json(self, obj: Any) -> None:
        self.send(json.dumps(obj).encode())

    def recv_line(self, timeout: Optional[float] = None) -> bytes:
        """One server message as raw bytes including its line terminator.

        Raises QMPTimeout on timeout, ConnectionError on EOF (pending bytes in the
        exception message).
        """
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout as exc:
                raise QMPTimeout(f"no complete QMP line; buffered {bytes(self._buf)!r}") from exc
            if not chunk:
                raise ConnectionError(f"QMP server closed; buffered {bytes(self._buf)!r}")
            self._buf += chunk
        end = self._buf.index(b"\n") + 1
        line = bytes(self._buf[:end])
        del self._buf[:end]
        return line

    def recv_msg(self, timeout: Optional[float] = None) -> dict:
        return json.loads(self.recv_line(timeout))

    def recv_all(self, timeout: float = 1.0) -> bytes:
        """Everything until EOF or until TIMEOUT passes with no data."""
        self.sock.settimeout(timeout)
        out = bytes(self._buf)
        self._buf.clear()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return out
            if not chunk:
                return out
            out += chunk

    def is_closed_by_peer(self, timeout: float = 1.0) -> bool:
        """True if the server closes the connection (EOF) within TIMEOUT."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    # --- protocol ------------------------------------------------------------
    def recv_greeting(self) -> dict:
        self.greeting = self.recv_msg()
        assert "QMP" in self.greeting, f"not a QMP greeting: {self.greeting}"
        return self.greeting

    def negotiate(self, **capabilities: Any) -> dict:
        """Read the greeting and run ``qmp_capabilities``; returns the greeting."""
        greeting = self.recv_greeting()
        reply = self.execute("qmp_capabilities", capabilities or None)
        assert reply == {"return": {}}, reply
        return greeting

    def execute(self, name: str, arguments: Optional[dict] = None, id: Any = None,
                timeout: Optional[float] = None) -> dict:
        """Send a command and return its reply (``return`` or ``error``), keeping events."""
        cmd: dict = {"execute": name}
        if arguments is not None:
            cmd["arguments"] = arguments
        if id is not None:
            cmd["id"] = id
        self.send_json(cmd)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = max(0.001, deadline - time.monotonic())
            msg = self.recv_msg(left)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawQMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_qmp_greeting(address: str | Path, timeout: float = 10.0,
                      alive: Callable[[], bool] = lambda: True) -> dict:
    """Poll until the monitor at ADDRESS sends its greeting; then disconnect.

    The greeting is sent from the daemon's main loop, so getting it proves that
    the whole command line has been processed.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with RawQMP(address, timeout=max(0.05, min(2.0, deadline - time.monotonic()))) as raw:
                return raw.recv_greeting()
        except (OSError, QMPTimeout, ValueError):
            if not alive() or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def del_export(q: "QMP", exp: str, timeout: float = 10.0) -> None:
    """block-export-del once the server has seen the test's clients go.

    NBD clients disconnect asynchronously: until the server notices, both engines
    answer "export 'x' still in use".  Waits for BLOCK_EXPORT_DELETED.
    """
    deadline = time.monotonic() + timeout
    while True:
        reply = q.cmd_raw("block-export-del", {"id": exp})
        if "return" in reply:
            break
        assert reply["error"]["desc"] == f"export '{exp}' still in use", reply
        assert time.monotonic() < deadline, reply
        time.sleep(0.01)
    q.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": exp}})
