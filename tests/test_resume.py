"""Resume, follow and stop (issue 11), in one process: real servers and the in-process client.

* the end of a stream is signalled (``event: done``, no ``id``; off with ``done_event=False``;
  ``error`` and OpenAI's ``[DONE]`` kept);
* ``@recorded_stream(resume=True)``: ids ``<stream_id>:<seq>``, a ``retry`` hint, a client that
  drops after k events reconnects with ``Last-Event-ID`` and gets exactly the rest, one generation;
  ``204`` / ``404`` / ``400``; a property test over random drop points;
* joins through ``streams_app`` at every phase (before the first flush, mid-batch, after the end),
  with ``?after=`` and ``Last-Event-ID`` in both forms: seqs exactly ``after+1 .. n``;
* ``streams_app``'s JSON routes, 404s, the ``authorize`` hook (sync, async, the loopback default);
* cancel by request (HTTP and ``recorder.cancel``); stream keys; ``recorder.follow`` fed from memory,
  slow followers, many followers, followers that hang up.

Real servers are uvicorn on asyncio and hypercorn on trio (``tests.servers.serve``), with real
httpx clients whose sockets really close. Generations are driven by a :class:`Feed` the test
releases token by token, so every phase is reached deterministically (no sleeps, no timing).
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from httpx_sse import aconnect_sse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Scope

from asgi_stream_recorder import (
    MemoryRecorder,
    Recorder,
    ServerSentEvent,
    SQLiteRecorder,
    SSEParser,
    StreamRecorderMiddleware,
    StreamStatus,
    join_response,
    recorded_stream,
    streams_app,
)
from asgi_stream_recorder.testing import assert_recorded, sse_client, wait_recorded

from .servers import serve

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds: the bound of every wait that is not about promptness


# -- a generation the test drives --------------------------------------------------------------------
def word(i: int) -> str:
    """Token ``i`` (from 0) of every generation here; chunk seq ``i + 1``."""
    return f"w{i} "


def text_of(n: int, start: int = 0) -> str:
    return "".join(word(i) for i in range(start, n))


class Feed:
    """The tokens of one generation, let through by the test: token ``i`` goes out once more
    than ``i`` were allowed, and the generation returns once more than ``n`` were (the end is
    gated too, so "all chunks sent, not yet finished" is a phase a test can hold)."""

    def __init__(self, n: int, *, allowed: int = 0, fail_at: int | None = None, pause: float = 0.0) -> None:
        self.n = n
        self.allowed = allowed
        self.fail_at = fail_at
        self.pause = pause
        self.calls = 0  # how many generations read this feed
        self.sent = 0  # tokens the stream took (the generator was resumed after yielding them)
        self.started = anyio.Event()
        self.finally_ran = anyio.Event()
        self.finished = anyio.Event()  # ran to its end
        self._moved = anyio.Event()

    def allow(self, more: int | None = None) -> None:
        """Let ``more`` tokens through (None: everything, and the end)."""
        self.allowed = self.n + 1 if more is None else self.allowed + more
        self._kick()

    def _kick(self) -> None:
        self._moved.set()
        self._moved = anyio.Event()

    async def wait_sent(self, k: int) -> None:
        with anyio.fail_after(WAIT):
            while self.sent < k:
                await self._moved.wait()

    async def tokens(self) -> AsyncGenerator[str, None]:
        self.calls += 1
        self.started.set()
        try:
            for i in range(self.n + 1):
                while self.allowed <= i:
                    await self._moved.wait()
                if i == self.n:
                    break
                if self.fail_at == i:
                    raise RuntimeError("the model fell over")
                yield word(i)
                self.sent = i + 1
                self._kick()
                if self.pause:
                    await anyio.sleep(self.pause)
            self.finished.set()
        finally:
            self.finally_ran.set()


async def query_key(request: Request) -> str | None:
    """An async key function reading the query (``?conv=``)."""
    return request.query_params.get("conv")


async def body_key(request: Request) -> str | None:
    """An async key function reading the JSON body."""
    return str((await request.json())["conv"])


def path_key(request: Request) -> str:
    """A sync key function reading the path."""
    return str(request.path_params["conv"])


class Lab:
    """An app over one recorder: recorded endpoints whose generations read the feed named by
    ``?feed=``, the streams app at ``/streams``, and an AI SDK-style resume route by key."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        authorize: Any = None,
        middleware: bool = False,
        record_all_sse: bool = False,
    ) -> None:
        self.recorder = recorder
        self.feeds: dict[str, Feed] = {}

        def endpoint(**options: Any) -> Callable[..., Any]:
            @recorded_stream(recorder=recorder, ping=None, **options)
            async def generate(request: Request) -> AsyncIterator[str]:
                async with aclosing(self.feeds[request.query_params["feed"]].tokens()) as items:
                    async for item in items:
                        yield item

            return generate

        async def resume_by_key(request: Request) -> Any:
            return join_response(recorder, key=request.path_params["conv"])

        inner = Starlette(routes=[
            Route("/chat", endpoint(resume=True, key=query_key)),
            Route("/chat-json", endpoint(resume=True, key=body_key), methods=["POST"]),
            Route("/chat-fixed", endpoint(resume=True, key="conv-fixed")),
            Route("/conv/{conv}/chat", endpoint(resume=True, key=path_key)),
            Route("/api/chat/{conv}/stream", resume_by_key),
            Route("/other", endpoint(resume=True)),
            Route("/plain", endpoint()),
            Route("/nodone", endpoint(done_event=False)),
            Route("/nodone-resume", endpoint(done_event=False, resume=True)),
            Route("/openai", endpoint(format="openai", resume=True)),
            Mount("/streams", streams_app(recorder=recorder, authorize=authorize)),
        ])
        self.app: ASGIApp = inner
        if middleware:
            self.app = StreamRecorderMiddleware(inner, recorder=recorder, record_all_sse=record_all_sse,
                                                handle_signals=False)

    def feed(self, name: str, n: int, **options: Any) -> Feed:
        feed = self.feeds[name] = Feed(n, **options)
        return feed


