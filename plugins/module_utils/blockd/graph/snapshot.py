# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""External snapshots: an overlay becomes the new top of a node.

This is QEMU 7.2's ``external_snapshot_prepare/commit/abort/clean``
(blockdev.c) with ``bdrv_append()`` (block.c), as the transaction actions
``blockdev-snapshot-sync`` and ``blockdev-snapshot`` use them:

* **prepare** finds the node, checks the ``external-snapshot`` op blocker,
  flushes it, creates (``mode=absolute-paths``) and opens the qcow2 overlay
  (``-sync``) or takes an existing node (``blockdev-snapshot``), checks the
  overlay, and *appends* it: with I/O drained, ``overlay.backing = node`` and
  every user of the node -- backends (exports) and parent edges -- moves to
  the overlay.  Like QEMU, the graph change happens in prepare, so that
  later actions of the same transaction see it;
* **commit** makes the old node read-only (``bdrv_reopen_set_read_only``),
  with the children it defined inline (they inherit the flag; children
  referenced by name keep theirs, as on qsd);
* **abort** undoes the append exactly: users back on the old node in their
  old order, the backing edge gone;
* **clean** drops the reference the action held on an overlay it opened:
  an overlay nobody uses (the snapshot of a node without users) is closed
  right away, as on qsd.  After an abort blockd also deletes an overlay
  file it created in prepare (QEMU leaves it behind).

