# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Copying clusters from a source node to a target node once (QEMU 7.2 ``block/block-copy.c``).

Design
======

A :class:`BlockCopyState` (``bcs``) is shared by a copy-before-write filter
(:mod:`blockd.drivers.cbw`, many NBD connection threads calling
:meth:`BlockCopyState.copy` before their guest writes) and a backup job's
worker thread (copying every dirty area in order).  Everything below is
protected by one lock, ``bcs.lock``, with a condition ``bcs.cond``:

* ``copy_bitmap`` (:class:`ClusterBitmap`): one byte per cluster, 1 = the
  cluster must still be copied.  Clusters are ``max(64 KiB, target cluster
  size)`` (``block_copy_calculate_cluster_size``).
* ``reqs`` (:class:`~blockd.graph.reqlist.ReqList`): the *tasks* in flight.
  A task is created under the lock from the first dirty area of the range
  (at most 1 MiB, one cluster when compressing): its bits are cleared and its
  bytes counted ``in_flight`` at once, so no other thread can pick the same
  clusters (never copied twice).  The I/O runs without the lock.  When it
  fails the bits are set again (re-dirtied); either way the task leaves
  ``reqs`` and every waiter wakes up.
* :meth:`BlockCopyState.copy` (``block_copy_common``) loops: create and run
  tasks over the range; when nothing dirty is left, wait for one overlapping
  task of another thread (its clusters are *not yet in the target* although
  their bits are clear) and look again -- a failed task put its bits back,
  which this call then copies itself.  It returns only when the range holds
  no dirty bit and no task in flight, i.e. every cluster is in the target.
* Zero detection follows QEMU: the source's block status says
  ``BDRV_BLOCK_ZERO`` -> ``pwrite_zeroes`` on the target (QEMU's
  ``COPY_WRITE_ZEROES``, with the state's write flags only: no
  ``REQ_MAY_UNMAP``, as 7.2); otherwise a read into memory and a write.
* Progress (``set_progress_meter``): each successful task adds its bytes to
  ``done``; each ending task (and each reset) sets ``remaining`` to the
  dirty bytes + the bytes in flight, exactly as QEMU.

Point-in-time reads of the target (old-style fleecing)
------------------------------------------------------

When the target's backing chain contains the source (QEMU's
``is_fleecing``: writes to the target are ``BDRV_REQ_SERIALISING``), a
reader of the target may fall through to the live source.  The NBD server
would ``sendfile`` those bytes *after* the driver call returns, i.e. after a
guest write may have replaced them.  :meth:`BlockCopyState.serialise_target_reads`
therefore wraps the target node's bound ``pread`` and ``read_segments``:
every read holds a *read* range in :attr:`BlockCopyState.target_lock`
(:class:`~blockd.graph.reqlist.RangeLock`) while it runs and returns file
segments as bytes read into memory (``SEG_DATA``); block-copy's target writes
take a *write* range, so they wait for overlapping reads.  Since a guest write
to the source starts only after its clusters were written to the target, a
read either completes on the old source bytes before the copy lands or sees
the copied clusters in the target.  :meth:`BlockCopyState.stop` restores the
node's methods (the filter calls it when it closes).
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .io import BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, SEG_DATA, SEG_FD
from .reqlist import RangeLock, ReqList

#: BLOCK_COPY_CLUSTER_SIZE_DEFAULT.
CLUSTER_SIZE_DEFAULT = 1 << 16
#: BLOCK_COPY_MAX_BUFFER: the largest read+write task.
MAX_BUFFER = 1 << 20
#: QEMU's BDRV_REQ_WRITE_COMPRESSED (blockd drivers ignore unknown flags).
REQ_WRITE_COMPRESSED = 0x20


class BlockCopyError(OSError):
    """A copy failed; :attr:`is_read` tells whether reading the source did."""

    def __init__(self, code: int, message: str, is_read: bool) -> None:
        super().__init__(code, message)
        self.is_read = is_read


def calculate_cluster_size(target: Any) -> int:
    """``block_copy_calculate_cluster_size()``: max(64 KiB, the target's cluster)."""
    driver = getattr(target, "driver", None)
    cluster = None
    if driver is not None:
        try:
            cluster = driver.cluster_size()
        except Exception:  # pylint: disable=broad-except
            cluster = None
    if not cluster:
        return CLUSTER_SIZE_DEFAULT
    return max(CLUSTER_SIZE_DEFAULT, int(cluster))


