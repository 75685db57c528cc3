# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backends: the attachment through which a user does I/O on a node.

A :class:`Backend` is QEMU's BlockBackend: an NBD export (and later a job)
holds one, never a node directly.  The backend's :attr:`Backend.root` may be
moved to another node while I/O runs (a filter inserted above the root); every
request reads ``root`` once, inside the I/O gate, so it sees either the old or
the new graph and never a half-changed one.

The gate (:class:`IOGate`) is the drain mechanism: a graph change that must
not race with I/O runs inside :meth:`IOGate.drained`, which stops new requests
from entering and waits for those in flight to leave.  Requests that were
stopped continue, on the new graph, when the change is done.
"""

from __future__ import annotations

import errno
import threading
from contextlib import contextmanager
from typing import Any, FrozenSet, Iterator, Optional


class IOGate:
    """Counts requests in flight and lets graph changes drain them."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inflight = 0
        self._quiesce = 0
        self._drainer: Optional[int] = None

    def enter(self) -> None:
        """Called by a request before it reads the graph."""
        with self._cond:
            while self._quiesce and self._drainer != threading.get_ident():
                self._cond.wait()
            self._inflight += 1

    def leave(self) -> None:
        """Called by a request when it is done with the graph."""
        with self._cond:
            self._inflight -= 1
            if self._quiesce and not self._inflight:
                self._cond.notify_all()

    @contextmanager
    def drained(self) -> Iterator[None]:
        """Run the body with no request in flight and none entering.

        Nested use (a drained section calling another) is allowed.
        """
        me = threading.get_ident()
        with self._cond:
            if self._drainer == me:
                self._quiesce += 1
                nested = True
            else:
                while self._quiesce:
                    self._cond.wait()
                self._quiesce += 1
                self._drainer = me
                nested = False
                while self._inflight:
                    self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._quiesce -= 1
                if not nested:
                    self._drainer = None
                self._cond.notify_all()

    @property
    def draining(self) -> bool:
        """True while a drained section waits for, or holds, the gate."""
        return self._quiesce > 0

    @property
    def inflight(self) -> int:
        """Requests currently inside the gate."""
        return self._inflight


class Backend:
    """A user's attachment to a root node.

    :param graph: the graph (its :attr:`Graph.gate` is used for I/O).
    :param root: the node the user does I/O on.
    :param writable: whether the user writes (checked against the node).
    :param description: how errors name the user ("NBD export 'x'").
    :param shared: the permissions (:data:`blockd.graph.perms.PERMS`) the
        user lets other users of the node have; all by default (NBD exports
        withhold ``resize``).
    :param perm_user: how permission errors name the user (QEMU: "an
        unnamed block device" for exports).
    """

    def __init__(self, graph: Any, root: Any, writable: bool, description: str,
                 shared: "FrozenSet[str] | None" = None,
                 perm_user: str = "an unnamed block device") -> None:
        from .perms import ALL
        self.graph = graph
        self.gate: IOGate = graph.gate
        self.writable = writable
        self.description = description
        self.shared: FrozenSet[str] = ALL if shared is None else frozenset(shared)
        self.perm_user = perm_user
        self.root = root
        root.backends.append(self)

    def detach(self) -> None:
        """Drop the reference on the root node."""
        if self.root is not None:
            self.root.backends.remove(self)
            self.root = None

    def move_to(self, node: Any) -> None:
        """Point the backend at another node (caller drains)."""
        self.root.backends.remove(self)
        node.backends.append(self)
        self.root = node

    # -- I/O with bounds checks, for users other than the NBD fast path ------

    def _check(self, offset: int, length: int) -> Any:
        root = self.root
        if root is None:
            raise OSError(errno.ENOMEDIUM, "No medium")
        if offset < 0 or length < 0 or offset + length > root.getlength():
            raise OSError(errno.EINVAL, "Request out of bounds")
        return root

    def pread(self, offset: int, length: int) -> bytes:
        """Read through the gate."""
        self.gate.enter()
        try:
            return self._check(offset, length).pread(offset, length)
        finally:
            self.gate.leave()

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        """Write through the gate."""
        if not self.writable:
            raise OSError(errno.EPERM, "Backend is read-only")
        self.gate.enter()
        try:
            self._check(offset, len(data)).pwrite(offset, data, flags)
        finally:
            self.gate.leave()

    def getlength(self) -> int:
        """The root node's size."""
        return self.root.getlength()
