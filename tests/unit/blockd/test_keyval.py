"""QEMU's dotted key=value syntax, as qemu-storage-daemon's command line takes it."""
import pytest

from blockd import keyval


def test_implied_key_and_nesting():
    assert keyval.parse("file,node-name=f,cache.direct=on,cache.no-flush=off", "driver") == {
        "driver": "file", "node-name": "f", "cache": {"direct": "on", "no-flush": "off"}}


def test_double_comma_is_a_literal_comma():
    assert keyval.parse("driver=file,filename=a,,b.img", None) == {"driver": "file", "filename": "a,b.img"}


def test_numeric_parts_make_lists():
    assert keyval.parse("bitmaps.0=a,bitmaps.1=b", None) == {"bitmaps": ["a", "b"]}


def test_list_with_gap_is_refused():
    with pytest.raises(keyval.KeyvalError):
        keyval.parse("bitmaps.0=a,bitmaps.2=b", None)


def test_json_form():
    assert keyval.parse('{"driver": "null-co", "size": 4096}', "driver") == {"driver": "null-co", "size": 4096}


def test_inconsistent_use_is_refused():
    with pytest.raises(keyval.KeyvalError, match="used inconsistently"):
        keyval.parse("addr=x,addr.type=unix", None)


def test_value_without_key_after_first_is_refused():
    with pytest.raises(keyval.KeyvalError, match="Expected '='"):
        keyval.parse("driver=file,oops", "driver")


@pytest.mark.parametrize("text,expected", [("on", True), ("yes", True), ("off", False), ("no", False)])
def test_bools(text, expected):
    assert keyval.parse_bool(text, "x") is expected


def test_bad_bool():
    with pytest.raises(keyval.KeyvalError, match="expects 'on' or 'off'"):
        keyval.parse_bool("maybe", "writable")
