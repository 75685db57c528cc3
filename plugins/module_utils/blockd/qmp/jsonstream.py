# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Streaming JSON input, byte-for-byte like QEMU's QMP parser.

QMP input is a stream of JSON values without framing: several values may
share a line and one value may arrive in many reads.  QEMU splits the stream
with a lexer (``qobject/json-lexer.c``), groups tokens into messages with a
"streamer" that counts braces and brackets (``qobject/json-streamer.c``) and
parses each complete message (``qobject/json-parser.c``).  This module
reproduces the three layers of QEMU 7.2, including everything a client can
observe:

* the single-quoted string extension (``{'execute': 'quit'}``) and the ``\\'``
  escape;
* the error texts (``JSON parse error, expecting value``, ``JSON parse error,
  stray '@'``, ``JSON parse error, duplicate key``, ...);
* when errors are reported: a parse error is only reported once the braces and
  brackets balance (or go negative), exactly like QEMU;
* resynchronisation after a lexical error: the lexer skips input until a
  structural character (``{ } [ ] : ,``), an ASCII control character other
  than tab, or one of the impossible UTF-8 bytes ``0xFE``/``0xFF``;
* the limits: a token larger than 64 MiB, a message whose tokens total more
  than 64 MiB, more than 2 Mi tokens, or nesting deeper than 1024 give
  ``JSON token size limit exceeded`` / ``JSON token count limit exceeded`` /
  ``JSON nesting depth limit exceeded``;
* strings are (modified) UTF-8 and are checked like QEMU does: overlong
  sequences, surrogates and the 66 Unicode noncharacters are rejected,
  ``\\xC0\\x80`` is U+0000;
* integers that fit neither int64 nor uint64 become floats, as in QEMU.

Usage::

    parser = JSONStreamParser()
    for item in parser.feed(b'{"execute": "qmp_capabilities"}{"exec'):
        if isinstance(item, JSONParseError):
            ...  # reply {"error": {"class": "GenericError", "desc": str(item)}}
        else:
            ...  # a complete JSON value (dict, list, str, int, float, bool, None)

Long runs (string bodies, digits, skipped garbage) are scanned with regular
expressions, so a 64 MiB value costs a few regex calls rather than 64 Mi
iterations of Python code.
"""

from __future__ import annotations

import json
import re
from typing import Any, List, Optional, Tuple, Union

__all__ = [
    "JSONParseError",
    "JSONStreamParser",
    "loads",
    "mod_utf8_decode",
    "MAX_TOKEN_SIZE",
    "MAX_TOKEN_COUNT",
    "MAX_NESTING",
]

#: Largest token, and largest sum of the tokens of one message (bytes).
MAX_TOKEN_SIZE = 64 << 20
#: Largest number of tokens in one message.
MAX_TOKEN_COUNT = 2 << 20
#: Deepest nesting of ``{`` and ``[`` in one message.
MAX_NESTING = 1 << 10


class JSONParseError(Exception):
    """A syntax error or limit violation in the input stream.

    ``str(error)`` is the ``desc`` QEMU puts in its ``GenericError`` reply,
    e.g. ``"JSON parse error, expecting value"``.
    """


# --- token types -----------------------------------------------------------------------
# Structural tokens are represented by these small ints; value tokens (strings,
# numbers, keywords) by their raw bytes.
T_LCURLY, T_RCURLY, T_LSQUARE, T_RSQUARE, T_COLON, T_COMMA = range(6)
_STRUCT = {ord("{"): T_LCURLY, ord("}"): T_RCURLY, ord("["): T_LSQUARE,
           ord("]"): T_RSQUARE, ord(":"): T_COLON, ord(","): T_COMMA}

# --- lexer states (json-lexer.c) ------------------------------------------------------
(S_START, S_RECOVERY, S_DQ, S_DQ_ESC, S_SQ, S_SQ_ESC, S_ZERO, S_SIGN, S_DIGITS,
 S_MANTISSA, S_MANTISSA_DIGITS, S_EXP_E, S_EXP_SIGN, S_EXP_DIGITS, S_KEYWORD) = range(15)

# Runs of bytes a state consumes without changing state.
_RUN = {
    S_START: re.compile(rb"[ \t\r\n]+"),
    S_RECOVERY: re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+"),
    # string bodies, including complete escape pairs (backslash + 0x20..0xFD)
    S_DQ: re.compile(rb"(?:[\x20\x21\x23-\x5b\x5d-\xfd]+|\\[\x20-\xfd])+"),
    S_SQ: re.compile(rb"(?:[\x20-\x26\x28-\x5b\x5d-\xfd]+|\\[\x20-\xfd])+"),
    S_DIGITS: re.compile(rb"[0-9]+"),
    S_MANTISSA_DIGITS: re.compile(rb"[0-9]+"),
    S_EXP_DIGITS: re.compile(rb"[0-9]+"),
    S_KEYWORD: re.compile(rb"[a-z]+"),
}
_DIGIT = frozenset(b"0123456789")
_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz")
# "value" pseudo token type for terminal states, used when they end on lookahead.
_INT, _FLOAT, _KEYWORD = "int", "float", "keyword"
_TERMINAL = {S_ZERO: _INT, S_DIGITS: _INT, S_MANTISSA_DIGITS: _FLOAT,
             S_EXP_DIGITS: _FLOAT, S_KEYWORD: _KEYWORD}


def _cstr(token: bytes) -> bytes:
    """What ``printf("%s")`` shows of a token: everything up to the first NUL."""
    nul = token.find(b"\0")
    return token if nul < 0 else token[:nul]


_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _valid_cp(cp: int) -> bool:
    """QEMU's ``is_valid_codepoint()``."""
    if cp > 0x10FFFF or cp < 0:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def _mod_utf8_codepoint(s: bytes, i: int, n: int = 6) -> Tuple[int, int]:
    """QEMU's ``mod_utf8_codepoint()`` at ``s[i]``: returns ``(codepoint or -1, end)``."""
    if i >= len(s) or n == 0 or s[i] == 0:
        return -1, i
    byte = s[i]
    p = i + 1
    if byte < 0x80:
        return byte, p
    if byte >= 0xFE or not byte & 0x40:
        return -1, p
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for k in range(1, length):
        nxt = s[p] if (k < n and p < len(s)) else 0
        if nxt & 0xC0 != 0x80:
            return -1, p
        p += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if not _valid_cp(cp):
        return -1, p
    if cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
        return -1, p
    return cp, p


