# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Constants of the data path shared by drivers, backends and the NBD server.

Request flags (the ``flags`` argument of write-like calls), named as in QEMU:

* ``REQ_FUA`` -- the data must be on stable storage before the call returns;
* ``REQ_MAY_UNMAP`` -- a write-zeroes may deallocate (punch a hole);
* ``REQ_NO_FALLBACK`` -- a write-zeroes must fail with ``ENOTSUP`` rather than
  fall back to writing zero buffers (NBD's FAST_ZERO).

Block status flags (what :meth:`Driver.block_status` returns), as in QEMU:

* ``BDRV_BLOCK_DATA`` -- the range is backed by data (not a hole);
* ``BDRV_BLOCK_ZERO`` -- the range reads as zeroes;
* ``BDRV_BLOCK_ALLOCATED`` -- the range is allocated in this layer (as opposed
  to coming from a backing node).

Read segments (what :meth:`Driver.read_segments` returns) let the NBD server
send file data with ``os.sendfile`` without copying it through Python:

* ``(SEG_FD, fd, file_offset, length)`` -- bytes of an open file.  ``sendfile``
  queues page-cache pages, not copies: a write that lands before the client
  has read the reply can show through.  Harmless for plain exports (the NBD
  spec leaves overlapping requests undefined), wrong for a point-in-time view:
  snapshot reads that fall through to a live source must return ``SEG_DATA``
  (or the export must run with ``zero_copy=False``);
* ``(SEG_ZERO, length)`` -- zeroes (may be sent as an NBD hole);
* ``(SEG_DATA, buffer)`` -- bytes already in memory.
"""

REQ_FUA = 0x10
REQ_MAY_UNMAP = 0x04
REQ_NO_FALLBACK = 0x100

BDRV_BLOCK_DATA = 0x01
BDRV_BLOCK_ZERO = 0x02
BDRV_BLOCK_ALLOCATED = 0x10

SEG_FD = 0
SEG_ZERO = 1
SEG_DATA = 2
