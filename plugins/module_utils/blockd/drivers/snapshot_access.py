# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``snapshot-access``: the point-in-time view a copy-before-write node keeps (QEMU 7.2
``block/snapshot-access.c``).

Reads, block status and discard go to the ``file`` child's *snapshot API*
(:meth:`CopyBeforeWriteDriver.preadv_snapshot
<blockd.drivers.cbw.CopyBeforeWriteDriver.preadv_snapshot>` and friends).  As
in QEMU any node may be opened as ``file``; I/O then fails with ENOTSUP (a
node without the snapshot API).  Writes always fail with ENOTSUP.
"""

from __future__ import annotations

import errno
from typing import Any, Dict, List, Tuple

from ..graph.io import BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO
from .base import Driver


def _not_supported() -> OSError:
    return OSError(errno.ENOTSUP, "Operation not supported")


class SnapshotAccessDriver(Driver):
    """Read-only access to a copy-before-write node's snapshot."""

    format_name = "snapshot-access"
    child_roles = {"file": True}

    def open(self, options: Dict[str, Any]) -> None:
        """``snapshot_access_open()``: any ``file`` child, its size."""
        self.child = self.node.file

    def _api(self) -> Any:
        """The file's driver if it has the snapshot API, else ENOTSUP."""
        drv = getattr(self.child, "driver", None)
        if drv is None or not hasattr(drv, "preadv_snapshot"):
            raise _not_supported()
        return drv

    def getlength(self) -> int:
        return self.child.getlength()

    def pread(self, offset: int, length: int) -> bytes:
        """``snapshot_access_co_preadv_part()``."""
        segs = self._api().preadv_snapshot(offset, length)
        return _join(segs)

    def read_segments(self, offset: int, length: int) -> List[tuple]:
        return self._api().preadv_snapshot(offset, length)

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        raise _not_supported()

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        raise _not_supported()

    def pdiscard(self, offset: int, length: int) -> None:
        """``snapshot_access_co_pdiscard()``: the snapshot forgets the range."""
        self._api().pdiscard_snapshot(offset, length)

    def block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        """``snapshot_access_co_block_status()``; data or zeroes count as this layer's."""
        n, flags, _where = self._api().snapshot_block_status(offset, length)
        if flags & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO):
            return n, flags | BDRV_BLOCK_ALLOCATED, 0
        return n, flags & ~BDRV_BLOCK_ALLOCATED, -1

    def child_perm_role(self, role: str) -> str:
        """``snapshot_access_child_perm()``: takes nothing, shares everything.

        blockd's ``cow`` role is the closest: a new user's permissions are not
        passed down to ``file``, and write and resize are shared while this
        node's users share write (NBD exports do).
        """
        return "cow"

    def filename(self) -> str:
        """``snapshot_access_refresh_filename()``: the file's filename."""
        return self.child.filename()

    def actual_size(self):
        return self.child.driver.actual_size()


def _join(segs: List[tuple]) -> bytes:
    """The bytes of a segment list (see :mod:`blockd.graph.io`)."""
    import os
    from ..graph.io import SEG_DATA, SEG_FD
    out = bytearray()
    for seg in segs:
        if seg[0] == SEG_DATA:
            out += seg[1]
        elif seg[0] == SEG_FD:
            _kind, fd, off, n = seg
            data = os.pread(fd, n, off)
            out += data
            if len(data) < n:
                out += bytes(n - len(data))
        else:
            out += bytes(seg[1])
    return bytes(out)
