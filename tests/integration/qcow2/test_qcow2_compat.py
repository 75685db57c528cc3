"""Living with QEMU: header contents blockd does not understand, persistent
bitmaps, QEMU's dirty images, and images shared back and forth."""

import random
import struct

from blockd.drivers.qcow2 import header as hdr
from helpers import qemu_img
from qcow2_qemu import MiB, assert_clean, check, create, info, io, to_raw
from qcow2_testlib import file_bytes, header_field, open_qcow2, patch_file, read_all


def test_open_without_writes_changes_nothing(graph, tmp_path):
    path = create(tmp_path / "a.qcow2", 16 * MiB)
    io(path, "write -P 1 0 3M", "write -z 5M 1M")
    before = file_bytes(path)
    node = open_qcow2(graph, path)
    read_all(node)
    node.block_status(0, 16 * MiB)
    node.pdiscard(100, 200)          # partial cluster: nothing to do
    node.flush()
    graph.close_all()
    assert file_bytes(path) == before


def test_unknown_header_contents_are_kept(graph, tmp_path):
    """Unknown header fields and extensions survive a header rewrite; unknown
    autoclear bits are cleared before the first write, as the spec says."""
    create(tmp_path / "base.qcow2", 16 * MiB)
    path = create(tmp_path / "u.qcow2", 16 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    data = bytearray(file_bytes(path)[:65536])
    h = hdr.Header.parse(bytes(data))
    h.unknown_fields = b"\x00" * 8          # a future all-zero header field
    h.unknown_exts.append((0x0BADCAFE, b"keep me, please"))
    h.autoclear_features |= 1 << 40
    patch_file(path, 0, h.serialize())
    node = open_qcow2(graph, path)
    assert node.backing is not None
    node.pwrite(0, b"first write")
    graph.close_all()
    back = hdr.Header.parse(file_bytes(path)[:65536])
    assert back.unknown_exts == [(0x0BADCAFE, b"keep me, please")]
    assert back.unknown_fields == b"\x00" * 8 and back.header_length == 120
    assert back.autoclear_features == 0
    assert back.backing_file == "base.qcow2" and back.backing_format == "qcow2"
    assert_clean(path)
    assert info(path)["backing-filename"] == "base.qcow2"
    assert to_raw(path)[:11] == b"first write"


def test_bitmaps_kept_and_marked_in_use_when_written(graph, tmp_path):
    path = create(tmp_path / "b.qcow2", 16 * MiB)
    qemu_img("bitmap", "--add", str(path), "auto0")
    qemu_img("bitmap", "--add", "--disable", str(path), "off1")
    io(path, "write -P 7 0 1M")
    qemu_img("bitmap", "--add", "-g", "512k", str(path), "auto2")
    before = info(path)["format-specific"]["data"]["bitmaps"]
    node = open_qcow2(graph, path)
    read_all(node)
    graph.close_all()
    # As QEMU: a read/write open marks them in use, the close stores them back
    assert info(path)["format-specific"]["data"]["bitmaps"] == before
    assert_clean(path)

    node = open_qcow2(graph, path, name="w")
    node.pwrite(4 * MiB, b"x" * 70000)
    bitmaps = {b["name"]: b["flags"] for b in
               node.driver.image_info()["format-specific"]["data"]["bitmaps"]}
    graph.close_all()
    # While open every bitmap is "in use" (a crash leaves them inconsistent for
    # QEMU); the enabled ones track the write and all are stored at close
    # (bits: tests/integration/blockd/test_bitmaps.py).
    theirs = {b["name"]: b["flags"] for b in info(path)["format-specific"]["data"]["bitmaps"]}
    assert bitmaps == {"auto0": ["in-use", "auto"], "off1": ["in-use"],
                       "auto2": ["in-use", "auto"]}
    assert theirs == {"auto0": ["auto"], "off1": [], "auto2": ["auto"]}
    assert_clean(path)      # the bitmap clusters are still referenced
    qemu_img("bitmap", "--remove", str(path), "auto0")
    assert_clean(path)


def test_lazy_refcounts_crash_is_repaired(graph, tmp_path):
    """qemu-io with lazy refcounts aborted mid-session leaves a dirty image
    with too low refcounts: blockd's read/write open repairs it like QEMU."""
    for opts in (("lazy_refcounts=on",), ("lazy_refcounts=on", "cluster_size=512")):
        path = create(tmp_path / ("lz%d.qcow2" % len(opts)), 64 * MiB, *opts)
        qemu_io_abort = ["write -P 1 0 1M", "write -P 2 10M 3M", "abort"]
        from helpers import run, require_tool
        run([require_tool("qemu-io"), "-f", "qcow2"] + sum((["-c", c] for c in qemu_io_abort), [])
            + [str(path)], check=False)
        assert header_field(path, 72, 8) & hdr.INCOMPAT_DIRTY
        assert check(path).get("corruptions", 0) > 0
        node = open_qcow2(graph, path, name="n%d" % len(opts))
        assert node.pread(0, 4) == b"\x01" * 4 and node.pread(10 * MiB, 4) == b"\x02" * 4
        graph.close_all()
        assert not header_field(path, 72, 8) & hdr.INCOMPAT_DIRTY
        assert_clean(path)


def test_blockd_and_qemu_take_turns(graph, tmp_path):
    path = create(tmp_path / "t.qcow2", 32 * MiB, "cluster_size=16k")
    shadow = bytearray(32 * MiB)
    rnd = random.Random(3)
    for turn in range(4):
        node = open_qcow2(graph, path, name="t%d" % turn)
        for _ in range(30):
            off = rnd.randrange(0, 31 * MiB)
            data = rnd.randbytes(rnd.choice([1000, 16384, 100000]))
            node.pwrite(off, data)
            shadow[off:off + len(data)] = data
        node.pwrite_zeroes(turn * MiB, 300000, 0)
        shadow[turn * MiB:turn * MiB + 300000] = bytes(300000)
        graph.close_all()
        assert_clean(path)
        off = (8 + turn) * MiB + 123
        io(path, "write -P %d %d 77777" % (0x40 + turn, off), "write -z %d 65536" % (20 * MiB))
        shadow[off:off + 77777] = bytes([0x40 + turn]) * 77777
        shadow[20 * MiB:20 * MiB + 65536] = bytes(65536)
        assert to_raw(path) == bytes(shadow)


def test_header_is_rewritten_like_qemu(graph, tmp_path):
    """A blockd header rewrite is byte-identical to QEMU's for a fresh image."""
    (tmp_path / "x.raw").write_bytes(bytes(4096))
    for i, opts in enumerate((("cluster_size=4096",), (), ("compat=0.10",))):
        path = create(tmp_path / ("h%d.qcow2" % i), 16 * MiB, *opts, backing="x.raw",
                      backing_fmt="raw")
        size = 1 << struct.unpack_from(">I", file_bytes(path), 20)[0]
        data = file_bytes(path)[:size]
        assert hdr.Header.parse(data).serialize() == data
