"""x509 certificates for the TLS tests, made by the ``openssl`` CLI.

:func:`make_pki` writes, in QEMU's ``tls-creds-x509`` / libnbd's
``tls-certificates`` layout, a directory that serves both ends
(``ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` for ``localhost``
and 127.0.0.1, ``client-cert.pem``/``client-key.pem`` with ``CN=client``),
plus a rogue CA (``rogue-cert.pem``) and client directories for the failure
cases (see :data:`CLIENT_DIRS`).  :func:`pki` is the module-scoped fixture:
import it into a test module (``from helpers.pki import pki``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .policy import require_tool
from .tools import run

#: Client directories made beside the main one (``pki / name``), each with
#: ``ca-cert.pem`` and maybe ``client-cert.pem``/``client-key.pem``:
#: ``noclient`` (the right CA, no client certificate), ``wrongca`` (trusts
#: only the rogue CA), ``stranger`` (a client certificate ``CN=stranger``
#: from the right CA), ``rogueclient`` (a client certificate from the rogue CA),
#: ``multi`` (subject ``C=FR, O=Example\, Inc., OU=Backup + CN=multi``: several RDNs,
#: a multi-valued one and a comma, for identity spelling).
CLIENT_DIRS = ("noclient", "wrongca", "stranger", "rogueclient", "multi")

_SERVER_EXT = ("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
               "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n")
_CLIENT_EXT = "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"


def _openssl(*args: str, cwd: Path) -> None:
    run([require_tool("openssl", "openssl"), *args], cwd=cwd)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
             "-out", f"{name}-cert.pem", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _sign(d: Path, ca: str, name: str, ext: str, subj: str = "") -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
             "-out", f"{name}.csr", "-subj", subj or f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
             f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=d)


def _client_dir(d: Path, name: str, ca: str, cert: str = "") -> None:
    sub = d / name
    sub.mkdir()
    shutil.copy(d / f"{ca}-cert.pem", sub / "ca-cert.pem")
    if cert:
        shutil.copy(d / f"{cert}-cert.pem", sub / "client-cert.pem")
        shutil.copy(d / f"{cert}-key.pem", sub / "client-key.pem")


def make_pki(d: Path) -> Path:
    """Write the certificates into the (existing, empty) directory ``d``.

    :return: ``d``.
    """
    _make_ca(d, "ca")
    _make_ca(d, "rogue")
    _sign(d, "ca", "server", _SERVER_EXT)
    _sign(d, "ca", "client", _CLIENT_EXT)
    _sign(d, "ca", "stranger", _CLIENT_EXT)
    _sign(d, "rogue", "rogueclient", _CLIENT_EXT, subj="/CN=client")
    _sign(d, "ca", "multi", _CLIENT_EXT, subj="/C=FR/O=Example, Inc./OU=Backup+CN=multi")
    _client_dir(d, "noclient", "ca")
    _client_dir(d, "wrongca", "rogue", "client")
    _client_dir(d, "stranger", "ca", "stranger")
    _client_dir(d, "rogueclient", "ca", "rogueclient")
    _client_dir(d, "multi", "ca", "multi")
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory made by :func:`make_pki` (one per test module)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
