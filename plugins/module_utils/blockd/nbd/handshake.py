# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fixed-newstyle NBD handshake, as QEMU 7.2's server negotiates it.

The server greets with FIXED_NEWSTYLE|NO_ZEROES, checks the client flags
(unknown bits drop the connection), then answers options until
NBD_OPT_GO or NBD_OPT_EXPORT_NAME selects an export, NBD_OPT_ABORT ends
the connection, or a limit is hit:

* the whole handshake must finish within the owner's ``handshake_timeout``
  (10 s, the Debian QEMU 7.2 backport of CVE-2024-7409);
* an option longer than 32 MiB, or more than :data:`MAX_OPTIONS` options,
  drops the connection.

Option parsing reads the payload incrementally, like QEMU's
``nbd_opt_read``: a length that does not add up is answered with
NBD_REP_ERR_INVALID after the rest of the option is skipped, and the
negotiation goes on.  Error replies carry QEMU's messages.

TLS (the owner's ``tls`` is an :class:`ssl.SSLContext`), as QEMU's
``nbd_negotiate_options``: before STARTTLS every option but STARTTLS is
answered NBD_REP_ERR_TLS_REQD (ABORT too, and the connection ends),
NBD_OPT_EXPORT_NAME drops the connection; STARTTLS is acknowledged, the
TLS handshake runs (within the same handshake deadline), the owner's
``authorize(dn)`` judges a verified client certificate's name (QEMU's
``tls-authz``), and negotiation continues over TLS where a second STARTTLS
gets "TLS already enabled".  Without TLS, STARTTLS gets NBD_REP_ERR_POLICY
"TLS not configured".  A STARTTLS carrying data is answered NBD_REP_ERR_INVALID;
before TLS that also drops the connection (as qsd does).
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any, List, Optional

from . import proto
from .connection import Disconnect, NBDConnection
from .proto import (OPTION, OPTION_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY,
                    REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_MAGIC,
                    REP_META_CONTEXT, REP_SERVER, U16, U32)
from .tls import TLSStream, peer_dn

#: Options one connection may send before it is dropped.
MAX_OPTIONS = 4096


class _OptInvalid(Exception):
    """Answer the current option with an error after skipping its rest.

    :param msg: the message.
    :param rep: the error reply type.
    """

    def __init__(self, msg: str, rep: int = REP_ERR_INVALID) -> None:
        super().__init__(msg)
        self.msg = msg
        self.rep = rep


def _sanitize(name: str) -> str:
    """QEMU's nbd_sanitize_name: long names are cut at 80 characters."""
    return name if len(name) < 80 else name[:80] + "..."


