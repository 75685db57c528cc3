# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Render the QMP reference (``docs/qmp.md``) from ``schema.json``.

The schema is the single source: it validates arguments, lists the commands
(``query-commands``) and, through this module, documents them.  Run
``PYTHONPATH=plugins/module_utils python3 -m blockd.qmp.docgen > docs/qmp.md``;
a test fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from .schema import Schema


def _type_name(spec: Dict[str, Any]) -> str:
    """A short type name for a property schema."""
    if "$ref" in spec:
        return spec["$ref"].rsplit("/", 1)[-1].split(":")[-1]
    if "enum" in spec:
        return " \\| ".join("`%s`" % v for v in spec["enum"])
    if "const" in spec:
        return "`%s`" % spec["const"]
    kind = spec.get("type")
    if kind == "array":
        return "array of %s" % _type_name(spec.get("items", {}))
    if isinstance(kind, list):
        return " or ".join(kind)
    if "oneOf" in spec or "anyOf" in spec:
        return " or ".join(_type_name(s) for s in spec.get("oneOf", spec.get("anyOf", [])))
    return kind or "any"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _members(schema: Schema, spec: Dict[str, Any]) -> Optional[List[str]]:
    """Table rows for an object schema (following one $ref), or None."""
    if "$ref" in spec:
        spec = schema.definition(spec["$ref"].rsplit("/", 1)[-1])
    props = spec.get("properties")
    if props is None:
        return None
    required = set(spec.get("required", ()))
    rows = []
    for name, prop in props.items():
        rows.append("| `%s` | %s | %s | %s |" % (
            name, _type_name(prop), "yes" if name in required else "no",
            _cell(prop.get("description", ""))))
    return rows


def render(schema: Optional[Schema] = None, handled: Optional[List[str]] = None) -> str:
    """The whole reference as Markdown.

    :param schema: the schema (default: the packaged one).
    :param handled: commands blockd implements (default: every schema command).
    """
    schema = schema or Schema.default()
    out = ["# QMP reference", "",
           "Generated from `plugins/module_utils/blockd/qmp/schema.json` by "
           "`python3 -m blockd.qmp.docgen`; do not edit by hand.",
           "",
           "Argument shapes, error texts and events are those of qemu-storage-daemon 7.2.",
           "Unions (`driver`, `type`) are documented by their definitions in the schema.", ""]
    out.append("## Commands")
    out.append("")
    for name in schema.commands():
        entry = schema.command(name)
        out.append("### `%s`" % name)
        out.append("")
        if handled is not None and name not in handled:
            out.append("*Not implemented by blockd yet.*")
            out.append("")
        out.append(_cell(entry.get("doc", "")))
        out.append("")
        rows = _members(schema, entry.get("args", {}))
        if rows:
            out += ["| argument | type | required | description |", "|---|---|---|---|"] + rows
        elif entry.get("args", {}).get("$ref"):
            out.append("Arguments: `%s` (see the schema)." % _type_name(entry["args"]))
        else:
            out.append("No arguments.")
        out.append("")
        out.append("Returns: %s." % _type_name(entry.get("returns", {})))
        out.append("")
    out.append("## Events")
    out.append("")
    for name in schema.events():
        entry = schema.event(name)
        out.append("### `%s`" % name)
        out.append("")
        out.append(_cell(entry.get("doc", "")))
        out.append("")
        rows = _members(schema, entry.get("data", {}))
        if rows:
            out += ["| member | type | required | description |", "|---|---|---|---|"] + rows
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    """Print the reference for the commands blockd implements."""
    from ..commands import load_all
    sys.stdout.write(render(handled=list(load_all())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
