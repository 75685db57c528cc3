"""Block-copy, the copy-before-write filter and snapshot-access, in-process on real files.

The expected behaviour is QEMU 7.2's block/block-copy.c and block/copy-before-write.c:
whole clusters are copied once, waiters return only when their clusters are in the
target, zero ranges become write-zeroes, failures put the bits back, progress is
``done += task bytes`` / ``remaining = dirty + in flight``.
"""

import errno
import json
import os
import random
import threading
import time

import pytest

from helpers import MiB, make_raw_image, qemu_img
from blockd.graph.backend import Backend
from blockd.graph.blockcopy import BlockCopyError, BlockCopyState, ClusterBitmap
from blockd.graph.io import SEG_DATA, SEG_FD
from blockd.drivers.cbw import cbw_append, cbw_drop

CL = 64 * 1024


def raw_node(graph, name, path, **extra):
    opts = {"driver": "raw", "node-name": name,
            "file": {"driver": "file", "filename": str(path), **extra}}
    return graph.open(opts)


def qcow2_node(graph, name, path, backing=None):
    opts = {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": str(path)}}
    if backing is not None:
        opts["backing"] = backing
    return graph.open(opts)


@pytest.fixture
def pair(graph, tmp_path):
    """A 4 MiB random raw source and an empty raw target."""
    src = make_raw_image(tmp_path / "src.raw", 4 * MiB, "random")
    tgt = make_raw_image(tmp_path / "tgt.raw", 4 * MiB)
    return raw_node(graph, "src", src), raw_node(graph, "tgt", tgt)


class Meter:
    """A progress meter as a Job has one (records every call)."""

    def __init__(self):
        self.done = 0
        self.remaining_calls = []
        self.lock = threading.Lock()

    def progress_update(self, n):
        with self.lock:
            self.done += n

    def progress_set_remaining(self, n):
        with self.lock:
            self.remaining_calls.append(n)


def count_writes(node):
    """Record every write that reaches ``node`` (offset, length), slowed a little so
    concurrent callers really overlap."""
    log = []
    lock = threading.Lock()
    pwrite, zeroes = node.pwrite, node.pwrite_zeroes

    def w(offset, data, flags=0):
        time.sleep(0.002)
        with lock:
            log.append((offset, len(data)))
        pwrite(offset, data, flags)

    def z(offset, length, flags=0):
        time.sleep(0.002)
        with lock:
            log.append((offset, length))
        zeroes(offset, length, flags)

    node.pwrite, node.pwrite_zeroes = w, z
    return log


# --- the bitmap -----------------------------------------------------------------------

def test_cluster_bitmap_areas_and_counts():
    bm = ClusterBitmap(10 * CL + 512, CL)
    assert bm.nclusters == 11 and bm.dirty_bytes() == 0
    assert bm.next_dirty_area(0, 11 * CL) is None
    bm.set(CL + 1, 1)                      # touches cluster 1 only
    bm.set(3 * CL, 2 * CL + 1)             # clusters 3, 4 and 5
    assert bm.dirty_bytes() == 4 * CL
    assert bm.is_dirty(CL) and not bm.is_dirty(2 * CL) and bm.is_dirty(5 * CL)
    assert bm.next_dirty_area(0, 11 * CL) == (CL, CL)
    assert bm.next_dirty_area(2 * CL, 11 * CL) == (3 * CL, 3 * CL)
    assert bm.next_dirty_area(2 * CL, 11 * CL, CL) == (3 * CL, CL)
    assert bm.next_dirty_area(3 * CL, 4 * CL + 7) == (3 * CL, CL + 7)
    assert bm.next_dirty(6 * CL, 11 * CL) == -1 and bm.next_zero(3 * CL, 6 * CL) == -1
    bm.reset(4 * CL, 1)
    assert bm.dirty_bytes() == 3 * CL and bm.dirty_status(3 * CL, 3 * CL) == (True, CL)
    bm.set_all()
    assert bm.dirty_bytes() == 11 * CL      # QEMU counts the partial last cluster whole
    assert bm.next_dirty_area(0, 20 * CL) == (0, 11 * CL)
    bm.clear_all()
    assert bm.dirty_bytes() == 0


def test_cluster_size_follows_target(graph, tmp_path):
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", 4 * MiB))
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=256k", str(tmp_path / "t.qcow2"),
             str(4 * MiB))
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(tmp_path / "u.qcow2"),
             str(4 * MiB))
    big = qcow2_node(graph, "t", tmp_path / "t.qcow2")
    assert BlockCopyState(src, big).cluster_size == 256 * 1024
    assert BlockCopyState(src, qcow2_node(graph, "u", tmp_path / "u.qcow2")).cluster_size == CL
    assert BlockCopyState(src, src).cluster_size == CL


