"""A real OpenSSH server on loopback for tests (``/usr/sbin/sshd``).

Everything lives in one private directory: a fresh ed25519 host key, a client
key pair whose public half is the only entry of a test-only
``AuthorizedKeysFile``, a ``known_hosts`` that names the server as
``[127.0.0.1]:PORT``, the config, the pid file and the log.  The server runs
in the foreground (``sshd -D -e -f CONFIG``) on a
free port of 127.0.0.1, as the current user (root in CI: ``PermitRootLogin
prohibit-password``, ``StrictModes no``, ``UsePAM no``), key authentication
only, with TCP and stream-local (unix socket) forwarding and the internal
SFTP server (for Ansible).  It is killed, with every session it forked, at
teardown (and at exit if a run is interrupted).

Use the ``sshd`` fixture (``from helpers.sshd import sshd`` in a test module or
conftest) or :func:`start_sshd`::

    def test_x(sshd):
        uri = sshd.nbd_uri("/path/nbd.sock", "export")   # nbd+ssh://root@127.0.0.1:PORT/...
        connect_uri(uri, ssh_identity=sshd.key, ssh_known_hosts=sshd.known_hosts)
        sshd.ansible_vars()   # ansible_host/port/user/key and strict host key checking
"""

from __future__ import annotations

import atexit
import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import quote

import pytest

from .policy import missing

SSHD = "/usr/sbin/sshd"
_LIVE: "set[SSHServer]" = set()


@atexit.register
def _kill_leftovers() -> None:  # an interrupted run must not leak servers
    for server in list(_LIVE):
        server.stop()


def keygen(path: Path, comment: str = "blockd-test", passphrase: str = "") -> Path:
    """A new ed25519 key pair at ``path`` (private) and ``path.pub`` (replaced); returns ``path``."""
    for old in (Path(path), Path(str(path) + ".pub")):
        if old.exists():
            old.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment,
                    "-f", str(path)], check=True, capture_output=True, timeout=30,
                   stdin=subprocess.DEVNULL)
    return path


