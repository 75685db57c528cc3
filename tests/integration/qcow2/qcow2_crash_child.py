"""Random I/O through the qcow2 driver until killed (run as a script).

Usage: qcow2_crash_child.py IMAGE SEED

Prints ``READY``, then ``S <i>`` before operation ``i`` and ``F <i>`` when
the flush that is operation ``i`` has returned.  :func:`operations` is the
deterministic operation stream, shared with the test that replays it.
"""

import os
import random
import sys
from typing import Iterator, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "plugins", "module_utils"))

LENGTHS = (512, 4096, 65536, 70000, 200000, 1 << 20)


def operations(seed: int, size: int) -> Iterator[Tuple[str, int, int, bytes]]:
    """``(kind, offset, length, data)``: kind is write, zero, unmap, discard
    or flush."""
    rnd = random.Random(seed)
    while True:
        off = rnd.randrange(0, size)
        n = min(size - off, rnd.choice(LENGTHS))
        op = rnd.random()
        if op < 0.55:
            yield "write", off, n, rnd.randbytes(n)
        elif op < 0.65:
            yield "zero", off, n, b""
        elif op < 0.75:
            yield "unmap", off, n, b""
        elif op < 0.9:
            yield "discard", off, n, b""
        else:
            yield "flush", 0, 0, b""


def main() -> None:
    from blockd import drivers
    from blockd.graph.graph import Graph
    from blockd.graph.io import REQ_MAY_UNMAP
    path, seed = sys.argv[1], int(sys.argv[2])
    graph = Graph(drivers.lookup)
    node = graph.open({"driver": "qcow2", "node-name": "q", "discard": "unmap",
                       "file": {"driver": "file", "filename": path}})
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    for i, (kind, off, n, data) in enumerate(operations(seed, node.getlength())):
        out.write("S %d\n" % i)
        out.flush()
        if kind == "write":
            node.pwrite(off, data)
        elif kind == "zero":
            node.pwrite_zeroes(off, n, 0)
        elif kind == "unmap":
            node.pwrite_zeroes(off, n, REQ_MAY_UNMAP)
        elif kind == "discard":
            node.pdiscard(off, n)
        else:
            node.flush()
            out.write("F %d\n" % i)
            out.flush()


if __name__ == "__main__":
    main()
