"""One decorator on every framework, under a real server, read by a real client.

The same ``@recorded_stream`` source runs as a Starlette route, a FastAPI path operation
(body, query, path and ``Depends`` parameters still injected), a Litestar route handler
(sent as an ASGI app, its parameters and dependencies still injected) and a raw ASGI app
(``stream_app``). Each is served by uvicorn (asyncio) or hypercorn (trio) and read with
httpx + httpx_sse; then the record must say what the client saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import fastapi
import httpx
import litestar
import pytest
from httpx_sse import aconnect_sse
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import SQLiteRecorder, StreamStatus, recorded_stream
from asgi_stream_recorder.app import stream_app
from asgi_stream_recorder.testing import fake_token_stream

from .servers import serve

pytestmark = pytest.mark.anyio


class Prompt(BaseModel):  # FastAPI body
    prompt: str


@dataclass
class LitestarPrompt:  # Litestar body (``data``)
    prompt: str


def user_from_header(x_user: Annotated[str, fastapi.Header()] = "anonymous") -> str:
    return x_user


def litestar_user(request: litestar.Request[Any, Any, Any]) -> str:
    return request.headers.get("x-user", "anonymous")


def expected_text(room: str, prompt: str, n: int, user: str) -> str:
    return f"{user} in {room} asked {prompt!r} with n={n}, and here is the answer."


class Hooks:
    """What the tests watch: when the generator's cleanup ran; ``hang_after``: stop
    producing (without ending) after that many tokens, as a stalled model would."""

    def __init__(self, hang_after: int | None = None) -> None:
        self.hang_after = hang_after
        self.closed = anyio.Event()

    async def reply(self, room: str, prompt: str, n: int, user: str) -> AsyncIterator[str]:
        try:
            async for i, token in aenumerate(fake_token_stream(expected_text(room, prompt, n, user))):
                if i == self.hang_after:
                    await anyio.sleep_forever()  # the client will hang up here
                yield token
        finally:
            self.closed.set()


async def aenumerate(source: AsyncIterator[str]) -> AsyncIterator[tuple[int, str]]:
    i = 0
    async for item in source:
        yield i, item
        i += 1


def metadata(scope: Any) -> dict[str, Any]:
    return {"model": "fake", "route": scope["path"]}


# -- one app per framework, all serving POST /chat/{room}?n=<int> with {"prompt": ...} ---------


def starlette_app(recorder: SQLiteRecorder, hooks: Hooks) -> Any:
    @recorded_stream(recorder=recorder, metadata=metadata)
    async def reply(request: Request, prompt: str) -> AsyncIterator[str]:
        async for token in hooks.reply(
            request.path_params["room"], prompt, int(request.query_params.get("n", 1)),
            request.headers.get("x-user", "anonymous"),
        ):
            yield token

    async def chat(request: Request) -> Any:
        # Read the body before the stream starts: inside the generator, `await request.json()`
        # races the response's disconnect watch for the request's messages (see the report).
        body = await request.json()
        return await reply(request, body["prompt"])

    return Starlette(routes=[Route("/chat/{room}", chat, methods=["POST"])])


def fastapi_app(recorder: SQLiteRecorder, hooks: Hooks) -> Any:
    app = fastapi.FastAPI()

    @app.post("/chat/{room}")
    @recorded_stream(recorder=recorder, metadata=metadata)
    async def chat(
        room: str, body: Prompt, n: int = 1, user: str = fastapi.Depends(user_from_header)
    ) -> AsyncIterator[str]:
        async for token in hooks.reply(room, body.prompt, n, user):
            yield token

    return app


def litestar_app(recorder: SQLiteRecorder, hooks: Hooks) -> Any:
    @litestar.post(
        "/chat/{room:str}", status_code=200, media_type="text/event-stream",  # for the OpenAPI docs
        dependencies={"user": Provide(litestar_user, sync_to_thread=False)},
    )
    @recorded_stream(recorder=recorder, metadata=metadata)
    async def chat(
        room: FromPath[str], data: JSONBody[LitestarPrompt], user: NamedDependency[str], n: FromQuery[int] = 1
    ) -> AsyncIterator[str]:
        async for token in hooks.reply(room, data.prompt, n, user):
            yield token

    return litestar.Litestar([chat])


def raw_asgi_app(recorder: SQLiteRecorder, hooks: Hooks) -> Any:
    async def chat(request: Request) -> AsyncIterator[str]:
        body = await request.json()
        room = request.url.path.rsplit("/", 1)[-1]
        n = int(request.query_params.get("n", 1))
        async for token in hooks.reply(room, body["prompt"], n, request.headers.get("x-user", "anonymous")):
            yield token

    return stream_app(chat, recorder=recorder, metadata=metadata, methods=["POST"])


FRAMEWORKS: dict[str, Callable[[SQLiteRecorder, Hooks], Any]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "litestar": litestar_app,
    "raw_asgi": raw_asgi_app,
}


@pytest.fixture(params=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def wait_final(recorder: SQLiteRecorder, stream_id: str) -> Any:
    with anyio.fail_after(5):
        while True:
            await recorder.flush()
            record = await recorder.get(stream_id)
            if record is not None and record.status is not StreamStatus.STREAMING:
                return record
            await anyio.sleep(0.01)


async def test_full_stream_is_injected_streamed_and_recorded(framework: str, tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "streams.db")
    hooks = Hooks()
    app = FRAMEWORKS[framework](recorder, hooks)
    text = expected_text("lobby", "why?", 3, "ann")
    async with recorder, serve(app) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                async with aconnect_sse(
                    client, "POST", f"{url}/chat/lobby?n=3", json={"prompt": "why?"}, headers={"x-user": "ann"}
                ) as source:
                    response = source.response
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    assert response.headers["cache-control"] == "no-cache, no-transform"
                    stream_id = response.headers["x-stream-id"]
                    received = [event async for event in source.aiter_sse()]
        record = await wait_final(recorder, stream_id)
        chunks = await recorder.chunks(stream_id)
    *events, done = received
    assert "".join(e.data for e in events) == text
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert [e.event for e in events] == ["message"] * len(events)
    # the stream ends with a done event that has no id: the last event id stays on the last chunk
    assert (done.event, done.id) == ("done", str(len(events)))
    assert done.json() == {"stream_id": stream_id, "status": "completed"}
    assert record.status is StreamStatus.COMPLETED
    assert record.content == text
    assert [c.data for c in chunks] == [e.data for e in events]
    assert record.path == "/chat/lobby" and record.method == "POST"
    assert record.metadata["model"] == "fake" and record.metadata["route"] == "/chat/lobby"
    assert record.metadata["chunk_count"] == len(events)


async def test_client_leaving_cancels_the_generator_on_every_framework(framework: str, tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "streams.db")
    hooks = Hooks(hang_after=2)
    app = FRAMEWORKS[framework](recorder, hooks)
    received: list[str] = []
    async with recorder, serve(app) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                async with aconnect_sse(client, "POST", f"{url}/chat/x", json={"prompt": "p"}) as source:
                    stream_id = source.response.headers["x-stream-id"]
                    async for event in source.aiter_sse():
                        received.append(event.data)
                        if len(received) == 2:
                            break  # leaving the block closes the connection
        with anyio.fail_after(5):
            await hooks.closed.wait()
        record = await wait_final(recorder, stream_id)
        chunks = await recorder.chunks(stream_id)
    assert record.status is StreamStatus.CANCELLED
    assert [c.data for c in chunks] == received == ["anonymous ", "in "]
    assert record.content == "anonymous in "


def test_fastapi_keeps_the_signature_for_validation_and_openapi() -> None:
    app = fastapi_app(SQLiteRecorder("unused.db"), Hooks())
    operation = app.openapi()["paths"]["/chat/{room}"]["post"]
    params = {p["name"]: p["in"] for p in operation["parameters"]}
    assert params == {"room": "path", "n": "query", "x-user": "header"}
    assert "requestBody" in operation


def test_litestar_keeps_parameters_and_documents_the_stream() -> None:
    app = litestar_app(SQLiteRecorder("unused.db"), Hooks())
    operation = app.openapi_schema.to_schema()["paths"]["/chat/{room}"]["post"]
    assert {p["name"]: p["in"] for p in operation["parameters"]} == {"room": "path", "n": "query"}
    assert "requestBody" in operation
    assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]


async def test_fastapi_rejects_an_invalid_body_before_streaming(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "streams.db")
    app = fastapi_app(recorder, Hooks())
    async with recorder, serve(app) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                response = await client.post(f"{url}/chat/a?n=notanint", json={"nope": 1})
        assert response.status_code == 422
        assert await recorder.list_streams() == []


async def test_raw_asgi_app_refuses_other_methods(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "streams.db")
    async with recorder, serve(raw_asgi_app(recorder, Hooks())) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                response = await client.get(f"{url}/chat/a")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


async def test_fastapi_documents_a_stream_as_text_event_stream_with_response_class() -> None:
    """FastAPI documents an endpoint by its ``response_class`` (JSON by default): naming
    ``RecordedStreamResponse`` there makes the OpenAPI say ``text/event-stream``, and the
    stream still goes out as the decorator made it."""
    from fastapi import FastAPI

    from asgi_stream_recorder import MemoryRecorder, RecordedStreamResponse, recorded_stream
    from asgi_stream_recorder.testing import sse_client

    recorder = MemoryRecorder()
    app = FastAPI()

    @app.get("/chat", response_class=RecordedStreamResponse)
    @recorded_stream(recorder=recorder)
    async def chat(prompt: str) -> AsyncIterator[str]:
        yield prompt

    @app.get("/undocumented")
    @recorded_stream(recorder=recorder)
    async def undocumented(prompt: str) -> AsyncIterator[str]:
        yield prompt

    paths = app.openapi()["paths"]
    assert list(paths["/chat"]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]
    assert list(paths["/undocumented"]["get"]["responses"]["200"]["content"]) == ["application/json"]
    async with recorder, sse_client(app) as client, client.stream("GET", "/chat?prompt=hi") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        assert [e.data async for e in s.events() if e.event is None] == ["hi"]


def test_litestar_validation_errors_keep_the_handler_media_type_unless_an_exception_handler_says_json() -> None:
    """Litestar sends its own 400 with the handler's ``media_type`` (here ``text/event-stream``):
    the README's fix, an exception handler for ``ValidationException``, makes it JSON again."""
    from litestar import Litestar, MediaType, Response, post
    from litestar.exceptions import ValidationException
    from litestar.testing import TestClient

    from asgi_stream_recorder import MemoryRecorder, recorded_stream

    @post("/chat", status_code=200, media_type="text/event-stream")
    @recorded_stream(recorder=MemoryRecorder())
    async def chat(data: JSONBody[LitestarQuestion]) -> AsyncIterator[str]:
        yield data.text

    def validation_as_json(request: Any, exc: ValidationException) -> Any:
        return Response({"detail": exc.detail, "extra": exc.extra}, status_code=400, media_type=MediaType.JSON)

    for handlers, expected in (({}, "text/event-stream"), ({ValidationException: validation_as_json},
                                                          "application/json")):
        with TestClient(Litestar([chat], exception_handlers=handlers)) as client:  # type: ignore[arg-type]
            answer = client.post("/chat", json={"not": "a question"})
        assert answer.status_code == 400
        assert answer.headers["content-type"].startswith(expected)
        assert "Validation failed" in answer.text


@dataclasses.dataclass
class LitestarQuestion:
    """A request body (at module level: Litestar resolves a handler's annotations from its module)."""

    text: str
