# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""blockd: a block engine in Python that speaks QMP and NBD like qemu-storage-daemon 7.2.

The package is laid out by concern:

* :mod:`blockd.qmp` -- the QMP monitor: framing, negotiation, dispatch, events,
  and the command schema kept as data (``schema.json``).
* :mod:`blockd.commands` -- the QMP command handlers, one module per area.
* :mod:`blockd.graph` -- block nodes, child edges, backends (users of nodes)
  and the op-blocker matrix.
* :mod:`blockd.drivers` -- the block drivers (file, raw, null-co, ...).
* :mod:`blockd.nbd` -- the NBD protocol and server.
* :mod:`blockd.cli` -- a command line that mirrors qemu-storage-daemon's.

Only the standard library and ``jsonschema`` are needed.
"""

from __future__ import annotations

import logging

#: blockd's own version (semver).
__version__ = "0.1.0"

#: The QEMU version blockd presents itself as in ``query-version`` and the greeting.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}

logging.getLogger(__name__).addHandler(logging.NullHandler())
