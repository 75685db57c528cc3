# -*- coding: utf-8 -*-
"""blockd.qmp.schema / visitor: argument checking worded exactly like QEMU 7.2.

The expected messages are literals captured from qemu-storage-daemon 7.2.22:
QMP ``arguments`` through a raw socket client, command-line options from the
daemon's stderr.  (A differential run against qsd over ~10000 random
mutations of these shapes found no difference.)
"""

from __future__ import annotations

import json
import random
import string

import pytest

from blockd.errors import CommandNotFound, QMPError
from blockd.qmp.schema import SCHEMA_PATH, Schema
from blockd.qmp.visitor import (GHashSet, QapiVisitor, VisitError, strtoi64, strtosz,
                                strtou64)

S = Schema()
NULL = {"driver": "null-co", "node-name": "x1"}

# (command, arguments, desc from qsd 7.2)
QMP_CASES = [
    ("blockdev-add", {}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"node-name": "x"}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": 5}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", {"driver": "bogus", "node-name": 5},
     "Parameter 'driver' does not accept value 'bogus'"),
    ("blockdev-add", {"driver": "file", "node-name": "f1"}, "Parameter 'filename' is missing"),
    ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": 5},
     "Invalid parameter type for 'filename', expected: string"),
    ("blockdev-add", {"driver": "file", "node-name": 5, "filename": 5},
     "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "/x",
                      "cache": {"direct": "x"}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "/x", "cache": 5},
     "Invalid parameter type for 'cache', expected: object"),
    ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "/x",
                      "cache": {"bogus": 1}, "bogus2": 1}, "Parameter 'cache.bogus' is unexpected"),
    ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "/x", "locking": "maybe"},
     "Parameter 'locking' does not accept value 'maybe'"),
    ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "/x", "aio": 5},
     "Invalid parameter type for 'aio', expected: string"),
    # members are checked in schema order; unexpected ones only at the end
    ("blockdev-add", dict(NULL, bogus=1, size="x"),
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", dict(NULL, bogus=1, **{"read-only": "x"}),
     "Invalid parameter type for 'read-only', expected: boolean"),
    ("blockdev-add", dict(NULL, bogus=1, cache={"direct": 1}),
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "null-co", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    # which unexpected member is named follows GLib's hash table
    ("blockdev-add", dict(NULL, a=1, b=2), "Parameter 'b' is unexpected"),
    ("blockdev-add", dict(NULL, b=1, a=2), "Parameter 'b' is unexpected"),
    ("blockdev-add", dict(NULL, zz=1, aa=2, mm=3, driverx=4), "Parameter 'aa' is unexpected"),
    ("blockdev-add", dict(NULL, size=2**63), "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", dict(NULL, size=1.0), "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", dict(NULL, size=None), "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", dict(NULL, **{"latency-ns": 2**64}), "Parameter 'latency-ns' expects uint64"),
    ("blockdev-add", dict(NULL, **{"latency-ns": 1.5}), "Parameter 'latency-ns' expects uint64"),
    ("blockdev-add", dict(NULL, **{"latency-ns": True}), "Parameter 'latency-ns' expects uint64"),
    ("blockdev-add", dict(NULL, **{"read-zeroes": "on"}),
     "Invalid parameter type for 'read-zeroes', expected: boolean"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1"}, "Parameter 'file' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "bogus": 1}, "Parameter 'file' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": None},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": []},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": {}},
     "Parameter 'file.driver' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": {"driver": "bogus"}},
     "Parameter 'driver' does not accept value 'bogus'"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1",
                      "file": {"driver": "file", "filename": "/x", "bogus": 1}},
     "Parameter 'file.bogus' is unexpected"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": {"driver": "raw", "file": 5}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1",
                      "file": {"driver": "raw", "file": {"driver": "null-co", "size": "x"}}},
     "Invalid parameter type for 'file.file.size', expected: integer"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": {"driver": "null-co",
                                                                   "detect-zeroes": 5}},
     "Invalid parameter type for 'file.detect-zeroes', expected: string"),
    ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "n0", "offset": "x", "bogus": 1},
     "Invalid parameter type for 'offset', expected: integer"),
    ("blockdev-add", dict(NULL, **{"x-check-cache-dropped": 1}),
     "Parameter 'x-check-cache-dropped' is unexpected"),
    ("blockdev-add", {"driver": "host_device", "node-name": "f1", "filename": 1},
     "Invalid parameter type for 'filename', expected: string"),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "bogus": 1}, "Parameter 'file' is missing"),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "n0", "backing": 5},
     "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "n0",
                      "overlap-check": {"template": "x"}},
     "Parameter 'template' does not accept value 'x'"),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "c1", "file": "n0",
                      "target": "n0", "cbw-timeout": -1}, "Parameter 'cbw-timeout' expects uint32_t"),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "c1", "file": "n0",
                      "target": "n0", "bitmap": {"node": "n0"}}, "Parameter 'bitmap.name' is missing"),
    ("blockdev-add", {"driver": "throttle", "node-name": "t1", "file": "n0"},
     "Parameter 'throttle-group' is missing"),
    ("blockdev-add", {"driver": "snapshot-access", "node-name": "s1", "file": "n0", "x": 1},
     "Parameter 'x' is unexpected"),
    ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ("qmp_capabilities", {"enable": [5]}, "Invalid parameter type for 'enable[0]', expected: string"),
    ("qmp_capabilities", {"enable": ["oob", "foo"]}, "Parameter 'null' does not accept value 'foo'"),
    ("qmp_capabilities", {"bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("query-named-block-nodes", {"flat": "x"}, "Invalid parameter type for 'flat', expected: boolean"),
    ("blockdev-del", {}, "Parameter 'node-name' is missing"),
    ("blockdev-del", {"node-name": 1}, "Invalid parameter type for 'node-name', expected: string"),
    ("nbd-server-start", {}, "Parameter 'addr' is missing"),
    ("nbd-server-start", {"addr": {}}, "Parameter 'addr.type' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix"}}, "Parameter 'addr.data' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {}}}, "Parameter 'addr.data.path' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix", "path": "/x"}}, "Parameter 'addr.data' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "bogus": 1}}},
     "Parameter 'addr.data.bogus' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": 10809}}},
     "Invalid parameter type for 'addr.data.port', expected: string"),
    ("nbd-server-start", {"addr": "x"}, "Invalid parameter type for 'addr', expected: object"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x"}}, "max-connections": -1},
     "Parameter 'max-connections' expects uint32_t"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x"}}, "max-connections": "x"},
     "Parameter 'max-connections' expects uint64"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "0", "to": 65536}}},
     "Parameter 'to' expects uint16_t"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "0", "to": "x"}}},
     "Parameter 'addr.data.to' expects uint64"),
    ("nbd-server-add", {}, "Parameter 'device' is missing"),
    ("nbd-server-add", {"device": 1, "name": 1}, "Invalid parameter type for 'name', expected: string"),
    ("nbd-server-remove", {"name": "x", "mode": "bogus"}, "Parameter 'mode' does not accept value 'bogus'"),
    ("block-export-add", {}, "Parameter 'type' is missing"),
    ("block-export-add", {"type": "nbd"}, "Parameter 'id' is missing"),
    ("block-export-add", {"type": "nbd", "id": "e"}, "Parameter 'node-name' is missing"),
    ("block-export-add", {"type": "bogus", "id": "e"}, "Parameter 'type' does not accept value 'bogus'"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n0", "bitmaps": "x"},
     "Invalid parameter type for 'bitmaps', expected: array"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n0", "bitmaps": [1]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n0",
                          "bitmaps": ["a", {"node": "n0"}]}, "Parameter 'bitmaps[1].name' is missing"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n0",
                          "bitmaps": ["a", {"node": "n0", "name": "b", "x": 1}]},
     "Parameter 'bitmaps[1].x' is unexpected"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n0", "allocation-depth": 1,
                          "bogus": 1}, "Invalid parameter type for 'allocation-depth', expected: boolean"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n0", "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    ("block-export-del", {"mode": "hard"}, "Parameter 'id' is missing"),
    ("query-block-exports", {"x": 1}, "Parameter 'x' is unexpected"),
    ("quit", {"x": 1}, "Parameter 'x' is unexpected"),
]


