# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Block nodes and the edges between them."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional


def _ignore_discard(offset: int, length: int) -> None:
    """bdrv_co_pdiscard() on a node without BDRV_O_UNMAP: nothing happens."""


class Child:
    """An edge ``parent --role--> node`` (QEMU's BdrvChild).

    :param parent: the parent node.
    :param role: ``file``, ``backing``, ``target``...
    :param node: the child node.
    """

    __slots__ = ("parent", "role", "node")

    def __init__(self, parent: "Node", role: str, node: "Node") -> None:
        self.parent = parent
        self.role = role
        self.node = node

    def __repr__(self) -> str:
        return "<Child %s -%s-> %s>" % (self.parent.name, self.role, self.node.name)


class Node:
    """A block node (QEMU's BlockDriverState).

    The I/O methods are the driver's own bound methods, so a call through a
    node costs nothing extra on the data path.

    :param name: the node-name (``#blockNNN`` when generated).
    :param options: the blockdev-add options the node was opened with.
    :param implicit: True when the name was generated for an inline child.
    :param monitor_owned: True for nodes created by a top-level blockdev-add
        (or ``--blockdev``); only those may be deleted with blockdev-del.
    """

    def __init__(self, name: str, options: Dict[str, Any], implicit: bool,
                 monitor_owned: bool) -> None:
        self.name = name
        self.options = options
        self.implicit = implicit
        self.monitor_owned = monitor_owned
        self.read_only = bool(options.get("read-only", False))
        #: QEMU's BDRV_O_UNMAP: discards reach the driver only with
        #: ``discard=unmap``, and a parent driver's write-zeroes lose
        #: REQ_MAY_UNMAP without it (bdrv_co_pwrite_zeroes); inline children
        #: default to it (set by :meth:`Graph.open`).
        self.unmap = options.get("discard", "ignore") in ("unmap", "on")
        self.children: Dict[str, Child] = {}
        self.parents: List[Child] = []
        self.backends: List[Any] = []
        #: Non-edge users that hold op blockers (jobs); see blockers.roles().
        self.users: List[Any] = []
        self.driver: Any = None
        #: The graph the node belongs to (drivers open further children through it).
        self.graph: Any = None

    # -- wiring -------------------------------------------------------------

    def set_driver(self, driver: Any) -> None:
        """Bind the driver and expose its I/O methods on the node."""
        self.driver = driver
        self.drv_name = driver.format_name
        self.getlength = driver.getlength
        self.pread = driver.pread
        self.read_segments = driver.read_segments
        self.pwrite = driver.pwrite
        self.pwrite_zeroes = driver.pwrite_zeroes
        self.pdiscard = driver.pdiscard if self.unmap else _ignore_discard
        self.flush = driver.flush
        self.block_status = driver.block_status
        if getattr(self, "bitmap_hook", None) is not None:
            self.bitmap_hook(self)  # dirty bitmaps track writes (graph/dirty_bitmap.py)

    def attach_child(self, role: str, node: "Node") -> Child:
        """Add the edge ``self --role--> node``."""
        edge = Child(self, role, node)
        self.children[role] = edge
        node.parents.append(edge)
        return edge

    def detach_child(self, role: str) -> Optional["Node"]:
        """Remove the edge of ``role``; return the former child."""
        edge = self.children.pop(role, None)
        if edge is None:
            return None
        edge.node.parents.remove(edge)
        return edge.node

    def child(self, role: str) -> Optional["Node"]:
        """The child node of ``role``, or None."""
        edge = self.children.get(role)
        return edge.node if edge else None

    @property
    def file(self) -> Optional["Node"]:
        """The ``file`` child."""
        return self.child("file")

    @property
    def backing(self) -> Optional["Node"]:
        """The ``backing`` child."""
        return self.child("backing")

    def refcount(self) -> int:
        """References held on the node: parents, backends and the monitor."""
        return len(self.parents) + len(self.backends) + (1 if self.monitor_owned else 0)

    # -- description --------------------------------------------------------

    def full_options(self) -> Dict[str, Any]:
        """The options as QEMU's ``json:`` filenames show them (children inline)."""
        opts: Dict[str, Any] = {}
        for key, value in self.options.items():
            if key in ("node-name",) or key in self.children:
                continue
            opts[key] = value
        for role, edge in self.children.items():
            opts[role] = edge.node.full_options()
        return opts

    def json_filename(self) -> str:
        """QEMU's ``json:{...}`` description of the node."""
        return "json:" + json.dumps(self.full_options())

    def filename(self) -> str:
        """``bs->filename``: a path for file-based nodes, else ``json:{...}``."""
        return self.driver.filename()

    def backing_chain_depth(self) -> int:
        """Length of the backing chain below this node."""
        depth, node = 0, self.backing
        while node is not None:
            depth += 1
            node = node.backing
        return depth

    def __repr__(self) -> str:
        return "<Node %s (%s)>" % (self.name, getattr(self, "drv_name", "?"))
