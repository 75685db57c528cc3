"""NBD over x509 TLS, server side: blockd against qemu-storage-daemon 7.2.

Every ``engine`` test runs the same expectations against qsd (the reference)
and blockd: ``tls-creds-x509`` objects (QMP and ``--object``) with QEMU's
error texts, ``nbd-server-start tls-creds=``/``tls-authz=``, and real TLS
clients -- qemu-img, nbdinfo, python libnbd, blockd's own client and
``blockd.copy`` -- plus a raw client for the option replies before and after
STARTTLS.  Certificates come from ``helpers/pki.py`` (openssl CLI).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile

import pytest

from blockd.copy import copy
from blockd.nbd import client as nbdc
from blockd.nbd import proto
from helpers import MiB, qemu_img, require_module, require_tool, run
from helpers.daemon import MODULE_UTILS
from helpers.nbd import hammer
from helpers.pki import pki  # noqa: F401  (a pytest fixture)

from .conftest import HOLE, SIZE, expected_content
from .rawclient import RawNBD

WAIT = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(daemon, engine, pki, image, verify_peer="on", server="addr.type=unix,addr.path=nbd.sock",
           extra=()):
    """The 16 MiB test image exported writable as ``x`` with TLS required."""
    return daemon(
        engine, "--object",
        f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer={verify_peer}",
        *extra,
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--blockdev", "driver=raw,node-name=r,file=f",
        "--nbd-server", f"{server},tls-creds=tls0",
        "--export", "type=nbd,id=x,node-name=r,name=x,writable=on")


def _uri(d, certs, export="x") -> str:
    return (d.nbd_uri(export).replace("nbd+unix", "nbds+unix")
            + f"&tls-certificates={certs}&tls-hostname=localhost")


def _ctx(certs) -> ssl.SSLContext:
    return nbdc.tls_context(certificates_dir=str(certs))


def _connect(d, certs, **kw):
    return nbdc.connect(d.nbd_socket, "x", tls=_ctx(certs), tls_hostname="localhost", **kw)


def _qemu_img_tls(pki, d, command: str, *args: str, dest: str = ""):
    """``qemu-img COMMAND ARGS`` on the export (``--image-opts``, client creds), then DEST."""
    opts = (f"driver=nbd,server.type=unix,server.path={d.nbd_socket},export=x,"
            "tls-creds=tc,tls-hostname=localhost")
    tail = [dest] if dest else []
    return qemu_img(command, *args, "--object", f"tls-creds-x509,id=tc,dir={pki},endpoint=client",
                    "--image-opts", opts, *tail)


def _nbdinfo(uri: str, check: bool = True):
    return run([require_tool("nbdinfo", "libnbd-bin"), "--json", uri], check=check, timeout=WAIT)


# -- real clients ----------------------------------------------------------------------------

def test_tls_qemu_img_nbdinfo_libnbd(daemon, engine, pki, image, tmp_path):
    d = _serve(daemon, engine, pki, image)
    info = json.loads(_nbdinfo(_uri(d, pki)).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
    out = json.loads(_qemu_img_tls(pki, d, "info", "--output=json").stdout)
    assert out["virtual-size"] == SIZE
    copy_path = tmp_path / "convert.raw"
    _qemu_img_tls(pki, d, "convert", "-O", "raw", dest=str(copy_path))
    assert copy_path.read_bytes() == expected_content()
    nbd = require_module("nbd", "python3-libnbd")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki))
    h.connect_uri(d.nbd_uri("x").replace("nbd+unix", "nbds+unix"))
    try:
        assert h.get_tls_negotiated()
        assert h.pread(8, HOLE[0] - 4) == expected_content()[HOLE[0] - 4:HOLE[0] + 4]
        h.pwrite(b"\x5a" * 65536, MiB)
        h.flush()
    finally:
        h.shutdown()
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x5a" * 65536


def test_tls_blockd_client_many_threads(daemon, engine, pki, image):
    """One TLS stream, a reader thread and several writer threads on the client;
    pipelined reads and writes through the server's TLS data path."""
    d = _serve(daemon, engine, pki, image)
    with _connect(d, pki) as c:
        assert c.info.tls and c.info.size == SIZE
        assert c.pread(0, SIZE) == expected_content()
        assert hammer(c, rounds=6, wait=WAIT) == []


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def test_tls_nbd_copy_same_bytes_as_unix(daemon, engine, pki, image, tmp_path):
    """blockd.copy over TLS (TCP, API and CLI) gives the bytes a plain unix pull gives."""
    plain = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={image}",
                   "--blockdev", "driver=raw,node-name=r,file=f",
                   "--export", "type=nbd,id=x,node-name=r,name=x", nbd=True)
    copy(plain.nbd_uri("x"), str(tmp_path / "unix.raw"))
    plain.quit()
    port = _free_port()
    _serve(daemon, engine, pki, image,
           server=f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}")
    uri = f"nbds://localhost:{port}/x"
    res = copy(uri, str(tmp_path / "tls.raw"), tls=_ctx(pki))
    assert res
    env = {**os.environ, "PYTHONPATH": str(MODULE_UTILS)}
    proc = subprocess.run([sys.executable, "-m", "blockd.copy", "pull", uri,
                           str(tmp_path / "cli.qcow2"), "--format", "qcow2",
                           "--tls-cert-dir", str(pki)],
                          capture_output=True, text=True, env=env, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    qemu_img("convert", "-O", "raw", str(tmp_path / "cli.qcow2"), str(tmp_path / "cli.raw"))
    assert _sha(tmp_path / "unix.raw") == _sha(image)
    assert _sha(tmp_path / "tls.raw") == _sha(tmp_path / "unix.raw")
    assert _sha(tmp_path / "cli.raw") == _sha(tmp_path / "unix.raw")


# -- refusals -----------------------------------------------------------------------------------

def test_tls_client_certificate_checks(daemon, engine, pki, image):
    d = _serve(daemon, engine, pki, image, verify_peer="on")
    # no client certificate, or one from another CA: refused by the server.  qsd
    # (GnuTLS) checks after the handshake and hangs up; blockd (OpenSSL) fails the
    # handshake with an alert that says why.  Either way the client learns it.
    for certs in (pki / "noclient", pki / "rogueclient"):
        with pytest.raises(nbdc.NBDTLSError, match="rejected the client certificate|"
                           "alert certificate required|alert unknown ca"):
            with _connect(d, certs) as c:
                c.pread(0, 512)
        assert _nbdinfo(_uri(d, certs), check=False).returncode != 0
    # the client does not trust the server's CA
    with pytest.raises(nbdc.NBDTLSError, match="certificate was rejected") as info:
        _connect(d, pki / "wrongca")
    assert info.value.errno == errno.EPROTO
    # the server is still up and serves a good client
    with _connect(d, pki) as c:
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"
    assert d.alive


def test_tls_verify_peer_off_needs_no_client_certificate(daemon, engine, pki, image):
    d = _serve(daemon, engine, pki, image, verify_peer="off")
    with _connect(d, pki / "noclient") as c:
        assert c.info.tls and c.pread(HOLE[0], 8) == bytes(8)


def test_tls_plaintext_client_refused(daemon, engine, pki, image):
    d = _serve(daemon, engine, pki, image)
    with pytest.raises(nbdc.NBDOptionError, match="NBD_REP_ERR_TLS_REQD.*requires TLS"):
        nbdc.connect(d.nbd_socket, "x")
    proc = _nbdinfo(d.nbd_uri("x"), check=False)
    assert proc.returncode != 0
    proc = run([require_tool("qemu-img", "qemu-utils"), "info", d.nbd_uri("x")], check=False)
    assert proc.returncode != 0
    with _connect(d, pki) as c:
        assert c.info.tls
    assert d.alive


def _opt_text(reply) -> "tuple[int, str]":
    rtype, data = reply
    return rtype, data.decode()


def test_tls_options_before_and_after_starttls(daemon, engine, pki, image):
    d = _serve(daemon, engine, pki, image)
    with RawNBD(d.nbd_socket) as c:
        c.start()
        assert [_opt_text(r) for r in c.ask(proto.OPT_LIST)] == [
            (proto.REP_ERR_TLS_REQD, "Option 0x3 not permitted before TLS")]
        assert [_opt_text(r) for r in c.ask(proto.OPT_GO, proto.pack_info_request("x", ()))] == [
            (proto.REP_ERR_TLS_REQD, "Option 0x7 not permitted before TLS")]
        assert [_opt_text(r) for r in c.ask(proto.OPT_STRUCTURED_REPLY)] == [
            (proto.REP_ERR_TLS_REQD, "Option 0x8 not permitted before TLS")]
        assert c.ask(proto.OPT_STARTTLS) == [(proto.REP_ACK, b"")]
        ctx = _ctx(pki)
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        assert [_opt_text(r) for r in c.ask(proto.OPT_STARTTLS)] == [
            (proto.REP_ERR_INVALID, "TLS already enabled")]
        assert [name for _, name in [(t, bytes(p[4:]).decode()) for t, p in
                                     c.ask(proto.OPT_LIST) if t == proto.REP_SERVER]] == ["x"]
        assert c.go("x") == (SIZE, 0xD6D)
    with RawNBD(d.nbd_socket) as c:  # EXPORT_NAME cannot be refused: the server hangs up
        c.start()
        c.option(proto.OPT_EXPORT_NAME, b"x")
        assert c.is_closed()
    with RawNBD(d.nbd_socket) as c:  # ABORT: TLS_REQD, then the end
        c.start()
        assert [_opt_text(r) for r in c.ask(proto.OPT_ABORT)] == [
            (proto.REP_ERR_TLS_REQD, "Option 0x2 not permitted before TLS")]
        assert c.is_closed()
    with RawNBD(d.nbd_socket) as c:  # STARTTLS with a payload: error reply, then the end
        c.start()
        assert [_opt_text(r) for r in c.ask(proto.OPT_STARTTLS, b"junk")] == [
            (proto.REP_ERR_INVALID, "option 'starttls' has unexpected length")]
        assert c.is_closed()
    with RawNBD(d.nbd_socket) as c:  # not even fixed newstyle
        c.start(cflags=proto.FLAG_C_NO_ZEROES)
        c.option(proto.OPT_LIST)
        assert c.is_closed()
    with RawNBD(d.nbd_socket) as c:  # garbage instead of a TLS ClientHello
        c.start()
        assert c.ask(proto.OPT_STARTTLS) == [(proto.REP_ACK, b"")]
        c.send(b"\x16\x03\x01\x00\x05hello" + bytes(64))
        assert c.is_closed()
    with _connect(d, pki) as c:
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"
    assert d.alive


def test_starttls_without_tls_configured(daemon, engine, image):
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={image}",
               "--blockdev", "driver=raw,node-name=r,file=f",
               "--export", "type=nbd,id=x,node-name=r,name=x", nbd=True)
    with RawNBD(d.nbd_socket) as c:
        c.start()
        assert [_opt_text(r) for r in c.ask(proto.OPT_STARTTLS)] == [
            (proto.REP_ERR_POLICY, "TLS not configured")]
        assert c.go("x")[0] == SIZE
    with RawNBD(d.nbd_socket) as c:
        c.start()
        assert [_opt_text(r) for r in c.ask(proto.OPT_STARTTLS, b"x")] == [
            (proto.REP_ERR_INVALID, "option 'starttls' has unexpected length")]
        assert c.go("x")[0] == SIZE  # without TLS configured the error is not fatal


