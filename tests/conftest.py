"""Shared test set-up: every async test runs on asyncio and trio; under CI no test may skip."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

NO_SKIP = os.environ.get("ASGI_STREAM_RECORDER_NO_SKIP") == "1"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under ``.ci/run`` (ASGI_STREAM_RECORDER_NO_SKIP=1) a skip is a failure: a missing
    service or browser must not pass unnoticed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which requires everything to run: {report.longrepr}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """asyncpg and redis-py run on asyncio only: a test on those backends runs on asyncio (under
    trio they refuse with a clear error, tested in ``test_postgres.py`` and ``test_redis.py``)."""
    from tests.backends import ASYNCIO_ONLY

    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_trio = params.get("anyio_backend") == "trio"
        (dropped if on_trio and params.get("kind") in ASYNCIO_ONLY else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
