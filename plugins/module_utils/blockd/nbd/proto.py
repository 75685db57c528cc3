# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""NBD wire format: constants, packing and names, shared by server and client.

Everything here follows the NBD protocol specification (``doc/proto.md`` of
the NetworkBlockDevice project) for the *fixed newstyle* handshake and the
compact (32-bit length) transmission headers; all integers are big-endian.
The extended-headers extension is not implemented (no Debian 12 client
uses it), but its constants are listed so a client can name them.

Only the standard library is used; the :class:`struct.Struct` objects are
module-level so hot loops can bind their ``pack``/``unpack_from`` methods.
"""

from __future__ import annotations

import errno
import struct
from typing import Dict

# -- magic numbers ------------------------------------------------------------

#: "NBDMAGIC": the first 8 bytes the server sends.
NBDMAGIC = 0x4E42444D41474943
#: "IHAVEOPT": newstyle greeting, and the start of every client option.
IHAVEOPT = 0x49484156454F5054
#: Oldstyle greeting (never sent by this server).
CLISERV_MAGIC = 0x00420281861253
#: Start of every option reply.
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# -- handshake flags ------------------------------------------------------------

FLAG_FIXED_NEWSTYLE = 0x1
FLAG_NO_ZEROES = 0x2
FLAG_C_FIXED_NEWSTYLE = 0x1
FLAG_C_NO_ZEROES = 0x2

# -- options ------------------------------------------------------------------

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# -- option replies -------------------------------------------------------------

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9
REP_ERR_EXT_HEADER_REQD = REP_FLAG_ERROR | 10

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags ---------------------------------------------------------

FLAG_HAS_FLAGS = 0x0001
FLAG_READ_ONLY = 0x0002
FLAG_SEND_FLUSH = 0x0004
FLAG_SEND_FUA = 0x0008
FLAG_ROTATIONAL = 0x0010
FLAG_SEND_TRIM = 0x0020
FLAG_SEND_WRITE_ZEROES = 0x0040
FLAG_SEND_DF = 0x0080
FLAG_CAN_MULTI_CONN = 0x0100
FLAG_SEND_RESIZE = 0x0200
FLAG_SEND_CACHE = 0x0400
FLAG_SEND_FAST_ZERO = 0x0800
FLAG_BLOCK_STATUS_PAYLOAD = 0x1000

# -- commands -------------------------------------------------------------------

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_DF = 0x04
CMD_FLAG_REQ_ONE = 0x08
CMD_FLAG_FAST_ZERO = 0x10
CMD_FLAG_PAYLOAD_LEN = 0x20

# -- structured replies -----------------------------------------------------------

REPLY_FLAG_DONE = 0x1

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# -- NBD errno values -------------------------------------------------------------

NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# -- metadata contexts ------------------------------------------------------------

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
STATE_HOLE = 0x1
STATE_ZERO = 0x2
STATE_DIRTY = 0x1

# -- limits (QEMU 7.2's values) -----------------------------------------------------

#: Largest READ/WRITE payload, and the cap on an option's length.
MAX_BUFFER_SIZE = 32 * 1024 * 1024
#: Longest export name, description, or metadata query.
MAX_STRING_SIZE = 4096
#: Extents per block-status chunk (1 MiB of extent data).
MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8
#: Size of the reply to NBD_OPT_EXPORT_NAME with the trailing zeroes.
EXPORT_NAME_REPLY_SIZE = 8 + 2 + 124

# -- packing ----------------------------------------------------------------------

#: Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
GREETING = struct.Struct(">QQH")
#: Client option header: IHAVEOPT, option, length.
OPTION = struct.Struct(">QII")
#: Option reply header: REP_MAGIC, option, reply type, length.
OPTION_REPLY = struct.Struct(">QIII")
#: Transmission request: magic, flags, type, cookie, offset, length.
REQUEST = struct.Struct(">IHHQQI")
#: Simple reply: magic, error, cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: Structured chunk header: magic, flags, type, cookie, payload length.
CHUNK = struct.Struct(">IHHQI")
#: Chunk header followed by the offset of an OFFSET_DATA chunk.
CHUNK_OFFSET_DATA = struct.Struct(">IHHQIQ")
#: A whole OFFSET_HOLE chunk: header, offset, hole size.
CHUNK_OFFSET_HOLE = struct.Struct(">IHHQIQI")
#: Chunk header, error and message length of an ERROR chunk.
CHUNK_ERROR = struct.Struct(">IHHQIIH")
#: Chunk header and context id of a BLOCK_STATUS chunk.
CHUNK_BLOCK_STATUS = struct.Struct(">IHHQII")
#: Reply to OPT_EXPORT_NAME: size and transmission flags.
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: INFO_EXPORT payload: info type, size, transmission flags.
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
#: INFO_BLOCK_SIZE payload: info type, minimum, preferred, maximum.
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


def pack_option_reply(option: int, rep_type: int, data: bytes = b"") -> bytes:
    """An option reply with its payload.

    :param option: the option being answered.
    :param rep_type: ``REP_*``.
    :param data: the payload.
    :return: the bytes to send.
    """
    return OPTION_REPLY.pack(REP_MAGIC, option, rep_type, len(data)) + data


def pack_option(option: int, data: bytes = b"") -> bytes:
    """A client option with its payload (for clients and tests).

    :param option: ``OPT_*``.
    :param data: the payload.
    :return: the bytes to send.
    """
    return OPTION.pack(IHAVEOPT, option, len(data)) + data


def pack_info_request(name: str, infos: "tuple[int, ...]" = ()) -> bytes:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO.

    :param name: the export name.
    :param infos: ``INFO_*`` items requested.
    :return: the payload.
    """
    raw = name.encode("utf-8")
    return (U32.pack(len(raw)) + raw + U16.pack(len(infos))
            + b"".join(U16.pack(i) for i in infos))


