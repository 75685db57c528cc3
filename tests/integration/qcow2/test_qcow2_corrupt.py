"""Damaged images: a clear error (QMPError on open, EIO on I/O), no crash,
and not one byte of the image changed.

The base image is made by qemu-img/qemu-io (64 KiB clusters): header at 0,
refcount table at 64 KiB, refcount block at 128 KiB, L1 table at 192 KiB,
L2 table at 256 KiB, then data: 1 MiB at guest 0 and 64 KiB at guest 4 MiB.
"""

import errno
import json
import os
import struct
import subprocess
import sys

import pytest

from blockd.errors import QMPError
from helpers import qemu_img
from helpers.tools import tmpfs
from qcow2_qemu import LONG, MiB, assert_clean, check, create, io, to_raw
from qcow2_testlib import file_bytes, open_qcow2, patch_file, read_all

HERE = os.path.dirname(os.path.abspath(__file__))
L1, L2, REFTABLE, REFBLOCK = 0x30000, 0x40000, 0x10000, 0x20000
COPIED = 1 << 63


@pytest.fixture
def base(tmp_path):
    path = create(tmp_path / "b.qcow2", 8 * MiB)
    io(path, "write -P 0x5a 0 1M", "write -P 0x6b 4M 64k")
    with open(path, "rb") as f:
        f.seek(L1)
        assert struct.unpack(">Q", f.read(8))[0] == COPIED | L2
    return path


def attempt_open(graph, path, read_only):
    return open_qcow2(graph, path, name="n%d" % len(graph.nodes),
                      **{"read-only": read_only})


def assert_open_fails(graph, path, message):
    """Both read-only and read/write opens fail with ``message``; no change."""
    before = file_bytes(path)
    for read_only in (True, False):
        with pytest.raises(QMPError) as exc:
            attempt_open(graph, path, read_only)
        assert message in exc.value.desc, exc.value.desc
        assert file_bytes(path) == before
    assert not graph.nodes


def assert_io_fails(graph, path, message, write_offset=0, read_ok=False, fatal=True):
    """Opening works; reading (unless ``read_ok``) and writing the damaged
    area fail with EIO and ``message``; nothing is written, even at close.
    A ``fatal`` inconsistency (metadata) makes every later write fail too."""
    before = file_bytes(path)
    for read_only in (True, False):
        node = attempt_open(graph, path, read_only)
        if not read_ok:
            with pytest.raises(OSError) as exc:
                read_all(node)
            assert exc.value.errno == errno.EIO and message in str(exc.value), exc.value
        if not read_only:
            with pytest.raises(OSError) as exc:
                node.pwrite(write_offset, b"w" * 1000)
            assert exc.value.errno == errno.EIO and message in str(exc.value), exc.value
            if fatal:
                with pytest.raises(OSError):
                    node.pwrite(write_offset + 2 * MiB, b"later writes fail too")
        graph.close_all()
        assert file_bytes(path) == before


def be(fmt, value):
    return struct.pack(">" + fmt, value)


@pytest.mark.parametrize("offset,data,message", [
    (0, b"QFI\x00", "Image is not in qcow2 format"),
    (4, be("I", 4), "Unsupported qcow2 version 4"),
    (20, be("I", 23), "Unsupported cluster size: 2^23"),
    (100, be("I", 0x20000), "qcow2 header exceeds cluster size"),
    (8, be("Q", 0x20000), "Invalid backing file offset"),
    (72, be("Q", 1 << 20), "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"),
    (72, be("Q", 1 << 4), "extended L2 entries"),
    (72, be("Q", 1 << 2), "external data file"),
    (32, be("I", 2), "encrypted"),
    (32, be("I", 7), "Unsupported encryption method 7"),
    (96, be("I", 9), "Reference count entry width too large"),
    (40, be("Q", L1 + 8), "Active L1 table offset invalid"),
    (40, be("Q", 1 << 40), "Active L1 table extends past the end of the image file"),
    (40, be("Q", (1 << 63) - 8), "Active L1 table offset invalid"),
    (36, be("I", 0x7FFFFFFF), "Active L1 table too large"),
    (24, be("Q", 1 << 62), "Image is too big"),
    (24, be("Q", 1 << 40), "L1 table is too small"),
    (48, be("Q", REFTABLE + 512), "Reference count table offset invalid"),
    (56, be("I", 0x7FFFFFFF), "Reference count table too large"),
    (56, be("I", 0), "Image does not contain a reference count table"),
    (48, be("Q", 1 << 40), "Reference count table extends past the end"),
    (60, be("I", 0x7FFFFFFF), "Snapshot table too large"),
    (60, be("I", 3) + be("Q", 12345), "Snapshot table offset invalid"),
    (60, be("I", 3) + be("Q", 1 << 40), "Snapshot table extends past the end"),
])
def test_bad_header_fields(graph, base, offset, data, message):
    patch_file(base, offset, data)
    assert_open_fails(graph, base, message)