# -- a real client reading a real socket ---------------------------------------------------------------
class Wire:
    """One HTTP response read as a browser's EventSource would (WHATWG parsing: each event's
    own ``id``, comments skipped, a block without data not an event)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = SSEParser()
        self.raw = b""
        self.events: list[ServerSentEvent] = []
        self._pending: collections.deque[ServerSentEvent] = collections.deque()
        self._bytes = response.aiter_raw()
        self.ended = False

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def sid(self) -> str:
        return self.response.headers["x-stream-id"]

    @property
    def data(self) -> list[ServerSentEvent]:
        return [e for e in self.events if e.event is None]

    async def next(self) -> ServerSentEvent | None:
        """The next event, or None at the end of the body."""
        with anyio.fail_after(WAIT):
            while not self._pending:
                try:
                    chunk = await self._bytes.__anext__()
                except StopAsyncIteration:
                    self.ended = True
                    return None
                self.raw += chunk
                self._pending.extend(self.parser.feed(chunk))
        event = self._pending.popleft()
        self.events.append(event)
        return event

    async def take(self, k: int) -> list[ServerSentEvent]:
        """The next ``k`` events, which must all be data events."""
        got = []
        for _ in range(k):
            event = await self.next()
            assert event is not None and event.event is None, f"expected a data event, got {event!r}"
            got.append(event)
        return got

    async def rest(self) -> list[ServerSentEvent]:
        """Every event up to the end of the body."""
        got = []
        while (event := await self.next()) is not None:
            got.append(event)
        return got

    async def close(self) -> None:
        await self._bytes.aclose()  # type: ignore[attr-defined]


@asynccontextmanager
async def connect(url: str, headers: dict[str, Any] | None = None, method: str = "GET",
                  json_body: Any = None) -> AsyncIterator[Wire]:
    """A fresh client and connection; leaving the block closes the socket (mid-stream or not)."""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(WAIT)) as client,
        client.stream(method, url, headers={"accept": "text/event-stream", **(headers or {})},
                      json=json_body) as response,
    ):
        wire = Wire(response)
        try:
            yield wire
        finally:
            await wire.close()


async def http(method: str, url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT)) as client:
        return await client.request(method, url, **kwargs)


def seq_of(event: ServerSentEvent, sid: str | None = None) -> int:
    """The seq of a data event's id; with ``sid``, the id must be ``<sid>:<seq>``."""
    assert event.id is not None, f"a data event without an id: {event!r}"
    if sid is None:
        return int(event.id)
    owner, colon, seq = event.id.rpartition(":")
    assert colon and owner == sid, f"id {event.id!r} is not of the form {sid}:<seq>"
    return int(seq)


def assert_chunks(events: list[ServerSentEvent], sid: str, after: int, n: int) -> None:
    """Data events exactly ``after+1 .. n`` of stream ``sid``, in order, each its own token."""
    seqs = [seq_of(e, sid) for e in events]
    assert seqs == list(range(after + 1, n + 1)), f"seqs {seqs}, expected {after + 1}..{n}"
    assert [e.text for e in events] == [word(s - 1) for s in seqs]


def assert_final(event: ServerSentEvent | None, sid: str, status: str = "completed", name: str = "done") -> None:
    """The stream's final event: ``event: <name>``, JSON data naming the stream, no id."""
    assert event is not None, "the body ended without a final event"
    assert event.event == name, f"expected event {name!r}, got {event!r}"
    assert event.id is None, f"the final event must carry no id (Last-Event-ID stays on the last chunk): {event!r}"
    payload = json.loads(event.text or "")
    assert payload["stream_id"] == sid, payload
    if name == "done":
        assert payload["status"] == status, payload


async def read_joined(wire: Wire, sid: str, after: int, n: int, status: str = "completed") -> None:
    """A join's whole body: chunks ``after+1 .. n`` then the final event, then the end."""
    events = await wire.rest()
    assert events, f"empty join body: {wire.raw!r}"
    assert_chunks(events[:-1], sid, after, n)
    assert_final(events[-1], sid, status)


@asynccontextmanager
async def served(lab: Lab) -> AsyncIterator[str]:
    async with serve(lab.app) as url:
        yield url


