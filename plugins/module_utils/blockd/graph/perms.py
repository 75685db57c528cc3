# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The part of QEMU's permission system that a new user of a node meets.

QEMU (``block.c``, reference section 4.2) gives every parent of a node --
an edge from another node, or a BlockBackend such as an export -- the
permissions it *uses* and those it *shares* with the other parents.  A new
user whose permissions some existing parent does not share is refused::

    Permission conflict on node 'fq': permissions 'resize' are both required by
    an unnamed block device (uses node 'fq' as 'root' child) and unshared by
    node 'q' (uses node 'fq' as 'file' child).

blockd derives the shared permissions of every edge from the graph, never
storing them: a :class:`~.backend.Backend` states its own
(:attr:`Backend.shared`; NBD exports share everything but ``resize``), and
an edge's depend on the parent driver's :meth:`Driver.child_perm_role`:

* ``filtered`` (raw without a window, filters): passes on what the parent's
  own parents share, as ``bdrv_filter_default_perms``;
* ``data`` (raw with offset/size): the same, minus ``resize``;
* ``storage`` (qcow2's ``file``): the same, minus ``write`` and ``resize``
  (``bdrv_default_perms_for_storage``: nobody may change the metadata);
* ``cow`` (``backing``): ``write`` and ``resize`` only if the parent's
  parents share ``write`` (``bdrv_default_perms_for_cow``).

:func:`check_new_user` checks a user about to be added (block_resize's
temporary BlockBackend, a create job's, later a job's), including what its
permissions become on the children of filter-like nodes.
"""

from __future__ import annotations

from typing import Any, FrozenSet, Iterable, Optional

from ..errors import QMPError

#: QAPI ``BlockPermission``, in QEMU's bit order.
PERMS = ("consistent-read", "write", "write-unchanged", "resize")
ALL: FrozenSet[str] = frozenset(PERMS)
#: ``bdrv_perm_names()``' wording.
_NAMES = {"consistent-read": "consistent read", "write": "write",
          "write-unchanged": "write unchanged", "resize": "resize"}
#: DEFAULT_PERM_UNCHANGED: what a parent always lets others do on its child.
_UNCHANGED: FrozenSet[str] = frozenset({"consistent-read", "write-unchanged"})
#: Permissions a filter-like edge passes down from its parent's users.
_PASSED_DOWN: FrozenSet[str] = frozenset({"write", "resize"})

#: How a backend without its own description appears in errors.
UNNAMED_USER = "an unnamed block device"


def perm_names(perms: Iterable[str]) -> str:
    """QEMU's comma-separated permission names, in bit order."""
    chosen = set(perms)
    return ", ".join(_NAMES[p] for p in PERMS if p in chosen)


def _role(edge: Any) -> str:
    driver = getattr(edge.parent, "driver", None)
    if driver is None:
        return "storage"
    return driver.child_perm_role(edge.role)


def cumulative_shared(node: Any) -> FrozenSet[str]:
    """What every current parent of ``node`` lets others do (``bdrv_get_cumulative_perm``)."""
    shared = ALL
    for backend in node.backends:
        shared &= getattr(backend, "shared", ALL)
    for edge in node.parents:
        shared &= edge_shared(edge)
    return shared


def edge_shared(edge: Any) -> FrozenSet[str]:
    """The permissions the edge ``edge.parent -> edge.node`` shares."""
    role = _role(edge)
    above = cumulative_shared(edge.parent)
    if role == "cow":
        base = frozenset({"write", "resize"}) if "write" in above else frozenset()
        return base | _UNCHANGED
    shared = above | _UNCHANGED
    if role == "data":
        shared -= {"resize"}
    elif role == "storage":
        shared -= {"write", "resize"}
    return shared


def _conflict(node: Any, missing: Iterable[str], user: str, user_role: str,
              other: str, other_role: str) -> QMPError:
    return QMPError("Permission conflict on node '%s': permissions '%s' are both required by "
                    "%s (uses node '%s' as '%s' child) and unshared by %s (uses node '%s' as "
                    "'%s' child)." % (node.name, perm_names(missing), user, node.name, user_role,
                                      other, node.name, other_role))


def check_new_user(node: Any, perm: Iterable[str], user: str = UNNAMED_USER,
                   role: str = "root", _via: Optional[Any] = None) -> None:
    """Refuse a new user of ``node`` whose permissions a parent does not share.

    :param node: the node the user attaches to.
    :param perm: the permissions it needs (``write``, ``resize``...).
    :param user: how QEMU names the user ("an unnamed block device").
    :param role: the child role it uses the node as (``root`` for backends).
    :raise QMPError: QEMU's ``Permission conflict`` text for the newest
        parent that does not share, or ``Block node is read-only``.
    """
    perm = frozenset(perm)
    for backend in reversed(node.backends):
        missing = perm - getattr(backend, "shared", ALL)
        if missing:
            raise _conflict(node, missing, user, role,
                            getattr(backend, "perm_user", UNNAMED_USER), "root")
    for edge in reversed(node.parents):
        if edge is _via:
            continue
        missing = perm - edge_shared(edge)
        if missing:
            raise _conflict(node, missing, user, role, "node '%s'" % edge.parent.name, edge.role)
    if node.read_only and perm & {"write", "write-unchanged"}:
        raise QMPError("Block node is read-only")
    driver = getattr(node, "driver", None)
    if driver is None:
        return
    for child_role, edge in node.children.items():
        if driver.child_perm_role(child_role) not in ("filtered", "data"):
            continue
        down = perm & _PASSED_DOWN
        if down:
            check_new_user(edge.node, down, "node '%s'" % node.name, child_role, _via=edge)
