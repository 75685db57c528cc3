# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The graph of block nodes: naming, opening, lookup, deletion.

Graph changes run under the daemon's big lock (one QMP command at a time, as
QEMU's BQL); the data path never takes that lock.  It reads ``Backend.root``
and the nodes' child edges inside the I/O gate, which is why every change that
rewires an edge in use runs inside :meth:`IOGate.drained`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional

from ..errors import QMPError
from .backend import IOGate
from .node import Node

_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
#: QEMU's limit: node names are stored in char[32].
NODE_NAME_MAX = 31


def check_node_name(name: str) -> None:
    """Raise QEMU's error for an invalid node-name."""
    if not _NODE_NAME.match(name):
        raise QMPError("Invalid node-name: '%s'" % name)
    if len(name) > NODE_NAME_MAX:
        raise QMPError("Node name too long")


class Graph:
    """All block nodes of one daemon.

    :param driver_lookup: maps a ``driver`` name to its driver class.
    """

    def __init__(self, driver_lookup: Callable[[str], Any]) -> None:
        self.nodes: Dict[str, Node] = {}
        self.gate = IOGate()
        self._driver_lookup = driver_lookup
        self._id_counter = 0

    # -- naming -----------------------------------------------------------

    def generate_name(self) -> str:
        """A fresh ``#blockNNN`` name (QEMU's id_generate for nodes)."""
        while True:
            self._id_counter += 1
            name = "#block%03d" % self._id_counter
            if name not in self.nodes:
                return name

    def find(self, name: str) -> Optional[Node]:
        """The node named ``name``, or None."""
        return self.nodes.get(name)

    def lookup(self, name: str, device: "str | None" = None) -> Node:
        """The node named ``name``, or QEMU's "Cannot find" error."""
        node = self.nodes.get(name)
        if node is None:
            raise QMPError("Cannot find device='%s' nor node-name='%s'"
                           % (name if device is None else device, name))
        return node

    # -- opening ----------------------------------------------------------

    def open(self, options: Dict[str, Any], monitor_owned: bool = True,
             inherit: "Dict[str, Any] | None" = None) -> Node:
        """Open a node tree from blockdev-add options.

        Inline children are opened first (with generated names unless they
        name themselves); on any failure everything this call created is
        closed again and the graph is as it was.

        :param options: validated blockdev-add options.
        :param monitor_owned: whether blockdev-del may delete the node.
        :param inherit: options an inline child takes from its parent
            (``read-only``) unless it sets them itself.
        """
        name = options.get("node-name")
        implicit = name is None
        if implicit:
            name = self.generate_name()
        else:
            check_node_name(name)
            if name in self.nodes:
                raise QMPError("Duplicate nodes with node-name='%s'" % name)
        drv_cls = self._driver_lookup(options["driver"])
        node = Node(name, options, implicit, monitor_owned)
        node.graph = self
        if inherit and "read-only" not in options:
            node.read_only = bool(inherit.get("read-only", False))
        if inherit is not None and "discard" not in options:
            # bdrv_inherited_options(): children default to BDRV_O_UNMAP
            node.unmap = True
        created: List[Node] = []
        try:
            for role, required in drv_cls.child_roles.items():
                if role in options and options[role] is not None:
                    self.open_child(node, role, options[role], created)
                elif required:
                    raise QMPError("Parameter '%s' is missing" % role)
            driver = drv_cls(node)
            node.set_driver(driver)
            driver.open(options)
            node.set_driver(driver)  # open may have picked faster methods
        except BaseException:
            for role in list(node.children):
                node.detach_child(role)
            for child in reversed(created):
                self._free(child)
            raise
        self.nodes[name] = node
        return node

    def open_child(self, parent: Node, role: str, ref: Any,
                   created: "List[Node] | None" = None) -> Node:
        """Resolve a BlockdevRef and attach it as ``parent``'s ``role`` child.

        A string names an existing node; a dict defines a new inline node
        (appended to ``created`` so the caller can undo).
        """
        if isinstance(ref, str):
            child = self.lookup(ref)
        else:
            child = self.open(ref, monitor_owned=False,
                              inherit={"read-only": parent.read_only})
            if created is not None:
                created.append(child)
        if not parent.read_only and child.read_only:
            raise QMPError("Block node is read-only")
        parent.attach_child(role, child)
        return child

    # -- deletion ---------------------------------------------------------

    def _free(self, node: Node) -> None:
        """Close ``node``, then, recursively, children nobody else holds.

        The driver closes while its children are still attached: a format
        driver writes its metadata back to its ``file`` child on close.
        """
        try:
            if node.driver is not None:
                node.driver.close()
        finally:
            self.nodes.pop(node.name, None)
            for role in list(node.children):
                child = node.detach_child(role)
                if child is not None and child.refcount() == 0:
                    self._free(child)

    def delete(self, node: Node) -> None:
        """Drop the monitor's reference; free the node if it was the last."""
        node.monitor_owned = False
        if node.refcount() == 0:
            with self.gate.drained():
                self._free(node)

    def close_all(self) -> None:
        """Close every node (daemon shutdown), each parent before its children."""
        for node in self.nodes.values():
            node.monitor_owned = False
            node.backends.clear()
        while self.nodes:
            roots = [n for n in self.nodes.values() if not n.parents]
            for node in roots or list(self.nodes.values())[:1]:
                if node.name in self.nodes:
                    self._free(node)
