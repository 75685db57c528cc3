# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""NBD over an SSH tunnel (paramiko), for ``nbd+ssh://`` URIs.

libnbd (>= 1.22) reaches ``nbd+ssh://[USER@]HOST[:PORT]/EXPORT?socket=PATH``
by running ``ssh HOST nc -U PATH``.  Here the tunnel is in-process:

* one authenticated SSH connection (:class:`SSHTunnel`, a paramiko
  ``SSHClient``) per server, user and credentials: key authentication only
  (identity file with optional passphrase, ssh-agent, or the default
  ``~/.ssh/id_*`` keys), and **strict host key checking** against
  known_hosts files: an unknown or changed host key is refused with an
  :class:`SSHHostKeyError` naming the host and the key's SHA256 fingerprint
  (as OpenSSH prints it); ``host_key_checking=False`` is an explicit opt-out;
* one SSH channel per NBD connection (:meth:`SSHTunnel.open_unix`:
  ``direct-streamlocal@openssh.com`` to the NBD server's unix socket, as
  ``ssh -L port:/path``; :meth:`SSHTunnel.open_tcp`: ``direct-tcpip``), so a
  multi-conn :class:`~.client.ConnectionPool` is several channels over one
  SSH connection.  A channel is wrapped in :class:`SSHChannelSocket`, the
  socket-like object :class:`~.client.NBDClient` (and, for ``nbds+ssh``,
  :class:`~.client_transport.TLSTransport`) reads and writes.

:func:`open_uri_channel` is what :func:`~.client.connect_uri` calls: it
shares one tunnel between the connections of the same URI and credentials,
and closes it when its last channel closes.

paramiko is optional on targets: it is imported here only, and without it
every entry point raises :class:`SSHLibraryMissing` (``library ==
"paramiko"``, for Ansible's ``missing_required_lib``).  Works with Debian
12's paramiko 2.12 and with paramiko 5.
"""

from __future__ import annotations

import base64
import errno
import getpass
import hashlib
import inspect
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .client_handshake import NBDError
from .client_transport import NBDURI, SSH_PORT

try:  # optional dependency
    import paramiko
    from paramiko.common import cMSG_CHANNEL_OPEN
except ImportError as _exc:  # pragma: no cover - exercised on targets without paramiko
    paramiko = None  # type: ignore[assignment]
    _IMPORT_ERROR: Optional[ImportError] = _exc
else:
    _IMPORT_ERROR = None

__all__ = [
    "DEFAULT_KNOWN_HOSTS", "NBDSSHError", "SSHAuthError", "SSHChannelError", "SSHChannelSocket",
    "SSHHostKeyError", "SSHLibraryMissing", "SSHTunnel", "SSH_OPTIONS", "fingerprint",
    "have_paramiko", "open_uri_channel",
]

#: known_hosts files used when none is given (as OpenSSH's UserKnownHostsFile
#: and GlobalKnownHostsFile); missing ones are skipped.
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")
#: SSH channel window: how much the server may send before the client acks.
#: paramiko's default (2 MiB): paramiko's channel buffer moves what it holds on
#: every read, so a larger window costs more than it saves (16 MiB: 10x slower).
WINDOW_SIZE = 2 << 20
#: Ciphers tried first when paramiko has them (paramiko >= 3: AES-GCM needs no
#: separate MAC pass, about a third faster than its default aes128-ctr).
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
#: :func:`open_uri_channel` options (keyword arguments of ``connect_uri``).
SSH_OPTIONS = ("ssh_identity", "ssh_passphrase", "ssh_known_hosts", "ssh_host_key_checking",
               "ssh_allow_agent", "ssh_tunnel")

_PathList = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]], None]


# -- errors ------------------------------------------------------------------------------

class NBDSSHError(NBDError):
    """The SSH tunnel could not be opened (or broke)."""

    def __init__(self, message: str, err: int = errno.EPROTO) -> None:
        super().__init__(message, err)


class SSHLibraryMissing(NBDSSHError):
    """paramiko is not installed: ``nbd+ssh`` cannot work.

    :ivar library: ``"paramiko"`` (for Ansible's ``missing_required_lib``).
    """

    library = "paramiko"

    def __init__(self, detail: str = "") -> None:
        super().__init__("nbd+ssh needs the Python library paramiko, which is not installed "
                         "(Debian: apt install python3-paramiko; pip: pip install paramiko)"
                         + (": %s" % detail if detail else ""), errno.ENOPKG)


class SSHHostKeyError(NBDSSHError):
    """The SSH server's host key is unknown or differs from known_hosts.

    :ivar host: the host as known_hosts names it (``[host]:port`` off port 22).
    :ivar fingerprint: the key the server presented (``SHA256:...``).
    :ivar expected: the fingerprint known_hosts has (changed key), else None.
    """

    def __init__(self, message: str, host: str, fingerprint: str,
                 expected: Optional[str] = None) -> None:
        super().__init__(message, errno.EACCES)
        self.host = host
        self.fingerprint = fingerprint
        self.expected = expected


class SSHAuthError(NBDSSHError):
    """The SSH server refused every key offered (or the identity file is unusable)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EACCES)


class SSHChannelError(NBDSSHError):
    """The SSH server refused to open a channel to the NBD server.

    :ivar code: the SSH reason code (1: administratively prohibited, 2: connect failed...).
    """

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message, errno.ECONNREFUSED)
        self.code = code