@asynccontextmanager
async def running(stream: Callable[[], Coroutine[Any, Any, Any]]) -> AsyncIterator[None]:
    """Run ``stream`` in the background of the block; the block waits for it at the end."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream)
        yield


# == 1. the end of a stream is signalled =========================================================
@pytest.mark.parametrize("path", ["/plain", "/chat"])
async def test_a_completed_stream_ends_with_done_and_no_id(path: str) -> None:
    lab = Lab(MemoryRecorder())
    lab.feed("a", 3, allowed=10)
    async with served(lab) as url, connect(f"{url}{path}?feed=a") as wire:
        events = await wire.rest()
        sid = wire.sid
    resumable = path == "/chat"
    assert [seq_of(e, sid if resumable else None) for e in events[:-1]] == [1, 2, 3]
    assert_final(events[-1], sid)
    # the id a browser would send on reconnect stays on the last chunk
    assert wire.parser.last_event_id == (f"{sid}:3" if resumable else "3")
    done = json.dumps({"stream_id": sid, "status": "completed"}, separators=(",", ":")).encode()
    assert wire.raw.endswith(b"\n\nevent: done\ndata: " + done + b"\n\n"), wire.raw[-200:]


@pytest.mark.parametrize("path", ["/nodone", "/nodone-resume"])
async def test_done_event_false_keeps_the_old_wire_format(path: str) -> None:
    lab = Lab(MemoryRecorder())
    lab.feed("a", 3, allowed=10)
    async with served(lab) as url, connect(f"{url}{path}?feed=a") as wire:
        events = await wire.rest()
    assert [e.text for e in events] == [word(0), word(1), word(2)]
    assert all(e.event is None for e in events)
    assert b"event:" not in wire.raw
    assert wire.raw.endswith(b"data: w2 \n\n")


async def test_a_failed_stream_keeps_its_error_event_and_has_no_done() -> None:
    lab = Lab(MemoryRecorder())
    lab.feed("a", 5, allowed=10, fail_at=2)
    async with served(lab) as url, connect(f"{url}/chat?feed=a") as wire:
        events = await wire.rest()
        sid = wire.sid
    assert_chunks(events[:-1], sid, 0, 2)
    assert_final(events[-1], sid, name="error")
    assert b"event: done" not in wire.raw
    await assert_recorded(lab.recorder, sid, status="failed", content=text_of(2))


async def test_openai_format_ends_with_done_marker_and_no_done_event() -> None:
    lab = Lab(MemoryRecorder())
    lab.feed("a", 3, allowed=10)
    async with served(lab) as url, connect(f"{url}/openai?feed=a") as wire:
        events = await wire.rest()
        sid = wire.sid
    assert events[-1].text == "[DONE]"
    assert b"event: done" not in wire.raw
    chunks = [json.loads(e.text or "") for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == text_of(3)
    assert [seq_of(e, sid) for e in events if e.id is not None] == [1, 2, 3]


# == 2. resume on the same URL ===================================================================
N = 6


@pytest.mark.parametrize("k", [0, 1, 3, N - 1, N])
async def test_resume_after_a_drop_gets_exactly_the_rest_from_one_generation(k: int) -> None:
    """The client reads k chunks and its socket closes; while the generation goes on, the same
    URL with ``Last-Event-ID: <sid>:<k>`` replays and follows the rest, then ``done``."""
    lab = Lab(MemoryRecorder())
    feed = lab.feed("a", N, allowed=k)
    first: list[str] = []
    async with served(lab) as url:
        async with httpx.AsyncClient(timeout=WAIT) as client, aconnect_sse(client, "GET", f"{url}/chat?feed=a") as src:
            assert src.response.status_code == 200
            sid = src.response.headers["x-stream-id"]
            async with aclosing(src.aiter_sse()) as events:
                hint = await anext(events)
                assert hint.retry == 1000 and hint.data == "", f"the first event must be the retry hint: {hint!r}"
                while len(first) < k:
                    event = await anext(events)
                    assert event.event == "message" and event.id == f"{sid}:{len(first) + 1}", event
                    first.append(event.data)
        # the socket is closed; the generation waits for its next token, not for the client
        await feed.wait_sent(k)
        async with connect(f"{url}/chat?feed=a", {"last-event-id": f"{sid}:{k}"}) as wire:
            assert wire.status == 200
            assert wire.sid == sid
            feed.allow()
            events_ = await wire.rest()
        assert_chunks(events_[:-1], sid, k, N)
        assert_final(events_[-1], sid)
        assert "".join(first) + "".join(e.text or "" for e in events_[:-1]) == text_of(N)
        # fully delivered: the reconnect that a browser would make after `done` ends it for good
        async with connect(f"{url}/chat?feed=a", {"last-event-id": f"{sid}:{N}"}) as wire:
            assert wire.status == 204
            assert await wire.rest() == []
        # a reconnect after the end, from an earlier point: replay, then done
        async with connect(f"{url}/chat?feed=a", {"last-event-id": f"{sid}:{max(k - 1, 0)}"}) as wire:
            assert wire.status == 200
            await read_joined(wire, sid, max(k - 1, 0), N)
    assert feed.calls == 1, "a reconnect started a second generation"
    record = await assert_recorded(lab.recorder, sid, status="completed", content=text_of(N), chunk_count=N)
    assert record.metadata.get("client_disconnected_at_ms") is not None
    assert len(await lab.recorder.list_streams()) == 1, "a join must not be recorded as a stream of its own"


async def test_resume_with_every_chunk_before_the_end_gets_only_done() -> None:
    lab = Lab(MemoryRecorder())
    feed = lab.feed("a", 3, allowed=3)  # all chunks out, the end still held
    async with served(lab) as url:
        async with connect(f"{url}/chat?feed=a") as wire:
            await wire.take(3)
            sid = wire.sid
        async with connect(f"{url}/chat?feed=a", {"last-event-id": f"{sid}:3"}) as wire:
            assert wire.status == 200
            feed.allow()
            events = await wire.rest()
    assert len(events) == 1
    assert_final(events[0], sid)
    assert feed.calls == 1


async def test_resume_of_an_unknown_stream_is_404_and_generates_nothing() -> None:
    lab = Lab(MemoryRecorder())
    feed = lab.feed("a", 3, allowed=10)
    async with served(lab) as url:
        for last in ("0190f0aa00000000000000000000000:3", "nosuchstream:0"):
            async with connect(f"{url}/chat?feed=a", {"last-event-id": last}) as wire:
                assert wire.status == 404, last
    assert feed.calls == 0
    assert await lab.recorder.list_streams() == []


BAD_IDS: list[str | bytes] = [
    "3",  # a plain seq: not a resumable id
    "0",
    "abc",
    "sid:x",
    ":5",
    "sid:-1",
    "sid:",
    "sid:1.5",
    "sid:1e3",
    "sid: 3x",
    "sid:" + "9" * 40,  # absurdly long seq
    "sid:\u0663".encode(),  # a non-ASCII digit, as UTF-8 bytes on the wire
    "550e8400-e29b-41d4-a716-446655440000",  # another server's id
]


@pytest.mark.parametrize("last", BAD_IDS)
async def test_resume_with_a_malformed_id_is_400_and_generates_nothing(last: str | bytes) -> None:
    lab = Lab(MemoryRecorder())
    feed = lab.feed("a", 3, allowed=10)
    async with served(lab) as url, connect(f"{url}/chat?feed=a", {"last-event-id": last}) as wire:
        assert wire.status == 400, (last, wire.status)
        body = await wire.response.aread()
        assert b"Traceback" not in body
    assert feed.calls == 0
    assert await lab.recorder.list_streams() == []


async def test_resume_with_the_id_of_a_stream_of_another_endpoint_is_refused() -> None:
    """``/chat`` with the Last-Event-ID of a stream produced by ``/other``: a foreign id.
    It must not run the generator; it must not hand out another endpoint's stream either."""
    lab = Lab(MemoryRecorder())
    lab.feed("o", 3, allowed=10)
    feed = lab.feed("a", 3, allowed=10)
    async with served(lab) as url:
        async with connect(f"{url}/other?feed=o") as wire:
            await wire.rest()
            other = wire.sid
        async with connect(f"{url}/chat?feed=a", {"last-event-id": f"{other}:1"}) as wire:
            status = wire.status
            body = await wire.rest() if status == 200 else []
    assert feed.calls == 0
    assert status == 400, f"/chat joined a stream of /other: {status}, {[e.text for e in body]}"


async def test_resume_keeps_the_stream_s_wire_format_openai() -> None:
    lab = Lab(MemoryRecorder())
    feed = lab.feed("a", 4, allowed=2)
    async with served(lab) as url:
        async with connect(f"{url}/openai?feed=a") as wire:
            await wire.take(2)
            sid = wire.sid
        async with connect(f"{url}/openai?feed=a", {"last-event-id": f"{sid}:2"}) as wire:
            assert wire.status == 200
            feed.allow()
            events = await wire.rest()
    assert events[-1].text == "[DONE]"
    with_ids = [e for e in events if e.id is not None]
    assert [seq_of(e, sid) for e in with_ids] == [3, 4]
    content = [json.loads(e.text or "")["choices"][0]["delta"]["content"] for e in with_ids]
    assert content == [word(2), word(3)]
    assert b"event: done" not in wire.raw
    assert feed.calls == 1


async def test_resume_keeps_done_event_false() -> None:
    """A stream produced with ``done_event=False`` must not grow a ``done`` event when resumed:
    users who turned it off must not see their wire format change on a reconnect."""
    lab = Lab(MemoryRecorder())
    feed = lab.feed("a", 4, allowed=2)
    async with served(lab) as url:
        async with connect(f"{url}/nodone-resume?feed=a") as wire:
            await wire.take(2)
            sid = wire.sid
        async with connect(f"{url}/nodone-resume?feed=a", {"last-event-id": f"{sid}:2"}) as wire:
            feed.allow()
            events = await wire.rest()
    assert_chunks(events[:2], sid, 2, 4)
    assert b"event: done" not in wire.raw, f"the join added a done event: {wire.raw!r}"


