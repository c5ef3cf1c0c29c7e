"""``@recorded_stream``: a plain async generator becomes an endpoint that frameworks still
understand (signature, dependencies, bodies) and that records into the right recorder.

This module uses ``from __future__ import annotations`` on purpose: every annotation here is
a string, as in a user's FastAPI module that does the same.
"""

from __future__ import annotations

import inspect
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Header
from httpx_sse import aconnect_sse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Message

import asgi_stream_recorder.recorders as recorders_module
from asgi_stream_recorder import MemoryRecorder, RecordedStreamResponse, SQLiteRecorder, StreamStatus, recorded_stream
from asgi_stream_recorder.middleware import StreamRecorderMiddleware
from asgi_stream_recorder.response import SCOPE_KEY
from asgi_stream_recorder.sse import ServerSentEvent, SSEParser
from asgi_stream_recorder.testing import sse_client

from .servers import serve

pytestmark = pytest.mark.anyio


# -- shape of the decorated function ---------------------------------------------------------------------


async def _source(request: Request, q: int = 3, *, name: str = "x") -> AsyncIterator[str]:
    """Docstring kept."""
    yield f"{q}{name}"


def test_decorated_function_keeps_its_signature() -> None:
    endpoint = recorded_stream(_source)
    sig = inspect.signature(endpoint)
    original = inspect.signature(_source, eval_str=True)
    assert list(sig.parameters) == ["request", "q", "name"]
    for name, param in sig.parameters.items():
        assert (param.kind, param.default, param.annotation) == (
            original.parameters[name].kind, original.parameters[name].default, original.parameters[name].annotation,
        )
    assert sig.parameters["request"].annotation is Request  # a string annotation, resolved
    assert sig.return_annotation is RecordedStreamResponse
    assert inspect.iscoroutinefunction(endpoint)
    assert not inspect.isasyncgenfunction(endpoint)
    assert not hasattr(endpoint, "__wrapped__")
    assert (endpoint.__name__, endpoint.__qualname__, endpoint.__doc__, endpoint.__module__) == (
        "_source", "_source", "Docstring kept.", __name__,
    )


def test_decorated_with_options_keeps_its_signature_too() -> None:
    endpoint = recorded_stream(recorder=MemoryRecorder(), event="token", ping=None)(_source)
    assert list(inspect.signature(endpoint).parameters) == ["request", "q", "name"]
    assert inspect.signature(endpoint).return_annotation is RecordedStreamResponse
    assert inspect.iscoroutinefunction(endpoint) and not hasattr(endpoint, "__wrapped__")


async def test_calling_the_endpoint_returns_a_response_without_running_the_generator() -> None:
    started: list[int] = []

    @recorded_stream
    async def source(n: int) -> AsyncIterator[str]:
        started.append(n)
        yield "x"

    response = await source(5)
    assert isinstance(response, RecordedStreamResponse)
    assert started == []  # nothing runs before the response is sent