def mod_utf8_decode(data: bytes) -> str:
    """Decode QEMU-internal (modified UTF-8) text the way QEMU's JSON writer does.

    Invalid sequences become U+FFFD, ``\\xC0\\x80`` becomes U+0000, decoding
    stops at a NUL byte.  Used for error texts that quote raw input.

    :param data: the bytes to decode.
    :return: the text.
    """
    data = _cstr(data)
    try:
        if b"\xc0" not in data:
            text = data.decode("utf-8")
            if not _NONCHAR.search(text):
                return text
    except UnicodeDecodeError:
        pass
    out = []
    i = 0
    while i < len(data):
        cp, i = _mod_utf8_codepoint(data, i)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)


_NONCHAR = re.compile("[\ufdd0-\ufdef\ufffe\uffff" + "".join(
    chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(1, 17)) + "]")
_PLAIN_STR = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\Z")
_BAD_CHARS = re.compile("[\ud800-\udfff]|" + _NONCHAR.pattern)
_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX4 = re.compile(rb"[0-9A-Fa-f]{4}")


def _decode_raw(seg: bytes) -> Optional[str]:
    """Validate and decode unescaped string content; None if QEMU rejects it."""
    if b"\xc0\x80" in seg:
        parts = [_decode_raw(p) for p in seg.split(b"\xc0\x80")]
        if any(p is None for p in parts):
            return None
        return "\0".join(parts)  # type: ignore[arg-type]
    try:
        text = seg.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _NONCHAR.search(text):
        return None
    return text


def _cvt4hex(tok: bytes, i: int) -> int:
    return int(tok[i:i + 4], 16) if _HEX4.match(tok, i) else -1


