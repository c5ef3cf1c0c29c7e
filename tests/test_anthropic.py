"""Anthropic Messages streams in: the real ``anthropic`` client over real HTTP.

The real client streams from ``FakeAnthropic`` (served on 127.0.0.1) through
``anthropic_text`` inside a recorded endpoint (also served), and the record holds the
exact answer text, thinking, tool use and citations as their own events, and the model,
message id, stop reason and usage. The anthropic client runs on both backends (it uses
anyio underneath): these tests run on asyncio (uvicorn) and trio (hypercorn).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import anyio
import httpx
import openai
import pytest
from httpx_sse import aconnect_sse as client_sse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import (
    MemoryRecorder,
    ServerSentEvent,
    SSEParser,
    StreamRecord,
    StreamStatus,
    recorded_stream,
)
from asgi_stream_recorder.integrations.anthropic import ProviderStreamError, anthropic_text
from asgi_stream_recorder.testing import FakeAnthropic, FakeToolCall, sse_client, wait_recorded
from asgi_stream_recorder.testing.anthropic_server import FAILURE_MESSAGE, UNKNOWN_EVENT

from .servers import serve

pytestmark = pytest.mark.anyio

#: A credential that must never reach a record, an event, a log line or the fake server's log.
SECRET_KEY = "sk-ant-test-SECRET-4b8d2f6a9e"
TOKENS = ["Hé", "llo", ", wörld", "! 🎉", " Stream", "ing\n", "over two", " lines, ok."]
TEXT = "".join(TOKENS)
THINKING = "The user wants a greeting. Keep it short."
CITATION = {"type": "char_location", "cited_text": "Hello", "document_index": 0, "document_title": "Greetings",
            "start_char_index": 0, "end_char_index": 5}
CALLS = [FakeToolCall("get_weather", '{"city": "Paris", "unit": "C"}', id="toolu_w"),
         FakeToolCall("get_time", '{"tz": "Europe/Paris"}', id="toolu_t", pieces=2)]
USAGE = {"input_tokens": 21, "output_tokens": 57, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 100}
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
STYLES = ["create", "async_for", "helper", "manager"]


def provider(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=SECRET_KEY, max_retries=0, timeout=5)


def in_app(recorder: MemoryRecorder, client: anthropic.AsyncAnthropic, style: str) -> Starlette:
    """A recorded endpoint streaming from the provider through the adapter, written as users would.

    ``create``: the one-liner (the adapter awaits the un-awaited ``create()`` call and is
    the response's source itself). ``async_for``: the adapter inside the user's generator.
    ``helper``: inside ``async with client.messages.stream(...)``. ``manager``: the
    ``messages.stream(...)`` manager handed over as it is.
    """
    args: dict[str, Any] = {"model": "claude-fake", "max_tokens": 256, "messages": MESSAGES}

    @recorded_stream(recorder=recorder)
    def create(request: Request) -> AsyncIterator[Any]:
        return anthropic_text(client.messages.create(**args, stream=True))

    @recorded_stream(recorder=recorder)
    async def async_for(request: Request) -> AsyncIterator[Any]:
        stream = await client.messages.create(**args, stream=True)
        async for item in anthropic_text(stream):
            yield item

    @recorded_stream(recorder=recorder)
    async def helper(request: Request) -> AsyncIterator[Any]:
        async with client.messages.stream(**args) as stream:
            async for item in anthropic_text(stream):
                yield item

    @recorded_stream(recorder=recorder)
    def manager(request: Request) -> AsyncIterator[Any]:
        return anthropic_text(client.messages.stream(**args))

    endpoints = {"create": create, "async_for": async_for, "helper": helper, "manager": manager}
    return Starlette(routes=[Route("/chat", endpoints[style])])


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


async def run(fake: FakeAnthropic, style: str = "create") -> tuple[StreamRecord, list[Any], list[ServerSentEvent],
                                                                   bytes]:
    """Serve the fake and a recorded endpoint in front of it; fetch the endpoint once."""
    recorder = MemoryRecorder()
    async with recorder, serve(fake) as fake_url:
        client = provider(fake_url)
        async with serve(in_app(recorder, client, style)) as url:
            stream_id, events, raw = await fetch_sse(f"{url}/chat")
        await client.close()
        record = await wait_recorded(recorder, stream_id)
        chunks = await recorder.chunks(stream_id)
    return record, chunks, events, raw


def assert_secret_absent(record: StreamRecord, chunks: list[Any], raw: bytes, fake: FakeAnthropic,
                         caplog: pytest.LogCaptureFixture) -> None:
    assert SECRET_KEY not in repr(record) and SECRET_KEY not in json.dumps(record.metadata)
    assert SECRET_KEY not in (record.error or "")
    assert all(SECRET_KEY not in c.data for c in chunks)
    assert SECRET_KEY.encode() not in raw
    assert SECRET_KEY not in caplog.text
    assert fake.requests and SECRET_KEY not in repr(fake.requests)
    assert all("x-api-key" not in r.headers for r in fake.requests)


# -- a whole message -------------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
async def test_message_is_recorded_with_text_events_and_metadata(style: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeAnthropic(tokens=TOKENS, thinking=THINKING, citations=[CITATION], tool_calls=CALLS, usage=USAGE,
                         model="claude-fake-4", message_id="msg_abc123", api_key=SECRET_KEY, unknown_events=True)
    record, chunks, events, raw = await run(fake, style)
    assert record.status is StreamStatus.COMPLETED, record.error
    # the client got the text event by event, unsplit; thinking, tool use and citations as their own events
    assert [e.data for e in events if e.event is None] == TOKENS
    assert {e.event for e in events} == {None, "thinking", "citation", "tool_call", "done"}
    assert record.content == TEXT  # nothing but the answer text
    thinking = [c.data for c in chunks if c.event == "thinking"]
    assert "".join(thinking) == THINKING and len(thinking) > 1  # streamed as it came
    assert [json.loads(c.data) for c in chunks if c.event == "citation"] == [CITATION]
    # each tool use is one event with its input JSON assembled, in the OpenAI adapter's tool_call shape
    assert [json.loads(c.data) for c in chunks if c.event == "tool_call"] == [
        {"index": 0, "id": "toolu_w", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}},
        {"index": 1, "id": "toolu_t", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}]
    # ping events and the unknown event type left no trace
    assert len(chunks) == len(TOKENS) + len(thinking) + 1 + len(CALLS)
    assert all(UNKNOWN_EVENT not in c.data and c.event != "ping" for c in chunks)
    meta = record.metadata
    assert meta["model"] == "claude-fake-4"
    assert meta["response_id"] == "msg_abc123"
    assert meta["stop_reason"] == meta["finish_reason"] == "tool_use"
    assert meta["usage"] == USAGE  # message_delta's cumulative counts, not added to message_start's
    assert meta["request_id"] == "req_msg_abc123"
    assert "error_type" not in meta
    assert [r.authorized for r in fake.requests] == [True]  # the key reached the provider...
    assert_secret_absent(record, chunks, raw, fake, caplog)  # ...and nowhere else


async def test_text_only_message_ends_with_end_turn_and_default_usage() -> None:
    fake = FakeAnthropic("Just text, please.", pings=False)
    record, chunks, events, _ = await run(fake)
    assert record.status is StreamStatus.COMPLETED, record.error
    assert record.content == "Just text, please." == "".join(e.data for e in events if e.event is None)
    assert {c.event for c in chunks} == {None}
    assert record.metadata["stop_reason"] == record.metadata["finish_reason"] == "end_turn"
    # input: the request's words; output: the deltas sent; no cache counts when the API sends none
    assert record.metadata["usage"] == {"input_tokens": 2, "output_tokens": 3}
    assert fake.completed_streams == 1


# -- failures -----------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["error", "drop"])
@pytest.mark.parametrize("style", ["create", "helper"])
async def test_failure_mid_stream_records_failed_with_partial_text(failure: str, style: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeAnthropic(tokens=TOKENS, thinking=THINKING, fail_after=3, failure=failure,  # type: ignore[arg-type]
                         api_key=SECRET_KEY)
    record, chunks, events, raw = await run(fake, style)
    partial = "".join(TOKENS[:3])
    assert record.status is StreamStatus.FAILED
    assert record.content == partial
    assert [e.data for e in events if e.event is None] == TOKENS[:3]
    assert record.error is not None
    if failure == "error":
        assert record.error.startswith("APIStatusError") and "overloaded_error" in record.error
        assert record.metadata["error_type"] == "overloaded_error"
    else:
        assert record.error.startswith("RemoteProtocolError")
        assert "error_type" not in record.metadata
    assert "stop_reason" not in record.metadata and "finish_reason" not in record.metadata
    error = events[-1]
    assert error.event == "error"
    assert json.loads(error.data) == {"message": "stream failed", "stream_id": record.id}  # safe: no provider text
    assert "Traceback" not in raw.decode() and FAILURE_MESSAGE not in raw.decode()
    assert f"stream {record.id} failed" in caplog.text  # the failure is logged, the key is not
    assert_secret_absent(record, chunks, raw, fake, caplog)


@pytest.mark.parametrize("style", ["create", "helper", "manager"])
async def test_client_leaving_closes_the_provider_stream(style: str) -> None:
    fake = FakeAnthropic(tokens=[f"t{i} " for i in range(200)], delay=0.02)
    recorder = MemoryRecorder()
    received: list[str] = []
    async with recorder, serve(fake) as fake_url:
        client = provider(fake_url)
        async with serve(in_app(recorder, client, style)) as url:
            with anyio.fail_after(10):
                async with httpx.AsyncClient(timeout=5) as http, client_sse(http, "GET", f"{url}/chat") as source:
                    stream_id = source.response.headers["x-stream-id"]
                    async for event in source.aiter_sse():
                        received.append(event.data)
                        if len(received) == 3:
                            break  # hang up
            with anyio.fail_after(5):
                while not fake.disconnects:  # noqa: ASYNC110 - the fake counts, it has no event to wait on
                    await anyio.sleep(0.01)
        await client.close()
        record = await wait_recorded(recorder, stream_id)
    assert fake.completed_streams == 0
    assert record.status is StreamStatus.CANCELLED
    assert record.content.startswith("".join(received)) and len(record.content) < len(fake.full_text)


# -- the adapter on its own --------------------------------------------------------------------------
def message_events(*deltas: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw events as plain dicts: a message start, the given events, a message stop."""
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude-dict", "content": [],
                                                  "usage": {"input_tokens": 10, "output_tokens": 1,
                                                            "cache_read_input_tokens": 7}}}
    return [start, *deltas, {"type": "message_stop"}]


