"""Shared pytest configuration and fixtures.

Fixtures (see docs/testing.md):
  daemon  factory: daemon(kind, *qsd_args, qmp=True, nbd=False, cwd=None, env=None,
          check_alive=True, timeout=20.0) -> helpers.Daemon; kind is "blockd" or "qsd".
          Every daemon is killed at teardown; its stderr is attached to failure reports.
  engine  parametrizes a test over the engines chosen with --engines
          (default: $BLOCKD_TEST_ENGINES or "qsd,blockd"); marks each case qsd/blockd.
  graph   an in-process blockd Graph (real drivers, real files), closed at teardown.
  libnbd  the python3-libnbd module (`import nbd`), or fail/skip per helpers.policy.

A test whose qemu-storage-daemon (the reference peer, not the code under test) was killed by a
signal is run once more, with a warning naming the crash; blockd crashes are never retried.

Missing tools never skip silently: in CI (CI=true) they fail (helpers/policy.py).
"""

import os
import sys
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for _p in (TESTS, REPO / "plugins" / "module_utils"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

pytest.register_assert_rewrite("helpers")

from helpers import DaemonFactory, require_module  # noqa: E402  pylint: disable=wrong-import-position
from helpers.daemon import KINDS  # noqa: E402  pylint: disable=wrong-import-position

_DAEMONS = pytest.StashKey[list]()


def pytest_addoption(parser):
    parser.addoption(
        "--engines", default=os.environ.get("BLOCKD_TEST_ENGINES", ",".join(("qsd", "blockd"))),
        help="comma-separated engines that tests using the `engine` fixture run against "
             "(qsd, blockd; default: $BLOCKD_TEST_ENGINES or 'qsd,blockd')")


def _engines(config) -> list:
    engines = [e.strip() for e in config.getoption("--engines").split(",") if e.strip()]
    bad = [e for e in engines if e not in KINDS]
    if bad or not engines:
        raise pytest.UsageError(f"--engines: unknown {bad}; choose from {KINDS}")
    return engines


def pytest_generate_tests(metafunc):
    if "engine" in metafunc.fixturenames:
        metafunc.parametrize(
            "engine",
            [pytest.param(e, id=e, marks=getattr(pytest.mark, e)) for e in _engines(metafunc.config)])


@pytest.fixture
def daemon(tmp_path, request):
    """Factory that starts real blockd / qemu-storage-daemon processes (see module doc)."""
    factory = DaemonFactory(tmp_path)
    request.node.stash[_DAEMONS] = factory.daemons
    yield factory
    problems = factory.finish()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def graph():
    """An in-process blockd block graph, closed (and so flushed) at teardown."""
    from blockd import drivers
    from blockd.graph.graph import Graph
    g = Graph(drivers.lookup)
    yield g
    g.close_all()


@pytest.fixture
def libnbd():
    """python3-libnbd's `nbd` module (Debian's python3 only; .venv sees it)."""
    return require_module("nbd", "python3-libnbd")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
    report = yield
    if report.failed:
        for d in item.stash.get(_DAEMONS, []):
            report.sections.append((f"{d.kind} pid {d.pid} stderr ({d.stderr_path})",
                                    d.stderr() or "(empty)"))
    return report


def _peer_crash(item) -> str:
    """Describe a qsd that a signal killed during ITEM's last run ("" if none)."""
    for d in item.stash.get(_DAEMONS, []):
        rc = d.unexpected_rc
        if d.kind == "qsd" and rc is not None and rc < 0:
            return f"qsd pid {d.pid} was killed by signal {-rc}"
    return ""


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Run ITEM; once more if it failed because the reference qsd crashed (a QEMU bug)."""
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    crash = _peer_crash(item) if any(r.failed for r in reports) else ""
    if crash:
        item.stash[_DAEMONS] = []
        item._initrequest()  # pylint: disable=protected-access  # fresh fixtures, as pytest-rerunfailures does
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        item.warn(pytest.PytestWarning(f"{crash}; the test was run again"))
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
