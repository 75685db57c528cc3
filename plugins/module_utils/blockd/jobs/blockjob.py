# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Block jobs: what QEMU 7.2's ``blockjob.c`` adds to the job core.

A :class:`BlockJob` is a :class:`~.job.Job` that works on block nodes:

* it registers as a *user* of its nodes (``node.users``, role ``job``), which
  is how the op blockers of :mod:`blockd.graph.blockers` see it
  (``Node 'tgt' is busy: block device is in use by block job: backup``);
* it has a ``speed`` (a :class:`RateLimit`, QEMU's ``ratelimit.h``), an
  ``io-status`` and error policies (:meth:`BlockJob.error_action`, QEMU's
  ``block_job_error_action()``);
* it reports ``BlockJobInfo`` (``query-block-jobs``) and the ``BLOCK_JOB_*``
  events, at the points of the job life cycle where QEMU sends them;
* it follows drains of its nodes as QEMU's ``child_job`` parent does: a
  drained section pauses the job (``paused``) and its end resumes it
  (``running``), so the ``JOB_STATUS_CHANGE`` flaps a QMP client sees around
  ``blockdev-backup`` and ``transaction`` are qsd's (:class:`DrainedSection`,
  :func:`drain_all_flap`).
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any, Dict, Iterable, List, Optional

from ..errors import DeviceNotActive, QMPError
from .job import Job, JobTxn

#: QAPI ``BlockdevOnError``.
ON_ERROR = ("report", "ignore", "enospc", "stop", "auto")
#: QEMU's BLOCK_JOB_SLICE_TIME (100 ms), in seconds.
SLICE_TIME = 0.1
#: How long a drain waits for a job to reach a pause point at most (QEMU: for ever).
DRAIN_WAIT = 30.0


class RateLimit:
    """QEMU's ``RateLimit`` (``include/qemu/ratelimit.h``): a slice-based token bucket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.slice_ns = int(SLICE_TIME * 1e9)
        self.slice_quota = 0.0
        self.burst_quota = 0.0
        self.slice_start = 0
        self.slice_end = 0
        self.dispatched = 0.0

    def set_speed(self, speed: int, slice_s: float = SLICE_TIME) -> None:
        """``ratelimit_set_speed()``: ``speed`` units per second, 0 for no limit."""
        with self._lock:
            self.slice_ns = int(slice_s * 1e9)
            if speed == 0:
                self.slice_quota = 0.0
            else:
                self.slice_quota = max(float(speed) * self.slice_ns / 1e9, 1.0)
            self.burst_quota = self.slice_quota

    def calculate_delay(self, amount: int) -> float:
        """``ratelimit_calculate_delay()``: account ``amount``; seconds to wait (0: go on)."""
        now = time.monotonic_ns()
        with self._lock:
            if not self.slice_quota and not self.burst_quota:
                return 0.0
            if self.slice_end < now:
                self.slice_start = now
                self.slice_end = now + self.slice_ns
                self.dispatched = 0.0
            self.dispatched += amount
            if self.dispatched < self.burst_quota:
                return 0.0
            delay_slices = self.dispatched / self.slice_quota
            self.slice_end = self.slice_start + int(delay_slices * self.slice_ns)
            return max(0.0, (self.slice_end - now) / 1e9)


class JobUser:
    """A job's registration on one of its nodes (QEMU: ``block_job_add_bdrv``'s blocker).

    :param job: the job.
    :param name: QEMU's child name ("main node", "target").
    """

    role = "job"

    def __init__(self, job: "BlockJob", name: str) -> None:
        self.job = job
        self.name = name

    @property
    def description(self) -> str:
        """The blocker text's tail, the job type (``...in use by block job: backup``)."""
        return self.job.job_type

    def __repr__(self) -> str:
        return "<JobUser %s of %s>" % (self.name, self.job.id)


def block_jobs(daemon: Any) -> List["BlockJob"]:
    """Every non-internal block job, newest first (``block_job_next_locked``)."""
    return [job for job in daemon.jobs if isinstance(job, BlockJob) and job.id is not None]


def find_block_job(daemon: Any, job_id: str) -> "BlockJob":
    """``find_block_job_locked()``: the block job ``job_id`` or ``DeviceNotActive``."""
    for job in block_jobs(daemon):
        if job.id == job_id:
            return job
    raise DeviceNotActive("Block job '%s' not found" % job_id)


def _ancestors(node: Any) -> List[Any]:
    """``node`` and every node above it (what ``bdrv_drained_begin(node)`` reaches)."""
    seen: List[Any] = []
    todo = [node]
    while todo:
        cur = todo.pop()
        if any(cur is s for s in seen):
            continue
        seen.append(cur)
        for edge in cur.parents:
            todo.append(edge.parent)
    return seen


def jobs_on(daemon: Any, nodes: Iterable[Any]) -> List["BlockJob"]:
    """Block jobs registered on any of ``nodes`` (oldest first, as QEMU's parent lists)."""
    found: List[BlockJob] = []
    for node in nodes:
        for user in getattr(node, "users", ()):
            job = getattr(user, "job", None)
            if isinstance(job, BlockJob) and job not in found:
                found.append(job)
    return found


