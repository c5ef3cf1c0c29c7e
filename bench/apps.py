"""The contenders, as ASGI apps: built once for in-process calls and served by ``bench.serve``.

Each streams ``n`` small token events:

* ``raw``: a bare ASGI loop sending pre-encoded event bytes (the ceiling);
* ``starlette``: Starlette's ``StreamingResponse`` over pre-encoded bytes;
* ``sse_starlette``: sse-starlette's ``EventSourceResponse`` over ``str`` events;
* ``fastapi``: ``fastapi.sse.EventSourceResponse`` (a FastAPI generator endpoint yielding ``str``);
* ``ours_null``: ``@recorded_stream`` with a recorder whose backend discards batches (recording off);
* ``ours_sqlite``: ``@recorded_stream`` recording to SQLite.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
from fastapi import FastAPI
from fastapi.sse import EventSourceResponse as FastAPIEventSourceResponse
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from asgi_stream_recorder import SQLiteRecorder, recorded_stream
from asgi_stream_recorder.recorders import Recorder
from asgi_stream_recorder.sse import encode_data

from .common import NullRecorder, tokens

NAMES = ["raw", "starlette", "sse_starlette", "fastapi", "ours_null", "ours_sqlite"]
LABELS = {
    "raw": "raw ASGI loop (pre-encoded)",
    "starlette": "Starlette StreamingResponse (pre-encoded)",
    "sse_starlette": "sse-starlette EventSourceResponse",
    "fastapi": "fastapi.sse EventSourceResponse",
    "ours_null": "@recorded_stream, recording off (null backend)",
    "ours_sqlite": "@recorded_stream, recording to SQLite",
}

TOKENS = tokens(1_000_000)
ENCODED = [encode_data(t) for t in TOKENS[:1000]]


def _encoded(n: int) -> list[bytes]:
    return [ENCODED[i % 1000] for i in range(n)]


# -- sources ------------------------------------------------------------------------------
async def token_source(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield TOKENS[i]


async def bytes_source(n: int) -> AsyncIterator[bytes]:
    for b in _encoded(n):
        yield b


def raw_app(n: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for b in _encoded(n):
            await send({"type": "http.response.body", "body": b, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def fastapi_app() -> FastAPI:
    api = FastAPI()

    @api.get("/fastapi", response_class=FastAPIEventSourceResponse)
    async def fastapi_stream(n: int = 10) -> AsyncIterator[str]:
        for i in range(n):
            yield TOKENS[i]

    return api


def make_recorders(directory: str | None = None) -> tuple[Recorder, SQLiteRecorder]:
    directory = directory or tempfile.mkdtemp(prefix="asr-bench-")
    return NullRecorder(), SQLiteRecorder(os.path.join(directory, "bench.db"))


# -- the served app -----------------------------------------------------------------------
def build_server_app() -> Any:
    """One FastAPI app with every contender as a route, plus probes for the other benchmarks.

    Configured through the environment: ``BENCH_DB`` (SQLite file), ``BENCH_PING`` (keep-alive
    seconds for the idle streams).
    """
    null, sqlite = NullRecorder(), SQLiteRecorder(os.environ.get("BENCH_DB") or os.path.join(
        tempfile.mkdtemp(prefix="asr-bench-"), "bench.db"))
    ping = float(os.environ.get("BENCH_PING", "15"))
    finally_at: dict[str, float] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with null, sqlite:  # managed recorders: streams never wait for a flush
            yield

    api = FastAPI(lifespan=lifespan)

    @api.get("/fastapi", response_class=FastAPIEventSourceResponse)
    async def fastapi_stream(n: int = 10) -> AsyncIterator[str]:
        for i in range(n):
            yield TOKENS[i]

    def n_of(request: Request) -> int:
        return int(request.query_params.get("n", "10"))

    async def starlette_ep(request: Request) -> StreamingResponse:
        return StreamingResponse(bytes_source(n_of(request)), media_type="text/event-stream")

    async def sse_starlette_ep(request: Request) -> EventSourceResponse:
        return EventSourceResponse(token_source(n_of(request)))

    @recorded_stream(recorder=null)
    async def ours_null(request: Request) -> AsyncIterator[str]:
        for i in range(n_of(request)):
            yield TOKENS[i]

    @recorded_stream(recorder=sqlite)
    async def ours_sqlite(request: Request) -> AsyncIterator[str]:
        for i in range(n_of(request)):
            yield TOKENS[i]

    # the loss check: unique tokens, a checkpoint per token so that every stream is really concurrent
    @recorded_stream(recorder=sqlite)
    async def load(request: Request) -> AsyncIterator[str]:
        for i in range(n_of(request)):
            await anyio.lowlevel.checkpoint()
            yield f"t{i} "

    # idle, pinging streams (memory benchmark): one token, then silence with keep-alive pings
    @recorded_stream(recorder=sqlite, ping=ping)
    async def idle_ours(request: Request) -> AsyncIterator[str]:
        yield "hello"
        await anyio.sleep_forever()

    class IdleRaw:  # the floor: uvicorn's own cost of an open streaming connection
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data: hello\n\n", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass

    async def idle_sse_starlette(request: Request) -> EventSourceResponse:
        async def gen() -> AsyncIterator[str]:
            yield "hello"
            await anyio.sleep_forever()

        return EventSourceResponse(gen(), ping=int(max(1, ping)))

    # disconnect probes: one token then a token every 20 ms until the client leaves
    def disc_gen(tag: str) -> AsyncIterator[str]:
        async def gen() -> AsyncIterator[str]:
            try:
                yield "hello"
                while True:
                    await anyio.sleep(0.02)
                    yield "tick"
            finally:
                finally_at[tag] = time.monotonic()

        return gen()

    async def disc_ours_direct(request: Request) -> Any:
        from asgi_stream_recorder import RecordedStreamResponse

        return RecordedStreamResponse(disc_gen(request.query_params["tag"]), recorder=sqlite)

    async def disc_sse_starlette(request: Request) -> EventSourceResponse:
        return EventSourceResponse(disc_gen(request.query_params["tag"]))

    async def finally_probe(request: Request) -> JSONResponse:
        tags = request.query_params["tags"].split(",")
        return JSONResponse({t: finally_at.get(t) for t in tags})

    async def db_probe(request: Request) -> JSONResponse:
        await sqlite.flush()
        return JSONResponse({"path": sqlite.path, "stats": sqlite.stats, "null_stats": null.stats,
                             "app_with": os.environ.get("BENCH_APP_WITH")})

    api.add_route("/starlette", starlette_ep)
    api.add_route("/sse_starlette", sse_starlette_ep)
    api.add_route("/ours_null", ours_null)
    api.add_route("/ours_sqlite", ours_sqlite)
    api.add_route("/load", load)
    api.add_route("/idle_ours", idle_ours)
    api.add_route("/idle_sse_starlette", idle_sse_starlette)
    api.add_route("/idle_raw", IdleRaw())
    api.add_route("/disc_ours", disc_ours_direct)
    api.add_route("/disc_sse_starlette", disc_sse_starlette)
    api.add_route("/finally", finally_probe)
    api.add_route("/db", db_probe)

    class Raw:  # an ASGI app as a route endpoint (Starlette calls it with scope, receive, send)
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            from urllib.parse import parse_qs

            n = int(parse_qs(scope.get("query_string", b"").decode()).get("n", ["10"])[0])
            await raw_app(n)(scope, receive, send)

    api.add_route("/raw", Raw())
    app: Any = api
    try:  # the middleware, if it exists yet
        from asgi_stream_recorder.middleware import StreamRecorderMiddleware  # type: ignore[import-not-found]

        app = StreamRecorderMiddleware(api, recorder=sqlite)
        app_with = "StreamRecorderMiddleware"
    except ImportError:
        app_with = "no middleware (not importable)"
    os.environ["BENCH_APP_WITH"] = app_with
    return app
