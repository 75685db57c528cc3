# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""NBD server and block export commands.

An export is a :class:`~blockd.graph.backend.Backend` on a node plus the NBD
export that serves it.  Exports live only while the NBD server runs:
``nbd-server-stop`` deletes them all, each with ``BLOCK_EXPORT_DELETED``,
which (as in QEMU, where deletion finishes in a bottom half) is emitted after
the command's reply.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from ..errors import QMPError
from ..jobs.blockjob import DrainedSection
from ..graph import dirty_bitmap as dbm
from ..graph import perms
from ..graph.backend import Backend
from ..graph.snapshot import release_if_unused
from . import command

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
#: NBD's limit on export names and descriptions.
NBD_MAX_STRING = 4096


class Export:
    """One block export (QEMU's BlockExport).

    :param export_id: the export id (unique across all exports).
    :param backend: the attachment to the exported node.
    :param nbd: the NBD server's export object.
    """

    def __init__(self, export_id: str, backend: Backend, nbd: Any) -> None:
        self.id = export_id
        self.type = "nbd"
        self.backend = backend
        self.nbd = nbd
        self.shutting_down = False
        #: The dirty bitmaps exported (busy while the export lives).
        self.bitmaps: List[Any] = []

    def info(self) -> Dict[str, Any]:
        """BlockExportInfo, members in qsd's order."""
        return {"node-name": self.backend.root.name if self.backend.root else "",
                "shutting-down": self.shutting_down, "type": self.type, "id": self.id}


def flat_address(legacy: Dict[str, Any]) -> Dict[str, Any]:
    """SocketAddressLegacy (``{"type", "data": {...}}``) to the flat SocketAddress."""
    flat = {"type": legacy["type"]}
    flat.update(legacy.get("data", {}))
    return flat


def start_server(daemon: Any, addr: Dict[str, Any], max_connections: int = 100,
                 tls_creds: Optional[str] = None, tls_authz: Optional[str] = None) -> None:
    """Start the NBD server on a flat SocketAddress (shared by QMP and --nbd-server).

    As QEMU's nbd_server_start(): listen first, then look the TLS
    credentials up (a server endpoint ``tls-creds-x509``); ``tls-authz`` is
    only a name here, resolved for each client after its TLS handshake.
    The server holds on to the credentials: deleting the object later
    (allowed, as in qsd) does not change the running server.
    """
    from ..nbd import NBDServer
    from ..objects import tree
    if daemon.nbd_server is not None:
        raise QMPError("NBD server already running")
    server = NBDServer(addr, max_connections=max_connections)
    server.bind()
    if tls_creds is not None:
        try:
            objs = tree(daemon)
            server.tls = objs.tls_creds(tls_creds, "server").context
            if tls_authz is not None:
                server.authorize = objs.authorizer(tls_authz)
        except BaseException:
            server.stop()
            raise
    server.start()
    daemon.nbd_server = server


def add_export(daemon: Any, args: Dict[str, Any]) -> Export:
    """block-export-add for ``type=nbd`` (also used by nbd-server-add and --export)."""
    from ..nbd import NBDExport
    from ..nbd.export import META_ID_DIRTY_BITMAP, DirtyBitmapContext
    export_id = args["id"]
    if not _ID.match(export_id):
        raise QMPError("Invalid block export id")
    if export_id in daemon.exports:
        raise QMPError("Block export id '%s' is already in use" % export_id)
    node = daemon.graph.lookup(args["node-name"], device="")
    writable = bool(args.get("writable", False))
    if writable and node.read_only:
        raise QMPError("Cannot export read-only node as writable")
    # blk_insert_bs(): a writer may not attach where a parent (a copy-before-write
    # filter guarding a snapshot) does not share write.
    perms.check_new_user(node, {"write"} if writable else ())
    server = daemon.nbd_server
    if server is None:
        raise QMPError("NBD server not running")
    name = args.get("name", args["node-name"])
    if len(name.encode()) > NBD_MAX_STRING:
        raise QMPError("export name '%s' too long" % name)
    description = args.get("description")
    if description is not None and len(description.encode()) > NBD_MAX_STRING:
        raise QMPError("description '%s' too long" % description)
    if name in server.exports:
        raise QMPError("NBD server already has export named '%s'" % name)
    bitmaps = _export_bitmaps(daemon, node, args.get("bitmaps") or [], not writable)
    # nbd_export_create(): "Don't allow resize while the NBD server is running"
    backend = Backend(daemon.graph, node, writable, "block export '%s'" % export_id,
                      shared=perms.ALL - {"resize"})
    try:
        nbd = NBDExport(export_id, name, backend, writable, description=description,
                        allocation_depth=bool(args.get("allocation-depth", False)))
        for i, (bm_name, bitmap) in enumerate(bitmaps):
            nbd.add_context(DirtyBitmapContext(bm_name, META_ID_DIRTY_BITMAP + i, bitmap),
                            same_name=True)
        server.add_export(nbd)
    except BaseException:
        backend.detach()
        raise
    export = Export(export_id, backend, nbd)
    # marked busy in a separate loop once nothing can fail (nbd_export_create())
    export.bitmaps = [bitmap for _name, bitmap in bitmaps]
    for bitmap in export.bitmaps:
        bitmap.busy = True
    daemon.exports[export_id] = export
    return export


