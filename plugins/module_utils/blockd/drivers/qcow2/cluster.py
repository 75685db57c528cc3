# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cluster-level operations on an open image (QEMU's qcow2-cluster.c).

:class:`ClusterOps` is a mixin of :class:`.image.Qcow2Image`: every method
here runs under the image's lock unless its docstring says otherwise.  The
mapping functions work on runs of clusters inside one L2 table so that a
large request is a handful of iterations, and contiguous data clusters come
back as one host range (one ``sendfile`` segment).
"""

from __future__ import annotations

import errno
import threading
import zlib
from array import array
from typing import Any, Callable, List, Optional, Tuple

from .l2 import (COMPRESSED, L2E_OFFSET_MASK, NORMAL, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
                 UNALLOCATED, ZERO_ALLOC, ZERO_PLAIN, L2Table, cluster_type, hx,
                 is_allocated)
from .refcount import DISCARD_OTHER, DISCARD_REQUEST

#: Extent kinds returned by :meth:`ClusterOps.map_extent`.
K_DATA = 0          # host data: (K_DATA, n, host_offset)
K_ZERO = 1          # reads as zeroes in this layer
K_UNALLOC = 2       # not allocated here: the backing file decides
K_COMPRESSED = 3    # one compressed cluster: (K_COMPRESSED, n, l2_entry)

#: Write plans returned by :meth:`ClusterOps.plan_write`.
W_INPLACE = 0
W_DONE = 1

#: Largest allocation of one write step (bounds the COW buffer).
MAX_ALLOC_BYTES = 8 << 20

_ZERO_OR_COMPRESSED = OFLAG_ZERO | OFLAG_COMPRESSED


class ClusterOps:
    """Mapping, allocation and zeroing of guest clusters (mixin)."""

    # Attributes provided by Qcow2Image (declared for readers and linters).
    cluster_bits: int
    cluster_size: int
    l2_bits: int
    l2_entries: int
    version: int
    size: int
    l1: array
    l1_size: int

    _decomp_lock = threading.Lock()

    # -- entry validation -------------------------------------------------------

    def entry_type(self, entry: int, l2_offset: int, index: int) -> int:
        """The validated type of an L2 entry (QEMU's checks in get_host_offset).

        :param entry: the L2 entry.
        :param l2_offset: its table (for messages).
        :param index: its index in the table (for messages).
        :return: the cluster type (``l2.NORMAL``...).
        :raise OSError: EIO (fatal) for entries no valid image contains.
        """
        if not entry:
            return UNALLOCATED
        ctype = cluster_type(entry)
        if ctype in (ZERO_PLAIN, ZERO_ALLOC) and self.version < 3:
            self.corrupt("Zero cluster entry found in pre-v3 image (L2 offset: %s, "
                         "L2 index: %s)" % (hx(l2_offset), hx(index)))
        if ctype in (NORMAL, ZERO_ALLOC):
            host = entry & L2E_OFFSET_MASK
            if host & (self.cluster_size - 1):
                self.corrupt("Cluster allocation offset %s unaligned (L2 offset: %s, "
                             "L2 index: %s)" % (hx(host), hx(l2_offset), hx(index)))
            if ctype == NORMAL and host >= self.file_end:
                self.corrupt("Data cluster offset %s past the end of the image file "
                             "(L2 offset: %s, L2 index: %s)" % (hx(host), hx(l2_offset), hx(index)))
        return ctype

    # -- reading ----------------------------------------------------------------

    def map_extent(self, offset: int, length: int) -> Tuple[int, int, int]:
        """Map the start of a guest range.

        :return: ``(kind, n, value)``: the first ``n`` bytes (``0 < n <=
            length``) are of ``kind`` (``K_*``); ``value`` is the host offset
            for ``K_DATA`` or the L2 entry for ``K_COMPRESSED``.

        :param offset: guest offset.
        :param length: bytes wanted (> 0).
        """
        cb = self.cluster_bits
        cs = 1 << cb
        cidx = offset >> cb
        l1i = cidx >> self.l2_bits
        l2i = cidx & (self.l2_entries - 1)
        in_cl = offset & (cs - 1)
        avail = ((self.l2_entries - l2i) << cb) - in_cl
        if avail > length:
            avail = length
        l2off = self.l2_offset(l1i)
        if not l2off:
            # Whole missing tables: extend over the next empty L1 entries.
            span = 1 << (cb + self.l2_bits)
            l1 = self.l1
            while avail < length:
                l1i += 1
                if l1i < self.l1_size and l1[l1i]:
                    break
                avail = min(length, avail + span)
            return K_UNALLOC, avail, 0
        data = self.l2cache.get(l2off).data
        entry = data[l2i]
        ctype = self.entry_type(entry, l2off, l2i)
        n = cs - in_cl
        if ctype == COMPRESSED:
            return K_COMPRESSED, min(n, avail), entry
        i = l2i + 1
        if ctype == NORMAL:
            nxt = (entry & L2E_OFFSET_MASK) + cs
            while n < avail:
                e2 = data[i]
                if e2 & _ZERO_OR_COMPRESSED or (e2 & L2E_OFFSET_MASK) != nxt:
                    break
                n += cs
                nxt += cs
                i += 1
            return K_DATA, min(n, avail), (entry & L2E_OFFSET_MASK) + in_cl
        kind = K_UNALLOC if ctype == UNALLOCATED else K_ZERO
        while n < avail:
            e2 = data[i]
            if kind == K_UNALLOC:
                if e2:
                    break
            else:
                t2 = self.entry_type(e2, l2off, i)
                if t2 not in (ZERO_PLAIN, ZERO_ALLOC):
                    break
            n += cs
            i += 1
        return kind, min(n, avail), 0

    def decompress(self, entry: int) -> bytes:
        """The guest cluster stored compressed by ``entry`` (no lock needed).

        :param entry: the compressed L2 entry.
        :return: one cluster of guest data.
        :raise OSError: EIO when the data does not inflate to one cluster.
        """
        with self._decomp_lock:
            cached = getattr(self, "_decomp_cache", None)
            if cached is not None and cached[0] == entry:
                return cached[1]
        coffset, csize = self.compressed.parse(entry)
        raw = self.read(coffset, csize)
        try:
            out = zlib.decompressobj(-12).decompress(raw, self.cluster_size)
        except zlib.error as exc:
            raise OSError(errno.EIO, "qcow2: compressed cluster at %#x cannot be inflated: %s"
                          % (coffset, exc)) from None
        if len(out) != self.cluster_size:
            raise OSError(errno.EIO, "qcow2: compressed cluster at %#x inflates to %d bytes, "
                          "not %d" % (coffset, len(out), self.cluster_size))
        with self._decomp_lock:
            self._decomp_cache = (entry, out)
        return out

    # -- L2 tables for writing ----------------------------------------------------

    def l2_for_write(self, l1i: int) -> L2Table:
        """The L2 table of ``l1i``, owned by the active L1 alone.

        A missing table is allocated (zeroed); a shared one (no COPIED flag)
        is copied first, as QEMU's l2_allocate.

        :param l1i: the L1 index.
        :return: the (cached, writable) table.
        """
        entry = self.l1[l1i]
        off = self.l2_offset(l1i)
        if off and entry & OFLAG_COPIED:
            return self.l2cache.get(off)
        cs = self.cluster_size
        if off:
            data = array("Q", self.l2cache.get(off).data)
        else:
            data = array("Q", bytes(cs))
        new = self.refcounts.alloc(cs)
        self.check_new_metadata(new, cs)
        table = self.l2cache.add_new(new, data)
        self.set_l1(l1i, new | OFLAG_COPIED)
        if off:
            self.refcounts.free(off, cs, DISCARD_OTHER)
        return table

    def free_entry(self, entry: int, kind: str) -> None:
        """Queue the release of the host clusters an L2 entry holds.

        :param entry: the old L2 entry.
        :param kind: discard kind (for passthrough).
        """
        ctype = cluster_type(entry)
        if ctype in (NORMAL, ZERO_ALLOC):
            self.refcounts.free(entry & L2E_OFFSET_MASK, self.cluster_size, kind)
        elif ctype == COMPRESSED:
            coffset, csize = self.compressed.parse(entry)
            self.refcounts.free(coffset, csize, kind)

    # -- writing ------------------------------------------------------------------

    def plan_write(self, offset: int, length: int) -> Tuple[int, int, int]:
        """How to write the start of ``[offset, offset+length)``.

        :return: ``(W_INPLACE, n, host)`` when the first ``n`` bytes go to
            clusters this image owns (written by the caller, unlocked), or
            ``(W_DONE, 0, 0)`` when the caller must call :meth:`write_alloc`.

        :param offset: guest offset.
        :param length: bytes to write.
        """
        cb = self.cluster_bits
        cs = 1 << cb
        cidx = offset >> cb
        l1i = cidx >> self.l2_bits
        l2i = cidx & (self.l2_entries - 1)
        if l1i >= self.l1_size or not self.l1[l1i] & OFLAG_COPIED:
            return W_DONE, 0, 0
        l2off = self.l2_offset(l1i)
        if not l2off:
            return W_DONE, 0, 0
        data = self.l2cache.get(l2off).data
        entry = data[l2i]
        if entry & (OFLAG_COPIED | _ZERO_OR_COMPRESSED) != OFLAG_COPIED or \
                not entry & L2E_OFFSET_MASK:
            return W_DONE, 0, 0
        self.entry_type(entry, l2off, l2i)
        in_cl = offset & (cs - 1)
        avail = min(length, ((self.l2_entries - l2i) << cb) - in_cl)
        n = cs - in_cl
        nxt = (entry & L2E_OFFSET_MASK) + cs
        i = l2i + 1
        while n < avail:
            e2 = data[i]
            if e2 & (OFLAG_COPIED | _ZERO_OR_COMPRESSED) != OFLAG_COPIED or \
                    (e2 & L2E_OFFSET_MASK) != nxt:
                break
            n += cs
            nxt += cs
            i += 1
        return W_INPLACE, min(n, avail), (entry & L2E_OFFSET_MASK) + in_cl

    def write_alloc(self, offset: int, data: Any, read_under: Callable[[int, int], bytes],
                    before_change: Callable[[], None]) -> int:
        """Write the start of ``data`` at guest ``offset`` into new clusters.

        Partial clusters are completed from what they read as now (the
        backing file through ``read_under``, zeroes, a compressed or shared
        cluster): QEMU's copy-on-write.  Everything that can fail on a damaged
        image (entry checks, reading the old contents) happens before
        ``before_change`` is called and anything is modified.  Then: data to
        the new clusters, the L2 entries (in cache), the old clusters queued
        for release.

        :param data: a memoryview of bytes to write.
        :param read_under: ``read_under(offset, n)`` reads the backing chain.
        :param before_change: called once the write is known to be possible.
        :param offset: guest offset.
        :return: bytes of ``data`` written (0: the caller plans again).
        """
        cb = self.cluster_bits
        cs = 1 << cb
        cidx = offset >> cb
        l1i = cidx >> self.l2_bits
        l2i = cidx & (self.l2_entries - 1)
        l2off = self.l2_offset(l1i)
        current = self.l2cache.get(l2off).data if l2off else array("Q", bytes(cs))
        in_cl = offset & (cs - 1)
        end = offset + len(data)
        max_clusters = min(self.l2_entries - l2i, max(1, MAX_ALLOC_BYTES >> cb),
                           ((end - 1) >> cb) - cidx + 1)
        first = current[l2i]
        if first & (OFLAG_COPIED | _ZERO_OR_COMPRESSED) == OFLAG_COPIED and \
                first & L2E_OFFSET_MASK:
            # An owned data cluster in a shared table: copy the table, then
            # the caller writes in place.
            self.entry_type(first, l2off, l2i)
            before_change()
            self.l2_for_write(l1i)
            return 0
        reuse = bool(first & OFLAG_COPIED) and cluster_type(first) == ZERO_ALLOC
        k = 1
        if not reuse:
            while k < max_clusters:
                e2 = current[l2i + k]
                if e2 & OFLAG_COPIED and e2 & L2E_OFFSET_MASK and not e2 & OFLAG_COMPRESSED:
                    break
                k += 1
        old = [current[l2i + j] for j in range(k)]
        for j in range(k):
            self.entry_type(old[j], l2off, l2i + j)
        start = cidx << cb
        stop = (cidx + k) << cb
        n = min(end, stop) - offset
        parts = []
        if in_cl:
            parts.append(self._cluster_content(start, in_cl, old[0], read_under))
        parts.append(data[:n])
        if offset + n < stop:
            tail_off = offset + n
            parts.append(self._cluster_content(tail_off, stop - tail_off, old[-1], read_under))
        buf = b"".join(parts) if len(parts) > 1 else parts[0]
        if reuse:
            host = first & L2E_OFFSET_MASK
            self.check_data_write(host, cs)
        before_change()
        table = self.l2_for_write(l1i)
        entries = table.data
        if not reuse:
            host = self.refcounts.alloc(k * cs)
            self.check_data_write(host, k * cs)
        self.write(host, buf)
        for j in range(k):
            entries[l2i + j] = (host + j * cs) | OFLAG_COPIED
            if not reuse:
                self.free_entry(old[j], DISCARD_OTHER)
        table.dirty = True
        return n

    def validate_range(self, offset: int, length: int) -> None:
        """Check every L2 entry of a cluster range (before changing any).

        :param offset: guest offset (cluster aligned).
        :param length: bytes.
        """
        for l1i, l2i, k in self._table_runs(offset, length):
            l2off = self.l2_offset(l1i)
            if not l2off:
                continue
            data = self.l2cache.get(l2off).data
            for idx in range(l2i, l2i + k):
                if data[idx]:
                    self.entry_type(data[idx], l2off, idx)

    def _cluster_content(self, offset: int, n: int, entry: int,
                         read_under: Callable[[int, int], bytes]) -> bytes:
        """What guest bytes ``[offset, offset+n)`` of one cluster read as now.

        :param offset: guest offset.
        :param n: bytes (within one cluster).
        :param entry: the cluster's L2 entry.
        :param read_under: reads the backing chain.
        :return: the bytes.
        """
        ctype = cluster_type(entry)
        in_cl = offset & (self.cluster_size - 1)
        if ctype == UNALLOCATED:
            return read_under(offset, n)
        if ctype == NORMAL:
            return self.read((entry & L2E_OFFSET_MASK) + in_cl, n)
        if ctype == COMPRESSED:
            return self.decompress(entry)[in_cl:in_cl + n]
        return bytes(n)

    # -- zeroing and discarding -----------------------------------------------------

    def _table_runs(self, offset: int, length: int):
        """Split a cluster-aligned range into (l1 index, first l2 index, count).

        :param offset: guest offset.
        :param length: bytes.
        :return: an iterator of tuples.
        """
        cb = self.cluster_bits
        c = offset >> cb
        end = -(-(offset + length) >> cb) if length else c
        while c < end:
            l1i = c >> self.l2_bits
            l2i = c & (self.l2_entries - 1)
            k = min(end - c, self.l2_entries - l2i)
            yield l1i, l2i, k
            c += k

    def zeroize(self, offset: int, length: int, may_unmap: bool, has_backing: bool) -> None:
        """Mark whole clusters as reading zero (v3 zero flag).

        As QEMU's zero_in_l2_slice: compressed clusters are always released,
        other allocations only with ``may_unmap``; nothing is written to the
        data clusters.

        :param offset: guest offset (cluster aligned).
        :param length: bytes (whole clusters, or up to the end of the image).
        :param may_unmap: release allocated clusters (REQ_MAY_UNMAP).
        :param has_backing: whether a backing node exists.
        """
        for l1i, l2i, k in self._table_runs(offset, length):
            if not has_backing and not self.l2_offset(l1i):
                continue        # no table, no backing: already reads zeroes
            table = self.l2_for_write(l1i)
            data = table.data
            for idx in range(l2i, l2i + k):
                old = data[idx]
                ctype = self.entry_type(old, 0, idx)
                unmap = ctype == COMPRESSED or (may_unmap and is_allocated(ctype))
                new = (0 if unmap else old) | OFLAG_ZERO
                if new == old:
                    continue
                data[idx] = new
                table.dirty = True
                if unmap:
                    self.free_entry(old, DISCARD_REQUEST)

    def discard(self, offset: int, length: int, has_backing: bool, full: bool = False) -> None:
        """Release whole clusters (QEMU's discard_in_l2_slice).

        The range then reads as zeroes (v3 zero flag; v2 without backing:
        unallocated), or, with ``full``, falls through to the backing file.

        :param offset: guest offset (cluster aligned).
        :param length: bytes (whole clusters, or up to the end of the image).
        :param has_backing: whether a backing node exists.
        :param full: make the clusters unallocated (shrinking).
        """
        zero = OFLAG_ZERO if self.version >= 3 else 0

        def new_entry(old: int, ctype: int) -> int:
            """The entry after the discard.

            :param old: the entry before.
            :param ctype: its type.
            :return: the new entry.
            """
            if full:
                return 0
            if has_backing or is_allocated(ctype):
                return zero
            return old

        for l1i, l2i, k in self._table_runs(offset, length):
            l2off = self.l2_offset(l1i)
            if not l2off:
                if full or not has_backing or not zero:
                    continue
            else:
                data = self.l2cache.get(l2off).data
                for idx in range(l2i, l2i + k):
                    old = data[idx]
                    if new_entry(old, self.entry_type(old, l2off, idx)) != old:
                        break
                else:
                    continue
            table = self.l2_for_write(l1i)
            data = table.data
            for idx in range(l2i, l2i + k):
                old = data[idx]
                ctype = self.entry_type(old, 0, idx)
                new = new_entry(old, ctype)
                if new == old:
                    continue
                data[idx] = new
                table.dirty = True
                if is_allocated(ctype):
                    self.free_entry(old, DISCARD_REQUEST)

    # -- resize support -------------------------------------------------------------

    def first_allocated_from(self, offset: int) -> Optional[int]:
        """Guest offset of the first allocated cluster at or after the cluster
        containing ``offset``, or None.

        :param offset: guest offset.
        :return: a guest offset, or None.
        """
        cb = self.cluster_bits
        c = offset >> cb
        for l1i in range(c >> self.l2_bits, self.l1_size):
            l2off = self.l2_offset(l1i)
            if not l2off:
                continue
            data = self.l2cache.get(l2off).data
            start = c - (l1i << self.l2_bits) if l1i == c >> self.l2_bits else 0
            for idx in range(max(0, start), self.l2_entries):
                if is_allocated(self.entry_type(data[idx], l2off, idx)):
                    return ((l1i << self.l2_bits) + idx) << cb
        return None

    def preallocate(self, start: int, end: int,
                    runs: Optional[List[Tuple[int, int]]] = None) -> int:
        """Give every unallocated cluster of ``[start, end)`` a data cluster
        (``preallocation=metadata``); the data is not written.

        :param start: guest offset.
        :param end: guest end offset.
        :param runs: if given, ``(host offset, length)`` of every data run
            allocated is appended (``preallocation=full`` writes them).
        :return: the end of the last data cluster allocated (0 if none).
        """
        cb = self.cluster_bits
        cs = 1 << cb
        last_end = 0
        for l1i, l2i, k in self._table_runs(start & ~(cs - 1), end - (start & ~(cs - 1))):
            table = self.l2_for_write(l1i)
            data = table.data
            idx = l2i
            while idx < l2i + k:
                if data[idx]:
                    idx += 1
                    continue
                run = 1
                while idx + run < l2i + k and not data[idx + run] and \
                        run < (MAX_ALLOC_BYTES >> cb) + 1:
                    run += 1
                host = self.refcounts.alloc(run * cs)
                self.check_new_metadata(host, run * cs)
                for j in range(run):
                    data[idx + j] = (host + j * cs) | OFLAG_COPIED
                table.dirty = True
                last_end = max(last_end, host + run * cs)
                if runs is not None:
                    runs.append((host, run * cs))
                idx += run
        return last_end
