# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The command line, option for option qemu-storage-daemon 7.2's.

Options are processed in order, each through the same code path as its QMP
command (``--blockdev`` is ``blockdev-add``, ``--export`` is
``block-export-add``...), so a script written for qsd runs unchanged.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import QEMU_VERSION, __version__, keyval
from .errors import QMPError

PROG = "blockd"

USAGE = """\
Usage: %(prog)s [options]
blockd %(version)s, a block engine compatible with qemu-storage-daemon %(qemu)s

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         accepted for compatibility; blockd logs with --trace
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,<driver options>]
                         configure a block backend (same as blockdev-add)

  --chardev socket,id=<id>,path=<path>,server=on,wait=off
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on,wait=off
  --chardev socket,id=<id>,fd=<fd>,server=on
                         configure a character device (a QMP socket)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,description=<text>][,allocation-depth=on|off]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=fd,addr.str=<fd>
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,id=<id>[,<props>]
                         create a new object (secret, throttle-group, iothread,
                         tls-creds-x509, authz-simple)

  --pidfile <path>       write process ID to a file after startup
  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete
"""

#: Options that take an argument, with their implied first key.
_WITH_ARG = {"--blockdev": "driver", "--chardev": "backend", "--export": "type",
             "--monitor": "chardev", "--nbd-server": None, "--object": "qom-type",
             "--pidfile": None, "-T": "enable", "--trace": "enable"}

#: Object types blockd creates (``--object help``); see blockd.objects.
OBJECT_TYPES = ("authz-simple", "iothread", "secret", "throttle-group", "tls-creds-x509")


class StartupError(Exception):
    """A fatal error while processing the command line."""


