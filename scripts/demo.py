"""The blockd demo: a disk served over NBD, written and read by real clients, checked.

Run through ``bash scripts/demo`` (which sets up .venv first).  Steps:

1. make a 256 MiB raw disk with some data, and a shadow copy of it;
2. start the engine (blockd; ``DEMO_ENGINE=qsd`` for qemu-storage-daemon) with a
   QMP monitor and a writable NBD export on unix sockets, using the same
   command line for both;
3. write through the export with two qemu-io clients while nbdcopy reads the
   whole disk; apply the same writes to the shadow copy with qemu-io;
4. read everything back (nbdcopy, qemu-img compare) and check it against the shadow;
5. query the engine over QMP (query-version, query-named-block-nodes,
   query-block-exports), quit it over QMP, and check the image file itself;
6. print a short report and ``DEMO OK``; exit 1 on any mismatch.

Environment: DEMO_ENGINE=blockd|qsd, DEMO_KEEP=1 keeps the work directory,
DEMO_SIZE_MIB (default 256).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
EXPORT = "disk"


class DemoError(Exception):
    pass


def engine_argv(engine: str, work: Path) -> tuple[list[str], dict]:
    """The qemu-storage-daemon 7.2 command line, started as blockd or qsd."""
    args = [
        "--blockdev", f"driver=file,node-name=file0,filename={work / 'disk.raw'}",
        "--blockdev", "driver=raw,node-name=src0,file=file0",
        "--nbd-server", f"addr.type=unix,addr.path={work / 'nbd.sock'}",
        "--export", f"type=nbd,id=exp0,node-name=src0,name={EXPORT},writable=on",
        "--chardev", f"socket,path={work / 'qmp.sock'},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0",
    ]
    if engine == "qsd":
        return ["qemu-storage-daemon", *args], {}
    if engine == "blockd":
        pythonpath = os.pathsep.join(filter(None, [str(REPO / "plugins" / "module_utils"),
                                                   os.environ.get("PYTHONPATH")]))
        return [sys.executable, "-m", "blockd", *args], {"PYTHONPATH": pythonpath}
    raise DemoError(f"DEMO_ENGINE must be blockd or qsd, not {engine!r}")


def run(*cmd, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise DemoError(f"{shlex.join(str(c) for c in cmd)} exited {proc.returncode}\n"
                        f"{proc.stdout}{proc.stderr}")
    return proc


def make_disk(path: Path, size: int) -> None:
    """Sparse disk with a label at 0, 32 MiB of random data at 8 MiB, a pattern at 192 MiB."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"blockd demo disk\n".ljust(4096, b"\0"))
        f.seek(8 * MiB)
        for _mib in range(32):
            f.write(os.urandom(MiB))
        f.seek(min(192 * MiB, size - 4 * MiB))
        f.write(b"\x42" * 4 * MiB)


def writes_for(client: int, size: int) -> list[str]:
    """qemu-io commands for writer CLIENT (0 or 1): disjoint regions of the disk."""
    cmds = []
    half = size // 2
    base = client * half
    slot = half // 8
    for i in range(8):       # 8 x 1 MiB pattern writes, one near the start of each slot
        off = base + i * slot + 4096 * (i + 1)
        cmds.append(f"write -P 0x{0x10 + client * 0x10 + i:02x} {off} 1M")
    cmds.append(f"write -z {base + slot + slot // 2 + 512} 2M")    # zeroes, mid-slot 1, unaligned
    cmds.append(f"write -P 0x{0xe0 + client:02x} {base + half - 65536} 64k")  # tail of the half
    return cmds


def qemu_io_args(cmds: list[str]) -> list[str]:
    out = []
    for c in cmds:
        out += ["-c", c]
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def connect_qmp(sock: Path, engine_proc: subprocess.Popen, timeout: float = 20.0):
    from qemu.qmp.legacy import QEMUMonitorProtocol  # pylint: disable=import-outside-toplevel
    deadline = time.monotonic() + timeout
    while True:
        if engine_proc.poll() is not None:
            raise DemoError(f"engine exited during start-up (rc={engine_proc.returncode})")
        if sock.exists():
            qmp = QEMUMonitorProtocol(str(sock))
            try:
                qmp.connect()
                qmp.settimeout(30)
                return qmp
            except Exception:  # noqa: BLE001 - not accepting yet
                qmp.close()
        if time.monotonic() > deadline:
            raise DemoError(f"no QMP greeting on {sock} within {timeout}s")
        time.sleep(0.05)


def close_quietly(qmp) -> None:
    """Close a QMP client whose peer may be gone (qemu.qmp re-raises the EOF then)."""
    try:
        qmp.close()
    except Exception:  # noqa: BLE001 pylint: disable=broad-exception-caught
        pass


def describe_nodes(nodes: list[dict]) -> list[str]:
    lines = []
    for n in nodes:
        size = n.get("image", {}).get("virtual-size")
        what = f"{n.get('node-name')}: driver {n.get('drv')}"
        if n.get("drv") == "file":
            what += f", {os.path.basename(n.get('file', ''))}"
        if size is not None:
            what += f", {size // MiB} MiB"
        what += ", read-only" if n.get("ro") else ", read-write"
        lines.append(what)
    return lines


