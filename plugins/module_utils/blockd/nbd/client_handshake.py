# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Errors, export information and the handshake of the NBD client (:mod:`.client`).

Negotiation follows QEMU's ``nbd/client.c`` (``nbd_receive_negotiate``,
``nbd_start_negotiate``, ``nbd_opt_info_or_go``,
``nbd_negotiate_simple_meta_context``, ``nbd_receive_list``) and libnbd's
handshake states.  Every refusal raises :class:`NBDOptionError` with the
server's reply code, its name and its message; every length the server
sends is checked before anything is allocated from it.

Also the sessions that never reach transmission: :func:`list_exports`
(NBD_OPT_LIST) and :func:`list_meta_contexts` (NBD_OPT_LIST_META_CONTEXT),
both ended with NBD_OPT_ABORT so the server logs no failure.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from . import proto
from .client_transport import NBDURI, TLSTransport, open_socket, parse_uri, tls_context

#: Largest option reply accepted during the handshake.
MAX_OPTION_REPLY = 64 * 1024
#: Most replies accepted for one option (NBD_REP_SERVER, META_CONTEXT, INFO...).
MAX_OPTION_REPLIES = 65536

_REP_ERRORS: Dict[int, Tuple[str, int]] = {
    proto.REP_ERR_UNSUP: ("NBD_REP_ERR_UNSUP", _errno.ENOTSUP),
    proto.REP_ERR_POLICY: ("NBD_REP_ERR_POLICY", _errno.EPERM),
    proto.REP_ERR_INVALID: ("NBD_REP_ERR_INVALID", _errno.EINVAL),
    proto.REP_ERR_PLATFORM: ("NBD_REP_ERR_PLATFORM", _errno.EOPNOTSUPP),
    proto.REP_ERR_TLS_REQD: ("NBD_REP_ERR_TLS_REQD", _errno.EPERM),
    proto.REP_ERR_UNKNOWN: ("NBD_REP_ERR_UNKNOWN", _errno.ENOENT),
    proto.REP_ERR_SHUTDOWN: ("NBD_REP_ERR_SHUTDOWN", _errno.ESHUTDOWN),
    proto.REP_ERR_BLOCK_SIZE_REQD: ("NBD_REP_ERR_BLOCK_SIZE_REQD", _errno.EINVAL),
    proto.REP_ERR_TOO_BIG: ("NBD_REP_ERR_TOO_BIG", _errno.ERANGE),
    proto.REP_ERR_EXT_HEADER_REQD: ("NBD_REP_ERR_EXT_HEADER_REQD", _errno.EINVAL),
}


# -- errors ------------------------------------------------------------------------

class NBDError(OSError):
    """Base of every client error; an :class:`OSError` with a meaningful errno.

    :ivar message: the full text (also ``str(exc)``).
    :ivar code: the raw NBD value (reply type of an option, NBD errno of a command).
    :ivar name: its name (``"NBD_REP_ERR_UNKNOWN"``, ``"EIO"``...).
    :ivar server_message: the text the server sent, if any.
    """

    def __init__(self, message: str, err: int = _errno.EIO, *, code: Optional[int] = None,
                 name: Optional[str] = None, server_message: Optional[str] = None) -> None:
        super().__init__(err, message)
        self.message = message
        self.code = code
        self.name = name
        self.server_message = server_message

    def __str__(self) -> str:
        return self.message


class NBDOptionError(NBDError):
    """The server refused an option during the handshake.

    :ivar option: the ``OPT_*`` refused.
    """

    def __init__(self, option: int, rep: int, server_message: str, what: str = "") -> None:
        name, err = _REP_ERRORS.get(rep, ("NBD_REP_ERR_%#x" % rep, _errno.EINVAL))
        text = "NBD_OPT_%s%s refused by the server: %s" % (
            proto.opt_name(option).upper().replace(" ", "_"), what, name)
        if server_message:
            text += ": " + server_message
        if rep == proto.REP_ERR_TLS_REQD:
            text += " (the server requires TLS: use nbds:// or pass a TLS context)"
        super().__init__(text, err, code=rep, name=name, server_message=server_message)
        self.option = option


