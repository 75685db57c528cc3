# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Transports and URIs of the NBD client (:mod:`.client`).

* :func:`parse_uri` reads ``nbd://``, ``nbds://``, ``nbd+unix://`` and
  ``nbds+unix://`` URIs the way libnbd's ``nbd_connect_uri`` does (the
  NBD URI specification, ``doc/uri.md`` of the NetworkBlockDevice project);
* :func:`open_socket` connects a unix or TCP stream socket;
* :func:`tls_context` builds the :class:`ssl.SSLContext` for x509 TLS
  (libnbd's ``tls-certificates`` directory layout is understood too);
* :class:`TLSTransport` runs TLS over an already connected socket after
  ``NBD_OPT_STARTTLS``, with :class:`ssl.SSLObject` and memory BIOs so one
  reader thread and several writer threads can share the stream safely
  (OpenSSL objects must not be entered by two threads at once, which a
  plain :class:`ssl.SSLSocket` would do).

Standard library only.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union
from urllib.parse import parse_qsl, unquote, urlsplit

#: The IANA port of NBD.
DEFAULT_PORT = 10809

_SCHEMES = {
    "nbd": (False, "tcp"),
    "nbds": (True, "tcp"),
    "nbd+unix": (False, "unix"),
    "nbds+unix": (True, "unix"),
    "nbd+vsock": (False, "vsock"),
    "nbds+vsock": (True, "vsock"),
}

_TRUE = ("1", "true", "on", "yes", "require")
_FALSE = ("0", "false", "off", "no")


class URIError(ValueError):
    """An NBD URI that cannot be used."""


@dataclass
class NBDURI:
    """A parsed NBD URI.

    :ivar tls: ``nbds*`` schemes: TLS is required.
    :ivar transport: ``"tcp"`` or ``"unix"``.
    :ivar host: TCP host name or address (brackets of IPv6 removed).
    :ivar port: TCP port.
    :ivar socket: unix socket path.
    :ivar export: the export name (percent-decoded).
    :ivar tls_certificates: the ``tls-certificates`` directory (libnbd/gnutls
        layout: ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``).
    :ivar tls_verify_peer: ``tls-verify-peer`` (default true).
    :ivar tls_hostname: ``tls-hostname``: the name checked in the server's
        certificate (default: ``host``).
    """

    tls: bool = False
    transport: str = "tcp"
    host: str = ""
    port: int = DEFAULT_PORT
    socket: str = ""
    export: str = ""
    tls_certificates: Optional[str] = None
    tls_verify_peer: bool = True
    tls_hostname: Optional[str] = None

    @property
    def address(self) -> Union[str, Tuple[str, int]]:
        """The unix path, or the ``(host, port)`` tuple."""
        return self.socket if self.transport == "unix" else (self.host, self.port)


def _bool(name: str, value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise URIError(f"NBD URI: {name}={value!r} is not a boolean")


def parse_uri(uri: str) -> NBDURI:
    """Parse an NBD URI like libnbd's ``nbd_connect_uri``.

    ``nbd[s]://HOST[:PORT]/[EXPORT]`` and ``nbd[s]+unix:///[EXPORT]?socket=PATH``;
    the export is the path without its first ``/`` (so ``nbd://h//x`` names
    ``/x``), percent-decoded.  Query parameters ``socket``,
    ``tls-certificates``, ``tls-verify-peer`` and ``tls-hostname`` are used;
    ``tls-username``/``tls-psk-file`` (PSK) are refused, other parameters are
    ignored as libnbd does.

    :param uri: the URI.
    :return: the parsed URI.
    :raises URIError: unknown scheme, vsock, missing socket, bad port...
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise URIError(f"NBD URI {uri!r}: unknown scheme {parts.scheme!r} "
                       f"(expected one of {', '.join(sorted(_SCHEMES))})")
    tls, transport = _SCHEMES[scheme]
    if transport == "vsock":
        raise URIError(f"NBD URI {uri!r}: AF_VSOCK is not supported by this client")
    res = NBDURI(tls=tls, transport=transport)
    path = parts.path
    if path and not path.startswith("/"):
        raise URIError(f"NBD URI {uri!r}: the export path must start with '/'")
    res.export = unquote(path[1:]) if path else ""
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "socket":
            res.socket = value
        elif key == "tls-certificates":
            res.tls_certificates = value
        elif key == "tls-verify-peer":
            res.tls_verify_peer = _bool(key, value)
        elif key == "tls-hostname":
            res.tls_hostname = value
        elif key in ("tls-psk-file", "tls-username"):
            raise URIError(f"NBD URI {uri!r}: {key}: TLS-PSK is not supported "
                           "(only x509 through Python's ssl)")
    if transport == "unix":
        if parts.netloc:
            raise URIError(f"NBD URI {uri!r}: a unix URI has no host "
                           "(write nbd+unix:///EXPORT?socket=PATH)")
        if not res.socket:
            raise URIError(f"NBD URI {uri!r}: missing ?socket=PATH")
    else:
        if res.socket:
            raise URIError(f"NBD URI {uri!r}: 'socket' is only valid with nbd+unix://")
        try:
            port = parts.port
        except ValueError as exc:
            raise URIError(f"NBD URI {uri!r}: bad port: {exc}") from None
        res.host = parts.hostname or "localhost"
        res.port = DEFAULT_PORT if port is None else port
    return res


def open_socket(address: Union[str, os.PathLike, Tuple[str, int]],
                timeout: Optional[float] = None) -> socket.socket:
    """Connect a stream socket to a unix path or a ``(host, port)``.

    :param address: path, or ``(host, port)`` (any family ``getaddrinfo`` returns).
    :param timeout: connect timeout in seconds.
    :return: the connected socket (blocking mode restored by the caller).
    """
    if isinstance(address, tuple):
        sock = socket.create_connection(address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(address))
    except BaseException:
        sock.close()
        raise
    return sock


def tls_context(cafile: Optional[str] = None, certfile: Optional[str] = None,
                keyfile: Optional[str] = None, *, certificates_dir: Optional[str] = None,
                verify_peer: bool = True, check_hostname: bool = True) -> ssl.SSLContext:
    """An x509 client context for NBD over TLS.

    :param cafile: CA bundle that signed the server certificate (default:
        ``certificates_dir/ca-cert.pem`` if given, else the system store).
    :param certfile: client certificate (for servers that verify peers).
    :param keyfile: its key (default: inside ``certfile``).
    :param certificates_dir: a libnbd/QEMU ``tls-creds-x509`` style directory
        with ``ca-cert.pem`` and optional ``client-cert.pem``/``client-key.pem``.
    :param verify_peer: verify the server certificate at all.
    :param check_hostname: check the certificate names the host (the
        ``server_hostname`` given when wrapping).
    :return: the context.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if certificates_dir:
        d = certificates_dir
        if cafile is None and os.path.exists(os.path.join(d, "ca-cert.pem")):
            cafile = os.path.join(d, "ca-cert.pem")
        if certfile is None and os.path.exists(os.path.join(d, "client-cert.pem")):
            certfile = os.path.join(d, "client-cert.pem")
            key = os.path.join(d, "client-key.pem")
            keyfile = key if keyfile is None and os.path.exists(key) else keyfile
    if not verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = check_hostname
        if cafile:
            ctx.load_verify_locations(cafile=cafile)
        else:
            ctx.load_default_certs()
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


class TLSTransport:
    """TLS over a connected socket, safe for one reader plus many writers.

    The socket-like interface the client uses: :meth:`recv_into`,
    :meth:`sendall`, :meth:`settimeout`, :meth:`shutdown`, :meth:`close`.
    ``_obj_lock`` guards the :class:`ssl.SSLObject`; ``_send_lock`` keeps
    encrypted records in order on the wire.  Data the reader produces (TLS
    1.3 post-handshake replies) is flushed by it when no writer is busy, or
    by the next writer.

    :param sock: the connected socket (after the server's ACK of STARTTLS).
    :param context: the client context.
    :param hostname: the name to check in the server's certificate.
    """

    def __init__(self, sock: Any, context: ssl.SSLContext, hostname: Optional[str]) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        if not hostname and context.check_hostname:
            raise ValueError("TLS hostname check is on but no host name is known "
                             "(give tls_hostname, or check_hostname=False)")
        self._obj = context.wrap_bio(self._in, self._out, server_side=False,
                                     server_hostname=hostname or None)
        self._obj_lock = threading.Lock()
        self._send_lock = threading.Lock()

    def _fill(self) -> bool:
        """Feed the incoming BIO from the socket; False at EOF."""
        data = self.sock.recv(262144)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    def _flush(self) -> None:
        """Send everything the SSL object produced (caller holds ``_send_lock``)."""
        while True:
            with self._obj_lock:
                data = self._out.read()
            if not data:
                return
            self.sock.sendall(data)

    def handshake(self) -> None:
        """Run the TLS handshake (``qio_channel_tls_handshake`` on QEMU's side).

        :raises ssl.SSLError: verification or protocol failure.
        :raises ConnectionError: the server closed the connection.
        """
        while True:
            try:
                with self._obj_lock:
                    self._obj.do_handshake()
                with self._send_lock:
                    self._flush()
                return
            except ssl.SSLWantReadError:
                with self._send_lock:
                    self._flush()
                if not self._fill():
                    raise ConnectionError("server closed the connection during the TLS handshake")
            except ssl.SSLError:
                try:  # send the alert saying why (e.g. "unknown CA") before giving up
                    with self._send_lock:
                        self._flush()
                except OSError:
                    pass
                raise

    @property
    def version(self) -> Optional[str]:
        """The negotiated protocol, e.g. ``"TLSv1.3"``."""
        return self._obj.version()

    def getpeercert(self) -> Any:
        """The server certificate (as :meth:`ssl.SSLObject.getpeercert`)."""
        return self._obj.getpeercert()

    def recv_into(self, buf: memoryview) -> int:
        """Decrypt into ``buf``; 0 at end of stream."""
        while True:
            try:
                with self._obj_lock:
                    n = self._obj.read(len(buf), buf)
                    pending = self._out.pending
            except ssl.SSLWantReadError:
                if not self._fill():
                    return 0
                continue
            except ssl.SSLZeroReturnError:
                return 0
            if pending and self._send_lock.acquire(blocking=False):
                try:
                    self._flush()
                finally:
                    self._send_lock.release()
            return n

    def recv(self, n: int) -> bytes:
        """Up to ``n`` decrypted bytes; ``b""`` at end of stream."""
        buf = bytearray(n)
        got = self.recv_into(memoryview(buf))
        return bytes(buf[:got])

    def sendall(self, data: Any) -> None:
        """Encrypt and send ``data`` completely."""
        view = memoryview(data).cast("B")
        with self._send_lock:
            while view:
                with self._obj_lock:
                    n = self._obj.write(view[:1 << 20])
                view = view[n:]
                self._flush()

    def settimeout(self, timeout: Optional[float]) -> None:
        """Set the timeout of the underlying socket."""
        self.sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        """Shut the underlying socket down (wakes a blocked reader)."""
        self.sock.shutdown(how)

    def close(self) -> None:
        """Close the underlying socket (no TLS close_notify, as after NBD_CMD_DISC)."""
        self.sock.close()
