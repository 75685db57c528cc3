"""The NBD client against a scripted, hostile fake server, and URI parsing.

The fake server is a thread on one end of a socketpair; the client gets the
other end as a "connected socket given by the caller".  Every broken reply
must make the client raise (never hang, never allocate what a length claims).
"""

from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest

from blockd.nbd import client as nbdc
from blockd.nbd import proto

WAIT = 10.0  # generous bound: a hang fails the test instead of blocking it


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def reply(s, option, rep, data=b""):
    s.sendall(proto.pack_option_reply(option, rep, data))


def handshake(s, size=1 << 20, flags=proto.FLAG_HAS_FLAGS | proto.FLAG_SEND_FLUSH,
              contexts=(("base:allocation", 7),), block_size=None):
    """A correct server side of the handshake."""
    s.sendall(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT,
                                  proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES))
    recv_exact(s, 4)
    while True:
        _, opt, length = proto.OPTION.unpack(recv_exact(s, 16))
        recv_exact(s, length)
        if opt == proto.OPT_STRUCTURED_REPLY:
            reply(s, opt, proto.REP_ACK)
        elif opt == proto.OPT_SET_META_CONTEXT:
            for name, cid in contexts:
                reply(s, opt, proto.REP_META_CONTEXT, proto.U32.pack(cid) + name.encode())
            reply(s, opt, proto.REP_ACK)
        elif opt == proto.OPT_GO:
            reply(s, opt, proto.REP_INFO,
                  proto.INFO_EXPORT_PAYLOAD.pack(proto.INFO_EXPORT, size, flags))
            if block_size:
                reply(s, opt, proto.REP_INFO,
                      proto.INFO_BLOCK_SIZE_PAYLOAD.pack(proto.INFO_BLOCK_SIZE, *block_size))
            reply(s, opt, proto.REP_ACK)
            return
        else:
            reply(s, opt, proto.REP_ERR_UNSUP)


def request(s):
    """(flags, cmd, cookie, offset, length) of the next request."""
    _, flags, cmd, cookie, offset, length = proto.REQUEST.unpack(recv_exact(s, 28))
    if cmd == proto.CMD_WRITE:
        recv_exact(s, length)
    return flags, cmd, cookie, offset, length


def chunk(cookie, rtype, payload, flags=proto.REPLY_FLAG_DONE, length=None):
    return proto.CHUNK.pack(proto.STRUCTURED_REPLY_MAGIC, flags, rtype, cookie,
                            len(payload) if length is None else length) + payload


def hold(s):
    """Keep the connection open until the client closes it."""
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass


class Fake:
    """Run ``script(sock)`` in a thread on the server end of a socketpair."""

    def __init__(self, script):
        self.client_sock, self.server_sock = socket.socketpair()
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script):
        try:
            script(self.server_sock)
        except (EOFError, OSError) as exc:  # the client hung up: fine
            self.error = exc
        finally:  # the server hangs up when its script ends (as after NBD_CMD_DISC)
            try:
                self.server_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.server_sock.close()
        self.client_sock.close()
        self.thread.join(WAIT)


@pytest.fixture
def fake():
    made = []

    def start(script):
        f = Fake(script)
        made.append(f)
        return f

    yield start
    for f in made:
        f.close()


def connect(f, **kw):
    kw.setdefault("handshake_timeout", WAIT)
    return nbdc.connect(f.client_sock, "x", **kw)


# -- handshake ------------------------------------------------------------------------

def test_garbage_greeting(fake):
    f = fake(lambda s: s.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    with pytest.raises(nbdc.NBDProtocolError, match="not an NBD server"):
        connect(f)


def test_oldstyle_server(fake):
    greeting = struct.pack(">QQ", proto.NBDMAGIC, proto.CLISERV_MAGIC) + bytes(136)
    f = fake(lambda s: s.sendall(greeting))
    with pytest.raises(nbdc.NBDProtocolError, match="oldstyle"):
        connect(f)


def test_oversized_option_reply_is_refused_before_reading(fake):
    def script(s):
        s.sendall(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE))
        recv_exact(s, 4 + 16)
        s.sendall(proto.OPTION_REPLY.pack(proto.REP_MAGIC, proto.OPT_STRUCTURED_REPLY,
                                          proto.REP_ACK, 0xFFFFFFFF))
        hold(s)
    f = fake(script)
    with pytest.raises(nbdc.NBDProtocolError, match="too long"):
        connect(f)