def test_tls_authz_simple(daemon, engine, pki, image):
    d = _serve(daemon, engine, pki, image, verify_peer="on",
               extra=("--object", "authz-simple,id=auth0,identity=CN=client"),
               server="addr.type=unix,addr.path=nbd.sock,tls-authz=auth0")
    with _connect(d, pki) as c:
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"
    with pytest.raises((nbdc.NBDTLSError, nbdc.NBDDisconnected, nbdc.NBDProtocolError)):
        with _connect(d, pki / "stranger") as c:
            c.pread(0, 512)
    qmp = d.qmp
    assert qmp.cmd("qom-get", path="/objects/auth0", property="identity") == "CN=client"
    qmp.cmd("qom-set", path="/objects/auth0", property="identity", value="CN=stranger")
    with _connect(d, pki / "stranger") as c:
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"
    assert d.alive


# -- QMP and the command line ----------------------------------------------------------------

def _bad_dirs(pki, tmp_path) -> dict:
    """Credential directories with one thing wrong each (server endpoint)."""
    def make(name, files, junk=()):
        d = tmp_path / name
        d.mkdir()
        for target, source in files.items():
            (d / target).write_bytes((pki / source).read_bytes())
        for target in junk:
            (d / target).write_text("junk\n")
        return d
    ca = {"ca-cert.pem": "ca-cert.pem"}
    server = {"server-cert.pem": "server-cert.pem", "server-key.pem": "server-key.pem"}
    dirs = {
        "onlyca": make("onlyca", ca),
        "nokey": make("nokey", {**ca, "server-cert.pem": "server-cert.pem"}),
        "garbca": make("garbca", server, junk=("ca-cert.pem",)),
        "garbcert": make("garbcert", {**ca, "server-key.pem": "server-key.pem"},
                         junk=("server-cert.pem",)),
        "garbkey": make("garbkey", {**ca, "server-cert.pem": "server-cert.pem"},
                        junk=("server-key.pem",)),
        "mismatch": make("mismatch", {**ca, "server-cert.pem": "server-cert.pem",
                                      "server-key.pem": "client-key.pem"}),
        "wrongca": make("wrongca", {**server, "ca-cert.pem": "rogue-cert.pem"}),
        "garbcrl": make("garbcrl", {**ca, **server}, junk=("ca-crl.pem",)),
        "cadir": make("cadir", server),
    }
    (dirs["cadir"] / "ca-cert.pem").mkdir()
    return dirs


