#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.backup_job."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: backup_job
short_description: Manage a backup block job of blockd or qemu-storage-daemon
version_added: 0.1.0
description:
  - Makes sure a backup block job with the given id exists (QMP
    C(blockdev-backup)), is running or paused, and copies at the requested
    speed; or that it does not exist (C(block-job-cancel), C(block-job-dismiss)).
  - With O(sync=none) the job is the fleecing job of QEMU's image fleecing - it
    copies each old cluster of O(device) into O(target) just before it is
    overwritten, so that a O(target) whose backing is O(device) stays the disk
    as it was when the job started. Such a job never finishes by itself; remove
    it with O(state=absent) when the backup has been pulled.
  - With O(sync=full), V(top), V(incremental) or V(bitmap) the job copies
    O(device) (or its dirty areas) to O(target) and concludes; O(wait=true)
    waits for that and fails when the job failed.
  - "An existing job is compared with the request where the engine shows it -
    its type, C(auto-finalize), C(auto-dismiss), and, while the job runs, the
    source node (through the job's C(copy-before-write) filter node, whose
    C(file) is O(device)). C(query-block-jobs) does not report the target, the
    sync mode or the error policies; those are not compared."
  - A job that ended (status C(concluded), kept because O(auto_dismiss=false))
    still exists for this module, so re-running the task that started it changes
    nothing. A job that ended with an error fails the task with that error
    until it is removed with O(state=absent).
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
options:
  job_id:
    description:
      - The job's id (C(job-id); C(device) in C(query-block-jobs)).
    type: str
    required: true
  state:
    description:
      - V(present) starts the job if it does not exist; an existing job is left
        running or paused as it is.
      - V(running) and V(paused) also resume (C(block-job-resume)) or pause
        (C(block-job-pause)) it. A job started with V(paused) is paused right
        after C(blockdev-backup); a short O(sync=full) job may end before that.
      - V(absent) cancels a job that has not ended (C(block-job-cancel) with
        C(force), waiting until the engine reports it cancelled) and dismisses
        a job that has ended (C(block-job-dismiss)). What a cancelled job had
        copied stays in O(target).
    type: str
    choices: [present, absent, running, paused]
    default: present
  device:
    description:
      - The node-name of the source node (C(device) of C(blockdev-backup)).
      - Required to start a job. For an existing job it is compared with the
        job's filter node while the job runs.
    type: str
  target:
    description:
      - The node-name of the node the job writes to. Required to start a job.
    type: str
  sync:
    description:
      - What the job copies - V(full) the whole device, V(top) the top image's
        allocated data, V(none) only what is about to be overwritten (fleecing),
        V(incremental) or V(bitmap) the dirty areas of O(bitmap).
      - Required to start a job.
    type: str
    choices: [full, top, none, incremental, bitmap]
  bitmap:
    description:
      - The dirty bitmap of O(device) for O(sync=incremental) or V(bitmap),
        or to restrict a V(full)/V(top) job.
    type: str
  bitmap_mode:
    description:
      - What happens to O(bitmap) when the job ends (C(bitmap-mode)) - V(on-success)
        clears the copied areas only if the job succeeded, V(never) leaves the
        bitmap alone, V(always) clears what was copied even on failure.
    type: str
    choices: [on-success, never, always]
  speed:
    description:
      - Copy rate limit in bytes per second; V(0) means unlimited.
      - For a running or paused job a different value is set with
        C(block-job-set-speed).
    type: int
  compress:
    description:
      - Compress the data written to O(target) (qcow2 targets).
    type: bool
  on_source_error:
    description:
      - What the job does when reading O(device) fails (C(on-source-error)).
    type: str
    choices: [report, ignore, enospc, stop, auto]
  on_target_error:
    description:
      - What the job does when writing O(target) fails (C(on-target-error)).
    type: str
    choices: [report, ignore, enospc, stop, auto]
  auto_finalize:
    description:
      - Whether the job finalizes by itself when its work is done (C(auto-finalize));
        V(false) leaves it C(pending) until C(block-job-finalize).
    type: bool
  auto_dismiss:
    description:
      - Whether the engine forgets the job as soon as it ended (C(auto-dismiss)).
      - Give V(false) for tasks that must be idempotent - a job the engine has
        forgotten does not exist any more, so re-running the task would start
        a second backup. The engine's default is V(true).
    type: bool
  filter_node_name:
    description:
      - The node-name of the job's C(copy-before-write) filter node
        (C(filter-node-name)); by default the engine makes one up.
    type: str
  wait:
    description:
      - Wait until the job has ended (not for O(sync=none), which never ends by
        itself) and fail when it ended with an error.
      - Also applies to an existing job. With O(auto_dismiss=false) the ended
        job stays until O(state=absent).
    type: bool
    default: false
  wait_timeout:
    description:
      - Seconds to wait with O(wait=true); when they pass the task fails and the
        job goes on.
    type: float
    default: 3600
