# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The copy plan: which block-aligned extents are data, zero, hole or unchanged.

Follows what ``qemu-img convert`` does with block status
(``convert_iteration_sectors``: skip ranges the source reports as zero) and
what an incremental backup job does with a dirty bitmap (``backup`` with
``sync=incremental``: copy only dirty clusters, here on the client side).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

from .manifest import BLOCK

Interval = Tuple[int, int]  # [start, end)
Extent = Tuple[int, int, str]  # offset, length, type

#: Largest data extent in a manifest (resume and checksum granularity).
MAX_EXTENT = 64 << 20
NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2
NBD_STATE_DIRTY = 1


def merge(intervals: Iterable[Interval]) -> List[Interval]:
    """Sort and merge overlapping/adjacent intervals."""
    out: List[Interval] = []
    for s, e in sorted(i for i in intervals if i[1] > i[0]):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def align_out(intervals: Iterable[Interval], size: int) -> List[Interval]:
    """Widen to whole blocks (clipped to ``size``) and merge."""
    return merge((s // BLOCK * BLOCK, min(size, -(-e // BLOCK) * BLOCK))
                 for s, e in intervals if s < size)


def subtract(a: Sequence[Interval], b: Sequence[Interval]) -> List[Interval]:
    """``a`` minus ``b`` (both merged)."""
    out: List[Interval] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, pos = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < e:
            out.append((pos, e))
    return out


def intersect(a: Sequence[Interval], b: Sequence[Interval]) -> List[Interval]:
    """``a`` and ``b`` (both merged)."""
    out: List[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def split_data(intervals: Sequence[Interval]) -> List[Interval]:
    """Cut data runs into extents of at most :data:`MAX_EXTENT`."""
    out: List[Interval] = []
    for s, e in intervals:
        out.extend((o, min(e, o + MAX_EXTENT)) for o in range(s, e, MAX_EXTENT))
    return out


def make_plan(size: int, status: Sequence[Tuple[int, int, int]],
              dirty: Optional[Sequence[Interval]] = None) -> List[Extent]:
    """Block-aligned extents tiling ``[0, size)``.

    :param status: ``base:allocation`` extents ``(offset, length, flags)``.
    :param dirty: for an incremental, the ranges to copy; everything else is
        ``unchanged`` (taken from the base backup).
    :return: ``(offset, length, type)``; a block holding any data is data.
    """
    data = align_out(((o, o + n) for o, n, f in status if not f & NBD_STATE_ZERO), size)
    holes = [(o, o + n) for o, n, f in status if f & NBD_STATE_HOLE]
    whole = [(0, size)] if size else []
    typed: List[Extent] = []
    if dirty is None:
        scope = whole
    else:
        scope = align_out(dirty, size)
        typed += [(s, e - s, "unchanged") for s, e in subtract(whole, scope)]
    data = intersect(data, scope)
    typed += [(s, e - s, "data") for s, e in split_data(data)]
    zero_runs = subtract(scope, data)
    hole_cover = merge(holes)
    for s, e in zero_runs:
        kind = "hole" if subtract([(s, e)], hole_cover) == [] else "zero"
        typed.append((s, e - s, kind))
    return sorted(typed)


def plan_from_dirty_status(extents: Sequence[Tuple[int, int, int]]) -> List[Interval]:
    """Dirty ranges from a ``qemu:dirty-bitmap:NAME`` map (flag 1 = dirty)."""
    return [(o, o + n) for o, n, f in extents if f & NBD_STATE_DIRTY]
