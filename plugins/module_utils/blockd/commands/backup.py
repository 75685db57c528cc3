# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``blockdev-backup`` (QEMU 7.2 ``blockdev.c``: ``blockdev_backup_prepare``, ``do_backup_common``).

QEMU runs ``blockdev-backup`` as a one-action ``transaction``: every block job
pauses and resumes once (``bdrv_drain_all``), the source is drained while the
job is created and started, and the new job shows ``created, running,
paused, running``.  :func:`backup_prepare` is the transaction action's
``prepare`` (the ``transaction`` command calls it and starts the job at
commit); :func:`blockdev_backup` is prepare + start.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ..errors import QMPError
from ..graph import dirty_bitmap as dbm
from ..jobs.backup import BackupJob, backup_job_create
from ..jobs.blockjob import DrainedSection, drain_all_flap
from ..jobs.job import JobTxn
from . import command


def _common_checks(args: Dict[str, Any], source: Any) -> Tuple[str, Optional[Any], str]:
    """``do_backup_common()``'s option checks, in QEMU's order.

    :return: the sync mode (``incremental`` becomes ``bitmap``), the sync
        bitmap (or None) and the bitmap mode.
    """
    sync = args["sync"]
    mode = args.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and "bitmap" not in args:
        # checked before 'incremental' is desugared, for the message
        raise QMPError("must provide a valid bitmap name for '%s' sync mode" % sync)
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise QMPError("Bitmap sync mode must be 'on-success' when using sync mode "
                           "'incremental'")
        sync, mode = "bitmap", "on-success"
    bitmap = None
    if "bitmap" in args:
        bitmap = dbm.find(source, args["bitmap"])
        if bitmap is None:
            raise QMPError("Bitmap '%s' could not be found" % args["bitmap"])
        if mode is None:
            raise QMPError("Bitmap sync mode must be given when providing a bitmap")
        bitmap.check(dbm.BITMAP_ALLOW_RO)
        if sync == "none":
            raise QMPError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise QMPError("Bitmap sync mode 'never' has no meaningful effect when combined "
                           "with sync mode '%s'" % sync)
    if "bitmap" not in args and mode is not None:
        raise QMPError("Cannot specify bitmap sync mode without a bitmap")
    return sync, bitmap, mode or "on-success"


def backup_prepare(daemon: Any, args: Dict[str, Any], txn: Optional[JobTxn]) -> BackupJob:
    """The ``blockdev-backup`` transaction action's prepare: checks, filter, job, not started.

    The source stays drained (its other block jobs paused) until the job is
    started (``job.start()``) or cancelled (``job.cancel(True)``, which also
    removes the filter and the blockers).

    :param daemon: the daemon.
    :param args: validated ``BlockdevBackup`` arguments.
    :param txn: the transaction's JobTxn for ``completion-mode=grouped``, or None.
    :raise QMPError: QEMU's error; nothing is left behind.
    """
    with daemon.lock:
        graph = daemon.graph
        source = graph.lookup(args["device"])
        target = graph.lookup(args["target"])
        drain = DrainedSection(daemon, source).begin()
        try:
            sync, bitmap, mode = _common_checks(args, source)
            job = backup_job_create(
                daemon, args.get("job-id", ""), source, target, sync,
                args.get("speed", 0), args.get("compress", False),
                args.get("filter-node-name"), args.get("x-perf", {}),
                args.get("on-source-error", "report"), args.get("on-target-error", "report"),
                args.get("auto-finalize", True), args.get("auto-dismiss", True), txn, drain,
                sync_bitmap=bitmap, bitmap_mode=mode)
        except BaseException:
            drain.end()
            raise
        return job


@command("blockdev-backup")
def blockdev_backup(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_blockdev_backup()``: a one-action transaction (drain all, prepare, start)."""
    with daemon.lock:
        drain_all_flap(daemon)
        job = backup_prepare(daemon, args, None)
        job.start()
    return {}
