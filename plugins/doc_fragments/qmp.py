# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options every module that talks to the engine's QMP monitor shares."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name


class ModuleDocFragment:  # pylint: disable=too-few-public-methods
    """C(extends_documentation_fragment: blockdev.fleecing.qmp)."""

    DOCUMENTATION = r"""
options:
  socket:
    description:
      - Path of the engine's QMP monitor socket on the target host.
      - Works with blockd and with a qemu-storage-daemon started with
        C(--chardev socket,path=...,server=on,wait=off,id=m --monitor chardev=m).
      - Set it once for every module of the collection with
        C(module_defaults) and the C(group/blockdev.fleecing.blockd) action group.
    type: path
    default: /run/blockd/qmp.sock
  timeout:
    description:
      - Seconds to wait for the connection and for each QMP reply.
    type: float
    default: 30
notes:
  - The modules speak QMP with the standard library only; the target needs no
    Python package beyond C(python3).
"""

    ATTRIBUTES = r"""
attributes:
  check_mode:
    support: full
    description: Predicts the change from a read-only look at the engine and changes nothing.
  diff_mode:
    support: full
    description: Shows the engine object before and after the task.
  action_group:
    description: Use C(group/blockdev.fleecing.blockd) in C(module_defaults) to set the socket once.
    support: full
    membership:
      - blockdev.fleecing.blockd
"""
