# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""blockd's QMP command schema: data in ``schema.json``, checked with jsonschema.

``schema.json`` (next to this module) is a JSON Schema draft-07 document::

    {"$schema": "http://json-schema.org/draft-07/schema#",
     "definitions": {...},
     "commands": {"<name>": {"args": <schema>, "returns": <schema>, "doc": "...",
                             "features"?: ["deprecated", ...]}},
     "events": {"<NAME>": {"data": <schema>, "doc": "..."}}}

It was generated from QEMU 7.2.0's QAPI files (the qemu-storage-daemon schema)
and checked member by member against qsd 7.2's ``query-qmp-schema``.  The
conventions, which :class:`~.visitor.QapiVisitor` relies on to word errors
like QEMU:

* **Structs** are ``{"type": "object", "properties": {...}, "required": [...],
  "additionalProperties": false}`` with ``properties`` in QAPI member order
  (the order QEMU checks them in).
* **Integers** are ``$ref``\\ s to the definitions ``int``, ``int8`` ..
  ``int64``, ``uint8`` .. ``uint64`` and ``size``; the definition name is
  the QAPI type (it decides the error text and the command-line syntax).
  Like QEMU, ``uint64``/``size`` take any integer in [-2^63, 2^64-1].
* **Enums** are ``{"type": "string", "enum": [...]}`` definitions.
* **Alternates** are ``{"anyOf": [...]}`` definitions; QEMU names the
  definition in type errors (``expected: BlockdevRef``).
* **Flat unions** (``BlockdevOptions``, ``BlockExportOptions``,
  ``SocketAddressLegacy``...) are objects holding the base members (the
  discriminator first) and, per modelled branch, an ``allOf`` entry
  ``{"if": {"properties": {"driver": {"const": "raw"}}, "required": ["driver"]},
  "then": {"$ref": "#/definitions/BlockdevOptions:BlockdevOptionsRaw"}}``.
  The branch definition is a *complete* object: base members, then the branch
  members, ``additionalProperties: false``.  A discriminator value without a
  branch (a known but unmodelled driver) only has its base checked.

  To add a branch, add its complete object definition (and any new types)
  and one ``allOf`` entry; share one branch between several values with
  ``{"enum": [...]}`` instead of ``const``.  ``BlockdevOptions`` models
  file/host_device/host_cdrom, raw, null-co/null-aio, qcow2,
  copy-before-write, snapshot-access and throttle; ``BlockExportOptions``
  models nbd.

Besides the commands, ``definitions`` has the types the command line needs:
``NbdServerOptions`` (``--nbd-server``) and ``MonitorOptions``
(``--monitor``); ``--blockdev`` is ``BlockdevOptions`` and ``--export`` is
``BlockExportOptions``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
from typing import Any, Dict, List, Optional

try:
    import jsonschema
    from jsonschema import validators as _validators
except ImportError as _exc:  # reported by require_jsonschema() / Schema(), not at import time
    jsonschema = None  # type: ignore[assignment]  # pylint: disable=invalid-name
    _validators = None  # type: ignore[assignment]  # pylint: disable=invalid-name
    _JSONSCHEMA_ERROR: Optional[str] = str(_exc)
else:
    _JSONSCHEMA_ERROR = None

from ..errors import CommandNotFound, QMPError
from .visitor import QapiVisitor, VisitError

__all__ = ["Schema", "SCHEMA_PATH", "MissingDependency", "require_jsonschema"]

#: Where the schema document lives (inside the package).
SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.json")


def _is_integer(checker: Any, instance: Any) -> bool:
    # QEMU: 1.0 is a float, never an integer; bool is not an integer either.
    return isinstance(instance, int) and not isinstance(instance, bool)


class MissingDependency(Exception):
    """A Python package blockd needs is not installed (the message says which and how to get it)."""