@pytest.mark.parametrize("command,args,desc", QMP_CASES,
                         ids=["%s-%d" % (c[0], i) for i, c in enumerate(QMP_CASES)])
def test_validate_matches_qsd(command, args, desc):
    with pytest.raises(QMPError) as info:
        S.validate(command, args)
    assert info.value.desc == desc
    assert info.value.error_class == "GenericError"


VALID = [
    ("qmp_capabilities", {}), ("qmp_capabilities", {"enable": ["oob"]}), ("query-version", {}),
    ("blockdev-add", dict(NULL, size=2**63 - 1, **{"latency-ns": -1, "read-zeroes": True})),
    ("blockdev-add", dict(NULL, **{"latency-ns": 2**64 - 1})),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "file",
                                                                 "filename": "/x",
                                                                 "cache": {"direct": True}}}),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "n0", "offset": 0, "size": 512}),
    # a known driver without a modelled branch only has its base checked
    ("blockdev-add", {"driver": "vvfat", "node-name": "v", "dir": "/tmp", "anything": 1}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f", "backing": None}),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "::", "port": "10809"}},
                          "max-connections": 0}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "writable": True,
                          "bitmaps": ["b", {"node": "n", "name": "b"}]}),
    ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n"}),
    ("block-export-del", {"id": "e", "mode": "hard"}),
]