def app_over(events: list[dict[str, Any]], recorder: MemoryRecorder) -> Starlette:
    async def source() -> AsyncIterator[dict[str, Any]]:
        for event in events:
            yield event

    @recorded_stream(recorder=recorder)
    def chat(request: Request) -> AsyncIterator[Any]:
        return anthropic_text(source())

    return Starlette(routes=[Route("/chat", chat)])


async def test_usage_is_the_last_cumulative_count_never_a_sum() -> None:
    text = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
    events = message_events(
        {"type": "ping"}, text,
        {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 5}},
        {"type": "a_future_event", "usage": {"output_tokens": 1000}},  # unknown: ignored
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
         "usage": {"output_tokens": 9, "input_tokens": 10, "cache_creation_input_tokens": None}},
    )
    recorder = MemoryRecorder()
    async with recorder, sse_client(app_over(events, recorder)) as client:
        async with client.stream("GET", "/chat") as s:
            received = await s.collect()
            stream_id = s.stream_id
        assert stream_id is not None
        record = await wait_recorded(recorder, stream_id)
    assert [e.data for e in received if e.event is None] == ["hi"]
    assert record.metadata["usage"] == {"input_tokens": 10, "output_tokens": 9, "cache_read_input_tokens": 7}
    assert record.metadata["stop_reason"] == record.metadata["finish_reason"] == "max_tokens"
    assert record.metadata["model"] == "claude-dict" and record.metadata["response_id"] == "msg_1"


