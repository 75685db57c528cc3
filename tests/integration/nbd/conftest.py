"""Fixtures of the NBD server tests: the same exports served by blockd and by qsd.

Every server offers four exports over a unix socket:

* ``x``     -- raw over ``image`` (16 MiB, data with a hole), writable;
* ``ro``    -- raw over ``ro_image`` (same content), read-only;
* ``null``  -- null-co, 64 MiB, ``read-zeroes``, writable;
* ``depth`` -- the node of ``x`` again, read-only, with ``allocation-depth``.

``blockd_nbd`` serves them with blockd: the real daemon (``python3 -m blockd``
with qsd's command line) when ``BLOCKD_NBD_HARNESS=daemon``, or ``serve.py``
beside this file when ``private`` (a minimal process that builds the graph and
the NBD server directly, for working on the NBD layer alone).  Unset, the
daemon is used if it serves NBD (probed once per session); if it does not,
CI/strict mode still uses it (so the failure shows) and a developer run falls
back to ``serve.py`` with a warning.
``qsd_nbd`` serves the same with qemu-storage-daemon, for differential tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from helpers import MiB, nbd_uri
from helpers.daemon import MODULE_UTILS
from helpers.nbd import wait_nbd

HERE = Path(__file__).resolve().parent
SIZE = 16 * MiB
#: Where the image has no data (a hole punched by the fixture).
HOLE = (4 * MiB, 4 * MiB)
EXPORTS = ("x", "ro", "null", "depth")


def make_image(path: Path) -> Path:
    """16 MiB: a byte pattern everywhere except a 4 MiB hole at 4 MiB."""
    block = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        for i in range(SIZE // MiB):
            if HOLE[0] <= i * MiB < HOLE[0] + HOLE[1]:
                f.seek(MiB, os.SEEK_CUR)
            else:
                f.write(block)
        f.truncate(SIZE)
    return path


def expected_content() -> bytes:
    """What ``make_image`` writes, as bytes."""
    block = bytes(range(256)) * 4096
    data = bytearray(block * (SIZE // MiB))
    data[HOLE[0]:HOLE[0] + HOLE[1]] = bytes(HOLE[1])
    return bytes(data)


def daemon_args(image: Path, ro_image: Path, max_connections: "int | None" = None) -> list:
    """qemu-storage-daemon arguments that serve the four exports."""
    server = "addr.type=unix,addr.path=nbd.sock"
    if max_connections is not None:
        server += ",max-connections=%d" % max_connections
    return [
        "--blockdev", f"driver=file,node-name=f,filename={image},discard=unmap",
        "--blockdev", "driver=raw,node-name=r,file=f,discard=unmap",
        "--blockdev", f"driver=file,node-name=fro,filename={ro_image},read-only=on",
        "--blockdev", "driver=raw,node-name=rro,file=fro,read-only=on",
        "--blockdev", "driver=null-co,node-name=n,size=67108864,read-zeroes=on",
        "--nbd-server", server,
        "--export", "type=nbd,id=x,node-name=r,name=x,writable=on,description=blockd test export",
        "--export", "type=nbd,id=ro,node-name=rro,name=ro",
        "--export", "type=nbd,id=null,node-name=n,name=null,writable=on",
        "--export", "type=nbd,id=depth,node-name=r,name=depth,allocation-depth=on",
    ]


class PrivateServer:
    """``serve.py`` in a subprocess (``BLOCKD_NBD_HARNESS=private``)."""

    kind = "blockd"

    def __init__(self, image: Path, ro_image: Path, max_connections: "int | None" = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bnbd-"))
        self.socket = str(self.dir / "nbd.sock")
        self.errlog = self.dir / "stderr.log"
        argv = [sys.executable, str(HERE / "serve.py"), "--socket", self.socket,
                "--image", str(image), "--ro-image", str(ro_image)]
        if max_connections is not None:
            argv += ["--max-connections", str(max_connections)]
        env = dict(os.environ, PYTHONPATH=str(MODULE_UTILS), PYTHONFAULTHANDLER="1")
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if line.strip() != b"READY":
            self.stop()
            raise RuntimeError("serve.py did not start:\n" + self.stderr())
        wait_nbd(self.socket, 10, self.alive)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.errlog.read_text(errors="replace") if self.errlog.exists() else ""

    def uri(self, name: str = "x") -> str:
        return nbd_uri(self.socket, name)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class DaemonServer:
    """A ``helpers.Daemon`` (blockd or qsd) seen through the same interface."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.kind = daemon.kind
        self.socket = daemon.nbd_socket

    def alive(self) -> bool:
        return self.daemon.alive()

    def stderr(self) -> str:
        return self.daemon.stderr()

    def uri(self, name: str = "x") -> str:
        return nbd_uri(self.socket, name)

    def stop(self) -> None:
        self.daemon.stop()


_HARNESS: "list[str]" = []


def _daemon_serves_nbd() -> bool:
    """Whether ``python3 -m blockd`` starts and answers on an NBD socket."""
    from helpers.daemon import engine_command
    tmp = Path(tempfile.mkdtemp(prefix="bnp-"))
    prefix, env = engine_command("blockd")
    proc = subprocess.Popen(
        [*prefix, "--blockdev", "driver=null-co,node-name=n",
         "--nbd-server", f"addr.type=unix,addr.path={tmp}/s",
         "--export", "type=nbd,id=e,node-name=n,name=x"],
        env={**os.environ, **env}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_nbd(str(tmp / "s"), 10, lambda: proc.poll() is None)
        return True
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def harness() -> str:
    """``daemon`` or ``private`` (see the module docstring)."""
    chosen = os.environ.get("BLOCKD_NBD_HARNESS")
    if chosen:
        return chosen
    if not _HARNESS:
        from helpers.policy import strict
        if _daemon_serves_nbd() or strict():
            _HARNESS.append("daemon")
        else:
            warnings.warn("python3 -m blockd does not serve NBD yet: "
                          "NBD tests use tests/integration/nbd/serve.py")
            _HARNESS.append("private")
    return _HARNESS[0]


@pytest.fixture
def image(tmp_path) -> Path:
    return make_image(tmp_path / "x.raw")


@pytest.fixture
def ro_image(tmp_path) -> Path:
    return make_image(tmp_path / "ro.raw")


@pytest.fixture
def start_nbd(daemon, image, ro_image, request):
    """Factory: ``start_nbd(kind, max_connections=None)`` -> a server (torn down after the test)."""
    started = []

    def start(kind: str = "blockd", max_connections: "int | None" = None):
        if kind == "blockd" and harness() == "private":
            srv = PrivateServer(image, ro_image, max_connections)
        else:
            srv = DaemonServer(daemon(kind, *daemon_args(image, ro_image, max_connections)))
        started.append(srv)
        return srv

    yield start
    dead = [s for s in started if not s.alive()]
    for srv in started:
        if isinstance(srv, PrivateServer):
            srv.stop()
    if dead and not getattr(request.node, "_server_may_die", False):
        pytest.fail("NBD server died during the test:\n" + "\n".join(s.stderr() for s in dead),
                    pytrace=False)


@pytest.fixture
def blockd_nbd(start_nbd):
    """blockd serving the four exports."""
    return start_nbd("blockd")


@pytest.fixture
def qsd_nbd(start_nbd):
    """qemu-storage-daemon serving the same four exports."""
    return start_nbd("qsd")


@pytest.fixture(params=["blockd", "qsd"])
def any_nbd(request, start_nbd):
    """Each engine in turn (for behaviour both must share)."""
    return start_nbd(request.param)


def wait_until(predicate, timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
