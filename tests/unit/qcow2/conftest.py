"""qcow2 unit tests: pure Python, on real files, without QEMU tools.

They use blockd's own image creation and consistency check; the acceptance
tests against qemu-img/qemu-io are in tests/integration/qcow2.
"""
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "plugins", "module_utils"))
sys.path.insert(0, HERE)
