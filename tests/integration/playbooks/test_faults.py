"""Faults around the backup role (issue 7); the behaviour is documented in docs/faults.md.

- the fleecing overlay's filesystem fills up while the disk is written;
- (the backup host's copy disappearing in the middle of the pull -- its process SIGKILLed --
  is step 3 of test_backup_failures.py);
- the engine restarts between two tasks (between the fleece and the pull);
- two backup plays run against the same host at once.

Each: the play fails (or waits) with a clear message, nothing is left behind, the disk
keeps every write the writer made, and the next run backs up correctly.
"""

import subprocess
import threading
import time

import pytest

from helpers import MiB, tmpfs
from helpers.backups import WhenSeen

pytestmark = [pytest.mark.slow, pytest.mark.blockd, pytest.mark.timeout(900)]


def equal_to_disk(s, backup):
    """The backup (qcow2/raw) holds exactly the disk's bytes (the writer is stopped)."""
    raw = s.work / "cmp.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(backup), str(raw)], check=True,
                   timeout=300)
    same = raw.read_bytes() == s.disk.read_bytes()
    raw.unlink()
    return same


def kill_writer(s):
    """Stop the writer, tolerating that the engine's failure broke its connections."""
    if s.writer is not None:
        s.writer.kill()
        s.writer.wait(30)
        s.writer = None


def test_overlay_filesystem_full(scenario):
    """QEMU's choice, kept by blockd: the guest's write fails (ENOSPC), the view holds.

    The backup job's copy-before-write filter cannot save the old data of a cluster when
    the overlay's filesystem is full, so it refuses the guest's write
    (``on-cbw-error=break-guest-write``, the default): the disk keeps the old data, the view
    stays the point in time, the backup completes and is correct, and the writer sees the
    error -- nothing is lost silently.  After the teardown the disk takes writes again.
    If the writes fill the filesystem before the view is complete, the view step fails
    instead ("No space left on device") and removes what it made; which of the two happens
    depends on timing, and both are checked.
    """
    s = scenario(engine="blockd", size=64 * MiB)
    s.make_disk()
    with tmpfs(s.tmp_dir, "1M"):     # the overlay's metadata and a few clusters
        s.start_engine()
        s.start_writer(writers=3, interval=0)
        before = s.status()
        proc = s.playbook("backup", {"backup_mode": "full"}, check=False)
        after = s.status()
        out = proc.stdout
        assert s.leftovers() == []
        errors = [w.get("error") or "" for w in after["writers"]]
        kill_writer(s)
        if proc.returncode != 0:
            # the writes filled the filesystem before the view was complete: the view step
            # fails, naming the cause, and removes what it made
            assert "Backup of localhost failed at 'Take one point in time" in out, out[-4000:]
            assert "No space left on device" in out, out[-4000:]
            assert s.backups() == []
        else:
            assert "disk0: full backup" in out
            assert any("No space left on device" in e or "ENOSPC" in e for e in errors), after
            [backup] = s.backups()
            raw = s.work / "backup.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(backup), str(raw)],
                           check=True, timeout=300)
            s.check(raw, before, after)                   # one point in time, byte for byte
        # the view is gone: the disk takes writes again
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 9 0 1M",
                        f"nbd+unix:///disk0?socket={s.nbd_socket}"], check=True, timeout=60,
                       capture_output=True)


def test_engine_restarted_between_fleece_and_pull(scenario):
    s = scenario(engine="blockd", size=32 * MiB)
    s.make_disk()
    s.start_engine()
    s.start_writer()
    fleeced = s.playbook("fleece", {})
    assert "nbd+unix" in fleeced.stdout, fleeced.stdout[-3000:]
    kill_writer(s)
    s.playbook("engine", {"blockd_state": "restarted"})
    # the view did not survive the restart: teardown is idempotent, the next backup starts
    # from a fresh point in time
    s.playbook("teardown", {})
    assert s.leftovers() == []
    s.playbook("backup", {"backup_mode": "full"})
    [backup] = s.backups()
    assert equal_to_disk(s, backup)


def test_two_backup_plays_against_one_host(scenario):
    s = scenario(engine="blockd", size=64 * MiB)
    s.make_disk()
    s.start_engine()
    results = []

    def play():
        results.append(s.playbook("backup", {"backup_mode": "full"}, check=False))

    threads = [threading.Thread(target=play) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join(600)
    codes = sorted(p.returncode for p in results)
    outs = "\n".join(p.stdout for p in results)
    # one backup at a time per host: a second play that overlaps the first fails clearly
    # instead of sharing its view and writing the same files
    assert codes[0] == 0, outs[-6000:]
    if codes[1] != 0:
        assert "another backup of localhost (backup_name backup) is running" in outs, outs[-6000:]
    assert s.leftovers() == []
    assert not (s.tmp_dir / "backup.lock").exists()
    assert len(s.backups()) == codes.count(0)
    assert all(equal_to_disk(s, b) for b in s.backups())


def test_fleecing_job_lost_during_the_copy(scenario):
    """A fleecing job that ends during the pull (here cancelled by hand) fails the backup."""
    s = scenario(engine="blockd", size=64 * MiB)
    s.make_disk()
    s.start_engine()
    disk_dir = s.backup_dir / "localhost" / "disk0"

    def cancel():
        from qmp_client import QMPClient  # pylint: disable=import-outside-toplevel
        with QMPClient(str(s.qmp_socket), 30) as qmp:
            job = qmp.execute("query-block-jobs")[0]["device"]
            qmp.execute("block-job-cancel", {"device": job, "force": True})
        return job

    with WhenSeen(lambda: disk_dir.exists() and any(p.name.endswith(".partial")
                                                    for p in disk_dir.iterdir()), cancel) as hit:
        proc = s.playbook("backup", {"backup_mode": "full"}, check=False)
    assert hit.done, "the copy was never seen running"
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "stopped during the copy" in proc.stdout, proc.stdout[-4000:]
    assert "copy is not a point in time" in proc.stdout
    assert s.leftovers() == [] and s.backups() == []