async def test_an_error_event_fails_the_stream_with_its_type() -> None:
    events = message_events(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "par"}},
        {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "never"}},
    )
    recorder = MemoryRecorder()
    async with recorder, sse_client(app_over(events, recorder)) as client:
        async with client.stream("GET", "/chat") as s:
            received = await s.collect()
            stream_id = s.stream_id
        assert stream_id is not None
        record = await wait_recorded(recorder, stream_id)
    assert record.status is StreamStatus.FAILED
    assert record.content == "par"
    assert record.error == "ProviderStreamError: api_error: Internal server error"
    assert record.metadata["error_type"] == "api_error"
    assert received[-1].event == "error" and "Internal" not in received[-1].data


async def test_tool_use_without_input_deltas_gets_its_start_input() -> None:
    events = message_events(
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": '{"query": "weather"}'}},
        {"type": "content_block_stop", "index": 1},
    )
    items = [item async for item in anthropic_text(_aiter(events))]
    assert [(i.event, i.data) for i in items if isinstance(i, ServerSentEvent)] == [
        ("tool_call", {"index": 0, "id": "toolu_1", "type": "function",
                       "function": {"name": "now", "arguments": "{}"}}),
        ("server_tool_use", {"index": 0, "id": "srvtoolu_1", "type": "function",
                             "function": {"name": "web_search", "arguments": '{"query": "weather"}'}})]


async def _aiter(events: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for event in events:
        yield event


async def test_closing_the_adapter_closes_the_stream_and_exits_the_manager() -> None:
    class Stream:
        closed = False

        async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
            for token in TOKENS:
                yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}

        async def close(self) -> None:
            self.closed = True

    class Manager:
        exited = False

        def __init__(self) -> None:
            self.stream = Stream()

        async def __aenter__(self) -> Stream:
            return self.stream

        async def __aexit__(self, *exc: object) -> None:
            self.exited = True

    stream = Stream()
    texts = anthropic_text(stream)
    assert await anext(texts) == TOKENS[0]
    await texts.aclose()
    assert stream.closed

    manager = Manager()
    texts = anthropic_text(manager)
    assert await anext(texts) == TOKENS[0]
    await texts.aclose()
    assert manager.stream.closed and manager.exited


