#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.dirty_bitmap."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: dirty_bitmap
short_description: Manage a dirty bitmap of a block node of blockd or qemu-storage-daemon
version_added: 0.1.0
description:
  - Makes sure a named dirty bitmap exists on a block node, with the given
    granularity, persistence and recording state (QMP C(block-dirty-bitmap-add),
    C(-enable), C(-disable)), or does not exist (C(block-dirty-bitmap-remove)).
  - A dirty bitmap records which areas of a node were written since it was
    added or last cleared; an incremental backup (O(blockdev.fleecing.backup_job#module:sync=incremental))
    copies only those areas.
  - The bitmap is compared with the C(dirty-bitmaps) of the node in
    C(query-named-block-nodes) (C(name), C(granularity), C(recording),
    C(persistent), C(count)).
  - An existing bitmap with another O(granularity) or O(persistent) value is a
    conflict. The task fails, shows the difference and changes nothing, unless
    O(recreate=true).
  - The changes of one task are made in one QMP C(transaction), so they all
    happen or none does (except for O(recreate), see there).
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
options:
  node:
    description:
      - The node-name of the block node that carries the bitmap.
      - With O(state=present) the node must exist, or the task fails before
        anything changes. With O(state=absent) a node that does not exist has no
        bitmap either, so the task succeeds without change (teardown stays
        idempotent after the node is gone).
    type: str
    required: true
  name:
    description:
      - The bitmap's name (at most 1023 bytes).
    type: str
    required: true
  state:
    description:
      - V(present) adds the bitmap if it does not exist and brings it to the
        requested settings.
      - V(absent) removes it. A bitmap in use by a block job (C(busy)) is not
        removed; the task fails and says so.
    type: str
    choices: [present, absent]
    default: present
  granularity:
    description:
      - Bytes covered by one bit, a power of 2, at least 512.
      - When omitted, a new bitmap gets the engine's default (the node's cluster
        size clamped to 4 KiB..64 KiB; 64 KiB for raw images) and an existing
        bitmap's granularity is not compared.
    type: int
  persistent:
    description:
      - Whether the bitmap is stored in the image (qcow2 v3 only) when the node
        is closed, so that it survives a restart of the engine.
      - When omitted, a new bitmap is not persistent and an existing bitmap's
        persistence is not compared.
    type: bool
  enabled:
    description:
      - Whether the bitmap records writes (C(recording) in the engine's
        report). V(false) adds the bitmap disabled or disables it
        (C(block-dirty-bitmap-disable)); V(true) enables it.
      - When omitted, a new bitmap records and an existing bitmap is left as it
        is.
    type: bool
  clear:
    description:
      - Clear the bitmap (C(block-dirty-bitmap-clear)), so that every area counts
        as clean again, as after a full backup.
      - Changes something only when the bitmap has dirty areas (C(count) > 0),
        so a run on a clean bitmap reports no change.
      - Applies to an existing bitmap; a bitmap this task adds is empty anyway.
      - Mutually exclusive with O(merge_from).
    type: bool
    default: false
  merge_from:
    description:
      - Bitmaps whose dirty areas are merged into this one
        (C(block-dirty-bitmap-merge)) B(when this task adds it) (or re-adds it
        with O(recreate)). An existing bitmap is left alone, so re-running the
        task changes nothing.
      - Each entry is a bitmap name on O(node), or a dict with C(node) and
        C(name) for a bitmap of another node. When the task adds the bitmap,
        every source must exist, or the task fails before anything changes.
      - Use it to make a differential bitmap, or a copy of a bitmap before it is
        cleared.
    type: list
    elements: raw
  recreate:
    description:
      - When the bitmap exists with another O(granularity) or O(persistent)
        value, or is marked C(inconsistent) (the engine stopped without storing
        it), remove it and add it again with the requested settings instead of
        failing.
      - The new bitmap is empty (or holds O(merge_from)), so the next backup that
        relies on it must be a full one.
      - Removal and addition are two steps (the engine cannot remove and add one
        name in one transaction). If the engine refuses the addition, the module
        adds the old bitmap back (empty) and fails, saying so.
    type: bool
    default: false
notes:
  - A bitmap that is marked C(inconsistent) cannot be used for incremental
    backups; with O(state=present) the task fails on it unless O(recreate=true).
seealso:
  - module: blockdev.fleecing.backup_job
  - module: blockdev.fleecing.transaction
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Track the writes to disk0 from now on, in the image
  blockdev.fleecing.dirty_bitmap:
    socket: /run/blockd/qmp.sock
    node: disk0
    name: inc0
    persistent: true

- name: A differential bitmap, started as a copy of inc0 and not recording
  blockdev.fleecing.dirty_bitmap:
    node: disk0
    name: diff0
    enabled: false
    merge_from: [inc0]

- name: After a full backup, start counting again
  blockdev.fleecing.dirty_bitmap:
    node: disk0
    name: inc0
    clear: true

- name: Change the granularity (the bitmap starts empty again)
  blockdev.fleecing.dirty_bitmap:
    node: disk0
    name: inc0
    granularity: 131072
    persistent: true
    recreate: true

- name: Remove it
  blockdev.fleecing.dirty_bitmap:
    node: disk0
    name: inc0
    state: absent
"""

RETURN = r"""
bitmap:
  description:
    - The bitmap as the engine reports it after the task (in check mode as
      predicted), the entry of the node's C(dirty-bitmaps); an empty dict when absent.
    - C(count) is the number of dirty bytes.
  returned: always
  type: dict
  sample: {"name": "inc0", "granularity": 65536, "recording": true,
           "persistent": true, "busy": false, "count": 0}
actions:
  description: The QMP commands or transaction actions run (in check mode, that would run).
  returned: always
  type: list
  elements: dict
  sample: [{"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "inc0"}}]
"""

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import BlockdModule
from ansible_collections.blockdev.fleecing.plugins.module_utils.qmp_client import QMPError

#: The fields of a bitmap shown in the diff and compared.
FIELDS = ("name", "granularity", "persistent", "recording", "count")


def named_bitmaps(node_info):
    """The named dirty bitmaps of a node (``query-named-block-nodes`` entry) by name."""
    return dict((b["name"], b) for b in (node_info or {}).get("dirty-bitmaps") or []
                if b.get("name") is not None)


def view(bitmap):
    """The diff view of a bitmap (``{}`` when absent)."""
    if not bitmap:
        return {}
    return dict((k, bitmap[k]) for k in FIELDS if k in bitmap)


def merge_sources(mod, node, nodes):
    """Check ``merge_from``; the ``bitmaps`` list of block-dirty-bitmap-merge."""
    out = []
    for entry in mod.params["merge_from"] or []:
        if isinstance(entry, str):
            src_node, src_name = node, entry
            out.append(entry)
        elif (isinstance(entry, dict) and set(entry) == set(("node", "name"))
              and all(isinstance(v, str) for v in entry.values())):
            src_node, src_name = entry["node"], entry["name"]
            out.append(dict(node=src_node, name=src_name))
        else:
            mod.fail("merge_from entries must be bitmap names or dicts with 'node' and 'name', "
                     "not %r" % (entry,))
        if src_node not in nodes:
            mod.fail("merge_from: node '%s' does not exist" % src_node)
        if src_name not in named_bitmaps(nodes[src_node]):
            mod.fail("merge_from: node '%s' has no dirty bitmap '%s'" % (src_node, src_name))
    return out


def check_granularity(mod):
    """Refuse a granularity QEMU refuses, with QEMU's words, before anything changes."""
    gran = mod.params["granularity"]
    if gran is None:
        return
    if gran < 0 or gran >= 1 << 32:
        mod.fail("Parameter 'granularity' expects uint32_t")
    if gran < 512 or gran & (gran - 1):
        mod.fail("Granularity must be power of 2 and at least 512")


def add_actions(mod, node, name, sources):
    """The transaction actions that add the bitmap (and merge MERGE_FROM into it)."""
    data = dict(node=node, name=name)
    for opt in ("granularity", "persistent"):
        if mod.params[opt] is not None:
            data[opt] = mod.params[opt]
    enabled = mod.params["enabled"] is not False
    if sources:
        data["disabled"] = True     # merge into a disabled bitmap, then enable it
    elif not enabled:
        data["disabled"] = True
    actions = [dict(type="block-dirty-bitmap-add", data=data)]
    if sources:
        actions.append(dict(type="block-dirty-bitmap-merge",
                            data=dict(node=node, target=name, bitmaps=sources)))
        if enabled:
            actions.append(dict(type="block-dirty-bitmap-enable", data=dict(node=node, name=name)))
    return actions


def predict_added(mod, name, node_info):
    """What a newly added bitmap will look like (check mode)."""
    gran = mod.params["granularity"]
    if gran is None:
        image = (node_info or {}).get("image") or {}
        cluster = image.get("cluster-size") or 65536
        gran = min(max(cluster, 4096), 65536)
    return dict(name=name, granularity=gran, persistent=bool(mod.params["persistent"]),
                recording=mod.params["enabled"] is not False, busy=False, count=0)


def run(mod, actions):
    """Run ACTIONS: one command alone, several as one transaction."""
    if len(actions) == 1:
        mod.execute(actions[0]["type"], actions[0]["data"])
    elif actions:
        mod.execute("transaction", dict(actions=actions))


def recreate(mod, node, old, actions):
    """Remove OLD and run the add ACTIONS; put OLD back (empty) if the engine refuses them."""
    name = old["name"]
    mod.execute("block-dirty-bitmap-remove", dict(node=node, name=name))
    try:
        mod.qmp.execute("transaction", dict(actions=actions))
    except QMPError as exc:
        back = dict(node=node, name=name, granularity=old["granularity"],
                    persistent=old.get("persistent", False),
                    disabled=not old.get("recording", True))
        restored = "the old bitmap was added back, empty"
        try:
            mod.qmp.execute("block-dirty-bitmap-add", back)
        except QMPError as exc2:
            restored = "adding the old bitmap back failed too (%s): the bitmap is now absent" % exc2
        mod.fail("recreating dirty bitmap '%s' on node '%s' failed: %s; %s"
                 % (name, node, getattr(exc, "desc", exc), restored))


def main():
    """Entry point."""
    mod = BlockdModule(dict(
        node=dict(type="str", required=True),
        name=dict(type="str", required=True),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        granularity=dict(type="int"),
        persistent=dict(type="bool"),
        enabled=dict(type="bool"),
        clear=dict(type="bool", default=False),
        merge_from=dict(type="list", elements="raw"),
        recreate=dict(type="bool", default=False),
    ), mutually_exclusive=[("clear", "merge_from")])
    p = mod.params
    node, name = p["node"], p["name"]
    if p["state"] == "absent":
        extra = [o for o in ("granularity", "persistent", "enabled", "merge_from")
                 if p[o] is not None] + [o for o in ("clear", "recreate") if p[o]]
        if extra:
            mod.fail("%s: only with state=present" % ", ".join(extra))
    if not name:
        mod.fail("Bitmap name cannot be empty")
    check_granularity(mod)

    nodes = mod.query_nodes()
    info = nodes.get(node)
    current = named_bitmaps(info).get(name)
    actions = []
    after = current

    if p["state"] == "absent":
        if current is not None:
            if current.get("busy"):
                mod.fail("dirty bitmap '%s' of node '%s' is in use by a block job; cancel "
                         "the job first" % (name, node), bitmap=current)
            actions = [dict(type="block-dirty-bitmap-remove", data=dict(node=node, name=name))]
            after = None
        if not mod.check_mode:
            run(mod, actions)
        mod.result["changed"] = bool(actions)
        mod.exit(view(current), view(after), bitmap={}, actions=actions)

    if info is None:
        mod.fail("node '%s' does not exist" % node)
    conflicts = []
    if current is not None:
        for opt in ("granularity", "persistent"):
            if p[opt] is not None and current.get(opt) != p[opt]:
                conflicts.append("%s is %s, requested %s" % (opt, current.get(opt), p[opt]))
        if current.get("inconsistent"):
            conflicts.append("it is inconsistent (not stored when the engine stopped)")
        if conflicts and not p["recreate"]:
            wanted = dict(view(current), **dict((o, p[o]) for o in ("granularity", "persistent")
                                                if p[o] is not None))
            mod.result["diff"] = dict(before=view(current), after=wanted)
            mod.fail("dirty bitmap '%s' of node '%s' exists but %s; set recreate: true to "
                     "replace it (its contents are lost)" % (name, node, "; ".join(conflicts)),
                     bitmap=current)

    if current is None or conflicts:
        actions = add_actions(mod, node, name, merge_sources(mod, node, nodes))
        after = predict_added(mod, name, info)
    else:
        after = dict(current)
        if p["enabled"] is not None and p["enabled"] != current.get("recording"):
            verb = "enable" if p["enabled"] else "disable"
            actions.append(dict(type="block-dirty-bitmap-" + verb, data=dict(node=node, name=name)))
            after["recording"] = p["enabled"]
        if p["clear"] and current.get("count", 0) > 0:
            actions.append(dict(type="block-dirty-bitmap-clear", data=dict(node=node, name=name)))
            after["count"] = 0
    if current is not None and current.get("busy") and actions:
        mod.fail("dirty bitmap '%s' of node '%s' is in use by a block job and cannot be "
                 "changed now" % (name, node), bitmap=current)

    if actions and not mod.check_mode:
        if conflicts:
            recreate(mod, node, current, actions)
        else:
            run(mod, actions)
        after = named_bitmaps(mod.query_nodes().get(node)).get(name)
    mod.result["changed"] = bool(actions)
    mod.exit(view(current), view(after), bitmap=after or {}, actions=actions)


if __name__ == "__main__":
    main()
