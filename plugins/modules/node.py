#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.node."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: node
short_description: Add or remove a block node of a blockd or qemu-storage-daemon engine
version_added: 0.1.0
description:
  - Makes sure a named block node exists with the given driver and options
    (QMP C(blockdev-add)), or does not exist (QMP C(blockdev-del)).
  - The engine cannot report the options a node was added with, so an existing
    node is compared with what C(query-named-block-nodes) shows, for these keys
    of O(options).
  - The driver, against C(drv).
  - The file name, against C(file). For a protocol node such as V(file) that is
    its C(filename); for a format or filter node, the file name of its C(file)
    child, named (the file name that node shows) or inline (its C(filename)).
  - C(read-only) (default V(false)), against C(ro); not compared when
    C(auto-read-only) is set.
  - C(size) when given, against the virtual size.
  - Not compared (not readable back on either engine) are every other option,
    among them C(backing), C(target), cache and discard settings, and which named
    node is the child when several nodes show the same file name.
  - A node that exists with different compared values is a conflict. The task
    fails, shows the difference and changes nothing, unless O(recreate=true).
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
options:
  node_name:
    description:
      - The node's name (C(node-name) of C(blockdev-add)).
    type: str
    required: true
  state:
    description:
      - V(present) adds the node if it does not exist.
      - V(absent) deletes it (C(blockdev-del)). A node in use (exported, used by
        a block job, or the child of another node) is not deleted; the task fails
        with the engine's message, naming the exports that use it.
    type: str
    choices: [present, absent]
    default: present
  driver:
    description:
      - The block driver (C(driver) of C(blockdev-add)), for example V(file),
        V(raw), V(qcow2), V(null-co), V(copy-before-write), V(snapshot-access),
        V(throttle).
      - Required with O(state=present).
    type: str
  options:
    description:
      - The other arguments of C(blockdev-add), as QMP spells them
        (C(filename), C(file), C(backing), C(read-only), C(discard)...).
      - A child given as a string names an existing node; it must exist, or the
        task fails before anything changes.
      - May repeat C(driver) and C(node-name) only with the same values as
        O(driver) and O(node_name).
      - Use absolute file names; the engine reports them as given, and they are
        compared as given (normalised).
    type: dict
    default: {}
  recreate:
    description:
      - When the node exists with different compared values, delete it and add
        it again with the requested options instead of failing.
      - A node in use cannot be deleted; the task then fails and changes nothing.
      - If the engine refuses the new options after the old node was deleted,
        the task fails and says that the node is now absent.
    type: bool
    default: false
notes:
  - Nodes added by this module belong to the engine's monitor, like those of
    C(--blockdev); they live until deleted or until the engine stops.
seealso:
  - module: blockdev.fleecing.nbd_export
  - module: blockdev.fleecing.blockd_info
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Open a raw disk image
  blockdev.fleecing.node:
    socket: /run/blockd/qmp.sock
    node_name: disk0-file
    driver: file
    options:
      filename: /var/lib/images/disk0.raw

- name: Put a raw format node on it
  blockdev.fleecing.node:
    node_name: disk0
    driver: raw
    options:
      file: disk0-file

- name: A qcow2 image with its file child inline, read-only
  blockdev.fleecing.node:
    node_name: base
    driver: qcow2
    options:
      read-only: true
      file:
        driver: file
        filename: /var/lib/images/base.qcow2

- name: Point disk0-file at another image, replacing the node
  blockdev.fleecing.node:
    node_name: disk0-file
    driver: file
    options:
      filename: /var/lib/images/disk0-new.raw
    recreate: true

- name: Remove the nodes again (parents first)
  blockdev.fleecing.node:
    node_name: "{{ item }}"
    state: absent
  loop: [disk0, disk0-file, base]
"""

RETURN = r"""
node:
  description:
    - The node as C(query-named-block-nodes) shows it after the task
      (C(node-name), C(drv), C(file), C(ro), C(image)...); V(null) when absent.
    - In check mode, the node as it was before.
  returned: always
  type: dict
  sample: {"node-name": "disk0", "drv": "raw", "file": "/var/lib/images/disk0.raw", "ro": false}
compared:
  description:
    - What the module compared with an existing node, derived from the options
      (keys C(driver), C(filename), C(read_only), C(virtual_size)); empty for
      O(state=absent).
  returned: always
  type: dict
  sample: {"driver": "raw", "filename": "/var/lib/images/disk0.raw", "read_only": false}
differences:
  description: "The compared values that differ: C({name: [existing, wanted]})."
  returned: when the node exists with different values
  type: dict
  sample: {"filename": ["/var/lib/images/a.raw", "/var/lib/images/b.raw"]}
recreated:
  description: Whether an existing node was deleted and added again (O(recreate=true)).
  returned: always
  type: bool
