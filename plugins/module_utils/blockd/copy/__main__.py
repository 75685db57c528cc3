# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``python3 -m blockd.copy pull URI DEST [...]`` / ``verify DEST [...]`` /
``restore BACKUP DEST [...]``.

Prints one line of JSON (the result, or ``{"status": "error", ...}``) and
exits 0 on success, else the code of :data:`~blockd.copy.errors.EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, NoReturn, Optional, Tuple

from ..nbd.client import tls_context
from .engine import copy, dumps
from .errors import CopyError
from .restore import restore, restore_to_nbd
from .verify import verify, verify_against


def _ranges(text: str) -> List[Tuple[int, int]]:
    """``OFF:LEN,OFF:LEN`` (bytes)."""
    out = []
    for part in filter(None, text.split(",")):
        off, _, length = part.partition(":")
        out.append((int(off, 0), int(length, 0)))
    return out


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line JSON with exit code 1 (2 means "verify")."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(dumps({"status": "error", "error": "usage", "message": message}))
        sys.exit(1)


def parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = _Parser(prog="python3 -m blockd.copy", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pull = sub.add_parser("pull", help="copy an NBD export into a backup file")
    pull.add_argument("uri")
    pull.add_argument("dest")
    pull.add_argument("--format", "-O", default="raw", choices=("raw", "qcow2"))
    pull.add_argument("--base", help="previous backup: write an incremental qcow2 overlay")
    pull.add_argument("--extents", type=_ranges, help="dirty ranges OFF:LEN,... (incremental)")
    pull.add_argument("--dirty-bitmap", help="take dirty ranges from qemu:dirty-bitmap:NAME")
    pull.add_argument("--connections", type=int, default=4)
    pull.add_argument("--inflight", type=int, default=16)
    pull.add_argument("--progress-file")
    pull.add_argument("--manifest")
    pull.add_argument("--no-resume", action="store_true")
    pull.add_argument("--commit-mib", type=int, default=256,
                      help="flush and record resume state at least every N MiB")
    pull.add_argument("--overwrite", action="store_true")
    pull.add_argument("--tls-cert-dir", help="x509 directory (ca-cert.pem, client-cert.pem...)")
    ver = sub.add_parser("verify", help="check a backup against its manifest")
    ver.add_argument("dest")
    ver.add_argument("--manifest")
    ver.add_argument("--against", metavar="URI", help="also compare with a live export")
    res = sub.add_parser("restore", help="restore a backup (chain) to an image or an NBD export")
    res.add_argument("backup")
    res.add_argument("dest", nargs="?", help="the image to create (not with --to-nbd)")
    res.add_argument("--format", "-O", default="raw", choices=("raw", "qcow2"))
    res.add_argument("--to-nbd", metavar="URI", help="write into this writable NBD export")
    res.add_argument("--manifest")
    res.add_argument("--no-verify", action="store_true")
    res.add_argument("--overwrite", action="store_true")
    res.add_argument("--tls-cert-dir", help="x509 directory (ca-cert.pem, client-cert.pem...)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit code."""
    p = parser()
    args = p.parse_args(argv)
    if args.cmd == "restore" and (args.dest is None) == (args.to_nbd is None):
        p.error("restore needs exactly one of DEST and --to-nbd URI")
    try:
        if args.cmd == "pull":
            kw = {}
            if args.tls_cert_dir:
                kw["tls"] = tls_context(certificates_dir=args.tls_cert_dir)
            res = copy(args.uri, args.dest, args.format, base=args.base, extents=args.extents,
                       dirty_bitmap=args.dirty_bitmap, connections=args.connections,
                       inflight=args.inflight, progress_file=args.progress_file,
                       manifest=args.manifest, resume=not args.no_resume,
                       overwrite=args.overwrite, commit_bytes=args.commit_mib << 20, **kw)
        elif args.cmd == "restore":
            kw = {}
            if args.tls_cert_dir:
                kw["tls"] = tls_context(certificates_dir=args.tls_cert_dir)
            if args.to_nbd:
                res = restore_to_nbd(args.backup, args.to_nbd, manifest=args.manifest,
                                     verify=not args.no_verify, **kw)
            else:
                res = restore(args.backup, args.dest, args.format, manifest=args.manifest,
                              verify=not args.no_verify, overwrite=args.overwrite)
        elif args.against:
            res = verify_against(args.against, args.dest, args.manifest)
        else:
            res = verify(args.dest, args.manifest)
    except CopyError as exc:
        print(dumps(exc.to_dict()))
        return exc.exit_code
    except KeyboardInterrupt:
        print(dumps({"status": "error", "error": "interrupted", "message": "interrupted"}))
        return 130
    print(dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
