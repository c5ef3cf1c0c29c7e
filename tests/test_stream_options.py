"""What the seed libraries write by hand, as options of ``@recorded_stream``: timeouts, a fallback
source, progress events and coalescing of fast tokens. Each over a real server (uvicorn on
asyncio, hypercorn on trio) with a real client (httpx, read as a browser's EventSource would)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import MemoryRecorder, ServerSentEvent, StreamRecord, StreamStatus, recorded_stream
from asgi_stream_recorder.sse import SSEParser

from .servers import serve

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def served(**routes: Any) -> AsyncIterator[str]:
    app = Starlette(routes=[Route(f"/{name}", endpoint) for name, endpoint in routes.items()])
    async with serve(app) as url:
        yield url


async def read_events(
    url: str, headers: dict[str, str] | None = None
) -> tuple[str, list[tuple[float, ServerSentEvent]]]:
    """Every event of the response with when it arrived (seconds since the request), and its stream id."""
    parser, got = SSEParser(), []
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=20) as client, client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for data in response.aiter_raw():
            now = time.monotonic() - started
            got.extend((now, event) for event in parser.feed(data))
        return response.headers["x-stream-id"], got


async def stored(recorder: MemoryRecorder, sid: str) -> StreamRecord:
    with anyio.fail_after(5):
        while (record := await recorder.get(sid)) is None or not record.finished:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    return record


def data_of(events: list[tuple[float, ServerSentEvent]]) -> list[ServerSentEvent]:
    return [e for _, e in events if e.event is None]


# -- timeouts ---------------------------------------------------------------------------------------------------


async def test_timeout_stops_an_upstream_stuck_in_a_read_and_records_why() -> None:
    recorder = MemoryRecorder()
    closed = anyio.Event()

    @recorded_stream(recorder=recorder, timeout=0.5, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        try:
            yield "one "
            yield "two "
            await anyio.sleep(30)  # a slow upstream: awaiting its next token
            yield "never"
        finally:
            closed.set()

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat")
            record = await stored(recorder, sid)
    assert [e.data for e in data_of(events)] == ["one ", "two "]
    last_at, last = events[-1]
    assert last.event == "error" and json.loads(last.data)["stream_id"] == sid
    assert 0.4 < last_at < 3, f"the error came after {last_at:.2f} s"
    assert closed.is_set(), "the generator's finally did not run"
    assert record.status is StreamStatus.FAILED
    assert record.error == "TimeoutError: the stream ran past its timeout of 0.5 s"
    assert record.content == "one two "


async def test_idle_timeout_counts_from_the_last_token_and_interrupts_a_network_read() -> None:
    recorder = MemoryRecorder()
    closed = anyio.Event()

    async def silent_peer(stream: Any) -> None:
        await anyio.sleep(60)  # accepts, never answers

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    @recorded_stream(recorder=recorder, idle_timeout=0.4, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        try:
            for i in range(6):  # steady tokens, each well within the idle limit: 0.6 s in all
                yield f"t{i} "
                await anyio.sleep(0.1)
            async with await anyio.connect_tcp("127.0.0.1", port) as upstream:
                yield (await upstream.receive()).decode()  # the upstream stalls mid-answer
        finally:
            closed.set()

    async with recorder, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, silent_peer)
        async with served(chat=chat) as url:
            with anyio.fail_after(10):
                sid, events = await read_events(f"{url}/chat")
                record = await stored(recorder, sid)
        tg.cancel_scope.cancel()
    assert [e.data for e in data_of(events)] == [f"t{i} " for i in range(6)]
    assert events[-1][1].event == "error"
    assert 0.9 < events[-1][0] < 3  # 0.6 s of tokens, then 0.4 s of silence
    assert closed.is_set()
    assert (record.status, record.error) == (StreamStatus.FAILED, "TimeoutError: no token for 0.4 s")


async def test_idle_timeout_covers_the_first_token() -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, idle_timeout=0.3, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        await anyio.sleep(30)
        yield "late"

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat")
            record = await stored(recorder, sid)
    assert [e.event for _, e in events] == ["error"]
    assert (record.status, record.error, record.chunk_count) == (
        StreamStatus.FAILED, "TimeoutError: no token for 0.3 s", 0)


# -- fallback ---------------------------------------------------------------------------------------------------


async def test_fallback_answers_when_the_source_fails_before_its_first_item() -> None:
    recorder = MemoryRecorder()
    seen: list[str] = []

    async def backup(request: Request) -> AsyncIterator[str]:
        seen.append(request.query_params["q"])  # the endpoint's own arguments
        yield "from "
        yield "backup"

    @recorded_stream(recorder=recorder, fallback=backup, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        raise ConnectionError("primary provider down")
        yield "never"  # pragma: no cover

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat?q=hi")
            record = await stored(recorder, sid)
    assert [e.data for e in data_of(events)] == ["from ", "backup"]
    assert [e.id for e in data_of(events)] == ["1", "2"]
    assert events[-1][1].event == "done"
    assert seen == ["hi"]
    assert (record.status, record.content) == (StreamStatus.COMPLETED, "from backup")
    assert record.metadata["fallback"] == "ConnectionError: primary provider down"


async def test_a_failure_after_the_first_item_is_a_failure_never_spliced() -> None:
    recorder = MemoryRecorder()
    used = False

    async def backup(request: Request) -> AsyncIterator[str]:
        nonlocal used
        used = True
        yield "other answer"

    @recorded_stream(recorder=recorder, fallback=backup, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        yield "half an "
        raise ConnectionError("dropped")

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat")
            record = await stored(recorder, sid)
    assert [e.data for e in data_of(events)] == ["half an "]
    assert events[-1][1].event == "error"
    assert not used
    assert (record.status, record.error) == (StreamStatus.FAILED, "ConnectionError: dropped")
    assert "fallback" not in record.metadata


async def test_a_failing_fallback_fails_the_stream_with_its_own_error() -> None:
    recorder = MemoryRecorder()

    async def backup(request: Request) -> AsyncIterator[str]:
        raise TimeoutError("backup down too")
        yield "never"  # pragma: no cover

    @recorded_stream(recorder=recorder, fallback=backup, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        raise ConnectionError("primary down")
        yield "never"  # pragma: no cover

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat")
            record = await stored(recorder, sid)
    assert [e.event for _, e in events] == ["error"]
    assert (record.status, record.error) == (StreamStatus.FAILED, "TimeoutError: backup down too")
    assert record.metadata["fallback"] == "ConnectionError: primary down"


# -- progress ---------------------------------------------------------------------------------------------------


async def test_progress_events_are_sent_never_recorded_never_numbered() -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, progress=0.2, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        for i in range(10):
            yield f"w{i} "
            await anyio.sleep(0.1)

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat")
            record = await stored(recorder, sid)
    progress = [e for _, e in events if e.event == "progress"]
    assert len(progress) >= 3
    assert all(e.id is None for e in progress)
    reports = [json.loads(e.data) for e in progress]
    assert set(reports[0]) == {"chunks", "chars", "elapsed_ms", "chars_per_s"}
    assert [r["chunks"] for r in reports] == sorted(r["chunks"] for r in reports)
    assert 0 < reports[-1]["chunks"] <= 10 and reports[-1]["chars"] == sum(len(f"w{i} ") for i in
                                                                            range(reports[-1]["chunks"]))
    assert all(r["chars_per_s"] > 0 for r in reports if r["chars"])
    assert [e.id for e in data_of(events)] == [str(i) for i in range(1, 11)]
    assert record.chunk_count == 10 and record.content == "".join(f"w{i} " for i in range(10))


# -- coalescing -------------------------------------------------------------------------------------------------


async def test_coalescing_sends_a_burst_as_one_event_and_records_every_token() -> None:
    recorder = MemoryRecorder()
    tokens = [f"{i} " for i in range(40)]

    @recorded_stream(recorder=recorder, coalesce=0.2, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        yield tokens[0]
        for token in tokens[1:30]:  # a fast model: a burst
            await anyio.sleep(0.005)
            yield token
        await anyio.sleep(0.6)  # quiet for longer than a window
        for token in tokens[30:]:
            yield token

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat")
            record = await stored(recorder, sid)
            chunks = await recorder.chunks(sid)
    data = [(at, e) for at, e in events if e.event is None]
    assert "".join(e.data for _, e in data) == "".join(tokens)  # nothing lost, nothing doubled, in order
    assert data[0][1].data == tokens[0]  # the first token of a quiet period goes out at once
    assert len(data) <= 6, [e.data for _, e in data]  # 40 tokens: the burst in a few windows
    held = 0
    for _, e in data:  # each event's id is the seq of the last token it holds
        held += len(e.data.split())
        assert e.id == str(held), (e.id, held)
    times = [at for at, _ in data]
    # one event per window (a client that reads two events in one go sees them at once: allow one)
    assert sum(b - a < 0.15 for a, b in itertools.pairwise(times)) <= 1, times
    assert [c.seq for c in chunks] == list(range(1, 41)) and [c.data for c in chunks] == tokens
    assert record.chunk_count == 40 and record.content == "".join(tokens)
    assert events[-1][1].event == "done"


async def test_coalesced_resume_gets_exactly_the_rest() -> None:
    """An event's id is the last seq it holds: resuming from it replays exactly what follows."""
    recorder = MemoryRecorder()
    tokens = [f"{i} " for i in range(20)]

    @recorded_stream(recorder=recorder, coalesce=0.1, ping=None)
    async def chat(request: Request) -> AsyncIterator[str]:
        for token in tokens:
            yield token
            await anyio.sleep(0.01)

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat")
            await stored(recorder, sid)
            data = data_of(events)
            cut = data[len(data) // 2]
            rest = [c.data for c in await recorder.chunks(sid, after=int(cut.id or 0))]
    before = "".join(e.data for e in data[: len(data) // 2 + 1])
    assert before + "".join(rest) == "".join(tokens)


# -- bad options, at decoration time ------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "words"), [
    ({"timeout": 0}, "timeout must be a positive number of seconds"),
    ({"idle_timeout": -1}, "idle_timeout must be a positive number of seconds"),
    ({"coalesce": "fast"}, "coalesce must be a positive number of seconds"),
    ({"progress": float("inf")}, "progress must be a positive number of seconds"),
    ({"timeout": True}, "timeout must be a positive number of seconds"),
    ({"progress": 1.0, "format": "openai"}, "progress events are plain SSE events"),
])
def test_bad_options_are_refused_where_they_are_given(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        recorded_stream(**options)


def test_a_fallback_must_be_an_async_generator_function() -> None:
    async def not_a_generator(request: Request) -> str:
        return "x"

    with pytest.raises(TypeError, match="fallback must be an async generator function"):
        recorded_stream(fallback=not_a_generator)  # type: ignore[arg-type]


def test_coalescing_with_the_openai_format_joins_text_deltas() -> None:
    """Defined: with ``format="openai"`` a window's text goes out as one chunk whose delta holds
    the joined text (tool calls are never joined)."""
    recorded_stream(coalesce=0.05, format="openai")  # accepted


async def test_an_event_item_in_a_coalesced_stream_keeps_its_place() -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, coalesce=0.2, ping=None)
    async def chat(request: Request) -> AsyncIterator[Any]:
        yield "a"
        yield "b"
        yield ServerSentEvent("{\"tool\": 1}", event="tool")
        yield "c"

    async with recorder, served(chat=chat) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/chat")
            record = await stored(recorder, sid)
    got = [(e.event, e.data, e.id) for _, e in events if e.event != "done"]
    # the four items arrive at once: the text before the tool event is one event, then the tool
    # event as itself, then the text after it
    assert got == [(None, "ab", "2"), ("tool", "{\"tool\": 1}", "3"), (None, "c", "4")]
    assert record.content == "abc" and record.chunk_count == 4


async def test_sentences_over_a_real_server() -> None:
    from contextlib import aclosing

    from asgi_stream_recorder import sentences

    recorder = MemoryRecorder()
    text = "Dr. Smith arrived at 3.15 p.m. today. Was it late?! No\u2026 Not at all.\n\nNext par"

    async def tokens() -> AsyncIterator[str]:
        for i in range(0, len(text), 3):
            yield text[i:i + 3]

    @recorded_stream(recorder=recorder, ping=None)
    async def speak(request: Request) -> AsyncIterator[str]:
        async with aclosing(sentences(tokens())) as parts:
            async for sentence in parts:
                yield sentence

    async with recorder, served(speak=speak) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(f"{url}/speak")
            record = await stored(recorder, sid)
    got = [e.data for e in data_of(events)]
    assert got == ["Dr. Smith arrived at 3.15 p.m. today. ", "Was it late?! ", "No\u2026 ", "Not at all.\n\n",
                   "Next par"]
    assert record.content == text and record.chunk_count == len(got)


async def test_stream_app_takes_the_same_options() -> None:
    from asgi_stream_recorder import stream_app

    recorder = MemoryRecorder()

    async def slow(request: Request) -> AsyncIterator[str]:
        yield "a"
        await anyio.sleep(30)
        yield "b"

    with pytest.raises(ValueError, match="idle_timeout"):
        stream_app(slow, idle_timeout=0)
    app = stream_app(slow, recorder=recorder, idle_timeout=0.3, ping=None)
    async with recorder, serve(app) as url:
        with anyio.fail_after(10):
            sid, events = await read_events(url)
            record = await stored(recorder, sid)
    assert [e.event for _, e in events] == [None, "error"]
    assert record.error == "TimeoutError: no token for 0.3 s"
