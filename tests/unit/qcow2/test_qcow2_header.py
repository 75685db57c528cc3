"""The qcow2 header: parsing, QEMU's error texts, rewriting what is not understood."""

import struct

import pytest

from blockd.drivers.qcow2 import header as hdr
from blockd.errors import QMPError


def make_header(version=3, cluster_bits=16, **fields):
    """A header object with sane defaults (an empty 1 GiB image)."""
    h = hdr.Header()
    h.version = version
    h.cluster_bits = cluster_bits
    h.size = 1 << 30
    h.l1_size = 2
    h.l1_table_offset = 3 << cluster_bits
    h.refcount_table_offset = 1 << cluster_bits
    h.refcount_table_clusters = 1
    for key, value in fields.items():
        setattr(h, key, value)
    return h


def raw(h):
    return bytearray(h.serialize())


@pytest.mark.parametrize("version", [2, 3])
def test_roundtrip(version):
    h = make_header(version, backing_file="base.qcow2", backing_format="qcow2")
    buf = raw(h)
    assert len(buf) == 65536
    back = hdr.Header.parse(bytes(buf))
    for field in ("version", "cluster_bits", "size", "l1_size", "l1_table_offset",
                  "refcount_table_offset", "refcount_table_clusters", "refcount_order",
                  "backing_file", "backing_format"):
        assert getattr(back, field) == getattr(h, field), field
    assert back.header_length == (72 if version == 2 else 112)
    # The feature name table is written for v3 with clusters over 4 KiB only.
    assert (struct.pack(">I", hdr.EXT_FEATURE_TABLE) in bytes(buf[:4096])) == (version == 3)


def test_small_clusters_omit_feature_table():
    buf = raw(make_header(3, 12))
    assert struct.pack(">I", hdr.EXT_FEATURE_TABLE) not in bytes(buf)


def test_unknown_fields_and_extensions_survive_a_rewrite():
    h = make_header()
    buf = raw(h)
    # Make the header 120 bytes long with 8 unknown bytes, and add an
    # unknown extension before the end marker.
    struct.pack_into(">I", buf, 100, 120)
    body = bytes(buf[112:])
    buf[112:120] = b"UNKNOWN!"
    ext = struct.pack(">II", 0x12345678, 5) + b"hello" + bytes(3)
    buf[120:] = (ext + body)[:len(buf) - 120]
    back = hdr.Header.parse(bytes(buf))
    assert back.unknown_fields == b"UNKNOWN!"
    assert back.unknown_exts == [(0x12345678, b"hello")]
    again = hdr.Header.parse(back.serialize())
    assert again.unknown_fields == b"UNKNOWN!"
    assert again.unknown_exts == [(0x12345678, b"hello")]
    assert again.header_length == 120


