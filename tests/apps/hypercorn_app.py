"""The streaming test app for the hypercorn CLI: ``hypercorn tests.apps.hypercorn_app:app``.

Hypercorn looks the app up with ``eval(name, vars(module))``, which cannot see the lazily
built ``streaming_app.app`` (a module ``__getattr__``), so this module builds it at import,
in each worker process, from the environment:

``ASR_TEST_DB``
    the SQLite file streams are recorded into (required);
``ASR_TEST_DELAY``
    seconds between two tokens (default ``0.05``); streams are endless.

Every HTTP response carries ``x-worker-pid``, the pid of the worker process that served it,
so a test can tell which worker ran which stream.
"""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .streaming_app import create_app

__all__ = ["app"]


def with_worker_pid(inner: ASGIApp) -> ASGIApp:
    pid = str(os.getpid()).encode()

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", pid)]}
            await send(message)

        await inner(scope, receive, send_with_pid)

    return wrapped


app = with_worker_pid(create_app(os.environ["ASR_TEST_DB"], delay=float(os.environ.get("ASR_TEST_DELAY", "0.05"))))
