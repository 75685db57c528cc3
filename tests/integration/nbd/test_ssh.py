"""NBD over an SSH tunnel (``nbd+ssh://``, ``blockd.nbd.client_ssh``) to a real sshd.

The ``sshd`` fixture (``helpers/sshd.py``) runs OpenSSH's sshd on 127.0.0.1 with
a fresh host key, key authentication only and a known_hosts file for it; the
NBD servers are blockd and qemu-storage-daemon 7.2 serving the exports of
``conftest.py`` on a unix socket, reached through the tunnel with
``direct-streamlocal@openssh.com`` channels.  Copies go through nbd_copy's CLI
(``python3 -m blockd.copy``) and must give the same bytes and digests as over
the unix socket; every failure (unknown or changed host key, wrong key,
missing socket) must be a clear error that leaves no output file behind.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from blockd.copy import copy
from blockd.nbd import client as nbdc
from blockd.nbd.client_ssh import (NBDSSHError, SSHAuthError, SSHChannelError, SSHHostKeyError,
                                   SSHTunnel)
from helpers import missing, nbd_uri
from helpers.tools import copy_cli as cli
from helpers.pki import pki  # noqa: F401  (a pytest fixture)
from helpers.sshd import free_port, keygen, sshd  # noqa: F401  (a pytest fixture)

from .conftest import SIZE, expected_content, wait_until



def ssh_opts(server, known_hosts=None, identity=None):
    return ["--ssh-identity", identity or server.key,
            "--ssh-known-hosts", known_hosts or server.known_hosts]


def ssh_kwargs(server):
    return {"ssh_identity": str(server.key), "ssh_known_hosts": str(server.known_hosts),
            "ssh_allow_agent": False}


def nothing_written(d, name):
    """No output, partial output, state or manifest named after ``name`` in ``d``."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith(name)) == []


def accepted_logins(server):
    return server.log().count("Accepted publickey for ")


# -- same bytes as over the unix socket -------------------------------------------------------

def test_pull_over_ssh_same_bytes_as_unix(engine, start_nbd, sshd, tmp_path):
    srv = start_nbd(engine)
    _, over_unix = cli("pull", nbd_uri(srv.socket, "ro"), tmp_path / "unix.raw", check=0)
    uri = sshd.nbd_uri(srv.socket, "ro")
    _, over_ssh = cli("pull", uri, tmp_path / "ssh.raw", "--connections", "4", *ssh_opts(sshd),
                      check=0)
    assert over_ssh["status"] == "complete" and over_ssh["size"] == SIZE
    assert over_ssh["disk_sha256"] == over_unix["disk_sha256"]
    assert (tmp_path / "ssh.raw").read_bytes() == expected_content()
    assert (tmp_path / "unix.raw").read_bytes() == expected_content()
    man = json.loads((tmp_path / "ssh.raw.manifest.json").read_text())
    assert man["source"].startswith("nbd+ssh://127.0.0.1:%d/ro?socket=" % sshd.port)
    _, ver = cli("verify", tmp_path / "ssh.raw", "--against", uri, *ssh_opts(sshd), check=0)
    assert ver["status"] == "ok"
    assert accepted_logins(sshd) == 2  # one SSH connection per run, however many NBD ones


def test_multi_conn_is_channels_over_one_ssh_connection(engine, start_nbd, sshd):
    srv = start_nbd(engine)
    uri = sshd.nbd_uri(srv.socket, "ro")
    with nbdc.ConnectionPool.from_uri(uri, 4, **ssh_kwargs(sshd)) as pool:
        assert pool.info.can_multi_conn and len(pool.clients) == 4
        assert pool.pread(0, SIZE) == expected_content()
        assert len({c.info.size for c in pool.clients}) == 1
    assert accepted_logins(sshd) == 1
    # the last channel closed the SSH connection: sshd sees the client go
    assert wait_until(lambda: "Disconnected from user" in sshd.log()
                      or "Connection closed by 127.0.0.1" in sshd.log(), 30), sshd.log()
    assert srv.alive()


