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

from .export import MetaContext, NBDExport  # noqa: F401
from .server import NBDServer, flatten_address, serve_socket  # noqa: F401
