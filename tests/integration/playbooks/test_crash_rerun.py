"""The engine is SIGKILLed in the middle of the backup role; the next run backs up correctly.

blockd runs with a disk that a writer keeps writing; backup.yml starts, and as soon as
its fleecing overlay exists the engine gets SIGKILL.  The play fails (clearly, naming the
step).  Then the engine is started again (engine.yml, as an operator would), and backup.yml
runs again: it completes, verifies, leaves nothing behind -- no node, export, job, overlay
file or partial backup, including what the killed run left -- and the backup equals the
disk (the writer is stopped by then, so the disk is the point in time).
"""

import subprocess
import time

import pytest

from helpers import MiB
from helpers.backups import WhenSeen

pytestmark = [pytest.mark.slow, pytest.mark.blockd]


@pytest.mark.timeout(900)
def test_backup_role_after_engine_kill9(scenario):
    s = scenario(engine="blockd", size=64 * MiB)
    s.make_disk()
    s.start_engine()
    s.start_writer()
    def kill():
        time.sleep(0.2)
        s.kill_engine()
        return True

    with WhenSeen(lambda: s.tmp_dir.exists() and any(s.tmp_dir.rglob("*.qcow2")), kill) as hit:
        proc = s.playbook("backup", {"backup_mode": "full"}, check=False)
    assert hit.done, "the fleecing overlay never appeared"
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Backup of localhost failed at" in proc.stdout, proc.stdout[-4000:]
    if s.writer is not None:            # its NBD connection died with the engine
        s.writer.kill()
        s.writer.wait(30)
        s.writer = None

    s.start_engine()
    s.playbook("backup", {"backup_mode": "full"})
    assert s.leftovers() == []
    [backup] = s.backups()
    raw = s.work / "backup.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(backup), str(raw)], check=True,
                   timeout=300)
    assert raw.read_bytes() == s.disk.read_bytes()
