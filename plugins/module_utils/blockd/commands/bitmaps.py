# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``block-dirty-bitmap-*`` commands and their transaction actions.

Follows QEMU 7.2's ``block/monitor/bitmap-qmp-cmds.c`` (checks, their order
and texts) and the bitmap actions of ``blockdev.c``'s ``qmp_transaction()``
(prepare/commit/abort).  The bitmaps themselves are
:class:`~blockd.graph.dirty_bitmap.DirtyBitmap`; persistent ones are stored
by the qcow2 driver (:mod:`blockd.drivers.qcow2.bitmaps`).  They are listed
in query-named-block-nodes' ``dirty-bitmaps`` (``commands/block.py``).
"""

from __future__ import annotations

import errno
import os
from typing import Any, Dict, List, Optional, Tuple

from ..errors import QMPError
from ..graph import dirty_bitmap as dbm
from . import command


def _qcow2_bitmaps(node: Any) -> Any:
    """The qcow2 bitmap store of ``node``, or None for other drivers."""
    driver = getattr(node, "driver", None)
    if getattr(driver, "format_name", "") != "qcow2" or not hasattr(driver, "img"):
        return None
    from ..drivers.qcow2 import bitmaps as qbm
    return qbm


def lookup(daemon: Any, node_name: str, name: str) -> Tuple[Any, dbm.DirtyBitmap]:
    """``block_dirty_bitmap_lookup()``."""
    node = daemon.graph.find(node_name)
    if node is None:
        raise QMPError("Node '%s' not found" % node_name)
    bitmap = dbm.find(node, name)
    if bitmap is None:
        raise QMPError("Dirty bitmap '%s' not found" % name)
    return node, bitmap


def add(daemon: Any, args: Dict[str, Any]) -> dbm.DirtyBitmap:
    """``qmp_block_dirty_bitmap_add()``: checks in QEMU's order, then create."""
    name = args["name"]
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    node = daemon.graph.lookup(args["node"], device=args["node"])
    if "granularity" in args:
        granularity = args["granularity"]
        if granularity > 0xFFFFFFFF or granularity < 0:
            raise QMPError("Parameter 'granularity' expects uint32_t")
        if granularity < dbm.MIN_GRANULARITY or granularity & (granularity - 1):
            raise QMPError("Granularity must be power of 2 and at least 512")
    else:
        granularity = dbm.default_granularity(node)
    persistent = bool(args.get("persistent", False))
    if persistent:
        qbm = _qcow2_bitmaps(node)
        if qbm is None:
            raise QMPError("Can't store persistent bitmaps to %s: %s"
                           % (node.name, os.strerror(errno.ENOTSUP)))
        qbm.can_store_new(node.driver, name, granularity)
    bitmap = dbm.create(node, name, granularity)
    if args.get("disabled", False):
        bitmap.enabled = False
    bitmap.persistent = persistent
    return bitmap


def remove(daemon: Any, node_name: str, name: str, release: bool) -> dbm.DirtyBitmap:
    """``block_dirty_bitmap_remove()``: a persistent bitmap leaves the image at once."""
    node, bitmap = lookup(daemon, node_name, name)
    bitmap.check(dbm.BITMAP_BUSY | dbm.BITMAP_RO)
    if bitmap.persistent:
        qbm = _qcow2_bitmaps(node)
        if qbm is not None:
            qbm.remove_persistent(node.driver, name)
    if release:
        dbm.release(bitmap)
    return bitmap


def merge(daemon: Any, node_name: str, target: str,
          sources: List[Any]) -> Tuple[dbm.DirtyBitmap, bytearray]:
    """``block_dirty_bitmap_merge()``: sources are OR-ed into an anonymous
    bitmap first, so the target is unchanged on any error.

    :return: the target and its former bits (for rollback).
    """
    node, dst = lookup(daemon, node_name, target)
    anon = dbm.DirtyBitmap(dst.size, dst.granularity)
    for src_ref in sources:
        if isinstance(src_ref, str):
            src = dbm.find(node, src_ref)
            if src is None:
                raise QMPError("Dirty bitmap '%s' not found" % src_ref)
        else:
            src = lookup(daemon, src_ref["node"], src_ref["name"])[1]
        _check_merge(anon, src)
        anon.merge_from(src)
    _check_merge(dst, anon)
    backup = dst.copy_bits()
    dst.merge_from(anon)
    return dst, backup


def _check_merge(dest: dbm.DirtyBitmap, src: dbm.DirtyBitmap) -> None:
    """``bdrv_merge_dirty_bitmap()``'s checks."""
    dest.check(dbm.BITMAP_DEFAULT)
    src.check(dbm.BITMAP_ALLOW_RO)
    if dest.size != src.size:
        raise QMPError("Bitmaps are of different sizes (destination size is %d, source size "
                       "is %d) and can't be merged" % (dest.size, src.size))


