"""The job core (blockd.jobs.job): QEMU's state machine, verbs and events, in-process."""
import errno
import re
import threading

import pytest

from blockd.errors import QMPError
from blockd.jobs import STATUSES, STT, VERBS, Job, JobTxn
from blockd.jobs.job import cancel_all_sync

# job.c's JobSTT and JobVerbTable, transcribed (columns U C R P Y S W D X E N)
_JOB_STT = {
    "undefined": "0 1 0 0 0 0 0 0 0 0 0",
    "created": "0 0 1 0 0 0 0 0 1 0 1",
    "running": "0 0 0 1 1 0 1 0 1 0 0",
    "paused": "0 0 1 0 0 0 0 0 0 0 0",
    "ready": "0 0 0 0 0 1 1 0 1 0 0",
    "standby": "0 0 0 0 1 0 0 0 0 0 0",
    "waiting": "0 0 0 0 0 0 0 1 1 0 0",
    "pending": "0 0 0 0 0 0 0 0 1 1 0",
    "aborting": "0 0 0 0 0 0 0 0 1 1 0",
    "concluded": "0 0 0 0 0 0 0 0 0 0 1",
    "null": "0 0 0 0 0 0 0 0 0 0 0",
}
_JOB_VERBS = {
    "cancel": "0 1 1 1 1 1 1 1 0 0 0",
    "pause": "0 1 1 1 1 1 0 0 0 0 0",
    "resume": "0 1 1 1 1 1 0 0 0 0 0",
    "set-speed": "0 1 1 1 1 1 0 0 0 0 0",
    "complete": "0 0 0 0 1 1 0 0 0 0 0",
    "finalize": "0 0 0 0 0 0 0 1 0 0 0",
    "dismiss": "0 0 0 0 0 0 0 0 0 1 0",
}


def _row(bits):
    return {s for s, b in zip(STATUSES, bits.split()) if b == "1"}


def test_tables_are_qemus():
    assert {s: set(v) for s, v in STT.items()} == {s: _row(b) for s, b in _JOB_STT.items()}
    assert {v: set(s) for v, s in VERBS.items()} == {v: _row(b) for v, b in _JOB_VERBS.items()}


class FakeDaemon:
    """What a job needs of the daemon: the big lock, the job list, events."""

    def __init__(self):
        self.lock = threading.RLock()
        self.jobs = []
        self.events = []
        self.cond = threading.Condition()

    def emit_event(self, name, data=None):
        with self.cond:
            self.events.append((name, dict(data or {})))
            self.cond.notify_all()

    def statuses(self, job_id):
        with self.cond:
            return [d["status"] for n, d in self.events
                    if n == "JOB_STATUS_CHANGE" and d["id"] == job_id]

    def wait_status(self, job_id, status, timeout=10):
        with self.cond:
            ok = self.cond.wait_for(lambda: status in self.statuses(job_id), timeout)
        assert ok, (status, self.statuses(job_id))


class ToyJob(Job):
    """A job whose run() loops over pause points until told to stop."""

    job_type = "create"

    def __init__(self, daemon, job_id, fail=None, setup_fail=None, loop=False, **kw):
        self.fail, self.setup_fail, self.loop = fail, setup_fail, loop
        self.stop = threading.Event()
        self.calls = []
        super().__init__(daemon, job_id, **kw)

    def setup(self):
        self.calls.append("setup")
        if self.setup_fail:
            raise self.setup_fail

    def run(self):
        self.progress_set_remaining(10)
        while self.loop and not self.stop.is_set() and not self.is_cancelled:
            self.sleep(0.01)
        self.progress_update(10)
        if self.fail:
            raise self.fail

    def commit(self):
        self.calls.append("commit")

    def abort(self):
        self.calls.append("abort")

    def clean(self):
        self.calls.append("clean")

    def on_pending(self):
        self.calls.append("pending-event")

    def on_finalize_completed(self):
        self.calls.append("completed-event")

    def on_finalize_cancelled(self):
        self.calls.append("cancelled-event")


@pytest.fixture
def daemon():
    d = FakeDaemon()
    yield d
    cancel_all_sync(d, timeout=10)


def test_success_auto(daemon):
    job = ToyJob(daemon, "j1")
    job.start()
    daemon.wait_status("j1", "null")
    assert daemon.statuses("j1") == ["created", "running", "waiting", "pending", "concluded",
                                     "null"]
    assert job.calls == ["setup", "commit", "clean", "completed-event"]
    assert daemon.jobs == [] and job.err is None and job.progress() == (10, 10)


def test_manual_finalize_and_dismiss(daemon):
    job = ToyJob(daemon, "j1", auto_finalize=False, auto_dismiss=False)
    job.start()
    daemon.wait_status("j1", "pending")
    assert job.calls == ["setup", "pending-event"]
    with pytest.raises(QMPError, match="Job 'j1' in state 'pending' cannot accept command "
                                       "verb 'dismiss'"):
        job.dismiss()
    job.finalize()
    assert job.status == "concluded" and job.info()["status"] == "concluded"
    job.dismiss()
    assert daemon.statuses("j1")[-3:] == ["pending", "concluded", "null"]
    assert daemon.jobs == []


