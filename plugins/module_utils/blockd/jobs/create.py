# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``blockdev-create`` job (QEMU's ``block/create.c``).

A job of type ``create``, auto-finalized but dismissed by hand
(``JOB_MANUAL_DISMISS``).  Progress is 0/1 while it runs and 1/1 after.
What QEMU's driver does before its first I/O -- checking options, finding
or opening the ``file`` node, creating the host file -- runs in
:meth:`CreateJob.setup`, before the command replies, so a job failing there
shows ``created, running, aborting, concluded`` before the reply exactly as
on qsd; the I/O runs in the worker thread.

Drivers: ``file`` (a host file; preallocation ``off``, ``falloc`` or
``full``) and ``qcow2`` (on an existing or inline ``file`` node, through
:func:`~blockd.drivers.qcow2.create_qcow2`).  ``raw`` and the other
drivers without ``.bdrv_co_create`` in QEMU get QEMU's "Driver does not
support blockdev-create".
"""

from __future__ import annotations

import copy
import errno
import os
from typing import Any, Dict, Type

from ..errors import QMPError
from ..graph import perms
from ..graph.node import Node
from .job import Job

#: BlockdevCreateOptions branches that QEMU 7.2 implements (non-empty branches).
QEMU_CREATE_DRIVERS = frozenset({"file", "gluster", "luks", "nfs", "parallels", "qcow", "qcow2",
                                 "qed", "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc"})

_UINT32_MAX = 0xFFFFFFFF
_ZEROES = bytes(1 << 20)


class CreateJob(Job):
    """Base of the create jobs: progress as QEMU's blockdev_create_run().

    :param daemon: the daemon.
    :param job_id: the job id.
    :param options: the validated ``BlockdevCreateOptions`` (copied).
    """

    job_type = "create"

    def __init__(self, daemon: Any, job_id: str, options: Dict[str, Any]) -> None:
        super().__init__(daemon, job_id, auto_finalize=True, auto_dismiss=False)
        self.options = copy.deepcopy(options)

    def setup(self) -> None:
        self.progress_set_remaining(1)
        try:
            self.create_setup()
        except BaseException:
            self.progress_update(1)
            self.release()
            raise

    def run(self) -> None:
        try:
            self.create_run()
        finally:
            self.progress_update(1)
            with self.lock:
                self.release()

    def create_setup(self) -> None:
        """*Locked.* Checks and preparation before any I/O."""

    def create_run(self) -> None:
        """The creation's I/O (worker thread)."""

    def release(self) -> None:
        """*Locked.* Give back what :meth:`create_setup` took (idempotent)."""


class FileCreateJob(CreateJob):
    """``driver: file``: QEMU's raw_co_create (block/file-posix.c)."""

    def __init__(self, daemon: Any, job_id: str, options: Dict[str, Any]) -> None:
        super().__init__(daemon, job_id, options)
        self.fd = -1

    def create_setup(self) -> None:
        opts = self.options
        if opts.get("extent-size-hint", 1 << 20) > _UINT32_MAX:
            raise QMPError("Extent size hint is too large")
        path = opts["filename"]
        try:
            self.fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise QMPError("Could not create '%s': %s"
                           % (path, os.strerror(exc.errno or errno.EIO))) from None

    def create_run(self) -> None:
        fd = self.fd
        opts = self.options
        _truncate(fd, 0, "off")
        _truncate(fd, opts["size"], opts.get("preallocation", "off"))

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _truncate(fd: int, size: int, prealloc: str) -> None:
    """QEMU's handle_aiocb_truncate for a regular file, with its error texts.

    :param fd: the open file.
    :param size: the new size.
    :param prealloc: ``off``, ``falloc`` or ``full`` (others are refused).
    :raise QMPError: with QEMU's text.
    """
    current = os.fstat(fd).st_size
    if current > size and prealloc != "off":
        raise QMPError("Cannot use preallocation for shrinking files")

    def fail(what: str, exc: OSError) -> QMPError:
        try:
            os.ftruncate(fd, current)
        except OSError:
            pass
        return QMPError("%s: %s" % (what, os.strerror(exc.errno or errno.EIO)))

    if prealloc == "off":
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise QMPError("Could not resize file: %s"
                           % os.strerror(exc.errno or errno.EIO)) from None
    elif prealloc == "falloc":
        if size != current:
            try:
                os.posix_fallocate(fd, current, size - current)
            except OSError as exc:
                raise fail("Could not preallocate new data", exc) from None
    elif prealloc == "full":
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise fail("Could not resize file", exc) from None
        pos = current
        try:
            while pos < size:
                pos += os.pwrite(fd, memoryview(_ZEROES)[:min(len(_ZEROES), size - pos)], pos)
        except OSError as exc:
            raise fail("Could not write zeros for preallocation", exc) from None
        try:
            os.fsync(fd)
        except OSError as exc:
            raise fail("Could not flush file to disk", exc) from None
    else:
        raise QMPError("Unsupported preallocation mode: %s" % prealloc)


