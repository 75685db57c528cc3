# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""QEMU's QObject input visitor, replayed over blockd's JSON Schema.

QEMU checks QMP arguments with generated C code that walks the QAPI schema
(``qapi/qobject-input-visitor.c``, ``qapi/qapi-visit-core.c``).  The *first*
problem it meets is reported, so which message a client gets depends on the
walk order:

* members are visited in schema order: for a flat union the base members
  (discriminator first), then the branch members;
* a struct's unexpected members are only looked for after all its members
  were visited (``visit_check_struct``), and the one reported is the first
  left in a GLib ``GHashTable`` -- an order :class:`GHashSet` replays;
* names are "full" (``file.cache.direct``, ``bitmaps[1].name``, or
  ``bitmaps.1.name`` on the command line) in the "missing", "invalid type" and
  "unexpected" errors, but *local* in the enum, range and alternate errors
  (``Parameter 'driver' does not accept value 'x'`` even for ``file.driver``;
  ``null`` for a list element).

:class:`QapiVisitor` interprets the JSON Schema in ``schema.json`` (see
:mod:`.schema` for the conventions it relies on) and raises
:class:`VisitError` with QEMU's text at the first problem.  With
``keyval=True`` it is the keyval flavour used for command-line options
(``--blockdev driver=raw,file.driver=file,...``): leaves are strings that are
converted (integers in C syntax, ``size`` with suffixes, ``on``/``off``...), and
the converted tree is returned.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from .qjson import qdict_order, qemu_key_bytes

__all__ = ["VisitError", "QapiVisitor", "GHashSet", "INT_TYPES",
           "strtoi64", "strtou64", "strtosz"]

#: QAPI integer types: (min, max) a QMP (JSON) value may have, and the C type
#: name QEMU shows in range errors (None when the only check is the type one).
INT_TYPES: Dict[str, Tuple[int, int, Optional[str]]] = {
    "int": (-2**63, 2**63 - 1, None),
    "int64": (-2**63, 2**63 - 1, None),
    "int8": (-2**7, 2**7 - 1, "int8_t"),
    "int16": (-2**15, 2**15 - 1, "int16_t"),
    "int32": (-2**31, 2**31 - 1, "int32_t"),
    "uint8": (0, 2**8 - 1, "uint8_t"),
    "uint16": (0, 2**16 - 1, "uint16_t"),
    "uint32": (0, 2**32 - 1, "uint32_t"),
    "uint64": (0, 2**64 - 1, None),
    "size": (0, 2**64 - 1, None),
}
_UNSIGNED = {"uint8", "uint16", "uint32", "uint64", "size"}


class VisitError(Exception):
    """The first argument problem, worded as QEMU words it (``str(e)``)."""


# --- GLib GHashTable (2.74) replay -----------------------------------------------------
_PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
              65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213,
              33554393, 67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647]
_M32 = 0xFFFFFFFF


def g_str_hash(key: str) -> int:
    """GLib's ``g_str_hash()`` (djb2 over *signed* chars)."""
    h = 5381
    for c in qemu_key_bytes(key):
        h = (h * 33 + (c - 256 if c >= 128 else c)) & _M32
    return h


