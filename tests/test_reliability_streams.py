"""Reliability regressions: the life of a stream and the middleware around it.

* ``on_disconnect="continue"`` keeps the generator in one task, so cancel scopes, task
  groups and ``asyncio.timeout`` held across ``yield`` survive the client's hang-up, and a
  response's Starlette ``background`` task still runs;
* statuses that must not lie (one place decides, from facts in a fixed order);
* the middleware's background places (``max_background``) are taken and given back exactly once;
* no task group per ordinary request (an app's error reaches outer middleware unwrapped);
* ``record_all_sse`` does not swallow an app's error;
* HEAD on a decorated route and ``stream_app``'s methods;
* an unsendable item ends the stream FAILED, logged.

Where a disconnect matters, a real server (uvicorn on asyncio, hypercorn on trio) and a real
httpx client that closes its socket; elsewhere the in-process testing client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_stream_recorder import (
    MemoryRecorder,
    RecordedStreamResponse,
    StreamRecord,
    StreamRecorderMiddleware,
    StreamStatus,
    recorded_stream,
    stream_app,
)
from asgi_stream_recorder.response import WireFormat
from asgi_stream_recorder.testing import sse_client, wait_recorded

from .servers import serve

pytestmark = pytest.mark.anyio

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])
with_and_without_middleware = pytest.mark.parametrize("middleware", [True, False], ids=["middleware", "bare"])

ERROR_FORMAT = re.compile(r"^[A-Za-z_][\w.]*: \S")  # "ExcType: message"


# -- helpers --------------------------------------------------------------------------------------
def done_of(events: list[Any]) -> dict[str, Any]:
    """The data of a completed stream's last event, ``event: done`` (which has no ``id``)."""
    assert events, "no events"
    assert (events[-1].event, events[-1].id) == ("done", None), events[-3:]
    done = json.loads(events[-1].text)
    assert isinstance(done, dict) and done.get("status") == "completed", done
    return done


def tokens(n: int, start: int = 0) -> list[str]:
    return [f"t{i} " for i in range(start, start + n)]