async def test_joins_and_resumes_are_not_recorded_again_by_record_all_sse() -> None:
    """Under the middleware with ``record_all_sse=True``, a join (streams app, resume) is an
    event stream passing through it: it must not become a second record ("a join is not a new stream")."""
    recorder = MemoryRecorder()
    lab = Lab(recorder, middleware=True, record_all_sse=True)
    feed = lab.feed("a", 3, allowed=1)
    async with served(lab) as url:
        async with connect(f"{url}/chat?feed=a") as wire:
            await wire.take(1)
            sid = wire.sid
        async with connect(f"{url}/chat?feed=a", {"last-event-id": f"{sid}:1"}) as resumed, \
                connect(f"{url}/streams/{sid}/events") as joined:
            feed.allow()
            await read_joined(resumed, sid, 1, 3)
            await read_joined(joined, sid, 0, 3)
        await recorder.flush()
        ids = [r.id for r in await recorder.list_streams()]
    assert ids == [sid], f"joins were recorded as streams of their own: {ids}"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(min_value=1, max_value=12),
    drop=st.floats(min_value=0, max_value=1),
    pause=st.sampled_from([0.0, 0.001]),
    when=st.sampled_from(["at_once", "after_end"]),
)
async def test_property_first_part_plus_resumed_part_is_the_whole_text(
    n: int, drop: float, pause: float, when: str
) -> None:
    k = round(drop * n)
    recorder = MemoryRecorder()
    async with recorder:
        lab = Lab(recorder)
        feed = lab.feed("p", n, allowed=n + 1, pause=pause)
        async with sse_client(lab.app, timeout=WAIT) as client:
            async with client.stream("GET", "/chat?feed=p", disconnect_after_events=k) as first:
                got = await first.collect()
                sid = first.stream_id
                assert sid and len(got) == k
                if when == "after_end":
                    with anyio.fail_after(WAIT):
                        await feed.finally_ran.wait()
                async with client.stream("GET", "/chat?feed=p", headers={"last-event-id": f"{sid}:{k}"}) as again:
                    if again.status_code == 204:
                        rest: list[Any] = []
                        assert k == n and feed.finished.is_set()
                    else:
                        assert again.status_code == 200
                        rest = await again.collect()
                        assert_final(rest[-1], sid)
                        rest = rest[:-1]
        assert [seq_of(e, sid) for e in [*got, *rest]] == list(range(1, n + 1))
        assert "".join(e.text for e in [*got, *rest]) == text_of(n)
        assert feed.calls == 1
        await assert_recorded(recorder, sid, status="completed", content=text_of(n))


# == 3. joins at every phase =====================================================================
AFTER_FORMS = ["none", "query", "query-id", "header", "header-id"]


def join_request(base: str, sid: str, form: str, after: int) -> tuple[str, dict[str, str], int]:
    """URL, headers and the expected ``after`` of a join in one of the accepted forms."""
    url = f"{base}/streams/{sid}/events"
    if form == "none":
        return url, {}, 0
    if form == "query":
        return f"{url}?after={after}", {}, after
    if form == "query-id":
        return f"{url}?after={sid}:{after}", {}, after
    if form == "header":
        return url, {"last-event-id": str(after)}, after
    return url, {"last-event-id": f"{sid}:{after}"}, after


@pytest.mark.parametrize("form", AFTER_FORMS)
@pytest.mark.parametrize("phase", ["before-first-flush", "mid-batch", "after-end"])
async def test_join_at_every_phase_has_no_gap_and_no_duplicate(tmp_path: Path, phase: str, form: str) -> None:
    n = 8
    # flush_interval=10: nothing reaches the file unless the test flushes (or the stream ends)
    recorder = SQLiteRecorder(tmp_path / "s.db", flush_interval=10)
    async with recorder:
        lab = Lab(recorder)
        feed = lab.feed("a", n)
        async with served(lab) as url, connect(f"{url}/chat?feed=a") as producer:
            sid = producer.sid
            if phase == "before-first-flush":
                assert await recorder.backend.get(sid) is None  # not even the start is stored
            elif phase == "mid-batch":
                feed.allow(3)
                await producer.take(3)
                await recorder.flush()  # 1..3 stored
                feed.allow(2)
                await producer.take(2)  # 4..5 only queued
                assert [c.seq for c in await recorder.backend.chunks(sid)] == [1, 2, 3]
            else:
                feed.allow()
                await producer.rest()
            join_url, headers, after = join_request(url, sid, form, 2)
            async with connect(join_url, headers) as follower:
                assert follower.status == 200, await follower.response.aread()
                assert follower.sid == sid
                feed.allow()
                async with running(producer.rest):
                    await read_joined(follower, sid, after, n)
    assert feed.calls == 1


@pytest.mark.parametrize("form", ["query", "query-id", "header", "header-id"])
async def test_join_of_a_finished_stream_the_client_has_whole_is_204(form: str) -> None:
    lab = Lab(MemoryRecorder())
    lab.feed("a", 3, allowed=10)
    async with served(lab) as url:
        async with connect(f"{url}/chat?feed=a") as producer:
            await producer.rest()
            sid = producer.sid
        join_url, headers, _ = join_request(url, sid, form, 3)
        async with connect(join_url, headers) as wire:
            assert wire.status == 204
        join_url, headers, _ = join_request(url, sid, form, 2)
        async with connect(join_url, headers) as wire:
            assert wire.status == 200
            await read_joined(wire, sid, 2, 3)


@pytest.mark.parametrize(("query", "headers"), [
    ("?after=abc", {}),
    ("?after=-1", {}),
    ("?after=1.5", {}),
    ("?after=", {}),
    ("?after=OTHER:1", {}),
    ("", {"last-event-id": "OTHER:1"}),
    ("", {"last-event-id": "x"}),
    ("", {"last-event-id": ":1"}),
])
async def test_join_with_a_malformed_or_foreign_position_is_400(query: str, headers: dict[str, str]) -> None:
    lab = Lab(MemoryRecorder())
    lab.feed("a", 3, allowed=10)
    lab.feed("b", 3, allowed=10)
    async with served(lab) as url:
        async with connect(f"{url}/chat?feed=a") as wire:
            await wire.rest()
            sid = wire.sid
        async with connect(f"{url}/chat?feed=b") as wire:
            await wire.rest()
            other = wire.sid
        q = query.replace("OTHER", other)
        h = {k: v.replace("OTHER", other) for k, v in headers.items()}
        async with connect(f"{url}/streams/{sid}/events{q}", h) as wire:
            assert wire.status == 400, (q, h, wire.status)


async def test_join_of_an_unknown_stream_is_404() -> None:
    lab = Lab(MemoryRecorder())
    async with served(lab) as url, connect(f"{url}/streams/nosuchstream/events") as wire:
        assert wire.status == 404


async def test_join_ends_with_the_stream_s_own_last_word() -> None:
    """A follower gets what the producer's client got at the end: ``error`` for a failure,
    ``done`` with status cancelled for a stop by request."""
    lab = Lab(MemoryRecorder())
    failing = lab.feed("f", 5, allowed=1, fail_at=2)
    stopping = lab.feed("s", 50, allowed=1)
    async with served(lab) as url:
        async with connect(f"{url}/chat?feed=f") as producer, connect(f"{url}/chat?feed=s") as producer2:
            sid, sid2 = producer.sid, producer2.sid
            await producer.take(1)
            await producer2.take(1)
            async with connect(f"{url}/streams/{sid}/events") as follower, \
                    connect(f"{url}/streams/{sid2}/events") as follower2:
                assert_chunks(await follower.take(1), sid, 0, 1)
                assert_chunks(await follower2.take(1), sid2, 0, 1)
                failing.allow()
                assert (await http("POST", f"{url}/streams/{sid2}/cancel")).status_code == 202
                rest, rest2 = await follower.rest(), await follower2.rest()
                assert_chunks(rest[:-1], sid, 1, 2)
                assert_final(rest[-1], sid, name="error")
                assert rest2 and rest2[-1].event == "done", rest2
                assert_final(rest2[-1], sid2, "cancelled")
            await producer.rest()
            await producer2.rest()
    assert stopping.calls == 1 and failing.calls == 1


