"""The collection's shape: every module tested, every QMP module in the action group."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (REPO / "plugins" / "modules").glob("*.py")
                 if p.stem != "__init__")


def test_there_are_modules():
    assert "fleece" in MODULES and "blockd_info" in MODULES


def test_every_module_has_an_integration_test():
    tests = {p.name for p in (REPO / "tests" / "integration" / "modules").glob("test_*.py")}
    untested = [m for m in MODULES
                if not any(t == f"test_{m}.py" or t.startswith(f"test_{m}_") for t in tests)]
    assert untested == []


def test_qmp_modules_are_exactly_the_action_group():
    runtime = yaml.safe_load((REPO / "meta" / "runtime.yml").read_text())
    group = set(runtime["action_groups"]["blockd"])
    qmp = {m for m in MODULES
           if re.search(r"module_utils\.common import [^;]*?BlockdModule",
                        (REPO / "plugins" / "modules" / f"{m}.py").read_text())}
    assert group == qmp


def test_module_reference_lists_every_module():
    text = (REPO / "docs" / "modules.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
    assert listed == set(MODULES)
