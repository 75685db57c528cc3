# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Resume state: an append-only, fsync'd log next to the partial output.

Line 1 is a header (source, size, format, base, the plan); every further
line is one committed manifest extent, appended only after the output was
flushed.  A line cut short by a kill is ignored.  (QEMU has no resumable
convert; this plays the part of a persistent dirty bitmap for the copy.)
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from .errors import CopyError


class StateLog:
    """The open state log of one copy."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def read(self) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
        """The header and the committed entries (both empty when unreadable)."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError:
            return None, []
        try:
            header = json.loads(lines[0])
        except ValueError:
            return None, []
        entries: List[Dict[str, Any]] = []
        for line in lines[1:]:
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # a torn last line
        return header, entries

    def start(self, header: Dict[str, Any], entries: List[Dict[str, Any]]) -> None:
        """Rewrite the log with ``header`` and the entries kept, durably."""
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(header, sort_keys=True).encode() + b"\n")
                for e in entries:
                    f.write(json.dumps(e, sort_keys=True).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise CopyError("dest", "cannot write resume state %s: %s"
                            % (self.path, exc.strerror)) from None

    def commit(self, entries: List[Dict[str, Any]]) -> None:
        """Append entries and fsync (the output was flushed before)."""
        if not entries or self.fd is None:
            return
        data = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)
        try:
            os.write(self.fd, data)
            os.fsync(self.fd)
        except OSError as exc:
            raise CopyError("dest", "cannot write resume state %s: %s"
                            % (self.path, exc.strerror)) from None

    def close(self, remove: bool = False) -> None:
        """Close (and delete when the copy completed)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
