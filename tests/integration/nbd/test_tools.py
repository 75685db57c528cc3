"""The NBD server against the Debian 12 client tools: nbdinfo, nbdcopy, qemu-img, qemu-io.

Tests taking ``any_nbd`` run against blockd and qemu-storage-daemon alike:
both must give the same answers.
"""

from __future__ import annotations

import json

import pytest

from helpers import MiB, qemu_img, qemu_io, require_tool, run

from .conftest import HOLE, SIZE, expected_content

pytestmark = pytest.mark.blockd


def nbdinfo(*args: str, check: bool = True):
    return run([require_tool("nbdinfo", "libnbd-bin"), *args], check=check)


def test_nbdinfo_plain(any_nbd):
    info = json.loads(nbdinfo("--json", any_nbd.uri("x")).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    (exp,) = info["exports"]
    assert exp["export-name"] == "x"
    assert exp["description"] == "blockd test export"
    assert exp["export-size"] == SIZE
    assert exp["contexts"] == ["base:allocation"]
    assert exp["is_read_only"] is False
    for flag in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
                 "can_multi_conn", "can_trim", "can_zero"):
        assert exp[flag] is True, flag
    assert (exp["block_size_minimum"], exp["block_size_preferred"],
            exp["block_size_maximum"]) == (1, 4096, 32 * MiB)


def test_nbdinfo_read_only_export(any_nbd):
    (exp,) = json.loads(nbdinfo("--json", any_nbd.uri("ro")).stdout)["exports"]
    assert exp["is_read_only"] is True
    assert exp["can_flush"] is True and exp["can_fua"] is True
    for flag in ("can_trim", "can_zero", "can_fast_zero"):
        assert exp[flag] is False, flag


def test_nbdinfo_allocation_depth_context(any_nbd):
    (exp,) = json.loads(nbdinfo("--json", any_nbd.uri("depth")).stdout)["exports"]
    assert exp["contexts"] == ["base:allocation", "qemu:allocation-depth"]


def test_nbdinfo_list(any_nbd):
    info = json.loads(nbdinfo("--json", "--list", any_nbd.uri("x")).stdout)
    names = [e["export-name"] for e in info["exports"]]
    assert sorted(names) == sorted(["x", "ro", "null", "depth"])
    by_name = {e["export-name"]: e for e in info["exports"]}
    assert by_name["x"]["description"] == "blockd test export"
    assert "description" not in by_name["ro"]


def test_nbdinfo_map(any_nbd):
    out = json.loads(nbdinfo("--json", "--map", any_nbd.uri("x")).stdout)
    extents = [(e["offset"], e["length"], e["type"]) for e in out]
    assert extents == [(0, HOLE[0], 0), (HOLE[0], HOLE[1], 3),
                       (HOLE[0] + HOLE[1], SIZE - HOLE[0] - HOLE[1], 0)]


def test_nbdinfo_map_allocation_depth(any_nbd):
    out = json.loads(nbdinfo("--json", "--map=qemu:allocation-depth",
                             any_nbd.uri("depth")).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in out] == [(0, SIZE, 1)]


def test_nbdinfo_map_null(any_nbd):
    out = json.loads(nbdinfo("--json", "--map", any_nbd.uri("null")).stdout)
    # null-co with read-zeroes: no data, reads as zeroes
    assert [(e["offset"], e["length"], e["type"]) for e in out] == [(0, 64 * MiB, 3)]


@pytest.mark.parametrize("what,expect_x,expect_ro", [
    ("write", True, False), ("flush", True, True), ("fua", True, True),
    ("trim", True, False), ("zero", True, False), ("fast-zero", True, False),
    ("multi-conn", True, True), ("cache", True, True), ("df", True, True),
    ("connect", True, True),
])
def test_nbdinfo_can(blockd_nbd, what, expect_x, expect_ro):
    for name, expected in (("x", expect_x), ("ro", expect_ro)):
        rc = nbdinfo("--can", what, blockd_nbd.uri(name), check=False).returncode
        assert rc == (0 if expected else 2), (name, what, rc)


def test_nbdinfo_size_and_unknown_export(any_nbd):
    assert nbdinfo("--size", any_nbd.uri("x")).stdout.strip() == str(SIZE)
    bad = nbdinfo(any_nbd.uri("nope"), check=False)
    assert bad.returncode == 1
    assert "opt_go" in bad.stderr and "nope" in bad.stderr   # NBD_REP_ERR_UNKNOWN


