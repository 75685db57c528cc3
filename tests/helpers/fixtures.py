"""Fixtures of the tests that drive the collection: an Ansible controller, an engine for modules.

Imported by the ``conftest.py`` of the test directories that use them.
"""

import os
import signal

import pytest

from helpers.ansible import Ansible


@pytest.fixture
def ansible(tmp_path):
    """helpers.ansible.Ansible in a fresh directory (inventory: localhost, local connection)."""
    return Ansible(tmp_path / "ansible")


@pytest.fixture
def engine_with_monitor(daemon, engine):
    """Start ENGINE with ARGS and a second QMP monitor for the modules; (daemon, socket path).

    A QMP monitor serves one client at a time (qsd's chardev does the same), so
    the test keeps ``d.qmp`` on the first monitor and the modules use the second.
    """
    def start(*args, nbd=True):
        d = daemon(engine, *args,
                   "--chardev", "socket,path=qmp.sock,server=on,wait=off,id=qmp0",
                   "--monitor", "chardev=qmp0",
                   "--chardev", "socket,path=modules.sock,server=on,wait=off,id=qmp1",
                   "--monitor", "chardev=qmp1", nbd=nbd)
        return d, str(d.dir / "modules.sock")
    return start


@pytest.fixture
def service(tmp_path):
    """``blockd`` module args for an engine living in tmp_path; kills whatever it left at teardown."""
    run_dir = tmp_path / "run"
    args = {"run_dir": str(run_dir), "socket": str(run_dir / "qmp.sock"),
            "install_dir": str(tmp_path / "opt"), "service_manager": "daemon"}
    yield args
    pidfile = run_dir / "engine.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass
