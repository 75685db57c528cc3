"""backup.yml against a target reached over real SSH, pulled by another inventory host.

sshd runs on 127.0.0.1 (tests/helpers/sshd.py: key authentication, host key checked).
The inventory has the target ``target`` (``ansible_connection=ssh`` to that sshd) and the
backup host ``localhost`` (local connection): the engine is installed and started on the
target through SSH, the views are taken there, and the pull runs on localhost through an
SSH tunnel (``nbd+ssh://``) to the target's NBD socket -- it crosses a connection.  A
writer keeps writing during the backup; the restored backup is the disk at one instant.
"""

import json
import subprocess
from pathlib import Path

import pytest

from helpers import MiB
from helpers.sshd import sshd  # noqa: F401  pylint: disable=unused-import

pytestmark = [pytest.mark.slow, pytest.mark.blockd]


def _inventory(server) -> str:
    target = " ".join(f"{k}={json.dumps(v) if ' ' in v else v}"
                      for k, v in server.ansible_vars().items())
    return ("[blockd_hosts]\n"
            f"target {target}\n"
            "[backup]\n"
            "localhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n")


@pytest.mark.timeout(600)
def test_backup_of_a_remote_target_pulled_through_an_ssh_tunnel(scenario, sshd):  # noqa: F811
    s = scenario(engine="blockd", size=32 * MiB, inventory=_inventory(sshd), host="target")
    tunnel = {"backup_host": "localhost", "backup_ssh_identity": [str(sshd.key)],
              "backup_ssh_known_hosts": [str(sshd.known_hosts)], "restore_host": "localhost",
              "restore_ssh_identity": [str(sshd.key)],
              "restore_ssh_known_hosts": [str(sshd.known_hosts)]}
    s.make_disk()
    s.start_engine()
    s.start_writer(span=8 * MiB)
    before = s.status()
    out = s.playbook("backup", tunnel).stdout
    after = s.status()
    s.stop_writer()
    assert s.leftovers() == []
    [backup] = s.backups()
    assert backup.parent == s.backup_dir / "target" / "disk0"
    manifest = json.loads(Path(f"{backup}.manifest.json").read_text())
    assert manifest["source"].startswith(f"nbd+ssh://127.0.0.1:{sshd.port}/"), manifest["source"]
    assert "disk0: full backup" in out
    s.playbook("restore", {**tunnel, "restore_dest": str(s.work / "restored.raw")})
    pit = s.check(s.work / "restored.raw", before, after)
    # and back into the target's disk export, through the tunnel from the backup host
    out = s.playbook("restore", {**tunnel, "restore_export": "disk0"}).stdout
    assert "restored to" in out and "export disk0" in out
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    f"nbd+unix:///disk0?socket={s.nbd_socket}", str(s.work / "live.raw")],
                   check=True, timeout=120, capture_output=True)
    assert s.check(s.work / "live.raw", before, after)["writes"] == pit["writes"]
    # the engine ran on the target, started through SSH: sshd logged the sessions
    assert "Accepted publickey" in sshd.log()
