# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures for the module_utils unit tests: a real blockd engine.

These tests run twice: under ``ansible-test units`` (which imports the
collection as ``ansible_collections.blockdev.fleecing``; see
tests/integration/test_ansible_test.py) and under the project's own pytest run
(``bash scripts/test``), where this file makes the same import path work by
pointing a temporary ``ansible_collections/blockdev/fleecing`` symlink at the
checkout.

``blockd_engine`` starts ``python -m blockd`` (the engine shipped in
plugins/module_utils/blockd) with one raw disk node ``disk0`` and a QMP
monitor on a UNIX socket, and stops it at teardown.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

#: The collection's root directory (tests/unit/plugins/module_utils/../../../..).
COLLECTION_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
MODULE_UTILS = os.path.join(COLLECTION_ROOT, "plugins", "module_utils")


QMP_CLIENT = "ansible_collections.blockdev.fleecing.plugins.module_utils.qmp_client"


def _make_collection_importable():
    """Outside ansible-test, put a ``ansible_collections/blockdev/fleecing`` tree on sys.path.

    Either way, the collection imported must be this one (not, say, an
    installed copy in ~/.ansible/collections).
    """
    try:
        __import__(QMP_CLIENT)
    except ImportError:
        _link_collection()
        __import__(QMP_CLIENT)
    where = os.path.realpath(sys.modules[QMP_CLIENT].__file__)
    if not where.startswith(os.path.realpath(COLLECTION_ROOT) + os.sep):
        raise ImportError("%s comes from %s, not from the collection under test in %s"
                          % (QMP_CLIENT, where, COLLECTION_ROOT))


def _link_collection():
    """Make ``ansible_collections.blockdev.fleecing`` a symlink to COLLECTION_ROOT, on sys.path."""
    top = tempfile.mkdtemp(prefix="blockdev-coll.")
    atexit.register(shutil.rmtree, top, True)
    ns = os.path.join(top, "ansible_collections", "blockdev")
    os.makedirs(ns)
    os.symlink(COLLECTION_ROOT, os.path.join(ns, "fleecing"))
    sys.path.insert(0, top)
    for name in [m for m in sys.modules if m == "ansible_collections" or m.startswith("ansible_collections.")]:
        del sys.modules[name]


_make_collection_importable()


class Engine:
    """A running blockd: ``proc``, ``dir`` (its files), ``qmp_path`` (the monitor socket)."""

    def __init__(self, proc, directory, qmp_path, log_path):
        self.proc = proc
        self.dir = directory
        self.qmp_path = qmp_path
        self.log_path = log_path

    def log(self):
        """The engine's stdout and stderr so far."""
        with open(self.log_path, "r") as log:
            return log.read()

    def stop(self):
        """SIGTERM, then SIGKILL if it does not exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def _wait_for_greeting(engine, timeout=30.0):
    """Wait until the monitor greets (the whole command line has been processed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if engine.proc.poll() is not None:
            pytest.fail("blockd exited with status %s:\n%s" % (engine.proc.returncode, engine.log()))
        if os.path.exists(engine.qmp_path):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, deadline - time.time()))
            try:
                sock.connect(engine.qmp_path)
                if sock.recv(4096).startswith(b'{"QMP"'):
                    return
            except OSError:
                pass
            finally:
                sock.close()
        time.sleep(0.05)
    pytest.fail("blockd did not greet on %s within %.0f s:\n%s" % (engine.qmp_path, timeout, engine.log()))


@pytest.fixture
def blockd_engine():
    """A real blockd with node ``disk0`` (raw over a 1 MiB file) and a QMP monitor."""
    directory = tempfile.mkdtemp(prefix="bdunit.", dir="/tmp")  # short UNIX socket paths
    disk = os.path.join(directory, "disk.raw")
    with open(disk, "wb") as image:
        image.truncate(1024 * 1024)
    qmp_path = os.path.join(directory, "qmp.sock")
    log_path = os.path.join(directory, "blockd.log")
    env = dict(os.environ, PYTHONPATH=MODULE_UTILS)
    argv = [sys.executable, "-m", "blockd",
            "--blockdev", "driver=file,node-name=file0,filename=%s" % disk,
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--chardev", "socket,path=%s,server=on,wait=off,id=m0" % qmp_path,
            "--monitor", "chardev=m0"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    engine = Engine(proc, directory, qmp_path, log_path)
    try:
        _wait_for_greeting(engine)
        yield engine
    finally:
        engine.stop()
        shutil.rmtree(directory, ignore_errors=True)