async def test_adapter_outside_a_recorded_stream_just_yields() -> None:
    fake = FakeAnthropic(tokens=TOKENS, thinking="hmm", tool_calls=CALLS[:1])
    async with serve(fake) as fake_url:
        client = provider(fake_url)
        with anyio.fail_after(10):
            items = [item async for item in anthropic_text(client.messages.create(
                model="m", max_tokens=10, messages=MESSAGES, stream=True))]
        await client.close()
    assert [i for i in items if isinstance(i, str)] == TOKENS
    assert [i.event for i in items if isinstance(i, ServerSentEvent)] == ["thinking", "tool_call"]


async def test_a_dict_error_outside_a_recorded_stream_raises() -> None:
    events = message_events({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    with pytest.raises(ProviderStreamError, match="overloaded_error: Overloaded"):
        async for _ in anthropic_text(_aiter(events)):
            pass


# -- the fake server -----------------------------------------------------------------------------
async def test_fake_server_answers_non_streaming_requests_and_checks_the_key() -> None:
    fake = FakeAnthropic(TEXT, thinking=THINKING, citations=[CITATION], tool_calls=CALLS, usage=USAGE,
                         api_key=SECRET_KEY)
    async with serve(fake) as fake_url:
        client = provider(fake_url)
        wrong = anthropic.AsyncAnthropic(base_url=fake_url, api_key="sk-ant-wrong", max_retries=0, timeout=5)
        with anyio.fail_after(10):
            message = await client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
            async with client.messages.stream(model="m", max_tokens=10, messages=MESSAGES) as stream:
                final = await stream.get_final_message()
            with pytest.raises(anthropic.AuthenticationError):
                await wrong.messages.create(model="m", max_tokens=10, messages=MESSAGES)
        await client.close()
        await wrong.close()
    for m in (message, final):
        assert [b.type for b in m.content] == ["thinking", "text", "tool_use", "tool_use"]
        assert m.content[1].text == TEXT  # type: ignore[union-attr]
        assert m.content[2].input == {"city": "Paris", "unit": "C"}  # type: ignore[union-attr]
        assert m.stop_reason == "tool_use"
        assert (m.usage.input_tokens, m.usage.output_tokens, m.usage.cache_read_input_tokens) == (21, 57, 100)
    assert final.content[0].thinking == THINKING  # type: ignore[union-attr]
    assert [r.path for r in fake.requests] == ["/v1/messages"] * 3
    assert [r.authorized for r in fake.requests] == [True, True, False]
    assert SECRET_KEY not in repr(fake.requests) and "sk-ant-wrong" not in repr(fake.requests)


# -- out through format="openai" ------------------------------------------------------------------
async def test_an_openai_client_reads_an_anthropic_stream_with_its_tool_calls() -> None:
    """Why tool use is recorded as ``tool_call``: ``format="openai"`` sends it as an OpenAI tool call."""
    fake = FakeAnthropic(tokens=TOKENS, thinking=THINKING, tool_calls=CALLS, usage=USAGE, model="claude-up")
    recorder = MemoryRecorder()
    async with recorder, serve(fake) as fake_url:
        upstream = provider(fake_url)

        @recorded_stream(recorder=recorder, format="openai")
        def completions(request: Request) -> AsyncIterator[Any]:
            return anthropic_text(upstream.messages.create(model="m", max_tokens=10, messages=MESSAGES, stream=True))

        app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
        async with serve(app) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0, timeout=5)
            with anyio.fail_after(10):
                stream = await client.chat.completions.create(model="x", messages=MESSAGES, stream=True)
                chunks = [chunk async for chunk in stream]
            await client.close()
        await upstream.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT  # no thinking in it
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [(tc.index, tc.id, tc.function.name, tc.function.arguments) for tc in calls  # type: ignore[union-attr]
            ] == [(0, "toolu_w", "get_weather", '{"city": "Paris", "unit": "C"}'),
                  (1, "toolu_t", "get_time", '{"tz": "Europe/Paris"}')]
    assert {c.model for c in chunks} == {"claude-up"}
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (21, 57)


# -- packaging -----------------------------------------------------------------------------------
def test_core_imports_without_anthropic_installed() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "anthropic" or name.startswith("anthropic."):
            raise ImportError("anthropic is not installed")
sys.meta_path.insert(0, Block())
import asgi_stream_recorder
from asgi_stream_recorder.integrations.anthropic import anthropic_text
from asgi_stream_recorder.testing import FakeAnthropic
assert "anthropic" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
