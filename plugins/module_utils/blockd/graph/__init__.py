# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The block graph: nodes, child edges, backends (users of nodes) and op blockers.

The split follows QEMU after its 2014 BlockBackend work (seed 004 section 5):

* a :class:`~blockd.graph.node.Node` is a BlockDriverState: a driver instance
  with a node-name and child edges (``file``, ``backing``, ...);
* a :class:`~blockd.graph.backend.Backend` is a BlockBackend: the attachment
  through which a *user* (an NBD export now, a job later) does I/O on a root
  node.  Backends are not nodes; moving a backend to another root node (as a
  filter insertion does) never touches the user.
"""

from .io import (REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK, BDRV_BLOCK_DATA,  # noqa: F401
                 BDRV_BLOCK_ZERO, BDRV_BLOCK_ALLOCATED, SEG_FD, SEG_ZERO, SEG_DATA)