def test_reply_to_the_wrong_option(fake):
    def script(s):
        s.sendall(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE))
        recv_exact(s, 4 + 16)
        reply(s, proto.OPT_GO, proto.REP_ACK)
        hold(s)
    f = fake(script)
    with pytest.raises(nbdc.NBDProtocolError, match="while option 8"):
        connect(f)


def test_endless_export_list(fake):
    def script(s):
        s.sendall(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE))
        recv_exact(s, 4 + 16)
        entry = proto.pack_option_reply(proto.OPT_LIST, proto.REP_SERVER, proto.U32.pack(1) + b"e")
        while True:
            s.sendall(entry * 1000)
    f = fake(script)
    with pytest.raises(nbdc.NBDProtocolError, match="more than 65536 replies"):
        nbdc.list_exports(f.client_sock, timeout=WAIT)


def test_silent_server_times_out(fake):
    f = fake(hold)
    with pytest.raises(nbdc.NBDTimeout) as info:
        connect(f, handshake_timeout=0.5)
    assert info.value.errno == errno.ETIMEDOUT


def test_server_hangs_up_during_handshake(fake):
    def script(s):
        s.sendall(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE))
        recv_exact(s, 4)
        s.close()
    f = fake(script)
    with pytest.raises(nbdc.NBDDisconnected, match="closed the connection|connection lost"):
        connect(f)


def test_go_ack_without_export_info(fake):
    def script(s):
        s.sendall(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE))
        recv_exact(s, 4)
        _, opt, length = proto.OPTION.unpack(recv_exact(s, 16))
        recv_exact(s, length)
        reply(s, opt, proto.REP_ACK)
        hold(s)
    f = fake(script)
    with pytest.raises(nbdc.NBDProtocolError, match="without NBD_INFO_EXPORT"):
        connect(f, structured_replies=False)


def test_refusal_carries_code_name_and_message(fake):
    def script(s):
        s.sendall(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE))
        recv_exact(s, 4)
        _, opt, length = proto.OPTION.unpack(recv_exact(s, 16))
        recv_exact(s, length)
        reply(s, opt, proto.REP_ERR_POLICY, b"go away")
        hold(s)
    f = fake(script)
    with pytest.raises(nbdc.NBDOptionError) as info:
        connect(f, structured_replies=False)
    exc = info.value
    assert (exc.code, exc.name, exc.server_message, exc.errno) == (
        proto.REP_ERR_POLICY, "NBD_REP_ERR_POLICY", "go away", errno.EPERM)
    assert "NBD_OPT_GO" in str(exc) and "go away" in str(exc)


# -- transmission -----------------------------------------------------------------------

def serve(fake, answer, **kw):
    """Handshake, then ``answer(sock, request_tuple)`` for every request."""
    def script(s):
        handshake(s, **kw)
        while True:
            req = request(s)
            if req[1] == proto.CMD_DISC:
                return
            answer(s, req)
    return connect(fake(script))


def read_fails(client, exc_type, match, offset=0, length=4096):
    req = client.submit_read(offset, length)
    with pytest.raises(exc_type, match=match):
        req.result(WAIT)
    return req


def test_structured_read_data_and_hole(fake):
    def answer(s, req):
        _, _, cookie, off, n = req
        data = struct.pack(">Q", off) + b"\x11" * 512
        hole = struct.pack(">QI", off + 512, n - 512)
        s.sendall(chunk(cookie, proto.REPLY_TYPE_OFFSET_DATA, data, flags=0)
                  + chunk(cookie, proto.REPLY_TYPE_OFFSET_HOLE, hole))
    c = serve(fake, answer)
    req = c.submit_read(8192, 4096, bytearray(b"\xff" * 4096))
    assert bytes(req.result(WAIT)) == b"\x11" * 512 + bytes(3584)
    assert req.holes == [(8192 + 512, 3584)]
    c.close()


class Channel:
    """A socket-like object with only recv/sendall/close (like an SSH channel)."""

    def __init__(self, sock):
        self.sock = sock

    def recv(self, n):
        return self.sock.recv(min(n, 1000))  # short reads on purpose

    def sendall(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()


def test_recv_only_channel(fake):
    def script(s):
        handshake(s)
        while True:
            _, cmd, cookie, off, n = request(s)
            if cmd == proto.CMD_DISC:
                return
            s.sendall(proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, 0, cookie)
                      + bytes(i & 0xFF for i in range(off, off + n)))
    f = fake(script)
    c = nbdc.NBDClient(Channel(f.client_sock), "x", handshake_timeout=WAIT)
    reqs = [c.submit_read(off, 5000) for off in range(0, 50000, 5000)]
    for r in reqs:
        assert r.result(WAIT) == bytes(i & 0xFF for i in range(r.offset, r.offset + 5000))
    c.close()


