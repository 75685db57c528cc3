"""Fixtures for the module tests: an Ansible controller that sees this checkout."""

import pytest

from helpers.fixtures import ansible, engine_with_monitor, service  # noqa: F401  pylint: disable=unused-import


def pytest_collection_modifyitems(items):
    """Each ansible-playbook run costs seconds of CPU: module tests get 10 minutes, not 2."""
    for item in items:
        if "integration/modules/" in str(item.fspath) and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(600))
