"""The program ``bench.instructions`` runs under callgrind: one contender, one request of ``n`` events.

``python -m bench.instructions_child NAME N [--cprofile]``

Each contender streams ``n`` one-token events through a Starlette app called in-process
(the bare loop is called directly: it is the floor): ``receive`` hands over the (empty)
request body, then waits for the rest of the run (no disconnect); ``send`` discards. Nothing
here is random or depends on the clock in a way that grows with ``n`` (the recorder's stream
ids are random uuids, of fixed length), so the instruction count of a run with
12,000 events minus one with 2,000 is the cost of 10,000 events: interpreter start-up,
imports, the recorder's opening and closing cancel out.

The recorders get a ``flush_interval`` no run reaches: under callgrind everything runs
about 50x slower, and the default 50 ms timer would cut batches of a hundred chunks or so
where a native stream at these rates is cut at ``batch_size`` (2,000). With the timer out of
the way, batches are cut as they are natively, and the count no longer depends on the clock.

``--cprofile`` runs a short request (for the imports), then the same request under
:mod:`cProfile` (not valgrind), and prints the top 40 Python functions by own time, with
call counts.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NAMES = ["bare", "starlette_bytes", "starlette_fstring", "ours_sqlite", "ours_memory", "ours_middleware",
         "sse_starlette"]
EVENT = b"data: tok\n\n"
NEVER = 3600.0 * 24  # a flush interval no run reaches: batches are cut by batch_size alone


def http_scope() -> Scope:
    """A GET as uvicorn describes it (spec 2.3: Starlette's responses also watch for a disconnect)."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": "/stream", "raw_path": b"/stream", "root_path": "",
        "query_string": b"", "headers": [(b"host", b"127.0.0.1"), (b"accept", b"text/event-stream")],
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
    }


async def request(app: ASGIApp) -> int:
    """Call ``app`` once; returns how many body messages it sent (each discarded)."""
    over = asyncio.Event()
    sent = 0
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await over.wait()  # set only once the app has returned: the client never leaves
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal sent
        sent += 1

    await app(http_scope(), receive, send)
    over.set()
    return sent


class Lifespan:
    """Runs an app's lifespan around the requests, as a server does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.said: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

        async def serve() -> None:
            await self.app(scope, self.inbox.get, self.said.put)

        self.task = asyncio.get_running_loop().create_task(serve())
        await self.inbox.put({"type": "lifespan.startup"})
        reply = await asyncio.wait_for(self.said.get(), 60)
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"lifespan startup failed: {reply}")

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        await self.inbox.put({"type": "lifespan.shutdown"})
        reply = await asyncio.wait_for(self.said.get(), 60)
        if reply["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"lifespan shutdown failed: {reply}")
        await asyncio.wait_for(self.task, 60)


def routed(endpoint: Any) -> Starlette:
    return Starlette(routes=[Route("/stream", endpoint)])


# -- the contenders -------------------------------------------------------------------------
async def bare(n: int) -> int:
    """A bare ASGI loop over pre-encoded bytes: no framework, the floor."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for _ in range(n):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return await request(app)


async def starlette_bytes(n: int) -> int:
    async def events() -> AsyncIterator[bytes]:
        for _ in range(n):
            yield EVENT

    async def endpoint(req: Request) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream")

    return await request(routed(endpoint))


async def starlette_fstring(n: int) -> int:
    async def events() -> AsyncIterator[str]:
        for i in range(n):
            yield f"id: {i}\ndata: tok\n\n"

    async def endpoint(req: Request) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream")

    return await request(routed(endpoint))


def _ours_endpoint(n: int, recorder: Any) -> Any:
    from asgi_stream_recorder import recorded_stream

    @recorded_stream(recorder=recorder)
    async def endpoint(req: Request) -> AsyncIterator[str]:
        for _ in range(n):
            yield "tok"

    return endpoint


async def _ours_with(n: int, recorder: Any) -> int:
    async with recorder:  # opened before, closed (everything flushed) after the request
        sent = await request(routed(_ours_endpoint(n, recorder)))
    if recorder.stats["written"] < n:
        raise AssertionError(f"only {recorder.stats['written']} records written for {n} events")
    return sent


async def ours_sqlite(n: int) -> int:
    from asgi_stream_recorder import SQLiteRecorder

    with tempfile.TemporaryDirectory(prefix="asr-instr-") as tmp:
        return await _ours_with(n, SQLiteRecorder(os.path.join(tmp, "bench.db"), flush_interval=NEVER))


async def ours_memory(n: int) -> int:
    from asgi_stream_recorder import MemoryRecorder

    return await _ours_with(n, MemoryRecorder(flush_interval=NEVER))


async def ours_middleware(n: int) -> int:
    """The decorated endpoint under ``StreamRecorderMiddleware`` (recording to SQLite), with a lifespan."""
    from starlette.middleware import Middleware

    from asgi_stream_recorder import SQLiteRecorder, StreamRecorderMiddleware

    with tempfile.TemporaryDirectory(prefix="asr-instr-") as tmp:
        recorder = SQLiteRecorder(os.path.join(tmp, "bench.db"), flush_interval=NEVER)
        app = Starlette(routes=[Route("/stream", _ours_endpoint(n, None))],
                        middleware=[Middleware(StreamRecorderMiddleware, recorder=recorder)])
        async with Lifespan(app):
            sent = await request(app)
        if recorder.stats["written"] < n:
            raise AssertionError(f"only {recorder.stats['written']} records written for {n} events")
        return sent


async def sse_starlette(n: int) -> int:
    from sse_starlette.sse import EventSourceResponse

    async def events() -> AsyncIterator[dict[str, Any]]:
        for i in range(n):
            yield {"data": "tok", "id": str(i)}

    async def endpoint(req: Request) -> EventSourceResponse:
        return EventSourceResponse(events())

    return await request(routed(endpoint))


CONTENDERS: dict[str, Callable[[int], Coroutine[Any, Any, int]]] = {
    "bare": bare, "starlette_bytes": starlette_bytes, "starlette_fstring": starlette_fstring,
    "ours_sqlite": ours_sqlite, "ours_memory": ours_memory, "ours_middleware": ours_middleware,
    "sse_starlette": sse_starlette,
}


def run(name: str, n: int) -> None:
    sent = asyncio.run(CONTENDERS[name](n))
    if sent < n:
        raise AssertionError(f"{name}: only {sent} body messages for {n} events")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in CONTENDERS:
        print(f"usage: python -m bench.instructions_child {{{','.join(NAMES)}}} N [--cprofile]", file=sys.stderr)
        return 2
    name, n = argv[0], int(argv[1])
    if "--cprofile" in argv[2:]:
        import cProfile
        import pstats

        run(name, 64)  # a first, short run does the imports: the profile shows the stream
        profile = cProfile.Profile()
        profile.runcall(run, name, n)
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(40)
    else:
        run(name, n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
