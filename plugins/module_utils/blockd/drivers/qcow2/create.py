# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Image creation: :func:`create_qcow2` and :func:`create_raw`.

Both take either a path (the file is created or truncated) or an open
``file`` node (what ``blockdev-create`` hands over).  qcow2 creation follows
QEMU's qcow2_co_create: a header, a one-cluster refcount table and one
refcount block are written, then the image is opened and resized to its
size (which allocates the L1 table), and finally the backing file is
recorded; the result is laid out as ``qemu-img create`` lays it out.
"""

from __future__ import annotations

import os
import struct
from array import array
from typing import Any, Optional, Tuple, Union

from ...errors import QMPError
from . import header as hdr
from .refcount import table_to_bytes

PathOrNode = Union[str, "os.PathLike[str]", Any]

_PREALLOC = ("off", "metadata", "falloc", "full")


def _refblock(cluster_size: int, order: int, used: int) -> bytes:
    """A refcount block with the first ``used`` clusters at refcount 1.

    :param cluster_size: bytes per cluster.
    :param order: ``refcount_order``.
    :param used: clusters in use.
    :return: the block's bytes.
    """
    if order >= 3:
        code = {3: "B", 4: "H", 5: "I" if array("I").itemsize == 4 else "L", 6: "Q"}[order]
        arr = array(code, bytes(cluster_size))
        for i in range(used):
            arr[i] = 1
        return table_to_bytes(arr)
    out = bytearray(cluster_size)
    bits = 1 << order
    for i in range(used):
        bit = i * bits
        out[bit >> 3] |= 1 << (bit & 7)
    return bytes(out)


def _file_node(target: PathOrNode) -> Tuple[Any, bool]:
    """A writable ``file`` node for ``target``.

    :param target: a path (created or truncated) or a node.
    :return: ``(node, own)``; ``own`` when the node was made here (close it).
    """
    if hasattr(target, "driver") and hasattr(target, "pwrite"):
        if target.read_only:
            raise QMPError("Block node is read-only")
        return target, False
    path = os.fspath(target)
    try:
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR | os.O_CLOEXEC, 0o644)
        os.close(fd)
    except OSError as exc:
        raise QMPError("Could not create '%s': %s" % (path, os.strerror(exc.errno))) from None
    from ...graph.node import Node
    from ..file import FileDriver
    opts = {"driver": "file", "filename": path, "node-name": "#create-file"}
    node = Node("#create-file", opts, implicit=True, monitor_owned=False)
    drv = FileDriver(node)
    node.set_driver(drv)
    drv.open(opts)
    return node, True


def _validate(size: int, cluster_size: int, version: Any, refcount_bits: int,
              backing_file: Optional[str], backing_fmt: Optional[str], lazy_refcounts: bool,
              preallocation: str, compression_type: str, extended_l2: bool,
              data_file: Any, encrypt: Any) -> int:
    """QEMU's qcow2_co_create checks, in its order.

    :param size: see :func:`create_qcow2`, as all the other parameters.
    :param cluster_size: see :func:`create_qcow2`.
    :param version: see :func:`create_qcow2`.
    :param refcount_bits: see :func:`create_qcow2`.
    :param backing_file: see :func:`create_qcow2`.
    :param backing_fmt: see :func:`create_qcow2`.
    :param lazy_refcounts: see :func:`create_qcow2`.
    :param preallocation: see :func:`create_qcow2`.
    :param compression_type: see :func:`create_qcow2`.
    :param extended_l2: see :func:`create_qcow2`.
    :param data_file: see :func:`create_qcow2`.
    :param encrypt: see :func:`create_qcow2`.
    :return: the version, 2 or 3.
    :raise QMPError: with QEMU's text for the first invalid parameter.
    """
    if size < 0 or size % 512:
        raise QMPError("Image size must be a multiple of 512 bytes")
    if version in (2, "v2", "0.10"):
        version = 2
    elif version in (3, "v3", "1.1", None):
        version = 3
    else:
        raise QMPError("Invalid compatibility level: '%s'" % version)
    if extended_l2:
        if version < 3:
            raise QMPError("Extended L2 entries are only supported with compatibility level "
                           "1.1 and above (use version=v3 or greater)")
        raise QMPError("blockd does not support qcow2 images with extended L2 entries")
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or cluster_size & (cluster_size - 1) or \
            not hdr.MIN_CLUSTER_BITS <= bits <= hdr.MAX_CLUSTER_BITS:
        raise QMPError("Cluster size must be a power of two between 512 and 2048k")
    if preallocation not in _PREALLOC:
        raise QMPError("Unsupported preallocation mode '%s'" % preallocation)
    if backing_file and preallocation != "off":
        raise QMPError("Backing file and preallocation can only be used at the same time if "
                       "extended_l2 is on")
    if backing_fmt and not backing_file:
        raise QMPError("Backing format cannot be used without backing file")
    if version < 3 and lazy_refcounts:
        raise QMPError("Lazy refcounts only supported with compatibility level 1.1 and above "
                       "(use version=v3 or greater)")
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise QMPError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise QMPError("Different refcount widths than 16 bits require compatibility level "
                       "1.1 or above (use version=v3 or greater)")
    if data_file is not None:
        raise QMPError("blockd does not support qcow2 images with an external data file")
    if compression_type not in (None, "zlib"):
        if version < 3:
            raise QMPError("Non-zlib compression type is only supported with compatibility "
                           "level 1.1 and above (use version=v3 or greater)")
        raise QMPError("blockd supports only zlib compression for qcow2 images")
    if encrypt is not None:
        raise QMPError("blockd does not support encrypted qcow2 images")
    if backing_file is not None and len(backing_file.encode()) > hdr.MAX_BACKING_FILE_NAME:
        raise QMPError("Could not assign backing file '%s' with format '%s'"
                       % (backing_file, backing_fmt))
    if backing_fmt is not None and len(backing_fmt.encode()) >= hdr.BACKING_FORMAT_MAX:
        raise QMPError("Could not assign backing file '%s' with format '%s'"
                       % (backing_file, backing_fmt))
    return version


def check_qcow2_options(size: int, cluster_size: int = 65536, backing_file: Optional[str] = None,
                        backing_fmt: Optional[str] = None, version: Any = 3,
                        refcount_bits: int = 16, lazy_refcounts: bool = False,
                        preallocation: str = "off", compression_type: Optional[str] = "zlib",
                        extended_l2: bool = False, data_file: Any = None,
                        encrypt: Any = None) -> None:
    """The parameter checks of :func:`create_qcow2` alone, without any I/O.

    ``blockdev-create`` runs them before its job's first I/O, as QEMU's
    qcow2_co_create does (so their errors end the job before the command
    returns).  The parameters are :func:`create_qcow2`'s.

    :raise QMPError: with QEMU's text for the first invalid parameter.
    """
    _validate(size, cluster_size, version, refcount_bits, backing_file, backing_fmt,
              lazy_refcounts, preallocation, compression_type, extended_l2, data_file, encrypt)


def create_qcow2(target: PathOrNode, size: int, cluster_size: int = 65536,
                 backing_file: Optional[str] = None, backing_fmt: Optional[str] = None,
                 version: Any = 3, refcount_bits: int = 16, lazy_refcounts: bool = False,
                 preallocation: str = "off", compression_type: Optional[str] = "zlib",
                 extended_l2: bool = False, data_file: Any = None, encrypt: Any = None) -> None:
    """Create a qcow2 image (blockdev-create ``driver: qcow2``).

    :param target: a path, or an open writable ``file`` node.
    :param size: virtual size in bytes (a multiple of 512).
    :param cluster_size: 512 B to 2 MiB, a power of two.
    :param backing_file: backing file name recorded in the header (not
        opened: like QEMU's blockdev-create it need not exist).
    :param backing_fmt: its format (the backing-format extension).
    :param version: 2/``v2``/``0.10`` or 3/``v3``/``1.1``.
    :param refcount_bits: 1 to 64, a power of two (16 for version 2).
    :param lazy_refcounts: set the lazy refcounts compatible bit.
    :param preallocation: ``off``, ``metadata``, ``falloc`` or ``full``.
    :param compression_type: only ``zlib``.
    :param extended_l2: refused (not supported).
    :param data_file: refused (not supported).
    :param encrypt: refused (not supported).
    :raise QMPError: on invalid parameters or I/O errors.
    """
    version = _validate(size, cluster_size, version, refcount_bits, backing_file, backing_fmt,
                        lazy_refcounts, preallocation, compression_type, extended_l2,
                        data_file, encrypt)
    file_node, own = _file_node(target)
    try:
        _write_empty(file_node, cluster_size, version, refcount_bits, lazy_refcounts)
        _finish(file_node, size, preallocation, backing_file, backing_fmt)
    except OSError as exc:
        raise QMPError("Could not create qcow2 image: %s" % (exc.strerror or exc)) from None
    finally:
        if own:
            file_node.driver.close()


def _write_empty(file_node: Any, cs: int, version: int, refcount_bits: int,
                 lazy_refcounts: bool) -> None:
    """Header, refcount table and block of a zero-sized image (3 clusters).

    :param file_node: where to write.
    :param cs: cluster size.
    :param version: 2 or 3.
    :param refcount_bits: refcount width.
    :param lazy_refcounts: set the compatible bit.
    """
    h = hdr.Header()
    h.version = version
    h.cluster_bits = cs.bit_length() - 1
    h.refcount_table_offset = cs
    h.refcount_table_clusters = 1
    h.refcount_order = refcount_bits.bit_length() - 1
    if lazy_refcounts:
        h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
    reftable = bytearray(cs)
    struct.pack_into(">Q", reftable, 0, 2 * cs)
    file_node.pwrite(0, h.serialize())
    file_node.pwrite(cs, bytes(reftable) + _refblock(cs, h.refcount_order, 3))


def _finish(file_node: Any, size: int, preallocation: str, backing_file: Optional[str],
            backing_fmt: Optional[str]) -> None:
    """Open the new image, give it its size and backing file, close it.

    :param file_node: the image's file node.
    :param size: virtual size.
    :param preallocation: preallocation mode.
    :param backing_file: backing file name for the header, if any.
    :param backing_fmt: its format.
    """
    from ...graph.node import Node
    from .driver import Qcow2Driver
    # named like QEMU's temporary node (#blockNNN) when the file is in a graph
    graph = getattr(file_node, "graph", None)
    name = graph.generate_name() if graph is not None else "#create-qcow2"
    opts = {"driver": "qcow2", "node-name": name, "backing": None}
    node = Node(name, opts, implicit=True, monitor_owned=False)
    node.attach_child("file", file_node)
    drv = Qcow2Driver(node)
    drv.creating = True
    node.set_driver(drv)
    try:
        drv.open(opts)
        drv.truncate(size, preallocation)
        if backing_file:
            img = drv.img
            with img.lock:
                img.begin_modify()
                img.header.backing_file = backing_file
                img.header.backing_format = backing_fmt
                img.update_header()
                img.sync()
        drv.close()
    finally:
        node.detach_child("file")
        drv.close()


def create_raw(target: PathOrNode, size: int, preallocation: str = "off") -> None:
    """Create (or resize) a raw image of ``size`` bytes.

    :param target: a path, or an open writable ``file`` node.
    :param size: size in bytes.
    :param preallocation: ``off`` (sparse), ``falloc`` or ``full``
        (``metadata`` is accepted and means ``off`` for raw).
    :raise QMPError: on invalid parameters or I/O errors.
    """
    if size < 0:
        raise QMPError("Invalid image size")
    if preallocation not in _PREALLOC:
        raise QMPError("Unsupported preallocation mode '%s'" % preallocation)
    file_node, own = _file_node(target)
    try:
        file_node.driver.truncate(0 if preallocation == "full" else size)
        if preallocation == "falloc":
            fd = getattr(file_node.driver, "fd", None)
            if fd is not None and size:
                os.posix_fallocate(fd, 0, size)
        elif preallocation == "full":
            chunk = bytes(1 << 20)
            pos = 0
            while pos < size:
                n = min(len(chunk), size - pos)
                file_node.pwrite(pos, memoryview(chunk)[:n])
                pos += n
            file_node.driver.truncate(size)
        file_node.flush()
    except OSError as exc:
        raise QMPError("Could not create raw image: %s" % (exc.strerror or exc)) from None
    finally:
        if own:
            file_node.driver.close()