async def test_many_joins_at_random_moments_each_get_exactly_their_part() -> None:
    """In-process: 40 followers join a 150-chunk stream at random moments with random positions."""
    n = 150
    recorder = MemoryRecorder(flush_interval=0.002)
    rng = random.Random(11)
    async with recorder:
        lab = Lab(recorder)
        feed = lab.feed("a", n)
        async with sse_client(lab.app, timeout=WAIT) as client, client.stream("GET", "/chat?feed=a") as producer:
            sid = producer.stream_id
            assert sid
            results: list[tuple[int, list[ServerSentEvent]]] = []

            async def follow(after: int) -> None:
                headers = {"last-event-id": f"{sid}:{after}"} if after else {}
                async with client.stream("GET", f"/streams/{sid}/events", headers=headers) as s:
                    assert s.status_code == 200
                    results.append((after, await s.collect()))

            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.collect)
                for _ in range(40):
                    step = rng.randint(0, 6)
                    feed.allow(step)
                    await feed.wait_sent(min(feed.allowed, n))
                    tg.start_soon(follow, rng.randint(0, feed.sent))
                feed.allow()
    assert len(results) == 40
    for after, events in results:
        assert_chunks(events[:-1], sid, after, n)
        assert_final(events[-1], sid)


# == 4. the streams app ==========================================================================
async def test_streams_app_lists_and_reads_records(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "s.db")
    async with recorder:
        lab = Lab(recorder)
        lab.feed("done1", 2, allowed=10)
        lab.feed("done2", 3, allowed=10)
        running_feed = lab.feed("live", 5, allowed=2)
        async with served(lab) as url:
            async with connect(f"{url}/chat?feed=done1&conv=c1") as w:
                await w.rest()
                done1 = w.sid
            async with connect(f"{url}/plain?feed=done2") as w:
                await w.rest()
                done2 = w.sid
            async with connect(f"{url}/chat?feed=live&conv=c1") as live:
                await live.take(2)
                sid = live.sid
                await recorder.flush()

                rows = (await http("GET", f"{url}/streams/")).json()
                assert [r["id"] for r in rows] == [sid, done2, done1]  # newest first
                row = rows[0]
                assert {"id", "status", "created_at", "completed_at", "chunk_count", "error", "key", "format",
                        "path", "method", "metadata", "preview"} <= row.keys()
                assert row["status"] == "streaming" and row["key"] == "c1" and row["path"] == "/chat"

                streaming = (await http("GET", f"{url}/streams/", params={"status": "streaming"})).json()
                assert [r["id"] for r in streaming] == [sid]
                keyed = (await http("GET", f"{url}/streams/", params={"key": "c1"})).json()
                assert [r["id"] for r in keyed] == [sid, done1]
                active = (await http("GET", f"{url}/streams/", params={"key": "c1", "status": "streaming"})).json()
                assert [r["id"] for r in active] == [sid]
                limited = (await http("GET", f"{url}/streams/", params={"limit": "1"})).json()
                assert [r["id"] for r in limited] == [sid]
                for bad in ({"limit": "0"}, {"limit": "x"}, {"status": "bogus"}):
                    assert (await http("GET", f"{url}/streams/", params=bad)).status_code == 400, bad

                now = (await http("GET", f"{url}/streams/{sid}")).json()
                assert now["status"] == "streaming" and now["content"] == text_of(2) and now["key"] == "c1"
                running_feed.allow()
                await live.rest()
            record = (await http("GET", f"{url}/streams/{sid}")).json()
            assert record["status"] == "completed"
            assert record["content"] == text_of(5)
            assert record["chunk_count"] == 5 and record["metadata"]["chunk_count"] == 5
            assert record["key"] == "c1" and record["format"] == "sse" and record["error"] is None
            plain = (await http("GET", f"{url}/streams/{done2}")).json()
            assert plain["key"] is None and plain["content"] == text_of(3)

            assert (await http("GET", f"{url}/streams/nosuch")).status_code == 404
            assert (await http("GET", f"{url}/streams/nosuch/events")).status_code == 404
            assert (await http("POST", f"{url}/streams/nosuch/cancel")).status_code == 404


def _refusing_sync(calls: list[tuple[str, str | None]]) -> Any:
    def hook(request: Request, action: str, stream_id: str | None) -> bool:
        calls.append((action, stream_id))
        return False

    return hook


def _refusing_async(calls: list[tuple[str, str | None]]) -> Any:
    async def hook(request: Request, action: str, stream_id: str | None) -> bool:
        await anyio.lowlevel.checkpoint()
        calls.append((action, stream_id))
        return False

    return hook


@pytest.mark.parametrize("make_hook", [_refusing_sync, _refusing_async], ids=["sync", "async"])
async def test_a_refusing_hook_is_403_everywhere_and_is_told_what_and_which(make_hook: Any) -> None:
    calls: list[tuple[str, str | None]] = []
    recorder = MemoryRecorder()
    lab = Lab(recorder, authorize=make_hook(calls))
    feed = lab.feed("a", 3, allowed=1)
    async with served(lab) as url, connect(f"{url}/chat?feed=a") as producer:
        await producer.take(1)
        sid = producer.sid
        assert (await http("GET", f"{url}/streams/")).status_code == 403
        assert (await http("GET", f"{url}/streams/{sid}")).status_code == 403
        assert (await http("GET", f"{url}/streams/{sid}/events")).status_code == 403
        assert (await http("POST", f"{url}/streams/{sid}/cancel")).status_code == 403
        assert (await http("GET", f"{url}/streams/nosuch")).status_code == 403  # refused before looking
        feed.allow()
        await producer.rest()
    assert calls == [("list", None), ("read", sid), ("follow", sid), ("cancel", sid), ("read", "nosuch")]
    await assert_recorded(recorder, sid, status="completed")  # the refused cancel stopped nothing


async def test_an_allowing_async_hook_lets_requests_through() -> None:
    seen: list[tuple[str, str]] = []

    async def hook(request: Request, action: str, stream_id: str | None) -> bool:
        seen.append((action, request.headers.get("authorization", "")))
        return request.headers.get("authorization") == "Bearer ok"

    lab = Lab(MemoryRecorder(), authorize=hook)
    lab.feed("a", 2, allowed=10)
    async with served(lab) as url:
        async with connect(f"{url}/chat?feed=a") as w:
            await w.rest()
            sid = w.sid
        good = {"authorization": "Bearer ok"}
        assert (await http("GET", f"{url}/streams/{sid}", headers=good)).status_code == 200
        assert (await http("GET", f"{url}/streams/{sid}", headers={"authorization": "no"})).status_code == 403
        async with connect(f"{url}/streams/{sid}/events", good) as wire:
            await read_joined(wire, sid, 0, 2)
    assert ("follow", "Bearer ok") in seen