def test_tls_creds_errors_as_qsd(daemon, engine, pki, tmp_path):
    """object-add of tls-creds-x509: QEMU's texts (exact where QEMU writes them,
    the prefix where the rest is the TLS library's own wording)."""
    dirs = _bad_dirs(pki, tmp_path)
    d = daemon(engine)
    qmp = d.qmp

    def err(**props):
        return qmp.error("object-add", **{"qom-type": "tls-creds-x509", "id": "t", **props})["desc"]

    def dpath(name, file):
        return f"{dirs[name]}/{file}"
    assert err(endpoint="server") == "Missing 'dir' property value"
    assert err(dir="/nonexistent", endpoint="server") == \
        "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
    assert err(dir=str(dirs["onlyca"]), endpoint="server") == \
        f"Unable to access credentials {dpath('onlyca', 'server-cert.pem')}: No such file or directory"
    assert err(dir=str(dirs["nokey"]), endpoint="server") == \
        f"Unable to access credentials {dpath('nokey', 'server-key.pem')}: No such file or directory"
    assert err(dir=str(dirs["garbca"]), endpoint="server") == \
        f"Unable to import CA certificate list {dpath('garbca', 'ca-cert.pem')}"
    assert err(dir=str(dirs["garbcert"]), endpoint="server").startswith(
        f"Unable to import server certificate {dpath('garbcert', 'server-cert.pem')}: ")
    assert err(dir=str(dirs["garbkey"]), endpoint="server").startswith(
        f"Cannot load certificate '{dpath('garbkey', 'server-cert.pem')}' & key "
        f"'{dpath('garbkey', 'server-key.pem')}': ")
    assert err(dir=str(dirs["mismatch"]), endpoint="server") == (
        f"Cannot load certificate '{dpath('mismatch', 'server-cert.pem')}' & key "
        f"'{dpath('mismatch', 'server-key.pem')}': The certificate and the given key do not match.")
    assert err(dir=str(dirs["wrongca"]), endpoint="server") == (
        f"Our own certificate {dpath('wrongca', 'server-cert.pem')} failed validation against "
        f"{dpath('wrongca', 'ca-cert.pem')}: The certificate hasn't got a known issuer")
    assert err(dir=str(dirs["garbcrl"]), endpoint="server").startswith(
        f"Cannot load CRL '{dpath('garbcrl', 'ca-crl.pem')}': ")
    path = dpath("cadir", "ca-cert.pem")
    assert err(dir=str(dirs["cadir"]), endpoint="server") == \
        f"Cannot load CA cert list {path}: Error reading file \u201c{path}\u201d: Is a directory"
    assert err(dir=str(pki), endpoint="server", loaded=True) == \
        "Property 'tls-creds-x509.loaded' is not writable"
    assert err(dir=str(pki), endpoint="bogus") == "Parameter 'endpoint' does not accept value 'bogus'"
    assert err(dir=str(pki), endpoint="server", passwordid="nosuch") == "No secret with id 'nosuch'"
    # sanity-check=off loads a certificate its CA does not vouch for (peers will refuse it)
    qmp.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "unchecked",
                             "dir": str(dirs["wrongca"]), "endpoint": "server",
                             "sanity-check": False})
    # the client endpoint needs only the CA
    qmp.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "cl",
                             "dir": str(dirs["onlyca"]), "endpoint": "client"})
    assert qmp.error("object-add", **{"qom-type": "authz-simple", "id": "a"})["desc"] == \
        "Parameter 'identity' is missing"
    assert qmp.cmd("qom-list", path="/objects") is not None
    assert qmp.cmd("query-version") and d.alive


