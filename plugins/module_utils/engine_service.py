# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The engine as a service on a target host (used by the ``blockd`` module).

* :func:`install` unpacks the engine archive the action plugin sent into
  ``<install_dir>/<version>-<sha12>`` (atomically: a temporary directory renamed
  into place), or finds that exact copy already there.
* :class:`Service` starts, stops and inspects one engine instance whose files
  live in ``run_dir``: the QMP socket, the NBD socket, the pid file, the log and
  ``engine.json`` (the settings it was started with, so a re-run with the same
  settings changes nothing).  Under systemd it is a unit; elsewhere a detached
  process in its own session, stdio on the log file.

Standard library only.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time

from ansible_collections.blockdev.fleecing.plugins.module_utils.qmp_client import (
    QMPClient, QMPError)

QSD = "qemu-storage-daemon"
UNIT_DIR = "/etc/systemd/system"


class ServiceError(Exception):
    """A failure to report as the task's message."""


def install(archive, sha256, version, install_dir, check_mode=False):
    """Install the engine archive; returns (path of the directory holding ``blockd/``, changed)."""
    dest = os.path.join(install_dir, "%s-%s" % (version, sha256[:12]))
    marker = os.path.join(dest, ".sha256")
    try:
        with open(marker) as handle:
            if handle.read().strip() == sha256:
                return dest, False
    except (IOError, OSError):
        pass
    if check_mode:
        return dest, True
    if not os.path.isdir(install_dir):
        os.makedirs(install_dir, 0o755)
    tmp = dest + ".tmp-%d" % os.getpid()
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, 0o755)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() and not member.isdir() or member.name.startswith(("/", "..")) \
                    or "/../" in member.name:
                raise ServiceError("engine archive holds an unexpected entry %r" % member.name)
        tar.extractall(tmp)  # names checked above
    with open(os.path.join(tmp, ".sha256"), "w") as handle:
        handle.write(sha256 + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest, True


def missing_dependency(python):
    """None if PYTHON can import what blockd needs, else a message naming what is missing."""
    try:
        proc = subprocess.run([python, "-c", "import jsonschema"], capture_output=True,
                              text=True, check=False, timeout=60)
    except OSError as exc:
        return "cannot run the Python interpreter %s for blockd: %s" % (python, exc)
    if proc.returncode != 0:
        return ("blockd needs the Python package jsonschema, which %s cannot import; install "
                "the distribution's package (python3-jsonschema on Debian/Ubuntu/Fedora; the "
                "blockdev.fleecing.blockd role does it) or choose another interpreter with the "
                "python option" % python)
    return None


def systemd_running():
    """True when systemd is the init system (``/run/systemd/system`` exists)."""
    return os.path.isdir("/run/systemd/system")


class Service:
    """One engine instance.

    :param settings: dict with ``engine``, ``install_path``, ``python``, ``socket``,
        ``nbd_socket``, ``log_file``, ``args``, ``run_dir``, ``unit``.
    :param manager: ``systemd`` or ``daemon``.
    """

    def __init__(self, settings, manager, timeout=30.0):
        self.settings = settings
        self.manager = manager
        self.timeout = timeout
        self.run_dir = settings["run_dir"]
        self.pidfile = os.path.join(self.run_dir, "engine.pid")
        self.statefile = os.path.join(self.run_dir, "engine.json")
        self.unit = settings.get("unit") or "blockd"

    # -- what runs ----------------------------------------------------------------------------
    def argv(self):
        """The engine's command line."""
        s = self.settings
        if s["engine"] == "blockd":
            argv = [s["python"], "-m", "blockd"]
        else:
            argv = [shutil.which(QSD) or QSD]
        argv += ["--chardev", "socket,path=%s,server=on,wait=off,id=blockd-qmp" % s["socket"],
                 "--monitor", "chardev=blockd-qmp"]
        if s.get("nbd_socket"):
            argv += ["--nbd-server", "addr.type=unix,addr.path=%s" % s["nbd_socket"]]
        if self.manager == "daemon":
            argv += ["--pidfile", self.pidfile]
        return argv + list(s.get("args") or [])

    def env(self):
        """Extra environment of the engine process."""
        if self.settings["engine"] == "blockd":
            return {"PYTHONPATH": self.settings["install_path"], "PYTHONDONTWRITEBYTECODE": "1"}
        return {}

    def saved(self):
        """The settings the running instance was started with (or None)."""
        try:
            with open(self.statefile) as handle:
                return json.load(handle)
        except (IOError, OSError, ValueError):
            return None

    def pid(self):
        """The pid of the live engine, or None."""
        if self.manager == "systemd":
            out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", self.unit],
                                 capture_output=True, text=True, check=False).stdout.strip()
            return int(out) if out.isdigit() and int(out) > 0 else None
        try:
            with open(self.pidfile) as handle:
                pid = int(handle.read().strip() or 0)
        except (IOError, OSError, ValueError):
            return None
        if pid <= 0 or not os.path.exists("/proc/%d" % pid):
            return None
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                cmdline = handle.read().split(b"\0")
        except (IOError, OSError):
            return None
        # only our engine: the pid file could be stale and the number reused
        wanted = b"blockd" if self.settings["engine"] == "blockd" else QSD.encode()
        return pid if any(wanted in part for part in cmdline) else None

    def query_version(self):
        """``query-version`` of the live engine (waits for its monitor)."""
        deadline = time.time() + self.timeout
        last = None
        while time.time() < deadline:
            try:
                with QMPClient(self.settings["socket"], min(5.0, self.timeout)) as qmp:
                    return qmp.execute("query-version")
            except QMPError as exc:
                last = exc
                if self.manager == "daemon" and self.pid() is None and self._exited():
                    break
                time.sleep(0.1)
        raise ServiceError("the engine did not answer on %s: %s%s"
                           % (self.settings["socket"], last, self._log_tail()))

    # -- start / stop ---------------------------------------------------------------------------
    def start(self):
        """Start the engine and wait until its QMP monitor answers; returns query-version."""
        if not os.path.isdir(self.run_dir):
            os.makedirs(self.run_dir, 0o750)
        for path in (self.settings["socket"], self.settings.get("nbd_socket")):
            if path and os.path.exists(path):
                os.unlink(path)   # stale socket of a dead instance
        if self.manager == "systemd":
            self._write_unit()
            self._systemctl("daemon-reload")
            self._systemctl("restart", self.unit)
        else:
            self._spawn()
        version = self.query_version()
        self.protect_sockets()
        with open(self.statefile, "w") as handle:
            json.dump(self.settings, handle, sort_keys=True)
        return version

    def protect_sockets(self):
        """Sockets 0600, or 0660 with group ``socket_group`` (and the run dir 0750 in it).

        The engine creates them under umask 077 already; this sets the operator's group.
        Whoever can open the QMP socket controls the engine, and the NBD socket gives the
        disks' data.
        """
        group = self.settings.get("socket_group")
        gid = -1
        if group:
            import grp  # pylint: disable=import-outside-toplevel
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ServiceError("socket_group: no group '%s' on this host" % group)
            os.chown(self.run_dir, -1, gid)
            os.chmod(self.run_dir, 0o750)
        for path in (self.settings["socket"], self.settings.get("nbd_socket")):
            if path and os.path.exists(path):
                if group:
                    os.chown(path, -1, gid)
                os.chmod(path, 0o660 if group else 0o600)

    def _spawn(self):
        env = dict(os.environ)
        env.update(self.env())
        log = os.open(self.settings["log_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            self._proc = subprocess.Popen(  # pylint: disable=consider-using-with
                self.argv(), cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                close_fds=True, start_new_session=True, umask=0o077)
        except OSError as exc:
            raise ServiceError("cannot run %s: %s" % (self.argv()[0], exc))
        finally:
            os.close(log)

    def _exited(self):
        proc = getattr(self, "_proc", None)
        return proc is not None and proc.poll() is not None

    def stop(self):
        """Stop the engine: QMP ``quit``, then SIGTERM, then SIGKILL; returns True if one ran."""
        if self.manager == "systemd":
            was = self.pid() is not None
            self._systemctl("stop", self.unit)
            return was
        pid = self.pid()
        if pid is None:
            return False
        try:
            with QMPClient(self.settings["socket"], 5.0) as qmp:
                qmp.execute("quit")
        except QMPError:
            pass
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                try:
                    os.kill(pid, sig)
                except OSError:
                    break
            deadline = time.time() + (self.timeout if sig is None else 5.0)
            while time.time() < deadline and os.path.exists("/proc/%d" % pid) \
                    and not _zombie(pid):
                time.sleep(0.05)
            if not os.path.exists("/proc/%d" % pid) or _zombie(pid):
                break
        return True

    def remove_files(self):
        """Forget this instance: state, pid file, sockets (the log stays)."""
        for path in (self.statefile, self.pidfile, self.settings["socket"],
                     self.settings.get("nbd_socket")):
            if path and os.path.lexists(path):
                os.unlink(path)
        if self.manager == "systemd":
            unit = os.path.join(UNIT_DIR, self.unit + ".service")
            if os.path.exists(unit):
                self._systemctl("disable", self.unit)
                os.unlink(unit)
                self._systemctl("daemon-reload")

    # -- helpers ------------------------------------------------------------------------------
    def _write_unit(self):
        env = " ".join("%s=%s" % kv for kv in sorted(self.env().items()))
        text = ("[Unit]\nDescription=blockdev.fleecing engine (%s)\nAfter=local-fs.target\n\n"
                "[Service]\nType=simple\nUMask=0077\n%sExecStart=%s\nRestart=on-failure\n"
                "StandardOutput=append:%s\nStandardError=append:%s\nRuntimeDirectoryPreserve=yes\n\n"
                "[Install]\nWantedBy=multi-user.target\n"
                % (self.settings["engine"], ("Environment=%s\n" % env) if env else "",
                   " ".join(shlex.quote(a) for a in self.argv()),
                   self.settings["log_file"], self.settings["log_file"]))
        with open(os.path.join(UNIT_DIR, self.unit + ".service"), "w") as handle:
            handle.write(text)

    def _systemctl(self, *args):
        proc = subprocess.run(["systemctl"] + list(args), capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise ServiceError("systemctl %s failed: %s" % (" ".join(args), proc.stderr.strip()))

    def _log_tail(self, lines=20):
        try:
            with open(self.settings["log_file"], errors="replace") as handle:
                tail = handle.read().splitlines()[-lines:]
        except (IOError, OSError):
            return ""
        return ("\nengine log %s:\n%s" % (self.settings["log_file"], "\n".join(tail))) if tail else ""


def _zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (IOError, OSError, IndexError):
        return False