class DrainedSection:
    """``bdrv_drained_begin(node)`` .. ``bdrv_drained_end(node)`` as block jobs see it.

    Every block job registered on ``node`` or a node above it is paused at
    :meth:`begin` (and waited for until it stopped, QEMU's drain poll) and
    resumed at :meth:`end`.  A job created while the section is open is
    paused too (:meth:`adopt`), as QEMU's ``child_job`` attached to a drained
    node is.

    :param daemon: the daemon.
    :param node: the drained node.
    """

    def __init__(self, daemon: Any, node: Any) -> None:
        self.daemon = daemon
        self.node = node
        self.jobs: List[BlockJob] = []
        self.active = False

    def begin(self) -> "DrainedSection":
        """Pause the jobs above the node and wait until they stopped."""
        with self.daemon.lock:
            self.active = True
            self.jobs = [job for job in jobs_on(self.daemon, _ancestors(self.node))
                         if not job.is_completed]
            for job in self.jobs:
                job.drained_begin()
        return self

    def adopt(self, job: "BlockJob") -> None:
        """A job created inside the section (its nodes are drained: pause it)."""
        with self.daemon.lock:
            if self.active and job not in self.jobs:
                job.pause()
                self.jobs.append(job)

    def end(self) -> None:
        """Resume the jobs, newest first (QEMU's parent lists are newest first; idempotent)."""
        with self.daemon.lock:
            if not self.active:
                return
            self.active = False
            jobs, self.jobs = self.jobs, []
            for job in reversed(jobs):
                job.drained_end()


def drain_all_flap(daemon: Any) -> None:
    """``bdrv_drain_all()``: every running block job pauses, then resumes.

    ``qmp_transaction`` (so ``blockdev-backup`` too) and qsd's ``quit`` start with it.
    """
    with daemon.lock:
        jobs = [job for job in reversed(block_jobs(daemon)) if job.started
                and not job.is_completed]
        for job in jobs:
            job.drained_begin()
        for job in jobs:
            job.drained_end()