def pack_meta_request(name: str, queries: "tuple[str, ...]" = ()) -> bytes:
    """The payload of NBD_OPT_LIST/SET_META_CONTEXT.

    :param name: the export name.
    :param queries: context queries.
    :return: the payload.
    """
    raw = name.encode("utf-8")
    parts = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for query in queries:
        q = query.encode("utf-8")
        parts += [U32.pack(len(q)), q]
    return b"".join(parts)


def pack_request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A transmission request header (compact form).

    :param cmd: ``CMD_*``.
    :param cookie: the client's opaque handle.
    :param offset: byte offset (must fit in 64 bits).
    :param length: byte count (must fit in 32 bits).
    :param flags: ``CMD_FLAG_*``.
    :return: 28 bytes.
    """
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# -- errno mapping -----------------------------------------------------------------

_ERRNO_TO_NBD: Dict[int, int] = {
    0: NBD_SUCCESS,
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
    errno.EINVAL: NBD_EINVAL,
}


def nbd_errno(err: "int | None", fast_zero: bool = False) -> int:
    """Map a host errno to the NBD error sent to the client.

    QEMU's mapping, with one tightening from the spec: ``ENOTSUP`` is only
    reported for a write-zeroes with FAST_ZERO; elsewhere it becomes
    ``EINVAL`` (clients treat unknown errors as EINVAL anyway).  Unknown or
    missing errnos become ``EINVAL``, as in QEMU.

    :param err: the host errno (``OSError.errno``), possibly None.
    :param fast_zero: whether the failing request was a FAST_ZERO write-zeroes.
    :return: an ``NBD_E*`` value, never 0 for a nonzero ``err``.
    """
    if not err:
        return NBD_EINVAL
    value = _ERRNO_TO_NBD.get(err, NBD_EINVAL)
    if value == NBD_ENOTSUP and not fast_zero:
        return NBD_EINVAL
    return value


# -- names, for messages and traces ---------------------------------------------------

OPT_NAMES: Dict[int, str] = {
    OPT_EXPORT_NAME: "export name",
    OPT_ABORT: "abort",
    OPT_LIST: "list",
    OPT_STARTTLS: "starttls",
    OPT_INFO: "info",
    OPT_GO: "go",
    OPT_STRUCTURED_REPLY: "structured reply",
    OPT_LIST_META_CONTEXT: "list meta context",
    OPT_SET_META_CONTEXT: "set meta context",
}

CMD_NAMES: Dict[int, str] = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write zeroes",
    CMD_BLOCK_STATUS: "block status",
}

ERR_NAMES: Dict[int, str] = {
    NBD_SUCCESS: "success",
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}


def opt_name(option: int) -> str:
    """QEMU's name for an option (``nbd_opt_lookup``).

    :param option: ``OPT_*``.
    :return: e.g. ``"go"``, or ``"<unknown>"``.
    """
    return OPT_NAMES.get(option, "<unknown>")


def cmd_name(cmd: int) -> str:
    """QEMU's name for a command (``nbd_cmd_lookup``).

    :param cmd: ``CMD_*``.
    :return: e.g. ``"read"``, or ``"<unknown>"``.
    """
    return CMD_NAMES.get(cmd, "<unknown>")