@pytest.mark.parametrize(
    "options",
    [
        {"on_disconnect": "x"},
        {"on_disconnect": "ignore"},
        {"ping": 0},
        {"ping": -1.0},
        {"ping": True},
        {"event": "tok\nen"},
        {"event": "tok\ren"},
        {"format": "xml"},
    ],
)
def test_bad_options_raise_at_decoration_time(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        recorded_stream(**options)


def test_decorating_something_that_is_not_callable_raises() -> None:
    with pytest.raises(TypeError, match="async generator function"):
        recorded_stream(42)  # type: ignore[call-overload]


# -- which recorder -----------------------------------------------------------------------------------------------


@pytest.fixture
def default_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh process default recorder, at a file of this test's own."""
    path = tmp_path / "default" / "streams.db"
    monkeypatch.setenv("ASGI_STREAM_RECORDER_DB", str(path))
    monkeypatch.setattr(recorders_module, "_default", None)
    return path


async def close_default() -> None:
    if recorders_module._default is not None:
        await recorders_module._default.close()


def assert_done(event: ServerSentEvent, stream_id: str) -> None:
    """The last event of a completed stream: ``event: done`` naming the stream, with no ``id``."""
    assert (event.event, event.id) == ("done", None)
    assert event.text is not None and json.loads(event.text) == {"stream_id": stream_id, "status": "completed"}


async def call(app: ASGIApp, path: str = "/s") -> tuple[dict[str, str], list[ServerSentEvent]]:
    """One in-process request, run to its end: (headers, events)."""
    headers: dict[str, str] = {}
    parser = SSEParser()
    events: list[ServerSentEvent] = []
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers.update((k.decode(), v.decode()) for k, v in message["headers"])
        else:
            events.extend(parser.feed(message.get("body", b"")))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    with anyio.fail_after(10):
        await app(scope, receive, send)
    return headers, events


def with_middleware(app: ASGIApp, recorder: MemoryRecorder) -> StreamRecorderMiddleware:
    """The real middleware: it leaves its state (with ``.recorder``) in the scope under SCOPE_KEY."""
    return StreamRecorderMiddleware(app, recorder=recorder, recover=False, handle_signals=False)


async def test_without_recorder_the_middlewares_recorder_is_used(default_db: Path) -> None:
    states: list[Any] = []

    @recorded_stream
    async def source(request: Request) -> AsyncIterator[str]:
        states.append(request.scope.get(SCOPE_KEY))
        yield "via middleware"

    recorder = MemoryRecorder()
    app = with_middleware(Starlette(routes=[Route("/s", source)]), recorder)
    async with recorder:
        headers, events = await call(app)
        await recorder.flush()
        record = await recorder.get(headers["x-stream-id"])
        recorded = await recorder.list_streams()
    assert states[0].recorder is recorder
    assert [r.id for r in recorded] == [headers["x-stream-id"]]  # recorded once, not also from the wire
    assert [(e.event, e.text) for e in events[:-1]] == [(None, "via middleware")]
    assert_done(events[-1], headers["x-stream-id"])
    assert record is not None and record.status is StreamStatus.COMPLETED and record.content == "via middleware"
    assert recorders_module._default is None, "the process default was created although the middleware had one"
    assert not await anyio.Path(default_db).exists()


async def test_explicit_recorder_wins_over_the_middlewares(default_db: Path) -> None:
    mine, middleware = MemoryRecorder(), MemoryRecorder()

    @recorded_stream(recorder=mine)
    async def source(request: Request) -> AsyncIterator[str]:
        yield "mine"

    async with mine, middleware:
        headers, _ = await call(with_middleware(Starlette(routes=[Route("/s", source)]), middleware))
        await mine.flush()
        await middleware.flush()
        assert await mine.get(headers["x-stream-id"]) is not None
        assert await middleware.get(headers["x-stream-id"]) is None


async def test_without_any_recorder_the_lazy_process_default_is_used_and_flushed(default_db: Path) -> None:
    @recorded_stream
    async def source(request: Request) -> AsyncIterator[str]:
        yield "to the "
        yield "default"

    app = Starlette(routes=[Route("/s", source)])
    assert not await anyio.Path(default_db).exists()  # nothing is opened before the first stream
    try:
        first, events = await call(app)
        # the app has returned: the stream is already durable, visible to another connection
        with sqlite3.connect(default_db) as con:
            row = con.execute("SELECT status, content, chunk_count FROM streams WHERE id = ?",
                              (first["x-stream-id"],)).fetchone()
        assert row == ("completed", "to the default", 2)
        assert [(e.event, e.text) for e in events[:-1]] == [(None, "to the "), (None, "default")]
        assert_done(events[-1], first["x-stream-id"])
        default = recorders_module._default
        assert isinstance(default, SQLiteRecorder) and Path(default.path) == default_db
        assert default.managed is False  # nobody will close it: each stream flushes itself

        second, _ = await call(app)  # the same recorder, still flushed per stream
        assert recorders_module._default is default
        with sqlite3.connect(default_db) as con:
            assert con.execute("SELECT status FROM streams WHERE id = ?", (second["x-stream-id"],)).fetchone() == (
                "completed",
            )
    finally:
        await close_default()


async def test_bare_decorator_over_a_real_server_records_into_the_default(default_db: Path) -> None:
    @recorded_stream
    async def source(request: Request) -> AsyncIterator[str]:
        for word in ("a", "b", "c"):
            yield word

    try:
        with anyio.fail_after(10):
            async with serve(Starlette(routes=[Route("/s", source)])) as url, httpx.AsyncClient(timeout=5) as client:
                async with aconnect_sse(client, "GET", f"{url}/s") as events:
                    stream_id = events.response.headers["x-stream-id"]
                    received = [(e.event, e.data, e.id) async for e in events.aiter_sse()]
                # the client has the whole stream; the server flushes right after the last byte
                async with SQLiteRecorder(default_db) as reader:
                    for _ in range(500):
                        record = await reader.get(stream_id)
                        if record is not None and record.status is not StreamStatus.STREAMING:
                            break
                        await anyio.sleep(0.01)
    finally:
        await close_default()
    *data, (done_name, done_data, done_id) = received
    assert data == [("message", "a", "1"), ("message", "b", "2"), ("message", "c", "3")]
    # the done event has no id: the client's last event id stays on the last chunk
    assert (done_name, done_id) == ("done", "3")
    assert json.loads(done_data) == {"stream_id": stream_id, "status": "completed"}
    assert record is not None and record.status is StreamStatus.COMPLETED and record.content == "abc"


async def test_options_reach_the_wire() -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, event="token", ping=None, headers={"x-extra": "yes"}, metadata={"k": 1})
    async def source(request: Request) -> AsyncIterator[str]:
        yield "t"

    async with recorder:
        headers, events = await call(Starlette(routes=[Route("/s", source)]))
        await recorder.flush()
        record = await recorder.get(headers["x-stream-id"])
    assert [(e.event, e.text) for e in events[:-1]] == [("token", "t")]
    assert_done(events[-1], headers["x-stream-id"])  # the chunks' event name is not the done event's
    assert headers["x-extra"] == "yes"
    assert record is not None and record.metadata["k"] == 1 and record.content == "t"


