"""One host, one disk being written, the collection's playbooks: the backup scenario.

Shared by scripts/demo, the playbook tests (tests/integration/playbooks/) and the
molecule scenario's pytest wrapper.  A :class:`Scenario` lives in one short
work directory (unix socket paths must fit in 108 bytes) and drives:

* the collection, seen as ``blockdev.fleecing`` through a symlink
  ``<work>/collections/ansible_collections/blockdev/fleecing -> <repo>``;
* the playbooks ``playbooks/*.yml``, run with ``ansible-playbook`` or, as AWX
  does, through ``ansible-runner`` with a private data directory
  (``project/``, ``inventory/``, ``env/extravars``, ``env/envvars``);
* a disk image with some data (and a copy of it, the original), opened by
  ``engine.yml`` in blockd or qemu-storage-daemon with a writable NBD export;
* ``scripts/pit_writer.py`` writing to that export while backups run, and its
  checker, which proves a restored backup is the disk at one instant;
* a look at what the engine and the directories hold afterwards
  (:meth:`Scenario.leftovers`: no fleecing job, export, node or file).

Standard library + the collection's stdlib QMP client; the Ansible tools come
from the interpreter's bin directory (``.venv/bin``) or ``PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "plugins" / "module_utils"))

import pit_writer  # noqa: E402  pylint: disable=wrong-import-position
from qmp_client import QMPClient  # noqa: E402  pylint: disable=wrong-import-position

MiB = 1 << 20
TARGET_PYTHON = "/usr/bin/python3"
DISK = "disk0"
ENGINES = {"blockd": "blockd", "qsd": "qemu-storage-daemon",
           "qemu-storage-daemon": "qemu-storage-daemon"}


class ScenarioError(Exception):
    """A step of the scenario failed (the message says which and why)."""


def _bin(tool: str) -> str:
    here = Path(sys.executable).parent / tool
    return str(here) if here.exists() else tool


def make_disk(path: Path, size: int) -> None:
    """A sparse raw disk: a label at 0, random data at 1/8 of it, a pattern near the end."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"blockd demo disk\n".ljust(4096, b"\0"))
        f.seek(size // 8)
        for _ in range(max(1, size // 8 // MiB)):
            f.write(os.urandom(MiB))
        f.seek(size - 4 * MiB)
        f.write(b"\x42" * 4 * MiB)


class Scenario:
    """The backup scenario in WORK (see the module doc).

    :param engine: ``blockd`` or ``qsd``.
    :param runner: ``ansible-playbook`` or ``ansible-runner`` (AWX's way).
    :param inventory: an INI inventory; default: localhost (local connection) in group
        ``blockd_hosts``.  The playbooks run on ``targets`` (extra var).
    :param host: the inventory host whose disk is backed up.
    :param disk: the disk's (format) node name, also its export name and file name.
    :param file_node: the node name of its file node (default ``<disk>-file``).
    """

    def __init__(self, work: Path, engine: str = "blockd", size: int = 64 * MiB,
                 runner: str = "ansible-playbook", inventory: Optional[str] = None,
                 host: str = "localhost", disk: str = DISK,
                 file_node: Optional[str] = None) -> None:
        if engine not in ENGINES:
            raise ScenarioError(f"engine must be blockd or qsd, not {engine!r}")
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.engine, self.size, self.runner, self.host = engine, size, runner, host
        self.disk_name, self.file_node = disk, file_node or f"{disk}-file"
        self.run_dir = self.work / "run"
        self.qmp_socket = self.run_dir / "qmp.sock"
        self.nbd_socket = self.run_dir / "nbd.sock"
        self.backup_dir = self.work / "backups"
        self.tmp_dir = self.work / "tmp"
        self.disk = self.work / f"{disk}.raw"
        self.original = self.work / "original.raw"
        self.writer_status = self.work / "writer.json"
        self.collections = self.work / "collections"
        link = self.collections / "ansible_collections" / "blockdev" / "fleecing"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(REPO, target_is_directory=True)
        self.inventory = inventory or (
            "[blockd_hosts]\nlocalhost ansible_connection=local "
            f"ansible_python_interpreter={TARGET_PYTHON}\n")
        self.writer: Optional[subprocess.Popen] = None
        self.runs = 0
        self.log: List[str] = []

    # -- settings ------------------------------------------------------------------------------
    def vars(self) -> Dict[str, Any]:
        """Extra vars every playbook of the scenario gets (engine, sockets, directories)."""
        return {
            "targets": self.host,
            "blockd_engine": ENGINES[self.engine],
            "blockd_run_dir": str(self.run_dir),
            "blockd_install_dir": str(self.work / "opt"),
            "blockd_service_manager": "daemon",
            "blockd_disks": [{"name": self.disk_name, "path": str(self.disk),
                              "file_node": self.file_node}],
            "backup_disks": [self.disk_name],
            "backup_socket": str(self.qmp_socket),
            "backup_nbd_socket": str(self.nbd_socket),
            "backup_tmp_dir": str(self.tmp_dir),
            "backup_dir": str(self.backup_dir),
            "backup_poll_interval": 1,
            "restore_dir": str(self.backup_dir),
            "restore_disk": self.disk_name,
            "restore_nbd_socket": str(self.nbd_socket),
            "fleece_socket": str(self.qmp_socket),
            "fleece_nbd_socket": str(self.nbd_socket),
            "fleece_tmp_dir": str(self.tmp_dir),
            "fleece_disks": [self.disk_name],
        }

    def env(self) -> Dict[str, str]:
        """Environment of the Ansible commands: this checkout as blockdev.fleecing, private dirs."""
        home = self.work / "home"
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {
            **os.environ,
            "PATH": path,
            "ANSIBLE_COLLECTIONS_PATH": str(self.collections),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "false",
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_REMOTE_TMP": str(home / "remote_tmp"),
            "ANSIBLE_ASYNC_DIR": str(home / "async"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_PYTHON_INTERPRETER": TARGET_PYTHON,
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
            "PAGER": "cat",
        }

    # -- playbooks -----------------------------------------------------------------------------
    def playbook(self, name: str, extra: Optional[Mapping[str, Any]] = None,
                 check: bool = True, timeout: float = 900,
                 check_mode: bool = False) -> subprocess.CompletedProcess:
        """Run ``playbooks/NAME.yml`` with the scenario's vars plus EXTRA.

        :param check: raise :class:`ScenarioError` (with the output) when it fails.
        :param check_mode: run it with ``--check`` (ansible-playbook only).
        """
        self.runs += 1
        extravars = {**self.vars(), **(extra or {})}
        if self.runner == "ansible-runner":
            proc = self._run_runner(name, extravars, timeout)
        else:
            inv = self.work / "inventory.ini"
            inv.write_text(self.inventory)
            proc = subprocess.run(
                [_bin("ansible-playbook"), "-i", str(inv), str(REPO / "playbooks" / f"{name}.yml"),
                 "-e", json.dumps(extravars), *(["--check"] if check_mode else [])],
                cwd=self.work, env=self.env(), capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL, check=False)
        (self.work / f"play{self.runs:02d}-{name}.log").write_text(proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise ScenarioError(f"playbooks/{name}.yml failed (rc {proc.returncode}):\n"
                                f"{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}")
        return proc

    def _run_runner(self, name: str, extravars: Mapping[str, Any],
                    timeout: float) -> subprocess.CompletedProcess:
        """``ansible-runner run`` in a private data dir laid out as AWX lays out a job's."""
        pdd = self.work / "runner"
        (pdd / "project").mkdir(parents=True, exist_ok=True)
        (pdd / "inventory").mkdir(exist_ok=True)
        (pdd / "env").mkdir(exist_ok=True)
        # the project-side wrapper an AWX project holds (job templates cannot name a
        # playbook inside a collection, docs/awx.md)
        (pdd / "project" / f"{name}.yml").write_text(
            f"---\n- name: blockdev.fleecing.{name}\n"
            f"  ansible.builtin.import_playbook: blockdev.fleecing.{name}\n")
        (pdd / "inventory" / "hosts").write_text(self.inventory)
        (pdd / "env" / "extravars").write_text(json.dumps(dict(extravars), indent=1))
        env = self.env()
        (pdd / "env" / "envvars").write_text(json.dumps(
            {k: v for k, v in env.items() if k.startswith("ANSIBLE_")}, indent=1))
        ident = f"{self.runs:02d}-{name}"
        proc = subprocess.run(
            [_bin("ansible-runner"), "run", str(pdd), "-p", f"{name}.yml", "--ident", ident],
            cwd=self.work, env=env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False)
        artifacts = pdd / "artifacts" / ident
        status = (artifacts / "status").read_text().strip() if (artifacts / "status").exists() \
            else "missing"
        if status != "successful" and proc.returncode == 0:
            proc.returncode = 1
        proc.stdout += f"\n[ansible-runner status: {status}]\n"
        return proc

    def runner_events(self, ident_suffix: str) -> List[dict]:
        """The job events ansible-runner recorded for the last run of a playbook."""
        arts = sorted((self.work / "runner" / "artifacts").glob(f"*-{ident_suffix}"))
        if not arts:
            return []
        return [json.loads(p.read_text())
                for p in sorted((arts[-1] / "job_events").glob("*.json"),
                                key=lambda p: int(p.name.split("-", 1)[0]))]

    # -- disk, engine, writer ------------------------------------------------------------------
    def make_disk(self) -> None:
        """The disk and its original copy."""
        make_disk(self.disk, self.size)
        shutil.copyfile(self.disk, self.original)
        self.backup_dir.mkdir(exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)

    def start_engine(self) -> subprocess.CompletedProcess:
        """``engine.yml``: the engine runs with the disk open and exported writable."""
        return self.playbook("engine")

    def stop_engine(self) -> None:
        """``engine.yml blockd_state=absent``; kill what is left by its pid file."""
        try:
            self.playbook("engine", {"blockd_state": "absent", "blockd_disks": []}, check=False,
                          timeout=120)
        finally:
            self.kill_engine()

    def kill_engine(self) -> None:
        """Kill the engine this scenario started (its pid file), if it still runs."""
        pidfile = self.run_dir / "engine.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if str(self.run_dir).encode() in cmdline:  # ours, not a reused pid
            os.kill(pid, signal.SIGKILL)

    def start_writer(self, writers: int = 3, interval: float = 0.01, span: int = 0,
                     warmup: int = 20, timeout: float = 60) -> None:
        """pit_writer on the disk's writable export; returns once each writer did WARMUP writes.

        :param span: write only the first SPAN bytes of the disk (0: all of it).
        """
        uri = f"nbd+unix:///{self.disk_name}?socket={self.nbd_socket}"
        self.writer = subprocess.Popen(
            [TARGET_PYTHON, str(REPO / "scripts" / "pit_writer.py"), "write", "--uri", uri,
             "--status", str(self.writer_status), "--writers", str(writers),
             "--interval", str(interval), "--span", str(span)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.writer.poll() is not None:
                raise ScenarioError("the writer exited: " + self.writer.stdout.read().decode())
            try:
                st = pit_writer.read_status(self.writer_status)
                if all(w["done"] >= warmup for w in st["writers"]):
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ScenarioError("the writer made no progress")
            time.sleep(0.05)

    def status(self) -> dict:
        """The writer's status now (writes done per writer)."""
        return pit_writer.read_status(self.writer_status)

    def stop_writer(self) -> dict:
        """Stop the writer (SIGTERM) and return its final status."""
        if self.writer is None:
            return {}
        if self.writer.poll() is None:
            self.writer.send_signal(signal.SIGTERM)
        try:
            self.writer.wait(60)
        except subprocess.TimeoutExpired:
            self.writer.kill()
            self.writer.wait()
        out = self.writer.stdout.read().decode()
        rc = self.writer.returncode
        self.writer = None
        st = self.status()
        if rc != 0 or any(w.get("error") for w in st["writers"]):
            raise ScenarioError(f"the writer failed (rc {rc}): {out} {st}")
        return st

    # -- checks --------------------------------------------------------------------------------
    def check(self, image: Path, before: dict, after: dict) -> dict:
        """pit_writer's check of IMAGE (raw): the disk at one instant between BEFORE and AFTER."""
        try:
            return pit_writer.check(self.original, Path(image), len(before["writers"]),
                                    before, after)
        except pit_writer.NotAPointInTime as exc:
            raise ScenarioError(f"{image}: {exc}") from None

    def engine_state(self) -> Dict[str, Any]:
        """Nodes, exports and jobs of the engine (its QMP socket)."""
        with QMPClient(str(self.qmp_socket), 30) as qmp:
            return {
                "nodes": sorted(n["node-name"] for n in
                                qmp.execute("query-named-block-nodes", {"flat": True})),
                "exports": sorted(e["id"] for e in qmp.execute("query-block-exports")),
                "jobs": sorted(j["id"] for j in qmp.execute("query-jobs")),
                "bitmaps": sorted(
                    "%s:%s" % (n["node-name"], b["name"])
                    for n in qmp.execute("query-named-block-nodes", {"flat": True})
                    for b in n.get("dirty-bitmaps", [])),
            }

    def leftovers(self) -> List[str]:
        """What a backup left behind: fleecing nodes, exports, jobs, temporary or partial files."""
        problems = []
        state = self.engine_state()
        if state["nodes"] != sorted([self.disk_name, self.file_node]):
            problems.append(f"nodes {state['nodes']}")
        if state["exports"] != [self.disk_name]:
            problems.append(f"exports {state['exports']}")
        if state["jobs"]:
            problems.append(f"jobs {state['jobs']}")
        if self.tmp_dir.exists():
            left = sorted(p.name for p in self.tmp_dir.rglob("*") if p.is_file())
            if left:
                problems.append(f"files in the overlay directory {self.tmp_dir}: {left}")
        if self.backup_dir.exists():
            odd = sorted(str(p.relative_to(self.backup_dir)) for p in self.backup_dir.rglob("*")
                         if p.is_file() and not p.name.endswith((".qcow2", ".raw",
                                                                 ".manifest.json")))
            if odd:
                problems.append(f"partial or progress files in {self.backup_dir}: {odd}")
        return problems

    def backups(self) -> List[Path]:
        """The complete backups of the disk (with a manifest), oldest first."""
        d = self.backup_dir / self.host / self.disk_name
        if not d.exists():
            return []
        return sorted((p for p in d.iterdir() if p.suffix in (".qcow2", ".raw")
                       and Path(str(p) + ".manifest.json").exists()),
                      key=lambda p: p.stat().st_mtime)

    def close(self) -> None:
        """Stop the writer and the engine, whatever state they are in."""
        if self.writer is not None and self.writer.poll() is None:
            self.writer.kill()
            self.writer.wait()
        self.writer = None
        self.kill_engine()