notes:
  - The job keeps O(device) and O(target) in use; the engine refuses to delete
    them (C(blockdev-del)) until the job is gone.
seealso:
  - module: blockdev.fleecing.fleece
  - module: blockdev.fleecing.node
  - module: blockdev.fleecing.dirty_bitmap
  - module: blockdev.fleecing.transaction
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Fleecing - keep disk0 as it is now in the overlay fleece0 (backing disk0)
  blockdev.fleecing.backup_job:
    socket: /run/blockd/qmp.sock
    job_id: fleece-disk0
    device: disk0
    target: fleece0
    sync: none
    auto_dismiss: false

- name: A full copy of disk0 to the node copy0, at most 100 MiB/s, waiting for it
  blockdev.fleecing.backup_job:
    job_id: copy-disk0
    device: disk0
    target: copy0
    sync: full
    speed: 104857600
    auto_dismiss: false
    wait: true

- name: Pause it for a while
  blockdev.fleecing.backup_job:
    job_id: copy-disk0
    state: paused

- name: Done with the point-in-time view - cancel the fleecing job
  blockdev.fleecing.backup_job:
    job_id: fleece-disk0
    state: absent
"""

RETURN = r"""
job:
  description:
    - The job's C(query-block-jobs) entry after the task (in check mode as
      predicted); an empty dict when it does not exist.
    - C(offset) of C(len) bytes are done; C(error) is set when the job failed or
      was cancelled.
  returned: always
  type: dict
  sample: {"device": "fleece-disk0", "type": "backup", "status": "running",
           "offset": 0, "len": 1073741824, "speed": 0, "paused": false, "busy": false,
           "ready": false, "io-status": "ok", "auto-finalize": true, "auto-dismiss": false}
actions:
  description: The QMP commands run (in check mode, that would run), in order.
  returned: always
  type: list
  elements: dict
  sample: [{"type": "blockdev-backup", "data": {"job-id": "fleece-disk0", "device": "disk0",
            "target": "fleece0", "sync": "none"}}]
"""

import time

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import (
    BlockdModule, try_execute)
from ansible_collections.blockdev.fleecing.plugins.module_utils.qmp_client import QMPTimeout

#: The fields of a job shown in the diff (offset/len change all the time and are left out).
FIELDS = ("device", "type", "status", "speed", "auto-finalize", "auto-dismiss", "error")
#: Module option -> blockdev-backup argument, for the options passed only when given.
OPTIONAL_ARGS = (("bitmap", "bitmap"), ("bitmap_mode", "bitmap-mode"), ("speed", "speed"),
                 ("compress", "compress"), ("on_source_error", "on-source-error"),
                 ("on_target_error", "on-target-error"), ("auto_finalize", "auto-finalize"),
                 ("auto_dismiss", "auto-dismiss"), ("filter_node_name", "filter-node-name"))
#: Job states in which the job's work is over.
ENDED = ("concluded", "null")


def view(job):
    """The diff view of a job (``{}`` when absent)."""
    return dict((k, job[k]) for k in FIELDS if k in job) if job else {}


def backup_arguments(mod):
    """The ``blockdev-backup`` arguments of the request."""
    p = mod.params
    args = {"job-id": p["job_id"], "device": p["device"], "target": p["target"],
            "sync": p["sync"]}
    for opt, name in OPTIONAL_ARGS:
        if p[opt] is not None:
            args[name] = p[opt]
    return args


def job_filter(nodes, mod, job):
    """The running job's copy-before-write filter node (a query-named-block-nodes entry)."""
    name = mod.params["filter_node_name"]
    if name:
        return nodes.get(name)
    if job.get("status") in ENDED:
        return None
    filters = [n for n in nodes.values() if n.get("drv") == "copy-before-write"]
    device = nodes.get(mod.params["device"] or "")
    if device is not None:
        same = [n for n in filters if n.get("file") == device.get("file")]
        return same[0] if same else (filters[0] if len(filters) == 1 else None)
    return filters[0] if len(filters) == 1 else None


