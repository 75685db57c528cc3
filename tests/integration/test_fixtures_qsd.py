"""Self-tests of the test fixtures (tests/conftest.py, tests/helpers) against qemu-storage-daemon.

They prove the `daemon` factory, the QMP clients and the NBD helpers on the
reference engine, so that failures in blockd tests are blockd's, not the harness's.
"""

import os
import signal
import socket

import pytest

from helpers import (DaemonError, DaemonFactory, MiB, make_raw_image, nbd_uri, nbdcopy,
                     nbdinfo_json, qemu_io)
from helpers.daemon import find_sockets, split_opts

pytestmark = pytest.mark.qsd

SIZE = 4 * MiB


def export_args(image, name="src", writable=True):
    """The canonical qsd argv (without server/monitor) exporting IMAGE as NAME."""
    return ["--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=src0,file=file0",
            "--export", f"type=nbd,id=exp0,node-name=src0,name={name},"
                        f"writable={'on' if writable else 'off'}"]


@pytest.fixture
def image(tmp_path):
    return make_raw_image(tmp_path / "src.raw", SIZE, b"\xa5")


# --- argv parsing (pure) ---------------------------------------------------------

def test_find_sockets_reads_the_canonical_command_line():
    argv = ["--blockdev", "driver=file,node-name=file0,filename=src.raw",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--chardev", "socket,path=qmp.sock,server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0"]
    assert find_sockets(argv) == (["qmp.sock"], "nbd.sock")


def test_find_sockets_other_spellings():
    argv = ["--nbd-server={\"addr\": {\"type\": \"inet\", \"host\": \"127.0.0.1\", "
            "\"port\": \"10809\"}}",
            "--chardev=socket,id=m1,server=on,wait=off,path=a,,b.sock",
            "--monitor", "m1",
            "--chardev", "socket,id=m2,path=client.sock",          # not a server: ignored
            "--monitor", "chardev=m2"]
    assert find_sockets(argv) == (["a,b.sock"], ("127.0.0.1", 10809))


def test_split_opts_escaped_commas_and_implied_key():
    assert split_opts("socket,path=x,,y,server=on", "backend") == \
        {"backend": "socket", "path": "x,y", "server": "on"}


# --- the daemon fixture ----------------------------------------------------------

def test_qsd_starts_and_reports_version(daemon):
    d = daemon("qsd")
    assert d.alive()
    version = d.qmp.cmd("query-version")
    assert (version["qemu"]["major"], version["qemu"]["minor"]) == (7, 2), version
    assert d.qmp.greeting["QMP"]["version"]["qemu"] == version["qemu"]


def test_nbd_export_is_readable_with_libnbd_tools(daemon, image, tmp_path):
    d = daemon("qsd", *export_args(image, writable=False), nbd=True)
    info = nbdinfo_json(d.nbd_uri("src"))
    exports = {e["export-name"]: e for e in info["exports"]}
    assert exports["src"]["export-size"] == SIZE
    assert exports["src"]["is_read_only"] is True
    nbdcopy(d.nbd_uri("src"), tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == image.read_bytes()


def test_writes_over_nbd_reach_the_image_after_quit(daemon, image):
    d = daemon("qsd", *export_args(image), nbd=True)
    qemu_io(d.nbd_uri("src"), "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k",
            "read -P 0xa5 0 1M")
    assert d.quit() == 0
    data = image.read_bytes()
    assert data[MiB:MiB + 65536] == b"\x5a" * 65536
    assert data[:MiB] == b"\xa5" * MiB


def test_libnbd_python_bindings(daemon, image, libnbd):
    d = daemon("qsd", *export_args(image, writable=False), nbd=True)
    h = libnbd.NBD()
    h.connect_uri(d.nbd_uri("src"))
    try:
        assert h.get_size() == SIZE
        assert h.pread(4096, SIZE - 4096) == b"\xa5" * 4096
    finally:
        h.shutdown()


def test_qmp_errors_and_events(daemon, image):
    d = daemon("qsd", *export_args(image), nbd=True)
    err = d.qmp.error("blockdev-del", **{"node-name": "no-such-node"})
    assert err["class"] == "GenericError"
    assert "no-such-node" in err["desc"]
    exports = d.qmp.cmd("query-block-exports")
    assert [e["id"] for e in exports] == ["exp0"]
    d.qmp.cmd("block-export-del", id="exp0")
    ev = d.qmp.event_wait("BLOCK_EXPORT_DELETED", match={"data": {"id": "exp0"}})
    assert "timestamp" in ev
    assert d.qmp.cmd("query-block-exports") == []


def test_raw_qmp_client_sees_exact_framing(daemon):
    d = daemon("qsd")
    with d.raw_qmp() as raw:
        line = raw.recv_line()
        assert line.startswith(b'{"QMP": {"version": ') and line.endswith(b"}\r\n")
        # Before negotiation only qmp_capabilities is accepted.
        reply = raw.execute("query-version", id="early")
        assert reply["error"]["class"] == "CommandNotFound"
        assert reply["id"] == "early"
        assert raw.execute("qmp_capabilities") == {"return": {}}
        raw.send(b'{"execute": "query-block-jobs", "id": [1, "x"]}')
        assert raw.recv_line() == b'{"return": [], "id": [1, "x"]}\r\n'


def test_second_qmp_client_after_closing_the_first(daemon):
    d = daemon("qsd")
    d.qmp.cmd("query-version")
    d.close_qmp()  # qsd monitors serve one client at a time
    with d.connect_qmp() as other:
        assert other.cmd("query-block-jobs") == []


def test_long_working_directory_gets_a_short_socket_alias(daemon, tmp_path, image):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    d = daemon("qsd", *export_args(image), nbd=True, cwd=deep)
    assert len(str(d.qmp_path)) > 107
    assert d.qmp.cmd("query-block-exports")[0]["node-name"] == "src0"
    assert nbdinfo_json(d.nbd_uri("src"))["exports"][0]["export-size"] == SIZE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_monitor_and_nbd_server(daemon, image):
    qmp_port, nbd_port = free_port(), free_port()
    d = daemon("qsd", "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={nbd_port}",
               *export_args(image, writable=False),
               "--chardev", f"socket,id=m0,host=127.0.0.1,port={qmp_port},server=on,wait=off",
               "--monitor", "chardev=m0")
    assert d.qmp_path == ("127.0.0.1", qmp_port)
    assert d.qmp.cmd("query-block-exports")[0]["id"] == "exp0"
    assert d.nbd_uri("src") == f"nbd://127.0.0.1:{nbd_port}/src"
    assert nbdinfo_json(d.nbd_uri("src"))["exports"][0]["export-size"] == SIZE


def test_start_failure_reports_exit_and_stderr(daemon):
    with pytest.raises(DaemonError) as exc:
        daemon("qsd", "--blockdev", "driver=no-such-driver,node-name=x")
    assert "exited" in str(exc.value)
    assert "no-such-driver" in str(exc.value)   # qsd's own error text from stderr


def test_run_returns_command_line_errors(daemon):
    res = daemon.run("qsd", "--export", "type=nbd,id=e,node-name=missing,name=x")
    assert res.returncode == 1
    assert res.stderr.startswith("qemu-storage-daemon: ")


def test_unexpected_death_is_reported_at_teardown(tmp_path, image):
    factory = DaemonFactory(tmp_path)
    d = factory("qsd", *export_args(image), nbd=True)
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    problems = factory.finish()
    assert len(problems) == 1 and "died during the test" in problems[0]
    assert "SIGKILL" in problems[0]


def test_expected_exit_is_not_a_problem(tmp_path, image):
    factory = DaemonFactory(tmp_path)
    d = factory("qsd", *export_args(image), nbd=True)
    assert d.stop() == 0          # qsd exits cleanly on SIGTERM
    survivor = factory("qsd", "--blockdev", "driver=null-co,node-name=n0")
    assert factory.finish() == []
    assert not survivor.alive()


def test_nbd_uri_quotes_names():
    assert nbd_uri("/run/x.sock", "a b") == "nbd+unix:///a%20b?socket=/run/x.sock"
