"""What a test does when something it needs is missing from the machine.

Tests are never skipped silently.  When a tool (qemu-storage-daemon, nbdinfo,
...) or a module (python3-libnbd's ``nbd``) is missing:

* in CI (``CI`` set to a true value) or with ``BLOCKD_TESTS_STRICT=1`` the test
  FAILS, naming what is missing and how to install it;
* elsewhere it is skipped with a ``MISSING:`` reason, which ``-ra`` lists in
  the summary (scripts/test passes ``-ra``).

``scripts/bootstrap`` installs everything, so neither happens after it ran.
"""

from __future__ import annotations

import importlib
import os
import shutil

import pytest

_TRUE = {"1", "true", "yes", "on"}

BOOTSTRAP_HINT = "run `bash scripts/bootstrap` (installs the Debian packages and .venv)"


def strict() -> bool:
    """True when a missing requirement must fail the test instead of skipping it."""
    return (os.environ.get("CI", "").strip().lower() in _TRUE
            or os.environ.get("BLOCKD_TESTS_STRICT", "").strip().lower() in _TRUE)


def missing(what: str, hint: str = BOOTSTRAP_HINT) -> None:
    """Fail (strict mode) or skip the current test because WHAT is missing."""
    msg = f"MISSING: {what}; {hint}"
    if strict():
        pytest.fail(msg + " [CI/strict mode: missing requirements fail, never skip]",
                    pytrace=False)
    pytest.skip(msg)


def require_tool(name: str, package: str | None = None) -> str:
    """Return the full path of executable NAME, or fail/skip per the policy."""
    path = shutil.which(name)
    if path is None:
        missing(f"executable {name!r}" + (f" (Debian package {package})" if package else ""))
    return path  # type: ignore[return-value]


def require_module(name: str, package: str | None = None):
    """Import and return module NAME, or fail/skip per the policy."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"Python module {name!r}" + (f" (Debian package {package})" if package else "")
                + f" [{exc}]")
    return None  # unreachable
