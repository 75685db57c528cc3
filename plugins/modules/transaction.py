#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.transaction."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: transaction
short_description: Run several QMP actions at one point in time, all or nothing
version_added: 0.1.0
description:
  - Runs a QMP C(transaction) on blockd or qemu-storage-daemon - snapshots,
    backup jobs and dirty bitmap changes of several disks that take effect at
    the same instant (no write lands between them), or not at all (if one
    action fails, the engine undoes the others).
  - A transaction is a command, not a state, so it is not idempotent by itself.
    The module makes it safe to re-run with O(skip_done) - before running, it
    looks at what each action would leave behind (the snapshot node, the
    overlay on top of its node, the block job, the bitmap added or removed).
    When all of that is already there, the task changes nothing; when only
    part of it is there, the task fails, because the engine would refuse or
    repeat part of the work. Actions whose result cannot be seen afterwards
    (C(block-dirty-bitmap-clear), C(-enable), C(-disable), C(-merge),
    C(blockdev-snapshot-internal-sync), C(abort)) make the task run every time.
  - Before running (and in check mode, instead of running) the actions are
    checked - known action types, and that every node they name exists (or is
    created by an earlier action of the same transaction).
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
options:
  actions:
    description:
      - The transaction's actions, each a dict with C(type) (QEMU's
        C(TransactionAction) kind, such as C(blockdev-snapshot-sync),
        C(blockdev-backup), C(block-dirty-bitmap-add)) and C(data) (that
        action's arguments, spelled as in QMP).
    type: list
    elements: dict
    required: true
  completion_mode:
    description:
      - V(individual) lets each block job started by the transaction end on its
        own; V(grouped) makes them end together, all cancelled if one fails
        (C(properties.completion-mode)).
    type: str
    choices: [individual, grouped]
    default: individual
  skip_done:
    description:
      - Change nothing when everything the actions leave behind is already
        there (see above). V(false) runs the transaction every time.
    type: bool
    default: true
notes:
  - As in QEMU, the overlay of C(blockdev-snapshot-sync) replaces its node for
    the node's users (exports, filters, jobs). A node nobody uses is replaced for
    nobody, and its new overlay is dropped again when the transaction ends, so
    O(skip_done) cannot find it and such a task runs every time.
seealso:
  - module: blockdev.fleecing.fleece
  - module: blockdev.fleecing.backup_job
  - module: blockdev.fleecing.dirty_bitmap
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Fleecing jobs of two disks at one point in time
  blockdev.fleecing.transaction:
    socket: /run/blockd/qmp.sock
    completion_mode: grouped
    actions:
      - type: blockdev-backup
        data: {job-id: fleece-disk0, device: disk0, target: fleece0, sync: none, auto-dismiss: false}
      - type: blockdev-backup
        data: {job-id: fleece-disk1, device: disk1, target: fleece1, sync: none, auto-dismiss: false}

- name: External snapshots of both disks and a new bitmap, consistently
  blockdev.fleecing.transaction:
    actions:
      - type: blockdev-snapshot-sync
        data: {node-name: disk0, snapshot-file: /var/lib/vm/disk0.snap.qcow2, snapshot-node-name: disk0-snap}
      - type: blockdev-snapshot-sync
        data: {node-name: disk1, snapshot-file: /var/lib/vm/disk1.snap.qcow2, snapshot-node-name: disk1-snap}
      - type: block-dirty-bitmap-add
        data: {node: disk0-snap, name: since-snap}
"""

RETURN = r"""
actions:
  description: The actions run (in check mode, that would run); empty when skipped.
  returned: always
  type: list
  elements: dict
  sample: [{"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b0"}}]
done:
  description:
    - For each action, whether what it leaves behind is there after the task
      (in check mode, before it); V(null) for actions whose result cannot be seen.
  returned: always
  type: list
  elements: raw
  sample: [true, true]
