"""A real server and a real client that hangs up mid-stream: the generator stops and the record says so."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import SQLiteRecorder, StreamStatus, recorded_stream

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
