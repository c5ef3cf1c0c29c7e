"""The Litestar chat example: a page, a recorded and resumable token stream (GET for
EventSource, POST for fetch streaming), and the streams app (list, watch live, stop) at
``/streams``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from litestar import Litestar, MediaType, asgi, get, post
from litestar.enums import RequestEncodingType
from litestar.middleware import DefineMiddleware
from litestar.params import Body, Parameter
from litestar.types import Receive, Scope, Send

from asgi_stream_recorder import SQLiteRecorder, recorded_stream, streams_app
from asgi_stream_recorder.middleware import StreamRecorderMiddleware

from ..common import Settings, Token, authorize, chat_page, conversation_key, generate

__all__ = ["ChatRequest", "create_app"]


@dataclass
class ChatRequest:
    prompt: str
    max_tokens: int | None = None


def create_app(*, db_path: str | None = None, token_delay: float | None = None) -> Litestar:
    """The app; arguments override the environment (``ASGI_STREAM_RECORDER_DB``, ``EXAMPLE_TOKEN_DELAY``)."""
    settings = Settings.overridden(db_path=db_path, token_delay=token_delay)
    recorder = SQLiteRecorder(settings.db_path)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Litestar does not pass the ASGI lifespan to middleware given through DefineMiddleware,
        # so the app opens and drains the recorder itself (see README, Frameworks: Litestar).
        async with recorder:
            yield
            await settings.aclose()  # the model clients, if the app made any

    page = chat_page("Litestar", settings.source)

    @get("/", media_type=MediaType.HTML, sync_to_thread=False)
    def index() -> str:
        return page  # also the watch page: /?watch=<stream id>

    # resume=True: a browser that loses the connection reconnects with Last-Event-ID and gets
    # the rest of the same answer (the generator is not called again); key=: the page's
    # conversation id (?conversation=), to find an answer still streaming after a reload.
    @get("/api/chat")
    @recorded_stream(resume=True, key=conversation_key, timeout=300, idle_timeout=60)
    async def chat_get(
        prompt: Annotated[str, Parameter(description="what to ask", min_length=1, max_length=4000)],
        max_tokens: Annotated[int | None, Parameter(description="at most this many tokens")] = None,
    ) -> AsyncIterator[Token]:
        """For EventSource: ``GET /api/chat?prompt=...&conversation=...``."""
        async for token in generate(prompt, settings=settings, max_tokens=max_tokens):
            yield token

    @post("/api/chat")
    @recorded_stream(resume=True, key=conversation_key, timeout=300, idle_timeout=60)
    async def chat_post(
        data: Annotated[ChatRequest, Body(media_type=RequestEncodingType.JSON)],
    ) -> AsyncIterator[Token]:
        """For fetch streaming: ``POST /api/chat?conversation=...`` with ``{"prompt": ..., "max_tokens": ...}``."""
        async for token in generate(data.prompt, settings=settings, max_tokens=data.max_tokens):
            yield token

    # GET /streams/?limit=, GET /streams/{id}, GET /streams/{id}/events (watch live, resume),
    # POST /streams/{id}/cancel (the Stop button); loopback clients only (see common.authorize).
    streams = streams_app(recorder=recorder, authorize=authorize)

    @asgi("/streams", is_mount=True, copy_scope=True)
    async def streams_mount(scope: Scope, receive: Receive, send: Send) -> None:
        # Litestar hands a mounted app the rest of the path with a slash added ("/<id>/events/"),
        # which the streams app's routes do not have: take it off again.
        path = scope["path"]
        if path != "/":
            scope["path"] = path.rstrip("/")
        await streams(scope, receive, send)  # type: ignore[arg-type]

    return Litestar(
        route_handlers=[index, chat_get, chat_post, streams_mount],
        middleware=[DefineMiddleware(StreamRecorderMiddleware, recorder=recorder)],
        lifespan=[lifespan],
    )
