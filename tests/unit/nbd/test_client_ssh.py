"""``nbd+ssh://`` URIs (libnbd >= 1.22 syntax) and the optional paramiko import.

The tunnel itself is tested against a real sshd in
``tests/integration/nbd/test_ssh.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockd.nbd import client as nbdc
from blockd.nbd.client_transport import NBDURI, URIError, parse_uri

MODULE_UTILS = Path(__file__).resolve().parents[3] / "plugins" / "module_utils"


@pytest.mark.parametrize("uri, expect", [
    ("nbd+ssh://alice@host.example/vda?socket=/run/blockd/nbd.sock",
     dict(tls=False, transport="ssh", host="host.example", port=22, ssh_user="alice",
          socket="/run/blockd/nbd.sock", export="vda", ssh_compress=False)),
    ("nbd+ssh://127.0.0.1:2222/?socket=/tmp/a%20b.sock",
     dict(host="127.0.0.1", port=2222, ssh_user=None, socket="/tmp/a b.sock", export="")),
    ("nbds+ssh://bob@[::1]:22/x%2Fy?socket=/s&tls-certificates=/pki&tls-hostname=h",
     dict(tls=True, host="::1", port=22, ssh_user="bob", export="x/y",
          tls_certificates="/pki", tls_hostname="h")),
    ("nbd+ssh://h/e?nbd-port=10810", dict(socket="", nbd_port=10810, export="e")),
    ("nbd+ssh://h/e", dict(socket="", nbd_port=10809)),
    ("nbd+ssh://h/e?socket=/s&compress", dict(ssh_compress=True)),
    ("nbd+ssh://h/e?socket=/s&compress=off", dict(ssh_compress=False)),
    ("nbd+ssh://h/e?socket=/s&unknown-key=1", dict(socket="/s")),  # ignored, as libnbd does
    ("NBD+SSH://h/e?socket=/s", dict(transport="ssh")),
])
def test_parse_ssh_uri(uri, expect):
    parsed = parse_uri(uri)
    assert isinstance(parsed, NBDURI)
    for key, value in expect.items():
        assert getattr(parsed, key) == value, (key, parsed)


@pytest.mark.parametrize("uri, match", [
    ("nbd+ssh:///x?socket=/s", "needs the SSH server"),
    ("nbd+ssh://-oProxyCommand=evil/x?socket=/s", "must not start with '-'"),
    ("nbd+ssh://u:secret@h/x?socket=/s", "no password"),
    ("nbd+ssh://h/x?socket=relative.sock", "absolute path"),
    ("nbd+ssh://h/x?socket=/s&nbd-port=10809", "not both"),
    ("nbd+ssh://h/x?nbd-port=0", "not a TCP port"),
    ("nbd+ssh://h/x?nbd-port=http", "not a TCP port"),
    ("nbd+ssh://h:99999/x?socket=/s", "bad SSH port"),
    ("nbd+ssh://h/x?socket=/s&compress=maybe", "not a boolean"),
    ("nbds+ssh://h/x?socket=/s&tls-psk-file=/k", "TLS-PSK"),
])
def test_parse_ssh_uri_errors(uri, match):
    with pytest.raises(URIError, match=match):
        parse_uri(uri)


def test_ssh_uri_has_no_local_address():
    """Paths that open a local socket refuse nbd+ssh clearly instead of misusing the host."""
    parsed = parse_uri("nbd+ssh://h/x?socket=/s")
    with pytest.raises(URIError, match="connect_uri"):
        _ = parsed.address
    with pytest.raises(URIError, match="no local address"):
        nbdc.list_exports("nbd+ssh://h/x?socket=/s")


def test_other_schemes_unchanged():
    assert parse_uri("nbd://h/x").port == 10809 and parse_uri("nbd://h/x").ssh_user is None
    assert parse_uri("nbd+unix:///x?socket=/s").address == "/s"
    with pytest.raises(URIError, match="only valid with nbd\\+unix"):
        parse_uri("nbd://h/x?socket=/s")


def test_without_paramiko_a_clear_error_naming_it():
    """On a target without paramiko: nbd+ssh fails naming the library; nothing else changes."""
    code = r"""
import sys
sys.modules["paramiko"] = None          # as if not installed: `import paramiko` fails
from blockd.nbd import client
from blockd.nbd.client_ssh import SSHLibraryMissing, have_paramiko
assert not have_paramiko()
assert client.parse_uri("nbd+ssh://h/x?socket=/s").transport == "ssh"
try:
    client.connect_uri("nbd+ssh://127.0.0.1:1/x?socket=/s", ssh_identity="/k")
except SSHLibraryMissing as exc:
    assert exc.library == "paramiko" and isinstance(exc, client.NBDError), exc
    print("ERR", exc)
else:
    raise SystemExit("no error")
"""
    env = {**os.environ, "PYTHONPATH": str(MODULE_UTILS)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ERR nbd+ssh needs the Python library paramiko" in p.stdout
    assert "python3-paramiko" in p.stdout
