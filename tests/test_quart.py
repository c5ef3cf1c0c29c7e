"""Quart: ``integrations.quart.recorded_stream`` under uvicorn, in a process of its own.

``tests.apps.quart_app`` is served with ``init_app`` (its recorder opened in
``before_serving``) and wrapped (``app.asgi_app`` under ``StreamRecorderMiddleware``). A real
httpx client reads each stream, and the record, read from the SQLite file afterwards, must say
what the client saw.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from asgi_stream_recorder import SQLiteRecorder, StreamRecord, StreamStatus
from asgi_stream_recorder.recorders.base import Chunk

from .servers import AppServer, uvicorn_process

pytestmark = pytest.mark.anyio

WAIT = 10


@pytest.fixture
def anyio_backend() -> str:
    """Quart runs on asyncio (its ASGI handling uses asyncio directly)."""
    return "asyncio"


@dataclass
class Server:
    url: str
    db: Path
    marks: Path
    app: AppServer

    def stop(self) -> None:
        self.app.stop()


@pytest.fixture(params=["app", "wrapped"])
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def quart_server(tmp_path: Path, target: str) -> AsyncIterator[Server]:
    db = tmp_path / "streams.db"
    env = {"ASR_TEST_URL": f"sqlite:///{db}", "ASR_TEST_DIR": str(tmp_path)}
    async with uvicorn_process(f"tests.apps.quart_app:{target}", tmp_path / "server.log", env) as app:
        yield Server(app.url, db, tmp_path, app)


async def record_of(server: Server, stream_id: str, *, final: bool = True) -> tuple[StreamRecord, list[Chunk]]:
    """The stream's record and chunks once it has ended (bounded wait)."""
    async with SQLiteRecorder(server.db) as recorder:
        with anyio.fail_after(WAIT):
            while True:
                record = await recorder.get(stream_id)
                if record is not None and (record.finished or not final):
                    return record, await recorder.chunks(stream_id)
                await anyio.sleep(0.02)


async def wait_for_file(path: Path) -> None:
    with anyio.fail_after(WAIT):
        while not path.exists():  # noqa: ASYNC110, ASYNC240 - another process writes it
            await anyio.sleep(0.02)


async def test_stream_is_incremental_and_recorded_exactly(tmp_path: Path, target: str) -> None:
    async with quart_server(tmp_path, target) as server, httpx.AsyncClient(timeout=WAIT) as client:
        # The generator waits after its first token until the test opens its gate: the client
        # must have the first event by then.
        async with aconnect_sse(client, "GET", f"{server.url}/chat?n=4&gate=1&tag=inc") as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            assert source.response.headers["cache-control"] == "no-cache, no-transform"
            stream_id = source.response.headers["x-stream-id"]
            events = source.aiter_sse()
            first = await events.__anext__()
            assert (first.id, first.data) == ("1", "token 0 ")
            (server.marks / "inc.gate").write_text("open")
            rest = [event async for event in events]
    data = [(e.id, e.data) for e in rest if e.event == "message"]
    assert data == [("2", "token 1 "), ("3", "token 2 "), ("4", "token 3 ")]
    assert rest[-1].event == "done"
    record, chunks = await record_of(server, stream_id)
    assert record.status is StreamStatus.COMPLETED
    assert [(str(c.seq), c.data) for c in chunks] == [(first.id, first.data), *data]
    assert record.metadata["user_agent"].startswith("python-httpx")
    assert (server.marks / "inc.finally").exists()


async def test_hang_up_cancels_the_generator(tmp_path: Path, target: str) -> None:
    async with quart_server(tmp_path, target) as server, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "GET", f"{server.url}/chat?n=100000&delay=0.02&tag=gone") as source:
            stream_id = source.response.headers["x-stream-id"]
            seen = []
            async for event in source.aiter_sse():
                seen.append(event.data)
                if len(seen) == 3:
                    break
        # the connection is closed here: the generator must stop, its finally run
        await wait_for_file(server.marks / "gone.finally")
        record, chunks = await record_of(server, stream_id)
    assert record.status is StreamStatus.CANCELLED
    assert "client_disconnected_at_ms" in record.metadata and "cancelled_by" not in record.metadata
    assert [c.data for c in chunks[:3]] == seen
    assert len(chunks) < 1000  # stopped, not run to its end


async def test_post_reads_its_body_inside_the_generator(tmp_path: Path, target: str) -> None:
    async with quart_server(tmp_path, target) as server, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "POST", f"{server.url}/post", json={"words": ["a", "b\nc", "d"]}) as source:
            sid = source.response.headers["x-stream-id"]
            events = [event async for event in source.aiter_sse()]
        assert [(e.event, e.data) for e in events[:-1]] == [("word", "a"), ("word", "b\nc"), ("word", "d")]
        async with aconnect_sse(client, "GET", f"{server.url}/chat/alice") as source:
            named = source.response.headers["x-stream-id"]
            assert [e.data async for e in source.aiter_sse()][:1] == ["hello alice"]
        record, chunks = await record_of(server, sid)
        assert [c.data for c in chunks] == ["a", "b\nc", "d"] and record.text_event == "word"
        record, _ = await record_of(server, named)
        assert record.key == "alice" and record.path == "/chat/alice"


async def test_longer_than_quarts_response_timeout(tmp_path: Path) -> None:
    """Quart ends a response after ``RESPONSE_TIMEOUT`` (60 s by default); a recorded stream
    has none. The app sets it to 1 s here: a 2 s stream still ends ``completed``."""
    env = {"ASR_TEST_URL": f"sqlite:///{tmp_path / 'streams.db'}", "ASR_TEST_DIR": str(tmp_path),
           "ASR_TEST_RESPONSE_TIMEOUT": "1"}
    async with uvicorn_process("tests.apps.quart_app:app", tmp_path / "server.log", env) as app:
        server = Server(app.url, tmp_path / "streams.db", tmp_path, app)
        async with httpx.AsyncClient(timeout=WAIT) as client, \
                aconnect_sse(client, "GET", f"{server.url}/chat?n=20&delay=0.1") as source:
            sid = source.response.headers["x-stream-id"]
            events = [event async for event in source.aiter_sse()]
        record, chunks = await record_of(server, sid)
    assert len(chunks) == 20 and events[-1].event == "done" and record.status is StreamStatus.COMPLETED


async def test_shutdown_under_the_middleware(tmp_path: Path) -> None:
    """Wrapped: a SIGTERM mid-stream ends the stream ``interrupted`` with its chunks, and the
    client gets the shutdown event."""
    async with quart_server(tmp_path, "wrapped") as server, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "GET", f"{server.url}/chat?n=100000&delay=0.02&tag=term") as source:
            running = source.response.headers["x-stream-id"]
            events = source.aiter_sse()
            seen = [(await events.__anext__()).data for _ in range(3)]
            server.stop()
            rest = [event async for event in events]
        assert rest[-1].event == "shutdown"
        seen += [e.data for e in rest if e.event == "message"]
        record, chunks = await record_of(server, running)
    assert record.status is StreamStatus.INTERRUPTED
    assert [c.data for c in chunks] == seen
    assert (server.marks / "term.finally").exists()
