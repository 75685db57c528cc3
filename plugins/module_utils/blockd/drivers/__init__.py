# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Block drivers, by their blockdev-add ``driver`` name.

blockd never probes formats: a node's driver is always the one named in its
options.
"""

from __future__ import annotations

from typing import Dict, Type

from ..errors import QMPError
from .base import Driver
from .cbw import CopyBeforeWriteDriver
from .file import FileDriver
from .null import NullDriver
from .qcow2 import Qcow2Driver
from .raw import RawDriver
from .snapshot_access import SnapshotAccessDriver
from .throttle import ThrottleDriver

DRIVERS: Dict[str, Type[Driver]] = {
    "file": FileDriver,
    "raw": RawDriver,
    "null-co": NullDriver,
    "null-aio": NullDriver,
    "qcow2": Qcow2Driver,
    "copy-before-write": CopyBeforeWriteDriver,
    "snapshot-access": SnapshotAccessDriver,
    "throttle": ThrottleDriver,
}


def lookup(name: str) -> Type[Driver]:
    """The driver class for ``name`` (schema-valid but unimplemented drivers fail here)."""
    try:
        return DRIVERS[name]
    except KeyError:
        raise QMPError("Driver '%s' is not supported by blockd" % name) from None
