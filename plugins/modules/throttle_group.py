#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.throttle_group."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: throttle_group
short_description: Manage a throttle group of blockd or qemu-storage-daemon
version_added: 0.1.0
description:
  - Makes sure a throttle group (QOM object of type C(throttle-group)) exists
    with the given I/O limits (QMP C(object-add), C(qom-set) of its C(limits)),
    or does not exist (C(object-del)).
  - All C(throttle) filter nodes that name the group share its limits - a
    backup job or an NBD reader behind such a node cannot take more than its
    share of the disk from the guest. Add the nodes with
    M(blockdev.fleecing.node) (O(blockdev.fleecing.node#module:driver=throttle),
    C(throttle-group) and C(file) in its options).
  - The limits are read back with C(qom-get) and compared key by key; only the
    keys given in O(limits) are compared and set. Keys not given keep their
    value, so give V(0) to switch a limit off.
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
options:
  name:
    description:
      - The object id of the group (C(/objects/NAME) in the QOM tree).
    type: str
    required: true
  state:
    description:
      - V(present) adds the group if it does not exist and sets the given limits.
      - V(absent) deletes it. A group that a C(throttle) node still uses cannot
        be deleted; the task fails with the engine's message and changes nothing.
    type: str
    choices: [present, absent]
    default: present
  limits:
    description:
      - QEMU's C(ThrottleLimits), spelled as QEMU spells them - C(bps-total),
        C(bps-read), C(bps-write) (bytes per second), C(iops-total), C(iops-read),
        C(iops-write) (requests per second), their bursts C(*-max) with the
        burst length in seconds C(*-max-length), and C(iops-size) (bytes that
        count as one request).
      - Every value is an integer; V(0) means no limit. A burst (C(*-max)) needs
        its base limit, as in QEMU.
      - An unknown key fails the task before anything changes.
    type: dict
    default: {}
notes:
  - qemu-storage-daemon and blockd check the limits (range, bursts without a
    base limit) when they are set; such a refusal fails the task and changes nothing.
seealso:
  - module: blockdev.fleecing.node
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: At most 50 MiB/s and 2000 requests/s for everything behind group 'backup'
  blockdev.fleecing.throttle_group:
    socket: /run/blockd/qmp.sock
    name: backup
    limits:
      bps-total: 52428800
      iops-total: 2000

- name: The backup reads disk0 through the group
  blockdev.fleecing.node:
    node_name: disk0-throttled
    driver: throttle
    options:
      throttle-group: backup
      file: disk0

- name: Lift the byte limit, keep the request limit
  blockdev.fleecing.throttle_group:
    name: backup
    limits:
      bps-total: 0

- name: Remove the group (after its throttle nodes)
  blockdev.fleecing.throttle_group:
    name: backup
    state: absent
"""

RETURN = r"""
limits:
  description:
    - All limits of the group after the task (in check mode as predicted), as
      C(qom-get) returns them; an empty dict when the group does not exist.
  returned: always
  type: dict
  sample: {"bps-total": 52428800, "iops-total": 2000, "bps-total-max-length": 1}
actions:
  description: The QMP commands run (in check mode, that would run).
  returned: always
  type: list
  elements: dict
  sample: [{"type": "object-add", "data": {"qom-type": "throttle-group", "id": "backup",
            "limits": {"bps-total": 52428800}}}]
"""

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import (
    BlockdModule, try_execute)

#: QEMU's ThrottleLimits members.
LIMIT_KEYS = tuple("%s-%s%s" % (kind, op, suffix)
                   for kind in ("iops", "bps") for op in ("total", "read", "write")
                   for suffix in ("", "-max", "-max-length")) + ("iops-size",)


def check_limits(mod):
    """Unknown keys or non-integer values fail before anything changes; the limits dict."""
    limits = mod.params["limits"] or {}
    unknown = sorted(set(limits) - set(LIMIT_KEYS))
    if unknown:
        mod.fail("limits: unknown key(s) %s; known keys are %s"
                 % (", ".join(unknown), ", ".join(sorted(LIMIT_KEYS))))
    out = {}
    for key, value in limits.items():
        if isinstance(value, bool):
            mod.fail("limits: %s must be an integer, not %r" % (key, value))
        try:
            out[key] = int(value)
        except (TypeError, ValueError):
            mod.fail("limits: %s must be an integer, not %r" % (key, value))
        if str(out[key]) != str(value).strip():
            mod.fail("limits: %s must be an integer, not %r" % (key, value))
    return out


def group_exists(mod, name):
    """Whether /objects/NAME exists; fails if it is not a throttle group."""
    members, err = try_execute(mod, "qom-list", {"path": "/objects"})
    if err is not None:
        if err.klass == "DeviceNotFound":
            return False    # QEMU makes /objects with the first object
        mod.fail("qom-list failed: %s" % err.desc)
    for member in members or []:
        if member.get("name") == name:
            if member.get("type") != "child<throttle-group>":
                mod.fail("object '%s' exists but is a %s, not a throttle group"
                         % (name, member.get("type")))
            return True
    return False


def main():
    """Entry point."""
    mod = BlockdModule(dict(
        name=dict(type="str", required=True),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        limits=dict(type="dict", default={}),
    ))
    name = mod.params["name"]
    if not name:
        mod.fail("name cannot be empty")
    wanted = check_limits(mod)
    path = "/objects/" + name
    before = (mod.execute("qom-get", {"path": path, "property": "limits"})
              if group_exists(mod, name) else None)

    if mod.params["state"] == "absent":
        if mod.params["limits"]:
            mod.fail("limits: only with state=present")
        actions = [dict(type="object-del", data={"id": name})] if before is not None else []
        if actions and not mod.check_mode:
            mod.execute("object-del", {"id": name})
        mod.result["changed"] = bool(actions)
        mod.exit(before, None, limits={}, actions=actions)

    if before is None:
        add = {"qom-type": "throttle-group", "id": name, "limits": wanted}
        actions = [dict(type="object-add", data=add)]
        after = dict((k, 0) for k in LIMIT_KEYS)
        after.update(dict((k, 1) for k in LIMIT_KEYS if k.endswith("-max-length")))
    else:
        change = dict((k, v) for k, v in wanted.items() if before.get(k) != v)
        actions = ([dict(type="qom-set", data={"path": path, "property": "limits",
                                               "value": change})] if change else [])
        after = dict(before)
    for action in actions:
        after.update(action["data"].get("limits") or action["data"].get("value") or {})
    if actions and not mod.check_mode:
        for action in actions:
            mod.execute(action["type"], action["data"])
        after = mod.execute("qom-get", {"path": path, "property": "limits"})
    mod.result["changed"] = bool(actions)
    mod.exit(before, after, limits=after, actions=actions)


if __name__ == "__main__":
    main()
