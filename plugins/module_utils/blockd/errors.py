# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Errors that become QMP error replies.

A command handler raises :class:`QMPError` (or a subclass) carrying QEMU's error
class and text; the dispatcher turns it into ``{"error": {"class", "desc"}}``.
Nothing else about the failure reaches the client.
"""

from __future__ import annotations


class QMPError(Exception):
    """A failure reported to the QMP client.

    :param desc: the human-readable text, worded as QEMU words it.
    :param error_class: one of QEMU's ``QapiErrorClass`` values.
    """

    error_class = "GenericError"

    def __init__(self, desc: str, error_class: "str | None" = None) -> None:
        super().__init__(desc)
        self.desc = desc
        if error_class is not None:
            self.error_class = error_class

    def to_qmp(self) -> dict:
        """The ``error`` member of a QMP reply."""
        return {"class": self.error_class, "desc": self.desc}


class CommandNotFound(QMPError):
    """Unknown command, or a command not allowed in the current monitor state."""

    error_class = "CommandNotFound"


class DeviceNotActive(QMPError):
    """Used by ``block-job-*`` for unknown jobs."""

    error_class = "DeviceNotActive"


class DeviceNotFound(QMPError):
    """Used for BlockBackend/device lookups."""

    error_class = "DeviceNotFound"