class Qcow2CreateJob(CreateJob):
    """``driver: qcow2``: QEMU's qcow2_co_create on a ``file`` node."""

    def __init__(self, daemon: Any, job_id: str, options: Dict[str, Any]) -> None:
        super().__init__(daemon, job_id, options)
        self.node: Any = None
        self.inline = False
        self.pin: Any = None
        self.params: Dict[str, Any] = {}

    def create_setup(self) -> None:
        from ..drivers.qcow2 import check_qcow2_options
        opts = self.options
        graph = self.daemon.graph
        ref = opts["file"]
        if isinstance(ref, str):
            node = graph.lookup(ref)
        else:
            node = graph.open(ref, monitor_owned=False)
            self.inline = True
        self.node = node
        self.params = {
            "size": opts["size"],
            "cluster_size": opts.get("cluster-size", 65536),
            "backing_file": opts.get("backing-file"),
            "backing_fmt": opts.get("backing-fmt"),
            "version": opts.get("version", "v3"),
            "refcount_bits": opts.get("refcount-bits", 16),
            "lazy_refcounts": opts.get("lazy-refcounts", False),
            "preallocation": opts.get("preallocation", "off"),
            "compression_type": opts.get("compression-type", "zlib"),
            "extended_l2": opts.get("extended-l2", False),
            "data_file": opts.get("data-file"),
            "encrypt": opts.get("encrypt"),
        }
        check_qcow2_options(**self.params)
        # blk_new_with_bs(bs, WRITE | RESIZE, ALL), after the option checks
        perms.check_new_user(node, {"write", "resize"})
        # For most of its run QEMU's job holds the node through the new
        # image's (unnamed) qcow2 node: blockdev-del then says "Block device
        # f0 is in use" and block_resize meets a format parent.  The pin is
        # that parent; it is not listed in the graph.
        self.pin = Node(graph.generate_name(), {"driver": "qcow2"}, implicit=True,
                        monitor_owned=False)
        self.pin.attach_child("file", node)

    def create_run(self) -> None:
        from ..drivers.qcow2 import create_qcow2
        create_qcow2(self.node, **self.params)

    def release(self) -> None:
        pin, self.pin = self.pin, None
        if pin is not None:
            pin.detach_child("file")
        node, self.node = self.node, None
        if node is not None and self.inline and node.refcount() == 0:
            self.daemon.graph.delete(node)


#: The create drivers blockd implements.
CREATE_JOBS: Dict[str, Type[CreateJob]] = {
    "file": FileCreateJob,
    "qcow2": Qcow2CreateJob,
}


def blockdev_create(daemon: Any, job_id: str, options: Dict[str, Any]) -> CreateJob:
    """``qmp_blockdev_create()``: check the driver, create and start the job.

    :param daemon: the daemon (big lock held).
    :param job_id: the job id.
    :param options: validated ``BlockdevCreateOptions``.
    :return: the started job.
    :raise QMPError: QEMU's errors for the driver and the job id.
    """
    driver = options["driver"]
    if driver not in QEMU_CREATE_DRIVERS:
        raise QMPError("Driver does not support blockdev-create")
    cls = CREATE_JOBS.get(driver)
    if cls is None:
        raise QMPError("Driver '%s' is not supported by blockd" % driver)
    job = cls(daemon, job_id, options)
    job.start()
    return job