def _filtered_or_cow(node: Any) -> Any:
    """``bdrv_filter_or_cow_bs()``: the backing child, or a filter's filtered child."""
    if node.backing is not None:
        return node.backing
    if getattr(getattr(node, "driver", None), "is_filter", False):
        return node.file
    return None


def _export_bitmaps(daemon: Any, node: Any, specs: List[Any],
                    readonly: bool) -> List[Tuple[str, Any]]:
    """The ``bitmaps`` of an NBD export (``nbd_export_create()``'s loop).

    A plain name is looked up on the exported node and down its filter and
    backing chain; ``{node, name}`` names the node.

    :return: ``(name, bitmap)`` pairs in the given order.
    :raise QMPError: QEMU's text for a missing, busy, inconsistent bitmap or an
        enabled one on a writable node of a read-only export.
    """
    from .bitmaps import lookup
    found: List[Tuple[str, Any]] = []
    for spec in specs:
        if isinstance(spec, str):
            bitmap, owner = None, node
            while owner is not None:
                bitmap = dbm.find(owner, spec)
                if bitmap is not None:
                    break
                owner = _filtered_or_cow(owner)
            if bitmap is None:
                raise QMPError("Bitmap '%s' is not found" % spec)
            if readonly and not owner.read_only and bitmap.enabled:
                raise QMPError("Enabled bitmap '%s' incompatible with readonly export" % spec)
            name = spec
        else:
            name = spec["name"]
            bitmap = lookup(daemon, spec["node"], name)[1]
        bitmap.check(dbm.BITMAP_ALLOW_RO)
        found.append((name, bitmap))
    return found


def delete_export(daemon: Any, export: Export, hard: bool) -> None:
    """Remove an export now; its BLOCK_EXPORT_DELETED follows the reply."""
    export.shutting_down = True
    server = daemon.nbd_server
    if server is not None and export.nbd.name in server.exports:
        server.remove_export(export.nbd.name)
    export.nbd.disconnect_clients()
    root = export.backend.root
    if root is not None:
        # qsd drains the export's node twice on the way (blk_remove_bs, then
        # bdrv_root_unref_child): block jobs on or above it show paused/running twice.
        for _drain in range(2):
            DrainedSection(daemon, root).begin().end()
    with daemon.graph.gate.drained():
        root = export.backend.root
        export.backend.detach()
        release_if_unused(daemon.graph, root)  # blk_unref() -> bdrv_unref()
    for bitmap in getattr(export, "bitmaps", ()):
        bitmap.busy = False   # nbd_export_delete()
    del daemon.exports[export.id]
    daemon.defer(lambda: daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": export.id}))


def _find_export(daemon: Any, export_id: str) -> Export:
    export = daemon.exports.get(export_id)
    if export is None:
        raise QMPError("Export '%s' is not found" % export_id)
    if export.shutting_down:
        raise QMPError("Export '%s' is already shutting down" % export_id)
    return export


def _remove(daemon: Any, export_id: str, mode: str) -> Dict[str, Any]:
    export = _find_export(daemon, export_id)
    if mode == "safe" and export.nbd.client_count():
        raise QMPError("export '%s' still in use" % export_id)
    delete_export(daemon, export, hard=(mode == "hard"))
    return {}


@command("nbd-server-start")
def nbd_server_start(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Start the NBD server (legacy wrapped address form)."""
    start_server(daemon, flat_address(args["addr"]), args.get("max-connections", 100),
                 args.get("tls-creds"), args.get("tls-authz"))
    return {}


@command("nbd-server-stop")
def nbd_server_stop(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Delete every NBD export, then stop the server."""
    server = daemon.nbd_server
    if server is None:
        raise QMPError("NBD server not running")
    for export in [e for e in daemon.exports.values() if e.type == "nbd"]:
        delete_export(daemon, export, hard=True)
    server.stop()
    daemon.nbd_server = None
    return {}


@command("nbd-server-add")
def nbd_server_add(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Deprecated form of block-export-add: the export id is its name."""
    name = args.get("name", args["device"])
    spec = {"type": "nbd", "id": name, "node-name": args["device"], "name": name,
            "writable": args.get("writable", False)}
    if "description" in args:
        spec["description"] = args["description"]
    if "bitmap" in args:
        spec["bitmaps"] = [args["bitmap"]]
    add_export(daemon, spec)
    return {}


@command("nbd-server-remove")
def nbd_server_remove(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Deprecated form of block-export-del."""
    return _remove(daemon, args["name"], args.get("mode", "safe"))


@command("block-export-add")
def block_export_add(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Export a node (only ``type=nbd`` is served by blockd)."""
    if args["type"] != "nbd":
        raise QMPError("Export type '%s' is not supported by blockd" % args["type"])
    add_export(daemon, args)
    return {}


@command("block-export-del")
def block_export_del(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Remove an export; ``safe`` refuses while clients are connected."""
    return _remove(daemon, args["id"], args.get("mode", "safe"))


@command("query-block-exports")
def query_block_exports(daemon: Any, args: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every export, newest first."""
    return [e.info() for e in reversed(list(daemon.exports.values()))]