# -- helpers -------------------------------------------------------------------------------

def have_paramiko() -> bool:
    """Whether paramiko can be imported (``nbd+ssh`` works)."""
    return paramiko is not None


def _require_paramiko() -> Any:
    if paramiko is None:
        raise SSHLibraryMissing(str(_IMPORT_ERROR) if _IMPORT_ERROR else "")
    return paramiko


def fingerprint(key: Any) -> str:
    """OpenSSH's fingerprint of a paramiko key: ``SHA256:`` + unpadded base64."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _paths(value: _PathList) -> List[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    return [os.path.expanduser(os.fspath(v)) for v in value]


def _known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names a server (``[host]:port`` unless port 22)."""
    return host if port == SSH_PORT else "[%s]:%d" % (host, port)


if paramiko is not None:
    class _RejectUnknown(paramiko.MissingHostKeyPolicy):
        """RejectPolicy with an error that names the host, key type and fingerprint."""

        def __init__(self, files: Sequence[str]) -> None:
            self.files = list(files)

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            fp = fingerprint(key)
            where = ", ".join(self.files) or "no known_hosts file"
            raise SSHHostKeyError(
                "SSH host key of %s is not known (%s key %s not in %s): refusing to connect; "
                "if this is the right host, add its key to known_hosts (ssh-keyscan, then check "
                "the fingerprint)" % (hostname, key.get_name(), fp, where), hostname, fp)

    class _AcceptAny(paramiko.MissingHostKeyPolicy):
        """``host_key_checking=False``: accept any key (and remember nothing)."""

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            return None


def _transport_factory(sock: Any, **kwargs: Any) -> Any:
    """``SSHClient.connect(transport_factory=...)``: a Transport preferring :data:`FAST_CIPHERS`."""
    transport = paramiko.Transport(sock, **kwargs)
    opts = transport.get_security_options()
    fast = [c for c in FAST_CIPHERS if c in opts.ciphers]
    if fast:
        opts.ciphers = tuple(fast) + tuple(c for c in opts.ciphers if c not in fast)
    return transport


def _connect_extras() -> Dict[str, Any]:
    """Options of ``SSHClient.connect`` this paramiko has (``transport_factory``: >= 3.2)."""
    params = inspect.signature(paramiko.SSHClient.connect).parameters
    return {"transport_factory": _transport_factory} if "transport_factory" in params else {}