@pytest.mark.parametrize("command,args", VALID)
def test_valid_arguments_pass(command, args):
    S.validate(command, args)


def test_unknown_command():
    with pytest.raises(CommandNotFound) as info:
        S.validate("no-such-cmd", {})
    assert info.value.desc == "The command no-such-cmd has not been found"


def test_schema_document_shape():
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        doc = json.load(handle)
    assert doc["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert set(doc["commands"]) >= {
        "qmp_capabilities", "query-version", "query-commands", "quit", "blockdev-add",
        "blockdev-del", "query-named-block-nodes", "nbd-server-start", "nbd-server-stop",
        "nbd-server-add", "nbd-server-remove", "block-export-add", "block-export-del",
        "query-block-exports"}
    assert set(doc["events"]) >= {"BLOCK_EXPORT_DELETED"}
    for entry in doc["commands"].values():
        assert set(entry) <= {"args", "returns", "doc", "features"} and entry["doc"]
    drivers = doc["definitions"]["BlockdevDriver"]["enum"]
    assert len(drivers) == 42 and "null-co" in drivers and "vvfat" in drivers
    base = list(doc["definitions"]["BlockdevOptions"]["properties"])
    assert base[0] == "driver"
    for case in doc["definitions"]["BlockdevOptions"]["allOf"]:
        branch = doc["definitions"][case["then"]["$ref"].rsplit("/", 1)[1]]
        assert list(branch["properties"])[:len(base)] == base
        assert branch["additionalProperties"] is False
    # every $ref resolves
    text = json.dumps(doc)
    for ref in set(part.split('"')[0] for part in text.split('"$ref": "#/definitions/')[1:]):
        assert ref in doc["definitions"], ref
    assert S.command("nbd-server-add")["features"] == ["deprecated"]
    assert "BlockdevOptions" in S.definitions()


def test_returns_and_events_are_checkable():
    S.check_returns("query-version", {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                      "package": ""})
    S.check_returns("query-block-exports", [{"type": "nbd", "id": "e", "node-name": "n",
                                             "shutting-down": False}])
    S.check_returns("blockdev-add", {})
    S.check_event("BLOCK_EXPORT_DELETED", {"id": "e"})
    import jsonschema  # pylint: disable=import-outside-toplevel
    with pytest.raises(jsonschema.ValidationError):
        S.check_event("BLOCK_EXPORT_DELETED", {})


