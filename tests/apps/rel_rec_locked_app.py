"""An app for ``tests/test_reliability_recorder.py``: shutdown while another process holds the
SQLite file locked.

Run it with ``python -m uvicorn --factory tests.apps.rel_rec_locked_app:create_app`` from the
repository root. ``REL_REC_DB`` names the SQLite file (required); ``REL_REC_SHUTDOWN_TIMEOUT``
is the middleware's ``shutdown_timeout`` (default 2). Routes: ``GET /health`` (plain text) and
``GET /stream`` (an endless stream of ``tok <i> `` tokens, one every 10 ms).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_stream_recorder import SQLiteRecorder, StreamRecorderMiddleware, recorded_stream

__all__ = ["create_app"]


def create_app() -> StreamRecorderMiddleware:
    db = os.environ.get("REL_REC_DB")
    if not db:
        raise RuntimeError("set REL_REC_DB to the SQLite file the app records into")

    @recorded_stream(ping=None)
    async def stream(request: Request) -> AsyncIterator[str]:
        i = 0
        while True:
            yield f"tok {i} "
            i += 1
            await anyio.sleep(0.01)

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"ok {os.getpid()}")

    inner = Starlette(routes=[Route("/health", health), Route("/stream", stream)])
    return StreamRecorderMiddleware(
        inner,
        recorder=SQLiteRecorder(db),
        shutdown_timeout=float(os.environ.get("REL_REC_SHUTDOWN_TIMEOUT", "2")),
    )
