"""Start real storage daemons (blockd or qemu-storage-daemon) for integration tests.

Both engines take the same qemu-storage-daemon 7.2 command line, so a test
starts either with the same arguments::

    d = daemon("qsd", "--blockdev", "driver=file,node-name=file0,filename=src.raw",
               "--blockdev", "driver=raw,node-name=src0,file=file0",
               "--export", "type=nbd,id=exp0,node-name=src0,name=src,writable=on",
               nbd=True)
    d.qmp.cmd("query-version")
    nbdinfo_json(d.nbd_uri("src"))

See ``DaemonFactory.__call__`` for the options and docs/testing.md for more.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .nbd import nbd_tcp_uri, nbd_uri, wait_nbd
from .policy import missing
from .qmp import QMP, RawQMP, wait_qmp_greeting

REPO = Path(__file__).resolve().parents[2]
MODULE_UTILS = REPO / "plugins" / "module_utils"
KINDS = ("blockd", "qsd")
SUN_PATH_MAX = 107          # sizeof(sockaddr_un.sun_path) - 1 on Linux

_LIVE: "set[Daemon]" = set()


@atexit.register
def _kill_leftovers() -> None:  # a test run interrupted hard must not leak daemons
    for d in list(_LIVE):
        d.kill()


class DaemonError(AssertionError):
    """The daemon failed to start, or died when it should not have."""


def engine_command(kind: str) -> tuple[list[str], dict]:
    """The argv prefix and extra environment that start engine KIND.

    Overrides: ``QSD_CMD`` / ``BLOCKD_CMD`` (shell-split), e.g.
    ``BLOCKD_CMD="python3 -X dev -m blockd"``.
    """
    if kind == "qsd":
        override = os.environ.get("QSD_CMD")
        if override:
            return shlex.split(override), {}
        exe = shutil.which("qemu-storage-daemon")
        if exe is None:
            missing("executable 'qemu-storage-daemon' (Debian package qemu-utils)")
        return [exe], {}  # type: ignore[list-item]
    if kind == "blockd":
        pythonpath = os.pathsep.join(p for p in (str(MODULE_UTILS), os.environ.get("PYTHONPATH"))
                                     if p)
        env = {"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        override = os.environ.get("BLOCKD_CMD")
        return (shlex.split(override) if override else [sys.executable, "-m", "blockd"]), env
    raise ValueError(f"unknown daemon kind {kind!r}; expected one of {KINDS}")


# --- reading the qsd-style command line -----------------------------------------

def split_opts(value: str, implied: Optional[str] = None) -> dict:
    """Parse ``a=b,c.d=e,,f`` (QemuOpts/keyval, ``,,`` is a literal comma) into a dict.

    A leading item without ``=`` is stored under IMPLIED (e.g. ``socket`` for
    ``--chardev socket,...`` -> ``{"backend": "socket"}``).  A value starting
    with ``{`` is JSON; it is flattened to dotted keys.
    """
    if value.lstrip().startswith("{"):
        return _flatten(json.loads(value))
    items, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    items.append(cur)
    out: dict = {}
    for n, item in enumerate(items):
        if "=" in item:
            key, val = item.split("=", 1)
            out[key] = val
        elif n == 0 and implied:
            out[implied] = item
        elif item:
            out[item] = "on"
    return out


def _flatten(obj: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, val in obj.items():
        if isinstance(val, dict):
            out.update(_flatten(val, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = val if isinstance(val, str) else json.dumps(val)
    return out


def iter_options(argv: Sequence[str]):
    """Yield (option, value) for ``--opt value`` and ``--opt=value`` forms."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            opt, val = arg.split("=", 1)
            yield opt, val
        elif arg.startswith("--") and i + 1 < len(argv):
            yield arg, argv[i + 1]
            i += 1
        i += 1


def find_sockets(argv: Sequence[str]) -> tuple[list, Optional[str | tuple[str, int]]]:
    """(QMP monitor server addresses, NBD server address) declared by ARGV.

    A unix address is a path as written (possibly relative to the daemon's
    cwd), a TCP address a (host, port) tuple.
    """
    chardevs: dict[str, dict] = {}
    monitors: list[str] = []
    nbd: Optional[str | tuple[str, int]] = None
    for opt, val in iter_options(argv):
        if opt == "--chardev":
            o = split_opts(val, "backend")
            if "id" in o:
                chardevs[o["id"]] = o
        elif opt == "--monitor":
            o = split_opts(val, "chardev")
            if o.get("mode", "control") == "control" and "chardev" in o:
                monitors.append(o["chardev"])
        elif opt == "--nbd-server":
            o = split_opts(val)
            if o.get("addr.type") == "unix" and "addr.path" in o:
                nbd = o["addr.path"]
            elif o.get("addr.type") == "inet":
                nbd = (o.get("addr.host", "localhost"), int(o["addr.port"]))
    qmp: list = []
    for cid in monitors:
        c = chardevs.get(cid, {})
        if c.get("backend") != "socket" or c.get("server", "off") not in ("on", "yes", "true"):
            continue
        if "path" in c:
            qmp.append(c["path"])
        elif "port" in c:
            qmp.append((c.get("host", "localhost"), int(c["port"])))
    return qmp, nbd


# --- the daemon -------------------------------------------------------------------

class Daemon:
    """One running engine process.  Created by ``DaemonFactory`` (the ``daemon`` fixture).

    Attributes: ``kind``, ``argv`` (full command), ``dir`` (its cwd, under the test's
    tmp_path), ``proc`` (Popen), ``stdout_path``/``stderr_path`` (captured output),
    ``qmp_addresses`` (QMP monitor servers: unix Path or (host, port)), ``qmp_path``
    (the first one, or None), ``nbd_address`` (unix Path or (host, port) of the NBD
    server, or None), ``check_alive``.
    """

    def __init__(self, kind: str, argv: list[str], cwd: Path, env: dict, check_alive: bool):
        self.kind = kind
        self.argv = argv
        self.dir = cwd
        self.check_alive = check_alive
        self.exit_expected = False
        self.unexpected_rc: Optional[int] = None   # set by finish() if it died on its own
        self.stdout_path = cwd / "stdout.log"
        self.stderr_path = cwd / "stderr.log"
        qmp, nbd = find_sockets(argv)
        self.qmp_addresses: list = [self._abs(a) if isinstance(a, str) else a for a in qmp]
        self.qmp_path = self.qmp_addresses[0] if self.qmp_addresses else None
        self.nbd_address: Optional[Path | tuple[str, int]] = (
            self._abs(nbd) if isinstance(nbd, str) else nbd)
        self._qmp: Optional[QMP] = None
        self._aliases: dict[Path, str] = {}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<Daemon {self.kind} pid={self.proc.pid} dir={self.dir}>"

    def _abs(self, p: str) -> Path:
        return Path(p) if os.path.isabs(p) else self.dir / p

    def _connectable(self, path):
        """PATH, or a short symlinked alias of it if too long for sockaddr_un."""
        if isinstance(path, tuple):
            return path
        if len(str(path)) <= SUN_PATH_MAX:
            return str(path)
        if path.parent not in self._aliases:
            alias = Path(tempfile.mkdtemp(prefix="bdt-")) / "d"
            alias.symlink_to(path.parent)
            self._aliases[path.parent] = str(alias)
        return os.path.join(self._aliases[path.parent], path.name)

    # --- state ---------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.poll()

    def stderr(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        """Command, state and stderr, for failure messages."""
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited rc={rc}" + (
            f" ({signal.Signals(-rc).name})" if rc < 0 else "")
        return (f"{self.kind} pid={self.proc.pid} {state}\n"
                f"  cwd: {self.dir}\n  argv: {shlex.join(self.argv)}\n"
                f"  stderr:\n{_indent(self.stderr() or '(empty)')}")

    # --- readiness -------------------------------------------------------------
    def wait_ready(self, timeout: float) -> None:
        """Wait until the monitor greets (main loop running) and the NBD server answers."""
        deadline = time.monotonic() + timeout
        try:
            for addr in self.qmp_addresses:
                wait_qmp_greeting(self._wait_file(addr, deadline),
                                  max(0.1, deadline - time.monotonic()), self.alive)
            if self.nbd_address is not None:
                wait_nbd(self._wait_file(self.nbd_address, deadline),
                         max(0.1, deadline - time.monotonic()), self.alive)
            if not self.qmp_addresses and self.nbd_address is None:
                time.sleep(0.2)   # nothing to wait on; at least catch an immediate exit
        except Exception as exc:  # noqa: BLE001 - turned into a readable failure
            died = not self.alive()
            self.kill()
            raise DaemonError(f"{self.kind} {'exited during' if died else 'did not finish'} "
                              f"start-up ({type(exc).__name__}: {exc})\n{self.describe()}") from None
        if not self.alive():
            raise DaemonError(f"{self.kind} exited during start-up\n{self.describe()}")

    def _wait_file(self, path, deadline: float):
        """Wait for unix socket PATH to appear; return a connectable address (TCP: as is)."""
        if isinstance(path, tuple):
            return path
        while not path.exists():
            if not self.alive():
                raise DaemonError(f"exited before creating {path}")
            if time.monotonic() > deadline:
                raise DaemonError(f"{path} not created")
            time.sleep(0.01)
        return self._connectable(path)

    # --- clients -----------------------------------------------------------------
    @property
    def qmp(self) -> QMP:
        """A connected, negotiated QMP client on the first monitor (opened once, reused)."""
        if self._qmp is None:
            self._qmp = self.connect_qmp()
        return self._qmp

    def connect_qmp(self, negotiate: bool = True, timeout: float = 10.0,
                    monitor: int = 0) -> QMP:
        """A NEW QMP client (qemu.qmp) on monitor number MONITOR; the caller closes it."""
        return QMP(self._connectable(self._monitor(monitor)), negotiate=negotiate,
                   timeout=timeout)

    def raw_qmp(self, timeout: float = 10.0, monitor: int = 0) -> RawQMP:
        """A NEW raw-socket QMP client (nothing read yet); close ``d.qmp`` first on qsd."""
        return RawQMP(self._connectable(self._monitor(monitor)), timeout=timeout)

    def close_qmp(self) -> None:
        """Close the shared ``d.qmp`` client (so another client can use the monitor)."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            finally:
                self._qmp = None

    def _monitor(self, n: int):
        if n >= len(self.qmp_addresses):
            raise DaemonError(f"{self.kind} has {len(self.qmp_addresses)} QMP monitor(s), "
                              f"no monitor #{n}")
        return self.qmp_addresses[n]

    def nbd_uri(self, name: str = "") -> str:
        """URI of export NAME on this daemon's NBD server."""
        if self.nbd_address is None:
            raise DaemonError(f"{self.kind} was started without --nbd-server")
        if isinstance(self.nbd_address, tuple):
            return nbd_tcp_uri(*self.nbd_address, name)
        return nbd_uri(self._connectable(self.nbd_address), name)

    @property
    def nbd_socket(self) -> str:
        """Connectable path of the NBD unix socket."""
        if not isinstance(self.nbd_address, Path):
            raise DaemonError(f"{self.kind} has no unix NBD socket")
        return self._connectable(self.nbd_address)

    # --- stopping ------------------------------------------------------------------
    def quit(self, timeout: float = 10.0) -> int:
        """Send ``quit`` over QMP, wait for the exit; returns the exit code."""
        self.exit_expected = True
        try:
            self.qmp.cmd("quit")
        except Exception:  # noqa: BLE001 - the connection may close before the reply
            pass           # (qemu.qmp raises EOFError then); the exit is what counts
        self.close_qmp_quietly()
        return self.wait(timeout)

    def expect_exit(self) -> None:
        """Declare that the daemon may exit before teardown (no alive-check)."""
        self.exit_expected = True

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"{self.kind} did not exit within {timeout}s\n"
                              f"{self.describe()}") from None

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after TIMEOUT; returns the exit code."""
        self.exit_expected = True
        self.close_qmp_quietly()
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        self.exit_expected = True
        if self.alive():
            self._signal(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.discard(self)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)   # its own session: takes any children too
        except ProcessLookupError:
            pass

    def close_qmp_quietly(self) -> None:
        try:
            self.close_qmp()
        except Exception:  # noqa: BLE001 - teardown of a possibly dead peer
            self._qmp = None

    def finish(self) -> Optional[str]:
        """Teardown: returns an error text if the daemon died unexpectedly, then kills it."""
        problem = None
        if not self.exit_expected and not self.alive():
            self.unexpected_rc = self.returncode
        if self.check_alive and self.unexpected_rc is not None:
            problem = (f"{self.kind} died during the test (check_alive=True)\n"
                       f"{self.describe()}")
        self.close_qmp_quietly()
        self.stop()
        for alias in self._aliases.values():
            shutil.rmtree(os.path.dirname(alias), ignore_errors=True)
        _LIVE.discard(self)
        return problem


class DaemonFactory:
    """The ``daemon`` fixture: ``daemon(kind, *args, **options) -> Daemon``."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.daemons: list[Daemon] = []

    def __call__(self, kind: str, *args: str, qmp: bool = True, nbd: bool = False,
                 cwd: Optional[Path | str] = None, env: Optional[dict] = None,
                 check_alive: bool = True, timeout: float = 20.0) -> Daemon:
        """Start engine KIND ("blockd" or "qsd") with qsd-style ARGS; wait until ready.

        qmp:   add a QMP monitor on ``<dir>/qmp.sock`` unless ARGS already has --monitor.
        nbd:   add ``--nbd-server`` on ``<dir>/nbd.sock`` (first in argv) unless ARGS has one.
        cwd:   the daemon's working directory (default: fresh ``tmp_path/<kind><n>``);
               relative paths in ARGS are relative to it.
        env:   extra environment variables.
        check_alive: teardown fails the test if the daemon died on its own meanwhile
               (``quit()``, ``stop()``, ``kill()`` and ``expect_exit()`` make an exit expected).
        timeout: seconds to wait for the monitor greeting / NBD server.
        """
        prefix, engine_env = engine_command(kind)
        n = sum(1 for d in self.daemons if d.kind == kind)
        workdir = Path(cwd) if cwd is not None else self.tmp_path / f"{kind}{n}"
        workdir.mkdir(parents=True, exist_ok=True)
        args = list(args)
        opts = [opt for opt, _value in iter_options(args)]
        if nbd and "--nbd-server" not in opts:
            args = ["--nbd-server", "addr.type=unix,addr.path=nbd.sock", *args]
        if qmp and "--monitor" not in opts:
            args += ["--chardev", "socket,path=qmp.sock,server=on,wait=off,id=qmp0",
                     "--monitor", "chardev=qmp0"]
        full_env = {**os.environ, **engine_env, **(env or {})}
        d = Daemon(kind, [*prefix, *args], workdir, full_env, check_alive)
        self.daemons.append(d)
        d.wait_ready(timeout)
        return d

    def run(self, kind: str, *args: str, timeout: float = 30.0,
            cwd: Optional[Path | str] = None, env: Optional[dict] = None
            ) -> subprocess.CompletedProcess:
        """Run engine KIND to completion (for command-line error tests); text output."""
        prefix, engine_env = engine_command(kind)
        workdir = Path(cwd) if cwd is not None else self.tmp_path
        return subprocess.run([*prefix, *args], cwd=workdir, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False,
                              env={**os.environ, **engine_env, **(env or {})})

    def finish(self) -> list[str]:
        return [p for p in (d.finish() for d in self.daemons) if p]


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in text.rstrip().splitlines())
