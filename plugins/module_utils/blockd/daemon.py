# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The daemon: one graph, its exports, its monitors, and the command table.

Concurrency (see ``docs/concurrency.md``): every QMP command runs under
:attr:`Daemon.lock`, the big lock, so commands never interleave; the data path
(NBD connection threads) never takes it.  Work that QEMU does in a bottom half
after a command returns (``BLOCK_EXPORT_DELETED``, shutting down after
``quit``) is queued with :meth:`Daemon.defer` and runs once the reply has been
queued for the client.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import QEMU_VERSION, __version__, drivers
from .commands import load_all
from .errors import CommandNotFound
from .graph.graph import Graph
from .jobs.job import cancel_all_sync

LOG = logging.getLogger(__name__)


class Daemon:
    """A running blockd instance."""

    def __init__(self) -> None:
        from .qmp.schema import Schema
        #: The big lock: held while a command runs.
        self.lock = threading.RLock()
        self.graph = Graph(drivers.lookup)
        self.schema = Schema.default()  # immutable, shared: parsed once per process
        self.handlers = load_all()
        self.nbd_server: Any = None
        self.exports: Dict[str, Any] = {}
        self.objects: Dict[str, Dict[str, Any]] = {}
        #: Every job (:class:`~blockd.jobs.Job`), newest first as QEMU lists them.
        self.jobs: List[Any] = []
        self.monitors: List[Any] = []
        self.listeners: List[Any] = []
        self._mon_lock = threading.Lock()
        self._deferred = threading.local()
        self.shutdown_requested = threading.Event()

    # -- identity -----------------------------------------------------------

    def version_info(self) -> Dict[str, Any]:
        """QEMU's VersionInfo, member order as qsd sends it."""
        return {"qemu": {"micro": QEMU_VERSION["micro"], "minor": QEMU_VERSION["minor"],
                         "major": QEMU_VERSION["major"]},
                "package": "blockd %s" % __version__}

    def command_names(self) -> List[str]:
        """Commands offered: in the schema and with a handler."""
        return [name for name in self.schema.commands() if name in self.handlers]

    # -- commands -----------------------------------------------------------

    def execute(self, name: str, args: Optional[Dict[str, Any]] = None) -> Any:
        """Validate and run one command; raise QMPError on failure.

        Deferred work the command queues is kept for :meth:`run_deferred`,
        which the caller runs once the reply is queued.
        """
        handler = self.handlers.get(name)
        if handler is None or name not in self.schema.commands():
            raise CommandNotFound("The command %s has not been found" % name)
        args = {} if args is None else args
        self.schema.validate(name, args)
        with self.lock:
            return handler(self, args)

    def defer(self, func: Callable[[], None]) -> None:
        """Run ``func`` when the current command's handler has returned."""
        pending = getattr(self._deferred, "pending", None)
        if pending is None:
            pending = self._deferred.pending = []
        pending.append(func)

    def run_deferred(self) -> None:
        """Run what the last command on this thread deferred."""
        pending = getattr(self._deferred, "pending", None)
        while pending:
            func = pending.pop(0)
            try:
                with self.lock:
                    func()
            except Exception:  # pragma: no cover - logged, never fatal
                LOG.exception("deferred work failed")

    # -- events and monitors ------------------------------------------------

    def add_monitor(self, monitor: Any) -> None:
        """A monitor connection starts receiving events."""
        with self._mon_lock:
            self.monitors.append(monitor)

    def remove_monitor(self, monitor: Any) -> None:
        """A monitor connection went away."""
        with self._mon_lock:
            if monitor in self.monitors:
                self.monitors.remove(monitor)

    def emit_event(self, name: str, data: Optional[Dict[str, Any]] = None) -> None:
        """Send an event to every monitor (each only queues it)."""
        from .qmp.server import make_event
        msg = make_event(name, data)
        with self._mon_lock:
            monitors = list(self.monitors)
        for monitor in monitors:
            monitor.send_event(msg)

    # -- life cycle ---------------------------------------------------------

    def request_shutdown(self) -> None:
        """Ask the main thread to stop the daemon."""
        self.shutdown_requested.set()

    def wait(self, poll: float = 0.5) -> None:
        """Block until shutdown is requested (signals interrupt the wait)."""
        while not self.shutdown_requested.wait(poll):
            pass

    def close(self) -> None:
        """Stop serving and close every node, flushing data."""
        for listener in self.listeners:
            try:
                listener.close()
                listener.join(2)
            except Exception:  # pragma: no cover
                LOG.exception("closing a monitor listener")
        with self._mon_lock:
            monitors = list(self.monitors)
        for monitor in monitors:
            try:
                monitor.close()
            except Exception:  # pragma: no cover
                LOG.exception("closing a monitor")
        # let each connection finish its reply in flight (quit's) and flush
        deadline = time.monotonic() + 2
        for monitor in monitors:
            monitor.join(max(0.0, deadline - time.monotonic()))
        # qsd's job_cancel_sync_all(): no job outlives the daemon
        cancel_all_sync(self)
        with self.lock:
            if self.nbd_server is not None:
                self.nbd_server.stop()
                self.nbd_server = None
            for export in list(self.exports.values()):
                export.backend.detach()
            self.exports.clear()
            for node in list(self.graph.nodes.values()):
                try:
                    node.flush()
                except OSError:
                    LOG.warning("flush of %s failed at shutdown", node.name)
            self.graph.close_all()
