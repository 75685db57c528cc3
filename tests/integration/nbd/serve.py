"""A private NBD server process for the NBD tests (until ``python3 -m blockd`` serves NBD).

Usage::

    PYTHONPATH=plugins/module_utils python3 serve.py --socket S --image I [--ro-image R]
        [--max-connections N] [--null-size BYTES]

Exports, named like the daemon-based harness names them:

* ``x``     -- raw over ``--image``, writable;
* ``ro``    -- raw over ``--ro-image`` (or ``--image``), read-only;
* ``null``  -- null-co (``read-zeroes``), writable, reads come back as holes;
* ``depth`` -- the ``x`` node again, read-only, with ``qemu:allocation-depth``.

Prints ``READY`` on stdout once listening; SIGTERM stops the server cleanly.
"""

import argparse
import logging
import signal
import sys
import threading

from blockd import drivers
from blockd.graph.backend import Backend
from blockd.graph.graph import Graph
from blockd.nbd import NBDExport, NBDServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--ro-image")
    parser.add_argument("--max-connections", type=int, default=100)
    parser.add_argument("--null-size", type=int, default=64 << 20)
    parser.add_argument("--no-zero-copy", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="blockd-nbd: %(message)s")
    graph = Graph(drivers.lookup)
    rw = graph.open({"driver": "raw", "node-name": "r", "discard": "unmap",
                     "file": {"driver": "file", "filename": args.image,
                              "discard": "unmap"}})
    ro = graph.open({"driver": "raw", "node-name": "rro", "read-only": True,
                     "file": {"driver": "file", "filename": args.ro_image or args.image,
                              "read-only": True}})
    null = graph.open({"driver": "null-co", "node-name": "n", "size": args.null_size,
                       "read-zeroes": True})
    server = NBDServer({"type": "unix", "path": args.socket},
                       max_connections=args.max_connections)
    server.start()
    server.add_export(NBDExport("x", "x", Backend(graph, rw, True, "NBD export 'x'"), True,
                                description="blockd test export",
                                zero_copy=not args.no_zero_copy))
    server.add_export(NBDExport("ro", "ro", Backend(graph, ro, False, "NBD export 'ro'"), False))
    server.add_export(NBDExport("null", "null", Backend(graph, null, True, "NBD export 'null'"),
                                True))
    server.add_export(NBDExport("depth", "depth", Backend(graph, rw, False, "NBD export 'depth'"),
                                False, allocation_depth=True))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print("READY", flush=True)
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
