# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``null-co`` / ``null-aio``: a device that stores nothing (QEMU's block/null.c)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from ..graph.io import BDRV_BLOCK_ZERO, SEG_ZERO
from .base import Driver

#: QEMU's default size for null drivers: 1 GiB.
DEFAULT_SIZE = 1 << 30


class NullDriver(Driver):
    """Reads return zeroes, writes are dropped.

    QEMU leaves the read buffer untouched unless ``read-zeroes`` is set; a
    Python buffer has no "untouched" contents, so blockd always returns zeroes,
    and reports the range as a hole (plus zero with ``read-zeroes``) exactly as
    QEMU's block status does.
    """

    format_name = "null-co"
    is_protocol = True

    def open(self, options: Dict[str, Any]) -> None:
        self.format_name = options["driver"]
        self.size = int(options.get("size", DEFAULT_SIZE))
        self.read_zeroes = bool(options.get("read-zeroes", False))
        self.latency_ns = int(options.get("latency-ns", 0))

    def getlength(self) -> int:
        return self.size

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def read_segments(self, offset: int, length: int) -> List[tuple]:
        return [(SEG_ZERO, length)]

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        return None

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        return None

    def block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        return length, (BDRV_BLOCK_ZERO if self.read_zeroes else 0), 0

    def actual_size(self) -> int:
        return 0
