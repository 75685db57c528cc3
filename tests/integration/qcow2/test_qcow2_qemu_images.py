"""Images made by qemu-img/qemu-io read through blockd equal QEMU's own view.

QEMU's view is ``qemu-img convert -O raw``; allocation is compared with
``qemu-img map``.
"""

import os

import pytest

from blockd.graph.io import BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO
from qcow2_qemu import MiB, create, info, io, qemu_map, to_raw
from qcow2_testlib import open_qcow2, read_all, seg_bytes

SIZE = 24 * MiB

#: qemu-io commands leaving data, zero clusters (allocated or not), discarded
#: clusters and unaligned writes in the image.
PATTERN = (
    "write -P 0x11 0 1M",
    "write -P 0x22 1536k 3000",
    "write -P 0x33 3M 5M",
    "write -z 4M 1M",
    "write -z -u 6M 512k",
    "discard 7M 256k",
    "write -P 0x44 12345 777",
    "write -P 0x55 20M 4M",
    "write -P 0x66 16777000 1000",
)


def compare(node, path, fmt="qcow2"):
    """blockd's content (pread and sendfile segments) equals QEMU's."""
    expect = to_raw(path, fmt)
    assert node.getlength() == len(expect)
    assert read_all(node) == expect
    size = len(expect)
    step = 3 * MiB + 4097
    for off in range(0, size, step):
        n = min(step, size - off)
        assert seg_bytes(node.read_segments(off, n)) == expect[off:off + n], off
    return expect


def compare_map(node, path):
    """Allocation, data/zero flags and depth match ``qemu-img map``."""
    for ext in qemu_map(path):
        off, end = ext["start"], ext["start"] + ext["length"]
        while off < end:
            n, flags, depth = node.block_status(off, end - off)
            where = "offset %#x (%r)" % (off, ext)
            assert bool(flags & BDRV_BLOCK_DATA) == ext["data"], where
            if ext["data"]:
                assert bool(flags & BDRV_BLOCK_ZERO) == ext["zero"], where
            else:
                assert flags & BDRV_BLOCK_ZERO, where
            if ext["present"]:
                assert depth == ext["depth"], where
                assert bool(flags & BDRV_BLOCK_ALLOCATED) == (depth == 0), where
            else:
                assert depth == -1, where
            off += n


@pytest.mark.parametrize("cluster_size", [4096, 8192, 16384, 32768, 65536, 131072, 262144,
                                          524288, 1 << 20, 2 << 20])
def test_cluster_sizes(graph, tmp_path, cluster_size):
    path = create(tmp_path / "c.qcow2", SIZE, "cluster_size=%d" % cluster_size)
    io(path, *PATTERN)
    node = open_qcow2(graph, path)
    assert node.driver.cluster_size() == cluster_size
    compare(node, path)
    compare_map(node, path)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_compat_010(graph, tmp_path, cluster_size):
    path = create(tmp_path / "v2.qcow2", SIZE, "compat=0.10", "cluster_size=%d" % cluster_size)
    io(path, *[c for c in PATTERN if not c.startswith("discard")])
    node = open_qcow2(graph, path)
    assert node.driver.image_info()["format-specific"]["data"]["compat"] == "0.10"
    compare(node, path)
    compare_map(node, path)


@pytest.mark.parametrize("cluster_size", [4096, 65536, 2 << 20])
def test_compressed(graph, tmp_path, cluster_size):
    src = create(tmp_path / "src.qcow2", SIZE)
    io(src, *PATTERN)
    with open(tmp_path / "rnd", "wb") as f:
        f.write(os.urandom(MiB))
    io(src, "write -P 0x77 9M 1M")
    path = tmp_path / "comp.qcow2"
    from helpers import qemu_img
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=%d" % cluster_size,
             str(src), str(path))
    io(path, "write -P 0x99 9437184 4096")    # a normal cluster among compressed ones
    node = open_qcow2(graph, path)
    compare(node, path)
    compare_map(node, path)


def test_preallocation_metadata(graph, tmp_path):
    path = create(tmp_path / "pm.qcow2", SIZE, "preallocation=metadata")
    io(path, "write -P 0x12 1M 100k", "write -z 5M 1M")
    node = open_qcow2(graph, path)
    compare(node, path)
    compare_map(node, path)


def test_three_deep_chain(graph, tmp_path):
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.write(bytes(range(256)) * (16 * 4096))        # 16 MiB, shorter than the chain
    io(base, "write -z 2M 1M", fmt="raw")
    l1 = create(tmp_path / "l1.qcow2", SIZE, "cluster_size=4096", backing=str(base),
                backing_fmt="raw")
    io(l1, "write -P 0xa1 1M 2M", "write -z 8M 1M", "write -P 0xa2 17M 1M")
    l2 = create(tmp_path / "l2.qcow2", SIZE, "compat=0.10", backing="l1.qcow2",
                backing_fmt="qcow2")
    io(l2, "write -P 0xb1 1536k 1M", "write -P 0xb2 20M 100k")
    l3 = create(tmp_path / "l3.qcow2", SIZE, "cluster_size=2M", backing="l2.qcow2",
                backing_fmt="qcow2")
    io(l3, "write -P 0xc1 0 4096", "write -z 10M 2M", "discard 12M 2M")
    node = open_qcow2(graph, l3)
    depth, n = 0, node
    while n.backing is not None:
        depth, n = depth + 1, n.backing
    assert depth == 3 and n.drv_name == "raw"
    compare(node, l3)
    compare_map(node, l3)


def test_refcount_widths_and_lazy_refcounts(graph, tmp_path):
    for opts in (("refcount_bits=1",), ("refcount_bits=64", "cluster_size=512"),
                 ("lazy_refcounts=on",)):
        path = create(tmp_path / ("r%s.qcow2" % len(os.listdir(tmp_path))), SIZE, *opts)
        io(path, *PATTERN)
        node = open_qcow2(graph, path, name="n%d" % len(graph.nodes))
        compare(node, path)


def test_snapshots_and_bitmaps(graph, tmp_path):
    path = create(tmp_path / "s.qcow2", SIZE)
    io(path, *PATTERN)
    from helpers import qemu_img
    qemu_img("snapshot", "-c", "snap1", str(path))
    io(path, "write -P 0xee 0 2M", "write -z 20M 1M")
    qemu_img("bitmap", "--add", str(path), "bm0")
    node = open_qcow2(graph, path, **{"read-only": True})
    compare(node, path)
    compare_map(node, path)
    ours = node.driver.image_info()
    theirs = info(path)
    assert ours["format-specific"] == theirs["format-specific"]
    assert [s["name"] for s in ours["snapshots"]] == ["snap1"]
    for key in ("id", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"):
        assert ours["snapshots"][0][key] == theirs["snapshots"][0][key], key


def test_info_matches_qemu(graph, tmp_path):
    for i, opts in enumerate((("compat=0.10",), ("cluster_size=4096",), ("refcount_bits=8",),
                              ("lazy_refcounts=on",))):
        path = create(tmp_path / ("i%d.qcow2" % i), SIZE, *opts)
        node = open_qcow2(graph, path, name="i%d" % i)
        ours, theirs = node.driver.image_info(), info(path)
        assert ours["format-specific"] == theirs["format-specific"]
        assert ours["dirty-flag"] == theirs["dirty-flag"]
        assert node.driver.cluster_size() == theirs["cluster-size"]
        assert node.getlength() == theirs["virtual-size"]