def test_explicit_tunnel_writes_and_tcp_channel(daemon, engine, sshd, tmp_path):
    """An :class:`SSHTunnel` the caller owns; a writable export; direct-tcpip to a TCP server."""
    img = tmp_path / "w.raw"
    img.write_bytes(bytes(4 << 20))
    port = free_port()
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={img}",
               "--blockdev", "driver=raw,node-name=r,file=f",
               "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
               "--export", "type=nbd,id=w,node-name=r,name=w,writable=on")
    with SSHTunnel("127.0.0.1", sshd.port, identity_file=sshd.key,
                   known_hosts=sshd.known_hosts, allow_agent=False) as tunnel:
        assert tunnel.fingerprint == sshd.host_key_fingerprint
        uri = "nbd+ssh://127.0.0.1:%d/w?nbd-port=%d" % (sshd.port, port)
        with nbdc.connect_uri(uri, ssh_tunnel=tunnel) as c:
            c.pwrite(1 << 20, b"\x5a" * 65536)
            c.flush()
        with nbdc.connect_uri(uri, ssh_tunnel=tunnel) as c:  # the tunnel outlives a client
            assert c.pread(1 << 20, 65536) == b"\x5a" * 65536
    assert img.read_bytes()[1 << 20:(1 << 20) + 65536] == b"\x5a" * 65536
    assert d.alive()


def test_restore_into_export_over_ssh(start_nbd, sshd, tmp_path):
    srv = start_nbd("blockd")
    cli("pull", nbd_uri(srv.socket, "ro"), tmp_path / "b.raw", check=0)
    with nbdc.connect_uri(nbd_uri(srv.socket, "x")) as c:  # scribble over export x
        c.pwrite(0, b"\xff" * (1 << 20))
    _, res = cli("restore", tmp_path / "b.raw", "--to-nbd", sshd.nbd_uri(srv.socket, "x"),
                 *ssh_opts(sshd), check=0)
    assert res["status"] == "ok" and res["dest"].startswith("nbd+ssh://"), res
    with nbdc.connect_uri(nbd_uri(srv.socket, "x")) as c:
        assert c.pread(0, SIZE) == expected_content()


def test_tls_over_ssh(daemon, engine, pki, sshd, tmp_path):  # noqa: F811
    img = tmp_path / "x.raw"
    img.write_bytes(expected_content())
    d = daemon(engine, "--object",
               f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=off",
               "--blockdev", f"driver=file,node-name=f,filename={img}",
               "--blockdev", "driver=raw,node-name=r,file=f",
               "--nbd-server", "addr.type=unix,addr.path=nbd.sock,tls-creds=tls0",
               "--export", "type=nbd,id=x,node-name=r,name=x")
    base = sshd.nbd_uri(d.nbd_socket, "x", scheme="nbds+ssh") + "&tls-hostname=localhost"
    res = copy(base + f"&tls-certificates={pki}", str(tmp_path / "out.raw"), **ssh_kwargs(sshd))
    assert res["status"] == "complete"
    assert (tmp_path / "out.raw").read_bytes() == expected_content()
    # without TLS the server refuses; with a CA the certificate does not chain to, too
    with pytest.raises(nbdc.NBDOptionError, match="TLS"):
        nbdc.connect_uri(base.replace("nbds+ssh", "nbd+ssh", 1), **ssh_kwargs(sshd))
    rc, err = cli("pull", base + "&tls-certificates=%s" % (pki / "wrongca"),
                  tmp_path / "bad.raw", *ssh_opts(sshd))
    assert rc == 3 and "TLS" in err["message"], err
    assert nothing_written(tmp_path, "bad.raw")
    assert d.alive()


