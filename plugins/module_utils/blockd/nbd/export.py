# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""NBD exports and the metadata contexts they offer.

An :class:`NBDExport` is what QEMU calls an NBD ``BlockExport``: a name on the
NBD server bound to a :class:`~blockd.graph.backend.Backend`.  It knows the
transmission flags it advertises, the metadata contexts clients may select
(``base:allocation`` always, ``qemu:allocation-depth`` on request,
``qemu:dirty-bitmap:NAME`` per exported bitmap: :class:`DirtyBitmapContext`),
and the connections attached to it, so the
command layer can count them, drop them (hard removal) and learn when the
last one is gone.

Metadata contexts are objects with a fixed id (QEMU's numbering: 0 for
``base:allocation``, 1 for ``qemu:allocation-depth``, 2 and up for bitmaps)
and an :meth:`MetaContext.extents` method; the command layer hands each
dirty-bitmap context to :meth:`NBDExport.add_context`.
"""

from __future__ import annotations

import array
import sys
import threading
from typing import Any, Callable, List, Optional, Set

from ..errors import QMPError
from ..graph.io import BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO
from . import proto

#: Id of the first dirty-bitmap context (QEMU's NBD_META_ID_DIRTY_BITMAP).
META_ID_DIRTY_BITMAP = 2

_U32_MAX = 0xFFFFFFFF
_NEED_SWAP = sys.byteorder == "little"
#: An array typecode of 32-bit unsigned integers.
_U32_CODE = "I" if array.array("I").itemsize == 4 else "L"


class Extents:
    """A run-length list of ``(length, flags)`` extents, merged as QEMU does.

    Adjacent extents with equal flags are merged while the sum fits in 32
    bits; once ``limit`` distinct extents are held, :meth:`add` refuses more
    (the reply then covers less than was asked, which clients accept).

    :param limit: the most extents the reply may carry.
    """

    __slots__ = ("_data", "limit", "count", "total")

    def __init__(self, limit: int) -> None:
        self._data = array.array(_U32_CODE)
        self.limit = limit
        self.count = 0
        self.total = 0

    def add(self, length: int, flags: int) -> bool:
        """Append an extent.

        :param length: its length in bytes (may exceed 32 bits; it is split).
        :param flags: its status flags.
        :return: False when the array is full and nothing more can be added.
        """
        data = self._data
        while length > 0:
            if self.count and data[-1] == flags and data[-2] < _U32_MAX:
                take = min(length, _U32_MAX - data[-2])
                data[-2] += take
            else:
                if self.count >= self.limit:
                    return False
                take = min(length, _U32_MAX)
                data.append(take)
                data.append(flags)
                self.count += 1
            self.total += take
            length -= take
        return True

    def to_bytes(self) -> bytes:
        """The extents in wire format (big-endian u32 pairs)."""
        data = array.array(_U32_CODE, self._data)
        if _NEED_SWAP:
            data.byteswap()
        return data.tobytes()

    def as_list(self) -> List["tuple[int, int]"]:
        """The extents as ``(length, flags)`` tuples (for tests and logs)."""
        d = self._data
        return [(d[i], d[i + 1]) for i in range(0, len(d), 2)]


class MetaContext:
    """A metadata context an export offers to NBD clients.

    :param name: the context name (``namespace:leaf``).
    :param context_id: the id sent in NBD_REP_META_CONTEXT and block-status chunks.
    """

    def __init__(self, name: str, context_id: int) -> None:
        self.name = name
        self.id = context_id

    def extents(self, root: Any, offset: int, length: int, limit: int) -> Extents:
        """Describe ``[offset, offset+length)`` of ``root``.

        Runs inside the I/O gate; may raise :class:`OSError`.

        :param root: the backend's current root node.
        :param offset: start of the range (validated against the size).
        :param length: bytes to describe (> 0).
        :param limit: the most extents to return (1 with NBD_CMD_FLAG_REQ_ONE).
        :return: the extents, starting at ``offset`` and covering a non-empty
            prefix of the range.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return "<MetaContext %s id=%d>" % (self.name, self.id)


class _BlockStatusContext(MetaContext):
    """A context computed from the driver's ``block_status``."""

    def flags_of(self, status: int, depth: int) -> int:
        """The NBD status value of a block-status answer.

        :param status: ``BDRV_BLOCK_*`` flags.
        :param depth: the layer the data comes from (-1: unallocated).
        :return: the u32 sent to the client.
        """
        raise NotImplementedError

    def extents(self, root: Any, offset: int, length: int, limit: int) -> Extents:
        out = Extents(limit)
        block_status = root.block_status
        flags_of = self.flags_of
        end = offset + length
        while offset < end:
            n, status, depth = block_status(offset, end - offset)
            if n <= 0:
                raise OSError(5, "block_status returned an empty extent")
            n = min(n, end - offset)
            if not out.add(n, flags_of(status, depth)):
                break
            offset += n
        return out


