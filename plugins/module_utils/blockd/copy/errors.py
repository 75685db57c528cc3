# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one exception of nbd_copy, with a kind that maps to a CLI exit code."""

from __future__ import annotations

#: kind -> CLI exit code.
EXIT_CODES = {
    "usage": 1,      # bad arguments
    "verify": 2,     # output differs from its manifest or the live export
    "source": 3,     # connection failed/dropped, server error, export too small
    "dest": 4,       # destination I/O error, full disk, refusing to overwrite
    "manifest": 5,   # manifest missing/corrupted
    "base": 6,       # base backup missing/changed/not matching
}


class CopyError(Exception):
    """A copy or verify failure.

    :param kind: one of :data:`EXIT_CODES`.
    :param message: a one-line explanation.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def exit_code(self) -> int:
        """The CLI exit code for this failure."""
        return EXIT_CODES.get(self.kind, 1)

    def to_dict(self) -> dict:
        """The CLI's one-line JSON error."""
        return {"status": "error", "error": self.kind, "message": self.message}
