# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small synchronous QMP client for the collection's modules (standard library only).

It speaks to blockd and to a real qemu-storage-daemon alike: connect to the
monitor's UNIX socket, read the greeting, negotiate ``qmp_capabilities``, then
:meth:`QMPClient.execute` commands one at a time.  Events that arrive while
waiting for a reply are kept in :attr:`QMPClient.events` (modules that wait for
a job use :meth:`QMPClient.wait_event`).

Errors:

* :class:`QMPConnectError` -- the socket is missing, refuses, or does not greet
  like a QMP monitor (the message says which and names the path);
* :class:`QMPCommandError` -- the engine answered ``{"error": ...}``; ``klass``
  and ``desc`` are QEMU's error class and text;
* :class:`QMPTimeout` -- no reply within the timeout.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import errno
import json
import os
import socket
import time


class QMPError(Exception):
    """Base class of every error this client raises."""


class QMPConnectError(QMPError):
    """The monitor could not be reached or did not speak QMP."""


class QMPTimeout(QMPError):
    """No reply (or event) within the timeout."""


class QMPCommandError(QMPError):
    """The engine refused a command: ``klass`` is QEMU's error class, ``desc`` its text."""

    def __init__(self, command, klass, desc):
        super(QMPCommandError, self).__init__("%s: %s" % (command, desc))
        self.command = command
        self.klass = klass
        self.desc = desc


class QMPClient:
    """One QMP session over a UNIX socket.

    :param path: the monitor socket (``--chardev socket,path=...`` of the engine).
    :param timeout: seconds to wait for the connection, a reply or an event.
    """

    def __init__(self, path, timeout=30.0):
        self.path = path
        self.timeout = float(timeout)
        self.events = []
        self.greeting = None
        self._sock = None
        self._buf = b""
        self._id = 0

    # -- connection -------------------------------------------------------------------------
    def connect(self):
        """Connect, read the greeting and leave capabilities negotiation mode."""
        if not os.path.exists(self.path):
            raise QMPConnectError("QMP socket %s does not exist: is the engine running?" % self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except socket.timeout:
            sock.close()
            raise QMPConnectError("connecting to QMP socket %s timed out" % self.path)
        except (OSError, socket.error) as exc:
            sock.close()
            hint = ""
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                hint = ": is the engine running?"
            elif exc.errno == errno.EACCES:
                hint = ": permission denied (the socket is 0600; run as its owner or become root)"
            elif exc.errno == errno.ENOTSOCK:
                hint = ": not a socket"
            raise QMPConnectError("cannot connect to QMP socket %s: %s%s"
                                  % (self.path, os.strerror(exc.errno or 0) or exc, hint))
        self._sock = sock
        try:
            greeting = self._read_message()
        except QMPError:
            self.close()
            raise QMPConnectError("%s did not send a QMP greeting" % self.path)
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            self.close()
            raise QMPConnectError("%s is not a QMP monitor (greeting %r)" % (self.path, greeting))
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities")
        return self

    def close(self):
        """Close the session (idempotent)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    @property
    def version(self):
        """The engine's version dict from the greeting (``qemu``: major/minor/micro, ``package``)."""
        return (self.greeting or {}).get("version", {})

    # -- wire ---------------------------------------------------------------------------------
    def _read_message(self, deadline=None):
        """Read one JSON message (QMP sends one per line)."""
        while b"\n" not in self._buf:
            if deadline is not None:
                left = deadline - time.time()
                if left <= 0:
                    raise QMPTimeout("no answer from %s within %.0f s" % (self.path, self.timeout))
                self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise QMPTimeout("no answer from %s within %.0f s" % (self.path, self.timeout))
            except (OSError, socket.error) as exc:
                raise QMPConnectError("QMP connection to %s failed: %s" % (self.path, exc))
            if not chunk:
                raise QMPConnectError("the engine closed the QMP connection %s" % self.path)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line.decode("utf-8"))
        except ValueError:
            raise QMPConnectError("%s sent something that is not JSON: %r" % (self.path, line[:200]))

    def execute(self, command, arguments=None):
        """Run COMMAND with ARGUMENTS (dict); its ``return`` value, or :class:`QMPCommandError`."""
        if self._sock is None:
            raise QMPConnectError("not connected to %s" % self.path)
        self._id += 1
        msg = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode("utf-8") + b"\n")
        except (OSError, socket.error) as exc:
            raise QMPConnectError("sending %s to %s failed: %s" % (command, self.path, exc))
        deadline = time.time() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._id:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QMPCommandError(command, err.get("class", "GenericError"), err.get("desc", ""))
            return reply.get("return")

    def wait_event(self, match, timeout=None):
        """Return (and remove) the first event for which ``match(event)`` is true; wait for it."""
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        while True:
            for i, event in enumerate(self.events):
                if match(event):
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))
