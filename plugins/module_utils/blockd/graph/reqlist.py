# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Byte ranges in flight, and waiting for overlapping ones (QEMU's block/reqlist.c).

:class:`ReqList` is QEMU's ``BlockReqList``.  It belongs to an owner that
protects it with a :class:`threading.Condition`; every method is called with
that condition's lock held, and waiting releases it (QEMU's
``reqlist_wait_one`` drops the owner's CoMutex while it sleeps).  Removing or
shrinking a request wakes every waiter, which then looks again.

:class:`RangeLock` is a self-contained reader/writer lock on byte ranges:
readers of a range share it, a writer excludes overlapping readers and
writers (QEMU's serialising requests, used for old-style fleecing).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List, Optional


class Req:
    """One range in flight (QEMU's BlockReq).

    :param offset: first byte.
    :param nbytes: length in bytes.
    :param kind: a tag (``"copy"``, ``"read"``...) waiters may filter on.
    """

    __slots__ = ("offset", "bytes", "kind", "active")

    def __init__(self, offset: int, nbytes: int, kind: str = "") -> None:
        self.offset = offset
        self.bytes = nbytes
        self.kind = kind
        self.active = True

    def overlaps(self, offset: int, nbytes: int) -> bool:
        """Whether the request intersects ``[offset, offset + nbytes)``."""
        return self.offset < offset + nbytes and offset < self.offset + self.bytes

    def __repr__(self) -> str:
        return "<Req %s %d+%d>" % (self.kind, self.offset, self.bytes)


class ReqList:
    """Requests in flight on one owner (QEMU's BlockReqList).

    :param cond: the owner's condition; callers hold its lock.
    """

    def __init__(self, cond: Any) -> None:
        self.cond = cond
        self.reqs: List[Req] = []

    def add(self, offset: int, nbytes: int, kind: str = "") -> Req:
        """``reqlist_init_req()``: register a range."""
        req = Req(offset, nbytes, kind)
        self.reqs.append(req)
        return req

    def find_conflict(self, offset: int, nbytes: int,
                      kinds: Optional[Iterable[str]] = None) -> Optional[Req]:
        """``reqlist_find_conflict()``: the first request overlapping the range.

        :param kinds: only requests of these kinds count (all when None).
        """
        wanted = None if kinds is None else frozenset(kinds)
        for req in self.reqs:
            if (wanted is None or req.kind in wanted) and req.overlaps(offset, nbytes):
                return req
        return None

    def wait_one(self, offset: int, nbytes: int,
                 kinds: Optional[Iterable[str]] = None) -> bool:
        """``reqlist_wait_one()``: wait until one overlapping request ends or shrinks away.

        :return: False, without waiting (and without releasing the lock),
            when nothing overlaps; True after a wait.
        """
        req = self.find_conflict(offset, nbytes, kinds)
        if req is None:
            return False
        while req.active and req.overlaps(offset, nbytes):
            self.cond.wait()
        return True

    def wait_all(self, offset: int, nbytes: int,
                 kinds: Optional[Iterable[str]] = None) -> None:
        """``reqlist_wait_all()``: wait until no request overlaps the range."""
        while self.wait_one(offset, nbytes, kinds):
            pass

    def shrink(self, req: Req, nbytes: int) -> None:
        """``reqlist_shrink_req()``: drop the tail of a request; wake waiters."""
        req.bytes = nbytes
        self.cond.notify_all()

    def remove(self, req: Req) -> None:
        """``reqlist_remove_req()``: the request is done; wake waiters."""
        req.active = False
        self.reqs.remove(req)
        self.cond.notify_all()


class RangeLock:
    """A reader/writer lock on byte ranges.

    Readers of overlapping ranges run together; a writer waits for every
    overlapping reader and writer, and holds off new overlapping ones while
    it runs.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.readers = ReqList(self.cond)
        self.writers = ReqList(self.cond)

    @contextmanager
    def held(self, offset: int, nbytes: int, exclusive: bool) -> Iterator[None]:
        """Hold ``[offset, offset + nbytes)`` for reading (shared) or writing (exclusive)."""
        with self.cond:
            if exclusive:
                while (self.writers.find_conflict(offset, nbytes) is not None
                       or self.readers.find_conflict(offset, nbytes) is not None):
                    self.cond.wait()
                req = self.writers.add(offset, nbytes, "write")
                owner = self.writers
            else:
                while self.writers.find_conflict(offset, nbytes) is not None:
                    self.cond.wait()
                req = self.readers.add(offset, nbytes, "read")
                owner = self.readers
        try:
            yield
        finally:
            with self.cond:
                owner.remove(req)