def _parse_string(tok: bytes) -> str:
    """``parse_string()`` of json-parser.c: decode a string token (with its quotes)."""
    body = tok[1:-1]
    if _PLAIN_STR.match(body):
        return body.decode("ascii")
    if tok[0] == 0x22 and b"\\'" not in body:
        # Fast path: Python's decoder accepts a superset of what QEMU accepts
        # here (lone surrogates, noncharacters); anything it rejects or that
        # needs a closer look goes through the exact path below.
        try:
            text = json.loads(tok)
        except ValueError:
            text = None
        if text is not None and not _BAD_CHARS.search(text):
            return text
    if b"\\" not in body:
        text = _decode_raw(body)
        if text is None:
            raise JSONParseError("JSON parse error, invalid UTF-8 sequence in string")
        return text
    out = []
    end = len(tok) - 1
    i = 1
    while i < end:
        j = tok.find(b"\\", i, end)
        if j < 0:
            j = end
        if j > i:
            text = _decode_raw(tok[i:j])
            if text is None:
                raise JSONParseError("JSON parse error, invalid UTF-8 sequence in string")
            out.append(text)
        if j >= end:
            break
        beg = j
        c = tok[j + 1]
        i = j + 2
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
            continue
        if c != ord("u"):
            raise JSONParseError("JSON parse error, invalid escape sequence in string")
        cp = _cvt4hex(tok, i)
        i += 4
        if 0xD800 <= cp <= 0xDBFF and tok[i:i + 2] == b"\\u":
            cp = 0x10000 + ((cp & 0x3FF) << 10)
            trailing = _cvt4hex(tok, i + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp |= trailing & 0x3FF
                i += 6
            else:
                cp = -1
        if not _valid_cp(cp):
            shown = mod_utf8_decode(tok[beg:min(i, len(tok))])
            raise JSONParseError("JSON parse error, %s is not a valid Unicode character"
                                 % shown)
        out.append(chr(cp))
    return "".join(out)


def _parse_scalar(tok: bytes) -> Any:
    """``parse_literal()``/``parse_keyword()``: decode a value token."""
    c = tok[0]
    if c == 0x22 or c == 0x27:
        return _parse_string(tok)
    if c in _LOWER:
        if tok == b"true":
            return True
        if tok == b"false":
            return False
        if tok == b"null":
            return None
        raise JSONParseError("JSON parse error, invalid keyword '%s'" % tok.decode("ascii"))
    if b"." in tok or b"e" in tok or b"E" in tok:
        return float(tok)
    if len(tok) <= 21:
        value = int(tok)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return float(tok)


_EXPECTING = "JSON parse error, expecting value"


def parse_tokens(tokens: List[Union[int, bytes]]) -> Any:
    """Parse one message's tokens like ``json_parser_parse()`` (first error wins).

    Iterative, so nesting depth is only bounded by :data:`MAX_NESTING`.

    :param tokens: structural token codes and value-token bytes.
    :return: the value.
    :raise JSONParseError: on a syntax error.
    """
    n = len(tokens)
    pos = 0
    # Each frame: [container, key-or-None, is_dict]
    stack: List[list] = []
    while True:
        # --- parse_value() --------------------------------------------------------
        if pos >= n:
            raise JSONParseError("JSON parse error, premature EOI")
        tok = tokens[pos]
        value: Any
        if tok == T_LCURLY or tok == T_LSQUARE:
            pos += 1
            if pos >= n:
                raise JSONParseError("JSON parse error, premature EOI")
            is_dict = tok == T_LCURLY
            if tokens[pos] == (T_RCURLY if is_dict else T_RSQUARE):
                pos += 1
                value = {} if is_dict else []
            else:
                stack.append([{} if is_dict else [], None, is_dict])
                continue
        elif isinstance(tok, bytes):
            pos += 1
            value = _parse_scalar(tok)
        else:
            raise JSONParseError(_EXPECTING)
        # --- a value is complete: hand it to the enclosing container ----------------
        while True:
            if not stack:
                return value
            frame = stack[-1]
            if frame[2]:
                if frame[1] is None:
                    # parse_pair(): we just parsed the key
                    if not isinstance(value, str):
                        raise JSONParseError("JSON parse error, key is not a string in object")
                    if pos >= n:
                        raise JSONParseError("JSON parse error, premature EOI")
                    if tokens[pos] != T_COLON:
                        raise JSONParseError("JSON parse error, missing : in object pair")
                    pos += 1
                    frame[1] = value
                    break  # parse the member value
                if frame[1] in frame[0]:
                    raise JSONParseError("JSON parse error, duplicate key")
                frame[0][frame[1]] = value
                frame[1] = None
                closer, what = T_RCURLY, "dict"
            else:
                frame[0].append(value)
                closer, what = T_RSQUARE, "list"
            if pos >= n:
                raise JSONParseError("JSON parse error, premature EOI")
            tok = tokens[pos]
            pos += 1
            if tok == closer:
                value = stack.pop()[0]
                continue
            if tok != T_COMMA:
                raise JSONParseError("JSON parse error, expected separator in %s" % what)
            break  # parse the next key or element


class JSONStreamParser:
    """QEMU's ``JSONMessageParser``: feed bytes, get complete values and errors.

    One instance per connection; it is not thread-safe.  After an error the
    parser resynchronises exactly like QEMU, so the connection stays usable.
    """

    def __init__(self) -> None:
        self._state = S_START
        self._token = bytearray()
        self._tokens: List[Union[int, bytes]] = []
        self._brace = 0
        self._bracket = 0
        self._size = 0
        self._out: List[Any] = []
        self._cur = 0
        self._emit_pos = -1

    def reset(self) -> None:
        """Forget any partial input (QEMU does this when a client disconnects)."""
        self._state = S_START
        self._token = bytearray()
        self._tokens = []
        self._brace = self._bracket = self._size = 0
        self._out = []

    # --- streamer (json-streamer.c) ---------------------------------------------------
    def _emit(self, item: Any) -> None:
        self._emit_pos = self._cur
        self._brace = self._bracket = 0
        self._tokens = []
        self._size = 0
        self._out.append(item)

    def _process(self, tok: Union[int, bytes, None], raw: bytes) -> None:
        """``json_message_process_token()``; ``tok`` None means an oversized partial token."""
        if tok == T_LCURLY:
            self._brace += 1
        elif tok == T_RCURLY:
            self._brace -= 1
        elif tok == T_LSQUARE:
            self._bracket += 1
        elif tok == T_RSQUARE:
            self._bracket -= 1
        if self._size + len(raw) + 1 > MAX_TOKEN_SIZE:
            self._emit(JSONParseError("JSON token size limit exceeded"))
            return
        if len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            self._emit(JSONParseError("JSON token count limit exceeded"))
            return
        if self._bracket + self._brace > MAX_NESTING:
            self._emit(JSONParseError("JSON nesting depth limit exceeded"))
            return
        if tok is None:
            raise AssertionError("JSON lexer produced no token")
        self._tokens.append(tok)
        self._size += len(raw)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        try:
            item: Any = parse_tokens(self._tokens)
        except JSONParseError as exc:
            item = exc
        self._emit(item)

    def _stray(self, raw: bytes) -> None:
        self._emit(JSONParseError("JSON parse error, stray '%s'" % mod_utf8_decode(raw)))

    def _value_token(self, raw: bytes) -> None:
        self._process(raw, raw)

    # --- lexer (json-lexer.c) ----------------------------------------------------------
    def feed(self, data: bytes) -> List[Any]:
        """Consume input; return what became complete.

        :param data: the next bytes from the client (any split is fine).
        :return: a list of parsed values and :class:`JSONParseError`
            instances, in input order.
        """
        return self._feed(data, False)[0]

    def feed_some(self, data: bytes) -> Tuple[List[Any], int]:
        """Consume input only up to the byte that completes a message.

        QEMU's monitor reads its socket one byte at a time and stops reading
        while a request is being handled, so bytes after a request stay in the
        socket (and e.g. make the connection close with a reset after
        ``quit``).  A server that peeks at its input can reproduce that.

        :param data: available input.
        :return: ``(items, consumed)``: what became complete (possibly
            several items, if one byte completed more than one) and how many
            bytes of ``data`` were used; all of ``data`` if nothing completed.
        """
        return self._feed(data, True)

    def _feed(self, data: bytes, stop: bool) -> Tuple[List[Any], int]:
        out = self._out = []
        token = self._token
        state = self._state
        i = 0
        n = len(data)
        self._cur = 0
        self._emit_pos = -1
        while i < n:
            if stop and out and i > self._emit_pos:
                break
            run = _RUN.get(state)
            if run is not None:
                m = run.match(data, i)
                if m is not None:
                    j = m.end()
                    if state == S_START or state == S_RECOVERY:
                        i = j
                    else:
                        room = MAX_TOKEN_SIZE + 1 - len(token)
                        if j - i >= room:
                            token += data[i:i + room]
                            i += room
                            self._cur = i - 1
                            self._process(None, bytes(token))
                            token.clear()
                            state = S_START
                            continue
                        token += data[i:j]
                        i = j
                    if i >= n or (stop and out and i > self._emit_pos):
                        break
            self._cur = i
            c = data[i]
            if state == S_START:
                i += 1
                t = _STRUCT.get(c)
                if t is not None:
                    self._process(t, b"x")
                    continue
                if c == 0x22:
                    state = S_DQ
                elif c == 0x27:
                    state = S_SQ
                elif c == 0x30:
                    state = S_ZERO
                elif c in _DIGIT:
                    state = S_DIGITS
                elif c == 0x2D:
                    state = S_SIGN
                elif c in _LOWER:
                    state = S_KEYWORD
                else:
                    self._stray(bytes((c,)))
                    state = S_RECOVERY
                    continue
                token.append(c)
                continue
            if state == S_RECOVERY:
                # c is a resynchronisation byte (run above skipped the rest)
                state = S_START
                continue
            if state == S_DQ or state == S_SQ:
                i += 1
                token.append(c)
                if c == 0x5C:
                    state = S_DQ_ESC if state == S_DQ else S_SQ_ESC
                elif (c == 0x22 and state == S_DQ) or (c == 0x27 and state == S_SQ):
                    self._value_token(bytes(token))
                    token.clear()
                    state = S_START
                else:
                    self._stray(bytes(token))
                    token.clear()
                    state = S_RECOVERY
                    continue
            elif state == S_DQ_ESC or state == S_SQ_ESC:
                i += 1
                token.append(c)
                if 0x20 <= c <= 0xFD:
                    state = S_DQ if state == S_DQ_ESC else S_SQ
                else:
                    self._stray(bytes(token))
                    token.clear()
                    state = S_RECOVERY
                    continue
            else:
                nxt = self._number_step(state, c)
                if nxt is None:
                    # terminal state ends on lookahead: emit, re-read c in START
                    self._value_token(bytes(token))
                    token.clear()
                    state = S_START
                    continue
                i += 1
                token.append(c)
                if nxt == S_RECOVERY:
                    self._stray(bytes(token))
                    token.clear()
                    state = S_RECOVERY
                    continue
                state = nxt
            if len(token) > MAX_TOKEN_SIZE:
                self._process(None, bytes(token))
                token.clear()
                state = S_START
        self._state = state
        self._out = []
        return out, i

    def flush(self) -> List[Any]:
        """End of input: complete a pending message (``json_message_parser_flush()``).

        The QMP monitor never calls this (QEMU discards partial input when a
        client disconnects); :func:`loads` does.

        :return: like :meth:`feed`.
        """
        out = self._out = []
        state = self._state
        if state in _TERMINAL:
            self._value_token(bytes(self._token))
        elif state not in (S_START, S_RECOVERY):
            self._stray(bytes(self._token))
        self._token.clear()
        self._state = S_START
        if self._tokens:
            try:
                item: Any = parse_tokens(self._tokens)
            except JSONParseError as exc:
                item = exc
            self._emit(item)
        self._out = []
        return out

    @staticmethod
    def _number_step(state: int, c: int) -> Optional[int]:
        """Number/keyword transitions; None = lookahead end of token, S_RECOVERY = error."""
        if state == S_ZERO:
            if c == 0x2E:
                return S_MANTISSA
            return S_RECOVERY if c in _DIGIT else None
        if state == S_DIGITS:
            if c == 0x2E:
                return S_MANTISSA
            if c == 0x65 or c == 0x45:
                return S_EXP_E
            return None  # digits were consumed by the run
        if state == S_SIGN:
            if c == 0x30:
                return S_ZERO
            return S_DIGITS if c in _DIGIT else S_RECOVERY
        if state == S_MANTISSA:
            return S_MANTISSA_DIGITS if c in _DIGIT else S_RECOVERY
        if state == S_MANTISSA_DIGITS:
            return S_EXP_E if c == 0x65 or c == 0x45 else None
        if state == S_EXP_E:
            if c == 0x2B or c == 0x2D:
                return S_EXP_SIGN
            return S_EXP_DIGITS if c in _DIGIT else S_RECOVERY
        if state == S_EXP_SIGN:
            return S_EXP_DIGITS if c in _DIGIT else S_RECOVERY
        if state == S_EXP_DIGITS:
            return None
        if state == S_KEYWORD:
            return None
        raise AssertionError(state)  # pragma: no cover


def loads(data: Union[bytes, str]) -> Any:
    """Parse exactly one JSON value like ``qobject_from_json()``.

    Used for JSON option values on the command line
    (``--blockdev '{"driver": ...}'``).  Errors are worded as QEMU words them;
    the first one wins.

    :param data: the text.
    :return: the value, or None if the input holds no value at all.
    :raise JSONParseError: on a syntax error or a second value
        (``Expecting at most one JSON value``).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    parser = JSONStreamParser()
    items = parser.feed(data)
    items.extend(parser.flush())
    result: Any = None
    seen = False
    for item in items:
        if isinstance(item, JSONParseError):
            raise item
        if seen:
            raise JSONParseError("Expecting at most one JSON value")
        result = item
        seen = True
    return result
