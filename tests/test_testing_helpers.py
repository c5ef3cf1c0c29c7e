"""The testing helpers, each proven by using it: the in-process client, the fakes,
``assert_recorded`` and the pytest fixtures (which come from the installed plugin)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_stream_recorder import MemoryRecorder, ServerSentEvent, SQLiteRecorder, StreamStatus, recorded_stream
from asgi_stream_recorder.middleware import StreamRecorderMiddleware
from asgi_stream_recorder.testing import (
    FakeAsyncOpenAI,
    FakeStreamError,
    LifespanError,
    SSEClientFactory,
    assert_recorded,
    fake_openai_stream,
    fake_token_stream,
    sse_client,
)

pytestmark = pytest.mark.anyio

TEXT = "The quick  brown fox\njumps over the lazy dog. "


def assert_done(event: ServerSentEvent, stream_id: str | None) -> None:
    """The last event of a completed stream: ``event: done`` naming the stream, with no ``id``."""
    assert (event.event, event.id) == ("done", None)
    assert event.text is not None and json.loads(event.text) == {"stream_id": stream_id, "status": "completed"}


def chat_app(recorder: MemoryRecorder | SQLiteRecorder, source: Any) -> Starlette:
    @recorded_stream(recorder=recorder, metadata=lambda scope: {"q": scope["query_string"].decode()})
    async def chat(request: Request) -> AsyncIterator[str]:
        async with aclosing(source(request)) as tokens:  # close the inner source when we are closed
            async for token in tokens:
                yield token

    return Starlette(routes=[Route("/chat", chat, methods=["GET", "POST"])])


# -- the in-process client ------------------------------------------------------------------


async def test_events_arrive_while_the_app_is_still_streaming(memory_recorder: MemoryRecorder) -> None:
    go_on = anyio.Event()

    async def source(request: Request) -> AsyncIterator[str]:
        yield "first"
        await go_on.wait()  # only the test reading "first" lets the stream go on
        yield "second"

    with anyio.fail_after(5):
        async with sse_client(chat_app(memory_recorder, source)) as client:
            async with client.stream("GET", "/chat") as s:
                seen = []
                async for event in s.events():
                    seen.append(event)
                    go_on.set()
            assert [e.data for e in seen if e.event != "done"] == ["first", "second"]
            assert_done(seen[-1], s.stream_id)
            await assert_recorded(memory_recorder, s.stream_id, status="completed", content="firstsecond")


async def test_status_headers_stream_id_query_and_json_body(memory_recorder: MemoryRecorder) -> None:
    async def source(request: Request) -> AsyncIterator[str]:
        body = await request.json()
        yield f"{request.query_params['x']}:{body['prompt']}:{request.headers['x-user']}"

    with anyio.fail_after(5):
        async with sse_client(chat_app(memory_recorder, source), headers={"x-user": "ann"}) as client:
            async with client.stream("POST", "/chat?x=1", json={"prompt": "hi"}) as s:
                assert s.status_code == 200
                assert s.headers["content-type"].startswith("text/event-stream")
                assert s.headers["cache-control"] == "no-cache, no-transform"
                assert s.stream_id == s.headers["x-stream-id"]
                events = await s.collect()
            assert [(e.event, e.data, e.id) for e in events[:-1]] == [(None, "1:hi:ann", "1")]
            assert_done(events[-1], s.stream_id)
            assert s.last_event_id == "1"  # the done event has no id: a resume starts after the last chunk
            assert s.complete and not s.disconnected
            await assert_recorded(
                memory_recorder, s.stream_id, status="completed", content="1:hi:ann", chunk_count=1,
                metadata_includes={"q": "x=1"}, path="/chat",
            )


async def test_collect_hangs_up_after_n_events_and_the_app_sees_it(memory_recorder: MemoryRecorder) -> None:
    stopped = anyio.Event()

    async def endless(request: Request) -> AsyncIterator[str]:
        try:
            n = 0
            while True:
                n += 1
                yield f"t{n} "
                await anyio.lowlevel.checkpoint()  # a token source awaits between tokens
        finally:
            stopped.set()

    app = chat_app(memory_recorder, endless)
    with anyio.fail_after(5):
        async with sse_client(app) as client:
            async with client.stream("GET", "/chat", disconnect_after_events=3) as s:
                events = await s.collect()
                assert s.disconnected
            assert stopped.is_set()  # leaving the block waited for the app to return
            # the client got exactly what was recorded, no more: send is a rendezvous
            assert [e.data for e in events] == ["t1 ", "t2 ", "t3 "]
            await assert_recorded(memory_recorder, s.stream_id, status="cancelled", chunks=["t1 ", "t2 ", "t3 "])

            events = await client.collect("/chat", max_events=2)
            assert [e.data for e in events] == ["t1 ", "t2 "]


async def test_disconnect_after_a_time_and_by_hand(memory_recorder: MemoryRecorder) -> None:
    async def slow(request: Request) -> AsyncIterator[str]:
        async for token in fake_token_stream("a b c d e f g h i j k l", delay=0.05):
            yield token
        await anyio.sleep_forever()

    app = chat_app(memory_recorder, slow)
    with anyio.fail_after(5):
        async with sse_client(app) as client:
            async with client.stream("GET", "/chat", disconnect_after=0.12) as s:
                events = await s.collect()
            assert 1 <= len(events) <= 4
            await assert_recorded(memory_recorder, s.stream_id, status="cancelled", chunk_count=len(events))

            async with client.stream("GET", "/chat") as s:
                async for event in s.events():
                    if event.data == "b ":
                        await s.disconnect()  # returns once the app has returned
                record = await memory_recorder.get(s.stream_id or "")
            await assert_recorded(memory_recorder, s.stream_id, status="cancelled", content="a b ")
            assert record is not None


async def test_a_failing_source_is_reported_and_recorded(memory_recorder: MemoryRecorder) -> None:
    def failing(request: Request) -> AsyncIterator[str]:
        return fake_token_stream(TEXT, fail_after=2)

    with anyio.fail_after(5):
        async with sse_client(chat_app(memory_recorder, failing)) as client:
            events = await client.collect("/chat")
    assert [e.event for e in events] == [None, None, "error"]
    stream_id = events[-1].data.split('"stream_id":"')[1].split('"')[0]
    await assert_recorded(
        memory_recorder, stream_id, status="failed", content="The quick  ", error="FakeStreamError"
    )


async def test_bounded_waits_and_app_errors_surface(memory_recorder: MemoryRecorder) -> None:
    async def silent(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep_forever()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("boom")

    async def deaf(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.5)  # ignores the client leaving for a while

    with anyio.fail_after(5):
        async with sse_client(silent, timeout=0.2) as client:
            with pytest.raises(TimeoutError, match="sent nothing"):
                async with client.stream("GET", "/"):
                    pass
        async with sse_client(broken) as client:
            with pytest.raises(KeyError, match="boom"):
                await client.collect("/")
        async with sse_client(deaf, timeout=0.1) as client:
            with pytest.raises(TimeoutError, match=r"did not return within 0\.1s"):
                async with client.stream("GET", "/") as s:
                    assert s.status_code == 200


async def test_non_stream_responses_and_status_checks() -> None:
    app = Starlette(routes=[Route("/missing", lambda r: JSONResponse({"detail": "nope"}, status_code=404))])
    with anyio.fail_after(5):
        async with sse_client(app) as client:
            async with client.stream("GET", "/missing") as s:
                assert s.status_code == 404
                assert await s.read() == b'{"detail":"nope"}'
            async with client.stream("GET", "/missing") as s:
                assert s.status_code == 404  # leaving unread hangs up: the app's failed send is no error
            with pytest.raises(AssertionError, match="expected status 200, got 404"):
                await client.collect("/missing")


async def test_lifespan_runs_when_asked_so_the_middleware_manages_the_recorder() -> None:
    recorder = MemoryRecorder()
    log: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.append("startup")
        yield {"greeting": "hello"}
        log.append("shutdown")

    @recorded_stream
    async def chat(request: Request) -> AsyncIterator[str]:
        yield request.state.greeting  # lifespan state reaches requests
        yield f" managed={recorder.managed}"

    app = StreamRecorderMiddleware(
        Starlette(routes=[Route("/chat", chat)], lifespan=lifespan), recorder=recorder, handle_signals=False
    )
    with anyio.fail_after(5):
        async with sse_client(app, lifespan=True) as client:
            assert log == ["startup"]
            async with client.stream("GET", "/chat") as s:
                await s.collect()
            record = await assert_recorded(recorder, s.stream_id, status="completed")
            assert record.content == "hello managed=True"  # the middleware's recorder, opened at startup
        assert log == ["startup", "shutdown"]
        assert not recorder.managed  # closed at shutdown


async def test_lifespan_failure_is_an_error() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    with anyio.fail_after(5):
        with pytest.raises(LifespanError, match="no database"):
            async with sse_client(Starlette(lifespan=lifespan), lifespan=True):
                pass


# -- the fakes --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [TEXT, "", "   ", "one", "héllo wörld 👋 ", "\n\nline\n"])
async def test_fake_token_stream_joins_back_to_exactly_the_text(text: str) -> None:
    tokens = [t async for t in fake_token_stream(text)]
    assert "".join(tokens) == text
    assert all(tokens)
    assert all(len(t.split()) <= 1 for t in tokens)  # word-ish: at most one word each


async def test_fake_token_stream_fails_after_n_tokens_and_can_be_slow() -> None:
    got: list[str] = []
    with pytest.raises(FakeStreamError, match="after 3 tokens"):
        async for token in fake_token_stream(TEXT, fail_after=3):
            got.append(token)
    assert got == ["The ", "quick  ", "brown "]
    with pytest.raises(FakeStreamError):  # asked to fail later than the end: fails at the end
        async for _ in fake_token_stream("a b", fail_after=5):
            pass
    start = anyio.current_time()
    assert [t async for t in fake_token_stream("a b c", delay=0.03)] == ["a ", "b ", "c"]
    assert anyio.current_time() - start >= 0.08


async def test_fake_openai_chunks_are_shaped_like_chat_completion_chunks() -> None:
    stream = fake_openai_stream("Hello there world", model="gpt-x", id="chatcmpl-1")
    chunks = [c async for c in stream]
    assert {c.id for c in chunks} == {"chatcmpl-1"} and {c.model for c in chunks} == {"gpt-x"}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there world"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 3
    dumped = chunks[1].model_dump(exclude_none=True)
    assert dumped["object"] == "chat.completion.chunk"
    assert dumped["choices"] == [{"index": 0, "delta": {"content": "Hello "}}]


async def test_fake_openai_client_streams_fails_and_can_be_closed() -> None:
    client = FakeAsyncOpenAI("a b c d", fail_after=2)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    contents: list[str] = []
    with pytest.raises(FakeStreamError, match="after 2 content chunks"):
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                contents.append(chunk.choices[0].delta.content)
    assert contents == ["a ", "b "]
    assert client.requests == [{"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}]

    async with await FakeAsyncOpenAI("x y").chat.completions.create(model="m", stream=True) as stream:
        first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    assert stream.closed
    assert [c async for c in stream] == []
    with_usage = await FakeAsyncOpenAI("x").chat.completions.create(
        model="m", stream=True, stream_options={"include_usage": True}
    )
    assert [c async for c in with_usage][-1].usage is not None


# -- assert_recorded and the fixtures ---------------------------------------------------------


async def test_assert_recorded_lists_every_mismatch(memory_recorder: MemoryRecorder) -> None:
    async def source(request: Request) -> AsyncIterator[str]:
        async for token in fake_token_stream("a b"):
            yield token

    with anyio.fail_after(5):
        async with sse_client(chat_app(memory_recorder, source)) as client:
            async with client.stream("GET", "/chat") as s:
                await s.collect()
        with pytest.raises(AssertionError) as failure:
            await assert_recorded(
                memory_recorder, s.stream_id, status="failed", content="a c", chunk_count=3,
                metadata_includes={"q": "nope", "missing": 1},
            )
        message = str(failure.value)
        for expected in [
            "status is 'completed', expected 'failed'",
            "content is 'a b', expected 'a c'",
            "chunk_count is 2, expected 3",
            "metadata['q'] is '', expected 'nope'",
            "metadata has no key 'missing'",
            "status:      completed",
        ]:
            assert expected in message
        with pytest.raises(AssertionError, match=r"chunks differ at index 1 \(2 stored, 1 expected\)"):
            await assert_recorded(memory_recorder, s.stream_id, chunks=["a "])
        with pytest.raises(AssertionError, match="no record of stream 'nope'"):
            await assert_recorded(memory_recorder, "nope", timeout=0.05)
        with pytest.raises(AssertionError, match="X-Stream-Id"):
            await assert_recorded(memory_recorder, None)


async def test_sqlite_fixture_and_client_factory_fixture(
    sqlite_recorder: SQLiteRecorder, sse_client: SSEClientFactory, tmp_path: Path
) -> None:
    assert sqlite_recorder.managed  # opened by the fixture
    assert Path(sqlite_recorder.path).parent == tmp_path

    async def source(request: Request) -> AsyncIterator[str]:
        async for token in fake_token_stream(TEXT):
            yield token

    with anyio.fail_after(5):
        async with sse_client(chat_app(sqlite_recorder, source)) as client:
            async with client.stream("GET", "/chat") as s:
                events = await s.collect()
    *data, done = events
    assert "".join(e.data for e in data) == TEXT
    assert_done(done, s.stream_id)
    record = await assert_recorded(sqlite_recorder, s.stream_id, status=StreamStatus.COMPLETED, content=TEXT)
    assert record.metadata["chunk_count"] == len(data)  # the done event is not recorded


async def test_memory_fixture_is_fresh_and_open(memory_recorder: MemoryRecorder) -> None:
    assert memory_recorder.managed
    assert await memory_recorder.list_streams() == []
