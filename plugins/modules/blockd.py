#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module blockdev.fleecing.blockd."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

DOCUMENTATION = r"""
module: blockd
short_description: Install, start and stop the block engine on a target host
version_added: 0.1.0
description:
  - Runs the engine that the other modules of this collection drive over QMP,
    V(blockd) (the collection's own engine) or a real C(qemu-storage-daemon).
  - For V(blockd) the engine is copied from this collection (no pip, no network)
    into O(install_dir)/C(<version>-<sha>); an identical copy is reused.
  - Under systemd the engine runs as a unit; elsewhere as a detached process in
    its own session, its output appended to O(log_file).
  - Re-running with the same settings while the engine runs changes nothing;
    changed settings restart it (which ends its nodes, jobs and exports).
extends_documentation_fragment:
  - blockdev.fleecing.qmp
  - blockdev.fleecing.qmp.attributes
attributes:
  check_mode:
    support: full
    description: Reports whether the engine would be installed, started, restarted or stopped.
  diff_mode:
    support: full
    description: Shows the engine settings and state before and after.
options:
  state:
    description:
      - V(started) installs (for V(blockd)) and starts the engine if it is not running with these settings.
      - V(restarted) always restarts it. V(stopped) stops it (QMP C(quit), then signals).
      - V(absent) stops it and removes its run files, systemd unit and installed copies.
    type: str
    choices: [started, stopped, restarted, absent]
    default: started
  engine:
    description: Which engine to run.
    type: str
    choices: [blockd, qemu-storage-daemon]
    default: blockd
  install_dir:
    description: Where copies of blockd are installed, one directory per version and content hash.
    type: path
    default: /opt/blockd
  run_dir:
    description: Directory of the pid file, the settings file and, by default, the sockets and log.
    type: path
    default: /run/blockd
  nbd_socket:
    description:
      - UNIX socket of the NBD server started with the engine. Empty for no NBD server.
      - Default C(<run_dir>/nbd.sock).
    type: path
  log_file:
    description: The engine's log. Default C(<run_dir>/engine.log).
    type: path
  socket_group:
    description:
      - Group that may use the engine's QMP and NBD sockets. They are made mode 0660 in
        this group, and O(run_dir) 0750 in it.
      - By default the sockets are mode 0600 (the engine runs with umask 077), so only
        the user the engine runs as (root) can open them.
    type: str
  service_manager:
    description: V(auto) uses systemd when it is the init system, else a detached daemon.
    type: str
    choices: [auto, systemd, daemon]
    default: auto
  unit:
    description: Name of the systemd unit (without C(.service)).
    type: str
    default: blockd
  args:
    description: More engine command line arguments, in C(qemu-storage-daemon) syntax.
    type: list
    elements: str
    default: []
  python:
    description: Python interpreter that runs blockd. Default the one running this module.
    type: path
  _engine_archive:
    description:
      - Internal, set by the action plugin (the engine archive it sent); values given in a
        task are dropped.
    type: path
  _engine_sha256:
    description: Internal, set by the action plugin (the archive's sha256).
    type: str
  _engine_version:
    description: Internal, set by the action plugin (blockd's version).
    type: str
notes:
  - The O(socket) option (QMP monitor) defaults to C(/run/blockd/qmp.sock), inside the default O(run_dir).
  - The QMP socket is created by the engine, mode 0600 (see O(socket_group)); keep O(run_dir)
    mode 0750 or stricter (the module creates it so) because whoever can open the socket
    controls the engine.
author:
  - blockdev.fleecing contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Run blockd, with an NBD server on a unix socket
  blockdev.fleecing.blockd:
    state: started
  register: engine

- name: The same workflow on a real qemu-storage-daemon
  blockdev.fleecing.blockd:
    engine: qemu-storage-daemon
    run_dir: /run/qsd
    socket: /run/qsd/qmp.sock

- name: Open a disk at start-up
  blockdev.fleecing.blockd:
    args: ["--blockdev", "driver=file,node-name=disk0,filename=/var/lib/images/vm1.raw"]

- name: Remove the engine
  blockdev.fleecing.blockd:
    state: absent
"""

RETURN = r"""
engine:
  description: The engine that runs.
  returned: always
  type: str
  sample: blockd
version:
  description: The engine's C(query-version) (C(qemu) major/minor/micro, C(package)).
  returned: when the engine runs
  type: dict
pid:
  description: Process id of the engine.
  returned: when the engine runs
  type: int
socket:
  description: The QMP monitor socket.
  returned: always
  type: str
nbd_socket:
  description: The NBD server socket (empty when none).
  returned: always
  type: str
log_file:
  description: The engine's log file.
  returned: always
  type: str
install_path:
  description: Directory whose C(blockd) package is the engine (PYTHONPATH).
  returned: when O(engine=blockd) and the engine is started
  type: str
service_manager:
  description: V(systemd) or V(daemon).
  returned: always
  type: str
"""

