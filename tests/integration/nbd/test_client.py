"""blockd's NBD client (``blockd.nbd.client``) against real servers.

Every ``engine`` test runs against qemu-storage-daemon 7.2 and blockd serving
the exports of ``conftest.py`` (``x``: 16 MiB raw with a hole at 4 MiB,
writable; ``ro``; ``null``; ``depth`` with allocation-depth); extents are
checked against what libnbd's ``nbdinfo --map`` says for the same export.
TLS is tested here on qsd (blockd's TLS server: ``test_tls_server.py``), with a
CA and certificates made by the ``openssl`` CLI (``helpers/pki.py``).
"""

from __future__ import annotations

import errno
import json
import random
import threading

import pytest

from blockd.nbd import client as nbdc
from blockd.nbd import proto
from helpers import MiB, nbdinfo_json, qemu_img, qemu_io, require_tool, run
from helpers.nbd import hammer
from helpers.pki import pki  # noqa: F401  (a pytest fixture)

from .conftest import HOLE, SIZE, expected_content

WAIT = 60.0


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list:
    exe = require_tool("nbdinfo", "libnbd-bin")
    out = json.loads(run([exe, "--json", "--map=" + context, uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in out]


def extents(client, context="base:allocation") -> list:
    return [tuple(e) for e in client.map(context)]


# -- handshake, reads, block status ------------------------------------------------------

def test_handshake_and_export_flags(engine, start_nbd):
    srv = start_nbd(engine)
    with nbdc.connect_uri(srv.uri("x")) as c:
        info = c.info
        assert (info.size, info.structured_replies, info.tls) == (SIZE, True, False)
        assert info.contexts == {"base:allocation": 0}
        assert (info.read_only, info.can_flush, info.can_fua, info.can_trim, info.can_zero,
                info.can_fast_zero, info.can_df, info.can_cache) == (False,) + (True,) * 7
    with nbdc.connect(srv.socket, "ro") as c:
        assert c.info.read_only and not c.info.can_trim and c.info.can_multi_conn
    lib = {e["export-name"]: e for e in nbdinfo_json(srv.uri(""), "--list")["exports"]}
    assert dict(nbdc.list_exports(srv.uri(""))) == {
        "x": "blockd test export", "ro": "", "null": "", "depth": ""}
    for name, e in lib.items():
        with nbdc.connect(srv.socket, name) as c:
            assert (c.info.read_only, c.info.can_multi_conn, c.info.can_flush, c.info.size) == (
                e["is_read_only"], e["can_multi_conn"], e["can_flush"], e["export-size"]), name
            assert c.info.description == e.get("description")
            assert (c.info.min_block, c.info.preferred_block, c.info.max_block) == (
                e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"])


def test_handshake_refusals(engine, start_nbd):
    srv = start_nbd(engine)
    with pytest.raises(nbdc.NBDOptionError) as info:
        nbdc.connect(srv.socket, "nope")
    exc = info.value
    assert (exc.code, exc.name, exc.errno) == (proto.REP_ERR_UNKNOWN, "NBD_REP_ERR_UNKNOWN",
                                               errno.ENOENT)
    assert exc.server_message == "export 'nope' not present"
    with pytest.raises(nbdc.NBDOptionError, match="NBD_OPT_GO for export 'nope'.*not present"):
        nbdc.connect(srv.socket, "nope", structured_replies=False)
    with pytest.raises(nbdc.NBDTLSError, match="does not support TLS.*NBD_REP_ERR_POLICY"):
        nbdc.connect(srv.socket, "x", tls=nbdc.tls_context(verify_peer=False))
    with pytest.raises(nbdc.NBDError, match="cannot connect"):
        nbdc.connect(srv.socket + ".missing", "x")
    # every refused session ended with NBD_OPT_ABORT: the server logged no failure
    assert "failed" not in srv.stderr()


def test_reads_equal_the_file_and_report_holes(engine, start_nbd):
    srv = start_nbd(engine)
    want = expected_content()
    with nbdc.connect_uri(srv.uri("x")) as c:
        assert c.pread(0, SIZE) == want
        req = c.submit_read(0, SIZE, bytearray(b"\xee" * SIZE))  # holes overwrite the 0xee
        assert req.result(WAIT) == want
        # simple replies: same bytes, no hole information
    with nbdc.connect(srv.socket, "x", structured_replies=False) as c:
        assert not c.info.structured_replies and not c.info.contexts
        req = c.submit_read(3 * MiB, 3 * MiB)
        assert req.result(WAIT) == want[3 * MiB:6 * MiB] and req.holes == []


def test_structured_read_reports_holes(engine, start_nbd, request):
    if engine == "blockd":
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="blockd's NBD server sends the 4 MiB hole of a raw file as "
                                "OFFSET_DATA (qsd 7.2 sends OFFSET_HOLE chunks)"))
    srv = start_nbd(engine)
    with nbdc.connect_uri(srv.uri("x")) as c:
        req = c.submit_read(0, SIZE, bytearray(b"\xee" * SIZE))
        assert req.result(WAIT) == expected_content()
        assert sum(n for _, n in req.holes) == HOLE[1]
        assert all(HOLE[0] <= off and off + n <= sum(HOLE) for off, n in req.holes)


@pytest.mark.parametrize("export, context", [("x", "base:allocation"),
                                             ("null", "base:allocation"),
                                             ("depth", "qemu:allocation-depth")])
def test_block_status_agrees_with_nbdinfo(engine, start_nbd, export, context):
    srv = start_nbd(engine)
    with nbdc.connect(srv.socket, export, meta_contexts=(context,)) as c:
        assert list(c.info.contexts) == [context]
        assert extents(c, context) == nbdinfo_map(srv.uri(export), context)
        one = c.block_status(HOLE[0] + MiB, MiB, req_one=True)[context]
        assert len(one) == 1 and one[0].offset == HOLE[0] + MiB


def test_several_contexts_at_once(engine, start_nbd):
    srv = start_nbd(engine)
    with nbdc.connect(srv.socket, "depth",
                      meta_contexts=("base:allocation", "qemu:allocation-depth")) as c:
        got = c.block_status(0, SIZE)
        assert set(got) == {"base:allocation", "qemu:allocation-depth"}
        assert extents(c) == nbdinfo_map(srv.uri("depth"))
    assert sorted(nbdc.list_meta_contexts(srv.uri("depth"), "depth")) == [
        "base:allocation", "qemu:allocation-depth"]
    assert nbdc.list_meta_contexts(srv.socket, "x", ("base:",)) == ["base:allocation"]


# -- writes ------------------------------------------------------------------------------

def test_writes_zeroes_and_trim_land(engine, start_nbd, tmp_path):
    srv = start_nbd(engine)
    want = bytearray(expected_content())
    rnd = random.Random(5)
    with nbdc.connect_uri(srv.uri("x")) as c:
        blob = rnd.randbytes(100000)
        c.pwrite(12345, blob)
        want[12345:12345 + len(blob)] = blob
        c.pwrite(2 * MiB, b"\x5a" * MiB, fua=True)
        want[2 * MiB:3 * MiB] = b"\x5a" * MiB
        c.zero(10 * MiB, MiB)
        c.zero(11 * MiB, 512, no_hole=True)
        c.zero(12 * MiB, 64 * 1024, fast=True)
        for off, n in ((10 * MiB, MiB), (11 * MiB, 512), (12 * MiB, 65536), (14 * MiB, MiB)):
            want[off:off + n] = bytes(n)
        c.trim(14 * MiB, MiB)  # discard=unmap on raw/file: the range reads back as zeroes
        tail = bytes(want[:MiB])
        c.pwrite(15 * MiB, tail)
        want[15 * MiB:] = tail
        c.flush()
        assert c.pread(0, SIZE) == want
    expect = tmp_path / "expect.raw"
    expect.write_bytes(want)
    qemu_img("compare", "-f", "raw", "-F", "raw", str(expect), srv.uri("x"))


def test_request_errors_carry_the_server_errno(engine, start_nbd):
    srv = start_nbd(engine)
    with nbdc.connect(srv.socket, "x", strict=False) as c:
        with pytest.raises(nbdc.NBDCommandError) as info:
            c.pread(SIZE - 512, 1024)
        assert (info.value.errno, info.value.name) == (errno.EINVAL, "EINVAL")
        with pytest.raises(nbdc.NBDCommandError) as info:
            c.pwrite(SIZE, b"x" * 512)
        # qsd 7.2 answers EINVAL; blockd deliberately follows the NBD spec here
        # (ENOSPC, see the docstring of blockd/nbd/connection.py)
        assert info.value.errno == {"qsd": errno.EINVAL, "blockd": errno.ENOSPC}[engine]
        assert "operation past EOF" in info.value.server_message
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"  # still usable
    with nbdc.connect(srv.socket, "ro", strict=False) as c:
        # qsd 7.2: EINVAL "Export is read-only"; blockd: EPERM, as the spec asks
        read_only = {"qsd": errno.EINVAL, "blockd": errno.EPERM}[engine]
        with pytest.raises(nbdc.NBDCommandError) as info:
            c.pwrite(0, b"x" * 512)
        assert (info.value.errno, info.value.server_message) == (read_only, "Export is read-only")
        with pytest.raises(nbdc.NBDCommandError) as info:
            c.trim(0, 4096)
        assert (info.value.errno, info.value.server_message) == (read_only, "Export is read-only")
    with nbdc.connect(srv.socket, "ro") as c:
        with pytest.raises(nbdc.NBDUsageError, match="read-only"):
            c.pwrite(0, b"x")


# -- concurrency, multi-conn, disconnects --------------------------------------------------

def test_many_requests_in_flight_from_threads(engine, start_nbd):
    srv = start_nbd(engine)
    want = expected_content()
    errors = []
    with nbdc.connect(srv.socket, "x") as c:
        def worker(seed):
            rnd = random.Random(seed)
            try:
                reqs = []
                for _ in range(60):
                    off = rnd.randrange(SIZE - 1)
                    reqs.append(c.submit_read(off, rnd.randint(1, min(SIZE - off, 3 * MiB))))
                off = rnd.randrange(SIZE - 1)
                reqs.append(c.submit_block_status(off, min(MiB, SIZE - off)))
                for r in reqs[:-1]:
                    assert r.result(WAIT) == want[r.offset:r.offset + r.length]
                assert reqs[-1].result(WAIT)["base:allocation"]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert errors == []


def test_connection_pool_uses_multi_conn(engine, start_nbd):
    srv = start_nbd(engine)
    with nbdc.ConnectionPool.from_uri(srv.uri("ro"), connections=3) as pool:
        assert len(pool.clients) == 3
        assert pool.pread(0, SIZE) == expected_content()
    with nbdc.ConnectionPool(lambda: nbdc.connect(srv.socket, "x", block_size=False), 3) as pool:
        # writable raw exports: qsd 7.2's multi-conn=auto advertises it too
        assert len(pool.clients) == (3 if pool.info.can_multi_conn else 1)
        pool.pwrite(MiB, b"\x77" * (3 * MiB))
        pool.flush()
        assert pool.pread(MiB, 3 * MiB) == b"\x77" * (3 * MiB)


def test_server_killed_during_large_reads(engine, start_nbd, request):
    srv = start_nbd(engine)
    request.node._server_may_die = True
    c = nbdc.connect(srv.socket, "x", structured_replies=False)
    buf = bytearray(SIZE)
    reqs = [c.submit_read(0, SIZE, buf) for _ in range(200)]
    if hasattr(srv, "daemon"):
        srv.daemon.expect_exit()
        srv.daemon.kill()
    else:
        srv.proc.kill()
    errs = [r.exception(WAIT) for r in reqs]  # NBDTimeout here would mean a hang
    failed = [e for e in errs if e is not None]
    assert failed and all(isinstance(e, nbdc.NBDDisconnected) for e in failed), failed[:3]
    assert "closed the connection" in str(failed[-1]) or "connection lost" in str(failed[-1])
    with pytest.raises(nbdc.NBDDisconnected):
        c.submit_read(0, 512)
    c.close()


# -- qcow2 ----------------------------------------------------------------------------------

def test_qcow2_export(engine, daemon, tmp_path):
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), str(8 * MiB))
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x22 3M 64k", "write -z 5M 1M",
            "write -P 0x33 8128k 64k", fmt="qcow2")
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={img}",
               "--blockdev", "driver=qcow2,node-name=q,file=f",
               "--export", "type=nbd,id=e,node-name=q,name=q,writable=on", nbd=True)
    want = bytearray(8 * MiB)
    want[0:MiB] = b"\x11" * MiB
    want[3 * MiB:3 * MiB + 65536] = b"\x22" * 65536
    want[8128 * 1024:] = b"\x33" * 65536
    with nbdc.connect_uri(d.nbd_uri("q")) as c:
        assert c.pread(0, 8 * MiB) == want
        assert extents(c) == nbdinfo_map(d.nbd_uri("q"))
        c.pwrite(MiB // 2, b"\x44" * MiB)
        c.zero(0, 65536)
        c.flush()
    want[MiB // 2:MiB // 2 + MiB] = b"\x44" * MiB
    want[:65536] = bytes(65536)
    expect = tmp_path / "expect.raw"
    expect.write_bytes(want)
    qemu_img("compare", "-f", "raw", "-F", "raw", str(expect), d.nbd_uri("q"))


@pytest.mark.qsd
def test_dirty_bitmap_context_qsd(daemon, tmp_path):
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), str(4 * MiB))
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write -P 1 64k 64k", "write -P 2 1M 192k", fmt="qcow2")
    qemu_img("bitmap", "--disable", str(img), "b0")  # qsd: enabled bitmaps need a writable export
    d = daemon("qsd", "--blockdev", f"driver=file,node-name=f,filename={img}",
               "--blockdev", "driver=qcow2,node-name=q,file=f",
               "--export", "type=nbd,id=e,node-name=q,name=q,bitmaps.0=b0", nbd=True)
    ctx = "qemu:dirty-bitmap:b0"
    with nbdc.connect_uri(d.nbd_uri("q"), meta_contexts=(ctx, "base:allocation")) as c:
        assert set(c.info.contexts) == {ctx, "base:allocation"}
        dirty = extents(c, ctx)
        assert dirty == nbdinfo_map(d.nbd_uri("q"), ctx)
        assert [(o, n) for o, n, f in dirty if f & proto.STATE_DIRTY] == [
            (64 * 1024, 64 * 1024), (MiB, 192 * 1024)]


