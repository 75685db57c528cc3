#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.fleece."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: fleece
short_description: Point-in-time views of live disks, exported read-only over NBD
version_added: 0.1.0
description:
  - V(present) creates, for every disk of O(disks), a temporary qcow2 overlay
    backed by the live disk, starts C(blockdev-backup sync=none) jobs for all
    disks in one C(transaction) (so they share one point in time), and exports
    each overlay read-only over NBD. Reading an export gives the disk as it was
    at that instant while the guest keeps writing.
  - Re-running V(present) while the views exist keeps them and their point in
    time (C(changed=false)). Leftovers of a broken earlier attempt are removed
    and the views made afresh.
  - V(absent) removes exports, jobs, nodes and temporary files of the set, and
    settles the incremental bitmap (see O(bitmap)).
  - If any step of V(present) fails, everything the task created is removed
    before it fails.
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
options:
  state:
    description: Whether the views should exist.
    type: str
    choices: [present, absent]
    default: present
  name:
    description:
      - Name of the set. Node, job and export ids are C(fleece-<name>-<disk>).
    type: str
    required: true
  disks:
    description:
      - Node names of the live disks (existing block nodes of the engine).
      - Required for O(state=present); for V(absent) pieces of the set are also
        found by their names, so an empty list removes the whole set.
    type: list
    elements: str
    default: []
  tmp_dir:
    description: Directory on the target for the temporary overlays and the set's record.
    type: path
    default: /var/tmp/blockd
  nbd_socket:
    description: UNIX socket of the engine's NBD server; used to build the returned URIs.
    type: path
    default: /run/blockd/nbd.sock
  bitmap:
    description:
      - Name of a dirty bitmap for incremental backups. With it,
        V(present) disables O(bitmap) and adds C(<bitmap>.next) in the same
        transaction, and exports O(bitmap) as C(qemu:dirty-bitmap:<bitmap>)
        when it existed (C(incremental=true)); without an earlier bitmap the
        backup must be full.
      - V(absent) with O(success=true) replaces O(bitmap) by C(<bitmap>.next);
        with O(success=false) it merges them, so no change is lost.
      - On qcow2 disks the bitmaps are persistent (stored in the image, listed by
        C(qemu-img info)); on other formats they live in the engine's memory, so
        after an engine restart the next backup is a full one (C(incremental=false)).
    type: str
  success:
    description: For V(absent), whether the backup read from the views succeeded.
    type: bool
    default: true
