# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``raw``: the raw format over a ``file`` child, with an optional window."""

from __future__ import annotations

import errno
from typing import Any, Dict, List, Tuple

from ..errors import QMPError
from ..graph.io import BDRV_BLOCK_ALLOCATED, REQ_MAY_UNMAP
from .base import Driver


class RawDriver(Driver):
    """Passes I/O to ``file``, shifted by ``offset`` and limited to ``size``."""

    format_name = "raw"
    child_roles = {"file": True}

    def open(self, options: Dict[str, Any]) -> None:
        self.child = self.node.file
        self.offset = int(options.get("offset", 0))
        file_size = self.child.getlength()
        has_size = "size" in options
        size = int(options["size"]) if has_size else None
        if self.offset > file_size:
            raise QMPError("Offset (%d) cannot be greater than size of the containing file (%d)"
                           % (self.offset, file_size))
        if has_size and self.offset + size > file_size:
            raise QMPError("The sum of offset (%d) and size (%d) has to be smaller or equal "
                           "to the  actual size of the containing file (%d)"
                           % (self.offset, size, file_size))
        if has_size and size % 512:
            raise QMPError("Specified size is not multiple of 512")
        self.fixed_size = size
        # Bind the child's methods directly when there is no window: the
        # raw layer then costs nothing on the data path.
        if self.offset == 0:
            self.pread = self.child.pread
            self.read_segments = self.child.read_segments
            self.pwrite = self.child.pwrite
            if self.child.unmap:
                self.pwrite_zeroes = self.child.pwrite_zeroes
            self.pdiscard = self.child.pdiscard
        self.flush = self.child.flush

    def getlength(self) -> int:
        if self.fixed_size is not None:
            return self.fixed_size
        return self.child.getlength() - self.offset

    def pread(self, offset: int, length: int) -> bytes:
        return self.child.pread(offset + self.offset, length)

    def read_segments(self, offset: int, length: int) -> List[tuple]:
        return self.child.read_segments(offset + self.offset, length)

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        self.child.pwrite(offset + self.offset, data, flags)

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        if not self.child.unmap:  # bdrv_co_pwrite_zeroes() on a child without BDRV_O_UNMAP
            flags &= ~REQ_MAY_UNMAP
        self.child.pwrite_zeroes(offset + self.offset, length, flags)

    def pdiscard(self, offset: int, length: int) -> None:
        self.child.pdiscard(offset + self.offset, length)

    def block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        n, flags, depth = self.child.block_status(offset + self.offset, length)
        # raw_co_block_status: the data is this layer's, whatever the file says.
        return n, flags | BDRV_BLOCK_ALLOCATED, 0

    def truncate(self, size: int) -> None:
        """raw_co_truncate: the window's offset is kept, a fixed size refuses."""
        if self.fixed_size is not None:
            raise OSError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
        self.child.driver.truncate(size + self.offset)

    def child_perm_role(self, role: str) -> str:
        """raw_open: a window makes ``file`` a DATA child, else a FILTERED one."""
        if getattr(self, "offset", 0) or getattr(self, "fixed_size", None) is not None:
            return "data"
        return "filtered"

    def filename(self) -> str:
        name = self.child.filename()
        if self.offset or self.fixed_size is not None or name.startswith("json:"):
            return self.node.json_filename()
        return name

    def actual_size(self):
        return self.child.driver.actual_size()
