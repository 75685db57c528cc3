"""NBDServer and NBDExport driven in-process: start errors, limits, removal, timeouts, the gate.

The server runs in this process (its threads), the clients are real: the raw
client, nbdinfo/nbdcopy and python3-libnbd.  These are the behaviours the QMP
layer builds on (nbd-server-start/stop, block-export-add/del).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest

from blockd import drivers
from blockd.drivers.base import Driver
from blockd.graph.io import SEG_DATA, SEG_FD, SEG_ZERO
from blockd.errors import QMPError
from blockd.graph.backend import Backend
from blockd.graph.graph import Graph
from blockd.nbd import NBDExport, NBDServer, connection, proto, serve_socket
from helpers import MiB, nbd_tcp_uri, nbd_uri, require_tool, run

from .conftest import SIZE, expected_content, make_image, wait_until
from .rawclient import Closed, RawNBD

pytestmark = pytest.mark.blockd


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="bns-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Setup:
    """A graph with a raw node over a test image and helpers to export it."""

    def __init__(self, tmp_path: Path, sockdir: Path, lookup=drivers.lookup) -> None:
        self.image = make_image(tmp_path / "img.raw")
        self.graph = Graph(lookup)
        self.node = self.graph.open({"driver": "raw", "node-name": "r",
                                     "file": {"driver": "file", "filename": str(self.image)}})
        self.sock = str(sockdir / "nbd.sock")
        self.servers = []

    def export(self, name="x", writable=True, **kw) -> NBDExport:
        return NBDExport(name, name, Backend(self.graph, self.node, writable, name), writable, **kw)

    def server(self, max_connections=100, exports=("x",), **kw) -> NBDServer:
        srv = NBDServer({"type": "unix", "path": self.sock}, max_connections=max_connections, **kw)
        srv.start()
        self.servers.append(srv)
        for name in exports:
            srv.add_export(self.export(name))
        return srv

    def close(self) -> None:
        for srv in self.servers:
            srv.stop(join_timeout=5)
        self.graph.close_all()


@pytest.fixture
def setup(tmp_path, sockdir):
    s = Setup(tmp_path, sockdir)
    yield s
    s.close()


# -- nbd-server-start errors, with qsd's texts ------------------------------------------------

def test_start_errors(sockdir):
    def error(addr) -> str:
        with pytest.raises(QMPError) as exc:
            NBDServer(addr).start()
        return exc.value.desc

    assert error({"type": "unix", "path": "/nonexist/dir/s"}) == \
        "Failed to bind socket to /nonexist/dir/s: No such file or directory"
    long_path = str(sockdir / ("x" * 120))
    assert error({"type": "unix", "path": long_path}) == \
        "UNIX socket path '%s' is too long" % long_path
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    try:
        assert error({"type": "inet", "host": "127.0.0.1", "port": port}) == \
            "Failed to find an available port: Address already in use"
        assert error({"type": "inet", "data": {"host": "127.0.0.1", "port": port}}) == \
            "Failed to find an available port: Address already in use"   # legacy form
    finally:
        busy.close()
    assert error({"type": "inet", "host": "127.0.0.1", "port": "notaport"}) == \
        "address resolution failed for 127.0.0.1:notaport: Servname not supported for ai_socktype"
    assert error({"type": "inet", "host": "127.0.0.1", "port": "1", "ipv6": True,
                  "ipv4": False}).startswith("address resolution failed for 127.0.0.1:1: ")
    assert error({"type": "inet", "host": "::1", "port": "1", "ipv4": False,
                  "ipv6": False}) == "Cannot disable IPv4 and IPv6 at same time"
    assert error({"type": "fd", "str": "bogus"}) == "Unable to parse FD number bogus"
    with open(os.devnull) as f:
        assert error({"type": "fd", "str": str(f.fileno())}) == \
            "File descriptor '%d' is not a socket" % f.fileno()


def test_unix_socket_replaces_stale_file_and_is_removed_on_stop(setup):
    Path(setup.sock).write_text("stale")
    srv = setup.server()
    assert Path(setup.sock).is_socket()
    srv.stop()
    assert not Path(setup.sock).exists()


def test_inet_and_fd_listeners(setup):
    nbdinfo = require_tool("nbdinfo", "libnbd-bin")
    srv = NBDServer({"type": "inet", "host": "127.0.0.1", "port": "0", "ipv4": True})
    srv.start()
    setup.servers.append(srv)
    srv.add_export(setup.export())
    host, port = srv.address()[0][:2]
    assert run([nbdinfo, "--size", nbd_tcp_uri(host, port, "x")]).stdout.strip() == str(SIZE)
    out = Path(setup.image.parent / "tcp.raw")
    run([require_tool("nbdcopy", "libnbd-bin"), nbd_tcp_uri(host, port, "x"), str(out)])
    assert out.read_bytes() == expected_content()
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(setup.sock)
    fdsrv = NBDServer({"type": "fd", "str": str(lsock.detach())})
    fdsrv.start()
    setup.servers.append(fdsrv)
    fdsrv.add_export(setup.export())
    assert run([nbdinfo, "--size", nbd_uri(setup.sock, "x")]).stdout.strip() == str(SIZE)


def test_duplicate_export_name(setup):
    srv = setup.server()
    with pytest.raises(QMPError, match="NBD server already has export named 'x'"):
        srv.add_export(setup.export("x"))
    with pytest.raises(QMPError, match="export name '.*' too long"):
        setup.export("n" * 4097)


# -- connection limit -------------------------------------------------------------------------

def greeted(c: RawNBD, timeout: float) -> bool:
    c.sock.settimeout(timeout)
    try:
        return len(c.sock.recv(18, socket.MSG_PEEK)) > 0
    except socket.timeout:
        return False


def test_max_connections_one(setup):
    srv = setup.server(max_connections=1)
    first = RawNBD.connect(setup.sock)
    assert not first.flags & proto.FLAG_CAN_MULTI_CONN
    second = RawNBD(setup.sock)            # connect() succeeds: it waits in the backlog
    assert not greeted(second, 0.5)
    assert srv.connection_count() == 1
    first.disc()
    first.close()
    assert greeted(second, 5)
    second.start()
    assert second.go("x")[0] == SIZE
    second.close()


def test_max_connections_unlimited_and_multi_conn(setup):
    srv = setup.server(max_connections=0)
    conns = [RawNBD.connect(setup.sock) for _ in range(8)]
    assert all(c.flags & proto.FLAG_CAN_MULTI_CONN for c in conns)
    assert srv.connection_count() == 8
    assert srv.exports["x"].client_count() == 8
    for c in conns:
        c.close()
    assert wait_until(lambda: srv.connection_count() == 0)


# -- stop and export removal ------------------------------------------------------------------

def test_stop_drops_every_client(setup):
    srv = setup.server()
    ready = RawNBD.connect(setup.sock)
    negotiating = RawNBD(setup.sock)
    negotiating.start()
    assert wait_until(lambda: srv.connection_count() == 2)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5
    assert ready.is_closed(2) and negotiating.is_closed(2)
    assert srv.connection_count() == 0
    with pytest.raises(OSError):
        RawNBD(setup.sock)


def test_remove_export_hard(setup):
    srv = setup.server()
    exp = srv.exports["x"]
    c = RawNBD.connect(setup.sock)
    assert exp.client_count() == 1
    idle = []
    srv.remove_export("x")
    exp.add_idle_callback(idle.append)
    assert not idle                        # a client is still connected
    assert c.read(0, 512) == expected_content()[:512]   # ... and still served
    with RawNBD(setup.sock) as late:
        late.start()
        (rtype, data), = late.ask(proto.OPT_GO, proto.pack_info_request("x"))
        assert rtype == proto.REP_ERR_UNKNOWN
    exp.disconnect_clients()
    assert c.is_closed(2)
    assert exp.wait_idle(5)
    assert wait_until(lambda: idle == [exp])
    assert exp.client_count() == 0
    later = []
    exp.add_idle_callback(later.append)    # already idle: runs at once
    assert later == [exp]


def test_detached_backend_answers_eshutdown(setup):
    srv = setup.server()
    c = RawNBD.connect(setup.sock)
    exp = srv.exports["x"]
    with exp.backend.gate.drained():
        exp.backend.detach()
    c.request(proto.CMD_READ, 0, 512)
    assert c.error_of() == proto.NBD_ESHUTDOWN
    c.request(proto.CMD_WRITE, 0, 512, payload=bytes(512))
    assert c.error_of() == proto.NBD_ESHUTDOWN


# -- time limits and the I/O gate ----------------------------------------------------------------

def test_handshake_timeout(setup):
    srv = setup.server(handshake_timeout=0.5)
    idle = RawNBD(setup.sock)
    t0 = time.monotonic()
    assert idle.is_closed(5)
    assert 0.4 < time.monotonic() - t0 < 3
    slow = RawNBD(setup.sock)
    slow.start()
    slow.option(proto.OPT_STRUCTURED_REPLY)
    assert slow.is_closed(5)
    ok = RawNBD.connect(setup.sock)        # negotiated in time: no limit afterwards
    time.sleep(1)
    assert ok.read(0, 512) == expected_content()[:512]
    ok.close()
    assert srv.connection_count() <= 1


def test_write_payload_is_received_outside_the_gate(setup):
    setup.server()
    c = RawNBD.connect(setup.sock)
    c.request(proto.CMD_WRITE, 0, 1 * MiB, payload=b"\x01" * 1000)   # most of it never comes
    time.sleep(0.2)
    t0 = time.monotonic()
    with setup.graph.gate.drained():
        pass
    assert time.monotonic() - t0 < 1
    c.send(b"\x01" * (MiB - 1000))
    assert c.error_of() == 0


@pytest.mark.parametrize("zero_copy", [True, False])
def test_stalled_reader_cannot_block_a_drain(setup, monkeypatch, zero_copy):
    """A client that stops reading a big READ reply: zero-copy sends inside the
    gate and is dropped after DRAIN_STALL_SECS once a drain waits; copy mode
    sends after leaving the gate, so the drain does not wait at all."""
    monkeypatch.setattr(connection, "DRAIN_STALL_SECS", 1.0)
    srv = setup.server(exports=())
    srv.add_export(setup.export(zero_copy=zero_copy))
    c = RawNBD.connect(setup.sock)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(4):
        c.request(proto.CMD_READ, 0, 16 * MiB)
    time.sleep(0.5)                        # the server is now blocked sending
    t0 = time.monotonic()
    with setup.graph.gate.drained():
        waited = time.monotonic() - t0
    if zero_copy:
        assert 0.9 < waited < 4
        assert c.is_closed(5)
    else:
        assert waited < 0.5
        c.close()
    assert wait_until(lambda: setup.graph.gate.inflight == 0)
    with RawNBD.connect(setup.sock) as fresh:
        assert fresh.read(0, 512) == expected_content()[:512]


def test_copy_mode_reads_are_point_in_time(setup):
    """With zero_copy=False a READ answered before a WRITE keeps the old data even
    if the client reads the reply afterwards (sendfile would show the new bytes)."""
    srv = setup.server(exports=())
    srv.add_export(setup.export(zero_copy=False))
    with RawNBD.connect(setup.sock) as c:
        c.send(proto.pack_request(proto.CMD_READ, 1, 0, 65536)
               + proto.pack_request(proto.CMD_WRITE, 2, 0, 65536) + b"\xff" * 65536)
        time.sleep(0.3)
        kind, chunks = c.any_reply()
        assert chunks[0][3][8:] == expected_content()[:65536]
        assert c.any_reply() == ("simple", 0, 2, b"")
        assert c.read(0, 16) == b"\xff" * 16


def test_copy_mode_with_tools(setup, tmp_path):
    srv = setup.server(exports=())
    srv.add_export(setup.export(zero_copy=False))
    out = tmp_path / "out.raw"
    run([require_tool("nbdcopy", "libnbd-bin"), nbd_uri(setup.sock, "x"), str(out)])
    assert out.read_bytes() == expected_content()
    with RawNBD.connect(setup.sock, sr=False) as c:
        assert c.read(3 * MiB, 2 * MiB) == expected_content()[3 * MiB:5 * MiB]
    with RawNBD.connect(setup.sock) as c:
        c.request(proto.CMD_READ, 0, 65536, flags=proto.CMD_FLAG_DF)
        assert len(c.any_reply()[1]) == 1


# -- serve_socket and driver errors ----------------------------------------------------------------

def test_serve_socket_with_libnbd(setup, libnbd):
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=serve_socket, args=(ours, setup.export()), daemon=True)
    t.start()
    h = libnbd.NBD()
    h.set_export_name("x")
    h.connect_socket(theirs.detach())
    assert h.get_size() == SIZE
    assert not h.can_multi_conn()
    assert h.pread(4096, 0) == expected_content()[:4096]
    h.shutdown()
    t.join(5)
    assert not t.is_alive()


class FailingDriver(Driver):
    """A driver whose operations fail with the errno named in its options."""

    format_name = "failing"
    is_protocol = True

    def open(self, options):
        self.err = int(options.get("errno", errno.EIO))

    def getlength(self):
        return 1 << 20

    def _fail(self, *args, **kw):
        raise OSError(self.err, os.strerror(self.err))

    pread = read_segments = pwrite = pdiscard = flush = _fail

    def pwrite_zeroes(self, offset, length, flags=0):
        raise OSError(errno.ENOTSUP, "no fast zero")

    def block_status(self, offset, length):
        raise OSError(self.err, os.strerror(self.err))


@pytest.mark.parametrize("err,nbd_err", [(errno.EIO, proto.NBD_EIO),
                                         (errno.EDQUOT, proto.NBD_ENOSPC),
                                         (errno.EFBIG, proto.NBD_ENOSPC),
                                         (errno.EROFS, proto.NBD_EPERM),
                                         (errno.EBADF, proto.NBD_EINVAL)])
def test_driver_errors_are_mapped(sockdir, err, nbd_err):
    lookup = lambda name: FailingDriver if name == "failing" else drivers.lookup(name)  # noqa: E731
    graph = Graph(lookup)
    node = graph.open({"driver": "failing", "node-name": "bad", "errno": err,
                       "discard": "unmap"})
    srv = NBDServer({"type": "unix", "path": str(sockdir / "s")})
    srv.start()
    try:
        srv.add_export(NBDExport("bad", "bad", Backend(graph, node, True, "bad"), True))
        with RawNBD.connect(str(sockdir / "s"), "bad") as c:
            for cmd, payload in ((proto.CMD_READ, b""), (proto.CMD_WRITE, bytes(512)),
                                 (proto.CMD_FLUSH, b""), (proto.CMD_TRIM, b""),
                                 (proto.CMD_BLOCK_STATUS, b"")):
                c.request(cmd, 0, 0 if cmd == proto.CMD_FLUSH else 512, payload=payload)
                assert c.error_of() == nbd_err, cmd
            c.request(proto.CMD_WRITE_ZEROES, 0, 512, flags=proto.CMD_FLAG_FAST_ZERO)
            assert c.error_message() == (proto.NBD_ENOTSUP, "writing to file failed")
            c.request(proto.CMD_WRITE_ZEROES, 0, 512)      # ENOTSUP only for FAST_ZERO
            assert c.error_of() == proto.NBD_EINVAL
    finally:
        srv.stop()
        graph.close_all()


def test_stop_joins_threads(setup):
    srv = setup.server()
    before = {t.name for t in threading.enumerate()}
    conns = [RawNBD.connect(setup.sock) for _ in range(3)]
    srv.stop()
    for c in conns:
        c.close()
    assert wait_until(lambda: not [t for t in threading.enumerate()
                                   if t.name.startswith("nbd-") and t.name not in before])


def test_many_clients_in_parallel(setup):
    srv = setup.server()
    errors = []

    def client(i):
        try:
            with RawNBD.connect(setup.sock) as c:
                for j in range(20):
                    off = ((i * 20 + j) % 16) * MiB
                    assert c.read(off, 65536) == expected_content()[off:off + 65536]
        except Exception as exc:  # noqa: BLE001 - collected
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert wait_until(lambda: srv.connection_count() == 0)


def test_struct_sizes():
    assert proto.REQUEST.size == 28 and proto.CHUNK_OFFSET_DATA.size == 28
    assert struct.calcsize(">IHHQIQI") == 32


class MixedDriver(Driver):
    """Reads as segments of every kind, cycling per 4 KiB block: file, zero, memory.

    Block ``i`` of the image reads as: block ``i`` of ``filename`` (i % 3 == 0),
    zeroes (1), or bytes ``i & 0xff`` (2).  Block ``bad`` comes from a
    directory descriptor, which cannot be read.
    """

    format_name = "mixed"
    is_protocol = True
    BLOCK = 4096

    def open(self, options):
        self.fd = os.open(options["filename"], os.O_RDONLY)
        self.dirfd = os.open(os.path.dirname(options["filename"]), os.O_RDONLY)
        self.bad = int(options.get("bad", -1))

    def close(self):
        os.close(self.fd)
        os.close(self.dirfd)

    def getlength(self):
        return 1 << 20

    def expected(self, offset, length):
        out = bytearray()
        for pos in range(offset, offset + length):
            i, kind = pos // self.BLOCK, (pos // self.BLOCK) % 3
            out.append(os.pread(self.fd, 1, pos)[0] if kind == 0 else 0 if kind == 1 else i & 0xFF)
        return bytes(out)

    def read_segments(self, offset, length):
        segs, pos, end = [], offset, offset + length
        while pos < end:
            i = pos // self.BLOCK
            n = min(end, (i + 1) * self.BLOCK) - pos
            kind = i % 3
            if i == self.bad:
                segs.append((SEG_FD, self.dirfd, 0, n))
            elif kind == 0:
                segs.append((SEG_FD, self.fd, pos, n))
            elif kind == 1:
                segs.append((SEG_ZERO, n))
            else:
                segs.append((SEG_DATA, bytes([i & 0xFF]) * n))
            pos += n
        return segs

    def pread(self, offset, length):
        return self.expected(offset, length)


@pytest.fixture
def mixed(tmp_path, sockdir):
    image = make_image(tmp_path / "m.raw")
    lookup = lambda name: MixedDriver if name == "mixed" else drivers.lookup(name)  # noqa: E731
    graph = Graph(lookup)
    good = graph.open({"driver": "mixed", "node-name": "m", "filename": str(image)})
    bad = graph.open({"driver": "mixed", "node-name": "b", "filename": str(image), "bad": 3})
    srv = NBDServer({"type": "unix", "path": str(sockdir / "m")})
    srv.start()
    for name, node, zc in (("m", good, True), ("mc", good, False), ("b", bad, True)):
        srv.add_export(NBDExport(name, name, Backend(graph, node, False, name), False,
                                 zero_copy=zc))
    yield str(sockdir / "m"), good.driver
    srv.stop()
    graph.close_all()


@pytest.mark.parametrize("name", ["m", "mc"])
def test_mixed_segments(mixed, name):
    path, drv = mixed
    for sr in (True, False):
        with RawNBD.connect(path, name, sr=sr, meta=()) as c:
            for offset, length in ((0, 65536), (1000, 20000), (4096, 4096), (8192 + 7, 5)):
                assert c.read(offset, length) == drv.expected(offset, length), (offset, length)
                assert c.read(offset, length, proto.CMD_FLAG_FUA) == drv.expected(offset, length)
            if sr:
                c.request(proto.CMD_READ, 0, 3 * 4096)
                kinds = [ch[1] for ch in c.any_reply()[1]]
                assert kinds == [proto.REPLY_TYPE_OFFSET_DATA, proto.REPLY_TYPE_OFFSET_HOLE,
                                 proto.REPLY_TYPE_OFFSET_DATA]
                c.request(proto.CMD_READ, 4096, 4096, flags=proto.CMD_FLAG_DF)
                assert [ch[1] for ch in c.any_reply()[1]] == [proto.REPLY_TYPE_OFFSET_HOLE]
                c.request(proto.CMD_READ, 0, 5 * 4096, flags=proto.CMD_FLAG_DF)
                (chunk,) = c.any_reply()[1]
                assert chunk[3][8:] == drv.expected(0, 5 * 4096)


def test_unreadable_file_segment(mixed):
    path, _ = mixed
    with RawNBD.connect(path, "b", meta=()) as c:
        # the unreadable block ends the last data chunk: the server must drop
        # the connection rather than invent data
        c.request(proto.CMD_READ, 2 * 4096, 2 * 4096)
        with pytest.raises(Closed):
            c.any_reply()
    with RawNBD.connect(path, "b", meta=()) as c:
        # a hole chunk follows: the data chunk is padded, then an error chunk ends the reply
        c.request(proto.CMD_READ, 3 * 4096, 2 * 4096)
        chunks = c.any_reply()[1]
        assert [ch[1] for ch in chunks] == [proto.REPLY_TYPE_OFFSET_DATA, proto.REPLY_TYPE_ERROR]
        assert len(chunks[0][3]) == 8 + 4096
        assert struct.unpack(">I", chunks[1][3][:4])[0] == proto.NBD_EINVAL   # EISDIR
        assert c.read(0, 4096) is not None
    with RawNBD.connect(path, "b", meta=(), sr=False) as c:
        c.request(proto.CMD_READ, 3 * 4096, 4096)   # simple reply: header already sent
        with pytest.raises(Closed):
            c.recv(16 + 4096)