async def _raw_asgi(app: ASGIApp, path: str, client: tuple[str, int] | None, method: str = "GET") -> int:
    """Call the app once with a hand-made scope (``client`` as given); its status code."""
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"example.test")], "client": client,
        "server": ("example.test", 80), "extensions": {},
    }
    sent: list[Message] = []
    asked = False

    async def receive() -> Message:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(WAIT):
        await app(scope, receive, send)
    return int(sent[0]["status"])


@pytest.mark.parametrize(("client", "allowed"), [
    (("10.0.0.1", 40000), False),
    (("192.168.1.20", 40000), False),
    (("2001:db8::1", 40000), False),
    (None, False),
    (("127.0.0.1", 40000), True),
    (("127.8.9.10", 40000), True),
    (("::1", 40000), True),
])
async def test_the_default_hook_lets_only_loopback_clients_in(client: tuple[str, int] | None, allowed: bool) -> None:
    recorder = MemoryRecorder()
    async with recorder:
        app = streams_app(recorder=recorder)
        assert await _raw_asgi(app, "/", client) == (200 if allowed else 403)
        assert await _raw_asgi(app, "/nosuch", client) == (404 if allowed else 403)
        assert await _raw_asgi(app, "/nosuch/cancel", client, "POST") == (404 if allowed else 403)


async def test_the_default_hook_through_the_testing_client() -> None:
    """The in-process client calls from 127.0.0.1: allowed; the same request from 10.0.0.1 is not."""
    recorder = MemoryRecorder()
    async with recorder:
        lab = Lab(recorder)
        lab.feed("a", 2, allowed=10)
        async with sse_client(lab.app) as client:
            events = await client.collect("/chat?feed=a")
            sid = json.loads(events[-1].text or "")["stream_id"]
            joined = await client.collect(f"/streams/{sid}/events")
            assert [e.text for e in joined[:-1]] == [word(0), word(1)]
            scope = client.build_scope("GET", f"/streams/{sid}/events")
            scope["client"] = ("10.0.0.1", 5555)
            sent: list[Message] = []

            async def receive() -> Message:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: Message) -> None:
                sent.append(message)

            with anyio.fail_after(WAIT):
                await lab.app(scope, receive, send)
            assert sent[0]["status"] == 403


# == 5. cancel ===================================================================================
async def test_cancel_by_request_stops_the_generation_promptly() -> None:
    recorder = MemoryRecorder()
    lab = Lab(recorder)
    feed = lab.feed("a", 1000, allowed=3)
    async with served(lab) as url, connect(f"{url}/chat?feed=a") as producer:
        await producer.take(3)
        sid = producer.sid
        answer = await http("POST", f"{url}/streams/{sid}/cancel")
        assert answer.status_code == 202
        assert answer.json()["cancelled"] is True
        with anyio.fail_after(1):  # the generator's finally runs within a second
            await feed.finally_ran.wait()
        events = await producer.rest()
        assert len(events) == 1, events
        assert_final(events[0], sid, "cancelled")
        record = await assert_recorded(recorder, sid, status="cancelled", content=text_of(3),
                                       metadata_includes={"cancelled_by": "request"})
        assert record.error is None
        again = await http("POST", f"{url}/streams/{sid}/cancel")
        assert again.status_code == 409
        assert again.json()["status"] == "cancelled"
    assert not feed.finished.is_set()


async def test_cancel_of_a_busy_generation_and_of_finished_or_unknown_streams() -> None:
    """A generation that never waits on anything but its own pace stops too; a finished
    stream is 409 (it keeps its status), an unknown one 404."""
    recorder = MemoryRecorder()
    lab = Lab(recorder)
    busy = lab.feed("busy", 10**6, allowed=10**6 + 1, pause=0.001)
    lab.feed("done", 2, allowed=10)
    async with served(lab) as url:
        async with connect(f"{url}/chat?feed=done") as w:
            await w.rest()
            finished = w.sid
        async with connect(f"{url}/chat?feed=busy") as producer:
            await producer.take(5)
            sid = producer.sid
            assert (await http("POST", f"{url}/streams/{sid}/cancel")).status_code == 202
            with anyio.fail_after(1):
                await busy.finally_ran.wait()
            events = await producer.rest()
            assert_final(events[-1], sid, "cancelled")
            assert_chunks(events[:-1], sid, 5, 5 + len(events) - 1)
        refused = await http("POST", f"{url}/streams/{finished}/cancel")
        assert refused.status_code == 409 and refused.json()["status"] == "completed"
        assert (await http("POST", f"{url}/streams/nosuch/cancel")).status_code == 404
    await assert_recorded(recorder, sid, status="cancelled", metadata_includes={"cancelled_by": "request"})
    await assert_recorded(recorder, finished, status="completed")


async def test_a_second_cancel_while_the_first_is_under_way_does_not_fail() -> None:
    lab = Lab(MemoryRecorder())
    feed = lab.feed("a", 100, allowed=1)
    async with served(lab) as url, connect(f"{url}/chat?feed=a") as producer:
        await producer.take(1)
        sid = producer.sid
        async with anyio.create_task_group() as tg:
            answers: list[int] = []

            async def cancel() -> None:
                answers.append((await http("POST", f"{url}/streams/{sid}/cancel")).status_code)

            tg.start_soon(cancel)
            tg.start_soon(cancel)
        assert sorted(answers) in ([202, 202], [202, 409]), answers
        events = await producer.rest()
        assert [e.event for e in events] == ["done"]
    assert feed.calls == 1


async def test_recorder_cancel_directly() -> None:
    recorder = MemoryRecorder()
    lab = Lab(recorder)
    feed = lab.feed("a", 100, allowed=2)
    async with recorder, sse_client(lab.app, timeout=WAIT) as client:
        async with client.stream("GET", "/chat?feed=a") as producer:
            events = []
            async for event in producer.events():
                events.append(event)
                if len(events) == 2:
                    break
            sid = producer.stream_id
            assert sid
            assert await recorder.cancel(sid) is True
            with anyio.fail_after(1):
                await feed.finally_ran.wait()
            rest = await producer.collect()
            assert_final(rest[-1], sid, "cancelled")
        assert await recorder.cancel(sid) is False  # over
        assert await recorder.cancel("nosuch") is False
    record = await assert_recorded(recorder, sid, status="cancelled", content=text_of(2),
                                   metadata_includes={"cancelled_by": "request"})
    assert record.chunk_count == 2


