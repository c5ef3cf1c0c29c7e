"""Groq, Mistral and Gemini through ``openai_text``: their OpenAI-compatible endpoints, offline.

Each provider is the real ``openai`` client with the provider's documented ``base_url``,
its requests carried by an in-process ASGI transport to ``FakeOpenAI`` mounted at exactly
that host and path prefix (anything else gets a 404, so a wrong URL fails the test). No
extra dependency: the adapter is the OpenAI one. Runs on asyncio and trio.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import MemoryRecorder, StreamStatus, recorded_stream
from asgi_stream_recorder.integrations.openai import openai_text
from asgi_stream_recorder.testing import FakeOpenAI, FakeToolCall, sse_client, wait_recorded
from asgi_stream_recorder.testing.openai_server import Receive, Scope, Send

pytestmark = pytest.mark.anyio

#: The OpenAI-compatible base URLs the providers document, and a model each serves.
PROVIDERS = {
    "groq": ("https://api.groq.com/openai/v1", "llama-3.3-70b-versatile"),
    "mistral": ("https://api.mistral.ai/v1", "mistral-small-latest"),
    "gemini": ("https://generativelanguage.googleapis.com/v1beta/openai/", "gemini-2.5-flash"),
}
SECRET_KEY = "gsk-test-SECRET-0c5e7a1d3b"
TOKENS = ["Bon", "jour", " à", " tous", " 👋"]
USAGE = {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


class Mounted:
    """Serve ``app`` only at ``base_url``'s host and under its path, as the provider does; 404 elsewhere.

    The app sees the path with the prefix removed; :attr:`seen` keeps every request's
    host and full path.
    """

    def __init__(self, app: FakeOpenAI, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.app, self.host, self.prefix = app, parts.netloc, parts.path.rstrip("/")
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode()
        path: str = scope["path"]
        self.seen.append((host, path))
        if host != self.host or not path.startswith(self.prefix + "/"):
            body = json.dumps({"error": {"message": f"no route {host}{path}", "type": "invalid_request_error"}})
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        inner = path[len(self.prefix):]
        await self.app({**scope, "path": inner, "raw_path": inner.encode()}, receive, send)


def provider_client(name: str, fake: FakeOpenAI) -> tuple[openai.AsyncOpenAI, Mounted]:
    base_url, _ = PROVIDERS[name]
    mounted = Mounted(fake, base_url)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=mounted))
    client = openai.AsyncOpenAI(base_url=base_url, api_key=SECRET_KEY, http_client=http, max_retries=0, timeout=5)
    return client, mounted


def endpoint(recorder: MemoryRecorder, client: openai.AsyncOpenAI, model: str) -> Starlette:
    @recorded_stream(recorder=recorder)
    def chat(request: Request) -> AsyncIterator[Any]:
        return openai_text(client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                                          stream_options={"include_usage": True}))

    return Starlette(routes=[Route("/chat", chat)])


@pytest.mark.parametrize("name", sorted(PROVIDERS))
async def test_provider_stream_is_recorded_through_openai_text(name: str) -> None:
    base_url, model = PROVIDERS[name]
    fake = FakeOpenAI(tokens=TOKENS, usage=USAGE, model=model, api_key=SECRET_KEY)
    client, mounted = provider_client(name, fake)
    recorder = MemoryRecorder()
    async with recorder, sse_client(endpoint(recorder, client, model)) as app:
        async with app.stream("GET", "/chat") as s:
            events = await s.collect()
            stream_id = s.stream_id
        assert stream_id is not None
        record = await wait_recorded(recorder, stream_id)
    await client.close()
    assert [e.data for e in events if e.event is None] == TOKENS
    assert record.status is StreamStatus.COMPLETED, record.error
    assert record.content == "".join(TOKENS)
    assert record.metadata["model"] == model
    assert record.metadata["usage"] == USAGE
    assert record.metadata["finish_reason"] == "stop"
    # the request went to the documented URL, with the key as a bearer token, and nowhere else
    parts = urlsplit(base_url)
    assert mounted.seen == [(parts.netloc, parts.path.rstrip("/") + "/chat/completions")]
    assert [r.authorized for r in fake.requests] == [True]
    assert SECRET_KEY not in repr(record) and SECRET_KEY not in repr(fake.requests)


@pytest.mark.parametrize("name", sorted(PROVIDERS))
async def test_provider_tool_calls_and_failures_are_recorded(name: str) -> None:
    _, model = PROVIDERS[name]
    fake = FakeOpenAI("Checking.", model=model, tool_calls=[FakeToolCall("get_weather", '{"city": "Oslo"}')])
    client, _ = provider_client(name, fake)
    failing = FakeOpenAI(tokens=TOKENS, model=model, fail_after=2)
    failing_client, _ = provider_client(name, failing)
    recorder = MemoryRecorder()
    async with recorder:
        for c in (client, failing_client):
            async with sse_client(endpoint(recorder, c, model)) as app:
                with anyio.fail_after(10):
                    await app.collect("/chat")
        await recorder.flush()
        summaries = await recorder.list_streams()
        records = {r.status: r for r in [await wait_recorded(recorder, s.id) for s in summaries]}
        chunks = await recorder.chunks(records[StreamStatus.COMPLETED].id)
    await client.close()
    await failing_client.close()
    done, failed = records[StreamStatus.COMPLETED], records[StreamStatus.FAILED]
    assert done.content == "Checking." and done.metadata["finish_reason"] == "tool_calls"
    calls = [json.loads(c.data) for c in chunks if c.event == "tool_call"]
    assert "".join(c["function"].get("arguments", "") for c in calls) == '{"city": "Oslo"}'
    assert failed.content == "".join(TOKENS[:2])
    assert failed.error is not None and failed.error.startswith("APIError")
