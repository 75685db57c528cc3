"""``molecule test`` of extensions/molecule (scenario ``default``) passes.

The scenario (localhost): create (this checkout as the collection, a disk with data),
converge (engine + disk export, a writer writing, a labelled backup), idempotence (a
second converge changes nothing), verify (the restored backup is the disk at one instant;
no fleecing job, export, node or overlay left), cleanup, destroy.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers.daemon import REPO

pytestmark = [pytest.mark.slow, pytest.mark.blockd]


def _kill_from(path: Path, field=None) -> None:
    """Kill the process whose pid PATH holds (a pid file, or JSON with a ``pid``)."""
    import json
    try:
        text = path.read_text()
        pid = int(json.loads(text)["pid"] if field else text.strip())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass


@pytest.mark.timeout(900)
def test_molecule_default_scenario():
    work = Path(tempfile.mkdtemp(prefix="mol-", dir="/tmp"))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MOLECULE_BLOCKD_WORK": str(work / "w"),
           "XDG_CACHE_HOME": str(work / "cache"), "ANSIBLE_HOME": str(work / "home"),
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
           "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    try:
        log = work / "molecule.log"
        with open(log, "w") as out_file:  # a file, not a pipe: daemons may inherit it
            proc = subprocess.run([str(bin_dir / "molecule"), "test"], cwd=REPO, env=env,
                                  stdout=out_file, stderr=subprocess.STDOUT, timeout=880,
                                  stdin=subprocess.DEVNULL, check=False)
        out = log.read_text(errors="replace")
        assert proc.returncode == 0, out[-12000:]
        for step in ("create", "converge", "idempotence", "verify", "cleanup", "destroy"):
            assert f"{step}: Executed: Successful" in out, (step, out[-6000:])
        assert "one point in time" in out
    finally:
        _kill_from(work / "w" / "writer.json", field="pid")
        _kill_from(work / "w" / "run" / "engine.pid")
        shutil.rmtree(work, ignore_errors=True)