class GHashSet:
    """The key layout of a GLib ``GHashTable`` created with ``g_str_hash``.

    Only insertion, removal and "first key in iteration order" are modelled,
    which is all ``qobject_input_check_struct()`` needs.
    """

    def __init__(self) -> None:
        self._set_shift(3)
        self.hashes = [0] * self.size
        self.keys: List[Optional[str]] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _lookup(self, key: str, h: int) -> int:
        idx = ((h * 11) & _M32) % self.mod
        step = 0
        tomb = -1
        while self.hashes[idx] != 0:
            if self.hashes[idx] == h and self.keys[idx] == key:
                return idx
            if self.hashes[idx] == 1 and tomb < 0:
                tomb = idx
            step += 1
            idx = (idx + step) & self.mask
        return tomb if tomb >= 0 else idx

    @staticmethod
    def _hash(key: str) -> int:
        h = g_str_hash(key)
        return 2 if h < 2 else h

    def insert(self, key: str) -> None:
        """``g_hash_table_insert()`` of a key not yet present."""
        h = self._hash(key)
        idx = self._lookup(key, h)
        old = self.hashes[idx]
        if old >= 2:
            return
        self.hashes[idx] = h
        self.keys[idx] = key
        self.nnodes += 1
        if old == 0:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        """``g_hash_table_remove()``."""
        idx = self._lookup(key, self._hash(key))
        if self.hashes[idx] < 2:
            return
        self.hashes[idx] = 1
        self.keys[idx] = None
        self.nnodes -= 1
        self._maybe_resize()

    def first(self) -> Optional[str]:
        """The key ``g_hash_table_iter_next()`` returns first, or None if empty."""
        for idx, h in enumerate(self.hashes):
            if h >= 2:
                return self.keys[idx]
        return None

    def _maybe_resize(self) -> None:
        noc = self.noccupied
        if (self.size > self.nnodes * 4 and self.size > 8) or self.size <= noc + noc // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        n = int(self.nnodes * 1.333)
        shift = 0
        while n:
            shift += 1
            n >>= 1
        self._set_shift(max(shift, 3))
        if self.size > old_size:
            self.hashes.extend([0] * (self.size - old_size))
            self.keys.extend([None] * (self.size - old_size))
            done = [False] * self.size
        else:
            done = [False] * old_size
        hashes, keys = self.hashes, self.keys
        for i in range(old_size):
            node_hash = hashes[i]
            if node_hash < 2:
                hashes[i] = 0
                continue
            if done[i]:
                continue
            hashes[i] = 0
            key = keys[i]
            keys[i] = None
            while True:
                step = 0
                hv = ((node_hash * 11) & _M32) % self.mod
                while done[hv]:
                    step += 1
                    hv = (hv + step) & self.mask
                done[hv] = True
                replaced = hashes[hv]
                hashes[hv] = node_hash
                if replaced < 2:
                    keys[hv] = key
                    break
                node_hash = replaced
                key, keys[hv] = keys[hv], key
        if self.size < old_size:
            del hashes[self.size:]
            del keys[self.size:]
        self.noccupied = self.nnodes


# --- C number parsing as QEMU's keyval visitor does it ----------------------------------
_C_INT = re.compile(r"[ \t\n\v\f\r]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))")
_C_DEC = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")
_C_HEX = re.compile(r"[ \t\n\v\f\r]*([+-]?)(?:0[xX])?([0-9a-fA-F]+)")
_C_FLOAT = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                      r"|0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)"
                      r"(?:[pP][+-]?[0-9]+)?|inf(?:inity)?|nan(?:\([0-9A-Za-z_]*\))?)",
                      re.IGNORECASE)


def _strtox(text: str) -> Optional[Tuple[bool, int]]:
    """``strtoll``/``strtoull`` with base 0 over the whole string: (negative, magnitude)."""
    m = _C_INT.match(text)
    if m is None or m.end() != len(text):
        return None
    if m.group(2) is not None:
        mag = int(m.group(2), 16)
    elif m.group(3) is not None:
        mag = int(m.group(3), 8)
    else:
        mag = int(m.group(4))
    return m.group(1) == "-", mag


def strtoi64(text: str) -> Optional[int]:
    """``qemu_strtoi64(text, NULL, 0)``: the value, or None on error."""
    r = _strtox(text)
    if r is None:
        return None
    value = -r[1] if r[0] else r[1]
    return value if -2**63 <= value < 2**63 else None


def strtou64(text: str) -> Optional[int]:
    """``qemu_strtou64(text, NULL, 0)`` (``-1`` wraps to 2^64-1 as in C)."""
    r = _strtox(text)
    if r is None or r[1] >= 2**64:
        return None
    return (-r[1]) % 2**64 if r[0] else r[1]


def _strtod(text: str, pos: int) -> Optional[Tuple[float, int]]:
    m = _C_FLOAT.match(text, pos)
    if m is None:
        return None
    s = m.group(0).strip(" \t\n\v\f\r")
    try:
        if "x" in s.lower() and "n" not in s.lower():
            return float.fromhex(s), m.end()
        return float(s), m.end()
    except (ValueError, OverflowError):
        return None


