"""OpenAI streams in, OpenAI-compatible streams out: the real ``openai`` client over real HTTP.

In: the real client streams from ``FakeOpenAI`` (served on 127.0.0.1) through
``openai_text`` inside a recorded endpoint (also served), and the record holds the exact
text, usage, finish_reason, model, response id and system fingerprint.
Out: the real client consumes a recorded endpoint with ``format="openai"``.

The openai client runs on both backends: it uses anyio underneath, so these tests run
on asyncio (uvicorn) and trio (hypercorn) like every other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import openai
import pytest
from httpx_sse import aconnect_sse as client_sse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from asgi_stream_recorder import (
    MemoryRecorder,
    RecordedStreamResponse,
    ServerSentEvent,
    SSEParser,
    StreamRecord,
    StreamStatus,
    current_stream,
    recorded_stream,
)
from asgi_stream_recorder.integrations.openai import OpenAIFormat, openai_text
from asgi_stream_recorder.testing import wait_recorded
from asgi_stream_recorder.testing.openai_server import FAILURE_MESSAGE, FakeOpenAI, FakeToolCall

from .servers import serve

pytestmark = pytest.mark.anyio

#: A credential that must never reach a record, an error event or the fake server's log.
SECRET_KEY = "sk-test-SECRET-7f3a9c1e5b"
TEXT = "Héllo, wörld! 🎉 Streaming\nover two lines, ok."
TOKENS = ["Hé", "llo", ", wörld", "! 🎉", " Stream", "ing\n", "over two", " lines, ok."]
USAGE = {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19}
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


async def only_record(recorder: MemoryRecorder) -> StreamRecord:
    """The one stream recorded, once it has ended."""
    await recorder.flush()
    [summary] = await recorder.list_streams()
    return await wait_recorded(recorder, summary.id)


async def fetch_sse(url: str) -> tuple[str, list[ServerSentEvent], bytes]:
    """GET an event stream: its stream id, its events and every byte received."""
    raw = b""
    parser = SSEParser()
    events: list[ServerSentEvent] = []
    with anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client, client.stream("GET", url) as response:
            assert response.status_code == 200
            stream_id = response.headers["x-stream-id"]
            async for data in response.aiter_bytes():
                raw += data
                events.extend(parser.feed(data))
    return stream_id, events, raw


def provider(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=SECRET_KEY, max_retries=0, timeout=5)


def in_app(recorder: MemoryRecorder, client: openai.AsyncOpenAI, api: str, style: str = "return") -> Starlette:
    """A recorded endpoint streaming from the provider through the adapter.

    ``return``: the README one-liner (the adapter awaits the un-awaited ``create()`` call
    and is the response's source itself, so closing it closes the provider stream at once).
    ``async_for``: the adapter inside the user's own generator.
    """
    def create() -> Any:
        if api == "chat":
            return client.chat.completions.create(model="gpt-fake", messages=MESSAGES, stream=True,
                                                  stream_options={"include_usage": True})
        return client.responses.create(model="gpt-fake", input="Say hello", stream=True)

    @recorded_stream(recorder=recorder)
    def chat(request: Request) -> AsyncIterator[Any]:
        return openai_text(create())

    @recorded_stream(recorder=recorder)
    async def chat_async_for(request: Request) -> AsyncIterator[Any]:
        stream = await create()
        async for item in openai_text(stream):
            yield item

    return Starlette(routes=[Route("/chat", chat if style == "return" else chat_async_for)])


def assert_secret_absent(record: StreamRecord, chunks: list[Any], raw: bytes, fake: FakeOpenAI) -> None:
    assert SECRET_KEY not in repr(record)
    assert SECRET_KEY not in json.dumps(record.metadata)
    assert all(SECRET_KEY not in c.data for c in chunks)
    assert SECRET_KEY.encode() not in raw
    assert fake.requests and SECRET_KEY not in repr(fake.requests)
    assert all("authorization" not in r.headers for r in fake.requests)


# -- in ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["return", "async_for"])
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_openai_stream_is_recorded_with_exact_text_usage_and_metadata(api: str, style: str) -> None:
    fake = FakeOpenAI(tokens=TOKENS, model="gpt-fake-2025", usage=USAGE, response_id="abc123",
                      system_fingerprint="fp_42", api_key=SECRET_KEY)
    recorder = MemoryRecorder()
    async with recorder, serve(fake) as fake_url:
        client = provider(fake_url)
        async with serve(in_app(recorder, client, api, style)) as url:
            stream_id, events, raw = await fetch_sse(f"{url}/chat")
        await client.close()
        record = await wait_recorded(recorder, stream_id)
        chunks = await recorder.chunks(stream_id)
    assert [e.data for e in events if e.event != "done"] == TOKENS  # each provider delta is one event, unsplit
    # a plain SSE endpoint (not format="openai"): the completed stream ends with its done event, which has no id
    assert (events[-1].event, events[-1].id) == ("done", None)
    assert json.loads(events[-1].data) == {"stream_id": stream_id, "status": "completed"}
    assert record.status is StreamStatus.COMPLETED, record.error
    assert record.content == TEXT == fake.full_text
    meta = record.metadata
    assert meta["usage"] == USAGE
    assert meta["finish_reason"] == "stop"
    assert meta["model"] == "gpt-fake-2025"
    if api == "chat":
        assert meta["response_id"] == "chatcmpl-abc123"
        assert meta["system_fingerprint"] == "fp_42"
        assert meta["openai_api"] == "chat.completions"
        assert fake.requests[0].body["stream_options"] == {"include_usage": True}
    else:
        assert meta["response_id"] == "resp_abc123"
        assert meta["status"] == "completed"
        assert meta["openai_api"] == "responses"
    assert [r.authorized for r in fake.requests] == [True]  # the key reached the provider...
    assert_secret_absent(record, chunks, raw, fake)  # ...and nowhere else


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_tool_calls_are_recorded_as_their_own_events(api: str) -> None:
    calls = [FakeToolCall("get_weather", '{"city": "Paris", "unit": "C"}', id="call_w"),
             FakeToolCall("get_time", '{"tz": "Europe/Paris"}', id="call_t", pieces=2)]
    fake = FakeOpenAI("Let me check.", tool_calls=calls)
    recorder = MemoryRecorder()
    async with recorder, serve(fake) as fake_url:
        client = provider(fake_url)
        async with serve(in_app(recorder, client, api)) as url:
            stream_id, events, _ = await fetch_sse(f"{url}/chat")
        await client.close()
        record = await wait_recorded(recorder, stream_id)
        chunks = await recorder.chunks(stream_id)
    assert record.status is StreamStatus.COMPLETED, record.error
    assert record.content == "Let me check."  # tool calls stay out of the text
    assert record.metadata["finish_reason"] == "tool_calls"
    tool_chunks = [json.loads(c.data) for c in chunks if c.event == "tool_call"]
    assert [e.event for e in events if e.event == "tool_call"] == ["tool_call"] * len(tool_chunks)
    # the deltas, accumulated the way an OpenAI client does, give back each call
    built: dict[int, dict[str, str]] = {}
    for delta in tool_chunks:
        call = built.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] = delta.get("id") or call["id"]
        call["name"] += delta.get("function", {}).get("name", "")
        call["arguments"] += delta.get("function", {}).get("arguments", "")
    assert built == {0: {"id": "call_w", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                     1: {"id": "call_t", "name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}


@pytest.mark.parametrize("failure", ["error", "drop"])
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_provider_failure_mid_stream_records_failed_with_partial_text(api: str, failure: str) -> None:
    fake = FakeOpenAI(tokens=TOKENS, fail_after=3, failure=failure)  # type: ignore[arg-type]
    recorder = MemoryRecorder()
    async with recorder, serve(fake) as fake_url:
        client = provider(fake_url)
        async with serve(in_app(recorder, client, api)) as url:
            stream_id, events, raw = await fetch_sse(f"{url}/chat")
        await client.close()
        record = await wait_recorded(recorder, stream_id)
        chunks = await recorder.chunks(stream_id)
    partial = "".join(TOKENS[:3])
    assert record.status is StreamStatus.FAILED
    assert record.content == partial
    assert [e.data for e in events[:-1]] == TOKENS[:3]
    assert record.error is not None
    if failure == "drop":
        assert record.error.startswith("APIConnectionError")
    elif api == "chat":
        assert record.error == f"APIError: {FAILURE_MESSAGE}"
    else:
        assert record.error == f"ProviderStreamError: server_error: {FAILURE_MESSAGE}"
    error = events[-1]
    assert error.event == "error"
    payload = json.loads(error.data)
    assert payload == {"message": "stream failed", "stream_id": stream_id}  # safe: no provider text, no trace
    assert "Traceback" not in raw.decode() and FAILURE_MESSAGE not in raw.decode()
    assert_secret_absent(record, chunks, raw, fake)


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_client_leaving_closes_the_provider_stream(api: str) -> None:
    fake = FakeOpenAI(tokens=[f"t{i} " for i in range(200)], delay=0.02)
    recorder = MemoryRecorder()
    received: list[str] = []
    async with recorder, serve(fake) as fake_url:
        client = provider(fake_url)
        async with serve(in_app(recorder, client, api)) as url:
            with anyio.fail_after(10):
                async with httpx.AsyncClient(timeout=5) as http, client_sse(http, "GET", f"{url}/chat") as source:
                    stream_id = source.response.headers["x-stream-id"]
                    async for event in source.aiter_sse():
                        received.append(event.data)
                        if len(received) == 3:
                            break  # hang up
            with anyio.fail_after(5):
                while True:
                    if fake.disconnects:  # the proxy closed its upstream request too
                        break
                    await anyio.sleep(0.01)
        await client.close()
        record = await wait_recorded(recorder, stream_id)
    assert fake.completed_streams == 0
    assert record.status is StreamStatus.CANCELLED
    assert record.content.startswith("".join(received)) and len(record.content) < len(fake.full_text)


async def test_closing_the_adapter_closes_the_provider_stream() -> None:
    class Stream:
        closed = False

        async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
            for token in TOKENS:
                yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": token}}]}

        async def close(self) -> None:
            self.closed = True

    stream = Stream()
    texts = openai_text(stream)
    assert await anext(texts) == TOKENS[0]
    await texts.aclose()
    assert stream.closed


async def test_adapter_outside_a_recorded_stream_just_yields() -> None:
    fake = FakeOpenAI(tokens=TOKENS, tool_calls=[FakeToolCall("f", "{}", pieces=1)])
    async with serve(fake) as fake_url:
        client = provider(fake_url)
        with anyio.fail_after(10):
            # the un-awaited create() call is accepted too
            items = [item async for item in openai_text(client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True))]
            texts = [item async for item in openai_text(await client.responses.create(
                model="m", input="hi", stream=True)) if isinstance(item, str)]
        await client.close()
    assert [i for i in items if isinstance(i, str)] == TOKENS == texts
    assert [i.event for i in items if isinstance(i, ServerSentEvent)] == ["tool_call"]


async def test_fake_server_answers_non_streaming_requests_too() -> None:
    fake = FakeOpenAI(TEXT, usage=USAGE, tool_calls=[FakeToolCall("f", '{"a": 1}', id="call_1")])
    async with serve(fake) as fake_url:
        client = provider(fake_url)
        with anyio.fail_after(10):
            completion = await client.chat.completions.create(model="m", messages=MESSAGES)
            response = await client.responses.create(model="m", input="hi")
            models = await client.models.list()
        await client.close()
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "tool_calls"
    tool_call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert tool_call.function.arguments == '{"a": 1}'  # type: ignore[union-attr]
    assert completion.usage is not None and completion.usage.total_tokens == 19
    assert response.output_text == TEXT
    assert response.usage is not None and response.usage.output_tokens == 8
    assert [m.id for m in models.data] == ["gpt-fake"]
    assert [r.path for r in fake.requests] == ["/v1/chat/completions", "/v1/responses", "/v1/models"]
    assert SECRET_KEY not in repr(fake.requests)


# -- out -----------------------------------------------------------------------------------------
def out_app(recorder: MemoryRecorder, tokens: list[Any], *, fail: bool = False, **meta: Any) -> Starlette:
    @recorded_stream(recorder=recorder, format="openai")
    async def completions(request: Request) -> AsyncIterator[Any]:
        current_stream().metadata.update(meta)
        for token in tokens:
            yield token
        if fail:
            raise RuntimeError(f"database password is {SECRET_KEY}")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


async def consume(url: str, **options: Any) -> tuple[list[Any], openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0, timeout=5)
    chunks: list[Any] = []
    with anyio.fail_after(10):
        stream = await client.chat.completions.create(model="whatever", messages=MESSAGES, stream=True, **options)
        async for chunk in stream:
            chunks.append(chunk)
    return chunks, client


async def test_openai_client_consumes_a_recorded_endpoint() -> None:
    recorder = MemoryRecorder()
    app = out_app(recorder, TOKENS, model="my-model", usage=USAGE, finish_reason="length")
    async with recorder, serve(app) as url:
        chunks, client = await consume(url, stream_options={"include_usage": True})
        await client.close()
        record = await only_record(recorder)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == record.content == TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {f"chatcmpl-{record.id}"}
    assert {c.model for c in chunks} == {"my-model"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump(exclude_none=True) == USAGE
    assert record.status is StreamStatus.COMPLETED


async def test_openai_client_sees_default_finish_reason_and_usage_on_the_finish_chunk() -> None:
    recorder = MemoryRecorder()

    async def completions(request: Request) -> Response:
        async def tokens() -> AsyncIterator[str]:
            current_stream().metadata["usage"] = {"input_tokens": 3, "output_tokens": 2}  # Responses shape
            yield "a"
            yield "b"

        return RecordedStreamResponse(tokens(), recorder=recorder, format=OpenAIFormat(separate_usage_chunk=False))

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    async with recorder, serve(app) as url:
        chunks, client = await consume(url)
        await client.close()
    assert all(c.choices for c in chunks)  # a client indexing choices[0] everywhere does not break
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ab"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model == "asgi-stream-recorder"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == {"prompt_tokens": 3, "completion_tokens": 2,
                                                              "total_tokens": 5}


async def test_openai_client_gets_an_api_error_without_secrets_when_the_source_fails() -> None:
    recorder = MemoryRecorder()
    app = out_app(recorder, ["par", "tial"], fail=True)
    async with recorder, serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0, timeout=5)
        received: list[str] = []
        with anyio.fail_after(10), pytest.raises(openai.APIError) as info:
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
        await client.close()
        record = await only_record(recorder)
    assert "".join(received) == record.content == "partial"
    assert record.status is StreamStatus.FAILED
    assert info.value.message == "stream failed"
    assert SECRET_KEY not in repr(info.value.body) and SECRET_KEY not in str(info.value)
    assert info.value.body == {"message": "stream failed", "type": "server_error", "param": None,
                               "code": "stream_failed", "stream_id": record.id}


async def test_openai_client_receives_tool_calls_from_a_recorded_endpoint() -> None:
    recorder = MemoryRecorder()
    tokens = ["Checking.", ServerSentEvent({"index": 0, "id": "call_1", "type": "function",
                                            "function": {"name": "get_weather", "arguments": ""}}, event="tool_call"),
              ServerSentEvent({"index": 0, "function": {"arguments": '{"city":'}}, event="tool_call"),
              ServerSentEvent({"index": 0, "function": {"arguments": ' "Oslo"}'}}, event="tool_call")]
    app = out_app(recorder, tokens, finish_reason="tool_calls")
    async with recorder, serve(app) as url:
        chunks, client = await consume(url)
        await client.close()
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [tc.id for tc in calls if tc.id] == ["call_1"]
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls if tc.function) == '{"city": "Oslo"}'
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- both: a recorded proxy in front of a model ------------------------------------------------------
async def test_recorded_proxy_in_front_of_a_model() -> None:
    fake = FakeOpenAI(tokens=TOKENS, usage=USAGE, model="upstream-model", api_key=SECRET_KEY)
    recorder = MemoryRecorder()
    async with recorder, serve(fake) as fake_url:
        upstream = provider(fake_url)

        async def completions(request: Request) -> Response:
            body = await request.json()
            return RecordedStreamResponse(
                openai_text(upstream.chat.completions.create(
                    model=body["model"], messages=body["messages"], stream=True,
                    stream_options={"include_usage": True})),
                recorder=recorder, format="openai")

        app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
        async with serve(app) as url:
            chunks, client = await consume(url, stream_options={"include_usage": True})
            await client.close()
        await upstream.close()
        record = await only_record(recorder)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT == record.content
    assert {c.model for c in chunks} == {"upstream-model"}
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump(exclude_none=True) == USAGE
    assert record.metadata["usage"] == USAGE and record.metadata["finish_reason"] == "stop"
    assert fake.requests[0].body["model"] == "whatever"
    assert SECRET_KEY not in repr(record)


# -- packaging -----------------------------------------------------------------------------------
def test_core_imports_without_openai_installed() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "openai" or name.startswith("openai."):
            raise ImportError("openai is not installed")
sys.meta_path.insert(0, Block())
import asgi_stream_recorder
from asgi_stream_recorder.response import resolve_format
from asgi_stream_recorder.integrations.openai import openai_text, OpenAIFormat
from asgi_stream_recorder.testing.openai_server import FakeOpenAI
assert type(resolve_format("openai")).__name__ == "OpenAIFormat"
assert "openai" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