@pytest.mark.parametrize("length,message", [
    (0, "Image is not in qcow2 format"),
    (100, "qcow2 header too short"),
    (200, "past the end of the image file"),
    (REFTABLE + 100, "past the end of the image file"),
    (L1 + 4, "past the end of the image file"),
])
def test_truncated_metadata(graph, base, length, message):
    os.truncate(base, length)
    assert_open_fails(graph, base, message)


def test_truncated_data(graph, base):
    """The data clusters are cut off: reads fail, nothing changes."""
    os.truncate(base, 0x60000)
    assert_io_fails(graph, base, "past the end of the image file")


@pytest.mark.parametrize("l1_entry,message", [
    (COPIED | (L2 + 512), "L2 table offset 0x40200 unaligned (L1 index: 0)"),
    (COPIED | (1 << 40), "L2 table at 0x10000000000 lies past the end of the image file"),
    (COPIED | REFTABLE, "overlaps with the refcount table"),
    (COPIED | 0, None),
    (COPIED | L1, "overlaps with the active L1 table"),
])
def test_bad_l1_entries(graph, base, l1_entry, message):
    patch_file(base, L1, be("Q", l1_entry))
    if message is None:
        # "COPIED with offset 0": an empty table, the data is just gone.
        node = attempt_open(graph, base, True)
        assert read_all(node) == bytes(8 * MiB)
        return
    assert_io_fails(graph, base, message)


@pytest.mark.parametrize("l2_entry,message", [
    (COPIED | 0x50000 + 512, "Cluster allocation offset 0x50200 unaligned"),
    (COPIED | (1 << 45), "past the end of the image file"),
])
def test_bad_l2_entries(graph, base, l2_entry, message):
    patch_file(base, L2, be("Q", l2_entry))
    assert_io_fails(graph, base, message)


@pytest.mark.parametrize("target,what", [(L1, "active L1 table"), (REFTABLE, "refcount table"),
                                         (REFBLOCK, "refcount block"), (L2, "active L2 table"),
                                         (512, "qcow2_header")])
def test_data_cluster_on_metadata(graph, base, target, what):
    """An L2 entry pointing at metadata: reading shows the metadata bytes
    (as QEMU does), writing is refused before anything is written."""
    if target == 512:
        # Unaligned as well: caught when the entry is used.
        patch_file(base, L2, be("Q", COPIED | target))
        assert_io_fails(graph, base, "Cluster allocation offset 0x200 unaligned")
        return
    patch_file(base, L2, be("Q", COPIED | target))
    assert_io_fails(graph, base, "Preventing invalid write on metadata (overlaps with %s)" % what,
                    read_ok=True)


@pytest.mark.parametrize("entry,message", [
    (L1, "overlaps with the active L1 table"),
    (REFBLOCK + 512, "offset 0x20200 is invalid"),
    (1 << 40, "lies past the end of the image file"),
    (0, None),
])
def test_bad_refcount_table(graph, base, entry, message):
    """Refcount structures are only needed for writing: read-only opens work,
    read/write opens are refused before anything is written."""
    patch_file(base, REFTABLE, be("Q", entry))
    before = file_bytes(base)
    ro = attempt_open(graph, base, True)
    assert read_all(ro) == to_raw(base)
    graph.close_all()
    if message is None:
        # No refcount block for the first clusters: the image is inconsistent
        # (qemu-img check: refcount=0 reference=1); writes allocate elsewhere.
        return
    with pytest.raises(QMPError) as exc:
        attempt_open(graph, base, False)
    assert message in exc.value.desc
    assert file_bytes(base) == before


def test_corrupt_bit(graph, base):
    patch_file(base, 72, be("Q", 2))
    before = file_bytes(base)
    with pytest.raises(QMPError, match="qcow2: Image is corrupt; cannot be opened read/write"):
        attempt_open(graph, base, False)
    node = attempt_open(graph, base, True)
    assert node.driver.image_info()["format-specific"]["data"]["corrupt"] is True
    assert read_all(node)[:MiB] == b"\x5a" * MiB
    graph.close_all()
    assert file_bytes(base) == before


def test_dirty_with_structural_damage(graph, base):
    """A dirty image is repaired on a read/write open only if nothing but
    refcounts and COPIED flags is wrong; otherwise nothing is written."""
    patch_file(base, 72, be("Q", 1))
    patch_file(base, L1 + 8 * 0, be("Q", COPIED | L2))
    patch_file(base, 36, be("I", 2))                   # a second L1 entry...
    patch_file(base, L1 + 8, be("Q", COPIED | (L2 + 4096)))   # ...unaligned
    before = file_bytes(base)
    with pytest.raises(QMPError, match="Could not repair dirty image"):
        attempt_open(graph, base, False)
    assert file_bytes(base) == before
    node = attempt_open(graph, base, True)              # read-only needs no repair
    assert node.pread(0, MiB) == b"\x5a" * MiB


def test_dirty_with_low_refcounts_is_repaired(graph, base):
    """QEMU's lazy refcounts leave referenced clusters at refcount 0: a
    read/write open fixes them, as QEMU's does."""
    patch_file(base, 72, be("Q", 1))
    patch_file(base, REFBLOCK + 2 * 5, be("H", 0))      # cluster 5: referenced, refcount 0
    assert check(base).get("corruptions", 0) > 0
    node = attempt_open(graph, base, False)
    assert node.pread(0, MiB) == b"\x5a" * MiB
    graph.close_all()
    assert_clean(base)