def _open_streamlocal(transport: Any, path: str, window_size: int, timeout: float) -> Any:
    """``direct-streamlocal@openssh.com`` channel to unix socket ``path`` on the server.

    paramiko's ``Transport.open_channel`` only writes the type-specific fields
    of ``direct-tcpip``/``forwarded-tcpip``/``x11``.  This is the same request
    (the same bookkeeping, through the same Transport members, unchanged from
    paramiko 2.x to 5.x) with the fields OpenSSH's PROTOCOL file gives this
    channel type: ``string socket path, string reserved, uint32 reserved``.

    :raises paramiko.ChannelException: the server refused (reason code and text).
    :raises paramiko.SSHException: the connection died or the server did not answer.
    """
    pm = _require_paramiko()
    if not transport.active:
        raise pm.SSHException("SSH session not active")
    with transport.lock:
        window_size = transport._sanitize_window_size(window_size)
        max_packet_size = transport._sanitize_packet_size(None)
        chanid = transport._next_channel()
        m = pm.Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string("direct-streamlocal@openssh.com")
        m.add_int(chanid)
        m.add_int(window_size)
        m.add_int(max_packet_size)
        m.add_string(path)
        m.add_string("")  # reserved
        m.add_int(0)      # reserved
        chan = pm.Channel(chanid)
        transport._channels.put(chanid, chan)
        transport.channel_events[chanid] = event = threading.Event()
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)
        chan._set_window(window_size, max_packet_size)
    transport._send_user_message(m)
    deadline = time.monotonic() + timeout
    while not event.wait(0.1):
        if not transport.active:
            raise _saved_error(transport) or pm.SSHException("SSH connection lost")
        if time.monotonic() > deadline:
            raise pm.SSHException("the SSH server did not answer the channel request "
                                  "within %s s" % timeout)
    chan = transport._channels.get(chanid)
    if chan is not None:
        return chan
    raise _saved_error(transport) or pm.SSHException("Unable to open channel.")


def _saved_error(transport: Any) -> Optional[BaseException]:
    """Take the exception paramiko saved for the transport (as its own accessor does)."""
    with transport.lock:
        exc, transport.saved_exception = transport.saved_exception, None
    return exc


# -- the socket-like channel ---------------------------------------------------------------

class SSHChannelSocket:
    """An SSH channel as the socket-like object :class:`~.client.NBDClient` uses.

    ``recv_into``/``recv`` return 0/``b""`` at end of stream, raise
    :class:`socket.timeout` after :meth:`settimeout`'s delay; :meth:`close`
    closes the channel (which wakes a reader blocked in ``recv``) and then
    runs ``on_close`` once (a shared tunnel counts its channels with it).

    :param channel: a paramiko ``Channel``.
    :param description: what it leads to, for messages (``user@host:port -> /path``).
    :param on_close: called once after the channel is closed.
    """

    def __init__(self, channel: Any, description: str,
                 on_close: Optional[Callable[[], None]] = None) -> None:
        self.channel = channel
        self.description = description
        self._on_close = on_close
        self._closed = False
        self._close_lock = threading.Lock()

    def __repr__(self) -> str:
        return "<SSHChannelSocket %s%s>" % (self.description, " closed" if self._closed else "")

    def _lost(self, exc: BaseException) -> OSError:
        """paramiko's EOFError/SSHException of a dead connection, as a socket would say it."""
        return ConnectionResetError(errno.ECONNRESET, "SSH connection %s lost: %s"
                                    % (self.description, exc or type(exc).__name__))

    def recv_into(self, buf: Any, nbytes: int = 0) -> int:
        """Read at most ``len(buf)`` bytes into ``buf``; 0 at end of stream."""
        view = memoryview(buf).cast("B")
        data = self.recv(min(nbytes or len(view), len(view), 1 << 20))
        n = len(data)
        view[:n] = data
        return n

    def recv(self, n: int) -> bytes:
        """At most ``n`` bytes; ``b""`` at end of stream."""
        try:
            return self.channel.recv(n)
        except OSError:
            raise
        except (EOFError, paramiko.SSHException) as exc:
            raise self._lost(exc) from None

    def sendall(self, data: Any) -> None:
        """Send everything (``OSError`` once the channel or the connection is closed)."""
        try:
            self.channel.sendall(data if isinstance(data, bytes) else bytes(data))
        except OSError:
            raise
        except (EOFError, paramiko.SSHException) as exc:
            raise self._lost(exc) from None

    def settimeout(self, timeout: Optional[float]) -> None:
        """Timeout of ``recv``/``sendall`` (None: block)."""
        self.channel.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        """Half- or full-close (sends EOF for ``SHUT_WR``; ``SHUT_RDWR`` closes the channel).

        paramiko's ``Channel.shutdown`` sends EOF even when the channel is already
        closed. After sshd has freed the channel (its CLOSE answered by paramiko's
        thread), such a late EOF names a channel sshd no longer knows, and sshd drops
        the whole connection ("bad id: channel free") -- with every other channel of a
        shared tunnel. So a full shutdown is a close (EOF and CLOSE sent together under
        the channel's lock), and nothing is sent for a channel that is closed.
        """
        if how == socket.SHUT_RDWR:
            self.close()
            return
        if self.channel.closed:
            return
        try:
            self.channel.shutdown(how)
        except OSError:
            raise
        except (EOFError, paramiko.SSHException) as exc:
            raise self._lost(exc) from None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close the channel, then release the tunnel (once)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.channel.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the connection is gone already: nothing left to close on the wire
        finally:
            if self._on_close is not None:
                self._on_close()