class NBDCommandError(NBDError):
    """The server failed a request (simple reply error or ERROR chunk).

    :ivar cmd: the ``CMD_*``; ``offset``: ERROR_OFFSET's offset, if sent.
    """

    def __init__(self, cmd: int, code: int, offset: int, length: int,
                 server_message: str = "", error_offset: Optional[int] = None) -> None:
        err = code if code in _errno.errorcode else _errno.EINVAL
        name = _errno.errorcode.get(code, "NBD error %d" % code)
        text = "NBD %s of %d bytes at offset %d failed: %s (%s)" % (
            proto.cmd_name(cmd), length, offset, name, os.strerror(err))
        if error_offset is not None:
            text += " at offset %d" % error_offset
        if server_message:
            text += ": " + server_message
        super().__init__(text, err, code=code, name=name, server_message=server_message)
        self.cmd = cmd
        self.offset = error_offset


class NBDProtocolError(NBDError):
    """The server broke the NBD protocol (the connection is unusable)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.EPROTO)


class NBDDisconnected(NBDError):
    """The connection ended (server closed it, or :meth:`NBDClient.close`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ESHUTDOWN)


class NBDTLSError(NBDError):
    """TLS could not be set up (unsupported by the server, bad certificate...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.EPROTO)


class NBDTimeout(NBDError):
    """No answer within the timeout given."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ETIMEDOUT)


class NBDUsageError(NBDError):
    """A request refused before it is sent (as libnbd's strict mode does)."""


# -- negotiated state ----------------------------------------------------------------

class Extent(NamedTuple):
    """One block-status extent: absolute offset, length, context flags."""

    offset: int
    length: int
    flags: int


@dataclass
class ExportInfo:
    """What the handshake told about the export (``NBDExportInfo`` in QEMU)."""

    name: str = ""
    size: int = 0
    flags: int = 0
    description: Optional[str] = None
    canonical_name: Optional[str] = None
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = proto.MAX_BUFFER_SIZE
    structured_replies: bool = False
    tls: bool = False
    #: Negotiated metadata contexts: name -> id.
    contexts: Dict[str, int] = field(default_factory=dict)

    def _flag(self, bit: int) -> bool:
        return bool(self.flags & bit)

    read_only = property(lambda self: self._flag(proto.FLAG_READ_ONLY))
    can_flush = property(lambda self: self._flag(proto.FLAG_SEND_FLUSH))
    can_fua = property(lambda self: self._flag(proto.FLAG_SEND_FUA))
    rotational = property(lambda self: self._flag(proto.FLAG_ROTATIONAL))
    can_trim = property(lambda self: self._flag(proto.FLAG_SEND_TRIM))
    can_zero = property(lambda self: self._flag(proto.FLAG_SEND_WRITE_ZEROES))
    can_df = property(lambda self: self._flag(proto.FLAG_SEND_DF))
    can_multi_conn = property(lambda self: self._flag(proto.FLAG_CAN_MULTI_CONN))
    can_cache = property(lambda self: self._flag(proto.FLAG_SEND_CACHE))
    can_fast_zero = property(lambda self: self._flag(proto.FLAG_SEND_FAST_ZERO))


# -- byte I/O ----------------------------------------------------------------------------

