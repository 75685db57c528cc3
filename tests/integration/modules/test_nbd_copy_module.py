"""blockdev.fleecing.nbd_copy through ansible-playbook, pulling real exports of blockd and qsd.

Backups are checked with qemu-img (compare, info, check); check mode must
write nothing, a second run must change nothing, bad input must fail with one
clear message and leave no file that looks like a backup.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import MiB
from helpers.daemon import MODULE_UTILS
from helpers.backups import (SIZE, Served, check_qcow2, compare, data_bytes, files, img_info,
                             make_source, run_tasks)
from helpers.pki import pki  # noqa: F401  (a pytest fixture)
from helpers.sshd import sshd  # noqa: F401  (a pytest fixture)


@pytest.mark.timeout(900)
def test_full_then_incremental_chain(daemon, engine, ansible, tmp_path):
    out = tmp_path / "backups"
    out.mkdir()
    src = make_source(tmp_path / "src.raw")
    s = Served(daemon, engine, src)
    full = out / "full.qcow2"
    args = {"source": s.uri, "dest": str(full), "progress_file": str(out / "progress.json")}

    checked = ansible.module("nbd_copy", args, check=True, diff=True)
    assert not checked.get("failed") and checked["changed"] is True, checked
    assert checked["bytes_copied"] == data_bytes() and checked["size"] == SIZE, checked
    assert checked["bytes_copied"] + checked["bytes_hole"] + checked["bytes_zero"] == SIZE
    assert checked["resumable"] is False and checked["export"] == "w"
    assert checked["diff"]["before"] == {} and checked["diff"]["after"]["format"] == "qcow2"
    assert files(out) == set(), "check mode wrote something"

    first = ansible.module("nbd_copy", args, diff=True)
    assert not first.get("failed") and first["changed"] is True, first
    assert first["bytes_copied"] == data_bytes() and first["incremental"] is False
    assert first["manifest"] == str(full) + ".manifest.json"
    assert first["diff"]["before"] == {}
    assert first["diff"]["after"]["disk_sha256"] == first["disk_sha256"]
    assert json.loads((out / "progress.json").read_text())["status"] == "complete"
    compare(src, "raw", full, "qcow2")
    check_qcow2(full)

    second, checked = run_tasks(ansible, {"module": "nbd_copy", "args": args, "diff": True},
                                {"module": "nbd_copy", "args": args, "check": True})
    assert not second.get("failed") and second["changed"] is False, second
    assert checked["changed"] is False and checked["disk_sha256"] == first["disk_sha256"]
    assert second["bytes_copied"] == 0 and second["disk_sha256"] == first["disk_sha256"]
    assert second["diff"]["before"] == second["diff"]["after"]
    assert second["diff"]["before"]["disk_sha256"] == first["disk_sha256"]

    # the disk moves on; the bitmap b0 marks what changed
    s.write([(5 * MiB + 4096, 8192, 0x55), (9 * MiB, 4096, 0)])
    snap = s.freeze()
    inc = out / "inc1.qcow2"
    iargs = {"source": snap, "dest": str(inc), "base": str(full), "bitmap": "b0"}
    checked = ansible.module("nbd_copy", iargs, check=True)
    assert checked["changed"] is True and checked["incremental"] is True, checked
    assert checked["bytes_unchanged"] == SIZE - 2 * MiB, checked
    assert checked["bytes_copied"] == 2 * MiB and not inc.exists()
    first = ansible.module("nbd_copy", iargs, diff=True)
    assert first["changed"] is True and first["bytes_unchanged"] == SIZE - 2 * MiB, first
    assert first["diff"]["after"]["base"] == str(full)
    compare(src, "raw", inc, "qcow2")
    check_qcow2(inc)
    info = img_info(inc)
    assert info["backing-filename"] == "full.qcow2" and info["backing-filename-format"] == "qcow2"
    second = ansible.module("nbd_copy", iargs)
    assert second["changed"] is False and second["disk_sha256"] == first["disk_sha256"], second


@pytest.mark.timeout(900)
def test_bad_input_fails_clearly_and_writes_nothing(daemon, ansible, tmp_path):
    src = make_source(tmp_path / "src.raw")
    s = Served(daemon, "blockd", src)
    out = tmp_path / "b"
    out.mkdir()
    dest = str(out / "x.qcow2")

    def fails(args, msg, error=None):
        r = ansible.module("nbd_copy", args)
        check(r, msg, error)
        return r

    def check(r, msg, error=None):
        assert r["failed"] is True and r["changed"] is False, r
        assert msg in r["msg"], r["msg"]
        if error:
            assert r["error"] == error, r

    no_paramiko = tmp_path / "no_paramiko" / "paramiko"
    no_paramiko.mkdir(parents=True)
    (no_paramiko / "__init__.py").write_text("raise ImportError('paramiko hidden by the test')\n")
    cases = [
        ({"source": "http://host/x", "dest": dest},
         "source: NBD URI 'http://host/x': unknown scheme 'http'", "usage"),
        ({"source": f"nbd+unix:///w?socket={tmp_path}/none.sock", "dest": dest},
         f"connecting to nbd+unix:///w?socket={tmp_path}/none.sock failed: ", "source"),
        ({"source": s.d.nbd_uri("nope"), "dest": dest}, "nope", "source"),
        ({"source": s.uri, "dest": dest, "base": str(out / "missing.qcow2"), "bitmap": "b0"},
         f"cannot read base manifest {out}/missing.qcow2.manifest.json", "base"),
        ({"source": s.uri, "dest": dest, "base": str(out / "missing.qcow2")},
         "parameters are required together: base, bitmap", None),
        ({"source": s.uri, "dest": dest, "format": "raw", "base": dest + "0", "bitmap": "b0"},
         "an incremental backup (base) is written as qcow2, not raw", "usage"),
        ({"source": s.uri, "dest": dest, "connections": 0},
         "connections must be at least 1", "usage"),
        ({"source": "nbd+ssh://127.0.0.1/w?socket=/run/nbd.sock", "dest": dest},
         "Failed to import the required Python library (paramiko) on ", "usage"),
    ]
    results = run_tasks(ansible, *({"module": "nbd_copy", "args": a,
                                    "environment": {"PYTHONPATH": str(no_paramiko.parent)}}
                                   for a, _m, _e in cases))
    for (_a, msg, error), r in zip(cases, results):
        check(r, msg, error)
    assert "This is required for nbd+ssh:// URIs (the SSH tunnel)" in results[-1]["msg"]
    assert files(out) == set()

    # something that is not a backup is never overwritten...
    (out / "x.qcow2").write_bytes(b"precious")
    fails({"source": s.uri, "dest": dest},
          f"{dest} exists but is not a complete backup (cannot read manifest", "dest")
    assert (out / "x.qcow2").read_bytes() == b"precious"
    (out / "x.qcow2").unlink()
    # ... nor a backup of something else, unless force=true
    r = ansible.module("nbd_copy", {"source": s.uri, "dest": dest})
    assert r["changed"] is True, r
    r = fails({"source": s.uri, "dest": dest, "format": "raw"},
              f"{dest} already holds another backup (format qcow2, not raw): refusing", "dest")
    assert img_info(dest)["format"] == "qcow2"
    r = ansible.module("nbd_copy", {"source": s.uri, "dest": dest, "format": "raw",
                                    "force": True}, diff=True)
    assert r["changed"] is True and r["format"] == "raw", r
    assert r["diff"]["before"]["format"] == "qcow2" and r["diff"]["after"]["format"] == "raw"
    assert img_info(dest)["format"] == "raw"
    compare(src, "raw", dest, "raw")
    assert files(out) == {"x.qcow2", "x.qcow2.manifest.json"}


@pytest.mark.timeout(900)
def test_pull_over_tls_and_ssh(daemon, engine, ansible, pki, sshd, tmp_path):  # noqa: F811
    """TLS (certificates made by the test) and an SSH tunnel to a real sshd give the same
    backup; a CA that does not fit and an unknown host key fail clearly, writing nothing."""
    src = make_source(tmp_path / "src.raw")
    d = daemon(engine, "--object",
               f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=off",
               "--blockdev", f"driver=file,node-name=f,filename={src}",
               "--blockdev", "driver=raw,node-name=r,file=f",
               "--nbd-server", "addr.type=unix,addr.path=nbd.sock,tls-creds=tls0",
               "--export", "type=nbd,id=x,node-name=r,name=x")
    out = tmp_path / "out"
    out.mkdir()
    unknown = tmp_path / "known_hosts.empty"
    unknown.write_text("")
    local = f"nbds+unix:///x?socket={d.nbd_socket}"
    tunnel = sshd.nbd_uri(d.nbd_socket, "x", scheme="nbds+ssh")
    ssh = {"ssh_identity": str(sshd.key), "ssh_known_hosts": str(sshd.known_hosts),
           "ssh_allow_agent": False}
    r = run_tasks(
        ansible,
        {"module": "nbd_copy", "args": {"source": local, "dest": str(out / "tls.qcow2"),
                                        "tls_certificates": str(pki)}},
        {"module": "nbd_copy", "args": {"source": tunnel, "dest": str(out / "ssh.qcow2"),
                                        "tls_certificates": str(pki), **ssh}},
        {"module": "nbd_copy", "args": {"source": tunnel, "dest": str(out / "ssh.qcow2"),
                                        "tls_certificates": str(pki), **ssh}},
        {"module": "nbd_copy", "args": {"source": local, "dest": str(out / "bad1.qcow2"),
                                        "tls_certificates": str(pki / "wrongca")}},
        {"module": "nbd_copy", "args": {"source": tunnel, "dest": str(out / "bad2.qcow2"),
                                        "tls_certificates": str(pki),
                                        **dict(ssh, ssh_known_hosts=str(unknown))}},
        {"module": "nbd_copy", "args": {"source": local.replace("nbds", "nbd", 1),
                                        "dest": str(out / "bad3.qcow2")}},
    )
    for res in r[:2]:
        assert not res.get("failed") and res["changed"] is True, res
    assert r[0]["disk_sha256"] == r[1]["disk_sha256"] and r[0]["bytes_copied"] == data_bytes()
    assert r[2]["changed"] is False and not r[2].get("failed"), r[2]
    man = json.loads((out / "ssh.qcow2.manifest.json").read_text())
    assert man["source"].startswith(f"nbds+ssh://127.0.0.1:{sshd.port}/x?socket="), man
    compare(src, "raw", out / "ssh.qcow2", "qcow2")
    assert r[3]["failed"] is True and r[3]["error"] == "source", r[3]
    assert r[3]["msg"].startswith(f"connecting to {local} failed: ") and "TLS" in r[3]["msg"]
    assert r[4]["failed"] is True and r[4]["error"] == "source", r[4]
    assert sshd.host_key_fingerprint in r[4]["msg"] and "known_hosts" in r[4]["msg"], r[4]
    assert r[5]["failed"] is True and r[5]["error"] == "source" and "TLS" in r[5]["msg"], r[5]
    assert files(out) == {"tls.qcow2", "tls.qcow2.manifest.json", "ssh.qcow2",
                          "ssh.qcow2.manifest.json"}


@pytest.mark.timeout(900)
def test_interrupted_copy_resumes(daemon, engine, ansible, tmp_path):
    """A pull killed (SIGKILL) mid-way: check mode says it would resume, the module resumes
    from the committed extents, the result is byte-exact and then unchanged."""
    src = make_source(tmp_path / "src.raw")
    d = daemon(engine, "--object", "throttle-group,id=tg0,limits.bps-read=524288",
               "--blockdev", f"driver=file,node-name=f,filename={src}",
               "--blockdev", "driver=raw,node-name=r,file=f",
               "--blockdev", "driver=throttle,node-name=t,throttle-group=tg0,file=r",
               "--export", "type=nbd,id=x,node-name=t,name=x", nbd=True)
    uri = d.nbd_uri("x")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "full.qcow2"
    state = out / "full.qcow2.partial.state"
    # 5 MiB of data at 512 KiB/s: about 10 s; kill once 3 extents are committed
    proc = subprocess.Popen([sys.executable, "-m", "blockd.copy", "pull", uri, str(dest),
                             "--format", "qcow2", "--commit-mib", "1", "--connections", "1"],
                            env={**os.environ, "PYTHONPATH": str(MODULE_UTILS)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (
                state.exists() and len(state.read_bytes().splitlines()) >= 4):
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not dest.exists(), "the copy ended before it could be interrupted"
    partial_state = state.read_bytes()

    args = {"source": uri, "dest": str(dest)}
    r = run_tasks(ansible, {"module": "nbd_copy", "args": args, "check": True})[0]
    assert r["changed"] is True and r["resumable"] is True, r
    assert not dest.exists() and state.read_bytes() == partial_state  # check mode wrote nothing
    r = run_tasks(ansible, {"module": "nbd_copy", "args": args},
                  {"module": "nbd_copy", "args": args})
    assert r[0]["changed"] is True and r[0]["resumed_from"] >= 3 * MiB, r[0]
    assert r[1]["changed"] is False and r[1]["disk_sha256"] == r[0]["disk_sha256"], r[1]
    compare(src, "raw", dest, "qcow2")
    check_qcow2(dest)
    assert files(out) == {"full.qcow2", "full.qcow2.manifest.json"}
