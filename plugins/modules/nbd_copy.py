#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.nbd_copy."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: nbd_copy
short_description: Pull an NBD export into a raw or qcow2 backup, with a manifest, resumable
version_added: 0.1.0
description:
  - Copies an NBD export (a fleecing view of a disk, usually) into a local file on the
    host the task runs on, with blockd's copy engine (C(python3 -m blockd.copy pull)).
  - Holes and zeroes are skipped by block status; data is read with many requests in
    flight, over several connections when the server allows multi-conn.
  - O(format=qcow2) output is written by blockd's own qcow2 code (no C(qemu-img)
    needed). An incremental (O(base) and O(bitmap)) is a qcow2 overlay whose
    backing file is O(base), holding only the extents the dirty bitmap marks, so any
    QEMU tool reads or restores the chain.
  - A manifest (O(manifest)) records the export name and size, the format, the base,
    a sha256 per extent and for the whole disk (C(sha256-blocks-1MiB)).
    M(blockdev.fleecing.backup_verify) checks a backup against it.
  - The output and the manifest are written as C(.partial) files and renamed into
    place only when complete, so nothing half-written looks valid. An interrupted
    copy (killed task, server gone) continues from its last committed extent when
    run again (O(resume)).
  - B(Idempotence.) O(dest) names one backup. When O(dest) and its manifest exist,
    the manifest is complete and records the B(same export name, export size, format
    and base) (the base by path and by its manifest's checksum), the task reports
    no change and copies nothing - it does not compare contents (use a new O(dest)
    per point in time, for example with a timestamp in its name). Such a backup of
    another export, size, format or base, or an O(dest) without a valid manifest,
    fails the task (nothing is touched) unless O(force=true).
  - B(Long copies.) Run the task with C(async) and C(poll=0), then poll with
    M(ansible.builtin.async_status) and read O(progress_file) with
    M(ansible.builtin.slurp) to show C(bytes_done)/C(bytes_total) (see EXAMPLES).
extends_documentation_fragment:
  - blockdev.fleecing.nbd
attributes:
  check_mode:
    support: full
    description:
      - Connects to the export and reads its block status (and dirty bitmap) to
        report what would be copied (RV(bytes_copied), RV(bytes_zero)...); writes nothing.
  diff_mode:
    support: full
    description: The backup O(dest) holds before and after (format, size, export, base, digest).
options:
  source:
    description:
      - The NBD URI of the export to copy, for example
        C(nbd+unix:///fleece0?socket=/run/blockd/nbd.sock), C(nbd://host:10809/fleece0),
        C(nbds://host/fleece0) (TLS) or C(nbd+ssh://backup@host/fleece0?socket=/run/blockd/nbd.sock)
        (SSH tunnel).
    type: str
    required: true
  dest:
    description:
      - The backup file to write.
    type: path
    required: true
  format:
    description:
      - Output format. An incremental (O(base)) is always V(qcow2).
    type: str
    choices: [raw, qcow2]
    default: qcow2
  base:
    description:
      - The previous backup of the same disk (with its manifest beside it); the output
        is an incremental qcow2 overlay backed by it, holding only what O(bitmap) marks.
      - Recorded as a backing file name relative to O(dest) when both are in one directory.
      - The base must be unchanged since its manifest was written.
    type: path
  bitmap:
    description:
      - For an incremental, the dirty bitmap whose set bits are copied, read from the
        export's C(qemu:dirty-bitmap:NAME) meta context (the export must have been
        created with this bitmap, for example C(block-export-add) C(bitmaps)).
    type: str
  manifest:
    description:
      - Path of the manifest. Default O(dest) followed by C(.manifest.json), which is
        where M(blockdev.fleecing.backup_verify), M(blockdev.fleecing.backup_restore) and
        the next incremental look for it.
    type: path
  connections:
    description:
      - NBD connections to open when the export allows multi-conn.
    type: int
    default: 4
  resume:
    description:
      - Continue an interrupted copy of the same export (name, size, format, base)
        into O(dest) from its last committed extent. V(false) starts over.
    type: bool
    default: true
  progress_file:
    description:
      - A JSON file rewritten a few times a second while copying, with C(status)
        (C(running), C(complete), C(failed)), C(bytes_done), C(bytes_total),
        C(bytes_copied), C(bytes_to_copy), C(rate) (bytes/s) and C(eta) (seconds).
    type: path
  force:
    description:
      - Copy even when O(dest) already holds a complete backup of this export, and
        replace an O(dest) that holds something else.
      - The old O(dest) is replaced only when the new copy is complete.
    type: bool
    default: false
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Full backup of a fleecing export into qcow2
  blockdev.fleecing.nbd_copy:
    source: nbd+unix:///fleece-vda?socket=/run/blockd/nbd.sock
    dest: /backups/vda-full.qcow2
  register: full

- name: Incremental backup on top of it, copying what bitmap inc0 marks
  blockdev.fleecing.nbd_copy:
    source: nbd+unix:///fleece-vda?socket=/run/blockd/nbd.sock
    dest: /backups/vda-inc1.qcow2
    base: /backups/vda-full.qcow2
    bitmap: inc0

- name: Pull from another host through SSH (the backup host runs the task)
  blockdev.fleecing.nbd_copy:
    source: "nbd+ssh://backup@{{ inventory_hostname }}/fleece-vda?socket=/run/blockd/nbd.sock"
    dest: "/backups/{{ inventory_hostname }}/vda-{{ ansible_date_time.iso8601_basic_short }}.qcow2"
    ssh_identity: /home/backup/.ssh/id_ed25519
    ssh_known_hosts: /home/backup/.ssh/known_hosts
  delegate_to: backuphost

- name: Over TLS, certificates in a libnbd-style directory
  blockdev.fleecing.nbd_copy:
    source: nbds://disk-host.example.com:10809/fleece-vda
    dest: /backups/vda.raw
    format: raw
    tls_certificates: /etc/pki/blockd-client

- name: A long copy in the background, with progress
  blockdev.fleecing.nbd_copy:
    source: nbd://disk-host:10809/fleece-vda
    dest: /backups/vda-full.qcow2
    progress_file: /backups/vda-full.progress.json
  async: 86400
  poll: 0
  register: copy_job

- name: Wait for the copy to end (a day at most)
  ansible.builtin.async_status:
    jid: "{{ copy_job.ansible_job_id }}"
  register: copy_result
  until: copy_result.finished
  retries: 8640
  delay: 10

# While it runs (from a loop of async_status + slurp, as the backup role does, or from
# another play), the progress file says how far it got:
- name: Read the progress file
  ansible.builtin.slurp:
    src: /backups/vda-full.progress.json
  register: progress

- name: Show it
  ansible.builtin.debug:
    msg: "{{ p.bytes_done }} of {{ p.bytes_total }} bytes, {{ p.eta }} s to go"
  vars:
    p: "{{ progress.content | b64decode | from_json }}"
"""

RETURN = r"""
backup:
  description: The backup file (O(dest)).
  returned: always
  type: str
manifest:
  description: The manifest file.
  returned: always
  type: str
format:
  description: The backup's format.
  returned: always
  type: str
  sample: qcow2
size:
  description: The export's (virtual disk's) size in bytes.
  returned: always
  type: int
export:
  description: The export name.
  returned: always
  type: str
incremental:
  description: Whether the backup is an incremental overlay on O(base).
  returned: always
  type: bool
disk_sha256:
  description:
    - The whole-disk digest (C(sha256-blocks-1MiB)) of the backup (for an incremental,
      of the whole disk it and its chain hold).
    - Not known in check mode before a copy.
  returned: when a backup exists after the task
  type: str
bytes_copied:
  description:
    - Data bytes read from the export and written (0 when nothing changed).
    - In check mode, the data bytes of the whole export's plan (a resumed copy reads
      only what its interrupted run had not committed).
  returned: always
  type: int