class BaseAllocationContext(_BlockStatusContext):
    """``base:allocation``: HOLE unless the range holds data, ZERO if it reads as zeroes."""

    def __init__(self) -> None:
        super().__init__(proto.CONTEXT_BASE_ALLOCATION, 0)

    def flags_of(self, status: int, depth: int) -> int:
        return ((0 if status & BDRV_BLOCK_DATA else proto.STATE_HOLE)
                | (proto.STATE_ZERO if status & BDRV_BLOCK_ZERO else 0))


class AllocationDepthContext(_BlockStatusContext):
    """``qemu:allocation-depth``: 0 unallocated, 1 this layer, N backing layer N-1."""

    def __init__(self) -> None:
        super().__init__(proto.CONTEXT_ALLOCATION_DEPTH, 1)

    def flags_of(self, status: int, depth: int) -> int:
        return 0 if depth < 0 else depth + 1


class DirtyBitmapContext(MetaContext):
    """``qemu:dirty-bitmap:NAME``: NBD_STATE_DIRTY over the bitmap's dirty areas
    (QEMU's ``bitmap_to_extents()``; the exported node's data is not read).

    :param name: the name the context is offered under (the bitmap's).
    :param context_id: ``META_ID_DIRTY_BITMAP`` + the bitmap's index in the export.
    :param bitmap: the :class:`~blockd.graph.dirty_bitmap.DirtyBitmap`.
    """

    def __init__(self, name: str, context_id: int, bitmap: Any) -> None:
        super().__init__(proto.CONTEXT_DIRTY_BITMAP_PREFIX + name, context_id)
        self.bitmap = bitmap

    def extents(self, root: Any, offset: int, length: int, limit: int) -> Extents:
        out = Extents(limit)
        bitmap = self.bitmap
        end = offset + length
        start = offset
        while True:
            area = bitmap.next_dirty_area(start, end)
            if area is None:
                break
            dirty_start, dirty_len = area
            if not (out.add(dirty_start - start, 0)
                    and out.add(dirty_len, proto.STATE_DIRTY)):
                return out
            start = dirty_start + dirty_len
        out.add(end - start, 0)
        return out


