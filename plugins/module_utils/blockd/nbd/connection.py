# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One NBD client connection: fixed-newstyle handshake, then transmission.

Each connection runs in its own (daemon) thread with a *blocking* socket and
a serial request loop: clients pipeline requests, so one thread per
connection keeps the pipe full while the GIL is released in every system
call that matters (``recv_into``, ``pwrite``, ``sendfile``).  Replies are
written by that thread only, so no send lock is needed; a reply is written
as one header plus its payload, never interleaved with another.

Data path rules (see :mod:`blockd.graph.backend`):

* every request enters the I/O gate, reads ``backend.root`` once, does its
  I/O and leaves the gate on every path (``try/finally``);
* a WRITE payload is received *before* the gate is entered, and every reply
  without payload is sent *after* it is left, so a client that stops
  sending or reading does not hold the gate;
* READ data is sent *inside* the gate in zero-copy mode (the default):
  file segments are ``sendfile``-d straight from the node's descriptor,
  which is only guaranteed to stay open (and to hold the right data) while
  the gate is held.  The socket has ``SO_SNDTIMEO`` = 1 s, so a send that
  makes no progress wakes up every second; if a graph change is then
  waiting to drain and the client has not read anything for
  :data:`DRAIN_STALL_SECS`, the client is dropped.  A stalled reader thus
  delays a drain by at most that long and never blocks QMP forever.
* ``sendfile`` queues *references* to page-cache pages: bytes a write puts
  there before the client has read the reply show through.  That only
  affects requests that overlap in time (where any result is allowed), but
  it breaks a point-in-time view of a file that keeps being written (a
  fleecing export reading through to the live source).  An export created
  with ``zero_copy=False`` therefore copies READ data into the connection's
  buffer inside the gate and sends it after leaving the gate.

Over TLS (after ``NBD_OPT_STARTTLS``, see :meth:`NBDConnection.start_tls`)
the socket is a :class:`.tls.TLSStream` and nothing is zero-copy: file
segments are ``pread`` and encrypted, with the same stall policy for sends
that make no progress.  The plain path does not test for TLS at all.

Errors follow the NBD specification where QEMU departs from it: EPERM for
writes on a read-only export, ENOSPC for writes past the end, EINVAL for a
FLUSH with a nonzero offset or length.  Messages match QEMU's where QEMU
has one.  The buffer handed to ``pwrite`` is reused for the next request
once the call returns, so drivers must copy whatever they keep.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import struct
import threading
import time
from typing import Any, List, Optional

from ..graph.io import REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK, SEG_DATA, SEG_FD, SEG_ZERO
from . import proto
from .proto import (CHUNK, CHUNK_ERROR, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CMD_BLOCK_STATUS,
                    CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
                    CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM,
                    CMD_WRITE, CMD_WRITE_ZEROES, MAX_BUFFER_SIZE, REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
                    REPLY_TYPE_OFFSET_HOLE, REQUEST, REQUEST_MAGIC, SIMPLE_REPLY,
                    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC)

LOG = logging.getLogger("blockd.nbd")

#: Seconds a client may leave a READ reply unread while a drain waits.
DRAIN_STALL_SECS = 5.0
#: How often a blocked send wakes up to look at the gate (SO_SNDTIMEO).
SEND_POLL_SECS = 1
#: Socket buffer size requested for every connection (capped by net.core.[rw]mem_max).
SOCKET_BUFFER = 4 * 1024 * 1024

_ZEROES = bytes(1024 * 1024)
_ZERO_VIEW = memoryview(_ZEROES)
#: errnos that mean the peer or our own socket is gone (not the file).
_SOCKET_ERRNOS = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN,
                            errno.EBADF, errno.ETIMEDOUT))
#: errnos of sendfile meaning "not supported for this file": fall back to pread.
_NO_SENDFILE_ERRNOS = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))


class Disconnect(Exception):
    """End the connection (protocol violation, EOF, DISC, or a dead socket)."""


