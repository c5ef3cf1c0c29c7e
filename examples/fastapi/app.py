"""The FastAPI chat example: a page, a recorded token stream (GET for EventSource, POST for
fetch streaming) and the list of recent recorded streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from asgi_stream_recorder import SQLiteRecorder, recorded_stream
from asgi_stream_recorder.middleware import StreamRecorderMiddleware

from ..common import Settings, Token, chat_page, generate, may_read_streams, stream_json

__all__ = ["ChatRequest", "create_app"]


class ChatRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    max_tokens: int | None = None


def create_app(*, db_path: str | None = None, token_delay: float | None = None) -> FastAPI:
    """The app; arguments override the environment (``ASGI_STREAM_RECORDER_DB``, ``EXAMPLE_TOKEN_DELAY``)."""
    settings = Settings.overridden(db_path=db_path, token_delay=token_delay)
    recorder = SQLiteRecorder(settings.db_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await settings.aclose()  # the OpenAI client, if the app made one

    app = FastAPI(title="asgi_stream_recorder chat (FastAPI)", lifespan=lifespan)
    # Opens the recorder at startup and drains it at shutdown; decorated streams record into it.
    app.add_middleware(StreamRecorderMiddleware, recorder=recorder)
    page = chat_page("FastAPI")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/chat")
    @recorded_stream
    async def chat_get(
        prompt: Annotated[str, Query(min_length=1, max_length=4000)],
        max_tokens: int | None = None,
    ) -> AsyncIterator[Token]:
        """For EventSource: ``GET /api/chat?prompt=...``."""
        async for token in generate(prompt, settings=settings, max_tokens=max_tokens):
            yield token

    @app.post("/api/chat")
    @recorded_stream
    async def chat_post(body: ChatRequest) -> AsyncIterator[Token]:
        """For fetch streaming: ``POST /api/chat`` with ``{"prompt": ..., "max_tokens": ...}``."""
        async for token in generate(body.prompt, settings=settings, max_tokens=body.max_tokens):
            yield token

    @app.get("/api/streams")
    async def streams(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
        if not may_read_streams(request.client.host if request.client else None):
            raise HTTPException(status_code=403, detail="not allowed to read recorded streams")
        await recorder.flush()  # include what is still queued for the database
        records = await recorder.list_streams(limit=limit)
        return {"source": settings.source, "streams": [stream_json(r) for r in records]}

    return app
