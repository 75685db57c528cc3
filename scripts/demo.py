"""The blockd demo: the collection's playbooks back up a disk that is being written to.

Run through ``bash scripts/demo`` (which sets up .venv first).  Steps, each one an
ordinary ``ansible-playbook`` run of this checkout as the ``blockdev.fleecing``
collection on localhost (see scripts/backup_scenario.py):

1. make a raw disk (default 256 MiB) with some data, and keep a copy of it;
2. ``playbooks/engine.yml``: the engine (blockd, installed from the collection; or
   ``DEMO_ENGINE=qsd``: the host's qemu-storage-daemon) runs as a detached service
   with the disk open (nodes ``file0``/``src0``) and exported writable over NBD;
3. a writer process (scripts/pit_writer.py: three NBD connections) starts writing
   stamped 64 KiB blocks, each connection its own numbered sequence, and keeps
   writing through the backup;
4. ``playbooks/backup.yml``: one point in time (fleecing), the view pulled with
   nbd_copy into a qcow2 backup with a manifest, verified, torn down;
5. the writer stops; ``playbooks/restore.yml`` restores the backup to a raw image;
6. check: for every writer the restored backup holds exactly a prefix of its writes,
   at least those done before the backup started and none started after it ended, and
   is otherwise the original disk byte for byte -- one point in time; the engine holds
   only the disk's own nodes and export, no file of the fleecing is left;
7. ``engine.yml blockd_state=absent`` stops the engine; the disk file must then equal
   the original plus every write; print a short report and ``DEMO OK`` (exit 1 and
   the failing step's output otherwise).

Environment: DEMO_ENGINE=blockd|qsd, DEMO_KEEP=1 keeps the work directory,
DEMO_SIZE_MIB (default 256).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pit_writer  # noqa: E402  pylint: disable=wrong-import-position
from backup_scenario import (  # noqa: E402  pylint: disable=wrong-import-position
    MiB, Scenario, ScenarioError)

DISK, FILE_NODE = "src0", "file0"


class DemoError(Exception):
    """A check of the demo failed."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def timed(report_times: dict, name: str, fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    report_times[name] = time.monotonic() - t0
    return out


def demo(engine: str, work: Path, size: int, report: list[str]) -> None:
    s = Scenario(work, engine=engine, size=size, disk=DISK, file_node=FILE_NODE)
    t: dict = {}
    try:
        s.make_disk()
        timed(t, "engine", s.start_engine)
        state = s.engine_state()
        if state["exports"] != [DISK] or state["nodes"] != sorted([DISK, FILE_NODE]):
            raise DemoError(f"engine.yml did not open the disk: {state}")
        with open(s.run_dir / "engine.pid") as f:
            pid = f.read().strip()

        s.start_writer(writers=3, interval=0.01)
        before = s.status()
        timed(t, "backup", s.playbook, "backup")
        after = s.status()
        final = s.stop_writer()
        leftovers = s.leftovers()
        if leftovers:
            raise DemoError(f"the backup left things behind: {leftovers}")
        [backup] = s.backups()
        manifest = json.loads(Path(f"{backup}.manifest.json").read_text())

        restored = work / "restored.raw"
        timed(t, "restore", s.playbook, "restore", {"restore_dest": str(restored)})
        try:
            pit = s.check(restored, before, after)
        except ScenarioError as exc:
            raise DemoError(str(exc)) from None
        during = sum(w["done"] for w in after["writers"]) - sum(pit["writes"])
        if during <= 0:
            raise DemoError("no write landed while the backup ran: the demo proves nothing")

        timed(t, "stop", s.stop_engine)
        try:
            live = pit_writer.check(s.original, s.disk, len(final["writers"]), final, final)
        except pit_writer.NotAPointInTime as exc:
            raise DemoError(f"{s.disk.name} after the engine stopped: {exc}") from None
        if live["writes"] != [w["done"] for w in final["writers"]]:
            raise DemoError(f"{s.disk.name} lacks writes: {live['writes']} of "
                            f"{[w['done'] for w in final['writers']]}")
        data = sum(e["length"] for e in manifest["extents"] if e["type"] == "data")
        total = sum(w["done"] for w in final["writers"])
        report += [
            f"engine       {engine}: {s.vars()['blockd_engine']} run by playbooks/engine.yml "
            f"as a detached service (pid {pid}), disk {FILE_NODE}/{DISK} exported writable",
            f"work dir     {work} (removed at exit unless DEMO_KEEP=1)",
            f"disk         {s.disk.name}: {size // MiB} MiB raw, "
            f"nbd+unix:///{DISK}?socket={s.nbd_socket}",
            f"writer       3 NBD connections wrote {total} x 64 KiB blocks "
            f"({total * 64 / 1024:.0f} MiB) all through the backup",
            f"backup       playbooks/backup.yml in {t['backup']:.1f} s: one point in time "
            f"(fleecing), nbd_copy pulled {data / MiB:.1f} MiB of data into {backup.name} "
            f"(manifest, verified) while {during} more writes landed",
            f"restore      playbooks/restore.yml in {t['restore']:.1f} s: {restored.name}, every "
            "block checked against the manifest",
            f"verified     the restored backup holds exactly the first {pit['writes']} writes "
            f"of each writer and is otherwise the original disk (sha256 {pit['sha256'][:16]}"
            "...): one point in time",
            f"teardown     no fleecing job, export, node or file left: only {FILE_NODE} and "
            f"{DISK} remain",
            f"after stop   playbooks/engine.yml blockd_state=absent; {s.disk.name} holds the "
            f"original plus all {total} writes (sha256 {sha256(s.disk)[:16]}...)",
        ]
    finally:
        s.close()


def main() -> int:
    engine = os.environ.get("DEMO_ENGINE", "blockd")
    size = int(os.environ.get("DEMO_SIZE_MIB", "256")) * MiB
    keep = os.environ.get("DEMO_KEEP") == "1"
    # a short path: the engine's unix sockets live in it
    work = Path(tempfile.mkdtemp(prefix="blockd-demo-", dir="/tmp"))
    report: list[str] = []
    ok = False
    try:
        demo(engine, work, size, report)
        ok = True
    except Exception as exc:  # pylint: disable=broad-exception-caught
        print("\n".join(report))
        if not isinstance(exc, (DemoError, ScenarioError)):
            traceback.print_exc()
        print(f"DEMO FAILED: {exc}", file=sys.stderr)
    finally:
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(work directory kept: {work})", file=sys.stderr)
    if not ok:
        return 1
    print("blockd demo (the blockdev.fleecing playbooks)")
    print("\n".join("  " + line for line in report))
    print("DEMO OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