async def test_cancel_a_resumable_stream_whose_client_dropped() -> None:
    """The Stop button after a reload: the generation goes on without its client; a cancel stops it."""
    recorder = MemoryRecorder()
    lab = Lab(recorder)
    feed = lab.feed("a", 100, allowed=2)
    async with served(lab) as url:
        async with connect(f"{url}/chat?feed=a") as producer:
            await producer.take(2)
            sid = producer.sid
        feed.allow(3)
        await feed.wait_sent(5)  # it went on after the drop
        assert (await http("POST", f"{url}/streams/{sid}/cancel")).status_code == 202
        with anyio.fail_after(1):
            await feed.finally_ran.wait()
    record = await assert_recorded(recorder, sid, status="cancelled", content=text_of(5),
                                   metadata_includes={"cancelled_by": "request"})
    assert "client_disconnected_at_ms" in record.metadata


# == 6. keys =====================================================================================
async def test_keys_from_a_string_a_sync_and_an_async_callable(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "s.db")
    async with recorder:
        lab = Lab(recorder)
        for name in ("q", "j", "f", "p"):
            lab.feed(name, 2, allowed=10)
        async with served(lab) as url:
            sids = {}
            for name, path in (("q", "/chat?feed=q&conv=from-query"), ("f", "/chat-fixed?feed=f"),
                               ("p", "/conv/from-path/chat?feed=p")):
                async with connect(f"{url}{path}") as w:
                    await w.rest()
                    sids[name] = w.sid
            async with connect(f"{url}/chat-json?feed=j", method="POST", json_body={"conv": "from-body"}) as w:
                assert w.status == 200
                await read_joined(w, w.sid, 0, 2)
                sids["j"] = w.sid
    async with recorder:
        keys = {name: (await recorder.get(sid)).key for name, sid in sids.items()}  # type: ignore[union-attr]
    assert keys == {"q": "from-query", "f": "conv-fixed", "p": "from-path", "j": "from-body"}


async def test_list_streams_and_join_by_key_find_the_active_stream(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "s.db")
    async with recorder:
        lab = Lab(recorder)
        lab.feed("old", 2, allowed=10)
        feed = lab.feed("new", 6, allowed=3)
        async with served(lab) as url:
            async with connect(f"{url}/chat?feed=old&conv=c7") as w:
                await w.rest()
                old = w.sid
            # no active stream of the conversation: the AI SDK's resume route answers 204
            async with connect(f"{url}/api/chat/c7/stream") as w:
                assert w.status == 204
            async with connect(f"{url}/api/chat/nobody/stream") as w:
                assert w.status == 204
            async with connect(f"{url}/chat?feed=new&conv=c7") as producer:
                await producer.take(3)
                sid = producer.sid
                await recorder.flush()
                active = await recorder.list_streams(key="c7", status="streaming")
                assert [r.id for r in active] == [sid]
                assert [r.id for r in await recorder.list_streams(key="c7")] == [sid, old]
                assert await recorder.list_streams(key="c8") == []
                # the page reloaded mid-answer: join the conversation's stream from its start
                async with connect(f"{url}/api/chat/c7/stream") as follower:
                    assert follower.status == 200 and follower.sid == sid
                    assert_chunks(await follower.take(3), sid, 0, 3)
                    feed.allow()
                    await read_joined(follower, sid, 3, 6)
                await producer.rest()
            await recorder.flush()
            assert await recorder.list_streams(key="c7", status="streaming") == []
            async with connect(f"{url}/api/chat/c7/stream") as w:
                assert w.status == 204


async def test_join_by_key_finds_a_stream_produced_by_another_recorder(tmp_path: Path) -> None:
    """``join_response(key=...)`` for a stream this process does not run (the record only)."""
    db = tmp_path / "s.db"
    producer_rec, reader_rec = SQLiteRecorder(db, flush_interval=0.01), SQLiteRecorder(db)
    async with producer_rec, reader_rec:
        lab = Lab(producer_rec)
        feed = lab.feed("a", 4, allowed=2)
        reader = Lab(reader_rec)
        async with served(lab) as url, served(reader) as url2, connect(f"{url}/chat?feed=a&conv=k1") as producer:
            await producer.take(2)
            await producer_rec.flush()
            async with connect(f"{url2}/api/chat/k1/stream") as follower:
                assert follower.status == 200
                assert_chunks(await follower.take(2), producer.sid, 0, 2)
                feed.allow()
                await read_joined(follower, producer.sid, 2, 4)
            await producer.rest()


# == 7. recorder.follow ============================================================================
async def test_an_in_process_follower_gets_each_chunk_as_sent_with_nothing_flushed(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "s.db", flush_interval=10)
    async with recorder:
        lab = Lab(recorder)
        n = 6
        feed = lab.feed("a", n)
        got_tx, got_rx = anyio.create_memory_object_stream[Any](100)
        async with sse_client(lab.app, timeout=WAIT) as client, client.stream("GET", "/chat?feed=a") as producer:
            sid = producer.stream_id
            assert sid
            follow = recorder.follow(sid)

            async def follower() -> None:
                async with got_tx:
                    async for chunk in follow:
                        await got_tx.send(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.collect)
                tg.start_soon(follower)
                for i in range(n):
                    feed.allow(1)
                    with anyio.fail_after(WAIT):
                        chunk = await got_rx.receive()
                    assert (chunk.seq, chunk.data, chunk.event) == (i + 1, word(i), None)
                    assert chunk.stream_id == sid
                    # fed from memory: nothing of the stream is in the database yet
                    assert await recorder.backend.chunks(sid) == []
                    assert await recorder.backend.get(sid) is None
                feed.allow()
                with anyio.fail_after(WAIT):
                    assert [c async for c in got_rx] == []
        assert follow.status is StreamStatus.COMPLETED and follow.error is None
        assert follow.last == n


async def test_a_slow_follower_does_not_slow_the_producer_and_misses_nothing(tmp_path: Path) -> None:
    recorder = SQLiteRecorder(tmp_path / "s.db", flush_interval=0.02)
    n = 300
    async with recorder:
        lab = Lab(recorder)
        feed = lab.feed("a", n, allowed=1)
        async with sse_client(lab.app, timeout=WAIT) as client, client.stream("GET", "/chat?feed=a") as producer:
            sid = producer.stream_id
            assert sid
            follow = recorder.follow(sid, buffer=5)
            chunks = aiter(follow)
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.collect)
                with anyio.fail_after(WAIT):
                    first = await anext(chunks)
                assert first.seq == 1
                # the follower reads nothing now; the producer's client gets the whole stream meanwhile
                feed.allow()
                with anyio.fail_after(WAIT):
                    await feed.finally_ran.wait()
            assert len([e for e in producer.received if e.event is None]) == n
            assert producer.received[-1].event == "done"
            with anyio.fail_after(WAIT):
                rest = [c async for c in chunks]
        seqs = [first.seq, *(c.seq for c in rest)]
        assert seqs == list(range(1, n + 1))
        assert "".join([first.data, *(c.data for c in rest)]) == text_of(n)
        assert follow.status is StreamStatus.COMPLETED


