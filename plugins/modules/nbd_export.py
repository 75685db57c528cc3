#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.nbd_export."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: nbd_export
short_description: Export a block node over NBD from a blockd or qemu-storage-daemon engine
version_added: 0.1.0
description:
  - Makes sure a block export of type V(nbd) with the given id exists (QMP
    C(block-export-add)) or does not (C(block-export-del), then waiting for
    C(BLOCK_EXPORT_DELETED)). The engine's NBD server must run
    (M(blockdev.fleecing.nbd_server)).
  - C(query-block-exports) shows only an export's C(id), C(type), C(node-name)
    and C(shutting-down), so only these are compared with an existing export.
    O(name), O(writable), O(description), O(bitmaps) and O(allocation_depth)
    cannot be read back on either engine; they are applied when the export is
    created and never compared. To change them, remove the export
    (O(state=absent)) and add it again.
  - The node is the same when C(node-name) is O(node_name), or when the export's
    node is a filter with the same file name as O(node_name) (a backup job's
    C(copy-before-write) filter inserted above the exported node takes the
    export over, as in QEMU). An export on another node is a conflict; the task
    fails with the difference and changes nothing, unless O(recreate=true).
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
options:
  id:
    description: The export's id, unique among all the engine's block exports.
    type: str
    required: true
  state:
    description:
      - V(present) adds the export if no export has this id.
      - V(absent) deletes it and waits until it is gone (its id is free again).
    type: str
    choices: [present, absent]
    default: present
  node_name:
    description: The block node to export. Required with O(state=present).
    type: str
  name:
    description:
      - The NBD export name clients ask for. Defaults to O(node_name), as in QEMU.
    type: str
  writable:
    description: Whether clients may write. A read-only node cannot be exported writable.
    type: bool
    default: false
  description:
    description: Free text the server shows when a client lists the exports (at most 4096 bytes).
    type: str
  bitmaps:
    description:
      - Dirty bitmaps of the node to publish, each as metadata context
        C(qemu:dirty-bitmap:NAME), for incremental backups.
      - A read-only export can only publish disabled bitmaps (the engine refuses
        an enabled one).
    type: list
    elements: str
  allocation_depth:
    description: Publish the metadata context C(qemu:allocation-depth).
    type: bool
    default: false
  mode:
    description:
      - How O(state=absent) (and O(recreate)) deletes an export.
      - V(safe) fails while clients are connected; V(hard) disconnects them.
    type: str
    choices: [safe, hard]
    default: safe
  recreate:
    description:
      - When the export exists on another node, delete it (with O(mode)) and add
        it again on O(node_name) instead of failing.
    type: bool
    default: false
  server:
    description:
      - The NBD server's address, as the O(blockdev.fleecing.nbd_server#module:addr)
        it was started with (the C(addr) that module returns). Only used to
        build the returned RV(uri); QEMU 7.2 cannot report it.
    type: dict
    suboptions:
      type:
        description: V(unix) or V(inet).
        type: str
        choices: [unix, inet]
        default: unix
      path:
        description: The UNIX socket path.
        type: path
      host:
        description: The host clients connect to.
        type: str
      port:
        description: The TCP port.
        type: int
      tls:
        description: Whether the server uses TLS (the URI is then C(nbds://...)).
        type: bool
        default: false
seealso:
  - module: blockdev.fleecing.nbd_server
  - module: blockdev.fleecing.node
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Export the fleecing node read-only, with its dirty bitmap
  blockdev.fleecing.nbd_export:
    socket: /run/blockd/qmp.sock
    id: disk0-backup
    node_name: disk0-fleece
    name: disk0
    bitmaps: [inc0]
    server:
      type: unix
      path: /run/blockd/nbd.sock
  register: exp

- name: Copy it away
  ansible.builtin.command: nbdcopy {{ exp.uri | quote }} /backup/disk0.raw

- name: Remove the export, dropping any client still connected
  blockdev.fleecing.nbd_export:
    id: disk0-backup
    state: absent
    mode: hard
"""

RETURN = r"""
export:
  description:
    - The export as C(query-block-exports) shows it after the task (C(id),
      C(type), C(node-name), C(shutting-down)); V(null) when absent.
    - In check mode, the export as it was before.
  returned: always
  type: dict
  sample: {"id": "disk0-backup", "type": "nbd", "node-name": "disk0-fleece", "shutting-down": false}
name:
  description: The NBD export name (O(name), or O(node_name) by default).
  returned: with O(state=present)
  type: str
  sample: disk0
uri:
  description: The export's NBD URI, built from O(server).
  returned: with O(state=present) and O(server)
  type: str
  sample: nbd+unix:///disk0?socket=/run/blockd/nbd.sock
recreated:
  description: Whether an existing export was deleted and added again (O(recreate=true)).
  returned: always
  type: bool
"""

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import BlockdModule
from ansible_collections.blockdev.fleecing.plugins.module_utils.common import (
    nbd_uri, try_execute, wait_exports_gone)

#: Drivers of filter nodes that QEMU inserts above an exported node (the export follows them).
FILTERS = ("copy-before-write", "throttle", "preallocate", "compress", "blkverify")


def export_view(info):
    """The comparable part of a query-block-exports entry (the diff shows it)."""
    if info is None:
        return None
    return dict(id=info["id"], type=info.get("type"), node_name=info.get("node-name"))


def same_node(mod, have, want):
    """True when an export on node HAVE exports node WANT (see DOCUMENTATION)."""
    if have == want:
        return True
    nodes = mod.query_nodes()
    top, wanted = nodes.get(have), nodes.get(want)
    return bool(top and wanted and top.get("drv") in FILTERS
                and top.get("file") == wanted.get("file"))


def delete(mod, export_id):
    """block-export-del with the requested mode; wait until the export is gone."""
    err = try_execute(mod, "block-export-del", {"id": export_id, "mode": mod.params["mode"]})[1]
    if err is not None and "is already shutting down" not in err.desc:
        hint = ""
        if err.desc.endswith("still in use"):
            hint = " (clients are connected; mode=hard disconnects them)"
        mod.fail("block-export-del failed: %s%s; nothing was changed" % (err.desc, hint),
                 error_class=err.klass)
    wait_exports_gone(mod, [export_id])


def add_args(params):
    """The arguments of block-export-add."""
    args = {"type": "nbd", "id": params["id"], "node-name": params["node_name"],
            "writable": params["writable"], "name": params["name"] or params["node_name"]}
    if params["description"] is not None:
        args["description"] = params["description"]
    if params["bitmaps"]:
        args["bitmaps"] = list(params["bitmaps"])
    if params["allocation_depth"]:
        args["allocation-depth"] = True
    return args


def present(mod):
    """state=present."""
    p = mod.params
    name = p["name"] or p["node_name"]
    mod.result.update(name=name, recreated=False)
    if p["server"]:
        mod.result["uri"] = nbd_uri(p["server"], name, tls=p["server"]["tls"])
    existing = mod.query_exports().get(p["id"])
    if existing is not None and existing.get("shutting-down"):
        if not mod.check_mode:
            wait_exports_gone(mod, [p["id"]])  # a deletion under way: its id is free soon
        existing = None
    before = export_view(existing)
    wanted = dict(id=p["id"], type="nbd", node_name=p["node_name"])
    if existing is not None:
        if existing.get("type") == "nbd" and same_node(mod, existing.get("node-name"),
                                                       p["node_name"]):
            mod.exit(before, before, export=existing)
        if not p["recreate"]:
            mod.fail("export '%s' exists on node '%s' (type %s), not on node '%s'; set "
                     "recreate=true to replace it; nothing was changed"
                     % (p["id"], existing.get("node-name"), existing.get("type"), p["node_name"]),
                     export=existing, diff=dict(before=before, after=wanted))
    if p["node_name"] not in mod.query_nodes():
        mod.fail("node '%s' does not exist; nothing was changed" % p["node_name"],
                 export=existing)
    if mod.check_mode:
        mod.result.update(changed=True, recreated=existing is not None)
        mod.exit(before, wanted, export=existing)
    if existing is not None:
        delete(mod, p["id"])  # fails, changing nothing, when it cannot be deleted
        mod.result.update(changed=True, recreated=True)
    err = try_execute(mod, "block-export-add", add_args(p))[1]
    if err is not None:
        lost = "; the old export '%s' was deleted" % p["id"] if existing is not None else ""
        mod.fail("block-export-add failed: %s%s" % (err.desc, lost or "; nothing was changed"),
                 error_class=err.klass, export=None)
    mod.result["changed"] = True
    export = mod.query_exports().get(p["id"])
    mod.exit(before, export_view(export), export=export)


def absent(mod):
    """state=absent."""
    export_id = mod.params["id"]
    mod.result["recreated"] = False
    existing = mod.query_exports().get(export_id)
    if existing is None:
        mod.exit(None, None, export=None)
    if mod.check_mode:
        mod.result["changed"] = True
        mod.exit(export_view(existing), None, export=existing)
    delete(mod, export_id)
    mod.result["changed"] = True
    mod.exit(export_view(existing), None, export=None)


def main():
    """Entry point."""
    mod = BlockdModule(dict(
        id=dict(type="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        node_name=dict(type="str"),
        name=dict(type="str"),
        writable=dict(type="bool", default=False),
        description=dict(type="str"),
        bitmaps=dict(type="list", elements="str"),
        allocation_depth=dict(type="bool", default=False),
        mode=dict(type="str", choices=["safe", "hard"], default="safe"),
        recreate=dict(type="bool", default=False),
        server=dict(type="dict", options=dict(
            type=dict(type="str", choices=["unix", "inet"], default="unix"),
            path=dict(type="path"),
            host=dict(type="str"),
            port=dict(type="int"),
            tls=dict(type="bool", default=False)))),
        required_if=[("state", "present", ("node_name",))])
    server = mod.params["server"]
    if server is not None:
        if server["type"] == "unix" and not server.get("path"):
            mod.fail("server.type is unix but server.path is missing")
        if server["type"] == "inet" and (not server.get("host") or server.get("port") is None):
            mod.fail("server.type is inet but server.host or server.port is missing")
    if mod.params["state"] == "present":
        present(mod)
    absent(mod)


if __name__ == "__main__":
    main()