def parse_args(argv: List[str]) -> List[Tuple[str, Optional[str]]]:
    """Split argv into (option, value) pairs, accepting ``--opt=value`` too."""
    out: List[Tuple[str, Optional[str]]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if not arg.startswith("-"):
            raise StartupError("Unexpected argument: %s" % arg)
        if name in _WITH_ARG:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise StartupError("option '%s' requires an argument" % name)
                value = argv[i]
            out.append((name, value))
        elif arg in ("-h", "--help", "-V", "--version", "--daemonize"):
            out.append((arg, None))
        else:
            raise StartupError("unrecognized option '%s'" % arg)
        i += 1
    return out


def _listen_socket(opts: Dict[str, Any]) -> Tuple[socket.socket, Optional[str]]:
    """Create the listening socket of a server chardev; return it and its path."""
    if "fd" in opts:
        sock = socket.socket(fileno=int(opts["fd"]))
        return sock, None
    if "path" in opts:
        path = opts["path"]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise StartupError("Failed to bind socket to %s: %s" % (path, exc.strerror)) from None
        sock.listen(16)
        return sock, path
    if "host" in opts or "port" in opts:
        host = opts.get("host", "localhost")
        port = int(opts.get("port", 0))
        sock = socket.create_server((host, port), backlog=16, reuse_port=False)
        return sock, None
    raise StartupError("chardev: socket: no address given (path, host/port or fd)")


class Startup:
    """Applies command-line options to a daemon, in order."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.chardevs: Dict[str, Dict[str, Any]] = {}
        self.pidfile_fd: Optional[int] = None
        self.pidfile: Optional[str] = None
        self.unlink_paths: List[str] = []

    def execute(self, name: str, args: Dict[str, Any]) -> Any:
        """Run a QMP command for an option, then its deferred work."""
        try:
            return self.daemon.execute(name, args)
        finally:
            self.daemon.run_deferred()

    def typed(self, command: str, text: str, implied: Optional[str]) -> Dict[str, Any]:
        """Parse an option string and give its leaves the schema's types."""
        tree = keyval.parse(text, implied)
        if text.lstrip().startswith("{"):
            return tree
        return self.daemon.schema.coerce_keyval(command, tree)

    def blockdev(self, text: str) -> None:
        self.execute("blockdev-add", self.typed("blockdev-add", text, "driver"))

    def export(self, text: str) -> None:
        self.execute("block-export-add", self.typed("block-export-add", text, "type"))

    def nbd_server(self, text: str) -> None:
        from .commands.exports import start_server
        opts = keyval.parse(text, None)
        addr = opts.get("addr")
        if not isinstance(addr, dict) or "type" not in addr:
            raise StartupError("Parameter 'addr.type' is missing")
        unknown = set(opts) - {"addr", "tls-creds", "tls-authz", "max-connections"}
        if unknown:
            raise StartupError("Parameter '%s' is unexpected" % sorted(unknown)[0])
        try:
            max_conn = int(opts.get("max-connections", 100))
        except ValueError:
            raise StartupError("Parameter 'max-connections' expects uint32") from None
        with self.daemon.lock:
            start_server(self.daemon, addr, max_conn, opts.get("tls-creds"),
                         opts.get("tls-authz"))

    def chardev(self, text: str) -> None:
        opts = keyval.parse(text, "backend")
        if opts.get("backend") != "socket":
            raise StartupError("chardev backend '%s' is not supported by blockd (use socket)"
                               % opts.get("backend"))
        cid = opts.get("id")
        if not cid:
            raise StartupError("Parameter 'id' is missing")
        if cid in self.chardevs:
            raise StartupError("attempt to add duplicate property '%s' to object (type 'container')"
                               % cid)
        if not keyval.parse_bool(opts.get("server", "off"), "server"):
            raise StartupError("chardev '%s': only server=on sockets are supported" % cid)
        sock, path = _listen_socket(opts)
        if path:
            self.unlink_paths.append(os.path.abspath(path))
        self.chardevs[cid] = {"sock": sock, "used": False}
        from .objects import tree
        tree(self.daemon).add_chardev(cid, opts, sock, lambda: any(
            lst.sock is sock and lst.monitor is not None for lst in self.daemon.listeners))

    def monitor(self, text: str) -> None:
        from .qmp.server import MonitorListener
        opts = keyval.parse(text, "chardev")
        cid = opts.get("chardev")
        if cid not in self.chardevs:
            raise StartupError("chardev \"%s\" not found" % cid)
        if opts.get("mode", "control") != "control":
            raise StartupError("Only QMP is supported")
        dev = self.chardevs[cid]
        if dev["used"]:
            raise StartupError("Device '%s' is in use" % cid)
        dev["used"] = True
        pretty = keyval.parse_bool(opts.get("pretty", "off"), "pretty")
        listener = MonitorListener(self.daemon, dev["sock"], pretty=pretty)
        self.daemon.listeners.append(listener)
        listener.start()

    def object(self, text: str) -> None:
        """``--object``: the keyval options typed as ObjectOptions, then
        ``object-add`` (user_creatable_process_cmdline)."""
        if text == "help":
            sys.stdout.write("List of user creatable objects:\n")
            for name in OBJECT_TYPES:
                sys.stdout.write("  %s\n" % name)
            raise SystemExit(0)
        self.execute("object-add", self.typed("object-add", text, "qom-type"))

    def write_pidfile(self, path: str) -> None:
        """Create, lock and write the pid file (qemu_write_pidfile)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StartupError("cannot create PID file: Cannot lock pid file: %s"
                               % exc.strerror) from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.pidfile_fd, self.pidfile = fd, os.path.abspath(path)

    def cleanup(self) -> None:
        """Remove the sockets and pid file this process created."""
        for path in self.unlink_paths + ([self.pidfile] if self.pidfile else []):
            try:
                os.unlink(path)
            except OSError:
                pass


def _daemonize() -> Callable[[int], None]:
    """Fork; the parent exits with the child's startup status.

    :return: a function the child calls with 0 once startup is complete (or
        an exit status on failure).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        status = os.read(rfd, 1)
        os._exit(0 if status == b"\0" else 1)
    os.close(rfd)
    os.setsid()

    def report(status: int) -> None:
        try:
            os.write(wfd, bytes([status & 0xff]))
        finally:
            os.close(wfd)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python3 -m blockd``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse_args(argv)
    except StartupError as exc:
        sys.stderr.write("%s: %s\n" % (PROG, exc))
        return 1
    names = [name for name, _value in options]
    if "-h" in names or "--help" in names:
        sys.stdout.write(USAGE % {"prog": PROG, "version": __version__,
                                  "qemu": "%(major)d.%(minor)d" % QEMU_VERSION})
        return 0
    if "-V" in names or "--version" in names:
        sys.stdout.write("blockd version %s (qemu-storage-daemon %d.%d compatible)\n"
                         % (__version__, QEMU_VERSION["major"], QEMU_VERSION["minor"]))
        return 0
    report = _daemonize() if "--daemonize" in names else None

    from .daemon import Daemon
    daemon = Daemon()
    startup = Startup(daemon)
    handlers = {"--blockdev": startup.blockdev, "--chardev": startup.chardev,
                "--export": startup.export, "--monitor": startup.monitor,
                "--nbd-server": startup.nbd_server, "--object": startup.object}
    pidfile = None
    try:
        for name, value in options:
            if name in handlers:
                try:
                    handlers[name](value)
                except QMPError as exc:
                    raise StartupError("%s %s: %s" % (name, value, exc.desc)) from None
                except (keyval.KeyvalError, StartupError) as exc:
                    raise StartupError("%s %s: %s" % (name, value, exc)) from None
            elif name == "--pidfile":
                pidfile = value
            elif name in ("-T", "--trace"):
                import logging
                logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
        if pidfile:
            startup.write_pidfile(pidfile)
    except StartupError as exc:
        sys.stderr.write("%s: %s\n" % (PROG, exc))
        daemon.close()
        startup.cleanup()
        if report:
            report(1)
        return 1

    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: daemon.request_shutdown())
    if report:
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        report(0)
    try:
        daemon.wait()
    finally:
        daemon.close()
        startup.cleanup()
    return 0
