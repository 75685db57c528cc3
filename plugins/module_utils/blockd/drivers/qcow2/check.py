# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Consistency check and leak repair (QEMU's qcow2_check_refcounts).

The check recomputes every cluster's reference count from the metadata
(header, L1/L2 tables of the active state and of every snapshot, refcount
table and blocks, snapshot table, bitmap directory, tables and data) and
compares it with the stored refcounts.  Messages use QEMU's wording.

Repair fixes what a crash can leave behind: leaks (refcounts higher than the
references: blockd's own crashes), refcounts lower than the references and
wrong COPIED flags (QEMU's lazy refcounts), creating missing refcount blocks
past the end of the file.  Structural damage (misplaced or unaligned tables,
references past the end of the file, reserved bits) is reported and left
alone: nothing is written then, and opening a dirty image in that state fails.
"""

from __future__ import annotations

from array import array
from typing import Any, List, Optional, Tuple

from .header import AUTOCLEAR_BITMAPS
from .l2 import (COMPRESSED, L1E_OFFSET_MASK, L2E_OFFSET_MASK, NORMAL, OFLAG_COPIED, ZERO_ALLOC,
                 ZERO_PLAIN, cluster_type)
from .refcount import REFT_OFFSET_MASK, table_from_bytes

#: Largest image (in clusters) the check holds reference counts for.
MAX_CHECK_CLUSTERS = 1 << 28


class CheckResult:
    """What QEMU's BdrvCheckResult holds, plus the messages."""

    def __init__(self) -> None:
        """An empty result."""
        self.corruptions = 0
        self.leaks = 0
        self.check_errors = 0
        self.corruptions_fixed = 0
        self.leaks_fixed = 0
        self.image_end_offset = 0
        self.messages: List[str] = []

    def error(self, message: str) -> None:
        """Record a corruption.

        :param message: QEMU's text for it.
        """
        self.corruptions += 1
        self.messages.append(message)

    def to_dict(self) -> dict:
        """The ImageCheck-like QMP object.

        :return: the counters by their QMP names.
        """
        return {"corruptions": self.corruptions, "leaks": self.leaks,
                "check-errors": self.check_errors, "corruptions-fixed": self.corruptions_fixed,
                "leaks-fixed": self.leaks_fixed, "image-end-offset": self.image_end_offset}


class _Checker:
    """One run of the check over an open :class:`.image.Qcow2Image`."""

    def __init__(self, img: Any, result: CheckResult) -> None:
        """Prepare an array of reference counts for the file's clusters.

        :param img: the open image.
        :param result: where findings go.
        """
        self.img = img
        self.res = result
        self.cb = img.cluster_bits
        self.cs = 1 << self.cb
        self.file_len = img.file_end
        n = -(-self.file_len // self.cs)
        if n > MAX_CHECK_CLUSTERS:
            raise OSError(27, "qcow2: image file too large to check")
        self.refs = array("I", bytes(4 * n))

    def inc(self, offset: int, size: int) -> None:
        """Count one reference on the clusters of ``[offset, offset+size)``.

        :param offset: host offset.
        :param size: bytes.
        """
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self.res.error("ERROR: counting reference for region exceeding the end of the "
                           "file by one cluster or more: offset %#x size %#x" % (offset, size))
            return
        first = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        if last >= len(self.refs):
            self.refs.extend([0] * (last + 1 - len(self.refs)))
        for c in range(first, last + 1):
            self.refs[c] += 1

    def load_table(self, offset: int, nbytes: int) -> Optional[array]:
        """A table read from disk (or the cache for L2 tables).

        :param offset: host offset of the table.
        :param nbytes: its size.
        :return: the entries, or None when the table lies past the end of the file.
        """
        cached = self.img.l2cache.peek(offset) if nbytes == self.cs else None
        if cached is not None:
            return cached.data
        if offset >= self.file_len:
            return None
        return table_from_bytes(self.img.read(offset, nbytes))

    def check_l1(self, l1_offset: int, l1_size: int, l1: Optional[array]) -> None:
        """Count an L1 table, its L2 tables and their clusters.

        :param l1_offset: host offset of the table.
        :param l1_size: its entries.
        :param l1: the table when already in memory (the active one).
        """
        self.inc(l1_offset, l1_size * 8)
        if l1 is None:
            l1 = self.load_table(l1_offset, l1_size * 8) if l1_size else array("Q")
        for entry in l1 or ():
            if not entry:
                continue
            l2off = entry & L1E_OFFSET_MASK
            self.inc(l2off, self.cs)
            if l2off & (self.cs - 1):
                self.res.error("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry "
                               "corrupted" % l2off)
                continue
            if l2off >= self.file_len:
                continue
            self.check_l2(l2off)

    def check_l2(self, l2off: int) -> None:
        """Count the clusters an L2 table points at.

        :param l2off: host offset of the table.
        """
        img = self.img
        data = self.load_table(l2off, self.cs)
        if data is None:
            return
        for entry in data:
            if not entry:
                continue
            ctype = cluster_type(entry)
            if ctype == COMPRESSED:
                if entry & OFLAG_COPIED:
                    self.res.error("ERROR: coffset=%#x: copied flag must never be set for "
                                   "compressed clusters" % (entry & img.compressed.offset_mask))
                    entry &= ~OFLAG_COPIED
                coffset, csize = img.compressed.parse(entry)
                self.inc(coffset, csize)
            elif ctype in (NORMAL, ZERO_ALLOC):
                host = entry & L2E_OFFSET_MASK
                if host & (self.cs - 1):
                    if ctype == ZERO_ALLOC:
                        self.res.error("ERROR offset=%x: Preallocated cluster is not properly "
                                       "aligned; L2 entry corrupted." % host)
                    else:
                        self.res.error("ERROR offset=%x: Data cluster is not properly aligned; "
                                       "L2 entry corrupted." % host)
                self.inc(host, self.cs)
            elif ctype == ZERO_PLAIN and img.version < 3:
                self.res.error("ERROR: zero cluster entry in a version 2 image (L2 table "
                               "%#x)" % l2off)

    def run(self) -> None:
        """Count the references of every metadata structure."""
        img = self.img
        h = img.header
        self.inc(0, self.cs)
        self.check_l1(img.l1_offset, img.l1_size, img.l1)
        for sn in img.snapshots:
            self.check_l1(sn.l1_table_offset, sn.l1_size, None)
        self.inc(h.snapshots_offset, img.snapshots_size)
        rc = img.refcounts
        self.inc(rc.table_offset, -(-len(rc.table) * 8 // self.cs) * self.cs)
        if h.bitmaps_ext is not None and h.autoclear_features & AUTOCLEAR_BITMAPS:
            self.inc(h.bitmaps_ext[2], h.bitmaps_ext[1])
            for bm in img.bitmaps:
                self.inc(bm.table_offset, bm.table_size * 8)
                table = self.load_table(bm.table_offset, bm.table_size * 8)
                for entry in table or ():
                    off = entry & L1E_OFFSET_MASK
                    if off:
                        self.inc(off, self.cs)
        self.check_refblocks()

    def check_refblocks(self) -> None:
        """Check and count the refcount blocks themselves."""
        rc = self.img.refcounts
        for ti, entry in enumerate(rc.table):
            off = entry & REFT_OFFSET_MASK
            if entry & ~REFT_OFFSET_MASK:
                self.res.error("ERROR refcount table entry %d has reserved bits set" % ti)
                continue
            if not off:
                continue
            if off & (self.cs - 1):
                self.res.error("ERROR refcount block %d is not cluster aligned; refcount "
                               "table entry corrupted" % ti)
                continue
            if off >= self.file_len:
                self.res.error("ERROR refcount block %d is outside image" % ti)
                continue
            self.inc(off, self.cs)

    def stored_refcount(self, index: int) -> Optional[int]:
        """The refcount stored for a cluster (None if unreadable).

        :param index: cluster index.
        :return: the refcount, or None.
        """
        try:
            return self.img.refcounts.get(index)
        except OSError as exc:
            self.res.check_errors += 1
            self.res.messages.append("Can't get refcount for cluster %d: %s" % (index, exc))
            return None

    def compare(self) -> Tuple[List[Tuple[int, int, int]], List[Tuple[int, int, int]]]:
        """Compare stored and computed refcounts.

        :return: ``(leaked, low)``: ``(index, stored, references)`` of the
            clusters whose refcount is too high, and too low.
        """
        leaked: List[Tuple[int, int, int]] = []
        low: List[Tuple[int, int, int]] = []
        rc = self.img.refcounts
        refs = self.refs
        per_block = 1 << rc.rb_bits
        for start in range(0, len(refs), per_block):
            stop = min(start + per_block, len(refs))
            ti = start >> rc.rb_bits
            blk = None
            if ti < len(rc.table) and rc.table[ti] & REFT_OFFSET_MASK:
                try:
                    blk = rc.block(ti)
                except OSError as exc:
                    self.res.check_errors += 1
                    self.res.messages.append("Can't get refcount block %d: %s" % (ti, exc))
                    continue
            if blk is not None and 3 <= rc.order <= 5:
                stored = blk.data[:stop - start]
                if array("I", stored) == refs[start:stop]:
                    continue
            elif blk is None and not any(refs[start:stop]):
                continue
            for i in range(start, stop):
                have = 0 if blk is None else rc._get_in(blk.data, i - start)
                want = refs[i]
                if have > want:
                    leaked.append((i, have, want))
                elif have < want:
                    low.append((i, have, want))
        return leaked, low

    def check_copied(self, fix: bool) -> int:
        """OFLAG_COPIED must be set exactly on clusters with refcount 1.

        :param fix: correct the flags in the cached tables.
        :return: mismatches found (fixed in the cache with ``fix``).
        """
        img = self.img
        found = 0
        for i, entry in enumerate(img.l1):
            l2off = entry & L1E_OFFSET_MASK
            if not l2off or l2off & (self.cs - 1) or l2off >= self.file_len:
                continue
            ref = self.stored_refcount(l2off >> self.cb)
            if ref is not None and (ref == 1) != bool(entry & OFLAG_COPIED):
                found += 1
                self.res.messages.append("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x "
                                         "refcount=%d" % ("Repairing" if fix else "ERROR",
                                                          i, entry, ref))
                if fix:
                    img.set_l1(i, entry | OFLAG_COPIED if ref == 1 else entry & ~OFLAG_COPIED)
            table = img.l2cache.get(l2off) if fix else None
            data = table.data if table is not None else self.load_table(l2off, self.cs)
            for idx, e in enumerate(data or ()):
                if not e or cluster_type(e) not in (NORMAL, ZERO_ALLOC):
                    continue
                ref = self.stored_refcount((e & L2E_OFFSET_MASK) >> self.cb)
                if ref is not None and (ref == 1) != bool(e & OFLAG_COPIED):
                    found += 1
                    self.res.messages.append("%s OFLAG_COPIED data cluster: l2_entry=%x "
                                             "refcount=%d" % ("Repairing" if fix else "ERROR",
                                                              e, ref))
                    if fix:
                        data[idx] = e | OFLAG_COPIED if ref == 1 else e & ~OFLAG_COPIED
                        table.dirty = True
        return found


def _report(res: CheckResult, leaked: list, low: list) -> None:
    """Count and describe unrepaired refcount mismatches.

    :param res: the result.
    :param leaked: (index, stored, references) of leaks.
    :param low: (index, stored, references) of too low refcounts.
    """
    for i, have, want in leaked:
        res.leaks += 1
        res.messages.append("Leaked cluster %d refcount=%d reference=%d" % (i, have, want))
    for i, have, want in low:
        res.error("ERROR cluster %d refcount=%d reference=%d" % (i, have, want))


def check_image(img: Any, repair: bool = False) -> CheckResult:
    """Check an open image; with ``repair``, fix what a crash leaves behind.

    Called with the image's lock held (or before the image is in use).
    Repair (QEMU's ``-r all`` as run when a dirty image is opened) happens
    only when no structural damage was found; afterwards the dirty bit is
    cleared.

    :param img: a :class:`.image.Qcow2Image`.
    :param repair: fix leaks, too low refcounts and COPIED flags (the image
        must be writable).
    :return: the result; ``messages`` lists what was found.
    """
    res = CheckResult()
    checker = _Checker(img, res)
    checker.run()
    structural = res.corruptions
    leaked, low = checker.compare()
    res.image_end_offset = img.file_end
    if not repair or img.read_only or structural or res.check_errors:
        _report(res, leaked, low)
        res.corruptions += checker.check_copied(fix=False)
        return res
    was = img.modifying
    img.modifying = True
    try:
        rc = img.refcounts
        # Missing refcount blocks go past everything the metadata references.
        end = max(len(checker.refs), -(-img.file_end // checker.cs))
        need = {i >> rc.rb_bits for i, _n, _v in low}
        if need and max(need) >= len(rc.table):
            rc._grow_table(end, max(need) + 1)
            end = -(-img.file_end // checker.cs)
        missing = sorted(ti for ti in need if not rc.table[ti] & REFT_OFFSET_MASK)
        if missing:
            rc._new_blocks(end, missing)
        for i, have, want in leaked + low:
            rc._set(i, want)
            if want == 0 and i < rc.free_index:
                rc.free_index = i
            res.messages.append("Repairing cluster %d refcount=%d reference=%d" % (i, have, want))
        copied = checker.check_copied(fix=True)
        img.flush_metadata()
        img.sync()
    finally:
        img.modifying = was
    res.leaks_fixed = len(leaked)
    res.corruptions_fixed = len(low) + copied
    img.mark_clean()
    return res
