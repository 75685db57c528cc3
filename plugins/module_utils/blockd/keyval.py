# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""QEMU's dotted ``key=value`` option syntax (util/keyval.c).

``driver=file,node-name=f,cache.direct=on`` becomes
``{"driver": "file", "node-name": "f", "cache": {"direct": "on"}}``: leaves stay
strings (the schema gives them their types later), ``,,`` is a literal comma,
the first element may omit its key (the *implied key*), and numeric key parts
build lists (``bitmaps.0=a,bitmaps.1=b``).  A value starting with ``{`` is
JSON instead.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

_KEY_PART = re.compile(r"^[A-Za-z0-9_-]+$")


class KeyvalError(ValueError):
    """A malformed option string, worded as QEMU words it."""


def _split(text: str) -> List[Tuple[Optional[str], str]]:
    """Split into (key, value) pairs; ``,,`` escapes a comma in values."""
    pairs: List[Tuple[Optional[str], str]] = []
    i, n = 0, len(text)
    while i < n:
        key_end = i
        while key_end < n and text[key_end] not in "=,":
            key_end += 1
        key: Optional[str]
        if key_end < n and text[key_end] == "=":
            key = text[i:key_end]
            i = key_end + 1
        else:
            key = None
        value = []
        while i < n:
            if text[i] == ",":
                if i + 1 < n and text[i + 1] == ",":
                    value.append(",")
                    i += 2
                    continue
                break
            value.append(text[i])
            i += 1
        pairs.append((key, "".join(value)))
        i += 1  # skip the separating comma
    return pairs


def _listify(tree: Any) -> Any:
    """Turn dicts whose keys are all 0..n-1 into lists (keyval_listify)."""
    if not isinstance(tree, dict):
        return tree
    tree = {k: _listify(v) for k, v in tree.items()}
    if tree and all(k.isdigit() for k in tree):
        indices = sorted(int(k) for k in tree)
        if indices != list(range(len(indices))):
            raise KeyvalError("Parameter '%s' missing" % min(set(range(len(indices))) - set(indices)))
        return [tree[str(i)] for i in indices]
    return tree


def parse(text: str, implied_key: Optional[str] = None) -> Dict[str, Any]:
    """Parse an option string (or JSON object) into a nested dict.

    :param text: the option's value on the command line.
    :param implied_key: the key of a first element given without ``key=``.
    :raise KeyvalError: with QEMU's wording.
    """
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise KeyvalError("JSON parse error, %s" % exc) from None
        if not isinstance(value, dict):
            raise KeyvalError("Parameters must be a JSON object")
        return value
    root: Dict[str, Any] = {}
    for index, (key, value) in enumerate(_split(text)):
        if key is None:
            if index == 0 and implied_key is not None:
                key = implied_key
            elif value == "":
                continue
            else:
                raise KeyvalError("Expected '=' after parameter '%s'" % value)
        parts = key.split(".")
        if any(not p or not _KEY_PART.match(p) for p in parts):
            raise KeyvalError("Invalid parameter '%s'" % key)
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise KeyvalError("Parameter '%s' used inconsistently" % ".".join(parts[:depth + 1]))
            node = child
        last = parts[-1]
        if isinstance(node.get(last), dict):
            raise KeyvalError("Parameter '%s' used inconsistently" % key)
        node[last] = value
    return _listify(root)


def parse_bool(value: Any, name: str) -> bool:
    """QEMU's boolean spellings for command-line values."""
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise KeyvalError("Parameter '%s' expects 'on' or 'off'" % name)