def test_tls_creds_qom_and_server_start(daemon, engine, pki, image):
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={image}",
               "--blockdev", "driver=raw,node-name=r,file=f")
    qmp = d.qmp
    qmp.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki),
                             "endpoint": "server"})
    qmp.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "cl", "dir": str(pki)})
    qmp.cmd("object-add", **{"qom-type": "throttle-group", "id": "tg"})
    assert qmp.cmd("qom-list", path="/objects/tls0") == [
        {"name": "type", "type": "string"},
        {"name": "endpoint", "type": "QCryptoTLSCredsEndpoint"},
        {"name": "dir", "type": "string"}, {"name": "verify-peer", "type": "bool"},
        {"name": "priority", "type": "string"}, {"name": "sanity-check", "type": "bool"},
        {"name": "passwordid", "type": "string"}, {"name": "loaded", "type": "bool"}]
    get = {p: qmp.cmd("qom-get", path="/objects/tls0", property=p)
           for p in ("endpoint", "dir", "verify-peer", "priority", "sanity-check", "loaded")}
    assert get == {"endpoint": "server", "dir": str(pki), "verify-peer": True, "priority": "",
                   "sanity-check": True, "loaded": True}
    assert qmp.cmd("qom-get", path="/objects/cl", property="endpoint") == "client"
    assert qmp.error("qom-set", path="/objects/tls0", property="loaded", value=False)["desc"] == \
        "Property 'tls-creds-x509.loaded' is not writable"
    short = tempfile.mkdtemp(prefix="bdtls-")  # the test directory may be too long for a socket
    sock = os.path.join(short, "nbd.sock")

    def start(creds, **kw):
        return qmp.cmd_raw("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                                "tls-creds": creds, **kw})
    assert start("nope")["error"]["desc"] == "No TLS credentials with id 'nope'"
    assert start("tg")["error"]["desc"] == "Object with id 'tg' is not TLS credentials"
    assert start("cl")["error"]["desc"] == "Expected TLS credentials for a server endpoint"
    assert start("tls0") == {"return": {}}
    qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "x", "node-name": "r", "name": "x"})
    # qsd lets in-use credentials go: the server keeps its reference and goes on
    qmp.cmd("object-del", id="tls0")
    with nbdc.connect(sock, "x", tls=_ctx(pki), tls_hostname="localhost") as c:
        assert c.info.tls and c.pread(0, 4) == b"\x00\x01\x02\x03"
    with pytest.raises(nbdc.NBDOptionError, match="TLS_REQD"):
        nbdc.connect(sock, "x")
    # nbd-server-stop drops a connected TLS client
    with nbdc.connect(sock, "x", tls=_ctx(pki), tls_hostname="localhost") as c:
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"
        qmp.cmd("nbd-server-stop")
        with pytest.raises(nbdc.NBDError):
            c.pread(0, 4, timeout=WAIT)
    assert start("tls0")["error"]["desc"] == "No TLS credentials with id 'tls0'"
    shutil.rmtree(short, ignore_errors=True)


