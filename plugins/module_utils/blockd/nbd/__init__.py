# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The NBD protocol and server.

* :mod:`.proto` -- wire constants and packing, shared with a future client;
* :mod:`.export` -- :class:`NBDExport` and its metadata contexts;
* :mod:`.server` -- :class:`NBDServer` (listeners, connection limit, export
  table) and :func:`serve_socket` for one pre-connected socket;
* :mod:`.handshake` and :mod:`.connection` -- one client: negotiation, then
  the transmission loop (see the latter's docstring for the data-path and
  I/O-gate rules).
"""

from typing import Any

# The server side is imported on first use (PEP 562): a client-only process
# (``python3 -m blockd.copy``) skips its imports (~25 ms when compiled from source).
_LAZY = {"MetaContext": "export", "NBDExport": "export", "NBDServer": "server",
         "flatten_address": "server", "serve_socket": "server"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """``blockd.nbd.NBDServer`` and the like, imported on first access."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module("." + _LAZY[name], __name__), name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
