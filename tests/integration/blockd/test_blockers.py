"""Every op blocker of the matrix, driven through every command that names a node.

``blockd.graph.blockers.COMMAND_OPS`` says, per QMP command, which argument meets
which block operation.  This test walks that table: for each entry it puts the named
node in a role that forbids the operation (the backing node of an overlay, or the
target of a running backup job), runs the command, and expects QEMU's refusal, the
same on qsd and blockd.  A command added to the table without a blocker check fails
here; an operation nobody can exercise fails ``test_every_entry_is_exercised``.
"""

import pytest

from helpers import MiB, make_raw_image, qemu_img
from blockd.graph import blockers

SIZE = 4 * MiB


def _setup(d, tmp_path):
    """base <-backing- ovl;  src --backup(sync=none)--> tgt;  spare qcow2 nodes."""
    make_raw_image(tmp_path / "base.raw", SIZE)
    make_raw_image(tmp_path / "src.raw", SIZE)
    for name in ("ovl", "tgt", "spare", "spare2"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / f"{name}.qcow2"), str(SIZE))
    q = d.qmp

    def add(name, driver, filename, **extra):
        q.cmd_raw("blockdev-add", {"node-name": name, "driver": driver, **extra,
                                   "file": {"driver": "file", "filename": str(filename)}})
    add("base", "raw", tmp_path / "base.raw")
    add("ovl", "qcow2", tmp_path / "ovl.qcow2", backing="base")
    add("src", "raw", tmp_path / "src.raw")
    add("tgt", "qcow2", tmp_path / "tgt.qcow2", backing=None)
    add("spare", "qcow2", tmp_path / "spare.qcow2", backing=None)
    add("spare2", "qcow2", tmp_path / "spare2.qcow2", backing=None)
    q.cmd_raw("blockdev-backup", {"job-id": "j0", "device": "src", "target": "tgt",
                                  "sync": "none"})
    return q


#: A node in each role, and what QEMU says when the role blocks an operation.
ROLES = {
    "backing": ("base", "Node 'base' is busy: node is used as backing hd of 'ovl'"),
    "job": ("tgt", "Node 'tgt' is busy: block device is in use by block job: backup"),
}


#: Commands that word the refusal their own way (qmp_block_resize: QERR_DEVICE_IN_USE
#: with the BlockBackend name, which nodes do not have).
OWN_TEXT = {"block_resize": "Device '(null)' is in use"}


def _args(command, arg, node, tmp_path):
    """Arguments of ``command`` with ``node`` at ``arg`` and valid values elsewhere."""
    if command == "blockdev-del":
        return {"node-name": node}
    if command == "block_resize":
        return {"node-name": node, "size": 2 * SIZE}
    if command == "blockdev-backup":
        other = {"device": "spare", "target": "spare2"}
        other[arg] = node
        return {"job-id": "jx", "sync": "full", **other}
    if command == "blockdev-snapshot-sync":
        return {"node-name": node, "snapshot-file": str(tmp_path / "snap.qcow2"),
                "format": "qcow2"}
    if command == "blockdev-snapshot":
        return {"node": node, "overlay": "spare"}
    raise AssertionError("no argument builder for %s: add one" % command)


def _cases():
    for command, ops in sorted(blockers.COMMAND_OPS.items()):
        for arg, op in sorted((ops or {}).items()):
            yield command, arg, op


def _role_for(op):
    for role in ("backing", "job"):
        if op in blockers.MATRIX[role][0]:
            return role
    raise AssertionError("no role blocks %s" % op)


def test_every_entry_is_exercised():
    """Each (command, argument, operation) of the table maps onto a blocking role here."""
    cases = list(_cases())
    assert len(cases) >= 5
    for _command, _arg, op in cases:
        assert op in blockers.ALL
        _role_for(op)


@pytest.mark.parametrize("command,arg,op", list(_cases()))
def test_command_refused_on_blocked_node(engine, daemon, tmp_path, command, arg, op):
    d = daemon(engine)
    q = _setup(d, tmp_path)
    node, text = ROLES[_role_for(op)]
    before = q.cmd("query-named-block-nodes", flat=True)
    reply = q.cmd_raw(command, _args(command, arg, node, tmp_path))
    assert "error" in reply, reply
    err = reply["error"]
    assert err["class"] == "GenericError"
    assert err["desc"] == OWN_TEXT.get(command, text)
    assert q.cmd("query-named-block-nodes", flat=True) == before
    assert not (tmp_path / "snap.qcow2").exists()
    assert [j["id"] for j in q.cmd("query-jobs")] == ["j0"]
