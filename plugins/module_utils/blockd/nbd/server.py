# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The NBD server: listening sockets, the connection limit, the export table.

:class:`NBDServer` is what ``nbd-server-start`` (or ``--nbd-server``)
creates.  It listens on a QEMU ``SocketAddress`` (flat form; the legacy
``{"type": ..., "data": {...}}`` form of QMP's ``nbd-server-start`` is
accepted too), accepts clients in one thread per listening socket and serves
each client in its own daemon thread (:mod:`blockd.nbd.connection`).

Connection limit, as QEMU 7.2 (``blockdev-nbd.c``): with ``max_connections``
N > 0 the server simply stops accepting while N clients are connected;
further clients wait in the listen backlog (their ``connect`` succeeds, the
greeting comes when a slot frees).  N = 1 also withholds CAN_MULTI_CONN.

Exports live in :attr:`NBDServer.exports` (name -> :class:`NBDExport`);
the command layer adds and removes them.  :meth:`NBDServer.stop` closes the
listeners and drops every client but leaves the export table alone (QEMU's
``nbd-server-stop`` first closes every NBD export, which is the command
layer's job: it emits the events).

:func:`serve_socket` serves one already-connected socket in the calling
thread, for ``--stdin``-style use and fuzzers.

TLS: with ``tls`` (a server :class:`ssl.SSLContext`, from a
``tls-creds-x509`` object) every client must negotiate ``NBD_OPT_STARTTLS``
first (:mod:`.handshake`); ``authorize(dn)`` (``tls-authz``) may refuse a
verified client by its certificate's name.  :meth:`NBDServer.bind` listens
without accepting, so the command layer can check the credentials after
the address (QEMU's order) without ever serving a client in the clear.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import tempfile
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional

from ..errors import QMPError
from .connection import NBDConnection, configure_socket, describe_peer
from .export import NBDExport

LOG = logging.getLogger("blockd.nbd")

#: Default handshake limit (Debian QEMU 7.2's NBD_DEFAULT_HANDSHAKE_MAX_SECS).
HANDSHAKE_MAX_SECS = 10.0
#: Seconds :meth:`NBDServer.stop` waits for client threads to finish.
STOP_JOIN_SECS = 10.0
_UNIX_PATH_MAX = 108


def flatten_address(addr: Mapping[str, Any]) -> Dict[str, Any]:
    """Turn a SocketAddressLegacy (``{"type", "data": {...}}``) into the flat form.

    :param addr: either form.
    :return: the flat SocketAddress.
    """
    flat = dict(addr)
    data = flat.pop("data", None)
    if isinstance(data, Mapping):
        flat.update(data)
    return flat


def _strerror(exc: OSError) -> str:
    return exc.strerror or os.strerror(exc.errno or 0)


def _listen_unix(addr: Dict[str, Any], backlog: int) -> List[socket.socket]:
    path = addr.get("path", "")
    abstract = bool(addr.get("abstract", False))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not path and not abstract:
            fd, path = tempfile.mkstemp(prefix="qemu-socket-")
            os.close(fd)
        raw = path.encode("utf-8", "surrogateescape")
        if len(raw) > _UNIX_PATH_MAX or (abstract and len(raw) > _UNIX_PATH_MAX - 1):
            raise QMPError("UNIX socket path '%s' is too long" % path)
        if not abstract:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise QMPError("Failed to unlink socket %s: %s" % (path, _strerror(exc))) from None
        target: Any = b"\0" + raw if abstract else path
        try:
            sock.bind(target)
        except OSError as exc:
            raise QMPError("Failed to bind socket to %s: %s" % (path, _strerror(exc))) from None
        try:
            sock.listen(backlog)
        except OSError as exc:
            raise QMPError("Failed to listen on socket: %s" % _strerror(exc)) from None
    except BaseException:
        sock.close()
        raise
    return [sock]


def _inet_family(addr: Dict[str, Any]) -> int:
    """QEMU's inet_ai_family_from_address."""
    has4, has6 = "ipv4" in addr, "ipv6" in addr
    v4, v6 = bool(addr.get("ipv4")), bool(addr.get("ipv6"))
    if has4 and has6 and not v4 and not v6:
        raise QMPError("Cannot disable IPv4 and IPv6 at same time")
    if has4 and has6 and v4 and v6:
        return socket.AF_INET6 if not addr.get("host") else socket.AF_UNSPEC
    if (has6 and v6) or (has4 and not v4):
        return socket.AF_INET6
    if (has4 and v4) or (has6 and not v6):
        return socket.AF_INET
    return socket.AF_UNSPEC


def _listen_inet(addr: Dict[str, Any], backlog: int) -> List[socket.socket]:
    if addr.get("keep-alive"):
        raise QMPError("keep-alive option is not supported for passive sockets")
    family = _inet_family(addr)
    host = addr.get("host")
    if host is None:
        raise QMPError("host not specified")
    port = str(addr.get("port", ""))
    flags = socket.AI_PASSIVE
    if addr.get("numeric"):
        flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    try:
        infos = socket.getaddrinfo(host or None, port or None, family, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as exc:
        raise QMPError("address resolution failed for %s:%s: %s" % (host, port, exc.strerror)) from None
    v6only = 0 if (("ipv4" not in addr and "ipv6" not in addr)
                   or (addr.get("ipv4") and addr.get("ipv6"))) else 1
    port_to = addr.get("to")
    socks: List[socket.socket] = []
    first_error: Optional[str] = None
    seen = set()
    for fam, stype, proto_, _canon, sockaddr in infos:
        if (fam, sockaddr) in seen:
            continue
        seen.add((fam, sockaddr))
        base = sockaddr[1]
        last = int(port_to) if port_to is not None else base
        error: Optional[str] = None
        for p in range(base, max(base, last) + 1):
            try:
                sock = socket.socket(fam, stype, proto_)
            except OSError as exc:
                error = "Failed to create a socket: %s" % _strerror(exc)
                break
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                configure_socket(sock)
                target = (sockaddr[0], p) + tuple(sockaddr[2:])
                try:
                    if fam == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
                    try:
                        sock.bind(target)
                    except OSError as exc:
                        if fam == socket.AF_INET6 and exc.errno == 98 and not v6only:
                            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                            sock.bind(target)
                        else:
                            raise
                except OSError as exc:
                    if exc.errno == 98:  # EADDRINUSE: next port
                        error = "Failed to find an available port: %s" % _strerror(exc)
                        sock.close()
                        continue
                    error = "Failed to bind socket: %s" % _strerror(exc)
                    sock.close()
                    break
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                error = "Failed to listen on socket: %s" % _strerror(exc)
                break
            socks.append(sock)
            error = None
            break
        if error and first_error is None:
            first_error = error
    if not socks:
        raise QMPError(first_error or "Failed to find an available port")
    return socks


def _listen_fd(addr: Dict[str, Any], backlog: int) -> List[socket.socket]:
    fdstr = str(addr.get("str", ""))
    try:
        fd = int(fdstr, 10)
    except ValueError:
        raise QMPError("Unable to parse FD number %s" % fdstr) from None
    try:
        is_sock = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        is_sock = False
    if not is_sock:
        raise QMPError("File descriptor '%s' is not a socket" % fdstr)
    sock = socket.socket(fileno=fd)
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.detach()
        raise QMPError("Failed to listen on fd socket: %s" % _strerror(exc)) from None
    return [sock]


class NBDServer:
    """A running (or runnable) NBD server.

    :param addr: a QEMU SocketAddress: ``{"type": "unix", "path": P}``,
        ``{"type": "inet", "host": H, "port": "10809"}`` (with optional
        ``ipv4``/``ipv6``/``numeric``/``to``), or ``{"type": "fd", "str": "N"}``
        for an inherited socket.
    :param max_connections: 0 for unlimited (QEMU's QMP default is 100).
    :param handshake_timeout: seconds a client has to finish negotiating (0: no limit).
    :param tls: a server context: TLS is then required of every client.
    :param authorize: given a verified client certificate's distinguished
        name, returns None to let the client in or the reason to refuse it.
    """

    def __init__(self, addr: Mapping[str, Any], max_connections: int = 100,
                 handshake_timeout: float = HANDSHAKE_MAX_SECS,
                 tls: Optional[ssl.SSLContext] = None,
                 authorize: Optional[Callable[[str], Optional[str]]] = None) -> None:
        self.addr = flatten_address(addr)
        self.max_connections = int(max_connections)
        self.handshake_timeout = handshake_timeout
        self.tls = tls
        self.authorize = authorize
        #: name -> export, in the order they were added (NBD_OPT_LIST order).
        self.exports: Dict[str, NBDExport] = {}
        self.listeners: List[socket.socket] = []
        self._accept_threads: List[threading.Thread] = []
        self._conns: List[NBDConnection] = []
        self._reserved = 0
        self._cond = threading.Condition()
        self._running = False
        self._unix_path: Optional[str] = None

    # -- life cycle ---------------------------------------------------------------

    def start(self, backlog: int = socket.SOMAXCONN) -> None:
        """Bind, listen (unless :meth:`bind` did) and start accepting.

        :param backlog: the listen backlog (QEMU uses SOMAXCONN).
        :raises QMPError: QEMU's texts, e.g. ``Failed to bind socket to
            /x/s: No such file or directory`` or ``Failed to find an
            available port: Address already in use``.
        """
        if not self.listeners:
            self.bind(backlog)
        self._running = True
        for sock in self.listeners:
            thread = threading.Thread(target=self._accept_loop, args=(sock,),
                                      name="nbd-accept", daemon=True)
            self._accept_threads.append(thread)
            thread.start()

    def bind(self, backlog: int = socket.SOMAXCONN) -> None:
        """Bind and listen without accepting yet (:meth:`stop` undoes it).

        :param backlog: the listen backlog.
        :raises QMPError: as :meth:`start`.
        """
        kind = self.addr.get("type")
        if kind == "unix":
            socks = _listen_unix(self.addr, backlog)
            if not self.addr.get("abstract"):
                name = socks[0].getsockname()
                self._unix_path = name if isinstance(name, str) else None
        elif kind == "inet":
            socks = _listen_inet(self.addr, backlog)
        elif kind == "fd":
            socks = _listen_fd(self.addr, backlog)
        else:
            raise QMPError("NBD server address type '%s' is not supported" % kind)
        for sock in socks:
            configure_socket(sock)
        self.listeners = socks

    def stop(self, join_timeout: float = STOP_JOIN_SECS) -> None:
        """Close the listeners and drop every client.

        Waits up to ``join_timeout`` for the connection threads to end (a
        thread stuck behind a drain held by the caller cannot end until the
        drain is over; it is left to finish on its own).

        :param join_timeout: seconds to wait for client threads.
        """
        with self._cond:
            self._running = False
            conns = list(self._conns)
            self._cond.notify_all()
        for sock in self.listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._accept_threads:
            thread.join(join_timeout)
        for sock in self.listeners:
            sock.close()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
        self.listeners = []
        self._accept_threads = []
        for conn in conns:
            conn.close()
        self.wait_clients(join_timeout)

    def wait_clients(self, timeout: Optional[float] = None) -> bool:
        """Wait until no connection remains.

        :param timeout: seconds, or None for no limit.
        :return: True if none remains.
        """
        with self._cond:
            return self._cond.wait_for(lambda: not self._conns, timeout)

    def address(self) -> List[Any]:
        """The addresses actually listened on (``getsockname`` of each listener)."""
        return [s.getsockname() for s in self.listeners]

    # -- exports -----------------------------------------------------------------------

    def add_export(self, exp: NBDExport) -> None:
        """Publish an export.

        :raises QMPError: ``NBD server already has export named 'x'``.
        """
        with self._cond:
            if exp.name in self.exports:
                raise QMPError("NBD server already has export named '%s'" % exp.name)
            self.exports[exp.name] = exp

    def remove_export(self, name: str) -> Optional[NBDExport]:
        """Unpublish an export: new clients no longer see it.

        Connected clients stay; call :meth:`NBDExport.disconnect_clients` for
        a hard removal and :meth:`NBDExport.add_idle_callback` to learn when
        the last client is gone.

        :param name: the export name.
        :return: the export, or None if there was none of that name.
        """
        with self._cond:
            exp = self.exports.pop(name, None)
        if exp is not None:
            exp.close()
        return exp

    # -- connections ----------------------------------------------------------------------

    def connection_count(self) -> int:
        """Clients connected (negotiating or in transmission)."""
        with self._cond:
            return len(self._conns)

    def connections(self) -> List[NBDConnection]:
        """A snapshot of the connections."""
        with self._cond:
            return list(self._conns)

    def _slot_free(self) -> bool:
        return (not self._running or not self.max_connections
                or len(self._conns) + self._reserved < self.max_connections)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._slot_free)
                if not self._running:
                    return
                self._reserved += 1
            try:
                try:
                    sock, peer = listener.accept()
                except OSError as exc:
                    if not self._running:
                        return
                    if exc.errno in (24, 23, 105, 12):  # EMFILE ENFILE ENOBUFS ENOMEM
                        LOG.warning("NBD server: accept failed: %s", exc)
                        threading.Event().wait(0.1)
                        continue
                    if exc.errno == 22:  # EINVAL: the listener was shut down
                        return
                    LOG.debug("NBD server: accept failed: %s", exc)
                    continue
                conn = self._admit(sock, describe_peer(peer))
            finally:
                with self._cond:
                    self._reserved -= 1
            if conn is not None:
                conn.start()

    def _admit(self, sock: socket.socket, peer: str) -> Optional[NBDConnection]:
        try:
            configure_socket(sock)
            conn = NBDConnection(sock, self, peer)
        except OSError:
            sock.close()
            return None
        with self._cond:
            if not self._running:
                sock.close()
                return None
            self._conns.append(conn)
        return conn

    def connection_closed(self, conn: NBDConnection) -> None:
        """Called by a connection thread when it ends."""
        with self._cond:
            if conn in self._conns:
                self._conns.remove(conn)
            self._cond.notify_all()


class _Standalone:
    """The owner of a connection served by :func:`serve_socket`."""

    def __init__(self, exports: Dict[str, NBDExport], max_connections: int,
                 handshake_timeout: float, tls: Optional[ssl.SSLContext] = None) -> None:
        self.exports = exports
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.tls = tls
        self.authorize: Optional[Callable[[str], Optional[str]]] = None


def serve_socket(sock: socket.socket, exports: "Mapping[str, NBDExport] | NBDExport",
                 max_connections: int = 1, handshake_timeout: float = 0,
                 tls: Optional[ssl.SSLContext] = None) -> None:
    """Serve one connected socket in the calling thread until the client leaves.

    :param sock: a connected stream socket (closed on return).
    :param exports: the exports to offer (a mapping by name, or one export).
    :param max_connections: as for :class:`NBDServer`; 1 (the default)
        withholds CAN_MULTI_CONN.
    :param handshake_timeout: seconds to finish negotiating, 0 for no limit.
    :param tls: a server context: the client must start TLS.
    """
    if isinstance(exports, NBDExport):
        exports = {exports.name: exports}
    configure_socket(sock)
    owner = _Standalone(dict(exports), max_connections, handshake_timeout, tls)
    NBDConnection(sock, owner, "standalone").run()
