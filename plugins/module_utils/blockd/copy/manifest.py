# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backup manifests: checksums per extent and for the whole disk.

Digest scheme ``sha256-blocks-1MiB``: the logical disk is cut into 1 MiB
blocks (the last one may be shorter); each block's hash is
``sha256(block bytes)``.  An extent (always block aligned) carries the
concatenated hashes of its blocks (``blocks``, hex) and
``sha256 = sha256(those hashes)``; the whole-disk ``disk_sha256`` is
``sha256`` over every block hash in disk order.  A zero block's hash is a
constant, so holes of any size cost 32 bytes of hashing per MiB (a 1 TiB
empty disk hashes 32 MiB), and an incremental backup takes the unchanged
blocks' hashes from its base's manifest without reading the base.

The manifest is JSON with a self-checksum (``manifest_sha256`` over the
canonical JSON of every other member), so a corrupted or edited manifest is
refused.  QEMU has no equivalent (qemu-img convert writes no manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit

from .errors import CopyError

FORMAT_VERSION = 1
ALGORITHM = "sha256-blocks-1MiB"
BLOCK = 1 << 20
_ZERO_MIB = bytes(BLOCK)
#: sha256 of a zero 1 MiB block.
ZERO_HASH = hashlib.sha256(_ZERO_MIB).digest()
EXTENT_TYPES = ("data", "zero", "hole", "unchanged")
_SECRET_KEYS = ("tls-psk", "tls-psk-file", "password", "tls-private-key", "psk")


def block_hash(data: Any) -> bytes:
    """sha256 of one block (bytes-like)."""
    return hashlib.sha256(data).digest()


def hash_blocks(buf: Any) -> bytes:
    """The concatenated hashes of ``buf``'s blocks (``buf`` starts on a block boundary).

    An all-zero block takes :data:`ZERO_HASH` without being hashed: the test
    is a ``memcmp`` against a zero block (``bytes.startswith`` takes the view
    without copying it, some 50 times faster than sha256, and it stops at the
    first non-zero byte), so data costs nothing more and zeroes inside data
    extents (preallocated or zero-filled space) cost next to nothing.
    """
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    out = []
    for i in range(0, len(mv), BLOCK):
        blk = mv[i:i + BLOCK]
        if _ZERO_MIB.startswith(blk):
            out.append(zero_block_hash(len(blk)))
        else:
            out.append(hashlib.sha256(blk).digest())
    return b"".join(out)


def zero_block_hash(length: int) -> bytes:
    """Hash of a zero block of ``length`` bytes (the full-size one is cached)."""
    return ZERO_HASH if length == BLOCK else hashlib.sha256(bytes(length)).digest()


def zero_hashes(offset: int, length: int) -> bytes:
    """Concatenated block hashes of ``length`` zero bytes at block-aligned ``offset``.

    Only the disk's last block can be short, so all but the last are constant.
    """
    full, rest = divmod(length, BLOCK)
    return ZERO_HASH * full + (zero_block_hash(rest) if rest else b"")


class DiskDigest:
    """Whole-disk digest fed with block hashes in order (zero runs in bulk)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.blocks = 0

    def add(self, hashes: bytes) -> None:
        """Feed concatenated block hashes."""
        self._h.update(hashes)
        self.blocks += len(hashes) // 32

    def add_zero(self, length: int) -> None:
        """Feed the hashes of ``length`` zero bytes (block aligned), 16 MiB of hashes at a time."""
        full, rest = divmod(length, BLOCK)
        step = 1 << 19  # 512 Ki hashes (16 MiB) per update
        chunk = ZERO_HASH * min(step, full)
        while full:
            n = min(step, full)
            self._h.update(chunk if n == step or n == len(chunk) // 32 else chunk[:32 * n])
            full -= n
            self.blocks += n
        if rest:
            self.add(zero_block_hash(rest))

    def hexdigest(self) -> str:
        """The digest so far."""
        return self._h.hexdigest()


def extent_entry(offset: int, length: int, kind: str, hashes: Optional[bytes]) -> Dict[str, Any]:
    """A manifest extent: zero/hole extents omit ``blocks`` (their hashes are implied)."""
    if hashes is None:
        hashes = zero_hashes(offset, length)
        entry = {"offset": offset, "length": length, "type": kind}
    else:
        entry = {"offset": offset, "length": length, "type": kind, "blocks": hashes.hex()}
    entry["sha256"] = hashlib.sha256(hashes).hexdigest()
    return entry


def entry_hashes(entry: Dict[str, Any]) -> bytes:
    """The concatenated block hashes an extent entry stands for."""
    if "blocks" in entry:
        return bytes.fromhex(entry["blocks"])
    return zero_hashes(entry["offset"], entry["length"])


def redact_uri(uri: str) -> str:
    """The source URI without secrets (user info, PSK/key query parameters)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable uri>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in _SECRET_KEYS]
    text = "%s://%s%s" % (parts.scheme, netloc, parts.path)
    return text + ("?" + urlencode(query, safe="/") if query else "")


def _canonical(doc: Dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(doc: Dict[str, Any]) -> Dict[str, Any]:
    """Add the self-checksum."""
    doc["manifest_sha256"] = hashlib.sha256(_canonical(doc)).hexdigest()
    return doc


def fsync_dir(path: str) -> None:
    """fsync the directory holding ``path`` (makes a rename durable)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, doc: Dict[str, Any], durable: bool = True) -> None:
    """Write ``path`` through ``path.tmp`` + rename (fsync'd when ``durable``)."""
    tmp = path + ".tmp"
    data = json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path)


def load(path: str, what: str = "manifest") -> Dict[str, Any]:
    """Read and check a manifest.

    :raise CopyError: (kind ``manifest``) when it is missing, not JSON, of an
        unknown version, inconsistent, or its self-checksum does not match.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CopyError("manifest", "cannot read %s %s: %s" % (what, path, exc.strerror)) from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise CopyError("manifest", "corrupted %s %s: not JSON (%s)" % (what, path, exc)) from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION \
            or doc.get("algorithm") != ALGORITHM:
        raise CopyError("manifest", "corrupted %s %s: unknown format" % (what, path))
    if doc.get("manifest_sha256") != hashlib.sha256(_canonical(doc)).hexdigest():
        raise CopyError("manifest", "corrupted %s %s: checksum mismatch" % (what, path))
    if doc.get("status") != "complete":
        raise CopyError("manifest", "%s %s is not complete" % (what, path))
    check_extents(doc["extents"], doc["size"], "%s %s" % (what, path))
    return doc


def check_extents(extents: List[Dict[str, Any]], size: int, what: str) -> None:
    """Extents must tile ``[0, size)`` in order, block aligned, with consistent hashes."""
    pos = 0
    for e in extents:
        off, length = e.get("offset"), e.get("length")
        if off != pos or not isinstance(length, int) or length <= 0 or off % BLOCK \
                or e.get("type") not in EXTENT_TYPES:
            raise CopyError("manifest", "corrupted %s: bad extent at offset %r" % (what, off))
        hashes = entry_hashes(e)
        if len(hashes) != 32 * -(-length // BLOCK) \
                or hashlib.sha256(hashes).hexdigest() != e.get("sha256"):
            raise CopyError("manifest", "corrupted %s: extent at %d inconsistent" % (what, off))
        pos += length
    if pos != size:
        raise CopyError("manifest", "corrupted %s: extents cover %d of %d bytes"
                        % (what, pos, size))


def file_digest(path: str) -> str:
    """sha256 of a (small) file's bytes, used to pin a base manifest."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
