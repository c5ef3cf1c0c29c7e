"""A chat app for the scale-out tests: run with ``python -m uvicorn tests.apps.scale_app:app
--workers N``; every worker records into the backend at ``ASR_TEST_URL`` (``open_recorder``)
with lease ``ASR_TEST_LEASE`` seconds (default 30).

``GET /chat?n=&delay=`` streams ``n`` tokens ``"<i> "`` (``n=0``: endless) ``delay`` seconds
apart; its ``X-Worker-Pid`` header names the worker. ``GET /health``: ``ok <pid>``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_stream_recorder import StreamRecorderMiddleware, open_recorder, recorded_stream


@recorded_stream(ping=None, headers={"X-Worker-Pid": str(os.getpid())})
async def chat(request: Request) -> AsyncIterator[str]:
    n = int(request.query_params.get("n", "0"))
    delay = float(request.query_params.get("delay", "0.02"))
    i = 0
    while n == 0 or i < n:
        yield f"{i} "
        i += 1
        await anyio.sleep(delay)


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"ok {os.getpid()}")


app = StreamRecorderMiddleware(
    Starlette(routes=[Route("/chat", chat), Route("/health", health)]),
    recorder=open_recorder(os.environ["ASR_TEST_URL"], lease=float(os.environ.get("ASR_TEST_LEASE", "30"))),
)
