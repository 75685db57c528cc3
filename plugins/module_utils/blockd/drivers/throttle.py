# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``throttle``: a filter whose I/O is limited by a throttle group (block/throttle.c).

Reads, writes, write-zeroes and discards wait for their turn in the group
(:meth:`blockd.graph.throttle.ThrottleGroup.intercept`, a blocking wait in the
calling thread), then pass through to ``file``; flush and block status pass
through at once.  While the graph is drained the node's limits are lifted, as
QEMU's ``throttle_co_drain_begin()`` does, so a graph change never waits for
the quota.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from ..errors import QMPError
from ..graph.io import BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, SEG_ZERO
from ..graph.throttle import READ, WRITE, ThrottleGroupMember
from .base import Driver


class ThrottleDriver(Driver):
    """A member of a throttle group in front of ``file``."""

    format_name = "throttle"
    child_roles = {"file": True}
    is_filter = True

    def open(self, options: Dict[str, Any]) -> None:
        """throttle_open() / throttle_parse_options()."""
        self.child = self.node.file
        name = options.get("throttle-group")
        if not name:
            raise QMPError("Please specify a throttle group")
        groups = getattr(self.node.graph, "throttle_groups", None) or {}
        obj = groups.get(name)
        if obj is None:
            raise QMPError("Throttle group '%s' does not exist" % name)
        self.group = obj.group
        self.member = ThrottleGroupMember(self.node.name)
        self.group.register(self.member)
        gate = getattr(self.node.graph, "gate", None)
        self._bypass = (lambda: gate.draining) if gate is not None else None
        self.flush = self.child.flush

    def close(self) -> None:
        """throttle_close(): leave the group (object-del may delete it then)."""
        member = getattr(self, "member", None)
        if member is not None and member.group is not None:
            member.group.unregister(member)

    def _limit(self, size: int, is_write: int) -> None:
        """throttle_group_co_io_limits_intercept()."""
        self.group.intercept(self.member, size, is_write, self._bypass)

    # -- I/O ------------------------------------------------------------------

    def getlength(self) -> int:
        return self.child.getlength()

    def pread(self, offset: int, length: int) -> bytes:
        self._limit(length, READ)
        return self.child.pread(offset, length)

    def read_segments(self, offset: int, length: int) -> List[tuple]:
        """A read as the NBD server sends it (nbd_co_send_sparse_read).

        qsd's server asks the node for block status first, sends the ranges
        that read as zeroes as holes without reading them, and reads each
        data range with its own request: only those pass the throttle, each
        counted as one operation.  (A client without structured replies gets
        one throttled read of the whole range from qsd; blockd's server does
        not tell the driver, so such reads are throttled like this too.)
        """
        segs: List[tuple] = []
        pos, end = offset, offset + length
        while pos < end:
            n, flags, depth = self.child.block_status(pos, end - pos)
            n = max(1, min(n, end - pos))
            if flags & BDRV_BLOCK_ZERO or (not flags & BDRV_BLOCK_DATA and depth < 0):
                segs.append((SEG_ZERO, n))
            else:
                self._limit(n, READ)
                segs.extend(self.child.read_segments(pos, n))
            pos += n
        return segs

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        self._limit(len(data), WRITE)
        self.child.pwrite(offset, data, flags)

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self._limit(length, WRITE)
        self.child.pwrite_zeroes(offset, length, flags)

    def pdiscard(self, offset: int, length: int) -> None:
        self._limit(length, WRITE)
        self.child.pdiscard(offset, length)

    def block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        """bdrv_co_block_status_from_file(): the child's status, one layer down."""
        n, flags, depth = self.child.block_status(offset, length)
        return n, flags, depth

    def truncate(self, size: int) -> None:
        """bdrv_co_truncate() of a filter without its own: resize ``file``."""
        self.child.driver.truncate(size)

    def filename(self) -> str:
        """Always ``json:{...}`` (``throttle-group`` is a strong runtime option),
        members in QEMU's QDict order."""
        from ..qmp.qjson import to_json  # here: importing blockd.qmp costs ~75 ms (nbd_copy)
        return "json:" + to_json(self.node.full_options())

    def actual_size(self):
        return self.child.driver.actual_size()
