"""Fixtures of the tests that drive the collection: an Ansible controller, an engine for modules.

Imported by the ``conftest.py`` of the test directories that use them.
"""

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