def test_debian_paramiko_on_the_target_python(engine, start_nbd, sshd, tmp_path):
    """Ansible targets run /usr/bin/python3 with Debian's python3-paramiko (2.12)."""
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import paramiko; print(paramiko.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        missing("python3-paramiko for /usr/bin/python3 (Debian package python3-paramiko)")
    srv = start_nbd(engine)
    _, a = cli("pull", nbd_uri(srv.socket, "ro"), tmp_path / "a.raw", check=0)
    _, b = cli("pull", sshd.nbd_uri(srv.socket, "ro"), tmp_path / "b.raw", *ssh_opts(sshd),
               python=python, check=0)
    assert a["disk_sha256"] == b["disk_sha256"]
    assert (tmp_path / "b.raw").read_bytes() == expected_content()


# -- failures: clear errors, nothing written, everything stays up -------------------------------

def test_unknown_host_key_refused(start_nbd, sshd, tmp_path):
    srv = start_nbd("blockd")
    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    rc, res = cli("pull", sshd.nbd_uri(srv.socket, "ro"), tmp_path / "out.raw",
                  *ssh_opts(sshd, known_hosts=empty))
    assert rc == 3 and res["error"] == "source", res
    msg = res["message"]
    assert "not known" in msg and "[127.0.0.1]:%d" % sshd.port in msg, msg
    assert sshd.host_key_fingerprint in msg, msg
    assert nothing_written(tmp_path, "out.raw")
    assert accepted_logins(sshd) == 0 and srv.alive() and sshd.alive


def test_changed_host_key_refused(start_nbd, sshd, tmp_path):
    srv = start_nbd("blockd")
    other = keygen(tmp_path / "other_host_key")
    typ, b64 = (tmp_path / "other_host_key.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts.changed"
    known.write_text("[127.0.0.1]:%d %s %s\n" % (sshd.port, typ, b64))
    with pytest.raises(SSHHostKeyError) as err:
        nbdc.connect_uri(sshd.nbd_uri(srv.socket, "ro"), ssh_identity=str(sshd.key),
                         ssh_known_hosts=str(known), ssh_allow_agent=False)
    assert "CHANGED" in str(err.value) and err.value.fingerprint == sshd.host_key_fingerprint
    assert err.value.expected != sshd.host_key_fingerprint and err.value.expected
    rc, res = cli("pull", sshd.nbd_uri(srv.socket, "ro"), tmp_path / "out.raw",
                  *ssh_opts(sshd, known_hosts=known))
    assert rc == 3 and "CHANGED" in res["message"] and sshd.host_key_fingerprint in res["message"]
    assert nothing_written(tmp_path, "out.raw") and other.exists()
    # the explicit opt-out connects anyway
    with nbdc.connect_uri(sshd.nbd_uri(srv.socket, "ro"), ssh_identity=str(sshd.key),
                          ssh_known_hosts=str(known), ssh_host_key_checking=False,
                          ssh_allow_agent=False) as c:
        assert c.pread(0, 4096) == expected_content()[:4096]


def test_wrong_identity_refused(start_nbd, sshd, tmp_path):
    srv = start_nbd("blockd")
    wrong = keygen(tmp_path / "id_wrong")
    rc, res = cli("pull", sshd.nbd_uri(srv.socket, "ro"), tmp_path / "out.raw",
                  *ssh_opts(sshd, identity=wrong))
    assert rc == 3, res
    assert "authentication as %s@127.0.0.1:%d failed" % (sshd.user, sshd.port) in res["message"]
    assert str(wrong) in res["message"]
    assert nothing_written(tmp_path, "out.raw")
    rc, res = cli("pull", sshd.nbd_uri(srv.socket, "ro"), tmp_path / "out.raw",
                  *ssh_opts(sshd, identity=tmp_path / "no-such-key"))
    assert rc == 3 and "cannot read SSH identity file" in res["message"], res
    assert srv.alive() and sshd.alive


def test_encrypted_identity_needs_its_passphrase(start_nbd, sshd, tmp_path):
    srv = start_nbd("blockd")
    key = keygen(tmp_path / "id_locked", passphrase="s3cret phrase")
    (sshd.dir / "authorized_keys").write_text(
        (sshd.dir / "authorized_keys").read_text() + (tmp_path / "id_locked.pub").read_text())
    uri = sshd.nbd_uri(srv.socket, "ro")
    with pytest.raises(SSHAuthError, match="encrypted: give its passphrase"):
        nbdc.connect_uri(uri, ssh_identity=str(key), ssh_known_hosts=str(sshd.known_hosts),
                         ssh_allow_agent=False)
    phrase = tmp_path / "phrase"
    phrase.write_text("s3cret phrase\n")
    _, res = cli("pull", uri, tmp_path / "out.raw", *ssh_opts(sshd, identity=key),
                 "--ssh-passphrase-file", phrase, check=0)
    assert (tmp_path / "out.raw").read_bytes() == expected_content()


def test_socket_missing_on_the_target(engine, start_nbd, sshd, tmp_path):
    srv = start_nbd(engine)
    missing_sock = str(tmp_path / "no-such.sock")
    rc, res = cli("pull", sshd.nbd_uri(missing_sock, "ro"), tmp_path / "out.raw", *ssh_opts(sshd))
    assert rc == 3, res
    assert "could not open a channel to unix socket %s" % missing_sock in res["message"], res
    assert nothing_written(tmp_path, "out.raw")
    with pytest.raises(SSHChannelError) as err:
        nbdc.connect_uri(sshd.nbd_uri(missing_sock, "ro"), **ssh_kwargs(sshd))
    assert err.value.code == 2  # SSH_OPEN_CONNECT_FAILED
    # the same SSH server and NBD server still work
    with nbdc.connect_uri(sshd.nbd_uri(srv.socket, "ro"), **ssh_kwargs(sshd)) as c:
        assert c.pread(0, 4096) == expected_content()[:4096]
    assert srv.alive() and sshd.alive


def test_unknown_export_over_ssh(start_nbd, sshd):
    """An NBD refusal through the tunnel is the NBD error; the tunnel is released."""
    srv = start_nbd("blockd")
    with pytest.raises(nbdc.NBDOptionError, match="NBD_REP_ERR_UNKNOWN"):
        nbdc.connect_uri(sshd.nbd_uri(srv.socket, "nope"), **ssh_kwargs(sshd))
    assert wait_until(lambda: "Disconnected from user" in sshd.log()
                      or "Connection closed by 127.0.0.1" in sshd.log(), 30), sshd.log()


def test_ssh_server_down_is_a_clear_error(sshd, tmp_path):
    port = sshd.port
    sshd.stop()
    with pytest.raises(NBDSSHError, match="cannot connect to SSH server .*127.0.0.1:%d" % port):
        nbdc.connect_uri("nbd+ssh://127.0.0.1:%d/x?socket=/x.sock" % port, **ssh_kwargs(sshd))


def test_ssh_connection_lost_mid_session(start_nbd, sshd):
    """sshd dying under open NBD connections fails their requests (no hang), server stays up."""
    srv = start_nbd("blockd")
    with nbdc.ConnectionPool.from_uri(sshd.nbd_uri(srv.socket, "ro"), 2,
                                      **ssh_kwargs(sshd)) as pool:
        assert pool.pread(0, 1 << 20, timeout=60) == expected_content()[:1 << 20]
        sshd.stop()  # kills the session process too: the TCP connection drops
        for client in pool.clients:
            with pytest.raises(nbdc.NBDError):
                client.pread(0, 1 << 20, timeout=60)
            assert client.closed
    assert srv.alive()


def test_sshd_fixture_serves_openssh_clients(sshd, tmp_path):
    """What Ansible's ssh connection needs: OpenSSH's client with our key and known_hosts."""
    ok = subprocess.run(sshd.ssh_command("echo", "ready"), capture_output=True, text=True,
                        timeout=60, stdin=subprocess.DEVNULL)
    assert ok.returncode == 0 and ok.stdout.strip() == "ready", ok.stderr
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cmd = [a.replace(str(sshd.known_hosts), str(empty)) for a in sshd.ssh_command("true")]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert bad.returncode == 255 and "Host key verification failed" in bad.stderr, bad.stderr
    assert sshd.ansible_vars()["ansible_port"] == str(sshd.port)


def test_many_clients_one_after_another_through_one_tunnel(daemon, engine, sshd, tmp_path):
    """Regression: a client's late EOF after sshd freed its channel made sshd drop the whole
    SSH connection ("channel_by_id: bad id: channel free"), failing the next client."""
    img = tmp_path / "w.raw"
    img.write_bytes(bytes(range(256)) * 4096)
    port = free_port()
    daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={img}",
           "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
           "--export", "type=nbd,id=w,node-name=f,name=w")
    with SSHTunnel("127.0.0.1", sshd.port, identity_file=sshd.key,
                   known_hosts=sshd.known_hosts, allow_agent=False) as tunnel:
        uri = "nbd+ssh://127.0.0.1:%d/w?nbd-port=%d" % (sshd.port, port)
        for i in range(100):
            with nbdc.connect_uri(uri, ssh_tunnel=tunnel) as c:
                assert c.pread(i * 4096, 4096) == bytes(range(256)) * 16
        assert tunnel.active
    assert "bad id" not in sshd.log()