# -- TLS (qsd) -----------------------------------------------------------------------------

def _tls_qsd(daemon, pki, image, verify_peer):
    return daemon(
        "qsd", "--object",
        f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer={verify_peer}",
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--blockdev", "driver=raw,node-name=r,file=f",
        "--nbd-server", "addr.type=unix,addr.path=nbd.sock,tls-creds=tls0",
        "--export", "type=nbd,id=x,node-name=r,name=x,writable=on")


@pytest.mark.qsd
def test_tls_right_and_wrong_ca(daemon, pki, image):
    d = _tls_qsd(daemon, pki, image, "off")
    ctx = nbdc.tls_context(cafile=str(pki / "ca-cert.pem"))
    with nbdc.connect(d.nbd_socket, "x", tls=ctx, tls_hostname="localhost") as c:
        assert c.info.tls and c.info.size == SIZE
        assert c.pread(0, SIZE) == expected_content()
        reqs = [c.submit_read(o, MiB) for o in range(0, SIZE, MiB)]
        c.pwrite(0, b"\x99" * 4096)
        assert b"".join(r.result(WAIT)[:1] for r in reqs[1:]) == expected_content()[MiB::MiB]
        assert c.pread(0, 4096) == b"\x99" * 4096
        assert extents(c) == [(0, HOLE[0], 0), (HOLE[0], HOLE[1], 3),
                              (sum(HOLE), SIZE - sum(HOLE), 0)]
    uri = (d.nbd_uri("x").replace("nbd+unix", "nbds+unix")
           + f"&tls-certificates={pki}&tls-hostname=localhost")
    assert dict(nbdc.list_exports(uri)) == {"x": ""}
    with pytest.raises(nbdc.NBDTLSError, match="certificate was rejected") as info:
        nbdc.connect(d.nbd_socket, "x", tls=nbdc.tls_context(cafile=str(pki / "rogue-cert.pem")),
                     tls_hostname="localhost")
    assert info.value.errno == errno.EPROTO
    with pytest.raises(nbdc.NBDTLSError, match="Hostname mismatch"):
        nbdc.connect(d.nbd_socket, "x", tls=ctx, tls_hostname="example.org")
    with pytest.raises(nbdc.NBDTLSError, match="no host name is known"):
        nbdc.connect(d.nbd_socket, "x", tls=ctx)  # unix socket: nothing to check against
    with nbdc.connect(d.nbd_socket, "x", tls=nbdc.tls_context(str(pki / "ca-cert.pem"),
                                                              check_hostname=False)) as c:
        assert c.info.tls
    with pytest.raises(nbdc.NBDOptionError, match="NBD_REP_ERR_TLS_REQD.*requires TLS"):
        nbdc.connect(d.nbd_socket, "x")


