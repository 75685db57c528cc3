# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""nbd_copy: the backup copy engine (standard library only).

``copy(uri, dest, fmt)`` pulls an NBD export into a raw or qcow2 file (or an
incremental qcow2 overlay on a previous backup), with a manifest of block
checksums, a progress file and resume; ``verify(dest)`` re-checks a backup,
``verify_against(uri, dest)`` compares it with a live export.
``restore(backup, dest)`` / ``restore_to_nbd(backup, uri)`` write a backup back.
CLI: ``python3 -m blockd.copy pull URI DEST ...`` / ``verify DEST`` / ``restore BACKUP DEST``.
"""

from .engine import copy, export_digest
from .errors import EXIT_CODES, CopyError
from .restore import restore, restore_to_nbd
from .verify import verify, verify_against

__all__ = ["CopyError", "EXIT_CODES", "copy", "export_digest", "restore", "restore_to_nbd",
           "verify", "verify_against"]
