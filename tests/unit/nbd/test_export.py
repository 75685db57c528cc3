"""NBDExport: flags, metadata contexts and extents, client bookkeeping."""

from __future__ import annotations

import threading

import pytest

from blockd import drivers
from blockd.errors import QMPError
from blockd.graph.backend import Backend
from blockd.graph.graph import Graph
from blockd.nbd import NBDExport, proto
from blockd.nbd.export import MetaContext, Extents

MiB = 1 << 20


@pytest.fixture
def graph(tmp_path):
    path = tmp_path / "img.raw"
    with open(path, "wb") as f:           # 1 MiB data, 2 MiB hole, 1 MiB data
        f.write(b"\1" * MiB)
        f.seek(3 * MiB)
        f.write(b"\2" * MiB)
    g = Graph(drivers.lookup)
    g.open({"driver": "raw", "node-name": "r",
            "file": {"driver": "file", "filename": str(path)}})
    g.open({"driver": "null-co", "node-name": "n", "size": 8 * MiB})
    yield g
    g.close_all()


def make(graph, node="r", writable=True, **kw):
    return NBDExport("e", "e", Backend(graph, graph.nodes[node], writable, "e"), writable, **kw)


def test_flags(graph):
    rw = make(graph)
    assert rw.size == 4 * MiB
    assert rw.transmission_flags(True) == 0xD6D
    assert rw.transmission_flags(False) == 0xC6D
    ro = make(graph, writable=False)
    assert ro.transmission_flags(True) == 0x50F


def test_name_and_description_limits(graph):
    with pytest.raises(QMPError, match="too long"):
        make(graph, description="d" * 4097)
    exp = NBDExport("e", "é" * 2048, Backend(graph, graph.nodes["r"], False, "e"), False)
    assert exp.name.startswith("é")


def test_extents_merge_and_limit():
    ext = Extents(2)
    assert ext.add(10, 0) and ext.add(5, 0) and ext.add(3, 3)
    assert not ext.add(1, 0)               # a third distinct extent does not fit
    assert ext.add(7, 3)                   # ... but merging still does
    assert ext.as_list() == [(15, 0), (10, 3)]
    assert ext.to_bytes() == b"\0\0\0\x0f\0\0\0\0\0\0\0\x0a\0\0\0\3"
    big = Extents(4)
    big.add(0x1_0000_0005, 1)              # over 32 bits: split
    assert big.as_list() == [(0xFFFFFFFF, 1), (6, 1)]


def test_base_allocation(graph):
    ctx = make(graph).contexts[0]
    root = graph.nodes["r"]
    assert (ctx.name, ctx.id) == ("base:allocation", 0)
    assert ctx.extents(root, 0, 4 * MiB, 100).as_list() == [(MiB, 0), (2 * MiB, 3), (MiB, 0)]
    assert ctx.extents(root, 0, 4 * MiB, 1).as_list() == [(MiB, 0)]
    assert ctx.extents(root, MiB + 5, 10, 1).as_list() == [(10, 3)]
    null = make(graph, "n").contexts[0]
    assert null.extents(graph.nodes["n"], 0, 8 * MiB, 10).as_list() == [(8 * MiB, 1)]


def test_contexts_and_queries(graph):
    plain = make(graph)
    assert [c.name for c in plain.contexts] == ["base:allocation"]
    exp = make(graph, allocation_depth=True)
    base, depth = exp.contexts
    assert depth.extents(graph.nodes["r"], 0, 4 * MiB, 10).as_list() == [(4 * MiB, 1)]
    assert exp.match_contexts("base:allocation", False) == [base]
    assert exp.match_contexts("base:", False) == []
    assert exp.match_contexts("base:", True) == [base]
    assert exp.match_contexts("qemu:", True) == [depth]
    assert exp.match_contexts("qemu:allocation-depth", False) == [depth]
    assert exp.match_contexts("qemu:dirty-bitmap:", True) == []
    assert exp.match_contexts("", True) == []
    assert exp.match_contexts("nope:x", True) == []

    class Bitmap(MetaContext):
        def extents(self, root, offset, length, limit):
            out = Extents(limit)
            out.add(length, proto.STATE_DIRTY)
            return out

    bm = Bitmap("qemu:dirty-bitmap:b0", 2)
    exp.add_context(bm)
    assert exp.match_contexts("qemu:dirty-bitmap:", True) == [bm]
    assert exp.match_contexts("qemu:", True) == [depth, bm]
    with pytest.raises(ValueError):
        exp.add_context(Bitmap("qemu:dirty-bitmap:b0", 3))


class FakeConn:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_client_bookkeeping(graph):
    exp = make(graph)
    a, b = FakeConn(), FakeConn()
    assert exp.attach(a) and exp.attach(b)
    assert exp.client_count() == 2
    fired = []
    exp.add_idle_callback(fired.append)
    exp.detach(a)
    exp.detach(b)
    assert not fired                       # not closing: idle is not "gone"
    assert exp.wait_idle(0)
    assert exp.attach(a)
    exp.close()
    assert not exp.attach(b)               # closing: refused
    exp.disconnect_clients()
    assert a.closed and not b.closed
    threading.Timer(0.1, exp.detach, (a,)).start()
    assert exp.wait_idle(5)
    assert fired == [exp]
