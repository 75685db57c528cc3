# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``copy-before-write``: copy old data to ``target`` before a write replaces it (QEMU 7.2
``block/copy-before-write.c``).

The filter sits over ``file`` (the source).  A write, write-zeroes or discard
through it first makes sure every cluster it touches is in ``target``
(:meth:`BlockCopyState.copy <blockd.graph.blockcopy.BlockCopyState.copy>`),
then goes to ``file``; reads, block status and flush pass straight through.

The *snapshot API* (used by :mod:`.snapshot_access`) reads the disk as it was
when the filter opened: clusters a guest write copied (``done``) come from the
target, the others from the source, read into memory while the range is in
``frozen_read_reqs`` -- a guest write to those clusters waits, after its copy,
until the read is over (``cbw_snapshot_read_lock``).

:func:`cbw_append` / :func:`cbw_drop` insert and remove the filter above a node
(QEMU's ``bdrv_cbw_append`` / ``bdrv_cbw_drop``), for the backup job.
"""

from __future__ import annotations

import errno
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from ..errors import QMPError
from ..graph.blockcopy import BlockCopyError, BlockCopyState, ClusterBitmap
from ..graph.io import SEG_DATA
from ..graph.reqlist import ReqList
from .base import Driver


class CopyBeforeWriteDriver(Driver):
    """The copy-before-write filter (see the module doc)."""

    format_name = "copy-before-write"
    child_roles = {"file": True, "target": True}
    is_filter = True

    # -- life cycle ------------------------------------------------------------------

    def open(self, options: Dict[str, Any]) -> None:
        """``cbw_open()``: children, bitmap option, error policy, the block-copy state."""
        self.child = self.node.file
        self.target = self.node.child("target")
        bitmap = options.get("bitmap")
        if bitmap is not None:
            _lookup_bitmap(self.node.graph, bitmap)
        self.on_cbw_error = options.get("on-cbw-error", "break-guest-write")
        self.cbw_timeout = float(options.get("cbw-timeout", 0) or 0)
        self.bcs = BlockCopyState(self.child, self.target)
        cs = self.bcs.cluster_size
        length = self.bcs.len
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        #: clusters a guest write copied to the target (read those from it)
        self.done_bitmap = ClusterBitmap(length, cs).attach(self.node)
        #: clusters the snapshot may be read at (snapshot discard clears)
        self.access_bitmap = ClusterBitmap(length, cs)
        self.access_bitmap.set_all()
        self.access_bitmap.attach(self.node)
        self.frozen_read_reqs = ReqList(self.cond)
        #: the errno of the first failed copy with on-cbw-error=break-snapshot
        self.snapshot_error = 0
        self.flush = self.child.flush
        self.pread = self.child.pread
        self.read_segments = self.child.read_segments

    def close(self) -> None:
        """``cbw_close()``: the block-copy state goes (old-style fleecing reads too)."""
        bcs = getattr(self, "bcs", None)
        if bcs is not None:
            bcs.stop()
        for bitmap in (getattr(self, "access_bitmap", None), getattr(self, "done_bitmap", None)):
            if bitmap is not None:
                bitmap.detach()

    # -- I/O -------------------------------------------------------------------------

    def getlength(self) -> int:
        return self.child.getlength()

    def pread(self, offset: int, length: int) -> bytes:
        return self.child.pread(offset, length)

    def read_segments(self, offset: int, length: int) -> List[tuple]:
        return self.child.read_segments(offset, length)

    def _copy(self, offset: int, length: int) -> None:
        """``block_copy()`` with the filter's timeout (``cbw-timeout``)."""
        bcs = self.bcs
        if not self.cbw_timeout:
            bcs.copy(offset, length)
            return
        result: List[BaseException] = []
        cancel = threading.Event()

        def run() -> None:
            try:
                bcs.copy(offset, length, cancelled=cancel.is_set)
            except BaseException as exc:  # pylint: disable=broad-except
                result.append(exc)

        worker = threading.Thread(target=run, name="cbw-copy", daemon=True)
        worker.start()
        worker.join(self.cbw_timeout)
        if worker.is_alive():
            cancel.set()
            raise BlockCopyError(errno.ETIMEDOUT, "Connection timed out", False)
        if result:
            raise result[0]

    def copy_before_write(self, offset: int, length: int) -> None:
        """``cbw_do_copy_before_write()``.

        :raise OSError: the copy failed and on-cbw-error is break-guest-write.
        """
        if self.snapshot_error:
            return
        cs = self.bcs.cluster_size
        off = offset // cs * cs
        end = -(-(offset + length) // cs) * cs
        try:
            self._copy(off, end - off)
            failed = 0
        except OSError as exc:
            if self.on_cbw_error == "break-guest-write":
                raise
            failed = exc.errno or errno.EIO
        with self.cond:
            if failed:
                if not self.snapshot_error:
                    self.snapshot_error = failed
            else:
                self.done_bitmap.set(off, end - off)
            self.frozen_read_reqs.wait_all(off, end - off)

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        self.copy_before_write(offset, len(data))
        self.child.pwrite(offset, data, flags)

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self.copy_before_write(offset, length)
        try:
            self.child.pwrite_zeroes(offset, length, flags)
        finally:
            self.bcs.invalidate_status_cache()

    def pdiscard(self, offset: int, length: int) -> None:
        self.copy_before_write(offset, length)
        try:
            self.child.pdiscard(offset, length)
        finally:
            self.bcs.invalidate_status_cache()

    def block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        """The filtered child's status."""
        return self.child.block_status(offset, length)

    def truncate(self, size: int) -> None:
        """bdrv_co_truncate() of a filter: resize ``file`` (the permission
        system refuses it once the filter has users).  The bitmaps follow the
        new size, the block-copy length stays (QEMU's ``s->len``)."""
        self.child.driver.truncate(size)
        for bitmap in (self.bcs.copy_bitmap, self.done_bitmap, self.access_bitmap):
            bitmap.truncate(size)

    # -- the snapshot API (snapshot-access) --------------------------------------------

    def _snapshot_read_lock(self, offset: int, length: int) -> Tuple[Optional[Any], int, Any]:
        """``cbw_snapshot_read_lock()``: where to read the start of the range from.

        :return: ``(req, n, node)``: a frozen read request (None when reading
            the target, which needs no lock) covering ``n`` bytes of ``node``.
        :raise OSError: EACCES when the snapshot is broken or discarded there.
        """
        with self.cond:
            if self.snapshot_error:
                raise OSError(errno.EACCES, "Permission denied")
            if self.access_bitmap.next_zero(offset, offset + length) >= 0:
                raise OSError(errno.EACCES, "Permission denied")
            done, n = self.done_bitmap.dirty_status(offset, length)
            if done:
                return None, n, self.target
            return self.frozen_read_reqs.add(offset, n, "read"), n, self.child

    def _snapshot_read_unlock(self, req: Optional[Any]) -> None:
        if req is not None:
            with self.cond:
                self.frozen_read_reqs.remove(req)

    def preadv_snapshot(self, offset: int, length: int) -> List[tuple]:
        """``cbw_co_preadv_snapshot()``: the point-in-time bytes, as segments.

        Source bytes are read into memory under the lock (``SEG_DATA``):
        never file segments of the live source (see :mod:`blockd.graph.io`).
        """
        segs: List[tuple] = []
        while length > 0:
            req, n, node = self._snapshot_read_lock(offset, length)
            try:
                if req is None:
                    segs.extend(node.read_segments(offset, n))
                else:
                    segs.append((SEG_DATA, node.pread(offset, n)))
            finally:
                self._snapshot_read_unlock(req)
            offset += n
            length -= n
        return segs

    def snapshot_block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        """``cbw_co_snapshot_block_status()``."""
        req, n, node = self._snapshot_read_lock(offset, length)
        try:
            return node.block_status(offset, n)
        finally:
            self._snapshot_read_unlock(req)

    def pdiscard_snapshot(self, offset: int, length: int) -> None:
        """``cbw_co_pdiscard_snapshot()``: forget whole clusters of the snapshot."""
        cs = self.bcs.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if end <= start:
            return
        with self.cond:
            self.access_bitmap.reset(start, end - start)
        self.bcs.reset(start, end - start)
        self.target.pdiscard(start, min(end, self.target.getlength()) - start)

    # -- permissions and description -----------------------------------------------------

    def child_perm_role(self, role: str) -> str:
        """``cbw_child_perm()``: ``file`` unshares write and resize once the
        filter has users (a backup job's own BlockBackend on it counts, as in
        QEMU: new writers must come through the filter); ``target`` is a data child."""
        if role == "file":
            node = self.node
            return "storage" if (node.parents or node.backends or node.users) else "filtered"
        return "data"

    def filename(self) -> str:
        """``cbw_refresh_filename()``: the source's filename."""
        return self.child.filename()

    def actual_size(self) -> Optional[int]:
        return self.child.driver.actual_size()

    def cluster_size(self) -> Optional[int]:
        """bdrv_get_info() of a filter: the filtered child's."""
        return self.child.driver.cluster_size()

    def image_info(self) -> Dict[str, Any]:
        """The filtered child's ``dirty-flag`` (bdrv_get_info forwards to it)."""
        return {"dirty-flag": bool(self.child.driver.image_info().get("dirty-flag", False))}


def _lookup_bitmap(graph: Any, ref: Dict[str, Any]) -> None:
    """``block_dirty_bitmap_lookup()``: blockd has no dirty bitmaps yet.

    :raise QMPError: QEMU's texts for a missing node or bitmap.
    """
    node_name = ref.get("node", "")
    node = graph.find(node_name) if graph is not None else None
    if node is None:
        raise QMPError("Node '%s' not found" % node_name)
    bitmaps = getattr(node, "dirty_bitmaps", None) or {}
    if ref.get("name") not in bitmaps:
        raise QMPError("Dirty bitmap '%s' not found" % ref.get("name", ""))
    raise QMPError("copy-before-write with a dirty bitmap is not supported by blockd")


# -- insertion above a node (backup) -----------------------------------------------------

def _subtree(node: Any) -> Set[int]:
    """ids of ``node`` and every node below it."""
    seen: Set[int] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        stack.extend(edge.node for edge in cur.children.values())
    return seen


def _move_users(old: Any, new: Any, skip: Set[int]) -> None:
    """``bdrv_replace_node()``: every backend and parent edge of ``old`` moves to
    ``new``, except edges whose parent is in ``skip`` (``should_update_child``)."""
    for backend in list(old.backends):
        backend.move_to(new)
    for edge in list(old.parents):
        if id(edge.parent) in skip:
            continue
        old.parents.remove(edge)
        edge.node = new
        new.parents.append(edge)


def cbw_append(source: Any, target: Any, filter_node_name: Optional[str] = None,
               **opts: Any) -> Any:
    """``bdrv_cbw_append()``: open a copy-before-write node over ``source`` and put
    it in ``source``'s place (drained).

    :param filter_node_name: the filter's node-name (generated ``#blockNNN`` if None).
    :param opts: ``compress`` (block-copy option), ``on-cbw-error``, ``cbw-timeout``.
    :return: the filter node; ``node.driver.bcs`` is its BlockCopyState.
    :raise QMPError: invalid or duplicate names, open failures.
    """
    graph = source.graph
    compress = bool(opts.pop("compress", False))
    options: Dict[str, Any] = {"driver": "copy-before-write"}
    if filter_node_name is not None:
        options["node-name"] = filter_node_name
    options["file"] = source.name
    options["target"] = target.name
    if source.read_only:
        # QEMU opens the filter read-write over a read-only source (it asks no write
        # permission of it while nobody writes); blockd's graph refuses a writable
        # parent of a read-only node, so the filter inherits read-only instead.
        options["read-only"] = True
    options.update(opts)
    with graph.gate.drained():
        node = graph.open(options, monitor_owned=False)
        try:
            if compress:
                node.driver.bcs.set_copy_opts(compress=True)
            _move_users(source, node, _subtree(node))
        except BaseException:
            _move_users(node, source, set())
            graph._free(node)  # pylint: disable=protected-access
            raise
    return node


def cbw_drop(filter_node: Any) -> None:
    """``bdrv_cbw_drop()``: give ``filter_node``'s users back to its source, close it (drained)."""
    graph = filter_node.graph
    if graph is None or graph.nodes.get(filter_node.name) is not filter_node:
        return
    source = filter_node.file
    with graph.gate.drained():
        if source is not None:
            _move_users(filter_node, source, set())
        graph._free(filter_node)  # pylint: disable=protected-access