async def read_then_hang_up(url: str, n: int, headers: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Read ``n`` data events with a real client, then close its connection; the stream id and what was read."""
    received: list[str] = []
    async with (
        httpx.AsyncClient(timeout=10) as client,
        aconnect_sse(client, "GET", url, headers=dict(headers or {})) as source,
    ):
        assert source.response.status_code == 200, source.response.status_code
        stream_id = source.response.headers["x-stream-id"]
        async for event in source.aiter_sse():
            received.append(event.data)
            if len(received) == n:
                break  # leaving the blocks closes the socket mid-stream
    return stream_id, received


async def chunk_data(recorder: MemoryRecorder, stream_id: str) -> list[str]:
    return [c.data for c in await recorder.chunks(stream_id)]


def error_logs(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    """ERROR records of the library's loggers whose message or exception mentions ``needle``."""
    found = []
    for r in caplog.records:
        if r.levelno < logging.ERROR or not r.name.startswith("asgi_stream_recorder"):
            continue
        text = r.getMessage()
        if r.exc_info and r.exc_info[1] is not None:
            text += f" {type(r.exc_info[1]).__name__}: {r.exc_info[1]}"
        if needle in text:
            found.append(r)
    return found


def assert_failed_and_logged_once(record: StreamRecord, caplog: pytest.LogCaptureFixture) -> str:
    """FAILED with an "ExcType: message" error, logged at ERROR exactly once; the exception's type name."""
    assert record.status is StreamStatus.FAILED, record
    assert record.error is not None and ERROR_FORMAT.match(record.error), record.error
    exc_type = record.error.split(":", 1)[0]
    logged = error_logs(caplog, exc_type)
    assert len(logged) == 1, (
        f"expected the failure ({record.error!r}) logged at ERROR once, got {len(logged)}: "
        f"{[(r.name, r.levelname, r.getMessage()) for r in caplog.records]}"
    )
    return exc_type


class Holder:
    """Lets a generator reach the middleware instance that wraps its own app."""

    mw: StreamRecorderMiddleware | None = None

    def shutdown(self) -> None:
        assert self.mw is not None
        self.mw.begin_shutdown()


class SendFailsOnceGone:
    """A thin layer between the server and the app that behaves like an ASGI 2.4 server: once
    the client is gone, the app's ``send`` raises ``OSError`` (uvicorn and hypercorn just drop
    the bytes). Request headers shape it: ``x-disconnect-delay`` (seconds, default 0): the app's
    ``receive`` reports ``http.disconnect`` that long after the server did (0: at once, before
    sends start failing); ``x-send-latency`` (seconds, default 0): each body ``send`` takes that
    long (a slow network), and fails if the client leaves meanwhile. The bodies of the sends
    that failed are kept per ``x-tag`` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.failed_sends: dict[str, list[bytes]] = defaultdict(list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        delay = float(headers.get("x-disconnect-delay", "0"))
        latency = float(headers.get("x-send-latency", "0"))
        tag = headers.get("x-tag", "")
        gone = anyio.Event()
        to_app, from_server = anyio.create_memory_object_stream[Message](math.inf)

        async def relay() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if delay > 0:
                        gone.set()
                        await anyio.sleep(delay)
                        to_app.send_nowait(message)
                    else:  # the app's receive first, then its send in flight
                        to_app.send_nowait(message)
                        gone.set()
                    return
                to_app.send_nowait(message)

        async def app_send(message: Message) -> None:
            if latency and message["type"] == "http.response.body":
                with anyio.move_on_after(latency):
                    await gone.wait()
            if gone.is_set():
                self.failed_sends[tag].append(bytes(message.get("body", b"")))
                raise OSError("the client has gone")
            await send(message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(relay)
            try:
                await self.app(scope, from_server.receive, app_send)
            finally:
                tg.cancel_scope.cancel()


# -- 1. on_disconnect="continue" keeps the generator in one task ---------------------------------------
HELD_KINDS = ["fail_after", "task_group"]


async def _continue_with_held_context(held: str, middleware: bool) -> None:
    recorder = MemoryRecorder()
    gate = anyio.Event()
    ended = anyio.Event()
    child_ran: list[bool] = []
    timed_out: list[bool] = []

    async def source() -> AsyncIterator[str]:
        """3 tokens, wait for the gate (the client leaves meanwhile), 7 more, all inside the held context."""
        for t in tokens(3):
            yield t
        await gate.wait()
        for t in tokens(7, start=3):
            yield t
            await anyio.sleep(0.01)

    @recorded_stream(recorder=recorder, on_disconnect="continue", ping=None)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        if held == "fail_after":
            with anyio.fail_after(30):
                async for t in source():
                    yield t
        elif held == "task_group":
            async def child() -> None:
                await gate.wait()
                child_ran.append(True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(child)
                async for t in source():
                    yield t
        elif sys.version_info >= (3, 11):  # asyncio.timeout
            try:
                async with asyncio.timeout(30) as timeout:
                    async for t in source():
                        yield t
                    # the deadline now falls on the generator's task: if it is not the one that
                    # entered the block, the wrong task is cancelled and this sleep never ends
                    timeout.reschedule(asyncio.get_running_loop().time() + 0.05)
                    await asyncio.sleep(30)
            except TimeoutError:
                timed_out.append(True)
        else:
            raise AssertionError(held)
        ended.set()

    app: ASGIApp = Starlette(routes=[Route("/s", endpoint)])
    if middleware:
        app = StreamRecorderMiddleware(app, recorder=recorder, handle_signals=False, shutdown_timeout=3)
    async with recorder if not middleware else nullcontext(), serve(app) as url:
        stream_id, received = await read_then_hang_up(f"{url}/s", 3)
        await anyio.sleep(0.2)  # let the server notice the hang-up before the generator goes on
        gate.set()
        record = await wait_recorded(recorder, stream_id)
        stored = await chunk_data(recorder, stream_id)
    assert ended.is_set(), f"the generator did not run to its end: {record}"
    assert received == tokens(3)
    assert record.status is StreamStatus.COMPLETED, record
    assert record.error is None, record.error
    assert stored == tokens(10), stored
    assert record.chunk_count == 10
    assert "client_disconnected_at_ms" in record.metadata, "the hang-up was not noticed: the test proves nothing"
    if held == "task_group":
        assert child_ran == [True]
    if held == "asyncio_timeout":
        assert timed_out == [True]


@with_and_without_middleware
@pytest.mark.parametrize("held", HELD_KINDS)
async def test_continue_generator_holding_a_context_across_yields_completes_after_the_client_left(
    held: str, middleware: bool
) -> None:
    await _continue_with_held_context(held, middleware)


if sys.version_info >= (3, 11):  # asyncio.timeout is new in 3.11 (defined, not skipped, so CI runs stay skip-free)

    @asyncio_only
    @with_and_without_middleware
    async def test_continue_generator_holding_asyncio_timeout_across_yields_completes_after_the_client_left(
        middleware: bool,
    ) -> None:
        await _continue_with_held_context("asyncio_timeout", middleware)


@with_and_without_middleware
@pytest.mark.parametrize("on_disconnect", ["continue", "cancel"])
async def test_background_task_of_a_response_runs_when_its_client_left(middleware: bool, on_disconnect: str) -> None:
    recorder = MemoryRecorder()
    gate = anyio.Event()
    background_ran = anyio.Event()

    async def source() -> AsyncIterator[str]:
        for t in tokens(2):
            yield t
        await gate.wait()  # "cancel": cancelled here; "continue": goes on once the test opens the gate
        yield "last"

    async def endpoint(request: Request) -> RecordedStreamResponse:
        return RecordedStreamResponse(
            source(),
            recorder=recorder,
            on_disconnect=on_disconnect,  # type: ignore[arg-type]
            ping=None,
            background=BackgroundTask(background_ran.set),
        )

    app: ASGIApp = Starlette(routes=[Route("/s", endpoint)])
    if middleware:
        app = StreamRecorderMiddleware(app, recorder=recorder, handle_signals=False, shutdown_timeout=3)
    async with recorder if not middleware else nullcontext(), serve(app) as url:
        stream_id, _ = await read_then_hang_up(f"{url}/s", 2)
        await anyio.sleep(0.2)
        gate.set()
        record = await wait_recorded(recorder, stream_id)
        with anyio.fail_after(5):
            await background_ran.wait()
    expected = StreamStatus.COMPLETED if on_disconnect == "continue" else StreamStatus.CANCELLED
    assert record.status is expected, record


# -- 2. statuses that must not lie --------------------------------------------------------------------
async def test_lone_surrogate_fails_the_stream_tells_the_client_and_later_streams_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, ping=None)
    async def bad(request: Request) -> AsyncIterator[str]:
        yield "ok"
        yield "\ud83d"  # cannot be encoded as UTF-8
        yield "never"

    @recorded_stream(recorder=recorder, ping=None)
    async def good(request: Request) -> AsyncIterator[str]:
        yield "fine"
        yield "\U0001f600"

    app = Starlette(routes=[Route("/bad", bad), Route("/good", good)])
    async with recorder, sse_client(app, raise_app_exceptions=False, timeout=5) as client:
        async with client.stream("GET", "/bad") as s:
            events = await s.collect()
            bad_id, bad_body_ended = s.stream_id, s.complete
        async with client.stream("GET", "/good") as s:
            good_events = await s.collect()
            good_id = s.stream_id
        assert bad_id and good_id
        record = await wait_recorded(recorder, bad_id)
        stored = await chunk_data(recorder, bad_id)
        good_record = await wait_recorded(recorder, good_id)
    assert_failed_and_logged_once(record, caplog)
    assert record.error is not None
    assert "surrogate" in record.error.lower() or "ud83d" in record.error.lower(), record.error
    assert stored == ["ok"]
    assert [e.data for e in events if (e.event or "message") == "message"] == ["ok"]
    assert events[-1].event == "error", events
    assert bad_body_ended, "the failed stream's body was not ended"
    assert good_record.status is StreamStatus.COMPLETED, good_record
    assert [e.data for e in good_events if e.event != "done"] == ["fine", "\U0001f600"]
    assert done_of(good_events) == {"stream_id": good_id, "status": "completed"}


def send_raises_on_body(app: ASGIApp, n: int, exc: Callable[[], BaseException]) -> ASGIApp:
    """The app behind a send that raises ``exc()`` on the ``n``-th body message."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        count = 0

        async def failing_send(message: Message) -> None:
            nonlocal count
            if message["type"] == "http.response.body":
                count += 1
                if count == n:
                    raise exc()
            await send(message)

        await app(scope, receive, failing_send if scope["type"] == "http" else send)

    return wrapped


async def test_send_raising_runtime_error_fails_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, ping=None)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        for t in tokens(5):
            yield t

    app = send_raises_on_body(Starlette(routes=[Route("/s", endpoint)]), 3,
                              lambda: RuntimeError("the send exploded"))
    async with recorder, sse_client(app, raise_app_exceptions=False, timeout=5) as client:
        async with client.stream("GET", "/s") as s:
            await s.collect()
            stream_id = s.stream_id
        assert stream_id
        record = await wait_recorded(recorder, stream_id)
        stored = await chunk_data(recorder, stream_id)
    assert_failed_and_logged_once(record, caplog)
    assert record.error is not None and record.error.startswith("RuntimeError: the send exploded"), record.error
    assert stored in (tokens(2), tokens(3)), stored  # the failed third send may or may not be counted


