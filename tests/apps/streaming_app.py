"""A token-streaming app for tests that run it in a real server process.

Run it with ``python -m uvicorn tests.apps.streaming_app:app`` from the repository root.
It is configured by environment variables, read when ``app`` is first looked up:

``ASR_TEST_DB``
    the SQLite file streams are recorded into (required);
``ASR_TEST_DELAY``
    seconds between two tokens (default ``0.05``);
``ASR_TEST_TOKENS``
    how many tokens a stream yields, ``0`` for an endless stream (default ``0``);
``ASR_TEST_ON_DISCONNECT``
    ``cancel`` or ``continue``: what ``/stream`` does when its client hangs up (default
    ``cancel``).

Routes: ``GET /health`` (plain text, no stream), ``GET /stream`` (the configured stream)
and ``GET /continue`` (always ``on_disconnect="continue"``). ``?n=`` and ``?delay=``
override the token count and delay per request. Token ``i`` (from 0) is ``"token {i}\\n"``.

:func:`create_app` builds the same app in-process, for tests that serve it themselves.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_stream_recorder import SQLiteRecorder, recorded_stream
from asgi_stream_recorder.middleware import StreamRecorderMiddleware
from asgi_stream_recorder.response import OnDisconnect

__all__ = ["create_app", "token"]


def token(i: int) -> str:
    """The ``i``-th token every stream of this app yields."""
    return f"token {i}\n"


def create_app(
    db: str | Path,
    *,
    delay: float = 0.05,
    tokens: int = 0,
    on_disconnect: OnDisconnect = "cancel",
    handle_signals: bool = True,
) -> StreamRecorderMiddleware:
    """The app wrapped in :class:`StreamRecorderMiddleware` recording into ``db``."""

    async def tokens_for(request: Request) -> AsyncIterator[str]:
        n = int(request.query_params.get("n", tokens))
        pause = float(request.query_params.get("delay", delay))
        i = 0
        while n == 0 or i < n:
            yield token(i)
            i += 1
            await anyio.sleep(pause)

    @recorded_stream(on_disconnect=on_disconnect, ping=None)
    async def stream(request: Request) -> AsyncIterator[str]:
        async for item in tokens_for(request):
            yield item

    @recorded_stream(on_disconnect="continue", ping=None)
    async def continue_stream(request: Request) -> AsyncIterator[str]:
        async for item in tokens_for(request):
            yield item

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"ok {os.getpid()}")

    inner = Starlette(
        routes=[
            Route("/health", health),
            Route("/stream", stream),
            Route("/continue", continue_stream),
        ]
    )
    lease = float(os.environ.get("ASR_TEST_LEASE", "30"))
    return StreamRecorderMiddleware(inner, recorder=SQLiteRecorder(db, lease=lease), handle_signals=handle_signals)


def _from_environment() -> StreamRecorderMiddleware:
    db = os.environ.get("ASR_TEST_DB")
    if not db:
        raise RuntimeError("set ASR_TEST_DB to the SQLite file the test app records into")
    mode = os.environ.get("ASR_TEST_ON_DISCONNECT", "cancel")
    if mode not in ("cancel", "continue"):
        raise RuntimeError(f"ASR_TEST_ON_DISCONNECT must be 'cancel' or 'continue', not {mode!r}")
    return create_app(
        db,
        delay=float(os.environ.get("ASR_TEST_DELAY", "0.05")),
        tokens=int(os.environ.get("ASR_TEST_TOKENS", "0")),
        on_disconnect=cast(OnDisconnect, mode),
    )


_app: StreamRecorderMiddleware | None = None


def __getattr__(name: str) -> Any:
    # ``app`` is built on first use, so importing this module (for create_app) needs no environment.
    global _app
    if name == "app":
        if _app is None:
            _app = _from_environment()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
