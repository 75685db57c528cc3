# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Placeholder for the throttle driver (issue 4); replaced by its implementation."""

from .base import Driver


class ThrottleDriver(Driver):
    """Not implemented yet."""

    format_name = "throttle"
