"""Quart: ``integrations.quart.recorded_stream`` under uvicorn, in a process of its own.

``tests.apps.quart_app`` is served with ``init_app`` (its recorder opened in
``before_serving``) and wrapped (``app.asgi_app`` under ``StreamRecorderMiddleware``). A real
httpx client reads each stream; the checks every adapter must pass are in
``tests/pulled_checks.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from asgi_stream_recorder import StreamStatus

from .pulled_checks import (
    WAIT,
    Served,
    hang_up_cancels,
    incremental_and_exact,
    post_body_and_key,
    record_of,
    sigterm_interrupts,
)
from .servers import uvicorn_process

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Quart runs on asyncio (its ASGI handling uses asyncio directly)."""
    return "asyncio"


@pytest.fixture(params=["app", "wrapped"])
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def quart_server(tmp_path: Path, target: str, **env: str) -> AsyncIterator[Served]:
    db = tmp_path / "streams.db"
    env = {"ASR_TEST_URL": f"sqlite:///{db}", "ASR_TEST_DIR": str(tmp_path), **env}
    async with uvicorn_process(f"tests.apps.quart_app:{target}", tmp_path / "server.log", env) as app:
        yield Served(app.url, db, tmp_path, app)


async def test_stream_is_incremental_and_recorded_exactly(tmp_path: Path, target: str) -> None:
    async with quart_server(tmp_path, target) as served:
        await incremental_and_exact(served)


async def test_hang_up_cancels_the_generator(tmp_path: Path, target: str) -> None:
    async with quart_server(tmp_path, target) as served:
        await hang_up_cancels(served)


async def test_post_reads_its_body_inside_the_generator(tmp_path: Path, target: str) -> None:
    async with quart_server(tmp_path, target) as served:
        await post_body_and_key(served)


async def test_shutdown_under_the_middleware(tmp_path: Path) -> None:
    async with quart_server(tmp_path, "wrapped") as served:
        await sigterm_interrupts(served)


async def test_longer_than_quarts_response_timeout(tmp_path: Path) -> None:
    """Quart ends a response after ``RESPONSE_TIMEOUT`` (60 s by default); a recorded stream
    has none. The app sets it to 1 s here: a 2 s stream still ends ``completed``."""
    async with quart_server(tmp_path, "app", ASR_TEST_RESPONSE_TIMEOUT="1") as served, \
            httpx.AsyncClient(timeout=WAIT) as client, \
            aconnect_sse(client, "GET", f"{served.url}/chat?n=20&delay=0.1") as source:
        sid = source.response.headers["x-stream-id"]
        events = [event async for event in source.aiter_sse()]
        record, chunks = await record_of(served, sid)
    assert len(chunks) == 20 and events[-1].event == "done" and record.status is StreamStatus.COMPLETED
