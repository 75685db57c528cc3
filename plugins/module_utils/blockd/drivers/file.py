# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``file``: a POSIX file or block device (QEMU's block/file-posix.c).

I/O is plain positional system calls, which release the GIL: ``pread`` and
``pwrite`` for data, ``lseek(SEEK_DATA/SEEK_HOLE)`` for block status,
``fallocate`` for write-zeroes and discard.  Reads are also offered as file
segments so the NBD server can ``sendfile`` them without a copy.

``cache.direct=on`` opens with ``O_DIRECT``; requests are then bounced through
page-aligned buffers.  ``aio`` is accepted for compatibility: every mode runs
on the calling thread (the "threads" model).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from typing import Any, Dict, List, Optional, Tuple

from ..errors import QMPError
from ..graph.io import (BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO,
                        REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK, SEG_FD)
from .base import Driver

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc: Optional[Any] = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) through ctypes (the stdlib only has posix_fallocate)."""
    global _libc
    import ctypes  # here: ctypes (with subprocess, tempfile) costs 3-5 ms of every start-up
    if _libc is None:
        import ctypes.util
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: Alignment used for O_DIRECT bounce buffers.
DIRECT_ALIGN = 4096


class FileDriver(Driver):
    """A host file as a protocol node."""

    format_name = "file"
    is_protocol = True

    def open(self, options: Dict[str, Any]) -> None:
        self.path = options["filename"]
        self.read_only = self.node.read_only
        self.direct = bool(options.get("cache", {}).get("direct", False))
        self.no_flush = bool(options.get("cache", {}).get("no-flush", False))
        self.discard_unmap = bool(getattr(self.node, "unmap", False))
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        if self.direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            raise QMPError("Could not open '%s': %s" % (self.path, os.strerror(exc.errno))) from None
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise QMPError("Could not open '%s': Is a directory" % self.path)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._seek_data = True
        self._rmw_lock = threading.Lock()
        if self.direct:
            self.read_segments = self._direct_segments
            self.pread = self._direct_pread
            self.pwrite = self._direct_pwrite

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def getlength(self) -> int:
        return self.size

    # -- reads ------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data = self._read_rest(data, offset, length)
        return data

    def _read_rest(self, data: bytes, offset: int, length: int) -> bytes:
        """Finish a short read (EOF inside the image reads as zeroes)."""
        parts = [data]
        done = len(data)
        while done < length:
            more = os.pread(self.fd, length - done, offset + done)
            if not more:
                parts.append(bytes(length - done))
                break
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    def read_segments(self, offset: int, length: int) -> List[tuple]:
        return [(SEG_FD, self.fd, offset, length)]

    def _aligned(self, offset: int, length: int) -> Tuple[int, int]:
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        return start, end - start

    def _direct_read_buf(self, start: int, span: int) -> mmap.mmap:
        buf = mmap.mmap(-1, span)
        done = os.preadv(self.fd, [buf], start)
        if done < span:
            buf[done:span] = bytes(span - done)
        return buf

    def _direct_pread(self, offset: int, length: int) -> bytes:
        start, span = self._aligned(offset, length)
        buf = self._direct_read_buf(start, span)
        try:
            return bytes(buf[offset - start:offset - start + length])
        finally:
            buf.close()

    def _direct_segments(self, offset: int, length: int) -> List[tuple]:
        from ..graph.io import SEG_DATA
        return [(SEG_DATA, self._direct_pread(offset, length))]

    # -- writes -----------------------------------------------------------

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        if offset > self.size:  # a format driver growing its image file
            self.size = offset
        if flags & REQ_FUA:
            self.flush()

    def _direct_pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        length = len(data)
        start, span = self._aligned(offset, length)
        with self._rmw_lock:
            if start == offset and span == length:
                buf = mmap.mmap(-1, span)
                buf[:] = bytes(data)
            else:
                buf = self._direct_read_buf(start, span)
                buf[offset - start:offset - start + length] = bytes(data)
            try:
                done = 0
                while done < span:
                    done += os.pwritev(self.fd, [memoryview(buf)[done:]], start + done)
            finally:
                buf.close()
        if flags & REQ_FUA:
            self.flush()

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Read-only file")
        if not self.is_blockdev:
            # MAY_UNMAP reaching the file means punch (file-posix); parents
            # without BDRV_O_UNMAP have already dropped it
            if flags & REQ_MAY_UNMAP:
                try:
                    _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                    return self._after_write(flags)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
            try:
                _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return self._after_write(flags)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if flags & REQ_NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "Fast zeroing not supported")
        super().pwrite_zeroes(offset, length, flags)

    def _after_write(self, flags: int) -> None:
        if flags & REQ_FUA:
            self.flush()

    def pdiscard(self, offset: int, length: int) -> None:
        if not self.discard_unmap or self.read_only or self.is_blockdev:
            return
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def flush(self) -> None:
        if not self.no_flush and not self.read_only:
            os.fdatasync(self.fd)

    # -- metadata ---------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        data_flags = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED
        if not self._seek_data or self.is_blockdev:
            return length, data_flags, 0
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to EOF
                return length, BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED, 0
            if exc.errno in (errno.EINVAL, errno.ENOTSUP):
                self._seek_data = False
                return length, data_flags, 0
            raise
        if data > offset:
            return min(length, data - offset), BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED, 0
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return max(1, min(length, hole - offset)), data_flags, 0

    def truncate(self, size: int) -> None:
        if self.is_blockdev:
            raise OSError(errno.ENOTSUP, "Cannot resize a block device")
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise OSError(exc.errno, "Could not resize file: %s"
                          % os.strerror(exc.errno or errno.EIO)) from None
        self.size = size

    def filename(self) -> str:
        return self.path

    def actual_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512