class ExplodingFormat(WireFormat):
    """A custom wire format whose second chunk cannot be produced."""

    def __init__(self) -> None:
        self.calls = 0

    def chunk(self, *args: Any, **kwargs: Any) -> bytes:
        self.calls += 1
        if self.calls == 2:
            raise ValueError("the format exploded")
        return super().chunk(*args, **kwargs)


async def test_custom_wire_format_raising_fails_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, ping=None, format=ExplodingFormat())
    async def endpoint(request: Request) -> AsyncIterator[str]:
        for t in tokens(4):
            yield t

    app = Starlette(routes=[Route("/s", endpoint)])
    async with recorder, sse_client(app, raise_app_exceptions=False, timeout=5) as client:
        async with client.stream("GET", "/s") as s:
            events = await s.collect()
            stream_id = s.stream_id
        assert stream_id
        record = await wait_recorded(recorder, stream_id)
        stored = await chunk_data(recorder, stream_id)
    assert_failed_and_logged_once(record, caplog)
    assert record.error is not None and record.error.startswith("ValueError: the format exploded"), record.error
    assert stored == tokens(1)
    assert [e.data for e in events][:1] == tokens(1)


async def test_shutdown_right_after_the_last_token_is_completed() -> None:
    recorder = MemoryRecorder()
    holder = Holder()

    @recorded_stream(recorder=recorder, ping=None)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        for t in tokens(3):
            yield t
        holder.shutdown()  # the server goes away the instant the source ends

    holder.mw = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder,
                                         handle_signals=False, shutdown_timeout=3)
    async with serve(holder.mw) as url:
        async with httpx.AsyncClient(timeout=10) as client, aconnect_sse(client, "GET", f"{url}/s") as source:
            stream_id = source.response.headers["x-stream-id"]
            received = [e.data async for e in source.aiter_sse() if e.event == "message"]
        record = await wait_recorded(recorder, stream_id)
        stored = await chunk_data(recorder, stream_id)
    assert received == tokens(3)
    assert record.status is StreamStatus.COMPLETED, record
    assert record.error is None
    assert stored == tokens(3)