class _SockAdapter:
    """Gives ``recv_into`` to socket-like objects that only have ``recv`` (e.g. SSH channels)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def recv_into(self, buf: memoryview) -> int:
        data = self.obj.recv(min(len(buf), 1 << 20))
        buf[:len(data)] = data
        return len(data)

    def recv(self, n: int) -> bytes:
        return self.obj.recv(n)

    def sendall(self, data: Any) -> None:
        self.obj.sendall(data)

    def settimeout(self, timeout: Optional[float]) -> None:
        if hasattr(self.obj, "settimeout"):
            self.obj.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        if hasattr(self.obj, "shutdown"):
            self.obj.shutdown(how)

    def close(self) -> None:
        self.obj.close()


def _recv_into(sock: Any, view: memoryview, what: str) -> None:
    """Fill ``view`` completely from ``sock``.

    :raises NBDDisconnected: end of stream or reset.
    :raises NBDTimeout: the socket timeout expired.
    """
    got, total = 0, len(view)
    while got < total:
        try:
            n = sock.recv_into(view[got:])
        except socket.timeout:
            raise NBDTimeout("NBD server did not send %s in time (%d of %d bytes)"
                             % (what, got, total)) from None
        except ssl.SSLError as exc:
            raise NBDTLSError("TLS error while reading %s: %s" % (what, exc)) from None
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, NBDError):
                raise
            raise NBDDisconnected("NBD connection lost while reading %s: %s"
                                  % (what, exc)) from None
        if n == 0:
            raise NBDDisconnected("NBD server closed the connection while %s was expected "
                                  "(%d of %d bytes received)" % (what, got, total))
        got += n


def _recv(sock: Any, n: int, what: str) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), what)
    return bytes(buf)


# -- handshake ------------------------------------------------------------------------

class Handshake:
    """The option-haggling phase on one socket (QEMU ``nbd_start_negotiate`` and friends).

    :param sock: a connected socket-like object.
    """

    def __init__(self, sock: Any) -> None:
        self.sock = sock if hasattr(sock, "recv_into") else _SockAdapter(sock)
        self.no_zeroes = False
        self.tls = False
        self._replies = 0

    def send_option(self, option: int, data: bytes = b"") -> None:
        """Send one option."""
        self._replies = 0
        try:
            self.sock.sendall(proto.pack_option(option, data))
        except OSError as exc:
            raise NBDDisconnected("NBD server closed the connection during the handshake "
                                  "(sending NBD_OPT %s): %s"
                                  % (proto.opt_name(option), exc)) from None

    def reply(self, option: int) -> Tuple[int, bytes]:
        """One option reply (``nbd_receive_option_reply``); lengths checked before reading."""
        magic, opt, rep, length = proto.OPTION_REPLY.unpack(
            _recv(self.sock, proto.OPTION_REPLY.size, "an option reply"))
        if magic != proto.REP_MAGIC:
            raise NBDProtocolError("unexpected option reply magic %#x" % magic)
        if opt != option:
            raise NBDProtocolError("server answered option %d (%s) while option %d (%s) "
                                   "was asked" % (opt, proto.opt_name(opt), option,
                                                  proto.opt_name(option)))
        self._replies += 1
        if self._replies > MAX_OPTION_REPLIES:
            raise NBDProtocolError("more than %d replies to option %s"
                                   % (MAX_OPTION_REPLIES, proto.opt_name(option)))
        if length > MAX_OPTION_REPLY:
            raise NBDProtocolError("option reply of %d bytes is too long (max %d)"
                                   % (length, MAX_OPTION_REPLY))
        return rep, _recv(self.sock, length, "an option reply payload")

    @staticmethod
    def refused(option: int, rep: int, payload: bytes, what: str = "") -> NBDOptionError:
        """The exception for an error reply."""
        return NBDOptionError(option, rep, payload.decode("utf-8", "replace"), what)

    def greeting(self) -> None:
        """Read the server greeting and send the client flags (fixed newstyle only)."""
        magic, opt_magic, flags = proto.GREETING.unpack(
            _recv(self.sock, proto.GREETING.size, "the NBD greeting"))
        if magic != proto.NBDMAGIC:
            raise NBDProtocolError("not an NBD server (greeting magic %#x)" % magic)
        if opt_magic == proto.CLISERV_MAGIC:
            raise NBDProtocolError("the server uses oldstyle negotiation, which is not supported")
        if opt_magic != proto.IHAVEOPT:
            raise NBDProtocolError("not an NBD server (option magic %#x)" % opt_magic)
        if not flags & proto.FLAG_FIXED_NEWSTYLE:
            raise NBDProtocolError("the server does not support fixed newstyle negotiation")
        self.no_zeroes = bool(flags & proto.FLAG_NO_ZEROES)
        cflags = proto.FLAG_C_FIXED_NEWSTYLE | (proto.FLAG_C_NO_ZEROES if self.no_zeroes else 0)
        self.sock.sendall(proto.U32.pack(cflags))

    def starttls(self, context: ssl.SSLContext, hostname: Optional[str]) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake (``nbd_receive_starttls``)."""
        try:  # checks the settings before anything is sent
            transport = TLSTransport(self.sock, context, hostname)
        except ValueError as exc:
            self.abort()
            raise NBDTLSError("cannot start TLS: %s" % exc) from None
        self.send_option(proto.OPT_STARTTLS)
        rep, payload = self.reply(proto.OPT_STARTTLS)
        if rep != proto.REP_ACK:
            if rep & proto.REP_FLAG_ERROR:
                exc = self.refused(proto.OPT_STARTTLS, rep, payload)
                self.abort()
                raise NBDTLSError("the server does not support TLS: %s" % exc)
            raise NBDProtocolError("unexpected reply %#x to NBD_OPT_STARTTLS" % rep)
        try:
            transport.handshake()
        except ssl.SSLCertVerificationError as exc:
            raise NBDTLSError("TLS handshake failed: the server certificate was rejected: %s"
                              % (exc.verify_message or exc)) from None
        except ssl.SSLError as exc:
            raise NBDTLSError("TLS handshake failed: %s" % exc) from None
        except (ConnectionError, ValueError) as exc:
            raise NBDTLSError("TLS handshake failed: %s" % exc) from None
        self.sock = transport
        self.tls = True

    def structured_replies(self) -> bool:
        """NBD_OPT_STRUCTURED_REPLY; False if refused (TLS_REQD raises)."""
        self.send_option(proto.OPT_STRUCTURED_REPLY)
        rep, payload = self.reply(proto.OPT_STRUCTURED_REPLY)
        if rep == proto.REP_ACK:
            return True
        if rep == proto.REP_ERR_TLS_REQD or not rep & proto.REP_FLAG_ERROR:
            raise self.refused(proto.OPT_STRUCTURED_REPLY, rep, payload)
        return False

    def meta_contexts(self, option: int, export: str, queries: Sequence[str]) -> Dict[str, int]:
        """NBD_OPT_SET/LIST_META_CONTEXT (``nbd_negotiate_simple_meta_context``).

        :return: context name -> id (ids are 0 for LIST).
        :raises NBDOptionError: refused.
        """
        self.send_option(option, proto.pack_meta_request(export, tuple(queries)))
        found: Dict[str, int] = {}
        while True:
            rep, payload = self.reply(option)
            if rep == proto.REP_ACK:
                return found
            if rep & proto.REP_FLAG_ERROR:
                raise self.refused(option, rep, payload, " for export %r" % export)
            if rep != proto.REP_META_CONTEXT or len(payload) < 4:
                raise NBDProtocolError("unexpected reply %#x (%d bytes) to NBD_OPT_%s"
                                       % (rep, len(payload), proto.opt_name(option)))
            found[payload[4:].decode("utf-8", "replace")] = proto.U32.unpack_from(payload)[0]

    def go(self, export: str, info: ExportInfo, block_size: bool = True) -> None:
        """NBD_OPT_GO asking for INFO_EXPORT (+ BLOCK_SIZE) (``nbd_opt_info_or_go``).

        Falls back to NBD_OPT_EXPORT_NAME when the server does not know GO.
        """
        infos = (proto.INFO_BLOCK_SIZE,) if block_size else ()
        self.send_option(proto.OPT_GO, proto.pack_info_request(export, infos))
        seen_export = False
        while True:
            rep, payload = self.reply(proto.OPT_GO)
            if rep == proto.REP_ACK:
                if not seen_export:
                    raise NBDProtocolError("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
                return
            if rep == proto.REP_ERR_UNSUP:
                self._export_name(export, info)
                return
            if rep & proto.REP_FLAG_ERROR:
                raise self.refused(proto.OPT_GO, rep, payload, " for export %r" % export)
            if rep != proto.REP_INFO or len(payload) < 2:
                raise NBDProtocolError("unexpected reply %#x (%d bytes) to NBD_OPT_GO"
                                       % (rep, len(payload)))
            kind = proto.U16.unpack_from(payload)[0]
            if kind == proto.INFO_EXPORT:
                if len(payload) != proto.INFO_EXPORT_PAYLOAD.size:
                    raise NBDProtocolError("NBD_INFO_EXPORT of %d bytes" % len(payload))
                _kind, info.size, info.flags = proto.INFO_EXPORT_PAYLOAD.unpack(payload)
                seen_export = True
            elif kind == proto.INFO_BLOCK_SIZE:
                if len(payload) != proto.INFO_BLOCK_SIZE_PAYLOAD.size:
                    raise NBDProtocolError("NBD_INFO_BLOCK_SIZE of %d bytes" % len(payload))
                _kind, mn, pref, mx = proto.INFO_BLOCK_SIZE_PAYLOAD.unpack(payload)
                if mn < 1 or mn & (mn - 1) or mn > 65536 or pref & (pref - 1) or pref < mn \
                        or mx < mn:
                    raise NBDProtocolError("invalid block sizes min=%d preferred=%d max=%d"
                                           % (mn, pref, mx))
                info.min_block, info.preferred_block, info.max_block = mn, pref, mx
            elif kind == proto.INFO_NAME:
                info.canonical_name = payload[2:].decode("utf-8", "replace")
            elif kind == proto.INFO_DESCRIPTION:
                info.description = payload[2:].decode("utf-8", "replace")

    def _export_name(self, export: str, info: ExportInfo) -> None:
        """NBD_OPT_EXPORT_NAME (old servers); the server closes on an unknown export."""
        self.send_option(proto.OPT_EXPORT_NAME, export.encode("utf-8"))
        try:
            data = _recv(self.sock, proto.EXPORT_NAME_REPLY.size, "the export-name reply")
        except NBDDisconnected:
            raise NBDOptionError(proto.OPT_EXPORT_NAME, proto.REP_ERR_UNKNOWN,
                                 "server closed the connection",
                                 " for export %r" % export) from None
        info.size, info.flags = proto.EXPORT_NAME_REPLY.unpack(data)
        if not self.no_zeroes:
            _recv(self.sock, 124, "the export-name padding")

    def list(self) -> List[Tuple[str, str]]:
        """NBD_OPT_LIST (``nbd_receive_list``): [(name, description)]."""
        self.send_option(proto.OPT_LIST)
        out: List[Tuple[str, str]] = []
        while True:
            rep, payload = self.reply(proto.OPT_LIST)
            if rep == proto.REP_ACK:
                return out
            if rep & proto.REP_FLAG_ERROR:
                raise self.refused(proto.OPT_LIST, rep, payload)
            if rep != proto.REP_SERVER or len(payload) < 4:
                raise NBDProtocolError("unexpected reply %#x to NBD_OPT_LIST" % rep)
            n = proto.U32.unpack_from(payload)[0]
            if n > len(payload) - 4:
                raise NBDProtocolError("NBD_REP_SERVER name length %d exceeds the reply" % n)
            out.append((payload[4:4 + n].decode("utf-8", "replace"),
                        payload[4 + n:].decode("utf-8", "replace")))

    def abort(self) -> None:
        """NBD_OPT_ABORT; the reply is optional (waited for 1 s at most)."""
        try:
            self.sock.settimeout(1.0)
            self.send_option(proto.OPT_ABORT)
            self.reply(proto.OPT_ABORT)
        except NBDError:
            pass


# -- option-only sessions --------------------------------------------------------------

_Address = Union[str, Tuple[str, int], Any]


def _close_quietly(sock: Any) -> None:
    """Close, ignoring errors (the connection is being abandoned)."""
    try:
        sock.close()
    except (OSError, ssl.SSLError):
        pass


def _uri_kwargs(uri: str, kwargs: Dict[str, Any]) -> Tuple[NBDURI, Dict[str, Any]]:
    """Parse ``uri``; add a TLS context (and host name to check) for ``nbds`` URIs."""
    parsed = parse_uri(uri)
    kw = dict(kwargs)
    if parsed.tls and kw.get("tls") is None:
        check = parsed.transport == "tcp" or bool(parsed.tls_hostname)
        kw["tls"] = tls_context(certificates_dir=parsed.tls_certificates,
                                verify_peer=parsed.tls_verify_peer, check_hostname=check)
    if kw.get("tls") is not None:
        kw.setdefault("tls_hostname", parsed.tls_hostname or (parsed.host or None))
    return parsed, kw


def _option_session(address: _Address, tls: Optional[ssl.SSLContext],
                    tls_hostname: Optional[str], timeout: Optional[float],
                    body: Callable[[Handshake], Any]) -> Any:
    """Greeting (+ STARTTLS), ``body(handshake)``, then NBD_OPT_ABORT and close."""
    if isinstance(address, str) and "://" in address:
        given = {k: v for k, v in (("tls", tls), ("tls_hostname", tls_hostname)) if v is not None}
        parsed, kw = _uri_kwargs(address, given)
        address, tls, tls_hostname = parsed.address, kw.get("tls"), kw.get("tls_hostname")
    sock = open_socket(address, timeout) if isinstance(address, (str, tuple)) else address
    hs = Handshake(sock)
    try:
        hs.sock.settimeout(timeout)
        hs.greeting()
        if tls is not None:
            hs.starttls(tls, tls_hostname)
        result = body(hs)
        hs.abort()
        return result
    except NBDOptionError:
        hs.abort()
        raise
    finally:
        _close_quietly(hs.sock)


def list_exports(address: _Address, *, tls: Optional[ssl.SSLContext] = None,
                 tls_hostname: Optional[str] = None,
                 timeout: Optional[float] = 30.0) -> List[Tuple[str, str]]:
    """NBD_OPT_LIST: ``[(name, description)]``; the session then ends with NBD_OPT_ABORT.

    :param address: as :func:`connect`, or an NBD URI string (``nbd://`` etc.).
    """
    return _option_session(address, tls, tls_hostname, timeout, Handshake.list)


def list_meta_contexts(address: _Address, export: str = "",
                       queries: Sequence[str] = ("base:", "qemu:"), *,
                       tls: Optional[ssl.SSLContext] = None, tls_hostname: Optional[str] = None,
                       timeout: Optional[float] = 30.0) -> List[str]:
    """NBD_OPT_LIST_META_CONTEXT: the contexts the server offers for ``export``
    that match ``queries`` (``"qemu:"`` lists all of QEMU's).

    :param address: as :func:`list_exports`.
    """
    def body(hs: Handshake) -> List[str]:
        if not hs.structured_replies():
            raise NBDError("the server does not support structured replies, so no "
                           "metadata contexts", _errno.ENOTSUP)
        return list(hs.meta_contexts(proto.OPT_LIST_META_CONTEXT, export, queries))
    return _option_session(address, tls, tls_hostname, timeout, body)
