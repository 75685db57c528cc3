"""The qcow2 driver on real files, checked with blockd's own consistency check."""

import errno
import os
import random
import threading

import pytest

from blockd.drivers.qcow2 import check_image, create_qcow2, create_raw
from blockd.drivers.qcow2 import header as hdr
from blockd.errors import QMPError
from blockd.graph.io import (BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, REQ_FUA,
                             REQ_MAY_UNMAP, REQ_NO_FALLBACK, SEG_FD, SEG_ZERO)

from qcow2_testlib import (MiB, file_bytes, header_field, open_qcow2, random_ops, read_all,
                           seg_bytes)

ALLOC = BDRV_BLOCK_ALLOCATED


def assert_clean(node):
    """blockd's check finds nothing (after a flush)."""
    res = node.driver.check()
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res.messages[:5]


def status_map(node):
    """(offset, length, flags, depth) runs over the whole node."""
    out, off, size = [], 0, node.getlength()
    while off < size:
        n, flags, depth = node.block_status(off, size - off)
        assert n > 0
        out.append((off, n, flags, depth))
        off += n
    return out


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "a.qcow2"
    create_qcow2(str(path), 16 * MiB)
    return path


def test_new_image_reads_zero(graph, img):
    node = open_qcow2(graph, img)
    assert node.getlength() == 16 * MiB
    assert node.driver.cluster_size() == 65536
    assert node.read_segments(0, 16 * MiB) == [(SEG_ZERO, 16 * MiB)]
    assert node.block_status(0, 16 * MiB) == (16 * MiB, BDRV_BLOCK_ZERO, -1)
    assert node.pread(100, 50) == bytes(50)
    assert node.filename() == str(img)
    info = node.driver.image_info()
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["dirty-flag"] is False


def test_write_read_segments(graph, img):
    node = open_qcow2(graph, img)
    node.pwrite(65536 - 10, b"a" * 20 + b"b" * 200000)
    data = node.pread(0, 1 * MiB)
    assert data[65526:65546] == b"a" * 20 and data[65546:265546] == b"b" * 200000
    assert data[:65526] == bytes(65526) and data[265546:] == bytes(len(data) - 265546)
    segs = node.read_segments(0, 1 * MiB)
    # Clusters 0-4 were allocated in one run: one file segment.
    assert [s[0] for s in segs] == [SEG_FD, SEG_ZERO]
    assert segs[0][3] == 5 * 65536
    assert seg_bytes(segs) == data
    assert node.block_status(0, MiB)[:2] == (5 * 65536, BDRV_BLOCK_DATA | ALLOC)


def test_random_io_matches_shadow(graph, img):
    node = open_qcow2(graph, img)
    shadow = bytearray(node.getlength())
    random_ops(node, shadow, random.Random(7), 400, check_every=40)
    assert read_all(node) == bytes(shadow)
    assert_clean(node)
    graph.close_all()
    node = open_qcow2(graph, img, name="again")
    assert read_all(node) == bytes(shadow)
    assert_clean(node)


@pytest.mark.parametrize("cluster_size,refcount_bits", [(512, 16), (512, 1), (4096, 2),
                                                        (4096, 64), (65536, 4)])
def test_refcount_widths_and_growth(graph, tmp_path, cluster_size, refcount_bits):
    """Small clusters and odd widths: refcount blocks and the table must grow."""
    path = tmp_path / "r.qcow2"
    create_qcow2(str(path), 8 * MiB, cluster_size=cluster_size, refcount_bits=refcount_bits)
    node = open_qcow2(graph, path)
    shadow = bytearray(node.getlength())
    rnd = random.Random(cluster_size + refcount_bits)
    random_ops(node, shadow, rnd, 150)
    data = rnd.randbytes(8 * MiB)
    node.pwrite(0, data)
    shadow[:] = data
    assert read_all(node) == bytes(shadow)
    assert_clean(node)


