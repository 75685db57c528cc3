"""nbd_copy (blockd.copy) against real servers: blockd and qemu-storage-daemon 7.2.

Outputs are checked with QEMU's own tools (qemu-img compare/check/info), the
manifests with blockd.copy.verify; faults are real (killed servers and copy
processes, blkdebug read errors, a full tmpfs).
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import MiB, qemu_img, tmpfs
from helpers.tools import copy_cli as cli
from helpers.daemon import MODULE_UTILS

from blockd.copy import CopyError, copy, verify, verify_against
from blockd.nbd.client import connect_uri

SIZE = 64 * MiB
#: Data blocks (MiB index -> fill byte); everything else is a hole.
DATA = {i: (i * 7 + 1) & 0xFF for i in range(0, 64, 2) if i % 10 != 4}
#: One block that holds only 4 KiB of data inside a hole.
PARTIAL = 33


def make_source(path, size=SIZE):
    """A sparse raw image: 1 MiB data blocks every 2 MiB, one 4 KiB island."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, fill in DATA.items():
            if i * MiB < size:
                f.seek(i * MiB)
                f.write(bytes([fill]) * MiB)
        f.seek(PARTIAL * MiB + 12288)
        f.write(b"\xab" * 4096)
    return path


def serve(daemon, engine, image, fmt="raw", name="x", writable=False):
    d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={image}",
               "--blockdev", f"driver={fmt},node-name=n,file=f",
               "--export", f"type=nbd,id=e,node-name=n,name={name},"
               f"writable={'on' if writable else 'off'}",
               nbd=True)
    return d, d.nbd_uri(name)



