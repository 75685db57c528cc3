# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""QEMU 7.2's job core (``job.c``), with a worker thread instead of a coroutine.

The state machine is data: :data:`STT` (QEMU's ``JobSTT``) says which status
may follow which, :data:`VERBS` (``JobVerbTable``) which QMP verb a status
accepts.  :class:`Job` follows ``job.c`` function by function (each method
names its QEMU counterpart), so the ``JOB_STATUS_CHANGE`` sequences are
QEMU's: a ``blockdev-create`` job goes ``created, running, waiting, pending,
concluded`` and, on ``job-dismiss``, ``null``; a failing one ``created,
running, aborting, concluded``.

Locking (see ``docs/concurrency.md`` and ``docs/jobs.md``):

* every state change runs under the daemon's big lock (:attr:`Job.lock`,
  an ``RLock``) -- QEMU's ``job_mutex`` and BQL in one;
* :meth:`Job.run` runs in the job's worker thread **without** the lock, and
  meets the rest of the job only at :meth:`Job.pause_point`,
  :meth:`Job.yield_` and :meth:`Job.sleep` (QEMU's coroutine yields), which
  wait on :attr:`Job.cond`, a condition on the big lock;
* when ``run()`` returns, the worker takes the lock and completes the job
  (QEMU's ``job_exit`` bottom half): ``waiting``, ``pending``, finalization.

Differences from QEMU that no client can see: a job's synchronous start
(:meth:`Job.setup`) is explicit rather than "everything up to the first
yield"; there are no drain-induced ``paused``/``running`` flaps.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Optional, Tuple

from ..errors import QMPError

LOG = logging.getLogger(__name__)

#: QAPI ``JobStatus``, in QEMU's order.
STATUSES: Tuple[str, ...] = ("undefined", "created", "running", "paused", "ready", "standby",
                             "waiting", "pending", "aborting", "concluded", "null")

#: QEMU's ``JobSTT``: status -> the statuses it may change to.
STT: Dict[str, FrozenSet[str]] = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"aborting", "concluded"}),
    "aborting": frozenset({"aborting", "concluded"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}

_ACTIVE = frozenset({"created", "running", "paused", "ready", "standby"})
#: QEMU's ``JobVerbTable``: verb -> the statuses that accept it.
VERBS: Dict[str, FrozenSet[str]] = {
    "cancel": _ACTIVE | {"waiting", "pending"},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "set-speed": _ACTIVE,
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
}

#: Statuses in which ``job_is_completed()`` is true.
COMPLETED = frozenset({"waiting", "pending", "aborting", "concluded", "null"})

_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def check_job_id(daemon: Any, job_id: Optional[str], internal: bool = False) -> None:
    """``job_create()``'s id checks, in QEMU's order.

    :param daemon: the daemon (its :attr:`jobs`).
    :param job_id: the requested id, None for internal jobs.
    :param internal: whether the job is internal (invisible to QMP).
    :raise QMPError: with QEMU's text.
    """
    if job_id is not None:
        if internal:
            raise QMPError("Cannot specify job ID for internal job")
        if not _ID.match(job_id):
            raise QMPError("Invalid job ID '%s'" % job_id)
        if find_job(daemon, job_id) is not None:
            raise QMPError("Job ID '%s' already in use" % job_id)
    elif not internal:
        raise QMPError("An explicit job ID is required")


def find_job(daemon: Any, job_id: str) -> Optional["Job"]:
    """The job named ``job_id`` (``job_get()``), or None."""
    for job in daemon.jobs:
        if job.id == job_id:
            return job
    return None


class JobTxn:
    """Jobs that complete or fail together (QEMU's ``JobTxn``).

    Every job is in one; a job created alone gets its own.  The ``transaction``
    command's ``completion-mode=grouped`` puts several jobs in one.
    """

    def __init__(self) -> None:
        #: Member jobs, newest first (QEMU inserts at the head).
        self.jobs: List["Job"] = []
        #: Set once a member failed and the others are being cancelled.
        self.aborting = False

    def add(self, job: "Job") -> None:
        """``job_txn_add_job()``."""
        job.txn = self
        self.jobs.insert(0, job)

    def remove(self, job: "Job") -> None:
        """``job_txn_del_job()``."""
        if job in self.jobs:
            self.jobs.remove(job)
        job.txn = None

    def apply(self, func: Callable[["Job"], int]) -> int:
        """``job_txn_apply()``: call ``func`` on each job until one returns non-zero."""
        for job in list(self.jobs):
            ret = func(job)
            if ret:
                return ret
        return 0


class Job:
    """A QMP job (QEMU's ``Job`` plus its ``JobDriver``).

    Subclasses set :attr:`job_type` and override the hooks below; everything
    else is the state machine.  Hooks marked *locked* run with the big lock
    held and must not block; :meth:`run` runs without it.

    :param daemon: the daemon; the job registers in ``daemon.jobs``.
    :param job_id: the QMP id (None only for internal jobs).
    :param auto_finalize: finalize without ``job-finalize``.
    :param auto_dismiss: dismiss without ``job-dismiss``.
    :param txn: the transaction to join (a new one when None).
    :param internal: an internal job: no id, no events, not listed.
    :raise QMPError: if the id is invalid or in use.
    """

    #: QAPI ``JobType`` (``create``, ``backup``...).
    job_type: ClassVar[str] = ""
    #: Whether ``job-complete`` means something (mirror-like jobs).
    supports_complete: ClassVar[bool] = False

    def __init__(self, daemon: Any, job_id: Optional[str], auto_finalize: bool = True,
                 auto_dismiss: bool = True, txn: Optional[JobTxn] = None,
                 internal: bool = False) -> None:
        with daemon.lock:
            check_job_id(daemon, job_id, internal)
            self.daemon = daemon
            #: The big lock; every state change holds it.
            self.lock = daemon.lock
            #: Wakes the worker from a yield, and waiters for completion.
            self.cond = threading.Condition(daemon.lock)
            self.id = job_id
            self.auto_finalize = auto_finalize
            self.auto_dismiss = auto_dismiss
            self.status = "undefined"
            #: 0, or a negative errno once the job failed or was cancelled.
            self.ret = 0
            #: The error text (``query-jobs`` ``error``), once failed.
            self.err: Optional[str] = None
            self.cancelled = False
            self.force_cancel = False
            self.user_paused = False
            self.pause_count = 1
            self.paused = True
            self.busy = False
            #: job_start() was called (QEMU: the coroutine exists).
            self.started = False
            #: run() has returned (QEMU: deferred_to_main_loop).
            self.deferred = False
            self.txn: Optional[JobTxn] = None
            self._set_up = False
            self._kick = False
            #: a pause was asked for and the job has not reached a pause point since.
            self._unseen_pause = False
            self._sleeping_until: Optional[float] = None
            self._thread: Optional[threading.Thread] = None
            self._progress_lock = threading.Lock()
            self._progress = [0, 0]
            self.transition("created")
            daemon.jobs.insert(0, self)
            (txn or JobTxn()).add(self)

    # -- hooks for subclasses --------------------------------------------------------

    def setup(self) -> None:
        """*Locked.* The synchronous start, run by :meth:`start` in the command.

        What QEMU does before the job's first yield (option checks, opening
        nodes).  An exception fails the job before the command replies, as a
        QEMU job failing before its first yield does.
        """

    def run(self) -> None:
        """The job's work, in the worker thread, without the lock.

        Call :meth:`pause_point` (and :meth:`yield_`/:meth:`sleep`) between
        units of work; return when done, raise :class:`QMPError` (its text
        becomes the job's error) or :class:`OSError` (the error is the errno's
        ``strerror``, e.g. ``Input/output error``) to fail.
        """

    def prepare(self) -> None:
        """*Locked.* Before finalization of a successful job; raise to fail it."""

    def commit(self) -> None:
        """*Locked.* Finalization of a job that succeeded."""

    def abort(self) -> None:
        """*Locked.* Finalization of a job that failed or was cancelled."""

    def clean(self) -> None:
        """*Locked.* After commit/abort, always."""

    def on_cancel(self, force: bool) -> bool:
        """*Locked.* A cancel request arrives; return whether it is forced.

        QEMU's default (no ``.cancel``) treats every cancel as forced.
        """
        return True

    def on_complete(self) -> None:
        """*Locked.* ``job-complete`` on a ready job (when :attr:`supports_complete`)."""

    def on_pause(self) -> None:
        """*Locked.* At a pause point, before pausing."""

    def on_resume(self) -> None:
        """*Locked.* At a pause point, after resuming (or not pausing)."""

    def on_user_resume(self) -> None:
        """*Locked.* A user pause is lifted (resume, or cancel of a paused job)."""

    def on_idle(self) -> None:
        """*Locked.* The job stopped being busy (yield, or run() returned)."""

    def on_ready(self) -> None:
        """*Locked.* The job became ready (``BLOCK_JOB_READY`` for block jobs)."""

    def on_pending(self) -> None:
        """*Locked.* Pending and waiting for ``job-finalize`` (``BLOCK_JOB_PENDING``)."""

    def on_finalize_completed(self) -> None:
        """*Locked.* Finalized after success (``BLOCK_JOB_COMPLETED``)."""

    def on_finalize_cancelled(self) -> None:
        """*Locked.* Finalized after cancel (``BLOCK_JOB_CANCELLED``)."""

    def on_free(self) -> None:
        """*Locked.* The job reached ``null`` and left the daemon."""

    # -- state ----------------------------------------------------------------------

    def transition(self, new: str) -> None:
        """``job_state_transition()``: change status, emit ``JOB_STATUS_CHANGE``."""
        old = self.status
        if new not in STT[old]:
            raise AssertionError("job %s: %s -> %s is not a valid transition"
                                 % (self.id, old, new))
        self.status = new
        if self.id is not None and new != old:
            self.daemon.emit_event("JOB_STATUS_CHANGE", {"id": self.id, "status": new})

    def apply_verb(self, verb: str) -> None:
        """``job_apply_verb()``: raise QEMU's error if the status refuses ``verb``."""
        if self.status not in VERBS[verb]:
            raise QMPError("Job '%s' in state '%s' cannot accept command verb '%s'"
                           % (self.id, self.status, verb))

    @property
    def is_completed(self) -> bool:
        """``job_is_completed()``: run() is over (successfully or not)."""
        return self.status in COMPLETED

    @property
    def is_ready(self) -> bool:
        """``job_is_ready()``."""
        return self.status in ("ready", "standby")

    @property
    def is_cancelled(self) -> bool:
        """``job_is_cancelled()``: a forced cancel was requested (run() should stop)."""
        return self.force_cancel

    @property
    def cancel_requested(self) -> bool:
        """``job_cancel_requested()``: any cancel was requested."""
        return self.cancelled

    @property
    def should_pause(self) -> bool:
        """``job_should_pause()``."""
        return self.pause_count > 0

    # -- progress (any thread) ----------------------------------------------------------

    def progress_update(self, done: int) -> None:
        """``job_progress_update()``: ``done`` more units were completed."""
        with self._progress_lock:
            self._progress[0] += done

    def progress_set_remaining(self, remaining: int) -> None:
        """``job_progress_set_remaining()``: total = current + ``remaining``."""
        with self._progress_lock:
            self._progress[1] = self._progress[0] + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        """``job_progress_increase_remaining()``."""
        with self._progress_lock:
            self._progress[1] += delta

    def progress(self) -> Tuple[int, int]:
        """``(current, total)``, consistent with each other."""
        with self._progress_lock:
            return self._progress[0], self._progress[1]

    def info(self) -> Dict[str, Any]:
        """QAPI ``JobInfo`` (``query-jobs``)."""
        current, total = self.progress()
        info: Dict[str, Any] = {"id": self.id, "type": self.job_type, "status": self.status,
                                "current-progress": current, "total-progress": total}
        if self.err is not None:
            info["error"] = self.err
        return info

    # -- start and the worker ---------------------------------------------------------

    def start(self) -> None:
        """``job_start()``: go ``running``, run :meth:`setup`, start the worker."""
        with self.lock:
            if self.started or not self.paused:
                raise AssertionError("job %s started twice" % self.id)
            self.started = True
            self.pause_count -= 1
            self.busy = True
            self.paused = False
            self.transition("running")
            if not self.should_pause:
                failure = self._run_setup()
                if failure is not None:
                    self._finish_run(failure)
                    return
            self._thread = threading.Thread(target=self._worker, daemon=True,
                                            name="job-%s" % (self.id or "internal"))
            self._thread.start()

    def _run_setup(self) -> Optional[BaseException]:
        self._set_up = True
        try:
            self.setup()
        except (QMPError, OSError) as exc:
            return exc
        return None

    def _worker(self) -> None:
        """``job_co_entry()``: a pause point, then run(), then job_exit()."""
        failure: Optional[BaseException] = None
        with self.lock:
            self._pause_point_locked()
            if not self._set_up:
                failure = self._run_setup()
        if failure is None:
            try:
                self.run()
            except (QMPError, OSError) as exc:
                failure = exc
            except Exception as exc:  # pylint: disable=broad-except
                LOG.exception("job %s failed", self.id)
                failure = exc
        with self.lock:
            try:
                self._finish_run(failure)
            finally:
                self.cond.notify_all()

    def _finish_run(self, failure: Optional[BaseException]) -> None:
        """Record run()'s result and complete the job (``job_exit()``)."""
        if failure is None:
            ret = 0
        elif isinstance(failure, QMPError):
            ret = -errno.EINVAL
            if self.err is None:
                self.err = failure.desc
        elif isinstance(failure, OSError):
            ret = -(failure.errno or errno.EIO)
        else:
            ret = -errno.EIO
        self.ret = ret
        self.deferred = True
        # job_exit(): "a lie, we're not quiescent" -- idle while completing
        self.busy = False
        self.on_idle()
        self._completed()

    # -- worker-side yields (called from run(), lock not held) --------------------------

    def pause_point(self) -> None:
        """``job_pause_point()``: pause here if a pause was requested."""
        with self.lock:
            self._pause_point_locked()

    def yield_(self) -> None:
        """``job_yield()``: wait until :meth:`enter` (cancel, resume, a kick)."""
        with self.lock:
            if self.is_cancelled:
                return
            if not self.should_pause:
                self._do_yield(None)
            self._pause_point_locked()

    def sleep(self, seconds: float) -> None:
        """``job_sleep_ns()``: wait ``seconds`` (or until kicked), then a pause point."""
        with self.lock:
            if self.is_cancelled:
                return
            if not self.should_pause:
                self._do_yield(seconds)
            self._pause_point_locked()

    def _do_yield(self, timeout: Optional[float]) -> None:
        """``job_do_yield()``: not busy until :meth:`enter` or the timeout."""
        self.busy = False
        self.on_idle()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._sleeping_until = deadline
        while not self._kick:
            if deadline is None:
                self.cond.wait()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.cond.wait(left)
        self._kick = False
        self._sleeping_until = None
        self.busy = True

    def _pause_point_locked(self) -> None:
        """``job_pause_point_locked()``."""
        if self.is_cancelled:
            return
        if not self.should_pause:
            if self._unseen_pause:
                # A drain paused and resumed the job before its thread got here (e.g. the
                # drainer held the I/O gate and could not wait). In QEMU the job coroutine
                # runs to its pause point inside the drain, so every drain shows as a
                # paused/running pair; show it now.
                self._unseen_pause = False
                status = self.status
                self.transition("standby" if status == "ready" else "paused")
                self.transition(status)
            return
        self.on_pause()
        if self.should_pause and not self.is_cancelled:
            status = self.status
            self._unseen_pause = False
            self.transition("standby" if status == "ready" else "paused")
            self.paused = True
            self._do_yield(None)
            self.paused = False
            self.transition(status)
        self.on_resume()

    def enter(self) -> None:
        """``job_enter()``: wake the worker if it is yielding."""
        with self.lock:
            if not self.started or self.deferred or self.busy:
                return
            self.busy = True
            self._kick = True
            self.cond.notify_all()

    def transition_to_ready(self) -> None:
        """``job_transition_to_ready()`` (mirror-like jobs, from run())."""
        with self.lock:
            self.transition("ready")
            self.on_ready()

    # -- pause and resume ---------------------------------------------------------------

    def pause(self) -> None:
        """``job_pause()``: one more pause request (internal or user)."""
        with self.lock:
            self.pause_count += 1
            if not self.paused:
                self._unseen_pause = self.started and not self.deferred
                self.enter()

    def resume(self) -> None:
        """``job_resume()``: drop a pause request; wake the job at zero."""
        with self.lock:
            if self.pause_count <= 0:
                raise AssertionError("job %s resumed more than paused" % self.id)
            self.pause_count -= 1
            if self.pause_count:
                return
            if self._sleeping_until is None:  # QEMU: only if no timer is pending
                self.enter()

    def user_pause(self) -> None:
        """``job-pause``."""
        with self.lock:
            self.apply_verb("pause")
            if self.user_paused:
                raise QMPError("Job is already paused")
            self.user_paused = True
            self.pause()

    def user_resume(self) -> None:
        """``job-resume``."""
        with self.lock:
            if not self.user_paused or self.pause_count <= 0:
                raise QMPError("Can't resume a job that was not paused")
            self.apply_verb("resume")
            self.on_user_resume()
            self.user_paused = False
            self.resume()

    # -- cancel, complete, finalize, dismiss --------------------------------------------

    def user_cancel(self, force: bool) -> None:
        """``job-cancel`` / ``block-job-cancel``."""
        with self.lock:
            self.apply_verb("cancel")
            self.cancel(force)

    def cancel(self, force: bool) -> None:
        """``job_cancel_locked()`` (no verb check: internal callers)."""
        with self.lock:
            if self.status == "concluded":
                self._do_dismiss()
                return
            self._cancel_async(force)
            if not self.started:
                self._completed()
            elif self.deferred:
                if self.is_cancelled:
                    self._txn_abort()
            else:
                self.enter()

    def _cancel_async(self, force: bool) -> None:
        """``job_cancel_async_locked()``."""
        force = self.on_cancel(force)
        if self.user_paused:
            self.on_user_resume()
            self.user_paused = False
            self.pause_count -= 1
        if force or not self.deferred:
            self.cancelled = True
            self.force_cancel = self.force_cancel or force

    def complete(self) -> None:
        """``job-complete``."""
        with self.lock:
            self.apply_verb("complete")
            if self.cancel_requested or not self.supports_complete:
                raise QMPError("The active block job '%s' cannot be completed" % self.id)
            self.on_complete()

    def finalize(self) -> None:
        """``job-finalize``."""
        with self.lock:
            self.apply_verb("finalize")
            self._do_finalize()

    def dismiss(self) -> None:
        """``job-dismiss``."""
        with self.lock:
            self.apply_verb("dismiss")
            self._do_dismiss()

    def cancel_sync(self, force: bool = True, timeout: Optional[float] = None) -> bool:
        """``job_cancel_sync()``: cancel and wait until run() is over.

        :param force: force the cancel.
        :param timeout: seconds to wait at most (None: for ever).
        :return: whether the job completed in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self.cancel(force)
            return self._wait_completed(deadline)

    def _wait_completed(self, deadline: Optional[float]) -> bool:
        """``job_finish_sync()``'s wait: until the job is completed."""
        while not self.is_completed:
            if not self.started:
                self._completed()
                continue
            self.enter()
            if deadline is None:
                self.cond.wait()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    # -- completion (job_exit and after), all locked ------------------------------------

    def _update_rc(self) -> None:
        """``job_update_rc_locked()``."""
        if not self.ret and self.is_cancelled:
            self.ret = -errno.ECANCELED
        if self.ret:
            if self.err is None:
                self.err = os.strerror(-self.ret)
            self.transition("aborting")

    def _completed(self) -> None:
        """``job_completed_locked()``."""
        if self.is_completed:
            raise AssertionError("job %s completed twice" % self.id)
        self._update_rc()
        if self.ret:
            self._txn_abort()
        else:
            self._txn_success()

    def _txn_success(self) -> None:
        """``job_completed_txn_success_locked()``."""
        self.transition("waiting")
        txn = self.txn
        if txn is None:
            raise AssertionError("job %s is in no transaction" % self.id)
        for other in txn.jobs:
            if not other.is_completed:
                return
        txn.apply(Job._transition_to_pending)
        if txn.apply(lambda job: 0 if job.auto_finalize else 1) == 0:
            self._do_finalize()

    def _transition_to_pending(self) -> int:
        """``job_transition_to_pending_locked()``."""
        self.transition("pending")
        if not self.auto_finalize:
            self.on_pending()
        return 0

    def _prepare_one(self) -> int:
        """``job_prepare_locked()``."""
        if self.ret == 0:
            try:
                self.prepare()
            except QMPError as exc:
                self.ret = -errno.EINVAL
                self.err = exc.desc
            except OSError as exc:
                self.ret = -(exc.errno or errno.EIO)
            self._update_rc()
        return self.ret

    def _do_finalize(self) -> None:
        """``job_do_finalize_locked()``."""
        txn = self.txn
        if txn is None:
            raise AssertionError("job %s is in no transaction" % self.id)
        if txn.apply(Job._prepare_one):
            self._txn_abort()
        else:
            txn.apply(Job._finalize_one)

    def _finalize_one(self) -> int:
        """``job_finalize_single_locked()``."""
        self._update_rc()
        try:
            if not self.ret:
                self.commit()
            else:
                self.abort()
        finally:
            self.clean()
        if self.started:
            if self.is_cancelled:
                self.on_finalize_cancelled()
            else:
                self.on_finalize_completed()
        if self.txn is not None:
            self.txn.remove(self)
        self._conclude()
        return 0

    def _txn_abort(self) -> None:
        """``job_completed_txn_abort_locked()``: fail every job of the transaction."""
        txn = self.txn
        if txn is None or txn.aborting:
            return
        txn.aborting = True
        for other in list(txn.jobs):
            if other is not self:
                other._cancel_async(True)
        while txn.jobs:
            other = txn.jobs[0]
            if not other.is_completed:
                other._wait_completed(None)
            other._finalize_one()

    def _conclude(self) -> None:
        """``job_conclude_locked()``."""
        self.transition("concluded")
        if self.auto_dismiss or not self.started:
            self._do_dismiss()

    def _do_dismiss(self) -> None:
        """``job_do_dismiss_locked()``: ``null``, and out of the daemon."""
        self.busy = False
        self.paused = False
        self.deferred = True
        if self.txn is not None:
            self.txn.remove(self)
        self.transition("null")
        if self in self.daemon.jobs:
            self.daemon.jobs.remove(self)
        self.on_free()
        self.cond.notify_all()


def cancel_all_sync(daemon: Any, timeout: float = 30.0) -> None:
    """``job_cancel_sync_all()``: cancel every job and wait (daemon shutdown).

    :param daemon: the daemon.
    :param timeout: overall limit in seconds; jobs still running then are left
        to their (daemon) threads.
    """
    deadline = time.monotonic() + timeout
    with daemon.lock:
        # qsd drains every node before it cancels: block jobs pause and resume once
        from .blockjob import drain_all_flap  # pylint: disable=import-outside-toplevel
        drain_all_flap(daemon)
        seen: Dict[int, int] = {}
        while daemon.jobs:
            job = daemon.jobs[0]
            seen[id(job)] = seen.get(id(job), 0) + 1
            if seen[id(job)] > 3:
                LOG.warning("job %s does not go away at shutdown", job.id)
                daemon.jobs.remove(job)
                continue
            left = deadline - time.monotonic()
            if not job.cancel_sync(True, max(0.0, left)):
                LOG.warning("job %s did not finish within the shutdown limit", job.id)
                daemon.jobs.remove(job)
