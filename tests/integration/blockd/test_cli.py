"""The command line: a qemu-storage-daemon script runs unchanged against blockd."""

import os
import signal
import socket
import subprocess
import time

import pytest

from helpers import MiB, engine_command, make_raw_image, nbd_tcp_uri, nbdcopy, nbdinfo_json


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_json_and_dotted_forms_and_tcp_nbd(daemon, engine, tmp_path):
    img = make_raw_image(tmp_path / "d.raw", 2 * MiB, b"\x11")
    port = _free_port()
    d = daemon(engine,
               "--blockdev", '{"driver": "file", "node-name": "f", "filename": "%s"}' % img,
               "--blockdev", "raw,node-name=r,file=f",
               "--object", "throttle-group,id=tg0,limits.iops-total=100",
               "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
               "--export", "nbd,id=e,node-name=r,name=disk,writable=off")
    uri = nbd_tcp_uri("127.0.0.1", port, "disk")
    info = nbdinfo_json(uri)["exports"][0]
    assert info["export-size"] == 2 * MiB and info["is_read_only"] is True
    nbdcopy(uri, tmp_path / "c.raw")
    assert (tmp_path / "c.raw").read_bytes() == img.read_bytes()


@pytest.mark.parametrize("args,needle", [
    (["--blockdev", "driver=file,node-name=f,filename=/nonexistent/x"],
     "Could not open '/nonexistent/x': No such file or directory"),
    (["--blockdev", "driver=null-co,node-name=n", "--blockdev", "driver=null-co,node-name=n"],
     "Duplicate nodes with node-name='n'"),
    (["--blockdev", "driver=null-co,node-name=n", "--export", "type=nbd,id=e,node-name=n"],
     "--export type=nbd,id=e,node-name=n: NBD server not running"),
    (["--monitor", "chardev=nope"], "nope"),
    (["--bogus"], "bogus"),
])
def test_startup_errors_exit_nonzero(daemon, engine, args, needle):
    res = daemon.run(engine, *args)
    assert res.returncode == 1, res
    assert needle in res.stderr


def test_help_and_version(daemon, engine):
    res = daemon.run(engine, "--help")
    assert res.returncode == 0 and "--blockdev" in res.stdout and "--nbd-server" in res.stdout
    res = daemon.run(engine, "--version")
    assert res.returncode == 0 and "version" in res.stdout


def test_daemonize_and_pidfile(engine, tmp_path):
    img = make_raw_image(tmp_path / "d.raw", MiB, b"\x22")
    prefix, env = engine_command(engine)
    argv = [*prefix, "--blockdev", f"driver=file,node-name=f,filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
            "--export", "type=nbd,id=e,node-name=f,name=disk",
            "--pidfile", str(tmp_path / "pid"), "--daemonize"]
    # the parent returns once startup is complete: the socket and pidfile exist then
    res = subprocess.run(argv, env={**os.environ, **env}, cwd=tmp_path, capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    pid = int((tmp_path / "pid").read_text().strip())
    try:
        os.kill(pid, 0)
        nbdcopy(f"nbd+unix:///disk?socket={tmp_path / 'nbd.sock'}", tmp_path / "c.raw")
        assert (tmp_path / "c.raw").read_bytes() == img.read_bytes()
        # a second instance cannot take the same pidfile
        res2 = subprocess.run([*prefix, "--pidfile", str(tmp_path / "pid")], env={**os.environ, **env},
                              cwd=tmp_path, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert res2.returncode == 1
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("daemon did not stop on SIGTERM")


def test_daemonize_reports_startup_failure(engine, tmp_path):
    prefix, env = engine_command(engine)
    res = subprocess.run([*prefix, "--blockdev", "driver=file,node-name=f,filename=/nonexistent",
                          "--daemonize"], env={**os.environ, **env}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode != 0