def compare(a, fa, b, fb):
    out = qemu_img("compare", "-f", fa, "-F", fb, a, b, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def check_qcow2(path):
    out = qemu_img("check", "-f", "qcow2", path).stdout
    assert "No errors were found on the image." in out, out


def data_bytes():
    return len([i for i in DATA if i * MiB < SIZE]) * MiB + MiB  # + the PARTIAL block


# --- full copies -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_copy(daemon, engine, tmp_path, fmt):
    src = make_source(tmp_path / "src.raw")
    _d, uri = serve(daemon, engine, src)
    dest = tmp_path / f"full.{fmt}"
    prog = tmp_path / "progress.json"
    res = copy(uri, str(dest), fmt, progress_file=str(prog), connections=2)
    assert res["status"] == "complete" and res["size"] == SIZE
    assert res["bytes_copied"] == data_bytes()
    assert res["bytes_copied"] + res["bytes_hole"] + res["bytes_zero"] == SIZE
    compare(src, "raw", dest, fmt)
    if fmt == "qcow2":
        check_qcow2(dest)
        info = json.loads(qemu_img("info", "--output=json", dest).stdout)
        assert info["virtual-size"] == SIZE and "backing-filename" not in info
    man = json.loads((tmp_path / f"full.{fmt}.manifest.json").read_text())
    assert man["status"] == "complete" and man["format"] == fmt and man["size"] == SIZE
    assert man["disk_sha256"] == res["disk_sha256"]
    kinds = {e["type"] for e in man["extents"]}
    assert "data" in kinds and kinds & {"hole", "zero"}
    assert "socket=" in man["source"] and not os.path.exists(str(dest) + ".partial")
    assert json.loads(prog.read_text())["status"] == "complete"
    assert verify(str(dest))["status"] == "ok"
    assert verify_against(uri, str(dest))["disk_sha256"] == res["disk_sha256"]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_zero_filled_data(daemon, engine, tmp_path, fmt):
    """Written zeroes are data to block status: the copy finds the zero blocks itself
    (hashes them as zero without sha256, leaves them out of the output) and the manifest
    holds the same hashes as sha256 of every block, computed here from the source."""
    src = tmp_path / "src.raw"
    rnd = random.Random(7)
    blocks = [bytes(MiB) if i % 3 else rnd.randbytes(MiB) for i in range(12)]
    blocks[4] = bytes(MiB - 1) + b"\x01"            # zero but its last byte
    blocks[7] = b"\x02" + bytes(MiB - 1)            # zero but its first byte
    src.write_bytes(b"".join(blocks) + bytes(4096))  # a short last block, written zeroes
    size = 12 * MiB + 4096
    _d, uri = serve(daemon, engine, src)
    dest = tmp_path / f"z.{fmt}"
    res = copy(uri, str(dest), fmt)
    compare(src, "raw", dest, fmt)
    data = src.read_bytes()
    want = [hashlib.sha256(data[o:o + MiB]).digest() for o in range(0, size, MiB)]
    man = json.loads((tmp_path / f"z.{fmt}.manifest.json").read_text())
    got = b"".join(bytes.fromhex(e["blocks"]) if "blocks" in e else
                   b"".join(hashlib.sha256(bytes(min(MiB, e["offset"] + e["length"] - o))).digest()
                            for o in range(e["offset"], e["offset"] + e["length"], MiB))
                   for e in man["extents"])
    assert got == b"".join(want)
    assert res["disk_sha256"] == hashlib.sha256(b"".join(want)).hexdigest()
    # the zero blocks were not written: the output allocates only the non-zero ones
    nonzero = sum(1 for b in blocks if any(b))
    if fmt == "qcow2":
        check_qcow2(dest)
        mapped = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", dest).stdout)
        allocated = sum(m["length"] for m in mapped if m["data"])
    else:
        allocated = os.stat(dest).st_blocks * 512
    assert allocated <= nonzero * MiB, (allocated, nonzero)
    assert verify(str(dest))["status"] == "ok"


def test_qcow2_source_same_digest(daemon, engine, tmp_path):
    """A qcow2 image with holes served as qcow2 gives the same disk digest as the raw one."""
    src = make_source(tmp_path / "src.raw")
    q = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", src, q)
    _d, uri = serve(daemon, engine, q, fmt="qcow2")
    r1 = copy(uri, str(tmp_path / "a.raw"), "raw")
    _d2, uri2 = serve(daemon, engine, src, name="y")
    r2 = copy(uri2, str(tmp_path / "b.qcow2"), "qcow2")
    assert r1["disk_sha256"] == r2["disk_sha256"]
    compare(src, "raw", tmp_path / "a.raw", "raw")


def test_one_tib_sparse(daemon, engine, tmp_path):
    d = daemon(engine, "--blockdev", "driver=null-co,node-name=n,size=1099511627776,read-zeroes=on",
               "--export", "type=nbd,id=e,node-name=n,name=n", nbd=True)
    res = copy(d.nbd_uri("n"), str(tmp_path / "big.qcow2"), "qcow2")
    assert res["bytes_copied"] == 0 and res["size"] == 1 << 40
    info = json.loads(qemu_img("info", "--output=json", tmp_path / "big.qcow2").stdout)
    assert info["virtual-size"] == 1 << 40 and info["actual-size"] < 4 * MiB
    man = json.loads((tmp_path / "big.qcow2.manifest.json").read_text())
    assert [(e["offset"], e["length"]) for e in man["extents"]] == [(0, 1 << 40)]


# --- incrementals -------------------------------------------------------------------------

def test_incremental_chain(daemon, engine, tmp_path):
    src = make_source(tmp_path / "src.raw")
    d, uri = serve(daemon, engine, src, writable=True)
    full = tmp_path / "b0.qcow2"
    copy(uri, str(full), "qcow2")
    writes = [(5 * MiB + 4096, 8192, 0x11), (20 * MiB, 3 * MiB, 0x22), (63 * MiB, MiB, 0)]
    with connect_uri(uri) as c:
        for off, n, fill in writes:
            c.pwrite(off, bytes([fill]) * n)
        c.flush()
    with pytest.raises(CopyError) as err:  # the live export moved on
        verify_against(uri, str(full))
    assert err.value.kind == "verify" and "first at offset %d" % (5 * MiB) in err.value.message
    inc = tmp_path / "b1.qcow2"
    res = copy(uri, str(inc), "qcow2", base=str(full),
               extents=[(o, n) for o, n, _f in writes])
    assert res["incremental"] and res["bytes_unchanged"] == SIZE - 5 * MiB
    info = json.loads(qemu_img("info", "--output=json", "--backing-chain", inc).stdout)
    assert info[0]["backing-filename"] == "b0.qcow2"
    assert info[0]["backing-filename-format"] == "qcow2"
    check_qcow2(inc)
    compare(src, "raw", inc, "qcow2")
    man = json.loads((tmp_path / "b1.qcow2.manifest.json").read_text())
    assert man["base"]["path"] == str(full)
    assert verify_against(uri, str(inc))["status"] == "ok"
    # a second incremental on top, written zeroes over data of the full backup
    with connect_uri(uri) as c:
        c.pwrite(0, bytes(MiB))
        c.flush()
    inc2 = tmp_path / "b2.qcow2"
    copy(uri, str(inc2), "qcow2", base=str(inc), extents=[(0, 4096)])
    compare(src, "raw", inc2, "qcow2")
    assert verify(str(inc2))["status"] == "ok"


# --- resume after kill -9 -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_resume_after_sigkill(daemon, engine, tmp_path, fmt):
    src = make_source(tmp_path / "src.raw")
    _d, uri = serve(daemon, engine, src)
    ref = copy(uri, str(tmp_path / f"ref.{fmt}"), fmt)
    dest = tmp_path / f"out.{fmt}"
    state = tmp_path / f"out.{fmt}.partial.state"
    env = {**os.environ, "PYTHONPATH": str(MODULE_UTILS)}
    prog = tmp_path / "progress.json"
    argv = [sys.executable, "-m", "blockd.copy", "pull", uri, str(dest), "--format", fmt,
            "--commit-mib", "1", "--inflight", "1", "--connections", "1",
            "--progress-file", str(prog)]
    resumed = []
    for seed in (1, 2, 3):
        rnd = random.Random(seed)
        lines = rnd.randint(2, 20)
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 30
        while p.poll() is None and time.monotonic() < deadline:
            if state.exists() and state.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.001)
        time.sleep(rnd.uniform(0, 0.005))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        if p.returncode == 0:
            break  # finished before the kill: nothing more to resume
        assert not dest.exists() and (tmp_path / f"out.{fmt}.partial").exists()
        assert not (tmp_path / f"out.{fmt}.manifest.json").exists()
        seen = json.loads(prog.read_text())
        assert seen["status"] == "running" and seen["bytes_total"] == SIZE
        assert 0 < seen["bytes_done"] < SIZE
        resumed.append(state.read_bytes().count(b"\n"))
    rc, res = cli("pull", uri, dest, "--format", fmt, check=None)
    if resumed:
        assert rc == 0, res
        assert res["resumed_from"] > 0
    assert res["disk_sha256"] == ref["disk_sha256"]
    compare(src, "raw", dest, fmt)
    if fmt == "qcow2":
        check_qcow2(dest)
    man = json.loads((tmp_path / f"out.{fmt}.manifest.json").read_text())
    ref_man = json.loads((tmp_path / f"ref.{fmt}.manifest.json").read_text())
    assert man["extents"] == ref_man["extents"]
    assert not state.exists()
    assert cli("verify", dest, check=0)[1]["status"] == "ok"
    assert resumed, "every copy finished before it could be killed"