def test_failure_sets_error_from_errno(daemon):
    job = ToyJob(daemon, "j1", fail=OSError(errno.EIO, "boom"), auto_dismiss=False)
    job.start()
    daemon.wait_status("j1", "concluded")
    assert daemon.statuses("j1") == ["created", "running", "aborting", "concluded"]
    assert job.info()["error"] == "Input/output error"
    assert job.calls[-3:] == ["abort", "clean", "completed-event"]


def test_setup_failure_is_synchronous(daemon):
    job = ToyJob(daemon, "j1", setup_fail=QMPError("bad option"), auto_dismiss=False)
    job.start()   # returns with the job already concluded, like a qsd job failing early
    assert daemon.statuses("j1") == ["created", "running", "aborting", "concluded"]
    assert job.err == "bad option" and job.status == "concluded"


def test_cancel_running(daemon):
    job = ToyJob(daemon, "j1", loop=True, auto_dismiss=False)
    job.start()
    job.user_cancel(True)
    daemon.wait_status("j1", "concluded")
    assert daemon.statuses("j1") == ["created", "running", "aborting", "concluded"]
    assert job.err == "Operation canceled"
    assert "cancelled-event" in job.calls and "abort" in job.calls


def test_pause_resume_at_pause_points(daemon):
    job = ToyJob(daemon, "j1", loop=True)
    job.start()
    job.user_pause()
    with pytest.raises(QMPError, match="Job is already paused"):
        job.user_pause()
    daemon.wait_status("j1", "paused")
    job.user_resume()
    with pytest.raises(QMPError, match="Can't resume a job that was not paused"):
        job.user_resume()
    daemon.wait_status("j1", "running")
    job.stop.set()
    daemon.wait_status("j1", "null")
    assert daemon.statuses("j1") == ["created", "running", "paused", "running", "waiting",
                                     "pending", "concluded", "null"]


def test_cancel_of_paused_job_needs_no_resume(daemon):
    job = ToyJob(daemon, "j1", loop=True)
    job.start()
    job.user_pause()
    daemon.wait_status("j1", "paused")
    job.user_cancel(True)
    daemon.wait_status("j1", "null")
    assert daemon.statuses("j1")[-4:] == ["running", "aborting", "concluded", "null"]


def test_job_ids(daemon):
    ToyJob(daemon, "j1", loop=True).start()
    for bad in ("", "bad id!", "1x", "a/b"):
        with pytest.raises(QMPError, match=re.escape("Invalid job ID '%s'" % bad)):
            ToyJob(daemon, bad)
    with pytest.raises(QMPError, match="Job ID 'j1' already in use"):
        ToyJob(daemon, "j1")
    with pytest.raises(QMPError, match="An explicit job ID is required"):
        ToyJob(daemon, None)
    with pytest.raises(QMPError, match="Cannot specify job ID for internal job"):
        ToyJob(daemon, "x", internal=True)


def test_complete_unsupported(daemon):
    job = ToyJob(daemon, "j1", loop=True)
    job.start()
    with pytest.raises(QMPError, match="Job 'j1' in state 'running' cannot accept command "
                                       "verb 'complete'"):
        job.complete()


def test_transaction_failure_cancels_the_others(daemon):
    txn = JobTxn()
    ok = ToyJob(daemon, "ok", loop=True, txn=txn)
    bad = ToyJob(daemon, "bad", fail=OSError(errno.EIO, "x"), txn=txn)
    ok.start()
    bad.start()
    daemon.wait_status("ok", "null")
    daemon.wait_status("bad", "null")
    assert daemon.statuses("ok") == ["created", "running", "aborting", "concluded", "null"]
    assert daemon.statuses("bad") == ["created", "running", "aborting", "concluded", "null"]
    assert ok.err == "Operation canceled" and bad.err == "Input/output error"


def test_transaction_success_waits_for_all(daemon):
    txn = JobTxn()
    slow = ToyJob(daemon, "slow", loop=True, txn=txn)
    fast = ToyJob(daemon, "fast", txn=txn)
    slow.start()
    fast.start()
    daemon.wait_status("fast", "waiting")
    assert fast.status == "waiting"
    slow.stop.set()
    daemon.wait_status("fast", "null")
    daemon.wait_status("slow", "null")
    assert daemon.statuses("fast") == ["created", "running", "waiting", "pending", "concluded",
                                       "null"]


def test_unstarted_job_cancelled(daemon):
    """A job created but never started (a transaction rolled back): no events but status ones."""
    job = ToyJob(daemon, "j1")
    job.cancel(True)
    assert daemon.statuses("j1") == ["created", "aborting", "concluded", "null"]
    assert "cancelled-event" not in job.calls and "completed-event" not in job.calls
