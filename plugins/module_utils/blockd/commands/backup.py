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

from typing import Any, Dict, Optional

from ..errors import QMPError
from ..jobs.backup import BackupJob, backup_job_create
from ..jobs.blockjob import DrainedSection, drain_all_flap
from ..jobs.job import JobTxn
from . import command


def _common_checks(args: Dict[str, Any], source: Any) -> None:
    """``do_backup_common()``'s option checks, in QEMU's order (bitmaps: none exist yet)."""
    sync = args["sync"]
    if sync in ("bitmap", "incremental") and "bitmap" not in args:
        raise QMPError("must provide a valid bitmap name for '%s' sync mode" % sync)
    if sync == "incremental" and args.get("bitmap-mode", "on-success") != "on-success":
        raise QMPError("Bitmap sync mode must be 'on-success' when using sync mode "
                       "'incremental'")
    if "bitmap" in args:
        find = getattr(source, "find_dirty_bitmap", None)
        bitmap = find(args["bitmap"]) if find is not None else None
        if bitmap is None:
            raise QMPError("Bitmap '%s' could not be found" % args["bitmap"])
        if "bitmap-mode" not in args:
            raise QMPError("Bitmap sync mode must be given when providing a bitmap")
        if sync == "none":
            raise QMPError("sync mode 'none' does not produce meaningful bitmap outputs")
        if args["bitmap-mode"] == "never" and sync != "bitmap":
            raise QMPError("Bitmap sync mode 'never' has no meaningful effect when combined "
                           "with sync mode '%s'" % sync)
        # backups driven by a dirty bitmap come with the bitmap work
        raise QMPError("Backup with a dirty bitmap is not supported by blockd")
    if "bitmap" not in args and "bitmap-mode" in args:
        raise QMPError("Cannot specify bitmap sync mode without a bitmap")


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
            _common_checks(args, source)
            job = backup_job_create(
                daemon, args.get("job-id", ""), source, target, args["sync"],
                args.get("speed", 0), args.get("compress", False),
                args.get("filter-node-name"), args.get("x-perf", {}),
                args.get("on-source-error", "report"), args.get("on-target-error", "report"),
                args.get("auto-finalize", True), args.get("auto-dismiss", True), txn, drain)
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