async def test_client_left_then_shutdown_during_cleanup_is_cancelled() -> None:
    recorder = MemoryRecorder()
    holder = Holder()
    cleaning = anyio.Event()
    release = anyio.Event()

    @recorded_stream(recorder=recorder, ping=None)  # on_disconnect="cancel"
    async def endpoint(request: Request) -> AsyncIterator[str]:
        try:
            for t in tokens(3):
                yield t
            await anyio.sleep_forever()  # the client hangs up here
        finally:
            with anyio.CancelScope(shield=True):
                cleaning.set()
                with anyio.move_on_after(5):
                    await release.wait()  # the shutdown comes while we clean up

    holder.mw = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder,
                                         handle_signals=False, shutdown_timeout=3)
    async with serve(holder.mw) as url:
        stream_id, received = await read_then_hang_up(f"{url}/s", 3)
        with anyio.fail_after(5):
            await cleaning.wait()
        holder.shutdown()
        await anyio.sleep(0.05)
        release.set()
        record = await wait_recorded(recorder, stream_id)
        stored = await chunk_data(recorder, stream_id)
    assert received == tokens(3)
    assert record.status is StreamStatus.CANCELLED, record
    assert record.error is None
    assert stored == tokens(3)


async def test_continue_stream_whose_client_left_then_shutdown_is_interrupted() -> None:
    recorder = MemoryRecorder()
    holder = Holder()

    @recorded_stream(recorder=recorder, ping=None, on_disconnect="continue")
    async def endpoint(request: Request) -> AsyncIterator[str]:
        for t in tokens(3):
            yield t
        await anyio.sleep_forever()  # runs on without its client until the shutdown

    holder.mw = StreamRecorderMiddleware(Starlette(routes=[Route("/s", endpoint)]), recorder=recorder,
                                         handle_signals=False, shutdown_timeout=3)
    async with serve(holder.mw) as url:
        stream_id, _ = await read_then_hang_up(f"{url}/s", 3)
        await anyio.sleep(0.2)  # the server notices the hang-up; the stream goes on
        holder.shutdown()
        record = await wait_recorded(recorder, stream_id)
        stored = await chunk_data(recorder, stream_id)
    assert record.status is StreamStatus.INTERRUPTED, record
    assert "client_disconnected_at_ms" in record.metadata, "the hang-up was not noticed: the test proves nothing"
    assert "continue_refused" not in record.metadata
    assert stored == tokens(3)