import os
import sys

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import BlockdModule
from ansible_collections.blockdev.fleecing.plugins.module_utils.engine_service import (
    Service, ServiceError, install, missing_dependency, systemd_running)


def _settings(mod, install_path):
    p = mod.params
    run_dir = p["run_dir"]
    nbd = p["nbd_socket"] if p["nbd_socket"] is not None else os.path.join(run_dir, "nbd.sock")
    return dict(engine=p["engine"], install_path=install_path if p["engine"] == "blockd" else "",
                python=p["python"] or sys.executable, socket=p["socket"], nbd_socket=nbd,
                log_file=p["log_file"] or os.path.join(run_dir, "engine.log"),
                args=list(p["args"]), run_dir=run_dir, unit=p["unit"],
                socket_group=p["socket_group"] or "")


def main():
    """Entry point."""
    mod = BlockdModule(dict(
        state=dict(type="str", default="started",
                   choices=["started", "stopped", "restarted", "absent"]),
        engine=dict(type="str", default="blockd", choices=["blockd", "qemu-storage-daemon"]),
        install_dir=dict(type="path", default="/opt/blockd"),
        run_dir=dict(type="path", default="/run/blockd"),
        nbd_socket=dict(type="path"),
        log_file=dict(type="path"),
        socket_group=dict(type="str"),
        service_manager=dict(type="str", default="auto", choices=["auto", "systemd", "daemon"]),
        unit=dict(type="str", default="blockd"),
        args=dict(type="list", elements="str", default=[]),
        python=dict(type="path"),
        _engine_archive=dict(type="path"),
        _engine_sha256=dict(type="str"),
        _engine_version=dict(type="str"),
    ))
    p, check = mod.params, mod.check_mode
    if p["socket_group"]:
        import grp  # pylint: disable=import-outside-toplevel
        try:
            grp.getgrnam(p["socket_group"])
        except KeyError:
            mod.fail("socket_group: no group '%s' on this host" % p["socket_group"])
    state = p["state"]
    manager = p["service_manager"]
    if manager == "auto":
        manager = "systemd" if systemd_running() else "daemon"
    install_path = ""
    try:
        if p["engine"] == "blockd" and state in ("started", "restarted"):
            if not p["_engine_archive"]:
                mod.fail("the blockd engine archive is missing: run this module through its action "
                         "plugin (blockdev.fleecing.blockd), not as a bare module")
            install_path, installed = install(p["_engine_archive"], p["_engine_sha256"],
                                              p["_engine_version"], p["install_dir"], check)
            mod.result["changed"] = installed
        settings = _settings(mod, install_path)
        if p["engine"] == "blockd" and state in ("started", "restarted"):
            problem = missing_dependency(settings["python"])
            if problem:
                mod.fail(problem)
        svc = Service(settings, manager, p["timeout"])
        saved = svc.saved()
        pid = svc.pid()
        before = dict(saved or {}, running=pid is not None) if saved or pid else None
        running_as_wanted = pid is not None and saved == settings
        if state == "started" and not running_as_wanted or state == "restarted":
            mod.result["changed"] = True
            if not check:
                if pid is not None:
                    svc.stop()
                mod.result["version"] = svc.start()
                pid = svc.pid()
        elif state == "started" and not check:
            mod.result["version"] = svc.query_version()
        elif state in ("stopped", "absent"):
            if pid is not None:
                mod.result["changed"] = True
                if not check:
                    svc.stop()
                pid = None
            if state == "absent":
                leftovers = [x for x in (svc.statefile, svc.pidfile) if os.path.exists(x)]
                copies = _blockd_copies(p["install_dir"])
                if leftovers or copies:
                    mod.result["changed"] = True
                if not check:
                    svc.remove_files()
                    for path in copies:
                        _rmtree(path)
    except ServiceError as exc:
        mod.fail(str(exc))
    after = None if state == "absent" else dict(settings, running=state not in ("stopped",))
    extra = dict(engine=p["engine"], socket=settings["socket"], nbd_socket=settings["nbd_socket"],
                 log_file=settings["log_file"], service_manager=manager)
    if pid is not None and state not in ("stopped", "absent"):
        extra["pid"] = pid
    if install_path:
        extra["install_path"] = install_path
    mod.exit(before, after, **extra)


def _blockd_copies(install_dir):
    """Installed engine copies (directories with our .sha256 marker)."""
    if not os.path.isdir(install_dir):
        return []
    return [os.path.join(install_dir, d) for d in sorted(os.listdir(install_dir))
            if os.path.exists(os.path.join(install_dir, d, ".sha256"))]


def _rmtree(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
