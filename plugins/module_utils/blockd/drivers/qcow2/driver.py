# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``qcow2``: the block driver (QEMU's block/qcow2.c data path).

Requests are split into runs of clusters by :meth:`Qcow2Image.map_extent`;
data clusters become segments of the ``file`` child (``sendfile``-able),
zero clusters ``SEG_ZERO``, unallocated ranges the backing node's segments.
Writes to clusters the image owns go straight to the file without the
metadata lock; allocating writes (and copy-on-write) run under it.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Dict, List, Optional, Tuple

from ...errors import QMPError
from ...graph.io import (BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, REQ_FUA,
                         REQ_MAY_UNMAP, REQ_NO_FALLBACK, SEG_DATA, SEG_FD, SEG_ZERO)
from ..base import Driver
from . import bitmaps, header as hdr
from .backing import ChainGuard, file_identity, header_backing_options, open_backing
from .cluster import K_COMPRESSED, K_DATA, K_UNALLOC, K_ZERO, W_INPLACE
from .image import ImageOptions, Qcow2Image
from .refcount import DISCARD_OTHER, DISCARD_REQUEST, DISCARD_SNAPSHOT

_MISSING = object()
_ZEROES = bytes(1 << 20)
_OVERLAP_TEMPLATES = ("none", "constant", "cached", "all")


def _cache_options(options: Dict[str, Any], cluster_size: int) -> Tuple[Optional[int],
                                                                        Optional[int]]:
    """QEMU's read_cache_sizes() checks.

    :param options: the node options.
    :param cluster_size: the image's cluster size.
    :return: ``(l2 bytes, refcount bytes)``, None where not set.
    :raise QMPError: with QEMU's texts for conflicting sizes.
    """
    total = options.get("cache-size")
    l2 = options.get("l2-cache-size")
    rc = options.get("refcount-cache-size")
    if total is not None:
        if l2 is not None and rc is not None:
            raise QMPError("cache-size, l2-cache-size and refcount-cache-size may not be set "
                           "at the same time")
        if l2 is not None and l2 > total:
            raise QMPError("l2-cache-size may not exceed cache-size")
        if rc is not None and rc > total:
            raise QMPError("refcount-cache-size may not exceed cache-size")
        if l2 is not None:
            rc = total - l2
        elif rc is not None:
            l2 = total - rc
        else:
            rc = min(total, 4 * cluster_size)
            l2 = total - rc
    entry = options.get("l2-cache-entry-size")
    if entry is not None and (entry < 512 or entry > cluster_size or entry & (entry - 1)):
        raise QMPError("L2 cache entry size must be a power of two between 512 and the "
                       "cluster size (%d)" % cluster_size)
    if options.get("cache-clean-interval", 0) > 0xFFFFFFFF:
        raise QMPError("Cache clean interval too big")
    return l2, rc


def _overlap_enabled(value: Any) -> bool:
    """Whether the ``overlap-check`` option leaves checks on.

    :param value: the option (a template name or an object).
    :return: True unless the template is ``none`` with no check enabled.
    """
    if value is None:
        return True
    if isinstance(value, str):
        template = value
        flags: Dict[str, Any] = {}
    else:
        template = value.get("template", "cached")
        flags = {k: v for k, v in value.items() if k != "template"}
    if template not in _OVERLAP_TEMPLATES:
        raise QMPError("Unsupported value '%s' for qcow2 option 'overlap-check'. Allowed are "
                       "any of the following: none, constant, cached, all" % template)
    return template != "none" or any(bool(v) for v in flags.values())