def demo(engine: str, work: Path, size: int, report: list[str]) -> None:
    disk, shadow = work / "disk.raw", work / "shadow.raw"
    make_disk(disk, size)
    shutil.copyfile(disk, shadow)
    argv, extra_env = engine_argv(engine, work)
    uri = f"nbd+unix:///{EXPORT}?socket={quote(str(work / 'nbd.sock'), safe='/')}"

    with open(work / "engine.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **extra_env})
    qmp = None
    try:
        qmp = connect_qmp(work / "qmp.sock", proc)
        info = run("nbdinfo", "--size", uri).stdout.strip()
        if int(info) != size:
            raise DemoError(f"export size {info} != {size}")

        # --- concurrent I/O: two writers + one full-disk reader -------------------
        w0, w1 = writes_for(0, size), writes_for(1, size)
        t0 = time.monotonic()
        clients = [subprocess.Popen(["qemu-io", "-f", "raw", *qemu_io_args(w), uri],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
                   for w in (w0, w1)]
        reads = 0
        while reads < 2 or any(c.poll() is None for c in clients):
            run("nbdcopy", uri, "null:")
            reads += 1
        elapsed = time.monotonic() - t0
        for c, cmds in zip(clients, (w0, w1)):
            out = c.communicate()[0].decode(errors="replace")
            if c.returncode != 0 or "failed" in out or "error" in out.lower():
                raise DemoError(f"qemu-io writer failed (rc={c.returncode}):\n{out}")
        run("qemu-io", "-f", "raw", *qemu_io_args(w0 + w1), shadow)
        written = sum(1 << 20 if "1M" in c else (2 << 20 if "2M" in c else 64 << 10)
                      for c in w0 + w1)

        # --- read back and compare ------------------------------------------------
        # Spot checks straight from the export, then whole-disk comparisons.
        checks = [c.replace("write -P", "read -P").replace("write -z", "read -P 0x00")
                  for c in w0 + w1]
        run("qemu-io", "-f", "raw", *qemu_io_args(checks), uri)
        readback = work / "readback.raw"
        run("nbdcopy", uri, readback)
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", readback, shadow)
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", uri, shadow)
        if sha256(readback) != sha256(shadow):
            raise DemoError("read-back differs from the shadow copy")

        # --- QMP ---------------------------------------------------------------------
        version = qmp.cmd("query-version")
        nodes = qmp.cmd("query-named-block-nodes")
        exports = qmp.cmd("query-block-exports")
        names = {n["node-name"] for n in nodes}
        if not {"file0", "src0"} <= names:
            raise DemoError(f"query-named-block-nodes lacks file0/src0: {sorted(names)}")
        if [(e["id"], e["type"], e["node-name"]) for e in exports] != [("exp0", "nbd", "src0")]:
            raise DemoError(f"unexpected query-block-exports: {exports}")

        q = version["qemu"]
        report += [
            f"engine       {engine}: {shlex.join(argv[:3] if engine == 'blockd' else argv[:1])}",
            f"version      {q['major']}.{q['minor']}.{q['micro']} "
            f"({version.get('package', '').strip() or 'no package string'})",
            f"work dir     {work} (removed at exit unless DEMO_KEEP=1)",
            f"disk         {disk.name}: {size // MiB} MiB raw",
            *[f"block node   {line}" for line in describe_nodes(nodes)],
            *[f"export       {e['id']}: {e['type']} of node {e['node-name']} -> {uri}"
              for e in exports],
            f"wrote        {len(w0) + len(w1)} requests, {written / MiB:.2f} MiB, with 2 "
            f"qemu-io clients while nbdcopy read the whole disk {reads} times "
            f"({reads * size / MiB / elapsed:.0f} MiB/s)",
            "read back    qemu-io pattern checks ok; nbdcopy copy and the live export "
            "are identical to the shadow copy (qemu-img compare, sha256)",
        ]

        # --- quit and check the image file itself ----------------------------------
        try:
            qmp.cmd("quit")
        except Exception:  # noqa: BLE001 - the engine may close before replying
            pass
        close_quietly(qmp)
        qmp = None
        try:
            rc = proc.wait(15)
        except subprocess.TimeoutExpired:
            raise DemoError("engine did not exit within 15 s of quit") from None
        if rc != 0:
            raise DemoError(f"engine exited with {rc} after quit")
        if sha256(disk) != sha256(shadow):
            raise DemoError("disk.raw differs from the shadow copy after quit")
        report.append(f"after quit   engine exited 0; disk.raw is identical to the shadow "
                      f"(sha256 {sha256(disk)[:16]}...)")
    finally:
        if qmp is not None:
            close_quietly(qmp)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # EOF on quit is expected
    engine = os.environ.get("DEMO_ENGINE", "blockd")
    size = int(os.environ.get("DEMO_SIZE_MIB", "256")) * MiB
    keep = os.environ.get("DEMO_KEEP") == "1"
    work = Path(tempfile.mkdtemp(prefix="blockd-demo-"))
    report: list[str] = []
    ok = False
    try:
        demo(engine, work, size, report)
        ok = True
    except Exception as exc:  # pylint: disable=broad-exception-caught
        print("\n".join(report))
        if not isinstance(exc, DemoError):
            traceback.print_exc()
        print(f"DEMO FAILED: {exc}", file=sys.stderr)
        log = work / "engine.log"
        if log.exists() and log.stat().st_size:
            print(f"--- engine output ({log}) ---\n{log.read_text(errors='replace')}",
                  file=sys.stderr)
    finally:
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(work directory kept: {work})", file=sys.stderr)
    if not ok:
        return 1
    print("blockd demo")
    print("\n".join("  " + line for line in report))
    print("DEMO OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