def strtod_finite(text: str) -> Optional[float]:
    """``qemu_strtod_finite(text, NULL, ...)``: a finite double over the whole string."""
    r = _strtod(text, 0)
    if r is None or r[1] != len(text) or r[0] != r[0] or r[0] in (float("inf"), float("-inf")):
        return None
    return r[0]


_SUFFIX = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


def strtosz(text: str) -> Optional[int]:
    """``qemu_strtosz(text, NULL, ...)`` (``util/cutils.c`` ``do_strtosz``).

    Decimal or hex bytes, optional fraction, optional suffix B/K/M/G/T/P/E
    (case-insensitive, powers of 1024).

    :return: the byte count, or None if QEMU rejects the text.
    """
    m = _C_DEC.match(text)
    if m is None or "-" in m.group(0):
        return None
    val = int(m.group(2))
    if val >= 2**64:
        return None
    end = m.end()
    valf = 0
    if val == 0 and text[end:end + 1] in ("x", "X"):
        m = _C_HEX.match(text)
        if m is None or "-" in m.group(0):  # pragma: no cover - matched above
            return None
        val = int(m.group(2), 16)
        if val >= 2**64:
            return None
        end = m.end()
        if text[end:end + 1] == ".":
            return None
    elif text[end:end + 1] == ".":
        r = _strtod(text, end)
        if r is None or r[0] != r[0] or r[0] in (float("inf"), float("-inf")):
            end += 1
        else:
            if "e" in text[end:r[1]].lower():
                return None
            end = r[1]
            valf = int(r[0] * 2**64) if r[0] < 1 else 2**64 - 1
    c = text[end:end + 1].upper()
    if c and c in _SUFFIX:
        mul = 1024 ** _SUFFIX[c]
        end += 1
    else:
        mul = 1
    if mul == 1:
        if valf:
            return None
        result = val
    else:
        frac = valf * mul
        result = val * mul + (frac >> 64) + ((frac & (2**64 - 1)) >> 63)
        if result >= 2**64:
            return None
    if end != len(text):
        return None
    return result


def qapi_bool_parse(text: str) -> Optional[bool]:
    """``qapi_bool_parse()``: on/yes/true/y and off/no/false/n, case-sensitive."""
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    return None


# --- the visitor -----------------------------------------------------------------------
_MISSING = object()


class _Frame:
    __slots__ = ("name", "obj", "is_dict", "index", "ghash")

    def __init__(self, name: Optional[str], obj: Any) -> None:
        self.name = name
        self.obj = obj
        self.is_dict = isinstance(obj, dict)
        self.index = -1
        self.ghash: Optional[GHashSet] = None
        if self.is_dict:
            self.ghash = GHashSet()
            for key in qdict_order(obj):
                self.ghash.insert(key)


