# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring an nbd_copy backup (a raw file or a qcow2 backing chain).

``restore`` flattens the backup into a standalone raw (sparse) or qcow2
(no backing file) image, like ``qemu-img convert -O FMT backup dest``
(QEMU's ``convert_do_copy``: block status first, zero ranges not written,
data written with all-zero pieces skipped).  The image is written as
``dest.partial`` and renamed into place only when complete and fsync'd, so
a failed or mismatching restore leaves no ``dest``.

``restore_to_nbd`` streams the backup into a writable NBD export of the
same size (what ``qemu-img convert -n backup nbd://...`` or ``nbdcopy``
would do): data with NBD_CMD_WRITE, zero/hole ranges with
NBD_CMD_WRITE_ZEROES (FAST_ZERO off, so the server may fall back to
writing zeroes).

With ``verify`` (the default) every block written is hashed and checked
against the backup's manifest (:mod:`.manifest`: per-block sha256, the
whole-disk digest); the NBD path checks the backup before writing anything
and re-reads the export afterwards.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

from ..nbd.client import NBDError, connect_uri
from . import manifest as mf
from .engine import CHUNK, export_digest
from .errors import CopyError
from .manifest import BLOCK, DiskDigest
from .output import LocalImage, Qcow2Output, RawOutput, _pieces


def _open_backup(src: str, fmt: Optional[str]) -> LocalImage:
    """Open the backup with its backing chain; a broken chain is a ``base`` error."""
    try:
        return LocalImage(src, fmt, "backup")
    except CopyError as exc:
        # The top image exists, so the failure is in its backing chain.
        raise CopyError("base", "cannot open the backing chain of %s: %s"
                        % (src, exc.message)) from None


def _load_manifest(src: str, manifest: Optional[str], verify: bool) -> Optional[Dict[str, Any]]:
    """The backup's manifest with ``verify`` (a ``manifest`` error when unusable), else None."""
    if not os.path.exists(src):
        raise CopyError("usage", "backup %s is missing" % src)
    if not verify:  # the manifest is neither needed nor trusted
        return None
    return mf.load(manifest or src + ".manifest.json")


def _plan(img: LocalImage) -> List[Tuple[int, int, bool]]:
    """Block-aligned ``(offset, length, zero)`` runs covering the image, from block
    status (QEMU's ``convert_iteration_sectors``): a 1 MiB block is zero only when
    the whole block reads as zeroes, so zero runs are hashed without reading."""
    from ..graph.io import BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO
    data: List[List[int]] = []
    off, size = 0, img.size
    while off < size:
        n, flags, depth = img.node.block_status(off, size - off)
        if not (flags & BDRV_BLOCK_ZERO or (not flags & BDRV_BLOCK_DATA and depth == -1)):
            start, end = off // BLOCK * BLOCK, min(size, -(-(off + n) // BLOCK) * BLOCK)
            if data and data[-1][1] >= start:
                data[-1][1] = max(data[-1][1], end)
            else:
                data.append([start, end])
        off += n
    plan, pos = [], 0
    for start, end in data:
        if start > pos:
            plan.append((pos, start - pos, True))
        plan.append((start, end - start, False))
        pos = end
    if pos < size:
        plan.append((pos, size - pos, True))
    return plan


def _first_bad(got: bytes, want: bytes, off: int) -> int:
    first = next((i for i in range(0, min(len(got), len(want)), 32)
                  if got[i:i + 32] != want[i:i + 32]), 0)
    return off + first // 32 * BLOCK