# --- faults ---------------------------------------------------------------------------------

def test_server_dies_mid_copy_then_resume(daemon, engine, tmp_path):
    src = make_source(tmp_path / "src.raw")
    d, uri = serve(daemon, engine, src)
    dest = tmp_path / "out.raw"
    state = tmp_path / "out.raw.partial.state"
    env = {**os.environ, "PYTHONPATH": str(MODULE_UTILS)}
    p = subprocess.Popen([sys.executable, "-m", "blockd.copy", "pull", uri, str(dest),
                          "--commit-mib", "1", "--inflight", "1", "--connections", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while p.poll() is None and time.monotonic() < deadline:
        if state.exists() and state.read_bytes().count(b"\n") >= 4:
            p.send_signal(signal.SIGSTOP)  # hold the copy while its server goes away
            break
        time.sleep(0.001)
    d.kill()
    p.send_signal(signal.SIGCONT)
    out, _err = p.communicate(timeout=60)
    res = json.loads(out)
    if p.returncode == 0:
        pytest.fail("the copy finished before the server was killed")
    assert p.returncode == 3 and res["error"] == "source", res
    assert not dest.exists() and not (tmp_path / "out.raw.manifest.json").exists()
    assert (tmp_path / "out.raw.partial").exists()
    small = make_source(tmp_path / "small.raw", 32 * MiB)
    _d3, uri3 = serve(daemon, engine, small)  # same export name, shrunk: refused
    rc, res = cli("pull", uri3, dest, check=3)
    assert "shrank" in res["message"] and (tmp_path / "out.raw.partial").exists(), res
    _d3.kill()
    _d2, uri2 = serve(daemon, engine, src)  # restarted elsewhere, same export
    rc, res = cli("pull", uri2, dest, check=0)
    assert res["resumed_from"] > 0
    compare(src, "raw", dest, "raw")
    assert verify(str(dest))["status"] == "ok"


def test_server_read_error(daemon, tmp_path):
    """qsd's blkdebug under a qcow2 node answers EIO to data reads: the copy fails
    cleanly (qsd as the server: blockd has no blkdebug)."""
    src = make_source(tmp_path / "src.raw")
    q = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", src, q)
    d = daemon("qsd", "--blockdev", f"driver=file,node-name=f,filename={q}",
               "--blockdev", "driver=blkdebug,node-name=dbg,image=f,"
               "inject-error.0.event=read_aio,inject-error.0.errno=5",
               "--blockdev", "driver=qcow2,node-name=q,file=dbg",
               "--export", "type=nbd,id=e,node-name=q,name=x", nbd=True)
    rc, res = cli("pull", d.nbd_uri("x"), tmp_path / "out.raw", check=3)
    # qsd 7.2 drops the connection after a failed structured read ("Disconnect
    # client, due to: Failed to send reply: reading from file failed: Input/output error")
    assert res["error"] == "source" and "reading the export failed" in res["message"], res
    assert "Input/output error" in d.stderr()
    assert not (tmp_path / "out.raw").exists()
    assert not (tmp_path / "out.raw.manifest.json").exists()


def test_export_shrank_below_base(daemon, engine, tmp_path):
    src = make_source(tmp_path / "src.raw")
    _d, uri = serve(daemon, engine, src)
    copy(uri, str(tmp_path / "b0.qcow2"), "qcow2")
    small = make_source(tmp_path / "small.raw", 32 * MiB)
    _d2, uri2 = serve(daemon, engine, small, name="y")
    rc, res = cli("pull", uri2, tmp_path / "b1.qcow2", "-O", "qcow2", "--base",
                  tmp_path / "b0.qcow2", "--extents", "0:4096", check=3)
    assert "shrank" in res["message"], res
    assert not list(tmp_path.glob("b1.qcow2*"))


def test_corrupted_manifest_and_data(daemon, engine, tmp_path):
    src = make_source(tmp_path / "src.raw")
    _d, uri = serve(daemon, engine, src)
    dest = tmp_path / "b0.raw"
    copy(uri, str(dest), "raw")
    man = tmp_path / "b0.raw.manifest.json"
    good = man.read_bytes()
    man.write_bytes(good.replace(b'"type": "hole"', b'"type": "data"', 1))
    rc, res = cli("verify", dest, check=5)
    assert "corrupted" in res["message"] and "checksum mismatch" in res["message"], res
    rc, res = cli("pull", uri, tmp_path / "b1.qcow2", "-O", "qcow2", "--base", dest,
                  "--extents", "0:1", check=6)
    assert "corrupted base manifest" in res["message"], res
    man.write_bytes(b"{not json")
    assert "not JSON" in cli("verify", dest, check=5)[1]["message"]
    man.write_bytes(good)
    with open(dest, "r+b") as f:  # flip one byte of data at 10 MiB + 5
        f.seek(10 * MiB + 5)
        f.write(b"\x00")
    rc, res = cli("verify", dest, check=2)
    assert "first at offset %d" % (10 * MiB) in res["message"], res


def test_base_missing_changed_and_chain_link(daemon, engine, tmp_path):
    src = make_source(tmp_path / "src.raw")
    _d, uri = serve(daemon, engine, src)
    b0 = tmp_path / "b0.qcow2"
    copy(uri, str(b0), "qcow2")
    copy(uri, str(tmp_path / "b1.qcow2"), "qcow2", base=str(b0), extents=[(0, MiB)])
    os.utime(b0, ns=(1, 1))
    with pytest.raises(CopyError) as err:
        copy(uri, str(tmp_path / "b2.qcow2"), "qcow2", base=str(b0), extents=[(0, 1)])
    assert err.value.kind == "base" and "changed" in err.value.message
    os.rename(b0, tmp_path / "moved.qcow2")
    rc, res = cli("pull", uri, tmp_path / "b2.qcow2", "-O", "qcow2", "--base", b0,
                  "--extents", "0:1", check=6)
    assert "missing" in res["message"], res
    rc, res = cli("verify", tmp_path / "b1.qcow2", check=2)  # the chain link is broken
    assert "b0.qcow2" in res["message"], res
    assert not list(tmp_path.glob("b2.qcow2*"))


def test_no_overwrite_and_usage(daemon, engine, tmp_path):
    src = make_source(tmp_path / "src.raw")
    _d, uri = serve(daemon, engine, src)
    dest = tmp_path / "b0.raw"
    dest.write_bytes(b"precious")
    rc, res = cli("pull", uri, dest, check=4)
    assert "refusing to overwrite" in res["message"]
    assert dest.read_bytes() == b"precious"
    rc, res = cli("pull", uri, tmp_path / "x.raw", "--base", dest, "--extents", "0:1", check=1)
    assert res["error"] == "usage"
    rc, res = cli("pull", uri, check=1)  # argparse errors are JSON too, exit 1 (2 = verify)
    assert res["error"] == "usage" and "dest" in res["message"]
    assert not (tmp_path / "x.raw.partial").exists()


def test_full_destination_disk(daemon, engine, tmp_path):
    src = make_source(tmp_path / "src.raw")
    _d, uri = serve(daemon, engine, src)
    with tmpfs(tmp_path / "mnt", "8M") as mnt:
        for fmt in ("raw", "qcow2"):
            rc, res = cli("pull", uri, mnt / f"out.{fmt}", "-O", fmt, check=4)
            assert "destination full" in res["message"], res
            assert not (mnt / f"out.{fmt}").exists()
            assert not (mnt / f"out.{fmt}.manifest.json").exists()
            for p in mnt.iterdir():
                p.unlink()


# --- dirty bitmap over NBD ------------------------------------------------------------------

def test_incremental_from_dirty_bitmap(daemon, engine, tmp_path):
    """``dirty_bitmap=NAME`` reads ``qemu:dirty-bitmap:NAME`` from the export."""
    src = make_source(tmp_path / "src.raw")
    d, uri = serve(daemon, engine, src, writable=True)
    r = d.qmp.cmd_raw("block-dirty-bitmap-add", {"node": "n", "name": "b0", "granularity": 65536})
    assert r == {"return": {}}, r
    copy(uri, str(tmp_path / "b0.qcow2"), "qcow2")
    with connect_uri(uri) as c:
        c.pwrite(7 * MiB + 100, b"\x5a" * 70000)
        c.pwrite(30 * MiB, bytes(4096))
        c.flush()
    # "Enabled bitmap 'b0' incompatible with readonly export" -- freeze it first
    assert d.qmp.cmd_raw("block-dirty-bitmap-disable", {"node": "n", "name": "b0"}) == \
        {"return": {}}
    r = d.qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "snap", "node-name": "n",
                                           "name": "snap", "bitmaps": ["b0"]})
    assert r == {"return": {}}, r
    res = copy(d.nbd_uri("snap"), str(tmp_path / "b1.qcow2"), "qcow2",
               base=str(tmp_path / "b0.qcow2"), dirty_bitmap="b0")
    assert res["bytes_unchanged"] == SIZE - 2 * MiB, res
    compare(src, "raw", tmp_path / "b1.qcow2", "qcow2")
    check_qcow2(tmp_path / "b1.qcow2")
    assert verify_against(uri, str(tmp_path / "b1.qcow2"))["status"] == "ok"
    with pytest.raises(CopyError) as err:  # no such bitmap on the export
        copy(d.nbd_uri("snap"), str(tmp_path / "b2.qcow2"), "qcow2",
             base=str(tmp_path / "b1.qcow2"), dirty_bitmap="nope")
    assert err.value.kind == "usage" and "qemu:dirty-bitmap:nope" in err.value.message


