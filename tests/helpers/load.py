"""A load run on one engine: 16 NBD exports, 4 fleecing jobs, concurrent readers and writers.

Used by tests/integration/load/test_load.py (a short run) and bench/load.py (a long one).

Set-up (``LoadRun.start``): 8 raw source disks of random data.  Disks 0-3 are fleeced as
the `fleece` module does it -- a qcow2 overlay backed by the disk, a ``blockdev-backup
sync=none`` job into it, the overlay exported read-only -- and disks 4-7 get a second,
read-only export.  With the 8 writable exports of the disks that makes 16 exports.

Clients (``LoadRun.run``), one libnbd handle and one thread each, until the time is up:
a writer per disk (random 4-64 KiB writes, some with FUA, a flush now and then), a reader
per fleecing export that checks every read against the disk's content at the start (the
point in time), and a reader per extra read-only export.  Every second the engine's RSS is
sampled from /proc.  ``LoadRun.finish`` reads every fleecing export whole and compares it
with the point in time.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from .tools import MiB, make_raw_image, qemu_img

DISKS = 8
FLEECED = 4


def rss_kib(pid: int) -> int:
    """VmRSS of PID in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Client:
    """One load client: what it does, how many requests it completed, what went wrong."""
    kind: str
    export: str
    ops: int = 0
    bytes: int = 0
    errors: List[str] = field(default_factory=list)


class LoadRun:
    """The set-up and the clients of one load run against DAEMON (a helpers.Daemon)."""

    def __init__(self, daemon: Any, workdir: Path, disk_mib: int = 8, seed: int = 7) -> None:
        self.daemon = daemon
        self.dir = Path(workdir)
        self.size = disk_mib * MiB
        self.rnd = random.Random(seed)
        self.point_in_time: Dict[int, bytes] = {}
        self.clients: List[Client] = []
        self.rss: List[tuple] = []
        self.exports: List[str] = []

    # -- set-up -------------------------------------------------------------------------------
    def start(self) -> None:
        """Add the disks, the fleecing jobs and the 16 exports."""
        q = self.daemon.qmp
        for i in range(DISKS):
            img = make_raw_image(self.dir / f"disk{i}.img", self.size, fill="random")
            q.cmd("blockdev-add", driver="file", **{"node-name": f"disk{i}",
                                                     "filename": str(img)})
            self._export(f"w{i}", f"disk{i}", writable=True)
            if i < FLEECED:
                self.point_in_time[i] = img.read_bytes()
                ov = self.dir / f"fleece{i}.qcow2"
                qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(img), str(ov))
                q.cmd("blockdev-add", driver="qcow2", **{
                    "node-name": f"fleece{i}", "backing": f"disk{i}",
                    "file": {"driver": "file", "filename": str(ov)}})
            else:
                self._export(f"r{i}", f"disk{i}")
        q.cmd("transaction", actions=[
            {"type": "blockdev-backup", "data": {"job-id": f"j{i}", "device": f"disk{i}",
                                                 "target": f"fleece{i}", "sync": "none"}}
            for i in range(FLEECED)])
        for i in range(FLEECED):
            self._export(f"f{i}", f"fleece{i}")

    def _export(self, name: str, node: str, writable: bool = False) -> None:
        self.daemon.qmp.cmd_obj({"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": name, "name": name, "node-name": node, "writable": writable}})
        self.exports.append(name)

    # -- clients ------------------------------------------------------------------------------
    def _handle(self, export: str) -> Any:
        import nbd  # pylint: disable=import-outside-toplevel
        h = nbd.NBD()
        h.connect_uri(self.daemon.nbd_uri(export))
        return h

    def _client(self, c: Client, stop: threading.Event, step) -> None:
        """Call STEP(handle) -> bytes moved until STOP; an exception or None ends the client."""
        h = self._handle(c.export)
        try:
            while not stop.is_set():
                n = step(h)
                if n is None:
                    return
                c.ops += 1
                c.bytes += n
        except Exception as exc:  # pylint: disable=broad-except
            c.errors.append(repr(exc))
        finally:
            h.shutdown()

    def _writer(self, c: Client, stop: threading.Event, seed: int) -> None:
        import nbd  # pylint: disable=import-outside-toplevel
        rnd = random.Random(seed)

        def step(h):
            n = rnd.choice((4096, 16384, 65536))
            off = rnd.randrange(0, self.size - n + 1) & ~511
            h.pwrite(rnd.randbytes(n), off, nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
            if rnd.random() < 0.05:
                h.flush()
            return n
        self._client(c, stop, step)

    def _reader(self, c: Client, stop: threading.Event, seed: int, expect: bytes | None) -> None:
        rnd = random.Random(seed)

        def step(h):
            n = rnd.choice((4096, 65536, 262144))
            off = rnd.randrange(0, self.size - n + 1) & ~511
            if expect is not None and h.pread(n, off) != expect[off:off + n]:
                c.errors.append(f"{c.export}: bytes at {off}+{n} are not the point in time")
                return None
            if expect is None:
                h.pread(n, off)
            return n
        self._client(c, stop, step)

    def run(self, seconds: float, sample: float = 1.0) -> None:
        """All clients at once for SECONDS; RSS sampled every SAMPLE seconds."""
        stop = threading.Event()
        threads = []
        for i in range(DISKS):
            c = Client("writer", f"w{i}")
            self.clients.append(c)
            threads.append(threading.Thread(target=self._writer, args=(c, stop, 100 + i)))
        for i in range(DISKS):
            if i < FLEECED:
                c = Client("fleece-reader", f"f{i}")
                args = (c, stop, 200 + i, self.point_in_time[i])
            else:
                c = Client("reader", f"r{i}")
                args = (c, stop, 200 + i, None)
            self.clients.append(c)
            threads.append(threading.Thread(target=self._reader, args=args))
        for t in threads:
            t.start()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < seconds:
                self.rss.append((round(time.monotonic() - t0, 1), rss_kib(self.daemon.pid)))
                time.sleep(sample)
        finally:
            stop.set()
            for t in threads:
                t.join(120)

    def finish(self) -> List[str]:
        """Whole-export point-in-time checks; a list of problems (empty when all is well)."""
        problems = [e for c in self.clients for e in c.errors]
        for i in range(FLEECED):
            h = self._handle(f"f{i}")
            got = hashlib.sha256()
            for off in range(0, self.size, 4 * MiB):
                got.update(h.pread(min(4 * MiB, self.size - off), off))
            h.shutdown()
            if got.hexdigest() != hashlib.sha256(self.point_in_time[i]).hexdigest():
                problems.append(f"fleece export f{i} is not disk{i} at the point in time")
        jobs = {j["device"]: j for j in self.daemon.qmp.cmd("query-block-jobs")}
        for i in range(FLEECED):
            job = jobs.get(f"j{i}")
            if job is None or job["status"] != "running" or job.get("io-status") != "ok":
                problems.append(f"fleecing job j{i} is not running cleanly: {job}")
        return problems

    def report(self) -> Dict[str, Any]:
        """Numbers of the run: per-client ops, fairness, RSS samples."""
        ops = {c.export: c.ops for c in self.clients}
        by_kind: Dict[str, List[int]] = {}
        for c in self.clients:
            by_kind.setdefault(c.kind, []).append(c.ops)
        fairness = {k: round(min(v) / max(v), 3) if max(v) else 0.0 for k, v in by_kind.items()}
        return {"exports": len(self.exports), "fleecing_jobs": FLEECED, "ops": ops,
                "mib": round(sum(c.bytes for c in self.clients) / MiB, 1),
                "fairness_min_over_max": fairness,
                "rss_kib": self.rss}
