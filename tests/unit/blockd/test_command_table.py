"""The command table: schema, handlers, blocker matrix and docs agree."""
import os

from blockd.commands import load_all
from blockd.graph import blockers
from blockd.qmp import docgen
from blockd.qmp.schema import Schema

REPO = os.path.join(os.path.dirname(__file__), "..", "..", "..")


def test_every_handler_has_a_schema_entry():
    schema = set(Schema.default().commands())
    missing = set(load_all()) - schema
    assert not missing, "handlers without schema: %s" % sorted(missing)


def test_every_command_is_classified_for_op_blockers():
    """A new command must say which op it performs (or that it changes no graph)."""
    for name in Schema.default().commands():
        assert name in blockers.COMMAND_OPS or name in blockers.NON_GRAPH_COMMANDS, name
    for ops in blockers.COMMAND_OPS.values():
        assert ops is None or (ops and set(ops.values()) <= blockers.ALL), ops


def test_docs_are_generated_from_the_schema():
    with open(os.path.join(REPO, "docs", "qmp.md")) as f:
        committed = f.read()
    assert committed == docgen.render(handled=list(load_all())), \
        "docs/qmp.md is stale: PYTHONPATH=plugins/module_utils python3 -m blockd.qmp.docgen > docs/qmp.md"
