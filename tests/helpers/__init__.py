"""Reusable helpers for the test suite (real daemons, QMP and NBD clients).

Imported as ``helpers`` (tests/ is on sys.path, see tests/conftest.py).
Only the standard library and pytest are imported at module level;
qemu.qmp is imported when a QMP client is created.
"""

from .daemon import Daemon, DaemonError, DaemonFactory, engine_command
from .nbd import nbd_probe, nbd_tcp_uri, nbd_uri, nbdcopy, nbdinfo_json
from .policy import missing, require_module, require_tool, strict
from .qmp import QMP, QMPTimeout, RawQMP, del_export
from .tools import MiB, make_raw_image, qemu_img, qemu_io, run, tmpfs

__all__ = [
    "Daemon", "DaemonError", "DaemonFactory", "engine_command",
    "nbd_probe", "nbd_tcp_uri", "nbd_uri", "nbdcopy", "nbdinfo_json",
    "missing", "require_module", "require_tool", "strict",
    "QMP", "QMPTimeout", "RawQMP", "del_export",
    "MiB", "make_raw_image", "qemu_img", "qemu_io", "run", "tmpfs",
]
