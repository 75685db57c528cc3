# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Verifying a backup against its manifest, or against a live export.

The output is re-read through blockd's own drivers (a qcow2 overlay with
its backing chain, as ``qemu-img compare`` would read it); zero/hole extents
are checked by block status first and only read when not reported zero.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from . import manifest as mf
from .engine import CHUNK, export_digest
from .errors import CopyError
from .manifest import BLOCK, DiskDigest
from .output import LocalImage


def verify(dest: str, manifest: Optional[str] = None) -> Dict[str, Any]:
    """Check every extent checksum and the whole-disk digest of ``dest``.

    :raise CopyError: ``manifest`` when the manifest is unusable, ``verify``
        when the output differs (the first bad offset is in the message; the
        exception's ``bad_extents`` lists every mismatching manifest extent:
        ``offset``, ``length``, ``type``, ``first_bad_offset``, ``bad_blocks``).
    """
    started = time.monotonic()
    manifest = manifest or dest + ".manifest.json"
    doc = mf.load(manifest)
    img = LocalImage(dest, doc["format"], "backup")
    try:
        if img.size != doc["size"]:
            raise CopyError("verify", "%s is %d bytes, its manifest says %d"
                            % (dest, img.size, doc["size"]))
        digest = DiskDigest()
        bad = []
        read = 0
        for e in doc["extents"]:
            off, length = e["offset"], e["length"]
            want = mf.entry_hashes(e)
            if e["type"] in ("zero", "hole") and img.is_zero(off, length):
                got = want
            else:
                got = b"".join(mf.hash_blocks(img.pread(o, min(CHUNK, off + length - o)))
                               for o in range(off, off + length, CHUNK))
                read += length
            if got != want:
                first = next(i for i in range(0, len(got), 32) if got[i:i + 32] != want[i:i + 32])
                bad.append({"offset": off, "length": length, "type": e["type"],
                            "first_bad_offset": off + first // 32 * BLOCK,
                            "bad_blocks": sum(got[i:i + 32] != want[i:i + 32]
                                              for i in range(0, len(got), 32))})
            digest.add(got)
        if bad:
            err = CopyError("verify", "%s differs from its manifest in %d extent(s), first at "
                            "offset %d" % (dest, len(bad), bad[0]["first_bad_offset"]))
            err.bad_extents = bad  # type: ignore[attr-defined]  # (offset, length, type...)
            raise err
        if digest.hexdigest() != doc["disk_sha256"]:
            raise CopyError("verify", "%s: whole-disk digest mismatch" % dest)
        return {"status": "ok", "dest": dest, "manifest": manifest, "size": doc["size"],
                "disk_sha256": doc["disk_sha256"], "extents": len(doc["extents"]),
                "bytes_read": read, "duration": round(time.monotonic() - started, 3)}
    finally:
        img.close()


def verify_against(source: Any, dest: str, manifest: Optional[str] = None,
                   **kwargs: Any) -> Dict[str, Any]:
    """Verify ``dest`` against its manifest, then the manifest against a live export."""
    res = verify(dest, manifest)
    live = export_digest(source, **kwargs)
    if live["size"] != res["size"]:
        raise CopyError("verify", "export is %d bytes, the backup %d" % (live["size"], res["size"]))
    if live["disk_sha256"] != res["disk_sha256"]:
        doc = mf.load(manifest or dest + ".manifest.json")
        mine = b"".join(mf.entry_hashes(e) for e in doc["extents"])
        theirs = b"".join(mf.entry_hashes(e) for e in live["entries"])
        first = next((i for i in range(0, min(len(mine), len(theirs)), 32)
                      if mine[i:i + 32] != theirs[i:i + 32]), 0)
        raise CopyError("verify", "%s differs from the export, first at offset %d"
                        % (dest, first // 32 * BLOCK))
    res["against"] = mf.redact_uri(source) if isinstance(source, str) else "<client>"
    return res
