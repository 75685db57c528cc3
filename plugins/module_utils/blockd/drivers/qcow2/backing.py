# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Opening the ``backing`` child of a qcow2 node.

The ``backing`` option is a node-name, an inline definition, or null (no
backing).  When it is omitted, the backing file named in the image header is
opened read-only with the format from the backing-format header extension,
relative names being relative to the image's directory.  blockd never
probes: a header without a backing format is refused.  Chains opened from
headers are checked for loops.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional, Tuple

from ...errors import QMPError

_local = threading.local()

#: Deepest backing chain blockd follows from image headers.
MAX_CHAIN_DEPTH = 64


def find_graph(node: Any) -> Any:
    """The :class:`~blockd.graph.graph.Graph` that is opening ``node``.

    :param node: the node being opened.
    :return: the graph.
    :raise QMPError: when the node belongs to no graph.
    """
    if node.graph is None:
        raise QMPError("qcow2: backing files can only be opened inside a block graph")
    return node.graph


def file_identity(path: str) -> Optional[Tuple[int, int]]:
    """``(st_dev, st_ino)`` of a path, or None if it cannot be stat'ed.

    :param path: a file name.
    :return: the identity, or None.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class ChainGuard:
    """Tracks the image files of header-opened chains on this thread.

    :param identity: the file of the image being opened (None if unknown).
    """

    def __init__(self, identity: Optional[Tuple[int, int]]) -> None:
        """Remember the identity.

        :param identity: see the class.
        """
        self.identity = identity

    def __enter__(self) -> "ChainGuard":
        """Push the image onto this thread's chain.

        :return: the guard.
        """
        stack: List[Optional[Tuple[int, int]]] = getattr(_local, "stack", None) or []
        _local.stack = stack
        stack.append(self.identity)
        return self

    def __exit__(self, *exc: Any) -> None:
        """Pop the image from the chain.

        :param exc: the exception, if any (ignored).
        """
        _local.stack.pop()

    @staticmethod
    def check(path: str) -> None:
        """Refuse to open ``path`` if it already is in the chain being opened.

        :param path: the backing file about to be opened.
        """
        stack = getattr(_local, "stack", None) or []
        if len(stack) > MAX_CHAIN_DEPTH:
            raise QMPError("Backing chain is deeper than %d images" % MAX_CHAIN_DEPTH)
        ident = file_identity(path)
        if ident is not None and ident in stack:
            raise QMPError("Backing file chain loop detected: '%s' is already part of the "
                           "chain" % path)


def header_backing_options(image_path: Optional[str], image_filename: str,
                           backing_file: str, backing_format: Optional[str]) -> Dict[str, Any]:
    """blockdev-add options for the backing file named in a header.

    :param image_path: the image's path when its ``file`` is a plain file.
    :param image_filename: the image's filename (for messages).
    :param backing_file: the header's backing file name.
    :param backing_format: the backing-format extension, if any.
    :return: the inline blockdev-add definition of the backing node.
    :raise QMPError: when the name cannot be resolved or has no format.
    """
    has_protocol = ":" in backing_file.split("/", 1)[0] and "://" in backing_file
    if backing_file.startswith("json:") or has_protocol:
        raise QMPError("Backing file '%s' of '%s' is not a plain file name; specify the "
                       "'backing' option explicitly" % (backing_file, image_filename))
    if not backing_format:
        raise QMPError("Backing file '%s' of '%s' has no backing format in the image header "
                       "and blockd does not probe formats; specify the 'backing' option "
                       "(or set the format with 'qemu-img rebase -u -F')"
                       % (backing_file, image_filename))
    path = backing_file
    if not os.path.isabs(path):
        if image_path is None:
            raise QMPError("Cannot use relative backing file names for '%s'" % image_filename)
        path = os.path.join(os.path.dirname(image_path), path)
    ChainGuard.check(path)
    return {"driver": backing_format, "read-only": True,
            "file": {"driver": "file", "filename": path}}


def open_backing(node: Any, ref: Any) -> Any:
    """Resolve a backing reference and attach it as ``node``'s backing child.

    Called last in the qcow2 open, so nothing can fail after the edge
    exists (the graph detaches it, and frees an inline child, on failure).

    :param node: the qcow2 node.
    :param ref: a node-name or an inline definition.
    :return: the backing node.
    """
    graph = find_graph(node)
    if isinstance(ref, str):
        child = graph.lookup(ref)
    else:
        try:
            child = graph.open(ref, monitor_owned=False, inherit={"read-only": True})
        except QMPError as exc:
            raise QMPError("Could not open backing file: %s" % exc.desc) from None
    node.attach_child("backing", child)
    return child
