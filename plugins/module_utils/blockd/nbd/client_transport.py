# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Transports and URIs of the NBD client (:mod:`.client`).

* :func:`parse_uri` reads ``nbd://``, ``nbds://``, ``nbd+unix://`` and
  ``nbds+unix://`` URIs the way libnbd's ``nbd_connect_uri`` does (the
  NBD URI specification, ``doc/uri.md`` of the NetworkBlockDevice project),
  and libnbd's ``nbd+ssh://``/``nbds+ssh://`` (an SSH tunnel to the target,
  opened by :mod:`.client_ssh`);
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
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union
from urllib.parse import parse_qsl, unquote, urlsplit

from .tls import TLSStream

#: The IANA port of NBD.
DEFAULT_PORT = 10809

_SCHEMES = {
    "nbd": (False, "tcp"),
    "nbds": (True, "tcp"),
    "nbd+unix": (False, "unix"),
    "nbds+unix": (True, "unix"),
    "nbd+vsock": (False, "vsock"),
    "nbds+vsock": (True, "vsock"),
    "nbd+ssh": (False, "ssh"),
    "nbds+ssh": (True, "ssh"),
}
#: The SSH port (``nbd+ssh://HOST`` without a port).
SSH_PORT = 22

_TRUE = ("1", "true", "on", "yes", "require")
_FALSE = ("0", "false", "off", "no")


class URIError(ValueError):
    """An NBD URI that cannot be used."""


@dataclass
class NBDURI:
    """A parsed NBD URI.

    :ivar tls: ``nbds*`` schemes: TLS is required.
    :ivar transport: ``"tcp"``, ``"unix"`` or ``"ssh"``.
    :ivar host: TCP host name or address (brackets of IPv6 removed); for
        ``ssh`` the SSH server.
    :ivar port: TCP port; for ``ssh`` the SSH port (default 22).
    :ivar socket: unix socket path; for ``ssh`` the NBD server's unix socket
        on the SSH server (empty: TCP to ``localhost:nbd_port`` there).
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
    #: ``ssh``: the SSH user name (the URI's user info; None: the local user).
    ssh_user: Optional[str] = None
    #: ``ssh`` without ``socket``: the NBD server's TCP port on the SSH server (``nbd-port``).
    nbd_port: int = DEFAULT_PORT
    #: ``ssh``: compress the SSH connection (``compress``, as ``ssh -C``).
    ssh_compress: bool = False

    @property
    def address(self) -> Union[str, Tuple[str, int]]:
        """The unix path, or the ``(host, port)`` tuple.

        :raises URIError: for ``nbd+ssh`` (no local address: use ``connect_uri``).
        """
        if self.transport == "ssh":
            raise URIError("an nbd+ssh URI has no local address: connect with connect_uri() "
                           "(or blockd.nbd.client_ssh.SSHTunnel)")
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

    ``nbd[s]://HOST[:PORT]/[EXPORT]``, ``nbd[s]+unix:///[EXPORT]?socket=PATH``
    and (libnbd >= 1.22) ``nbd[s]+ssh://[USER@]HOST[:SSHPORT]/[EXPORT]`` with
    ``?socket=PATH`` (the NBD server's unix socket on HOST) or
    ``?nbd-port=N`` (TCP to ``localhost:N`` on HOST, default 10809);
    the export is the path without its first ``/`` (so ``nbd://h//x`` names
    ``/x``), percent-decoded.  Query parameters ``socket``,
    ``tls-certificates``, ``tls-verify-peer``, ``tls-hostname``, and for
    ``ssh`` ``nbd-port`` and ``compress`` are used;
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
    nbd_port: Optional[str] = None
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "socket":
            res.socket = value
        elif key == "nbd-port":
            nbd_port = value
        elif key == "compress" and transport == "ssh":
            res.ssh_compress = value == "" or _bool(key, value)
        elif key == "tls-certificates":
            res.tls_certificates = value
        elif key == "tls-verify-peer":
            res.tls_verify_peer = _bool(key, value)
        elif key == "tls-hostname":
            res.tls_hostname = value
        elif key in ("tls-psk-file", "tls-username"):
            raise URIError(f"NBD URI {uri!r}: {key}: TLS-PSK is not supported "
                           "(only x509 through Python's ssl)")
    if transport == "ssh":
        _parse_ssh(uri, parts, res, nbd_port)
    elif transport == "unix":
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


def _parse_ssh(uri: str, parts: Any, res: NBDURI, nbd_port: Optional[str]) -> None:
    """The ``nbd[s]+ssh`` part of :func:`parse_uri` (authority and target)."""
    try:
        port = parts.port
    except ValueError as exc:
        raise URIError(f"NBD URI {uri!r}: bad SSH port: {exc}") from None
    host = parts.hostname or ""
    if not host:
        raise URIError(f"NBD URI {uri!r}: an nbd+ssh URI needs the SSH server "
                       "(nbd+ssh://[USER@]HOST[:PORT]/EXPORT?socket=PATH)")
    if host.startswith("-"):
        raise URIError(f"NBD URI {uri!r}: SSH host name {host!r} must not start with '-'")
    if parts.password is not None:
        raise URIError(f"NBD URI {uri!r}: no password in an nbd+ssh URI "
                       "(SSH authentication is by key)")
    res.host = host
    res.port = SSH_PORT if port is None else port
    res.ssh_user = unquote(parts.username) if parts.username else None
    if res.socket and nbd_port is not None:
        raise URIError(f"NBD URI {uri!r}: give either socket= or nbd-port=, not both")
    if res.socket and not res.socket.startswith("/"):
        raise URIError(f"NBD URI {uri!r}: socket={res.socket!r} must be an absolute path "
                       "on the SSH server")
    if nbd_port is not None:
        if not nbd_port.isdigit() or not 0 < int(nbd_port) < 65536:
            raise URIError(f"NBD URI {uri!r}: nbd-port={nbd_port!r} is not a TCP port")
        res.nbd_port = int(nbd_port)


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


class TLSTransport(TLSStream):
    """The client end of :class:`.tls.TLSStream` (shared with the NBD server):
    TLS over a connected socket, safe for one reader plus many writers.

    :param sock: the connected socket (after the server's ACK of STARTTLS).
    :param context: the client context.
    :param hostname: the name to check in the server's certificate.
    :raises ValueError: the context checks host names but none is given.
    """

    def __init__(self, sock: Any, context: ssl.SSLContext, hostname: Optional[str]) -> None:
        if not hostname and context.check_hostname:
            raise ValueError("TLS hostname check is on but no host name is known "
                             "(give tls_hostname, or check_hostname=False)")
        super().__init__(sock, context, server_side=False, hostname=hostname)
