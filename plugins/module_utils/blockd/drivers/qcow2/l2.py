# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""L1/L2 table entries and the bounded L2 table cache.

An L2 table is one cluster of big-endian 64-bit entries; in memory it is a
native :class:`array.array` of ``'Q'``.  The cache is write-back: a dirty
table is written when it is evicted or when the image flushes, always after
the refcount blocks (see :mod:`.refcount`), never before.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Tuple

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: Bits of an L1 entry that must be zero.
L1E_RESERVED_MASK = 0x7F000000000001FF
#: Bits of a standard L2 entry that must be zero (bit 0 is the zero flag).
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

#: Cluster types (QEMU's QCow2ClusterType).
UNALLOCATED = 0
ZERO_PLAIN = 1
ZERO_ALLOC = 2
NORMAL = 3
COMPRESSED = 4

#: Compressed clusters are counted in 512-byte sectors.
COMPRESSED_SECTOR = 512


def hx(value: int) -> str:
    """C's ``%#x`` (QEMU's messages): ``0`` for zero, else ``0x...``.

    :param value: a number.
    :return: the text.
    """
    return "%#x" % value if value else "0"


def cluster_type(entry: int) -> int:
    """The type of an L2 entry (as qcow2_get_cluster_type, no subclusters).

    :param entry: the L2 entry.
    :return: the type.
    """
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO:
        return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
    if not entry & L2E_OFFSET_MASK:
        return UNALLOCATED
    return NORMAL


def is_allocated(ctype: int) -> bool:
    """Whether the type holds host clusters (data, allocated zero, compressed).

    :param ctype: a cluster type.
    :return: True if so.
    """
    return ctype in (NORMAL, ZERO_ALLOC, COMPRESSED)


class CompressedLayout:
    """Decoding of compressed cluster descriptors for one cluster size.

    :param cluster_bits: log2 of the cluster size.
    """

    def __init__(self, cluster_bits: int) -> None:
        """Precompute masks.

        :param cluster_bits: see the class.
        """
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.offset_mask = (1 << self.csize_shift) - 1

    def parse(self, entry: int) -> Tuple[int, int]:
        """``(host_offset, byte_count)`` of the compressed data.

        :param entry: the L2 entry.
        :return: the pair.
        """
        coffset = entry & self.offset_mask
        nb_sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nb_sectors * COMPRESSED_SECTOR - (coffset & (COMPRESSED_SECTOR - 1))


class L2Table:
    """One cached L2 table.

    :param data: the entries (native array of ``'Q'``).
    """

    __slots__ = ("data", "dirty")

    def __init__(self, data: array) -> None:
        """A clean table.

        :param data: see the class.
        """
        self.data = data
        self.dirty = False


class L2Cache:
    """A bounded LRU cache of L2 tables keyed by their host offset.

    :param capacity: tables kept (at least 2).
    :param load: ``load(offset) -> array`` reads a table from disk.
    :param write_back: ``write_back(offset, table)`` writes a dirty table
        (the image makes the refcounts durable first).
    """

    def __init__(self, capacity: int, load: Callable[[int], array],
                 write_back: Callable[[int, L2Table], None]) -> None:
        """An empty cache.

        :param capacity: see the class.
        :param load: see the class.
        :param write_back: see the class.
        """
        self.capacity = max(2, capacity)
        self._load = load
        self._write_back = write_back
        self._tables: "OrderedDict[int, L2Table]" = OrderedDict()

    def get(self, offset: int) -> L2Table:
        """The table at ``offset``, loading (and maybe evicting) as needed.

        :param offset: host offset.
        :return: the table.
        """
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            return table
        table = L2Table(self._load(offset))
        self._insert(offset, table)
        return table

    def peek(self, offset: int) -> Optional[L2Table]:
        """The table if cached, without loading.

        :param offset: host offset.
        :return: the table, or None.
        """
        return self._tables.get(offset)

    def add_new(self, offset: int, data: array) -> L2Table:
        """Insert a table that exists only in memory yet (marked dirty).

        :param offset: host offset.
        :param data: the entries.
        :return: the table.
        """
        table = L2Table(data)
        table.dirty = True
        self._insert(offset, table)
        return table

    def _insert(self, offset: int, table: L2Table) -> None:
        """Insert, evicting (and writing back) the least recently used.

        :param offset: host offset.
        :param table: the table.
        """
        self._tables[offset] = table
        while len(self._tables) > self.capacity:
            old_off, old = next(iter(self._tables.items()))
            if old.dirty:
                self._write_back(old_off, old)
            del self._tables[old_off]

    def discard(self, offset: int) -> None:
        """Forget a table (its cluster was freed).

        :param offset: host offset.
        """
        self._tables.pop(offset, None)

    def dirty(self) -> Iterator[Tuple[int, L2Table]]:
        """The dirty tables, in offset order.

        :return: ``(offset, table)`` pairs.
        """
        return iter(sorted((o, t) for o, t in self._tables.items() if t.dirty))

    def has_dirty(self) -> bool:
        """Whether some table differs from the disk.

        :return: True if so.
        """
        return any(t.dirty for t in self._tables.values())

    def clear(self) -> None:
        """Drop everything (dirty tables are lost: only after fatal errors)."""
        self._tables.clear()
