"""blockd.copy.manifest: the block-hash digest scheme and manifest integrity."""

import hashlib
import json

import pytest

from blockd.copy import CopyError
from blockd.copy import manifest as mf

MiB = 1 << 20


def test_zero_digest_equals_hashing_zeroes():
    size = 5 * MiB + 4096
    d1 = mf.DiskDigest()
    d1.add_zero(size)
    blocks = [bytes(min(MiB, size - o)) for o in range(0, size, MiB)]
    want = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blocks)).hexdigest()
    assert d1.hexdigest() == want and d1.blocks == 6
    big = mf.DiskDigest()
    big.add_zero(1 << 40)  # 1 TiB: 1 Mi constant hashes
    assert big.blocks == 1 << 20
    assert big.hexdigest() == hashlib.sha256(mf.ZERO_HASH * (1 << 20)).hexdigest()


def _sha_blocks(data):
    return b"".join(hashlib.sha256(data[o:o + MiB]).digest() for o in range(0, len(data), MiB))


@pytest.mark.parametrize("layout", [
    "D", "Z", "DZD", "ZDZZ", "d", "z", "Dz", "Zd",   # upper: 1 MiB block; lower: 100-byte tail
    "Zl",                                          # a zero block then a zero block but its last byte
])
def test_hash_blocks_equals_sha256_per_block(layout):
    """hash_blocks takes zero blocks' hash without hashing them: same result as hashing."""
    parts = {"D": lambda: bytes(range(256)) * 4096, "Z": lambda: bytes(MiB),
             "d": lambda: b"\x07" * 100, "z": lambda: bytes(100),
             "l": lambda: bytes(MiB - 1) + b"\x01"}
    data = b"".join(parts[c]() for c in layout)
    want = _sha_blocks(data)
    assert mf.hash_blocks(data) == want
    buf = bytearray(MiB) + bytearray(data)  # a view into a larger buffer, as the copy passes
    assert mf.hash_blocks(memoryview(buf)[MiB:]) == want
    if len(data) % 8 == 0:  # a view of another format is hashed as its bytes
        assert mf.hash_blocks(memoryview(data).cast("Q")) == want


def test_extent_entries():
    data = b"\x01" * MiB + b"\x02" * 100
    hashes = mf.block_hash(data[:MiB]) + mf.block_hash(data[MiB:])
    e = mf.extent_entry(0, len(data), "data", hashes)
    assert e["sha256"] == hashlib.sha256(hashes).hexdigest() and mf.entry_hashes(e) == hashes
    z = mf.extent_entry(MiB, 3 * MiB, "hole", None)
    assert "blocks" not in z and mf.entry_hashes(z) == mf.ZERO_HASH * 3


def _doc(tmp_path):
    doc = {"format_version": 1, "algorithm": mf.ALGORITHM, "status": "complete", "size": 2 * MiB,
           "extents": [mf.extent_entry(0, 2 * MiB, "zero", None)], "disk_sha256": "x"}
    path = str(tmp_path / "m.json")
    mf.write_json_atomic(path, mf.seal(doc))
    return path, doc


def test_load_checks_integrity(tmp_path):
    path, doc = _doc(tmp_path)
    assert mf.load(path)["size"] == 2 * MiB
    text = open(path).read()
    open(path, "w").write(text.replace('"zero"', '"hole"'))
    with pytest.raises(CopyError, match="checksum mismatch") as err:
        mf.load(path)
    assert err.value.kind == "manifest" and err.value.exit_code == 5
    doc["size"] = 3 * MiB
    mf.write_json_atomic(path, mf.seal(dict(doc)))
    with pytest.raises(CopyError, match="cover"):
        mf.load(path)
    doc["status"] = "running"
    mf.write_json_atomic(path, mf.seal(dict(doc)))
    with pytest.raises(CopyError, match="not complete"):
        mf.load(path)
    with pytest.raises(CopyError, match="cannot read"):
        mf.load(str(tmp_path / "nope.json"))
    json.loads(open(path).read())


def test_redact_uri():
    assert mf.redact_uri("nbd+unix:///x?socket=/run/s.sock&tls-psk-file=/k") == \
        "nbd+unix:///x?socket=/run/s.sock"
    assert mf.redact_uri("nbds://user:pw@host:10809/exp") == "nbds://host:10809/exp"