# -- 3. background places ------------------------------------------------------------------------------
def background_app(recorder: MemoryRecorder) -> tuple[SendFailsOnceGone, dict[str, anyio.Event]]:
    """``/gated?key=K``: 1 token, wait for gate K, 2 more. ``/busy``: 20 tokens, no pause between them.
    ``/idle``: 1 token, 0.4 s of silence (pinged every 50 ms), 2 more. All ``continue``, max_background=1."""
    gates: dict[str, anyio.Event] = defaultdict(anyio.Event)

    @recorded_stream(recorder=recorder, on_disconnect="continue", ping=None)
    async def gated(request: Request) -> AsyncIterator[str]:
        yield "g0"
        await gates[request.query_params["key"]].wait()
        yield "g1"
        yield "g2"

    @recorded_stream(recorder=recorder, on_disconnect="continue", ping=None)
    async def busy(request: Request) -> AsyncIterator[str]:
        for t in tokens(20):  # never idle: a send is in flight whenever the client leaves
            yield t

    @recorded_stream(recorder=recorder, on_disconnect="continue", ping=0.05)
    async def idle(request: Request) -> AsyncIterator[str]:
        yield "i0"
        await anyio.sleep(0.4)
        yield "i1"
        yield "i2"

    app = Starlette(routes=[Route("/gated", gated), Route("/busy", busy), Route("/idle", idle)])
    mw = StreamRecorderMiddleware(app, recorder=recorder, max_background=1, handle_signals=False, shutdown_timeout=3)
    return SendFailsOnceGone(mw), gates


