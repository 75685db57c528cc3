"""A failure at each step of the backup role leaves no job, export, node or file behind.

One engine (blockd) with a disk and a first good backup (the base); then backup.yml
fails at each step in turn: the view (a disk that does not exist), the destination
(a backup directory that cannot be made), the copy (the nbd_copy process killed with
SIGKILL while it copies) and the verification (the new backup corrupted between the copy
and its verification).  After each: the play
failed naming the step, the engine holds only the disk's own nodes, export and dirty
bitmap (``bk.next`` merged back), and the backup directory holds only the first backup.
Check mode before and bad variables after change nothing either.
"""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import MiB
from helpers.backups import WhenSeen

pytestmark = [pytest.mark.slow, pytest.mark.blockd]


def _copy_processes():
    """Pids of running nbd_copy module processes (not their async wrappers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"AnsiballZ_nbd_copy.py") for a in argv) \
                and not any(b"async_wrapper" in a for a in argv):
            pids.append(int(entry.name))
    return pids


def _partial_and_copying(directory: Path) -> bool:
    """A ``.partial`` output is in DIRECTORY and the nbd_copy process runs."""
    return (directory.exists() and any(p.name.endswith(".partial") for p in directory.iterdir())
            and bool(_copy_processes()))


def _kill_copies() -> list:
    pids = _copy_processes()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def _new_backup(directory: Path, keep: Path):
    """The first backup in DIRECTORY other than KEEP whose manifest is in place, or None."""
    return next((p for p in directory.glob("*.qcow2")
                 if p != keep and Path(f"{p}.manifest.json").exists()), None)


def _corrupt_a_data_cluster(image: Path) -> None:
    """Flip one byte of a data cluster of a qcow2 image (found with qemu-img map)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    data = [e for e in json.loads(out) if e.get("data") and "offset" in e]
    assert data, out
    with open(image, "r+b") as f:
        f.seek(data[-1]["offset"] + 100)
        byte = f.read(1)
        f.seek(data[-1]["offset"] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.timeout(600)
def test_a_failure_at_any_step_leaves_nothing_behind(scenario):
    s = scenario(engine="blockd", size=128 * MiB)
    s.make_disk()
    s.start_engine()
    # check mode predicts and does nothing
    out = s.playbook("backup", {"backup_bitmap": "bk"}, check_mode=True).stdout
    assert "Check mode: would back up disk0 of localhost" in out, out[-3000:]
    assert s.leftovers() == [] and s.backups() == [] and s.engine_state()["bitmaps"] == []
    s.playbook("backup", {"backup_bitmap": "bk"})
    assert s.leftovers() == []
    [full] = s.backups()

    def fails(extra, step):
        proc = s.playbook("backup", {"backup_bitmap": "bk", **extra}, check=False)
        out = proc.stdout
        assert proc.returncode != 0, out
        assert f"Backup of localhost failed at '{step}" in out, out[-4000:]
        assert "views were torn down and this run's backup files removed" in out
        assert s.leftovers() == []
        assert s.engine_state()["bitmaps"] == ["disk0:bk"]   # bk.next merged back, gone
        assert s.backups() == [full]                        # nothing new, nothing partial
        return out

    # 1. the view: one of the disks does not exist (one transaction: nothing is made)
    out = fails({"backup_disks": ["disk0", "nodisk"]}, "Take one point in time")
    assert "nodisk" in out

    # 2. the destination: a backup directory below a regular file
    fails({"backup_dir": f"{s.disk}/backups"}, "disk0: the backup directory exists")

    # 3. the copy: SIGKILL while it copies (a full copy, so that there is data to copy)
    disk_dir = s.backup_dir / "localhost" / "disk0"
    with WhenSeen(lambda: _partial_and_copying(disk_dir), _kill_copies) as killer:
        fails({"backup_mode": "full"}, "disk0: copy status")
    assert killer.done and killer.done[0], "the copy was never seen running"

    # 4. the verification: the new backup is corrupted once complete, before it is verified
    def corrupt():
        image = _new_backup(disk_dir, full)
        _corrupt_a_data_cluster(image)
        return image

    with WhenSeen(lambda: _new_backup(disk_dir, full) is not None, corrupt) as corrupter:
        out = fails({"backup_mode": "full"}, "Verify each backup against its manifest: ")
    assert corrupter.done, "the new backup was never seen"
    reason = out.split("Verify each backup against its manifest: ", 1)[1].split("'.")[0]
    assert "One or more items failed" not in reason and str(corrupter.done[0]) in reason, reason

    # bad input: stopped by the roles' argument specs or checks, before anything happens
    proc = s.playbook("backup", {"backup_format": "zip"}, check=False)
    assert proc.returncode != 0
    assert "backup_format" in proc.stdout and "zip" in proc.stdout, proc.stdout[-3000:]
    assert "Validating arguments against arg spec" in proc.stdout
    proc = s.playbook("restore", {"restore_point": "nope", "restore_dest": str(s.work / "r.raw")},
                      check=False)
    assert proc.returncode != 0
    assert "No complete backup of disk disk0 starting with nope in" in proc.stdout
    assert not (s.work / "r.raw").exists()
    assert s.leftovers() == [] and s.backups() == [full]
