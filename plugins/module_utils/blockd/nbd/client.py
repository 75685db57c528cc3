# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""An NBD client (standard library only), for copy engines and tests.

Handshake: :mod:`.client_handshake` (fixed newstyle, ``NBD_OPT_STARTTLS``,
``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_SET_META_CONTEXT``, ``NBD_OPT_GO``
with INFO_EXPORT/BLOCK_SIZE, ``NBD_OPT_LIST``).  Transports and URIs:
:mod:`.client_transport` (unix, TCP, TLS via :mod:`ssl`, any connected
socket-like object, libnbd-style URIs).

Transmission follows QEMU's ``nbd_co_send_request`` /
``nbd_receive_reply`` / ``nbd_co_receive_structured_payload`` /
``nbd_parse_blockstatus_payload``: any thread sends requests under a lock
(each gets a cookie); one reader thread per connection reads simple replies
and structured chunks (``OFFSET_DATA``/``OFFSET_HOLE`` straight into the
request's buffer, ``BLOCK_STATUS`` for each negotiated context,
``ERROR``/``ERROR_OFFSET``) and completes the matching :class:`NBDRequest`
(a small future).  A server that breaks the protocol (bad magic, unknown
cookie, lengths out of bounds, data outside the request) kills the
connection with :class:`NBDProtocolError` for every pending request; a chunk
that is well formed but wrong for its request only fails that request.
Nothing is allocated from a length before it is checked.  A server that
goes away fails pending requests with :class:`NBDDisconnected`.

