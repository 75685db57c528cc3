"""playbooks/backup.yml and restore.yml through ansible-runner, as an AWX job runs them.

A private data directory (project/ with the wrapper playbook, inventory/, env/extravars,
env/envvars) and ``ansible-runner run DIR -p backup.yml``; a writer process keeps writing
to the disk through every backup; each restored backup must be the disk at one instant
between the writes done before the playbook started and those started when it ended.
"""

import json
import subprocess
from pathlib import Path

import pytest

from helpers import MiB

pytestmark = [pytest.mark.slow, pytest.mark.blockd]


def _data(manifest):
    """Bytes a backup's manifest says were copied as data."""
    return sum(e["length"] for e in manifest["extents"] if e["type"] == "data")


def _messages(events):
    """The ``msg`` of every ok result in ansible-runner's job events."""
    out = []
    for ev in events:
        if ev.get("event") in ("runner_on_ok", "runner_item_on_ok"):
            msg = ev.get("event_data", {}).get("res", {}).get("msg")
            if isinstance(msg, str):
                out.append(msg)
    return out


@pytest.mark.timeout(600)
def test_full_then_incremental_backup_of_a_disk_being_written(scenario):
    s = scenario(engine="blockd", runner="ansible-runner", size=32 * MiB)
    s.make_disk()
    s.start_engine()
    assert s.engine_state()["exports"] == ["disk0"]
    s.start_writer(span=8 * MiB)   # the first quarter: an incremental copies less

    before1 = s.status()
    s.playbook("backup", {"backup_bitmap": "nightly"})
    after1 = s.status()
    assert s.leftovers() == []
    msgs = _messages(s.runner_events("backup"))
    assert any(m.startswith("disk0: full backup ") and m.endswith("verified") for m in msgs), msgs

    s.playbook("backup", {"backup_bitmap": "nightly"})
    after2 = s.status()
    assert s.leftovers() == []
    assert s.engine_state()["bitmaps"] == ["disk0:nightly"]
    final = s.stop_writer()

    full, inc = s.backups()
    assert full.name.endswith("-full.qcow2") and inc.name.endswith("-inc.qcow2"), (full, inc)
    inc_manifest = json.loads(Path(f"{inc}.manifest.json").read_text())
    assert Path(inc_manifest["base"]["path"]).name == full.name
    full_manifest = json.loads(Path(f"{full}.manifest.json").read_text())
    assert _data(inc_manifest) < _data(full_manifest), "the incremental copied everything"

    s.playbook("restore", {"restore_backup": str(full), "restore_dest": str(s.work / "r1.raw")})
    s.playbook("restore", {"restore_dest": str(s.work / "r2.raw")})   # the newest: the chain
    first = s.check(s.work / "r1.raw", before1, after1)
    second = s.check(s.work / "r2.raw", after1, after2)
    # the writes went on during the backups: the disk moved on after each point in time
    assert sum(first["writes"]) < sum(w["done"] for w in after1["writers"])
    assert sum(first["writes"]) < sum(second["writes"]) < sum(w["done"] for w in final["writers"])
    # and into the disk's own writable export (its writer is stopped): the disk goes back
    s.playbook("restore", {"restore_backup": str(full), "restore_export": "disk0"})
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    f"nbd+unix:///disk0?socket={s.nbd_socket}", str(s.work / "live.raw")],
                   check=True, timeout=120, capture_output=True)
    assert s.check(s.work / "live.raw", before1, after1)["writes"] == first["writes"]
    status = (s.work / "runner" / "artifacts")
    assert all((d / "status").read_text() == "successful" for d in status.iterdir()), \
        [(d.name, (d / "status").read_text()) for d in status.iterdir()]
