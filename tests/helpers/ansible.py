"""Run the collection's modules and playbooks through the real ansible-playbook.

The collection is made importable as ``blockdev.fleecing`` by a symlink
``<tmp>/collections/ansible_collections/blockdev/fleecing -> <repo>`` and
``ANSIBLE_COLLECTIONS_PATH``; nothing is installed.  Targets run Debian's
``/usr/bin/python3`` (the interpreter a fresh target host has), so modules
only see the standard library and Debian packages there.

``Ansible.module()`` runs one module task in a generated playbook and returns
its registered result (a dict: ``changed``, ``failed``, ``msg``, ``diff``...),
``Ansible.playbook()`` runs a playbook file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
NAMESPACE, NAME = "blockdev", "fleecing"
TARGET_PYTHON = "/usr/bin/python3"


def _bin(tool: str) -> str:
    here = Path(sys.executable).parent / tool
    return str(here) if here.exists() else tool


class Ansible:
    """An Ansible controller set-up in WORKDIR that finds this checkout as blockdev.fleecing."""

    def __init__(self, workdir: Path, inventory: Optional[str] = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        colls = self.workdir / "collections"
        link = colls / "ansible_collections" / NAMESPACE / NAME
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(REPO, target_is_directory=True)
        self.collections = colls
        self.inventory = self.workdir / "inventory.ini"
        self.inventory.write_text(inventory or (
            "[targets]\nlocalhost ansible_connection=local "
            f"ansible_python_interpreter={TARGET_PYTHON}\n"))
        self._n = 0

    @property
    def env(self) -> Dict[str, str]:
        """The environment every ansible command runs with."""
        home = self.workdir / "home"
        return {
            **os.environ,
            "ANSIBLE_COLLECTIONS_PATH": str(self.collections),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "false",
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_REMOTE_TMP": str(home / "remote_tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_HOST_KEY_CHECKING": "true",
            "ANSIBLE_STDOUT_CALLBACK": "default",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
            "ANSIBLE_PYTHON_INTERPRETER": TARGET_PYTHON,
            "PAGER": "cat",
        }

    def run(self, tool: str, *args: str, timeout: float = 300,
            env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        """Run an ansible command line tool (from the test venv) in WORKDIR."""
        return subprocess.run([_bin(tool), *args], cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
                              env={**self.env, **(env or {})})

    def playbook(self, playbook: os.PathLike | str, *args: str,
                 extra_vars: Optional[Mapping[str, Any]] = None, check: bool = False,
                 diff: bool = False, timeout: float = 600,
                 env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        """``ansible-playbook -i <inventory> PLAYBOOK``; returns the completed process."""
        argv = ["-i", str(self.inventory), str(playbook), *args]
        if extra_vars:
            argv += ["-e", json.dumps(dict(extra_vars))]
        if check:
            argv.append("--check")
        if diff:
            argv.append("--diff")
        return self.run("ansible-playbook", *argv, timeout=timeout, env=env)

    def module(self, name: str, args: Optional[Mapping[str, Any]] = None, *,
               check: bool = False, diff: bool = False, hosts: str = "targets",
               module_defaults: Optional[Mapping[str, Any]] = None,
               timeout: float = 300) -> Dict[str, Any]:
        """Run module NAME (``node`` means ``blockdev.fleecing.node``) once; its result.

        The result is what ``register`` saw, so failures come back as
        ``{"failed": True, "msg": ...}`` rather than raising; a playbook that
        could not even run (syntax, missing collection) raises AssertionError.
        """
        self._n += 1
        fqcn = name if "." in name else f"{NAMESPACE}.{NAME}.{name}"
        out = self.workdir / f"result{self._n}.json"
        task: Dict[str, Any] = {"name": f"run {fqcn}", fqcn: dict(args or {}),
                                "register": "r", "ignore_errors": True}
        play: Dict[str, Any] = {
            "hosts": hosts, "gather_facts": False,
            "tasks": [task, {"name": "save the result", "delegate_to": "localhost",
                             "check_mode": False,
                             "ansible.builtin.copy": {"content": "{{ r | to_json }}",
                                                      "dest": str(out)}}]}
        if module_defaults:
            play["module_defaults"] = dict(module_defaults)
        book = self.workdir / f"play{self._n}.yml"
        book.write_text(json.dumps([play], indent=1))   # JSON is YAML
        proc = self.playbook(book, check=check, diff=diff, timeout=timeout)
        if not out.exists():
            raise AssertionError(f"ansible-playbook did not run {fqcn} (rc {proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        result = json.loads(out.read_text())
        result["_stdout"] = proc.stdout
        return result

    def doc(self, *names: str) -> Dict[str, Any]:
        """``ansible-doc --json`` of modules NAMES (short names allowed)."""
        fq = [n if "." in n else f"{NAMESPACE}.{NAME}.{n}" for n in names]
        proc = self.run("ansible-doc", "--json", *fq)
        if proc.returncode != 0:
            raise AssertionError(f"ansible-doc failed:\n{proc.stdout}\n{proc.stderr}")
        return json.loads(proc.stdout)


def changed_then_unchanged(ans: Ansible, name: str, args: Mapping[str, Any],
                           **kw: Any) -> Sequence[Dict[str, Any]]:
    """Check mode (predicts a change, acts not), then twice for real (changed, then not).

    Returns the three results; asserts the idempotence contract every module keeps.
    """
    checked = ans.module(name, args, check=True, diff=True, **kw)
    assert not checked.get("failed"), checked
    assert checked["changed"] is True, checked
    first = ans.module(name, args, diff=True, **kw)
    assert not first.get("failed"), first
    assert first["changed"] is True, first
    second = ans.module(name, args, diff=True, **kw)
    assert not second.get("failed"), second
    assert second["changed"] is False, second
    return checked, first, second
