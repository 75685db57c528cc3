# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offline stand-in for ansible-test's ``get-pip.py`` bootstrap script.

ansible-test bootstraps pip in every virtual environment it makes by running
``get-pip-<version>.py``, which it downloads from a host this machine cannot
reach, unless the script is cached as ``~/.ansible/test/cache/get_pip_<version>.py``.
tests/integration/test_ansible_test.py (and ``scripts/ansible-test-bootstrap``)
put this file there.

ansible-test runs it as ``__main__`` with pip's install arguments, e.g.
``--disable-pip-version-check pip==24.2 --no-setuptools --no-wheel``.  It:

1. runs ``python -m ensurepip --default-pip`` in a *child* process (in-process,
   ``ensurepip.bootstrap()`` sets ``PIP_CONFIG_FILE=/dev/null``, so the pip
   install below would ignore ``/etc/pip.conf`` and its CA settings);
2. runs ``python -m pip install`` with the same arguments minus
   ``--no-setuptools`` and ``--no-wheel`` (options of get-pip.py, not of pip).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import subprocess
import sys

#: get-pip.py options that ``pip install`` does not know.
GET_PIP_ONLY = ("--no-setuptools", "--no-wheel")


def main(argv):
    """Install pip with ensurepip, then ``pip install ARGV``; the exit status."""
    subprocess.run([sys.executable, "-m", "ensurepip", "--default-pip"], check=True,
                   stdout=subprocess.DEVNULL)
    args = [a for a in argv if a not in GET_PIP_ONLY]
    return subprocess.run([sys.executable, "-m", "pip", "install"] + args, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
