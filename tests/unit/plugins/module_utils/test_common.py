# -*- coding: utf-8 -*-
# Copyright: blockdev.fleecing contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""plugins/module_utils/common.py: BlockdModule against a real blockd engine.

The module arguments are given the way Ansible gives them
(``ansible.module_utils.testing.patch_module_args``); the result is what the
module prints on stdout when it exits, as Ansible reads it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type  # pylint: disable=invalid-name

import contextlib
import json

import pytest

from ansible.module_utils.testing import patch_module_args

from ansible_collections.blockdev.fleecing.plugins.module_utils.common import (
    QMP_ARGUMENT_SPEC, BlockdModule, is_subset, make_diff)


@pytest.fixture
def make_module():
    """make_module(ARGS, SPEC=None, **kw): a BlockdModule given module arguments ARGS.

    ``_ansible_*`` keys set check mode, diff... The arguments stay patched in
    until the test ends: exiting the module needs them too.
    """
    with contextlib.ExitStack() as stack:
        def make(args, spec=None, **kwargs):
            stack.enter_context(patch_module_args(args))
            return BlockdModule(spec or {}, **kwargs)
        yield make


def _ended(capsys, call, *args, **kwargs):
    """Run CALL, which must end the module; (exit status, the JSON result it printed)."""
    with pytest.raises(SystemExit) as ended:
        call(*args, **kwargs)
    return ended.value.code, json.loads(capsys.readouterr().out)


def test_connection_options_are_merged_with_defaults(make_module):
    mod = make_module({"name": "x"}, dict(name=dict(type="str", required=True)))
    assert mod.params["socket"] == "/run/blockd/qmp.sock"
    assert mod.params["timeout"] == 30.0
    assert mod.params["name"] == "x"
    assert mod.check_mode is False
    assert set(QMP_ARGUMENT_SPEC) == {"socket", "timeout"}
    assert make_module({"_ansible_check_mode": True}).check_mode is True


def test_queries_read_the_engine(make_module, blockd_engine, capsys):
    mod = make_module({"socket": blockd_engine.qmp_path})
    nodes = mod.query_nodes()
    assert sorted(nodes) == ["disk0", "file0"]
    assert nodes["disk0"]["drv"] == "raw"
    assert mod.query_exports() == {}
    assert mod.query_jobs() == {}
    assert mod.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"}) == {}
    status, result = _ended(capsys, mod.exit, before={}, after={"b0": True}, bitmap="b0")
    assert status == 0
    assert result["changed"] is False and result["bitmap"] == "b0"
    assert "diff" not in result  # no --diff
    assert "failed" not in result


def test_exit_with_diff(make_module, blockd_engine, capsys):
    mod = make_module({"socket": blockd_engine.qmp_path, "_ansible_diff": True})
    mod.result["changed"] = True
    after = {"node-name": "n0", "driver": "raw"}
    status, result = _ended(capsys, mod.exit, before=None, after=after)
    assert status == 0
    assert result["changed"] is True
    assert result["diff"] == {"before": {}, "after": after}


def test_engine_error_fails_the_task_with_its_message(make_module, blockd_engine, capsys):
    mod = make_module({"socket": blockd_engine.qmp_path})
    args = {"node": "nope", "name": "b0"}
    status, result = _ended(capsys, mod.execute, "block-dirty-bitmap-add", args)
    assert status == 1
    assert result["failed"] is True
    assert result["msg"].startswith("block-dirty-bitmap-add failed: ")
    assert "nope" in result["msg"]
    assert result["error_class"] == "GenericError"
    assert result["qmp_command"] == "block-dirty-bitmap-add"
    assert result["qmp_arguments"] == args
    assert result["changed"] is False


def test_ignored_error_classes_return_none(make_module, blockd_engine, capsys):
    mod = make_module({"socket": blockd_engine.qmp_path})
    assert mod.execute("no-such-command", ignore=("CommandNotFound",)) is None
    # The session is still good, and nothing was changed.
    assert sorted(mod.query_nodes()) == ["disk0", "file0"]
    status, result = _ended(capsys, mod.exit)
    assert status == 0 and result["changed"] is False


def test_engine_not_running_fails_clearly(make_module, tmp_path, capsys):
    path = str(tmp_path / "qmp.sock")
    mod = make_module({"socket": path, "timeout": 2})
    status, result = _ended(capsys, mod.query_nodes)
    assert status == 1
    assert result["msg"] == "QMP socket %s does not exist: is the engine running?" % path


def test_engine_gone_mid_task_fails_clearly(make_module, blockd_engine, capsys):
    mod = make_module({"socket": blockd_engine.qmp_path})
    assert mod.execute("quit") == {}
    assert blockd_engine.proc.wait(30) == 0
    status, result = _ended(capsys, mod.query_exports)
    assert status == 1
    assert result["qmp_command"] == "query-block-exports"
    assert blockd_engine.qmp_path in result["msg"]


def test_make_diff():
    before = {"a": [1]}
    diff = make_diff(before, None)
    assert diff == {"before": {"a": [1]}, "after": {}}
    before["a"].append(2)  # a deep copy: later changes do not leak into the diff
    assert diff["before"] == {"a": [1]}
    assert make_diff(None, {"b": 1}) == {"before": {}, "after": {"b": 1}}


@pytest.mark.parametrize("wanted, actual, expected", [
    ({"a": 1}, {"a": 1, "b": 2}, True),
    ({"a": 1}, {"a": 2}, False),
    ({"a": 1}, {}, False),
    ({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, True),
    ({"a": {"b": 1}}, {"a": 5}, False),
    ([{"a": 1}], [{"a": 1, "b": 2}], True),
    ([{"a": 1}], [{"a": 1}, {"a": 1}], False),
    ([1], 1, False),
    ("x", "x", True),
    (1, True, True),  # Python equality, as the engine's JSON gives it
])
def test_is_subset(wanted, actual, expected):
    assert is_subset(wanted, actual) is expected
