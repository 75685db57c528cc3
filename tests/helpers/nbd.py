"""NBD helpers for tests: URIs, a clean readiness probe, libnbd tool wrappers."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from urllib.parse import quote

from .policy import require_tool
from .tools import run

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_OPT_ABORT = 2


def nbd_uri(sock: str | Path, name: str = "") -> str:
    """``nbd+unix:///NAME?socket=SOCK`` as qemu and libnbd tools accept it."""
    return f"nbd+unix:///{quote(name, safe='')}?socket={quote(str(sock), safe='/')}"


def nbd_tcp_uri(host: str, port: int, name: str = "") -> str:
    """``nbd://HOST:PORT/NAME``."""
    return f"nbd://{host}:{port}/{quote(name, safe='')}"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"NBD server closed after {len(buf)}/{n} bytes")
        buf += chunk
    return bytes(buf)


def nbd_probe(address: str | Path | tuple[str, int], timeout: float = 5.0) -> int:
    """Check an NBD server is serving: fixed-newstyle handshake, then NBD_OPT_ABORT.

    A bare connect-and-close makes qemu-storage-daemon log "option negotiation
    failed" on stderr; this probe ends the session the way the protocol wants,
    so stderr stays clean.  Returns the server's handshake flags.  Raises
    OSError/ConnectionError/ValueError when the server is not (yet) usable.
    """
    family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
    target = address if isinstance(address, tuple) else str(address)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(target)
        magic, opt_magic, flags = struct.unpack(">QQH", _recv_exact(sock, 18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ValueError(f"not a newstyle NBD server: {magic:#x} {opt_magic:#x}")
        if not flags & NBD_FLAG_FIXED_NEWSTYLE:
            raise ValueError(f"NBD server is not fixed-newstyle (flags {flags:#x})")
        sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE))
        sock.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_ABORT, 0))
        try:  # the reply is optional for the server (spec: SHOULD), read it if it comes
            reply = sock.recv(20)
            if reply and len(reply) >= 8 and struct.unpack(">Q", reply[:8])[0] != REPLY_MAGIC:
                raise ValueError(f"bad option reply magic: {reply[:8].hex()}")
        except (socket.timeout, ConnectionResetError):
            pass
        return flags


def wait_nbd(address: str | Path | tuple[str, int], timeout: float = 10.0,
             alive=lambda: True) -> None:
    """Poll nbd_probe until it succeeds; stop early when ``alive()`` is false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            nbd_probe(address, timeout=2.0)
            return
        except (OSError, ValueError):
            if not alive() or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def nbdinfo_json(uri: str, *extra: str) -> dict:
    """``nbdinfo --json URI`` parsed (libnbd-bin)."""
    exe = require_tool("nbdinfo", "libnbd-bin")
    return json.loads(run([exe, "--json", *extra, uri]).stdout)


def nbdcopy(src: str | Path, dst: str | Path, *extra: str, timeout: float = 120):
    """``nbdcopy [EXTRA] SRC DST`` (libnbd-bin); SRC/DST are URIs, files, ``null:`` or ``-``."""
    exe = require_tool("nbdcopy", "libnbd-bin")
    return run([exe, *extra, str(src), str(dst)], timeout=timeout)


def hammer(client, threads: int = 4, rounds: int = 6, wait: float = 60.0) -> list:
    """Four threads writing and reading their own 4 MiB regions through one client at once.

    Each round submits a random write and three reads of the region, waits for all
    of them, then reads the write back.  Returns the exceptions the threads met
    (an empty list when everything came back right): one connection's stream is
    shared by a reader and several writers (TLS objects must never be entered twice).
    """
    import random  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    mib = 1 << 20
    errors: list = []

    def worker(i: int) -> None:
        rnd = random.Random(i)
        region = i * 4 * mib
        try:
            for _round in range(rounds):
                blob = rnd.randbytes(rnd.randint(1, mib))
                off = region + rnd.randrange(4 * mib - len(blob))
                reqs = [client.submit_write(off, blob)]
                reqs += [client.submit_read(region, 4 * mib) for _r in range(3)]
                for req in reqs:
                    req.result(wait)
                if client.pread(off, len(blob), timeout=wait) != blob:
                    raise AssertionError(f"thread {i}: read back differs at {off}")
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(wait)
    return errors