# -- commands ---------------------------------------------------------------------

@command("block-dirty-bitmap-add")
def block_dirty_bitmap_add(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Create a named bitmap on a node."""
    add(daemon, args)
    return {}


@command("block-dirty-bitmap-remove")
def block_dirty_bitmap_remove(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Drop a bitmap (and its stored copy)."""
    remove(daemon, args["node"], args["name"], True)
    return {}


@command("block-dirty-bitmap-clear")
def block_dirty_bitmap_clear(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_dirty_bitmap_clear()``."""
    bitmap = lookup(daemon, args["node"], args["name"])[1]
    bitmap.check(dbm.BITMAP_DEFAULT)
    bitmap.clear()
    return {}


@command("block-dirty-bitmap-enable")
def block_dirty_bitmap_enable(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_dirty_bitmap_enable()``."""
    bitmap = lookup(daemon, args["node"], args["name"])[1]
    bitmap.check(dbm.BITMAP_ALLOW_RO)
    bitmap.enabled = True
    return {}


@command("block-dirty-bitmap-disable")
def block_dirty_bitmap_disable(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_dirty_bitmap_disable()``."""
    bitmap = lookup(daemon, args["node"], args["name"])[1]
    bitmap.check(dbm.BITMAP_ALLOW_RO)
    bitmap.enabled = False
    return {}


@command("block-dirty-bitmap-merge")
def block_dirty_bitmap_merge(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """``qmp_block_dirty_bitmap_merge()``."""
    merge(daemon, args["node"], args["target"], args["bitmaps"])
    return {}


# -- transaction actions (blockdev.c's block_dirty_bitmap_*_prepare/abort/commit) ----
# ``state`` is a commands.transaction.ActionState: .daemon, .data, .priv.

def add_prepare(state: Any) -> None:
    """``block_dirty_bitmap_add_prepare()``."""
    state.priv = add(state.daemon, state.data)


def add_abort(state: Any) -> None:
    """``block_dirty_bitmap_add_abort()``: drop the bitmap prepare made."""
    if state.priv is not None:
        dbm.release(state.priv)
        state.priv = None


def clear_prepare(state: Any) -> None:
    """``block_dirty_bitmap_clear_prepare()``."""
    bitmap = lookup(state.daemon, state.data["node"], state.data["name"])[1]
    bitmap.check(dbm.BITMAP_DEFAULT)
    state.priv = (bitmap, bitmap.clear())


def restore_abort(state: Any) -> None:
    """clear/merge abort: ``bdrv_restore_dirty_bitmap()``."""
    if state.priv is not None:
        bitmap, backup = state.priv
        bitmap.restore(backup)


def _toggle_prepare(state: Any, enabled: bool) -> None:
    bitmap = lookup(state.daemon, state.data["node"], state.data["name"])[1]
    bitmap.check(dbm.BITMAP_ALLOW_RO)
    state.priv = (bitmap, bitmap.enabled)
    bitmap.enabled = enabled


def enable_prepare(state: Any) -> None:
    """``block_dirty_bitmap_enable_prepare()``."""
    _toggle_prepare(state, True)


def disable_prepare(state: Any) -> None:
    """``block_dirty_bitmap_disable_prepare()``."""
    _toggle_prepare(state, False)


def toggle_abort(state: Any) -> None:
    """enable/disable abort: back to the former state."""
    if state.priv is not None:
        bitmap, was_enabled = state.priv
        bitmap.enabled = was_enabled


def merge_prepare(state: Any) -> None:
    """``block_dirty_bitmap_merge_prepare()``."""
    d = state.data
    state.priv = merge(state.daemon, d["node"], d["target"], d["bitmaps"])


def remove_prepare(state: Any) -> None:
    """``block_dirty_bitmap_remove_prepare()``: the bitmap stays (busy, not
    stored) until commit releases it."""
    bitmap = remove(state.daemon, state.data["node"], state.data["name"], False)
    bitmap.skip_store = True
    bitmap.busy = True
    state.priv = bitmap


def remove_abort(state: Any) -> None:
    """``block_dirty_bitmap_remove_abort()``."""
    bitmap: Optional[dbm.DirtyBitmap] = state.priv
    if bitmap is not None:
        bitmap.skip_store = False
        bitmap.busy = False


def remove_commit(state: Any) -> None:
    """``block_dirty_bitmap_remove_commit()``."""
    bitmap: Optional[dbm.DirtyBitmap] = state.priv
    if bitmap is not None:
        bitmap.busy = False
        dbm.release(bitmap)
