# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Output writers (raw sparse file, qcow2 through blockd's qcow2 driver) and
a local image reader (raw or qcow2 with its backing chain) for verify/resume.

The qcow2 writer plays the part of ``qemu-img convert -O qcow2``'s target
(QEMU's ``convert_do_copy`` / ``convert_co_write``): data written with
``pwrite``, zero ranges of an overlay written as zero clusters
(``pwrite_zeroes``), plain holes left unallocated.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Dict, Optional

from .errors import CopyError

_ZERO64K = bytes(65536)


def _is_zero(piece: memoryview) -> bool:
    """Whether a piece (<= 64 KiB) is all zero (a ``memcmp`` of the view, no copy)."""
    return _ZERO64K.startswith(piece)


def _dest_error(exc: OSError, path: str) -> CopyError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CopyError("dest", "destination full writing %s: %s" % (path, os.strerror(exc.errno)))
    return CopyError("dest", "cannot write %s: %s" % (path, exc.strerror or exc))


def _graph() -> Any:
    from .. import drivers
    from ..graph.graph import Graph
    return Graph(drivers.lookup)


def _pieces(buf: Any, piece: int = 65536):
    """Split ``buf`` into maximal runs of all-zero and of data ``piece``-sized pieces.

    :return: an iterator of ``(start, end, zero)``.
    """
    mv = memoryview(buf)
    n = len(mv)
    start, kind = 0, None
    for i in range(0, n, piece):
        zero = _is_zero(mv[i:i + piece])
        if kind is not None and zero != kind:
            yield start, i, kind
            start = i
        kind = zero
    if kind is not None:
        yield start, n, kind


class RawOutput:
    """A sparse raw file of the export size; all-zero 64 KiB pieces are not written."""

    fmt = "raw"

    def __init__(self, path: str, size: int, create: bool) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
            if create:
                os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _dest_error(exc, path) from None

    def write(self, offset: int, buf: Any) -> None:
        """Write ``buf`` at ``offset`` skipping all-zero 64 KiB pieces (holes stay holes)."""
        mv = memoryview(buf)
        try:
            for start, end, zero in _pieces(mv):
                if not zero:
                    os.pwrite(self.fd, mv[start:end], offset + start)
        except OSError as exc:
            raise _dest_error(exc, self.path) from None

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to do: the file was created sparse (zero)."""

    def read(self, offset: int, length: int) -> bytes:
        """Read back what was written (resume checks)."""
        return os.pread(self.fd, length, offset)

    def flush(self) -> None:
        """fdatasync the file."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise _dest_error(exc, self.path) from None

    def close(self) -> None:
        """Close the file."""
        os.close(self.fd)


class Qcow2Output:
    """A qcow2 image written through blockd's qcow2 driver.

    :param backing: backing file name for an incremental overlay (recorded in
        the header with ``backing_fmt``; not opened while writing).
    """

    fmt = "qcow2"

    def __init__(self, path: str, size: int, create: bool, backing: Optional[str] = None,
                 backing_fmt: Optional[str] = None) -> None:
        from ..drivers.qcow2.create import create_qcow2
        from ..errors import QMPError
        self.path = path
        self.overlay = backing is not None
        self.graph = _graph()
        try:
            if create:
                create_qcow2(path, size, backing_file=backing, backing_fmt=backing_fmt)
            opts: Dict[str, Any] = {"driver": "qcow2", "node-name": "out",
                                    "file": {"driver": "file", "filename": path}}
            if not self.overlay:
                opts["backing"] = None
            # An overlay opens its backing chain: zero writes must then
            # allocate zero clusters instead of letting the base show through.
            self.node = self.graph.open(opts)
        except OSError as exc:
            raise _dest_error(exc, path) from None
        except QMPError as exc:
            msg = str(exc)
            if "No space" in msg:
                raise CopyError("dest", "destination full writing %s: %s" % (path, msg)) from None
            raise CopyError("dest", "cannot create/open %s: %s" % (path, msg)) from None

    def write(self, offset: int, buf: Any) -> None:
        """Write data; all-zero 64 KiB pieces become holes (or zero clusters in an overlay)."""
        mv = memoryview(buf)
        try:
            for start, end, zero in _pieces(mv):
                if not zero:
                    self.node.pwrite(offset + start, mv[start:end])
                elif self.overlay:
                    self.node.pwrite_zeroes(offset + start, end - start)
        except OSError as exc:
            raise _dest_error(exc, self.path) from None

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero clusters over the range in an overlay (hide the base); nothing otherwise."""
        if self.overlay:
            try:
                self.node.pwrite_zeroes(offset, length)
            except OSError as exc:
                raise _dest_error(exc, self.path) from None

    def read(self, offset: int, length: int) -> bytes:
        """Read back what was written (resume checks)."""
        return self.node.pread(offset, length)

    def flush(self) -> None:
        """Write the qcow2 metadata back and fdatasync."""
        try:
            self.node.flush()
        except OSError as exc:
            raise _dest_error(exc, self.path) from None

    def close(self) -> None:
        """Close the image (metadata written back, dirty bit cleared)."""
        try:
            self.graph.close_all()
        except OSError as exc:
            raise _dest_error(exc, self.path) from None


class NullOutput:
    """Writes nothing (hash-only passes: :func:`verify_against`)."""

    fmt = "null"

    def write(self, offset: int, buf: Any) -> None:
        """Discard."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Discard."""

    def flush(self) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""


def detect_format(path: str) -> str:
    """``qcow2`` if the file starts with the qcow2 magic, else ``raw``."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


class LocalImage:
    """Read-only view of a local image (qcow2 with its backing chain, or raw)."""

    def __init__(self, path: str, fmt: Optional[str] = None, what: str = "image") -> None:
        from ..errors import QMPError
        if not os.path.exists(path):
            raise CopyError("base" if what == "base" else "verify", "%s %s is missing"
                            % (what, path))
        self.fmt = fmt or detect_format(path)
        self.graph = _graph()
        opts = {"driver": self.fmt, "node-name": "img", "read-only": True,
                "file": {"driver": "file", "filename": path, "read-only": True}}
        try:
            self.node = self.graph.open(opts)
        except (QMPError, OSError) as exc:
            self.graph.close_all()
            raise CopyError("base" if what == "base" else "verify",
                            "cannot open %s %s: %s" % (what, path, exc)) from None
        self.size = self.node.getlength()

    def is_zero(self, offset: int, length: int) -> bool:
        """Whether block status says the whole range reads as zeroes."""
        from ..graph.io import BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO
        end = offset + length
        while offset < end:
            n, flags, depth = self.node.block_status(offset, end - offset)
            if not flags & BDRV_BLOCK_ZERO and (flags & BDRV_BLOCK_DATA or depth != -1):
                return False
            offset += n
        return True

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes."""
        return self.node.pread(offset, length)

    def close(self) -> None:
        """Close the graph."""
        self.graph.close_all()
