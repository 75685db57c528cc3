"""qcow2 acceptance tests against QEMU 7.2's qemu-img and qemu-io.

Bigger loops run with BLOCKD_QCOW2_LONG=1.
"""
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..")
for _p in (os.path.join(ROOT, "plugins", "module_utils"), os.path.join(ROOT, "tests"),
           os.path.join(ROOT, "tests", "unit", "qcow2"), HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
