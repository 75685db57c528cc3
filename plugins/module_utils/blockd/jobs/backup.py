# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup job (QEMU 7.2 ``block/backup.c``).

:func:`backup_job_create` follows ``backup_job_create()``: the checks in
QEMU's order and texts, then a copy-before-write filter inserted above the
source (``cbw_append``, :mod:`blockd.drivers.cbw`), then the job, registered
on the filter (``main node``) and on the target.  The job is *created*, not
started: ``blockdev-backup`` starts it at once, ``transaction`` at commit.

:class:`BackupJob.run` is ``backup_run()``: the copy bitmap of the filter's
``BlockCopyState`` starts all dirty (``cbw_open``), ``sync=top``
first clears what the source does not allocate, ``sync=none`` waits for the
cancel (the filter copies what the guest overwrites), ``full``/``top`` copy
every dirty area in chunks (``backup_loop``), with a pause point and the
speed limit between chunks and the error policies after a failed chunk.  The
filter and the blockers go at ``clean`` (``backup_clean``), so the graph is
as before the job.

Dirty bitmaps (``sync=bitmap``; ``incremental`` is ``bitmap`` with
``bitmap-mode=on-success``; ``full``/``top`` may name a bitmap to update):
``backup_job_create`` freezes the bitmap with an anonymous *successor* that
takes the writes during the job (``bdrv_dirty_bitmap_create_successor``; the
bitmap is busy), ``run`` leaves dirty only the copy-bitmap clusters the
bitmap marks, and ``commit``/``abort`` follow ``backup_cleanup_sync_bitmap``:
the successor replaces the bitmap (``abdicate``: on success unless ``never``,
always with ``always``) or is merged back into it (``reclaim``); a failed or
cancelled ``always`` backup also merges in the clusters not copied.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Dict, Optional

from ..errors import QMPError
from ..graph import blockers
from ..graph import dirty_bitmap as dbm
from ..graph.blockcopy import chain_contains
from .blockjob import BlockJob, DrainedSection
from .job import JobTxn

LOG = logging.getLogger(__name__)

#: INT_MAX, the upper bound of x-perf max-workers.
INT_MAX = 2 ** 31 - 1
#: How bdrv_insert_node() prefixes a failure to open the filter.
CREATE_NODE_PREFIX = "Could not create node: "
#: Bytes copied per step of the loop when x-perf max-chunk is 0
#: (QEMU's block-copy buffers at most 1 MiB per task).
DEFAULT_CHUNK = 1 << 20


def _cbw_api() -> Any:
    """The copy-before-write module (H1's ``cbw_append``/``cbw_drop``)."""
    from ..drivers import cbw
    return cbw


def drop_filter(daemon: Any, filter_node: Any) -> None:
    """``bdrv_cbw_drop()``: it drains the filter, so block jobs above it pause and resume."""
    drain = DrainedSection(daemon, filter_node).begin()
    try:
        _cbw_api().cbw_drop(filter_node)
    finally:
        drain.end()


def _dirty_bytes(bitmap: Any) -> int:
    value = getattr(bitmap, "dirty_bytes")
    return value() if callable(value) else int(value)


def supports_compressed_writes(node: Any) -> bool:
    """``bdrv_supports_compressed_writes()``: the target's driver can compress (qcow2)."""
    drv = getattr(node, "driver", None)
    if drv is None:
        return False
    flag = getattr(drv, "supports_compressed_writes", None)
    if flag is not None:
        return bool(flag)
    return getattr(node, "drv_name", "") == "qcow2"


