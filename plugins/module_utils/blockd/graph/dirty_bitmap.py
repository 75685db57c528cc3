# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Named dirty bitmaps (QEMU's ``BdrvDirtyBitmap`` over an ``HBitmap``).

A :class:`DirtyBitmap` has one bit per ``granularity`` bytes of the node it
belongs to.  Bits are kept one per byte of a :class:`bytearray` (0/1), so
counting and finding runs are C-speed ``bytearray`` operations; the qcow2
on-disk layout (one bit per chunk, chunk ``i`` in bit ``i % 8`` of byte
``i // 8``) is produced by :meth:`DirtyBitmap.serialize` and read back by
:meth:`DirtyBitmap.deserialize`.

Every bitmap has its own lock: writes set bits from many NBD threads.

Node-level helpers follow ``block/dirty-bitmap.c``:

* :func:`attach` / :func:`release` add and drop a bitmap on a node (the list
  ``node.internal_bitmaps`` is shared with block-copy's anonymous bitmaps and
  shown newest first by query-named-block-nodes);
* :func:`find` is ``bdrv_find_dirty_bitmap()``;
* :func:`install_tracking` wraps the node's write, write-zeroes and discard
  methods so that an enabled bitmap is set for every request that reached the
  node before the request completes (``bdrv_co_write_req_finish()`` calls
  ``bdrv_set_dirty()`` whatever the request's result).  Nodes without
  bitmaps keep the driver's bound methods: no cost on their data path.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..errors import QMPError

#: QEMU's BDRV_BITMAP_MAX_NAME_SIZE.
MAX_NAME_SIZE = 1023
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31

#: bdrv_dirty_bitmap_check() flags.
BITMAP_BUSY = 1
BITMAP_RO = 2
BITMAP_INCONSISTENT = 4
BITMAP_DEFAULT = BITMAP_BUSY | BITMAP_RO | BITMAP_INCONSISTENT
BITMAP_ALLOW_RO = BITMAP_BUSY | BITMAP_INCONSISTENT

_TO_ASCII = bytes.maketrans(b"\x00\x01", b"01")
_FROM_ASCII = bytes.maketrans(b"01", b"\x00\x01")


def default_granularity(node: Any) -> int:
    """``bdrv_get_default_bitmap_granularity()``: the cluster size clamped to
    [4 KiB, 64 KiB], 64 KiB when the driver has no cluster size."""
    cs = None
    driver = getattr(node, "driver", None)
    if driver is not None:
        try:
            cs = driver.cluster_size()
        except Exception:  # noqa: BLE001 - no info: QEMU's default
            cs = None
    if not cs:
        return 65536
    return min(65536, max(4096, cs))


class DirtyBitmap:
    """One dirty bitmap over ``size`` bytes.

    :param size: the node length in bytes.
    :param granularity: bytes per bit (a power of two, >= 512).
    :param name: the bitmap name (None: anonymous, internal).
    """

    def __init__(self, size: int, granularity: int, name: Optional[str] = None) -> None:
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of two >= 512")
        self.name = name
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.nbits = -(-size // granularity)
        self.bits = bytearray(self.nbits)
        self.ndirty = 0
        self.lock = threading.Lock()
        #: ``bdrv_dirty_bitmap_enabled()``.
        self.enabled = True
        #: In use by an operation (busy): no QMP changes.
        self.busy = False
        #: Loaded IN_USE from a qcow2 image: contents unknown.
        self.inconsistent = False
        #: Loaded from a read-only image.
        self.readonly = False
        self.persistent = False
        #: Do not write back to the image (transaction remove in progress).
        self.skip_store = False
        self.node: Any = None
        #: The anonymous bitmap taking the writes while a backup uses this one
        #: (``bdrv_dirty_bitmap_create_successor()``).
        self.successor: Optional["DirtyBitmap"] = None

    # -- bits ---------------------------------------------------------------

    def _span(self, offset: int, length: int) -> Tuple[int, int]:
        first = max(0, offset >> self.shift)
        last = min(self.nbits, (offset + length + self.granularity - 1) >> self.shift)
        return first, last

    def set(self, offset: int, length: int) -> None:
        """``bdrv_set_dirty_bitmap()``: mark every chunk the range touches."""
        if length <= 0:
            return
        first, last = self._span(offset, length)
        if first >= last:
            return
        with self.lock:
            bits = self.bits
            if last - first == 1:
                if not bits[first]:
                    bits[first] = 1
                    self.ndirty += 1
                return
            before = bits.count(1, first, last)
            bits[first:last] = b"\x01" * (last - first)
            self.ndirty += (last - first) - before

    def reset(self, offset: int, length: int) -> None:
        """``bdrv_reset_dirty_bitmap()``: clear the chunks *inside* the range
        (a partial chunk at either end is cleared only at the disk's end)."""
        if length <= 0:
            return
        g = self.granularity
        first = -(-offset // g)
        end = offset + length
        last = self.nbits if end >= self.size else end // g
        first = max(0, first)
        if first >= last:
            return
        with self.lock:
            before = self.bits.count(1, first, last)
            self.bits[first:last] = bytes(last - first)
            self.ndirty -= before

    def get(self, offset: int) -> bool:
        """``bdrv_dirty_bitmap_get()``: whether the chunk of ``offset`` is dirty."""
        i = offset >> self.shift
        return 0 <= i < self.nbits and bool(self.bits[i])

    def set_all(self) -> None:
        """Every chunk dirty."""
        with self.lock:
            self.bits[:] = b"\x01" * self.nbits
            self.ndirty = self.nbits

    def clear(self) -> bytearray:
        """``bdrv_clear_dirty_bitmap()``: reset everything.

        :return: the former bits (the ``backup`` that :meth:`restore` takes).
        """
        with self.lock:
            old = self.bits
            self.bits = bytearray(self.nbits)
            self.ndirty = 0
            return old

    def copy_bits(self) -> bytearray:
        """A snapshot of the bits (for transaction rollback)."""
        with self.lock:
            return bytearray(self.bits)

    def restore(self, backup: bytearray) -> None:
        """``bdrv_restore_dirty_bitmap()``: put back what :meth:`clear` returned."""
        with self.lock:
            self.bits = bytearray(backup)
            self.ndirty = self.bits.count(1)

    def count(self) -> int:
        """``bdrv_get_dirty_count()``: dirty bytes (whole chunks)."""
        return self.ndirty << self.shift

    dirty_bytes = count

    def next_dirty(self, offset: int, end: int) -> int:
        """``bdrv_dirty_bitmap_next_dirty()``: first dirty byte in ``[offset, end)``, or -1."""
        end = min(end, self.size)
        if offset >= end:
            return -1
        i = self.bits.find(1, offset >> self.shift, (end - 1 >> self.shift) + 1)
        if i < 0:
            return -1
        return max(offset, i << self.shift)

    def next_zero(self, offset: int, end: int) -> int:
        """``bdrv_dirty_bitmap_next_zero()``: first clean byte in ``[offset, end)``, or -1."""
        end = min(end, self.size)
        if offset >= end:
            return -1
        i = self.bits.find(0, offset >> self.shift, (end - 1 >> self.shift) + 1)
        if i < 0:
            return -1
        return max(offset, i << self.shift)

    def next_dirty_area(self, offset: int, end: int,
                        max_len: Optional[int] = None) -> Optional[Tuple[int, int]]:
        """``bdrv_dirty_bitmap_next_dirty_area()``: the first dirty run in
        ``[offset, end)`` as ``(start, length)`` (at most ``max_len``), or None."""
        start = self.next_dirty(offset, end)
        if start < 0:
            return None
        end = min(end, self.size)
        if max_len is not None:
            end = min(end, start + max_len)
        stop = self.next_zero(start, end)
        if stop < 0:
            stop = end
        return start, stop - start

    def dirty_ranges(self) -> Iterator[Tuple[int, int]]:
        """Every dirty run as ``(offset, length)``, in order."""
        offset = 0
        while True:
            area = self.next_dirty_area(offset, self.size)
            if area is None:
                return
            yield area
            offset = area[0] + area[1]

    def merge_from(self, src: "DirtyBitmap") -> None:
        """``hbitmap_merge()``: OR ``src`` into this bitmap (granularities may differ)."""
        if src is self:
            return
        bits = src.copy_bits()
        if src.granularity == self.granularity:
            with self.lock:
                n = min(len(bits), self.nbits)
                merged = int.from_bytes(self.bits[:n], "big") | int.from_bytes(bits[:n], "big")
                self.bits[:n] = merged.to_bytes(n, "big") if n else b""
                self.ndirty = self.bits.count(1)
            return
        g = src.granularity
        i = bits.find(1)
        while i >= 0:
            j = bits.find(0, i)
            if j < 0:
                j = len(bits)
            self.set(i * g, (j - i) * g)
            i = bits.find(1, j)

    def truncate(self, size: int) -> None:
        """``bdrv_dirty_bitmap_truncate()``: new chunks are clean."""
        with self.lock:
            n = -(-size // self.granularity)
            if n < self.nbits:
                del self.bits[n:]
            else:
                self.bits.extend(bytes(n - self.nbits))
            self.nbits, self.size = n, size
            self.ndirty = self.bits.count(1)

    # -- on-disk layout -----------------------------------------------------

    def serialize(self) -> bytes:
        """The bits packed as the qcow2 bitmap data (chunk ``i`` = bit ``i % 8``
        of byte ``i // 8``), ``ceil(nbits / 8)`` bytes."""
        with self.lock:
            nbytes = -(-self.nbits // 8)
            if not self.ndirty:
                return bytes(nbytes)
            text = bytes(reversed(self.bits)).translate(_TO_ASCII)
        return int(text, 2).to_bytes(nbytes, "little")

    def deserialize(self, data: bytes) -> None:
        """Load the packed bits of :meth:`serialize` (extra bits are ignored)."""
        value = int.from_bytes(data, "little")
        text = format(value, "b").encode()[::-1].translate(_FROM_ASCII) if value else b""
        bits = bytearray(text[:self.nbits])
        bits.extend(bytes(self.nbits - len(bits)))
        with self.lock:
            self.bits = bits
            self.ndirty = bits.count(1)

    # -- state --------------------------------------------------------------

    def check(self, flags: int) -> None:
        """``bdrv_dirty_bitmap_check()``: raise QEMU's error for a state in ``flags``."""
        if flags & BITMAP_BUSY and self.busy:
            raise QMPError("Bitmap '%s' is currently in use by another operation and "
                           "cannot be used" % self.name)
        if flags & BITMAP_RO and self.readonly:
            raise QMPError("Bitmap '%s' is readonly and cannot be modified" % self.name)
        if flags & BITMAP_INCONSISTENT and self.inconsistent:
            # QEMU appends "Try block-dirty-bitmap-remove..." as a hint, not in the reply
            raise QMPError("Bitmap '%s' is inconsistent and cannot be used" % self.name)

    def query_info(self) -> Dict[str, Any]:
        """QAPI ``BlockDirtyInfo`` (``bdrv_query_dirty_bitmaps()``), in qsd's member order."""
        info: Dict[str, Any] = {}
        if self.name is not None:
            info["name"] = self.name
        # bdrv_dirty_bitmap_recording(): an enabled successor records for it
        recording = self.enabled or (self.successor is not None and self.successor.enabled)
        info.update({"recording": recording, "persistent": self.persistent,
                     "busy": self.busy, "granularity": self.granularity,
                     "count": self.count()})
        if self.inconsistent:
            info["inconsistent"] = True
        return info

    def __repr__(self) -> str:
        return "<DirtyBitmap %r g=%d count=%d>" % (self.name, self.granularity, self.count())


# -- node level -----------------------------------------------------------------

def bitmaps_of(node: Any) -> List[Any]:
    """The node's bitmaps, oldest first (named and block-copy's anonymous ones)."""
    return getattr(node, "internal_bitmaps", None) or []


def find(node: Any, name: str) -> Optional[DirtyBitmap]:
    """``bdrv_find_dirty_bitmap()``."""
    for bm in bitmaps_of(node):
        if isinstance(bm, DirtyBitmap) and bm.name == name:
            return bm
    return None


def named(node: Any) -> List[DirtyBitmap]:
    """The node's named bitmaps, oldest first."""
    return [bm for bm in bitmaps_of(node) if isinstance(bm, DirtyBitmap) and bm.name is not None]


def attach(node: Any, bitmap: DirtyBitmap) -> DirtyBitmap:
    """Add ``bitmap`` to ``node`` and start tracking its writes."""
    lst = getattr(node, "internal_bitmaps", None)
    if lst is None:
        lst = node.internal_bitmaps = []
    bitmap.node = node
    lst.append(bitmap)
    node.find_dirty_bitmap = lambda name, _node=node: find(_node, name)
    install_tracking(node)
    return bitmap


def release(bitmap: DirtyBitmap) -> None:
    """``bdrv_release_dirty_bitmap()``: drop it from its node."""
    node = bitmap.node
    if node is None:
        return
    try:
        node.internal_bitmaps.remove(bitmap)
    except (AttributeError, ValueError):
        pass
    bitmap.node = None
    if not any(isinstance(bm, DirtyBitmap) for bm in bitmaps_of(node)):
        uninstall_tracking(node)


def create(node: Any, name: Optional[str], granularity: int) -> DirtyBitmap:
    """``bdrv_create_dirty_bitmap()``: checks and attach.

    :raise QMPError: QEMU's texts for a taken or too long name.
    """
    if name is not None:
        if find(node, name) is not None:
            raise QMPError("Bitmap already exists: %s" % name)
        if len(name.encode()) > MAX_NAME_SIZE:
            raise QMPError("Bitmap name too long: %s" % name)
    return attach(node, DirtyBitmap(node.getlength(), granularity, name))


def _mark(node: Any, offset: int, length: int) -> None:
    """``bdrv_co_write_req_finish()``: a write past the end grows the node's
    bitmaps (to the sector), then ``bdrv_set_dirty()`` sets the enabled ones."""
    end = offset + length
    for bm in tuple(getattr(node, "internal_bitmaps", ())):  # QMP may add/remove meanwhile
        if isinstance(bm, DirtyBitmap):
            if end > bm.size:
                bm.truncate(-(-end // 512) * 512)
            if bm.enabled:
                bm.set(offset, length)


_TRACKED = ("pwrite", "pwrite_zeroes", "pdiscard")


def install_tracking(node: Any) -> None:
    """Wrap the node's write paths (idempotent; re-run by ``Node.set_driver``).

    Parents that bound this node's methods directly (``raw`` without an
    offset binds its child's) are re-pointed too, so their writes are tracked.
    """
    node.bitmap_hook = install_tracking
    if not hasattr(node, "pwrite") or getattr(node.pwrite, "_bitmap_tracking", False):
        return  # no driver bound yet: set_driver() calls back
    inner = {attr: getattr(node, attr) for attr in _TRACKED}

    def tracked_pwrite(offset: int, data: Any, flags: int = 0) -> None:
        try:
            node._bitmap_untracked["pwrite"](offset, data, flags)
        finally:
            _mark(node, offset, len(data))

    def tracked_zeroes(offset: int, length: int, flags: int = 0) -> None:
        try:
            node._bitmap_untracked["pwrite_zeroes"](offset, length, flags)
        finally:
            _mark(node, offset, length)

    def tracked_discard(offset: int, length: int) -> None:
        try:
            node._bitmap_untracked["pdiscard"](offset, length)
        finally:
            _mark(node, offset, length)

    new = {"pwrite": tracked_pwrite, "pwrite_zeroes": tracked_zeroes}
    # bdrv_co_pdiscard() returns before tracking without BDRV_O_UNMAP
    if getattr(inner["pdiscard"], "__name__", "") != "_ignore_discard":
        new["pdiscard"] = tracked_discard
    for func in new.values():
        func._bitmap_tracking = True  # type: ignore[attr-defined]
    node._bitmap_untracked = inner
    for attr, func in new.items():
        setattr(node, attr, func)
    _swap(node, {attr: inner[attr] for attr in new}, new)


def uninstall_tracking(node: Any) -> None:
    """Put the driver's own methods back (the node has no bitmaps left)."""
    saved = getattr(node, "_bitmap_untracked", None)
    if saved is None:
        return
    old = {attr: getattr(node, attr) for attr in _TRACKED
           if getattr(node, attr) is not saved[attr]}
    for attr, func in saved.items():
        setattr(node, attr, func)
    node._bitmap_untracked = None
    node.bitmap_hook = None
    _swap(node, old, {attr: saved[attr] for attr in old})


def _swap(node: Any, old: Dict[str, Any], new: Dict[str, Any]) -> None:
    """Re-point parents that hold ``node``'s former methods (by identity),
    up the graph as far as they were passed on."""
    for edge in list(getattr(node, "parents", ())):
        parent = edge.parent
        moved_old: Dict[str, Any] = {}
        moved_new: Dict[str, Any] = {}
        for attr, func in old.items():
            drv = getattr(parent, "driver", None)
            if drv is not None and vars(drv).get(attr) is func:
                setattr(drv, attr, new[attr])
            saved = vars(parent).get("_bitmap_untracked")
            if saved is not None and saved.get(attr) is func:
                saved[attr] = new[attr]          # the parent's own wrapper calls it
            elif vars(parent).get(attr) is func:
                setattr(parent, attr, new[attr])
                moved_old[attr], moved_new[attr] = func, new[attr]
        if moved_old:
            _swap(parent, moved_old, moved_new)


def sizes_changed(nodes: Any) -> None:
    """After a resize (``bdrv_co_truncate()`` -> ``bdrv_dirty_bitmap_truncate()``):
    every bitmap follows its node's new length; a grown area is clean."""
    for node in nodes:
        bms = [bm for bm in bitmaps_of(node) if isinstance(bm, DirtyBitmap)]
        if not bms:
            continue
        size = node.getlength()
        for bm in bms:
            if bm.size != size:
                bm.truncate(size)


# -- successors (a backup's frozen bitmap) -------------------------------------------

def create_successor(bitmap: DirtyBitmap) -> DirtyBitmap:
    """``bdrv_dirty_bitmap_create_successor()``: an anonymous bitmap of the same
    granularity takes the writes (enabled as ``bitmap`` was); ``bitmap`` is
    disabled and busy.

    :raise QMPError: the bitmap is busy or already has a successor.
    """
    bitmap.check(BITMAP_BUSY)
    if bitmap.successor is not None:
        raise QMPError("Cannot create a successor for a bitmap that already has one")
    child = attach(bitmap.node, DirtyBitmap(bitmap.node.getlength(), bitmap.granularity))
    child.enabled = bitmap.enabled
    bitmap.enabled = False
    bitmap.successor = child
    bitmap.busy = True
    return child


def abdicate(bitmap: DirtyBitmap) -> DirtyBitmap:
    """``bdrv_dirty_bitmap_abdicate()``: the successor takes the name and the
    persistence, ``bitmap`` is released; return the successor."""
    child = bitmap.successor
    if child is None:
        raise AssertionError("bitmap %r has no successor" % bitmap.name)
    child.name, bitmap.name = bitmap.name, None
    child.persistent, bitmap.persistent = bitmap.persistent, False
    bitmap.successor = None
    bitmap.busy = False
    release(bitmap)
    return child


def reclaim(bitmap: DirtyBitmap) -> DirtyBitmap:
    """``bdrv_reclaim_dirty_bitmap()``: merge the successor back into ``bitmap``,
    which records again as the successor did; the successor is released."""
    child = bitmap.successor
    if child is None:
        raise AssertionError("bitmap %r has no successor" % bitmap.name)
    bitmap.enabled = child.enabled   # writes from here on land in both, then in bitmap
    release(child)
    bitmap.merge_from(child)
    bitmap.busy = False
    bitmap.successor = None
    return bitmap
