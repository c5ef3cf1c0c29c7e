"""The FastAPI chat example: a page, a recorded and resumable token stream (GET for
EventSource, POST for fetch streaming), and the streams app (list, watch live, stop) at
``/streams``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from asgi_stream_recorder import SQLiteRecorder, recorded_stream, streams_app
from asgi_stream_recorder.middleware import StreamRecorderMiddleware

from ..common import Settings, Token, authorize, chat_page, conversation_key, generate

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
        await settings.aclose()  # the model clients, if the app made any

    app = FastAPI(title="asgi_stream_recorder chat (FastAPI)", lifespan=lifespan)
    # Opens the recorder at startup and drains it at shutdown; decorated streams record into it.
    app.add_middleware(StreamRecorderMiddleware, recorder=recorder)
    page = chat_page("FastAPI", settings.source)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page  # also the watch page: /?watch=<stream id>

    # resume=True: a browser that loses the connection reconnects with Last-Event-ID and gets
    # the rest of the same answer (the generator is not called again); key=: the page's
    # conversation id (?conversation=), to find an answer still streaming after a reload;
    # timeout=/idle_timeout=: a stuck model ends the answer "failed" with a TimeoutError saying which.
    @app.get("/api/chat")
    @recorded_stream(resume=True, key=conversation_key, timeout=300, idle_timeout=60)
    async def chat_get(
        prompt: Annotated[str, Query(min_length=1, max_length=4000)],
        max_tokens: int | None = None,
    ) -> AsyncIterator[Token]:
        """For EventSource: ``GET /api/chat?prompt=...&conversation=...``."""
        async for token in generate(prompt, settings=settings, max_tokens=max_tokens):
            yield token

    @app.post("/api/chat")
    @recorded_stream(resume=True, key=conversation_key, timeout=300, idle_timeout=60)
    async def chat_post(body: ChatRequest) -> AsyncIterator[Token]:
        """For fetch streaming: ``POST /api/chat?conversation=...`` with ``{"prompt": ..., "max_tokens": ...}``."""
        async for token in generate(body.prompt, settings=settings, max_tokens=body.max_tokens):
            yield token

    # GET /streams/?limit=, GET /streams/{id}, GET /streams/{id}/events (watch live, resume),
    # POST /streams/{id}/cancel (the Stop button); loopback clients only (see common.authorize).
    app.mount("/streams", streams_app(recorder=recorder, authorize=authorize))
    return app