class _FileError(Exception):
    """Reading file data failed part-way through a reply.

    :param exc: the OSError.
    :param sent: payload bytes of the current segment already on the wire.
    """

    def __init__(self, exc: OSError, sent: int) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.sent = sent


def _gate_draining(gate: Any) -> bool:
    """Whether a graph change is waiting on ``gate`` to drain."""
    return gate.draining


def configure_socket(sock: socket.socket) -> None:
    """Apply the data-path socket options: big buffers, TCP_NODELAY.

    :param sock: a connected (or listening) stream socket.
    """
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class NBDConnection:
    """A client connection, served by :meth:`run` in its own thread.

    :param sock: the connected socket (owned: closed when :meth:`run` ends).
    :param owner: provides ``exports`` (name -> :class:`NBDExport`, read
        live), ``max_connections`` and ``handshake_timeout``, and is told
        ``connection_closed(conn)`` at the end.
    :param peer: a printable peer address for logs.
    """

    def __init__(self, sock: socket.socket, owner: Any, peer: str = "") -> None:
        self.sock = sock
        self.owner = owner
        self.peer = peer
        self.export: Optional[Any] = None
        self.closing = False
        self.thread: Optional[threading.Thread] = None
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._more = socket.MSG_MORE if self._tcp else 0
        self._fileno = sock.fileno()
        # negotiated state
        self.structured = False
        self.contexts: List[Any] = []
        self._wbuf: Optional[memoryview] = None
        #: Send file data with sendfile (by reference) rather than a copy;
        #: taken from the export when negotiation ends.
        self.zero_copy = True
        self._gate: Any = None
        #: Whether the connection runs over TLS (see :meth:`start_tls`).
        self.tls = False

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Serve the connection in a new daemon thread.

        :return: the thread.
        """
        self.thread = threading.Thread(target=self.run, name="nbd-conn %s" % self.peer,
                                       daemon=True)
        self.thread.start()
        return self.thread

    def close(self) -> None:
        """Drop the connection from any thread (wakes a blocked send or receive)."""
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        """Negotiate, then serve requests until the client leaves or is dropped."""
        try:
            from .handshake import negotiate
            export = negotiate(self)   # attached to the export on success
            if export is not None and not self.closing:
                self._serve(export)
        except Disconnect as exc:
            if str(exc):
                LOG.info("NBD client %s: disconnect client, due to: %s", self.peer, exc)
        except (OSError, EOFError) as exc:
            if not self.closing:
                LOG.debug("NBD client %s: connection lost: %s", self.peer, exc)
        except Exception:  # pragma: no cover - a bug must not kill the server
            LOG.exception("NBD client %s: internal error", self.peer)
        finally:
            self.closing = True
            try:
                self.sock.close()
            except OSError:
                pass
            if self.export is not None:
                self.export.detach(self)
            closed = getattr(self.owner, "connection_closed", None)
            if closed is not None:
                closed(self)

    # -- low-level I/O ----------------------------------------------------------------

    def recv_exact(self, view: memoryview, n: int) -> None:
        """Fill ``view[:n]`` from the socket.

        :param view: where to put the bytes.
        :param n: how many.
        :raises Disconnect: on end of file (with a message if it came mid-way).
        """
        got = 0
        while got < n:
            more = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            if not more:
                raise Disconnect("Unexpected end-of-file before all bytes were read"
                                 if got else "")
            got += more

    def send(self, data: Any, in_gate: bool = False, flags: int = 0) -> None:
        """Send all of ``data``.

        :param data: bytes-like.
        :param in_gate: whether the caller holds the I/O gate (stall policy).
        :param flags: ``MSG_*`` flags (MSG_MORE before a sendfile on TCP).
        """
        try:
            n = self.sock.send(data, flags)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            raise Disconnect("") from exc
        if n != len(data):
            self._send_slow(memoryview(data)[n:], in_gate, flags)

    def send_parts(self, head: bytes, data: Any, in_gate: bool = False) -> None:
        """Send a header and its payload with one ``sendmsg`` when possible.

        :param head: the header.
        :param data: the payload (bytes-like).
        :param in_gate: whether the caller holds the I/O gate.
        """
        try:
            n = self.sock.sendmsg((head, data))
        except BlockingIOError:
            n = 0
        except OSError as exc:
            raise Disconnect("") from exc
        total = len(head) + len(data)
        if n == total:
            return
        if n < len(head):
            self._send_slow(memoryview(head)[n:], in_gate)
            n = len(head)
        self._send_slow(memoryview(data)[n - len(head):], in_gate)

    def _send_slow(self, view: memoryview, in_gate: bool, flags: int = 0) -> None:
        last = time.monotonic()
        while len(view):
            try:
                n = self.sock.send(view, flags)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise Disconnect("") from exc
            if n:
                view = view[n:]
                last = time.monotonic()
            else:
                self._stalled(last, in_gate)

    def _stalled(self, since: float, in_gate: bool) -> None:
        """A send made no progress for SEND_POLL_SECS: decide whether to give up."""
        if self.closing:
            raise Disconnect("")
        if (in_gate and self._gate is not None and _gate_draining(self._gate)
                and time.monotonic() - since >= DRAIN_STALL_SECS):
            raise Disconnect("client stopped reading while a graph change waits")

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` at ``offset`` (inside the gate).

        Short counts are retried; bytes past the end of the file are sent as
        zeroes (QEMU reads them as zeroes too).

        :raises _FileError: the file could not be read.
        :raises Disconnect: the socket is gone or stalled during a drain.
        """
        try:
            sent = os.sendfile(self._fileno, fd, offset, count)
        except BlockingIOError:
            sent = -1
        except OSError as exc:
            sent = self._sendfile_error(exc, fd, offset, count, 0)
        if sent == count:
            return
        done = max(sent, 0)
        last = time.monotonic()
        while done < count:
            if sent == 0:  # end of file: the rest reads as zeroes
                self.send_zeroes(count - done, True)
                return
            try:
                sent = os.sendfile(self._fileno, fd, offset + done, count - done)
            except BlockingIOError:
                sent = -1
            except OSError as exc:
                sent = self._sendfile_error(exc, fd, offset + done, count - done, done)
            if sent > 0:
                done += sent
                last = time.monotonic()
            elif sent < 0:
                self._stalled(last, True)

    def _sendfile_error(self, exc: OSError, fd: int, offset: int, count: int, done: int) -> int:
        if exc.errno in _SOCKET_ERRNOS or self.closing:
            raise Disconnect("") from exc
        if exc.errno in _NO_SENDFILE_ERRNOS:
            self._pread_send(fd, offset, count, done)
            return count
        raise _FileError(exc, done)

    def _pread_send(self, fd: int, offset: int, count: int, done: int) -> None:
        """Copying fallback for files that do not support sendfile."""
        pos = 0
        while pos < count:
            try:
                data = os.pread(fd, min(count - pos, 1 << 20), offset + pos)
            except OSError as exc:
                raise _FileError(exc, done + pos) from exc
            if not data:
                self.send_zeroes(count - pos, True)
                return
            self.send(data, True)
            pos += len(data)

    def send_zeroes(self, count: int, in_gate: bool = False) -> None:
        """Send ``count`` zero bytes."""
        while count > 0:
            n = min(count, len(_ZEROES))
            self.send(_ZERO_VIEW[:n], in_gate)
            count -= n

    # -- TLS ------------------------------------------------------------------------------

    def start_tls(self, stream: Any) -> None:
        """Carry on over ``stream`` (a :class:`.tls.TLSStream` after STARTTLS).

        The plain path is left untouched: instead of testing a flag on every
        send, the send methods of this connection are replaced by copying
        versions (``sendfile`` cannot encrypt: file data is ``pread`` and
        sent through the TLS object).
        """
        self.sock = stream
        self._more = 0
        self.tls = True
        self.send = self._tls_send  # type: ignore[method-assign]
        self.send_parts = self._tls_send_parts  # type: ignore[method-assign]
        self.sendfile = self._tls_sendfile  # type: ignore[method-assign]

    def _tls_send(self, data: Any, in_gate: bool = False, flags: int = 0) -> None:
        self._tls_send_parts(b"", data, in_gate)

    def _tls_send_parts(self, head: bytes, data: Any, in_gate: bool = False) -> None:
        stall = self._stall_in_gate if in_gate else self._stall_outside
        try:
            self.sock.sendall_parts((head, data) if head else (data,), stall)
        except OSError as exc:
            raise Disconnect("") from exc

    def _stall_in_gate(self, since: float) -> None:
        self._stalled(since, True)

    def _stall_outside(self, since: float) -> None:
        self._stalled(since, False)

    def _tls_sendfile(self, fd: int, offset: int, count: int) -> None:
        self._pread_send(fd, offset, count, 0)

    def write_buffer(self, length: int) -> memoryview:
        """A reusable receive buffer of at least ``length`` bytes (lazily mapped)."""
        if self._wbuf is None:
            self._wbuf = memoryview(mmap.mmap(-1, MAX_BUFFER_SIZE))
        return self._wbuf[:length]

    # -- replies ------------------------------------------------------------------------

    def reply_ok(self, cookie: int) -> None:
        """A successful reply without payload (simple, as QEMU sends it)."""
        self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def reply_error(self, cookie: int, nbd_err: int, msg: str) -> None:
        """An error reply: a structured ERROR chunk after SR, else a simple reply.

        :param cookie: the request's cookie.
        :param nbd_err: an ``NBD_E*`` value (nonzero).
        :param msg: the message (sent only in structured replies).
        """
        if self.structured:
            raw = msg.encode("utf-8", "replace")[:4096]
            self.send(CHUNK_ERROR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                       cookie, 6 + len(raw), nbd_err, len(raw)) + raw)
        else:
            self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, nbd_err, cookie))

    def _reply_exc(self, cookie: int, exc: BaseException, msg: str, fast_zero: bool = False) -> None:
        if isinstance(exc, OSError):
            err = proto.nbd_errno(exc.errno, fast_zero)
        else:
            LOG.error("NBD client %s: %s: %r", self.peer, msg, exc)
            err = proto.NBD_EIO
        self.reply_error(cookie, err, msg)

    # -- transmission ---------------------------------------------------------------------

    def _serve(self, export: Any) -> None:
        sock = self.sock
        sock.settimeout(None)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", SEND_POLL_SECS, 0))
        except OSError:
            pass
        backend = export.backend
        gate = self._gate = backend.gate
        self.zero_copy = bool(getattr(export, "zero_copy", True))
        size = export.size
        writable = export.writable
        structured = self.structured
        read_flags = CMD_FLAG_FUA | (CMD_FLAG_DF if structured else 0)
        hdr = bytearray(REQUEST.size)
        hview = memoryview(hdr)
        recv_into = sock.recv_into
        unpack = REQUEST.unpack_from
        waitall = socket.MSG_WAITALL
        while True:
            got = recv_into(hview, 28, waitall)
            if got != 28:
                if not got or self.closing:
                    raise Disconnect("")
                self.recv_exact(hview[got:], 28 - got)
            magic, flags, cmd, cookie, offset, length = unpack(hdr)
            if magic != REQUEST_MAGIC:
                raise Disconnect("invalid magic (got 0x%x)" % magic)
            end = offset + length
            if cmd == CMD_READ:
                if flags & ~read_flags:
                    self._bad_flags(cookie, cmd, flags)
                elif length > MAX_BUFFER_SIZE:
                    self.reply_error(cookie, proto.NBD_EINVAL, "len (%d ) is larger than max len (%d)"
                                     % (length, MAX_BUFFER_SIZE))
                elif end > size:
                    self._past_eof(cookie, proto.NBD_EINVAL, offset, length, size)
                else:
                    self._cmd_read(backend, gate, flags, cookie, offset, length)
            elif cmd == CMD_WRITE:
                self._cmd_write(backend, gate, writable, size, flags, cookie, offset, length)
            elif cmd == CMD_DISC:
                raise Disconnect("")
            else:
                self._cmd_other(backend, gate, writable, size, cmd, flags, cookie, offset, length)

    def _root(self, backend: Any, end: int) -> Any:
        """The current root, checked against ``end`` (inside the gate)."""
        root = backend.root
        if root is None:
            raise OSError(errno.ESHUTDOWN, "Export is shutting down")
        if end > root.getlength():
            raise OSError(errno.EINVAL, "operation past the end of the node")
        return root

    def _bad_flags(self, cookie: int, cmd: int, flags: int) -> None:
        self.reply_error(cookie, proto.NBD_EINVAL, "unsupported flags for command %s (got 0x%x)"
                         % (proto.cmd_name(cmd), flags))

    def _past_eof(self, cookie: int, err: int, offset: int, length: int, size: int) -> None:
        self.reply_error(cookie, err, "operation past EOF; From: %d, Len: %d, Size: %d"
                         % (offset, length, size))

    def _cmd_read(self, backend: Any, gate: Any, flags: int, cookie: int, offset: int,
                  length: int) -> None:
        zero_copy = self.zero_copy
        gate.enter()
        try:
            try:
                root = self._root(backend, offset + length)
                if flags & CMD_FLAG_FUA:
                    root.flush()
                segs = root.read_segments(offset, length) if length else []
                if sum(map(self._seg_len, segs)) != length:
                    raise OSError(errno.EIO, "driver returned a short read")
                if not zero_copy:
                    segs = self._materialize(segs, length)
            except Exception as exc:  # reported below, outside the gate
                failure: Optional[BaseException] = exc
            else:
                failure = None
                if zero_copy:
                    self._send_read(cookie, offset, length, flags, segs, True)
        finally:
            gate.leave()
        if failure is not None:
            self._reply_exc(cookie, failure, "reading from file failed")
        elif not zero_copy:
            self._send_read(cookie, offset, length, flags, segs, False)

    def _materialize(self, segs: List[tuple], length: int) -> List[tuple]:
        """Copy file segments into the connection buffer (the non-zero-copy mode)."""
        buf = self.write_buffer(length)
        pos = 0
        out = []
        for seg in segs:
            if seg[0] == SEG_FD:
                _kind, fd, foff, n = seg
                view = buf[pos:pos + n]
                done = 0
                while done < n:
                    got = os.preadv(fd, [view[done:]], foff + done)
                    if not got:  # end of file: the rest reads as zeroes
                        view[done:] = _ZERO_VIEW[:n - done] if n - done <= len(_ZEROES) \
                            else bytes(n - done)
                        break
                    done += got
                out.append((SEG_DATA, view))
                pos += n
            else:
                out.append(seg)
                pos += seg[1] if seg[0] == SEG_ZERO else len(seg[1])
        return out

    @staticmethod
    def _seg_len(seg: tuple) -> int:
        kind = seg[0]
        return seg[3] if kind == SEG_FD else seg[1] if kind == SEG_ZERO else len(seg[1])

    def _send_read(self, cookie: int, offset: int, length: int, flags: int, segs: List[tuple],
                   in_gate: bool) -> None:
        """Send a READ reply in the negotiated form.

        With structured replies (and no DF) runs of data segments become one
        OFFSET_DATA chunk each and zero segments OFFSET_HOLE chunks; otherwise
        the whole range goes out as one simple reply or one data chunk.
        """
        if self.structured:
            if not length:
                self.send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE,
                                     cookie, 0), in_gate)
                return
            if flags & CMD_FLAG_DF:
                runs = [(SEG_ZERO if all(s[0] == SEG_ZERO for s in segs) else SEG_DATA,
                         length, segs)]
            else:
                runs = self._runs(segs)
            last = len(runs) - 1
            pos = offset
            for i, (kind, n, group) in enumerate(runs):
                done = REPLY_FLAG_DONE if i == last else 0
                if kind == SEG_ZERO:
                    self.send(CHUNK_OFFSET_HOLE.pack(STRUCTURED_REPLY_MAGIC, done,
                                                     REPLY_TYPE_OFFSET_HOLE, cookie, 12, pos, n),
                              in_gate)
                else:
                    head = CHUNK_OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, done,
                                                  REPLY_TYPE_OFFSET_DATA, cookie, n + 8, pos)
                    if not self._send_payload(head, group, n, cookie, bool(done), in_gate):
                        return
                pos += n
        else:
            self._send_payload(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), segs, length,
                               cookie, True, in_gate)

    def _runs(self, segs: List[tuple]) -> List[tuple]:
        """Group segments into ``(SEG_ZERO or SEG_DATA, length, segments)`` runs."""
        runs: List[tuple] = []
        for seg in segs:
            n = self._seg_len(seg)
            if not n:
                continue
            kind = SEG_ZERO if seg[0] == SEG_ZERO else SEG_DATA
            if runs and runs[-1][0] == kind:
                runs[-1] = (kind, runs[-1][1] + n, runs[-1][2] + [seg])
            else:
                runs.append((kind, n, [seg]))
        return runs

    def _send_payload(self, head: bytes, segs: List[tuple], n: int, cookie: int, final: bool,
                      in_gate: bool) -> bool:
        """Send ``head`` then the ``n`` bytes of ``segs``.

        A file that fails to read part-way cannot be reported inside a reply
        that is the last one (``final``): the connection is dropped rather
        than sending made-up data.  Otherwise the chunk is padded and an
        error chunk follows.

        :return: False if an error chunk ended the reply.
        """
        if len(segs) == 1 and segs[0][0] == SEG_DATA:
            self.send_parts(head, segs[0][1], in_gate)
            return True
        self.send(head, in_gate, self._more)
        sent = 0
        for seg in segs:
            kind = seg[0]
            try:
                if kind == SEG_FD:
                    self.sendfile(seg[1], seg[2], seg[3])
                elif kind == SEG_ZERO:
                    self.send_zeroes(seg[1], in_gate)
                else:
                    self.send(seg[1], in_gate)
            except _FileError as exc:
                if final:
                    raise Disconnect("reading from file failed: %s" % exc) from exc
                self.send_zeroes(n - sent - exc.sent, in_gate)
                self._reply_exc(cookie, exc.exc, "reading from file failed")
                return False
            sent += self._seg_len(seg)
        return True

    def _cmd_write(self, backend: Any, gate: Any, writable: bool, size: int, flags: int,
                   cookie: int, offset: int, length: int) -> None:
        if length > MAX_BUFFER_SIZE:
            msg = "len (%d ) is larger than max len (%d)" % (length, MAX_BUFFER_SIZE)
            self.reply_error(cookie, proto.NBD_EINVAL, msg)
            raise Disconnect(msg)
        buf = self.write_buffer(length)
        if length:
            self.recv_exact(buf, length)
        if flags & ~CMD_FLAG_FUA:
            return self._bad_flags(cookie, CMD_WRITE, flags)
        if not writable:
            return self.reply_error(cookie, proto.NBD_EPERM, "Export is read-only")
        if offset + length > size:
            return self._past_eof(cookie, proto.NBD_ENOSPC, offset, length, size)
        gate.enter()
        try:
            self._root(backend, offset + length).pwrite(
                offset, buf, REQ_FUA if flags & CMD_FLAG_FUA else 0)
        except Exception as exc:
            failure: Optional[BaseException] = exc
        else:
            failure = None
        finally:
            gate.leave()
        if failure is None:
            self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
        else:
            self._reply_exc(cookie, failure, "writing to file failed")

    def _cmd_other(self, backend: Any, gate: Any, writable: bool, size: int, cmd: int,
                   flags: int, cookie: int, offset: int, length: int) -> None:
        """FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS and unknown commands."""
        if cmd == CMD_WRITE_ZEROES:
            valid = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        elif cmd == CMD_BLOCK_STATUS:
            valid = CMD_FLAG_FUA | CMD_FLAG_REQ_ONE
        elif cmd in (CMD_FLUSH, CMD_TRIM, CMD_CACHE):
            valid = CMD_FLAG_FUA
        else:
            return self.reply_error(cookie, proto.NBD_EINVAL,
                                    "invalid request type (%d) received" % cmd)
        if flags & ~valid:
            return self._bad_flags(cookie, cmd, flags)
        end = offset + length
        if cmd == CMD_FLUSH:
            if offset or length:
                return self.reply_error(cookie, proto.NBD_EINVAL,
                                        "NBD_CMD_FLUSH needs offset and length 0")
        elif cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
            if not writable:
                return self.reply_error(cookie, proto.NBD_EPERM, "Export is read-only")
            if end > size:
                return self._past_eof(cookie, proto.NBD_ENOSPC if cmd == CMD_WRITE_ZEROES
                                      else proto.NBD_EINVAL, offset, length, size)
        elif end > size:
            return self._past_eof(cookie, proto.NBD_EINVAL, offset, length, size)
        if cmd == CMD_BLOCK_STATUS:
            if not length:
                return self.reply_error(cookie, proto.NBD_EINVAL, "need non-zero length")
            if not self.contexts:
                return self.reply_error(cookie, proto.NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated")
            return self._cmd_block_status(backend, gate, flags, cookie, offset, length)
        msg = {CMD_FLUSH: "flush failed", CMD_TRIM: "discard failed",
               CMD_WRITE_ZEROES: "writing to file failed", CMD_CACHE: "caching data failed"}[cmd]
        gate.enter()
        try:
            root = self._root(backend, end)
            if cmd == CMD_FLUSH:
                root.flush()
            elif cmd == CMD_WRITE_ZEROES:
                if length:
                    req = REQ_FUA if flags & CMD_FLAG_FUA else 0
                    if not flags & CMD_FLAG_NO_HOLE:
                        req |= REQ_MAY_UNMAP
                    if flags & CMD_FLAG_FAST_ZERO:
                        req |= REQ_NO_FALLBACK
                    root.pwrite_zeroes(offset, length, req)
            elif cmd == CMD_TRIM:
                if length:
                    root.pdiscard(offset, length)
                if flags & CMD_FLAG_FUA:
                    root.flush()
            else:
                self._cache(root, offset, length)
        except Exception as exc:
            failure: Optional[BaseException] = exc
        else:
            failure = None
        finally:
            gate.leave()
        if failure is None:
            self.reply_ok(cookie)
        else:
            self._reply_exc(cookie, failure, msg,
                            fast_zero=cmd == CMD_WRITE_ZEROES and bool(flags & CMD_FLAG_FAST_ZERO))

    @staticmethod
    def _cache(root: Any, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: ask the kernel to read file segments ahead."""
        end = offset + length
        while offset < end:
            n = min(end - offset, MAX_BUFFER_SIZE)
            for seg in root.read_segments(offset, n):
                if seg[0] == SEG_FD:
                    try:
                        os.posix_fadvise(seg[1], seg[2], seg[3], os.POSIX_FADV_WILLNEED)
                    except OSError:
                        pass
            offset += n

    def _cmd_block_status(self, backend: Any, gate: Any, flags: int, cookie: int, offset: int,
                          length: int) -> None:
        limit = 1 if flags & CMD_FLAG_REQ_ONE else proto.MAX_BLOCK_STATUS_EXTENTS
        results = []
        gate.enter()
        try:
            root = self._root(backend, offset + length)
            for ctx in self.contexts:
                results.append((ctx.id, ctx.extents(root, offset, length, limit).to_bytes()))
        except Exception as exc:
            failure: Optional[BaseException] = exc
        else:
            failure = None
        finally:
            gate.leave()
        if failure is not None:
            return self._reply_exc(cookie, failure, "can't get block status")
        last = len(results) - 1
        parts = []
        for i, (ctx_id, data) in enumerate(results):
            parts.append(proto.CHUNK_BLOCK_STATUS.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if i == last else 0,
                proto.REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(data), ctx_id))
            parts.append(data)
        self.send(b"".join(parts))


def describe_peer(addr: Any) -> str:
    """A printable form of a peer address from ``accept()``."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return "%s:%s" % (addr[0], addr[1])
    return str(addr) if addr else "unix"
