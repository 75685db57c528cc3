"""Hand-built NBD packets: handshake and transmission edge cases, hostile peers.

``any_nbd`` tests hold for blockd and qemu-storage-daemon alike (where the
spec leaves the answer open, blockd does what qsd does).  ``blockd_nbd``
tests cover the places where blockd follows the spec and qsd 7.2 does not;
the qsd half of those comparisons is asserted too, so the difference is
documented by a test.  After every hostile exchange the server must still
serve a fresh client.
"""

from __future__ import annotations

import socket
import struct

import pytest

from blockd.nbd import proto
from helpers import MiB

from .conftest import SIZE, expected_content
from .rawclient import Closed, RawNBD

pytestmark = pytest.mark.blockd

EINVAL, EPERM, ENOSPC = proto.NBD_EINVAL, proto.NBD_EPERM, proto.NBD_ENOSPC


def still_serves(server) -> None:
    """A fresh client can negotiate and read."""
    with RawNBD.connect(server.socket) as c:
        assert c.read(0, 4096) == expected_content()[:4096]
        c.disc()


def opt_error(rtype: int, data: bytes) -> str:
    assert rtype & proto.REP_FLAG_ERROR, (hex(rtype), data)
    return data.decode()


# -- handshake -------------------------------------------------------------------------------

def test_greeting_and_export_name_zeroes(any_nbd):
    for cflags, tail in ((proto.FLAG_C_FIXED_NEWSTYLE, 124), (3, 0)):
        with RawNBD(any_nbd.socket) as c:
            assert c.start(cflags) == proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
            c.option(proto.OPT_EXPORT_NAME, b"x")
            size, flags = proto.EXPORT_NAME_REPLY.unpack(c.recv(10))
            assert size == SIZE
            assert flags == 0xD6D     # no SEND_DF without structured replies
            assert c.recv(tail) == bytes(tail)
            assert c.read(0, 512) == expected_content()[:512]


def test_unknown_client_flags_drop(any_nbd):
    with RawNBD(any_nbd.socket) as c:
        c.start(0x80 | proto.FLAG_C_FIXED_NEWSTYLE)
        assert c.is_closed()
    still_serves(any_nbd)


def test_unknown_options_then_go(any_nbd):
    with RawNBD(any_nbd.socket) as c:
        c.start()
        (rtype, data), = c.ask(99, b"some payload")
        assert rtype == proto.REP_ERR_UNSUP
        assert opt_error(rtype, data) == "Unsupported option 99 (<unknown>)"
        assert c.ask(proto.OPT_EXTENDED_HEADERS)[0][0] == proto.REP_ERR_UNSUP
        assert c.ask(proto.OPT_PEEK_EXPORT)[0][0] == proto.REP_ERR_UNSUP
        (rtype, data), = c.ask(proto.OPT_STARTTLS)
        assert rtype == proto.REP_ERR_POLICY and data == b"TLS not configured"
        assert c.go("x") == (SIZE, 0xD6D)


def test_list(any_nbd):
    with RawNBD(any_nbd.socket) as c:
        c.start()
        (rtype, data), = c.ask(proto.OPT_LIST, b"junk")
        assert rtype == proto.REP_ERR_INVALID
        assert data == b"option 'list' has unexpected length"
        reps = c.ask(proto.OPT_LIST)
        assert reps[-1] == (proto.REP_ACK, b"")
        servers = {}
        for rtype, data in reps[:-1]:
            assert rtype == proto.REP_SERVER
            (n,) = struct.unpack(">I", data[:4])
            servers[data[4:4 + n].decode()] = data[4 + n:].decode()
        assert servers == {"x": "blockd test export", "ro": "", "null": "", "depth": ""}
        c.option(proto.OPT_ABORT)
        assert c.reply()[1] == proto.REP_ACK
        assert c.is_closed()