# --- the benchmark script ---------------------------------------------------------------

def test_copy_bench_runs_and_writes_json(tmp_path):
    import shutil
    import tempfile
    from helpers.daemon import REPO
    out = tmp_path / "bench.json"
    short = tempfile.mkdtemp(prefix="cb", dir="/tmp")  # unix socket paths must stay short
    try:
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "copy_throughput.py"),
                               "--engines", "qsd,blockd", "--size-mib", "16", "--runs", "1",
                               "--dir", short, "--json", str(out)],
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, check=False)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    result = json.loads(out.read_text())
    errors = {e: r.get("error", "")[:800] + r.get("engine_output", "")[-800:]
              for e, r in result["engines"].items() if "error" in r}
    assert proc.returncode == 0 and not errors, errors
    for eng in ("qsd", "blockd"):
        r = result["engines"][eng]
        assert "error" not in r, r
        for metric in ("qemu_img", "copy_qcow2", "copy_raw", "nbdcopy"):
            assert r[f"{metric}_verified"] is True and r[f"{metric}_mibs"] > 0
        assert r["tib_copy_qcow2_seconds"] > 0 and r["tib_qemu_img_seconds"] > 0
        for metric in ("qemu_img", "copy_qcow2"):  # the zero-filled image
            assert r[f"alloc_{metric}_verified"] is True and r[f"alloc_{metric}_mibs"] > 0
    assert "nbd_copy/qemu-img (qcow2)" in proc.stdout
