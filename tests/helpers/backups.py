"""Disks and exports for the backup module tests (nbd_copy, backup_verify, backup_restore).

A sparse source image with a known pattern, served by a real engine (blockd or
qemu-storage-daemon 7.2) as a writable export ``w`` of node ``n``, with a dirty
bitmap ``b0`` recording the writes made after it was added; ``freeze()`` adds a
read-only export ``snap`` carrying the bitmap, as a fleecing export would.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Tuple

from .tools import MiB, qemu_img

SIZE = 16 * MiB
#: MiB index -> fill byte of the source's data blocks; the rest is a hole.
DATA = {0: 0x11, 3: 0x33, 4: 0x44, 9: 0x99, 15: 0xF5}


def make_source(path: os.PathLike | str, size: int = SIZE) -> Path:
    """A sparse raw image holding :data:`DATA`."""
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
        for i, fill in DATA.items():
            f.seek(i * MiB)
            f.write(bytes([fill]) * MiB)
    return path


def data_bytes() -> int:
    """Bytes of data in the source made by :func:`make_source`."""
    return len(DATA) * MiB


class Served:
    """An engine serving a source image (see the module docstring)."""

    def __init__(self, daemon: Any, engine: str, image: Path, bitmap: bool = True) -> None:
        self.image = image
        self.d = daemon(engine, "--blockdev", f"driver=file,node-name=f,filename={image}",
                        "--blockdev", "driver=raw,node-name=n,file=f",
                        "--export", "type=nbd,id=w,node-name=n,name=w,writable=on", nbd=True)
        if bitmap:
            r = self.d.qmp.cmd_raw("block-dirty-bitmap-add",
                                   {"node": "n", "name": "b0", "granularity": 65536})
            assert r == {"return": {}}, r
        self.uri = self.d.nbd_uri("w")

    def write(self, writes: Iterable[Tuple[int, int, int]]) -> None:
        """Write ``(offset, length, fill byte)`` ranges through the writable export."""
        from blockd.nbd.client import connect_uri
        with connect_uri(self.uri) as c:
            for off, n, fill in writes:
                c.pwrite(off, bytes([fill]) * n)
            c.flush()

    def freeze(self, name: str = "snap") -> str:
        """Stop bitmap b0 and export node n read-only with it; the export's URI."""
        r = self.d.qmp.cmd_raw("block-dirty-bitmap-disable", {"node": "n", "name": "b0"})
        assert r == {"return": {}}, r
        r = self.d.qmp.cmd_raw("block-export-add", {"type": "nbd", "id": name, "node-name": "n",
                                                    "name": name, "bitmaps": ["b0"]})
        assert r == {"return": {}}, r
        return self.d.nbd_uri(name)


def compare(a: os.PathLike | str, fa: str, b: os.PathLike | str, fb: str) -> None:
    """``qemu-img compare`` says A and B hold the same disk (-U: A may be in use)."""
    out = qemu_img("compare", "-U", "-f", fa, "-F", fb, a, b, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def img_info(path: os.PathLike | str) -> Dict[str, Any]:
    """``qemu-img info --output=json``."""
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout)


def check_qcow2(path: os.PathLike | str) -> None:
    """``qemu-img check`` finds no error."""
    out = qemu_img("check", "-f", "qcow2", path).stdout
    assert "No errors were found on the image." in out, out


def files(directory: os.PathLike | str) -> set:
    """Names of the files in DIRECTORY (to see that nothing was written)."""
    return set(os.listdir(directory))


def run_tasks(ansible: Any, *steps: Dict[str, Any]) -> list:
    """Run several module tasks in ONE ansible-playbook (each costs ~2 s of CPU otherwise).

    Each step is ``{"module": name, "args": {...}, "check": bool, "diff": bool,
    "environment": {...}}``; every task
    runs (``ignore_errors``), in order, and the registered results come back in a list.
    """
    ansible._n += 1  # pylint: disable=protected-access
    n = ansible._n  # pylint: disable=protected-access
    out = ansible.workdir / f"results{n}.json"
    tasks = []
    for i, step in enumerate(steps):
        name = step["module"]
        fqcn = name if "." in name else f"blockdev.fleecing.{name}"
        tasks.append({"name": f"step {i} {fqcn}", fqcn: dict(step.get("args") or {}),
                      "register": f"r{i}", "ignore_errors": True,
                      "check_mode": bool(step.get("check")), "diff": bool(step.get("diff")),
                      "environment": dict(step.get("environment") or {})})
    tasks.append({"name": "save the results", "delegate_to": "localhost", "check_mode": False,
                  "ansible.builtin.copy": {
                      "content": "{{ [%s] | to_json }}" % ", ".join(f"r{i}"
                                                                   for i in range(len(steps))),
                      "dest": str(out)}})
    book = ansible.workdir / f"tasks{n}.yml"
    book.write_text(json.dumps([{"hosts": "targets", "gather_facts": False, "tasks": tasks}]))
    proc = ansible.playbook(book)
    if not out.exists():
        raise AssertionError(f"ansible-playbook did not run the tasks (rc {proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


class WhenSeen(threading.Thread):
    """Runs ACTION once, as soon as CONDITION() is true (checked every 5 ms, for TIMEOUT s).

    ``done`` holds ACTION's return value once it ran.  For fault tests: kill or cancel
    something at a precise step of a playbook that runs meanwhile::

        with WhenSeen(lambda: overlay.exists(), kill_engine) as hit:
            run_the_playbook()
        assert hit.done
    """

    def __init__(self, condition, action, timeout: float = 300) -> None:
        super().__init__(daemon=True)
        self.condition, self.action, self.timeout = condition, action, timeout
        self.done: list = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.condition():
                self.done.append(self.action())
                return
            time.sleep(0.005)

    def __enter__(self) -> "WhenSeen":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(30)