def test_zero_and_discard_do_not_write_data(graph, img):
    node = open_qcow2(graph, img)
    node.pwrite(0, b"x" * (4 * MiB))
    node.flush()
    size_before = os.path.getsize(img)
    node.pwrite_zeroes(0, MiB, 0)                 # keeps the clusters (zero flag)
    node.pwrite_zeroes(MiB, MiB, REQ_MAY_UNMAP)   # releases them
    node.pdiscard(2 * MiB, MiB)
    assert node.pread(0, 3 * MiB) == bytes(3 * MiB)
    assert node.pread(3 * MiB, MiB) == b"x" * MiB
    assert node.block_status(0, 4 * MiB) == (3 * MiB, BDRV_BLOCK_ZERO | ALLOC, 0)
    node.flush()
    assert os.path.getsize(img) == size_before
    assert_clean(node)
    # Released clusters are reused once the release is on disk.
    node.pwrite(8 * MiB, b"y" * MiB)
    node.flush()
    assert os.path.getsize(img) == size_before
    assert_clean(node)


def test_partial_zero_write(graph, img):
    node = open_qcow2(graph, img)
    node.pwrite(0, b"d" * 65536)
    with pytest.raises(OSError) as exc:
        node.pwrite_zeroes(100, 200, REQ_NO_FALLBACK)
    assert exc.value.errno == errno.ENOTSUP
    node.pwrite_zeroes(100, 200, 0)                 # falls back to writing zeroes
    assert node.pread(0, 400) == b"d" * 100 + bytes(200) + b"d" * 100
    # A partial zero write into a cluster that already reads zero is fast.
    node.pwrite_zeroes(65536 + 100, 200, REQ_NO_FALLBACK)
    assert node.block_status(65536, 65536)[1] == BDRV_BLOCK_ZERO | ALLOC
    assert_clean(node)


def test_fua_and_close_persist(graph, img):
    node = open_qcow2(graph, img)
    node.pwrite(12345, b"fua", REQ_FUA)
    assert header_field(img, 72, 8) & hdr.INCOMPAT_DIRTY      # dirty while open
    assert node.driver.image_info()["dirty-flag"] is False    # ...as blockd's own marker
    graph.close_all()
    assert not header_field(img, 72, 8) & hdr.INCOMPAT_DIRTY  # clean after close
    node = open_qcow2(graph, img, name="b")
    assert node.pread(12345, 3) == b"fua"


def test_read_only(graph, img):
    before = file_bytes(img)
    node = open_qcow2(graph, img, **{"read-only": True})
    with pytest.raises(OSError) as exc:
        node.pwrite(0, b"x")
    assert exc.value.errno == errno.EROFS
    node.pdiscard(0, 65536)
    node.flush()
    graph.close_all()
    assert file_bytes(img) == before