blockd takes no image locks; prepare refuses an overlay file some node has
open with the error QEMU's locking gives (``Failed to get "write" lock``).
An overlay that only its users hold (not the monitor) is closed when the
last one lets go (:func:`release_if_unused`, called when an export goes).
A parent edge moves only if its driver can follow it (``backing`` edges,
raw, or a driver with ``child_replaced(role)``); blockd refuses the others,
where qsd moves them (e.g. a backup's copy-before-write filter).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from ..errors import QMPError
from . import blockers, perms

#: QEMU formats that cannot hold a backing file: ``bdrv_img_create`` refuses them
#: with "Backing file not supported for file format '%s'".
_NO_BACKING_FORMATS = frozenset({
    "raw", "file", "host_device", "vdi", "vhdx", "vpc", "parallels", "luks", "bochs",
    "cloop", "dmg", "nfs", "ssh", "gluster", "rbd", "iscsi"})
#: QEMU drivers without image creation: "Format driver '%s' does not support image creation".
_NO_CREATE_FORMATS = frozenset({
    "null-co", "null-aio", "nbd", "throttle", "copy-before-write", "snapshot-access",
    "blkdebug", "blkverify", "blklogwrites", "blkreplay", "compress", "copy-on-read",
    "preallocate", "quorum", "replication", "host_cdrom", "http", "https", "ftp", "ftps",
    "vvfat"})
#: Formats QEMU creates with a backing file and blockd does not.
_OTHER_BACKING_FORMATS = frozenset({"qcow", "qed", "vmdk"})
#: Every format name QEMU 7.2 knows (the sets above and qcow2).
_KNOWN_FORMATS = _NO_BACKING_FORMATS | _NO_CREATE_FORMATS | _OTHER_BACKING_FORMATS | {"qcow2"}


def io_error() -> QMPError:
    """``QERR_IO_ERROR``."""
    return QMPError("An IO error has occurred")


def check_overlay_format(fmt: str) -> None:
    """The format checks of ``bdrv_img_create()`` for an overlay with a backing file.

    :param fmt: the ``format`` argument.
    :raise QMPError: QEMU's text, or blockd's for formats QEMU creates and blockd cannot.
    """
    if fmt == "qcow2":
        return
    if fmt in _NO_CREATE_FORMATS:
        raise QMPError("Format driver '%s' does not support image creation" % fmt)
    if fmt in _NO_BACKING_FORMATS:
        raise QMPError("Backing file not supported for file format '%s'" % fmt)
    if fmt in _OTHER_BACKING_FORMATS:
        raise QMPError("blockd creates only qcow2 overlays, not '%s'" % fmt)
    raise QMPError("Unknown file format '%s'" % fmt)


def supports_backing(node: Any) -> bool:
    """QEMU's ``BlockDriver.supports_backing`` (of blockd's drivers, qcow2)."""
    drv = node.driver
    return bool(getattr(drv, "supports_backing", getattr(drv, "format_name", "") == "qcow2"))


def _is_protocol(fmt: str) -> bool:
    """Whether ``bdrv_open(filename, {driver: fmt})`` gives the file name to the
    driver itself (a protocol) rather than to a ``file`` child."""
    if fmt not in _KNOWN_FORMATS:
        raise QMPError("Unknown driver '%s'" % fmt)
    from ..drivers import lookup
    return bool(getattr(lookup(fmt), "is_protocol", False))


def _reaches(node: Any, target: Any) -> bool:
    """Whether ``target`` is ``node`` or below it (``bdrv_recurse_has_child``)."""
    if node is target:
        return True
    return any(_reaches(edge.node, target) for edge in node.children.values())


def _movable(edge: Any) -> bool:
    """Whether blockd can point the parent edge ``edge`` at another node.

    The data path of a ``backing`` edge reads the graph on every request; a
    raw parent binds its child's methods at open, and is re-bound after the
    move (:func:`_rebind`); any other driver may say it follows a moved child
    by having a ``child_replaced(role)`` method.  The others keep per-child
    state blockd cannot switch (a qcow2 node's ``file``), so blockd refuses
    those snapshots.
    """
    if edge.role == "backing":
        return True
    drv = getattr(edge.parent, "driver", None)
    if callable(getattr(drv, "child_replaced", None)):
        return True
    return getattr(drv, "format_name", "") == "raw" and edge.role == "file"


def _rebind(edge: Any) -> None:
    """Let the parent of a moved edge follow it (see :func:`_movable`)."""
    parent = edge.parent
    drv = parent.driver
    hook = getattr(drv, "child_replaced", None)
    if callable(hook):
        hook(edge.role)
    elif edge.role != "backing" and getattr(drv, "format_name", "") == "raw":
        for attr in ("pread", "read_segments", "pwrite", "pwrite_zeroes", "pdiscard"):
            drv.__dict__.pop(attr, None)
        drv.open(parent.options)
        parent.set_driver(drv)


class Append:
    """The graph change of ``bdrv_append(overlay, node)``, undoable.

    :param graph: the graph.
    :param overlay: the new top node.
    :param node: the node it goes on top of.
    """

    def __init__(self, graph: Any, overlay: Any, node: Any) -> None:
        self.graph = graph
        self.overlay = overlay
        self.node = node
        self._backends: List[Any] = []
        self._parents: List[Any] = []
        self.done = False

    def check(self) -> None:
        """The errors ``bdrv_append()`` can give before it changes anything."""
        overlay, node = self.overlay, self.node
        if _reaches(node, overlay):
            raise QMPError("Making '%s' a backing child of '%s' would create a cycle"
                           % (node.name, overlay.name))
        if overlay.read_only and any(b.writable for b in node.backends):
            raise QMPError("Block node is read-only")
        for edge in node.parents:
            if not _movable(edge):
                raise QMPError("blockd cannot move the '%s' child of node '%s' to an overlay"
                               % (edge.role, edge.parent.name))

    def apply(self) -> None:
        """Attach the backing edge and move every user of ``node`` (drained)."""
        overlay, node = self.overlay, self.node
        self.check()
        with self.graph.gate.drained():
            self._backends = list(node.backends)
            self._parents = list(node.parents)
            overlay.attach_child("backing", node)
            for backend in self._backends:
                backend.move_to(overlay)
            for edge in self._parents:
                node.parents.remove(edge)
                edge.node = overlay
                overlay.parents.append(edge)
                _rebind(edge)
        self.done = True

    def undo(self) -> None:
        """Everything back as before :meth:`apply` (drained)."""
        if not self.done:
            return
        overlay, node = self.overlay, self.node
        with self.graph.gate.drained():
            for edge in self._parents:
                overlay.parents.remove(edge)
                edge.node = node
                _rebind(edge)
            for backend in self._backends:
                overlay.backends.remove(backend)
                backend.root = node
            overlay.detach_child("backing")
            node.parents[:] = self._parents
            node.backends[:] = self._backends
        self.done = False


def set_read_only(node: Any) -> None:
    """``bdrv_reopen_set_read_only(node, true)``: the node and the children it
    defined inline (which inherit ``read-only``) become read-only."""
    node.read_only = True
    for role, edge in node.children.items():
        ref = node.options.get(role)
        if isinstance(ref, dict) and "read-only" not in ref and not edge.node.read_only:
            set_read_only(edge.node)


class ExternalSnapshot:
    """One ``blockdev-snapshot-sync`` / ``blockdev-snapshot`` action
    (QEMU's ExternalSnapshotState).

    :param daemon: the daemon.
    :param kind: the action type.
    :param data: its validated arguments.
    """

    def __init__(self, daemon: Any, kind: str, data: Dict[str, Any]) -> None:
        self.daemon = daemon
        self.graph = daemon.graph
        self.kind = kind
        self.data = data
        self.old: Optional[Any] = None
        self.new: Optional[Any] = None
        #: The action opened ``new`` (and holds the only reference).
        self.own_new = False
        #: A file prepare created (deleted again on abort).
        self.created_file: Optional[str] = None
        self.append: Optional[Append] = None
        self.aborted = False

    # -- prepare ----------------------------------------------------------

    def _lookup_old(self) -> Tuple[Any, Optional[str], Optional[str]]:
        if self.kind == "blockdev-snapshot":
            device = node_name = self.data["node"]
        else:
            device = self.data.get("device")
            node_name = self.data.get("node-name")
        node = self.graph.find(node_name) if node_name is not None else None
        if node is None:
            # bdrv_lookup_bs(): device names a BlockBackend, blockd (like qsd) has none named
            raise QMPError("Cannot find device='%s' nor node-name='%s'"
                           % (device or "", node_name or ""))
        return node, device, node_name

    def prepare(self) -> None:
        """``external_snapshot_prepare()`` (after the completion-mode check)."""
        old, _device, node_name = self._lookup_old()
        self.old = old
        blockers.check(old, "external-snapshot")
        if not old.read_only:
            try:
                old.flush()
            except OSError:
                raise io_error() from None
        if self.kind == "blockdev-snapshot-sync":
            self._open_new_overlay(old, node_name)
        else:
            self.new = self.graph.lookup(self.data["overlay"])
        self._check_overlay(self.new)
        self.append = Append(self.graph, self.new, old)
        self.append.apply()

    def _open_new_overlay(self, old: Any, node_name: Optional[str]) -> None:
        """Create (unless ``mode=existing``) and open the overlay image."""
        data = self.data
        fmt = data.get("format", "qcow2")
        snap_name = data.get("snapshot-node-name")
        if node_name is not None and snap_name is None:
            raise QMPError("New overlay node-name missing")
        if snap_name is not None and self.graph.find(snap_name) is not None:
            raise QMPError("New overlay node-name already in use")
        path = data["snapshot-file"]
        if data.get("mode", "absolute-paths") != "existing":
            check_overlay_format(fmt)
            if path == old.filename():
                raise QMPError("Error: Trying to create an image with the same filename as "
                               "the backing file")
            self._check_not_open(path)
            existed = os.path.lexists(path)
            from ..drivers.qcow2.create import create_qcow2
            try:
                create_qcow2(path, old.getlength(), backing_file=old.filename(),
                             backing_fmt=old.drv_name)
            except BaseException:
                if not existed:
                    _unlink(path)
                raise
            if not existed:
                self.created_file = path
        else:
            self._check_not_open(path)
        opts: Dict[str, Any] = {"driver": fmt}
        if snap_name is not None:
            opts["node-name"] = snap_name
        if _is_protocol(fmt):
            if fmt in ("null-co", "null-aio"):
                raise QMPError("The only allowed filename for this driver is '%s://'" % fmt)
            opts["filename"] = path
        else:
            opts["file"] = {"driver": "file", "filename": path}
            opts["backing"] = None
        if old.read_only:
            opts["read-only"] = True
        self.new = self.graph.open(opts, monitor_owned=False)
        self.own_new = True

    def _check_not_open(self, path: str) -> None:
        """blockd takes no image locks: refuse, as QEMU's locking does, to
        create or open an overlay over a file a node has open."""
        try:
            st = os.stat(path)
        except OSError:
            return
        for node in list(self.graph.nodes.values()):
            other = getattr(node.driver, "path", None)
            if not isinstance(other, str):
                continue
            try:
                ost = os.stat(other)
            except OSError:
                continue
            if (ost.st_dev, ost.st_ino) == (st.st_dev, st.st_ino):
                # the first permission (in QEMU's bit order) the new image needs and
                # the node's users do not share; else the node's own write
                shared = perms.cumulative_shared(node)
                missing = [p for p in ("write", "resize") if p not in shared]
                raise QMPError('Failed to get "%s" lock' % (missing[0] if missing else "write"))

    @staticmethod
    def _check_overlay(new: Any) -> None:
        """The overlay checks of ``external_snapshot_prepare()``, in its order."""
        if new.parents or new.backends:
            raise QMPError("The overlay is already in use")
        if getattr(new.driver, "is_filter", False):
            raise QMPError("Filters cannot be used as overlays")
        if new.backing is not None:
            raise QMPError("The overlay already has a backing image")
        if not supports_backing(new):
            raise QMPError("The overlay does not support backing images")

    # -- commit / abort / clean ---------------------------------------------

    def commit(self) -> None:
        """``external_snapshot_commit()``: the old node becomes read-only."""
        if self.old is not None:
            set_read_only(self.old)

    def abort(self) -> None:
        """``external_snapshot_abort()``: undo the append."""
        self.aborted = True
        if self.append is not None:
            self.append.undo()

    def clean(self) -> None:
        """``external_snapshot_clean()``: drop the action's overlay reference;
        after an abort, delete the overlay file prepare created."""
        if self.new is not None and self.own_new and self.new.refcount() == 0 \
                and self.new.name in self.graph.nodes:
            self.graph.delete(self.new)
        if self.aborted and self.created_file is not None:
            _unlink(self.created_file)
            self.created_file = None


def _unlink(path: str) -> None:
    """Remove a file, ignoring errors."""
    try:
        os.unlink(path)
    except OSError:
        pass


def release_if_unused(graph: Any, node: Optional[Any]) -> None:
    """``bdrv_unref()`` after a user let go of ``node``: a node nobody holds any
    more -- no parent, backend, monitor reference or job -- is closed (an overlay
    of ``blockdev-snapshot-sync`` that only an export held, once the export goes).

    :param graph: the graph.
    :param node: the node the user held (None: nothing to do).
    """
    if node is None or node.refcount() or getattr(node, "users", None):
        return
    if graph.nodes.get(node.name) is node:
        graph.delete(node)