def fingerprint(pub: Path) -> str:
    """``SHA256:...`` of a public key file, as ``ssh-keygen -l`` prints it."""
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return out.split()[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class SSHServer:
    """A running sshd and what a client needs to reach it.

    :ivar host: ``127.0.0.1``.  :ivar port: its port.  :ivar user: the login user.
    :ivar key: the authorized client private key (ed25519, no passphrase).
    :ivar known_hosts: a known_hosts file naming this server's host key.
    :ivar host_key_fingerprint: ``SHA256:...`` of the host key.
    :ivar dir: the private directory (config, keys, ``sshd.log``).
    """

    dir: Path
    port: int
    user: str
    key: Path
    known_hosts: Path
    host_key: Path
    host_key_fingerprint: str
    proc: subprocess.Popen
    host: str = "127.0.0.1"
    extra: Dict[str, str] = field(default_factory=dict)

    @property
    def host_key_line(self) -> str:
        """The known_hosts line for this server."""
        return self.known_hosts.read_text().strip()

    def nbd_uri(self, socket_path: "str | Path", export: str = "", scheme: str = "nbd+ssh") -> str:
        """``nbd+ssh://USER@127.0.0.1:PORT/EXPORT?socket=PATH`` (libnbd's syntax)."""
        return "%s://%s@%s:%d/%s?socket=%s" % (scheme, quote(self.user), self.host, self.port,
                                               quote(export), quote(str(socket_path), safe="/"))

    def ssh_command(self, *remote: str) -> list:
        """An ``ssh`` command line to this server (strict host key checking, our key only)."""
        return ["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "UserKnownHostsFile=%s" % self.known_hosts,
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "%s@%s" % (self.user, self.host), *remote]

    def ansible_vars(self) -> Dict[str, str]:
        """Inventory variables for ``ansible_connection=ssh`` to this server."""
        return {
            "ansible_connection": "ssh",
            "ansible_host": self.host,
            "ansible_port": str(self.port),
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": " ".join(shlex.quote(a) for a in (
                "-o", "UserKnownHostsFile=%s" % self.known_hosts,
                "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes")),
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def log(self) -> str:
        """sshd's log so far."""
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        """Whether the listening sshd still runs."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """Kill sshd and every session it forked.

        sshd's per-connection processes start sessions of their own (setsid),
        so they are found as its descendants in /proc, not by process group.
        """
        _LIVE.discard(self)
        victims = [self.proc.pid] + _descendants(self.proc.pid)
        for pid in reversed(victims):  # sessions first: they cannot outlive the listener
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _descendants(pid: int) -> "list[int]":
    """Every live descendant of ``pid`` (from /proc), parents before children."""
    children: Dict[int, list] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def _config(d: Path, port: int, host_key: Path, extra: Dict[str, str],
            listen: str = "127.0.0.1") -> Path:
    options = {
        "Port": str(port),
        "ListenAddress": listen,
        "HostKey": str(host_key),
        "PidFile": str(d / "sshd.pid"),
        "AuthorizedKeysFile": str(d / "authorized_keys"),
        "PermitRootLogin": "prohibit-password",
        "StrictModes": "no",
        "UsePAM": "no",
        "PubkeyAuthentication": "yes",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "AllowTcpForwarding": "yes",
        "AllowStreamLocalForwarding": "yes",
        "Subsystem": "sftp internal-sftp",
        "MaxStartups": "64",
        "MaxSessions": "64",
        "LogLevel": "VERBOSE",
        **extra,
    }
    path = d / "sshd_config"
    path.write_text("".join("%s %s\n" % kv for kv in options.items()))
    return path


def _wait_banner(server: SSHServer, deadline: float) -> bool:
    """True once the server sends its SSH banner; False if sshd exited."""
    while time.monotonic() < deadline:
        if not server.alive:
            return False
        try:
            with socket.create_connection((server.host, server.port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("sshd on port %d sent no banner in time:\n%s" % (server.port, server.log()))


def start_sshd(directory: Path, extra: Optional[Dict[str, str]] = None,
               timeout: float = 15.0, netns: Optional[str] = None,
               host: str = "127.0.0.1") -> SSHServer:
    """Start sshd with a fresh host key and client key under ``directory`` (created).

    :param extra: more sshd_config options (override the defaults).
    :param netns: run it in this network namespace (``ip netns exec``), listening on
        HOST port 22 (tests/helpers/netns.py makes such hosts).
    :param host: the address it listens on.
    :raises RuntimeError: sshd would not start (its log is in the message).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    host_key = keygen(d / "ssh_host_ed25519_key", "blockd-test-host")
    key = keygen(d / "id_ed25519", "blockd-test-client")
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    host_pub = (d / "ssh_host_ed25519_key.pub").read_text().split()
    last = ""
    for _attempt in range(5):  # another process may grab the free port first
        port = 22 if netns else free_port()
        config = _config(d, port, host_key, extra or {}, listen=host)
        check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True,
                               timeout=30)
        if check.returncode != 0:
            raise RuntimeError("sshd -t refused the test config: " + check.stderr)
        known = d / "known_hosts"
        known.write_text("[%s]:%d %s %s\n" % (host, port, host_pub[0], host_pub[1]))
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with open(d / "sshd.log", "ab") as log:
            proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(config)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        server = SSHServer(dir=d, port=port, user=getpass.getuser(), key=key, known_hosts=known,
                           host_key=host_key,
                           host_key_fingerprint=fingerprint(d / "ssh_host_ed25519_key.pub"),
                           proc=proc, host=host, extra=dict(extra or {}))
        _LIVE.add(server)
        try:
            if _wait_banner(server, time.monotonic() + timeout):
                return server
        except BaseException:
            server.stop()
            raise
        server.stop()
        last = server.log()
    raise RuntimeError("sshd would not start:\n" + last)


@pytest.fixture
def sshd(tmp_path_factory):
    """A running :class:`SSHServer` on 127.0.0.1 (killed at teardown).

    Needs ``/usr/sbin/sshd`` and ``ssh-keygen`` (Debian: openssh-server,
    installed by scripts/bootstrap): missing, the test fails in CI, else skips.
    """
    for tool in (SSHD, "ssh-keygen"):
        if shutil.which(tool) is None:
            missing("%s (Debian package openssh-server)" % tool)
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()

