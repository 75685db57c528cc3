# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The op-blocker matrix, kept as data (seeds 000 and 004).

Each *role* a node can hold in the graph forbids a set of operations on it.
Commands that change the graph name the operation they perform
(:data:`COMMAND_OPS`) and call :func:`check` on every node they touch; the
first blocking role wins and is reported as QEMU reports it::

    Node 'src' is busy: node is used as backing hd of 'ovl'

A node's roles are derived from the graph, never stored separately: its parent
edges (``backing`` of X) and the users registered on it (jobs).
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterator, List, Tuple

from ..errors import QMPError

#: QEMU's BlockOpType (include/block/block-common.h, 7.2).
OPS: Tuple[str, ...] = (
    "backup-source", "backup-target", "change", "commit-source", "commit-target",
    "dataplane", "drive-del", "eject", "external-snapshot", "internal-snapshot",
    "internal-snapshot-delete", "mirror-source", "mirror-target", "resize",
    "stream", "replace",
)

ALL: FrozenSet[str] = frozenset(OPS)

#: role -> (operations it blocks, reason template).  Templates may use
#: ``{parent}`` (the parent node's name) and ``{user}`` (the user's description).
MATRIX: Dict[str, Tuple[FrozenSet[str], str]] = {
    # bdrv_backing_attach: everything but what fleecing and chain jobs need.
    "backing": (ALL - {"commit-target", "stream", "backup-source", "backup-target"},
                "node is used as backing hd of '{parent}'"),
    # block_job_add_bdrv: a job's nodes are blocked for everything but dataplane.
    "job": (ALL - {"dataplane"}, "block device is in use by block job: {user}"),
}

#: Graph-changing QMP command -> the operation it performs on the nodes it
#: names.  A command that changes the graph and is missing here fails the
#: test that enumerates the schema.  ``None`` marks commands that change the
#: graph only by adding new nodes (nothing existing is put at risk beyond
#: what permissions check).
COMMAND_OPS: Dict[str, "str | None"] = {
    "blockdev-add": None,
    "blockdev-del": "drive-del",
    "block-export-add": None,
    "block-export-del": None,
    "nbd-server-add": None,
    "nbd-server-remove": None,
    "nbd-server-start": None,
    "nbd-server-stop": None,
    # blockdev-create opens (or names) a node to format; QEMU checks no op blocker.
    "blockdev-create": None,
    "block_resize": "resize",
    # Job verbs: what a job changes in the graph when it ends (a backup
    # dropping its filter) is the job's own business, done drained; QEMU
    # checks no op blocker for them.
    "job-pause": None,
    "job-resume": None,
    "job-cancel": None,
    "job-complete": None,
    "job-finalize": None,
    "job-dismiss": None,
}


#: Commands that never change the graph (queries and monitor control).
NON_GRAPH_COMMANDS = frozenset({
    "qmp_capabilities", "query-version", "query-commands", "quit",
    "query-named-block-nodes", "query-block-exports", "query-jobs",
})


def roles(node) -> Iterator[Tuple[str, Dict[str, str]]]:
    """The roles ``node`` holds, with the values for the reason template."""
    for edge in node.parents:
        if edge.role in MATRIX:
            yield edge.role, {"parent": edge.parent.name}
    for user in getattr(node, "users", ()):
        yield user.role, {"user": user.description}


def blocking(node, op: str) -> List[str]:
    """Every reason why ``op`` is blocked on ``node`` (empty when allowed)."""
    if op not in ALL:
        raise ValueError("unknown block operation %r" % op)
    reasons = []
    for role, values in roles(node):
        ops, template = MATRIX[role]
        if op in ops:
            reasons.append(template.format(**values))
    return reasons


def check(node, op: str) -> None:
    """Raise QEMU's "is busy" error if ``op`` is blocked on ``node``."""
    reasons = blocking(node, op)
    if reasons:
        raise QMPError("Node '%s' is busy: %s" % (node.name, reasons[0]))
