# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""blockd on a host without jsonschema: one clear message, no traceback, exit status 1."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import os
import subprocess
import sys

#: plugins/module_utils of the collection (where the blockd package lives).
MODULE_UTILS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "..",
                                            "plugins", "module_utils"))

# Run ``python -m blockd`` with the jsonschema import made to fail, as on a
# host where the package is not installed.
WITHOUT_JSONSCHEMA = (
    "import runpy, sys\n"
    "sys.modules['jsonschema'] = None\n"
    "sys.argv = ['blockd', '--blockdev', 'driver=null-co,node-name=n0']\n"
    "runpy.run_module('blockd', run_name='__main__', alter_sys=True)\n")


def test_blockd_without_jsonschema_says_what_to_install():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_JSONSCHEMA], capture_output=True,
                          text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHONPATH=MODULE_UTILS))
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert proc.stderr.startswith(
        "blockd: the Python package jsonschema, which blockd needs, is missing for %s ("
        % sys.executable), proc.stderr
    assert proc.stderr.endswith(
        "install it with 'apt-get install python3-jsonschema', "
        "'dnf install python3-jsonschema' or 'pip install jsonschema'\n"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_blockd_modules_import_without_jsonschema():
    """The collection's modules import blockd's packages on hosts without jsonschema."""
    code = ("import sys\nsys.modules['jsonschema'] = None\n"
            "import blockd.qmp, blockd.cli, blockd.__main__\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, env=dict(os.environ, PYTHONPATH=MODULE_UTILS))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")