class BlockJob(Job):
    """A job on block nodes (QEMU's ``BlockJob``, ``block_job_create()``).

    :param daemon: the daemon.
    :param job_id: the QMP id (``device`` in block-job commands and events).
    :param node: the job's main node (QEMU's ``bs`` of ``block_job_create``).
    :param speed: the initial speed limit (bytes/s, 0 = none).
    :raise QMPError: for a bad id, or a negative speed (then the job is
        created and at once dismissed: ``created``, ``null``, as QEMU's
        ``job_early_fail``).
    """

    def __init__(self, daemon: Any, job_id: Optional[str], node: Any, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 txn: Optional[JobTxn] = None, internal: bool = False) -> None:
        super().__init__(daemon, job_id, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss, txn=txn, internal=internal)
        with self.lock:
            self.speed = 0
            #: QAPI ``BlockDeviceIoStatus``: ``ok``, ``failed``, ``nospace``.
            self.iostatus = "ok"
            self.limit = RateLimit()
            self.users: List[JobUser] = []
            self.main_node = node
            self.add_node(node, "main node")
            try:
                self._set_speed(speed)
            except QMPError:
                self.early_fail()
                raise

    # -- nodes ------------------------------------------------------------------------

    def add_node(self, node: Any, name: str) -> None:
        """``block_job_add_bdrv()``: register on ``node`` (its op blockers)."""
        user = JobUser(self, name)
        node.users.append(user)
        self.users.append(user)
        user.node = node  # type: ignore[attr-defined]

    def remove_all_nodes(self) -> None:
        """``block_job_remove_all_bdrv()``: drop every registration."""
        for user in self.users:
            node = user.node  # type: ignore[attr-defined]
            if user in node.users:
                node.users.remove(user)
        self.users = []

    def early_fail(self) -> None:
        """``job_early_fail()``: a job that never started goes away (``null``)."""
        with self.lock:
            self._do_dismiss()

    def on_free(self) -> None:
        """``block_job_free()``."""
        self.remove_all_nodes()

    # -- state change notifications (drains wait on them) -----------------------------

    def transition(self, new: str) -> None:
        """``job_state_transition()``, waking whoever waits for the job to stop or go on."""
        super().transition(new)
        self.cond.notify_all()

    def drained_begin(self) -> None:
        """``child_job_drained_begin()`` + drain poll: pause and wait until stopped.

        No wait when this thread holds the I/O gate drained: the job may be
        waiting at the gate and could not reach its pause point.
        """
        with self.lock:
            self.pause()
            if _holds_gate(self.daemon):
                return
            deadline = time.monotonic() + DRAIN_WAIT
            while (self.started and not self.deferred and self.busy and not self.is_completed
                   and time.monotonic() < deadline):
                self.cond.wait(0.05)

    def drained_end(self) -> None:
        """``child_job_drained_end()``: resume, and wait until the job went on."""
        with self.lock:
            self.resume()
            deadline = time.monotonic() + DRAIN_WAIT
            while (self.started and self.pause_count == 0 and self.paused
                   and not self.deferred and time.monotonic() < deadline):
                self.cond.wait(0.05)

    # -- speed ------------------------------------------------------------------------

    def _set_speed(self, speed: int) -> None:
        """``block_job_set_speed_locked()`` after the verb check."""
        if speed < 0:
            raise QMPError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self.limit.set_speed(speed)
        self.speed = speed
        self.on_set_speed(speed)
        if speed and speed <= old:
            return
        # kick only if a timer is pending (job_enter_cond(job, job_timer_pending))
        if self._sleeping_until is not None:
            self.enter()

    def set_speed(self, speed: int) -> None:
        """``block-job-set-speed``."""
        with self.lock:
            self.apply_verb("set-speed")
            self._set_speed(speed)

    def on_set_speed(self, speed: int) -> None:
        """*Locked.* The driver's ``set_speed`` hook."""

    def ratelimit(self, amount: int) -> None:
        """Account ``amount`` bytes; sleep (a pause point) as the speed asks."""
        while True:
            delay = self.limit.calculate_delay(0) if self.speed else 0.0
            if delay <= 0 or self.is_cancelled:
                break
            self.sleep(delay)
        if self.speed:
            self.limit.calculate_delay(amount)

    # -- errors -----------------------------------------------------------------------

    def error_action(self, on_err: str, is_read: bool, error: int) -> str:
        """``block_job_error_action()``: the action for an I/O error, and its side effects.

        :param on_err: the policy (QAPI ``BlockdevOnError``).
        :param is_read: whether the failed operation was a read.
        :param error: the positive errno.
        :return: ``report``, ``ignore`` or ``stop`` (QAPI ``BlockErrorAction``).
        """
        if on_err in ("enospc", "auto"):
            action = "stop" if error == errno.ENOSPC else "report"
        elif on_err == "stop":
            action = "stop"
        elif on_err == "ignore":
            action = "ignore"
        else:
            action = "report"
        if self.id is None:
            return action
        with self.lock:
            self.daemon.emit_event("BLOCK_JOB_ERROR", {
                "device": self.id, "operation": "read" if is_read else "write",
                "action": action})
            if action == "stop":
                if not self.user_paused:
                    self.pause()
                    # make the pause user visible, which will be resumed from QMP
                    self.user_paused = True
                if self.iostatus == "ok":
                    self.iostatus = "nospace" if error == errno.ENOSPC else "failed"
        return action

    def on_user_resume(self) -> None:
        """``block_job_user_resume()``: reset the I/O status."""
        self.iostatus = "ok"

    # -- QMP --------------------------------------------------------------------------

    def block_info(self) -> Dict[str, Any]:
        """QAPI ``BlockJobInfo`` (``block_job_query_locked()``)."""
        current, total = self.progress()
        info: Dict[str, Any] = {
            "type": self.job_type, "device": self.id, "len": total, "offset": current,
            "busy": self.busy, "paused": self.pause_count > 0, "speed": self.speed,
            "io-status": self.iostatus, "ready": self.is_ready, "status": self.status,
            "auto-finalize": self.auto_finalize, "auto-dismiss": self.auto_dismiss}
        if self.ret:
            info["error"] = self.err if self.err is not None else _strerror(self.ret)
        return info

    def _event_common(self) -> Dict[str, Any]:
        current, total = self.progress()
        return {"type": self.job_type, "device": self.id, "len": total, "offset": current,
                "speed": self.speed}

    def on_finalize_completed(self) -> None:
        """``block_job_event_completed_locked()``: ``BLOCK_JOB_COMPLETED``."""
        if self.id is None:
            return
        data = self._event_common()
        if self.ret:
            data["error"] = self.err if self.err is not None else _strerror(self.ret)
        self.daemon.emit_event("BLOCK_JOB_COMPLETED", data)

    def on_finalize_cancelled(self) -> None:
        """``block_job_event_cancelled_locked()``: ``BLOCK_JOB_CANCELLED``."""
        if self.id is None:
            return
        self.daemon.emit_event("BLOCK_JOB_CANCELLED", self._event_common())

    def on_ready(self) -> None:
        """``block_job_event_ready_locked()``: ``BLOCK_JOB_READY``."""
        if self.id is None:
            return
        self.daemon.emit_event("BLOCK_JOB_READY", self._event_common())

    def on_pending(self) -> None:
        """``block_job_event_pending_locked()``: ``BLOCK_JOB_PENDING``."""
        if self.id is None:
            return
        self.daemon.emit_event("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})


def _holds_gate(daemon: Any) -> bool:
    """Whether the calling thread holds the daemon's I/O gate drained."""
    gate = getattr(getattr(daemon, "graph", None), "gate", None)
    return getattr(gate, "_drainer", None) == threading.get_ident()


def _strerror(ret: int) -> str:
    import os
    return os.strerror(-ret)