def test_tls_command_line_errors(daemon, engine, pki, tmp_path):
    res = daemon.run(engine, "--object", "tls-creds-x509,id=t,dir=/nonexistent,endpoint=server")
    assert res.returncode == 1
    assert res.stderr.rstrip().endswith(
        "--object tls-creds-x509,id=t,dir=/nonexistent,endpoint=server: "
        "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory")
    server = f"addr.type=unix,addr.path={tmp_path}/x.sock,tls-creds=t"
    res = daemon.run(engine, "--object", f"tls-creds-x509,id=t,dir={pki},endpoint=client",
                     "--nbd-server", server)
    assert res.returncode == 1
    assert res.stderr.rstrip().endswith(
        f"--nbd-server {server}: Expected TLS credentials for a server endpoint")


def test_tls_authz_identity_is_the_subject_dn(daemon, engine, pki, image):
    """The identity authz-simple compares is the client certificate's subject as
    QEMU (GnuTLS) spells it: RDNs in certificate order, ``+`` inside a multi-valued
    RDN, ``\\,`` escaped."""
    d = _serve(daemon, engine, pki, image, verify_peer="on",
               extra=("--object", "authz-simple,id=auth0,identity=CN=nobody"),
               server="addr.type=unix,addr.path=nbd.sock,tls-authz=auth0")
    with pytest.raises((nbdc.NBDTLSError, nbdc.NBDDisconnected, nbdc.NBDProtocolError)):
        with _connect(d, pki / "multi") as c:
            c.pread(0, 512)
    d.qmp.cmd("qom-set", path="/objects/auth0", property="identity",
              value="C=FR,O=Example\\, Inc.,CN=multi+OU=Backup")
    with _connect(d, pki / "multi") as c:
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"
    # verify-peer=off: no client certificate is asked for, tls-authz is not applied (QEMU)
    d2 = _serve(daemon, engine, pki, image, verify_peer="off",
                extra=("--object", "authz-simple,id=auth0,identity=CN=nobody"),
                server="addr.type=unix,addr.path=nbd2.sock,tls-authz=auth0")
    with nbdc.connect(d2.nbd_socket, "x", tls=_ctx(pki / "noclient"),
                      tls_hostname="localhost") as c:
        assert c.pread(0, 4) == b"\x00\x01\x02\x03"