async def test_a_lagging_follower_catches_up_while_the_stream_still_runs() -> None:
    recorder = MemoryRecorder(flush_interval=10)
    async with recorder:
        lab = Lab(recorder)
        n = 40
        feed = lab.feed("a", n, allowed=1)
        async with sse_client(lab.app, timeout=WAIT) as client, client.stream("GET", "/chat?feed=a") as producer:
            sid = producer.stream_id
            assert sid
            chunks = aiter(recorder.follow(sid, buffer=3))
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.collect)
                seqs = [(await anext(chunks)).seq]
                feed.allow(20)
                await feed.wait_sent(21)  # 20 more than its buffer holds, none stored (flush_interval=10)
                for _ in range(20):
                    with anyio.fail_after(WAIT):
                        seqs.append((await anext(chunks)).seq)
                feed.allow()
                with anyio.fail_after(WAIT):
                    seqs += [c.seq async for c in chunks]
        assert seqs == list(range(1, n + 1))


async def test_two_hundred_followers_get_the_whole_text() -> None:
    recorder = MemoryRecorder()
    n = 50
    async with recorder:
        lab = Lab(recorder)
        feed = lab.feed("a", n, allowed=5)
        async with sse_client(lab.app, timeout=WAIT) as client, client.stream("GET", "/chat?feed=a") as producer:
            sid = producer.stream_id
            assert sid
            texts: list[str] = []
            joined: list[list[ServerSentEvent]] = []

            async def follower(after: int) -> None:
                parts = [c.data async for c in recorder.follow(sid, after)]
                texts.append(text_of(after) + "".join(parts))

            async def http_follower() -> None:
                async with client.stream("GET", f"/streams/{sid}/events") as s:
                    joined.append(await s.collect())

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(producer.collect)
                    await feed.wait_sent(5)
                    for i in range(150):
                        tg.start_soon(follower, i % 6)
                    for _ in range(50):
                        tg.start_soon(http_follower)
                    await anyio.sleep(0.05)
                    feed.allow()
    assert len(texts) == 150 and set(texts) == {text_of(n)}
    assert len(joined) == 50
    for events in joined:
        assert_chunks(events[:-1], sid, 0, n)
        assert_final(events[-1], sid)


async def test_follow_of_an_unknown_or_finished_stream() -> None:
    recorder = MemoryRecorder()
    async with recorder:
        lab = Lab(recorder)
        lab.feed("a", 3, allowed=10, fail_at=2)
        async with sse_client(lab.app, timeout=WAIT) as client:
            events = await client.collect("/chat?feed=a")
        sid = json.loads(events[-1].text or "")["stream_id"]
        with pytest.raises(LookupError):
            [c async for c in recorder.follow("nosuch")]
        follow = recorder.follow(sid, 1)
        assert [c.seq async for c in follow] == [2]
        assert follow.status is StreamStatus.FAILED and follow.error
        with pytest.raises(ValueError):
            recorder.follow(sid, -1)


async def test_a_follower_that_hangs_up_is_noticed() -> None:
    """A streams-app follower whose socket closes while the stream is idle: its join ends (it
    stops following), and the server keeps serving others."""
    recorder = MemoryRecorder()
    lab = Lab(recorder)
    feed = lab.feed("a", 10, allowed=2)
    async with served(lab) as url, connect(f"{url}/chat?feed=a") as producer:
        await producer.take(2)
        sid = producer.sid
        live = recorder.live.streams[sid]
        for _ in range(3):
            async with connect(f"{url}/streams/{sid}/events") as follower:
                await follower.take(2)
                assert len(live.followers) == 1
            # the stream is idle (the feed holds): only the join's disconnect watch can notice
            with anyio.fail_after(5):
                while live.followers:  # noqa: ASYNC110 - the hub exposes a list
                    await anyio.sleep(0.01)
        async with connect(f"{url}/streams/{sid}/events") as follower:
            feed.allow()
            await read_joined(follower, sid, 0, 10)
        await producer.rest()


async def test_a_follower_that_hangs_up_under_the_middleware_is_untracked() -> None:
    recorder = MemoryRecorder()
    lab = Lab(recorder, middleware=True)
    mw = lab.app
    assert isinstance(mw, StreamRecorderMiddleware)
    feed = lab.feed("a", 10, allowed=2)
    async with served(lab) as url, connect(f"{url}/chat?feed=a") as producer:
        await producer.take(2)
        sid = producer.sid
        with anyio.fail_after(5):
            while len(mw._active) != 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        async with connect(f"{url}/streams/{sid}/events") as follower:
            await follower.take(2)
        with anyio.fail_after(5):
            while len(mw._active) != 1 or recorder.live.streams[sid].followers:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        feed.allow()
        await producer.rest()
    await wait_recorded(recorder, sid)


async def test_a_follower_of_another_recorder_does_not_run_recovery_at_every_change(tmp_path: Path) -> None:
    """A follower of a stream produced elsewhere (here: another recorder on the same file) makes
    its recorder sweep expired leases about every ``lease / 3``: not at every chunk batch
    (a sweep may write on the shared database, competing with the producers' writes)."""
    db = tmp_path / "s.db"
    producing, following = SQLiteRecorder(db), SQLiteRecorder(db, lease=3.0)
    recoveries = 0
    recover = following.backend.recover

    async def counted(stale_before: float) -> int:
        nonlocal recoveries
        recoveries += 1
        return await recover(stale_before)

    following.backend.recover = counted  # type: ignore[method-assign]
    n = 100
    async with producing, following:
        lab = Lab(producing)
        feed = lab.feed("a", n, allowed=1, pause=0.01)
        async with sse_client(lab.app, timeout=WAIT) as client, client.stream("GET", "/chat?feed=a") as producer:
            sid = producer.stream_id
            assert sid
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.collect)
                await feed.wait_sent(1)
                await producing.flush()
                started = anyio.current_time()
                feed.allow()
                with anyio.fail_after(WAIT):
                    seqs = [c.seq async for c in following.follow(sid)]
                elapsed = anyio.current_time() - started
    assert seqs == list(range(1, n + 1))
    assert recoveries <= 2 + elapsed / 0.8, f"{recoveries} sweeps while following for {elapsed:.2f}s"


async def test_listing_by_key_finds_a_stream_begun_here_before_its_first_flush(tmp_path: Path) -> None:
    """A reloaded chat page asks for its conversation's active stream at once: a stream this
    process began a moment ago is listed even though the writer has not flushed it yet."""
    recorder = SQLiteRecorder(tmp_path / "streams.db", flush_interval=10)
    release = anyio.Event()

    @recorded_stream(recorder=recorder, key="conv-1")
    async def chat(request: Request) -> AsyncIterator[str]:
        yield "first"
        await release.wait()

    app = Starlette(routes=[Route("/chat", chat), Mount("/streams", streams_app(recorder=recorder))])
    async with recorder, serve(app) as url, httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(client, "GET", f"{url}/chat") as source:
            sid = source.response.headers["x-stream-id"]
            async for _ in source.aiter_sse():
                break
            listed = (await client.get(f"{url}/streams/", params={"key": "conv-1", "status": "streaming"})).json()
            release.set()
    assert [row["id"] for row in listed] == [sid]
