# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""nbd_copy: pull an NBD export into a raw or qcow2 backup, with a manifest.

The data path follows ``qemu-img convert`` (QEMU's ``convert_do_copy``):
block status first (``base:allocation``), zero/hole ranges skipped, data read
with many requests in flight (``convert_co_do_copy`` coroutines; here NBD
futures over one or several multi-conn connections).  Each reply is hashed
and written by the thread that received it, while it is still in that CPU's
cache (see :class:`_Chunk`); the manifest is built in plan order, and the
resume log only ever records extents whose writes are all done.
On top: block hashes for the manifest (see :mod:`.manifest`), a resume log
(:mod:`.state`), a progress file, and an atomic finish -- the output and the
manifest are written as ``.partial`` files, fsync'd and renamed only when
complete, so nothing half-written looks valid and no good file is replaced.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Sequence, Tuple

from ..nbd.client import ConnectionPool, NBDError, connect_uri
from . import manifest as mf
from .errors import CopyError
from .manifest import BLOCK, DiskDigest
from .output import NullOutput, Qcow2Output, RawOutput
from .plan import make_plan, plan_from_dirty_status
from .state import StateLog

if TYPE_CHECKING:  # imported when used: a multi-conn copy needs no executor
    from concurrent.futures import Executor

#: Bytes per pipeline item (one reused buffer; ``inflight`` of them in flight).
CHUNK = 1 << 20
#: Largest read request: a piece hashed and written on arrival (a multiple
#: of the 1 MiB hash block; qsd serves 4 MiB reads slower than 1-2 MiB ones).
REQUEST = 1 << 20
#: Chunks in flight by default (4 MiB): the buffers stay in the CPU caches
#: between the socket, the hash and the write.  Deeper pipelines measured
#: slower on 2 cores (cache misses; on a busy machine, more threads of the
#: client and of a Python server waiting for their GIL), see
#: docs/performance.md; a link with a long round trip wants more.
INFLIGHT = 4

#: Commit (flush output, append resume log) at least every so many bytes / seconds.
COMMIT_BYTES = 256 << 20
COMMIT_SECONDS = 2.0
#: Progress file updates at most this often.
PROGRESS_INTERVAL = 0.25
_BASE_ALLOCATION = "base:allocation"


def default_connections() -> int:
    """Connections by default: one per CPU, at most 4 (each connection's
    reader thread hashes and writes what it receives; more threads than
    CPUs only wait for each other)."""
    return max(1, min(4, os.cpu_count() or 1))


def _source_error(exc: BaseException, what: str = "reading the export") -> CopyError:
    return CopyError("source", "%s failed: %s" % (what, exc))


class Progress:
    """The progress file (JSON, replaced atomically, at most 4 times a second)."""

    def __init__(self, path: Optional[str], total: int, data_total: int) -> None:
        self.path = path
        self.total, self.data_total = total, data_total
        self.done = self.copied = 0
        self.start = time.monotonic()
        self._last = 0.0

    def snapshot(self, status: str = "running") -> Dict[str, Any]:
        """The current progress as a dict."""
        elapsed = max(1e-9, time.monotonic() - self.start)
        rate = self.copied / elapsed
        left = self.data_total - self.copied
        return {"status": status, "bytes_done": self.done, "bytes_total": self.total,
                "bytes_copied": self.copied, "bytes_to_copy": self.data_total,
                "rate": int(rate), "eta": round(left / rate, 1) if rate > 0 else None,
                "elapsed": round(elapsed, 3), "updated": time.time()}

    def update(self, force: bool = False, status: str = "running") -> None:
        """Rewrite the file when due (or forced)."""
        if not self.path:
            return
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        try:
            mf.write_json_atomic(self.path, self.snapshot(status), durable=False)
        except OSError:
            pass  # progress is advisory


class _Source:
    """The export: a :class:`ConnectionPool` or a caller's client."""

    def __init__(self, source: Any, connections: Optional[int], contexts: List[str],
                 kwargs: Dict[str, Any]) -> None:
        self.own = isinstance(source, str)
        connections = connections or default_connections()
        self.uri = mf.redact_uri(source) if self.own else "<client>"
        try:
            if self.own:
                self.conn: Any = ConnectionPool(
                    lambda: connect_uri(source, meta_contexts=contexts, **kwargs), connections)
            else:
                self.conn = source
        except NBDError as exc:
            raise _source_error(exc, "connecting to %s" % self.uri) from None
        first = self.conn.clients[0] if hasattr(self.conn, "clients") else self.conn
        self.first = first
        self.size = first.size
        self.max_request = min(REQUEST, first.max_request)

    def map(self, context: str) -> List[Tuple[int, int, int]]:
        """Block status over the whole export."""
        if not self.first.can_meta_context(context):
            if context == _BASE_ALLOCATION:
                return [(0, self.size, 0)]  # no block status: all data
            raise CopyError("usage", "the export does not offer meta context %r" % context)
        try:
            return [tuple(e) for e in self.first.map(context)]
        except NBDError as exc:
            raise _source_error(exc, "block status") from None

    def submit_read(self, offset: int, length: int, buf: Any) -> Any:
        return self.conn.submit_read(offset, length, buf)

    def close(self) -> None:
        if self.own:
            try:
                self.conn.close()
            except (NBDError, OSError):
                pass


def _check_base(base: str) -> Tuple[Dict[str, Any], str]:
    """Load the base backup's manifest and check the base file is what it describes."""
    path = base + ".manifest.json"
    try:
        doc = mf.load(path, "base manifest")
    except CopyError as exc:
        raise CopyError("base", exc.message) from None
    try:
        st = os.stat(base)
    except OSError:
        raise CopyError("base", "base backup %s is missing" % base) from None
    out = doc.get("output", {})
    if st.st_size != out.get("file_size") or st.st_mtime_ns != out.get("mtime_ns"):
        raise CopyError("base", "base backup %s changed since its manifest was written" % base)
    return doc, mf.file_digest(path)


def _backing_name(base: str, dest: str) -> str:
    """The backing file name to record: relative when base sits beside dest."""
    bdir, ddir = os.path.dirname(os.path.abspath(base)), os.path.dirname(os.path.abspath(dest))
    return os.path.basename(base) if bdir == ddir else os.path.abspath(base)


def copy(source: Any, dest: str, fmt: str = "raw", *, base: Optional[str] = None,
         extents: Optional[Sequence[Tuple[int, int]]] = None, dirty_bitmap: Optional[str] = None,
         connections: Optional[int] = None, inflight: Optional[int] = None,
         progress_file: Optional[str] = None,
         manifest: Optional[str] = None, resume: bool = True, overwrite: bool = False,
         commit_bytes: int = COMMIT_BYTES, **connect_kwargs: Any) -> Dict[str, Any]:
    """Pull an NBD export into ``dest``.

    :param source: an NBD URI (``nbd://``, ``nbd+unix://``, ``nbds://``...) or
        a connected :class:`~blockd.nbd.client.NBDClient`/``ConnectionPool``.
    :param dest: the output path (written as ``dest.partial`` until complete).
    :param fmt: ``raw`` or ``qcow2``.
    :param base: previous backup (with its manifest): the output is an
        incremental qcow2 overlay backed by it.
    :param extents: for an incremental, the dirty ``(offset, length)`` ranges.
    :param dirty_bitmap: for an incremental, a bitmap name: the dirty ranges
        come from the export's ``qemu:dirty-bitmap:NAME`` context.
    :param connections: connections to open when the export allows multi-conn
        (None: :func:`default_connections`).
    :param inflight: :data:`CHUNK` buffers in flight (None: :data:`INFLIGHT`).
    :param progress_file: JSON progress file, updated while running.
    :param manifest: manifest path (default ``dest + ".manifest.json"``).
    :param resume: continue an interrupted copy of the same source into ``dest``.
    :param overwrite: replace an existing ``dest``/manifest at the end.
    :param commit_bytes: flush and record progress for resume at least this often.
    :param connect_kwargs: :func:`~blockd.nbd.client.connect_uri` options (``tls``...).
    :return: the result (also summarised in the manifest).
    :raise CopyError: on any failure (the partial output is kept for a resume).
    """
    started = time.monotonic()
    if fmt not in ("raw", "qcow2"):
        raise CopyError("usage", "unknown output format %r (raw, qcow2)" % fmt)
    incremental = base is not None
    if incremental and fmt != "qcow2":
        raise CopyError("usage", "an incremental backup (base=...) is written as qcow2")
    if incremental and extents is None and dirty_bitmap is None:
        raise CopyError("usage", "an incremental backup needs extents=... or dirty_bitmap=...")
    manifest = manifest or dest + ".manifest.json"
    partial, man_partial, state_path = dest + ".partial", manifest + ".partial", \
        dest + ".partial.state"
    if not overwrite:
        for p in (dest, manifest):
            if os.path.exists(p):
                raise CopyError("dest", "refusing to overwrite existing %s" % p)
    base_doc: Optional[Dict[str, Any]] = None
    base_digest = None
    if incremental:
        base_doc, base_digest = _check_base(base)
    contexts = [_BASE_ALLOCATION]
    if dirty_bitmap:
        contexts.append("qemu:dirty-bitmap:" + dirty_bitmap)
    src = _Source(source, connections, contexts, connect_kwargs)
    log = StateLog(state_path)
    out: Any = None
    try:
        size = src.size
        if base_doc is not None and base_doc["size"] != size:
            raise CopyError("source", "export size %d differs from base backup size %d "
                            "(export %s?)" % (size, base_doc["size"],
                                              "shrank" if size < base_doc["size"] else "grew"))
        # The resume key: the export (by name, not address: a restarted
        # server may listen elsewhere), its size, the output format and base.
        header = {"export": src.first.info.name, "size": size, "format": fmt, "base": base,
                  "base_manifest_sha256": base_digest}
        old, committed = log.read() if resume and os.path.exists(partial) else (None, [])
        if old is not None and old.get("export") == header["export"] \
                and old.get("size") != size:
            raise CopyError("source", "export %r is %d bytes, the interrupted copy in %s was "
                            "of %d bytes (export %s?); resume=False starts over"
                            % (header["export"], size, partial, old.get("size"),
                               "shrank" if size < (old.get("size") or 0) else "grew"))
        if old is not None and all(old.get(k) == v for k, v in header.items()) \
                and old.get("plan"):
            plan = [tuple(p) for p in old["plan"]]
        else:
            old, committed = None, []
            dirty = None
            if extents is not None:
                dirty = [(o, o + n) for o, n in extents]
            elif dirty_bitmap:
                dirty = plan_from_dirty_status(src.map(contexts[1]))
            plan = make_plan(size, src.map(_BASE_ALLOCATION), dirty)
        header["plan"] = [list(p) for p in plan]
        backing = _backing_name(base, dest) if incremental else None
        if old is None and os.path.exists(partial):
            os.unlink(partial)  # not resumable: start over
        if fmt == "raw":
            out = RawOutput(partial, size, create=old is None)
        else:
            out = Qcow2Output(partial, size, create=old is None, backing=backing,
                              backing_fmt=base_doc["format"] if base_doc else None)
        try:
            committed = _recheck(out, committed, plan)
        except OSError as exc:
            raise CopyError("dest", "cannot read back %s to resume: %s (use resume=False)"
                            % (partial, exc)) from None
        log.start(header, committed)
        result = _run(src, out, log, plan, committed, base_doc, progress_file, inflight,
                      commit_bytes)
        out.close()
        out = None
        log.close()
        digest = result.pop("disk_sha256")
        doc = {"format_version": mf.FORMAT_VERSION, "algorithm": mf.ALGORITHM,
               "status": "complete", "size": size, "source": src.uri, "format": fmt,
               "export": src.first.info.name,
               "base": {"path": base, "backing_file": backing, "manifest_sha256": base_digest,
                        "disk_sha256": base_doc["disk_sha256"]} if base_doc else None,
               "extents": result.pop("entries"), "disk_sha256": digest,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _finish(partial, dest, man_partial, manifest, doc)
        log.close(remove=True)
        result.update({"status": "complete", "dest": dest, "manifest": manifest, "format": fmt,
                       "size": size, "disk_sha256": digest,
                       "duration": round(time.monotonic() - started, 3),
                       "extents": len(doc["extents"]), "incremental": incremental})
        result["rate_mib_s"] = round(result["bytes_copied"] / (1 << 20)
                                     / max(result["duration"], 1e-3), 1)
        _final_progress(progress_file, result)
        return result
    finally:
        if out is not None:
            try:
                out.close()
            except CopyError:
                pass
        log.close()
        src.close()


def _final_progress(path: Optional[str], result: Dict[str, Any]) -> None:
    if path:
        try:
            mf.write_json_atomic(path, {"status": "complete", "bytes_done": result["size"],
                                        "bytes_total": result["size"],
                                        "bytes_copied": result["bytes_copied"],
                                        "duration": result["duration"], "eta": 0},
                                 durable=False)
        except OSError:
            pass


def _finish(partial: str, dest: str, man_partial: str, manifest: str,
            doc: Dict[str, Any]) -> None:
    """Make the backup valid: fsync the output, write and fsync the manifest
    as ``.partial``, then rename the output and the manifest into place.

    A failure before the renames leaves only ``.partial`` files; the rename
    keeps the output's size and mtime, which the manifest records (an
    incremental checks them on its base).
    """
    try:
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        doc["output"] = {"path": os.path.basename(dest), "file_size": st.st_size,
                         "mtime_ns": st.st_mtime_ns}
        mf.write_json_atomic(man_partial, mf.seal(doc))
        os.replace(partial, dest)
        os.replace(man_partial, manifest)
        mf.fsync_dir(dest)
        if os.path.dirname(os.path.abspath(manifest)) != os.path.dirname(os.path.abspath(dest)):
            mf.fsync_dir(manifest)
    except OSError as exc:
        raise CopyError("dest", "cannot finish %s: %s" % (dest, exc.strerror or exc)) from None


def _recheck(out: Any, committed: List[Dict[str, Any]],
             plan: Sequence[Tuple[int, int, str]]) -> List[Dict[str, Any]]:
    """Keep the committed prefix whose data still hashes as recorded in the output."""
    kept: List[Dict[str, Any]] = []
    for entry, (off, length, kind) in zip(committed, plan):
        if (entry.get("offset"), entry.get("length"), entry.get("type")) != (off, length, kind):
            break
        if kind == "data":
            got = b"".join(mf.hash_blocks(out.read(o, min(CHUNK, off + length - o)))
                           for o in range(off, off + length, CHUNK))
            if got.hex() != entry.get("blocks"):
                break
        kept.append(entry)
    return kept


def _base_hashes(base_doc: Dict[str, Any], off: int, length: int) -> bytes:
    """Block hashes of ``[off, off+length)`` from the base manifest."""
    out = []
    for e in base_doc["extents"]:
        s, n = e["offset"], e["length"]
        if s + n <= off or s >= off + length:
            continue
        h = mf.entry_hashes(e)
        lo, hi = max(s, off), min(s + n, off + length)
        out.append(h[32 * ((lo - s) // BLOCK):32 * (-(-(hi - s) // BLOCK))])
    return b"".join(out)


class _Gate:
    """Writes into the output from other threads, shut before the output is
    flushed for the last time or closed (a read still in flight after a
    failure must not write any more)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False

    def enter(self) -> bool:
        """Start a write; False once shut."""
        with self._cond:
            if self._closed:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        """A write ended."""
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def shut(self) -> None:
        """No more writes; wait for those running."""
        with self._cond:
            self._closed = True
            while self._active:
                self._cond.wait()


def _write_runs(out: Any, offset: int, view: memoryview, hashes: bytes) -> None:
    """Write ``view`` (block aligned, at ``offset``) given its block hashes.

    A block whose hash is the zero block's is all zero (:func:`.manifest.hash_blocks`
    found it so): runs of them go to ``write_zeroes`` instead of being
    scanned for zeroes a second time by the output; the rest is written.
    """
    n = len(view)
    start, zero_run = 0, None
    for b, pos in enumerate(range(0, n, BLOCK)):
        length = min(BLOCK, n - pos)
        zero = hashes[32 * b:32 * b + 32] == (mf.ZERO_HASH if length == BLOCK
                                              else mf.zero_block_hash(length))
        if zero_run is not None and zero != zero_run:
            _write_run(out, offset, view, start, pos, zero_run)
            start = pos
        zero_run = zero
    if zero_run is not None:
        _write_run(out, offset, view, start, n, zero_run)


def _write_run(out: Any, offset: int, view: memoryview, start: int, end: int,
               zero: bool) -> None:
    if zero:
        out.write_zeroes(offset + start, end - start)
    else:
        out.write(offset + start, view[start:end])


class _Chunk:
    """One :data:`CHUNK` of a data extent in flight.

    Each piece (one read request) is hashed *and written* by the thread that
    received it, as soon as it arrived: the connection's reader thread
    (several connections: their threads run in parallel, as hashing, the
    zero test and ``pwrite`` release the GIL) or, with a single connection,
    a ``hasher`` thread so that the reader keeps receiving.  The data is
    still in that CPU's cache for the hash and the write, which matters as
    much as the parallelism on a small machine.  The last piece done sets
    ``ready``; the main thread then only collects the hashes, in order.
    """

    __slots__ = ("start", "off", "n", "buf", "view", "last", "left", "parts", "whole", "error",
                 "ready", "lock", "hasher", "out", "gate")

    def __init__(self, start: int, off: int, n: int, buf: bytearray, last: bool) -> None:
        self.start = start  # the data extent's offset
        self.off, self.n, self.buf, self.last = off, n, buf, last
        self.view = memoryview(buf)[:n]
        self.left = 0
        self.parts: List[bytes] = []
        self.whole = False
        self.error: Optional[BaseException] = None
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.hasher: Optional[Executor] = None
        self.out: Any = None
        self.gate: Optional[_Gate] = None

    def read(self, src: "_Source", out: Any, gate: _Gate,
             hasher: Optional[Executor]) -> None:
        """Send the chunk's read requests (each at most ``src.max_request``).

        :param out: the output written to (through ``gate``).
        :param hasher: hash and write there instead of in the reader thread.
        :raise NBDError: a request could not be sent.
        """
        self.out, self.gate, self.hasher = out, gate, hasher
        step, off, n, view = src.max_request, self.off, self.n, self.view
        # Requests cover whole 1 MiB blocks (each hashed on arrival) unless
        # the server's maximum is smaller: then the chunk is done at the end.
        self.whole = step % BLOCK != 0
        pieces = [(p, min(step, n - p)) for p in range(0, n, step)]
        self.parts = [b""] * len(pieces)
        self.left = len(pieces)
        for i, (p, k) in enumerate(pieces):
            req = src.submit_read(off + p, k, view[p:p + k])
            req.add_done_callback(lambda r, i=i, p=p, k=k: self._done(r, i, p, k))

    def _done(self, req: Any, i: int, p: int, k: int) -> None:
        """Piece ``i`` (``[p, p+k)`` of the chunk) arrived (reader thread)."""
        err = req.exception(0)
        if err is not None:
            err = _source_error(err)
        if self.hasher is None:
            self._process(err, i, p, k)
        else:
            self.hasher.submit(self._process, err, i, p, k)

    def _process(self, err: Optional[BaseException], i: int, p: int, k: int) -> None:
        """Hash and write piece ``i``; the last piece sets ``ready``."""
        if err is None and not self.whole:
            err = self._hash_write(i, p, k)
        with self.lock:
            if err is not None and self.error is None:
                self.error = err
            self.left -= 1
            last = self.left == 0
        if last:
            if self.whole and self.error is None:
                self.error = self._hash_write(0, 0, self.n)
            self.ready.set()

    def _hash_write(self, i: int, p: int, k: int) -> Optional[BaseException]:
        """Hash ``[p, p+k)`` into part ``i`` and write it; the error, if any."""
        view = self.view[p:p + k]
        try:
            self.parts[i] = mf.hash_blocks(view)
        except Exception as exc:  # noqa: BLE001 - never leave the chunk unfinished
            return _source_error(exc, "hashing")
        if not self.gate.enter():
            return CopyError("source", "copy stopped")
        try:
            _write_runs(self.out, self.off + p, view, self.parts[i])
        except CopyError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001
            return CopyError("dest", "writing failed: %r" % exc)
        finally:
            self.gate.leave()
        return None

    def wait(self) -> bytes:
        """The chunk's block hashes, once read, hashed and written.

        :raise CopyError: ``source`` (a read failed) or ``dest`` (a write failed).
        """
        self.ready.wait()
        if self.error is not None:
            raise self.error
        return b"".join(self.parts)


class _BufferPool:
    """Reused :data:`CHUNK` buffers: a new bytearray per chunk is zeroed first
    (a memset of every byte copied) and, when malloc maps it fresh, faults in
    every page (up to 0.2 s of system time per 512 MiB); a reused buffer is
    also still in the CPU caches."""

    def __init__(self) -> None:
        self._free: List[bytearray] = []

    def get(self) -> bytearray:
        """A free buffer (new when none is free)."""
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(CHUNK)

    def put(self, buf: bytearray) -> None:
        """Give a buffer back."""
        self._free.append(buf)


def _run(src: _Source, out: Any, log: StateLog, plan: Sequence[Tuple[int, int, str]],
         committed: List[Dict[str, Any]], base_doc: Optional[Dict[str, Any]],
         progress_file: Optional[str], inflight: Optional[int],
         commit_bytes: int = COMMIT_BYTES) -> Dict[str, Any]:
    """The copy loop.

    Every extent of the plan goes through one in-order window: data extents
    as :class:`_Chunk` reads in flight (at most ``inflight`` chunks, each
    hashed and written as its pieces arrive), zero, hole and unchanged
    extents as markers, so that a hole does not stall the reads of the data
    after it.  Draining the window in order builds the manifest entries;
    a commit (output flush, resume log) covers only drained extents, whose
    writes are all done.
    """
    inflight = max(1, inflight or INFLIGHT)
    digest = DiskDigest()
    entries: List[Dict[str, Any]] = list(committed)
    stats = collections.Counter()
    for e in committed:
        digest.add(mf.entry_hashes(e))
    data_total = sum(n for _o, n, k in plan[len(committed):] if k == "data")
    prog = Progress(progress_file, src.size, data_total)
    prog.done = sum(e["length"] for e in committed)
    resumed_from = prog.done
    window: Deque[Any] = collections.deque()  # _Chunk or (offset, length, kind)
    reading = [0]  # chunks in the window
    pool = _BufferPool()
    gate = _Gate()
    pending: List[Dict[str, Any]] = []
    last_commit = [time.monotonic(), 0]
    hashes: List[bytes] = []
    # One connection: its reader thread only receives, two threads hash and write.
    hasher = None
    if len(getattr(src.conn, "clients", (src.conn,))) < 2:
        from concurrent.futures import ThreadPoolExecutor
        hasher = ThreadPoolExecutor(2, thread_name_prefix="nbd-copy-hash")

    def commit(force: bool = False) -> None:
        due = last_commit[1] >= commit_bytes or \
            time.monotonic() - last_commit[0] >= COMMIT_SECONDS
        if pending and (force or due):
            out.flush()
            log.commit(pending)
            pending.clear()
            last_commit[0], last_commit[1] = time.monotonic(), 0

    def complete(off: int, length: int, kind: str, block_hashes: Optional[bytes]) -> None:
        entry = mf.extent_entry(off, length, kind, block_hashes)
        entries.append(entry)
        pending.append(entry)
        if block_hashes is not None:
            digest.add(block_hashes)
        else:
            digest.add_zero(length)
        prog.done += length
        last_commit[1] += length
        stats["bytes_" + kind] += length
        commit()

    def drain_one() -> None:
        item = window[0]
        if isinstance(item, _Chunk):
            hashes.append(item.wait())
            window.popleft()
            reading[0] -= 1
            pool.put(item.buf)
            prog.copied += item.n
            if item.last:
                complete(item.start, item.off + item.n - item.start, "data", b"".join(hashes))
                hashes.clear()
        else:
            window.popleft()
            off, length, kind = item
            if kind == "unchanged":
                complete(off, length, kind, _base_hashes(base_doc or {}, off, length))
            else:
                out.write_zeroes(off, length)
                complete(off, length, kind, None)
        prog.update()

    try:
        for off, length, kind in plan[len(committed):]:
            if kind != "data":
                window.append((off, length, kind))
                continue
            end = off + length
            for o in range(off, end, CHUNK):
                chunk = _Chunk(off, o, min(CHUNK, end - o), pool.get(), o + CHUNK >= end)
                try:
                    chunk.read(src, out, gate, hasher)
                except NBDError as exc:
                    raise _source_error(exc) from None
                window.append(chunk)
                reading[0] += 1
                while reading[0] >= inflight:
                    drain_one()
        while window:
            drain_one()
        gate.shut()
        commit(force=True)
    except CopyError as exc:
        gate.shut()  # no write may run while the output is flushed/closed
        if exc.kind == "source":
            try:
                commit(force=True)  # keep what was written: the resume starts after it
            except CopyError:
                pass
        prog.update(force=True, status="failed")
        raise
    finally:
        gate.shut()
        if hasher is not None:
            hasher.shutdown(wait=True)
    return {"entries": entries, "disk_sha256": digest.hexdigest(),
            "bytes_copied": stats["bytes_data"], "bytes_zero": stats["bytes_zero"],
            "bytes_hole": stats["bytes_hole"], "bytes_unchanged": stats["bytes_unchanged"],
            "resumed_from": resumed_from}


def export_digest(source: Any, connections: Optional[int] = None, inflight: Optional[int] = None,
                  **connect_kwargs: Any) -> Dict[str, Any]:
    """Whole-disk digest and block hashes of a live export (nothing written)."""
    src = _Source(source, connections, [_BASE_ALLOCATION], connect_kwargs)
    log = StateLog(os.devnull)
    try:
        plan = make_plan(src.size, src.map(_BASE_ALLOCATION))
        res = _run(src, NullOutput(), log, plan, [], None, None, inflight)
        return {"size": src.size, "disk_sha256": res["disk_sha256"], "entries": res["entries"]}
    finally:
        src.close()


def dumps(result: Dict[str, Any]) -> str:
    """One-line JSON."""
    return json.dumps(result, sort_keys=True, separators=(",", ":"))
