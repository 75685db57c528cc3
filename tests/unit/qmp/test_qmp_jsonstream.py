# -*- coding: utf-8 -*-
"""blockd.qmp.jsonstream and blockd.qmp.qjson: QEMU's JSON input and output.

Every expected text below was captured from qemu-storage-daemon 7.2.22 with a
raw socket client (the reply's ``desc``, or the value it echoed as ``id``).
"""

from __future__ import annotations

import random

import pytest

from blockd.qmp.jsonstream import (MAX_NESTING, JSONParseError, JSONStreamParser, loads,
                                   mod_utf8_decode)
from blockd.qmp.qjson import qdict_order, tdb_hash, to_json

E_VALUE = "JSON parse error, expecting value"


def feed(*chunks: bytes) -> list:
    """Feed chunks to one parser; errors become their text, values stay values."""
    parser = JSONStreamParser()
    out = []
    for chunk in chunks:
        for item in parser.feed(chunk):
            out.append(str(item) if isinstance(item, JSONParseError) else item)
    return out


# (input, what qsd 7.2 answered, as the list of values/errors the stream yields)
QSD_VERIFIED = [
    (b'{"execute": }', [E_VALUE]),
    (b'{"execute":"query-version","execute":"x"}', ["JSON parse error, duplicate key"]),
    (b'{"execute": @"query-version"}', ["JSON parse error, stray '@'", E_VALUE]),
    (b'{"a" ]', ["JSON parse error, missing : in object pair"]),
    (b'{"a":1 ]', ["JSON parse error, expected separator in dict"]),
    (b'[1 }', ["JSON parse error, expected separator in list"]),
    (b'{abc: 1}', ["JSON parse error, invalid keyword 'abc'"]),
    (b'{true: 1}', ["JSON parse error, key is not a string in object"]),
    (b'{[1]: 1}', ["JSON parse error, key is not a string in object"]),
    (b'{"a\\x": 1}', ["JSON parse error, invalid escape sequence in string"]),
    (b'{"a\\u12": 1}', ['JSON parse error, \\u12" is not a valid Unicode character']),
    (b'{"\\ud800": 1}', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'{"\\ud800\\u0041": 1}', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'{"\\uffff": 1}', ["JSON parse error, \\uffff is not a valid Unicode character"]),
    (b'{"x":"\\u0041\\uD83D\\uDE00\\uDE00"}',
     ["JSON parse error, \\uDE00 is not a valid Unicode character"]),
    (b'{"x":"\\uD83D\\uXYZW"}', ["JSON parse error, \\uD83D is not a valid Unicode character"]),
    (b'{"x":"\\u"}', ['JSON parse error, \\u" is not a valid Unicode character']),
    (b'{"\xc3": 1}', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'{"x":"\xed\xa0\x80"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'{"x":"\xe0\x80\xaf"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'{"x":"\xef\xbf\xbe"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'{"x":"\\\xc3\xa9"}', ["JSON parse error, invalid escape sequence in string"]),
    (b'{"\xc0\x80": 1}', [{"\0": 1}]),
    # lexical errors: the stray token, then resynchronisation at ':' etc.
    (b'{"\xff": 1}', ["JSON parse error, stray '\"\ufffd'", E_VALUE, 1, E_VALUE]),
    (b'{"a\nb": 1}', ["JSON parse error, stray '\"a\n'", E_VALUE, 1, E_VALUE]),
    (b'\xfe\xfe', ["JSON parse error, stray '\ufffd'"] * 2),
    (b'\x00', ["JSON parse error, stray ''"]),
    (b'@@@ xyz {"execute":"query-version","id":5}',
     ["JSON parse error, stray '@'", {"execute": "query-version", "id": 5}]),
    (b'{"execute":"query-version","id":4\x01}', ["JSON parse error, stray '\x01'", E_VALUE]),
    (b'{"x":"\t"}', ["JSON parse error, stray '\"\t'", E_VALUE]),
    (b'-01\n', ["JSON parse error, stray '-01'"]),
    (b'1.e5\n', ["JSON parse error, stray '1.e'"]),
    (b'- \n', ["JSON parse error, stray '- '"]),
    (b'1e+\n', ["JSON parse error, stray '1e+\n'"]),
    (b'00\n', ["JSON parse error, stray '00'"]),
    (b'1.5.3\n', [1.5, "JSON parse error, stray '.'"]),
    (b'nul ', ["JSON parse error, invalid keyword 'nul'"]),
    (b'{"execute":"query-version",}', [E_VALUE]),
    (b'[1,]\n[,1]\n{,}\n{:}\n]\n,\n:\n', [E_VALUE] * 7),
    (b'{"a":1}}', [{"a": 1}, E_VALUE]),
    (b"{'execute':'query-version','id':'sq\"x'}", [{"execute": "query-version", "id": 'sq"x'}]),
    (b'1\n"str"true [] {} ', [1, "str", True, [], {}]),
]


@pytest.mark.parametrize("data,expected", QSD_VERIFIED, ids=[repr(c[0][:30]) for c in QSD_VERIFIED])
def test_qsd_verified_errors(data, expected):
    assert feed(data) == expected


@pytest.mark.parametrize("data,expected", QSD_VERIFIED, ids=[repr(c[0][:30]) for c in QSD_VERIFIED])
def test_any_split_gives_the_same_result(data, expected):
    # bytes may arrive one at a time or in random pieces
    assert feed(*[data[i:i + 1] for i in range(len(data))]) == expected
    rnd = random.Random(len(data))
    cuts = sorted(rnd.sample(range(len(data) + 1), min(4, len(data) + 1)))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    assert feed(*pieces) == expected


def test_recovery_state_swallows_until_structural_char():
    # after "-\n" the '\n' is part of the stray token, so "1e" is still skipped
    assert feed(b"-\n", b"1e\n", b"[]\n") == ["JSON parse error, stray '-\n'", []]


def test_numbers_like_qemu():
    out = feed(b"[18446744073709551615, 18446744073709551616, -9223372036854775808,"
               b" -9223372036854775809, -0, 1E2, 0.1, 1e400]")
    assert out == [[2**64 - 1, 1.8446744073709552e19, -2**63, -9.2233720368547758e18, 0,
                    100.0, 0.1, float("inf")]]
    assert isinstance(out[0][1], float) and isinstance(out[0][5], float)
    assert isinstance(out[0][4], int)


def test_strings_and_escapes():
    out = feed(b'["\\"\\\\\\/\\b\\f\\n\\r\\t\\\'\x7f", "\xc3\xa9\\u0000\\u007f/\\ud83d\\ude00",'
               b" '\\'\"', '\xf0\x9f\x98\x80'] ")
    assert out == [["\"\\/\b\f\n\r\t'\x7f", "\xe9\x00\x7f/\U0001F600", "'\"", "\U0001F600"]]


def test_nesting_limit_then_one_error_per_closer():
    depth = MAX_NESTING
    assert isinstance(feed(b"[" * depth + b"]" * depth)[0], list)
    out = feed(b"[" * (depth + 1) + b"]" * 3)
    assert out == ["JSON nesting depth limit exceeded", E_VALUE, E_VALUE, E_VALUE]
    # observed on qsd: the rest of an over-deep object is parsed as fresh input
    out = feed(b'{"a":' * (depth + 1) + b"1" + b"}" * 3 + b"\n")
    assert out == ["JSON nesting depth limit exceeded", "a", E_VALUE, 1, E_VALUE, E_VALUE, E_VALUE]


def test_deep_but_legal_nesting_does_not_recurse():
    value = feed(b"[" * 1024 + b"]" * 1024)[0]
    depth = 0
    while value:
        value = value[0]
        depth += 1
    assert depth == 1023
    text = to_json(feed(b'{"a":' * 1000 + b"1" + b"}" * 1000)[0])
    assert text.startswith('{"a": {"a": ') and text.endswith("}" * 1000)


@pytest.mark.slow
def test_token_count_limit():
    # qsd 7.2: 2097151 tokens parse, 2097153 give the error
    assert feed(b"[" + b"0," * 1048574 + b"0]\n") == [[0] * 1048575]
    assert feed(b"[" + b"0," * 1048575 + b"0]\n") == ["JSON token count limit exceeded"]


@pytest.mark.slow
def test_token_size_limits():
    m = 1 << 26
    head = b'{"execute":"query-version","id":"'
    ok = feed(head + b"X" * (m - 36) + b'"}')
    assert ok[0]["id"] == "X" * (m - 36)
    assert feed(head + b"X" * (m - 35) + b'"}') == ["JSON token size limit exceeded"]
    # one token over 64 MiB: error, then the rest of the string is lexed as JSON
    assert feed(head + b"X" * (m + 10) + b'"}') == [
        "JSON token size limit exceeded", "JSON parse error, stray 'X'", E_VALUE]
    # (the closing quote then opens a new string: '"}{"', then keyword 'a', ...)
    assert feed(head + b"X" * m + b'"}', b'{"a":1}') == [
        "JSON token size limit exceeded", '}{', "JSON parse error, invalid keyword 'a'"]


def test_invalid_utf8_never_raises():
    rnd = random.Random(7)
    parser = JSONStreamParser()
    for _ in range(300):
        blob = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 64)))
        for item in parser.feed(blob):
            assert isinstance(item, (JSONParseError, dict, list, str, int, float, bool,
                                     type(None)))
    # and the stream is usable afterwards (0xFF resets the lexer, like qsd)
    parser.feed(b"\xff")
    assert parser.feed(b'{"execute":"x"}') == [{"execute": "x"}]


