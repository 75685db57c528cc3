"""The node graph with real drivers on real files (no daemon needed)."""
import errno
import os
import threading

import pytest

from blockd.errors import QMPError
from blockd.graph import blockers
from blockd.graph.backend import Backend
from blockd.graph.io import BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, REQ_MAY_UNMAP


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return str(path)


def test_inline_child_gets_generated_name(graph, img):
    node = graph.open({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": img}})
    child = node.file
    assert child.name.startswith("#block") and child.implicit and not child.monitor_owned
    assert set(graph.nodes) == {"r", child.name}


def test_duplicate_and_invalid_names(graph, img):
    graph.open({"driver": "null-co", "node-name": "n"})
    with pytest.raises(QMPError, match="Duplicate nodes with node-name='n'"):
        graph.open({"driver": "null-co", "node-name": "n"})
    with pytest.raises(QMPError, match="Invalid node-name: '1bad'"):
        graph.open({"driver": "null-co", "node-name": "1bad"})
    with pytest.raises(QMPError, match="Node name too long"):
        graph.open({"driver": "null-co", "node-name": "a" * 32})


def test_failed_open_leaves_nothing(graph, tmp_path):
    with pytest.raises(QMPError, match="Could not open .*No such file or directory"):
        graph.open({"driver": "raw", "node-name": "r",
                    "file": {"driver": "file", "filename": str(tmp_path / "missing")}})
    assert graph.nodes == {}
    # a raw window past the end of its file fails after the child opened: the child goes too
    with pytest.raises(QMPError, match="has to be smaller or equal"):
        graph.open({"driver": "raw", "node-name": "r", "offset": 4096, "size": 1 << 20,
                    "file": {"driver": "null-co", "size": 1 << 20}})
    assert graph.nodes == {}


def test_raw_window(graph, img):
    node = graph.open({"driver": "raw", "node-name": "r", "offset": 65536, "size": 131072,
                       "file": {"driver": "file", "filename": img}})
    node.pwrite(0, b"abc")
    with open(img, "rb") as f:
        f.seek(65536)
        assert f.read(3) == b"abc"
    assert node.getlength() == 131072
    assert node.filename().startswith("json:")


def test_file_block_status_and_zeroes(graph, img):
    node = graph.open({"driver": "file", "node-name": "f", "filename": img, "discard": "unmap"})
    n, flags, _ = node.block_status(0, 4 << 20)
    assert flags & BDRV_BLOCK_ZERO and not flags & BDRV_BLOCK_DATA and n == 4 << 20
    node.pwrite(1 << 20, b"x" * 65536)
    n, flags, _ = node.block_status(1 << 20, 3 << 20)
    assert flags & BDRV_BLOCK_DATA and n >= 65536
    node.pwrite_zeroes(1 << 20, 65536, REQ_MAY_UNMAP)
    assert node.pread(1 << 20, 65536) == bytes(65536)
    n, flags, _ = node.block_status(1 << 20, 65536)
    assert flags & BDRV_BLOCK_ZERO


def test_cache_direct_unaligned_io(graph, img):
    node = graph.open({"driver": "file", "node-name": "f", "filename": img, "cache": {"direct": True}})
    try:
        node.pwrite(4097, b"hello")
    except OSError as exc:  # tmpfs has no O_DIRECT
        pytest.fail("O_DIRECT not available on the test filesystem: %s" % exc)
    assert node.pread(4095, 9) == b"\0\0hello\0\0"


def test_read_only_child_under_writable_parent(graph, img):
    graph.open({"driver": "file", "node-name": "f", "filename": img, "read-only": True})
    with pytest.raises(QMPError, match="Block node is read-only"):
        graph.open({"driver": "raw", "node-name": "r", "file": "f"})
    ro = graph.open({"driver": "raw", "node-name": "r", "file": "f", "read-only": True})
    with pytest.raises(OSError) as info:
        ro.pwrite(0, b"x")
    assert info.value.errno == errno.EBADF


def test_backing_role_blocks_drive_del(graph):
    base = graph.open({"driver": "null-co", "node-name": "base"})
    top = graph.open({"driver": "null-co", "node-name": "top"})
    top.attach_child("backing", base)
    with pytest.raises(QMPError, match="Node 'base' is busy: node is used as backing hd of 'top'"):
        blockers.check(base, "drive-del")
    blockers.check(base, "backup-source")  # fleecing needs this one allowed
    top.detach_child("backing")
    blockers.check(base, "drive-del")


def test_matrix_names_only_known_ops():
    for role, (ops, template) in blockers.MATRIX.items():
        assert ops <= blockers.ALL, role
        assert template


def test_drain_waits_for_inflight_and_blocks_new(graph):
    node = graph.open({"driver": "null-co", "node-name": "n"})
    be = Backend(graph, node, True, "test")
    gate = graph.gate
    gate.enter()
    drained = threading.Event()

    def drainer():
        with gate.drained():
            drained.set()
    t = threading.Thread(target=drainer)
    t.start()
    assert not drained.wait(0.2)  # a request is in flight
    gate.leave()
    t.join(5)
    assert drained.is_set()
    assert be.pread(0, 10) == bytes(10)
    be.detach()
    assert node.backends == []


def test_delete_frees_implicit_children(graph, img):
    node = graph.open({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": img}})
    fd = node.file.driver.fd
    graph.delete(node)
    assert graph.nodes == {}
    with pytest.raises(OSError):
        os.fstat(fd)
