# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The driver interface every block driver implements.

A driver instance belongs to exactly one :class:`~blockd.graph.node.Node`.
All I/O methods are synchronous and may be called from many threads at once
(one per NBD connection, later job workers); a driver protects its own
metadata.  Errors are raised as :class:`OSError` with an ``errno``: the NBD
server turns them into NBD error codes, jobs into their error policies.

Offsets and lengths are validated by the caller (the backend or the parent
driver) against :meth:`getlength`; drivers may assume ``0 <= offset`` and
``offset + length <= getlength()``.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from ..graph.io import BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, REQ_NO_FALLBACK, SEG_DATA

#: A run of zeroes written in pieces by the generic write-zeroes fallback.
_ZERO_CHUNK = bytes(1 << 20)


class Driver:
    """Base class of block drivers.

    Subclasses set :attr:`format_name` and :attr:`child_roles`, and implement
    :meth:`open`, :meth:`getlength`, :meth:`pread` and, unless read-only,
    :meth:`pwrite`.  The defaults of the other methods are correct but slow.
    """

    #: The ``driver`` value in blockdev-add.
    format_name: ClassVar[str] = ""
    #: Child references this driver takes: role -> required?  Every role is
    #: a BlockdevRef option of the same name (``file``, ``backing``, ...).
    child_roles: ClassVar[Dict[str, bool]] = {}
    #: A filter passes I/O through to one child (copy-before-write, throttle).
    is_filter: ClassVar[bool] = False
    #: Whether the driver stores data itself (a protocol) or formats a child.
    is_protocol: ClassVar[bool] = False

    def __init__(self, node: Any) -> None:
        self.node = node

    # -- life cycle -----------------------------------------------------

    def open(self, options: Dict[str, Any]) -> None:
        """Open with the blockdev-add options; raise QMPError on failure."""

    def close(self) -> None:
        """Release resources; the node is going away."""

    # -- I/O --------------------------------------------------------------

    def getlength(self) -> int:
        """The size in bytes."""
        raise NotImplementedError

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        raise NotImplementedError

    def read_segments(self, offset: int, length: int) -> List[tuple]:
        """The range as segments (see :mod:`blockd.graph.io`).

        The default copies through :meth:`pread`; drivers over files override
        it so the NBD server can ``sendfile``.
        """
        return [(SEG_DATA, self.pread(offset, length))]

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        """Write the bytes-like ``data`` at ``offset``."""
        raise OSError(errno.EROFS, "Read-only driver")

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        """Make the range read as zeroes; may unmap with ``REQ_MAY_UNMAP``."""
        if flags & REQ_NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "Fast zeroing not supported")
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.pwrite(offset, memoryview(_ZERO_CHUNK)[:n], flags)
            offset += n

    def pdiscard(self, offset: int, length: int) -> None:
        """Discard hint; the default does nothing (always allowed)."""

    def flush(self) -> None:
        """Make completed writes durable."""

    def block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        """Status of the range starting at ``offset``.

        :return: ``(n, flags, depth)``: the first ``n`` bytes (``0 < n <=
            length``) share ``flags`` (``BDRV_BLOCK_*``); ``depth`` is the
            number of backing layers below this node the data comes from
            (0 = this node), or -1 when the range is unallocated everywhere.
        """
        return length, BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, 0

    def truncate(self, size: int) -> None:
        """Resize (block_resize); the caller drains I/O around the call.

        :raise OSError: whose ``strerror`` is QEMU's text for the failure.
        """
        raise OSError(errno.ENOTSUP, "Image format driver does not support resize")

    def child_perm_role(self, role: str) -> str:
        """How the edge to the ``role`` child shares permissions (see :mod:`blockd.graph.perms`).

        :return: ``filtered`` (passes on what this node's users share),
            ``data`` (the same minus resize), ``storage`` (minus write and
            resize: a format's metadata file) or ``cow`` (a backing child).
        """
        if role == "backing":
            return "cow"
        if self.is_filter:
            return "filtered"
        return "storage"

    # -- description ----------------------------------------------------

    def filename(self) -> str:
        """What QEMU calls ``bs->filename``: a path, or ``json:{...}``."""
        return self.node.json_filename()

    def actual_size(self) -> Optional[int]:
        """Bytes allocated on the host, where known."""
        return None

    def image_info(self) -> Dict[str, Any]:
        """Extra members of ImageInfo (``cluster-size``, ``format-specific``)."""
        return {}

    def cluster_size(self) -> Optional[int]:
        """The allocation unit, if the driver has one."""
        return None