def test_feed_some_stops_after_a_complete_message():
    parser = JSONStreamParser()
    data = b'{"execute":"a"} {"execute":"b"}'
    items, used = parser.feed_some(data)
    assert items == [{"execute": "a"}] and used == 15
    items, used = parser.feed_some(data[used:])
    assert items == [{"execute": "b"}] and used == 16
    # a number ends on lookahead: that byte is consumed too (QEMU reads it)
    parser = JSONStreamParser()
    assert parser.feed_some(b"12 34 ") == ([12], 3)
    assert parser.feed_some(b"{") == ([], 1)


def test_loads():
    assert loads('{"driver": "null-co", "size": 1048576}') == {"driver": "null-co",
                                                              "size": 1048576}
    assert loads(b"  ") is None
    with pytest.raises(JSONParseError, match="expecting value"):
        loads('{"a": }')
    with pytest.raises(JSONParseError, match="Expecting at most one JSON value"):
        loads("{} {}")


def test_mod_utf8_decode():
    assert mod_utf8_decode(b"a\xc3\xa9\xc0\x80b") == "a\xe9\x00b"
    assert mod_utf8_decode(b"\xff\xc3") == "\ufffd\ufffd"
    assert mod_utf8_decode(b"ab\0cd") == "ab"


# --- output -------------------------------------------------------------------------------
def test_greeting_is_byte_exact():
    greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22},
                                    "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"},
                        "capabilities": ["oob"]}}
    assert to_json(greeting) == (
        '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
        '"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}')