bytes_zero:
  description: Bytes the export reported as zero (not read).
  returned: always
  type: int
bytes_hole:
  description: Bytes the export reported as holes (not read).
  returned: always
  type: int
bytes_unchanged:
  description: Bytes of an incremental taken from the base (not dirty in O(bitmap)).
  returned: always
  type: int
extents:
  description: Extents in the manifest (or planned, in check mode).
  returned: always
  type: int
resumed_from:
  description: Bytes an interrupted copy had already committed (0 for a fresh copy).
  returned: when copied
  type: int
resumable:
  description: In check mode, whether an interrupted copy would be resumed.
  returned: in check mode when a copy is needed
  type: bool
duration:
  description: Seconds the copy took (the elapsed time).
  returned: when copied
  type: float
rate_mib_s:
  description: Throughput of the data copied, MiB per second.
  returned: when copied
  type: float
error:
  description: On failure, the kind of error (C(source), C(dest), C(manifest), C(base), C(usage)).
  returned: on failure
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.blockdev.fleecing.plugins.module_utils.copy_module import (
    NBD_ARGUMENT_SPEC, CopyError, connect_kwargs, default_manifest, export_identity, fail_copy,
    manifest_summary, plan_export, read_manifest, resolve_base)


def _wanted_base(base):
    """The base's identity: resolved path and its manifest's checksum (None when unreadable)."""
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy import (
        manifest as mf)
    try:
        digest = mf.file_digest(default_manifest(base))
    except OSError:
        digest = None
    return os.path.realpath(base), digest


