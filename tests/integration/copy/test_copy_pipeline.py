"""nbd_copy's data path (blockd.copy.engine): request sizes, connections, buffer reuse.

The pipeline hashes and writes each read in the thread that received it (one
connection: in a pool of two threads), reuses its buffers and keeps holes in
the same in-order window as the reads.  These tests pull real exports (blockd and
qemu-storage-daemon) with every combination that takes a different path and
check the result against what is computed here independently from the source
file: every 1 MiB block's sha256, the whole-disk digest, and the bytes
(``qemu-img compare``).
"""

import hashlib
import json
import os

import pytest

from helpers import MiB, qemu_img

import blockd.copy.engine as engine_mod
from blockd.copy import copy, verify

#: Odd size: the last block is short (12 KiB).
SIZE = 41 * MiB + 12 * 1024
#: Allocated bytes (whole blocks; the last one short): 31 MiB of runs + blocks 40, 41.
ALLOCATED = 32 * MiB + 12 * 1024
#: Allocated bytes that are not zero (the 5 MiB zero run excluded).
NONZERO = ALLOCATED - 5 * MiB


def make_source(path):
    """Data runs of many lengths (1-9 MiB, a 5 MiB run of zeroes that is
    allocated, a short last block) between holes, every block different."""
    runs = [(0, 1), (2, 3), (6, 9), (16, 1), (18, 5), (24, 2), (27, 4), (32, 6)]
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for start, n in runs:
            for b in range(start, start + n):
                f.seek(b * MiB)
                f.write(hashlib.sha256(b"%d" % b).digest() * (MiB // 32))
        f.seek(18 * MiB)
        f.write(bytes(5 * MiB))  # allocated, all zero
        f.seek(40 * MiB)
        f.write(b"\x5a" * (SIZE - 40 * MiB))
    return path


def expected(path):
    """Block hashes and disk digest computed straight from the file."""
    hashes = []
    with open(path, "rb") as f:
        while True:
            block = f.read(MiB)
            if not block:
                break
            hashes.append(hashlib.sha256(block).digest())
    return hashes, hashlib.sha256(b"".join(hashes)).hexdigest()


def serve(daemon, engine, image):
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={image}",
               "--blockdev", "driver=raw,node-name=n,file=f",
               "--export", "type=nbd,id=e,node-name=n,name=x", nbd=True)
    return d.nbd_uri("x")


def check_manifest(dest, hashes, disk):
    man = verify(str(dest))
    assert man["status"] == "ok", man
    doc = json.loads(open(str(dest) + ".manifest.json").read())
    assert doc["disk_sha256"] == disk
    for e in doc["extents"]:
        first, count = e["offset"] // MiB, -(-e["length"] // MiB)
        want = b"".join(hashes[first:first + count])
        if "blocks" in e:
            assert bytes.fromhex(e["blocks"]) == want, e["offset"]


# (chunk, request): 192 KiB requests do not cover whole 1 MiB blocks (the chunk
# is hashed and written once complete); 1 MiB and 3 MiB requests are hashed and
# written piece by piece (3 MiB in a 4 MiB chunk: a 1 MiB remainder).
@pytest.mark.parametrize("chunk,request_size", [(MiB, MiB), (MiB, 192 * 1024),
                                                (4 * MiB, 192 * 1024), (4 * MiB, 3 * MiB)])
@pytest.mark.parametrize("connections", [1, 4])
def test_request_sizes_and_connections(daemon, engine, tmp_path, monkeypatch,
                                       chunk, request_size, connections):
    src = make_source(tmp_path / "src.raw")
    hashes, disk = expected(src)
    uri = serve(daemon, engine, src)
    monkeypatch.setattr(engine_mod, "CHUNK", chunk)
    monkeypatch.setattr(engine_mod, "REQUEST", request_size)
    for fmt in ("raw", "qcow2"):
        dest = tmp_path / f"out.{fmt}"
        res = copy(uri, str(dest), fmt, connections=connections, inflight=3)
        assert res["disk_sha256"] == disk
        assert res["bytes_copied"] == ALLOCATED
        out = qemu_img("compare", "-f", "raw", "-F", fmt, src, dest, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        check_manifest(dest, hashes, disk)


def test_buffers_are_reused_and_holes_kept(daemon, engine, tmp_path, monkeypatch):
    """Short extents reuse the 4 MiB buffers (stale bytes past an extent must
    never reach the output); zero pieces of allocated data stay holes in raw."""
    src = make_source(tmp_path / "src.raw")
    hashes, disk = expected(src)
    uri = serve(daemon, engine, src)
    monkeypatch.setattr(engine_mod, "CHUNK", 4 * MiB)
    dest = tmp_path / "out.raw"
    res = copy(uri, str(dest), "raw", connections=2, inflight=2)
    assert res["disk_sha256"] == disk
    out = qemu_img("compare", "-f", "raw", "-F", "raw", src, dest, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    # The 5 MiB of allocated zeroes and the holes are not written: the file
    # holds the non-zero data only (give or take a file system block).
    assert NONZERO - MiB <= os.stat(dest).st_blocks * 512 <= NONZERO + 64 * 1024
    check_manifest(dest, hashes, disk)


def test_inflight_one_single_connection(daemon, engine, tmp_path):
    """The narrowest pipeline (one chunk in flight, one connection) gives the same copy."""
    src = make_source(tmp_path / "src.raw")
    hashes, disk = expected(src)
    uri = serve(daemon, engine, src)
    dest = tmp_path / "out.qcow2"
    res = copy(uri, str(dest), "qcow2", connections=1, inflight=1)
    assert res["disk_sha256"] == disk
    out = qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dest, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    check_manifest(dest, hashes, disk)
