"""A fleet: backup.yml backs up four hosts at once through ansible-runner; a fifth fails alone.

Five target hosts are network namespaces on this machine (tests/helpers/netns.py), each with
its own sshd on its own address, its own disk and engine directory; the root namespace is
the controller and the backup host.  The engine is started on four of them with engine.yml
(over SSH, so it runs inside each namespace); the fifth has none -- broken on purpose.
Then backup.yml runs once for all five through ``ansible-runner`` with a private data dir
(as AWX runs a job template), forks 5: the four healthy hosts are backed up (each pull goes
through an SSH tunnel to that host's NBD socket), each backup equals its host's disk and no
host keeps a node, export, job or overlay file of the backup; the broken host fails alone
with a message naming the cause.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers.daemon import REPO
from helpers.netns import netns_hosts  # noqa: F401  pylint: disable=unused-import
from helpers.sshd import start_sshd

sys.path.insert(0, str(REPO / "scripts"))

import backup_scenario  # noqa: E402  pylint: disable=wrong-import-position
from qmp_client import QMPClient  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = [pytest.mark.slow, pytest.mark.blockd]
HOSTS = 5
BROKEN = "h4"
MiB = 1 << 20


class Fleet(backup_scenario.Scenario):
    """The scenario machinery (ansible-runner, environment) with per-host variables."""

    def __init__(self, work: Path, inventory: str, common: dict, host_vars: dict) -> None:
        super().__init__(work, engine="blockd", runner="ansible-runner", inventory=inventory,
                         host="h0")
        self.common, self.host_vars = common, host_vars
        hv = self.work / "runner" / "inventory" / "host_vars"
        hv.mkdir(parents=True, exist_ok=True)
        for name, values in host_vars.items():
            (hv / f"{name}.yml").write_text(json.dumps(values, indent=1))   # JSON is YAML

    def vars(self) -> dict:
        return dict(self.common)


def engine_state(socket_path: Path) -> dict:
    with QMPClient(str(socket_path), 30) as qmp:
        return {"nodes": sorted(n["node-name"] for n in
                                qmp.execute("query-named-block-nodes", {"flat": True})),
                "exports": sorted(e["id"] for e in qmp.execute("query-block-exports")),
                "jobs": qmp.execute("query-jobs")}


@pytest.mark.timeout(900)
def test_fleet_backup_one_host_broken(netns_hosts):  # noqa: F811
    work = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    servers = []
    try:
        hosts = netns_hosts(HOSTS)
        names = [f"h{i}" for i in range(HOSTS)]
        known = work / "known_hosts"
        host_vars, keys = {}, []
        for i, (name, ns, addr) in enumerate(zip(names, hosts.names, hosts.addresses)):
            server = start_sshd(work / "sshd" / name, netns=ns, host=addr)
            servers.append(server)
            keys.append(str(server.key))
            with open(known, "a") as f:
                f.write(server.known_hosts.read_text())
            d = work / "hosts" / name
            d.mkdir(parents=True)
            backup_scenario.make_disk(d / "disk0.raw", (8 + 2 * i) * MiB)
            conn = server.ansible_vars()
            host_vars[name] = {
                **{k: v for k, v in conn.items() if k != "ansible_ssh_common_args"},
                "ansible_ssh_common_args": f"-o UserKnownHostsFile={known} "
                                           "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes",
                "blockd_run_dir": str(d / "run"), "blockd_install_dir": str(d / "opt"),
                "blockd_disks": [{"name": "disk0", "path": str(d / "disk0.raw"),
                                  "file_node": "disk0-file"}],
                "backup_socket": str(d / "run" / "qmp.sock"),
                "backup_nbd_socket": str(d / "run" / "nbd.sock"),
                "backup_tmp_dir": str(d / "tmp"),
            }
        inventory = ("[blockd_hosts]\n" + "".join(f"{n}\n" for n in names)
                     + "[healthy]\n" + "".join(f"{n}\n" for n in names if n != BROKEN)
                     + "[backup]\nlocalhost ansible_connection=local "
                       "ansible_python_interpreter=/usr/bin/python3\n")
        common = {"blockd_engine": "blockd", "blockd_service_manager": "daemon",
                  "backup_disks": ["disk0"], "backup_dir": str(work / "backups"),
                  "backup_host": "localhost", "backup_ssh_identity": keys,
                  "backup_ssh_known_hosts": [str(known)], "backup_poll_interval": 1}
        fleet = Fleet(work, inventory, common, host_vars)

        fleet.common["targets"] = "healthy"
        fleet.playbook("engine")
        fleet.common["targets"] = "blockd_hosts"
        t0 = time.monotonic()
        proc = fleet.playbook("backup", check=False)
        wall = time.monotonic() - t0
        out = proc.stdout
        print(f"fleet backup of {HOSTS} hosts (one broken): {wall:.1f} s")
        assert proc.returncode != 0, out[-3000:]          # the broken host failed the job
        assert f"Backup of {BROKEN} failed at" in out, out[-6000:]
        assert "is the engine running?" in out, out[-6000:]
        for name in names:
            if name == BROKEN:
                continue
            assert f"Backup of {name} failed" not in out, out[-6000:]
            [backup] = list((work / "backups" / name / "disk0").glob("*.qcow2"))
            assert backup.stat().st_size > 0
            d = work / "hosts" / name
            subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(backup),
                            str(d / "disk0.raw")], check=True, capture_output=True, timeout=120)
            state = engine_state(d / "run" / "qmp.sock")
            assert state == {"nodes": ["disk0", "disk0-file"], "exports": ["disk0"],
                             "jobs": []}, (name, state)
            assert not [p for p in (d / "tmp").rglob("*") if p.is_file()], name
        assert not (work / "backups" / BROKEN).exists() or not list(
            (work / "backups" / BROKEN).rglob("*.qcow2"))
        # the pulls crossed the network: through an SSH tunnel to each host's own address
        for name, addr in zip(names, hosts.addresses):
            if name != BROKEN:
                [manifest] = list((work / "backups" / name / "disk0").glob("*.manifest.json"))
                source = json.loads(manifest.read_text())["source"]
                assert source.startswith(f"nbd+ssh://{addr}:22/"), (name, source)
    finally:
        for server in servers:
            server.stop()
        fleet_close = locals().get("fleet")
        if fleet_close is not None:
            fleet_close.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)
