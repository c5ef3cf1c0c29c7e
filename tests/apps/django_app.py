"""A Django project in one module, for tests that serve it with uvicorn in its own process.

``python -m uvicorn tests.apps.django_app:application`` (Django's own ASGI application) or
``tests.apps.django_app:wrapped`` (the same, with the streams app mounted at ``/streams``
next to Django's URLs, under ``StreamRecorderMiddleware``). Environment: ``ASR_TEST_URL``,
the recorder URL, given to Django as the ``ASGI_STREAM_RECORDER`` setting; ``ASR_TEST_DIR``,
where the views leave marker files (a generator's ``finally`` ran; a gate the test opens).

Routes: ``/health``; ``/chat?n=&delay=&gate=`` (``@recorded_stream``, ``n`` tokens ``delay``
seconds apart; with ``gate=1`` it waits after its first token until the file ``gate``
exists); ``/chat/<name>`` (a path parameter, stored as ``key``); ``/resume?n=`` (``resume=True``);
``/post`` (POST, the JSON
body's ``words`` streamed back, ``metadata`` from the request).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import django
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse
from django.urls import path
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_stream_recorder import StreamRecorderMiddleware, streams_app
from asgi_stream_recorder.integrations.django import recorded_stream, recorder
from asgi_stream_recorder.streams import loopback_only

settings.configure(
    DEBUG=False,
    SECRET_KEY="tests-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=["django.middleware.common.CommonMiddleware", "django.middleware.gzip.GZipMiddleware"],
    INSTALLED_APPS=[],
    DATABASES={},
    ASGI_STREAM_RECORDER=os.environ.get("ASR_TEST_URL", "memory://"),
)
django.setup()


MARKS = Path(os.environ.get("ASR_TEST_DIR", "."))


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"ok django {django.get_version()}")


@recorded_stream(ping=1.0, metadata=lambda request: {"user_agent": request.headers.get("user-agent", "")})
async def chat(request: HttpRequest) -> AsyncIterator[str]:
    n = int(request.GET.get("n", "5"))
    delay = float(request.GET.get("delay", "0"))
    tag = request.GET.get("tag", "chat")
    try:
        for i in range(n):
            yield f"token {i} "
            if i == 0 and request.GET.get("gate") == "1":
                with anyio.fail_after(10):
                    while not (MARKS / f"{tag}.gate").exists():  # noqa: ASYNC110 - the test opens it
                        await anyio.sleep(0.01)
            if delay:
                await anyio.sleep(delay)
    finally:
        (MARKS / f"{tag}.finally").write_text("ran")


@recorded_stream(key=lambda request: request.resolver_match.kwargs["name"])
async def named(request: HttpRequest, name: str) -> AsyncIterator[str]:
    yield f"hello {name}"


@recorded_stream(event="word")
async def post(request: HttpRequest) -> AsyncIterator[str]:
    body = json.loads(request.body)
    for word in body["words"]:
        yield word


@recorded_stream(resume=True, ping=None)
async def resumable(request: HttpRequest) -> AsyncIterator[str]:
    for i in range(int(request.GET.get("n", "20"))):
        yield f"part {i} "
        await anyio.sleep(0.02)


urlpatterns = [
    path("resume", resumable),
    path("health", health),
    path("chat", chat),
    path("chat/<str:name>", named),
    path("post", post),
]

application = get_asgi_application()

# The streams app next to Django's URLs, and the middleware around both (lifespan, shutdown).
streams = streams_app(recorder=recorder(), authorize=loopback_only)  # (your own hook in production)
wrapped = StreamRecorderMiddleware(Starlette(routes=[Mount("/streams", streams), Mount("/", application)]),
                                   recorder=recorder())
