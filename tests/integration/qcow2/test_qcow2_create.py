"""Images created by blockd pass qemu-img check; qemu-img info shows what was asked."""

import os

import pytest

from blockd.drivers.qcow2 import create_qcow2, create_raw
from blockd.errors import QMPError
from qcow2_qemu import MiB, assert_clean, create, info, io, to_raw
from qcow2_testlib import file_bytes, open_qcow2

SIZES = [0, MiB, 100 * MiB, (1 << 30) + 512, 5 << 30]


@pytest.mark.parametrize("kwargs,qemu_opts", [
    ({}, ()),
    ({"cluster_size": 512}, ("cluster_size=512",)),
    ({"cluster_size": 4096, "version": 2}, ("cluster_size=4096", "compat=0.10")),
    ({"cluster_size": 2 << 20}, ("cluster_size=2M",)),
    ({"refcount_bits": 1}, ("refcount_bits=1",)),
    ({"lazy_refcounts": True}, ("lazy_refcounts=on",)),
    ({"version": "v2"}, ("compat=0.10",)),
])
def test_create_like_qemu_img(tmp_path, kwargs, qemu_opts):
    for size in SIZES:
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        create_qcow2(str(ours), size, **kwargs)
        create(theirs, size, *qemu_opts)
        assert_clean(ours)
        got, want = info(ours), info(theirs)
        for key in ("virtual-size", "cluster-size", "format-specific", "dirty-flag"):
            assert got[key] == want[key], (size, key)
        # Byte for byte what qemu-img create writes.
        assert file_bytes(ours) == file_bytes(theirs), size


@pytest.mark.parametrize("preallocation", ["metadata", "falloc", "full"])
def test_create_preallocated(graph, tmp_path, preallocation):
    path = tmp_path / "p.qcow2"
    create_qcow2(str(path), 20 * MiB + 512, cluster_size=16384, preallocation=preallocation)
    assert_clean(path)
    assert info(path)["virtual-size"] == 20 * MiB + 512
    assert to_raw(path) == bytes(20 * MiB + 512)
    node = open_qcow2(graph, path)
    n, flags, depth = node.block_status(0, node.getlength())
    assert n == node.getlength() and depth == 0
    node.pwrite(MiB + 3, b"after")
    graph.close_all()
    assert_clean(path)
    if preallocation == "metadata":
        theirs = create(tmp_path / "t.qcow2", 20 * MiB + 512, "cluster_size=16384",
                        "preallocation=metadata")
        assert os.path.getsize(theirs) == os.path.getsize(path)


def test_create_with_backing(graph, tmp_path):
    base = create(tmp_path / "base.qcow2", 8 * MiB)
    io(base, "write -P 0x61 0 8M")
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), 16 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    assert_clean(top)
    meta = info(top)
    assert meta["backing-filename"] == "base.qcow2"
    assert meta["backing-filename-format"] == "qcow2"
    assert meta["virtual-size"] == 16 * MiB
    assert file_bytes(top) == file_bytes(create(tmp_path / "ref.qcow2", 16 * MiB,
                                                backing="base.qcow2", backing_fmt="qcow2"))
    node = open_qcow2(graph, top)
    assert node.pread(0, 4) == b"\x61" * 4 and node.pread(9 * MiB, 4) == bytes(4)
    node.pwrite(100, b"top")
    graph.close_all()
    assert_clean(top)
    assert to_raw(top)[:104] == b"\x61" * 100 + b"top" + b"\x61"


def test_create_on_a_file_node(graph, tmp_path):
    """What blockdev-create does: the file node exists already."""
    path = tmp_path / "node.qcow2"
    path.touch()
    fnode = graph.open({"driver": "file", "node-name": "f", "filename": str(path)})
    create_qcow2(fnode, 4 * MiB, cluster_size=4096)
    assert fnode.parents == []
    node = graph.open({"driver": "qcow2", "node-name": "q", "file": "f"})
    node.pwrite(0, b"on node")
    graph.close_all()
    assert_clean(path)
    assert info(path)["cluster-size"] == 4096


def test_create_raw(tmp_path):
    for prealloc in ("off", "falloc", "full"):
        path = tmp_path / ("r-%s.raw" % prealloc)
        create_raw(str(path), 3 * MiB + 512, preallocation=prealloc)
        assert os.path.getsize(path) == 3 * MiB + 512
        assert info(path)["format"] == "raw"
        blocks = os.stat(path).st_blocks * 512
        assert (blocks >= 3 * MiB) == (prealloc != "off")


@pytest.mark.parametrize("kwargs,message", [
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"cluster_size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": 4 << 20}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"version": 2, "refcount_bits": 8}, "Different refcount widths than 16 bits require"),
    ({"refcount_bits": 3}, "Refcount width must be a power of two"),
    ({"version": 2, "lazy_refcounts": True}, "Lazy refcounts only supported"),
    ({"backing_fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"backing_file": "b", "preallocation": "metadata"}, "Backing file and preallocation"),
    ({"extended_l2": True}, "extended L2"),
    ({"compression_type": "zstd"}, "only zlib"),
    ({"version": 4}, "Invalid compatibility level"),
])
def test_create_errors(tmp_path, kwargs, message):
    kwargs = dict(kwargs)
    size = kwargs.pop("size", MiB)
    with pytest.raises(QMPError, match=message):
        create_qcow2(str(tmp_path / "e.qcow2"), size, **kwargs)
