# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Monitor control commands: query-version, query-commands, quit."""

from __future__ import annotations

from typing import Any, Dict, List

from ..errors import CommandNotFound
from . import command


@command("qmp_capabilities")
def qmp_capabilities(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Only reached after negotiation: the monitor answers it during negotiation."""
    raise CommandNotFound("Capabilities negotiation is already complete, command ignored")


@command("query-version")
def query_version(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """The version blockd presents (QEMU's VersionInfo)."""
    return daemon.version_info()


@command("query-commands")
def query_commands(daemon: Any, args: Dict[str, Any]) -> List[Dict[str, str]]:
    """Every command the schema and the handler table both have."""
    return [{"name": name} for name in daemon.command_names()]


@command("quit")
def quit_(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """Stop the daemon; exports go first, each with BLOCK_EXPORT_DELETED, then every
    job is cancelled and waited for (its JOB_STATUS_CHANGE events), as qsd does
    before its reply goes out."""
    from ..jobs.job import cancel_all_sync
    from .exports import delete_export
    for export in list(daemon.exports.values()):
        delete_export(daemon, export, hard=True)
    cancel_all_sync(daemon)
    daemon.defer(daemon.request_shutdown)
    return {}