Entry points: :func:`connect` (unix path, ``(host, port)`` or a connected
socket-like object), :func:`connect_uri`, :func:`list_exports`, and
:class:`ConnectionPool` (multi-conn).  Offsets come first everywhere:
``pread(offset, length)``, ``pwrite(offset, data)``.
"""

from __future__ import annotations

import errno
import itertools
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import proto
from .client_handshake import (  # noqa: F401  (re-exported)
    ExportInfo, Extent, Handshake, NBDCommandError, NBDDisconnected, NBDError, NBDOptionError,
    NBDProtocolError, NBDTimeout, NBDTLSError, NBDUsageError, _close_quietly, _recv_into,
    _uri_kwargs, list_exports, list_meta_contexts)
from .client_transport import (  # noqa: F401  (re-exported)
    DEFAULT_PORT, NBDURI, URIError, open_socket, parse_uri, tls_context)

__all__ = [
    "ConnectionPool", "DEFAULT_CONTEXTS", "DEFAULT_PORT", "ExportInfo", "Extent", "NBDClient",
    "NBDCommandError", "NBDDisconnected", "NBDError", "NBDOptionError", "NBDProtocolError",
    "NBDRequest", "NBDTLSError", "NBDTimeout", "NBDURI", "NBDUsageError", "URIError", "connect",
    "connect_uri", "list_exports", "list_meta_contexts", "open_socket", "parse_uri", "tls_context",
]

#: Largest BLOCK_STATUS chunk accepted (context id + twice QEMU's extent cap).
MAX_BLOCK_STATUS_CHUNK = 4 + 16 * proto.MAX_BLOCK_STATUS_EXTENTS
#: Largest chunk of an unknown type accepted (then discarded).
MAX_OTHER_CHUNK = 64 * 1024
#: Largest write-zeroes/trim request sent (longer ones are split).
MAX_ZERO_REQUEST = 1 << 30
#: Default metadata contexts asked for.
DEFAULT_CONTEXTS = (proto.CONTEXT_BASE_ALLOCATION,)

_ZEROES = bytes(1 << 20)
_EXTENT = struct.Struct(">II")
_ERR_HEAD = struct.Struct(">IH")
_Address = Union[str, Tuple[str, int], Any]


class NBDRequest:
    """One request in flight: a small future completed by the reader thread.

    :ivar cmd: ``CMD_*``; ``offset``/``length``/``flags`` as sent.
    :ivar buf: the read buffer (READ only).
    :ivar holes: ``(offset, length)`` of OFFSET_HOLE chunks (structured READ).
    :ivar extents: context name -> list of :class:`Extent` (BLOCK_STATUS).
    """

    __slots__ = ("cmd", "offset", "length", "flags", "cookie", "buf", "holes", "extents",
                 "_target", "_covered", "_error", "_event", "_callbacks", "_ids")

    def __init__(self, cmd: int, offset: int, length: int, flags: int,
                 buf: Optional[Any] = None) -> None:
        self.cmd, self.offset, self.length, self.flags = cmd, offset, length, flags
        self.cookie = 0
        self._target = buf
        self.buf: Optional[memoryview] = memoryview(buf).cast("B") if buf is not None else None
        self.holes: List[Tuple[int, int]] = []
        self.extents: Dict[str, List[Extent]] = {}
        self._covered = 0
        self._error: Optional[BaseException] = None
        self._event = threading.Event()
        self._callbacks: List[Callable[["NBDRequest"], Any]] = []
        self._ids: Dict[int, str] = {}

    def done(self) -> bool:
        """Whether the request completed (successfully or not)."""
        return self._event.is_set()

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """Wait, then the error (None on success).

        :raises NBDTimeout: not completed within ``timeout``.
        """
        if not self._event.wait(timeout):
            raise NBDTimeout("NBD %s at offset %d: no reply within %s s"
                             % (proto.cmd_name(self.cmd), self.offset, timeout))
        return self._error

    def result(self, timeout: Optional[float] = None) -> Any:
        """Wait, then the value: the read buffer, the extents dict, or None.

        :raises NBDError: the request failed, the connection died, or timeout.
        """
        err = self.exception(timeout)
        if err is not None:
            raise err
        if self.cmd == proto.CMD_READ:
            return self._target
        if self.cmd == proto.CMD_BLOCK_STATUS:
            return self.extents
        return None

    def add_done_callback(self, fn: Callable[["NBDRequest"], Any]) -> None:
        """Call ``fn(request)`` on completion (at once if already done).

        It usually runs in the connection's reader thread, so it must not wait
        for another request of the same connection (that would deadlock).
        """
        if self._event.is_set():
            fn(self)
        else:
            self._callbacks.append(fn)
            if self._event.is_set() and fn in self._callbacks:
                self._callbacks.remove(fn)
                fn(self)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc

    def _complete(self) -> None:
        self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - a callback must not kill the reader
                pass


class NBDClient:
    """One NBD connection in transmission phase.  Use :func:`connect`/:func:`connect_uri`.

    :param sock: a connected socket-like object (``recv_into``/``recv``, ``sendall``).
    :param export: the export name.
    :param tls: an :class:`ssl.SSLContext` to require TLS (see :func:`tls_context`).
    :param tls_hostname: name checked in the server certificate.
    :param structured_replies: ask for structured replies (needed for holes and block status).
    :param meta_contexts: contexts to negotiate (``base:allocation``,
        ``qemu:dirty-bitmap:NAME``, ``qemu:allocation-depth``).
    :param block_size: ask for NBD_INFO_BLOCK_SIZE (and honour it).
    :param handshake_timeout: seconds to wait for each handshake reply (None: forever).
    :param strict: refuse requests the export did not advertise before sending
        them (as libnbd's strict mode); False lets the server answer.
    """

    def __init__(self, sock: Any, export: str = "", *, tls: Optional[ssl.SSLContext] = None,
                 tls_hostname: Optional[str] = None, structured_replies: bool = True,
                 meta_contexts: Sequence[str] = DEFAULT_CONTEXTS, block_size: bool = True,
                 handshake_timeout: Optional[float] = 30.0, strict: bool = True) -> None:
        self.strict = strict
        self.info = ExportInfo(name=export)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: Dict[int, NBDRequest] = {}
        self._cookies = itertools.count(1)
        self._dead: Optional[NBDError] = None
        self._closing = False
        hs = Handshake(sock)
        try:
            hs.sock.settimeout(handshake_timeout)
            hs.greeting()
            if tls is not None:
                hs.starttls(tls, tls_hostname)
            self.info.tls = hs.tls
            if structured_replies:
                self.info.structured_replies = hs.structured_replies()
            if meta_contexts and self.info.structured_replies:
                self.info.contexts = hs.meta_contexts(proto.OPT_SET_META_CONTEXT, export,
                                                      meta_contexts)
            hs.go(export, self.info, block_size)
            hs.sock.settimeout(None)
        except BaseException as exc:
            if isinstance(exc, NBDOptionError):
                hs.abort()  # end the session cleanly: the server logs no failure
            _close_quietly(hs.sock)
            if hs.tls and isinstance(exc, NBDDisconnected):
                raise NBDTLSError("%s, just after the TLS handshake: the server probably "
                                  "rejected the client certificate (or sent none we trust)"
                                  % exc) from None
            raise
        self._sock = hs.sock
        self._ids = {cid: name for name, cid in self.info.contexts.items()}
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="nbd-client-reader")
        self._reader.start()

    # -- properties ------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The export size in bytes."""
        return self.info.size

    @property
    def max_request(self) -> int:
        """Largest READ/WRITE payload sent in one request."""
        return max(self.info.min_block, min(self.info.max_block, proto.MAX_BUFFER_SIZE))

    def can_meta_context(self, name: str) -> bool:
        """Whether context ``name`` was negotiated."""
        return name in self.info.contexts

    @property
    def closed(self) -> bool:
        """Whether the connection is dead or closed."""
        return self._dead is not None

    def __enter__(self) -> "NBDClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------------

    def _check(self, cmd: int, offset: int, length: int, flags: int) -> None:
        """libnbd-like strict checks (``nbd_internal_command_common``)."""
        info = self.info
        if offset < 0 or length < 0 or length > 0xFFFFFFFF or offset + length > (1 << 63):
            raise NBDUsageError("NBD %s: offset %d / length %d out of range"
                                % (proto.cmd_name(cmd), offset, length), errno.EINVAL)
        if not self.strict:
            return
        name = proto.cmd_name(cmd)
        if cmd in (proto.CMD_WRITE, proto.CMD_TRIM, proto.CMD_WRITE_ZEROES) and info.read_only:
            raise NBDUsageError("NBD %s: the export is read-only" % name, errno.EPERM)
        needs = {proto.CMD_FLUSH: info.can_flush, proto.CMD_TRIM: info.can_trim,
                 proto.CMD_WRITE_ZEROES: info.can_zero,
                 proto.CMD_BLOCK_STATUS: bool(info.contexts)}
        if not needs.get(cmd, True):
            raise NBDUsageError("NBD %s: not supported by the export" % name, errno.ENOTSUP)
        if flags & proto.CMD_FLAG_FUA and not info.can_fua:
            raise NBDUsageError("NBD %s: FUA not supported by the export" % name, errno.ENOTSUP)
        if flags & proto.CMD_FLAG_FAST_ZERO and not info.can_fast_zero:
            raise NBDUsageError("NBD %s: FAST_ZERO not supported by the export" % name,
                                errno.ENOTSUP)
        if cmd != proto.CMD_FLUSH and (length == 0 or offset + length > info.size):
            raise NBDUsageError("NBD %s of %d bytes at offset %d: outside the export (size %d)"
                                % (name, length, offset, info.size), errno.EINVAL)
        align = info.min_block
        unaligned = offset % align or (length % align and offset + length != info.size)
        if unaligned and cmd in (proto.CMD_READ, proto.CMD_WRITE, proto.CMD_TRIM,
                                 proto.CMD_WRITE_ZEROES):
            raise NBDUsageError("NBD %s of %d bytes at offset %d: not aligned to the export's "
                                "minimum block size %d" % (name, length, offset, align),
                                errno.EINVAL)
        if cmd in (proto.CMD_READ, proto.CMD_WRITE) and length > self.max_request:
            raise NBDUsageError("NBD %s of %d bytes: larger than the maximum block size %d"
                                % (name, length, self.max_request), errno.EINVAL)

    def submit(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
               payload: Optional[Any] = None, buf: Optional[Any] = None) -> NBDRequest:
        """Send any request and return its future (``nbd_co_send_request``).

        :param payload: WRITE data (``length`` is its size).
        :param buf: READ destination (writable, ``length`` bytes; allocated if None).
        :raises NBDError: connection already dead, or strict checks failed.
        """
        if payload is not None:
            payload = memoryview(payload).cast("B")
            length = len(payload)
        self._check(cmd, offset, length, flags)
        if cmd == proto.CMD_READ:
            if buf is None:
                buf = bytearray(length)
            elif memoryview(buf).nbytes != length or memoryview(buf).readonly:
                raise NBDUsageError("read buffer of %d bytes (read-only: %s) for a %d byte read"
                                    % (memoryview(buf).nbytes, memoryview(buf).readonly,
                                       length), errno.EINVAL)
        req = NBDRequest(cmd, offset, length, flags, buf)
        with self._lock:
            if self._dead is not None:
                raise self._dead
            req.cookie = next(self._cookies)
            self._pending[req.cookie] = req
        header = proto.pack_request(cmd, req.cookie, offset, length, flags)
        try:
            with self._send_lock:
                if payload is not None and len(payload) <= 65536:
                    self._sock.sendall(header + payload.tobytes())
                else:
                    self._sock.sendall(header)
                    if payload is not None:
                        self._sock.sendall(payload)
        except (OSError, ssl.SSLError) as exc:
            self._die(NBDDisconnected("NBD connection lost while sending %s: %s"
                                      % (proto.cmd_name(cmd), exc)))
        return req

    def submit_read(self, offset: int, length: int, buf: Optional[Any] = None) -> NBDRequest:
        """NBD_CMD_READ; ``result()`` is the buffer (a new bytearray unless ``buf``)."""
        return self.submit(proto.CMD_READ, offset, length, buf=buf)

    def submit_write(self, offset: int, data: Any, fua: bool = False) -> NBDRequest:
        """NBD_CMD_WRITE of ``data`` (bytes-like)."""
        return self.submit(proto.CMD_WRITE, offset, flags=proto.CMD_FLAG_FUA if fua else 0,
                           payload=data)

    def submit_zero(self, offset: int, length: int, *, fast: bool = False, no_hole: bool = False,
                    fua: bool = False) -> NBDRequest:
        """NBD_CMD_WRITE_ZEROES (FAST_ZERO, NO_HOLE, FUA flags)."""
        flags = ((proto.CMD_FLAG_FAST_ZERO if fast else 0)
                 | (proto.CMD_FLAG_NO_HOLE if no_hole else 0)
                 | (proto.CMD_FLAG_FUA if fua else 0))
        return self.submit(proto.CMD_WRITE_ZEROES, offset, length, flags)

    def submit_trim(self, offset: int, length: int, fua: bool = False) -> NBDRequest:
        """NBD_CMD_TRIM."""
        return self.submit(proto.CMD_TRIM, offset, length, proto.CMD_FLAG_FUA if fua else 0)

    def submit_flush(self) -> NBDRequest:
        """NBD_CMD_FLUSH."""
        return self.submit(proto.CMD_FLUSH)

    def submit_block_status(self, offset: int, length: int, req_one: bool = False) -> NBDRequest:
        """NBD_CMD_BLOCK_STATUS; ``result()`` is ``{context: [Extent, ...]}``."""
        length = min(length, 0xFFFFFFFF)
        return self.submit(proto.CMD_BLOCK_STATUS, offset, length,
                           proto.CMD_FLAG_REQ_ONE if req_one else 0)

    # -- blocking helpers ------------------------------------------------------------------

    def _pieces(self, offset: int, length: int, step: int) -> List[Tuple[int, int]]:
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    def pread_into(self, offset: int, buf: Any, timeout: Optional[float] = None) -> None:
        """Fill ``buf`` from ``offset`` (split into max-size requests, all in flight)."""
        view = memoryview(buf).cast("B")
        reqs = [self.submit_read(o, n, view[o - offset:o - offset + n])
                for o, n in self._pieces(offset, len(view), self.max_request)]
        _wait_all(reqs, timeout)

    def pread(self, offset: int, length: int, timeout: Optional[float] = None) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        buf = bytearray(length)
        self.pread_into(offset, buf, timeout)
        return bytes(buf)

    def pwrite(self, offset: int, data: Any, fua: bool = False,
               timeout: Optional[float] = None) -> None:
        """Write ``data`` at ``offset`` (split into max-size requests)."""
        view = memoryview(data).cast("B")
        reqs = [self.submit_write(o, view[o - offset:o - offset + n], fua)
                for o, n in self._pieces(offset, len(view), self.max_request)]
        _wait_all(reqs, timeout)

    def zero(self, offset: int, length: int, *, fast: bool = False, no_hole: bool = False,
             fua: bool = False, timeout: Optional[float] = None) -> None:
        """Write zeroes over ``length`` bytes at ``offset``."""
        reqs = [self.submit_zero(o, n, fast=fast, no_hole=no_hole, fua=fua)
                for o, n in self._pieces(offset, length, MAX_ZERO_REQUEST)]
        _wait_all(reqs, timeout)

    def trim(self, offset: int, length: int, fua: bool = False,
             timeout: Optional[float] = None) -> None:
        """Discard ``length`` bytes at ``offset``."""
        reqs = [self.submit_trim(o, n, fua)
                for o, n in self._pieces(offset, length, MAX_ZERO_REQUEST)]
        _wait_all(reqs, timeout)

    def flush(self, timeout: Optional[float] = None) -> None:
        """NBD_CMD_FLUSH, waited for."""
        self.submit_flush().result(timeout)

    def block_status(self, offset: int, length: int, req_one: bool = False,
                     timeout: Optional[float] = None) -> Dict[str, List[Extent]]:
        """One NBD_CMD_BLOCK_STATUS: ``{context: [Extent(offset, length, flags), ...]}``.

        The server may describe less than ``length`` (or, for the last
        extent, more); call again from the end of what came back.
        """
        return self.submit_block_status(offset, length, req_one).result(timeout)

    def map(self, context: str = proto.CONTEXT_BASE_ALLOCATION, offset: int = 0,
            length: Optional[int] = None) -> List[Extent]:
        """Extents of ``context`` over a whole range (repeated BLOCK_STATUS), merged.

        :return: extents covering exactly ``[offset, offset+length)``,
            adjacent ones with equal flags merged (as ``nbdinfo --map``).
        """
        end = self.size if length is None else offset + length
        out: List[Extent] = []
        pos = offset
        while pos < end:
            got = self.block_status(pos, min(end - pos, 0xFFFFFFFF - 0xFFFF)).get(context)
            if not got:
                raise NBDProtocolError("server sent no extents for %r at offset %d"
                                       % (context, pos))
            for ext in got:
                length_ = min(ext.length, end - ext.offset)
                last = out[-1] if out else None
                if last and last.flags == ext.flags and last.offset + last.length == ext.offset:
                    out[-1] = Extent(out[-1].offset, out[-1].length + length_, ext.flags)
                else:
                    out.append(Extent(ext.offset, length_, ext.flags))
                pos = ext.offset + length_
                if pos >= end:
                    break
        return out

    # -- closing ---------------------------------------------------------------------------

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Wait for pending requests, send NBD_CMD_DISC and close (``nbd_client_close``)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = list(self._pending.values())
            alive = self._dead is None
        if alive:
            deadline = None if timeout is None else time.monotonic() + timeout
            for req in pending:
                req._event.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                with self._send_lock:
                    self._sock.sendall(proto.pack_request(proto.CMD_DISC, 0, 0, 0))
            except (OSError, ssl.SSLError):
                pass
        self._die(NBDDisconnected("NBD connection closed by the client"))
        self._reader.join(timeout)

    def _die(self, exc: NBDError) -> None:
        """Mark the connection dead, fail every pending request, close the socket."""
        with self._lock:
            if self._dead is None:
                self._dead = exc
            pending, self._pending = list(self._pending.values()), {}
        for req in pending:
            req._fail(self._dead)
            req._complete()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ssl.SSLError):
            pass
        _close_quietly(self._sock)

    # -- receiving --------------------------------------------------------------------------

    def _read_loop(self) -> None:
        """The reader thread: replies until the connection dies."""
        try:
            header = bytearray(proto.CHUNK.size)
            view = memoryview(header)
            while True:
                _recv_into(self._sock, view[:16], "a reply header")
                magic = proto.U32.unpack_from(header)[0]
                if magic == proto.SIMPLE_REPLY_MAGIC:
                    self._simple_reply(header)
                elif magic == proto.STRUCTURED_REPLY_MAGIC:
                    if not self.info.structured_replies:
                        raise NBDProtocolError("structured reply chunk without negotiation")
                    _recv_into(self._sock, view[16:], "a reply header")
                    self._chunk(header)
                else:
                    raise NBDProtocolError("invalid reply magic %#x from the server" % magic)
        except NBDError as exc:
            if self._closing and isinstance(exc, (NBDDisconnected, NBDTLSError)):
                exc = NBDDisconnected("NBD connection closed by the client")
            self._die(exc)
        except Exception as exc:  # noqa: BLE001 - never leave requests hanging
            self._die(NBDProtocolError("NBD client reader failed: %r" % exc))

    def _lookup(self, cookie: int) -> NBDRequest:
        with self._lock:
            req = self._pending.get(cookie)
        if req is None:
            raise NBDProtocolError("server replied to unknown cookie %#x" % cookie)
        return req

    def _finish(self, req: NBDRequest) -> None:
        with self._lock:
            self._pending.pop(req.cookie, None)
        req._complete()

    def _simple_reply(self, header: bytearray) -> None:
        """``nbd_receive_simple_reply`` + the READ payload."""
        _magic, error, cookie = proto.SIMPLE_REPLY.unpack_from(header)
        req = self._lookup(cookie)
        if error:
            req._fail(NBDCommandError(req.cmd, error, req.offset, req.length))
        elif req.cmd == proto.CMD_READ:
            _recv_into(self._sock, req.buf, "read data")
        elif req.cmd == proto.CMD_BLOCK_STATUS:
            req._fail(NBDProtocolError("simple reply without extents to NBD_CMD_BLOCK_STATUS"))
        self._finish(req)

    def _payload(self, length: int, limit: int, what: str) -> bytes:
        if length > limit:
            raise NBDProtocolError("%s chunk of %d bytes is too long (max %d)"
                                   % (what, length, limit))
        buf = bytearray(length)
        _recv_into(self._sock, memoryview(buf), what)
        return bytes(buf)

    def _chunk(self, header: bytearray) -> None:
        """One structured chunk (``nbd_co_do_receive_one_chunk``)."""
        _magic, flags, rtype, cookie, length = proto.CHUNK.unpack_from(header)
        req = self._lookup(cookie)
        if rtype == proto.REPLY_TYPE_NONE:
            if length or not flags & proto.REPLY_FLAG_DONE:
                raise NBDProtocolError("NBD_REPLY_TYPE_NONE chunk with length %d, flags %#x"
                                       % (length, flags))
        elif rtype == proto.REPLY_TYPE_OFFSET_DATA:
            self._offset_data(req, length)
        elif rtype == proto.REPLY_TYPE_OFFSET_HOLE:
            if length != 12:
                raise NBDProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE of %d bytes" % length)
            off, size = struct.unpack(">QI", self._payload(12, 12, "hole"))
            start = self._range(req, off, size, "hole")
            end = start + size
            while start < end:
                n = min(end - start, len(_ZEROES))
                req.buf[start:start + n] = _ZEROES[:n]
                start += n
            req.holes.append((off, size))
        elif rtype == proto.REPLY_TYPE_BLOCK_STATUS:
            self._block_status_chunk(req, self._payload(length, MAX_BLOCK_STATUS_CHUNK,
                                                        "block status"))
        elif rtype & (1 << 15):
            self._error_chunk(req, rtype, self._payload(length, 6 + 8 + proto.MAX_STRING_SIZE,
                                                        "error"))
        else:
            self._payload(length, MAX_OTHER_CHUNK, "unknown")
            req._fail(NBDProtocolError("unknown structured reply type %d" % rtype))
        if flags & proto.REPLY_FLAG_DONE:
            self._done(req)

    def _range(self, req: NBDRequest, off: int, size: int, what: str) -> int:
        """Check ``[off, off+size)`` lies in a READ request; the index in its buffer."""
        if req.cmd != proto.CMD_READ:
            raise NBDProtocolError("%s chunk for a %s request" % (what, proto.cmd_name(req.cmd)))
        if size == 0 or off < req.offset or off + size > req.offset + req.length:
            raise NBDProtocolError("%s chunk [%d, +%d) outside the request [%d, +%d)"
                                   % (what, off, size, req.offset, req.length))
        req._covered += size
        if req._covered > req.length:
            raise NBDProtocolError("server sent more than %d bytes for a read" % req.length)
        return off - req.offset

    def _offset_data(self, req: NBDRequest, length: int) -> None:
        if length <= 8:
            raise NBDProtocolError("NBD_REPLY_TYPE_OFFSET_DATA of %d bytes" % length)
        off = struct.unpack(">Q", self._payload(8, 8, "data"))[0]
        start = self._range(req, off, length - 8, "data")
        _recv_into(self._sock, req.buf[start:start + length - 8], "read data")

    def _block_status_chunk(self, req: NBDRequest, payload: bytes) -> None:
        """``nbd_parse_blockstatus_payload``."""
        if req.cmd != proto.CMD_BLOCK_STATUS:
            raise NBDProtocolError("block status chunk for a %s request" % proto.cmd_name(req.cmd))
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise NBDProtocolError("block status chunk of %d bytes" % len(payload))
        cid = proto.U32.unpack_from(payload)[0]
        name = self._ids.get(cid)
        if name is None:
            raise NBDProtocolError("block status for context id %d, which was not negotiated" % cid)
        if name in req.extents:
            req._fail(NBDProtocolError("two block status chunks for context %r" % name))
            return
        out, pos = [], req.offset
        for n, flags in _EXTENT.iter_unpack(payload[4:]):
            if n == 0:
                req._fail(NBDProtocolError("zero-length extent for context %r" % name))
                return
            out.append(Extent(pos, n, flags))
            pos += n
        if req.flags & proto.CMD_FLAG_REQ_ONE and len(out) != 1:
            req._fail(NBDProtocolError("%d extents for context %r despite REQ_ONE"
                                       % (len(out), name)))
        req.extents[name] = out

    def _error_chunk(self, req: NBDRequest, rtype: int, payload: bytes) -> None:
        """ERROR / ERROR_OFFSET (``nbd_parse_error_payload``)."""
        if len(payload) < 6:
            raise NBDProtocolError("error chunk of %d bytes" % len(payload))
        code, mlen = _ERR_HEAD.unpack_from(payload)
        extra = 8 if rtype == proto.REPLY_TYPE_ERROR_OFFSET else 0
        if rtype in (proto.REPLY_TYPE_ERROR, proto.REPLY_TYPE_ERROR_OFFSET) \
                and len(payload) != 6 + mlen + extra:
            raise NBDProtocolError("error chunk of %d bytes with a %d byte message"
                                   % (len(payload), mlen))
        if code == 0:
            raise NBDProtocolError("error chunk with error code 0")
        message = payload[6:6 + mlen].decode("utf-8", "replace")
        where = struct.unpack_from(">Q", payload, 6 + mlen)[0] if extra else None
        req._fail(NBDCommandError(req.cmd, code, req.offset, req.length, message, where))

    def _done(self, req: NBDRequest) -> None:
        """Last chunk: check the reply is complete (``nbd_reply_chunk_iter_receive``)."""
        if req._error is None:
            if req.cmd == proto.CMD_READ and req._covered != req.length:
                req._fail(NBDProtocolError("server sent %d of %d bytes of a read"
                                           % (req._covered, req.length)))
            elif req.cmd == proto.CMD_BLOCK_STATUS and not req.extents:
                req._fail(NBDProtocolError("block status reply without extents"))
        self._finish(req)


