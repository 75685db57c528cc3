"""Dirty bitmaps in-process: the bit operations, the qcow2 on-disk bit layout, write
tracking through a node, and persistence in real qcow2 files read back by qemu-img.

Expected values follow QEMU 7.2's block/dirty-bitmap.c / util/hbitmap.c semantics (whole
chunks are dirty, resets clear only whole chunks, count is in bytes) and
docs/interop/qcow2.txt (chunk i is bit i % 8 of byte i // 8).
"""

import json
import random
import threading

import pytest

from helpers import MiB, make_raw_image, qemu_img, qemu_io
from blockd.graph import dirty_bitmap as dbm

K64 = 64 * 1024


def test_set_reset_count_and_ranges():
    bm = dbm.DirtyBitmap(MiB, K64, "b")
    assert bm.count() == 0 and bm.next_dirty(0, MiB) == -1
    bm.set(100, 1)                       # touches chunk 0
    bm.set(3 * K64 - 1, 2)               # touches chunks 2 and 3
    assert bm.count() == 3 * K64
    assert list(bm.dirty_ranges()) == [(0, K64), (2 * K64, 2 * K64)]
    assert bm.get(0) and not bm.get(K64) and bm.get(3 * K64 + 5)
    assert bm.next_dirty(K64, MiB) == 2 * K64
    assert bm.next_zero(2 * K64, MiB) == 4 * K64
    assert bm.next_dirty(5, MiB) == 5          # inside a dirty chunk: the offset itself
    assert bm.next_dirty_area(0, MiB, K64 // 2) == (0, K64 // 2)
    bm.reset(2 * K64 + 1, 2 * K64)       # only whole chunks inside the range: chunk 3
    assert list(bm.dirty_ranges()) == [(0, K64), (2 * K64, K64)]
    bm.set(MiB - 1, 1)
    bm.reset(MiB - 10, 10)               # not a whole chunk: stays dirty
    assert bm.get(MiB - 1)
    bm.reset(MiB - K64, K64)
    assert not bm.get(MiB - 1)
    tail = dbm.DirtyBitmap(K64 + 100, K64)
    tail.set(K64 + 50, 1)
    assert tail.count() == 2 * K64 - K64  # one (partial) chunk, counted whole
    tail.reset(K64, 100)                 # a range reaching the disk's end clears its chunk
    assert tail.count() == 0
    backup = bm.clear()
    assert bm.count() == 0
    bm.restore(backup)
    assert bm.count() == 2 * K64


def test_serialize_layout_matches_qcow2_spec():
    bm = dbm.DirtyBitmap(64 * K64, K64)
    for chunk in (0, 3, 8, 63):
        bm.set(chunk * K64, 1)
    data = bm.serialize()
    assert len(data) == 8
    assert data[0] == 0b00001001 and data[1] == 0b00000001 and data[7] == 0b10000000
    other = dbm.DirtyBitmap(64 * K64, K64)
    other.deserialize(data)
    assert list(other.dirty_ranges()) == list(bm.dirty_ranges())
    assert other.count() == 4 * K64
    assert dbm.DirtyBitmap(64 * K64, K64).serialize() == bytes(8)


def test_merge_same_and_different_granularity():
    a = dbm.DirtyBitmap(MiB, K64)
    b = dbm.DirtyBitmap(MiB, 4096)
    b.set(5000, 1)                        # 4 KiB chunk 1 -> 64 KiB chunk 0
    a.merge_from(b)
    assert list(a.dirty_ranges()) == [(0, K64)]
    c = dbm.DirtyBitmap(MiB, K64)
    c.set(8 * K64, K64)
    a.merge_from(c)
    assert list(a.dirty_ranges()) == [(0, K64), (8 * K64, K64)]
    assert c.count() == K64               # the source is unchanged


def test_concurrent_sets_count_exactly():
    bm = dbm.DirtyBitmap(256 * MiB, 4096)
    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(2000):
            bm.set(rnd.randrange(256 * MiB), rnd.randrange(1, 20000))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bm.count() == bm.bits.count(1) * 4096


def test_check_texts():
    bm = dbm.DirtyBitmap(MiB, K64, "x")
    bm.busy = True
    with pytest.raises(Exception, match="^Bitmap 'x' is currently in use by another operation "
                                        "and cannot be used$"):
        bm.check(dbm.BITMAP_DEFAULT)
    bm.busy, bm.readonly = False, True
    bm.check(dbm.BITMAP_ALLOW_RO)
    with pytest.raises(Exception, match="readonly and cannot be modified"):
        bm.check(dbm.BITMAP_DEFAULT)


def _qcow2(graph, name, path, **opts):
    return graph.open({"driver": "qcow2", "node-name": name,
                       "file": {"driver": "file", "filename": str(path)}, **opts})


def test_write_tracking_through_node(graph, tmp_path):
    img = make_raw_image(tmp_path / "d.raw", 4 * MiB)
    node = graph.open({"driver": "raw", "node-name": "r",
                       "file": {"driver": "file", "filename": str(img)}})
    raw_pwrite = node.pwrite
    bm = dbm.create(node, "b", dbm.default_granularity(node))
    assert bm.granularity == K64
    node.pwrite(K64 + 1, b"x")
    node.pwrite_zeroes(3 * K64, K64)
    node.pdiscard(5 * K64, K64)          # discard=ignore: never reaches tracking (as QEMU)
    assert list(bm.dirty_ranges()) == [(K64, K64), (3 * K64, K64)]
    bm.enabled = False
    node.pwrite(9 * K64, b"y")
    assert bm.count() == 2 * K64
    node.set_driver(node.driver)         # a re-bound driver keeps the tracking
    bm.enabled = True
    node.pwrite(10 * K64, b"y")
    assert bm.count() == 3 * K64
    dbm.release(bm)
    assert node.pwrite == raw_pwrite     # no bitmaps: the driver's own method again


def test_parent_that_bound_child_methods_is_tracked(graph, tmp_path):
    """raw without an offset binds its file's methods: a bitmap added on the file
    later must still see the writes made through raw, and removing it restores
    the direct binding."""
    img = make_raw_image(tmp_path / "d.raw", MiB)
    node = graph.open({"driver": "raw", "node-name": "r",
                       "file": {"driver": "file", "filename": str(img)}})
    file = node.file
    direct = file.pwrite
    assert node.pwrite is direct
    top = dbm.create(node, "top", K64)
    low = dbm.create(file, "low", K64)
    node.pwrite(0, b"z")
    assert (top.count(), low.count()) == (K64, K64)
    dbm.release(low)
    assert node.driver.pwrite is direct and node._bitmap_untracked["pwrite"] is direct
    node.pwrite(2 * K64, b"z")
    assert (top.count(), low.count()) == (2 * K64, K64)
    dbm.release(top)
    assert node.pwrite is direct


def test_persistent_roundtrip_with_qemu_img(graph, tmp_path):
    path = tmp_path / "p.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "4M")
    node = _qcow2(graph, "q", path)
    bm = dbm.create(node, "pb", 4096)
    bm.persistent = True
    node.pwrite(0, b"a" * 5000)          # chunks 0, 1
    node.pwrite(2 * MiB, b"b")           # chunk 512
    graph.close_all()
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": "pb", "granularity": 4096}]
    out = qemu_img("check", str(path)).stdout
    assert "No errors were found on the image." in out, out
    # read back by blockd: same bits
    from blockd import drivers
    from blockd.graph.graph import Graph
    g2 = Graph(drivers.lookup)
    try:
        node = _qcow2(g2, "q", path, **{"read-only": True})
        got = dbm.find(node, "pb")
        assert got is not None and got.persistent and got.enabled and got.readonly
        assert list(got.dirty_ranges()) == [(0, 8192), (2 * MiB, 4096)]
    finally:
        g2.close_all()


def test_reads_the_exact_bits_qemu_stored(graph, tmp_path):
    """Bitmaps qemu-io tracked and qemu stored: blockd finds exactly the written chunks,
    with several clusters of bitmap data (512 B granularity over 64 MiB = 16 KiB of bits,
    4 KiB clusters) and all-zero clusters left unallocated."""
    path = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "64M")
    qemu_img("bitmap", "--add", "-g", "512", str(path), "fine")
    qemu_img("bitmap", "--add", str(path), "coarse")
    qemu_io(path, "write 1000 10", "write 20M 3k", "write 67108352 512", fmt="qcow2")
    node = _qcow2(graph, "q", path, **{"read-only": True})
    fine, coarse = dbm.find(node, "fine"), dbm.find(node, "coarse")
    assert list(fine.dirty_ranges()) == [(512, 512), (20 * MiB, 3072), (64 * MiB - 512, 512)]
    assert coarse.granularity == 4096
    assert list(coarse.dirty_ranges()) == [(0, 4096), (20 * MiB, 4096), (64 * MiB - 4096, 4096)]
    assert fine.enabled and fine.readonly and not fine.inconsistent


def test_persistent_size_limit(graph, tmp_path):
    """QEMU's check_constraints_on_bitmap(): at most 512 MiB of bitmap data (2^32 chunks);
    checked before any bitmap memory is allocated (qsd 7.2 accepts 512 GiB at 512 B)."""
    from blockd.drivers.qcow2 import bitmaps as qbm
    path = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "3T")
    node = _qcow2(graph, "h", path)
    qbm.can_store_new(node.driver, "ok", 1024)
    with pytest.raises(Exception) as exc:
        qbm.can_store_new(node.driver, "x", 512)
    assert exc.value.desc == ("Can't make bitmap 'x' persistent in 'h': Too much space will be "
                              "occupied by the bitmap. Use larger granularity")
