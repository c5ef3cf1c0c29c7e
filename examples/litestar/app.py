"""The Litestar chat example: a page, a recorded token stream (GET for EventSource, POST for
fetch streaming) and the list of recent recorded streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Litestar, MediaType, Request, get, post
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import DefineMiddleware
from litestar.params import Body, Parameter

from asgi_stream_recorder import SQLiteRecorder, recorded_stream
from asgi_stream_recorder.middleware import StreamRecorderMiddleware

from ..common import Settings, Token, chat_page, generate, may_read_streams, stream_json

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
            await settings.aclose()  # the OpenAI client, if the app made one

    page = chat_page("Litestar")

    @get("/", media_type=MediaType.HTML, sync_to_thread=False)
    def index() -> str:
        return page

    @get("/api/chat")
    @recorded_stream
    async def chat_get(
        prompt: Annotated[str, Parameter(description="what to ask", min_length=1, max_length=4000)],
        max_tokens: Annotated[int | None, Parameter(description="at most this many tokens")] = None,
    ) -> AsyncIterator[Token]:
        """For EventSource: ``GET /api/chat?prompt=...``."""
        async for token in generate(prompt, settings=settings, max_tokens=max_tokens):
            yield token

    @post("/api/chat")
    @recorded_stream
    async def chat_post(
        data: Annotated[ChatRequest, Body(media_type=RequestEncodingType.JSON)],
    ) -> AsyncIterator[Token]:
        """For fetch streaming: ``POST /api/chat`` with ``{"prompt": ..., "max_tokens": ...}``."""
        async for token in generate(data.prompt, settings=settings, max_tokens=data.max_tokens):
            yield token

    @get("/api/streams")
    async def streams(
        request: Request[Any, Any, Any], limit: Annotated[int, Parameter(description="how many", ge=1, le=100)] = 10
    ) -> dict[str, Any]:
        if not may_read_streams(request.client.host if request.client else None):
            raise NotAuthorizedException("not allowed to read recorded streams")
        await recorder.flush()  # include what is still queued for the database
        records = await recorder.list_streams(limit=limit)
        return {"source": settings.source, "streams": [stream_json(r) for r in records]}

    return Litestar(
        route_handlers=[index, chat_get, chat_post, streams],
        middleware=[DefineMiddleware(StreamRecorderMiddleware, recorder=recorder)],
        lifespan=[lifespan],
    )