def test_backing_chain_from_header(graph, tmp_path):
    base = tmp_path / "base.raw"
    create_raw(str(base), 2 * MiB)
    with open(base, "r+b") as f:
        f.write(b"B" * MiB)
    mid = tmp_path / "mid.qcow2"
    create_qcow2(str(mid), 4 * MiB, backing_file="base.raw", backing_fmt="raw")
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), 4 * MiB, cluster_size=4096, backing_file=str(mid), backing_fmt="qcow2")
    m = open_qcow2(graph, mid, name="mid")
    m.pwrite(MiB // 2, b"M" * MiB)
    graph.close_all()
    node = open_qcow2(graph, top)
    assert node.backing.drv_name == "qcow2" and node.backing.backing.drv_name == "raw"
    assert node.backing.read_only and node.backing.backing.read_only
    node.pwrite(100, b"T" * 100)
    data = node.pread(0, 4 * MiB)
    assert data[:100] == b"B" * 100 and data[100:200] == b"T" * 100
    assert data[200:MiB // 2] == b"B" * (MiB // 2 - 200)
    assert data[MiB // 2:3 * MiB // 2] == b"M" * MiB
    assert data[3 * MiB // 2:] == bytes(len(data) - 3 * MiB // 2)
    assert seg_bytes(node.read_segments(0, 4 * MiB)) == data
    runs = status_map(node)
    assert runs[0] == (0, 4096, BDRV_BLOCK_DATA | ALLOC, 0)
    assert (runs[1][2], runs[1][3]) == (BDRV_BLOCK_DATA, 2)         # raw base
    depths = {r[3] for r in runs}
    assert {0, 1, 2, -1} <= depths
    assert runs[-1][2:] == (BDRV_BLOCK_ZERO, -1)
    assert_clean(node)


def test_backing_options(graph, tmp_path):
    base = tmp_path / "base.qcow2"
    create_qcow2(str(base), MiB)
    b = open_qcow2(graph, base, name="base")
    b.pwrite(0, b"base")
    b.flush()
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), MiB, backing_file="nonexistent", backing_fmt="qcow2")
    with pytest.raises(QMPError, match="Could not open backing file"):
        open_qcow2(graph, top, name="t0")
    assert set(graph.nodes) == {"base", b.file.name}
    by_name = open_qcow2(graph, top, name="t1", backing="base")
    assert by_name.backing is b and by_name.pread(0, 4) == b"base"
    assert by_name.filename().startswith("json:")
    none = open_qcow2(graph, top, name="t2", backing=None)
    assert none.backing is None and none.pread(0, 4) == bytes(4)
    assert none.filename().startswith("json:")     # the header's backing is overridden
    inline = open_qcow2(graph, top, name="t3",
                        backing={"driver": "qcow2", "file": {"driver": "file",
                                                             "filename": str(base)}})
    assert inline.backing.read_only and inline.pread(0, 4) == b"base"
    same = tmp_path / "same.qcow2"
    create_qcow2(str(same), MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    explicit = open_qcow2(graph, same, name="t4", backing="base")
    assert explicit.filename() == str(same)        # the node the header names: not overridden


def test_backing_without_format_is_refused(graph, tmp_path):
    base = tmp_path / "base.qcow2"
    create_qcow2(str(base), MiB)
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), MiB, backing_file="base.qcow2")
    with pytest.raises(QMPError, match="has no backing format"):
        open_qcow2(graph, top)
    assert not graph.nodes


def test_backing_loop_is_refused(graph, tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2(str(a), MiB, backing_file="b.qcow2", backing_fmt="qcow2")
    create_qcow2(str(b), MiB, backing_file="a.qcow2", backing_fmt="qcow2")
    with pytest.raises(QMPError, match="loop detected"):
        open_qcow2(graph, a)
    assert not graph.nodes
    self_loop = tmp_path / "s.qcow2"
    create_qcow2(str(self_loop), MiB, backing_file="s.qcow2", backing_fmt="qcow2")
    with pytest.raises(QMPError, match="loop detected"):
        open_qcow2(graph, self_loop)


def test_cow_from_backing_and_v2(graph, tmp_path):
    base = tmp_path / "base.raw"
    create_raw(str(base), MiB)
    with open(base, "r+b") as f:
        f.write(bytes(range(256)) * 4096)
    top = tmp_path / "v2.qcow2"
    create_qcow2(str(top), 2 * MiB, version=2, backing_file=str(base), backing_fmt="raw")
    node = open_qcow2(graph, top)
    expect = bytearray(bytes(range(256)) * 4096 + bytes(MiB))
    node.pwrite(1000, b"z" * 10)
    expect[1000:1010] = b"z" * 10
    node.pdiscard(0, 2 * MiB)           # v2 with backing: ignored (would expose backing)
    node.pwrite_zeroes(70000, 1000)     # v2 has no zero flag: written as data
    expect[70000:71000] = bytes(1000)
    assert node.pread(0, 2 * MiB) == bytes(expect)
    assert_clean(node)
    assert header_field(top, 4, 4) == 2


def test_truncate(graph, img):
    node = open_qcow2(graph, img)
    node.pwrite(0, b"x" * 100)
    node.driver.truncate(3 << 30)
    assert node.getlength() == 3 << 30
    node.pwrite((3 << 30) - 10, b"tail")
    # like QEMU, shrinking discards the clusters beyond the new end
    node.driver.truncate(MiB)
    assert node.getlength() == MiB
    assert_clean(node)
    with pytest.raises(OSError, match="multiple of 512"):
        node.driver.truncate(MiB + 1)
    node.driver.truncate(2 * MiB)
    assert node.pread(0, 100) == b"x" * 100 and node.pread(MiB, MiB) == bytes(MiB)
    assert_clean(node)


def test_concurrent_io(graph, img):
    """Threads writing disjoint areas while others read and flush."""
    node = open_qcow2(graph, img)
    size = node.getlength()
    parts = 4
    span = size // parts
    shadows = [bytearray(span) for _ in range(parts)]
    errors = []

    def worker(k):
        try:
            rnd = random.Random(k)
            base = k * span
            for _ in range(150):
                off = rnd.randrange(0, span - 1)
                n = min(span - off, rnd.choice([512, 4096, 65536, 100000]))
                op = rnd.random()
                if op < 0.7:
                    data = rnd.randbytes(n)
                    node.pwrite(base + off, data)
                    shadows[k][off:off + n] = data
                elif op < 0.9:
                    node.pwrite_zeroes(base + off, n, REQ_MAY_UNMAP)
                    shadows[k][off:off + n] = bytes(n)
                else:
                    node.flush()
                r = rnd.randrange(0, span - 4096)
                assert node.pread(base + r, 4096) == bytes(shadows[k][r:r + 4096])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert read_all(node) == b"".join(bytes(s) for s in shadows)
    assert_clean(node)


def test_dirty_image_leaks_are_repaired(graph, img):
    node = open_qcow2(graph, img)
    node.pwrite(0, b"x" * MiB)
    node.flush()
    img_obj = node.driver.img
    # Simulate a crash leaving a leaked cluster and the dirty bit.
    with img_obj.lock:
        leak = img_obj.refcounts.alloc(65536)
        img_obj.write(leak, bytes(65536))
        img_obj.refcounts.write_dirty()
    img_obj.sync()
    node.driver._closed = True          # "crash": nothing more is written
    node.__dict__.pop("detach_child", None)
    assert header_field(img, 72, 8) & hdr.INCOMPAT_DIRTY
    graph.close_all()
    ro = open_qcow2(graph, img, name="ro", **{"read-only": True})
    res = check_image(ro.driver.img)
    assert res.leaks == 1 and not res.corruptions
    assert any("Leaked cluster %d" % (leak >> 16) in m for m in res.messages)
    graph.close_all()
    rw = open_qcow2(graph, img, name="rw")
    assert not header_field(img, 72, 8) & hdr.INCOMPAT_DIRTY
    assert_clean(rw)
    assert rw.pread(0, MiB) == b"x" * MiB


def test_grow_hides_longer_backing(graph, tmp_path):
    """Growing over a longer backing file must not expose its data (QEMU's
    zero write on truncate)."""
    base = tmp_path / "base.raw"
    create_raw(str(base), 4 * MiB)
    with open(base, "r+b") as f:
        f.write(b"B" * (4 * MiB))
    for version in (3, 2):
        top = tmp_path / ("top%d.qcow2" % version)
        create_qcow2(str(top), MiB + 512, cluster_size=4096, version=version,
                     backing_file="base.raw", backing_fmt="raw")
        node = open_qcow2(graph, top, name="t%d" % version)
        node.driver.truncate(3 * MiB)
        data = node.pread(0, 3 * MiB)
        assert data[:MiB + 512] == b"B" * (MiB + 512)
        assert data[MiB + 512:] == bytes(2 * MiB - 512)
        assert_clean(node)
