"""ansible-test sanity, units and integration on the collection as ansible-galaxy builds it.

Each test builds the artifact (``ansible-galaxy collection build``, honouring
galaxy.yml's ``build_ignore``), unpacks it into
``<tmp>/ansible_collections/blockdev/fleecing/`` -- ansible-test runs only
inside such a tree, and rejects a symlinked one -- and runs one ansible-test
command there.  So what is checked is exactly what ships: plugins, roles,
playbooks, meta, docs, and ansible-test's own tests (tests/config.yml,
tests/unit/plugins, tests/integration/targets); the checkout's pytest suite,
bench/ and scripts/ are not part of the artifact (see docs/testing.md).

ansible-test bootstraps pip in the virtual environments it makes from a
download this machine cannot reach; ``install_get_pip_standin()`` caches the
offline stand-in tests/ansible_test/get_pip_standin.py under the name it looks
for.  The sanity and unit venvs (``--venv``) are cached in
``~/.ansible/test/venv``; their requirements come from the package registry.

A failing ansible-test fails the test with its output.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "ansible_test" / "get_pip_standin.py"
#: The Python ansible-test runs the tests with (the controller's, i.e. .venv's).
PYTHON = "%d.%d" % sys.version_info[:2]

pytestmark = pytest.mark.slow


def _bin(tool: str) -> str:
    """TOOL from the test venv (where ansible-core is installed), else from PATH."""
    here = Path(sys.executable).parent / tool
    return str(here) if here.exists() else tool


def _env() -> dict:
    """The environment of the ansible commands: the venv's tools first on PATH."""
    return {**os.environ, "PATH": "%s:%s" % (Path(sys.executable).parent, os.environ.get("PATH", "")),
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}


def install_get_pip_standin() -> Path:
    """Cache the get-pip stand-in as ``~/.ansible/test/cache/get_pip_<ver>.py``; its path.

    <ver> is the pip version the installed ansible-test bootstraps (24.2 for
    ansible-core 2.19).  Replaced atomically when it differs.
    """
    import ansible_test  # pylint: disable=import-outside-toplevel
    src = (Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py").read_text()
    match = re.search(r"default_packages\s*=\s*dict\(\s*pip='([0-9.]+)'", src)
    assert match, "cannot find the pip version ansible-test bootstraps"
    cache = Path.home() / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / ("get_pip_%s.py" % match.group(1).replace(".", "_"))
    if not (target.exists() and filecmp.cmp(STANDIN, target, shallow=False)):
        tmp = cache / (".%s.%d" % (target.name, os.getpid()))
        shutil.copyfile(STANDIN, tmp)
        os.replace(tmp, target)
    return target


def build_collection(out: Path) -> Path:
    """``ansible-galaxy collection build`` of the checkout into OUT; the tarball."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([_bin("ansible-galaxy"), "collection", "build", str(REPO),
                           "--output-path", str(out), "--force"],
                          capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL, env=_env())
    if proc.returncode != 0:
        pytest.fail("ansible-galaxy collection build failed (%d):\n%s\n%s"
                    % (proc.returncode, proc.stdout, proc.stderr), pytrace=False)
    tarballs = sorted(out.glob("blockdev-fleecing-*.tar.gz"))
    assert len(tarballs) == 1, tarballs
    return tarballs[0]


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """The built collection unpacked in <tmp>/ansible_collections/blockdev/fleecing."""
    tarball = build_collection(tmp_path / "dist")
    root = tmp_path / "ansible_collections" / "blockdev" / "fleecing"
    root.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(root)  # our own artifact, just built
    install_get_pip_standin()
    return root


def ansible_test(root: Path, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``ansible-test ARGS`` in the collection ROOT; fail the test with its output if it fails."""
    argv = [_bin("ansible-test"), *args, "--color", "no"]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL, env=_env())
    took = time.monotonic() - start
    sys.stderr.write("%s: %.0f s\n" % (" ".join(argv[1:3]), took))
    if proc.returncode != 0:
        # pip's chatter while making venvs buries the findings: keep what ansible-test says.
        noise = re.compile(r"^\s*(Collecting|Downloading|Using cached|Looking in|Processing|Installing|"
                           r"Successfully|Attempting|Found existing|Uninstalling|Requirement already|"
                           r"WARNING: Location|━)")
        out = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                        if not noise.match(line))
        pytest.fail("`%s` failed (exit %d) in %s:\n%s"
                    % (" ".join(argv[1:]), proc.returncode, root, out[-20000:]), pytrace=False)
    return proc


@pytest.mark.timeout(1800)
def test_sanity(collection: Path) -> None:
    """Every default sanity test (validate-modules, pylint, pep8, import, compile, yamllint...)."""
    proc = ansible_test(collection, ["sanity", "--venv", "--python", PYTHON], timeout=1700)
    out = proc.stdout + proc.stderr
    for test in ("validate-modules", "pylint", "pep8", "import", "compile", "yamllint",
                 "ansible-doc", "runtime-metadata"):
        assert re.search(r'Running sanity test "%s"' % re.escape(test), out), (test, out[-5000:])
    assert not list(collection.glob("tests/sanity/ignore-*.txt")), "no ignore entries allowed"


@pytest.mark.timeout(900)
def test_units(collection: Path) -> None:
    """tests/unit/plugins (module_utils against a real blockd) under ansible-test's pytest."""
    proc = ansible_test(collection, ["units", "--venv", "--python", PYTHON], timeout=800)
    out = proc.stdout + proc.stderr
    match = re.search(r"(\d+) passed", out)
    assert match and int(match.group(1)) >= 20, out[-5000:]
    assert not re.search(r"\d+ (failed|error|skipped)", out), out[-5000:]


@pytest.mark.timeout(900)
def test_integration_targets(collection: Path) -> None:
    """Every target in tests/integration/targets, run by ansible-playbook on localhost."""
    targets = sorted(p.name for p in (collection / "tests" / "integration" / "targets").iterdir()
                     if p.is_dir())
    assert "blockd_info" in targets
    proc = ansible_test(collection, ["integration", "--local", "--python", PYTHON], timeout=800)
    out = proc.stdout + proc.stderr
    for target in targets:
        assert "Running %s integration test role" % target in out, (target, out[-5000:])
    assert "failed=0" in out and not re.search(r"failed=[1-9]", out), out[-5000:]
