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