class QapiVisitor:
    """Walk a value against a schema node like QEMU's generated visitors.

    :param definitions: the ``definitions`` of ``schema.json``.
    :param keyval: command-line (keyval) flavour: string leaves are converted.
    """

    def __init__(self, definitions: Dict[str, Any], keyval: bool = False) -> None:
        self.defs = definitions
        self.keyval = keyval
        self.stack: List[_Frame] = []
        self.root: Any = None

    # -- entry point ----------------------------------------------------------------
    def visit(self, node: Dict[str, Any], value: Any) -> Any:
        """Visit ``value`` (the arguments object) as the root struct.

        :param node: a JSON Schema node (usually an object or a ``$ref`` to one).
        :param value: the value to check.
        :return: the value with keyval strings converted (a fresh tree).
        :raise VisitError: at the first problem.
        """
        self.stack = []
        self.root = value
        return self.visit_type(node, None)

    # -- helpers ----------------------------------------------------------------------
    def resolve(self, node: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[str]]:
        """Follow ``$ref`` chains; return the target and the last definition name."""
        name = None
        while "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            node = self.defs[name]
        return node, name

    def full_name(self, name: Optional[str]) -> str:
        """``full_name()`` of qobject-input-visitor.c."""
        errname = ""
        for frame in reversed(self.stack):
            if frame.is_dict:
                errname = "." + (name if name is not None else "<anonymous>") + errname
            else:
                errname = ((".%d" if self.keyval else "[%d]") % (frame.index % 2**32)) + errname
            name = frame.name
        if name is not None:
            return name + errname
        if errname.startswith("."):
            return errname[1:]
        return errname or "<anonymous>"

    def get_object(self, name: Optional[str], consume: bool, required: bool = True) -> Any:
        """``qobject_input_get_object()``: fetch (and maybe consume) a member/element."""
        if not self.stack:
            return self.root
        top = self.stack[-1]
        if top.is_dict:
            ret = top.obj.get(name, _MISSING)
            if consume and ret is not _MISSING and top.ghash is not None:
                top.ghash.remove(name)  # type: ignore[arg-type]
        else:
            pos = top.index + 1
            ret = top.obj[pos] if pos < len(top.obj) else _MISSING
            if consume:
                top.index += 1
        if ret is _MISSING and required:
            raise VisitError("Parameter '%s' is missing" % self.full_name(name))
        return ret

    def _type_error(self, name: Optional[str], expected: str) -> VisitError:
        return VisitError("Invalid parameter type for '%s', expected: %s"
                          % (self.full_name(name), expected))

    def _keyval_str(self, name: Optional[str]) -> str:
        obj = self.get_object(name, True)
        if isinstance(obj, (dict, list)):
            raise VisitError("Parameters '%s.*' are unexpected" % self.full_name(name))
        if not isinstance(obj, str):
            raise VisitError("Internal error: parameter %s invalid" % self.full_name(name))
        return obj

    # -- scalars -----------------------------------------------------------------------
    def visit_int(self, qtype: str, name: Optional[str]) -> int:
        lo, hi, ctype = INT_TYPES[qtype]
        unsigned = qtype in _UNSIGNED
        if self.keyval:
            text = self._keyval_str(name)
            if qtype == "size":
                value = strtosz(text)
                if value is None:
                    raise VisitError("Parameter '%s' expects size" % self.full_name(name))
            else:
                value = strtou64(text) if unsigned else strtoi64(text)
                if value is None:
                    raise VisitError("Parameter '%s' expects integer" % self.full_name(name))
        else:
            obj = self.get_object(name, True)
            ok = isinstance(obj, int) and not isinstance(obj, bool)
            if unsigned:
                if not ok or not -2**63 <= obj < 2**64:
                    raise VisitError("Parameter '%s' expects uint64" % self.full_name(name))
                value = obj % 2**64
            else:
                if not ok or not -2**63 <= obj < 2**63:
                    raise self._type_error(name, "integer")
                value = obj
        if ctype is not None and not lo <= value <= hi:
            raise VisitError("Parameter '%s' expects %s"
                             % (name if name is not None else "null", ctype))
        if not self.keyval:
            return obj
        return value

    def visit_str(self, name: Optional[str]) -> str:
        if self.keyval:
            return self._keyval_str(name)
        obj = self.get_object(name, True)
        if not isinstance(obj, str):
            raise self._type_error(name, "string")
        return obj

    def visit_bool(self, name: Optional[str]) -> bool:
        if self.keyval:
            value = qapi_bool_parse(self._keyval_str(name))
            if value is None:
                raise VisitError("Parameter '%s' expects 'on' or 'off'" % self.full_name(name))
            return value
        obj = self.get_object(name, True)
        if not isinstance(obj, bool):
            raise self._type_error(name, "boolean")
        return obj

    def visit_number(self, name: Optional[str]) -> Any:
        if self.keyval:
            value = strtod_finite(self._keyval_str(name))
            if value is None:
                raise self._type_error(name, "number")
            return value
        obj = self.get_object(name, True)
        if isinstance(obj, bool) or not isinstance(obj, (int, float)):
            raise self._type_error(name, "number")
        return obj

    def visit_null(self, name: Optional[str]) -> None:
        obj = self.get_object(name, True)
        if obj is not None:
            raise self._type_error(name, "null")

    def visit_enum(self, node: Dict[str, Any], name: Optional[str]) -> str:
        value = self.visit_str(name)
        if value not in node["enum"]:
            raise VisitError("Parameter '%s' does not accept value '%s'"
                             % (name if name is not None else "null", value))
        return value

    # -- containers ---------------------------------------------------------------------
    def visit_type(self, node: Dict[str, Any], name: Optional[str]) -> Any:
        """Visit one member/element described by ``node``."""
        node, ref = self.resolve(node)
        if ref is not None and ref in INT_TYPES:
            return self.visit_int(ref, name)
        if "anyOf" in node:
            return self.visit_alternate(node, name, ref or "alternate")
        if "enum" in node:
            return self.visit_enum(node, name)
        jtype = node.get("type")
        if jtype == "object":
            return self.visit_struct(node, name)
        if jtype == "array":
            return self.visit_list(node, name)
        if jtype == "string":
            return self.visit_str(name)
        if jtype == "boolean":
            return self.visit_bool(name)
        if jtype == "integer":
            return self.visit_int("int", name)
        if jtype == "number":
            return self.visit_number(name)
        if jtype == "null":
            return self.visit_null(name)
        return self.get_object(name, True)  # 'any'

    def visit_list(self, node: Dict[str, Any], name: Optional[str]) -> List[Any]:
        obj = self.get_object(name, True)
        if not isinstance(obj, list):
            raise self._type_error(name, "array")
        self.stack.append(_Frame(name, obj))
        try:
            items = node.get("items", {})
            return [self.visit_type(items, None) for _i in range(len(obj))]
        finally:
            self.stack.pop()

    def visit_alternate(self, node: Dict[str, Any], name: Optional[str], ref: str) -> Any:
        obj = self.get_object(name, False)
        for branch in node["anyOf"]:
            if self._accepts_qtype(branch, obj):
                return self.visit_type(branch, name)
        raise VisitError("Invalid parameter type for '%s', expected: %s"
                         % (name if name is not None else "null", ref))

    def _accepts_qtype(self, branch: Dict[str, Any], obj: Any) -> bool:
        """Whether an alternate branch is the one QEMU picks for ``obj``'s QType."""
        target, ref = self.resolve(branch)
        if ref in INT_TYPES:
            return isinstance(obj, (int, float)) and not isinstance(obj, bool)
        if "anyOf" in target:
            return False
        if "enum" in target:
            return isinstance(obj, str)
        jtype = target.get("type")
        if isinstance(obj, bool):
            return jtype == "boolean"
        if isinstance(obj, (int, float)):
            return jtype in ("number", "integer")
        return {dict: "object", list: "array", str: "string",
                type(None): "null"}.get(type(obj)) == jtype

    def visit_struct(self, node: Dict[str, Any], name: Optional[str]) -> Dict[str, Any]:
        obj = self.get_object(name, True)
        if not isinstance(obj, dict):
            raise self._type_error(name, "object")
        frame = _Frame(name, obj)
        self.stack.append(frame)
        try:
            out: Dict[str, Any] = {}
            strict = self.visit_members(node, out)
            if strict:
                extra = frame.ghash.first() if frame.ghash is not None else None
                if extra is not None:
                    raise VisitError("Parameter '%s' is unexpected" % self.full_name(extra))
            else:
                for key, val in obj.items():
                    out.setdefault(key, val)
            return out
        finally:
            self.stack.pop()

    def _visit_props(self, node: Dict[str, Any], out: Dict[str, Any],
                     skip: Any = ()) -> None:
        required = node.get("required", ())
        top = self.stack[-1]
        for mname, msch in node.get("properties", {}).items():
            if mname in skip:
                continue
            if mname not in required and mname not in top.obj:
                continue
            out[mname] = self.visit_type(msch, mname)

    def visit_members(self, node: Dict[str, Any], out: Dict[str, Any]) -> bool:
        """Visit a struct's or flat union's members; True if extras must be rejected."""
        self._visit_props(node, out)
        branches = [a for a in node.get("allOf", ()) if "if" in a and "then" in a]
        if not branches:
            return node.get("additionalProperties", True) is False
        for case in branches:
            (tag, cond), = case["if"]["properties"].items()
            value = out.get(tag)
            if value == cond.get("const", _MISSING) or value in cond.get("enum", ()):
                branch, _name = self.resolve(case["then"])
                self._visit_props(branch, out, skip=node.get("properties", {}))
                return branch.get("additionalProperties", True) is False
        return node.get("additionalProperties", True) is False
