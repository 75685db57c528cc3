# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``block-job-*`` commands and ``query-block-jobs`` (QEMU 7.2 ``blockdev.c``).

They act on block jobs only (a ``create`` job is not one): an unknown id is
``DeviceNotActive: Block job 'x' not found`` (``find_block_job_locked``); the
verbs themselves are the job core's (:mod:`blockd.jobs.job`), so their state
errors are the verb table's texts.
"""

from __future__ import annotations

from typing import Any, Dict, List

from ..errors import QMPError
from ..jobs.blockjob import block_jobs, find_block_job
from . import command


@command("query-block-jobs")
def query_block_jobs(daemon: Any, args: Dict[str, Any]) -> List[Dict[str, Any]]:
    """``qmp_query_block_jobs()``: BlockJobInfo of every block job, newest first."""
    return [job.block_info() for job in block_jobs(daemon)]


@command("block-job-set-speed")
def block_job_set_speed(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_job_set_speed()``."""
    find_block_job(daemon, args["device"]).set_speed(args["speed"])
    return {}


@command("block-job-cancel")
def block_job_cancel(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_job_cancel()``: a user-paused job needs ``force``."""
    device = args["device"]
    force = args.get("force", False)
    job = find_block_job(daemon, device)
    if job.user_paused and not force:
        raise QMPError("The block job for device '%s' is currently paused" % device)
    job.user_cancel(force)
    return {}


@command("block-job-pause")
def block_job_pause(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_job_pause()``."""
    find_block_job(daemon, args["device"]).user_pause()
    return {}


@command("block-job-resume")
def block_job_resume(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_job_resume()``."""
    find_block_job(daemon, args["device"]).user_resume()
    return {}


@command("block-job-complete")
def block_job_complete(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_job_complete()``."""
    find_block_job(daemon, args["device"]).complete()
    return {}


@command("block-job-finalize")
def block_job_finalize(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_job_finalize()``."""
    find_block_job(daemon, args["id"]).finalize()
    return {}


@command("block-job-dismiss")
def block_job_dismiss(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_job_dismiss()``."""
    find_block_job(daemon, args["id"]).dismiss()
    return {}