# -- FastAPI -------------------------------------------------------------------------------------------------


class Prompt(BaseModel):
    text: str
    times: int = 2


async def current_user(x_user: str = Header(...)) -> str:
    return x_user.upper()


def fastapi_app(recorder: MemoryRecorder) -> FastAPI:
    app = FastAPI()

    @app.get("/chat")
    @recorded_stream(recorder=recorder)
    async def chat(q: str, n: int = 2, user: str = Depends(current_user)) -> AsyncIterator[dict[str, Any]]:
        for i in range(n):
            yield {"q": q, "user": user, "i": i}

    @app.post("/complete")
    @recorded_stream(recorder=recorder, metadata={"route": "complete"})
    async def complete(prompt: Prompt, request: Request) -> AsyncIterator[str]:
        for _ in range(prompt.times):
            yield prompt.text
        yield request.url.path

    return app


async def test_fastapi_query_parameter_and_dependency_are_injected() -> None:
    recorder = MemoryRecorder()
    async with recorder, serve(fastapi_app(recorder)) as url, httpx.AsyncClient(timeout=5) as client:
        with anyio.fail_after(10):
            async with aconnect_sse(client, "GET", f"{url}/chat", params={"q": "hi", "n": "3"},
                                    headers={"x-user": "ada"}) as events:
                assert events.response.status_code == 200
                assert events.response.headers["content-type"] == "text/event-stream; charset=utf-8"
                stream_id = events.response.headers["x-stream-id"]
                received = [(e.event, json.loads(e.data), e.id) async for e in events.aiter_sse()]
            missing = await client.get(f"{url}/chat", headers={"x-user": "ada"})  # no q
            bad_type = await client.get(f"{url}/chat", params={"q": "hi", "n": "many"}, headers={"x-user": "ada"})
            no_user = await client.get(f"{url}/chat", params={"q": "hi"})
            await recorder.flush()
        record = await recorder.get(stream_id)
    assert received == [
        *(("message", {"q": "hi", "user": "ADA", "i": i}, str(i + 1)) for i in range(3)),
        ("done", {"stream_id": stream_id, "status": "completed"}, "3"),  # no id of its own: it stays on "3"
    ]
    assert (missing.status_code, bad_type.status_code, no_user.status_code) == (422, 422, 422)
    assert record is not None and record.status is StreamStatus.COMPLETED
    assert record.chunk_count == 3 and record.path == "/chat" and record.method == "GET"


async def test_fastapi_body_model_with_future_annotations() -> None:
    recorder = MemoryRecorder()
    async with recorder, serve(fastapi_app(recorder)) as url, httpx.AsyncClient(timeout=5) as client:
        with anyio.fail_after(10):
            async with aconnect_sse(client, "POST", f"{url}/complete", json={"text": "echo ", "times": 3}) as events:
                assert events.response.status_code == 200
                stream_id = events.response.headers["x-stream-id"]
                received = [(e.event, e.data) async for e in events.aiter_sse()]
            invalid = await client.post(f"{url}/complete", json={"times": 3})  # no text
            await recorder.flush()
        record = await recorder.get(stream_id)
    assert [data for name, data in received if name != "done"] == ["echo ", "echo ", "echo ", "/complete"]
    assert received[-1][0] == "done"
    assert json.loads(received[-1][1]) == {"stream_id": stream_id, "status": "completed"}
    assert invalid.status_code == 422
    assert record is not None and record.status is StreamStatus.COMPLETED
    assert record.content == "echo echo echo /complete"
    assert record.metadata["route"] == "complete" and record.method == "POST"


async def test_a_user_header_in_another_case_replaces_ours_instead_of_doubling_it() -> None:
    """Header names are case-insensitive: ``Cache-Control`` given by the user is sent once."""
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "yes"})
    async def endpoint(request: Request) -> AsyncIterator[str]:
        yield "x"

    async with sse_client(Starlette(routes=[Route("/s", endpoint)])) as client:
        async with client.stream("GET", "/s") as s:
            await s.collect()
            headers = s.headers
    assert headers.getlist("cache-control") == ["no-store"]
    assert headers.getlist("x-accel-buffering") == ["yes"]


def test_framework_adapters_take_the_decorators_options() -> None:
    """Django's and Quart's ``recorded_stream`` take ``**Options``: the same names as the core
    decorator's keywords, checked where they are applied."""
    from asgi_stream_recorder.decorator import Options
    from asgi_stream_recorder.integrations import django as dj
    from asgi_stream_recorder.integrations import quart as qt

    keywords = {name for name, p in inspect.signature(recorded_stream).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == set(Options.__annotations__)
    for adapter in (dj.recorded_stream, qt.recorded_stream):
        with pytest.raises(ValueError, match="on_disconnect"):
            adapter(on_disconnect="later")  # type: ignore[typeddict-item]
        with pytest.raises(ValueError, match="ping"):
            adapter(ping=-1)
        with pytest.raises(TypeError, match="async generator"):
            adapter(lambda request: None)  # type: ignore[arg-type,return-value]
