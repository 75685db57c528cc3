"""blockd's QMP schema is qsd 7.2's: every command and event checked against a live qsd.

``qmp/schema.json`` was generated from QEMU's QAPI sources and from qsd's
introspection (``tests/unit/qmp/gen_*.py``); this test keeps it honest against
the daemon itself: member names and order, optionality, enum values, unions.
"""

import json
import os

import pytest

from helpers.qapi import SchemaComparison

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "plugins", "module_utils",
                      "blockd", "qmp", "schema.json")


@pytest.fixture(scope="module")
def introspection(tmp_path_factory):
    from helpers import DaemonFactory
    factory = DaemonFactory(tmp_path_factory.mktemp("qsd"))
    try:
        d = factory("qsd")
        yield d.qmp.cmd("query-qmp-schema")
    finally:
        factory.finish()


@pytest.fixture(scope="module")
def schema():
    with open(SCHEMA) as f:
        return json.load(f)


def test_every_command_matches_qsd(introspection, schema):
    cmp = SchemaComparison(schema["definitions"], introspection)
    for name, entry in schema["commands"].items():
        assert name in cmp.by, "qsd has no command %s" % name
        cmp.command(name, entry)
    assert cmp.problems == []


def test_every_event_matches_qsd(introspection, schema):
    cmp = SchemaComparison(schema["definitions"], introspection)
    for name, entry in schema["events"].items():
        cmp.event(name, entry)
    assert cmp.problems == []


def test_comparison_catches_a_difference(introspection, schema):
    """The comparison can fail: a dropped member and a changed enum are both seen."""
    defs = json.loads(json.dumps(schema["definitions"]))
    defs["MirrorSyncMode"]["enum"] = defs["MirrorSyncMode"]["enum"][:-1]
    del defs["BlockdevBackup"]["properties"]["speed"]
    cmp = SchemaComparison(defs, introspection)
    cmp.command("blockdev-backup", schema["commands"]["blockdev-backup"])
    kinds = sorted(p[1] for p in cmp.problems)
    assert kinds == ["members"], cmp.problems
    cmp = SchemaComparison(defs, introspection)
    cmp.command("transaction", schema["commands"]["transaction"])
    assert any(p[1] == "enum" for p in cmp.problems), cmp.problems