"""

import os

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import BlockdModule
from ansible_collections.blockdev.fleecing.plugins.module_utils.common import try_execute

#: blockdev-add options that name a child node when given as a string.
CHILD_KEYS = ("file", "backing", "target", "data-file")


def node_view(info):
    """The comparable summary of a query-named-block-nodes entry (the diff shows it)."""
    if info is None:
        return None
    return dict(node_name=info.get("node-name"), driver=info.get("drv"),
                filename=info.get("file"), read_only=bool(info.get("ro")),
                virtual_size=(info.get("image") or {}).get("virtual-size"))


def expected_filename(options, nodes):
    """The ``file`` name a node added with OPTIONS reports, or None when it cannot be told."""
    if isinstance(options.get("filename"), str):
        return options["filename"]
    child = options.get("file")
    if isinstance(child, str):
        return (nodes.get(child) or {}).get("file")
    if isinstance(child, dict):
        return expected_filename(child, nodes)
    return None


def expected_values(driver, options, nodes):
    """The values to compare with an existing node (see DOCUMENTATION)."""
    want = dict(driver=driver)
    filename = expected_filename(options, nodes)
    if filename is not None:
        want["filename"] = filename
    if not options.get("auto-read-only"):
        want["read_only"] = bool(options.get("read-only", False))
    if isinstance(options.get("size"), int):
        want["virtual_size"] = options["size"]
    return want


def _same(key, have, want):
    if key == "filename" and isinstance(have, str) and isinstance(want, str) \
            and not have.startswith("json:"):
        return os.path.normpath(have) == os.path.normpath(want)
    return have == want


def differences(view, want):
    """{key: [existing, wanted]} for every compared value that differs."""
    return dict((k, [view.get(k), v]) for k, v in want.items() if not _same(k, view.get(k), v))


def missing_children(options, nodes, prefix="options"):
    """Names of child nodes referenced by string in OPTIONS that do not exist ([(path, name)])."""
    missing = []
    for key in CHILD_KEYS:
        value = options.get(key)
        if isinstance(value, str) and value not in nodes:
            missing.append(("%s.%s" % (prefix, key), value))
        elif isinstance(value, dict):
            missing.extend(missing_children(value, nodes, "%s.%s" % (prefix, key)))
    return missing


def users_hint(mod, name):
    """' (exported as e0, e1)' when block exports use node NAME, else ''."""
    users = sorted(e["id"] for e in mod.query_exports().values() if e.get("node-name") == name)
    return " (exported as %s)" % ", ".join(users) if users else ""


def add_args(name, driver, options):
    """The arguments of blockdev-add."""
    args = dict(options)
    args.update({"node-name": name, "driver": driver})
    return args


def blockdev_del(mod, name):
    """blockdev-del, failing with the engine's message plus the exports that use the node."""
    err = try_execute(mod, "blockdev-del", {"node-name": name})[1]
    if err is not None:
        mod.fail("blockdev-del failed: %s%s" % (err.desc, users_hint(mod, name)),
                 error_class=err.klass, qmp_command="blockdev-del")


def present(mod, name, driver, options):
    """state=present."""
    nodes = mod.query_nodes()
    existing = nodes.get(name)
    missing = missing_children(options, nodes)
    if missing:
        mod.fail("; ".join("%s names node '%s', which does not exist" % m for m in missing)
                 + "; nothing was changed", compared={}, recreated=False, node=existing)
    want = expected_values(driver, options, nodes)
    mod.result.update(compared=want, recreated=False)
    before = node_view(existing)
    if existing is not None:
        diff = differences(before, want)
        if not diff:
            mod.exit(before, before, node=existing)
        predicted = dict(before)
        predicted.update(want)
        if not mod.params["recreate"]:
            mod.fail("node '%s' exists with other settings (%s); set recreate=true to replace it"
                     % (name, "; ".join("%s: %r, wanted %r" % (k, v[0], v[1])
                                        for k, v in sorted(diff.items()))),
                     node=existing, differences=diff, diff=dict(before=before, after=predicted))
        mod.result["differences"] = diff
        if mod.check_mode:
            mod.result.update(changed=True, recreated=True)
            mod.exit(before, predicted, node=existing)
        blockdev_del(mod, name)  # fails (nothing changed) while the node is in use
        mod.result.update(changed=True, recreated=True)
        err = try_execute(mod, "blockdev-add", add_args(name, driver, options))[1]
        if err is not None:
            mod.fail("blockdev-add failed: %s; node '%s' was deleted to be recreated and is now "
                     "absent" % (err.desc, name), error_class=err.klass, node=None)
    else:
        predicted = dict(node_name=name, **want)
        if mod.check_mode:
            mod.result["changed"] = True
            mod.exit(None, predicted, node=None)
        mod.execute("blockdev-add", add_args(name, driver, options))
        mod.result["changed"] = True
    node = mod.query_nodes().get(name)
    mod.exit(before, node_view(node), node=node)


def absent(mod, name):
    """state=absent."""
    mod.result.update(compared={}, recreated=False)
    existing = mod.query_nodes().get(name)
    if existing is None:
        mod.exit(None, None, node=None)
    if mod.check_mode:
        hint = users_hint(mod, name)
        if hint:
            mod.fail("node '%s' is in use%s" % (name, hint), node=existing)
        mod.result["changed"] = True
        mod.exit(node_view(existing), None, node=existing)
    blockdev_del(mod, name)
    mod.result["changed"] = True
    mod.exit(node_view(existing), None, node=None)


def main():
    """Entry point."""
    mod = BlockdModule(
        dict(node_name=dict(type="str", required=True),
             state=dict(type="str", choices=["present", "absent"], default="present"),
             driver=dict(type="str"),
             options=dict(type="dict", default={}),
             recreate=dict(type="bool", default=False)),
        required_if=[("state", "present", ("driver",))])
    name = mod.params["node_name"]
    options = dict(mod.params["options"] or {})
    driver = mod.params["driver"]
    for key, value in (("node-name", name), ("driver", driver)):
        if key in options:
            if options[key] != value:
                mod.fail("options.%s (%r) conflicts with %s (%r)"
                         % (key, options[key], key.replace("-", "_"), value))
            del options[key]
    if mod.params["state"] == "present":
        present(mod, name, driver, options)
    else:
        absent(mod, name)


if __name__ == "__main__":
    main()
