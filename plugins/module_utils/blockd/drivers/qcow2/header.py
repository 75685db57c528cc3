# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2 header, its extensions, the snapshot table and bitmap directory.

Everything here is pure parsing and serialisation of bytes (QEMU's
docs/interop/qcow2.txt); nothing does I/O except through the small
``read(offset, length)`` callables passed in.  Parsing validates every field
that later sizes a memory allocation or a table read, so a hostile header
cannot make blockd allocate gigabytes: every failure is a :class:`QMPError`
worded as QEMU words it where QEMU has a word for it.
"""

from __future__ import annotations

import struct
from typing import Callable, Dict, List, Optional, Tuple

from ...errors import QMPError

MAGIC = b"QFI\xfb"

#: Length of the version 2 header; version 3 adds fields up to 104 bytes and
#: QEMU writes 112 (``compression_type`` plus padding).
V2_HEADER_LEN = 72
V3_MIN_HEADER_LEN = 104
QEMU_HEADER_LEN = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F

COMPAT_LAZY_REFCOUNTS = 1 << 0

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

#: QEMU's implementation limits (block/qcow2.h).
MAX_L1_SIZE = 0x2000000
MAX_REFTABLE_SIZE = 0x800000
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_BACKING_FILE_NAME = 1023
#: sizeof(bs->backing_format) in QEMU.
BACKING_FORMAT_MAX = 16

#: Byte offsets of header fields that are updated in place.
OFF_SIZE = 24
OFF_L1 = 36             # l1_size (4) + l1_table_offset (8)
OFF_REFTABLE = 48       # refcount_table_offset (8) + refcount_table_clusters (4)
OFF_INCOMPAT = 72

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")

#: The feature name table QEMU 7.2 writes: (type, bit, name).
FEATURE_TABLE = (
    (0, 0, b"dirty bit"),
    (0, 1, b"corrupt bit"),
    (0, 2, b"external data file"),
    (0, 3, b"compression type"),
    (0, 4, b"extended L2 entries"),
    (1, 0, b"lazy refcounts"),
    (2, 0, b"bitmaps"),
    (2, 1, b"raw external data"),
)

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = ~0x7 & 0xFFFFFFFF


class Header:
    """The decoded qcow2 header and the header extensions blockd keeps.

    Unknown header fields and unknown extensions are kept verbatim so that
    :meth:`serialize` writes them back (the spec's "preserve on rewrite").
    """

    def __init__(self) -> None:
        """A version 3 header with QEMU's defaults."""
        self.version = 3
        self.backing_file_offset = 0
        self.backing_file_size = 0
        self.cluster_bits = 16
        self.size = 0
        self.crypt_method = 0
        self.l1_size = 0
        self.l1_table_offset = 0
        self.refcount_table_offset = 0
        self.refcount_table_clusters = 0
        self.nb_snapshots = 0
        self.snapshots_offset = 0
        self.incompatible_features = 0
        self.compatible_features = 0
        self.autoclear_features = 0
        self.refcount_order = 4
        self.header_length = QEMU_HEADER_LEN
        self.compression_type = 0
        #: Bytes of the header past the 112 bytes QEMU knows.
        self.unknown_fields = b""
        self.backing_file: Optional[str] = None
        self.backing_format: Optional[str] = None
        self.data_file: Optional[str] = None
        #: (nb_bitmaps, directory_size, directory_offset) or None.
        self.bitmaps_ext: Optional[Tuple[int, int, int]] = None
        self.has_crypto_ext = False
        #: Raw feature name table (for error messages only).
        self.feature_table = b""
        #: Unknown extensions, in file order: (magic, data).
        self.unknown_exts: List[Tuple[int, bytes]] = []
        #: Whether the bitmaps extension was dropped because the autoclear
        #: bit said it is inconsistent.
        self.dropped_bitmaps = False

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster.

        :return: bytes.
        """
        return 1 << self.cluster_bits

    # -- parsing ------------------------------------------------------------

    @classmethod
    def parse(cls, buf: bytes) -> "Header":
        """Decode the first cluster of an image.

        :param buf: at least the first cluster (shorter when the file is
            shorter; missing bytes read as zeroes, as QEMU's reads past EOF).
        :return: the header.
        :raise QMPError: with QEMU's message for every invalid field.
        """
        if len(buf) < QEMU_HEADER_LEN:
            buf = bytes(buf) + bytes(QEMU_HEADER_LEN - len(buf))
        h = cls()
        (magic, h.version, h.backing_file_offset, h.backing_file_size, h.cluster_bits,
         h.size, h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
         h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset) = _V2.unpack_from(buf, 0)
        if magic != MAGIC:
            raise QMPError("Image is not in qcow2 format")
        if h.version < 2 or h.version > 3:
            raise QMPError("Unsupported qcow2 version %d" % h.version)
        if h.cluster_bits < MIN_CLUSTER_BITS or h.cluster_bits > MAX_CLUSTER_BITS:
            raise QMPError("Unsupported cluster size: 2^%d" % h.cluster_bits)
        cs = 1 << h.cluster_bits
        if len(buf) < cs:
            buf = bytes(buf) + bytes(cs - len(buf))
        if h.version == 2:
            h.incompatible_features = h.compatible_features = h.autoclear_features = 0
            h.refcount_order = 4
            h.header_length = V2_HEADER_LEN
        else:
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = _V3.unpack_from(buf, V2_HEADER_LEN)
            if h.header_length < V3_MIN_HEADER_LEN:
                raise QMPError("qcow2 header too short")
        if h.header_length > cs:
            raise QMPError("qcow2 header exceeds cluster size")
        if h.header_length > QEMU_HEADER_LEN:
            h.unknown_fields = bytes(buf[QEMU_HEADER_LEN:h.header_length])
        if h.backing_file_offset > cs:
            raise QMPError("Invalid backing file offset")
        ext_end = h.backing_file_offset or cs
        h.compression_type = buf[104] if h.header_length > 104 else 0
        if h.compression_type not in (0, 1):
            raise QMPError("qcow2: unknown compression type: %d" % h.compression_type)
        if h.compression_type == 0 and h.incompatible_features & INCOMPAT_COMPRESSION:
            raise QMPError("qcow2: Compression type incompatible feature bit must not be set")
        if h.compression_type != 0 and not h.incompatible_features & INCOMPAT_COMPRESSION:
            raise QMPError("qcow2: Compression type incompatible feature bit must be set")
        unknown = h.incompatible_features & ~INCOMPAT_MASK
        if unknown:
            try:
                h._parse_extensions(buf, ext_end)
            except QMPError:
                pass
            raise QMPError("Unsupported qcow2 feature(s): %s" % h._describe_incompat(unknown))
        if h.refcount_order > 6:
            raise QMPError("Reference count entry width too large; may not exceed 64 bits")
        h._parse_extensions(buf, ext_end)
        if h.backing_file_offset:
            n = h.backing_file_size
            if n > min(MAX_BACKING_FILE_NAME, cs - h.backing_file_offset):
                raise QMPError("Backing file name too long")
            raw = bytes(buf[h.backing_file_offset:h.backing_file_offset + n])
            h.backing_file = raw.decode("utf-8", "surrogateescape")
        return h

    def _parse_extensions(self, buf: bytes, end: int) -> None:
        """Read the extension area ``[header_length, end)`` of ``buf``.

        :param buf: the first cluster.
        :param end: where the extension area ends.
        """
        off = self.header_length
        seen_bitmaps = False
        while off < end:
            if off + 8 > len(buf):
                raise QMPError("Header extension too large")
            magic, length = struct.unpack_from(">II", buf, off)
            off += 8
            if off > end or length > end - off:
                raise QMPError("Header extension too large")
            data = bytes(buf[off:off + length])
            if magic == EXT_END:
                return
            if magic == EXT_BACKING_FORMAT:
                if length >= BACKING_FORMAT_MAX:
                    raise QMPError("ERROR: ext_backing_format: len=%d too large (>=%d)"
                                   % (length, BACKING_FORMAT_MAX))
                self.backing_format = data.decode("utf-8", "replace")
            elif magic == EXT_FEATURE_TABLE:
                self.feature_table = data
            elif magic == EXT_CRYPTO_HEADER:
                self.has_crypto_ext = True
            elif magic == EXT_BITMAPS:
                if seen_bitmaps:
                    raise QMPError("bitmaps_ext: duplicate bitmaps extension")
                seen_bitmaps = True
                self._parse_bitmaps_ext(data)
            elif magic == EXT_DATA_FILE:
                self.data_file = data.decode("utf-8", "replace")
            else:
                self.unknown_exts.append((magic, data))
            off += (length + 7) & ~7

    def _parse_bitmaps_ext(self, data: bytes) -> None:
        """Decode and check the bitmaps extension.

        :param data: its payload.
        """
        if len(data) != 24:
            raise QMPError("bitmaps_ext: Invalid extension length")
        if not self.autoclear_features & AUTOCLEAR_BITMAPS:
            # A program without bitmap support wrote the image: QEMU drops
            # the (now inconsistent) extension on its next header update.
            self.dropped_bitmaps = True
            return
        nb, reserved, dir_size, dir_off = struct.unpack(">IIQQ", data)
        if reserved:
            raise QMPError("bitmaps_ext: Reserved field is not zero")
        if nb > MAX_BITMAPS:
            raise QMPError("bitmaps_ext: Image has %d bitmaps, exceeding the QEMU supported "
                           "maximum of %d" % (nb, MAX_BITMAPS))
        if nb == 0:
            raise QMPError("found bitmaps extension with zero bitmaps")
        if dir_off & (self.cluster_size - 1):
            raise QMPError("bitmaps_ext: invalid bitmap directory offset")
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
            raise QMPError("bitmaps_ext: bitmap directory size (%d) exceeds the maximum "
                           "supported size (%d)" % (dir_size, MAX_BITMAP_DIRECTORY_SIZE))
        self.bitmaps_ext = (nb, dir_size, dir_off)

    def _describe_incompat(self, mask: int) -> str:
        """QEMU's report_unsupported_feature() text for ``mask``.

        :param mask: the unknown incompatible bits.
        :return: the text.
        """
        names = []
        table = self.feature_table
        for pos in range(0, len(table) - 47, 48):
            ftype, bit = table[pos], table[pos + 1]
            name = table[pos + 2:pos + 48].split(b"\0", 1)[0]
            if not name:
                break
            if ftype == 0 and bit < 64 and mask & (1 << bit):
                names.append(name.decode("utf-8", "replace"))
                mask &= ~(1 << bit)
        if mask:
            names.append("Unknown incompatible feature: %x" % mask)
        return ", ".join(names)

    # -- serialisation --------------------------------------------------------

    def serialize(self) -> bytes:
        """The whole first cluster as QEMU's qcow2_update_header() writes it.

        :raise OSError: ENOSPC when the extensions and backing file name do
            not fit into one cluster.

        :return: one cluster of bytes.
        """
        cs = self.cluster_size
        exts = bytearray()
        if self.backing_format:
            exts += _ext(EXT_BACKING_FORMAT, self.backing_format.encode())
        if self.version >= 3 and cs > 4096:
            table = b"".join(struct.pack(">BB46s", t, b, n) for t, b, n in FEATURE_TABLE)
            exts += _ext(EXT_FEATURE_TABLE, table)
        if self.bitmaps_ext is not None:
            nb, dsize, doff = self.bitmaps_ext
            exts += _ext(EXT_BITMAPS, struct.pack(">IIQQ", nb, 0, dsize, doff))
        for magic, data in self.unknown_exts:
            exts += _ext(magic, data)
        exts += _ext(EXT_END, b"")
        if self.version == 2:
            head_len = V2_HEADER_LEN
            header_length = V2_HEADER_LEN
        else:
            head_len = QEMU_HEADER_LEN + len(self.unknown_fields)
            header_length = head_len
        backing = self.backing_file.encode("utf-8", "surrogateescape") if self.backing_file else b""
        total = head_len + len(exts) + len(backing)
        if total > cs:
            raise OSError(28, "qcow2 header does not fit into one cluster")
        bf_off = head_len + len(exts) if backing else 0
        out = bytearray(cs)
        _V2.pack_into(out, 0, MAGIC, self.version, bf_off, len(backing), self.cluster_bits,
                      self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
                      self.refcount_table_offset, self.refcount_table_clusters,
                      self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            _V3.pack_into(out, V2_HEADER_LEN, self.incompatible_features,
                          self.compatible_features, self.autoclear_features,
                          self.refcount_order, header_length)
            out[104] = self.compression_type
            out[QEMU_HEADER_LEN:head_len] = self.unknown_fields
        out[head_len:head_len + len(exts)] = exts
        if backing:
            out[bf_off:bf_off + len(backing)] = backing
        self.backing_file_offset = bf_off
        self.backing_file_size = len(backing)
        self.header_length = header_length
        return bytes(out)


def _ext(magic: int, data: bytes) -> bytes:
    """One header extension, padded to a multiple of 8 bytes.

    :param magic: extension type.
    :param data: payload.
    :return: the bytes.
    """
    pad = (-len(data)) % 8
    return struct.pack(">II", magic, len(data)) + data + bytes(pad)


def validate_table(offset: int, entries: int, entry_len: int, max_bytes: int,
                   name: str, cluster_size: int) -> None:
    """QEMU's qcow2_validate_table(): size limit, then alignment/overflow.

    :param offset: table offset.
    :param entries: table entries.
    :param entry_len: bytes per entry.
    :param max_bytes: QEMU's limit.
    :param name: the table's name in messages.
    :param cluster_size: the cluster size.
    :raise QMPError: "<name> too large" or "<name> offset invalid".
    """
    if entries > max_bytes // entry_len:
        raise QMPError("%s too large" % name)
    if (1 << 63) - 1 - entries * entry_len < offset or offset & (cluster_size - 1):
        raise QMPError("%s offset invalid" % name)


# -- snapshots ----------------------------------------------------------------

_SNAP = struct.Struct(">QIHHIIQII")


class Snapshot:
    """One internal snapshot (only what blockd needs: it never creates them).

    :param l1_table_offset: offset of the snapshot's L1 table.
    :param l1_size: entries in that table.
    """

    def __init__(self, l1_table_offset: int, l1_size: int) -> None:
        """A snapshot entry.

        :param l1_table_offset: see the class.
        :param l1_size: see the class.
        """
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.id_str = ""
        self.name = ""
        self.date_sec = 0
        self.date_nsec = 0
        self.vm_clock_nsec = 0
        self.vm_state_size = 0
        self.disk_size: Optional[int] = None
        self.icount: Optional[int] = None

    def info(self) -> Dict[str, object]:
        """The SnapshotInfo QMP object.

        :return: the object.
        """
        out: Dict[str, object] = {
            "id": self.id_str, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1000000000,
            "vm-clock-nsec": self.vm_clock_nsec % 1000000000,
        }
        if self.icount is not None and self.icount != (1 << 64) - 1:
            out["icount"] = self.icount
        return out


def parse_snapshots(read: Callable[[int, int], bytes], offset: int, count: int,
                    cluster_size: int, file_size: int) -> Tuple[List[Snapshot], int]:
    """Read the snapshot table.

    :param read: ``read(offset, length)`` on the image file.
    :param offset: ``snapshots_offset``.
    :param count: ``nb_snapshots``.
    :param cluster_size: the cluster size.
    :param file_size: the image file's size.
    :return: the snapshots and the table's size in bytes.
    :raise QMPError: on an invalid table.
    """
    snaps: List[Snapshot] = []
    if not count:
        return snaps, 0
    pos = offset
    for i in range(count):
        pos = (pos + 7) & ~7
        if pos - offset + _SNAP.size > MAX_SNAPSHOTS_SIZE or pos + _SNAP.size > file_size:
            raise QMPError("Snapshot table is too big" if pos + _SNAP.size <= file_size
                           else "Snapshot table extends past the end of the image file")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclk, vmsize,
         extra_len) = _SNAP.unpack(read(pos, _SNAP.size))
        pos += _SNAP.size
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA:
            raise QMPError("Too much extra metadata in snapshot table entry %d" % i)
        need = extra_len + id_len + name_len
        if pos + need > file_size or pos + need - offset > MAX_SNAPSHOTS_SIZE:
            raise QMPError("Snapshot table is too big")
        rest = read(pos, need)
        pos += need
        sn = Snapshot(l1_off, l1_size)
        extra = rest[:extra_len]
        sn.vm_state_size = vmsize
        if len(extra) >= 8:
            sn.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            sn.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            sn.icount = struct.unpack_from(">Q", extra, 16)[0]
        sn.id_str = rest[extra_len:extra_len + id_len].decode("utf-8", "replace")
        sn.name = rest[extra_len + id_len:need].decode("utf-8", "replace")
        sn.date_sec, sn.date_nsec, sn.vm_clock_nsec = dsec, dnsec, vmclk
        validate_table(l1_off, l1_size, 8, MAX_L1_SIZE, "Snapshot L1 table", cluster_size)
        if l1_off + l1_size * 8 > file_size:
            raise QMPError("Snapshot L1 table extends past the end of the image file")
        snaps.append(sn)
    return snaps, pos - offset


# -- persistent bitmaps -------------------------------------------------------

_BME = struct.Struct(">QIIBBHI")


class BitmapEntry:
    """One bitmap directory entry.

    :param dir_pos: the entry's byte offset inside the directory.
    """

    def __init__(self, dir_pos: int) -> None:
        """An empty entry.

        :param dir_pos: see the class.
        """
        self.dir_pos = dir_pos
        self.table_offset = 0
        self.table_size = 0
        self.flags = 0
        self.type = 1
        self.granularity_bits = 16
        self.name = ""
        self.extra_data = b""

    def info(self) -> Dict[str, object]:
        """The Qcow2BitmapInfo QMP object.

        :return: the object.
        """
        flags = []
        if self.flags & BME_FLAG_IN_USE:
            flags.append("in-use")
        if self.flags & BME_FLAG_AUTO:
            flags.append("auto")
        return {"flags": flags, "name": self.name, "granularity": 1 << self.granularity_bits}


def parse_bitmap_directory(data: bytes, nb_bitmaps: int, cluster_size: int,
                           image_size: int) -> List[BitmapEntry]:
    """Decode and check the bitmap directory (QEMU's bitmap_list_load checks).

    :param data: the directory bytes.
    :param nb_bitmaps: the count from the extension.
    :param cluster_size: the image's cluster size.
    :param image_size: the virtual size (to check the tables' sizes).
    :return: the entries, in directory order.
    :raise QMPError: on an invalid directory.
    """
    out: List[BitmapEntry] = []
    pos = 0
    names = set()
    while pos < len(data):
        if pos + _BME.size > len(data):
            raise QMPError("Broken bitmap directory")
        ent = BitmapEntry(pos)
        (ent.table_offset, ent.table_size, ent.flags, ent.type, ent.granularity_bits,
         name_size, extra) = _BME.unpack_from(data, pos)
        end = pos + _BME.size + extra + name_size
        if end > len(data):
            raise QMPError("Broken bitmap directory")
        ent.extra_data = bytes(data[pos + _BME.size:pos + _BME.size + extra])
        ent.name = bytes(data[end - name_size:end]).decode("utf-8", "replace")
        fail = None
        if ent.type != 1:
            fail = "unknown type"
        elif ent.granularity_bits < 9 or ent.granularity_bits > 31:
            fail = "invalid granularity"
        elif name_size == 0 or name_size > 1023:
            fail = "invalid name size"
        elif ent.flags & BME_RESERVED_FLAGS:
            fail = "reserved flags set"
        elif ent.table_offset & (cluster_size - 1):
            fail = "unaligned bitmap table"
        elif extra and not ent.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE:
            fail = "incompatible extra data"
        else:
            bits = -(-image_size // (1 << ent.granularity_bits))
            need = -(-(-(-bits // 8)) // cluster_size)
            if ent.table_size != need and not ent.flags & BME_FLAG_IN_USE:
                fail = "bitmap table size does not match the image size"
            elif ent.table_size > (1 << 27):
                fail = "bitmap table too large"
        if fail:
            raise QMPError("Bitmap '%s' doesn't satisfy the constraints: %s" % (ent.name, fail))
        if ent.name in names:
            raise QMPError("Bitmap directory has duplicate bitmap name '%s'" % ent.name)
        names.add(ent.name)
        out.append(ent)
        pos = (end + 7) & ~7
    if len(out) != nb_bitmaps:
        raise QMPError("Bitmap directory has %d entries, but the header says %d"
                       % (len(out), nb_bitmaps))
    return out