notes:
  - The engine must have an NBD server running (C(nbd-server-start), or the
    O(blockdev.fleecing.blockd#module:nbd_socket) of the C(blockd) module).
seealso:
  - module: blockdev.fleecing.nbd_copy
  - module: blockdev.fleecing.blockd
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Freeze two disks at one point in time
  blockdev.fleecing.fleece:
    name: nightly
    disks: [disk0, disk1]
    bitmap: backup
  register: views

- name: Pull each view
  blockdev.fleecing.nbd_copy:
    source: "{{ item.uri }}"
    dest: "/backup/{{ item.node }}.qcow2"
    format: qcow2
  loop: "{{ views.disks }}"

- name: Drop the views (the backup worked)
  blockdev.fleecing.fleece:
    name: nightly
    state: absent
    bitmap: backup
    success: true
"""

RETURN = r"""
disks:
  description: One entry per disk view.
  returned: state=present
  type: list
  elements: dict
  contains:
    node: {description: The live disk's node name., type: str, returned: always}
    export: {description: The NBD export name (and id)., type: str, returned: always}
    uri: {description: The NBD URI of the point-in-time view., type: str, returned: always}
    overlay: {description: The temporary overlay file., type: str, returned: always}
    job: {description: The backup job id., type: str, returned: always}
    size: {description: The disk's virtual size in bytes., type: int, returned: always}
    bitmap:
      description: Dirty bitmap exported with the view (C(qemu:dirty-bitmap:<name>)), or null.
      type: str
      returned: always
    incremental: {description: Whether the export carries the changes since the last backup., type: bool, returned: always}
uris:
  description: NBD URI by disk node name.
  returned: state=present
  type: dict
  sample: {"disk0": "nbd+unix:///fleece-nightly-disk0?socket=/run/blockd/nbd.sock"}
point_in_time:
  description: UTC time the views were created (kept by re-runs).
  returned: state=present and not check mode
  type: str
  sample: "2026-11-22T09:30:00Z"
"""

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import BlockdModule
from ansible_collections.blockdev.fleecing.plugins.module_utils.fleece import Fleece, FleeceError


def _view(fl, rec_disk, rec):
    disk = rec_disk["node"]
    return dict(node=disk, export=fl.base(disk), uri=fl.uri(disk), overlay=fl.overlay_path(disk),
                job=fl.base(disk), size=rec_disk["size"],
                bitmap=rec["bitmap"] if rec_disk["incremental"] else None,
                incremental=rec_disk["incremental"])


def main():
    """Entry point."""
    mod = BlockdModule(dict(
        state=dict(type="str", default="present", choices=["present", "absent"]),
        name=dict(type="str", required=True),
        disks=dict(type="list", elements="str", default=[]),
        tmp_dir=dict(type="path", default="/var/tmp/blockd"),
        nbd_socket=dict(type="path", default="/run/blockd/nbd.sock"),
        bitmap=dict(type="str"),
        success=dict(type="bool", default=True),
    ), required_if=[("state", "present", ("disks",))])
    p = mod.params
    if len(set(p["disks"])) != len(p["disks"]):
        mod.fail("disks lists a node more than once: %s" % ", ".join(p["disks"]))
    fl = Fleece(mod, p["name"], p["tmp_dir"], p["nbd_socket"], p["bitmap"])
    try:
        state, nodes = fl.observe(p["disks"])
        before = dict((d, v) for d, v in state.items() if fl.any_left(v))
        rec = fl.record()
        if p["state"] == "present":
            missing = [d for d in p["disks"] if d not in nodes]
            if missing:
                mod.fail("no block node named %s in the engine" % ", ".join(missing))
            whole = (rec is not None and sorted(d["node"] for d in rec["disks"]) == sorted(p["disks"])
                     and rec.get("bitmap") == p["bitmap"] and set(state) == set(p["disks"])
                     and all(fl.complete(v) for v in state.values()))
            if not whole:
                mod.result["changed"] = True
                if mod.check_mode:
                    mod.exit(before, dict((d, "view") for d in p["disks"]),
                             disks=[dict(node=d, export=fl.base(d), uri=fl.uri(d),
                                         overlay=fl.overlay_path(d), job=fl.base(d),
                                         size=nodes[d].get("image", {}).get("virtual-size"),
                                         bitmap=None, incremental=False) for d in p["disks"]],
                             uris=dict((d, fl.uri(d)) for d in p["disks"]))
                if before:   # a broken earlier attempt: start from nothing
                    fl.teardown(list(state))
                    fl.settle_bitmaps(p["disks"], mod.query_nodes(), success=False)
                    nodes = mod.query_nodes()
                elif p["bitmap"]:   # B.next left by an engine that died mid-backup
                    if fl.settle_bitmaps(p["disks"], nodes, success=False):
                        nodes = mod.query_nodes()
                rec = fl.create(p["disks"], nodes)
                state, _nodes = fl.observe(p["disks"])
            views = [_view(fl, d, rec) for d in rec["disks"]]
            mod.exit(before, state, disks=views, uris=dict((v["node"], v["uri"]) for v in views),
                     point_in_time=rec["point_in_time"])
        # absent
        changed = bool(before) or rec is not None
        if not mod.check_mode:
            fl.teardown(list(state))
            if fl.settle_bitmaps(list(set(p["disks"]) | set(state)), mod.query_nodes(),
                                 p["success"]):
                changed = True
            fl.forget()
        elif p["bitmap"] and fl.settle_bitmaps(list(set(p["disks"]) | set(state)), nodes,
                                               p["success"]):
            changed = True
        mod.result["changed"] = changed
        mod.exit(before, {})
    except FleeceError as exc:
        mod.fail(str(exc))


if __name__ == "__main__":
    main()