def chain_contains(top: Any, node: Any) -> bool:
    """``bdrv_chain_contains()``: ``node`` is ``top`` or below it via backing/filter edges."""
    cur = top
    while cur is not None:
        if cur is node:
            return True
        nxt = cur.backing
        if nxt is None and getattr(getattr(cur, "driver", None), "is_filter", False):
            nxt = cur.file
        cur = nxt
    return False


class ClusterBitmap:
    """One dirty bit (a byte) per cluster of a disk of ``length`` bytes.

    Offsets and lengths are bytes; a range covers every cluster it touches.
    Thread-safe: every method takes ``lock`` (re-entrant, shared with the
    owning :class:`BlockCopyState`).

    :param length: the disk size in bytes.
    :param cluster_size: the granularity.
    :param lock: the lock to take (a new RLock by default).
    """

    def __init__(self, length: int, cluster_size: int, lock: Any = None) -> None:
        self.length = length
        self.cluster_size = cluster_size
        self.nclusters = -(-length // cluster_size)
        self.bits = bytearray(self.nclusters)
        self.count = 0
        self.lock = lock if lock is not None else threading.RLock()

    def attach(self, node: Any) -> "ClusterBitmap":
        """Show the bitmap in ``node``'s ``dirty-bitmaps`` (query-named-block-nodes),
        as QEMU's internal bitmaps of the node they were created on."""
        bitmaps = getattr(node, "internal_bitmaps", None)
        if bitmaps is None:
            bitmaps = node.internal_bitmaps = []
        bitmaps.append(self)
        self._node = node
        return self

    def detach(self) -> None:
        """Undo :meth:`attach` (``bdrv_release_dirty_bitmap``); idempotent."""
        node = getattr(self, "_node", None)
        if node is not None:
            try:
                node.internal_bitmaps.remove(self)
            except ValueError:
                pass
            self._node = None

    def query_info(self) -> Dict[str, Any]:
        """QAPI ``BlockDirtyInfo`` of an anonymous, disabled bitmap."""
        return {"recording": False, "persistent": False, "busy": False,
                "granularity": self.cluster_size, "count": self.dirty_bytes()}

    def _span(self, offset: int, length: int) -> Tuple[int, int]:
        cs = self.cluster_size
        first = max(0, offset // cs)
        last = min(self.nclusters, -(-(offset + length) // cs))
        return first, last

    def truncate(self, length: int) -> None:
        """``bdrv_dirty_bitmap_truncate()``: new clusters are clean."""
        with self.lock:
            n = -(-length // self.cluster_size)
            if n < self.nclusters:
                self.count -= self.bits.count(1, n)
                del self.bits[n:]
            else:
                self.bits.extend(bytes(n - self.nclusters))
            self.nclusters = n
            self.length = length

    def set_all(self) -> None:
        """Mark every cluster dirty."""
        with self.lock:
            self.bits[:] = b"\x01" * self.nclusters
            self.count = self.nclusters

    def clear_all(self) -> None:
        """Mark every cluster clean."""
        with self.lock:
            self.bits[:] = bytes(self.nclusters)
            self.count = 0

    def set(self, offset: int, length: int) -> None:
        """Mark the clusters of the range dirty (``bdrv_set_dirty_bitmap``)."""
        with self.lock:
            first, last = self._span(offset, length)
            if last > first:
                self.count += last - first - self.bits.count(1, first, last)
                self.bits[first:last] = b"\x01" * (last - first)

    def reset(self, offset: int, length: int) -> None:
        """Mark the clusters of the range clean (``bdrv_reset_dirty_bitmap``)."""
        with self.lock:
            first, last = self._span(offset, length)
            if last > first:
                self.count -= self.bits.count(1, first, last)
                self.bits[first:last] = bytes(last - first)

    def is_dirty(self, offset: int) -> bool:
        """Whether the cluster holding ``offset`` is dirty."""
        with self.lock:
            idx = offset // self.cluster_size
            return 0 <= idx < self.nclusters and self.bits[idx] == 1

    def dirty_bytes(self) -> int:
        """``bdrv_get_dirty_count()``: dirty clusters times the cluster size."""
        with self.lock:
            return self.count * self.cluster_size

    def all_dirty(self, offset: int, length: int) -> bool:
        """Whether every cluster of the range is dirty."""
        with self.lock:
            first, last = self._span(offset, length)
            return self.bits.find(0, first, last) < 0

    def next_dirty(self, offset: int, end: int) -> int:
        """``bdrv_dirty_bitmap_next_dirty()``: first dirty byte in the range, or -1."""
        with self.lock:
            first, last = self._span(offset, end - offset)
            idx = self.bits.find(1, first, last)
            return -1 if idx < 0 else max(offset, idx * self.cluster_size)

    def next_zero(self, offset: int, end: int) -> int:
        """``bdrv_dirty_bitmap_next_zero()``: first clean byte in the range, or -1."""
        with self.lock:
            first, last = self._span(offset, end - offset)
            idx = self.bits.find(0, first, last)
            return -1 if idx < 0 else max(offset, idx * self.cluster_size)

    def next_dirty_area(self, offset: int, end: int,
                        max_bytes: Optional[int] = None) -> Optional[Tuple[int, int]]:
        """``bdrv_dirty_bitmap_next_dirty_area()``: the first dirty run in ``[offset, end)``.

        :return: ``(start, length)`` clipped to the range (and to
            ``max_bytes``), or None when the range is clean.
        """
        with self.lock:
            end = min(end, self.nclusters * self.cluster_size)
            if offset >= end:
                return None
            cs = self.cluster_size
            first, last = self._span(offset, end - offset)
            idx = self.bits.find(1, first, last)
            if idx < 0:
                return None
            stop = self.bits.find(0, idx, last)
            if stop < 0:
                stop = last
            start = max(offset, idx * cs)
            area_end = min(end, stop * cs)
            if max_bytes:
                area_end = min(area_end, start + max_bytes)
            return start, area_end - start

    def dirty_status(self, offset: int, length: int) -> Tuple[bool, int]:
        """``bdrv_dirty_bitmap_status()``: whether the range start is dirty, and for how long."""
        with self.lock:
            cs = self.cluster_size
            idx = offset // cs
            end = offset + length
            first, last = self._span(offset, length)
            if idx >= self.nclusters:
                return False, length
            dirty = self.bits[idx] == 1
            other = self.bits.find(0 if dirty else 1, first, last)
            if other < 0:
                return dirty, length
            return dirty, max(1, min(end, other * cs) - offset)


class _Task:
    """A range being copied (QEMU's ``BlockCopyTask``)."""

    __slots__ = ("req", "zeroes")

    def __init__(self, req: Any) -> None:
        self.req = req
        self.zeroes = False


class BlockCopyState:
    """QEMU's ``BlockCopyState`` (see the module doc).

    :param source: the node clusters are read from.
    :param target: the node they are written to.
    :param cluster_size: override of the computed cluster size.
    :param compress: write with ``REQ_WRITE_COMPRESSED``, one cluster a task.
    """

    def __init__(self, source: Any, target: Any, cluster_size: Optional[int] = None,
                 compress: bool = False) -> None:
        self.source = source
        self.target = target
        self.cluster_size = int(cluster_size or calculate_cluster_size(target))
        self.len = source.getlength()
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.copy_bitmap = ClusterBitmap(self.len, self.cluster_size, self.lock)
        self.copy_bitmap.set_all()
        self.copy_bitmap.attach(source)
        self.reqs = ReqList(self.cond)
        self.in_flight_bytes = 0
        self.skip_unallocated = False
        self.progress: Any = None
        self.compress = compress
        #: is_fleecing: the target reads through to the source.
        self.is_fleecing = chain_contains(target, source)
        self.write_flags = REQ_WRITE_COMPRESSED if compress else 0
        self.chunk = self.cluster_size if compress else max(self.cluster_size, MAX_BUFFER)
        self.target_lock = RangeLock()
        self._status_cache: Optional[Tuple[int, int]] = None
        self._copy_range_ok = hasattr(os, "copy_file_range")
        self._serialising = False
        self._saved: Optional[Tuple[Any, Any, Any, Any]] = None

    # -- configuration ---------------------------------------------------------------

    def set_progress_meter(self, meter: Any) -> None:
        """``block_copy_set_progress_meter()``: ``meter`` has progress_update /
        progress_set_remaining (a :class:`blockd.jobs.Job`)."""
        self.progress = meter

    def set_copy_opts(self, compress: bool = False) -> None:
        """``block_copy_set_copy_opts()``."""
        self.compress = compress
        self.write_flags = REQ_WRITE_COMPRESSED if compress else 0
        self.chunk = self.cluster_size if compress else max(self.cluster_size, MAX_BUFFER)

    def dirty_bytes(self) -> int:
        """Bytes still to copy (dirty clusters times the cluster size)."""
        return self.copy_bitmap.dirty_bytes()

    # -- tasks (called with the lock held unless said otherwise) ---------------------

    def _task_create(self, offset: int, end: int) -> Optional[_Task]:
        """``block_copy_task_create()``: claim the first dirty area of the range."""
        area = self.copy_bitmap.next_dirty_area(offset, end, self.chunk)
        if area is None:
            return None
        start, nbytes = area
        cs = self.cluster_size
        nbytes = -(-nbytes // cs) * cs
        self.copy_bitmap.reset(start, nbytes)
        self.in_flight_bytes += nbytes
        return _Task(self.reqs.add(start, nbytes, "copy"))

    def _task_shrink(self, task: _Task, new_bytes: int) -> None:
        """``block_copy_task_shrink()``: give the tail back to the bitmap."""
        req = task.req
        if new_bytes >= req.bytes:
            return
        self.in_flight_bytes -= req.bytes - new_bytes
        self.copy_bitmap.set(req.offset + new_bytes, req.bytes - new_bytes)
        self.reqs.shrink(req, new_bytes)

    def _task_end(self, task: _Task, ok: bool) -> None:
        """``block_copy_task_end()``: re-dirty on failure, update remaining, wake waiters."""
        req = task.req
        self.in_flight_bytes -= req.bytes
        if not ok:
            self.copy_bitmap.set(req.offset, req.bytes)
        if self.progress is not None:
            self.progress.progress_set_remaining(self.copy_bitmap.dirty_bytes()
                                                 + self.in_flight_bytes)
        self.reqs.remove(req)

    def invalidate_status_cache(self) -> None:
        """Forget the cached data extent (the source got write-zeroes or a discard)."""
        self._status_cache = None

    def _source_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        """The source's block status, with a one-extent cache of plain data.

        QEMU's file-posix keeps such a cache (``BdrvBlockStatusCache``): the
        ``SEEK_DATA``/``SEEK_HOLE`` pair costs far more than a cluster copy on
        some file systems.  Only data in the top layer is cached; the copy
        filter drops the cache on every write-zeroes or discard of the source.
        """
        cache = self._status_cache
        if cache is not None and cache[0] <= offset < cache[1]:
            return min(length, cache[1] - offset), BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, 0
        # ask about the rest of the disk: the extent found is cached whole
        n, flags, depth = self.source.block_status(offset, max(length, self.len - offset))
        if depth == 0 and flags & BDRV_BLOCK_DATA and not flags & BDRV_BLOCK_ZERO \
                and flags & BDRV_BLOCK_ALLOCATED:
            self._status_cache = (offset, offset + n)
        return min(n, length), flags, depth

    def _block_status(self, offset: int, nbytes: int) -> Tuple[int, int]:
        """``block_copy_block_status()`` (no lock): status flags and a cluster-aligned count.

        With ``skip_unallocated`` ALLOCATED means "in the source's top layer",
        otherwise "anywhere in its chain".
        """
        cs = self.cluster_size
        try:
            n, flags, depth = self._source_status(offset, min(nbytes, self.len - offset))
        except OSError:
            return cs, BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_DATA
        if self.skip_unallocated:
            allocated = depth == 0
        else:
            allocated = depth >= 0
        flags = (flags & ~BDRV_BLOCK_ALLOCATED) | (BDRV_BLOCK_ALLOCATED if allocated else 0)
        if n < cs:
            # too short to be worth it (also the disk's partial last cluster)
            return cs, BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_DATA
        if offset + n >= self.len:
            n = -(-n // cs) * cs
        else:
            n = n // cs * cs
        return n, flags

    def _do_copy(self, offset: int, nbytes: int, zeroes: bool) -> None:
        """``block_copy_do_copy()`` (no lock): one aligned range, clipped to the disk.

        Host file to host file copies use ``copy_file_range`` (QEMU's
        ``COPY_RANGE`` method); any failure there falls back to read + write,
        which tells a source error from a target error.

        :raise BlockCopyError: with ``is_read`` for a failed source read.
        """
        n = min(offset + nbytes, self.len) - offset
        if offset + n > self.target.getlength():
            # a target smaller than the source (QEMU 7.2 accepts it, then aborts)
            raise BlockCopyError(errno.ENOSPC, "No space left on device", False)
        if zeroes:
            try:
                self._target_write(offset, n, None)
            except OSError as exc:
                raise BlockCopyError(exc.errno or errno.EIO, exc.strerror or "", False) from exc
            return
        if self._copy_range_ok and not self.compress:
            src = _host_file(self.source, "pread")
            dst = _host_file(self.target, "pwrite") if src is not None else None
            if dst is not None and offset + n <= dst.size and offset + n <= src.size:
                try:
                    self._target_write(offset, n, _CopyRange(src.fd, dst.fd))
                    return
                except OSError as exc:
                    if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        self._copy_range_ok = False
        try:
            data = self.source.pread(offset, n)
        except OSError as exc:
            raise BlockCopyError(exc.errno or errno.EIO, exc.strerror or "", True) from exc
        try:
            self._target_write(offset, n, data)
        except OSError as exc:
            raise BlockCopyError(exc.errno or errno.EIO, exc.strerror or "", False) from exc

    def _target_write(self, offset: int, n: int, data: Any) -> None:
        """Write (or zero, ``data`` None) the target, serialised against fleecing reads."""
        target = self.target
        if self._serialising:
            with self.target_lock.held(offset, n, True):
                self._target_write_now(target, offset, n, data)
        else:
            self._target_write_now(target, offset, n, data)

    def _target_write_now(self, target: Any, offset: int, n: int, data: Any) -> None:
        if data is None:
            target.pwrite_zeroes(offset, n, self.write_flags & ~REQ_WRITE_COMPRESSED)
        elif isinstance(data, _CopyRange):
            data.run(offset, n)
        else:
            target.pwrite(offset, data, self.write_flags)

    def _run_task(self, task: _Task) -> Optional[BlockCopyError]:
        """Block status, then the copy; ``block_copy_task_entry()``.

        :return: the error, if the copy failed (the task has ended either way).
        """
        req = task.req
        n, flags = self._block_status(req.offset, req.bytes)
        with self.lock:
            if n < req.bytes:
                self._task_shrink(task, n)
            if self.skip_unallocated and not flags & BDRV_BLOCK_ALLOCATED:
                self._task_end(task, True)
                return None
        try:
            self._do_copy(req.offset, req.bytes, bool(flags & BDRV_BLOCK_ZERO))
        except BlockCopyError as exc:
            with self.lock:
                self._task_end(task, False)
            return exc
        except BaseException:
            with self.lock:
                self._task_end(task, False)
            raise
        with self.lock:
            if self.progress is not None:
                self.progress.progress_update(req.bytes)
            self._task_end(task, True)
        return None

    # -- the API ---------------------------------------------------------------------

    def copy(self, offset: int, nbytes: int,
             cancelled: Optional[Callable[[], bool]] = None) -> None:
        """``block_copy()``: make every cluster the range touches be in the target.

        Clusters still dirty are copied (whole clusters, even for a partial
        range); clusters another thread is copying are waited for.  Returns
        when no cluster of the range is dirty or in flight.

        :param cancelled: polled between tasks; True stops the call early.
        :raise BlockCopyError: a task of *this* call failed (its clusters are
            dirty again).
        """
        if nbytes <= 0:
            return
        cs = self.cluster_size
        start = offset // cs * cs
        end = min(-(-(offset + nbytes) // cs) * cs, self.copy_bitmap.nclusters * cs,
                  -(-self.len // cs) * cs)
        if start >= end:
            return
        while True:
            pos = start
            while pos < end:
                if cancelled is not None and cancelled():
                    return
                with self.lock:
                    task = self._task_create(pos, end)
                if task is None:
                    break
                err = self._run_task(task)
                if err is not None:
                    raise err
                pos = task.req.offset + task.req.bytes     # after a shrink: its new end
            with self.lock:
                if self.reqs.wait_one(start, end - start, ("copy",)):
                    continue  # a parallel task ended (maybe failed): look again
                if self.copy_bitmap.next_dirty(start, end) < 0:
                    return

    def reset(self, offset: int, nbytes: int) -> None:
        """``block_copy_reset()``: nothing to copy in the range any more."""
        with self.lock:
            self.copy_bitmap.reset(offset, nbytes)
            if self.progress is not None:
                self.progress.progress_set_remaining(self.copy_bitmap.dirty_bytes()
                                                     + self.in_flight_bytes)

    def _is_cluster_allocated(self, offset: int) -> Tuple[bool, int]:
        """``block_copy_is_cluster_allocated()``: (allocated in the top layer, clusters)."""
        cs = self.cluster_size
        total = 0
        pos = offset
        while True:
            remaining = self.len - pos
            if remaining <= 0:
                return False, max(1, -(-total // cs))
            n, flags, depth = self.source.block_status(pos, remaining)
            allocated = depth == 0
            n = max(1, min(n, remaining))
            total += n
            if allocated:
                return True, -(-total // cs)
            if pos + n >= self.len:
                return False, -(-total // cs)
            if total >= cs:
                return False, total // cs
            pos += n

    def reset_unallocated(self, offset: int) -> int:
        """``block_copy_reset_unallocated()``: clear clusters the source's top layer lacks.

        :return: the bytes examined from ``offset`` (0 or less: stop).
        """
        allocated, clusters = self._is_cluster_allocated(offset)
        nbytes = clusters * self.cluster_size
        if not allocated:
            self.reset(offset, nbytes)
        return nbytes

    # -- old-style fleecing ------------------------------------------------------------

    def serialise_target_reads(self) -> None:
        """Make reads of the target point-in-time safe (see the module doc)."""
        with self.lock:
            if self._serialising:
                return
            node = self.target
            self._saved = (node.pread, node.read_segments, node.driver.pread,
                           node.driver.read_segments)
            lock = self.target_lock
            drv_pread, drv_segments = node.pread, node.read_segments

            def pread(offset: int, length: int) -> bytes:
                with lock.held(offset, length, False):
                    return drv_pread(offset, length)

            def read_segments(offset: int, length: int) -> List[tuple]:
                with lock.held(offset, length, False):
                    return materialise(drv_segments(offset, length))

            node.pread = pread
            node.read_segments = read_segments
            self._serialising = True

    def stop(self) -> None:
        """Undo :meth:`serialise_target_reads` and release the copy bitmap
        (``block_copy_state_free``); idempotent."""
        with self.lock:
            self.copy_bitmap.detach()
            if not self._serialising or self._saved is None:
                return
            node = self.target
            pread, segments, _rest1, _rest2 = self._saved
            node.pread = pread
            node.read_segments = segments
            self._serialising = False
            self._saved = None


class _CopyRange:
    """A copy between two host files, run as the target write (``copy_file_range``)."""

    __slots__ = ("src_fd", "dst_fd")

    def __init__(self, src_fd: int, dst_fd: int) -> None:
        self.src_fd = src_fd
        self.dst_fd = dst_fd

    def run(self, offset: int, n: int) -> None:
        """Copy ``[offset, offset + n)``; raise OSError (EINVAL for a short copy)."""
        done = 0
        while done < n:
            got = os.copy_file_range(self.src_fd, self.dst_fd, n - done,
                                     offset + done, offset + done)
            if got <= 0:
                raise OSError(errno.EINVAL, "short copy_file_range")
            done += got


def _host_file(node: Any, method: str) -> Any:
    """The FileDriver whose own ``method`` ``node`` calls directly, or None.

    Follows raw nodes without a window (they bind their child's methods);
    wrapped methods, O_DIRECT files and block devices are not host-file copies.
    """
    cur = node
    while True:
        drv = getattr(cur, "driver", None)
        if drv is None:
            return None
        if drv.format_name == "file":
            break
        if drv.format_name != "raw" or getattr(drv, "offset", 1) or \
                getattr(drv, "fixed_size", None) is not None:
            return None
        cur = cur.file
    bound = getattr(node, method, None)
    if getattr(bound, "__self__", None) is not drv or \
            getattr(bound, "__func__", None) is not getattr(type(drv), method, None):
        return None
    if getattr(drv, "direct", False) or getattr(drv, "is_blockdev", False):
        return None
    return drv


def materialise(segs: List[tuple]) -> List[tuple]:
    """Replace file segments by the bytes they hold now (``SEG_DATA``)."""
    out: List[tuple] = []
    for seg in segs:
        if seg[0] == SEG_FD:
            _kind, fd, off, length = seg
            data = os.pread(fd, length, off)
            if len(data) < length:
                data += bytes(length - len(data))
            out.append((SEG_DATA, data))
        else:
            out.append(seg)
    return out