@pytest.mark.parametrize("patch,message", [
    ((0, b"QFI\xfa"), "Image is not in qcow2 format"),
    ((4, struct.pack(">I", 4)), "Unsupported qcow2 version 4"),
    ((4, struct.pack(">I", 1)), "Unsupported qcow2 version 1"),
    ((20, struct.pack(">I", 8)), "Unsupported cluster size: 2^8"),
    ((20, struct.pack(">I", 22)), "Unsupported cluster size: 2^22"),
    ((100, struct.pack(">I", 100)), "qcow2 header too short"),
    ((100, struct.pack(">I", 70000)), "qcow2 header exceeds cluster size"),
    ((8, struct.pack(">Q", 70000)), "Invalid backing file offset"),
    ((96, struct.pack(">I", 7)), "Reference count entry width too large; may not exceed 64 bits"),
    ((72, struct.pack(">Q", 1 << 40)),
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"),
    ((104, b"\x02"), "qcow2: unknown compression type: 2"),
    ((72, struct.pack(">Q", hdr.INCOMPAT_COMPRESSION)),
     "qcow2: Compression type incompatible feature bit must not be set"),
])
def test_invalid_headers(patch, message):
    buf = raw(make_header())
    offset, data = patch
    buf[offset:offset + len(data)] = data
    with pytest.raises(QMPError) as exc:
        hdr.Header.parse(bytes(buf))
    assert exc.value.desc == message


def test_unknown_feature_named_from_the_feature_table():
    buf = raw(make_header())
    # Name bit 9 in the image's own feature table, then set bits 9 and 10.
    pos = buf.index(b"raw external data") - 2 + 48
    struct.pack_into(">BB46s", buf, pos, 0, 9, b"future feature")
    length_at = buf.index(struct.pack(">I", hdr.EXT_FEATURE_TABLE)) + 4
    struct.pack_into(">I", buf, length_at, struct.unpack_from(">I", buf, length_at)[0] + 48)
    struct.pack_into(">Q", buf, 72, (1 << 9) | (1 << 10))
    with pytest.raises(QMPError) as exc:
        hdr.Header.parse(bytes(buf))
    assert exc.value.desc == ("Unsupported qcow2 feature(s): future feature, "
                              "Unknown incompatible feature: 400")


def test_extension_past_the_area():
    buf = raw(make_header())
    struct.pack_into(">II", buf, 112, 0x1, 0xFFFFFF00)
    with pytest.raises(QMPError, match="Header extension too large"):
        hdr.Header.parse(bytes(buf))


def test_backing_format_too_long():
    buf = raw(make_header(backing_file="b", backing_format="x" * 15))
    struct.pack_into(">I", buf, 116, 16)
    with pytest.raises(QMPError, match="ext_backing_format: len=16 too large"):
        hdr.Header.parse(bytes(buf))


def test_backing_name_too_long():
    buf = raw(make_header(backing_file="b"))
    struct.pack_into(">I", buf, 16, 1024)
    with pytest.raises(QMPError, match="Backing file name too long"):
        hdr.Header.parse(bytes(buf))


def test_bitmaps_extension_checks():
    h = make_header(autoclear_features=hdr.AUTOCLEAR_BITMAPS)
    h.bitmaps_ext = (0, 0, 4 << 16)
    with pytest.raises(QMPError, match="found bitmaps extension with zero bitmaps"):
        hdr.Header.parse(h.serialize())
    h.bitmaps_ext = (1, 64, (4 << 16) + 8)
    with pytest.raises(QMPError, match="invalid bitmap directory offset"):
        hdr.Header.parse(h.serialize())
    # Without the autoclear bit the extension is inconsistent and dropped.
    h.bitmaps_ext = (1, 64, 4 << 16)
    h.autoclear_features = 0
    back = hdr.Header.parse(h.serialize())
    assert back.bitmaps_ext is None and back.dropped_bitmaps


def test_validate_table():
    with pytest.raises(QMPError, match="^Active L1 table too large$"):
        hdr.validate_table(1 << 16, 1 << 23, 8, hdr.MAX_L1_SIZE, "Active L1 table", 1 << 16)
    with pytest.raises(QMPError, match="^Active L1 table offset invalid$"):
        hdr.validate_table(12345, 2, 8, hdr.MAX_L1_SIZE, "Active L1 table", 1 << 16)
    hdr.validate_table(1 << 16, 2, 8, hdr.MAX_L1_SIZE, "Active L1 table", 1 << 16)


def test_header_too_big_for_one_cluster():
    h = make_header(3, 9, backing_file="x" * 400, backing_format="qcow2")
    with pytest.raises(OSError):
        h.serialize()


def test_bitmap_directory_parsing():
    entry = struct.pack(">QIIBBHI", 5 << 16, 1, hdr.BME_FLAG_AUTO, 1, 16, 2, 0) + b"b0"
    entry += bytes(-len(entry) % 8)
    bms = hdr.parse_bitmap_directory(entry, 1, 1 << 16, 1 << 30)
    assert [b.info() for b in bms] == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]
    with pytest.raises(QMPError, match="header says 2"):
        hdr.parse_bitmap_directory(entry, 2, 1 << 16, 1 << 30)
    bad = bytearray(entry)
    bad[17] = 40        # granularity bits
    with pytest.raises(QMPError, match="invalid granularity"):
        hdr.parse_bitmap_directory(bytes(bad), 1, 1 << 16, 1 << 30)
