# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``qcow2`` block driver (QEMU 7.2's block/qcow2*.c, in pure Python).

Modules, by concern:

* :mod:`.header` -- header, extensions, snapshot table, bitmap directory;
* :mod:`.l2` -- L1/L2 entries and the L2 table cache;
* :mod:`.refcount` -- refcount table and blocks, allocation, deferred frees;
* :mod:`.cluster` -- mapping, allocation with copy-on-write, zeroing;
* :mod:`.image` -- an open image's metadata and its crash-safe write-back;
* :mod:`.backing` -- opening the backing chain;
* :mod:`.driver` -- the block driver;
* :mod:`.create` -- image creation (qcow2 and raw);
* :mod:`.check` -- consistency check and leak repair.
"""

from .check import CheckResult, check_image
from .create import check_qcow2_options, create_qcow2, create_raw
from .driver import Qcow2Driver

__all__ = ["Qcow2Driver", "check_qcow2_options", "create_qcow2", "create_raw", "check_image",
           "CheckResult"]