async def assert_limit_of_one_holds(url: str, recorder: MemoryRecorder, gates: dict[str, anyio.Event],
                                    round_: str) -> None:
    """Two streams abandoned at once with max_background=1: one goes on, the other is cancelled, saying why."""
    keys = [f"{round_}-a", f"{round_}-b"]
    ids: dict[str, str] = {}

    async def abandon(key: str) -> None:
        ids[key], _ = await read_then_hang_up(f"{url}/gated?key={key}", 1)

    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(abandon, key)
    await anyio.sleep(0.3)  # both hang-ups noticed while both generators wait
    for key in keys:
        gates[key].set()
    records = [await wait_recorded(recorder, ids[key]) for key in keys]
    by_status = sorted(records, key=lambda r: r.status.value)
    statuses = [r.status for r in by_status]
    assert statuses == [StreamStatus.CANCELLED, StreamStatus.COMPLETED], (
        f"with max_background=1, two abandoned streams: {[(r.status.value, r.metadata) for r in records]}"
    )
    cancelled, completed = by_status
    assert "continue_refused" in cancelled.metadata, cancelled
    assert "continue_refused" not in completed.metadata, completed
    assert await chunk_data(recorder, completed.id) == ["g0", "g1", "g2"]
    assert await chunk_data(recorder, cancelled.id) == ["g0"]


@pytest.mark.parametrize("noticed_by", ["watch", "watch_and_send"])
async def test_background_places_are_given_back_after_every_stream(noticed_by: str) -> None:
    recorder = MemoryRecorder()
    app, gates = background_app(recorder)
    async with serve(app) as url:
        for i in range(10):
            tag = f"{noticed_by}-{i}"
            if noticed_by == "watch":  # the generator is quiet when the client leaves: only the watch sees it
                stream_id, received = await read_then_hang_up(f"{url}/gated?key={tag}", 1)
                await anyio.sleep(0.1)
                gates[tag].set()
                expected = ["g0", "g1", "g2"]
            else:  # the watch hears of it, and the send in flight at that moment fails
                stream_id, received = await read_then_hang_up(
                    f"{url}/busy", 3, headers={"x-send-latency": "0.015", "x-tag": tag})
                expected = tokens(20)
            assert received == expected[: len(received)]
            record = await wait_recorded(recorder, stream_id)
            assert record.status is StreamStatus.COMPLETED, f"stream {i}: {record}"
            assert "continue_refused" not in record.metadata, f"stream {i}: {record.metadata}"
            assert await chunk_data(recorder, stream_id) == expected, f"stream {i}"
            if noticed_by == "watch_and_send":
                assert app.failed_sends[tag], f"stream {i}: no send failed, the test proves nothing"
        await assert_limit_of_one_holds(url, recorder, gates, noticed_by)


async def test_hang_up_first_noticed_by_a_failed_ping_takes_and_gives_back_one_place() -> None:
    recorder = MemoryRecorder()
    app, gates = background_app(recorder)
    async with serve(app) as url:
        # the app hears of the hang-up (receive) only after the stream ended: a ping fails first
        stream_id, received = await read_then_hang_up(f"{url}/idle", 1,
                                                      headers={"x-disconnect-delay": "5", "x-tag": "idle"})
        record = await wait_recorded(recorder, stream_id)
        assert received == ["i0"]
        assert app.failed_sends["idle"], "no send failed after the hang-up: the test proves nothing"
        assert app.failed_sends["idle"][0].startswith(b":"), f"not a ping noticed it: {app.failed_sends['idle']}"
        assert record.status is StreamStatus.COMPLETED, record
        assert await chunk_data(recorder, stream_id) == ["i0", "i1", "i2"]
        await assert_limit_of_one_holds(url, recorder, gates, "after-ping")