# --- copying --------------------------------------------------------------------------

def test_partial_range_copies_whole_clusters(pair):
    src, tgt = pair
    bcs = BlockCopyState(src, tgt)
    assert bcs.dirty_bytes() == 4 * MiB
    bcs.copy(CL + 100, 10)
    assert tgt.pread(CL, CL) == src.pread(CL, CL)
    assert tgt.pread(0, CL) == bytes(CL) and tgt.pread(2 * CL, CL) == bytes(CL)
    assert not bcs.copy_bitmap.is_dirty(CL) and bcs.copy_bitmap.is_dirty(0)
    assert bcs.dirty_bytes() == 4 * MiB - CL
    bcs.copy(CL - 1, 2)                    # straddles clusters 0 and 1: only 0 is copied
    assert tgt.pread(0, 2 * CL) == src.pread(0, 2 * CL)
    assert bcs.dirty_bytes() == 4 * MiB - 2 * CL


def test_concurrent_overlapping_copies_copy_each_cluster_once(pair):
    src, tgt = pair
    bcs = BlockCopyState(src, tgt)
    log = count_writes(tgt)
    expected = src.pread(0, 4 * MiB)
    rng = random.Random(7)
    ranges = [(rng.randrange(0, 4 * MiB - 1), rng.randrange(1, 600 * 1024)) for _ in range(64)]
    bad = []

    def worker(chunk):
        for off, n in chunk:
            n = min(n, 4 * MiB - off)
            bcs.copy(off, n)
            # the call returned: every cluster it touched is in the target now
            lo, hi = off // CL * CL, min(4 * MiB, -(-(off + n) // CL) * CL)
            if tgt.pread(lo, hi - lo) != expected[lo:hi]:
                bad.append((off, n))

    threads = [threading.Thread(target=worker, args=(ranges[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    written = {}
    for off, n in log:
        assert off % CL == 0 and n % CL == 0
        for c in range(off // CL, (off + n) // CL):
            written[c] = written.get(c, 0) + 1
    assert written and set(written.values()) == {1}, "a cluster was copied twice"
    covered = set()
    for off, n in ranges:
        n = min(n, 4 * MiB - off)
        covered.update(range(off // CL, -(-(off + n) // CL)))
    assert set(written) == covered
    assert bcs.dirty_bytes() == 4 * MiB - len(covered) * CL
    assert bcs.in_flight_bytes == 0 and not bcs.reqs.reqs


def test_zero_clusters_become_zero_writes(graph, tmp_path):
    path = make_raw_image(tmp_path / "src.raw", 4 * MiB)      # sparse
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"\xa5" * (2 * CL))                           # data only in [1 MiB, +128 KiB)
    src = raw_node(graph, "src", path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), str(4 * MiB))
    tgt = qcow2_node(graph, "tgt", tmp_path / "t.qcow2")
    bcs = BlockCopyState(src, tgt)
    bcs.copy(0, 4 * MiB)
    assert tgt.pread(0, 4 * MiB) == src.pread(0, 4 * MiB)
    assert bcs.dirty_bytes() == 0
    graph.close_all()
    runs = json.loads(qemu_img("map", "--output=json", str(tmp_path / "t.qcow2")).stdout)
    data = [(r["start"], r["length"]) for r in runs if r["data"]]
    assert data == [(MiB, 2 * CL)]                  # zero ranges allocated nothing
    assert all(r["zero"] for r in runs if not r["data"])


def test_target_write_error_redirties(graph, tmp_path):
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", MiB, "random"))
    make_raw_image(tmp_path / "t.raw", MiB)
    ro = graph.open({"driver": "file", "node-name": "ro", "filename": str(tmp_path / "t.raw"),
                     "read-only": True})
    bcs = BlockCopyState(src, ro)
    meter = Meter()
    bcs.set_progress_meter(meter)
    with pytest.raises(BlockCopyError) as err:
        bcs.copy(100, 3 * CL)
    assert err.value.is_read is False and err.value.errno == errno.EBADF
    assert isinstance(err.value, OSError)
    assert bcs.dirty_bytes() == MiB and bcs.in_flight_bytes == 0 and not bcs.reqs.reqs
    assert meter.done == 0 and meter.remaining_calls[-1] == MiB


def test_source_read_error_is_read(pair):
    src, tgt = pair
    bcs = BlockCopyState(src, tgt)
    real = src.pread

    def failing(offset, length):
        if offset < 2 * CL:
            raise OSError(errno.EIO, "Input/output error")
        return real(offset, length)

    src.pread = failing
    with pytest.raises(BlockCopyError) as err:
        bcs.copy(0, CL)
    assert err.value.is_read is True and err.value.errno == errno.EIO
    assert bcs.copy_bitmap.is_dirty(0)
    src.pread = real
    bcs.copy(0, CL)                                   # retried later, it works
    assert not bcs.copy_bitmap.is_dirty(0) and tgt.pread(0, CL) == src.pread(0, CL)


def test_progress_like_qemu(pair):
    src, tgt = pair
    bcs = BlockCopyState(src, tgt)
    meter = Meter()
    bcs.set_progress_meter(meter)
    bcs.copy(0, 3 * MiB - 1)         # 1 MiB tasks: three of them
    assert meter.done == 3 * MiB
    assert meter.remaining_calls == [3 * MiB, 2 * MiB, MiB]
    bcs.reset(3 * MiB, CL)
    assert meter.remaining_calls[-1] == MiB - CL
    bcs.copy(0, 4 * MiB)
    assert meter.done == 4 * MiB - CL and meter.remaining_calls[-1] == 0


def test_reset_unallocated_clears_what_the_top_lacks(graph, tmp_path):
    base = make_raw_image(tmp_path / "base.raw", 2 * MiB, "random")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
             str(tmp_path / "top.qcow2"))
    from helpers import qemu_io
    qemu_io(tmp_path / "top.qcow2", "write -P 7 128k 64k", "write -P 8 1M 192k", fmt="qcow2")
    top = qcow2_node(graph, "top", tmp_path / "top.qcow2")
    tgt = raw_node(graph, "tgt", make_raw_image(tmp_path / "t.raw", 2 * MiB))
    bcs = BlockCopyState(top, tgt)
    bcs.skip_unallocated = True
    steps = []
    offset = 0
    while offset < 2 * MiB:
        n = bcs.reset_unallocated(offset)
        steps.append((offset, n))
        offset += n
    assert steps == [(0, 2 * CL), (2 * CL, CL), (3 * CL, 13 * CL), (MiB, 3 * CL),
                     (MiB + 3 * CL, 13 * CL)]
    dirty = [c for c in range(32) if bcs.copy_bitmap.is_dirty(c * CL)]
    assert dirty == [2, 16, 17, 18]


# --- the filter and snapshot-access ----------------------------------------------------

def test_cbw_and_snapshot_access_keep_the_old_bytes(graph, tmp_path):
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", 2 * MiB, "random"))
    tgt = raw_node(graph, "tgt", make_raw_image(tmp_path / "t.raw", 2 * MiB))
    old = src.pread(0, 2 * MiB)
    cbw = graph.open({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                      "target": "tgt"})
    sa = graph.open({"driver": "snapshot-access", "node-name": "sa", "file": "cbw"})
    cbw.pwrite(CL + 5, b"new")
    cbw.pwrite_zeroes(MiB, 3 * CL)
    assert src.pread(CL, 8) == old[CL:CL + 5] + b"new"
    assert sa.pread(0, 2 * MiB) == old
    segs = sa.read_segments(0, 2 * MiB)
    # clusters still in the source are sent from memory, never sendfile of the live source
    assert all(s[0] != SEG_FD or s[1] != src.file.driver.fd for s in segs)
    assert cbw.driver.done_bitmap.dirty_bytes() == 4 * CL
    assert tgt.pread(CL, CL) == old[CL:2 * CL] and tgt.pread(MiB, 3 * CL) == old[MiB:MiB + 3 * CL]
    assert tgt.pread(0, CL) == bytes(CL)
    with pytest.raises(OSError) as err:
        sa.pwrite(0, b"x")
    assert err.value.errno == errno.ENOTSUP


def test_snapshot_read_blocks_the_guest_write_until_done(graph, tmp_path):
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", MiB, "random"))
    tgt = raw_node(graph, "tgt", make_raw_image(tmp_path / "t.raw", MiB))
    old = src.pread(0, MiB)
    cbw = graph.open({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                      "target": "tgt"})
    drv = cbw.driver
    req, n, node = drv._snapshot_read_lock(0, CL)      # a snapshot read of cluster 0 begins
    assert node is src and req is not None
    finished = threading.Event()
    writer = threading.Thread(target=lambda: (cbw.pwrite(10, b"guest"), finished.set()))
    writer.start()
    assert not finished.wait(0.3), "the guest write must wait for the snapshot read"
    assert src.pread(0, CL) == old[:CL]
    drv._snapshot_read_unlock(req)
    writer.join(10)
    assert finished.is_set() and src.pread(10, 5) == b"guest"
    assert tgt.pread(0, CL) == old[:CL]


def failing_writes(node, code=errno.ENOSPC):
    """Make every write reaching ``node`` fail with ``code`` (fault injection)."""
    def fail(*args, **kw):
        raise OSError(code, os.strerror(code))
    node.pwrite = node.pwrite_zeroes = fail


def test_break_snapshot_policy(graph, tmp_path):
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", MiB, "random"))
    src2 = raw_node(graph, "src2", make_raw_image(tmp_path / "s2.raw", MiB, "random"))
    failing_writes(raw_node(graph, "ro", make_raw_image(tmp_path / "t.raw", MiB)))
    guest = graph.open({"driver": "copy-before-write", "node-name": "g", "file": "src2",
                        "target": "ro"})
    with pytest.raises(OSError) as err:          # break-guest-write: the write fails
        guest.pwrite(0, b"x")
    assert err.value.errno == errno.ENOSPC and src2.pread(0, 1) != b"x"
    snap = graph.open({"driver": "copy-before-write", "node-name": "b", "file": "src",
                       "target": "ro", "on-cbw-error": "break-snapshot"})
    sa = graph.open({"driver": "snapshot-access", "node-name": "sa", "file": "b"})
    assert sa.pread(0, 4) == src.pread(0, 4)
    snap.pwrite(0, b"guest")                     # goes through, the snapshot breaks
    assert src.pread(0, 5) == b"guest"
    with pytest.raises(OSError) as err:
        sa.pread(CL, 4)
    assert err.value.errno == errno.EACCES


def test_snapshot_discard_then_read_fails(graph, tmp_path):
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", MiB, "random"))
    raw_node(graph, "tgt", make_raw_image(tmp_path / "t.raw", MiB))
    graph.open({"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt"})
    sa = graph.open({"driver": "snapshot-access", "node-name": "sa", "file": "cbw",
                     "discard": "unmap"})
    sa.pdiscard(100, 3 * CL)                     # only clusters 1 and 2 are whole
    assert sa.pread(0, CL) == src.pread(0, CL)
    with pytest.raises(OSError) as err:
        sa.pread(CL, 1)
    assert err.value.errno == errno.EACCES
    assert sa.pread(3 * CL, CL) == src.pread(3 * CL, CL)


def test_snapshot_access_over_a_plain_node_fails_reads(graph, tmp_path):
    raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", MiB))
    sa = graph.open({"driver": "snapshot-access", "node-name": "sa", "file": "src"})
    assert sa.getlength() == MiB
    with pytest.raises(OSError) as err:
        sa.pread(0, 512)
    assert err.value.errno == errno.ENOTSUP


# --- insertion above a node (backup) ---------------------------------------------------

def test_cbw_append_and_drop_move_users(graph, tmp_path):
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", MiB, "random"))
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), str(MiB))
    tgt = qcow2_node(graph, "tgt", tmp_path / "t.qcow2", backing="src")
    user = Backend(graph, src, True, "export")
    old = src.pread(0, MiB)
    filt = cbw_append(src, tgt)
    assert filt.name.startswith("#block") and filt.drv_name == "copy-before-write"
    assert user.root is filt and src.backends == []
    # the target's backing edge is in the filter's subtree: it stays on the source
    assert tgt.backing is src and filt.file is src and filt.child("target") is tgt
    assert filt.driver.bcs.is_fleecing
    bcs = filt.driver.bcs
    bcs.serialise_target_reads()
    user.pwrite(CL, b"guest")
    assert tgt.pread(0, MiB) == old
    segs = tgt.read_segments(0, MiB)
    assert {s[0] for s in segs} <= {SEG_DATA}
    cbw_drop(filt)
    assert user.root is src and filt.name not in graph.nodes and not src.internal_bitmaps
    # the target's own read methods are back (no more materialising, no range locks)
    assert tgt.read_segments == tgt.driver.read_segments and tgt.pread == tgt.driver.pread
    assert tgt.pread(0, MiB) == old


def test_cbw_append_name_errors(graph, tmp_path):
    from blockd.errors import QMPError
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", MiB))
    tgt = raw_node(graph, "tgt", make_raw_image(tmp_path / "t.raw", MiB))
    with pytest.raises(QMPError, match="Duplicate nodes with node-name='tgt'"):
        cbw_append(src, tgt, "tgt")
    with pytest.raises(QMPError, match="Invalid node-name: '1x'"):
        cbw_append(src, tgt, "1x")
    assert set(graph.nodes) == {"src", "tgt", src.file.name, tgt.file.name}
    filt = cbw_append(src, tgt, "flt")
    assert graph.nodes["flt"] is filt and not filt.implicit
    cbw_drop(filt)
    assert "flt" not in graph.nodes


def test_cbw_timeout_fails_the_guest_write_and_the_copy_finishes_later(graph, tmp_path):
    src = raw_node(graph, "src", make_raw_image(tmp_path / "s.raw", MiB, "random"))
    tgt = raw_node(graph, "tgt", make_raw_image(tmp_path / "t.raw", MiB))
    old = src.pread(0, MiB)
    release = threading.Event()
    real = tgt.pwrite

    def stuck(offset, data, flags=0):      # a target that hangs until released
        release.wait(30)
        real(offset, data, flags)

    tgt.pwrite = stuck
    cbw = graph.open({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                      "target": "tgt", "cbw-timeout": 1})
    with pytest.raises(OSError) as err:
        cbw.pwrite(0, b"guest")
    assert err.value.errno == errno.ETIMEDOUT
    assert src.pread(0, 5) == old[:5]                      # the guest write did not happen
    release.set()
    cbw.pwrite(0, b"guest")                                # waits for the copy in flight
    assert src.pread(0, 5) == b"guest" and tgt.pread(0, CL) == old[:CL]
    assert cbw.driver.bcs.in_flight_bytes == 0
