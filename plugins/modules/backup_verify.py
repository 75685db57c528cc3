#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.backup_verify."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: backup_verify
short_description: Check a backup (or a chain of backups) against its manifest or a live export
version_added: 0.1.0
description:
  - Re-reads a backup written by M(blockdev.fleecing.nbd_copy) through blockd's own
    drivers (a qcow2 incremental with its whole backing chain, as QEMU reads it) and
    checks every extent's checksum and the whole-disk digest its manifest records
    (C(python3 -m blockd.copy verify)).
  - With O(chain=true), every older backup of the chain is checked against its own
    manifest too, so every point in time of the chain is known to restore.
  - With O(against), the backup is also compared with a live NBD export (for example
    the fleecing export it was just pulled from, before the fleecing is torn down).
  - Never changes anything. A backup that does not match fails the task with a
    message naming the backup, how many extents differ and where the first bad
    ones are (RV(bad_extents) lists them).
extends_documentation_fragment:
  - blockdev.fleecing.nbd
attributes:
  check_mode:
    support: full
    description: Runs normally in check mode (it only reads).
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
options:
  backup:
    description:
      - The backup to check (a full backup or the top of an incremental chain).
    type: path
    required: true
  manifest:
    description:
      - Its manifest. Default O(backup) followed by C(.manifest.json).
    type: path
  chain:
    description:
      - Also check each base backup of the chain against its own manifest (bases
        are found as their backing file names, relative to the backup that names them).
    type: bool
    default: false
  against:
    description:
      - An NBD URI of a live export to compare the backup with (same size and whole-disk
        digest); the export is read entirely.
      - The connection options (TLS, SSH) below apply to it.
    type: str
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Check a backup and every backup it is built on
  blockdev.fleecing.backup_verify:
    backup: /backups/vda-inc2.qcow2
    chain: true

- name: Right after the pull, compare with the fleecing export it came from
  blockdev.fleecing.backup_verify:
    backup: /backups/vda-full.qcow2
    against: nbd+unix:///fleece-vda?socket=/run/blockd/nbd.sock

- name: Check, and report rather than stop on a bad backup
  blockdev.fleecing.backup_verify:
    backup: /backups/vda-full.qcow2
  register: check
  ignore_errors: true

- name: Show the damaged ranges
  ansible.builtin.debug:
    var: check.bad_extents
  when: check is failed
"""

RETURN = r"""
backup:
  description: The backup checked.
  returned: always
  type: str
manifest:
  description: Its manifest.
  returned: always
  type: str
format:
  description: The backup's format.
  returned: success
  type: str
  sample: qcow2
size:
  description: The disk's size in bytes.
  returned: success
  type: int
disk_sha256:
  description: The whole-disk digest (C(sha256-blocks-1MiB)) the backup was checked against.
  returned: success
  type: str
extents:
  description: Extents checked in the top backup.
  returned: success
  type: int
bytes_read:
  description: Bytes read from the top backup (ranges block status reports as zero are not read).
  returned: success
  type: int
duration:
  description: Seconds the check took.
  returned: success
  type: float
against:
  description: The export compared with (the URI without secrets).
  returned: when O(against) is set and the check passed
  type: str
chain:
  description:
    - Every backup checked, top first, each with C(backup), C(manifest), C(format),
      C(disk_sha256) and C(created) (when the manifest says).
  returned: success
  type: list
  elements: dict
bad_extents:
  description:
    - On a mismatch against the manifest, the first ten extents that differ, each with
      C(offset), C(length), C(type) (C(data), C(zero), C(hole), C(unchanged)),
      C(first_bad_offset) and C(bad_blocks) (1 MiB blocks whose sha256 differs).
  returned: on a verify failure
  type: list
  elements: dict
bad_extents_total:
  description: How many extents differ.
  returned: on a verify failure
  type: int
error:
  description: On failure, the kind (C(verify), C(manifest), C(base), C(source), C(usage)).
  returned: on failure
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.blockdev.fleecing.plugins.module_utils.copy_module import (
    NBD_ARGUMENT_SPEC, CopyError, chain_of, connect_kwargs, default_manifest, fail_copy)

#: bad extents listed in the message / the result.
_LIST_IN_MSG = 5
_LIST_IN_RESULT = 10


def _explain(exc):
    """The failure message, with the first bad extents when the engine listed them."""
    bad = getattr(exc, "bad_extents", None) or []
    if not bad:
        return exc.message, {}
    listed = ", ".join("%s extent at %d (%d bytes; first bad 1 MiB block at %d, %d bad)"
                       % (e["type"], e["offset"], e["length"], e["first_bad_offset"],
                          e["bad_blocks"]) for e in bad[:_LIST_IN_MSG])
    more = " and %d more" % (len(bad) - _LIST_IN_MSG) if len(bad) > _LIST_IN_MSG else ""
    return ("%s: %s%s" % (exc.message, listed, more),
            dict(bad_extents=bad[:_LIST_IN_RESULT], bad_extents_total=len(bad)))


def main():
    """Entry point."""
    spec = dict(
        backup=dict(type="path", required=True),
        manifest=dict(type="path"),
        chain=dict(type="bool", default=False),
        against=dict(type="str"),
    )
    spec.update(NBD_ARGUMENT_SPEC)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    p = module.params
    backup = p["backup"]
    manifest = p["manifest"] or default_manifest(backup)
    kwargs = connect_kwargs(module, p["against"], "against") if p["against"] else {}

    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.verify import (
        verify, verify_against)
    checking = backup
    try:
        links = chain_of(backup, manifest)
        if p["against"]:
            res = verify_against(p["against"], backup, manifest, **kwargs)
        else:
            res = verify(backup, manifest)
        if p["chain"]:
            for path, man, _doc in links[1:]:
                checking = path
                verify(path, man)
    except CopyError as exc:
        msg, extra = _explain(exc)
        if checking != backup:
            msg = "base backup %s of %s: %s" % (checking, backup, msg)
        exc.message = msg
        fail_copy(module, exc, backup=backup, manifest=manifest, **extra)
    top = links[0][2]
    chain = [dict(backup=path, manifest=man, format=doc["format"],
                  disk_sha256=doc["disk_sha256"], created=doc.get("created"))
             for path, man, doc in (links if p["chain"] else links[:1])]
    result = dict(changed=False, backup=backup, manifest=manifest, format=top["format"],
                  size=res["size"], disk_sha256=res["disk_sha256"], extents=res["extents"],
                  bytes_read=res["bytes_read"], duration=res["duration"], chain=chain)
    if p["against"]:
        result["against"] = res["against"]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
