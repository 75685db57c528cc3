"""The NBD server driven by python3-libnbd (the ``libnbd`` fixture; fails in CI if missing).

libnbd checks most requests client-side; tests of server-side errors turn
strict mode off so the bad request really reaches the server.
"""

from __future__ import annotations

import errno
import threading

import pytest

from helpers import MiB

from .conftest import HOLE, SIZE, expected_content

pytestmark = pytest.mark.blockd


def connect(nbd, server, name="x", contexts=("base:allocation",), strict=True, sr=True):
    h = nbd.NBD()
    for ctx in contexts:
        h.add_meta_context(ctx)
    if not sr:
        h.set_request_structured_replies(False)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(server.uri(name))
    return h


def status_of(h, offset, length, flags=0):
    seen = {}

    def cb(context, off, entries, err):
        seen[context] = (off, list(entries))
        return 0

    h.block_status(length, offset, cb, flags)
    return seen


def test_pread_pwrite_flush(libnbd, blockd_nbd):
    h = connect(libnbd, blockd_nbd)
    assert h.get_size() == SIZE
    assert h.get_structured_replies_negotiated()
    assert h.pread(MiB, 0) == expected_content()[:MiB]
    h.pwrite(b"\x42" * 65536, 4096)
    h.pwrite(b"\x43" * 512, 12 * MiB, libnbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(65536, 4096) == b"\x42" * 65536
    assert h.pread(512, 12 * MiB) == b"\x43" * 512
    h.shutdown()


def test_zero_trim_and_block_status(libnbd, blockd_nbd):
    h = connect(libnbd, blockd_nbd)
    assert h.can_meta_context("base:allocation")
    full = status_of(h, 0, SIZE)["base:allocation"]
    assert full == (0, [HOLE[0], 0, HOLE[1], 3, SIZE - HOLE[0] - HOLE[1], 0])
    one = status_of(h, HOLE[0], HOLE[1] * 2, libnbd.CMD_FLAG_REQ_ONE)["base:allocation"]
    assert one == (HOLE[0], [HOLE[1], 3])
    h.zero(MiB, 0)                                   # may punch a hole (discard=unmap)
    h.zero(MiB, MiB, libnbd.CMD_FLAG_NO_HOLE)        # must stay allocated
    h.zero(MiB, 2 * MiB, libnbd.CMD_FLAG_FAST_ZERO | libnbd.CMD_FLAG_FUA)
    assert h.pread(3 * MiB, 0) == bytes(3 * MiB)
    h.trim(MiB, 8 * MiB)
    h.trim(MiB, 9 * MiB, libnbd.CMD_FLAG_FUA)
    h.cache(4 * MiB, 0)
    # the discard punched holes next to the existing one (discard=unmap)
    assert status_of(h, HOLE[0], 8 * MiB)["base:allocation"][1][:2] == [6 * MiB, 3]
    h.zero(128 * MiB // 8, 0)                        # whole export in one request
    h.shutdown()


def test_structured_read_of_holes(libnbd, blockd_nbd):
    """null-co reads are holes: OFFSET_HOLE chunks; data comes as DATA chunks."""
    h = connect(libnbd, blockd_nbd, "null")
    chunks = []

    def cb(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status))
        return 0

    buf = h.pread_structured(MiB, 5 * MiB, cb)
    assert buf == bytes(MiB)
    assert chunks == [(5 * MiB, MiB, libnbd.READ_HOLE)]
    chunks.clear()
    h.pread_structured(MiB, 0, cb, libnbd.CMD_FLAG_DF)
    assert [c[2] for c in chunks] == [libnbd.READ_HOLE]
    h.shutdown()
    h = connect(libnbd, blockd_nbd, "x")
    chunks.clear()
    assert h.pread_structured(256 * 1024, 0, cb, libnbd.CMD_FLAG_DF) == expected_content()[:262144]
    assert chunks == [(0, 262144, libnbd.READ_DATA)]
    h.shutdown()


def test_allocation_depth(libnbd, blockd_nbd):
    h = connect(libnbd, blockd_nbd, "depth", ("base:allocation", "qemu:allocation-depth"))
    seen = status_of(h, 0, SIZE)
    assert seen["qemu:allocation-depth"] == (0, [SIZE, 1])
    assert seen["base:allocation"][1][:2] == [HOLE[0], 0]
    h.shutdown()


def test_simple_replies(libnbd, blockd_nbd):
    h = connect(libnbd, blockd_nbd, contexts=(), sr=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    assert h.pread(2 * MiB, HOLE[0] - MiB) == expected_content()[HOLE[0] - MiB:HOLE[0] + MiB]
    h.pwrite(b"\x01" * 4096, 0)
    assert h.pread(4096, 0) == b"\x01" * 4096
    hn = connect(libnbd, blockd_nbd, "null", contexts=(), sr=False)
    assert hn.pread(MiB, 0) == bytes(MiB)                 # zeroes sent inline
    hn.shutdown()
    h.shutdown()


@pytest.mark.parametrize("sr", [True, False])
def test_errors(libnbd, blockd_nbd, sr):
    h = connect(libnbd, blockd_nbd, "x", strict=False, sr=sr, contexts=())
    cases = [
        (lambda: h.pread(4096, SIZE), errno.EINVAL),
        (lambda: h.pread(4096, SIZE - 1), errno.EINVAL),
        (lambda: h.pwrite(b"x" * 4096, SIZE - 1), errno.ENOSPC),
        (lambda: h.zero(4096, SIZE), errno.ENOSPC),
        (lambda: h.trim(4096, SIZE), errno.EINVAL),
    ]
    for call, expected in cases:
        with pytest.raises(libnbd.Error) as exc:
            call()
        assert exc.value.errno == errno.errorcode[expected]
    assert h.pread(1, SIZE - 1) == expected_content()[-1:]   # still usable
    ro = connect(libnbd, blockd_nbd, "ro", strict=False, sr=sr, contexts=())
    for call in (lambda: ro.pwrite(b"x" * 512, 0), lambda: ro.zero(512, 0),
                 lambda: ro.trim(512, 0)):
        with pytest.raises(libnbd.Error) as exc:
            call()
        assert exc.value.errno == "EPERM"
    ro.flush()
    ro.shutdown()
    h.shutdown()


def test_multi_conn(libnbd, blockd_nbd):
    """Writes on several connections, a flush on one, reads on another."""
    handles = [connect(libnbd, blockd_nbd) for _ in range(4)]
    assert all(h.can_multi_conn() for h in handles)
    errors = []

    def writer(i, h):
        try:
            for j in range(16):
                h.pwrite(bytes([i + 1]) * 65536, (i * 16 + j) * 65536)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, h)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    handles[0].flush()
    for i in range(4):
        assert handles[3 - i].pread(16 * 65536, i * 16 * 65536) == bytes([i + 1]) * (16 * 65536)
    for h in handles:
        h.shutdown()


def test_many_requests_in_flight(libnbd, blockd_nbd):
    h = connect(libnbd, blockd_nbd)
    bufs = {}
    for i in range(64):
        bufs[i] = libnbd.Buffer(65536)
        h.aio_pread(bufs[i], i * 65536)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    data = b"".join(bufs[i].to_bytearray() for i in range(64))
    assert data == expected_content()[:64 * 65536]
    h.shutdown()
