# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Node commands: blockdev-add, blockdev-del, blockdev-create, block_resize,
query-named-block-nodes."""

from __future__ import annotations

import errno
import os
from typing import Any, Dict, List

from ..errors import QMPError
from ..graph import blockers, dirty_bitmap, perms
from . import command


@command("blockdev-add")
def blockdev_add(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Open a node tree; the top node belongs to the monitor."""
    if "node-name" not in args:
        raise QMPError("'node-name' must be specified for the root node")
    daemon.graph.open(args, monitor_owned=True)
    return {}


@command("blockdev-del")
def blockdev_del(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Delete a monitor-owned node nobody else uses (checks in QEMU's order)."""
    name = args["node-name"]
    node = daemon.graph.find(name)
    if node is None:
        raise QMPError("Failed to find node with node-name='%s'" % name)
    if node.backends:
        raise QMPError("Node %s is in use" % name)
    blockers.check(node, "drive-del")
    if not node.monitor_owned:
        raise QMPError("Node %s is not owned by the monitor" % name)
    if node.parents:
        raise QMPError("Block device %s is in use" % name)
    daemon.graph.delete(node)
    return {}


@command("blockdev-create")
def blockdev_create(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Start a ``create`` job that formats an image (see :mod:`blockd.jobs.create`)."""
    from ..jobs.create import blockdev_create as start_create
    start_create(daemon, args["job-id"], args["options"])
    return {}


@command("block_resize")
def block_resize(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Resize a node, checks in qmp_block_resize's order, I/O drained around it."""
    device = args.get("device")
    name = args.get("node-name")
    # bdrv_lookup_bs(): ``device`` names a BlockBackend, and qsd (like blockd)
    # has none with a name, so only ``node-name`` can find anything.
    node = daemon.graph.find(name) if name is not None else None
    if node is None:
        raise QMPError("Cannot find device='%s' nor node-name='%s'"
                       % (device or "", name or ""))
    size = args["size"]
    if size < 0:
        raise QMPError("Parameter 'size' expects a >0 size")
    if blockers.blocking(node, "resize"):
        # QERR_DEVICE_IN_USE with the (usually absent) device name
        raise QMPError("Device '%s' is in use" % (device if device is not None else "(null)"))
    perms.check_new_user(node, {"resize"})
    if node.read_only:
        raise QMPError("Image is read-only")
    with daemon.graph.gate.drained():
        try:
            node.driver.truncate(size)
        except OSError as exc:
            raise QMPError(exc.strerror or os.strerror(exc.errno or errno.EIO)) from None
        finally:
            dirty_bitmap.sizes_changed(daemon.graph.nodes.values())
    return {}


def _image_info(node: Any, nested: bool) -> Dict[str, Any]:
    drv = node.driver
    info: Dict[str, Any] = {
        "virtual-size": node.getlength(),
        "filename": node.filename(),
        "format": node.drv_name,
    }
    actual = drv.actual_size()
    if actual is not None:
        info["actual-size"] = actual
    cluster = drv.cluster_size()
    if cluster is not None:
        info["cluster-size"] = cluster
    info.update(drv.image_info())
    backing = node.backing
    if backing is not None:
        # the header's string (if the format has one), and the resolved name
        info.setdefault("backing-filename", backing.filename())
        info["full-backing-filename"] = backing.filename()
        if nested:
            info["backing-image"] = _image_info(backing, nested)
    elif nested and _filtered(node) is not None:
        # bdrv_block_device_info(): a filter's child is shown as its backing image
        info["backing-image"] = _image_info(_filtered(node), nested)
    return info


def _filtered(node: Any) -> Any:
    """``bdrv_filter_bs()``: the ``file`` child of a filter driver (cbw, throttle)."""
    if getattr(node.driver, "is_filter", False):
        return node.file
    return None


def _depth(node: Any) -> int:
    """backing_file_depth of the nested query: backing and filtered children counted."""
    depth = 0
    cur = node.backing or _filtered(node)
    while cur is not None:
        depth += 1
        cur = cur.backing or _filtered(cur)
    return depth


def node_info(node: Any, nested: bool) -> Dict[str, Any]:
    """QEMU's BlockDeviceInfo for one node, members in qsd's order."""
    cache = node.options.get("cache", {})
    info: Dict[str, Any] = {
        "iops_rd": 0,
        "detect_zeroes": node.options.get("detect-zeroes", "off"),
        "image": _image_info(node, nested),
        "iops_wr": 0,
        "ro": node.read_only,
        "node-name": node.name,
        "backing_file_depth": _depth(node) if nested else 0,
        "drv": node.drv_name,
        "iops": 0,
        "bps_wr": 0,
        "write_threshold": 0,
        "encrypted": False,
        "bps": 0,
        "bps_rd": 0,
        "cache": {"no-flush": bool(cache.get("no-flush", False)),
                  "direct": bool(cache.get("direct", False)),
                  "writeback": True},
        "file": node.filename(),
    }
    if node.backing is not None:
        info["backing_file"] = info["image"]["backing-filename"]
    bitmaps = [b.query_info() for b in reversed(getattr(node, "internal_bitmaps", ()))]
    if bitmaps:  # block-copy's internal bitmaps (graph/blockcopy.py), newest first
        items = list(info.items())
        at = [k for k, _value in items].index("write_threshold") + 1
        info = dict(items[:at] + [("dirty-bitmaps", bitmaps)] + items[at:])
    return info


@command("query-named-block-nodes")
def query_named_block_nodes(daemon: Any, args: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every node, newest first, as qsd lists them."""
    nested = not args.get("flat", False)
    return [node_info(node, nested) for node in reversed(list(daemon.graph.nodes.values()))]