def _stream(img: LocalImage, doc: Optional[Dict[str, Any]], write: Any, write_zeroes: Any,
            src: str) -> Dict[str, Any]:
    """Read the backup's data runs in :data:`CHUNK` pieces, hand data and zero runs
    to the writer, hash every block and (with a manifest) compare before writing.
    The loop of QEMU's ``convert_do_copy``."""
    wanted = b"".join(mf.entry_hashes(e) for e in doc["extents"]) if doc is not None else None
    digest = DiskDigest()
    read = zeroed = 0
    for off, length, zero in _plan(img):
        pieces = [(off, length)] if zero else \
            [(o, min(CHUNK, off + length - o)) for o in range(off, off + length, CHUNK)]
        for o, n in pieces:
            if zero:
                got = mf.zero_hashes(o, n)
            else:
                buf = img.pread(o, n)
                got = mf.hash_blocks(buf)
                read += n
            if wanted is not None:
                want = wanted[o // BLOCK * 32:o // BLOCK * 32 + len(got)]
                if got != want:  # checked before anything is written
                    raise CopyError("verify", "backup %s differs from its manifest, first at "
                                    "offset %d" % (src, _first_bad(got, want, o)))
            if zero:
                write_zeroes(o, n)
                zeroed += n
            else:
                write(o, buf)
            digest.add(got)
    if doc is not None and digest.hexdigest() != doc["disk_sha256"]:
        raise CopyError("verify", "backup %s: whole-disk digest mismatch" % src)
    return {"disk_sha256": digest.hexdigest(), "bytes_read": read, "bytes_zero": zeroed}


def restore(src_backup: str, dest: str, fmt: str = "raw", *, manifest: Optional[str] = None,
            verify: bool = True, overwrite: bool = False) -> Dict[str, Any]:
    """Write the disk a backup (chain) holds into a standalone raw or qcow2 image.

    Follows ``qemu-img convert -O FMT`` (``convert_do_copy``): zero ranges are
    not written (sparse raw, unallocated qcow2 clusters), the qcow2 has no
    backing file.

    :param src_backup: a full backup or the top of an incremental chain.
    :param dest: the image to create (written as ``dest.partial`` first).
    :param manifest: the backup's manifest (default ``src_backup.manifest.json``).
    :param verify: check every block against the manifest and the whole-disk digest.
    :param overwrite: replace an existing ``dest``.
    :raise CopyError: ``usage`` (bad format/missing backup), ``manifest``, ``base``
        (broken chain), ``verify`` (the backup does not match its manifest),
        ``dest`` (refusing to overwrite, I/O errors); no ``dest`` is left then.
    """
    started = time.monotonic()
    if fmt not in ("raw", "qcow2"):
        raise CopyError("usage", "unknown restore format %r" % fmt)
    if os.path.abspath(dest) == os.path.abspath(src_backup):
        raise CopyError("usage", "restore destination is the backup itself")
    if os.path.exists(dest) and not overwrite:
        raise CopyError("dest", "refusing to overwrite existing %s" % dest)
    doc = _load_manifest(src_backup, manifest, verify)
    img = _open_backup(src_backup, doc["format"] if doc else None)
    partial = dest + ".partial"
    out: Any = None
    try:
        if doc is not None and img.size != doc["size"]:
            raise CopyError("verify", "%s is %d bytes, its manifest says %d"
                            % (src_backup, img.size, doc["size"]))
        if os.path.exists(partial):
            os.unlink(partial)
        out = (RawOutput if fmt == "raw" else Qcow2Output)(partial, img.size, create=True)
        res = _stream(img, doc, out.write, out.write_zeroes, src_backup)
        out.flush()
        out.close()
        out = None
        _finish(partial, dest, overwrite)
    except BaseException:
        if out is not None:
            try:
                out.close()
            except (OSError, CopyError):
                pass
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    finally:
        img.close()
    res.update({"status": "ok", "source": src_backup, "dest": dest, "format": fmt,
                "size": img.size, "verified": doc is not None,
                "duration": round(time.monotonic() - started, 3)})
    return res


def _finish(partial: str, dest: str, overwrite: bool) -> None:
    """fsync the partial image, move it into place and fsync the directory.

    Without ``overwrite`` the move is ``link`` + ``unlink``, which fails
    rather than replace a ``dest`` created while the restore ran.
    """
    try:
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(partial, dest)
        else:
            try:
                os.link(partial, dest)
            except FileExistsError:
                raise CopyError("dest", "refusing to overwrite existing %s" % dest) from None
            os.unlink(partial)
        mf.fsync_dir(dest)
    except OSError as exc:
        raise CopyError("dest", "cannot finish %s: %s" % (dest, exc.strerror or exc)) from None


def restore_to_nbd(src_backup: str, uri: str, *, manifest: Optional[str] = None,
                   verify: bool = True, **connect_kwargs: Any) -> Dict[str, Any]:
    """Write the disk a backup (chain) holds into a writable NBD export of the same size.

    Like ``qemu-img convert -n -O raw backup nbd://...``: data ranges are
    written (all-zero 64 KiB pieces as NBD_CMD_WRITE_ZEROES), zero/hole ranges
    of the backup are zeroed with NBD_CMD_WRITE_ZEROES without FAST_ZERO.
    With ``verify`` the backup is checked against its manifest before the
    export is touched, and the export is re-read and its digest compared after.

    :raise CopyError: as :func:`restore`; ``source`` for connection/NBD errors,
        ``dest`` for a read-only export or one whose size differs.
    """
    started = time.monotonic()
    doc = _load_manifest(src_backup, manifest, verify)
    img = _open_backup(src_backup, doc["format"] if doc else None)
    redacted = mf.redact_uri(uri)
    try:
        if doc is not None and img.size != doc["size"]:
            raise CopyError("verify", "%s is %d bytes, its manifest says %d"
                            % (src_backup, img.size, doc["size"]))
        if doc is not None:  # nothing is written from a bad backup
            _stream(img, doc, lambda o, b: None, lambda o, n: None, src_backup)
        try:
            client = connect_uri(uri, **connect_kwargs)
        except NBDError as exc:
            raise CopyError("source", "connecting to %s failed: %s" % (redacted, exc)) from None
        try:
            info = client.info
            if info.read_only:
                raise CopyError("dest", "export %s is read-only" % redacted)
            if client.size != img.size:
                raise CopyError("dest", "export %s is %d bytes, the backup %d"
                                % (redacted, client.size, img.size))

            def zero(off: int, n: int) -> None:
                if info.can_zero:
                    client.zero(off, n, fast=False)
                else:
                    for o in range(off, off + n, CHUNK):
                        client.pwrite(o, bytes(min(CHUNK, off + n - o)))

            def write(off: int, buf: Any) -> None:
                mv = memoryview(buf)
                for start, end, is_zero in _pieces(mv):
                    if is_zero:
                        zero(off + start, end - start)
                    else:
                        client.pwrite(off + start, mv[start:end])

            res = _stream(img, None, write, zero, src_backup)
            if info.can_flush:
                client.flush()
        except NBDError as exc:
            raise CopyError("source", "writing to %s failed: %s" % (redacted, exc)) from None
        finally:
            try:
                client.close()
            except (NBDError, OSError):
                pass
    finally:
        img.close()
    if doc is not None:
        res["disk_sha256"] = doc["disk_sha256"]
        try:
            live = export_digest(uri, connections=1, **connect_kwargs)
        except NBDError as exc:
            raise CopyError("source", "re-reading %s failed: %s" % (redacted, exc)) from None
        if live["disk_sha256"] != doc["disk_sha256"]:
            mine = b"".join(mf.entry_hashes(e) for e in doc["extents"])
            theirs = b"".join(mf.entry_hashes(e) for e in live["entries"])
            raise CopyError("verify", "export %s differs from backup %s after restore, first "
                            "at offset %d" % (redacted, src_backup, _first_bad(theirs, mine, 0)))
    res.update({"status": "ok", "source": src_backup, "dest": redacted, "size": img.size,
                "verified": doc is not None,
                "duration": round(time.monotonic() - started, 3)})
    return res


__all__: List[str] = ["restore", "restore_to_nbd"]
