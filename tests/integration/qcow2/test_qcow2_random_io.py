"""Random writes, overwrites, unaligned writes, zero writes and discards
through blockd leave images that qemu-img check finds clean and that equal a
raw shadow copy written alongside (set BLOCKD_QCOW2_LONG=1 for longer runs).
"""

import random

import pytest

from blockd.drivers.qcow2 import create_qcow2
from helpers import qemu_img
from qcow2_qemu import LONG, MiB, assert_clean, create, io, to_raw
from qcow2_testlib import open_qcow2, random_ops, read_all

OPS = 3000 if LONG else 400
SEEDS = range(6) if LONG else range(2)


def run_random(graph, path, seed, ops=OPS, size=None, discard_zeroes=True, **open_opts):
    """Random I/O on ``path`` with a shadow; then QEMU must agree."""
    expect = to_raw(path)
    shadow = bytearray(expect)
    node = open_qcow2(graph, path, **open_opts)
    if size is not None:
        assert node.getlength() == size
    random_ops(node, shadow, random.Random(seed), ops, discard_zeroes=discard_zeroes,
               check_every=97)
    assert read_all(node) == bytes(shadow)
    graph.close_all()
    assert_clean(path)
    assert to_raw(path) == bytes(shadow)
    return shadow


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cluster_size,version", [(512, 3), (4096, 3), (65536, 3), (2 << 20, 3),
                                                  (65536, 2), (4096, 2)])
def test_random_io(graph, tmp_path, seed, cluster_size, version):
    path = tmp_path / "r.qcow2"
    create(path, 32 * MiB, "cluster_size=%d" % cluster_size,
           "compat=%s" % ("1.1" if version == 3 else "0.10"))
    run_random(graph, path, seed * 1000 + cluster_size + version)


@pytest.mark.parametrize("version", [3, 2])
def test_random_io_over_backing_chain(graph, tmp_path, version):
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.write(random.Random(1).randbytes(20 * MiB))
    mid = create(tmp_path / "mid.qcow2", 32 * MiB, "cluster_size=4096", backing=str(base),
                 backing_fmt="raw")
    io(mid, "write -P 0x5a 3M 5M", "write -z 10M 1M")
    compat = "compat=%s" % ("1.1" if version == 3 else "0.10")
    top = create(tmp_path / "top.qcow2", 32 * MiB, compat, backing="mid.qcow2",
                 backing_fmt="qcow2")
    base_before, mid_before = to_raw(base, "raw"), to_raw(mid)
    # v2 with a backing file ignores discards (they would expose old data).
    run_random(graph, top, 42 + version, discard_zeroes=version == 3)
    assert to_raw(base, "raw") == base_before and to_raw(mid) == mid_before


def test_random_io_on_compressed_image(graph, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        rnd = random.Random(5)
        for _ in range(16):
            f.write(rnd.randbytes(MiB // 2) + bytes([rnd.randrange(4)]) * (MiB // 2))
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=16k",
             str(src), str(path))
    run_random(graph, path, 9)


def test_random_io_with_internal_snapshot(graph, tmp_path):
    """Writes to clusters shared with a snapshot copy them (refcount > 1)."""
    path = create(tmp_path / "s.qcow2", 16 * MiB, "cluster_size=16k")
    io(path, "write -P 0x31 0 6M", "write -z 8M 1M", "write -P 0x32 10M 3M")
    qemu_img("snapshot", "-c", "before", str(path))
    snap = to_raw(path, snapshot="before")
    run_random(graph, path, 11)
    assert to_raw(path, snapshot="before") == snap


def test_random_io_on_preallocated_image(graph, tmp_path):
    path = create(tmp_path / "p.qcow2", 16 * MiB, "preallocation=metadata", "cluster_size=8k")
    run_random(graph, path, 13)


@pytest.mark.parametrize("refcount_bits", [1, 64])
def test_random_io_refcount_widths(graph, tmp_path, refcount_bits):
    path = tmp_path / "w.qcow2"
    create_qcow2(str(path), 8 * MiB, cluster_size=4096, refcount_bits=refcount_bits)
    run_random(graph, path, refcount_bits, ops=OPS // 2)


def test_grow_and_shrink_checked_by_qemu(graph, tmp_path):
    path = create(tmp_path / "g.qcow2", MiB, "cluster_size=512")
    io(path, "write -P 0x41 0 1M")
    node = open_qcow2(graph, path)
    node.driver.truncate(64 * MiB)        # the L1 table grows past one cluster and moves
    node.pwrite(64 * MiB - 4096, b"E" * 4096)
    node.driver.truncate(64 * MiB + 512)
    graph.close_all()
    assert_clean(path)
    data = to_raw(path)
    assert len(data) == 64 * MiB + 512
    assert data[:MiB] == b"\x41" * MiB and data[64 * MiB - 4096:64 * MiB] == b"E" * 4096
    assert data[MiB:64 * MiB - 4096] == bytes(63 * MiB - 4096)
    # like QEMU, shrinking discards the allocated clusters past the new end
    node = open_qcow2(graph, path)
    node.driver.truncate(MiB)
    node.driver.truncate(2 * MiB)
    graph.close_all()
    assert_clean(path)
    assert to_raw(path) == b"\x41" * MiB + bytes(MiB)
    node = open_qcow2(graph, path, name="again")
    node.pdiscard(32 * MiB, 32 * MiB + 512)
    node.driver.truncate(2 * MiB)
    graph.close_all()
    assert_clean(path)
    assert to_raw(path) == b"\x41" * MiB + bytes(MiB)
