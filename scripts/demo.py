"""The blockd demo: a point-in-time backup of a disk that is being written to.

Run through ``bash scripts/demo`` (which sets up .venv first).  Steps:

1. make a 256 MiB raw disk with some data, and keep a copy of it;
2. start the engine (blockd; ``DEMO_ENGINE=qsd`` for qemu-storage-daemon) with a
   QMP monitor and a writable NBD export on unix sockets, using the same
   command line for both;
3. three NBD clients (python3-libnbd) start writing stamped 64 KiB blocks, each
   its own sequence, and keep writing to the end;
4. fleecing (seed 000): a qcow2 target whose backing is the live disk, a
   ``blockdev-backup sync=none`` job, the target exported read-only over NBD;
5. nbdcopy pulls the fleecing export to backup.raw while the writes go on; then the
   export, the job and the target are torn down over QMP;
6. check: for every writer the backup holds exactly a prefix of its writes, with
   everything finished before the snapshot in and nothing started after it; the backup
   equals the original disk plus those writes byte for byte; the live disk equals
   the original plus all writes; only the original nodes and export remain;
7. quit the engine over QMP, check the image file, print a report and ``DEMO OK``;
   exit 1 on any mismatch.

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
import threading
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


BLOCK = 64 * 1024
WRITERS = 3


def stamp(writer: int, seq: int) -> bytes:
    """The 64 KiB a writer puts down in its SEQ-th write: recognisable, never all zero."""
    head = f"writer {writer} write {seq:06d}\n".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def writer_blocks(writer: int, size: int) -> list[int]:
    """The blocks writer WRITER writes, in order: its own third of the disk, strided."""
    blocks = size // BLOCK
    mine = [b for b in range(blocks) if b % WRITERS == writer]
    # a stride that is coprime with the count visits every block once, out of order
    stride = 7 if len(mine) % 7 else 11
    return [mine[(i * stride) % len(mine)] for i in range(len(mine))]


class Writer(threading.Thread):
    """Writes stamped blocks through its own NBD connection, one after the other."""

    def __init__(self, nbd_mod, uri: str, index: int, size: int, limit: int) -> None:
        super().__init__(daemon=True)
        self.handle = nbd_mod.NBD()
        self.handle.connect_uri(uri)
        self.index, self.blocks = index, writer_blocks(index, size)[:limit]
        self.done = 0           # writes completed
        self.stop = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for seq, block in enumerate(self.blocks):
                if self.stop.is_set():
                    break
                self.handle.pwrite(stamp(self.index, seq), block * BLOCK)
                self.done = seq + 1
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.handle.shutdown()


def apply_writes(path: Path, writers: list, counts: list[int]) -> None:
    """Put the first COUNTS[w] writes of every writer into the image at PATH."""
    with open(path, "r+b") as f:
        for w, count in zip(writers, counts):
            for seq in range(count):
                f.seek(w.blocks[seq] * BLOCK)
                f.write(stamp(w.index, seq))


def writes_in(image: Path, w) -> int:
    """How many of writer W's writes IMAGE holds; they must be a prefix of its sequence."""
    with open(image, "rb") as f:
        seen = []
        for seq, block in enumerate(w.blocks):
            f.seek(block * BLOCK)
            seen.append(f.read(BLOCK) == stamp(w.index, seq))
    count = seen.index(False) if False in seen else len(seen)
    if any(seen[count:]):
        raise DemoError(f"backup holds writer {w.index}'s write {seen.index(True, count)} "
                        f"but not its earlier write {count}: not a point in time")
    return count


def qmp_ok(qmp, cmd: str, **args):
    reply = qmp.cmd_raw(cmd, args) if hasattr(qmp, "cmd_raw") else qmp.cmd_obj(
        {"execute": cmd, "arguments": args})
    if "error" in reply:
        raise DemoError(f"{cmd}: {reply['error']['desc']}")
    return reply["return"]


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.02)


