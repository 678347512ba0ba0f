"""Shared test setup: tools and services that tests need are found here.

Locally, a missing tool or service skips the tests that need it, with the reason; under
``CI=true`` it fails them loudly, so a green CI run never hides a skipped check.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from pipeline.common import backoff


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(*names: str) -> str:
    """Path of the first of ``names`` on PATH; skip (locally) or fail (CI) without one."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"needs {' or '.join(names)} (make tools installs it)"
    if on_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def no_delays() -> Iterator[None]:
    """Backoff delays off (``common.backoff``'s testing switch) for the test's length."""
    backoff.set_testing(True)
    yield
    backoff.set_testing(False)


@pytest.fixture
def chromium() -> str:
    return require_tool("chromium", "chromium-browser", "google-chrome")


@pytest.fixture
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A DSN for a fresh, empty PostgreSQL schema of this test's own (dropped afterwards).
    Skips locally / fails under CI=true without PostgreSQL (tests/pg_support.py)."""
    from pipeline.tests.pg_support import drop_schema, fresh_dsn

    dsn, schema = fresh_dsn()
    try:
        yield dsn
    finally:
        drop_schema(schema)