"""

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import (
    BlockdModule, try_execute)

#: QEMU 7.2's TransactionAction kinds -> the data members that name existing nodes.
ACTION_NODES = {
    "abort": (),
    "block-dirty-bitmap-add": ("node",),
    "block-dirty-bitmap-remove": ("node",),
    "block-dirty-bitmap-clear": ("node",),
    "block-dirty-bitmap-enable": ("node",),
    "block-dirty-bitmap-disable": ("node",),
    "block-dirty-bitmap-merge": ("node",),
    "blockdev-backup": ("device", "target"),
    "blockdev-snapshot": ("node", "overlay"),
    "blockdev-snapshot-internal-sync": ("device",),
    "blockdev-snapshot-sync": ("node-name", "device"),
    "drive-backup": ("device",),
}


def bitmap_names(node):
    """Names of the named dirty bitmaps of a query-named-block-nodes entry."""
    return set(b.get("name") for b in (node or {}).get("dirty-bitmaps") or [])


def is_done(action, nodes, jobs):
    """Whether what ACTION leaves behind is there (True/False), or None if it cannot be seen."""
    kind, data = action["type"], action["data"]
    if kind == "blockdev-snapshot-sync":
        name = data.get("snapshot-node-name")
        return name in nodes if name else None
    if kind == "blockdev-snapshot":
        overlay = nodes.get(data.get("overlay"))
        return bool(overlay and overlay.get("backing_file_depth", 0) >= 1)
    if kind in ("blockdev-backup", "drive-backup"):
        return data.get("job-id") in jobs if data.get("job-id") else None
    if kind == "block-dirty-bitmap-add":
        return data.get("name") in bitmap_names(nodes.get(data.get("node")))
    if kind == "block-dirty-bitmap-remove":
        node = nodes.get(data.get("node"))
        return node is not None and data.get("name") not in bitmap_names(node)
    return None


def creates(action):
    """Node names ACTION adds to the graph (for the checks of later actions)."""
    data = action["data"]
    if action["type"] == "blockdev-snapshot-sync" and data.get("snapshot-node-name"):
        return [data["snapshot-node-name"]]
    return []


def normalized(mod):
    """The actions as ``{type, data}`` dicts; a malformed one fails, shown as given."""
    actions = []
    for i, action in enumerate(mod.params["actions"]):
        if set(action) - set(("type", "data")) or not isinstance(action.get("type"), str) \
                or not isinstance(action.get("data", {}), dict):
            mod.fail("actions[%d]: each action is a dict with 'type' (a string) and 'data' "
                     "(a dict), not %r" % (i, action))
        actions.append(dict(type=action["type"], data=action.get("data") or {}))
    if not actions:
        mod.fail("actions: give at least one action")
    return actions


def check(mod, actions, nodes):
    """Refuse unknown action types and unknown nodes, naming the action."""
    known = set(nodes)
    for i, action in enumerate(actions):
        kind = action["type"]
        if kind not in ACTION_NODES:
            mod.fail("actions[%d]: unknown action type '%s'; known types are %s"
                     % (i, kind, ", ".join(sorted(ACTION_NODES))))
        for member in ACTION_NODES[kind]:
            name = action["data"].get(member)
            if name is not None and name not in known:
                mod.fail("actions[%d] (%s): %s '%s' is not a node of the engine"
                         % (i, kind, member, name))
        known.update(creates(action))


def main():
    """Entry point."""
    mod = BlockdModule(dict(
        actions=dict(type="list", elements="dict", required=True),
        completion_mode=dict(type="str", default="individual",
                             choices=["individual", "grouped"]),
        skip_done=dict(type="bool", default=True),
    ))
    actions = normalized(mod)
    nodes = mod.query_nodes()
    jobs = mod.query_jobs()
    done = [is_done(a, nodes, jobs) for a in actions]
    if mod.params["skip_done"] and all(d is not None for d in done):
        if all(done):
            mod.exit(None, None, actions=[], done=done)
        if any(done):
            mod.fail("the transaction looks partly done already (actions %s are, %s are not); "
                     "the engine would refuse or repeat part of it - fix the graph, or set "
                     "skip_done: false" % ([i for i, d in enumerate(done) if d],
                                           [i for i, d in enumerate(done) if not d]), done=done)
    check(mod, actions, nodes)
    args = dict(actions=actions)
    if mod.params["completion_mode"] != "individual":
        args["properties"] = {"completion-mode": mod.params["completion_mode"]}
    if not mod.check_mode:
        dummy, err = try_execute(mod, "transaction", args)
        if err is not None:
            mod.fail("transaction failed, the engine undid all %d action(s): %s"
                     % (len(actions), err.desc), error_class=err.klass, actions=actions)
        nodes, jobs = mod.query_nodes(), mod.query_jobs()
        done = [is_done(a, nodes, jobs) for a in actions]
    mod.result["changed"] = True
    mod.exit(dict(done=done), dict(actions=actions), actions=actions, done=done)


if __name__ == "__main__":
    main()
