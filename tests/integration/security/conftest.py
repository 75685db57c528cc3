"""Fixtures of the security tests (the controller and engine fixtures of the module tests)."""

from helpers.fixtures import ansible, engine_with_monitor, service  # noqa: F401  pylint: disable=unused-import