def test_unknown_cookie_kills_the_connection(fake):
    c = serve(fake, lambda s, req: s.sendall(proto.SIMPLE_REPLY.pack(
        proto.SIMPLE_REPLY_MAGIC, 0, req[2] + 1000)))
    read_fails(c, nbdc.NBDProtocolError, "unknown cookie")
    with pytest.raises(nbdc.NBDProtocolError):
        c.submit_read(0, 512)
    assert c.closed


def test_bad_reply_magic(fake):
    c = serve(fake, lambda s, req: s.sendall(b"\xde\xad\xbe\xef" * 8))
    read_fails(c, nbdc.NBDProtocolError, "invalid reply magic 0xdeadbeef")


def test_oversized_data_chunk(fake):
    c = serve(fake, lambda s, req: s.sendall(chunk(req[2], proto.REPLY_TYPE_OFFSET_DATA,
                                                   struct.pack(">Q", req[3]), length=0xFFFFFFF0)))
    read_fails(c, nbdc.NBDProtocolError, "outside the request")


def test_oversized_block_status_chunk(fake):
    c = serve(fake, lambda s, req: s.sendall(chunk(req[2], proto.REPLY_TYPE_BLOCK_STATUS, b"",
                                                   length=0xFFFFFFFF)))
    req = c.submit_block_status(0, 4096)
    with pytest.raises(nbdc.NBDProtocolError, match="too long"):
        req.result(WAIT)


def test_block_status_for_unknown_context(fake):
    c = serve(fake, lambda s, req: s.sendall(chunk(req[2], proto.REPLY_TYPE_BLOCK_STATUS,
                                                   struct.pack(">III", 99, 4096, 0))))
    with pytest.raises(nbdc.NBDProtocolError, match="context id 99"):
        c.block_status(0, 4096, timeout=WAIT)


def test_block_status_extents(fake):
    def answer(s, req):
        s.sendall(chunk(req[2], proto.REPLY_TYPE_BLOCK_STATUS,
                        struct.pack(">IIIII", 7, 1024, 0, 3072, 3)))
    c = serve(fake, answer)
    assert c.block_status(4096, 4096, timeout=WAIT) == {
        "base:allocation": [nbdc.Extent(4096, 1024, 0), nbdc.Extent(5120, 3072, 3)]}
    c.close()


def test_hole_outside_the_request(fake):
    c = serve(fake, lambda s, req: s.sendall(chunk(req[2], proto.REPLY_TYPE_OFFSET_HOLE,
                                                   struct.pack(">QI", 1 << 40, 4096))))
    read_fails(c, nbdc.NBDProtocolError, "outside the request")


def test_server_closes_mid_payload(fake):
    def answer(s, req):
        s.sendall(chunk(req[2], proto.REPLY_TYPE_OFFSET_DATA,
                        struct.pack(">Q", req[3]) + b"x" * 100, length=8 + req[4]))
        s.shutdown(socket.SHUT_RDWR)
    c = serve(fake, answer)
    read_fails(c, nbdc.NBDDisconnected, "closed the connection")