def require_jsonschema() -> None:
    """Check that jsonschema, blockd's one dependency outside the standard library, imports.

    :raise MissingDependency: naming the package and how to install it.
    """
    if _JSONSCHEMA_ERROR is not None:
        raise MissingDependency(
            "the Python package jsonschema, which blockd needs, is missing for %s (%s); "
            "install it with 'apt-get install python3-jsonschema', "
            "'dnf install python3-jsonschema' or 'pip install jsonschema'"
            % (sys.executable, _JSONSCHEMA_ERROR))


_VALIDATOR: Any = None


def _validator_class() -> Any:
    """jsonschema's Draft 7 validator with QEMU's notion of an integer (made on first use)."""
    global _VALIDATOR  # pylint: disable=global-statement
    if _VALIDATOR is None:
        require_jsonschema()
        _VALIDATOR = _validators.extend(
            _validators.Draft7Validator,
            type_checker=_validators.Draft7Validator.TYPE_CHECKER.redefine("integer", _is_integer),
        )
    return _VALIDATOR


_DEFAULT: Optional["Schema"] = None
_DEFAULT_LOCK = threading.Lock()


class Schema:
    """The QMP command schema, with QEMU-exact argument checking.

    Instances are immutable after construction and safe to share between
    threads; :meth:`default` returns a shared instance.

    :param path: the schema document; defaults to the package's ``schema.json``.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        require_jsonschema()
        with open(path or SCHEMA_PATH, "r", encoding="utf-8") as handle:
            self._doc: Dict[str, Any] = json.load(handle)
        self._defs: Dict[str, Any] = self._doc.get("definitions", {})
        self._commands: Dict[str, Any] = self._doc.get("commands", {})
        self._events: Dict[str, Any] = self._doc.get("events", {})
        self._validators: Dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> "Schema":
        """The shared instance built from the package's ``schema.json``."""
        global _DEFAULT  # pylint: disable=global-statement
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = cls()
            return _DEFAULT

    # --- introspection ---------------------------------------------------------------
    def commands(self) -> List[str]:
        """Names of the commands in the schema, in schema order."""
        return list(self._commands)

    def command(self, name: str) -> Dict[str, Any]:
        """The entry of one command (``args``, ``returns``, ``doc``, ``features``?).

        :raise KeyError: if the schema has no such command.
        """
        return self._commands[name]

    def events(self) -> List[str]:
        """Names of the events in the schema."""
        return list(self._events)

    def event(self, name: str) -> Dict[str, Any]:
        """The entry of one event (``data``, ``doc``).

        :raise KeyError: if the schema has no such event.
        """
        return self._events[name]

    def definitions(self) -> List[str]:
        """Names of the named types."""
        return list(self._defs)

    def definition(self, name: str) -> Dict[str, Any]:
        """One named type's schema (a deep copy, safe to modify).

        :raise KeyError: if there is no such type.
        """
        return copy.deepcopy(self._defs[name])

    # --- validation ------------------------------------------------------------------
    def _node(self, name: str, kind: str) -> Dict[str, Any]:
        if kind == "args":
            if name not in self._commands:
                raise CommandNotFound("The command %s has not been found" % name)
            return self._commands[name]["args"]
        if kind == "returns":
            return self._commands[name]["returns"]
        if kind == "event":
            return self._events[name]["data"]
        if name in self._commands:
            return self._commands[name]["args"]
        if name in self._defs:
            return {"$ref": "#/definitions/" + name}
        raise KeyError(name)

    def _validator(self, name: str, kind: str) -> Any:
        key = kind + ":" + name
        validator = self._validators.get(key)
        if validator is None:
            node = self._node(name, kind)
            doc = {"$schema": self._doc.get("$schema", "http://json-schema.org/draft-07/schema#"),
                   "definitions": self._defs, "allOf": [node]}
            validator = _validator_class()(doc)
            with self._lock:
                self._validators[key] = validator
        return validator

    def _check(self, name: str, kind: str, value: Any) -> None:
        validator = self._validator(name, kind)
        if validator.is_valid(value):
            return
        try:
            QapiVisitor(self._defs).visit(self._node(name, kind), value)
        except VisitError as exc:
            raise QMPError(str(exc)) from None
        # jsonschema and the visitor disagree: should not happen; still refuse.
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        where = ".".join(str(p) for p in error.absolute_path) if error is not None else ""
        raise QMPError("Parameter '%s' is invalid" % (where or "<anonymous>"))

    def validate(self, command_name: str, args: Dict[str, Any]) -> None:
        """Check a command's ``arguments`` exactly as QEMU 7.2 does.

        On failure the message is QEMU's first error in QEMU's visiting order,
        e.g. ``Parameter 'file.filename' is missing``, ``Invalid parameter type
        for 'size', expected: integer``, ``Parameter 'driver' does not accept
        value 'bogus'``, ``Parameter 'bogus' is unexpected``.

        :param command_name: the command.
        :param args: the ``arguments`` object (``{}`` when the client sent none).
        :raise CommandNotFound: if the schema has no such command.
        :raise QMPError: (``GenericError``) if the arguments are invalid.
        """
        self._check(command_name, "args", args)

    def validate_type(self, type_name: str, value: Any) -> None:
        """Like :meth:`validate` for a named type (e.g. ``NbdServerOptions``).

        :raise KeyError: if there is no such type.
        :raise QMPError: if the value is invalid.
        """
        if type_name not in self._defs:
            raise KeyError(type_name)
        self._check(type_name, "type", value)

    def check_returns(self, command_name: str, value: Any) -> None:
        """Check a command's return value against its ``returns`` schema.

        Meant for tests of command handlers.

        :raise KeyError: if the schema has no such command.
        :raise jsonschema.ValidationError: if the value does not match.
        """
        self._validator(command_name, "returns").validate(value)

    def check_event(self, event_name: str, data: Any) -> None:
        """Check an event's ``data`` against the schema (for tests).

        :raise KeyError: if the schema has no such event.
        :raise jsonschema.ValidationError: if the data does not match.
        """
        self._validator(event_name, "event").validate(data)

    def coerce_keyval(self, name: str, tree: Dict[str, Any]) -> Dict[str, Any]:
        """Type and check a command-line option tree like QEMU's keyval visitor.

        ``--blockdev driver=null-co,node-name=n,size=1048576,cache.direct=on``
        arrives here (already split by the command-line parser) as
        ``{"driver": "null-co", "node-name": "n", "size": "1048576",
        "cache": {"direct": "on"}}``; the result is ``{..., "size": 1048576,
        "cache": {"direct": True}}``, ready for the QMP handler.  Integers take
        C syntax (``0x10``, ``010``, `` +5``), ``size`` members take suffixes
        (``1M``, ``1.5G``), booleans are ``on/yes/true/y`` or
        ``off/no/false/n``; unions are resolved by their discriminator.
        Errors are QEMU's keyval wording, e.g. ``Parameter 'size' expects
        integer``, ``Parameter 'read-zeroes' expects 'on' or 'off'``,
        ``Parameters 'filename.*' are unexpected``, ``Parameter
        'bitmaps.0.name' is missing``.

        :param name: a command (``blockdev-add``, ``block-export-add``) or a
            type (``BlockdevOptions``, ``BlockExportOptions``,
            ``NbdServerOptions``, ``MonitorOptions``).
        :param tree: nested dicts (and lists) with string leaves.
        :return: a new tree with typed leaves; it passes :meth:`validate`.
        :raise KeyError: if ``name`` is neither a command nor a type.
        :raise QMPError: if QEMU would reject the option.
        """
        node = self._node(name, "any")
        try:
            value = QapiVisitor(self._defs, keyval=True).visit(node, tree)
        except VisitError as exc:
            raise QMPError(str(exc)) from None
        kind = "args" if name in self._commands else "type"
        self._check(name, kind, value)
        return value
