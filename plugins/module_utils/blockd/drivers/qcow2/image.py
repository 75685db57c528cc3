# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The metadata of one open qcow2 image: header, L1, L2 cache, refcounts.

:class:`Qcow2Image` owns the on-disk metadata and the order in which it
reaches the disk (see :meth:`Qcow2Image.flush_metadata`).  The cluster-level
operations (mapping, allocation, zeroing) live in :mod:`.cluster`; the block
driver in :mod:`.driver` splits requests and talks to the backing chain.

Errors while opening are :class:`QMPError`; errors during I/O are
:class:`OSError`.  A metadata inconsistency found during I/O is *fatal* for
the open image (QEMU's qcow2_signal_corruption): the request fails with
``EIO`` and every later write too, and nothing more is written to the file
(blockd does not set the corrupt bit: a damaged image is left byte for byte
as it was found).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from array import array
from typing import Any, Dict, List, Optional

from ...errors import QMPError
from . import header as hdr
from .cluster import ClusterOps
from .l2 import L1E_OFFSET_MASK, CompressedLayout, L2Cache, L2Table, hx
from .refcount import (DISCARD_OTHER, DISCARD_REQUEST, DISCARD_SNAPSHOT, REFT_OFFSET_MASK,
                       Refcounts, table_from_bytes, table_to_bytes)

#: QEMU's default upper bound for the L2 cache (Linux): 32 MiB.
DEFAULT_L2_CACHE_MAX = 32 << 20
#: Deferred frees that trigger an internal metadata flush.
MAX_PENDING_FREES = 4096


def file_length(file: Any) -> int:
    """The current length of the image file.

    The ``file`` driver caches its length at open time and does not follow
    writes past EOF, so ask the descriptor itself when there is one (QEMU's
    raw_getlength seeks to the end every time).

    :param file: the file node.
    :return: bytes.
    """
    fd = getattr(getattr(file, "driver", None), "fd", None)
    if isinstance(fd, int) and fd >= 0:
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            pass
    return file.getlength()


class ImageOptions:
    """Runtime options of an open image (the qcow2 blockdev-add members).

    :param read_only: open without write access.
    :param l2_cache_size: bytes of L2 tables to cache (None: QEMU's default).
    :param refcount_cache_size: bytes of refcount blocks to cache.
    :param overlap_check: refuse writes that would hit metadata.
    :param discard: passthrough per discard kind (``request``, ``snapshot``,
        ``other``): punch holes into the file for clusters that are freed.
    :param creating: image creation: no dirty bit, no bitmap handling.
    """

    def __init__(self, read_only: bool = False, l2_cache_size: Optional[int] = None,
                 refcount_cache_size: Optional[int] = None, overlap_check: bool = True,
                 discard: Optional[Dict[str, bool]] = None, creating: bool = False) -> None:
        """Store the options.

        :param read_only: see the class.
        :param l2_cache_size: see the class.
        :param refcount_cache_size: see the class.
        :param overlap_check: see the class.
        :param discard: see the class.
        :param creating: see the class.
        """
        self.read_only = read_only
        self.l2_cache_size = l2_cache_size
        self.refcount_cache_size = refcount_cache_size
        self.overlap_check = overlap_check
        self.discard = discard or {DISCARD_REQUEST: False, DISCARD_SNAPSHOT: True,
                                   DISCARD_OTHER: False}
        self.creating = creating


class Qcow2Image(ClusterOps):
    """One open qcow2 image on a ``file`` node.

    :param file: the protocol node holding the image.
    :param options: runtime options.
    """

    def __init__(self, file: Any, options: ImageOptions) -> None:
        """Nothing is read before :meth:`open`.

        :param file: see the class.
        :param options: see the class.
        """
        self.file = file
        self.opts = options
        self.read_only = options.read_only
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        #: Set once a metadata inconsistency was found: the reason.
        self.fatal: Optional[str] = None
        self.modifying = False
        #: The dirty bit was set by this session (crash safety), not found.
        self.dirty_by_us = False
        #: Something was written since the last barrier.
        self.unsynced = False
        self._io_epoch = 0
        self._inflight: Dict[int, int] = {}
        self.snapshots: List[hdr.Snapshot] = []
        self.snapshots_size = 0
        self.bitmaps: List[hdr.BitmapEntry] = []

    # -- low-level I/O --------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read image file bytes (past EOF reads as zeroes).

        :param offset: host offset.
        :param length: bytes.
        :return: exactly ``length`` bytes.
        """
        if offset >= self.file_end:
            return bytes(length)
        data = self.file.pread(offset, min(length, self.file_end - offset))
        if len(data) < length:
            data = bytes(data) + bytes(length - len(data))
        return data

    def write(self, offset: int, data: Any) -> None:
        """Write image file bytes (tracks the file's end).

        :param offset: host offset.
        :param data: bytes-like.
        """
        if self.fatal:
            raise OSError(errno.EIO, "qcow2: image is corrupt: %s" % self.fatal)
        self.file.pwrite(offset, data)
        self.unsynced = True
        end = offset + len(data)
        if end > self.file_end:
            self.file_end = end

    def sync(self) -> None:
        """A flush barrier on the file."""
        self.unsynced = False
        self.file.flush()

    def corrupt(self, message: str) -> None:
        """Signal a metadata inconsistency: fatal for this open image.

        :param message: what is wrong.
        :raise OSError: always, ``EIO`` with the message.
        """
        if self.fatal is None:
            self.fatal = message
        raise OSError(errno.EIO, "qcow2: image is corrupt: %s" % message)

    def write_header_field(self, offset: int, data: bytes) -> None:
        """Update header bytes in place (callers sync).

        :param offset: header offset.
        :param data: big-endian bytes.
        """
        self.write(offset, data)

    # -- opening --------------------------------------------------------------

    def open(self) -> None:
        """Read and validate the metadata.

        :raise QMPError: with QEMU's text for what QEMU refuses, and a clear
            text for what blockd refuses (encryption, external data files,
            extended L2 entries, zstd compression, tables past EOF).
        """
        self.file_end = file_length(self.file)
        first = self.read(0, hdr.QEMU_HEADER_LEN)
        bits = struct.unpack_from(">I", first, 20)[0]
        if first[:4] == hdr.MAGIC and hdr.MIN_CLUSTER_BITS <= bits <= hdr.MAX_CLUSTER_BITS:
            first = self.read(0, 1 << bits)
        h = self.header = hdr.Header.parse(first)
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs = 1 << h.cluster_bits
        self.version = h.version
        if h.incompatible_features & hdr.INCOMPAT_CORRUPT and not self.read_only:
            raise QMPError("qcow2: Image is corrupt; cannot be opened read/write")
        if h.crypt_method > 2:
            raise QMPError("Unsupported encryption method %d" % h.crypt_method)
        if h.crypt_method:
            raise QMPError("blockd does not support encrypted qcow2 images")
        if h.has_crypto_ext:
            raise QMPError("CRYPTO header extension only expected with LUKS encryption method")
        if h.incompatible_features & hdr.INCOMPAT_DATA_FILE:
            raise QMPError("blockd does not support qcow2 images with an external data file")
        if h.incompatible_features & hdr.INCOMPAT_EXTL2:
            raise QMPError("blockd does not support qcow2 images with extended L2 entries")
        if h.compression_type != 0:
            raise QMPError("blockd supports only zlib compressed qcow2 images "
                           "(this image uses zstd)")
        self.l2_bits = h.cluster_bits - 3
        self.l2_entries = 1 << self.l2_bits
        self.compressed = CompressedLayout(h.cluster_bits)
        if h.refcount_table_clusters == 0:
            raise QMPError("Image does not contain a reference count table")
        hdr.validate_table(h.refcount_table_offset, h.refcount_table_clusters, cs,
                           hdr.MAX_REFTABLE_SIZE, "Reference count table", cs)
        hdr.validate_table(h.snapshots_offset, h.nb_snapshots, 40, 40 * hdr.MAX_SNAPSHOTS,
                           "Snapshot table", cs)
        hdr.validate_table(h.l1_table_offset, h.l1_size, 8, hdr.MAX_L1_SIZE,
                           "Active L1 table", cs)
        need_l1 = self.size_to_l1(h.size)
        if need_l1 > 0x7FFFFFFF:
            raise QMPError("Image is too big")
        if h.l1_size < need_l1:
            raise QMPError("L1 table is too small")
        if h.l1_size and h.l1_table_offset + h.l1_size * 8 > self.file_end:
            raise QMPError("Active L1 table extends past the end of the image file "
                           "(the image is truncated)")
        rt_bytes = h.refcount_table_clusters * cs
        if h.refcount_table_offset + rt_bytes > self.file_end:
            raise QMPError("Reference count table extends past the end of the image file "
                           "(the image is truncated)")
        self.size = h.size // 512 * 512
        self.l1_size = h.l1_size
        self.l1_offset = h.l1_table_offset
        self.l1 = table_from_bytes(self.read(h.l1_table_offset, h.l1_size * 8)) \
            if h.l1_size else array("Q")
        self.l1_dirty: Dict[int, None] = {}
        self.l2_offsets = {e & L1E_OFFSET_MASK for e in self.l1 if e & L1E_OFFSET_MASK}
        reftable = table_from_bytes(self.read(h.refcount_table_offset, rt_bytes))
        rc_cache = self.opts.refcount_cache_size or max(4 * cs, 256 << 10)
        self.refcounts = Refcounts(self, h.refcount_table_offset, reftable,
                                   h.refcount_order, rc_cache // cs)
        max_l2 = -(-self.size // cs) * 8
        l2_bytes = self.opts.l2_cache_size
        if l2_bytes is None:
            l2_bytes = min(DEFAULT_L2_CACHE_MAX, max(max_l2, 1))
        self.l2cache = L2Cache(max(4, -(-l2_bytes // cs)), self._load_l2, self._write_back_l2)
        if h.nb_snapshots:
            self.snapshots, self.snapshots_size = hdr.parse_snapshots(
                self.read, h.snapshots_offset, h.nb_snapshots, cs, self.file_end)
        if h.bitmaps_ext is not None:
            nb, dsize, doff = h.bitmaps_ext
            if doff + dsize > self.file_end:
                raise QMPError("Bitmap directory extends past the end of the image file")
            self.bitmaps = hdr.parse_bitmap_directory(self.read(doff, dsize), nb, cs, self.size)
        if not self.read_only:
            self._validate_reftable()

    def size_to_l1(self, size: int) -> int:
        """L1 entries needed for a virtual size of ``size`` bytes.

        :param size: virtual size.
        :return: entries.
        """
        shift = self.cluster_bits + self.l2_bits
        return (size + (1 << shift) - 1) >> shift

    def _validate_reftable(self) -> None:
        """Refuse (before anything is written) refcount blocks that are
        misplaced: unaligned, past EOF or on top of other metadata."""
        cs = self.cluster_size
        for ti, entry in enumerate(self.refcounts.table):
            off = entry & REFT_OFFSET_MASK
            if not off:
                continue
            if off & (cs - 1) or entry & ~REFT_OFFSET_MASK:
                raise QMPError("Refcount block %d offset %#x is invalid (refcount table entry "
                               "corrupted)" % (ti, off))
            if off + cs > self.file_end:
                raise QMPError("Refcount block %d at %#x lies past the end of the image file"
                               % (ti, off))
            what = self.overlap(off, cs, ignore_refblocks=True)
            if what:
                raise QMPError("Refcount block %d at %#x overlaps with the %s" % (ti, off, what))

    # -- overlap checks -----------------------------------------------------------

    def overlap(self, offset: int, length: int, ignore_refblocks: bool = False,
                ignore_l2: bool = False) -> Optional[str]:
        """The metadata structure ``[offset, offset+length)`` overlaps, or None.

        :param offset: host offset.
        :param length: bytes.
        :param ignore_refblocks: skip the refcount blocks.
        :param ignore_l2: skip the active L2 tables.
        :return: the structure's name, or None.
        """
        end = offset + length
        cs = self.cluster_size

        def hits(start: int, size: int) -> bool:
            """Whether ``[start, start+size)`` meets the range.

            :param start: host offset.
            :param size: bytes.
            :return: True on overlap.
            """
            return size > 0 and start < end and offset < start + size

        if offset < cs:
            return "qcow2_header"
        if hits(self.l1_offset, self.l1_size * 8):
            return "active L1 table"
        if hits(self.refcounts.table_offset, len(self.refcounts.table) * 8):
            return "refcount table"
        if hits(self.header.snapshots_offset, self.snapshots_size):
            return "snapshot table"
        for sn in self.snapshots:
            if hits(sn.l1_table_offset, sn.l1_size * 8):
                return "inactive L1 table"
        if self.header.bitmaps_ext and hits(self.header.bitmaps_ext[2],
                                            self.header.bitmaps_ext[1]):
            return "bitmap directory"
        first = offset >> self.cluster_bits
        last = (end - 1) >> self.cluster_bits
        rbs = self.refcounts.block_offsets
        for c in range(first, last + 1):
            off = c << self.cluster_bits
            if not ignore_refblocks and off in rbs:
                return "refcount block"
            if not ignore_l2 and off in self.l2_offsets:
                return "active L2 table"
        return None

    def check_data_write(self, offset: int, length: int) -> None:
        """QEMU's pre-write overlap check for a data write.

        :param offset: host offset.
        :param length: bytes.
        """
        if not self.opts.overlap_check:
            return
        what = self.overlap(offset, length)
        if what:
            self.corrupt("Preventing invalid write on metadata (overlaps with %s)" % what)

    def check_new_metadata(self, offset: int, length: int) -> None:
        """Freshly allocated clusters must not hold metadata (refcounts lie).

        :param offset: host offset.
        :param length: bytes.
        """
        what = self.overlap(offset, length)
        if what:
            self.corrupt("Allocation at %#x overlaps with the %s (refcounts are wrong)"
                         % (offset, what))

    # -- L2 tables ------------------------------------------------------------------

    def _load_l2(self, offset: int) -> array:
        """Read an L2 table after checking where it lies.

        :param offset: host offset.
        :return: the entries.
        """
        cs = self.cluster_size
        if offset + cs > self.file_end:
            self.corrupt("L2 table at %#x lies past the end of the image file" % offset)
        what = self.overlap(offset, cs, ignore_l2=True)
        if what:
            self.corrupt("L2 table at %#x overlaps with the %s" % (offset, what))
        return table_from_bytes(self.read(offset, cs))

    def _write_back_l2(self, offset: int, table: L2Table) -> None:
        """Evict a dirty table: refcounts first (with a barrier), then it.

        :param offset: host offset.
        :param table: the table.
        """
        self.refcounts.write_dirty()
        if self.unsynced:
            self.sync()
        self.write(offset, table_to_bytes(table.data))
        table.dirty = False

    def l2_offset(self, l1_index: int) -> int:
        """The validated L2 table offset of an L1 entry (0: none).

        :param l1_index: the L1 index.
        :return: the offset.
        """
        if l1_index >= self.l1_size:
            return 0
        off = self.l1[l1_index] & L1E_OFFSET_MASK
        if off & (self.cluster_size - 1):
            self.corrupt("L2 table offset %s unaligned (L1 index: %s)" % (hx(off), hx(l1_index)))
        return off

    def set_l1(self, l1_index: int, entry: int) -> None:
        """Change an L1 entry in memory (written by the next flush).

        :param l1_index: the L1 index.
        :param entry: the new entry.
        """
        old = self.l1[l1_index] & L1E_OFFSET_MASK
        if old:
            self.l2_offsets.discard(old)
        self.l1[l1_index] = entry
        if entry & L1E_OFFSET_MASK:
            self.l2_offsets.add(entry & L1E_OFFSET_MASK)
        self.l1_dirty[l1_index] = None

    def cluster_freed(self, offset: int) -> None:
        """A cluster's refcount reached 0: forget any table cached there.

        :param offset: host offset.
        """
        self.l2cache.discard(offset)

    def reftable_moved(self, offset: int, clusters: int) -> None:
        """The refcount table now lives at ``offset``.

        :param offset: host offset.
        :param clusters: its size in clusters.
        """
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters

    # -- modification and write-back -------------------------------------------------

    def begin_modify(self) -> None:
        """Prepare the image for its first change in this session.

        Clears unknown autoclear bits (the spec's rule for writers), marks
        the auto (enabled) persistent bitmaps in use since blockd does not
        track them yet, and sets the dirty bit (v3) so that a crash leaves an
        image the next open repairs.
        """
        if self.modifying:
            return
        if self.fatal:
            raise OSError(errno.EIO, "qcow2: image is corrupt: %s" % self.fatal)
        if self.read_only:
            raise OSError(errno.EROFS, "qcow2: image is read-only")
        h = self.header
        if self.opts.creating:
            self.modifying = True
            return
        if h.autoclear_features & ~hdr.AUTOCLEAR_MASK or h.dropped_bitmaps:
            h.autoclear_features &= hdr.AUTOCLEAR_MASK
            h.dropped_bitmaps = False
            self.update_header()
            self.sync()
        self.mark_bitmaps_in_use()
        if self.version >= 3 and not h.incompatible_features & hdr.INCOMPAT_DIRTY:
            self.dirty_by_us = True
            h.incompatible_features |= hdr.INCOMPAT_DIRTY
            self.write_header_field(hdr.OFF_INCOMPAT, struct.pack(">Q", h.incompatible_features))
            self.sync()
        self.modifying = True

    def mark_bitmaps_in_use(self) -> None:
        """Set IN_USE on auto bitmaps: their contents will be stale."""
        if not self.bitmaps or not self.header.bitmaps_ext:
            return
        doff = self.header.bitmaps_ext[2]
        changed = False
        for bm in self.bitmaps:
            if bm.flags & hdr.BME_FLAG_AUTO and not bm.flags & hdr.BME_FLAG_IN_USE:
                bm.flags |= hdr.BME_FLAG_IN_USE
                self.write(doff + bm.dir_pos + 12, struct.pack(">I", bm.flags))
                changed = True
        if changed:
            self.sync()

    def update_header(self) -> None:
        """Rewrite the whole first cluster from :attr:`header` (callers sync)."""
        h = self.header
        h.size = self.size
        h.l1_size = self.l1_size
        h.l1_table_offset = self.l1_offset
        self.write(0, h.serialize())

    def start_unlocked_write(self) -> int:
        """Register a data write that runs without the lock (called locked).

        :return: the epoch to pass to :meth:`end_unlocked_write`.
        """
        epoch = self._io_epoch
        self._inflight[epoch] = self._inflight.get(epoch, 0) + 1
        return epoch

    def end_unlocked_write(self, epoch: int) -> None:
        """The data write registered as ``epoch`` is done.

        :param epoch: what :meth:`start_unlocked_write` returned.
        """
        with self._cond:
            left = self._inflight[epoch] - 1
            if left:
                self._inflight[epoch] = left
            else:
                del self._inflight[epoch]
                self._cond.notify_all()

    def maybe_flush_frees(self) -> None:
        """Apply deferred frees once many are queued (bounds the leak window)."""
        if self.refcounts.pending_clusters > MAX_PENDING_FREES:
            self.flush_metadata()

    def flush_metadata(self) -> None:
        """Write cached metadata in crash-safe order, then apply frees.

        refcount blocks -> barrier -> L2 tables -> barrier -> L1 entries ->
        barrier -> deferred decrements (their clusters become reusable) ->
        refcount blocks.  The caller issues the final barrier.
        """
        if self.fatal:
            raise OSError(errno.EIO, "qcow2: image is corrupt: %s" % self.fatal)
        if not self.modifying:
            return
        rc = self.refcounts
        dirty_l2 = list(self.l2cache.dirty())
        frees = bool(rc.pending)
        rc.write_dirty()
        if self.unsynced and (dirty_l2 or self.l1_dirty or frees):
            self.sync()
        for off, table in dirty_l2:
            self.write(off, table_to_bytes(table.data))
            table.dirty = False
        if self.l1_dirty:
            if dirty_l2:
                self.sync()
            self._write_l1_entries()
        if frees:
            self.sync()
            pending = rc.take_pending()
            self._wait_unlocked_writes()
            freed = rc.apply_frees(pending)
            rc.write_dirty()
            for off, length, kind in freed:
                if self.opts.discard.get(kind):
                    try:
                        self.file.pdiscard(off, length)
                    except OSError:
                        pass

    def _write_l1_entries(self) -> None:
        """Write the changed L1 entries, coalescing neighbours."""
        idx = sorted(self.l1_dirty)
        self.l1_dirty = {}
        start = prev = idx[0]
        for i in idx[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            chunk = array("Q", self.l1[start:prev + 1])
            self.write(self.l1_offset + start * 8, table_to_bytes(chunk))
            if i is not None:
                start = prev = i

    def _wait_unlocked_writes(self) -> None:
        """Wait for data writes that started before now (they may target
        clusters about to be freed)."""
        target = self._io_epoch
        self._io_epoch += 1
        while any(e <= target for e in self._inflight):
            self._cond.wait()

    # -- resize -----------------------------------------------------------------

    def grow_l1(self, new_l1_size: int) -> None:
        """Move the L1 table to a larger copy (QEMU's qcow2_grow_l1_table).

        :param new_l1_size: entries.
        """
        if new_l1_size <= self.l1_size:
            return
        if new_l1_size * 8 > hdr.MAX_L1_SIZE:
            raise OSError(errno.EFBIG, "qcow2: Active L1 table too large")
        cs = self.cluster_size
        self.flush_metadata()
        nbytes = -(-new_l1_size * 8 // cs) * cs
        new_off = self.refcounts.alloc(nbytes)
        self.check_new_metadata(new_off, nbytes)
        new_l1 = array("Q", self.l1)
        new_l1.extend([0] * (new_l1_size - len(new_l1)))
        # Only the table itself is written, as QEMU does: a new image ends
        # right after its L1 table.
        self.write(new_off, table_to_bytes(new_l1))
        self.refcounts.write_dirty()
        self.sync()
        self.write_header_field(hdr.OFF_L1, struct.pack(">IQ", new_l1_size, new_off))
        self.sync()
        old_off, old_size = self.l1_offset, self.l1_size
        self.l1 = new_l1
        self.l1_offset, self.l1_size = new_off, new_l1_size
        self.header.l1_table_offset, self.header.l1_size = new_off, new_l1_size
        if old_size:
            self.refcounts.free(old_off, old_size * 8, DISCARD_OTHER)

    def set_size(self, size: int) -> None:
        """Write the new virtual size to the header (synced).

        :param size: bytes.
        """
        self.write_header_field(hdr.OFF_SIZE, struct.pack(">Q", size))
        self.sync()
        self.size = size
        self.header.size = size

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Write everything back and clear the dirty bit (nothing after a
        fatal error: the image stays as the error found it)."""
        with self.lock:
            if self.fatal:
                self.l2cache.clear()
                self.refcounts.drop_cache()
                return
            if not self.modifying:
                return
            if self._file_closed():
                # The graph closed the file first: nothing can be written
                # any more.  The dirty bit stays set, so the next read/write
                # open repairs whatever leaked.
                if self.l2cache.has_dirty() or self.refcounts.has_dirty() or self.l1_dirty:
                    raise OSError(errno.EIO, "qcow2: the image file was closed before the "
                                  "qcow2 metadata could be written back")
                return
            self.flush_metadata()
            self.sync()
            self.mark_clean()

    def _file_closed(self) -> bool:
        """Whether the ``file`` node was closed under us.

        :return: True if so.
        """
        fd = getattr(getattr(self.file, "driver", None), "fd", None)
        return isinstance(fd, int) and fd < 0

    def mark_clean(self) -> None:
        """Clear the dirty bit once all metadata is on disk."""
        h = self.header
        if h.incompatible_features & hdr.INCOMPAT_DIRTY and not self.read_only:
            h.incompatible_features &= ~hdr.INCOMPAT_DIRTY
            self.write_header_field(hdr.OFF_INCOMPAT, struct.pack(">Q", h.incompatible_features))
            self.sync()
        self.dirty_by_us = False

    # -- description ----------------------------------------------------------------

    def format_specific(self) -> Dict[str, Any]:
        """ImageInfoSpecificQCow2, as QEMU 7.2 fills it.

        :return: the object.
        """
        h = self.header
        if self.version == 2:
            data: Dict[str, Any] = {"compat": "0.10", "compression-type": "zlib",
                                    "refcount-bits": 1 << h.refcount_order}
        else:
            data = {"compat": "1.1", "compression-type": "zlib",
                    "lazy-refcounts": bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)}
            if self.bitmaps:
                data["bitmaps"] = [bm.info() for bm in self.bitmaps]
            data.update({"refcount-bits": 1 << h.refcount_order,
                         "corrupt": bool(h.incompatible_features & hdr.INCOMPAT_CORRUPT),
                         "extended-l2": False})
        return {"type": "qcow2", "data": data}
