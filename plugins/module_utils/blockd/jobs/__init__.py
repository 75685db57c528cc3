# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Jobs: QEMU's job core (``job.c``) with a worker thread per job.

* :mod:`.job` -- the state machine as data (:data:`~.job.STT`,
  :data:`~.job.VERBS`), :class:`~.job.Job` and :class:`~.job.JobTxn`;
* :mod:`.create` -- the ``blockdev-create`` job.

The QMP verbs live in :mod:`blockd.commands.jobs`; see ``docs/jobs.md`` for
the design and for how block jobs (backup) extend :class:`~.job.Job`.
"""

from .job import STATUSES, STT, VERBS, Job, JobTxn, check_job_id, find_job  # noqa: F401

__all__ = ["STATUSES", "STT", "VERBS", "Job", "JobTxn", "check_job_id", "find_job"]