class Qcow2Driver(Driver):
    """The qcow2 format over a ``file`` child, with an optional ``backing``."""

    format_name = "qcow2"
    child_roles = {"file": True}

    #: Set by image creation: no dirty bit, no bitmap handling.
    creating = False

    # -- life cycle -----------------------------------------------------------

    def open(self, options: Dict[str, Any]) -> None:
        """Open the image and its backing chain (see :mod:`.backing`).

        :param options: BlockdevOptionsQcow2 members.
        :raise QMPError: on invalid images or options.
        """
        self.options = options
        self.file = self.node.file
        self._closed = False
        #: Whether the image looks metadata-preallocated (None: not checked yet).
        self._metadata_prealloc: Optional[bool] = None
        read_only = bool(self.node.read_only)
        unmap = bool(getattr(self.node, "unmap", False))
        discard = {DISCARD_REQUEST: bool(options.get("pass-discard-request", unmap)),
                   DISCARD_SNAPSHOT: bool(options.get("pass-discard-snapshot", True)),
                   DISCARD_OTHER: bool(options.get("pass-discard-other", False))}
        img_opts = ImageOptions(read_only=read_only, discard=discard,
                                overlap_check=_overlap_enabled(options.get("overlap-check")),
                                creating=self.creating)
        self.img = img = Qcow2Image(self.file, img_opts)
        path = getattr(self.file.driver, "path", None)
        with ChainGuard(file_identity(path) if path else None):
            img.open()
            self._apply_options(options)
            if not read_only and img.header.incompatible_features & hdr.INCOMPAT_DIRTY \
                    and not self.creating:
                self._repair_dirty()
            self._open_backing(options, path)
            bitmaps.load(self)

    def _apply_options(self, options: Dict[str, Any]) -> None:
        """Runtime options that need the header (cache sizes, checks).

        :param options: the node options.
        """
        img = self.img
        l2, rc = _cache_options(options, img.cluster_size)
        if l2 is not None:
            img.l2cache.capacity = max(4, -(-l2 // img.cluster_size))
        if rc is not None:
            img.refcounts.cache_size = max(4, -(-rc // img.cluster_size))
        if options.get("lazy-refcounts") and img.version < 3:
            raise QMPError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                           "compatibility level")
        encrypt = options.get("encrypt")
        if encrypt is not None:
            raise QMPError("No encryption in image header, but options specified format "
                           "'%s'" % encrypt.get("format", ""))
        if options.get("data-file") is not None:
            raise QMPError("'data-file' can only be set for images with an external data file")

    def _repair_dirty(self) -> None:
        """A dirty image is checked and repaired on a read/write open (QEMU's
        ``-r all``); structural damage makes the open fail instead."""
        from .check import check_image
        result = check_image(self.img, repair=True)
        if result.corruptions or result.check_errors:
            raise QMPError("Could not repair dirty image: %d errors were found on the image; "
                           "run 'qemu-img check -r all' (%s)"
                           % (result.corruptions + result.check_errors,
                              "; ".join(result.messages[:3])))

    def _open_backing(self, options: Dict[str, Any], path: Optional[str]) -> None:
        """Open the backing child as the options or the header say.

        :param options: the node options.
        :param path: the image file's path, if it is a plain file.
        """
        ref = options["backing"] if "backing" in options else _MISSING
        h = self.img.header
        self._header_backing: Optional[str] = None
        if h.backing_file:
            name = h.backing_file
            if not os.path.isabs(name) and path is not None:
                name = os.path.join(os.path.dirname(path), name)
            self._header_backing = name
        self._backing_given = ref is not _MISSING
        if ref is _MISSING:
            if not h.backing_file:
                return
            ref = header_backing_options(path, self.file.filename(), h.backing_file,
                                         h.backing_format)
        if ref is None:
            return
        open_backing(self.node, ref)

    def _backing_overridden(self) -> bool:
        """QEMU's bdrv_backing_overridden(): the backing node is not the
        file the header names.

        :return: True if overridden.
        """
        if not self._backing_given:
            return False
        backing = self.backing
        if backing is None:
            return self._header_backing is not None
        return backing.filename() != self._header_backing

    @property
    def backing(self) -> Optional[Any]:
        """The backing node (read from the graph: edges may be rewired)."""
        return self.node.backing

    def _shutdown(self) -> None:
        """Write metadata back once (idempotent)."""
        if self._closed:
            return
        self._closed = True
        bitmaps.shutdown(self)
        self.img.close()

    def close(self) -> None:
        """Write everything back, clear the dirty bit."""
        if not getattr(self, "_closed", True):
            self._shutdown()

    # -- sizes ----------------------------------------------------------------------

    def getlength(self) -> int:
        """The virtual size.

        :return: bytes.
        """
        return self.img.size

    def cluster_size(self) -> int:
        """The cluster size.

        :return: bytes.
        """
        return self.img.cluster_size

    def actual_size(self) -> Optional[int]:
        """Host bytes used by the image file.

        :return: bytes, or None.
        """
        return self.file.driver.actual_size()

    # -- reads ----------------------------------------------------------------------

    def _backing_len(self) -> int:
        """The backing node's size (0 without one).

        :return: bytes.
        """
        return self.backing.getlength() if self.backing is not None else 0

    def _read_under(self, offset: int, n: int) -> bytes:
        """What the backing chain (or nothing) gives for an unallocated range.

        :param offset: guest offset.
        :param n: bytes.
        :return: the bytes (zeroes past the backing node's end).
        """
        b = self.backing
        if b is None:
            return bytes(n)
        limit = min(b.getlength(), self.img.size)
        if offset >= limit:
            return bytes(n)
        m = min(n, limit - offset)
        data = b.pread(offset, m)
        return data if m == n else bytes(data) + bytes(n - m)

    def read_segments(self, offset: int, length: int) -> List[tuple]:
        """The range as segments: file ranges of data clusters, zeroes, the
        backing node's segments for unallocated ranges, inflated compressed
        clusters.

        :param offset: guest offset.
        :param length: bytes.
        :return: segments (see blockd.graph.io).
        """
        img = self.img
        segs: List[tuple] = []
        cmask = img.cluster_size - 1
        while length > 0:
            with img.lock:
                kind, n, value = img.map_extent(offset, length)
            if kind == K_DATA:
                within = min(n, max(0, img.file_end - value))
                if within:
                    for seg in self.file.read_segments(value, within):
                        _append(segs, seg)
                if within < n:
                    _append(segs, (SEG_ZERO, n - within))
            elif kind == K_ZERO:
                _append(segs, (SEG_ZERO, n))
            elif kind == K_UNALLOC:
                self._backing_segments(segs, offset, n)
            else:
                pos = offset & cmask
                segs.append((SEG_DATA, img.decompress(value)[pos:pos + n]))
            offset += n
            length -= n
        return segs

    def _backing_segments(self, segs: List[tuple], offset: int, n: int) -> None:
        """Append the segments of an unallocated range.

        :param segs: the list to extend.
        :param offset: guest offset.
        :param n: bytes.
        """
        b = self.backing
        if b is not None:
            blen = b.getlength()
            if offset < blen:
                m = min(n, blen - offset)
                for seg in b.read_segments(offset, m):
                    _append(segs, seg)
                offset += m
                n -= m
        if n:
            _append(segs, (SEG_ZERO, n))

    def pread(self, offset: int, length: int) -> bytes:
        """Read guest data.

        :param offset: guest offset.
        :param length: bytes.
        :return: the bytes.
        """
        img = self.img
        parts: List[bytes] = []
        cmask = img.cluster_size - 1
        while length > 0:
            with img.lock:
                kind, n, value = img.map_extent(offset, length)
            if kind == K_DATA:
                parts.append(img.read(value, n))
            elif kind == K_ZERO:
                parts.append(bytes(n))
            elif kind == K_UNALLOC:
                parts.append(self._read_under(offset, n) if self.backing is not None
                             else bytes(n))
            else:
                pos = offset & cmask
                parts.append(img.decompress(value)[pos:pos + n])
            offset += n
            length -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- writes -----------------------------------------------------------------------

    def _check_writable(self) -> None:
        """Raise EROFS/EIO when writes are impossible."""
        img = self.img
        if img.read_only:
            raise OSError(errno.EROFS, "qcow2: node '%s' is read-only" % self.node.name)
        if img.fatal:
            raise OSError(errno.EIO, "qcow2: image is corrupt: %s" % img.fatal)

    def pwrite(self, offset: int, data: Any, flags: int = 0) -> None:
        """Write guest data (copy-on-write for clusters not owned yet).

        :param offset: guest offset.
        :param data: a bytes-like object.
        :param flags: ``REQ_FUA`` flushes before returning.
        """
        self._check_writable()
        img = self.img
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        total = len(view)
        pos = 0
        while pos < total:
            with img.lock:
                self._check_writable()
                kind, n, host = img.plan_write(offset + pos, total - pos)
                if kind == W_INPLACE:
                    img.check_data_write(host, n)
                    img.begin_modify()
                    if host + n > img.file_end:     # preallocated past EOF
                        img.file_end = host + n
                    epoch = img.start_unlocked_write()
                else:
                    n = img.write_alloc(offset + pos, view[pos:], self._read_under,
                                        img.begin_modify)
                    img.maybe_flush_frees()
            if kind == W_INPLACE:
                try:
                    self.file.pwrite(host, view[pos:pos + n])
                    img.unsynced = True
                finally:
                    img.end_unlocked_write(epoch)
            pos += n
        if flags & REQ_FUA:
            self.flush()

    def _reads_zero(self, offset: int, length: int) -> bool:
        """Whether a range reads as zeroes (block status through the chain).

        :param offset: guest offset.
        :param length: bytes.
        :return: True when every byte reads as zero.
        """
        end = min(offset + length, self.img.size)
        while offset < end:
            n, flags, _where = self.block_status(offset, end - offset)
            if not flags & BDRV_BLOCK_ZERO:
                return False
            offset += n
        return True

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        """Make a range read as zeroes: zero flags for whole clusters
        (released with ``REQ_MAY_UNMAP``), zero buffers elsewhere unless
        ``REQ_NO_FALLBACK``.

        :param offset: guest offset.
        :param length: bytes.
        :param flags: ``REQ_*`` flags.
        """
        self._check_writable()
        img = self.img
        cs = img.cluster_size
        end = offset + length
        if img.version < 3 and self.backing is not None:
            # No zero flag and discarding would expose the backing file.
            if flags & REQ_NO_FALLBACK:
                raise OSError(errno.ENOTSUP, "qcow2 v2 image with a backing file cannot "
                              "zero efficiently")
            self._write_zero_buffers(offset, length)
        else:
            astart = -(-offset // cs) * cs
            aend = end if end == img.size else end // cs * cs
            head_end = min(astart, end)
            if offset < head_end:
                self._zero_partial(offset, head_end, flags)
            if astart < aend:
                self._zero_clusters(astart, aend, flags)
            tail_start = max(astart, aend)
            if tail_start < end:
                self._zero_partial(tail_start, end, flags)
        if flags & REQ_FUA:
            self.flush()

    def _zero_clusters(self, start: int, end: int, flags: int) -> None:
        """Zero whole clusters (v3 zero flag; v2 without backing: discard).

        :param start: guest offset (cluster aligned).
        :param end: guest end offset.
        :param flags: ``REQ_*`` flags.
        """
        img = self.img
        with img.lock:
            self._check_writable()
            img.validate_range(start, end - start)
            img.begin_modify()
            if img.version >= 3:
                img.zeroize(start, end - start, bool(flags & REQ_MAY_UNMAP),
                            self.backing is not None)
            else:
                img.discard(start, end - start, False)
            img.maybe_flush_frees()

    def _zero_partial(self, start: int, end: int, flags: int) -> None:
        """Zero part of one cluster: zero flag if the rest already reads
        zero, else write zeroes (QEMU's qcow2_co_pwrite_zeroes).

        :param start: guest offset.
        :param end: guest end offset, in the same cluster.
        :param flags: ``REQ_*`` flags.
        """
        img = self.img
        cs = img.cluster_size
        cstart = start // cs * cs
        cend = min(cstart + cs, img.size)
        if self._reads_zero(cstart, start - cstart) and self._reads_zero(end, cend - end):
            with img.lock:
                kind, _n, value = img.map_extent(cstart, 1)
                if kind in (K_ZERO, K_UNALLOC):
                    self._check_writable()
                    img.validate_range(cstart, cend - cstart)
                    img.begin_modify()
                    if img.version >= 3:
                        img.zeroize(cstart, cend - cstart, bool(flags & REQ_MAY_UNMAP),
                                    self.backing is not None)
                    else:
                        img.discard(cstart, cend - cstart, False)
                    return
        if flags & REQ_NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "qcow2 cannot zero part of a cluster efficiently")
        self._write_zero_buffers(start, end - start)

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        """The slow path: write zeroes as data.

        :param offset: guest offset.
        :param length: bytes.
        """
        end = offset + length
        while offset < end:
            n = min(len(_ZEROES), end - offset)
            self.pwrite(offset, memoryview(_ZEROES)[:n])
            offset += n

    def pdiscard(self, offset: int, length: int) -> None:
        """Release whole clusters (partial clusters are ignored, as in QEMU).

        :param offset: guest offset.
        :param length: bytes.
        """
        img = self.img
        if img.read_only or img.fatal:
            return
        if img.version < 3 and self.backing is not None:
            return  # discarding would expose stale backing data
        cs = img.cluster_size
        end = offset + length
        astart = -(-offset // cs) * cs
        aend = end if end == img.size else end // cs * cs
        if astart >= aend:
            return
        with img.lock:
            img.validate_range(astart, aend - astart)
            img.begin_modify()
            img.discard(astart, aend - astart, self.backing is not None)
            img.maybe_flush_frees()

    def flush(self) -> None:
        """Write metadata back in order, then a barrier."""
        img = self.img
        if img.read_only:
            return
        with img.lock:
            img.flush_metadata()
            img.sync()

    # -- block status ----------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Tuple[int, int, int]:
        """Status of the range start: allocated/zero/data, and where in the
        backing chain the data comes from.

        :param offset: guest offset.
        :param length: bytes.
        :return: ``(n, flags, depth)``; depth 0 is this image, k the k-th backing node, -1
            nowhere.
        """
        img = self.img
        with img.lock:
            kind, n, value = img.map_extent(offset, length)
            if kind == K_DATA and self._metadata_prealloc is None:
                self._metadata_prealloc = self._detect_metadata_preallocation()
        if kind == K_DATA:
            flags = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED
            # QEMU asks the file (BDRV_BLOCK_RECURSE) only for images that
            # look metadata-preallocated; otherwise a data cluster is data.
            if not self._metadata_prealloc:
                return n, flags, 0
            if value >= img.file_end:
                return n, flags | BDRV_BLOCK_ZERO, 0
            fn, fflags, _where = self.file.block_status(value, min(n, img.file_end - value))
            return min(n, fn), flags | (fflags & BDRV_BLOCK_ZERO), 0
        if kind == K_ZERO:
            return n, BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED, 0
        if kind == K_COMPRESSED:
            return n, BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, 0
        b = self.backing
        if b is not None:
            blen = b.getlength()
            if offset < blen:
                bn, bflags, bdepth = b.block_status(offset, min(n, blen - offset))
                return bn, bflags & ~BDRV_BLOCK_ALLOCATED, bdepth + 1 if bdepth >= 0 else -1
        return n, BDRV_BLOCK_ZERO, -1

    def _detect_metadata_preallocation(self) -> bool:
        """qcow2_detect_metadata_preallocation(): many more clusters in use
        than the file really has allocated (checked once per open, img.lock held).

        :return: whether block status should look into the file.
        """
        img = self.img
        real = self.file.driver.actual_size()
        if real is None:
            return False
        cs = img.cluster_size
        real_clusters = real // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-self.file.getlength() // cs)
        return img.refcounts.count_used(end_cluster, threshold) >= threshold

    # -- resize ------------------------------------------------------------------------

    def truncate(self, size: int, prealloc: str = "off") -> None:
        """Resize (block_resize): grow, or shrink (discarding the cropped clusters).

        :param size: new virtual size, a multiple of 512.
        :param prealloc: ``off``, ``metadata``, ``falloc`` or ``full`` for
            the added area.
        :raise OSError: EINVAL/ENOTSUP with QEMU's texts where it has them.
        """
        self._check_writable()
        img = self.img
        if size < 0 or size % 512:
            raise OSError(errno.EINVAL, "The new size must be a multiple of 512")
        if prealloc not in ("off", "metadata", "falloc", "full"):
            raise OSError(errno.ENOTSUP, "Unsupported preallocation mode '%s'" % prealloc)
        if img.snapshots and img.version < 3:
            raise OSError(errno.ENOTSUP, "Can't resize a v2 image which has snapshots")
        if img.bitmaps:
            raise OSError(errno.ENOTSUP, "Can't resize an image which has persistent bitmaps "
                          "(blockd does not update them yet)")
        with img.lock:
            old = img.size
            cs = img.cluster_size
            if size < old:
                if prealloc != "off":
                    raise OSError(errno.EINVAL,
                                  "Preallocation can't be used for shrinking an image")
                # qcow2_co_truncate: the cropped clusters are discarded
                first = -(-size // cs) * cs
                img.begin_modify()
                if first < old:
                    img.discard(first, -(-old // cs) * cs - first, False, full=True)
                img.flush_metadata()
                img.set_size(size)
                return
            if size == old:
                return
            img.begin_modify()
            img.grow_l1(img.size_to_l1(size))
            if prealloc != "off":
                self._preallocate(old, size, prealloc)
            blen = self._backing_len()
            if blen > old:
                # The new area must not show the (longer) backing file: zero
                # it while only the in-memory size has changed.
                img.size = size
                try:
                    self._zero_grown(old, min(size, blen))
                finally:
                    img.size = old
            img.flush_metadata()
            img.sync()
            img.set_size(size)

    def _preallocate(self, start: int, end: int, mode: str) -> None:
        """Allocate data clusters for a grown area.

        :param start: old size.
        :param end: new size.
        :param mode: ``metadata``, ``falloc`` or ``full``.
        """
        img = self.img
        runs: List[Tuple[int, int]] = []
        last = img.preallocate(start, end, runs)
        if not last:
            return
        if mode == "full":
            # every new data cluster is written (metadata allocated while
            # preallocating may lie between them, so not just a tail)
            for host, length in runs:
                pos, stop = host, host + length
                while pos < stop:
                    n = min(len(_ZEROES), stop - pos)
                    img.write(pos, memoryview(_ZEROES)[:n])
                    pos += n
            return
        if last > img.file_end:
            self.file.driver.truncate(last)
            img.file_end = last
        if mode == "falloc":
            for host, length in runs:
                try:
                    self.file.pwrite_zeroes(host, length)
                except OSError:
                    pass

    def _zero_grown(self, start: int, end: int) -> None:
        """Hide backing data under a grown area (QEMU's BDRV_REQ_ZERO_WRITE).

        :param start: old size.
        :param end: end of what the backing node would show.
        """
        cs = self.img.cluster_size
        astart = -(-start // cs) * cs
        if astart > start:
            self._write_zero_buffers(start, min(astart, end) - start)
        if end > astart:
            if self.img.version >= 3:
                self._zero_clusters(astart, end, 0)
            else:
                self._write_zero_buffers(astart, end - astart)

    # -- description --------------------------------------------------------------------

    def filename(self) -> str:
        """The file's name, or ``json:{...}`` when options (or a backing override) matter.

        :return: the filename.
        """
        name = self.file.filename()
        if self._backing_overridden():
            return self.node.json_filename()
        if name.startswith("json:"):
            return self.node.json_filename()
        return name

    def image_info(self) -> Dict[str, Any]:
        """ImageInfo members: format-specific data, dirty flag, backing file
        and format from the header, snapshots.

        :return: the members.
        """
        img = self.img
        h = img.header
        # The dirty bit blockd sets while it writes is its crash marker, not
        # a state QEMU would report (its refcounts are never behind).
        dirty = bool(h.incompatible_features & hdr.INCOMPAT_DIRTY) and not img.dirty_by_us
        info: Dict[str, Any] = {"format-specific": img.format_specific(), "dirty-flag": dirty}
        if h.backing_file:
            info["backing-filename"] = h.backing_file
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
        if img.snapshots:
            info["snapshots"] = [sn.info() for sn in img.snapshots]
        return info

    def check(self, repair: bool = False) -> Any:
        """Consistency check of the open image (see :func:`.check.check_image`).

        :param repair: fix leaks, too low refcounts and COPIED flags.
        :return: a :class:`.check.CheckResult`.
        """
        from .check import check_image
        with self.img.lock:
            if not self.img.read_only and self.img.modifying:
                self.img.flush_metadata()
                self.img.sync()
            return check_image(self.img, repair=repair)


def _append(segs: List[tuple], seg: tuple) -> None:
    """Add a segment, merging it into the previous one when contiguous.

    :param segs: the list.
    :param seg: the new segment.
    """
    if segs:
        last = segs[-1]
        if seg[0] == SEG_ZERO and last[0] == SEG_ZERO:
            segs[-1] = (SEG_ZERO, last[1] + seg[1])
            return
        if seg[0] == SEG_FD and last[0] == SEG_FD and last[1] == seg[1] and \
                last[2] + last[3] == seg[2]:
            segs[-1] = (SEG_FD, last[1], last[2], last[3] + seg[3])
            return
    segs.append(seg)
