"""bdrv_append() of blockd (graph/snapshot.py) on a real in-process graph."""
import pytest

from blockd.drivers.qcow2.create import create_qcow2
from blockd.errors import QMPError
from blockd.graph.backend import Backend
from blockd.graph.snapshot import Append, set_read_only


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"D" * (1 << 20))
    return str(path)


def _overlay(graph, tmp_path, name, backing_file, size=1 << 20):
    path = str(tmp_path / f"{name}.qcow2")
    create_qcow2(path, size, backing_file=backing_file, backing_fmt="raw")
    return graph.open({"driver": "qcow2", "node-name": name, "backing": None,
                       "file": {"driver": "file", "filename": path}}, monitor_owned=False)


def test_append_moves_backends_and_parent_edges_and_undo_restores_them(graph, tmp_path, disk):
    fa = graph.open({"driver": "file", "node-name": "fa", "filename": disk})
    a = graph.open({"driver": "raw", "node-name": "a", "file": "fa"})
    b1 = Backend(graph, fa, writable=True, description="one")
    b2 = Backend(graph, fa, writable=False, description="two")
    ov = _overlay(graph, tmp_path, "ov", disk)
    parents, backends = list(fa.parents), list(fa.backends)

    app = Append(graph, ov, fa)
    app.apply()
    assert ov.backing is fa and a.file is ov
    assert b1.root is ov and b2.root is ov and fa.backends == []
    assert [e.parent for e in fa.parents] == [ov]
    # the raw parent's data path follows its new child: writes land in the overlay
    a.pwrite(0, b"x" * 4096)
    assert fa.pread(0, 4) == b"DDDD" and ov.pread(0, 4) == b"xxxx" and a.pread(0, 4) == b"xxxx"
    b1.pwrite(8192, b"y" * 512)
    assert fa.pread(8192, 1) == b"D" and ov.pread(8192, 1) == b"y"

    app.undo()
    assert ov.backing is None and ov.parents == [] and ov.backends == []
    assert fa.parents == parents and fa.backends == backends
    assert a.file is fa and b1.root is fa and b2.root is fa
    assert a.pread(0, 4) == b"DDDD"


def test_append_refuses_cycles_and_read_only_overlays_under_writers(graph, tmp_path, disk):
    fa = graph.open({"driver": "file", "node-name": "fa", "filename": disk})
    ov = _overlay(graph, tmp_path, "ov", disk)
    with pytest.raises(QMPError, match="Making 'ov' a backing child of 'ov' would create a cycle"):
        Append(graph, ov, ov).apply()
    ro = graph.open({"driver": "qcow2", "node-name": "ro", "read-only": True, "backing": None,
                     "file": {"driver": "file", "filename": str(tmp_path / "ov.qcow2")}})
    Backend(graph, fa, writable=True, description="w")
    with pytest.raises(QMPError, match="Block node is read-only"):
        Append(graph, ro, fa).apply()
    assert ro.backing is None and len(fa.backends) == 1


def test_read_only_reaches_inline_children_only(graph, disk, tmp_path):
    named = graph.open({"driver": "file", "node-name": "named", "filename": disk})
    r1 = graph.open({"driver": "raw", "node-name": "r1", "file": "named"})
    r2 = graph.open({"driver": "raw", "node-name": "r2",
                     "file": {"driver": "file", "filename": disk}})
    set_read_only(r1)
    set_read_only(r2)
    assert (r1.read_only, named.read_only) == (True, False)
    assert (r2.read_only, r2.file.read_only) == (True, True)
