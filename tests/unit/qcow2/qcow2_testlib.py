"""Helpers shared by the qcow2 unit and integration tests (no QEMU tools here)."""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional

from blockd.graph.io import REQ_MAY_UNMAP, SEG_DATA, SEG_FD, SEG_ZERO

MiB = 1 << 20


def qcow2_opts(path, name: str = "q", **extra: Any) -> Dict[str, Any]:
    """blockdev-add options of a qcow2 node over a file (discards enabled, as
    the tests' shadow models expect: QEMU ignores them without ``discard=unmap``)."""
    opts: Dict[str, Any] = {"driver": "qcow2", "node-name": name, "discard": "unmap",
                            "file": {"driver": "file", "filename": str(path)}}
    opts.update(extra)
    return opts


def open_qcow2(graph, path, name: str = "q", **extra: Any):
    """Open ``path`` as a qcow2 node in ``graph``."""
    return graph.open(qcow2_opts(path, name, **extra))


def seg_bytes(segs) -> bytes:
    """The bytes a list of read segments stands for."""
    out = bytearray()
    for seg in segs:
        if seg[0] == SEG_FD:
            data = os.pread(seg[1], seg[3], seg[2])
            assert len(data) == seg[3], "SEG_FD segment reaches past the end of the file"
            out += data
        elif seg[0] == SEG_ZERO:
            out += bytes(seg[1])
        else:
            assert seg[0] == SEG_DATA
            out += bytes(seg[1])
    return bytes(out)


def read_all(node, chunk: int = 4 * MiB) -> bytes:
    """The whole node through pread."""
    size = node.getlength()
    return b"".join(node.pread(off, min(chunk, size - off)) for off in range(0, size, chunk))


def aligned_part(offset: int, length: int, cluster: int, size: int):
    """The part of a discard qcow2 acts on (whole clusters, or the end)."""
    start = -(-offset // cluster) * cluster
    end = offset + length
    end = end if end == size else end // cluster * cluster
    return start, end


def random_ops(node, shadow: bytearray, rnd: random.Random, count: int,
               discard_zeroes: bool = True, check_every: int = 0,
               lengths=(1, 511, 512, 4096, 65536, 70000, 300000, MiB)) -> None:
    """Random writes, overwrites, zero writes, discards and flushes through
    ``node``, mirrored into ``shadow`` (the expected content).

    :param discard_zeroes: discarded whole clusters read back as zeroes (true
        for qcow2 v3, and for v2 without a backing file).
    :param check_every: compare a random window every N operations.
    """
    size = node.getlength()
    cluster = node.driver.cluster_size()
    for i in range(count):
        off = rnd.randrange(0, size)
        length = min(size - off, rnd.choice(lengths))
        if length <= 0:
            continue
        op = rnd.random()
        if op < 0.55:
            data = rnd.randbytes(length)
            node.pwrite(off, data)
            shadow[off:off + length] = data
        elif op < 0.75:
            node.pwrite_zeroes(off, length, REQ_MAY_UNMAP if rnd.random() < 0.5 else 0)
            shadow[off:off + length] = bytes(length)
        elif op < 0.9:
            node.pdiscard(off, length)
            if discard_zeroes:
                start, end = aligned_part(off, length, cluster, size)
                if start < end:
                    shadow[start:end] = bytes(end - start)
        else:
            node.flush()
        if check_every and i % check_every == 0:
            o = rnd.randrange(0, size)
            n = min(size - o, 2 * MiB)
            assert node.pread(o, n) == bytes(shadow[o:o + n]), "mismatch after op %d" % i
            assert seg_bytes(node.read_segments(o, n)) == bytes(shadow[o:o + n])


def file_bytes(path) -> bytes:
    """The raw bytes of a file."""
    with open(path, "rb") as f:
        return f.read()


def patch_file(path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def be64(path, offset: int) -> int:
    """A big-endian 64-bit field of a file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(8), "big")


def header_field(path, offset: int, width: int) -> int:
    """A big-endian header field."""
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(width), "big")


def first_l2_offset(path) -> Optional[int]:
    """The first non-zero L1 entry's L2 table offset."""
    l1_off = header_field(path, 40, 8)
    l1_size = header_field(path, 36, 4)
    for i in range(l1_size):
        entry = be64(path, l1_off + 8 * i)
        if entry:
            return entry & 0x00FFFFFFFFFFFE00
    return None
