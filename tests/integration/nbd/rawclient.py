"""A deliberately low-level NBD client for protocol tests.

It sends whatever bytes a test asks for (including invalid ones) and parses
what comes back without judging it, so tests can assert on the exact replies
of blockd and qemu-storage-daemon.  Constants and packing come from
``blockd.nbd.proto``.
"""

from __future__ import annotations

import socket
import struct
from typing import List, Optional, Tuple

from blockd.nbd import proto


class Closed(Exception):
    """The server closed the connection."""


class RawNBD:
    """One connection to an NBD server's unix socket.

    :param path: the socket path.
    :param timeout: seconds for every receive.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawNBD":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bytes --------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed("closed after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    # -- handshake -------------------------------------------------------------------

    def greeting(self) -> int:
        magic, optmagic, flags = proto.GREETING.unpack(self.recv(18))
        assert magic == proto.NBDMAGIC and optmagic == proto.IHAVEOPT
        return flags

    def start(self, cflags: int = proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES) -> int:
        """Greeting plus client flags; returns the server's handshake flags."""
        flags = self.greeting()
        self.send(struct.pack(">I", cflags))
        return flags

    def option(self, option: int, data: bytes = b"") -> None:
        self.send(proto.pack_option(option, data))

    def reply(self) -> Tuple[int, int, bytes]:
        """One option reply: (option, reply type, payload)."""
        magic, option, rtype, length = proto.OPTION_REPLY.unpack(self.recv(20))
        assert magic == proto.REP_MAGIC, hex(magic)
        return option, rtype, self.recv(length)

    def replies(self) -> List[Tuple[int, bytes]]:
        """Option replies up to and including ACK or an error: [(type, payload)]."""
        out = []
        while True:
            _, rtype, data = self.reply()
            out.append((rtype, data))
            if rtype == proto.REP_ACK or rtype & proto.REP_FLAG_ERROR:
                return out

    def ask(self, option: int, data: bytes = b"") -> List[Tuple[int, bytes]]:
        self.option(option, data)
        return self.replies()

    def structured_reply(self) -> List[Tuple[int, bytes]]:
        return self.ask(proto.OPT_STRUCTURED_REPLY)

    def set_meta(self, name: str, queries=(proto.CONTEXT_BASE_ALLOCATION,)) -> List[Tuple[int, bytes]]:
        return self.ask(proto.OPT_SET_META_CONTEXT, proto.pack_meta_request(name, tuple(queries)))

    def go(self, name: str, infos=()) -> Tuple[int, int]:
        """NBD_OPT_GO; returns (size, transmission flags); raises on an error reply."""
        reps = self.ask(proto.OPT_GO, proto.pack_info_request(name, tuple(infos)))
        size = flags = None
        for rtype, data in reps:
            if rtype == proto.REP_INFO and struct.unpack(">H", data[:2])[0] == proto.INFO_EXPORT:
                _, size, flags = proto.INFO_EXPORT_PAYLOAD.unpack(data)
            if rtype & proto.REP_FLAG_ERROR:
                raise AssertionError("GO failed: %#x %r" % (rtype, data))
        return size, flags

    @classmethod
    def connect(cls, path: str, name: str = "x", sr: bool = True,
                meta=(proto.CONTEXT_BASE_ALLOCATION,)) -> "RawNBD":
        """A connection in transmission phase on export ``name``."""
        c = cls(path)
        c.start()
        c.sr = sr
        if sr:
            assert c.structured_reply()[-1][0] == proto.REP_ACK
            if meta:
                c.set_meta(name, meta)
        c.size, c.flags = c.go(name)
        return c

    # -- transmission -----------------------------------------------------------------

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", cookie: Optional[int] = None, magic: int = proto.REQUEST_MAGIC) -> int:
        if cookie is None:
            self.cookie += 1
            cookie = self.cookie
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)
        return cookie

    def simple_reply(self, length: int = 0) -> Tuple[int, int, bytes]:
        """(error, cookie, data) of a simple reply; ``length`` data bytes on success."""
        magic, error, cookie = proto.SIMPLE_REPLY.unpack(self.recv(16))
        assert magic == proto.SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie, (self.recv(length) if length and not error else b"")

    def any_reply(self, length: int = 0):
        """A simple reply, or the chunks of a structured reply, as
        ("simple", error, cookie, data) or ("structured", chunks)."""
        head = self.recv(4)
        (magic,) = struct.unpack(">I", head)
        if magic == proto.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            return ("simple", error, cookie, self.recv(length) if length and not error else b"")
        assert magic == proto.STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks = [self._chunk_after_magic()]
        while not chunks[-1][0] & proto.REPLY_FLAG_DONE:
            chunks.append(self.chunk())
        return ("structured", chunks)

    def _chunk_after_magic(self) -> Tuple[int, int, int, bytes]:
        flags, ctype, cookie, length = struct.unpack(">HHQI", self.recv(16))
        return flags, ctype, cookie, self.recv(length)

    def chunk(self) -> Tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured chunk."""
        (magic,) = struct.unpack(">I", self.recv(4))
        assert magic == proto.STRUCTURED_REPLY_MAGIC, hex(magic)
        return self._chunk_after_magic()

    def error_of(self, length: int = 0) -> int:
        """The NBD error of the next reply (0 on success), whatever its form."""
        rep = self.any_reply(length)
        if rep[0] == "simple":
            return rep[1]
        for flags, ctype, _cookie, payload in rep[1]:
            if ctype & 0x8000:
                return struct.unpack(">I", payload[:4])[0]
        return 0

    def error_message(self) -> Tuple[int, str]:
        """(error, message) of a structured ERROR reply."""
        rep = self.any_reply()
        assert rep[0] == "structured", rep
        flags, ctype, _cookie, payload = rep[1][-1]
        assert ctype == proto.REPLY_TYPE_ERROR, rep
        err, mlen = struct.unpack(">IH", payload[:6])
        return err, payload[6:6 + mlen].decode()

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """READ with either reply form; returns the data (holes as zeroes)."""
        self.request(proto.CMD_READ, offset, length, flags)
        rep = self.any_reply(length)
        if rep[0] == "simple":
            assert rep[1] == 0, rep
            return rep[3]
        buf = bytearray(length)
        for _flags, ctype, _cookie, payload in rep[1]:
            if ctype == proto.REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", payload[:8])
                buf[off - offset:off - offset + len(payload) - 8] = payload[8:]
            elif ctype == proto.REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", payload)
                buf[off - offset:off - offset + n] = bytes(n)
            elif ctype != proto.REPLY_TYPE_NONE:
                raise AssertionError("error chunk: %r" % (rep,))
        return bytes(buf)

    def disc(self) -> None:
        self.request(proto.CMD_DISC)
