# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qcow2 reference counts: the refcount table, a block cache, allocation.

Update order (what makes a crash leave leaks but never corruption):

* increments (allocations) are made in cached refcount blocks, which are
  written before any L2/L1 entry that points at the new clusters (the
  image's flush writes refcount blocks, syncs, then writes tables);
* decrements (frees) are *deferred*: they are queued by :meth:`free` and
  only applied by :meth:`apply_frees`, which the image calls after the
  tables that dropped the references are on disk.  Freed clusters therefore
  become reusable only after that point, so new data never lands in a
  cluster an on-disk table still points at;
* a new refcount block is written (and synced) before the table entry that
  points at it; a grown refcount table is written before the header points
  at it.

All methods run under the image's metadata lock.
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from .l2 import hx

#: Refcount table entry: bits 9-63 are the block's offset.
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

_TYPECODES = {3: "B", 4: "H", 6: "Q"}
_TYPECODES[5] = "I" if array("I").itemsize == 4 else "L"
_NONZERO: Dict[int, bytes] = {}


def _nonzero_entries(order: int) -> bytes:
    """For refcount_order 0-2: byte value -> how many of its entries are non-zero."""
    if order not in _NONZERO:
        bits = 1 << order
        mask = (1 << bits) - 1
        _NONZERO[order] = bytes(sum(1 for k in range(0, 8, bits) if (b >> k) & mask)
                                for b in range(256))
    return _NONZERO[order]


#: Discard kinds, as QEMU's Qcow2DiscardType.
DISCARD_REQUEST = "request"
DISCARD_SNAPSHOT = "snapshot"
DISCARD_OTHER = "other"

_BIG = struct.pack(">H", 1) == array("H", [1]).tobytes()


def table_from_bytes(data: bytes, typecode: str = "Q") -> array:
    """Big-endian table bytes as a native array.

    :param data: big-endian bytes.
    :param typecode: the array type.
    :return: the array.
    """
    arr = array(typecode)
    arr.frombytes(data)
    if not _BIG and arr.itemsize > 1:
        arr.byteswap()
    return arr


def table_to_bytes(arr: array) -> bytes:
    """A native array as big-endian bytes.

    :param arr: the array.
    :return: big-endian bytes.
    """
    if _BIG or arr.itemsize == 1:
        return arr.tobytes()
    tmp = array(arr.typecode, arr)
    tmp.byteswap()
    return tmp.tobytes()


class RefBlock:
    """One refcount block in memory.

    :param data: an :class:`array` (widths of 8 bits and more) or a
        :class:`bytearray` (1, 2 or 4 bit widths, LSB first as the spec says).
    """

    __slots__ = ("data", "dirty")

    def __init__(self, data: Any) -> None:
        """A clean block.

        :param data: see the class.
        """
        self.data = data
        self.dirty = False


class Refcounts:
    """The refcount structures of one open image.

    :param img: the owning image (see :class:`.image.Qcow2Image`): provides
        ``read``, ``write``, ``sync``, ``corrupt``, ``file_end`` and
        ``cluster_bits``.
    :param table_offset: the header's ``refcount_table_offset``.
    :param table: the refcount table as a native array.
    :param order: ``refcount_order``.
    :param cache_size: refcount blocks kept in memory.
    """

    def __init__(self, img: Any, table_offset: int, table: array, order: int,
                 cache_size: int) -> None:
        """Nothing is read before it is needed.

        :param img: see the class.
        :param table_offset: see the class.
        :param table: see the class.
        :param order: see the class.
        :param cache_size: see the class.
        """
        self.img = img
        self.cluster_bits = img.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.table_offset = table_offset
        self.table = table
        self.order = order
        self.bits = 1 << order
        self.max = (1 << self.bits) - 1
        #: log2 of the entries per refcount block.
        self.rb_bits = self.cluster_bits + 3 - order
        self.rb_mask = (1 << self.rb_bits) - 1
        self.cache: "OrderedDict[int, RefBlock]" = OrderedDict()
        self.cache_size = max(4, cache_size)
        self.free_index = 0
        #: Deferred frees: (offset, length, discard kind).
        self.pending: List[Tuple[int, int, str]] = []
        self.pending_clusters = 0
        #: Offsets of all refcount blocks (for overlap checks).
        self.block_offsets = {e & REFT_OFFSET_MASK for e in table if e & REFT_OFFSET_MASK}

    # -- block access -----------------------------------------------------

    def _new_data(self) -> Any:
        """A zeroed block in memory.

        :return: the block data.
        """
        if self.order >= 3:
            return array(_TYPECODES[self.order], bytes(self.cluster_size))
        return bytearray(self.cluster_size)

    def _decode(self, raw: bytes) -> Any:
        """

        :param raw: one cluster read from disk.
        :return: the block data.
        """
        if self.order >= 3:
            return table_from_bytes(raw, _TYPECODES[self.order])
        return bytearray(raw)

    def _encode(self, data: Any) -> bytes:
        """

        :param data: block data.
        :return: one cluster of bytes.
        """
        if self.order >= 3:
            return table_to_bytes(data)
        return bytes(data)

    def block(self, ti: int) -> Optional[RefBlock]:
        """The cached block of table index ``ti`` (None when unallocated).

        :param ti: refcount table index.
        :return: the block, or None.
        """
        if ti >= len(self.table):
            return None
        off = self.table[ti] & REFT_OFFSET_MASK
        if not off:
            return None
        blk = self.cache.get(off)
        if blk is not None:
            self.cache.move_to_end(off)
            return blk
        if off & (self.cluster_size - 1):
            self.img.corrupt("Refblock offset %s unaligned (reftable index: %s)"
                             % (hx(off), hx(ti)))
        if off + self.cluster_size > self.img.file_end:
            self.img.corrupt("Refblock offset %s is past the end of the image file "
                             "(reftable index: %s)" % (hx(off), hx(ti)))
        blk = RefBlock(self._decode(self.img.read(off, self.cluster_size)))
        self._insert(off, blk)
        return blk

    def _insert(self, off: int, blk: RefBlock) -> None:
        """Cache a block, writing back what falls out of the cache.

        :param off: its offset.
        :param blk: the block.
        """
        self.cache[off] = blk
        while len(self.cache) > self.cache_size:
            old_off, old = next(iter(self.cache.items()))
            if old.dirty:
                self.img.write(old_off, self._encode(old.data))
                old.dirty = False
            del self.cache[old_off]

    def _get_in(self, data: Any, i: int) -> int:
        """One entry of a block.

        :param data: block data.
        :param i: entry index.
        :return: the refcount.
        """
        if self.order >= 3:
            return data[i]
        bit = i << self.order
        return (data[bit >> 3] >> (bit & 7)) & self.max

    def _set_in(self, data: Any, i: int, value: int) -> None:
        """Set one entry of a block.

        :param data: block data.
        :param i: entry index.
        :param value: the refcount.
        """
        if self.order >= 3:
            data[i] = value
            return
        bit = i << self.order
        shift = bit & 7
        data[bit >> 3] = (data[bit >> 3] & ~(self.max << shift) & 0xFF) | (value << shift)

    def get(self, index: int) -> int:
        """The refcount of cluster ``index``.

        :param index: cluster index.
        :return: the refcount.
        """
        blk = self.block(index >> self.rb_bits)
        if blk is None:
            return 0
        return self._get_in(blk.data, index & self.rb_mask)

    def _set(self, index: int, value: int) -> None:
        """Set a refcount; the block must exist (see :meth:`_ensure_blocks`).

        :param index: cluster index.
        :param value: the refcount.
        """
        if value < 0 or value > self.max:
            raise OSError(errno.ERANGE, "qcow2: refcount of cluster %#x out of range (%d)"
                          % (index << self.cluster_bits, value))
        blk = self.block(index >> self.rb_bits)
        if blk is None:
            raise OSError(errno.EIO, "qcow2: no refcount block for cluster %#x"
                          % (index << self.cluster_bits))
        self._set_in(blk.data, index & self.rb_mask, value)
        blk.dirty = True

    def count_used(self, end: int, limit: int) -> int:
        """Clusters below index ``end`` with a refcount, counted up to ``limit``.

        Only the refcount blocks that exist are read (a cluster past the
        table, or under an empty table entry, has refcount 0), and each is
        counted at C speed: a damaged image whose file reaches far out costs
        its table's length, not one lookup per cluster of the file.

        :param end: first cluster index not counted.
        :param limit: stop counting once reached.
        :return: the count (at most ``limit`` more than needed: whole blocks).
        """
        count = 0
        per_block = 1 << self.rb_bits
        for ti in range(min(len(self.table), -(-end // per_block))):
            if count >= limit:
                break
            blk = self.block(ti)
            if blk is None:
                continue
            n = min(per_block, end - (ti << self.rb_bits))
            if self.order >= 3:
                entries = blk.data[:n]
                count += n - entries.count(0)
            else:               # 1, 2 or 4 bits: per byte, a table of its non-zero entries
                per_byte = 8 >> self.order
                whole = n // per_byte
                count += sum(bytes(blk.data[:whole]).translate(_nonzero_entries(self.order)))
                count += sum(1 for i in range(whole * per_byte, n) if self._get_in(blk.data, i))
        return count

    # -- allocation ---------------------------------------------------------

    def _first_zero(self, data: Any, pos: int) -> int:
        """Index of the first zero entry at or after ``pos``, or -1.

        :param data: block data.
        :param pos: first entry to look at.
        :return: the index.
        """
        if self.order >= 3:
            try:
                return pos + data[pos:].index(0)
            except ValueError:
                return -1
        per_byte = 8 >> self.order
        end = 1 << self.rb_bits
        i = pos
        while i < end:
            if i % per_byte == 0:
                # Skip whole bytes of non-zero counts at C speed.
                chunk = bytes(data[i // per_byte:])
                stripped = chunk.lstrip(b"\xff")
                i += (len(chunk) - len(stripped)) * per_byte
                if i >= end:
                    break
            if self._get_in(data, i) == 0:
                return i
            i += 1
        return -1

    def _next_free(self, idx: int) -> int:
        """The first cluster index >= ``idx`` with refcount 0.

        :param idx: cluster index.
        :return: the index.
        """
        while True:
            ti = idx >> self.rb_bits
            blk = self.block(ti)
            if blk is None:
                return idx
            j = self._first_zero(blk.data, idx & self.rb_mask)
            if j >= 0:
                return (ti << self.rb_bits) + j
            idx = (ti + 1) << self.rb_bits

    def _find_run(self, n: int) -> int:
        """First run of ``n`` free clusters from the free-cluster hint.

        :param n: clusters.
        :return: the first cluster index.
        """
        return self._find_run_from(self.free_index, n)

    def alloc(self, nbytes: int) -> int:
        """Allocate contiguous clusters for ``nbytes`` (refcount 1 each).

        :param nbytes: bytes (rounded up to clusters).
        :return: the host offset of the first cluster.
        """
        n = max(1, -(-nbytes // self.cluster_size))
        while True:
            idx = self._find_run(n)
            if self._ensure_blocks(idx, n):
                continue
            for k in range(n):
                self._set(idx + k, 1)
            self.free_index = idx + n
            return idx << self.cluster_bits

    def _ensure_blocks(self, idx: int, n: int) -> bool:
        """Create missing refcount structures for clusters ``idx..idx+n-1``.

        :return: True if something was created (the caller searches again,
            since the new structures took free clusters).

        :param idx: first cluster index.
        :param n: clusters.
        """
        first, last = idx >> self.rb_bits, (idx + n - 1) >> self.rb_bits
        if last >= len(self.table):
            self._grow_table(idx, last + 1)
            return True
        missing = [ti for ti in range(first, last + 1) if not self.table[ti] & REFT_OFFSET_MASK]
        if missing:
            self._new_blocks(idx + n, missing)
            return True
        return False

    def _find_run_from(self, idx: int, n: int) -> int:
        """First run of ``n`` free clusters at or after ``idx``.

        :param idx: cluster index.
        :param n: clusters.
        :return: the first cluster index.
        """
        while True:
            idx = self._next_free(idx)
            k = 1
            while k < n and self.get(idx + k) == 0:
                k += 1
            if k == n:
                return idx
            idx += k + 1

    def _new_blocks(self, after: int, missing: List[int]) -> None:
        """Refcount blocks for the table indices ``missing``.

        As QEMU, they go to the first free clusters after the run the caller
        is allocating (``after``), so that the run stays where it was found;
        blocks whose own clusters fall into ranges without a block get
        company until every new cluster is counted.  Blocks are written and
        synced before the table entries that point at them.

        :param after: first cluster index after the run.
        :param missing: table indices without a block.
        """
        cs = self.cluster_size
        ranges = list(missing)
        while True:
            m = len(ranges)
            pos = self._find_run_from(after, m)
            tis = {c >> self.rb_bits for c in range(pos, pos + m)}
            if max(tis) >= len(self.table):
                self._grow_table(pos, max(tis) + 1)
                return
            extra = sorted(ti for ti in tis if ti not in ranges
                           and not self.table[ti] & REFT_OFFSET_MASK)
            if not extra:
                break
            ranges.extend(extra)
        self.img.check_new_metadata(pos << self.cluster_bits, m * cs)
        # QEMU's order: ranges in ascending order, each block immediately
        # followed by the block of the range it lands in if that one is
        # missing too (the layout qemu-img produces).
        slots = iter(range(pos, pos + m))
        wanted = set(ranges)
        placed: Dict[int, int] = {}

        def place(ti: int) -> None:
            """Give ``ti`` the next slot (and its own range's block next).

            :param ti: table index.
            """
            c = next(slots)
            placed[ti] = c
            tc = c >> self.rb_bits
            if tc != ti and tc in wanted and tc not in placed:
                place(tc)

        for ti in sorted(ranges):
            if ti not in placed:
                place(ti)
        blocks = {ti: (c, self._new_data()) for ti, c in placed.items()}
        for c in range(pos, pos + m):
            tc = c >> self.rb_bits
            if tc in blocks:
                self._set_in(blocks[tc][1], c & self.rb_mask, 1)
            else:
                self._set(c, 1)
        self._write_new_blocks(blocks)
        for ti, (c, data) in blocks.items():
            off = c << self.cluster_bits
            self.table[ti] = off
            self.img.write(self.table_offset + ti * 8, struct.pack(">Q", off))
        self.img.sync()
        for ti, (c, data) in blocks.items():
            off = c << self.cluster_bits
            self.block_offsets.add(off)
            self._insert(off, RefBlock(data))

    def _write_new_blocks(self, blocks: Dict[int, Any]) -> None:
        """Write cached dirty blocks, then new blocks ``{index: (cluster, data)}``, then sync.

        Every cluster the new blocks count is on disk before anything points at them.
        """
        self.write_dirty()
        for _ti, (c, data) in blocks.items():
            self.img.write(c << self.cluster_bits, self._encode(data))
        self.img.sync()

    def _grow_table(self, start: int, min_entries: int) -> None:
        """Replace the refcount table by a larger one placed at ``start``.

        The new table and the refcount blocks covering it are laid out at
        cluster ``start`` (the first free cluster beyond every existing
        block's range), written and synced before the header points at them.

        :param start: first cluster index of the free area.
        :param min_entries: entries the table needs at least.
        """
        cs = self.cluster_size
        old_len = len(self.table)
        entries = max(min_entries, old_len + (old_len >> 1), cs // 8)
        nblocks = 0
        while True:
            tclusters = -(-entries * 8 // cs)
            end = start + nblocks + tclusters
            ranges = [ti for ti in range(start >> self.rb_bits, ((end - 1) >> self.rb_bits) + 1)
                      if ti >= old_len or not self.table[ti] & REFT_OFFSET_MASK]
            need = max([entries, min_entries] + [ti + 1 for ti in ranges])
            if len(ranges) == nblocks and need == entries:
                break
            nblocks, entries = len(ranges), need
        tclusters = -(-entries * 8 // cs)
        if entries * 8 > 0x800000:
            raise OSError(errno.EFBIG, "qcow2: refcount table would exceed 8 MiB")
        end = start + nblocks + tclusters
        self.img.check_new_metadata(start << self.cluster_bits, (end - start) * cs)
        new_table = array("Q", self.table)
        new_table.extend([0] * (tclusters * cs // 8 - old_len))
        blocks: Dict[int, Any] = {}
        for k, ti in enumerate(ranges):
            blocks[ti] = (start + k, self._new_data())
            new_table[ti] = (start + k) << self.cluster_bits
        for c in range(start, end):
            ti = c >> self.rb_bits
            if ti in blocks:
                self._set_in(blocks[ti][1], c & self.rb_mask, 1)
            else:
                self._set(c, 1)
        # Blocks for ranges that already had one were updated in the cache;
        # write them now so the new clusters are counted before the header
        # points at the new table.
        self._write_new_blocks(blocks)
        table_off = (start + nblocks) << self.cluster_bits
        self.img.write(table_off, table_to_bytes(new_table))
        self.img.sync()
        self.img.write_header_field(48, struct.pack(">QI", table_off, tclusters))
        self.img.sync()
        old_off, old_clusters = self.table_offset, -(-old_len * 8 // cs)
        self.table = new_table
        self.table_offset = table_off
        self.img.reftable_moved(table_off, tclusters)
        for ti, (c, data) in blocks.items():
            off = c << self.cluster_bits
            self.block_offsets.add(off)
            self._insert(off, RefBlock(data))
        self.free(old_off, old_clusters * cs, DISCARD_OTHER)

    # -- frees ----------------------------------------------------------------

    def free(self, offset: int, length: int, kind: str = DISCARD_OTHER) -> None:
        """Queue a decrement for the clusters of ``[offset, offset+length)``.

        :param offset: host offset.
        :param length: bytes.
        :param kind: discard kind.
        """
        if length <= 0:
            return
        self.pending.append((offset, length, kind))
        self.pending_clusters += ((offset + length - 1) >> self.cluster_bits) \
            - (offset >> self.cluster_bits) + 1

    def take_pending(self) -> List[Tuple[int, int, str]]:
        """Hand over the queued frees (the image applies them when safe).

        :return: the queued ``(offset, length, kind)`` frees.
        """
        out, self.pending, self.pending_clusters = self.pending, [], 0
        return out

    def apply_frees(self, frees: List[Tuple[int, int, str]]) -> List[Tuple[int, int, str]]:
        """Apply decrements; clusters that reach 0 become reusable.

        :param frees: what :meth:`take_pending` returned.
        :return: ``(offset, length, kind)`` ranges whose refcount reached 0.
        """
        freed: List[Tuple[int, int, str]] = []
        for offset, length, kind in frees:
            first = offset >> self.cluster_bits
            last = (offset + length - 1) >> self.cluster_bits
            for idx in range(first, last + 1):
                value = self.get(idx)
                if value == 0:
                    # Double free: the image is inconsistent; keep the
                    # refcount (a leak at worst) rather than corrupt it.
                    continue
                self._set(idx, value - 1)
                if value == 1:
                    if idx < self.free_index:
                        self.free_index = idx
                    self.img.cluster_freed(idx << self.cluster_bits)
                    if freed and freed[-1][2] == kind and \
                            freed[-1][0] + freed[-1][1] == idx << self.cluster_bits:
                        o, n, k = freed[-1]
                        freed[-1] = (o, n + self.cluster_size, k)
                    else:
                        freed.append((idx << self.cluster_bits, self.cluster_size, kind))
        return freed

    # -- write-back -----------------------------------------------------------

    def has_dirty(self) -> bool:
        """Whether some cached block differs from the disk.

        :return: True if so.
        """
        return any(b.dirty for b in self.cache.values())

    def write_dirty(self) -> bool:
        """Write every dirty block (no sync).

        :return: True if anything was written.
        """
        wrote = False
        for off, blk in self.cache.items():
            if blk.dirty:
                self.img.write(off, self._encode(blk.data))
                blk.dirty = False
                wrote = True
        return wrote

    def drop_cache(self) -> None:
        """Forget cached blocks (after a fatal error: nothing more is written)."""
        self.cache.clear()
        self.pending = []
        self.pending_clusters = 0