# -- the tunnel ----------------------------------------------------------------------------

class SSHTunnel:
    """An authenticated SSH connection to the host of NBD servers.

    :param host: SSH server name or address (also the name looked up in known_hosts).
    :param port: SSH port.
    :param user: user name (default: the local user, as ``ssh``).
    :param identity_file: private key file(s) to offer (``ssh -i``); when given,
        the default ``~/.ssh/id_*`` keys are not tried.
    :param passphrase: the identity file's passphrase, if it is encrypted.
    :param known_hosts: known_hosts file(s) (default :data:`DEFAULT_KNOWN_HOSTS`,
        missing ones skipped; given ones must exist).  Never written.
    :param host_key_checking: False accepts any host key (explicit opt-out; not
        for production).
    :param allow_agent: also offer ssh-agent's keys (``SSH_AUTH_SOCK``).
    :param compress: compress the connection (``ssh -C``).
    :param timeout: seconds for the TCP connect, banner and authentication each.
    :raises SSHLibraryMissing: paramiko is not installed.
    :raises SSHHostKeyError: unknown or changed host key.
    :raises SSHAuthError: no key accepted, unreadable or encrypted identity file.
    :raises NBDSSHError: cannot connect, protocol failure, bad known_hosts file.
    """

    def __init__(self, host: str, port: int = SSH_PORT, user: Optional[str] = None, *,
                 identity_file: _PathList = None, passphrase: Optional[str] = None,
                 known_hosts: _PathList = None, host_key_checking: bool = True,
                 allow_agent: bool = True, compress: bool = False,
                 timeout: Optional[float] = 30.0) -> None:
        pm = _require_paramiko()
        self.host, self.port = host, port
        self.user = user or getpass.getuser()
        self.known_hosts_name = _known_hosts_name(host, port)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._closed = False
        identities = _paths(identity_file)
        for path in identities:
            if not os.access(path, os.R_OK):
                raise SSHAuthError("cannot read SSH identity file %s: %s" % (
                    path, os.strerror(errno.ENOENT if not os.path.exists(path) else errno.EACCES)))
        client = pm.SSHClient()
        try:
            if host_key_checking:
                files = self._load_known_hosts(client, known_hosts)
                client.set_missing_host_key_policy(_RejectUnknown(files))
            else:
                client.set_missing_host_key_policy(_AcceptAny())
            client.connect(host, port, username=self.user, key_filename=identities or None,
                           passphrase=passphrase, allow_agent=allow_agent,
                           look_for_keys=not identities, compress=compress, timeout=timeout,
                           banner_timeout=timeout, auth_timeout=timeout, **_connect_extras())
        except BaseException as exc:
            client.close()
            if isinstance(exc, Exception):
                raise self._error(exc, identities) from None
            raise
        self._client = client
        self.transport = client.get_transport()
        self.host_key = self.transport.get_remote_server_key()
        #: The server's host key fingerprint (``SHA256:...``).
        self.fingerprint = fingerprint(self.host_key)

    def __repr__(self) -> str:
        return "<SSHTunnel %s%s>" % (self.where, " closed" if self._closed else "")

    @property
    def where(self) -> str:
        """``user@host:port`` for messages."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s@%s:%d" % (self.user, host, self.port)

    @staticmethod
    def _load_known_hosts(client: Any, known_hosts: _PathList) -> List[str]:
        given = _paths(known_hosts)
        files = given or [os.path.expanduser(p) for p in DEFAULT_KNOWN_HOSTS]
        loaded = []
        for path in files:
            if not given and not os.path.exists(path):
                continue
            try:
                client.load_system_host_keys(path)
            except OSError as exc:
                raise NBDSSHError("cannot read known_hosts file %s: %s"
                                  % (path, exc.strerror or exc), exc.errno or errno.EIO) from None
            except Exception as exc:  # noqa: BLE001 - paramiko's parse errors vary by version
                raise NBDSSHError("known_hosts file %s is not usable: %s" % (path, exc)) from None
            loaded.append(path)
        return loaded

    def _error(self, exc: Exception, identities: List[str]) -> NBDError:
        """Map a paramiko/socket failure of ``connect`` to a clear :class:`NBDSSHError`."""
        pm = paramiko
        where = self.where
        if isinstance(exc, NBDError):
            return exc
        if isinstance(exc, pm.BadHostKeyException):
            got, want = fingerprint(exc.key), fingerprint(exc.expected_key)
            return SSHHostKeyError(
                "SSH host key of %s CHANGED: the server sent %s key %s, known_hosts has %s; "
                "refusing to connect (someone may be intercepting the connection, or the host "
                "was reinstalled: check, then update known_hosts)"
                % (self.known_hosts_name, exc.key.get_name(), got, want),
                self.known_hosts_name, got, want)
        keys = ", ".join(identities) if identities else "default keys and ssh-agent"
        if isinstance(exc, pm.PasswordRequiredException):
            return SSHAuthError("SSH identity file %s is encrypted: give its passphrase" % keys)
        if isinstance(exc, pm.AuthenticationException):
            return SSHAuthError("SSH authentication as %s failed (offered: %s): %s"
                                % (where, keys, exc))
        if isinstance(exc, socket.timeout):
            return NBDSSHError("SSH connection to %s timed out" % where, errno.ETIMEDOUT)
        if isinstance(exc, pm.SSHException):
            if identities and "private key" in str(exc).lower():
                return SSHAuthError("SSH identity file %s is not usable: %s" % (keys, exc))
            return NBDSSHError("SSH connection to %s failed: %s" % (where, exc))
        if isinstance(exc, OSError):
            return NBDSSHError("cannot connect to SSH server %s: %s"
                               % (where, exc.strerror or exc), exc.errno or errno.ECONNREFUSED)
        return NBDSSHError("SSH connection to %s failed: %r" % (where, exc))

    @property
    def active(self) -> bool:
        """Whether the SSH connection is up."""
        return not self._closed and self.transport.is_active()

    def _channel(self, opener: Callable[[], Any], target: str,
                 on_close: Optional[Callable[[], None]]) -> SSHChannelSocket:
        pm = paramiko
        if self._closed:
            raise NBDSSHError("SSH tunnel %s is closed" % self.where, errno.ESHUTDOWN)
        try:
            chan = opener()
        except pm.ChannelException as exc:
            raise SSHChannelError(
                "SSH server %s could not open a channel to %s there: %s (SSH reason %d); is an "
                "NBD server listening there, and does sshd allow forwarding to it "
                "(AllowStreamLocalForwarding / AllowTcpForwarding)?"
                % (self.where, target, exc.text, exc.code), exc.code) from None
        except (pm.SSHException, OSError, EOFError) as exc:
            raise NBDSSHError("SSH channel to %s through %s failed: %s"
                              % (target, self.where, exc or type(exc).__name__),
                              errno.ECONNRESET) from None
        return SSHChannelSocket(chan, "%s -> %s" % (self.where, target), on_close)

    def open_unix(self, path: str, timeout: Optional[float] = None,
                  on_close: Optional[Callable[[], None]] = None) -> SSHChannelSocket:
        """A channel to unix socket ``path`` on the server (``direct-streamlocal@openssh.com``).

        :param timeout: seconds to wait for the server's answer (default: the tunnel's).
        :param on_close: called once when the returned socket is closed.
        :raises SSHChannelError: refused (no such socket, forwarding disabled...).
        """
        wait = timeout if timeout is not None else (self.timeout or 3600.0)
        return self._channel(lambda: _open_streamlocal(self.transport, path, WINDOW_SIZE, wait),
                             "unix socket %s" % path, on_close)

    def open_tcp(self, host: str, port: int, timeout: Optional[float] = None,
                 on_close: Optional[Callable[[], None]] = None) -> SSHChannelSocket:
        """A channel to ``host:port`` as seen from the server (``direct-tcpip``).

        :raises SSHChannelError: refused (nothing listening, forwarding disabled...).
        """
        wait = timeout if timeout is not None else (self.timeout or 3600.0)
        return self._channel(
            lambda: self.transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                                window_size=WINDOW_SIZE, timeout=wait),
            "TCP %s:%d" % (host, port), on_close)

    def open_nbd(self, parsed: NBDURI, timeout: Optional[float] = None,
                 on_close: Optional[Callable[[], None]] = None) -> SSHChannelSocket:
        """The channel an ``nbd+ssh`` URI names: its ``socket``, else ``localhost:nbd-port``."""
        if parsed.socket:
            return self.open_unix(parsed.socket, timeout, on_close)
        return self.open_tcp("localhost", parsed.nbd_port, timeout, on_close)

    def close(self) -> None:
        """Close the SSH connection (and with it every channel)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()

    def __enter__(self) -> "SSHTunnel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- tunnels shared by URI connections -----------------------------------------------------