def test_nbdcopy_read_and_write(any_nbd, tmp_path):
    nbdcopy = require_tool("nbdcopy", "libnbd-bin")
    out = tmp_path / "copy.raw"
    run([nbdcopy, any_nbd.uri("x"), str(out)])
    assert out.read_bytes() == expected_content()
    # write back a different pattern through NBD and read it from the file side
    src = tmp_path / "src.raw"
    src.write_bytes(bytes([0x5A]) * SIZE)
    run([nbdcopy, str(src), any_nbd.uri("x")])
    run([nbdcopy, "--flush", any_nbd.uri("x"), str(out)])
    assert out.read_bytes() == src.read_bytes()


def test_nbdcopy_sparse_source_writes_zeroes(any_nbd, tmp_path):
    nbdcopy = require_tool("nbdcopy", "libnbd-bin")
    src = tmp_path / "sparse.raw"
    with open(src, "wb") as f:  # 16 MiB: one MiB of data at 8 MiB, the rest holes
        f.truncate(SIZE)
        f.seek(8 * MiB)
        f.write(b"\x77" * MiB)
    run([nbdcopy, str(src), any_nbd.uri("x")])   # holes become WRITE_ZEROES
    out = tmp_path / "back.raw"
    run([nbdcopy, any_nbd.uri("x"), str(out)])
    assert out.read_bytes() == src.read_bytes()


def test_nbdcopy_to_null_from_null_export(any_nbd):
    nbdcopy = require_tool("nbdcopy", "libnbd-bin")
    run([nbdcopy, any_nbd.uri("null"), "null:"])
    run([nbdcopy, "--request-size=65536", any_nbd.uri("x"), "null:"])


def test_qemu_img_compare_and_convert(any_nbd, image, tmp_path):
    qemu_img("compare", "-f", "raw", "-F", "raw", str(image), any_nbd.uri("x"))
    out = tmp_path / "conv.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", any_nbd.uri("ro"), str(out))
    assert out.read_bytes() == expected_content()
    src = tmp_path / "pattern.raw"
    src.write_bytes(bytes([0xC3]) * (2 * MiB) + bytes(SIZE - 2 * MiB))
    qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(src), any_nbd.uri("x"))
    qemu_img("compare", "-f", "raw", "-F", "raw", str(src), any_nbd.uri("x"))
    info = json.loads(qemu_img("info", "--output=json", any_nbd.uri("x")).stdout)
    assert info["virtual-size"] == SIZE


def test_qemu_img_map(any_nbd):
    out = json.loads(qemu_img("map", "--output=json", "-f", "raw", any_nbd.uri("x")).stdout)
    data = [(e["start"], e["length"], e["data"], e["zero"]) for e in out]
    assert data == [(0, HOLE[0], True, False), (HOLE[0], HOLE[1], False, True),
                    (HOLE[0] + HOLE[1], SIZE - HOLE[0] - HOLE[1], True, False)]


def test_qemu_io_patterns(any_nbd):
    uri = any_nbd.uri("x")
    qemu_io(uri, "write -P 0xab 0 64k", "read -P 0xab 0 64k")
    qemu_io(uri, "aio_write -P 0xcd 1M 128k", "aio_flush", "read -P 0xcd 1M 128k")
    qemu_io(uri, "write -z 2M 1M", "read -P 0 2M 1M")
    qemu_io(uri, "write -z -u 3M 1M", "read -P 0 3M 1M")
    qemu_io(uri, "discard 12M 1M", "flush")
    qemu_io(uri, "write -f -P 0x11 8M 4k", "read -P 0x11 8M 4k")   # FUA
    out = qemu_io(uri, "read -P 0xab 0 64k", "read -v 65536 16").stdout
    assert "read 65536/65536 bytes" in out


def test_qemu_io_read_only_export(any_nbd):
    out = qemu_io(any_nbd.uri("ro"), "write -P 1 0 4k", check=False)
    assert out.returncode != 0 and "Permission denied" in out.stderr   # READ_ONLY flag seen
    run([require_tool("qemu-io", "qemu-utils"), "-r", "-f", "raw", "-c", "read -P 0 4M 4M",
         "-c", "read -P 0x10 16 1", any_nbd.uri("ro")])
