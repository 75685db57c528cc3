"""``ansible-galaxy collection build`` + ``install`` into a clean path; ``ansible-doc`` sees it all.

The expected modules and roles are read from plugins/modules/ and roles/ of
the checkout, so the test grows with them: every module must be listed by
``ansible-doc -l blockdev.fleecing`` and its documentation must load, every
role must be listed by ``ansible-doc -t role -l blockdev.fleecing`` (which
needs its ``meta/argument_specs.yml``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]
FQ = "blockdev.fleecing"
#: Paths (or path prefixes) that must never be in the artifact.
NOT_SHIPPED = (".venv/", ".coord/", ".ci/", ".pytest_cache/", ".mypy_cache/", "tests/output/",
               "tests/helpers/", "tests/conftest.py", "bench/", "scripts/", "pytest.ini",
               "constraints.txt", "requirements-dev.txt", "requirements-test.txt")
#: The artifact stays small: the engine, the content and the docs.
MAX_ARTIFACT_BYTES = 3 * 1024 * 1024


def _bin(tool: str) -> str:
    here = Path(sys.executable).parent / tool
    return str(here) if here.exists() else tool


def _run(tool: str, *args: str, cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    """Run an ansible tool; fail the test with its output if it fails."""
    proc = subprocess.run([_bin(tool), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail("`%s %s` failed (exit %d):\n%s\n%s" % (tool, " ".join(args), proc.returncode,
                                                          proc.stdout, proc.stderr), pytrace=False)
    return proc


def expected_modules() -> List[str]:
    """FQCNs of the modules in plugins/modules/ of the checkout."""
    return sorted("%s.%s" % (FQ, p.stem) for p in (REPO / "plugins" / "modules").glob("*.py")
                  if not p.name.startswith("_"))


def expected_roles() -> List[str]:
    """FQCNs of the roles in roles/ of the checkout."""
    roles = REPO / "roles"
    return sorted("%s.%s" % (FQ, p.name) for p in roles.iterdir()
                  if p.is_dir() and not p.name.startswith(".")) if roles.is_dir() else []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_build_install_and_document(tmp_path: Path) -> None:
    env = {**os.environ, "ANSIBLE_HOME": str(tmp_path / "home"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections"),
           "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "false", "ANSIBLE_ROLES_PATH": str(tmp_path / "roles"),
           "PAGER": "cat"}

    # build: a small artifact without the checkout's tooling, caches or test suite
    _run("ansible-galaxy", "collection", "build", str(REPO), "--output-path", str(tmp_path / "dist"),
         cwd=tmp_path, env=env)
    tarball = tmp_path / "dist" / ("blockdev-fleecing-%s.tar.gz" % _version())
    assert tarball.is_file(), sorted(os.listdir(tmp_path / "dist"))
    assert tarball.stat().st_size < MAX_ARTIFACT_BYTES, tarball.stat().st_size
    with tarfile.open(tarball) as tar:
        names = [m.name + ("/" if m.isdir() else "") for m in tar.getmembers()]
    shipped = [n for n in names if n.startswith(NOT_SHIPPED) or "__pycache__" in n or n.endswith(".pyc")]
    assert not shipped, shipped
    for module in expected_modules():
        assert "plugins/modules/%s.py" % module.rsplit(".", 1)[1] in names, module
    assert "plugins/module_utils/blockd/qmp/schema.json" in names
    assert "meta/runtime.yml" in names and "MANIFEST.json" in names

    # install into a clean path
    _run("ansible-galaxy", "collection", "install", str(tarball), "-p", str(tmp_path / "collections"),
         cwd=tmp_path, env=env)
    installed = tmp_path / "collections" / "ansible_collections" / "blockdev" / "fleecing"
    manifest = json.loads((installed / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["namespace"] == "blockdev"
    assert manifest["collection_info"]["name"] == "fleecing"
    listed = json.loads(_run("ansible-galaxy", "collection", "list", FQ, "--format", "json",
                             cwd=tmp_path, env=env).stdout)
    assert list(listed) == [str(installed.parent.parent)], listed
    assert list(listed[str(installed.parent.parent)]) == [FQ], listed

    # ansible-doc lists every module, loads every module's documentation, lists every role
    modules = json.loads(_run("ansible-doc", "-l", FQ, "--json", cwd=tmp_path, env=env).stdout)
    assert sorted(modules) == expected_modules()
    docs = json.loads(_run("ansible-doc", "--json", *expected_modules(), cwd=tmp_path, env=env).stdout)
    for module in expected_modules():
        doc = docs[module]["doc"]
        assert doc["short_description"] and doc["version_added"] == "0.1.0", (module, doc)
        assert docs[module]["examples"] and docs[module]["return"] is not None, module
    roles = json.loads(_run("ansible-doc", "-t", "role", "-l", FQ, "--json", cwd=tmp_path, env=env).stdout)
    assert sorted(roles) == expected_roles()


def _version() -> str:
    """``version`` from galaxy.yml (read without a YAML parser: one plain line)."""
    for line in (REPO / "galaxy.yml").read_text().splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    raise AssertionError("galaxy.yml has no version line")