def test_info_and_go_replies(any_nbd):
    with RawNBD(any_nbd.socket) as c:
        c.start()
        reps = c.ask(proto.OPT_INFO, proto.pack_info_request(
            "x", (proto.INFO_NAME, proto.INFO_DESCRIPTION, proto.INFO_BLOCK_SIZE)))
        assert reps == [
            (proto.REP_INFO, struct.pack(">H", proto.INFO_NAME) + b"x"),
            (proto.REP_INFO, struct.pack(">H", proto.INFO_DESCRIPTION) + b"blockd test export"),
            (proto.REP_INFO, struct.pack(">HIII", proto.INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)),
            (proto.REP_INFO, struct.pack(">HQH", proto.INFO_EXPORT, SIZE, 0xD6D)),
            (proto.REP_ACK, b""),
        ]
        (rtype, data), = c.ask(proto.OPT_GO, proto.pack_info_request("nope"))
        assert rtype == proto.REP_ERR_UNKNOWN and data == b"export 'nope' not present"
        # truncated: the name length claims more than the option holds
        (rtype, data), = c.ask(proto.OPT_INFO, struct.pack(">I", 10) + b"xy")
        assert rtype == proto.REP_ERR_INVALID and data == b"Inconsistent lengths in option info"
        # trailing garbage after the info requests
        (rtype, data), = c.ask(proto.OPT_GO, proto.pack_info_request("x") + b"zz")
        assert rtype == proto.REP_ERR_INVALID and data == b"option 'go' has unexpected length"
        (rtype, data), = c.ask(proto.OPT_GO, struct.pack(">I", 3) + b"x\0y" + b"\0\0")
        assert rtype == proto.REP_ERR_INVALID and data == b"Unexpected embedded NUL in option go"
        reps = c.ask(proto.OPT_GO, proto.pack_info_request("ro"))
        assert reps[-2] == (proto.REP_INFO, struct.pack(">HQH", proto.INFO_EXPORT, SIZE, 0x50F))
        assert reps[-1] == (proto.REP_ACK, b"")
        assert c.read(4 * MiB, 512) == bytes(512)