# --- command line (keyval) ------------------------------------------------------------------
def kv(text: str, implied: str = None) -> dict:
    """A small keyval_parse() for the tests: a,b.c=x -> {implied: a, b: {c: x}}."""
    tree: dict = {}
    for n, part in enumerate(text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            assert n == 0 and implied
            key, value = implied, part
        node = tree
        keys = key.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    def listify(obj):
        if isinstance(obj, dict):
            obj = {k: listify(v) for k, v in obj.items()}
            if obj and all(k.isdigit() for k in obj):
                return [obj[str(i)] for i in range(len(obj))]
        return obj
    return listify(tree)


# (type, option text, implied key, qsd 7.2's error or None if accepted)
KEYVAL_CASES = [
    ("BlockdevOptions", "null-co,node-name=x,size=abc", "driver", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=x,size=1M", "driver", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=x,size=", "driver", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=x,size=08", "driver", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=x,size=1.5", "driver", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=x,size=9223372036854775808", "driver",
     "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=x,read-zeroes=maybe", "driver",
     "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("BlockdevOptions", "null-co,node-name=x,read-zeroes=ON", "driver",
     "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("BlockdevOptions", "null-co,node-name=x,latency-ns=18446744073709551616", "driver",
     "Parameter 'latency-ns' expects integer"),
    ("BlockdevOptions", "null-co,node-name=x,cache.direct=x", "driver",
     "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("BlockdevOptions", "null-co,node-name=x,cache=x", "driver",
     "Invalid parameter type for 'cache', expected: object"),
    ("BlockdevOptions", "null-co,node-name=x,cache.0=1", "driver",
     "Invalid parameter type for 'cache', expected: object"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=bogus", "driver",
     "Parameter 'driver' does not accept value 'bogus'"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=null-co,file.size=x", "driver",
     "Parameter 'file.size' expects integer"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=null-co,file.bogus=1", "driver",
     "Parameter 'file.bogus' is unexpected"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=raw", "driver", "Parameter 'file.file' is missing"),
    ("BlockdevOptions", "null-co,node-name=x,a=1,b=2,c=3", "driver", "Parameter 'b' is unexpected"),
    ("BlockdevOptions", "file,node-name=x,filename.x=1", "driver",
     "Parameters 'filename.*' are unexpected"),
    ("BlockdevOptions", "copy-before-write,node-name=c,file=n0,target=n0,cbw-timeout=-1", "driver",
     "Parameter 'cbw-timeout' expects uint32_t"),
    ("BlockdevOptions", "qcow2,node-name=q,file=n0,overlap-check.template=all,"
                        "overlap-check.main-header=z", "driver",
     "Parameter 'overlap-check.main-header' expects 'on' or 'off'"),
    ("NbdServerOptions", "addr.type=inet,addr.host=127.0.0.1,addr.port=0,max-connections=x", None,
     "Parameter 'max-connections' expects integer"),
    ("NbdServerOptions", "addr.type=inet,addr.host=127.0.0.1,addr.port=0,max-connections=4294967296",
     None, "Parameter 'max-connections' expects uint32_t"),
    ("NbdServerOptions", "addr.type=inet,addr.host=127.0.0.1,addr.port=0,addr.to=70000", None,
     "Parameter 'to' expects uint16_t"),
    ("NbdServerOptions", "addr.type=bogus", None, "Parameter 'type' does not accept value 'bogus'"),
    ("NbdServerOptions", "addr.path=/tmp/x", None, "Parameter 'addr.type' is missing"),
    ("NbdServerOptions", "addr.type=unix", None, "Parameter 'addr.path' is missing"),
    ("NbdServerOptions", "addr.type=fd,addr.str=x,tls-creds.a=1", None,
     "Parameters 'tls-creds.*' are unexpected"),
    ("BlockExportOptions", "type=nbd,id=e,node-name=n0,writable=maybe", "type",
     "Parameter 'writable' expects 'on' or 'off'"),
    ("BlockExportOptions", "type=nbd,id=e,node-name=n0,bitmaps.0.node=n0", "type",
     "Parameter 'bitmaps.0.name' is missing"),
    ("BlockExportOptions", "type=nbd,id=e,node-name=n0,bitmaps=x", "type",
     "Invalid parameter type for 'bitmaps', expected: array"),
    ("BlockExportOptions", "nbd,id=e", "type", "Parameter 'node-name' is missing"),
    ("BlockExportOptions", "nbd,id=e,node-name=n0,bitmaps.0.node=n0,bitmaps.0.name=b,bitmaps.0.x=1",
     "type", "Parameter 'bitmaps.0.x' is unexpected"),
    # accepted by qsd
    ("BlockdevOptions", "null-co,node-name=x,size=0x100000", "driver", None),
    ("BlockdevOptions", "null-co,node-name=x,size=010", "driver", None),
    ("BlockdevOptions", "null-co,node-name=x,size= 5", "driver", None),
    ("BlockdevOptions", "null-co,node-name=x,size=+5", "driver", None),
    ("BlockdevOptions", "null-co,node-name=x,read-zeroes=y", "driver", None),
    ("BlockdevOptions", "null-co,node-name=x,cache.direct=on,cache.no-flush=n", "driver", None),
]


@pytest.mark.parametrize("typ,text,implied,desc", KEYVAL_CASES, ids=[c[1] for c in KEYVAL_CASES])
def test_keyval_matches_qsd(typ, text, implied, desc):
    if desc is None:
        S.coerce_keyval(typ, kv(text, implied))
        return
    with pytest.raises(QMPError) as info:
        S.coerce_keyval(typ, kv(text, implied))
    assert info.value.desc == desc


def test_keyval_converts_leaves():
    out = S.coerce_keyval("blockdev-add", kv(
        "raw,node-name=r,offset=0x200,file.driver=null-co,file.size=010,file.read-zeroes=on,"
        "file.cache.direct=off,file.latency-ns=-1", "driver"))
    assert out == {"driver": "raw", "node-name": "r", "offset": 512,
                   "file": {"driver": "null-co", "size": 8, "read-zeroes": True,
                            "cache": {"direct": False}, "latency-ns": 2**64 - 1}}
    out = S.coerce_keyval("NbdServerOptions", kv("addr.type=unix,addr.path=/s,max-connections=5"))
    assert out == {"addr": {"type": "unix", "path": "/s"}, "max-connections": 5}
    out = S.coerce_keyval("block-export-add", kv("nbd,id=e,node-name=n,bitmaps.0=b,"
                                                 "bitmaps.1.node=n,bitmaps.1.name=c", "type"))
    assert out["bitmaps"] == ["b", {"node": "n", "name": "c"}]
    out = S.coerce_keyval("MonitorOptions", kv("c0,pretty=on", "chardev"))
    assert out == {"chardev": "c0", "pretty": True}
    with pytest.raises(KeyError):
        S.coerce_keyval("NoSuchType", {})


def test_c_number_parsing():
    assert strtoi64("0x10") == 16 and strtoi64("-010") == -8 and strtoi64(" +5") == 5
    assert strtoi64("") is None and strtoi64("0x") is None and strtoi64("5 ") is None
    assert strtoi64("9223372036854775807") == 2**63 - 1 and strtoi64("9223372036854775808") is None
    assert strtou64("-1") == 2**64 - 1 and strtou64("18446744073709551616") is None
    assert strtosz("1k") == 1024 and strtosz("1M") == 1 << 20 and strtosz("1.5G") == 3 << 29
    assert strtosz("0x10") == 16 and strtosz("512B") == 512 and strtosz("1.k") == 1024
    assert strtosz("16E") is None and strtosz("15E") == 15 << 60
    for bad in ("-1", "1.5", "1e3", "0x1.8", "1X", "", " -5k", "1.5e3k"):
        assert strtosz(bad) is None, bad


def test_ghash_replays_glib():
    # GLib orders what is left after removals; values observed through qsd above
    table = GHashSet()
    for key in ("driver", "node-name", "a", "b"):
        table.insert(key)
    table.remove("driver")
    table.remove("node-name")
    assert table.first() == "b"
    table = GHashSet()
    keys = ["k%d" % i for i in range(40)]
    for key in keys:
        table.insert(key)
    for key in keys[:38]:
        table.remove(key)          # shrinks the table (rehash) on the way
    assert table.first() in ("k38", "k39") and table.size == 8


# --- jsonschema and the QEMU visitor must agree on validity -------------------------------
def _mutations(seed: int, count: int):
    rnd = random.Random(seed)
    values = [1, -1, 0, 2**63, 2**64, 1.5, True, False, None, "x", "on", [], {}, [1],
              {"a": 1}, "n0"]
    bases = [
        ("blockdev-add", {"driver": "null-co", "node-name": "fz", "size": 4096, "latency-ns": 0,
                          "read-zeroes": True, "cache": {"direct": False}, "detect-zeroes": "off"}),
        ("blockdev-add", {"driver": "file", "node-name": "fz", "filename": "/x", "aio": "threads",
                          "locking": "off", "aio-max-batch": 0}),
        ("blockdev-add", {"driver": "raw", "node-name": "fz", "offset": 0,
                          "file": {"driver": "null-co", "cache": {"direct": False}}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "n", "backing": None,
                          "overlap-check": {"template": "all"}, "encrypt": {"format": "aes"}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/s"}},
                              "max-connections": 5}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n", "writable": False,
                              "bitmaps": ["b", {"node": "n0", "name": "b"}]}),
    ]

    def paths(obj, prefix=()):
        for key, val in obj.items():
            yield prefix + (key,)
            if isinstance(val, dict):
                yield from paths(val, prefix + (key,))

    for _ in range(count):
        command, args = rnd.choice(bases)
        args = json.loads(json.dumps(args))
        for _ in range(rnd.randint(1, 3)):
            candidates = list(paths(args))
            if not candidates:
                break
            path = rnd.choice(candidates)
            parent = args
            for key in path[:-1]:
                parent = parent[key]
            roll = rnd.random()
            if roll < 0.4:
                parent[path[-1]] = json.loads(json.dumps(rnd.choice(values)))
            elif roll < 0.6:
                del parent[path[-1]]
            else:
                for _ in range(rnd.randint(1, 10)):
                    parent["".join(rnd.choice(string.ascii_lowercase + "-")
                                   for _ in range(rnd.randint(1, 8)))] = json.loads(
                                       json.dumps(rnd.choice(values)))
        yield command, args


def test_jsonschema_and_visitor_agree():
    defs = json.load(open(SCHEMA_PATH, encoding="utf-8"))["definitions"]
    # pylint: disable=protected-access
    seen = {True: 0, False: 0}
    for command, args in _mutations(1234, 1500):
        valid = S._validator(command, "args").is_valid(args)
        try:
            QapiVisitor(defs).visit(S.command(command)["args"], args)
            visited = True
        except VisitError:
            visited = False
        assert valid == visited, (command, args)
        seen[valid] += 1
    assert seen[True] > 50 and seen[False] > 500