# -- 4. no task group per ordinary request -------------------------------------------------------------
@pytest.mark.parametrize("accept", ["text/event-stream", "application/json"])
async def test_app_error_on_an_ordinary_route_reaches_outer_middleware_unwrapped(accept: str) -> None:
    async def boom(request: Request) -> PlainTextResponse:
        raise ValueError("boom")

    async def fine(request: Request) -> PlainTextResponse:
        return PlainTextResponse("fine")

    recorder = MemoryRecorder()
    inner = StreamRecorderMiddleware(Starlette(routes=[Route("/boom", boom), Route("/fine", fine)]),
                                     recorder=recorder, handle_signals=False, shutdown_timeout=3)
    seen: list[BaseException] = []

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await inner(scope, receive, send)
        except BaseException as exc:
            seen.append(exc)
            if scope["type"] != "http":
                raise

    async with sse_client(outer, lifespan=True, raise_app_exceptions=False, timeout=5) as client:
        async with client.stream("GET", "/boom", headers={"accept": accept}) as s:
            assert s.status_code == 500
            await s.read()
        async with client.stream("GET", "/fine", headers={"accept": accept}) as s:
            assert s.status_code == 200
            assert await s.read() == b"fine"
    assert len(seen) == 1, seen
    assert type(seen[0]) is ValueError, f"outer middleware got {seen[0]!r}, not the app's ValueError"
    assert str(seen[0]) == "boom"


# -- 5. record_all_sse does not swallow the app's error ---------------------------------------------------
async def test_record_all_sse_app_error_is_recorded_logged_reraised_and_ends_the_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        yield b"data: two\n\n"
        await anyio.sleep(0.05)
        raise RuntimeError("the app exploded")

    async def sse(request: Request) -> StreamingResponse:
        return StreamingResponse(body(), media_type="text/event-stream")

    recorder = MemoryRecorder()
    inner = StreamRecorderMiddleware(Starlette(routes=[Route("/s", sse)]), recorder=recorder, record_all_sse=True,
                                     ping=None, handle_signals=False, shutdown_timeout=3)
    seen: list[BaseException] = []
    app_returned = anyio.Event()

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await inner(scope, receive, send)
        except BaseException as exc:
            seen.append(exc)
            if scope["type"] != "http":
                raise
        finally:
            if scope["type"] == "http":
                app_returned.set()

    async with serve(outer) as url:
        async with httpx.AsyncClient(timeout=10) as client, aconnect_sse(client, "GET", f"{url}/s") as source:
            stream_id = source.response.headers["x-stream-id"]
            events = [(e.event, e.data) async for e in source.aiter_sse()]  # a protocol error would raise here
        with anyio.fail_after(5):
            await app_returned.wait()
        record = await wait_recorded(recorder, stream_id)
        stored = await chunk_data(recorder, stream_id)
    assert events[:2] == [("message", "one"), ("message", "two")], events
    assert len(events) == 3 and events[-1][0] == "error", events
    assert record.status is StreamStatus.FAILED, record
    assert record.error is not None and record.error.startswith("RuntimeError: the app exploded"), record.error
    assert stored == ["one", "two"]
    assert error_logs(caplog, "RuntimeError"), f"not logged at ERROR: {[r.getMessage() for r in caplog.records]}"
    assert len(seen) == 1 and type(seen[0]) is RuntimeError, f"outer middleware got {seen!r}"


