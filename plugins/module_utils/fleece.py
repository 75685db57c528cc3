# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Point-in-time views of several disks, as QMP sequences (used by the ``fleece`` module).

A view of disk node ``D`` in set ``N`` is, in QEMU's image-fleecing recipe:

* a temporary qcow2 file ``<tmp_dir>/fleece-N-D.qcow2`` created with
  ``blockdev-create`` (``file``, then ``qcow2`` of D's size), opened as nodes
  ``fleece-N-D-file`` / ``fleece-N-D`` with ``backing: D``;
* a ``blockdev-backup sync=none`` job ``fleece-N-D`` from D into that overlay, so
  every old cluster is copied there before the live disk overwrites it; the jobs
  of all disks start in ONE ``transaction`` (one point in time for the set);
* a read-only NBD export ``fleece-N-D`` of the overlay, which *is* D as it was.

Incremental backups use a persistent dirty bitmap ``B`` on each disk: the same
transaction disables ``B`` (freezing "changed since the last backup") and adds
``B.next`` (recording from the point in time on); the export carries
``qemu:dirty-bitmap:B``.  :meth:`Fleece.settle_bitmaps` folds ``B.next`` into
``B`` after the backup: success replaces ``B`` by ``B.next``, failure merges
them, so no change is ever lost.

Everything works the same on blockd and on qemu-storage-daemon 7.2.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import json
import os
import time

PREFIX = "fleece-"


def persistent_bitmaps(nodes, disk):
    """Only qcow2 images store bitmaps; elsewhere they live in the engine's memory."""
    return nodes.get(disk, {}).get("drv") == "qcow2"


class FleeceError(Exception):
    """A failure to report as the task's message (after rolling back)."""


class Fleece:
    """The views of one set.

    :param mod: a :class:`~.common.BlockdModule` (QMP access, check mode).
    :param name: the set name.
    :param tmp_dir: where the overlays and the set's record live.
    :param nbd_socket: the engine's NBD server socket (for the URIs).
    :param bitmap: the persistent dirty bitmap name for incrementals, or None.
    """

    def __init__(self, mod, name, tmp_dir, nbd_socket, bitmap=None):
        self.mod = mod
        self.name = name
        self.tmp_dir = tmp_dir
        self.nbd_socket = nbd_socket
        self.bitmap = bitmap
        self.record_path = os.path.join(tmp_dir, "%s%s.json" % (PREFIX, name))

    # -- naming ---------------------------------------------------------------------------------
    def base(self, disk):
        """The id shared by the overlay node, the job and the export of DISK."""
        return "%s%s-%s" % (PREFIX, self.name, disk)

    def overlay_path(self, disk):
        """The temporary overlay file of DISK."""
        return os.path.join(self.tmp_dir, self.base(disk) + ".qcow2")

    def uri(self, disk):
        """The NBD URI of DISK's point-in-time export."""
        return "nbd+unix:///%s?socket=%s" % (self.base(disk), self.nbd_socket)

    # -- reading the engine -----------------------------------------------------------------
    def record(self):
        """The set's record (point in time, disks, bitmap) or None."""
        try:
            with open(self.record_path) as handle:
                return json.load(handle)
        except (IOError, OSError, ValueError):
            return None

    def observe(self, disks):
        """{disk: {job, export, node, file_node, overlay_file}} -- which pieces exist now."""
        nodes, jobs, exports = (self.mod.query_nodes(), self.mod.query_jobs(),
                                self.mod.query_exports())
        mine = set(disks)
        mark = "%s%s-" % (PREFIX, self.name)
        # pieces of disks the caller no longer lists (overlay file nodes are found via their parent)
        found = [n for n in nodes if nodes[n].get("drv") != "file"] + list(jobs) + list(exports)
        mine.update(ident[len(mark):] for ident in found if ident.startswith(mark))
        state = {}
        for disk in sorted(mine):
            base = self.base(disk)
            state[disk] = dict(
                job=jobs.get(base, {}).get("status") if base in jobs else None,
                export=base in exports, node=base in nodes, file_node=base + "-file" in nodes,
                overlay_file=os.path.exists(self.overlay_path(disk)))
        return state, nodes

    @staticmethod
    def complete(piece):
        """True when a disk's view is whole (running job, node, export, file)."""
        return bool(piece["job"] in ("running", "ready", "paused") and piece["export"]
                    and piece["node"] and piece["overlay_file"])

    @staticmethod
    def any_left(piece):
        """True when any piece of a disk's view exists."""
        return any(piece[k] for k in ("job", "export", "node", "file_node", "overlay_file"))

    def bitmaps(self, nodes, disk):
        """{name: bitmap info} of DISK's dirty bitmaps."""
        return dict((b["name"], b) for b in nodes.get(disk, {}).get("dirty-bitmaps", []) or []
                    if "name" in b)   # jobs' own bitmaps are anonymous

    # -- creating -------------------------------------------------------------------------------
    def create(self, disks, nodes):
        """Overlays, one transaction of backup jobs (+ bitmap actions), exports; returns the record.

        Rolls everything back and raises :class:`FleeceError` when a step fails.
        """
        try:
            return self._create(disks, nodes)
        except FleeceError as exc:
            self.teardown(disks)
            self.forget()
            raise FleeceError("%s (everything this task created was removed)" % exc)

    def _create(self, disks, nodes):
        if not os.path.isdir(self.tmp_dir):
            os.makedirs(self.tmp_dir, 0o700)
        for disk in disks:
            size = nodes[disk].get("image", {}).get("virtual-size")
            base = self.base(disk)
            path = self.overlay_path(disk)
            self._create_job({"driver": "file", "filename": path, "size": 0}, base + "-mkfile")
            self._qmp("blockdev-add", {"driver": "file", "node-name": base + "-file",
                                       "filename": path})
            self._create_job({"driver": "qcow2", "file": base + "-file", "size": size},
                             base + "-mkqcow2")
            self._qmp("blockdev-add", {"driver": "qcow2", "node-name": base,
                                       "file": base + "-file", "backing": disk})
        actions = []
        incremental = {}
        for disk in disks:
            actions.append({"type": "blockdev-backup", "data": {
                "job-id": self.base(disk), "device": disk, "target": self.base(disk),
                "sync": "none"}})
            if self.bitmap:
                have = self.bitmaps(nodes, disk)
                incremental[disk] = self.bitmap in have
                if incremental[disk]:
                    actions.append({"type": "block-dirty-bitmap-disable",
                                    "data": {"node": disk, "name": self.bitmap}})
                granularity = have.get(self.bitmap, {}).get("granularity")
                add = {"node": disk, "name": self.bitmap + ".next",
                       "persistent": persistent_bitmaps(nodes, disk)}
                if granularity:
                    add["granularity"] = granularity
                actions.append({"type": "block-dirty-bitmap-add", "data": add})
        # The record is written once before the transaction, so that its blocks are taken
        # before the guest's writes can fill the overlays' filesystem, and then rewritten in
        # place (same length) with the point in time.
        self._write_record(self._record(disks, nodes, incremental, "0000-00-00T00:00:00Z"), "w")
        self._qmp("transaction", {"actions": actions})
        point_in_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for disk in disks:
            export = {"type": "nbd", "id": self.base(disk), "node-name": self.base(disk),
                      "name": self.base(disk), "writable": False}
            if incremental.get(disk):
                export["bitmaps"] = [self.bitmap]
            self._qmp("block-export-add", export)
        rec = self._record(disks, nodes, incremental, point_in_time)
        self._write_record(rec, "r+")
        return rec

    def _record(self, disks, nodes, incremental, point_in_time):
        return dict(name=self.name, point_in_time=point_in_time, bitmap=self.bitmap,
                    disks=[dict(node=disk, size=nodes[disk].get("image", {}).get("virtual-size"),
                                incremental=bool(incremental.get(disk)))
                           for disk in disks])

    def _write_record(self, rec, mode):
        try:
            with open(self.record_path, mode) as handle:
                json.dump(rec, handle, sort_keys=True)
                handle.truncate()
        except (IOError, OSError) as exc:
            raise FleeceError("cannot write %s: %s (is the filesystem of tmp_dir full?)"
                              % (self.record_path, exc.strerror or exc))

    def _create_job(self, options, job_id):
        """``blockdev-create`` and wait for it; dismiss it; errors as :class:`FleeceError`."""
        self._qmp("blockdev-create", {"job-id": job_id, "options": options})
        deadline = time.time() + self.mod.params["timeout"]
        while True:
            jobs = dict((j["id"], j) for j in self._qmp("query-jobs") or [])
            job = jobs.get(job_id)
            if job is None:
                raise FleeceError("image creation job %s vanished" % job_id)
            if job["status"] == "concluded":
                self._qmp("job-dismiss", {"id": job_id})
                if job.get("error"):
                    raise FleeceError("creating %s failed: %s"
                                      % (options.get("filename", options.get("file")),
                                         job["error"]))
                return
            if time.time() > deadline:
                raise FleeceError("image creation job %s did not finish in time" % job_id)
            time.sleep(0.02)

    def _qmp(self, command, args=None):
        from ansible_collections.blockdev.fleecing.plugins.module_utils.qmp_client import (
            QMPCommandError, QMPError)
        try:
            return self.mod.qmp.execute(command, args)
        except QMPCommandError as exc:
            raise FleeceError("%s failed: %s" % (command, exc.desc))
        except QMPError as exc:
            raise FleeceError(str(exc))

    # -- tearing down -----------------------------------------------------------------------
    def teardown(self, disks):
        """Remove exports, jobs, nodes and files of DISKS (each step only if present)."""
        state, _nodes = self.observe(disks)
        for disk, piece in state.items():
            base = self.base(disk)
            if piece["export"]:
                self._ignore("block-export-del", {"id": base, "mode": "hard"})
                self._wait(lambda b=base: b not in self.mod.query_exports(), "export " + base)
            if piece["job"]:
                self._ignore("block-job-cancel", {"device": base, "force": True})
                self._wait(lambda b=base: self._job_gone(b), "job " + base)
            for job in (base + "-mkfile", base + "-mkqcow2"):
                self._ignore("job-dismiss", {"id": job})
            if piece["node"]:
                self._ignore("blockdev-del", {"node-name": base})
            if piece["file_node"]:
                self._ignore("blockdev-del", {"node-name": base + "-file"})
            if os.path.exists(self.overlay_path(disk)):
                os.unlink(self.overlay_path(disk))
        return state

    def _job_gone(self, job_id):
        jobs = dict((j["id"], j) for j in self._qmp("query-jobs") or [])
        if job_id in jobs and jobs[job_id]["status"] == "concluded":
            self._ignore("job-dismiss", {"id": job_id})
            return False
        return job_id not in jobs

    def _ignore(self, command, args):
        try:
            self._qmp(command, args)
        except FleeceError:
            pass

    def _wait(self, done, what):
        deadline = time.time() + self.mod.params["timeout"]
        while not done():
            if time.time() > deadline:
                raise FleeceError("%s did not go away in time" % what)
            time.sleep(0.02)

    def settle_bitmaps(self, disks, nodes, success):
        """Fold ``B.next`` into ``B`` (success: replace; failure: merge); True if anything changed."""
        if not self.bitmap:
            return False
        actions = []
        nxt = self.bitmap + ".next"
        for disk in disks:
            have = self.bitmaps(nodes, disk)
            if nxt not in have:
                continue
            if self.bitmap in have:
                if success:
                    actions.append({"type": "block-dirty-bitmap-clear",
                                    "data": {"node": disk, "name": self.bitmap}})
                actions += [
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": disk, "target": self.bitmap, "bitmaps": [nxt]}},
                    {"type": "block-dirty-bitmap-enable",
                     "data": {"node": disk, "name": self.bitmap}}]
            elif success:
                actions += [
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": disk, "name": self.bitmap,
                              "persistent": persistent_bitmaps(nodes, disk),
                              "granularity": have[nxt]["granularity"]}},
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": disk, "target": self.bitmap, "bitmaps": [nxt]}}]
            actions.append({"type": "block-dirty-bitmap-remove",
                            "data": {"node": disk, "name": nxt}})
        if actions and not self.mod.check_mode:
            self._qmp("transaction", {"actions": actions})
        return bool(actions)

    def forget(self):
        """Remove the set's record."""
        if os.path.exists(self.record_path):
            os.unlink(self.record_path)
