# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The QMP monitor: what a client connected to blockd's QMP socket talks to.

Behaviour copied from qemu-storage-daemon 7.2 (``monitor/qmp.c``,
``qapi/qmp-dispatch.c``), all of it visible on the wire:

* On connect the server sends the greeting ``{"QMP": {"version": ...,
  "capabilities": ["oob"]}}`` and is in *negotiation mode*: only
  ``qmp_capabilities`` works; any other command gets ``CommandNotFound``
  ``Expecting capabilities negotiation with 'qmp_capabilities'``.  Events are
  only sent once negotiation is done.
* Every message is one JSON text terminated by ``\\r\\n`` (with ``pretty``
  every line ends in ``\\r\\n``), pure ASCII, keys in QEMU's hash order (see
  :mod:`.qjson`).
* Requests are checked like ``qmp_dispatch()``: ``QMP input must be a JSON
  object``, ``QMP input member 'x' is unexpected``, ``... must be a string``,
  ``QMP input member 'arguments' must be an object``, ``QMP input lacks member
  'execute'``, ``QMP input member 'execute' clashes with 'exec-oob'``; ``id``
  (any JSON value) is echoed.  ``exec-oob`` is only understood once ``oob``
  was enabled and no command supports it (``The command X does not support
  OOB``), as in qsd 7.2.
* JSON syntax errors are answered without ``id`` and the stream
  resynchronises (:mod:`.jsonstream`).
* A listener serves one client at a time, like a QEMU socket chardev: a
  second client can connect but gets its greeting only when the first one
  has gone.
* After a successful ``quit`` no further request is handled; the reply is
  flushed, input already sent is discarded and the socket is closed (the
  client sees end of file).
* While a request is handled, the monitor reads no further input (QEMU
  suspends the monitor), so a client's pipeline stays in the socket.

Threading: a :class:`MonitorListener` has one thread that accepts a client and
then runs that client's :class:`Monitor` reader loop (parse, dispatch, reply);
each monitor also has a writer thread that drains its outgoing queue, so
:meth:`Monitor.send_event` never blocks.  A client that does not read and lets
more than :data:`OUTPUT_LIMIT` bytes pile up is disconnected.

The *daemon* object the monitor serves must provide:

* ``execute(name: str, args: dict) -> Any`` -- run a command (validating its
  arguments, e.g. with :meth:`.schema.Schema.validate`); return the ``return``
  value (``None`` means ``{}``) or raise :class:`~..errors.QMPError`
  (``CommandNotFound`` for unknown commands);
* ``version_info() -> dict`` -- the ``query-version`` value, used in the greeting;
* ``add_monitor(monitor)`` / ``remove_monitor(monitor)`` -- (un)register the
  monitor as an event sink; the daemon broadcasts with
  :meth:`Monitor.send_event`;
* optionally ``run_deferred()``, called after every ``execute`` and before
  the reply is queued (qsd emits e.g. ``BLOCK_EXPORT_DELETED`` of
  ``block-export-del`` before its reply);
