# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""x509 TLS for NBD, both ends: the stream, the credentials, the peer's name.

* :class:`TLSStream` runs TLS over an already connected socket (after
  ``NBD_OPT_STARTTLS``) with :class:`ssl.SSLObject` and memory BIOs, so one
  reader thread and several writer threads may share it (OpenSSL objects
  must not be entered by two threads at once, which a plain
  :class:`ssl.SSLSocket` would do), and so that a send blocked by the
  socket's ``SO_SNDTIMEO`` can ask its owner whether to give up (the NBD
  server's stall policy).  The client (:class:`.client_transport.TLSTransport`)
  and the server (:mod:`.handshake`) both use it.
* :func:`load_x509` builds the :class:`ssl.SSLContext` of a QEMU
  ``tls-creds-x509`` object from its directory (``ca-cert.pem``,
  ``ca-crl.pem``, ``server-cert.pem``/``server-key.pem`` or
  ``client-cert.pem``/``client-key.pem``), with QEMU 7.2's error texts
  (``crypto/tlscredsx509.c``) where the failure is blockd's to describe
  (missing files, unreadable lists, a certificate its CA does not sign);
  texts that come from GnuTLS in QEMU carry OpenSSL's reason instead.
* :func:`peer_dn` spells a peer certificate's subject the way QEMU (GnuTLS)
  does, which is the identity ``authz-simple`` compares.

Standard library only.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence

from ..errors import QMPError

#: Bytes read from the socket per fill of the incoming BIO.
_FILL = 262144
#: Plaintext encrypted per step of a send (then flushed).
_WRITE_STEP = 1 << 20


