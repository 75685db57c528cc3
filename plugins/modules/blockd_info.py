#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.blockd_info."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: blockd_info
short_description: Read the state of a blockd or qemu-storage-daemon engine
version_added: 0.1.0
description:
  - Returns the engine's version, block nodes, block jobs, block exports and
    dirty bitmaps, read over its QMP monitor socket.
  - Never changes anything.
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
attributes:
  check_mode:
    support: full
    description: Runs normally in check mode (it only reads).
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
options:
  gather:
    description:
      - What to read. V(all) reads everything.
    type: list
    elements: str
    choices: [all, nodes, jobs, exports, bitmaps, version]
    default: [all]
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Read everything the engine has
  blockdev.fleecing.blockd_info:
    socket: /run/blockd/qmp.sock
  register: engine

- name: Show the point-in-time exports
  ansible.builtin.debug:
    msg: "{{ engine.exports | map(attribute='id') | list }}"

- name: Only the jobs
  blockdev.fleecing.blockd_info:
    gather: [jobs]
"""

RETURN = r"""
version:
  description: C(query-version) of the engine (C(qemu) major/minor/micro, C(package)).
  returned: when gathered
  type: dict
  sample: {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "blockd 0.1.0"}
nodes:
  description: C(query-named-block-nodes) with C(flat=true), one entry per node.
  returned: when gathered
  type: list
  elements: dict
jobs:
  description: C(query-block-jobs), one entry per block job.
  returned: when gathered
  type: list
  elements: dict
exports:
  description: C(query-block-exports), one entry per block export.
  returned: when gathered
  type: list
  elements: dict
bitmaps:
  description: Dirty bitmaps by node name (from the C(dirty-bitmaps) of each node).
  returned: when gathered
  type: dict
  sample: {"disk0": [{"name": "inc0", "granularity": 65536, "count": 0, "recording": true}]}
"""

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import BlockdModule


def main():
    """Entry point."""
    mod = BlockdModule(dict(gather=dict(
        type="list", elements="str", default=["all"],
        choices=["all", "nodes", "jobs", "exports", "bitmaps", "version"])))
    gather = set(mod.params["gather"])

    def want(what):
        """True when WHAT is to be gathered."""
        return "all" in gather or what in gather

    out = {}
    if want("version"):
        out["version"] = mod.execute("query-version")
    if want("nodes") or want("bitmaps"):
        nodes = mod.execute("query-named-block-nodes", {"flat": True}) or []
        if want("nodes"):
            out["nodes"] = nodes
        if want("bitmaps"):
            out["bitmaps"] = dict((n["node-name"], n.get("dirty-bitmaps", []))
                                  for n in nodes if n.get("dirty-bitmaps"))
    if want("jobs"):
        out["jobs"] = mod.execute("query-block-jobs") or []
    if want("exports"):
        out["exports"] = mod.execute("query-block-exports") or []
    mod.exit(**out)


if __name__ == "__main__":
    main()
