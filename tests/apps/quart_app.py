"""A Quart app for tests that serve it with uvicorn in its own process.

``tests.apps.quart_app:app`` (the recorder opened and closed by ``init_app``'s
``before_serving``/``after_serving``) or ``tests.apps.quart_app:wrapped`` (a second app, the
same routes, under ``StreamRecorderMiddleware`` through ``app.asgi_app``). Environment:
``ASR_TEST_URL``, the recorder URL; ``ASR_TEST_DIR``, where the routes leave marker files.

Routes: ``/health``; ``/chat?n=&delay=&gate=&tag=`` (as in ``django_app``); ``/chat/<name>``
(key from the path); ``/post`` (POST: the generator itself awaits ``request.get_json()`` and
streams its ``words``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from quart import Quart, request

from asgi_stream_recorder import StreamRecorderMiddleware, open_recorder
from asgi_stream_recorder.integrations.quart import init_app, recorded_stream

MARKS = Path(os.environ.get("ASR_TEST_DIR", "."))
URL = os.environ.get("ASR_TEST_URL", "memory://")


def create_app() -> Quart:
    app = Quart(__name__)
    app.config["RESPONSE_TIMEOUT"] = float(os.environ.get("ASR_TEST_RESPONSE_TIMEOUT", "60"))

    @app.get("/health")
    async def health() -> str:
        return "ok quart"

    @app.get("/chat")
    @recorded_stream(ping=1.0, metadata=lambda req: {"user_agent": req.headers.get("user-agent", "")})
    async def chat() -> AsyncIterator[str]:
        n = int(request.args.get("n", "5"))
        delay = float(request.args.get("delay", "0"))
        tag = request.args.get("tag", "chat")
        try:
            for i in range(n):
                yield f"token {i} "
                if i == 0 and request.args.get("gate") == "1":
                    with anyio.fail_after(10):
                        while not (MARKS / f"{tag}.gate").exists():  # noqa: ASYNC110 - the test opens it
                            await anyio.sleep(0.01)
                if delay:
                    await anyio.sleep(delay)
        finally:
            (MARKS / f"{tag}.finally").write_text("ran")

    @app.get("/chat/<name>")
    @recorded_stream(key=lambda req: req.view_args["name"])
    async def named(name: str) -> AsyncIterator[str]:
        yield f"hello {name}"

    @app.post("/post")
    @recorded_stream(event="word")
    async def post() -> AsyncIterator[str]:
        body = await request.get_json()
        for word in body["words"]:
            yield word

    return app


app = create_app()
init_app(app, open_recorder(URL))

_other = create_app()
_other.asgi_app = StreamRecorderMiddleware(_other.asgi_app, recorder=open_recorder(URL))  # type: ignore[method-assign]
wrapped = _other