class _Negotiation:
    """State of one handshake.

    :param conn: the connection being negotiated.
    """

    def __init__(self, conn: NBDConnection) -> None:
        self.conn = conn
        self.sock = conn.sock
        self.owner = conn.owner
        timeout = getattr(self.owner, "handshake_timeout", 10.0)
        self.deadline = time.monotonic() + timeout if timeout else None
        self.option = 0
        self.optlen = 0
        self.meta_export: Any = None
        self.meta: List[Any] = []
        #: The server's TLS context; None once TLS runs (or if not configured).
        self.tls_pending: Optional[ssl.SSLContext] = getattr(self.owner, "tls", None)

    # -- socket -------------------------------------------------------------------

    def _arm(self) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Disconnect("handshake timed out")
            self.sock.settimeout(left)

    def recv(self, n: int) -> bytes:
        """Read exactly ``n`` bytes within the handshake deadline."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            self._arm()
            try:
                more = self.sock.recv_into(view[got:], n - got)
            except socket.timeout:
                raise Disconnect("handshake timed out") from None
            if not more:
                raise Disconnect("Unexpected end-of-file before all bytes were read" if got else "")
            got += more
        return bytes(buf)

    def send(self, data: bytes) -> None:
        """Send within the handshake deadline."""
        self._arm()
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise Disconnect("handshake timed out") from None

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes."""
        while n > 0:
            chunk = min(n, 1 << 20)
            self.recv(chunk)
            n -= chunk

    # -- option payload -----------------------------------------------------------------

    def opt_read(self, n: int) -> bytes:
        """Read ``n`` bytes of the current option's payload."""
        if n > self.optlen:
            raise _OptInvalid("Inconsistent lengths in option %s" % proto.opt_name(self.option))
        self.optlen -= n
        return self.recv(n)

    def opt_string(self, n: int) -> str:
        """Read a string of ``n`` bytes; NUL bytes are invalid."""
        raw = self.opt_read(n)
        if b"\0" in raw:
            raise _OptInvalid("Unexpected embedded NUL in option %s" % proto.opt_name(self.option))
        return raw.decode("utf-8", "surrogateescape")

    def opt_name(self) -> str:
        """Read a u32-prefixed export name (at most 4096 bytes)."""
        (length,) = U32.unpack(self.opt_read(4))
        if length > proto.MAX_STRING_SIZE:
            raise _OptInvalid("Invalid name length: %d" % length)
        return self.opt_string(length)

    def reply(self, rep: int, data: bytes = b"") -> bytes:
        """An option reply to the current option (not sent)."""
        return OPTION_REPLY.pack(REP_MAGIC, self.option, rep, len(data)) + data

    def reject_length(self) -> None:
        """QEMU's nbd_reject_length: the option must not carry data."""
        raise _OptInvalid("option '%s' has unexpected length" % proto.opt_name(self.option))

    # -- negotiation ---------------------------------------------------------------------

    def run(self) -> Optional[Any]:
        """Negotiate; return the export chosen, or None when the client aborted."""
        self.send(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT,
                                      proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES))
        (cflags,) = U32.unpack(self.recv(4))
        fixed = bool(cflags & proto.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(cflags & proto.FLAG_C_NO_ZEROES)
        unknown = cflags & ~(proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES)
        if unknown:
            raise Disconnect("Unknown client flags 0x%x received" % unknown)
        count = 0
        while True:
            magic, option, length = OPTION.unpack(self.recv(OPTION.size))
            if magic != proto.IHAVEOPT:
                raise Disconnect("Bad magic received")
            count += 1
            if count > MAX_OPTIONS:
                raise Disconnect("too many options")
            if length > proto.MAX_BUFFER_SIZE:
                raise Disconnect("len (%d ) is larger than max len (%d)"
                                 % (length, proto.MAX_BUFFER_SIZE))
            self.option = option
            self.optlen = length
            if self.tls_pending is not None:
                if not fixed:
                    raise Disconnect("Unsupported option 0x%x" % option)
                if not self.before_tls(option):
                    return None
                continue
            if not fixed and option != proto.OPT_EXPORT_NAME:
                raise Disconnect("Unsupported option %d (%s)" % (option, proto.opt_name(option)))
            try:
                done, export = self.handle(option)
            except _OptInvalid as exc:
                self.skip(self.optlen)
                self.optlen = 0
                self.send(self.reply(exc.rep, exc.msg.encode("utf-8", "replace")))
                continue
            if done:
                return export

    def handle(self, option: int) -> "tuple[bool, Any]":
        """Answer one option; return ``(finished, export)``."""
        if option == proto.OPT_GO or option == proto.OPT_INFO:
            return self.info()
        if option == proto.OPT_STRUCTURED_REPLY:
            if self.optlen:
                self.reject_length()
            if self.conn.structured:
                raise _OptInvalid("structured reply already negotiated")
            self.conn.structured = True
            self.send(self.reply(REP_ACK))
        elif option in (proto.OPT_SET_META_CONTEXT, proto.OPT_LIST_META_CONTEXT):
            self.meta_queries(option == proto.OPT_LIST_META_CONTEXT)
        elif option == proto.OPT_LIST:
            if self.optlen:
                self.reject_length()
            parts = []
            for exp in list(self.owner.exports.values()):
                name = exp.name.encode("utf-8")
                desc = (exp.description or "").encode("utf-8")
                parts.append(self.reply(REP_SERVER, U32.pack(len(name)) + name + desc))
            parts.append(self.reply(REP_ACK))
            self.send(b"".join(parts))
        elif option == proto.OPT_ABORT:
            try:
                self.send(self.reply(REP_ACK))
            except (OSError, Disconnect):
                pass
            return True, None
        elif option == proto.OPT_EXPORT_NAME:
            return True, self.export_name()
        elif option == proto.OPT_STARTTLS:
            if self.optlen:
                self.reject_length()
            if self.conn.tls:
                raise _OptInvalid("TLS already enabled")
            raise _OptInvalid("TLS not configured", REP_ERR_POLICY)
        else:
            raise _OptInvalid("Unsupported option %d (%s)" % (option, proto.opt_name(option)),
                              REP_ERR_UNSUP)
        return False, None

    def reject_fatal(self) -> None:
        """nbd_reject_length(fatal=true): answer, then drop the connection."""
        msg = "option '%s' has unexpected length" % proto.opt_name(self.option)
        self.skip(self.optlen)
        self.optlen = 0
        self.send(self.reply(REP_ERR_INVALID, msg.encode()))
        raise Disconnect(msg)

    # -- TLS -----------------------------------------------------------------------------

    def before_tls(self, option: int) -> bool:
        """An option while TLS is required but not running.

        :return: False when the client aborted (the connection ends).
        """
        if option == proto.OPT_STARTTLS:
            if self.optlen:
                self.reject_fatal()
            self.starttls()
            return True
        if option == proto.OPT_EXPORT_NAME:
            raise Disconnect("Option 0x%x not permitted before TLS" % option)
        # nbd_opt_drop(): skip the payload, answer TLS_REQD; ABORT then ends
        self.skip(self.optlen)
        self.optlen = 0
        msg = "Option 0x%x not permitted before TLS" % option
        try:
            self.send(self.reply(REP_ERR_TLS_REQD, msg.encode()))
        except (OSError, Disconnect):
            if option != proto.OPT_ABORT:
                raise
        return option != proto.OPT_ABORT

    def starttls(self) -> None:
        """nbd_negotiate_handle_starttls(): ACK, handshake, check the client."""
        ctx = self.tls_pending
        if ctx is None:
            raise AssertionError("TLS context missing")
        self.send(self.reply(REP_ACK))
        stream = TLSStream(self.sock, ctx, server_side=True)
        self._arm()
        try:
            stream.handshake()
        except socket.timeout:
            raise Disconnect("handshake timed out") from None
        except (ssl.SSLError, OSError) as exc:
            raise Disconnect("TLS handshake failed: %s" % exc) from None
        authorize = getattr(self.owner, "authorize", None)
        if authorize is not None and ctx.verify_mode == ssl.CERT_REQUIRED:
            dname = peer_dn(stream.getpeercert())
            reason = authorize(dname)
            if reason:
                raise Disconnect(reason)
        self.tls_pending = None
        self.sock = stream
        self.conn.start_tls(stream)

    def _flags(self, exp: Any) -> int:
        max_conn = getattr(self.owner, "max_connections", 0)
        flags = exp.transmission_flags(max_conn != 1)
        if self.conn.structured:
            flags |= proto.FLAG_SEND_DF
        return flags

    def _lookup(self, name: str) -> Any:
        exp = self.owner.exports.get(name)
        if exp is None or exp.closing:
            return None
        return exp

    def export_name(self) -> Any:
        """NBD_OPT_EXPORT_NAME: no way to report errors but closing."""
        if self.optlen > proto.MAX_STRING_SIZE:
            raise Disconnect("Bad length received")
        name = self.recv(self.optlen).decode("utf-8", "surrogateescape")
        self.optlen = 0
        exp = self._lookup(name)
        if exp is None or not self._attach(exp):
            raise Disconnect("export not found")
        reply = proto.EXPORT_NAME_REPLY.pack(exp.size, self._flags(exp))
        if not self.no_zeroes:
            reply += bytes(124)
        self.send(reply)
        self._select_meta(exp)
        return exp

    def info(self) -> "tuple[bool, Any]":
        """NBD_OPT_INFO and NBD_OPT_GO."""
        go = self.option == proto.OPT_GO
        name = self.opt_name()
        (nreq,) = U16.unpack(self.opt_read(2))
        sendname = blocksize = False
        for _i in range(nreq):
            (req,) = U16.unpack(self.opt_read(2))
            if req == proto.INFO_NAME:
                sendname = True
            elif req == proto.INFO_BLOCK_SIZE:
                blocksize = True
        if self.optlen:
            self.reject_length()
        exp = self._lookup(name)
        if exp is None:
            raise _OptInvalid("export '%s' not present" % _sanitize(name), REP_ERR_UNKNOWN)
        parts = []
        if sendname:
            raw = name.encode("utf-8", "surrogateescape")
            parts.append(self.reply(REP_INFO, U16.pack(proto.INFO_NAME) + raw))
        if exp.description is not None:
            raw = exp.description.encode("utf-8")
            parts.append(self.reply(REP_INFO, U16.pack(proto.INFO_DESCRIPTION) + raw))
        minimum = exp.request_alignment if (not go or blocksize) else 1
        parts.append(self.reply(REP_INFO, proto.INFO_BLOCK_SIZE_PAYLOAD.pack(
            proto.INFO_BLOCK_SIZE, minimum, max(4096, minimum), proto.MAX_BUFFER_SIZE)))
        parts.append(self.reply(REP_INFO, proto.INFO_EXPORT_PAYLOAD.pack(
            proto.INFO_EXPORT, exp.size, self._flags(exp))))
        if not go and not blocksize and exp.request_alignment > 1:
            self.send(b"".join(parts))
            raise _OptInvalid("request NBD_INFO_BLOCK_SIZE to use this export",
                              proto.REP_ERR_BLOCK_SIZE_REQD)
        if go and not self._attach(exp):
            raise _OptInvalid("export '%s' not present" % _sanitize(name), REP_ERR_UNKNOWN)
        parts.append(self.reply(REP_ACK))
        self.send(b"".join(parts))
        if go:
            self._select_meta(exp)
            return True, exp
        return False, None

    def _attach(self, exp: Any) -> bool:
        """Join the export's clients before the reply that starts transmission,
        so the command layer never misses a client that is about to start."""
        if not exp.attach(self.conn):
            return False
        self.conn.export = exp
        return True

    def _select_meta(self, exp: Any) -> None:
        """Keep the SET_META_CONTEXT selection only if it was made for ``exp``."""
        self.conn.contexts = list(self.meta) if self.meta_export is exp else []

    def meta_queries(self, listing: bool) -> None:
        """NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""
        if not listing and not self.conn.structured:
            raise _OptInvalid("request option '%s' when structured reply is not negotiated"
                              % proto.opt_name(self.option))
        if not listing:  # SET forgets the previous selection even if it fails
            self.meta_export, self.meta = None, []
        name = self.opt_name()
        exp = self._lookup(name)
        if exp is None:
            raise _OptInvalid("export '%s' not present" % _sanitize(name), REP_ERR_UNKNOWN)
        (nqueries,) = U32.unpack(self.opt_read(4))
        selected = {}
        if listing and not nqueries:
            selected = {ctx.id: ctx for ctx in exp.contexts}
        for _i in range(nqueries):
            (length,) = U32.unpack(self.opt_read(4))
            if length > proto.MAX_STRING_SIZE:
                if length > self.optlen:
                    raise _OptInvalid("Inconsistent lengths in option %s"
                                      % proto.opt_name(self.option))
                self.optlen -= length
                self.skip(length)
                continue
            for ctx in exp.match_contexts(self.opt_string(length), listing):
                selected[ctx.id] = ctx
        if self.optlen:
            self.reject_length()
        chosen = [selected[k] for k in sorted(selected)]
        parts = []
        for ctx in chosen:
            raw = ctx.name.encode("utf-8")
            parts.append(self.reply(REP_META_CONTEXT, U32.pack(0 if listing else ctx.id) + raw))
        parts.append(self.reply(REP_ACK))
        self.send(b"".join(parts))
        if not listing:
            self.meta_export, self.meta = exp, chosen


def negotiate(conn: NBDConnection) -> Optional[Any]:
    """Run the handshake on ``conn``.

    :param conn: a fresh connection.
    :return: the export the client chose, or None if it aborted.
    :raises Disconnect: the client must be dropped (with the reason).
    """
    return _Negotiation(conn).run()