def test_bad_compressed_cluster(graph, tmp_path):
    src = tmp_path / "s.raw"
    with open(src, "wb") as f:
        f.write(b"compress me " * 100000)
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(path))
    entry = struct.unpack(">Q", file_bytes(path)[L2:L2 + 8])[0]
    assert entry & (1 << 62)
    coffset = entry & ((1 << 54) - 1)
    patch_file(path, coffset, b"\xff" * 64)
    # Not a metadata problem: only the requests touching the cluster fail.
    assert_io_fails(graph, path, "cannot be inflated", write_offset=100, fatal=False)


def test_zero_flag_in_v2_image(graph, tmp_path):
    path = create(tmp_path / "v2.qcow2", 8 * MiB, "compat=0.10")
    io(path, "write -P 0x5a 0 1M")
    patch_file(path, L2, be("Q", 1))
    assert_io_fails(graph, path, "Zero cluster entry found in pre-v3 image")


def test_bad_bitmaps_extension(graph, base):
    qemu_img("bitmap", "--add", str(base), "b0")
    data = file_bytes(base)
    pos = data.index(be("I", 0x23852875))
    patch_file(base, pos + 8 + 16, be("Q", 0x12345))      # directory offset
    assert_open_fails(graph, base, "bitmaps_ext: invalid bitmap directory offset")


def test_backing_chain_loop(graph, tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(a, MiB)
    create(b, MiB, backing="a.qcow2", backing_fmt="qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(a))
    before = file_bytes(a), file_bytes(b)
    for path in (a, b):
        with pytest.raises(QMPError, match="Backing file chain loop detected"):
            open_qcow2(graph, path)
    assert (file_bytes(a), file_bytes(b)) == before
    assert not graph.nodes


def test_fuzzed_images(tmp_path):
    """Random damage anywhere in the metadata: only QMPError/EIO, bounded
    memory (the fuzzer runs under a 2 GiB address-space limit), and no
    change to images whose open or I/O failed."""
    seeds = 1500 if LONG else 250
    images = []
    for i, (opts, cmds) in enumerate([
            (("cluster_size=4096",), ("write -P 1 0 1M", "write -z 2M 1M", "write -P 3 5M 100k")),
            (("cluster_size=512", "compat=0.10"), ("write -P 1 0 300k", "write -P 2 2M 64k")),
            (("refcount_bits=1",), ("write -P 1 64k 1M", "discard 128k 64k"))]):
        path = create(tmp_path / ("f%d.qcow2" % i), 8 * MiB, *opts)
        io(path, *cmds)
        images.append(str(path))
    qemu_img("snapshot", "-c", "s", images[0])
    qemu_img("bitmap", "--add", images[0], "bm")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "qcow2_fuzz.py"), str(seeds),
                           str(tmp_path / "work.qcow2")] + images,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["bad"] == [], summary
    # The damage reached every layer: refused opens, failed I/O, working I/O.
    assert summary["open_refused"] and summary["io_failed"] and summary["io_ok"], summary


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_used_cluster_count_matches_a_cluster_by_cluster_count(graph, tmp_path, bits):
    """Refcounts.count_used (block status's metadata-preallocation test) reads only the
    refcount blocks that exist; it must count what a lookup per cluster counts."""
    path = create(tmp_path / "r.qcow2", 4 * MiB, "cluster_size=512", f"refcount_bits={bits}")
    io(path, "write -P 1 0 300k", "write -P 2 2M 64k", "discard 100k 50k", "write -P 3 3M 1k")
    node = open_qcow2(graph, path, **{"read-only": True})
    rc = node.driver.img.refcounts
    end = -(-os.path.getsize(path) // 512)
    for stop in (end, end // 3, end + 5000, 7):
        want = sum(1 for i in range(stop) if rc.get(i))
        assert rc.count_used(stop, 1 << 40) == want, stop
        if want > 3:
            assert 3 <= rc.count_used(stop, 3) <= want


def test_block_status_of_an_image_whose_file_reaches_far_out(graph, tmp_path):
    """Found by bench/fuzz_cov.py: an L2 entry pointing 2^55 bytes out makes a write grow
    the file (sparse) that far, as in QEMU; block status then counted used clusters one
    lookup per cluster of the file (2^46 of them) and hung. Now: the refcount table's
    blocks only. (tmpfs: ext4 refuses such a file with EFBIG.)"""
    with tmpfs(tmp_path / "fs", "16M") as fs:
        path = create(fs / "f.qcow2", 1 * MiB, "cluster_size=512")
        io(path, "write -P 1 0 64k")
        far = 1 << 55
        with open(path, "r+b") as f:
            f.truncate(far)      # what the fuzzed write did to the file, without the write
        node = open_qcow2(graph, path)
        assert node.driver.file.getlength() == far
        n, flags, _depth = node.block_status(0, 65536)
        assert n > 0 and flags
        graph.close_all()