class NBDExport:
    """An NBD export of a backend.

    :param export_id: the block export id (``block-export-add id=``).
    :param name: the NBD export name clients ask for.
    :param backend: the :class:`~blockd.graph.backend.Backend` I/O goes through.
    :param writable: whether clients may write (READ_ONLY is advertised otherwise).
    :param description: free text sent as NBD_INFO_DESCRIPTION and in LIST.
    :param allocation_depth: offer the ``qemu:allocation-depth`` context.
    :param zero_copy: send file segments with ``sendfile``.  The kernel then
        queues *references* to page-cache pages, so a write landing before the
        client has read the reply shows through.  That is harmless for
        requests that are concurrent anyway, but wrong where the reader must
        see a point in time while the same file keeps being written (a
        fleecing export whose reads fall through to the live source): pass
        False there, and READ data is copied into a buffer inside the I/O
        gate and sent after leaving it.
    :raises QMPError: QEMU's errors for a name or description over 4096 bytes.
    """

    def __init__(self, export_id: str, name: str, backend: Any, writable: bool,
                 description: Optional[str] = None, allocation_depth: bool = False,
                 zero_copy: bool = True) -> None:
        if len(name.encode("utf-8")) > proto.MAX_STRING_SIZE:
            raise QMPError("export name '%s' too long" % name)
        if description is not None and len(description.encode("utf-8")) > proto.MAX_STRING_SIZE:
            raise QMPError("description '%s' too long" % description)
        self.id = export_id
        self.name = name
        self.backend = backend
        self.writable = writable
        self.description = description
        self.allocation_depth = allocation_depth
        self.zero_copy = zero_copy
        #: The size advertised to clients, fixed when the export is created
        #: (QEMU forbids resizing an exported node).
        self.size = backend.root.getlength()
        #: Minimum block size for clients that ask for it (QEMU: the request
        #: alignment of the node, 1 for buffered files).
        self.request_alignment = int(getattr(backend.root.driver, "request_alignment", 1) or 1)
        self.contexts: List[MetaContext] = [BaseAllocationContext()]
        if allocation_depth:
            self.contexts.append(AllocationDepthContext())
        #: Set once the export is removed from its server: no new clients.
        self.closing = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._clients: Set[Any] = set()
        self._idle_callbacks: List[Callable[["NBDExport"], None]] = []

    # -- what clients see -------------------------------------------------------

    def transmission_flags(self, multi_conn: bool) -> int:
        """The flags of NBD_INFO_EXPORT (without SEND_DF, added per client with SR).

        :param multi_conn: advertise CAN_MULTI_CONN (QEMU: unless max-connections is 1).
        :return: the u16 flags.
        """
        flags = (proto.FLAG_HAS_FLAGS | proto.FLAG_SEND_FLUSH | proto.FLAG_SEND_FUA
                 | proto.FLAG_SEND_CACHE)
        if multi_conn:
            flags |= proto.FLAG_CAN_MULTI_CONN
        if self.writable:
            flags |= (proto.FLAG_SEND_TRIM | proto.FLAG_SEND_WRITE_ZEROES
                      | proto.FLAG_SEND_FAST_ZERO)
        else:
            flags |= proto.FLAG_READ_ONLY
        return flags

    def add_context(self, context: MetaContext, same_name: bool = False) -> None:
        """Offer one more metadata context (a dirty bitmap).

        :param context: a context whose id is unique on this export
            (``META_ID_DIRTY_BITMAP + i`` for bitmaps).
        :param same_name: allow a name already offered (QEMU exports a bitmap
            listed twice as two contexts of one name; LIST shows both).
        """
        if any(c.id == context.id or (c.name == context.name and not same_name)
               for c in self.contexts):
            raise ValueError("duplicate metadata context %r" % context)
        self.contexts.append(context)
        self.contexts.sort(key=lambda c: c.id)

    def match_contexts(self, query: str, listing: bool) -> List[MetaContext]:
        """The contexts a LIST/SET_META_CONTEXT query selects (QEMU's rules).

        An exact name selects that context.  With LIST only, a query ending in
        ``:`` (``base:``, ``qemu:``, ``qemu:dirty-bitmap:``) selects every
        context under it.  Anything else selects nothing; unknown names are
        not errors.

        :param query: the query string.
        :param listing: True for NBD_OPT_LIST_META_CONTEXT.
        :return: the selected contexts.
        """
        for ctx in self.contexts:
            if ctx.name == query:
                return [ctx]    # one bitmap exported twice: the first context only
        if listing and query.endswith(":"):
            return [c for c in self.contexts if c.name.startswith(query)]
        return []

    # -- clients ----------------------------------------------------------------

    def attach(self, conn: Any) -> bool:
        """Register a connection that finished negotiation on this export.

        :param conn: the connection.
        :return: False if the export is closing (the client must be refused).
        """
        with self._lock:
            if self.closing:
                return False
            self._clients.add(conn)
            return True

    def detach(self, conn: Any) -> None:
        """Forget a connection that closed; run the idle callbacks if it was the last.

        :param conn: the connection.
        """
        callbacks: List[Callable[["NBDExport"], None]] = []
        with self._lock:
            self._clients.discard(conn)
            if not self._clients:
                self._idle.notify_all()
                if self.closing:
                    callbacks, self._idle_callbacks = self._idle_callbacks, []
        for callback in callbacks:
            callback(self)

    def client_count(self) -> int:
        """Connections currently in transmission on this export."""
        with self._lock:
            return len(self._clients)

    def disconnect_clients(self) -> None:
        """Drop every client now (hard removal).

        The sockets are shut down; each connection thread notices, leaves
        whatever it was doing (a request in flight finishes its I/O first) and
        detaches.  Use :meth:`wait_idle` or :meth:`add_idle_callback` to learn
        when they are all gone.
        """
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            conn.close()

    def add_idle_callback(self, callback: Callable[["NBDExport"], None]) -> None:
        """Call ``callback(export)`` once the export is closing and has no client.

        It runs at once (in the caller's thread) if that is already the case,
        else in the thread of the last client to leave: keep it short and
        thread-safe (QEMU emits BLOCK_EXPORT_DELETED at this point).

        :param callback: the function to call.
        """
        with self._lock:
            if not (self.closing and not self._clients):
                self._idle_callbacks.append(callback)
                return
        callback(self)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no client is attached.

        Do not call this from inside a drained section: a client may be
        waiting at the I/O gate and would never leave.

        :param timeout: seconds, or None to wait forever.
        :return: True if no client remains.
        """
        with self._idle:
            return self._idle.wait_for(lambda: not self._clients, timeout)

    def close(self) -> None:
        """Mark the export closing: new clients are refused, idle callbacks may fire."""
        callbacks: List[Callable[["NBDExport"], None]] = []
        with self._lock:
            self.closing = True
            if not self._clients:
                callbacks, self._idle_callbacks = self._idle_callbacks, []
        for callback in callbacks:
            callback(self)

    def __repr__(self) -> str:
        return "<NBDExport %s name=%r>" % (self.id, self.name)
