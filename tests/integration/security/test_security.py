"""Security points of issue 7, one test each (docs/security.md lists them with the older tests).

- the QMP and NBD sockets of an engine started by the `blockd` module are 0600, or 0660 in
  the operator's group; the engine listens on no TCP port unless told;
- `nbd_server` with TCP listens on loopback unless an address is named;
- a read-only export refuses every kind of write, and the image keeps its bytes;
- an export name reaches exactly that export: no path tricks, case, NUL, prefixes or
  over-long names reach another one;
- the modules mark secrets `no_log`, and a secret given to a module does not reach the output.

TLS with client certificates against qemu-img and nbdinfo, and max-connections, are
covered in tests/integration/nbd/test_tls_server.py and test_protocol.py.
"""

import ast
import grp
import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest

from helpers import MiB, make_raw_image, require_module
from helpers.backups import run_tasks
from helpers.sshd import free_port

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(600)


def listening_tcp_ports(pid: int) -> set:
    """(address, port) of the TCP sockets PID listens on (from /proc, by socket inode)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:      # 0A = LISTEN
                addr, port = fields[1].split(":")
                out.add((addr, int(port, 16)))
    return out


def test_engine_sockets_private_or_in_the_named_group(ansible, service):
    group = grp.getgrnam("disk")            # in every Debian base system
    res = run_tasks(ansible,
                    {"module": "blockd", "args": service},
                    {"module": "blockd", "args": {**service, "socket_group": "no-such-group"}})
    started, bad_group = res
    assert not started.get("failed"), started
    for path in (started["socket"], started["nbd_socket"]):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (path, st)
    assert stat.S_IMODE(os.stat(service["run_dir"]).st_mode) & 0o007 == 0
    assert listening_tcp_ports(started["pid"]) == set()
    # an unknown group fails before anything changes: same engine, same sockets
    assert bad_group.get("failed") and "no group 'no-such-group'" in bad_group["msg"], bad_group
    assert stat.S_IMODE(os.stat(started["socket"]).st_mode) == 0o600
    assert Path(f"/proc/{started['pid']}").exists()

    grouped = run_tasks(ansible, {"module": "blockd",
                                  "args": {**service, "socket_group": "disk"}})[0]
    assert grouped["changed"] is True and not grouped.get("failed"), grouped
    for path in (grouped["socket"], grouped["nbd_socket"]):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid, (path, st)
    st = os.stat(service["run_dir"])
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == group.gr_gid


def test_nbd_server_tcp_listens_on_loopback_unless_told(engine_with_monitor, ansible):
    d, sock = engine_with_monitor(nbd=False)
    port = free_port()
    res = run_tasks(ansible, {"module": "nbd_server",
                              "args": {"socket": sock, "addr": {"type": "inet", "port": port}}})
    assert not res[0].get("failed"), res
    assert listening_tcp_ports(d.pid) == {("0100007F", port)}      # 127.0.0.1
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        assert conn.recv(8) == b"NBDMAGIC"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_only_export_refuses_every_write(daemon, engine, tmp_path):
    nbd = require_module("nbd", "python3-libnbd")
    img = make_raw_image(tmp_path / "ro.img", 4 * MiB, fill="random")
    before = _sha(img)
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={img}",
               "--export", "type=nbd,id=ro,node-name=f,name=ro", nbd=True)
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri("ro"))
    assert h.is_read_only()
    h.set_strict_mode(0)            # send the writes anyway; the server must refuse them
    for op in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.trim(4096, 0),
               lambda: h.zero(4096, 0), lambda: h.pwrite(b"y" * 512, MiB, nbd.CMD_FLAG_FUA)):
        with pytest.raises(nbd.Error) as err:
            op()
        # blockd answers EPERM as the NBD spec says; qemu-storage-daemon 7.2 EINVAL
        assert err.value.errno == ("EPERM" if engine == "blockd" else "EINVAL"), err.value
    h.flush()
    assert h.pread(4096, 0) == img.read_bytes()[:4096]
    h.shutdown()
    d.quit()
    assert _sha(img) == before


def test_export_names_reach_only_that_export(daemon, engine, tmp_path):
    from blockd.nbd import proto  # pylint: disable=import-outside-toplevel
    from integration.nbd.rawclient import RawNBD  # pylint: disable=import-outside-toplevel
    args = []
    for name, fill in (("e1", b"\x01"), ("e2", b"\x02"), ("E2", b"\x03")):
        img = make_raw_image(tmp_path / f"{name}.img", MiB, fill=fill)
        args += ["--blockdev", f"driver=file,node-name=n{name},filename={img}",
                 "--export", f"type=nbd,id={name},node-name=n{name},name={name}"]
    d = daemon(engine, *args, nbd=True)
    path = d.nbd_socket
    tricks = [b"", b"../e2", b"./e2", b"e1/../e2", b"e2/", b"/e2", b"e2\x00", b"e2\x00e1",
              b" e2", b"e2 ", b"e", b"e22", b"e2" * 2048, b"*", b"%65%32", b"e1\ne2"]
    for raw_name in tricks:
        c = RawNBD(path)
        try:
            c.start()
            c.option(proto.OPT_GO, len(raw_name).to_bytes(4, "big") + raw_name + b"\0\0")
            replies = c.replies()
            assert replies and replies[-1][0] & proto.REP_FLAG_ERROR, (raw_name, replies)
        finally:
            c.close()
    for name, byte in (("e1", 1), ("e2", 2), ("E2", 3)):        # exact names: their own data
        c = RawNBD.connect(path, name, sr=False)
        try:
            c.request(proto.CMD_READ, 0, 4096)
            error, dummy, data = c.simple_reply(4096)
            assert error == 0 and data == bytes([byte]) * 4096, name
        finally:
            c.close()


SECRET_WORDS = ("passphrase", "password", "secret", "psk", "token", "private_key")


def _argument_specs():
    """(file, option name, keywords) of every dict(...) option in the modules and their utils."""
    files = sorted((REPO / "plugins" / "modules").glob("*.py"))
    files += sorted((REPO / "plugins" / "module_utils").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg and isinstance(node.value, ast.Call) \
                    and getattr(node.value.func, "id", "") == "dict" \
                    and any(k.arg == "type" for k in node.value.keywords):
                yield path.name, node.arg, {k.arg: k.value for k in node.value.keywords}


def test_secret_options_are_no_log_and_stay_out_of_the_output(ansible, tmp_path):
    secret_options = []
    for fname, name, kw in _argument_specs():
        if any(w in name for w in SECRET_WORDS):
            secret_options.append(name)
            value = kw.get("no_log")
            assert isinstance(value, ast.Constant) and value.value is True, (fname, name)
    assert "ssh_passphrase" in secret_options          # the scan found the known secret

    secret = "S3cret-" + os.urandom(6).hex()
    key = tmp_path / "id_test"
    key.write_text("not a key\n")
    book = tmp_path / "secret.yml"
    book.write_text(
        "- hosts: targets\n  gather_facts: false\n  tasks:\n"
        "    - blockdev.fleecing.nbd_copy:\n"
        f"        src: nbd+ssh://127.0.0.1:1/x?socket=/nonexistent\n"
        f"        dest: {tmp_path / 'out.raw'}\n"
        f"        ssh_identity: [{key}]\n"
        f"        ssh_passphrase: {secret}\n"
        "        connect_timeout: 5\n"
        "      ignore_errors: true\n")
    proc = ansible.playbook(book, "-vvv")
    out = proc.stdout + proc.stderr
    assert "nbd_copy" in out and "failed" in out.lower(), out[-2000:]
    assert secret not in out
    assert "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in out or "********" in out