* optionally ``has_command(name) -> bool`` or ``command_names() -> list``,
  used only to word the reply to ``exec-oob`` (unknown command vs. "does not
  support OOB"); without them the command list of :class:`.schema.Schema` is
  used.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import threading
import time
from typing import Any, Deque, Dict, List, Optional

from ..errors import CommandNotFound, QMPError
from .jsonstream import JSONParseError, JSONStreamParser
from .qjson import qdict_order, to_json
from .schema import Schema

__all__ = ["Monitor", "MonitorListener", "make_event", "OUTPUT_LIMIT", "OFFERED_CAPABILITIES"]

LOG = logging.getLogger(__name__)

#: Queued output (bytes) beyond which a client that does not read is dropped.
OUTPUT_LIMIT = 64 << 20
#: Capabilities offered in the greeting (qsd 7.2 offers ``oob``).
OFFERED_CAPABILITIES = ("oob",)
#: How long a closing monitor keeps trying to flush its output (seconds).
FLUSH_TIMEOUT = 5.0
_RECV_SIZE = 65536


def make_event(name: str, data: Optional[Dict[str, Any]] = None,
               timestamp: Optional[float] = None) -> Dict[str, Any]:
    """Build a QMP event message.

    :param name: the event name, e.g. ``"BLOCK_EXPORT_DELETED"``.
    :param data: the event data; omitted from the message when None.
    :param timestamp: seconds since the epoch; defaults to now.
    :return: ``{"timestamp": {"seconds", "microseconds"}, "event", "data"?}``
        (serialised in QEMU's key order).
    """
    if timestamp is None:
        timestamp = time.time()
    usec = int(round(timestamp * 1000000))
    msg: Dict[str, Any] = {"event": name,
                           "timestamp": {"seconds": usec // 1000000,
                                         "microseconds": usec % 1000000}}
    if data is not None:
        msg["data"] = data
    return msg


def _error(exc: QMPError) -> Dict[str, Any]:
    return {"error": exc.to_qmp()}


class Monitor:
    """One QMP client connection.

    :param daemon: the daemon (see the module docstring for its interface).
    :param conn: a connected stream socket; the monitor owns and closes it.
    :param pretty: pretty-print output like ``--monitor pretty=on``.
    :param name: a label for logging.
    """

    def __init__(self, daemon: Any, conn: socket.socket, pretty: bool = False,
                 name: str = "") -> None:
        self.daemon = daemon
        self.pretty = pretty
        self.name = name or "monitor"
        self._conn = conn
        self._log = LOG.getChild(self.name) if name else LOG
        self._parser = JSONStreamParser()
        self._cv = threading.Condition()
        self._queue: Deque[bytes] = collections.deque()
        self._queued = 0
        self._negotiated = False
        self._oob = False
        self._closing = False      # no more input is processed
        self._draining = False     # no more output will be queued: flush, then stop
        self._aborted = False      # drop output, close at once
        self._writer_done = False
        self._quit = False
        self._started = False
        self._reader: Optional[threading.Thread] = None
        self._writer: Optional[threading.Thread] = None
        self._finished = threading.Event()
        self._shutdown_lock = threading.Lock()

    # --- public API --------------------------------------------------------------------
    @property
    def negotiated(self) -> bool:
        """Whether ``qmp_capabilities`` succeeded (events are delivered)."""
        return self._negotiated

    @property
    def oob_enabled(self) -> bool:
        """Whether the client enabled the ``oob`` capability."""
        return self._oob

    @property
    def closed(self) -> bool:
        """Whether the monitor has fully shut down."""
        return self._finished.is_set()

    def start(self) -> None:
        """Serve the connection in a new (daemon) thread; see :meth:`serve`."""
        self._started = True
        thread = threading.Thread(target=self.serve, name="qmp-" + self.name, daemon=True)
        thread.start()

    def serve(self) -> None:
        """Serve the connection in the calling thread until it ends.

        Sends the greeting, registers with the daemon, then reads and handles
        requests until the client disconnects, :meth:`close` is called, or a
        ``quit`` succeeded; finally unregisters, flushes and closes the socket.
        Never raises for client-side problems.
        """
        self._started = True
        self._reader = threading.current_thread()
        registered = False
        try:
            if self._closing:
                return
            self._writer = threading.Thread(target=self._write_loop,
                                            name="qmp-%s-out" % self.name, daemon=True)
            self._writer.start()
            self._enqueue(self._greeting())
            self.daemon.add_monitor(self)
            registered = True
            self._read_loop()
        except Exception:  # pylint: disable=broad-except
            self._log.exception("QMP monitor failed")
            self._aborted = True
        finally:
            if registered:
                try:
                    self.daemon.remove_monitor(self)
                except Exception:  # pylint: disable=broad-except
                    self._log.exception("remove_monitor failed")
            self._finish()

    def send_event(self, msg: Dict[str, Any]) -> None:
        """Queue an event for this client; never blocks.

        Dropped unless negotiation is complete (as in QEMU) and the
        connection is still up.  Events sent while a ``quit`` is being
        executed (or after :meth:`close`) still reach the client, before the
        connection is closed.  Safe to call from any thread, with any lock held.

        :param msg: the event message, usually from :func:`make_event`.
        """
        data = self._encode(msg)
        with self._cv:
            if self._negotiated and not self._draining:
                self._enqueue_locked(data)

    def close(self) -> None:
        """Start closing: stop reading input, flush queued output, close the socket.

        Returns at once (it may be called with the daemon lock held, or from
        within a command); use :meth:`join` to wait for the threads.
        """
        with self._cv:
            self._closing = True
        self._shutdown(socket.SHUT_RD)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the monitor has fully shut down.

        Do not call this while holding a lock that the daemon's
        ``remove_monitor``/``execute`` need.

        :param timeout: seconds, or None to wait for ever.
        :return: whether the monitor has shut down (True at once if it was
            never started).
        """
        if not self._started:
            return True
        return self._finished.wait(timeout)

    # --- output --------------------------------------------------------------------------
    def _greeting(self) -> Dict[str, Any]:
        return {"QMP": {"version": self.daemon.version_info(),
                        "capabilities": list(OFFERED_CAPABILITIES)}}

    def _encode(self, msg: Dict[str, Any]) -> bytes:
        text = to_json(msg, self.pretty) + "\n"
        if self.pretty:
            return text.replace("\n", "\r\n").encode("ascii")
        return (text[:-1] + "\r\n").encode("ascii")

    def _enqueue(self, msg: Dict[str, Any]) -> None:
        data = self._encode(msg)
        with self._cv:
            self._enqueue_locked(data)

    def _enqueue_locked(self, data: bytes) -> None:
        if self._aborted or self._writer_done:
            return
        if self._queued and self._queued + len(data) > OUTPUT_LIMIT:
            self._log.warning("QMP client does not read its output; disconnecting")
            self._abort_locked()
            return
        self._queue.append(data)
        self._queued += len(data)
        self._cv.notify_all()

    def _abort_locked(self) -> None:
        self._aborted = True
        self._closing = True
        self._draining = True
        self._queue.clear()
        self._queued = 0
        self._cv.notify_all()
        self._shutdown(socket.SHUT_RDWR)

    def _shutdown(self, how: int) -> None:
        with self._shutdown_lock:
            try:
                self._conn.shutdown(how)
            except OSError:
                pass

    def _write_loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._draining and not self._aborted:
                        self._cv.wait()
                    if not self._queue or self._aborted:
                        return
                    chunks: List[bytes] = []
                    size = 0
                    while self._queue and size < (1 << 20):
                        chunk = self._queue.popleft()
                        chunks.append(chunk)
                        size += len(chunk)
                    self._queued -= size
                try:
                    self._conn.sendall(b"".join(chunks))
                except OSError:
                    with self._cv:
                        self._abort_locked()
                    return
        finally:
            with self._cv:
                self._writer_done = True
                self._queue.clear()
                self._queued = 0

    def _finish(self) -> None:
        with self._cv:
            self._closing = True
            self._draining = True
            self._cv.notify_all()
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(FLUSH_TIMEOUT)
            if writer.is_alive():
                with self._cv:
                    self._abort_locked()
                writer.join()
        if self._quit and not self._aborted:
            self._discard_input()
        try:
            self._conn.close()
        except OSError:
            pass
        self._parser.reset()
        self._finished.set()

    def _discard_input(self) -> None:
        """After ``quit``: swallow input that already arrived (not processed).

        qsd resumes reading its socket after the ``quit`` reply and usually
        picks up what the client sent along (e.g. a trailing newline), so the
        client sees a clean end of file rather than a connection reset.
        """
        try:
            self._conn.setblocking(False)
            for _i in range(64):
                if not self._conn.recv(_RECV_SIZE):
                    break
        except (OSError, ValueError):
            pass

    # --- input ---------------------------------------------------------------------------
    def _read_loop(self) -> None:
        # Like QEMU, read no further than the end of the next request: peek,
        # then consume only the bytes the parser used.  Input sent after a
        # ``quit`` therefore stays unread (the client sees a reset, as with
        # qsd), and a busy monitor does not slurp a client's pipeline.
        conn = self._conn
        while not self._closing:
            try:
                data = conn.recv(_RECV_SIZE, socket.MSG_PEEK)
            except (OSError, ValueError):
                return
            if not data:
                return
            items, used = self._parser.feed_some(data)
            try:
                while used > 0:
                    got = conn.recv(used)
                    if not got:
                        return
                    used -= len(got)
            except (OSError, ValueError):
                return
            for item in items:
                if self._closing:
                    return
                if isinstance(item, JSONParseError):
                    self._enqueue(_error(QMPError(str(item))))
                else:
                    self._handle(item)

    def _has_command(self, name: str) -> bool:
        if name == "qmp_capabilities":
            return True
        has = getattr(self.daemon, "has_command", None)
        if has is not None:
            return bool(has(name))
        names = getattr(self.daemon, "command_names", None)
        if names is not None:
            return name in names()
        return name in Schema.default().commands()

    def _check_request(self, req: Dict[str, Any]) -> str:
        """``qmp_dispatch_check_obj()``: return the command name or raise."""
        exec_key: Optional[str] = None
        for key in qdict_order(req):
            value = req[key]
            if key == "execute" or (key == "exec-oob" and self._oob):
                if not isinstance(value, str):
                    raise QMPError("QMP input member '%s' must be a string" % key)
                if exec_key is not None:
                    raise QMPError("QMP input member '%s' clashes with '%s'" % (key, exec_key))
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QMPError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QMPError("QMP input member '%s' is unexpected" % key)
        if exec_key is None:
            raise QMPError("QMP input lacks member 'execute'")
        return exec_key

    def _dispatch(self, req: Any) -> Any:
        """``qmp_dispatch()``: run one request, return its ``return`` value or raise."""
        if not isinstance(req, dict):
            raise QMPError("QMP input must be a JSON object")
        exec_key = self._check_request(req)
        command = req[exec_key]
        if not self._negotiated and command != "qmp_capabilities":
            raise CommandNotFound("The command %s has not been found" % command)
        if exec_key == "exec-oob":
            if not self._has_command(command):
                raise CommandNotFound("The command %s has not been found" % command)
            raise QMPError("The command %s does not support OOB" % command)
        args = req.get("arguments", {})
        if command == "qmp_capabilities":
            return self._qmp_capabilities(args)
        try:
            result = self.daemon.execute(command, args)
        finally:
            self._run_deferred()
        return {} if result is None else result

    def _run_deferred(self) -> None:
        """Run the daemon's deferred work (``run_deferred()``, if it has one).

        qsd runs a command's bottom halves before it sends the reply: e.g.
        ``BLOCK_EXPORT_DELETED`` from ``block-export-del`` or
        ``nbd-server-stop`` arrives *before* ``{"return": {}}`` (observed), so
        deferred work runs here, before the reply is queued.
        """
        run = getattr(self.daemon, "run_deferred", None)
        if run is None:
            return
        try:
            run()
        except Exception:  # pylint: disable=broad-except
            self._log.exception("deferred work failed")

    def _qmp_capabilities(self, args: Dict[str, Any]) -> Dict[str, Any]:
        Schema.default().validate("qmp_capabilities", args)
        if self._negotiated:
            raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
        enable = args.get("enable", [])
        missing = [cap for cap in enable if cap not in OFFERED_CAPABILITIES]
        if missing:
            raise QMPError("Capability %s not available" % ", ".join(missing))
        self._oob = "oob" in enable
        return {}

    def _handle(self, req: Any) -> None:
        rsp: Dict[str, Any]
        command = None
        try:
            result = self._dispatch(req)
            rsp = {"return": result}
            command = req.get("execute") or req.get("exec-oob")
        except QMPError as exc:
            rsp = _error(exc)
            if not self._negotiated and exc.error_class == "CommandNotFound":
                rsp["error"]["desc"] = "Expecting capabilities negotiation with 'qmp_capabilities'"
        except Exception as exc:  # pylint: disable=broad-except
            self._log.exception("QMP command failed")
            rsp = _error(QMPError("internal error: %s" % (exc,)))
        if isinstance(req, dict) and "id" in req:
            rsp["id"] = req["id"]
        try:
            data = self._encode(rsp)
        except (TypeError, ValueError) as exc:
            self._log.error("cannot serialise QMP reply: %s", exc)
            fallback: Dict[str, Any] = _error(QMPError("internal error: bad reply"))
            if isinstance(req, dict) and "id" in req:
                fallback["id"] = req["id"]
            data = self._encode(fallback)
        with self._cv:
            if command == "qmp_capabilities" and not self._negotiated:
                self._negotiated = True  # atomically with queuing the reply
            if command == "quit":
                self._closing = True  # read no further input; flush and close
                self._quit = True
            self._enqueue_locked(data)


class MonitorListener:
    """Accept QMP clients on a listening socket, one at a time.

    :param daemon: the daemon (see the module docstring).
    :param sock: a bound, listening stream socket (UNIX or TCP); the listener
        owns and closes it.
    :param pretty: pretty-print output.
    :param name: a label for logging and thread names.
    """

    def __init__(self, daemon: Any, sock: socket.socket, pretty: bool = False,
                 name: str = "") -> None:
        self.daemon = daemon
        self.sock = sock
        self.pretty = pretty
        self.name = name or "qmp"
        self._lock = threading.Lock()
        self._closed = False
        self._monitor: Optional[Monitor] = None
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._count = 0

    @property
    def monitor(self) -> Optional[Monitor]:
        """The monitor of the client being served, if any."""
        return self._monitor

    def start(self) -> None:
        """Start the accept thread (a daemon thread)."""
        self._thread = threading.Thread(target=self._run, name="qmp-accept-" + self.name,
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and close the current client (its output is flushed).

        Returns at once; :meth:`join` waits for the threads.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            monitor = self._monitor
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if monitor is not None:
            monitor.close()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the accept thread (and the current monitor) to end.

        :return: whether everything has shut down.
        """
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                try:
                    ready, _w, _x = select.select([self.sock, self._wake_r], [], [])
                except (OSError, ValueError):
                    return
                if self._wake_r in ready:
                    return
                try:
                    conn, _addr = self.sock.accept()
                except (BlockingIOError, InterruptedError, socket.timeout):
                    continue
                except OSError:
                    return
                conn.setblocking(True)
                self._count += 1
                monitor = Monitor(self.daemon, conn, self.pretty,
                                  name="%s-%d" % (self.name, self._count))
                with self._lock:
                    if self._closed:
                        conn.close()
                        return
                    self._monitor = monitor
                monitor.serve()
                with self._lock:
                    self._monitor = None
        except Exception:  # pylint: disable=broad-except
            LOG.exception("QMP listener failed")
        finally:
            for s in (self.sock, self._wake_r, self._wake_w):
                try:
                    s.close()
                except OSError:
                    pass