def test_short_read_fails_the_request_only(fake):
    def answer(s, req):
        _, cmd, cookie, off, n = req
        if cmd == proto.CMD_FLUSH:
            s.sendall(proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, 0, cookie))
        else:
            s.sendall(chunk(cookie, proto.REPLY_TYPE_OFFSET_DATA,
                            struct.pack(">Q", off) + b"a" * (n // 2)))
    c = serve(fake, answer)
    read_fails(c, nbdc.NBDProtocolError, "2048 of 4096 bytes")
    c.flush(timeout=WAIT)  # the connection survives
    c.close()


def test_error_chunk_and_simple_error(fake):
    def answer(s, req):
        _, cmd, cookie, off, _ = req
        if cmd == proto.CMD_READ:
            msg = b"disk on fire"
            s.sendall(chunk(cookie, proto.REPLY_TYPE_ERROR_OFFSET,
                            struct.pack(">IH", proto.NBD_EIO, len(msg)) + msg
                            + struct.pack(">Q", off + 512)))
        else:
            s.sendall(proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, proto.NBD_ENOSPC, cookie))
    c = serve(fake, answer)
    req = read_fails(c, nbdc.NBDCommandError, "EIO.*at offset 4608: disk on fire", offset=4096)
    exc = req.exception()
    assert (exc.errno, exc.name, exc.offset, exc.server_message) == (
        errno.EIO, "EIO", 4608, "disk on fire")
    with pytest.raises(nbdc.NBDCommandError) as info:
        c.flush(timeout=WAIT)
    assert info.value.errno == errno.ENOSPC
    c.close()


def test_no_reply_times_out(fake):
    c = serve(fake, lambda s, req: None)
    req = c.submit_read(0, 512)
    with pytest.raises(nbdc.NBDTimeout):
        req.result(0.3)
    c.close(timeout=0.1)
    with pytest.raises(nbdc.NBDDisconnected):
        req.result(WAIT)


def test_strict_checks_refuse_before_sending(fake):
    c = serve(fake, lambda s, req: None, size=8192,
              flags=proto.FLAG_HAS_FLAGS | proto.FLAG_READ_ONLY)
    cases = [(lambda: c.submit_write(0, b"x"), errno.EPERM),
             (lambda: c.submit_read(8000, 512), errno.EINVAL),
             (lambda: c.submit_trim(0, 512), errno.EPERM),
             (lambda: c.submit_flush(), errno.ENOTSUP),
             (lambda: c.submit_read(0, 0), errno.EINVAL)]
    for call, err in cases:
        with pytest.raises(nbdc.NBDUsageError) as info:
            call()
        assert info.value.errno == err
    c.close(timeout=0.1)


def test_block_size_constraints(fake):
    c = serve(fake, lambda s, req: s.sendall(proto.SIMPLE_REPLY.pack(
        proto.SIMPLE_REPLY_MAGIC, 0, req[2]) + b"z" * req[4]), block_size=(512, 4096, 65536))
    assert (c.info.min_block, c.info.preferred_block, c.info.max_block, c.max_request) == (
        512, 4096, 65536, 65536)
    with pytest.raises(nbdc.NBDUsageError, match="minimum block size 512"):
        c.submit_read(100, 512)
    with pytest.raises(nbdc.NBDUsageError, match="maximum block size 65536"):
        c.submit_read(0, 131072)
    assert c.pread(0, 200 * 1024, timeout=WAIT) == b"z" * (200 * 1024)  # split in 4 requests
    c.close()


def test_invalid_block_size_info(fake):
    def script(s):
        handshake(s, block_size=(3, 4096, 65536))
        hold(s)
    with pytest.raises(nbdc.NBDProtocolError, match="invalid block sizes"):
        connect(fake(script))


# -- URIs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, expect", [
    ("nbd://example.com/disk", dict(tls=False, transport="tcp", host="example.com", port=10809,
                                    export="disk")),
    ("nbd://example.com:1234", dict(host="example.com", port=1234, export="")),
    ("nbd://[::1]:10810/", dict(host="::1", port=10810, export="")),
    ("nbds://h//abs%20name", dict(tls=True, export="/abs name")),
    ("nbd+unix:///ex?socket=/tmp/s.sock",
     dict(transport="unix", socket="/tmp/s.sock", export="ex")),
    ("nbds+unix://?socket=/s&tls-certificates=/etc/pki&tls-verify-peer=false&tls-hostname=srv",
     dict(tls=True, transport="unix", socket="/s", export="", tls_certificates="/etc/pki",
          tls_verify_peer=False, tls_hostname="srv")),
])
def test_parse_uri(uri, expect):
    parsed = nbdc.parse_uri(uri)
    assert {k: getattr(parsed, k) for k in expect} == expect


@pytest.mark.parametrize("uri, match", [
    ("http://x/y", "unknown scheme"),
    ("nbd+unix:///x", "socket=PATH"),
    ("nbd+unix://host/x?socket=/s", "no host"),
    ("nbd://h:99999/x", "bad port"),
    ("nbd+vsock://2:10809/x", "VSOCK"),
    ("nbds://h/x?tls-psk-file=/k", "PSK"),
    ("nbd://h/x?socket=/s", "only valid"),
])
def test_parse_uri_errors(uri, match):
    with pytest.raises(nbdc.URIError, match=match):
        nbdc.parse_uri(uri)
