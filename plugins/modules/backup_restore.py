#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.backup_restore."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: backup_restore
short_description: Restore a backup (chain) to a raw or qcow2 image, or into a writable NBD export
version_added: 0.1.0
description:
  - Writes the disk a backup of M(blockdev.fleecing.nbd_copy) holds - a full backup or
    the top of an incremental chain, read with its whole backing chain - either into a
    new standalone image file O(dest) (sparse raw, or qcow2 without backing file, like
    C(qemu-img convert)), or into a writable NBD export O(to_nbd) of the same size
    (data with C(NBD_CMD_WRITE), zero ranges with C(NBD_CMD_WRITE_ZEROES)), with
    blockd's copy engine (C(python3 -m blockd.copy restore)).
  - With O(verify) (the default) every block is checked against the backup's manifest
    and whole-disk digest; for a file, a mismatch leaves no O(dest) at all (the image is
    written as C(DEST.partial) and renamed only when complete); for an export, the backup
    is checked before anything is written and the export is re-read afterwards.
  - B(Idempotence.) The task reports no change when the target already holds the
    backup's disk - O(dest) exists in O(format) with the same size and whole-disk digest
    (C(sha256-blocks-1MiB), read through blockd's drivers), or the export's content has
    that digest. An O(dest) holding anything else is never overwritten unless
    O(force=true). An O(to_nbd) export is the target you name, so it is overwritten
    whenever its content differs, without O(force).
  - The digest of an existing target is computed by reading it (zero ranges are not read).
extends_documentation_fragment:
  - blockdev.fleecing.nbd
attributes:
  check_mode:
    support: full
    description:
      - Opens the backup chain and its manifest, reads the target's digest and size,
        and reports whether a restore would write; writes nothing.
  diff_mode:
    support: full
    description: The target's format, size and digest before and after.
options:
  backup:
    description:
      - The backup to restore (a full backup or the top of an incremental chain;
        its bases are found through the backing file names recorded in the images).
    type: path
    required: true
  dest:
    description:
      - The image file to write. Mutually exclusive with O(to_nbd).
    type: path
  to_nbd:
    description:
      - The NBD URI of a writable export of exactly the backup's size to restore into,
        for example C(nbd+unix:///vda?socket=/run/blockd/nbd.sock).
        Mutually exclusive with O(dest). The connection options (TLS, SSH) apply to it.
    type: str
  format:
    description:
      - Format of O(dest).
    type: str
    choices: [raw, qcow2]
    default: raw
  manifest:
    description:
      - The backup's manifest. Default O(backup) followed by C(.manifest.json).
    type: path
  verify:
    description:
      - Check every block against the manifest while restoring (and, into an export,
        before writing anything and after). V(false) neither needs nor trusts a manifest.
    type: bool
    default: true
  force:
    description:
      - Replace an existing O(dest) that holds something else (in another format, or
        another disk). It is replaced only once the restored image is complete.
    type: bool
    default: false
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Restore the state of the second incremental into a raw disk image
  blockdev.fleecing.backup_restore:
    backup: /backups/vda-inc2.qcow2
    dest: /var/lib/images/vda-restored.raw

- name: Restore into the disk's writable export on the engine (the VM is stopped)
  blockdev.fleecing.backup_restore:
    backup: /backups/vda-inc2.qcow2
    to_nbd: nbd+unix:///vda?socket=/run/blockd/nbd.sock

- name: Preview a restore over an existing image
  blockdev.fleecing.backup_restore:
    backup: /backups/vda-full.qcow2
    dest: /var/lib/images/vda.qcow2
    format: qcow2
    force: true
  check_mode: true
  diff: true
"""

RETURN = r"""
backup:
  description: The backup restored.
  returned: always
  type: str
target:
  description: The image written (O(dest)), or the export (O(to_nbd) without secrets).
  returned: always
  type: str
format:
  description: The image's format (C(raw) for an export).
  returned: success
  type: str
size:
  description: The disk's size in bytes.
  returned: success
  type: int
disk_sha256:
  description: The whole-disk digest (C(sha256-blocks-1MiB)) the target holds afterwards.
  returned: success
  type: str
verified:
  description: Whether the restored blocks were checked against the manifest.
  returned: when restored
  type: bool
bytes_read:
  description: Data bytes read from the backup and written.
  returned: when restored
  type: int
bytes_zero:
  description: Bytes restored as zeroes (not read, not written as data).
  returned: when restored
  type: int
duration:
  description: Seconds the restore took.
  returned: when restored
  type: float
error:
  description: On failure, the kind (C(verify), C(manifest), C(base), C(source), C(dest), C(usage)).
  returned: on failure
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.blockdev.fleecing.plugins.module_utils.copy_module import (
    NBD_ARGUMENT_SPEC, CopyError, connect_kwargs, default_manifest, export_identity, fail_copy,
    image_digest, read_manifest)


def _backup_state(backup, manifest, verify):
    """``(size, disk_sha256)`` of the backup: from its manifest with VERIFY, else by reading it.

    Also opens the chain (a missing base is a ``base`` error even in check mode).
    """
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.restore import (
        _open_backup)
    if not os.path.exists(backup):
        raise CopyError("usage", "backup %s is missing" % backup)
    doc = read_manifest(manifest) if verify else None
    img = _open_backup(backup, doc["format"] if doc else None)
    try:
        size = img.size
    finally:
        img.close()
    if doc is not None:
        if doc["size"] != size:
            raise CopyError("verify", "%s is %d bytes, its manifest says %d"
                            % (backup, size, doc["size"]))
        return size, doc["disk_sha256"]
    return size, image_digest(backup)[2]


def _file_state(dest):
    """What DEST holds: None when absent, else format/size/digest (digest None: unreadable)."""
    if not os.path.lexists(dest):
        return None
    if not os.path.isfile(dest):
        raise CopyError("usage", "dest %s exists and is not a regular file" % dest)
    try:
        fmt, size, digest = image_digest(dest)
    except CopyError:
        from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.output \
            import detect_format
        return dict(format=detect_format(dest), size=os.path.getsize(dest), disk_sha256=None)
    return dict(format=fmt, size=size, disk_sha256=digest)


def main():
    """Entry point."""
    spec = dict(
        backup=dict(type="path", required=True),
        dest=dict(type="path"),
        to_nbd=dict(type="str"),
        format=dict(type="str", choices=["raw", "qcow2"], default="raw"),
        manifest=dict(type="path"),
        verify=dict(type="bool", default=True),
        force=dict(type="bool", default=False),
    )
    spec.update(NBD_ARGUMENT_SPEC)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           mutually_exclusive=[["dest", "to_nbd"]],
                           required_one_of=[["dest", "to_nbd"]])
    p = module.params
    backup, dest, uri = p["backup"], p["dest"], p["to_nbd"]
    manifest = p["manifest"] or default_manifest(backup)
    kwargs = connect_kwargs(module, uri, "to_nbd") if uri else {}
    from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy import (
        manifest as mf)
    target = dest if dest else mf.redact_uri(uri)
    fmt = p["format"] if dest else "raw"
    if dest and os.path.abspath(dest) == os.path.abspath(backup):
        module.fail_json(msg="dest is the backup itself", error="usage", backup=backup,
                         target=target)

    try:
        size, digest = _backup_state(backup, manifest, p["verify"])
        if dest:
            before = _file_state(dest)
        else:
            from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy \
                .engine import export_digest
            _name, esize, read_only = export_identity(uri, **kwargs)
            if read_only:
                raise CopyError("dest", "export %s is read-only" % target)
            if esize != size:
                raise CopyError("dest", "export %s is %d bytes, the backup %d"
                                % (target, esize, size))
            before = dict(format="raw", size=esize,
                          disk_sha256=export_digest(uri, **kwargs)["disk_sha256"])
        after = dict(format=fmt, size=size, disk_sha256=digest)
        same = before is not None and before == after
        result = dict(changed=not same, backup=backup, target=target, format=fmt, size=size,
                      disk_sha256=digest)
        if module._diff:  # pylint: disable=protected-access
            result["diff"] = dict(before=dict(before, target=target) if before else {},
                                  after=dict(after, target=target))
        if not same and dest and before is not None and not p["force"]:
            refused = dict(result)
            refused.update(changed=False, error="dest")
            module.fail_json(msg=_refusal(dest, before, after), **refused)
        if same or module.check_mode:
            module.exit_json(**result)

        from ansible_collections.blockdev.fleecing.plugins.module_utils.blockd.copy.restore \
            import restore, restore_to_nbd
        if dest:
            res = restore(backup, dest, fmt, manifest=manifest, verify=p["verify"],
                          overwrite=p["force"])
        else:
            res = restore_to_nbd(backup, uri, manifest=manifest, verify=p["verify"], **kwargs)
    except CopyError as exc:
        fail_copy(module, exc, backup=backup, target=target)
    result.update(verified=res["verified"], bytes_read=res["bytes_read"],
                  bytes_zero=res["bytes_zero"], duration=res["duration"])
    module.exit_json(**result)


def _refusal(dest, before, after):
    """Why an existing DEST is not overwritten."""
    what = []
    if before["format"] != after["format"]:
        what.append("format %s, not %s" % (before["format"], after["format"]))
    if before["size"] != after["size"]:
        what.append("%d bytes, not %d" % (before["size"], after["size"]))
    if before["disk_sha256"] is None:
        what.append("not an image blockd can read")
    elif before["disk_sha256"] != after["disk_sha256"]:
        what.append("another disk content (digest %s..., the backup's %s...)"
                    % (before["disk_sha256"][:12], after["disk_sha256"][:12]))
    return ("dest %s exists and differs from the backup (%s): refusing to overwrite it; "
            "force=true replaces it" % (dest, "; ".join(what)))


if __name__ == "__main__":
    main()