def demo(engine: str, work: Path, size: int, report: list[str]) -> None:
    import nbd  # pylint: disable=import-outside-toplevel  (python3-libnbd)
    disk, original = work / "disk.raw", work / "original.raw"
    make_disk(disk, size)
    shutil.copyfile(disk, original)
    argv, extra_env = engine_argv(engine, work)
    sock = quote(str(work / "nbd.sock"), safe="/")
    uri = f"nbd+unix:///{EXPORT}?socket={sock}"
    fleece_uri = f"nbd+unix:///fleece?socket={sock}"

    with open(work / "engine.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **extra_env})
    qmp = None
    writers: list[Writer] = []
    try:
        qmp = connect_qmp(work / "qmp.sock", proc)
        info = run("nbdinfo", "--size", uri).stdout.strip()
        if int(info) != size:
            raise DemoError(f"export size {info} != {size}")

        # --- writers start; the disk is busy from here on ---------------------------
        limit = size // BLOCK // WRITERS
        writers = [Writer(nbd, uri, i, size, limit) for i in range(WRITERS)]
        for w in writers:
            w.start()
        wait_for(lambda: all(w.done >= 16 for w in writers), "the writers to get going")

        # --- the point in time: fleecing target + backup job sync=none --------------
        run("qemu-img", "create", "-q", "-f", "qcow2", work / "fleece.qcow2", size)
        qmp_ok(qmp, "blockdev-add", **{
            "node-name": "fleece0", "driver": "qcow2", "backing": "src0",
            "file": {"driver": "file", "filename": str(work / "fleece.qcow2")}})
        before = [w.done for w in writers]
        t_snap = time.monotonic()
        qmp_ok(qmp, "blockdev-backup", **{"job-id": "fleecing", "device": "src0",
                                          "target": "fleece0", "sync": "none"})
        snap_ms = (time.monotonic() - t_snap) * 1000
        after = [w.done + 1 for w in writers]   # a write in flight may or may not be in
        qmp_ok(qmp, "block-export-add", type="nbd", id="fleece", name="fleece",
               **{"node-name": "fleece0", "writable": False})

        # --- pull the backup while the writers keep writing -------------------------
        backup = work / "backup.raw"
        t0 = time.monotonic()
        run("nbdcopy", fleece_uri, backup)
        pull_s = time.monotonic() - t0
        during = [w.done for w in writers]
        jobs = qmp_ok(qmp, "query-block-jobs")
        copied = jobs[0]["offset"] if jobs else 0

        # --- tear the fleecing down -------------------------------------------------
        qmp_ok(qmp, "block-export-del", id="fleece")
        wait_for(lambda: all(e["id"] != "fleece" for e in qmp_ok(qmp, "query-block-exports")),
                 "the fleecing export to go")
        qmp_ok(qmp, "block-job-cancel", device="fleecing")
        wait_for(lambda: not qmp_ok(qmp, "query-block-jobs"), "the backup job to end")
        qmp_ok(qmp, "blockdev-del", **{"node-name": "fleece0"})
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(60)
            if w.error is not None:
                raise DemoError(f"writer {w.index} failed: {w.error}")

        # --- verify: the backup is the disk at one instant --------------------------
        counts = [writes_in(backup, w) for w in writers]
        for w, lo, n, hi in zip(writers, before, counts, after):
            if not lo <= n <= hi:
                raise DemoError(f"backup holds {n} writes of writer {w.index}; between "
                                f"{lo} and {hi} were done when the snapshot was taken")
        expected = work / "expected.raw"
        shutil.copyfile(original, expected)
        apply_writes(expected, writers, counts)
        if sha256(backup) != sha256(expected):
            raise DemoError("backup differs from the disk as it was at the snapshot")
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", backup, expected)
        shadow = work / "shadow.raw"
        shutil.copyfile(original, shadow)
        apply_writes(shadow, writers, [w.done for w in writers])
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", uri, shadow)

        # --- QMP ---------------------------------------------------------------------
        version = qmp_ok(qmp, "query-version")
        nodes = qmp_ok(qmp, "query-named-block-nodes")
        exports = qmp_ok(qmp, "query-block-exports")
        if [(e["id"], e["node-name"]) for e in exports] != [("exp0", "src0")]:
            raise DemoError(f"fleecing left exports behind: {exports}")
        if {n["node-name"] for n in nodes} != {"file0", "src0"}:
            raise DemoError(f"fleecing left nodes behind: {[n['node-name'] for n in nodes]}")
        q = version["qemu"]
        total = sum(w.done for w in writers)
        report += [
            f"engine       {engine}: {shlex.join(argv[:3] if engine == 'blockd' else argv[:1])}",
            f"version      {q['major']}.{q['minor']}.{q['micro']} "
            f"({version.get('package', '').strip() or 'no package string'})",
            f"work dir     {work} (removed at exit unless DEMO_KEEP=1)",
            f"disk         {disk.name}: {size // MiB} MiB raw, exported as {uri}",
            f"writers      {WRITERS} NBD clients wrote {total} x 64 KiB blocks "
            f"({total * BLOCK / MiB:.0f} MiB) all through the backup",
            f"snapshot     blockdev-backup sync=none into a qcow2 fleecing target "
            f"(backing: the live disk) took {snap_ms:.1f} ms; exported read-only as 'fleece'",
            f"backup       nbdcopy pulled {size // MiB} MiB in {pull_s:.2f} s while "
            f"{sum(d - a for d, a in zip(during, counts))} more writes landed; "
            f"{copied / MiB:.1f} MiB of old data was copied before being overwritten",
            f"verified     the backup holds exactly the first {counts} writes of each writer "
            f"(sha256 {sha256(backup)[:16]}..., qemu-img compare): one point in time",
            "live disk    equals the original plus every write (qemu-img compare)",
            "teardown     export deleted, job cancelled, fleecing node deleted: only file0 "
            "and src0 remain",
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
        for w in writers:
            w.stop.set()
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
