"""A real server and a real client that hangs up mid-stream: the generator stops and the record says so."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import MemoryRecorder, SQLiteRecorder, StreamStatus, recorded_stream

from .servers import serve

pytestmark = pytest.mark.anyio


async def test_client_close_cancels_generator_and_records_exactly_what_was_received(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "streams.db")
    finally_ran = anyio.Event()

    @recorded_stream(recorder=recorder)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        try:
            for i in range(5):
                yield f"token {i}\n"
            await anyio.sleep_forever()  # the client will hang up here
        finally:
            finally_ran.set()

    app = Starlette(routes=[Route("/s", endpoint)])
    received: list[str] = []
    async with recorder, serve(app) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            async with aconnect_sse(client, "GET", f"{url}/s") as source:
                stream_id = source.response.headers["x-stream-id"]
                async for event in source.aiter_sse():
                    received.append(event.data)
                    if len(received) == 5:
                        break  # leaving the block closes the connection
        with anyio.fail_after(5):
            await finally_ran.wait()
        await recorder.flush()
        with anyio.fail_after(5):
            while (record := await recorder.get(stream_id)) is None or record.status is StreamStatus.STREAMING:
                await anyio.sleep(0.01)
                await recorder.flush()
        chunks = await recorder.chunks(stream_id)
    assert record.status is StreamStatus.CANCELLED
    assert [c.data for c in chunks] == received == [f"token {i}\n" for i in range(5)]
    assert [c.seq for c in chunks] == [1, 2, 3, 4, 5]
    assert record.content == "".join(received)
    assert record.metadata["chunk_count"] == 5


async def test_a_busy_source_that_never_awaits_stops_when_the_client_leaves() -> None:
    """A source that never awaits neither starves the server (the client here shares its event
    loop) nor outlives its client: the response yields to the loop every few events."""
    recorder = MemoryRecorder(max_wait=None)

    @recorded_stream(recorder=recorder, ping=None)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        i = 0
        while True:
            yield f"t{i} "
            i += 1

    app = Starlette(routes=[Route("/s", endpoint)])
    async with recorder, serve(app) as url:
        async with httpx.AsyncClient(timeout=5) as client, aconnect_sse(client, "GET", f"{url}/s") as source:
            stream_id = source.response.headers["x-stream-id"]
            async for _ in source.aiter_sse():
                break
        with anyio.fail_after(5):
            while (record := await recorder.get(stream_id)) is None or record.status is StreamStatus.STREAMING:
                await recorder.flush()
                await anyio.sleep(0.01)
    assert record.status is StreamStatus.CANCELLED
    assert record.chunk_count == record.metadata["chunk_count"] >= 1


async def test_generator_may_read_the_request_body_itself() -> None:
    """A generator awaiting ``request.json()`` gets the body: the disconnect watch does not steal it."""
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        body = await request.json()
        for word in body["prompt"].split():
            yield word

    app = Starlette(routes=[Route("/s", endpoint, methods=["POST"])])
    async with recorder, serve(app) as url:
        for _ in range(5):
            async with httpx.AsyncClient(timeout=5) as client:
                async with aconnect_sse(client, "POST", f"{url}/s", json={"prompt": "a b c"}) as source:
                    stream_id = source.response.headers["x-stream-id"]
                    received = [(event.event, event.data) async for event in source.aiter_sse()]
            assert [data for name, data in received if name != "done"] == ["a", "b", "c"]
            assert received[-1][0] == "done"  # the stream completed
            assert json.loads(received[-1][1]) == {"stream_id": stream_id, "status": "completed"}