@pytest.mark.qsd
def test_tls_client_certificate(daemon, pki, image):
    d = _tls_qsd(daemon, pki, image, "on")
    ca = str(pki / "ca-cert.pem")
    good = nbdc.tls_context(ca, str(pki / "client-cert.pem"), str(pki / "client-key.pem"))
    with nbdc.connect(d.nbd_socket, "x", tls=good, tls_hostname="localhost") as c:
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"
    # TLS 1.3: the server checks the client certificate after the handshake, then hangs up
    with pytest.raises(nbdc.NBDTLSError, match="rejected the client certificate"):
        nbdc.connect(d.nbd_socket, "x", tls=nbdc.tls_context(ca), tls_hostname="localhost")


@pytest.mark.qsd
def test_tls_over_tcp_uri(daemon, pki, image):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon("qsd", "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=off",
           "--blockdev", f"driver=file,node-name=f,filename={image}",
           "--blockdev", "driver=raw,node-name=r,file=f",
           "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0",
           "--export", "type=nbd,id=x,node-name=r,name=x")
    with nbdc.connect_uri(f"nbds://localhost:{port}/x?tls-certificates={pki}") as c:
        assert c.info.tls and c.pread(HOLE[0] - 4, 8) == expected_content()[HOLE[0] - 4:HOLE[0] + 4]
    with pytest.raises(nbdc.NBDOptionError, match="TLS_REQD"):
        nbdc.connect_uri(f"nbd://127.0.0.1:{port}/x")


@pytest.mark.qsd
def test_tls_many_threads_read_and_write(daemon, pki, image):
    """One TLS stream shared by a reader thread and several writer threads."""
    d = _tls_qsd(daemon, pki, image, "off")
    ctx = nbdc.tls_context(str(pki / "ca-cert.pem"))
    with nbdc.connect(d.nbd_socket, "x", tls=ctx, tls_hostname="localhost") as c:
        assert hammer(c, rounds=8, wait=WAIT) == []