def test_structured_reply_and_meta_contexts(any_nbd):
    with RawNBD(any_nbd.socket) as c:
        c.start()
        (rtype, data), = c.set_meta("x")
        assert rtype == proto.REP_ERR_INVALID
        assert data == b"request option 'set meta context' when structured reply is not negotiated"
        # LIST works without SR; an empty query list means everything
        reps = c.ask(proto.OPT_LIST_META_CONTEXT, proto.pack_meta_request("depth"))
        assert reps == [(proto.REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
                        (proto.REP_META_CONTEXT, b"\0\0\0\0qemu:allocation-depth"),
                        (proto.REP_ACK, b"")]
        reps = c.ask(proto.OPT_LIST_META_CONTEXT,
                     proto.pack_meta_request("depth", ("qemu:", "nope:x", "base:")))
        assert [r[1][4:] for r in reps[:-1]] == [b"base:allocation", b"qemu:allocation-depth"]
        reps = c.ask(proto.OPT_LIST_META_CONTEXT,
                     proto.pack_meta_request("x", ("qemu:allocation-depth", "base:allocation")))
        assert [r[1][4:] for r in reps[:-1]] == [b"base:allocation"]
        assert c.structured_reply() == [(proto.REP_ACK, b"")]
        (rtype, data), = c.structured_reply()
        assert rtype == proto.REP_ERR_INVALID and data == b"structured reply already negotiated"
        (rtype, data), = c.set_meta("nope")
        assert rtype == proto.REP_ERR_UNKNOWN and data == b"export 'nope' not present"
        # SET ignores wildcards; ids are QEMU's (0 base, 1 depth)
        assert c.set_meta("depth", ("base:", "qemu:")) == [(proto.REP_ACK, b"")]
        assert c.set_meta("depth", ("qemu:allocation-depth", "base:allocation",
                                    "base:allocation")) == [
            (proto.REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
            (proto.REP_META_CONTEXT, b"\0\0\0\1qemu:allocation-depth"),
            (proto.REP_ACK, b"")]
        size, flags = c.go("depth")
        assert flags == 0x58F    # read-only, with SEND_DF
        c.request(proto.CMD_BLOCK_STATUS, 0, SIZE)
        kind, chunks = c.any_reply()
        assert [(ch[0], ch[1], ch[3][:4]) for ch in chunks] == [
            (0, proto.REPLY_TYPE_BLOCK_STATUS, b"\0\0\0\0"),
            (1, proto.REPLY_TYPE_BLOCK_STATUS, b"\0\0\0\1")]
        assert chunks[1][3][4:] == struct.pack(">II", SIZE, 1)


def test_meta_selection_is_per_export(any_nbd):
    """A SET_META_CONTEXT for another export than the one chosen by GO selects nothing."""
    with RawNBD(any_nbd.socket) as c:
        c.start()
        c.structured_reply()
        assert len(c.set_meta("ro")) == 2
        c.go("x")
        c.request(proto.CMD_BLOCK_STATUS, 0, 4096)
        assert c.error_message() == (EINVAL, "CMD_BLOCK_STATUS not negotiated")


def test_bad_option_magic_and_oversized_option(any_nbd):
    with RawNBD(any_nbd.socket) as c:
        c.start()
        c.send(struct.pack(">QII", 0x1234, proto.OPT_GO, 0))
        assert c.is_closed()
    with RawNBD(any_nbd.socket) as c:
        c.start()
        c.send(struct.pack(">QII", proto.IHAVEOPT, proto.OPT_GO, 32 * MiB + 1))
        assert c.is_closed()
    with RawNBD(any_nbd.socket) as c:
        c.start()
        c.option(proto.OPT_EXPORT_NAME, b"nope")
        assert c.is_closed()
    still_serves(any_nbd)


def test_non_fixed_newstyle_client(any_nbd):
    with RawNBD(any_nbd.socket) as c:
        c.start(0)
        c.option(proto.OPT_LIST)
        assert c.is_closed()
    with RawNBD(any_nbd.socket) as c:
        c.start(0)
        c.option(proto.OPT_EXPORT_NAME, b"ro")
        assert proto.EXPORT_NAME_REPLY.unpack(c.recv(10)) == (SIZE, 0x50F)
        c.recv(124)


def test_option_count_limit(blockd_nbd):
    with RawNBD(blockd_nbd.socket) as c:
        c.start()
        c.send(proto.pack_option(99) * 5000)
        replies = 0
        with pytest.raises(Closed):
            while True:
                c.reply()
                replies += 1
        assert replies == 4096
    still_serves(blockd_nbd)


# -- transmission ----------------------------------------------------------------------------

@pytest.mark.parametrize("sr", [True, False])
def test_bounds(any_nbd, sr):
    with RawNBD.connect(any_nbd.socket, sr=sr) as c:
        for cmd, offset, length in ((proto.CMD_READ, SIZE, 1), (proto.CMD_READ, SIZE - 1, 2),
                                    (proto.CMD_READ, 2 ** 64 - 1, 2),
                                    (proto.CMD_TRIM, SIZE - 512, 1024),
                                    (proto.CMD_CACHE, SIZE, 512),
                                    (proto.CMD_BLOCK_STATUS, 2 ** 64 - 512, 1024)):
            c.request(cmd, offset, length)
            assert c.error_of() == EINVAL, (cmd, offset, length)
        if sr:
            c.request(proto.CMD_READ, SIZE, 4096)
            assert c.error_message() == (
                EINVAL, "operation past EOF; From: %d, Len: 4096, Size: %d" % (SIZE, SIZE))
        assert c.read(SIZE - 512, 512) == expected_content()[-512:]
    still_serves(any_nbd)


@pytest.mark.parametrize("sr", [True, False])
def test_writes_past_eof_are_enospc(blockd_nbd, sr):
    """Spec: ENOSPC (qsd 7.2 answers EINVAL).  The payload is consumed."""
    with RawNBD.connect(blockd_nbd.socket, sr=sr) as c:
        c.request(proto.CMD_WRITE, SIZE - 512, 1024, payload=b"\xee" * 1024)
        assert c.error_of() == ENOSPC
        c.request(proto.CMD_WRITE, 2 ** 64 - 512, 1024, payload=b"\xee" * 1024)
        assert c.error_of() == ENOSPC
        c.request(proto.CMD_WRITE_ZEROES, SIZE, 512)
        assert c.error_of() == ENOSPC
        assert c.read(SIZE - 512, 512) == expected_content()[-512:]


@pytest.mark.parametrize("sr", [True, False])
def test_read_only_export_is_eperm(blockd_nbd, qsd_nbd, sr):
    """Spec: EPERM for write, trim and write-zeroes on a read-only export (qsd: EINVAL)."""
    for server, expected in ((blockd_nbd, EPERM), (qsd_nbd, EINVAL)):
        with RawNBD.connect(server.socket, "ro", sr=sr) as c:
            c.request(proto.CMD_WRITE, 0, 4096, payload=b"\x99" * 4096)
            assert c.error_of() == expected
            c.request(proto.CMD_WRITE, 0, 4096, flags=proto.CMD_FLAG_FUA, payload=b"\x99" * 4096)
            assert c.error_of() == expected
            c.request(proto.CMD_TRIM, 0, 4096)
            assert c.error_of() == expected
            c.request(proto.CMD_WRITE_ZEROES, 0, 4096, flags=proto.CMD_FLAG_FAST_ZERO)
            assert c.error_of() == expected
            if sr and server is blockd_nbd:
                c.request(proto.CMD_WRITE, 0, 16)
                c.send(bytes(16))
                assert c.error_message() == (EPERM, "Export is read-only")
            c.request(proto.CMD_FLUSH)
            assert c.error_of() == 0
            assert c.read(0, 4096) == expected_content()[:4096]


def test_flush_with_offset_is_einval(blockd_nbd, qsd_nbd):
    for server, expected in ((blockd_nbd, EINVAL), (qsd_nbd, 0)):
        with RawNBD.connect(server.socket) as c:
            c.request(proto.CMD_FLUSH, 1, 1)
            assert c.error_of() == expected
            c.request(proto.CMD_FLUSH)
            assert c.error_of() == 0


@pytest.mark.parametrize("sr", [True, False])
def test_bad_commands_and_flags(any_nbd, sr):
    with RawNBD.connect(any_nbd.socket, sr=sr, meta=()) as c:
        c.request(99, 0, 512)
        assert c.error_of() == EINVAL
        c.request(proto.CMD_READ, 0, 512, flags=0x100)
        assert c.error_of() == EINVAL
        c.request(proto.CMD_READ, 0, 512, flags=proto.CMD_FLAG_NO_HOLE)
        assert c.error_of() == EINVAL
        c.request(proto.CMD_WRITE, 0, 512, flags=proto.CMD_FLAG_REQ_ONE, payload=b"\x66" * 512)
        assert c.error_of() == EINVAL
        if not sr:  # DF needs structured replies
            c.request(proto.CMD_READ, 0, 512, flags=proto.CMD_FLAG_DF)
            assert c.error_of() == EINVAL
        c.request(proto.CMD_BLOCK_STATUS, 0, 512)   # no context selected (or no SR)
        assert c.error_of() == EINVAL
        c.request(proto.CMD_READ, 0, 512, flags=proto.CMD_FLAG_FUA)   # FUA on READ: accepted
        assert c.error_of(512) == 0
        assert c.read(0, 512) == expected_content()[:512]   # the rejected write left no trace
        if sr:
            c.request(99, 0, 512)
            assert c.error_message() == (EINVAL, "invalid request type (99) received")
            c.request(proto.CMD_READ, 0, 512, flags=0x100)
            assert c.error_message() == (EINVAL, "unsupported flags for command read (got 0x100)")
    still_serves(any_nbd)


def test_zero_length_requests(any_nbd):
    with RawNBD.connect(any_nbd.socket) as c:
        c.request(proto.CMD_READ, 0, 0)
        assert c.any_reply()[1] == [(proto.REPLY_FLAG_DONE, proto.REPLY_TYPE_NONE, c.cookie, b"")]
        for cmd in (proto.CMD_WRITE, proto.CMD_TRIM, proto.CMD_WRITE_ZEROES, proto.CMD_CACHE):
            c.request(cmd, 4096, 0)
            assert c.error_of() == 0, cmd
        c.request(proto.CMD_BLOCK_STATUS, 0, 0)
        assert c.error_message() == (EINVAL, "need non-zero length")
    with RawNBD.connect(any_nbd.socket, sr=False) as c:
        c.request(proto.CMD_READ, 0, 0)
        assert c.any_reply() == ("simple", 0, c.cookie, b"")


def test_oversized_requests(any_nbd):
    with RawNBD.connect(any_nbd.socket, "null") as c:
        c.request(proto.CMD_READ, 0, 32 * MiB + 1)
        assert c.error_of() == EINVAL              # refused, connection kept
        # payload-less requests over 32 MiB are accepted
        c.request(proto.CMD_WRITE_ZEROES, 0, 64 * MiB)
        assert c.error_of() == 0
        c.request(proto.CMD_TRIM, 0, 64 * MiB)
        assert c.error_of() == 0
        c.request(proto.CMD_BLOCK_STATUS, 0, 64 * MiB)
        (_, chunks) = c.any_reply()
        assert chunks[0][3] == struct.pack(">III", 0, 64 * MiB, 3)
        assert c.read(0, 32 * MiB) == bytes(32 * MiB)
        # a WRITE over 32 MiB: error, then the connection is dropped
        c.request(proto.CMD_WRITE, 0, 32 * MiB + 512)
        try:
            c.send(bytes(MiB))
        except OSError:
            pass
        assert c.is_closed()
    still_serves(any_nbd)


def test_large_write_zeroes_on_file(blockd_nbd):
    with RawNBD.connect(blockd_nbd.socket) as c:
        c.request(proto.CMD_WRITE_ZEROES, 0, SIZE, flags=proto.CMD_FLAG_NO_HOLE | proto.CMD_FLAG_FUA)
        assert c.error_of() == 0
        assert c.read(0, MiB) == bytes(MiB)


def test_bad_request_magic_drops(blockd_nbd, qsd_nbd):
    for server in (blockd_nbd, qsd_nbd):
        with RawNBD.connect(server.socket) as c:
            c.request(proto.CMD_READ, 0, 512, magic=0x25609514)
            if server is blockd_nbd:     # hard disconnect, no reply
                assert c.is_closed() and c.sock.recv(1) == b""
            else:                        # qsd sends an error first, then closes
                assert c.error_of() == EINVAL
                assert c.is_closed()
        still_serves(server)


def test_pipelined_requests_and_cookies(any_nbd):
    """Many requests sent at once; replies may come in any order (qsd reorders)."""
    with RawNBD.connect(any_nbd.socket) as c:
        data = expected_content()
        batch = b""
        for i in range(32):
            batch += proto.pack_request(proto.CMD_READ, 1000 + i, i * 4096, 4096)
        batch += proto.pack_request(proto.CMD_WRITE, 2000, 8 * MiB, 4096) + b"\x12" * 4096
        batch += proto.pack_request(proto.CMD_FLUSH, 2001, 0, 0)
        c.send(batch)
        seen = {}
        for _ in range(34):
            rep = c.any_reply()
            if rep[0] == "simple":
                seen[rep[2]] = rep[1]
            else:
                (flags, ctype, cookie, payload), = rep[1]
                assert ctype == proto.REPLY_TYPE_OFFSET_DATA
                i = cookie - 1000
                assert payload == struct.pack(">Q", i * 4096) + data[i * 4096:(i + 1) * 4096]
                seen[cookie] = 0
        assert sorted(seen) == list(range(1000, 1032)) + [2000, 2001]
        assert c.read(8 * MiB, 4096) == b"\x12" * 4096
        c.disc()
        assert c.is_closed()


def test_df_read_is_one_chunk(any_nbd):
    with RawNBD.connect(any_nbd.socket) as c:
        c.request(proto.CMD_READ, 3 * MiB, 2 * MiB, flags=proto.CMD_FLAG_DF)
        (_, chunks) = c.any_reply()
        assert len(chunks) == 1 and chunks[0][1] == proto.REPLY_TYPE_OFFSET_DATA
        assert chunks[0][3][8:] == expected_content()[3 * MiB:5 * MiB]


def test_hole_reads_on_null(any_nbd):
    with RawNBD.connect(any_nbd.socket, "null") as c:
        c.request(proto.CMD_READ, 4096, 65536)
        (_, chunks) = c.any_reply()
        assert chunks == [(proto.REPLY_FLAG_DONE, proto.REPLY_TYPE_OFFSET_HOLE, c.cookie,
                           struct.pack(">QI", 4096, 65536))]


@pytest.mark.parametrize("kind", ["blockd", "qsd"])
def test_max_connections_one_withholds_multi_conn_and_queues(start_nbd, kind):
    """qemu 7.2 stops accepting at the limit: the next client waits in the backlog."""
    server = start_nbd(kind, max_connections=1)
    first = RawNBD.connect(server.socket)
    assert not first.flags & proto.FLAG_CAN_MULTI_CONN
    second = RawNBD(server.socket)
    second.sock.settimeout(0.5)
    with pytest.raises(OSError):           # no greeting while the first is connected
        second.sock.recv(1, socket.MSG_PEEK)
    first.disc()
    first.close()
    second.sock.settimeout(10)
    second.start()
    assert second.go("x")[0] == SIZE
    second.close()