# -- helpers ------------------------------------------------------------------------------

def _wait_all(reqs: Sequence[NBDRequest], timeout: Optional[float]) -> None:
    """Wait for every request; raise the first error (after all completed)."""
    first: Optional[BaseException] = None
    for req in reqs:
        err = req.exception(timeout)
        if err is not None and first is None:
            first = err
    if first is not None:
        raise first


def connect(address: _Address, export: str = "", *, connect_timeout: Optional[float] = 30.0,
            **kwargs: Any) -> NBDClient:
    """Open a connection and negotiate ``export``.

    :param address: unix socket path, ``(host, port)``, or a connected
        socket-like object (e.g. an SSH channel: ``recv``/``sendall``).
    :param kwargs: :class:`NBDClient` options (``tls``, ``meta_contexts``...).
        With TLS over TCP the host name is checked unless ``tls_hostname`` says otherwise.
    """
    if isinstance(address, (str, bytes)) or hasattr(address, "__fspath__") \
            or isinstance(address, tuple):
        try:
            sock: Any = open_socket(address, connect_timeout)
        except socket.timeout:
            raise NBDTimeout("connecting to NBD server %r timed out" % (address,)) from None
        except OSError as exc:
            raise NBDError("cannot connect to NBD server %r: %s" % (address, exc.strerror or exc),
                           exc.errno or errno.ECONNREFUSED) from None
        if isinstance(address, tuple) and kwargs.get("tls") is not None:
            kwargs.setdefault("tls_hostname", address[0])
    else:
        sock = address
    kwargs.setdefault("handshake_timeout", connect_timeout)
    return NBDClient(sock, export, **kwargs)


