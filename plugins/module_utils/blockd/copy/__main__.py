# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``python3 -m blockd.copy pull URI DEST [...]`` / ``verify DEST [...]`` /
``restore BACKUP DEST [...]``.

Prints one line of JSON (the result, or ``{"status": "error", ...}``) and
exits 0 on success, else the code of :data:`~blockd.copy.errors.EXIT_CODES`.

An ``nbd+ssh://[USER@]HOST[:PORT]/EXPORT?socket=PATH`` source or target goes
through an SSH tunnel (paramiko): ``--ssh-identity``, ``--ssh-known-hosts``
(strict host key checking), ``--ssh-passphrase-file``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, NoReturn, Optional, Tuple

from ..nbd.client import tls_context
from .engine import copy, dumps
from .errors import CopyError
from .restore import restore, restore_to_nbd
from .verify import verify, verify_against


def _ranges(text: str) -> List[Tuple[int, int]]:
    """``OFF:LEN,OFF:LEN`` (bytes)."""
    out = []
    for part in filter(None, text.split(",")):
        off, _sep, length = part.partition(":")
        out.append((int(off, 0), int(length, 0)))
    return out


def _ssh_options(p: argparse.ArgumentParser) -> None:
    """The options of an ``nbd+ssh://`` URI."""
    g = p.add_argument_group("nbd+ssh:// (SSH tunnel)")
    g.add_argument("--ssh-identity", action="append", metavar="KEY",
                   help="private key to authenticate with (default: ~/.ssh/id_* and ssh-agent)")
    g.add_argument("--ssh-known-hosts", action="append", metavar="FILE",
                   help="known_hosts file the server's host key must be in "
                        "(default: ~/.ssh/known_hosts, /etc/ssh/ssh_known_hosts)")
    g.add_argument("--ssh-passphrase-file", metavar="FILE",
                   help="file holding the passphrase of the identity file")


def _connect_kwargs(args: argparse.Namespace, uri: Optional[str]) -> Dict[str, Any]:
    """NBD connection options from the CLI: TLS context, SSH tunnel options."""
    kw: Dict[str, Any] = {}
    if getattr(args, "tls_cert_dir", None):
        kw["tls"] = tls_context(certificates_dir=args.tls_cert_dir)
    ssh: Dict[str, Any] = {}
    if args.ssh_identity:
        ssh["ssh_identity"] = args.ssh_identity
    if args.ssh_known_hosts:
        ssh["ssh_known_hosts"] = args.ssh_known_hosts
    if args.ssh_passphrase_file:
        try:
            with open(args.ssh_passphrase_file, encoding="utf-8") as f:
                ssh["ssh_passphrase"] = f.read().rstrip("\r\n")
        except OSError as exc:
            raise CopyError("usage", "cannot read --ssh-passphrase-file %s: %s"
                            % (args.ssh_passphrase_file, exc.strerror or exc)) from None
    if ssh and not (uri or "").lower().startswith(("nbd+ssh://", "nbds+ssh://")):
        raise CopyError("usage", "--ssh-* options need an nbd+ssh:// or nbds+ssh:// URI")
    kw.update(ssh)
    return kw


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line JSON with exit code 1 (2 means "verify")."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stdout.write(dumps({"status": "error", "error": "usage", "message": message}) + "\n")
        raise SystemExit(1)


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
    pull.add_argument("--connections", type=int, help="default: one per CPU, at most 4")
    pull.add_argument("--inflight", type=int, help="1 MiB reads in flight (default 4)")
    pull.add_argument("--progress-file")
    pull.add_argument("--manifest")
    pull.add_argument("--no-resume", action="store_true")
    pull.add_argument("--commit-mib", type=int, default=256,
                      help="flush and record resume state at least every N MiB")
    pull.add_argument("--overwrite", action="store_true")
    pull.add_argument("--tls-cert-dir", help="x509 directory (ca-cert.pem, client-cert.pem...)")
    _ssh_options(pull)
    ver = sub.add_parser("verify", help="check a backup against its manifest")
    ver.add_argument("dest")
    ver.add_argument("--manifest")
    ver.add_argument("--against", metavar="URI", help="also compare with a live export")
    _ssh_options(ver)
    res = sub.add_parser("restore", help="restore a backup (chain) to an image or an NBD export")
    res.add_argument("backup")
    res.add_argument("dest", nargs="?", help="the image to create (not with --to-nbd)")
    res.add_argument("--format", "-O", default="raw", choices=("raw", "qcow2"))
    res.add_argument("--to-nbd", metavar="URI", help="write into this writable NBD export")
    res.add_argument("--manifest")
    res.add_argument("--no-verify", action="store_true")
    res.add_argument("--overwrite", action="store_true")
    res.add_argument("--tls-cert-dir", help="x509 directory (ca-cert.pem, client-cert.pem...)")
    _ssh_options(res)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit code."""
    p = parser()
    args = p.parse_args(argv)
    if args.cmd == "restore" and (args.dest is None) == (args.to_nbd is None):
        p.error("restore needs exactly one of DEST and --to-nbd URI")
    try:
        if args.cmd == "pull":
            kw = _connect_kwargs(args, args.uri)
            res = copy(args.uri, args.dest, args.format, base=args.base, extents=args.extents,
                       dirty_bitmap=args.dirty_bitmap, connections=args.connections,
                       inflight=args.inflight, progress_file=args.progress_file,
                       manifest=args.manifest, resume=not args.no_resume,
                       overwrite=args.overwrite, commit_bytes=args.commit_mib << 20, **kw)
        elif args.cmd == "restore":
            kw = _connect_kwargs(args, args.to_nbd)
            if args.to_nbd:
                res = restore_to_nbd(args.backup, args.to_nbd, manifest=args.manifest,
                                     verify=not args.no_verify, **kw)
            else:
                res = restore(args.backup, args.dest, args.format, manifest=args.manifest,
                              verify=not args.no_verify, overwrite=args.overwrite)
        elif args.against:
            res = verify_against(args.against, args.dest, args.manifest,
                                 **_connect_kwargs(args, args.against))
        else:
            _connect_kwargs(args, None)  # --ssh-* without --against: a usage error
            res = verify(args.dest, args.manifest)
    except CopyError as exc:
        sys.stdout.write(dumps(exc.to_dict()) + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stdout.write(dumps({"status": "error", "error": "interrupted",
                                "message": "interrupted"}) + "\n")
        return 130
    sys.stdout.write(dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
