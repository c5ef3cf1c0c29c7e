"""StreamRecorderMiddleware under real servers: headers, flushing through compression,
disconnects (cancel and continue), and recording undecorated event streams from the wire."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from litestar import Litestar, get
from litestar.response import ServerSentEvent as LitestarSSE
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from asgi_stream_recorder import (
    MemoryRecorder,
    Recorder,
    SQLiteRecorder,
    StreamStatus,
    current_stream,
    recorded_stream,
)
from asgi_stream_recorder.middleware import StreamRecorderMiddleware
from asgi_stream_recorder.testing import wait_recorded

from .servers import serve

pytestmark = pytest.mark.anyio


async def test_lifespan_opens_and_drains_the_recorder(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "s.db")

    @recorded_stream(recorder=recorder)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        yield "a"
        yield "b"

    app = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder)
    async with serve(app) as url:
        assert recorder.managed, "the middleware opens the recorder at lifespan startup"
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{url}/s")
            stream_id = response.headers["x-stream-id"]
    assert not recorder.managed, "lifespan shutdown closes the recorder"
    async with SQLiteRecorder(tmp_path / "s.db") as reopened:
        record = await reopened.get(stream_id)
    assert record is not None and record.status is StreamStatus.COMPLETED and record.content == "ab"


async def test_sse_headers_on_undecorated_responses(tmp_path: Path) -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"

    async def sse(request: Request) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-custom": "kept", "content-length": "999"})

    async def plain(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = StreamRecorderMiddleware(Starlette(routes=[Route("/sse", sse), Route("/plain", plain)]),
                                   recorder=MemoryRecorder())
    async with serve(app) as url, httpx.AsyncClient() as client:
        response = await client.get(f"{url}/sse")
        plain_response = await client.get(f"{url}/plain")
    assert response.text == "data: one\n\n"
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-custom"] == "kept"
    assert "content-length" not in response.headers
    assert response.headers["connection"] == "keep-alive"
    assert "x-accel-buffering" not in plain_response.headers
    assert plain_response.headers["content-length"] == str(len(plain_response.content))


@pytest.mark.parametrize("gzip_outside", [True, False], ids=["gzip-outside", "gzip-inside"])
async def test_first_event_arrives_before_the_second_is_generated_through_gzip(gzip_outside: bool) -> None:
    """If anything buffered the stream, the client would wait for event 1 until event 2 exists: deadlock."""
    release = anyio.Event()
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, ping=None)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        yield "first " * 50  # compressible, and above GZip's minimum size
        await release.wait()
        yield "second"

    ours = Middleware(StreamRecorderMiddleware, recorder=recorder)
    gzip = Middleware(GZipMiddleware, minimum_size=10)
    middleware = [gzip, ours] if gzip_outside else [ours, gzip]
    app = Starlette(routes=[Route("/s", endpoint)], middleware=middleware)
    async with serve(app) as url, httpx.AsyncClient(headers={"accept-encoding": "gzip"}) as client:
        async with aconnect_sse(client, "GET", f"{url}/s") as source:
            assert "content-encoding" not in source.response.headers
            events = source.aiter_sse()
            with anyio.fail_after(3):
                first = await anext(events)
            assert first.data == "first " * 50
            release.set()
            with anyio.fail_after(3):
                second = await anext(events)
            assert second.data == "second"


async def test_litestar_compression_does_not_buffer_event_streams() -> None:
    from litestar import Litestar, get
    from litestar.config.compression import CompressionConfig
    from litestar.middleware import DefineMiddleware

    release = anyio.Event()
    recorder = MemoryRecorder()

    @get("/s")
    @recorded_stream(recorder=recorder, ping=None)
    async def endpoint() -> AsyncIterator[str]:
        yield "first " * 50
        await release.wait()
        yield "second"

    app = Litestar(
        route_handlers=[endpoint],
        middleware=[DefineMiddleware(StreamRecorderMiddleware, recorder=recorder)],
        compression_config=CompressionConfig(backend="gzip", minimum_size=10),
    )
    async with serve(app) as url, httpx.AsyncClient(headers={"accept-encoding": "gzip"}) as client:
        async with aconnect_sse(client, "GET", f"{url}/s") as source:
            assert "content-encoding" not in source.response.headers
            events = source.aiter_sse()
            with anyio.fail_after(3):
                assert (await anext(events)).data == "first " * 50
            release.set()
            with anyio.fail_after(3):
                assert (await anext(events)).data == "second"


async def test_continue_runs_the_generator_to_its_end_after_the_client_left() -> None:
    recorder = MemoryRecorder()
    finished = anyio.Event()
    gate = anyio.Event()

    @recorded_stream(recorder=recorder, on_disconnect="continue")
    async def endpoint(request: Request) -> AsyncIterator[str]:
        try:
            for i in range(3):
                yield f"t{i} "
            await gate.wait()  # the client leaves while we wait here
            for i in range(3, 10):
                yield f"t{i} "
            current_stream().metadata["finish_reason"] = "stop"
        finally:
            finished.set()

    app = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder)
    async with serve(app) as url:
        async with httpx.AsyncClient() as client, aconnect_sse(client, "GET", f"{url}/s") as source:
            stream_id = source.response.headers["x-stream-id"]
            received = []
            async for event in source.aiter_sse():
                received.append(event.data)
                if len(received) == 3:
                    break
        await anyio.sleep(0.2)  # let the server notice the hang-up before the generator goes on
        gate.set()
        with anyio.fail_after(5):
            await finished.wait()
        record = await wait_recorded(recorder, stream_id)
    assert record.status is StreamStatus.COMPLETED
    assert record.content == "".join(f"t{i} " for i in range(10))
    assert record.chunk_count == 10
    assert record.metadata["finish_reason"] == "stop"
    assert record.metadata["client_disconnected_at_ms"] > 0


async def test_continue_beyond_the_background_limit_is_cancelled_and_says_why() -> None:
    recorder = MemoryRecorder()
    gate = anyio.Event()
    closed = anyio.Event()

    @recorded_stream(recorder=recorder, on_disconnect="continue")
    async def endpoint(request: Request) -> AsyncIterator[str]:
        try:
            yield "one"
            await gate.wait()
            yield "two"
        finally:
            closed.set()

    app = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder, max_background=0)
    async with serve(app) as url:
        async with httpx.AsyncClient() as client, aconnect_sse(client, "GET", f"{url}/s") as source:
            stream_id = source.response.headers["x-stream-id"]
            async for _ in source.aiter_sse():
                break
        await anyio.sleep(0.2)
        gate.set()
        with anyio.fail_after(5):
            await closed.wait()
        record = await wait_recorded(recorder, stream_id)
    assert record.status is StreamStatus.CANCELLED
    assert record.content == "one"
    assert "continue_refused" in record.metadata


# -- recording undecorated event streams from the wire ------------------------------------------
async def _read_events(url: str) -> tuple[str, list[tuple[str, str]]]:
    async with httpx.AsyncClient(timeout=5) as client, aconnect_sse(client, "GET", url) as source:
        stream_id = source.response.headers["x-stream-id"]
        return stream_id, [(e.event, e.data) async for e in source.aiter_sse()]


async def _assert_wire_recorded(app: Any, recorder: Recorder, path: str = "/s") -> list[tuple[str, str]]:
    async with serve(StreamRecorderMiddleware(app, recorder=recorder, record_all_sse=True)) as url:
        stream_id, received = await _read_events(f"{url}{path}")
        record = await wait_recorded(recorder, stream_id)
        chunks = await recorder.chunks(stream_id)
    assert record.status is StreamStatus.COMPLETED
    assert record.metadata["recorded_from"] == "wire"
    assert [(c.event or "message", c.data) for c in chunks] == received
    assert [c.seq for c in chunks] == list(range(1, len(received) + 1))
    return received


async def test_record_all_sse_parses_split_crlf_comment_and_multiline_events() -> None:
    pieces = [b": hello\r\n", b"data: one\r\n\r", b"\nevent: tool\r\ndata: {\"a\"", b": 1}\r\n\r\n",
              b"data: line 1\ndata: line 2\n\n", "data: caf\u00e9 \u2028 ok\n\n".encode()[:9],
              "data: caf\u00e9 \u2028 ok\n\n".encode()[9:], b"id: 7\nretry: 10\ndata:\n\n"]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(body(), media_type="text/event-stream")

    received = await _assert_wire_recorded(Starlette(routes=[Route("/s", endpoint)]), MemoryRecorder())
    assert received == [("message", "one"), ("tool", '{"a": 1}'), ("message", "line 1\nline 2"),
                        ("message", "caf\u00e9 \u2028 ok"), ("message", "")]


async def test_record_all_sse_records_sse_starlette() -> None:
    from sse_starlette.sse import EventSourceResponse

    async def events() -> AsyncIterator[dict[str, str]]:
        for i in range(5):
            yield {"data": f"token {i}"}
        yield {"event": "done", "data": "multi\nline"}

    async def endpoint(request: Request) -> EventSourceResponse:
        return EventSourceResponse(events())

    received = await _assert_wire_recorded(Starlette(routes=[Route("/s", endpoint)]), MemoryRecorder())
    assert received[-1] == ("done", "multi\nline") and len(received) == 6


async def test_record_all_sse_records_fastapi_sse(tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.sse import EventSourceResponse, ServerSentEvent

    api = FastAPI()

    @api.get("/s", response_class=EventSourceResponse)
    async def endpoint() -> AsyncIterator[ServerSentEvent]:
        for i in range(4):
            yield ServerSentEvent(raw_data=f"token {i}")
        yield ServerSentEvent(data={"usage": 4}, event="usage")

    received = await _assert_wire_recorded(api, SQLiteRecorder(tmp_path / "s.db"))
    assert received[-1][0] == "usage" and json.loads(received[-1][1]) == {"usage": 4}
    assert [d for _, d in received[:4]] == [f"token {i}" for i in range(4)]


async def test_record_all_sse_records_litestar_server_sent_event() -> None:

    async def tokens() -> AsyncIterator[str]:
        for i in range(4):
            yield f"token {i}"

    @get("/s", sync_to_thread=False)
    def endpoint() -> LitestarSSE:
        return LitestarSSE(tokens(), event_type="token")

    received = await _assert_wire_recorded(Litestar(route_handlers=[endpoint]), MemoryRecorder())
    assert received == [("token", f"token {i}") for i in range(4)]


async def test_record_all_sse_does_not_record_decorated_streams_twice() -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        yield "only once"

    app = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder, record_all_sse=True)
    async with serve(app) as url:
        stream_id, received = await _read_events(f"{url}/s")
        record = await wait_recorded(recorder, stream_id)
        streams = await recorder.list_streams()
    assert received[:-1] == [("message", "only once")]
    assert received[-1][0] == "done"
    assert json.loads(received[-1][1]) == {"stream_id": stream_id, "status": "completed"}
    assert [s.id for s in streams] == [stream_id]
    assert (record.content, record.chunk_count) == ("only once", 1)  # the done event is not recorded


async def test_undecorated_stream_is_cancelled_when_the_client_leaves() -> None:
    recorder = MemoryRecorder()
    finally_ran = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            for i in range(3):
                yield f"data: t{i}\n\n".encode()
            await anyio.sleep_forever()
        finally:
            finally_ran.set()

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(body(), media_type="text/event-stream")

    app = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder, record_all_sse=True)
    async with serve(app) as url:
        async with httpx.AsyncClient() as client, aconnect_sse(client, "GET", f"{url}/s") as source:
            stream_id = source.response.headers["x-stream-id"]
            received = []
            async for event in source.aiter_sse():
                received.append(event.data)
                if len(received) == 3:
                    break
        with anyio.fail_after(5):
            await finally_ran.wait()
        record = await wait_recorded(recorder, stream_id)
    assert record.status is StreamStatus.CANCELLED
    assert [c.data for c in await recorder.chunks(stream_id)] == received == ["t0", "t1", "t2"]


async def test_idle_undecorated_stream_gets_pings_between_events_that_are_not_recorded() -> None:
    recorder = MemoryRecorder()

    async def body() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        await anyio.sleep(0.35)  # idle: pings go out here
        yield b"data: two\n"  # half an event: no ping may split it
        await anyio.sleep(0.35)
        yield b"\n"

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(body(), media_type="text/event-stream")

    app = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder,
                                   record_all_sse=True, ping=0.1)
    async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{url}/s")
        stream_id = response.headers["x-stream-id"]
        record = await wait_recorded(recorder, stream_id)
        chunks = await recorder.chunks(stream_id)
    wire = response.text
    head, _, tail = wire.partition("data: two\n")
    assert head.startswith("data: one\n\n") and head.count(": ping\n\n") >= 2
    assert tail == "\n", "nothing may be sent inside an unfinished event"
    assert [c.data for c in chunks] == ["one", "two"] and record.status is StreamStatus.COMPLETED


@pytest.mark.parametrize(
    ("tail", "between_events"),
    [(b"a\n\n", True), (b"\r\n\r\n", True), (b"a\n\r\n", True), (b"a\r\n\n", True), (b"a\r\r", True),
     (b"\r\r\n", True), (b"a: b\r\n", False), (b"a: b\n", False), (b"a: b\r", False), (b"data", False), (b"", False)],
)
def test_a_ping_goes_in_only_after_a_blank_line_of_any_line_ending(tail: bytes, between_events: bool) -> None:
    """An undecorated stream's keep-alive must never split an event, whatever its line endings."""
    from asgi_stream_recorder.wiretap import ends_event

    assert ends_event(tail) is between_events