def test_qdict_order_matches_qsd():
    # query-block-jobs member order as qsd 7.2 printed it
    keys = ("type device len offset busy paused speed io-status ready status "
            "auto-finalize auto-dismiss").split()
    assert qdict_order(keys) == ["auto-finalize", "io-status", "device", "auto-dismiss", "busy",
                                 "len", "offset", "status", "paused", "speed", "ready", "type"]
    assert qdict_order(["id", "return"]) == ["return", "id"]
    assert qdict_order(["error", "id"]) == ["id", "error"]
    assert qdict_order(["data", "event", "timestamp"]) == ["timestamp", "event", "data"]
    assert tdb_hash("") == 12345


def test_escaping_and_numbers_match_qsd():
    # the ids qsd echoed for these inputs
    assert to_json("\xe9\x00\x7f/\U0001F600") == '"\\u00E9\\u0000\\u007F/\\uD83D\\uDE00"'
    assert to_json("\"\\/\b\f\n\r\t'\x7f") == '"\\"\\\\/\\b\\f\\n\\r\\t\'\\u007F"'
    assert to_json([1.5, 0.1, float("inf"), 100.0, 1.8446744073709552e19,
                    -9.2233720368547758e18, 2**64 - 1, None, True, False]) == (
        "[1.5, 0.10000000000000001, inf, 100, 1.8446744073709552e+19, "
        "-9.2233720368547758e+18, 18446744073709551615, null, true, false]")
    assert to_json([{}, [], {"a": {}}]) == '[{}, [], {"a": {}}]'


def test_pretty_matches_qsd():
    assert to_json({"return": {}, "id": [1, {}, [], {"a": []}]}, pretty=True) == (
        '{\n    "return": {\n    },\n    "id": [\n        1,\n        {\n        },\n'
        '        [\n        ],\n        {\n            "a": [\n            ]\n        }\n'
        '    ]\n}')


def test_to_json_rejects_unknown_types():
    with pytest.raises(TypeError):
        to_json({"a": object()})
