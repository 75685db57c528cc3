# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Persistent dirty bitmaps in the qcow2 bitmaps extension.

QEMU's ``block/qcow2-bitmap.c`` over the layout of docs/interop/qcow2.txt:
the header extension 0x23852875 points to the bitmap directory; each
directory entry points to a bitmap table of 8-byte entries, one per cluster
of bitmap data (0: all zeroes, 1: all ones, else the cluster's offset).

* :func:`load` (``qcow2_load_dirty_bitmaps()``) runs at open: every bitmap of
  the directory becomes a persistent :class:`~blockd.graph.dirty_bitmap.DirtyBitmap`
  of the node, recording if it has the AUTO flag; one found IN_USE is loaded
  empty and *inconsistent*.  A read/write open marks the directory's
  bitmaps IN_USE on disk, in place, so a crash leaves them inconsistent.
* :func:`store` (``qcow2_store_persistent_dirty_bitmaps()``) runs at close:
  the data of every persistent, consistent bitmap is written to new
  clusters, then a new directory without IN_USE flags, then the header; the
  old tables and directory are freed through the refcount code.
* :func:`can_store_new` / :func:`remove_persistent` back
  block-dirty-bitmap-add (persistent) and -remove.

The parsed directory stays in ``img.bitmaps`` (``header.BitmapEntry``) and
``img.header.bitmaps_ext``, which ``check.py``, the overlap checks and
``format-specific`` read.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, List, Optional

from ...errors import QMPError
from ...graph import dirty_bitmap as dbm
from . import header as hdr

LOG = logging.getLogger(__name__)

#: QEMU's BME_* limits (block/qcow2-bitmap.c).
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MAX_GRANULARITY_BITS = 31
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_NAME_SIZE = 1023
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
_BME = struct.Struct(">QIIBBHI")


def _entry_size(name_size: int, extra: int) -> int:
    """``calc_dir_entry_size()``."""
    return (_BME.size + name_size + extra + 7) & ~7


def _data_bytes(size: int, granularity: int) -> int:
    """Bytes of packed bitmap data for ``size`` bytes of disk."""
    return -(-(-(-size // granularity)) // 8)


def _can_write(img: Any) -> bool:
    """``can_write()``: read/write open, not creating, not broken."""
    return not img.read_only and not img.opts.creating and not img.fatal


# -- loading ------------------------------------------------------------------------

def _read_bitmap_data(img: Any, ent: hdr.BitmapEntry, nbytes: int) -> bytes:
    """``load_bitmap_data()``: the packed bits of ``ent``."""
    cs = img.cluster_size
    raw = img.read(ent.table_offset, ent.table_size * 8)
    table = struct.unpack(">%dQ" % ent.table_size, raw)
    out = bytearray()
    for entry in table:
        if len(out) >= nbytes:
            break
        n = min(cs, nbytes - len(out))
        off = entry & BME_TABLE_ENTRY_OFFSET_MASK
        if entry & ~(BME_TABLE_ENTRY_OFFSET_MASK | BME_TABLE_ENTRY_FLAG_ALL_ONES) or \
                (off and entry & BME_TABLE_ENTRY_FLAG_ALL_ONES) or off % cs:
            raise QMPError("Could not read bitmap '%s' from image: bitmap table entry is "
                           "corrupted" % ent.name)
        if off:
            out += img.read(off, n)
        elif entry & BME_TABLE_ENTRY_FLAG_ALL_ONES:
            out += b"\xff" * n
        else:
            out += bytes(n)
    out.extend(bytes(nbytes - len(out)))
    return bytes(out)


def load(driver: Any) -> None:
    """``qcow2_load_dirty_bitmaps()``: attach the image's bitmaps to the node."""
    img, node = driver.img, driver.node
    if not img.bitmaps or img.opts.creating:
        return
    writable = _can_write(img)
    needs_update = False
    for ent in img.bitmaps:
        if dbm.find(node, ent.name) is not None:
            continue
        bitmap = dbm.DirtyBitmap(img.size, 1 << ent.granularity_bits, ent.name)
        bitmap.persistent = True
        if ent.flags & hdr.BME_FLAG_IN_USE:
            bitmap.inconsistent = True   # bdrv_dirty_bitmap_set_inconsistent()
            bitmap.enabled = False
        else:
            bitmap.deserialize(_read_bitmap_data(
                img, ent, _data_bytes(img.size, bitmap.granularity)))
            if writable:  # NB: flags only change on disk if we can write
                ent.flags |= hdr.BME_FLAG_IN_USE
                needs_update = True
        if not ent.flags & hdr.BME_FLAG_AUTO:
            bitmap.enabled = False
        if not writable:
            bitmap.readonly = True
        dbm.attach(node, bitmap)
    if needs_update and writable:
        _write_flags_in_place(img)


def _write_flags_in_place(img: Any) -> None:
    """``update_ext_header_and_dir_in_place()`` for flag changes: rewrite the
    flags word of each entry where it is, then a barrier."""
    with img.lock:
        doff = img.header.bitmaps_ext[2]
        for ent in img.bitmaps:
            img.write(doff + ent.dir_pos + 12, struct.pack(">I", ent.flags))
        img.sync()


# -- checks for new bitmaps ---------------------------------------------------------------

def can_store_new(driver: Any, name: str, granularity: int) -> None:
    """``qcow2_co_can_store_new_dirty_bitmap()``.

    :raise QMPError: QEMU's text, prefixed ``Can't make bitmap ... persistent in ...``.
    """
    img = driver.img
    try:
        if img.version < 3:
            raise QMPError("Cannot store dirty bitmaps in qcow2 v2 files")
        gbits = granularity.bit_length() - 1
        if gbits > BME_MAX_GRANULARITY_BITS:
            raise QMPError("Granularity exceeds maximum (%d bytes)"
                           % (1 << BME_MAX_GRANULARITY_BITS))
        if gbits < BME_MIN_GRANULARITY_BITS:
            raise QMPError("Granularity is under minimum (%d bytes)"
                           % (1 << BME_MIN_GRANULARITY_BITS))
        length = img.size
        # the limits are bytes of bitmap data: 8 chunks a byte
        if length > BME_MAX_PHYS_SIZE << (gbits + 3) or \
                length > (BME_MAX_TABLE_SIZE * img.cluster_size) << (gbits + 3):
            raise QMPError("Too much space will be occupied by the bitmap. "
                           "Use larger granularity")
        if len(name.encode()) > BME_MAX_NAME_SIZE:
            raise QMPError("Name length exceeds maximum (%d characters)" % BME_MAX_NAME_SIZE)
        stored = {ent.name for ent in img.bitmaps}
        nb = len(img.bitmaps)
        dir_size = img.header.bitmaps_ext[1] if img.header.bitmaps_ext else 0
        for bm in dbm.named(driver.node):
            if bm.persistent and bm.name not in stored:
                nb += 1
                dir_size += _entry_size(len(bm.name.encode()), 0)
        nb += 1
        dir_size += _entry_size(len(name.encode()), 0)
        if nb > hdr.MAX_BITMAPS:
            raise QMPError("Maximum number of persistent bitmaps is already reached")
        if dir_size > hdr.MAX_BITMAP_DIRECTORY_SIZE:
            raise QMPError("Not enough space in the bitmap directory")
    except QMPError as exc:
        raise QMPError("Can't make bitmap '%s' persistent in '%s': %s"
                       % (name, driver.node.name, exc.desc if hasattr(exc, "desc") else exc))


# -- writing --------------------------------------------------------------------------

def _serialize_directory(entries: List[hdr.BitmapEntry]) -> bytes:
    """``bitmap_list_store()``'s directory bytes; sets each entry's ``dir_pos``."""
    out = bytearray()
    for ent in entries:
        ent.dir_pos = len(out)
        name = ent.name.encode()
        out += _BME.pack(ent.table_offset, ent.table_size, ent.flags, ent.type,
                         ent.granularity_bits, len(name), len(ent.extra_data))
        out += ent.extra_data + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def _write_directory(img: Any, entries: List[hdr.BitmapEntry]) -> None:
    """``update_ext_header_and_dir()``: new directory, barrier, header, barrier,
    free the old directory (locked by the caller)."""
    h = img.header
    old = h.bitmaps_ext
    if entries:
        data = _serialize_directory(entries)
        off = img.refcounts.alloc(len(data))
        img.check_new_metadata(off, len(data))
        img.write(off, data)
        img.refcounts.write_dirty()
        img.sync()
        h.bitmaps_ext = (len(entries), len(data), off)
        h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS
    else:
        h.bitmaps_ext = None
        h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
    img.update_header()
    img.sync()
    img.bitmaps = entries
    if old is not None:
        img.refcounts.free(old[2], old[1])


def _free_table(img: Any, ent: hdr.BitmapEntry) -> None:
    """``free_bitmap_clusters()``: the data clusters and the table of ``ent``."""
    if not ent.table_offset:
        return
    raw = img.read(ent.table_offset, ent.table_size * 8)
    for entry in struct.unpack(">%dQ" % ent.table_size, raw):
        off = entry & BME_TABLE_ENTRY_OFFSET_MASK
        if off:
            img.refcounts.free(off, img.cluster_size)
    img.refcounts.free(ent.table_offset, ent.table_size * 8)


def _write_bitmap(img: Any, bitmap: dbm.DirtyBitmap, ent: hdr.BitmapEntry) -> None:
    """``store_bitmap()``: data clusters (zero clusters are not written) and table."""
    cs = img.cluster_size
    data = bitmap.serialize()
    nclusters = -(-len(data) // cs)
    table = [0] * nclusters
    for i in range(nclusters):
        chunk = data[i * cs:(i + 1) * cs]
        if chunk.count(0) == len(chunk):
            continue
        off = img.refcounts.alloc(cs)
        img.check_new_metadata(off, cs)
        img.write(off, chunk + bytes(cs - len(chunk)))
        table[i] = off
    toff = img.refcounts.alloc(nclusters * 8)
    img.check_new_metadata(toff, nclusters * 8)
    img.write(toff, struct.pack(">%dQ" % nclusters, *table))
    ent.table_offset, ent.table_size = toff, nclusters


def store(driver: Any) -> None:
    """``qcow2_store_persistent_dirty_bitmaps()``: write every persistent,
    consistent bitmap and a directory without IN_USE flags (at close)."""
    img, node = driver.img, driver.node
    if not _can_write(img):
        return
    mine = [bm for bm in dbm.named(node) if bm.persistent and not bm.skip_store]
    if not mine and not img.bitmaps:
        return
    with img.lock:
        img.begin_modify()
        by_name = {ent.name: ent for ent in img.bitmaps}
        entries = list(img.bitmaps)
        drop: List[hdr.BitmapEntry] = []
        for bm in reversed(mine):  # FOR_EACH_DIRTY_BITMAP: newest first
            if bm.inconsistent:
                continue  # stays in the directory as found: IN_USE
            ent = by_name.get(bm.name)
            if ent is None:
                ent = hdr.BitmapEntry(0)
                ent.name = bm.name
                entries.append(ent)
            else:
                old = hdr.BitmapEntry(0)
                old.table_offset, old.table_size = ent.table_offset, ent.table_size
                drop.append(old)
            ent.flags = hdr.BME_FLAG_AUTO if bm.enabled else 0
            ent.granularity_bits = bm.shift
            ent.extra_data = b""
            if bm.readonly:
                continue
            _write_bitmap(img, bm, ent)
        img.refcounts.write_dirty()
        img.sync()
        _write_directory(img, entries)
        for old in drop:
            _free_table(img, old)


def remove_persistent(driver: Any, name: str) -> None:
    """``qcow2_co_remove_persistent_dirty_bitmap()``: take ``name`` out of the
    directory now (a bitmap never stored is not an error)."""
    img = driver.img
    ent = next((e for e in img.bitmaps if e.name == name), None)
    if ent is None:
        return
    if not _can_write(img):
        raise QMPError("Can't remove persistent bitmap '%s' from a read-only image" % name)
    with img.lock:
        img.begin_modify()
        _write_directory(img, [e for e in img.bitmaps if e is not ent])
        _free_table(img, ent)
        img.flush_metadata()
        img.sync()


def shutdown(driver: Any) -> Optional[str]:
    """Store at close; errors are logged (the close goes on), as QEMU warns.

    :return: the error text, if any.
    """
    try:
        store(driver)
    except (OSError, QMPError) as exc:
        LOG.warning("Failed to store persistent dirty bitmaps of %s: %s", driver.node.name, exc)
        return str(exc)
    return None