_Key = Tuple[Any, ...]
_SHARED: Dict[_Key, List[Any]] = {}   # key -> [tunnel, channels open]
_SHARED_LOCK = threading.Lock()


def _release(key: _Key, tunnel: SSHTunnel) -> None:
    """One channel of a shared tunnel closed: close the tunnel after its last one."""
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is None or entry[0] is not tunnel:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _SHARED[key]
    tunnel.close()


def open_uri_channel(parsed: NBDURI, kwargs: Dict[str, Any]) -> SSHChannelSocket:
    """The channel for one NBD connection to an ``nbd+ssh`` URI.

    Pops the :data:`SSH_OPTIONS` from ``kwargs`` (the rest are NBD options):
    ``ssh_identity``, ``ssh_passphrase``, ``ssh_known_hosts``,
    ``ssh_host_key_checking`` (default True), ``ssh_allow_agent`` (default
    True) -- see :class:`SSHTunnel` -- or ``ssh_tunnel``, an open
    :class:`SSHTunnel` to use (the caller closes it).  Otherwise connections
    with the same server, user and options share one tunnel, opened by the
    first and closed when the last channel closes.  ``connect_timeout``
    (default 30 s) bounds the SSH connect, authentication and channel open.

    :raises NBDSSHError: see :class:`SSHTunnel` and :meth:`SSHTunnel.open_unix`.
    """
    opts = {k: kwargs.pop(k) for k in SSH_OPTIONS if k in kwargs}
    timeout = kwargs.get("connect_timeout", 30.0)
    tunnel: Optional[SSHTunnel] = opts.get("ssh_tunnel")
    if tunnel is not None:
        return tunnel.open_nbd(parsed, timeout)
    _require_paramiko()
    identity = tuple(_paths(opts.get("ssh_identity")))
    known = tuple(_paths(opts.get("ssh_known_hosts")))
    checking = bool(opts.get("ssh_host_key_checking", True))
    agent = bool(opts.get("ssh_allow_agent", True))
    user = parsed.ssh_user or getpass.getuser()
    key = (parsed.host, parsed.port, user, identity, opts.get("ssh_passphrase"), known,
           checking, agent, parsed.ssh_compress)
    with _SHARED_LOCK:  # one tunnel per key even when connections are opened concurrently
        entry = _SHARED.get(key)
        if entry is not None and not entry[0].active:
            del _SHARED[key]  # the SSH connection died: the next channel gets a new one
            entry[0].close()
            entry = None
        if entry is None:
            tunnel = SSHTunnel(parsed.host, parsed.port, user, identity_file=identity or None,
                               passphrase=opts.get("ssh_passphrase"), known_hosts=known or None,
                               host_key_checking=checking, allow_agent=agent,
                               compress=parsed.ssh_compress, timeout=timeout)
            entry = _SHARED[key] = [tunnel, 0]
        entry[1] += 1
        tunnel = entry[0]
    if tunnel is None:
        raise AssertionError("no SSH tunnel")
    try:
        return tunnel.open_nbd(parsed, timeout, lambda: _release(key, tunnel))
    except BaseException:
        _release(key, tunnel)
        raise
