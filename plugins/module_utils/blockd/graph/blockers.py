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

#: Graph-changing QMP command -> {argument naming a node: the operation the
#: command performs on that node}.  A command missing here (and from
#: :data:`NON_GRAPH_COMMANDS`) fails the test that enumerates the schema, and
#: every operation listed is exercised against a blocked node by
#: ``tests/integration/blockd/test_blockers.py`` on qsd and blockd alike.
#: ``None`` marks commands that change the graph only by adding new nodes or
#: objects, or whose effect on existing nodes QEMU guards with permissions and
#: reference counts instead of op blockers (exports, jobs ending, bitmaps).
COMMAND_OPS: Dict[str, "Dict[str, str] | None"] = {
    "blockdev-add": None,
    "blockdev-del": {"node-name": "drive-del"},
    "block-export-add": None,
    "block-export-del": None,
    "nbd-server-add": None,
    "nbd-server-remove": None,
    "nbd-server-start": None,
    "nbd-server-stop": None,
    # blockdev-create opens (or names) a node to format; QEMU checks no op blocker.
    "blockdev-create": None,
    "block_resize": {"node-name": "resize"},
    "blockdev-backup": {"device": "backup-source", "target": "backup-target"},
    "blockdev-snapshot-sync": {"node-name": "external-snapshot"},
    "blockdev-snapshot": {"node": "external-snapshot"},
    # Each action is checked as the command of the same name.
    "transaction": None,
    # Dirty bitmaps are guarded by their own busy/readonly states, not op blockers.
    "block-dirty-bitmap-add": None,
    "block-dirty-bitmap-remove": None,
    "block-dirty-bitmap-clear": None,
    "block-dirty-bitmap-enable": None,
    "block-dirty-bitmap-disable": None,
    "block-dirty-bitmap-merge": None,
    # QOM objects: a throttle group in use cannot be deleted (its own check).
    "object-add": None,
    "object-del": None,
    "qom-set": None,
    # Job verbs: what a job changes in the graph when it ends (a backup
    # dropping its filter) is the job's own business, done drained; QEMU
    # checks no op blocker for them.
    "job-pause": None,
    "job-resume": None,
    "job-cancel": None,
    "job-complete": None,
    "job-finalize": None,
    "job-dismiss": None,
    "block-job-set-speed": None,
    "block-job-cancel": None,
    "block-job-pause": None,
    "block-job-resume": None,
    "block-job-complete": None,
    "block-job-dismiss": None,
    "block-job-finalize": None,
}


#: Commands that never change the graph (queries and monitor control).
NON_GRAPH_COMMANDS = frozenset({
    "qmp_capabilities", "query-version", "query-commands", "quit",
    "query-named-block-nodes", "query-block-exports", "query-jobs", "query-block-jobs",
    "qom-get", "qom-list",
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
