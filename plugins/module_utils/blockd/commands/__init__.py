# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""QMP command handlers, one module per area.

A handler is registered with :func:`command` under its QMP name and called as
``handler(daemon, args)`` with arguments already validated against the schema
(``qmp/schema.json``), under the daemon's big lock.  It returns the command's
``return`` value or raises :class:`~blockd.errors.QMPError`.

The command table is the union of the schema and this registry: a command
must have both to be offered (``query-commands``), and a test checks that
neither side has entries the other lacks.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

Handler = Callable[[Any, Dict[str, Any]], Any]

#: QMP name -> handler.
COMMANDS: Dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``name``."""
    def register(func: Handler) -> Handler:
        if name in COMMANDS:
            raise ValueError("command %s registered twice" % name)
        COMMANDS[name] = func
        return func
    return register


def load_all() -> Dict[str, Handler]:
    """Import every command module (they register on import)."""
    from . import backup, bitmaps, block, blockjobs, control, exports, jobs, objects, transaction  # noqa: F401
    return COMMANDS
