# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""JSON output exactly as QEMU writes it (``qobject/json-writer.c``).

QEMU keeps JSON objects in a ``QDict``: a hash table of 512 buckets, hashed
with ``tdb_hash()``, iterated bucket by bucket, newest entry first within a
bucket.  That is why QMP replies look "shuffled" -- the greeting's version is
``{"micro": 22, "minor": 2, "major": 7}`` and every reply is ``{"return": ...,
"id": ...}`` but every error ``{"id": ..., "error": ...}``.  The order depends
only on the key names (and, for the rare keys sharing a bucket, on insertion
order), so :func:`to_json` reproduces it for *any* dict: callers build dicts in
QAPI member order and never need to think about key order.

Other details copied from QEMU:

* output is pure ASCII; ``"``, ``\\``, ``\\b``, ``\\f``, ``\\n``, ``\\r`` and
  ``\\t`` use short escapes, other characters below U+0020 or from U+007F up
  are ``\\uXXXX`` with upper-case hex, characters beyond the BMP become a
  surrogate pair; ``/`` is not escaped;
* floats are printed with ``%.17g`` (so ``0.1`` is ``0.10000000000000001``,
  ``1e2`` is ``100`` and an overflowing number is ``inf``);
* separators are ``", "`` and ``": "``; the pretty form (``--monitor
  pretty=on``) puts every member on its own line indented by four spaces, and
  writes an empty object as ``{`` newline ``}``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List

__all__ = ["to_json", "qdict_order", "tdb_hash", "qemu_key_bytes"]

QDICT_BUCKET_MAX = 512


def qemu_key_bytes(key: str) -> bytes:
    """The bytes QEMU stores for a string (modified UTF-8: U+0000 is ``C0 80``)."""
    data = key.encode("utf-8", "surrogatepass")
    if b"\0" in data:
        data = data.replace(b"\0", b"\xc0\x80")
    return data


def tdb_hash(key: str) -> int:
    """QEMU's ``tdb_hash()`` (``qobject/qdict.c``).

    :param key: a dict key.
    :return: the 32-bit hash.
    """
    name = qemu_key_bytes(key)
    value = (0x238F13AF * len(name)) & 0xFFFFFFFF
    for i, c in enumerate(name):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


_BUCKETS: Dict[str, int] = {}


def _bucket(key: str) -> int:
    b = _BUCKETS.get(key)
    if b is None:
        b = tdb_hash(key) % QDICT_BUCKET_MAX
        if len(_BUCKETS) < 65536:
            _BUCKETS[key] = b
    return b


def qdict_order(keys: Iterable[str]) -> List[str]:
    """The order in which a QDict built by inserting ``keys`` iterates them.

    :param keys: keys in insertion order (duplicates are ignored, as a QDict
        replaces the value in place).
    :return: the keys in QEMU's iteration order.
    """
    buckets: Dict[int, List[str]] = {}
    seen = set()
    for k in keys:
        if k in seen:
            continue
        seen.add(k)
        buckets.setdefault(_bucket(k), []).append(k)
    out: List[str] = []
    for b in sorted(buckets):
        out.extend(reversed(buckets[b]))
    return out


_PLAIN = re.compile(r'[\x20\x21\x23-\x5b\x5d-\x7e]*\Z')
_SPECIAL = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
          "\t": "\\t"}


def _escape_char(m: "re.Match[str]") -> str:
    ch = m.group(0)
    short = _SHORT.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if cp > 0xFFFF:
        cp -= 0x10000
        return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
    return "\\u%04X" % cp


def quoted_str(text: str) -> str:
    """QEMU's ``quoted_str()``: a JSON string literal in ASCII."""
    if _PLAIN.match(text):
        return '"' + text + '"'
    return '"' + _SPECIAL.sub(_escape_char, text) + '"'


def _scalar(obj: Any) -> str:
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return str(int(obj))
    if isinstance(obj, float):
        return "%.17g" % obj
    if isinstance(obj, str):
        return quoted_str(obj)
    raise TypeError("cannot serialise %r as QMP JSON" % (type(obj).__name__,))


def to_json(obj: Any, pretty: bool = False) -> str:
    """Serialise like ``qobject_to_json_pretty()``.

    Iterative, so arbitrarily deep values (a client may send an ``id``
    nested 1024 levels deep) cannot exhaust the Python stack.

    :param obj: dicts (str keys), lists/tuples, str, int, float, bool, None.
    :param pretty: QEMU's pretty form (``--monitor pretty=on``).
    :return: the ASCII JSON text, without a line terminator.
    :raise TypeError: for other types.
    """
    parts: List[str] = []
    # frames: [iterator of (key or None, value), closer, depth, first]
    stack: List[list] = []

    def emit(value: Any, depth: int) -> None:
        if isinstance(value, dict):
            parts.append("{")
            stack.append([iter([(k, value[k]) for k in qdict_order(value)]), "}", depth, True])
        elif isinstance(value, (list, tuple)):
            parts.append("[")
            stack.append([iter([(None, v) for v in value]), "]", depth, True])
        else:
            parts.append(_scalar(value))

    emit(obj, 0)
    while stack:
        frame = stack[-1]
        depth = frame[2]
        nxt: Any = next(frame[0], _END)
        if nxt is _END:
            stack.pop()
            if pretty:
                parts.append("\n" + "    " * depth)
            parts.append(frame[1])
            continue
        if pretty:
            parts.append("\n" if frame[3] else ",\n")
            parts.append("    " * (depth + 1))
        elif not frame[3]:
            parts.append(", ")
        frame[3] = False
        key, value = nxt
        if key is not None:
            parts.append(quoted_str(key))
            parts.append(": ")
        emit(value, depth + 1)
    return "".join(parts)


_END = object()