def connect_uri(uri: str, **kwargs: Any) -> NBDClient:
    """Connect to an NBD URI (see :func:`parse_uri`); ``nbds`` requires TLS.

    :param kwargs: :func:`connect`/:class:`NBDClient` options; an explicit
        ``tls`` context replaces the one made from the URI.  ``nbd+ssh``:
        also the ``ssh_*`` options of :func:`.client_ssh.open_uri_channel`.
    """
    parsed, kw = _uri_kwargs(uri, kwargs)
    if parsed.transport == "ssh":
        from .client_ssh import open_uri_channel  # paramiko is optional: imported on use
        return connect(open_uri_channel(parsed, kw), parsed.export, **kw)
    return connect(parsed.address, parsed.export, **kw)


class ConnectionPool:
    """N connections to one export when the server advertises CAN_MULTI_CONN.

    The first connection decides: without CAN_MULTI_CONN the pool has one
    connection (spec: a client must not use several then, for consistency).
    Requests go round-robin; ``pread``/``pwrite`` spread their pieces over
    all connections.

    :param factory: returns a new connected :class:`NBDClient`.
    :param connections: how many connections to open at most.
    """

    def __init__(self, factory: Callable[[], NBDClient], connections: int = 4) -> None:
        first = factory()
        self.clients: List[NBDClient] = [first]
        try:
            if first.info.can_multi_conn:
                for _i in range(max(0, connections - 1)):
                    self.clients.append(factory())
        except BaseException:
            self.close()
            raise
        self._next = itertools.count()

    @classmethod
    def from_uri(cls, uri: str, connections: int = 4, **kwargs: Any) -> "ConnectionPool":
        """A pool of :func:`connect_uri` connections."""
        return cls(lambda: connect_uri(uri, **kwargs), connections)

    @property
    def info(self) -> ExportInfo:
        """The first connection's export information."""
        return self.clients[0].info

    @property
    def size(self) -> int:
        """The export size."""
        return self.info.size

    def pick(self) -> NBDClient:
        """The next connection (round-robin)."""
        return self.clients[next(self._next) % len(self.clients)]

    def submit_read(self, offset: int, length: int, buf: Optional[Any] = None) -> NBDRequest:
        """As :meth:`NBDClient.submit_read` on the next connection."""
        return self.pick().submit_read(offset, length, buf)

    def submit_write(self, offset: int, data: Any, fua: bool = False) -> NBDRequest:
        """As :meth:`NBDClient.submit_write` on the next connection."""
        return self.pick().submit_write(offset, data, fua)

    def pread(self, offset: int, length: int, timeout: Optional[float] = None) -> bytes:
        """Read, pieces spread over the connections."""
        buf = bytearray(length)
        view = memoryview(buf)
        step = self.clients[0].max_request
        reqs = [self.submit_read(o, n, view[o - offset:o - offset + n])
                for o, n in self.clients[0]._pieces(offset, length, step)]
        _wait_all(reqs, timeout)
        return bytes(buf)

    def pwrite(self, offset: int, data: Any, fua: bool = False,
               timeout: Optional[float] = None) -> None:
        """Write, pieces spread over the connections."""
        view = memoryview(data).cast("B")
        step = self.clients[0].max_request
        reqs = [self.submit_write(o, view[o - offset:o - offset + n], fua)
                for o, n in self.clients[0]._pieces(offset, len(view), step)]
        _wait_all(reqs, timeout)

    def block_status(self, offset: int, length: int,
                     req_one: bool = False) -> Dict[str, List[Extent]]:
        """As :meth:`NBDClient.block_status` on the next connection."""
        return self.pick().block_status(offset, length, req_one)

    def flush(self) -> None:
        """Flush (with multi-conn, one flush covers writes completed on every connection)."""
        self.clients[0].flush()

    def close(self) -> None:
        """Close every connection."""
        for client in self.clients:
            client.close()

    def __enter__(self) -> "ConnectionPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
