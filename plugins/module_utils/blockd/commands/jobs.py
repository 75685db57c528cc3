# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Generic job commands (QEMU's ``job-qmp.c``): query-jobs and the job-* verbs.

Each verb finds the job (``Job not found`` otherwise) and calls the
:class:`~blockd.jobs.Job` method that checks the verb table and acts.  The
``block-job-*`` family (a later issue) maps onto the same methods, with
``DeviceNotActive: Block job 'x' not found`` for unknown ids.
"""

from __future__ import annotations

from typing import Any, Dict, List

from ..errors import QMPError
from ..jobs import Job, find_job
from . import command


def _find(daemon: Any, job_id: str) -> Job:
    """``find_job_locked()``."""
    job = find_job(daemon, job_id)
    if job is None:
        raise QMPError("Job not found")
    return job


@command("query-jobs")
def query_jobs(daemon: Any, args: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every non-internal job, newest first (QEMU's job list order)."""
    return [job.info() for job in daemon.jobs if job.id is not None]


@command("job-pause")
def job_pause(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Pause at the job's next pause point."""
    _find(daemon, args["id"]).user_pause()
    return {}


@command("job-resume")
def job_resume(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Lift a job-pause."""
    _find(daemon, args["id"]).user_resume()
    return {}


@command("job-cancel")
def job_cancel(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Cancel, always forced (``qmp_job_cancel`` passes force=true)."""
    _find(daemon, args["id"]).user_cancel(True)
    return {}


@command("job-complete")
def job_complete(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Ask a ready job to complete."""
    _find(daemon, args["id"]).complete()
    return {}


@command("job-finalize")
def job_finalize(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Finalize a pending job (and its transaction)."""
    _find(daemon, args["id"]).finalize()
    return {}


@command("job-dismiss")
def job_dismiss(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Remove a concluded job."""
    _find(daemon, args["id"]).dismiss()
    return {}