# -- 6. HEAD, and stream_app's methods ----------------------------------------------------------------
@with_and_without_middleware
async def test_head_on_a_decorated_get_route_sends_headers_only_and_records_nothing(middleware: bool) -> None:
    recorder = MemoryRecorder()
    ran: list[bool] = []

    @recorded_stream(recorder=recorder, ping=None)
    async def endpoint(request: Request) -> AsyncIterator[str]:
        ran.append(True)
        yield "a"
        yield "b"

    app: ASGIApp = Starlette(routes=[Route("/s", endpoint)])  # Starlette answers HEAD on GET routes
    if middleware:
        app = StreamRecorderMiddleware(app, recorder=recorder, handle_signals=False, shutdown_timeout=3)
    async with (recorder if not middleware else nullcontext()), \
            sse_client(app, lifespan=middleware, timeout=5) as client:
        async with client.stream("HEAD", "/s") as s:
            body = await s.read()
            status, content_type, complete = s.status_code, s.headers.get("content-type", ""), s.complete
        ran_for_head = list(ran)
        await recorder.flush()
        head_records = await recorder.list_streams()
        events = await client.collect("/s")  # GET still streams
        await recorder.flush()
        get_records = await recorder.list_streams()
    assert status == 200
    assert content_type.startswith("text/event-stream"), content_type
    assert body == b""
    assert complete
    assert ran_for_head == [], "the generator ran for HEAD"
    assert head_records == [], f"HEAD was recorded: {head_records}"
    assert [e.data for e in events if e.event != "done"] == ["a", "b"]
    assert [done_of(events)["stream_id"]] == [r.id for r in get_records]


async def test_stream_app_streams_get_and_post_answers_head_and_refuses_other_methods() -> None:
    recorder = MemoryRecorder()
    ran: list[str] = []

    async def chat(request: Request) -> AsyncIterator[str]:
        ran.append(request.method)
        yield "x"
        yield "y"

    app = stream_app(chat, recorder=recorder, ping=None)
    async with recorder, sse_client(app, timeout=5) as client:
        async with client.stream("HEAD", "/") as s:
            head_status, head_type, head_body = s.status_code, s.headers.get("content-type", ""), await s.read()
        await recorder.flush()
        assert await recorder.list_streams() == [], "HEAD was recorded"
        assert ran == [], "the generator ran for HEAD"
        get_events = await client.collect("/")
        post_events = await client.collect("/", method="POST", json={"q": 1})
        assert [e.data for e in get_events if e.event != "done"] == ["x", "y"]
        assert [e.data for e in post_events if e.event != "done"] == ["x", "y"]
        done_ids = {done_of(get_events)["stream_id"], done_of(post_events)["stream_id"]}
        async with client.stream("PUT", "/", content=b"{}") as s:
            put_status, allow = s.status_code, s.headers.get("allow", "")
            await s.read()
        await recorder.flush()
        records = await recorder.list_streams()
    assert head_status == 200
    assert head_type.startswith("text/event-stream"), head_type
    assert head_body == b""
    assert ran == ["GET", "POST"]
    assert put_status == 405
    allowed = {m.strip().upper() for m in allow.split(",") if m.strip()}
    assert {"GET", "POST"} <= allowed <= {"GET", "HEAD", "POST"}, f"Allow: {allow!r}"
    assert len(records) == 2, f"expected the GET and POST streams only: {records}"
    assert done_ids == {r.id for r in records}, "each done event names its own stream"


# -- 7. an unsendable item -----------------------------------------------------------------------------
async def test_unsendable_item_fails_the_stream_and_is_logged_at_error(caplog: pytest.LogCaptureFixture) -> None:
    recorder = MemoryRecorder()

    @recorded_stream(recorder=recorder, ping=None)
    async def endpoint(request: Request) -> AsyncIterator[Any]:
        yield "ok"
        yield object()
        yield "never"

    app = Starlette(routes=[Route("/s", endpoint)])
    async with recorder, sse_client(app, raise_app_exceptions=False, timeout=5) as client:
        async with client.stream("GET", "/s") as s:
            events = await s.collect()
            stream_id = s.stream_id
        assert stream_id
        record = await wait_recorded(recorder, stream_id)
        stored = await chunk_data(recorder, stream_id)
    assert_failed_and_logged_once(record, caplog)
    assert stored == ["ok"]
    assert events[-1].event == "error", events
