# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The QMP side of blockd, wire-compatible with qemu-storage-daemon 7.2.

* :mod:`.jsonstream` -- QEMU's streaming JSON lexer/streamer/parser: framing,
  error texts, resynchronisation and limits.
* :mod:`.qjson` -- QEMU's JSON writer: ASCII output, ``%.17g`` floats and
  QDict key order.
* :mod:`.schema` / ``schema.json`` -- the command schema as data (JSON Schema
  draft-07) and QEMU-exact argument checking (:class:`.schema.Schema`),
  including command-line (keyval) options.
* :mod:`.visitor` -- the replay of QEMU's QAPI input visitor that words the
  errors.
* :mod:`.server` -- the monitor: greeting, capability negotiation, dispatch,
  events (:class:`.server.MonitorListener`, :class:`.server.Monitor`,
  :func:`.server.make_event`).

A daemon serves QMP like this::

    schema = Schema.default()
    listener = MonitorListener(daemon, listening_socket, pretty=False)
    listener.start()
    ...
    daemon.execute(name, args)   # called by the monitor; validates with
                                 # schema.validate(name, args) first
    monitor.send_event(make_event("BLOCK_EXPORT_DELETED", {"id": "exp0"}))
    ...
    listener.close(); listener.join()
"""

from __future__ import annotations

from .jsonstream import JSONParseError, JSONStreamParser, loads
from .qjson import to_json
from .schema import Schema
from .server import Monitor, MonitorListener, make_event

__all__ = ["JSONParseError", "JSONStreamParser", "loads", "to_json", "Schema",
           "Monitor", "MonitorListener", "make_event"]