def _differences(doc, dest, params, export, size):
    """Why the complete backup DOC is not the one asked for (empty: it is)."""
    diffs = []
    if doc.get("export") != export:
        diffs.append("export %r, not %r" % (doc.get("export"), export))
    if doc["size"] != size:
        diffs.append("size %d, not the export's %d" % (doc["size"], size))
    if doc["format"] != params["format"]:
        diffs.append("format %s, not %s" % (doc["format"], params["format"]))
    have = resolve_base(dest, doc)
    if params["base"] is None:
        if have is not None:
            diffs.append("an incremental on %s, not a full backup" % have)
    else:
        path, digest = _wanted_base(params["base"])
        if have is None:
            diffs.append("a full backup, not an incremental on %s" % path)
        elif os.path.realpath(have) != path:
            diffs.append("an incremental on %s, not on %s" % (have, path))
        elif doc["base"].get("manifest_sha256") != digest:
            diffs.append("taken on another version of base %s (its manifest changed)" % path)
    return diffs


def _summary(dest, manifest, doc):
    """The backup state for the diff."""
    if doc is None:
        return None
    out = manifest_summary(doc)
    out.update(dest=dest, manifest=manifest)
    out.pop("created", None)
    return out


def main():
    """Entry point."""
    spec = dict(
        source=dict(type="str", required=True),
        dest=dict(type="path", required=True),
        format=dict(type="str", choices=["raw", "qcow2"], default="qcow2"),
        base=dict(type="path"),
        bitmap=dict(type="str"),
        manifest=dict(type="path"),
        connections=dict(type="int", default=4),
        resume=dict(type="bool", default=True),
        progress_file=dict(type="path"),
        force=dict(type="bool", default=False),
    )
    spec.update(NBD_ARGUMENT_SPEC)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           required_together=[["base", "bitmap"]])
    p = module.params
    dest, source = p["dest"], p["source"]
    manifest = p["manifest"] or default_manifest(dest)
    if p["base"] is not None and p["format"] != "qcow2":
        module.fail_json(msg="an incremental backup (base) is written as qcow2, not %s"
                         % p["format"], error="usage")
    if p["connections"] < 1:
        module.fail_json(msg="connections must be at least 1", error="usage")
    if os.path.isdir(dest):
        module.fail_json(msg="dest %s is a directory" % dest, error="usage")
    if p["base"] is not None and os.path.realpath(p["base"]) == os.path.realpath(dest):
        module.fail_json(msg="base and dest are the same file %s" % dest, error="usage")
    kwargs = connect_kwargs(module, source)

    # What dest holds now.
    doc = None
    exists = os.path.exists(dest) or os.path.exists(manifest)
    if exists:
        try:
            doc = read_manifest(manifest)
        except CopyError as exc:
            if not p["force"]:
                module.fail_json(
                    msg="%s exists but is not a complete backup (%s): refusing to overwrite "
                        "it; force=true replaces it" % (dest, exc.message),
                    error="dest", changed=False)
        if doc is not None and not os.path.exists(dest):
            if not p["force"]:
                module.fail_json(msg="manifest %s exists but its backup %s does not: refusing "
                                     "to overwrite it; force=true replaces it" % (manifest, dest),
                                 error="dest", changed=False)
            doc = None
    before = _summary(dest, manifest, doc)
    diff = dict(before=before or {}, after=before or {})

    try:
        if doc is not None and not p["force"]:
            export, size, _ro = export_identity(source, **kwargs)
            diffs = _differences(doc, dest, p, export, size)
            if diffs:
                module.fail_json(
                    msg="%s already holds another backup (%s): refusing to overwrite it; "
                        "force=true replaces it" % (dest, "; ".join(diffs)),
                    error="dest", changed=False, diff=diff)
            result = dict(changed=False, backup=dest, manifest=manifest, format=doc["format"],
                          size=doc["size"], export=doc.get("export"),
                          incremental=doc.get("base") is not None,
                          disk_sha256=doc["disk_sha256"], bytes_copied=0, bytes_zero=0,
                          bytes_hole=0, bytes_unchanged=0, extents=len(doc["extents"]))
            if module._diff:  # pylint: disable=protected-access
                result["diff"] = diff
            module.exit_json(**result)

        if module.check_mode:
            if p["base"] is not None:
                from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy \
                    .engine import _check_base
                base_doc = _check_base(p["base"])[0]
            plan = plan_export(source, p["bitmap"], **kwargs)
            if p["base"] is not None and base_doc["size"] != plan["size"]:
                raise CopyError("source", "export size %d differs from base backup size %d"
                                % (plan["size"], base_doc["size"]))
            after = dict(dest=dest, manifest=manifest, format=p["format"], size=plan["size"],
                         export=plan["export"], base=p["base"])
            result = dict(changed=True, backup=dest, manifest=manifest, format=p["format"],
                          size=plan["size"], export=plan["export"],
                          incremental=p["base"] is not None, extents=plan["extents"],
                          resumable=p["resume"] and os.path.exists(dest + ".partial")
                          and os.path.exists(dest + ".partial.state"))
            for kind, n in plan["bytes"].items():
                result["bytes_copied" if kind == "data" else "bytes_" + kind] = n
            if module._diff:  # pylint: disable=protected-access
                result["diff"] = dict(before=before or {}, after=after)
            module.exit_json(**result)

        from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.engine \
            import copy
        res = copy(source, dest, p["format"], base=p["base"], dirty_bitmap=p["bitmap"],
                   connections=p["connections"], progress_file=p["progress_file"],
                   manifest=manifest, resume=p["resume"], overwrite=p["force"], **kwargs)
    except CopyError as exc:
        fail_copy(module, exc, backup=dest, manifest=manifest)
    new = read_manifest(manifest)
    result = dict(changed=True, backup=dest, manifest=manifest, format=res["format"],
                  size=res["size"], export=new.get("export"), incremental=res["incremental"],
                  disk_sha256=res["disk_sha256"], bytes_copied=res["bytes_copied"],
                  bytes_zero=res["bytes_zero"], bytes_hole=res["bytes_hole"],
                  bytes_unchanged=res["bytes_unchanged"], extents=res["extents"],
                  resumed_from=res["resumed_from"], duration=res["duration"],
                  rate_mib_s=res["rate_mib_s"])
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = dict(before=before or {}, after=_summary(dest, manifest, new))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