def conflicts(mod, job, nodes):
    """How the existing JOB differs from the request (a list of sentences)."""
    p = mod.params
    out = []
    if job.get("type") != "backup":
        out.append("it is a %s job, not a backup job" % job.get("type"))
    for opt in ("auto_finalize", "auto_dismiss"):
        key = opt.replace("_", "-")
        if p[opt] is not None and key in job and job[key] != p[opt]:
            out.append("%s is %s, requested %s" % (opt, job[key], p[opt]))
    if p["device"] and job.get("status") not in ENDED:
        device = nodes.get(p["device"])
        flt = job_filter(nodes, mod, job)
        if device is None:
            out.append("node '%s' does not exist" % p["device"])
        elif flt is not None and flt.get("file") != device.get("file"):
            out.append("it copies %s, not node '%s' (%s)"
                       % (flt.get("file"), p["device"], device.get("file")))
    return out


def predict_started(mod):
    """What a job this task starts will look like (check mode)."""
    p = mod.params
    return {"device": p["job_id"], "type": "backup",
            "status": "paused" if p["state"] == "paused" else "running",
            "speed": p["speed"] or 0,
            "auto-finalize": p["auto_finalize"] is not False,
            "auto-dismiss": p["auto_dismiss"] is not False}


def ended_event(mod, job_id):
    """The BLOCK_JOB_COMPLETED/CANCELLED event of JOB_ID already received, or None."""
    for event in mod.qmp.events:
        if (event.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                and (event.get("data") or {}).get("device") == job_id):
            return event
    return None


def wait_ended(mod, job_id, timeout, what, pending_ok=True):
    """Wait until job JOB_ID has ended (or is gone); its last query-block-jobs entry or None.

    A job left ``pending`` by ``auto-finalize: false`` counts as ended when PENDING_OK.
    Fails the task after TIMEOUT seconds, naming WHAT the task waited for.
    """
    deadline = time.time() + timeout
    while True:
        job = mod.query_jobs().get(job_id)
        if job is None or job.get("status") in ENDED:
            return job
        if pending_ok and job.get("status") == "pending" and job.get("auto-finalize") is False:
            return job      # waits for block-job-finalize, which is the user's call
        left = deadline - time.time()
        if left <= 0:
            mod.fail("backup job '%s' did not %s within %.0f s (status %s, %s of %s bytes)"
                     % (job_id, what, timeout, job.get("status"), job.get("offset"),
                        job.get("len")), job=job)
        try:
            # JOB_STATUS_CHANGE only: the BLOCK_JOB_* events stay queued for ended_event()
            mod.qmp.wait_event(lambda ev: (ev.get("event") == "JOB_STATUS_CHANGE"
                                           and (ev.get("data") or {}).get("id") == job_id),
                               timeout=min(left, 0.5))
        except QMPTimeout:
            pass


def remove(mod, job):
    """state=absent: cancel a job that has not ended, dismiss one that has."""
    job_id = mod.params["job_id"]
    actions = []
    if job.get("status") not in ENDED:
        actions.append(dict(type="block-job-cancel", data=dict(device=job_id, force=True)))
    if job.get("auto-dismiss") is False or job.get("status") in ENDED:
        actions.append(dict(type="block-job-dismiss", data=dict(id=job_id)))
    if mod.check_mode:
        return actions
    if job.get("status") not in ENDED:
        dummy, err = try_execute(mod, "block-job-cancel", dict(device=job_id, force=True))
        now = mod.query_jobs().get(job_id)
        if err is not None and now is not None and now.get("status") not in ENDED:
            mod.fail("block-job-cancel failed: %s" % err.desc, error_class=err.klass, job=now)
        job = wait_ended(mod, job_id, mod.params["timeout"], "end after block-job-cancel",
                         pending_ok=False)
    if job is not None and job.get("status") == "concluded":
        mod.execute("block-job-dismiss", dict(id=job_id))
    return actions


def check_ended_ok(mod, job, event):
    """Fail when a job (its last entry JOB, or its end EVENT) ended with an error."""
    error = (job or {}).get("error") or ((event or {}).get("data") or {}).get("error")
    if error:
        mod.fail("backup job '%s' ended with an error: %s; remove it (state=absent) to start "
                 "again" % (mod.params["job_id"], error), job=job or {})
    if job is None and event is not None and event.get("event") == "BLOCK_JOB_CANCELLED":
        mod.fail("backup job '%s' was cancelled" % mod.params["job_id"], job={})


