"""Mount an async generator function as a plain ASGI app, no framework needed.

.. code-block:: python

    from asgi_stream_recorder.app import stream_app

    async def chat(request: Request) -> AsyncIterator[str]:
        prompt = (await request.json())["prompt"]
        async for token in llm(prompt):
            yield token

    app = stream_app(chat, recorder=SQLiteRecorder("streams.db"), methods=["POST"])

The generator function gets a Starlette :class:`~starlette.requests.Request` (its
``scope``, ``query_params``, ``headers``; the body is read before the generator starts,
so ``await request.json()`` inside it returns at once). Every option of
:func:`~asgi_stream_recorder.recorded_stream` is accepted and means the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import Message, Receive, Scope, Send

from .decorator import recorded_stream
from .recorders import Recorder
from .response import Key, OnDisconnect, RecordedStreamResponse, WireFormat

__all__ = ["StreamApp", "answer_lifespan", "stream_app"]


class StreamApp:
    """The ASGI app made by :func:`stream_app`: HTTP requests stream, lifespan is answered."""

    def __init__(
        self,
        source: Callable[[Request], AsyncIterator[Any]],
        endpoint: Callable[[Request], Any],
        methods: Collection[str] | None,
    ) -> None:
        self.source = source
        self._endpoint = endpoint
        allowed = None if methods is None else {m.upper() for m in methods}
        if allowed is not None and "GET" in allowed:
            allowed.add("HEAD")  # headers only: the response never starts the source for HEAD
        self.methods = None if allowed is None else frozenset(allowed)

    def __repr__(self) -> str:
        return f"stream_app({getattr(self.source, '__qualname__', self.source)!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await answer_lifespan(receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1003, "reason": "event streams only"})
        else:
            raise RuntimeError(f"stream_app cannot serve ASGI scope type {kind!r}")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET").upper()
        if self.methods is not None and method not in self.methods:
            allowed = ", ".join(sorted(self.methods))
            await PlainTextResponse("Method Not Allowed", 405, headers={"allow": allowed})(scope, receive, send)
            return
        request = Request(scope, receive, send)
        response: RecordedStreamResponse = await self._endpoint(request)
        await response(scope, receive, send)


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Nothing to set up: answer startup and shutdown (so servers and middleware are content)."""
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def stream_app(
    source: Callable[[Request], AsyncIterator[Any]],
    /,
    *,
    methods: Collection[str] | None = ("GET", "POST"),
    recorder: Recorder | None = None,
    metadata: Mapping[str, Any] | Callable[[Scope], Mapping[str, Any]] | None = None,
    event: str | None = None,
    on_disconnect: OnDisconnect = "cancel",
    ping: float | None = 15.0,
    headers: Mapping[str, str] | None = None,
    format: str | WireFormat = "sse",
    resume: bool = False,
    key: Key = None,
    done_event: bool = True,
    timeout: float | None = None,
    idle_timeout: float | None = None,
    coalesce: float | None = None,
    progress: float | None = None,
    fallback: Callable[[Request], AsyncIterator[Any]] | None = None,
) -> StreamApp:
    """An ASGI app that answers every HTTP request with ``source(request)``'s items as a
    recorded event stream.

    ``methods``: the HTTP methods to accept (default GET and POST; None: any); others get
    405 with an ``Allow`` header. ``HEAD`` is answered with the headers alone wherever GET is. The other
    options are those of :func:`~asgi_stream_recorder.recorded_stream` (checked here).
    Mount it anywhere an ASGI app goes: ``Mount("/chat", stream_app(chat))`` in Starlette,
    ``app.mount(...)`` in FastAPI, or serve it directly.
    """
    if not callable(source):
        raise TypeError(f"stream_app needs an async generator function, got {source!r}")
    endpoint = recorded_stream(
        recorder=recorder,
        metadata=metadata,
        event=event,
        on_disconnect=on_disconnect,
        ping=ping,
        headers=headers,
        format=format,
        resume=resume,
        key=key,
        done_event=done_event,
        timeout=timeout,
        idle_timeout=idle_timeout,
        coalesce=coalesce,
        progress=progress,
        fallback=fallback,
    )(source)
    return StreamApp(source, endpoint, methods)
