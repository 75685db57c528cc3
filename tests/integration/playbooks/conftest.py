"""Fixtures for the playbook tests: the backup scenario of scripts/backup_scenario.py.

``scenario(engine=..., runner=..., inventory=..., host=...)`` makes a
:class:`backup_scenario.Scenario` in a short directory under /tmp (the engine's
unix sockets must fit in sun_path); at teardown its writer and engine are killed
(by pid, the engine through its pid file) and the directory is removed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers.daemon import REPO
from helpers.policy import missing

sys.path.insert(0, str(REPO / "scripts"))

import backup_scenario  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture
def scenario():
    """Factory of backup scenarios, cleaned up at teardown (see the module doc)."""
    probe = subprocess.run([backup_scenario.TARGET_PYTHON, "-c", "import nbd"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        missing(f"python3-libnbd for {backup_scenario.TARGET_PYTHON} (the disk writer)")
    made = []

    def make(**kw) -> backup_scenario.Scenario:
        work = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
        s = backup_scenario.Scenario(work, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        try:
            s.close()
        finally:
            shutil.rmtree(s.work, ignore_errors=True)