class TLSStream:
    """TLS over a connected socket, safe for one reader plus many writers.

    The socket-like interface both NBD ends use: :meth:`recv_into`,
    :meth:`recv`, :meth:`sendall`, :meth:`sendall_parts`, :meth:`settimeout`,
    :meth:`setsockopt`, :meth:`shutdown`, :meth:`close`.  ``_obj_lock``
    guards the :class:`ssl.SSLObject`; ``_send_lock`` keeps encrypted records
    in order on the wire.  Data the reader produces (TLS 1.3 post-handshake
    messages) is flushed by it when no writer is busy, or by the next writer.

    :param sock: the connected socket (after the ACK of STARTTLS).
    :param context: the client or server context.
    :param server_side: run the server end of the handshake.
    :param hostname: the name to check in the server's certificate (client).
    """

    def __init__(self, sock: Any, context: ssl.SSLContext, server_side: bool = False,
                 hostname: Optional[str] = None) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=None if server_side else (hostname or None))
        self._obj_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._peer = "client" if server_side else "server"

    # -- plumbing -------------------------------------------------------------------

    @property
    def family(self) -> int:
        """The address family of the underlying socket."""
        return self.sock.family

    def fileno(self) -> int:
        """The descriptor of the underlying socket (never write to it directly)."""
        return self.sock.fileno()

    def _fill(self) -> bool:
        """Feed the incoming BIO from the socket; False at EOF."""
        data = self.sock.recv(_FILL)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    def _flush(self, stall: Optional[Callable[[float], None]] = None) -> None:
        """Send everything the SSL object produced (caller holds ``_send_lock``).

        :param stall: called with the time of the last progress whenever a
            send returns without progress (a socket with ``SO_SNDTIMEO``); it
            may raise to give up.  Without it such a send raises.
        """
        while True:
            with self._obj_lock:
                data = self._out.read()
            if not data:
                return
            if stall is None:
                self.sock.sendall(data)
                continue
            view = memoryview(data)
            last = time.monotonic()
            while view:
                try:
                    n = self.sock.send(view)
                except BlockingIOError:
                    n = 0
                if n:
                    view = view[n:]
                    last = time.monotonic()
                else:
                    stall(last)

    def handshake(self) -> None:
        """Run the TLS handshake (``qio_channel_tls_handshake`` in QEMU).

        A failure sends the alert saying why (e.g. "unknown CA") before raising.

        :raises ssl.SSLError: verification or protocol failure.
        :raises ConnectionError: the peer closed the connection.
        """
        while True:
            try:
                with self._obj_lock:
                    self._obj.do_handshake()
                with self._send_lock:
                    self._flush()
                return
            except ssl.SSLWantReadError:
                with self._send_lock:
                    self._flush()
                if not self._fill():
                    raise ConnectionError("%s closed the connection during the TLS handshake"
                                          % self._peer) from None
            except ssl.SSLError:
                try:
                    with self._send_lock:
                        self._flush()
                except OSError:
                    pass
                raise

    @property
    def version(self) -> Optional[str]:
        """The negotiated protocol, e.g. ``"TLSv1.3"``."""
        return self._obj.version()

    def getpeercert(self) -> Any:
        """The peer certificate (as :meth:`ssl.SSLObject.getpeercert`)."""
        return self._obj.getpeercert()

    # -- data -----------------------------------------------------------------------

    def recv_into(self, buf: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypt up to ``nbytes`` (default: the size of ``buf``) into ``buf``.

        ``flags`` (``MSG_WAITALL``) is accepted for the socket interface and
        ignored: callers loop on short reads.

        :return: bytes stored; 0 at end of stream.
        """
        view = memoryview(buf).cast("B")
        if nbytes:
            view = view[:nbytes]
        while True:
            try:
                with self._obj_lock:
                    n = self._obj.read(len(view), view)
                    pending = self._out.pending
            except ssl.SSLWantReadError:
                if not self._fill():
                    return 0
                continue
            except ssl.SSLZeroReturnError:
                return 0
            if pending and self._send_lock.acquire(blocking=False):
                try:
                    self._flush()
                finally:
                    self._send_lock.release()
            return n

    def recv(self, n: int) -> bytes:
        """Up to ``n`` decrypted bytes; ``b""`` at end of stream."""
        buf = bytearray(n)
        got = self.recv_into(buf)
        return bytes(buf[:got])

    def sendall_parts(self, parts: Sequence[Any],
                      stall: Optional[Callable[[float], None]] = None) -> None:
        """Encrypt and send every part, in order, as one stream.

        :param parts: bytes-like objects.
        :param stall: see :meth:`_flush`.
        """
        with self._send_lock:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:
                    with self._obj_lock:
                        n = self._obj.write(view[:_WRITE_STEP])
                    view = view[n:]
                    if len(view) or self._out.pending >= _WRITE_STEP:
                        self._flush(stall)
            self._flush(stall)

    def sendall(self, data: Any, stall: Optional[Callable[[float], None]] = None) -> None:
        """Encrypt and send ``data`` completely (see :meth:`sendall_parts`)."""
        self.sendall_parts((data,), stall)

    def send(self, data: Any, flags: int = 0) -> int:
        """Socket-style send: everything is sent (``flags`` ignored).

        :return: ``len(data)``.
        """
        self.sendall(data)
        return len(memoryview(data).cast("B"))

    def settimeout(self, timeout: Optional[float]) -> None:
        """Set the timeout of the underlying socket."""
        self.sock.settimeout(timeout)

    def setsockopt(self, *args: Any) -> None:
        """Set an option of the underlying socket."""
        self.sock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        """Shut the underlying socket down (wakes a blocked reader or writer)."""
        self.sock.shutdown(how)

    def close(self) -> None:
        """Close the underlying socket (no TLS close_notify, as QEMU after NBD_CMD_DISC)."""
        self.sock.close()


# -- credentials ---------------------------------------------------------------------

#: X509_V_ERR_INVALID_PURPOSE: QEMU 7.2 loads such a certificate (peers may refuse it).
_INVALID_PURPOSE = 26
#: OpenSSL verify codes -> GnuTLS's descriptions (as QEMU prints them).
_VERIFY_TEXT = {
    2: "The certificate hasn't got a known issuer",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    10: "The certificate has expired",
    9: "The certificate is not yet activated",
    23: "The certificate has been revoked",
    7: "The certificate's signature is invalid",
}


def _cred_path(directory: str, name: str, required: bool) -> Optional[str]:
    """qcrypto_tls_creds_get_path(): ``dir/name`` if readable.

    :raises QMPError: ``Unable to access credentials PATH: STRERROR`` when
        the file is required or exists but cannot be read.
    """
    path = "%s/%s" % (directory, name)
    if os.access(path, os.R_OK):
        return path
    try:
        os.stat(path)
        err = 13  # exists: EACCES
    except FileNotFoundError:
        if not required:
            return None
        err = 2
    except OSError as exc:
        err = exc.errno or 5
    raise QMPError("Unable to access credentials %s: %s" % (path, os.strerror(err)))


def _reason(exc: BaseException) -> str:
    """A short text for an ssl/OS error."""
    if isinstance(exc, ssl.SSLError):
        if "KEY_VALUES_MISMATCH" in str(exc):
            return "The certificate and the given key do not match."
        text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", re.sub(r"^\[[^\]]*\]\s*", "", str(exc)))
        return text or str(exc.reason or exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("ascii", "replace")
    except OSError as exc:
        raise QMPError("Cannot load %s %s: Error reading file \u201c%s\u201d: %s"
                       % (what, path, path, exc.strerror)) from None


def _pump(client: Any, server: Any, cbio: Any, sbio: Any) -> Optional[BaseException]:
    """Handshake two in-memory SSL objects; return the server's or client's error."""
    c_in, c_out = cbio
    s_in, s_out = sbio
    done = {"c": False, "s": False}
    for _i in range(50):
        for key, obj in (("c", client), ("s", server)):
            if done[key]:
                continue
            try:
                obj.do_handshake()
                done[key] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return exc
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if done["c"] and done["s"]:
            # TLS 1.3: the server judges the client's certificate after the
            # client finished; its verdict arrives with the first read.
            try:
                client.read(1)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLError as exc:
                return exc
            return None
    return None


def _sanity_check(server: bool, ca: str, cert: Optional[str], key: Optional[str],
                  password: Optional[str]) -> None:
    """qcrypto_tls_creds_x509_sanity_check(): the files parse, and the
    endpoint's own certificate is signed by the CA (checked for its role:
    a server certificate as a client sees it, a client certificate as a
    server does)."""
    role = "server" if server else "client"
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert:
        try:
            probe.load_verify_locations(cadata=_read_text(cert, "certificate"))
        except (ssl.SSLError, ValueError) as exc:
            raise QMPError("Unable to import %s certificate %s: %s"
                           % (role, cert, _reason(exc))) from None
    if os.access(ca, os.R_OK):
        try:
            probe.load_verify_locations(cadata=_read_text(ca, "CA cert list"))
        except (ssl.SSLError, ValueError):
            raise QMPError("Unable to import CA certificate list %s" % ca) from None
    if not cert or not key:
        return
    holder = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    judge = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if server else ssl.PROTOCOL_TLS_SERVER)
    try:
        holder.load_cert_chain(cert, key, password)
        if not server:
            judge.load_cert_chain(cert, key, password)  # a server needs a certificate
            holder.check_hostname = False
            holder.verify_mode = ssl.CERT_NONE
        judge.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError):
        return  # reported with the right text when the context is built
    judge.check_hostname = False
    judge.verify_mode = ssl.CERT_REQUIRED
    bios = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _i in range(2)]
    if server:
        client = judge.wrap_bio(*bios[0], server_side=False)
        srv = holder.wrap_bio(*bios[1], server_side=True)
    else:
        client = holder.wrap_bio(*bios[0], server_side=False)
        srv = judge.wrap_bio(*bios[1], server_side=True)
    failure = _pump(client, srv, bios[0], bios[1])
    code = getattr(failure, "verify_code", None)
    if code is None or code == _INVALID_PURPOSE:
        return  # verified, or failed for a reason QEMU's check lets through
    text = _VERIFY_TEXT.get(code, getattr(failure, "verify_message", "") or _reason(failure))
    raise QMPError("Our own certificate %s failed validation against %s: %s" % (cert, ca, text))


def load_x509(directory: str, endpoint: str = "server", verify_peer: bool = True,
              sanity_check: bool = True, password: Optional[str] = None) -> ssl.SSLContext:
    """qcrypto_tls_creds_x509_load(): the context of a ``tls-creds-x509``.

    :param directory: the ``dir`` property.
    :param endpoint: ``"server"`` or ``"client"``.
    :param verify_peer: require and check the peer's certificate.
    :param sanity_check: check the files before loading them (QEMU's default).
    :param password: the private key's password (``passwordid``).
    :return: a context (TLS 1.2 or newer).
    :raises QMPError: QEMU's texts, e.g. ``Unable to access credentials
        /d/ca-cert.pem: No such file or directory``.
    """
    if not directory:
        raise QMPError("Missing 'dir' property value")
    server = endpoint == "server"
    role = "server" if server else "client"
    ca = _cred_path(directory, "ca-cert.pem", True)
    if ca is None:
        raise AssertionError("CA missing")
    crl = _cred_path(directory, "ca-crl.pem", False) if server else None
    cert = _cred_path(directory, "%s-cert.pem" % role, server)
    key = _cred_path(directory, "%s-key.pem" % role, server)
    if sanity_check:
        _sanity_check(server, ca, cert, key, password)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise QMPError("Cannot load CA certificate '%s': %s" % (ca, _reason(exc))) from None
    if cert and key:
        try:
            ctx.load_cert_chain(cert, key, password)
        except (ssl.SSLError, OSError) as exc:
            raise QMPError("Cannot load certificate '%s' & key '%s': %s"
                           % (cert, key, _reason(exc))) from None
    if crl:
        try:
            ctx.load_verify_locations(cafile=crl)
        except (ssl.SSLError, OSError) as exc:
            raise QMPError("Cannot load CRL '%s': %s" % (crl, _reason(exc))) from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if server:
        ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    else:
        ctx.check_hostname = verify_peer
        ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return ctx


# -- identities ----------------------------------------------------------------------

_DN_KEYS: Dict[str, str] = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O", "organizationalUnitName": "OU",
    "domainComponent": "DC", "streetAddress": "STREET", "userId": "UID",
    "emailAddress": "EMAIL", "serialNumber": "serialNumber", "title": "title",
}


def _dn_escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def peer_dn(cert: Optional[Dict[str, Any]]) -> str:
    """The subject of a peer certificate as QEMU 7.2 reports it
    (``gnutls_x509_crt_get_dn``): RFC 4514 escaping and short names, but the
    RDNs in certificate order, e.g. ``C=FR,O=Example\\, Inc.,CN=client``;
    ``""`` without a certificate.

    :param cert: :meth:`ssl.SSLObject.getpeercert` of a verified peer.
    """
    if not cert:
        return ""
    rdns = []
    for rdn in cert.get("subject", ()):
        rdns.append("+".join("%s=%s" % (_DN_KEYS.get(k, k), _dn_escape(v)) for k, v in rdn))
    return ",".join(rdns)
