"""Fuzz the qcow2 driver with damaged copies of real images (run as a script).

Usage: qcow2_fuzz.py SEEDS WORKFILE IMAGE...   (environment: see LIGHT below)

Each seed damages a copy of one image (bit flips and random bytes, mostly in
the metadata clusters, sometimes a truncation), then opens it read-only and
read/write, reads, writes, zeroes and discards.  Allowed outcomes: QMPError
on open, OSError(EIO) on I/O (EROFS/ENOTSUP where they apply), success.
Anything else (another exception, a change to the file by a failed open or a
read-only session, MemoryError under the address-space limit) is "bad".
Prints a JSON summary as the last line.
"""

import errno
import json
import os
import random
import resource
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "plugins", "module_utils"))

from blockd import drivers  # noqa: E402  pylint: disable=wrong-import-position
from blockd.errors import QMPError  # noqa: E402  pylint: disable=wrong-import-position
from blockd.graph.graph import Graph  # noqa: E402  pylint: disable=wrong-import-position
from blockd.graph.io import REQ_MAY_UNMAP  # noqa: E402  pylint: disable=wrong-import-position

LIMIT = 2 << 30
# QCOW2_FUZZ_LIGHT=1 (bench/fuzz.py): open read-only and read 64 KiB at three places only,
# for many more images per second; QCOW2_FUZZ_SEED_BASE: the first seed.
LIGHT = os.environ.get("QCOW2_FUZZ_LIGHT") == "1"
IO_ERRNOS = (errno.EIO, errno.ENOTSUP, errno.EROFS, errno.EFBIG, errno.ENOSPC)


def damage(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    cluster = 1 << int.from_bytes(buf[20:24], "big")
    area = rnd.choice([512, 8 * cluster, len(buf)])
    for _ in range(rnd.choice([1, 2, 3, 8, 32])):
        pos = rnd.randrange(0, min(area, len(buf)))
        if rnd.random() < 0.5:
            buf[pos] ^= 1 << rnd.randrange(8)
        else:
            buf[pos] = rnd.randrange(256)
    if rnd.random() < 0.08:
        del buf[rnd.randrange(0, len(buf)):]
    return bytes(buf)


def session(path: str, read_only: bool, rnd: random.Random, stats: dict) -> None:
    graph = Graph(drivers.lookup)
    try:
        node = graph.open({"driver": "qcow2", "node-name": "q", "read-only": read_only,
                           "discard": "unmap",
                           "backing": None,
                           "file": {"driver": "file", "filename": path}})
    except QMPError:
        stats["open_refused"] += 1
        raise
    try:
        size = node.getlength()
        failed = False
        for off in {0, size // 3, max(0, size - 300000)}:
            n = min(size - off, 65536 if LIGHT else 1 << 20)
            if n <= 0:
                continue
            try:
                node.pread(off, n)
                node.read_segments(off, n)
                node.block_status(off, n)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                failed = True
        if not read_only and size:
            for _ in range(6):
                off = rnd.randrange(0, size)
                n = min(size - off, rnd.choice([512, 65536, 300000]))
                try:
                    op = rnd.random()
                    if op < 0.5:
                        node.pwrite(off, os.urandom(n))
                    elif op < 0.7:
                        node.pwrite_zeroes(off, n, REQ_MAY_UNMAP)
                    elif op < 0.85:
                        node.pdiscard(off, n)
                    else:
                        node.flush()
                except OSError as exc:
                    if exc.errno not in IO_ERRNOS:
                        raise
                    failed = True
        stats["io_failed" if failed else "io_ok"] += 1
    finally:
        try:
            graph.close_all()
        except OSError as exc:
            if exc.errno not in IO_ERRNOS:
                raise


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    seeds, work, images = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    originals = [open(p, "rb").read() for p in images]
    stats = {"open_refused": 0, "io_failed": 0, "io_ok": 0, "bad": []}
    base = int(os.environ.get("QCOW2_FUZZ_SEED_BASE", "0"))
    for seed in range(base, base + seeds):
        rnd = random.Random(seed)
        data = damage(originals[seed % len(originals)], rnd)
        for read_only in (True,) if LIGHT else (True, False):
            with open(work, "wb") as f:
                f.write(data)
            try:
                session(work, read_only, rnd, stats)
            except QMPError:
                if open(work, "rb").read() != data:
                    stats["bad"].append("seed %d: failed open changed the file" % seed)
                continue
            except BaseException:  # noqa: BLE001 - the point of a fuzzer
                stats["bad"].append("seed %d ro=%s: %s" % (seed, read_only,
                                                          traceback.format_exc()[-1500:]))
                continue
            if read_only and open(work, "rb").read() != data:
                stats["bad"].append("seed %d: read-only session changed the file" % seed)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
