"""Wire constants and packing of blockd.nbd.proto."""

from __future__ import annotations

import errno
import struct

from blockd.nbd import proto


def test_magics_spell_their_names():
    assert struct.pack(">Q", proto.NBDMAGIC) == b"NBDMAGIC"
    assert struct.pack(">Q", proto.IHAVEOPT) == b"IHAVEOPT"


def test_struct_sizes_match_the_spec():
    assert proto.GREETING.size == 18
    assert proto.OPTION.size == 16
    assert proto.OPTION_REPLY.size == 20
    assert proto.REQUEST.size == 28
    assert proto.SIMPLE_REPLY.size == 16
    assert proto.CHUNK.size == 20
    assert proto.CHUNK_OFFSET_DATA.size == 28
    assert proto.CHUNK_OFFSET_HOLE.size == 32
    assert proto.CHUNK_ERROR.size == 26
    assert proto.CHUNK_BLOCK_STATUS.size == 24
    assert proto.INFO_EXPORT_PAYLOAD.size == 12
    assert proto.INFO_BLOCK_SIZE_PAYLOAD.size == 14


def test_pack_request_and_options():
    raw = proto.pack_request(proto.CMD_WRITE, 7, 4096, 512, proto.CMD_FLAG_FUA)
    assert proto.REQUEST.unpack(raw) == (proto.REQUEST_MAGIC, 1, 1, 7, 4096, 512)
    assert proto.pack_option(proto.OPT_LIST) == struct.pack(">QII", proto.IHAVEOPT, 3, 0)
    assert proto.pack_info_request("ab", (proto.INFO_NAME,)) == b"\0\0\0\2ab\0\1\0\1"
    assert proto.pack_meta_request("x", ("base:allocation",)) == (
        b"\0\0\0\1x\0\0\0\1\0\0\0\x0fbase:allocation")
    rep = proto.pack_option_reply(proto.OPT_GO, proto.REP_ACK)
    assert proto.OPTION_REPLY.unpack(rep) == (proto.REP_MAGIC, 7, 1, 0)


def test_errno_mapping():
    assert proto.nbd_errno(errno.EPERM) == proto.NBD_EPERM
    assert proto.nbd_errno(errno.EROFS) == proto.NBD_EPERM
    assert proto.nbd_errno(errno.EIO) == proto.NBD_EIO
    assert proto.nbd_errno(errno.ENOSPC) == proto.NBD_ENOSPC
    assert proto.nbd_errno(errno.EDQUOT) == proto.NBD_ENOSPC
    assert proto.nbd_errno(errno.EFBIG) == proto.NBD_ENOSPC
    assert proto.nbd_errno(errno.ESHUTDOWN) == proto.NBD_ESHUTDOWN
    assert proto.nbd_errno(errno.EOVERFLOW) == proto.NBD_EOVERFLOW
    assert proto.nbd_errno(errno.ENOTSUP, fast_zero=True) == proto.NBD_ENOTSUP
    assert proto.nbd_errno(errno.EOPNOTSUPP, fast_zero=True) == proto.NBD_ENOTSUP
    assert proto.nbd_errno(errno.ENOTSUP) == proto.NBD_EINVAL
    assert proto.nbd_errno(errno.EBADF) == proto.NBD_EINVAL
    assert proto.nbd_errno(None) == proto.NBD_EINVAL
    assert proto.nbd_errno(0) == proto.NBD_EINVAL


def test_names():
    assert proto.opt_name(proto.OPT_SET_META_CONTEXT) == "set meta context"
    assert proto.opt_name(99) == "<unknown>"
    assert proto.cmd_name(proto.CMD_WRITE_ZEROES) == "write zeroes"
    assert proto.cmd_name(99) == "<unknown>"