class BackupJob(BlockJob):
    """A running ``blockdev-backup`` (QEMU's ``BackupBlockJob``).

    Created by :func:`backup_job_create`; see the module doc.
    """

    job_type = "backup"

    def __init__(self, daemon: Any, job_id: Optional[str], filter_node: Any, source: Any,
                 target: Any, sync: str, speed: int, on_source_error: str,
                 on_target_error: str, auto_finalize: bool, auto_dismiss: bool,
                 txn: Optional[JobTxn], max_chunk: int,
                 sync_bitmap: Optional[dbm.DirtyBitmap] = None,
                 bitmap_mode: str = "on-success") -> None:
        self.daemon = daemon  # (Job sets it too, after the id checks)
        #: The frozen bitmap of sync=bitmap (or of a full/top backup that
        #: updates it), with its successor taking the writes meanwhile.
        self.sync_bitmap = sync_bitmap
        self.bitmap_mode = bitmap_mode
        self.filter_node = filter_node
        self.source = source
        self.target = target
        self.sync = sync
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.bcs = filter_node.driver.bcs
        self.max_chunk = max_chunk
        self.length = source.getlength()
        #: DrainedSection of the source held from prepare to start (QEMU's
        #: blockdev_backup_prepare .. blockdev_backup_clean).
        self.prepare_drain: Optional[DrainedSection] = None
        self._filter_dropped = False
        try:
            super().__init__(daemon, job_id, filter_node, speed=speed,
                             auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, txn=txn)
        except BaseException:
            self._drop_filter()
            reclaim_sync_bitmap(sync_bitmap)
            raise

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """``job_start()``; then the end of the prepare drain (``blockdev_backup_clean``)."""
        with self.lock:
            super().start()
            self.end_prepare_drain()

    def end_prepare_drain(self) -> None:
        """End the drained section of the source opened by :func:`backup_prepare` (idempotent)."""
        with self.lock:
            drain, self.prepare_drain = self.prepare_drain, None
            if drain is None:
                return
            if self.started and not self.deferred:
                # the job started inside the section: it pauses at its first pause
                # point before the section ends (qsd: running, paused, running)
                deadline = 300
                while self.busy and not self.is_completed and deadline:
                    self.cond.wait(0.05)
                    deadline -= 1
            drain.end()

    def on_cancel(self, force: bool) -> bool:
        """``backup_cancel()``: every cancel of a backup is forced."""
        return True

    def on_set_speed(self, speed: int) -> None:
        """``backup_set_speed()``: the copy loop rereads ``self.limit``; wake a sleeping job."""
        if self._sleeping_until is not None:
            self.enter()

    def commit(self) -> None:
        """``backup_commit()``."""
        self._cleanup_sync_bitmap(0)

    def abort(self) -> None:
        """``backup_abort()``."""
        self._cleanup_sync_bitmap(-1)

    def _cleanup_sync_bitmap(self, ret: int) -> None:
        """``backup_cleanup_sync_bitmap()``: on success (or always) the successor
        replaces the bitmap, else it is merged back; a failed ``always`` backup
        also keeps the areas it did not copy dirty.  Runs once."""
        bitmap, self.sync_bitmap = self.sync_bitmap, None
        if bitmap is None or bitmap.successor is None:
            return
        mode = self.bitmap_mode
        if (ret == 0 or mode == "always") and mode != "never":
            bm = dbm.abdicate(bitmap)
        else:
            bm = dbm.reclaim(bitmap)
        if ret < 0 and mode == "always":
            # bdrv_dirty_bitmap_merge_internal() of the copy bitmap
            end = -(-self.length // self.bcs.cluster_size) * self.bcs.cluster_size
            for start, length in _areas(self.bcs.copy_bitmap, end):
                bm.set(start, length)

    def clean(self) -> None:
        """``backup_clean()``: drop the blockers and the filter; graph as before."""
        self.end_prepare_drain()
        self.remove_all_nodes()
        self._drop_filter()

    def on_free(self) -> None:
        """``block_job_free()`` (also for a job that never started: no filter left)."""
        super().on_free()
        self.end_prepare_drain()
        self._drop_filter()
        # a job freed without finalization (never started): as backup_abort()
        bitmap, self.sync_bitmap = self.sync_bitmap, None
        reclaim_sync_bitmap(bitmap)

    def _drop_filter(self) -> None:
        if self._filter_dropped:
            return
        self._filter_dropped = True
        try:
            drop_filter(self.daemon, self.filter_node)
        except Exception:  # pylint: disable=broad-except
            LOG.exception("backup %s: dropping the filter failed", self.id)

    # -- the work ------------------------------------------------------------------------

    def run(self) -> None:
        """``backup_run()``."""
        bcs = self.bcs
        self._init_bitmap()
        if self.sync == "top":
            offset = 0
            while offset < self.length:
                if self.is_cancelled:
                    return
                self.pause_point()
                if self.is_cancelled:
                    return
                count = bcs.reset_unallocated(offset)
                if count <= 0:
                    break
                offset += count
            bcs.skip_unallocated = False
        if self.sync == "none":
            while not self.is_cancelled:
                self.yield_()
            return
        self._loop()

    def _init_bitmap(self) -> None:
        """``backup_init_bcs_bitmap()``: progress total = the dirty bytes; with
        ``sync=bitmap`` only the clusters the sync bitmap marks stay dirty.

        The filter's copy bitmap starts all dirty (``cbw_open``) and is not set
        again here: unlike QEMU's, blockd's NBD clients are not drained between
        the filter's insertion and this point, and a cluster the filter copied
        meanwhile must stay clean (its old data is already on the target).
        """
        bcs = self.bcs
        if self.sync == "bitmap":
            # QEMU clears the copy bitmap and merges the sync bitmap in; here the
            # clean areas are reset instead (never set: see above)
            _reset_clean_clusters(bcs.copy_bitmap, bcs.cluster_size, self.sync_bitmap,
                                  self.length)
        elif self.sync == "top":
            bcs.skip_unallocated = True
        self.progress_set_remaining(_dirty_bytes(bcs.copy_bitmap))

    def _loop(self) -> None:
        """``backup_loop()``: copy passes over the dirty areas until one succeeds."""
        while True:
            failure = self._copy_pass()
            if failure is None or self.is_cancelled:
                return
            is_read = bool(getattr(failure, "is_read", False))
            code = failure.errno or errno.EIO
            action = self.error_action(self.on_source_error if is_read
                                       else self.on_target_error, is_read, code)
            if action == "report":
                raise failure
            if action == "stop":
                self.pause_point()
            # ignore: retry at once (QEMU starts a new block-copy call)

    def _copy_pass(self) -> Optional[OSError]:
        """One ``block_copy_async()`` call over the whole image.

        :return: None when every area was copied (or the job was cancelled),
            the error of the first chunk that failed otherwise.
        """
        bcs = self.bcs
        cluster = bcs.cluster_size
        end = -(-self.length // cluster) * cluster
        chunk = self.max_chunk or DEFAULT_CHUNK
        offset = 0
        while offset < end:
            if self.is_cancelled:
                return None
            self.pause_point()
            if self.is_cancelled:
                return None
            area = bcs.copy_bitmap.next_dirty_area(offset, end)
            if not area:
                return None
            start, length = area
            length = min(length, chunk, end - start)
            self.ratelimit(length)
            if self.is_cancelled:
                return None
            try:
                bcs.copy(start, length)
            except OSError as exc:
                return exc
            offset = start + length
        return None


def _areas(bitmap: Any, end: int) -> Any:
    """Every dirty run of a copy bitmap in ``[0, end)`` as ``(offset, length)``."""
    offset = 0
    while True:
        area = bitmap.next_dirty_area(offset, end)
        if not area:
            return
        yield area
        offset = area[0] + area[1]


def _reset_clean_clusters(copy_bitmap: Any, cluster: int, sync_bitmap: Any,
                          length: int) -> None:
    """Make the copy bitmap what ``bdrv_clear_dirty_bitmap()`` +
    ``bdrv_dirty_bitmap_merge_internal()`` of ``sync_bitmap`` make it: a cluster
    stays dirty only if the sync bitmap has a dirty byte inside it.

    Only ``copy_bitmap.reset`` is used, on whole clusters: clusters the
    filter copied since it was inserted stay clean.
    """
    offset = 0
    while offset < length:
        dirty = sync_bitmap.next_dirty(offset, length)
        stop = length if dirty < 0 else dirty // cluster * cluster
        if stop > offset:
            copy_bitmap.reset(offset, stop - offset)
        if dirty < 0:
            return
        # skip the dirty run, to the end of its last cluster
        zero = sync_bitmap.next_zero(dirty, length)
        if zero < 0:
            return
        offset = -(-zero // cluster) * cluster


def reclaim_sync_bitmap(bitmap: Optional[dbm.DirtyBitmap]) -> None:
    """``bdrv_reclaim_dirty_bitmap()`` if ``bitmap`` still has a successor."""
    if bitmap is not None and bitmap.successor is not None:
        dbm.reclaim(bitmap)


def _check_perf(perf: Dict[str, Any]) -> int:
    """The x-perf checks of ``backup_job_create()``; return max-chunk."""
    workers = perf.get("max-workers", 64)
    if workers < 1 or workers > INT_MAX:
        raise QMPError("max-workers must be between 1 and %d" % INT_MAX)
    max_chunk = perf.get("max-chunk", 0)
    if max_chunk < 0:
        raise QMPError("max-chunk must be zero (which means no limit) or positive")
    return max_chunk


def backup_job_create(daemon: Any, job_id: str, source: Any, target: Any, sync: str,
                      speed: int, compress: bool, filter_node_name: Optional[str],
                      perf: Dict[str, Any], on_source_error: str, on_target_error: str,
                      auto_finalize: bool, auto_dismiss: bool, txn: Optional[JobTxn],
                      drain: Optional[DrainedSection] = None,
                      sync_bitmap: Optional[dbm.DirtyBitmap] = None,
                      bitmap_mode: str = "on-success") -> BackupJob:
    """``backup_job_create()``: every check in QEMU's order, the filter, the job (not started).

    On failure nothing is left behind (the filter is dropped again).

    :param drain: the drained section the caller holds on ``source``; the new
        job joins it (it starts paused, as in QEMU).
    :raise QMPError: QEMU's error for the first failing check.
    """
    if source is target:
        raise QMPError("Source and target cannot be the same")
    if compress and not supports_compressed_writes(target):
        # QEMU appends bdrv_get_device_name(target): "" for a node
        raise QMPError("Compression is not supported for this drive ")
    blockers.check(source, "backup-source")
    blockers.check(target, "backup-target")
    max_chunk = _check_perf(perf)
    if sync_bitmap is not None:
        # if we need to write to this bitmap, check that we can
        if bitmap_mode != "never":
            sync_bitmap.check(dbm.BITMAP_DEFAULT)
        dbm.create_successor(sync_bitmap)
    try:
        filter_node = _append_filter(source, target, filter_node_name, compress)
    except BaseException:
        reclaim_sync_bitmap(sync_bitmap)
        raise
    try:
        bcs = filter_node.driver.bcs
        cluster = bcs.cluster_size
        if max_chunk and max_chunk < cluster:
            raise QMPError("Required max-chunk (%d) is less than backup cluster size (%d)"
                           % (max_chunk, cluster))
        fleecing = getattr(bcs, "is_fleecing", None)
        if fleecing is None:
            fleecing = chain_contains(target, source)
        if fleecing:
            # old-style fleecing: reads of the target wait for copies in flight
            serialise = getattr(bcs, "serialise_target_reads", None)
            if serialise is not None:
                serialise()
    except BaseException:
        drop_filter(daemon, filter_node)
        reclaim_sync_bitmap(sync_bitmap)
        raise
    # drops the filter and reclaims the bitmap itself if it fails (bad id, negative speed)
    job = BackupJob(daemon, job_id, filter_node, source, target, sync, speed,
                    on_source_error, on_target_error, auto_finalize, auto_dismiss, txn,
                    max_chunk, sync_bitmap, bitmap_mode)
    with daemon.lock:
        job.add_node(target, "target")
        set_meter = getattr(bcs, "set_progress_meter", None)
        if set_meter is not None:
            set_meter(job)
        if drain is not None:
            drain.adopt(job)
            job.prepare_drain = drain
    return job


def _append_filter(source: Any, target: Any, filter_node_name: Optional[str],
                   compress: bool) -> Any:
    """The size check and ``bdrv_cbw_append()`` of ``backup_job_create()``."""
    if target.getlength() != source.getlength():
        raise QMPError("Source and target image have different sizes")
    opts: Dict[str, Any] = {"compress": True} if compress else {}
    try:
        return _cbw_api().cbw_append(source, target, filter_node_name, **opts)
    except QMPError as exc:
        # bdrv_insert_node()'s error_prepend, unless cbw_append says it already
        if exc.desc.startswith(CREATE_NODE_PREFIX):
            raise
        raise QMPError(CREATE_NODE_PREFIX + exc.desc, exc.error_class) from exc
