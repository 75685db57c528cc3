# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""QOM commands: object-add, object-del, qom-get, qom-set, qom-list.

The work is done by :class:`blockd.objects.ObjectTree` (``--object`` uses the
same path through ``object-add``); these handlers only unpack arguments.
"""

from __future__ import annotations

from typing import Any, Dict, List

from ..objects import tree
from . import command


@command("object-add")
def object_add(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """qmp_object_add() -> user_creatable_add_qapi()."""
    props = {k: v for k, v in args.items() if k not in ("qom-type", "id")}
    tree(daemon).add(args["qom-type"], args["id"], props)
    return {}


@command("object-del")
def object_del(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """qmp_object_del() -> user_creatable_del()."""
    tree(daemon).delete(args["id"])
    return {}


@command("qom-get")
def qom_get(daemon: Any, args: Dict[str, Any]) -> Any:
    """qmp_qom_get()."""
    return tree(daemon).resolve(args["path"]).get(args["property"])


@command("qom-set")
def qom_set(daemon: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """qmp_qom_set()."""
    objs = tree(daemon)
    objs.resolve(args["path"]).set(args["property"], args["value"], objs.visit)
    return {}


@command("qom-list")
def qom_list(daemon: Any, args: Dict[str, Any]) -> List[Dict[str, str]]:
    """qmp_qom_list()."""
    return tree(daemon).resolve(args["path"], report_ambiguous=True).prop_list()
