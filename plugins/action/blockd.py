# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of blockdev.fleecing.blockd: carry the collection's own engine to the target.

The blockd engine is the ``blockd`` package in this collection's
``plugins/module_utils``.  This plugin packs it (a reproducible tar.gz:
sorted names, zero mtimes, no bytecode), sends it to the target's temporary
directory and runs the ``blockd`` module with the archive's path, sha256 and
version.  The module installs it under ``install_dir/<version>-<sha>`` only if
that exact copy is not there yet: no pip, no network, no package index.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import gzip
import hashlib
import io
import os
import re
import tarfile
import tempfile

from ansible.plugins.action import ActionBase

_PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "module_utils", "blockd")


def engine_archive():
    """(bytes of the tar.gz, sha256 hex, version) of the collection's blockd package."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for root, dirs, files in os.walk(_PKG):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(files):
                    if name.endswith((".pyc", ".pyo")):
                        continue
                    path = os.path.join(root, name)
                    info = tar.gettarinfo(path, arcname=os.path.join(
                        "blockd", os.path.relpath(path, _PKG)))
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    info.mode = 0o644
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
    data = buf.getvalue()
    with open(os.path.join(_PKG, "__init__.py")) as handle:
        match = re.search(r'^__version__ = "([^"]+)"', handle.read(), re.M)
    return data, hashlib.sha256(data).hexdigest(), match.group(1) if match else "0"


class ActionModule(ActionBase):
    """Send the engine archive when the blockd engine is wanted, then run the module."""

    TRANSFERS_FILES = True

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        args = dict(self._task.args)
        for key in list(args):
            if key.startswith("_engine_"):
                del args[key]   # internal options come from here only
        local = None
        try:
            if (args.get("engine") or "blockd") == "blockd" \
                    and (args.get("state") or "started") in ("started", "restarted"):
                data, digest, version = engine_archive()
                tmpdir = self._connection._shell.tmpdir or self._make_tmp_path()  # pylint: disable=protected-access
                remote = self._connection._shell.join_path(tmpdir, "blockd-engine.tar.gz")  # pylint: disable=protected-access
                fd, local = tempfile.mkstemp(suffix=".tar.gz")
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                self._transfer_file(local, remote)
                self._fixup_perms2((tmpdir, remote))
                args.update(_engine_archive=remote, _engine_sha256=digest, _engine_version=version)
            result.update(self._execute_module(module_name="blockdev.fleecing.blockd",
                                               module_args=args, task_vars=task_vars))
        finally:
            if local:
                os.unlink(local)
            self._remove_tmp_path(self._connection._shell.tmpdir)  # pylint: disable=protected-access
        return result
