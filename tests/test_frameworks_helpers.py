"""One test per framework written only with the testing helpers: the in-process
``sse_client``, the recorder fixtures, ``fake_token_stream`` and ``assert_recorded``.
These are the tests a user of the library would write for their own endpoints."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import fastapi
import litestar
import pytest
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import MemoryRecorder, ServerSentEvent, SQLiteRecorder, current_stream, recorded_stream
from asgi_stream_recorder.app import stream_app
from asgi_stream_recorder.middleware import StreamRecorderMiddleware
from asgi_stream_recorder.testing import SSEClientFactory, assert_recorded, fake_token_stream

pytestmark = pytest.mark.anyio

ANSWER = "Streams are recorded as they are sent, token by token."


def assert_done(event: ServerSentEvent, stream_id: str | None) -> None:
    """The last event of a completed stream: ``event: done`` naming the stream, with no ``id``."""
    assert (event.event, event.id) == ("done", None)
    assert event.text is not None and json.loads(event.text) == {"stream_id": stream_id, "status": "completed"}


async def test_starlette_route(memory_recorder: MemoryRecorder, sse_client: SSEClientFactory) -> None:
    @recorded_stream(recorder=memory_recorder, metadata={"model": "fake"})
    async def chat(request: Request) -> AsyncIterator[str]:
        current_stream().metadata["topic"] = request.query_params["topic"]
        async for token in fake_token_stream(ANSWER):
            yield token

    app = Starlette(routes=[Route("/chat", chat)])
    async with sse_client(app) as client, client.stream("GET", "/chat?topic=sse") as s:
        assert s.status_code == 200
        events = [event async for event in s.events()]
    text = "".join(e.data for e in events if e.event != "done")
    assert text == ANSWER
    assert_done(events[-1], s.stream_id)
    await assert_recorded(
        memory_recorder, s.stream_id, status="completed", content=ANSWER,
        metadata_includes={"model": "fake", "topic": "sse"}, path="/chat",
    )


class Question(BaseModel):
    prompt: str


def current_user(x_user: str = fastapi.Header("anonymous")) -> str:
    return x_user


async def test_fastapi_path_operation_behind_the_middleware(sse_client: SSEClientFactory) -> None:
    recorder = MemoryRecorder()
    api = fastapi.FastAPI()

    @api.post("/chat/{room}")
    @recorded_stream  # no recorder: the middleware's, opened in the app's lifespan
    async def chat(
        room: str, question: Question, n: int = 1, user: str = fastapi.Depends(current_user)
    ) -> AsyncIterator[str]:
        async for token in fake_token_stream(f"{user}@{room} n={n}: {question.prompt}"):
            yield token

    app = StreamRecorderMiddleware(api, recorder=recorder, handle_signals=False)
    async with sse_client(app, lifespan=True, headers={"x-user": "ann"}) as client:
        async with client.stream("POST", "/chat/lobby?n=2", json={"prompt": "hello there"}) as s:
            events = [event async for event in s.events()]
        text = "".join(e.data for e in events if e.event != "done")
        assert text == "ann@lobby n=2: hello there"
        assert_done(events[-1], s.stream_id)
        await assert_recorded(recorder, s.stream_id, status="completed", content=text)

        async with client.stream("POST", "/chat/lobby?n=oops", json={}) as s:
            assert s.status_code == 422  # validated before any streaming: nothing recorded
        assert len(await recorder.list_streams()) == 1


@dataclass
class LitestarQuestion:
    prompt: str


def litestar_user(request: litestar.Request[Any, Any, Any]) -> str:
    return request.headers.get("x-user", "anonymous")


async def test_litestar_route_handler(sqlite_recorder: SQLiteRecorder, sse_client: SSEClientFactory) -> None:
    @litestar.post("/chat/{room:str}", dependencies={"user": Provide(litestar_user, sync_to_thread=False)})
    @recorded_stream(recorder=sqlite_recorder)
    async def chat(
        room: FromPath[str], data: JSONBody[LitestarQuestion], user: NamedDependency[str], n: FromQuery[int] = 1
    ) -> AsyncIterator[str]:
        async for token in fake_token_stream(f"{user}@{room} n={n}: {data.prompt} " * 50):
            yield token

    app = litestar.Litestar([chat])
    async with sse_client(app, lifespan=True) as client:
        async with client.stream(
            "POST", "/chat/lobby", params={"n": 7}, json={"prompt": "hi"}, disconnect_after_events=4
        ) as s:
            assert s.status_code == 200  # not Litestar's 201 for POST: the stream sends its own status
            events = [event.data async for event in s.events()]
    assert events == ["anonymous@lobby ", "n=7: ", "hi ", "anonymous@lobby "]
    await assert_recorded(sqlite_recorder, s.stream_id, status="cancelled", chunks=events)


async def test_raw_asgi_stream_app(memory_recorder: MemoryRecorder, sse_client: SSEClientFactory) -> None:
    async def chat(request: Request) -> AsyncIterator[dict[str, Any]]:
        prompt = (await request.json())["prompt"]
        async for token in fake_token_stream(prompt, fail_after=2):
            yield {"token": token}

    app = stream_app(chat, recorder=memory_recorder, event="token", methods=["POST"])
    async with sse_client(app) as client:
        async with client.stream("POST", "/anything", json={"prompt": "one two three four"}) as s:
            events = await s.collect()
        assert [(e.event, e.data) for e in events[:2]] == [("token", '{"token":"one "}'), ("token", '{"token":"two "}')]
        assert events[-1].event == "error"  # the source failed after two tokens
        await assert_recorded(
            memory_recorder, s.stream_id, status="failed", chunk_count=2, error="FakeStreamError", path="/anything"
        )
        async with client.stream("GET", "/anything") as s:
            assert s.status_code == 405
