"""A resumable chat app for tests that run several server processes on one backend.

Run it with ``python -m uvicorn tests.apps.resume_app:app`` from the repository root, with
``ASR_TEST_URL`` the recorder URL (``open_recorder``: SQLite, PostgreSQL, Redis; shared by
every process of a test) and optionally ``ASR_TEST_FLUSH_INTERVAL`` the recorder's
``flush_interval`` (default ``0.05``) and ``ASR_TEST_LEASE`` its ``lease`` (default 30).

Routes:

``GET /health``
    plain text, ``ok <pid>``;
``GET /chat``
    ``@recorded_stream(resume=True)``, key ``?conv=``. ``?n=`` tokens (``0``: endless, the
    default), ``?delay=`` seconds between them (default ``0.05``), ``?wait=`` seconds before the
    first, ``?stamp=1``: token ``i`` is ``"<i>@<time.monotonic()> "`` taken just before it is
    sent (for latency measurements; CLOCK_MONOTONIC is the same clock in every process of a
    host), else ``"token <i>\\n"``;
``GET /counts``
    JSON ``{"started": ..., "finally": ...}``: how many generations this process started, and
    how many ran their ``finally`` (a resume or a cancel must not start one here);
``/streams``
    ``streams_app()`` with its default (loopback) hook, over the middleware's recorder.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_stream_recorder import StreamRecorderMiddleware, open_recorder, recorded_stream, streams_app

__all__ = ["create_app", "token"]


def token(i: int) -> str:
    return f"token {i}\n"


def create_app(url: str, *, flush_interval: float = 0.05, lease: float = 30.0) -> StreamRecorderMiddleware:
    counts = {"started": 0, "finally": 0}

    @recorded_stream(resume=True, ping=None, key=lambda request: request.query_params.get("conv"))
    async def chat(request: Request) -> AsyncIterator[str]:
        query = request.query_params
        n = int(query.get("n", "0"))
        delay = float(query.get("delay", "0.05"))
        wait = float(query.get("wait", "0"))
        stamp = query.get("stamp") == "1"
        counts["started"] += 1
        try:
            if wait:
                await anyio.sleep(wait)
            i = 0
            while n == 0 or i < n:
                yield f"{i}@{time.monotonic():.6f} " if stamp else token(i)
                i += 1
                await anyio.sleep(delay)
        finally:
            counts["finally"] += 1

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"ok {os.getpid()}")

    async def count(request: Request) -> JSONResponse:
        return JSONResponse(counts)

    inner = Starlette(routes=[
        Route("/health", health),
        Route("/counts", count),
        Route("/chat", chat),
        Mount("/streams", streams_app()),
    ])
    return StreamRecorderMiddleware(inner, recorder=open_recorder(url, flush_interval=flush_interval, lease=lease))


_app: StreamRecorderMiddleware | None = None


def __getattr__(name: str) -> Any:
    # ``app`` is built on first use, so importing this module needs no environment.
    global _app
    if name == "app":
        if _app is None:
            url = os.environ.get("ASR_TEST_URL")
            if not url:
                raise RuntimeError("set ASR_TEST_URL to the recorder URL the test app records into")
            _app = create_app(url, flush_interval=float(os.environ.get("ASR_TEST_FLUSH_INTERVAL", "0.05")),
                              lease=float(os.environ.get("ASR_TEST_LEASE", "30")))
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