def start(mod, nodes):
    """Start the job; the actions run (blockdev-backup, then maybe block-job-pause)."""
    p = mod.params
    missing = [o for o in ("device", "target", "sync") if not p[o]]
    if missing:
        mod.fail("backup job '%s' does not exist; starting it needs %s"
                 % (p["job_id"], ", ".join(missing)))
    for opt in ("device", "target"):
        if p[opt] not in nodes:
            mod.fail("%s: node '%s' does not exist" % (opt, p[opt]))
    if p["sync"] in ("incremental", "bitmap") and not p["bitmap"]:
        mod.fail("sync=%s needs a bitmap" % p["sync"])
    args = backup_arguments(mod)
    actions = [dict(type="blockdev-backup", data=args)]
    if p["state"] == "paused":
        actions.append(dict(type="block-job-pause", data=dict(device=p["job_id"])))
    if not mod.check_mode:
        mod.execute("blockdev-backup", args)
        if p["state"] == "paused":
            dummy, err = try_execute(mod, "block-job-pause", dict(device=p["job_id"]))
            if err is not None and "concluded" not in err.desc:
                mod.fail("block-job-pause failed: %s" % err.desc, error_class=err.klass)
    return actions


def adjust(mod, job):
    """Bring an existing job to the requested speed and run state; the actions run."""
    p = mod.params
    job_id = p["job_id"]
    actions = []
    if job.get("status") in ENDED or job.get("status") in ("pending", "aborting", "waiting"):
        return actions
    if p["speed"] is not None and job.get("speed") != p["speed"]:
        actions.append(dict(type="block-job-set-speed", data=dict(device=job_id,
                                                                  speed=p["speed"])))
    if p["state"] == "paused" and not job.get("paused"):
        actions.append(dict(type="block-job-pause", data=dict(device=job_id)))
    elif p["state"] == "running" and job.get("paused"):
        actions.append(dict(type="block-job-resume", data=dict(device=job_id)))
    if not mod.check_mode:
        for action in actions:
            mod.execute(action["type"], action["data"])
    return actions


def predict_adjusted(job, actions):
    """JOB after ACTIONS (check mode)."""
    after = dict(job)
    for action in actions:
        if action["type"] == "block-job-set-speed":
            after["speed"] = action["data"]["speed"]
        elif action["type"] == "block-job-pause":
            after.update(paused=True, status="paused")
        elif action["type"] == "block-job-resume":
            after.update(paused=False, status="running")
    return after


def main():
    """Entry point."""
    error_policies = ["report", "ignore", "enospc", "stop", "auto"]
    mod = BlockdModule(dict(
        job_id=dict(type="str", required=True),
        state=dict(type="str", default="present",
                   choices=["present", "absent", "running", "paused"]),
        device=dict(type="str"),
        target=dict(type="str"),
        sync=dict(type="str", choices=["full", "top", "none", "incremental", "bitmap"]),
        bitmap=dict(type="str"),
        bitmap_mode=dict(type="str", choices=["on-success", "never", "always"]),
        speed=dict(type="int"),
        compress=dict(type="bool"),
        on_source_error=dict(type="str", choices=error_policies),
        on_target_error=dict(type="str", choices=error_policies),
        auto_finalize=dict(type="bool"),
        auto_dismiss=dict(type="bool"),
        filter_node_name=dict(type="str"),
        wait=dict(type="bool", default=False),
        wait_timeout=dict(type="float", default=3600.0),
    ))
    p = mod.params
    job_id = p["job_id"]
    if not job_id:
        mod.fail("job_id cannot be empty")
    if p["speed"] is not None and p["speed"] < 0:
        mod.fail("Invalid parameter 'speed'")    # QEMU's words
    if p["wait"] and p["sync"] == "none":
        mod.fail("wait: a sync=none job never ends by itself; remove it with state=absent")

    before = mod.query_jobs().get(job_id)
    if p["state"] == "absent":
        actions = remove(mod, before) if before else []
        mod.result["changed"] = bool(actions)
        mod.exit(view(before), {}, job={}, actions=actions)

    nodes = mod.query_nodes()
    if before is None:
        actions = start(mod, nodes)
        after = predict_started(mod) if mod.check_mode else mod.query_jobs().get(job_id)
    else:
        problems = conflicts(mod, before, nodes)
        if problems:
            wanted = dict(view(before), **dict((o.replace("_", "-"), p[o])
                                               for o in ("auto_finalize", "auto_dismiss")
                                               if p[o] is not None))
            mod.result["diff"] = dict(before=view(before), after=wanted)
            mod.fail("backup job '%s' exists but %s; remove it first (state=absent)"
                     % (job_id, "; ".join(problems)), job=before)
        if before.get("status") in ENDED:
            check_ended_ok(mod, before, None)
        actions = adjust(mod, before)
        after = (predict_adjusted(before, actions) if mod.check_mode
                 else mod.query_jobs().get(job_id))
    if p["wait"] and not mod.check_mode:
        after = wait_ended(mod, job_id, p["wait_timeout"], "end")
        check_ended_ok(mod, after, ended_event(mod, job_id))
    mod.result["changed"] = bool(actions)
    mod.exit(view(before), view(after), job=after or {}, actions=actions)


if __name__ == "__main__":
    main()
