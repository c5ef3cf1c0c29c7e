"""The stream driver (:mod:`asgi_stream_recorder.driver`) called directly: real ASGI calls with a
small fake peer (``receive``/``send``), a real :class:`StreamSession` over a real in-memory recorder.

What is pinned here: the facts of how a stream stopped (the client, a cancel request, a shutdown, in
that precedence; each noted once), the watch (disconnects, pings only when idle and only between
events), every byte and message the client gets (items of each type, the preamble, the last word per
status), the source's bounded cleanup, a followed stream's end, and ``unwrap_group``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.types import Message

from asgi_stream_recorder import MemoryRecorder, StreamRecord, StreamStatus
from asgi_stream_recorder.driver import StreamDriver, unwrap_group
from asgi_stream_recorder.formats import SSE, WireFormat
from asgi_stream_recorder.recorders.base import Chunk
from asgi_stream_recorder.session import StreamSession
from asgi_stream_recorder.sse import PING, ServerSentEvent, SSEParser, encode

if __import__("sys").version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

START: Message = {"type": "http.response.start", "status": 200, "headers": []}
ERROR_UNRECORDED = b'event: error\ndata: {"message":"stream failed"}\n\n'
SHUTDOWN_UNRECORDED = b'event: shutdown\nretry: 1000\ndata: {"message":"server shutting down"}\n\n'


# -- the parts ---------------------------------------------------------------------------------


class Peer:
    """The server and client side of one ASGI call: ``receive`` returns what was pushed (blocking
    until something is), ``send`` keeps what it got. Once the client is gone a send raises OSError
    (and is counted: the driver should not even try)."""

    def __init__(self, *, hang_up_on: Callable[[Message], bool] | None = None,
                 raise_on: Callable[[Message], bool] | None = None, suspend: bool = True) -> None:
        self.sent: list[Message] = []
        self.inbox: list[Message] = []
        self.gone = False
        self.sends_after_gone = 0
        self.hang_up_on = hang_up_on
        self.raise_on = raise_on
        self.suspend = suspend
        self._wake = anyio.Event()

    def push(self, message: Message) -> None:
        self.inbox.append(message)
        self._wake.set()

    def leave(self) -> None:
        self.gone = True
        self.push({"type": "http.disconnect"})

    async def receive(self) -> Message:
        await anyio.lowlevel.checkpoint()  # like a server's queue: a cancelled wait never returns a message
        while not self.inbox:
            await self._wake.wait()
            self._wake = anyio.Event()
        return self.inbox.pop(0)

    async def send(self, message: Message) -> None:
        if self.suspend:
            await anyio.lowlevel.checkpoint()
        if self.raise_on is not None and self.raise_on(message):
            raise RuntimeError("the server's send broke")
        if self.gone:
            self.sends_after_gone += 1
            raise OSError("client gone")
        if self.hang_up_on is not None and self.hang_up_on(message):
            self.gone = True
            raise OSError("client gone")
        self.sent.append(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(self.bodies)

    def events(self) -> list[ServerSentEvent]:
        return SSEParser().feed(self.body)

    @property
    def pings(self) -> int:
        return self.bodies.count(PING)


class Host:
    """A middleware's side: tracking and a bounded number of background places."""

    shutting_down = False

    def __init__(self, *, room: bool = True) -> None:
        self.room = room
        self.calls: list[str] = []

    def track(self, stream: StreamDriver) -> None:
        self.calls.append("track")

    def untrack(self, stream: StreamDriver) -> None:
        self.calls.append("untrack")

    def reserve_background(self) -> bool:
        self.calls.append("reserve")
        return self.room

    def release_background(self) -> None:
        self.calls.append("release")


class Items:
    """A source over fixed items that never suspends. An exception among the items is raised in
    its place (the next call goes on); a call after the end is a bug in the driver."""

    def __init__(self, *items: Any) -> None:
        self.items = list(items)
        self.calls = 0
        self.ended = False

    def __aiter__(self) -> Items:
        return self

    async def __anext__(self) -> Any:
        if self.ended:
            raise AssertionError("iterated again after its end")
        self.calls += 1
        if not self.items:
            self.ended = True
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class ClosableItems(Items):
    """Items with an ``aclose`` whose cleanup takes a checkpoint, like a generator's ``finally``."""

    def __init__(self, *items: Any, close_error: Exception | None = None) -> None:
        super().__init__(*items)
        self.closed = 0
        self.close_error = close_error

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.closed += 1
        if self.close_error is not None:
            raise self.close_error


async def opened(**options: Any) -> MemoryRecorder:
    rec = MemoryRecorder(**options)
    await rec.open()
    return rec


async def record_of(rec: MemoryRecorder, sid: str) -> StreamRecord:
    await rec.flush()
    record = await rec.get(sid)
    assert record is not None
    return record


def body(message_body: bytes, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": message_body, "more_body": more}


async def run(source: Any, *, peer: Peer | None = None, rec: MemoryRecorder | None = None, event: str | None = None,
              host: Host | None = None, **options: Any) -> tuple[StreamDriver, Peer, StreamRecord]:
    rec = rec or await opened()
    peer = peer or Peer()
    session = StreamSession(rec)
    session.begin()
    options.setdefault("ping", None)
    driver = StreamDriver(session, peer.receive, peer.send, host=host, **options)
    with anyio.fail_after(5):
        await driver.stream(START, source, event)
    return driver, peer, await record_of(rec, session.id)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition()`` (the caller bounds the wait)."""
    while True:
        if condition():
            return
        await anyio.sleep(0.01)


def new_driver(peer: Peer, session: StreamSession | None = None, **options: Any) -> StreamDriver:
    return StreamDriver(session, peer.receive, peer.send, **options)


# -- the facts ---------------------------------------------------------------------------------


async def test_client_left_is_noted_once_and_stops_the_stream() -> None:
    rec = await opened()
    session = StreamSession(rec)
    driver = new_driver(Peer(), session, host=Host())
    assert (driver.status, driver.error, driver.client_gone, driver.started, driver.ended) == (None, None, False, False,
                                                                                             False)
    driver.client_left()  # before the scope exists: noted, stopped when it is attached
    scope = anyio.CancelScope()
    driver.attach(scope)
    assert scope.cancel_called
    assert (driver.client_gone, driver.stopped_for_client, driver.interrupted, driver.stopped_by_request) == (
        True, True, False, False)
    first = session.client_left_ms
    assert first is not None
    driver.client_left()
    assert session.client_left_ms == first


@pytest.mark.parametrize("fact", ["client", "request", "interrupt"])
async def test_attach_after_a_stop_cancels_at_once(fact: str) -> None:
    driver = new_driver(Peer(), None)
    untouched = anyio.CancelScope()
    driver.attach(untouched)
    assert not untouched.cancel_called
    {"client": driver.client_left, "request": driver.request_stop, "interrupt": driver.interrupt}[fact]()
    assert untouched.cancel_called
    late = anyio.CancelScope()
    driver.attach(late)
    assert late.cancel_called


async def test_stopping_without_a_scope_is_fine_and_each_fact_is_set_once() -> None:
    driver = new_driver(Peer(), None)
    driver.request_stop()
    driver.interrupt()
    driver.client_left()  # both stops are noted (the record still says cancelled_by="request")
    assert (driver.stopped_by_request, driver.interrupted, driver.stopped_for_client) == (True, False, True)

    driver = new_driver(Peer(), None)
    driver.interrupt()
    driver.request_stop()
    driver.client_left()
    assert (driver.stopped_by_request, driver.interrupted, driver.stopped_for_client) == (False, True, False)

    driver = new_driver(Peer(), None)
    driver.client_left()
    driver.interrupt()
    driver.request_stop()
    assert (driver.stopped_by_request, driver.interrupted, driver.stopped_for_client) == (False, False, True)


async def test_a_hang_up_after_the_last_byte_is_just_the_end() -> None:
    rec = await opened()
    session = StreamSession(rec)
    host = Host()
    driver = new_driver(Peer(), session, host=host, on_disconnect="continue")
    scope = anyio.CancelScope()
    driver.attach(scope)
    driver.ended = True
    driver.client_left()
    assert driver.client_gone
    assert (driver.stopped_for_client, session.client_left_ms, host.calls, scope.cancel_called) == (
        False, None, [], False)


async def test_continue_reserves_one_background_place_and_releases_it_once() -> None:
    rec = await opened()
    session = StreamSession(rec)
    session.begin()
    host = Host()
    driver = new_driver(Peer(), session, host=host, on_disconnect="continue")
    scope = anyio.CancelScope()
    driver.attach(scope)
    driver.client_left()
    driver.client_left()
    assert (driver.continues, driver.stopped_for_client, scope.cancel_called) == (True, False, False)
    assert session.client_left_ms is not None
    assert host.calls == ["reserve"]
    driver.exhausted = True
    assert await driver.finish() is StreamStatus.COMPLETED
    assert await driver.finish() is StreamStatus.COMPLETED  # a second finish never releases twice
    assert host.calls == ["reserve", "untrack", "release", "untrack"]
    assert "continue_refused" not in (await record_of(rec, session.id)).metadata


@pytest.mark.parametrize("with_session", [True, False])
async def test_continue_refused_when_there_is_no_room(with_session: bool) -> None:
    rec = await opened()
    session = StreamSession(rec) if with_session else None
    host = Host(room=False)
    driver = new_driver(Peer(), session, host=host, on_disconnect="continue")
    scope = anyio.CancelScope()
    driver.attach(scope)
    driver.client_left()
    assert (driver.continues, driver.stopped_for_client, scope.cancel_called) == (False, True, True)
    assert host.calls == ["reserve"]
    if session is not None:
        assert session.metadata == {"continue_refused": "no room for background streams, or shutting down"}
    await driver.finish()
    assert host.calls == ["reserve", "untrack"]


async def test_continue_without_a_middleware_goes_on_unbounded() -> None:
    driver = new_driver(Peer(), None, on_disconnect="continue")
    scope = anyio.CancelScope()
    driver.attach(scope)
    driver.client_left()
    assert (driver.continues, driver.stopped_for_client, scope.cancel_called) == (True, False, False)


async def test_a_client_leaving_during_a_shutdown_stays_a_shutdown() -> None:
    rec = await opened()
    session = StreamSession(rec)
    session.begin()
    driver = new_driver(Peer(), session)
    driver.interrupt()
    driver.client_left()
    assert (driver.interrupted, driver.stopped_for_client) == (True, False)
    assert await driver.finish() is StreamStatus.INTERRUPTED


async def test_the_first_error_counts_and_is_logged_with_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    rec = await opened()
    session = StreamSession(rec)
    driver = new_driver(Peer(), session)
    first, second = ValueError("first"), KeyError("second")
    with caplog.at_level(logging.ERROR, "asgi_stream_recorder"):
        driver.fail(first, "step one")
        driver.fail(second, "step two")
    assert driver.error is first
    assert [r.getMessage() for r in caplog.records] == [f"stream {session.id} failed: step one: first"]
    caplog.clear()
    unrecorded = new_driver(Peer(), None)
    with caplog.at_level(logging.ERROR, "asgi_stream_recorder"):
        unrecorded.fail(first, "step one")
    assert [r.getMessage() for r in caplog.records] == ["stream (unrecorded) failed: step one: first"]


# -- sending and the watch ---------------------------------------------------------------------


async def test_start_and_send_body_messages_and_a_gone_client_gets_no_more() -> None:
    peer = Peer()
    driver = new_driver(peer, None)
    await driver.start(START)
    await driver.send_body(b": hello\n\n")
    assert driver.started
    assert peer.sent == [START, body(b": hello\n\n")]
    peer.gone = True
    await driver.send_body(b": two\n\n")
    assert driver.client_gone
    await driver.send_body(b": three\n\n")
    assert peer.sends_after_gone == 1


async def test_a_client_gone_before_the_start_is_noted() -> None:
    peer = Peer(hang_up_on=lambda m: m["type"] == "http.response.start")
    driver = new_driver(peer, None)
    await driver.start(START)
    assert (driver.started, driver.client_gone, driver.stopped_for_client) == (True, True, True)


async def test_watch_forwards_other_messages_and_stops_at_the_disconnect() -> None:
    peer = Peer()
    driver = new_driver(peer, None, ping=None)
    forwarded: list[Message] = []
    driver.forward = forwarded.append
    request = {"type": "http.request", "body": b"late", "more_body": False}
    peer.push(request)
    peer.leave()
    with anyio.fail_after(5):
        await driver.watch()
    assert forwarded == [request]
    assert driver.client_gone and driver.stopped_for_client

    peer = Peer()
    driver = new_driver(peer, None, ping=None)  # nobody to forward to: ignored
    peer.push(request)
    peer.leave()
    with anyio.fail_after(5):
        await driver.watch()
    assert driver.client_gone


async def _watch_until(driver: StreamDriver, peer: Peer, done: Callable[[], bool], *, limit: float = 5) -> None:
    """Run the watch until ``done()``, then let the client leave; the watch must end."""
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.watch)
            await until(done)
            peer.leave()
    assert driver.client_gone


async def test_an_idle_stream_gets_pings_between_events() -> None:
    peer = Peer()
    driver = new_driver(peer, None, ping=0.05)
    await _watch_until(driver, peer, lambda: peer.pings >= 3)
    assert peer.sent[:3] == [body(PING)] * 3


@pytest.mark.parametrize(("at_boundary", "ended"), [(False, False), (True, True)])
async def test_no_ping_mid_event_or_after_the_end_and_a_disconnect_is_still_seen(at_boundary: bool,
                                                                                 ended: bool) -> None:
    peer = Peer()
    driver = new_driver(peer, None, ping=0.05)
    driver.at_boundary, driver.ended = at_boundary, ended
    slept = anyio.Event()

    async def later() -> None:
        await anyio.sleep(0.3)
        slept.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        await _watch_until(driver, peer, slept.is_set)
    assert peer.sent == []


async def test_a_ping_goes_in_once_the_event_is_complete() -> None:
    peer = Peer()
    driver = new_driver(peer, None, ping=0.05)
    driver.at_boundary = False

    async def complete_later() -> None:
        await anyio.sleep(0.2)
        driver.at_boundary = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(complete_later)
        await _watch_until(driver, peer, lambda: peer.pings >= 1)


async def test_no_ping_right_after_a_send_or_a_chunk() -> None:
    # the driver has been idle longer than its ping interval, then something happens: no ping yet
    rec = await opened()
    for what in ["send", "chunk"]:
        session = StreamSession(rec)
        peer = Peer()
        driver = new_driver(peer, session, ping=0.4)
        await anyio.sleep(0.45)
        if what == "send":
            await driver.send_body(b": busy\n\n")
        else:
            session.stamp()  # a decorated stream's chunk (its send does not go through send_body)
        steps = 0

        def stepped() -> bool:
            nonlocal steps
            steps += 1
            return steps > 3

        await _watch_until(driver, peer, stepped)
        assert peer.pings == 0, what


async def test_a_stream_with_the_default_ping_is_not_pinged_at_once() -> None:
    peer = Peer()
    driver = StreamDriver(None, peer.receive, peer.send)
    assert not driver.continues
    steps = 0

    def stepped() -> bool:
        nonlocal steps
        steps += 1
        return steps > 3

    await _watch_until(driver, peer, stepped)
    assert peer.sent == []


# -- a decorated stream: items, bytes, messages --------------------------------------------------


async def test_a_completed_stream_sends_exactly_its_items_and_the_done_event(caplog: pytest.LogCaptureFixture) -> None:
    host = Host()
    source = ClosableItems("a", "b c")
    with caplog.at_level(logging.WARNING, "asgi_stream_recorder"):
        driver, peer, record = await run(source, host=host)
    assert peer.sent[:3] == [START, body(b"id: 1\ndata: a\n\n"), body(b"id: 2\ndata: b c\n\n")]
    assert peer.sent[3] == body(encode(ServerSentEvent({"stream_id": record.id, "status": "completed"},
                                                       event="done")), more=False)
    assert len(peer.sent) == 4
    assert (record.status, record.chunk_count, record.content) == (StreamStatus.COMPLETED, 2, "ab c")
    assert (driver.status, driver.exhausted, driver.ended) == (StreamStatus.COMPLETED, True, True)
    assert host.calls == ["track", "untrack"]
    assert source.closed == 1
    assert source.calls == 3
    assert caplog.records == []


async def test_items_of_each_type_and_event_names() -> None:
    items = [
        "plain",
        {"k": 1},
        [1, 2],
        b"raw",
        bytearray(b"ba"),
        memoryview(b"mv"),
        "two\nlines",
        "a\rb",
        ServerSentEvent("named", event="x"),
        ServerSentEvent("default"),
        ServerSentEvent(comment="a comment only"),
        ServerSentEvent("r", retry=5),
        ServerSentEvent("c", comment="note"),
    ]
    driver, peer, record = await run(Items(*items), event="tok")
    expected = (
        b"id: 1\nevent: tok\ndata: plain\n\n"
        b'id: 2\nevent: tok\ndata: {"k":1}\n\n'
        b"id: 3\nevent: tok\ndata: [1,2]\n\n"
        b"id: 4\nevent: tok\ndata: raw\n\n"
        b"id: 5\nevent: tok\ndata: ba\n\n"
        b"id: 6\nevent: tok\ndata: mv\n\n"
        b"id: 7\nevent: tok\ndata: two\ndata: lines\n\n"
        b"id: 8\nevent: tok\ndata: a\ndata: b\n\n"
        b"id: 9\nevent: x\ndata: named\n\n"
        b"id: 10\nevent: tok\ndata: default\n\n"
        b": a comment only\n\n"
    )
    assert peer.body.startswith(expected)
    rest = SSEParser().feed(peer.body[len(expected):])
    assert [(e.id, e.event, e.text, e.retry) for e in rest[:2]] == [("11", "tok", "r", 5), ("12", "tok", "c", None)]
    assert b"\n: note\n" in peer.body or peer.body[len(expected):].count(b": note\n") == 1
    assert record.status is StreamStatus.COMPLETED
    assert record.chunk_count == 12  # the comment is sent, not recorded
    assert all(m.get("more_body", False) for m in peer.sent[1:-1])
    chunks = await record_of_chunks(record.id, driver)
    assert [(c.seq, c.event, c.data) for c in chunks][:3] == [(1, "tok", "plain"), (2, "tok", '{"k":1}'),
                                                               (3, "tok", "[1,2]")]
    assert chunks[8].event == "x"


async def record_of_chunks(sid: str, driver: StreamDriver) -> list[Chunk]:
    assert driver.session is not None
    return await driver.session.recorder.chunks(sid)


async def test_without_a_default_event_items_have_none() -> None:
    _, peer, _ = await run(Items("a", ServerSentEvent("b"), ServerSentEvent("c", event="x"), "d\ne", "f\rg"))
    assert peer.body.startswith(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\nevent: x\ndata: c\n\n"
                                b"id: 4\ndata: d\ndata: e\n\nid: 5\ndata: f\ndata: g\n\n")


async def test_a_custom_format_gets_each_chunk() -> None:
    seen: list[tuple[Chunk, ServerSentEvent | None]] = []

    class Brackets(WireFormat):
        def chunk(self, session: StreamSession, chunk: Chunk, extra: ServerSentEvent | None) -> bytes:
            seen.append((chunk, extra))
            return f"<{chunk.seq}:{chunk.data}>".encode()

    _, peer, record = await run(Items("a", "b"), format=Brackets())
    assert peer.bodies[:2] == [b"<1:a>", b"<2:b>"]
    assert seen == [(Chunk(record.id, 1, "a", None, 0.0), None), (Chunk(record.id, 2, "b", None, 0.0), None)]


async def test_the_preamble_goes_right_after_the_start() -> None:
    rec = await opened()
    session = StreamSession(rec)
    session.begin()
    peer = Peer()
    driver = new_driver(peer, session, ping=None)
    driver.preamble = b"retry: 1000\n\n"
    with anyio.fail_after(5):
        await driver.stream(START, Items("a"), None)
    assert peer.sent[:3] == [START, body(b"retry: 1000\n\n"), body(b"id: 1\ndata: a\n\n")]


@pytest.mark.parametrize("bad", [ServerSentEvent("x", id="7"), object(), 1.5])
async def test_an_item_that_cannot_be_sent_fails_the_stream(bad: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, "asgi_stream_recorder"):
        _, peer, record = await run(Items("a", bad, "b"))
    assert record.status is StreamStatus.FAILED
    assert record.chunk_count == 1
    assert record.error is not None
    if isinstance(bad, ServerSentEvent):
        assert record.error.startswith("ValueError: ServerSentEvent.id is assigned by the recorder")
    else:
        assert record.error.startswith(f"TypeError: a recorded stream cannot send an item of type builtins."
                                       f"{type(bad).__qualname__}")
    assert [e.event for e in peer.events()] == [None, "error"]
    assert peer.sent[-1]["more_body"] is False
    assert "an item could not be sent" in caplog.text


async def test_a_source_error_fails_the_stream_and_nothing_after_it_is_taken(caplog: pytest.LogCaptureFixture) -> None:
    source = Items("a", RuntimeError("boom"), "b")
    with caplog.at_level(logging.ERROR, "asgi_stream_recorder"):
        driver, peer, record = await run(source)
    assert (record.status, record.chunk_count, record.error) == (StreamStatus.FAILED, 1, "RuntimeError: boom")
    assert source.calls == 2
    assert peer.bodies == [b"id: 1\ndata: a\n\n", SSE.error(driver.session)]  # type: ignore[arg-type]
    assert "its source raised" in caplog.text


async def test_the_machinery_failing_fails_the_stream_and_raises(caplog: pytest.LogCaptureFixture) -> None:
    rec = await opened()
    session = StreamSession(rec)
    session.begin()
    peer = Peer(raise_on=lambda m: m["type"] == "http.response.start")
    driver = new_driver(peer, session, ping=None)
    with caplog.at_level(logging.ERROR, "asgi_stream_recorder"), pytest.raises(RuntimeError), anyio.fail_after(5):
        await driver.stream(START, Items("a"), None)
    assert driver.status is StreamStatus.FAILED
    assert (await record_of(rec, session.id)).status is StreamStatus.FAILED
    assert "the stream's machinery raised" in caplog.text


async def test_a_client_gone_mid_stream_cancels_and_records_only_what_was_sent() -> None:
    source = ClosableItems("a", "b", "c")
    peer = Peer(hang_up_on=lambda m: m.get("body") == b"id: 2\ndata: b\n\n")
    host = Host()
    _, peer, record = await run(source, peer=peer, host=host)
    assert (record.status, record.chunk_count, record.content) == (StreamStatus.CANCELLED, 1, "a")
    assert "client_disconnected_at_ms" in record.metadata
    assert source.calls == 2
    assert source.closed == 1
    assert peer.sends_after_gone == 0
    assert host.calls == ["track", "untrack"]


async def test_a_client_gone_on_a_comment_stops_before_the_next_item() -> None:
    source = Items(ServerSentEvent(comment="hi"), "a", "b")
    peer = Peer(hang_up_on=lambda m: m.get("body") == b": hi\n\n")
    _, peer, record = await run(source, peer=peer)
    assert (record.status, record.chunk_count) == (StreamStatus.CANCELLED, 0)
    assert source.calls == 1


async def test_continue_records_everything_after_the_client_left() -> None:
    source = ClosableItems("a", "b", "c")
    peer = Peer(hang_up_on=lambda m: m.get("body") == b"id: 2\ndata: b\n\n")
    host = Host()
    driver, peer, record = await run(source, peer=peer, host=host, on_disconnect="continue")
    assert (record.status, record.chunk_count, record.content) == (StreamStatus.COMPLETED, 3, "abc")
    assert host.calls == ["track", "reserve", "untrack", "release"]
    assert peer.sends_after_gone == 0
    assert driver.status is StreamStatus.COMPLETED


async def test_continue_after_a_hang_up_at_the_start_still_checks_the_text() -> None:
    peer = Peer(hang_up_on=lambda m: m["type"] == "http.response.start")
    _, peer, record = await run(Items("a", "\ud800"), peer=peer, host=Host(), on_disconnect="continue")
    assert (record.status, record.chunk_count) == (StreamStatus.FAILED, 1)
    assert peer.sends_after_gone == 0

    peer = Peer(hang_up_on=lambda m: m["type"] == "http.response.start")
    source = ClosableItems("a", "b")
    _, peer, record = await run(source, peer=peer, host=Host(), on_disconnect="continue")
    assert (record.status, record.chunk_count, record.content) == (StreamStatus.COMPLETED, 2, "ab")

    peer = Peer(hang_up_on=lambda m: m["type"] == "http.response.start")
    source = ClosableItems("a", "b")
    _, peer, record = await run(source, peer=peer)  # cancel: the source is never asked
    assert (record.status, record.chunk_count, source.calls, source.closed) == (StreamStatus.CANCELLED, 0, 0, 1)


async def _waiting_source(started: anyio.Event, cleaned: list[str]) -> AsyncIterator[str]:
    try:
        yield "a"
        started.set()
        await anyio.sleep_forever()
        yield "never"
    finally:
        cleaned.append("finally")


async def test_the_watch_stops_a_waiting_source_when_the_client_leaves() -> None:
    rec = await opened()
    session = StreamSession(rec)
    session.begin()
    peer = Peer()
    driver = new_driver(peer, session, ping=None)
    started, cleaned = anyio.Event(), list[str]()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.stream, START, _waiting_source(started, cleaned), None)
            await started.wait()
            peer.leave()
    record = await record_of(rec, session.id)
    assert (record.status, record.chunk_count) == (StreamStatus.CANCELLED, 1)
    assert cleaned == ["finally"]


@pytest.mark.parametrize("how", ["interrupt", "request", "outside"])
async def test_a_stopped_stream_says_its_last_word(how: str) -> None:
    rec = await opened()
    session = StreamSession(rec)
    session.begin()
    peer = Peer()
    driver = new_driver(peer, session, ping=None)
    started, cleaned = anyio.Event(), list[str]()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.stream, START, _waiting_source(started, cleaned), None)
            await started.wait()
            if how == "interrupt":
                driver.interrupt()
            elif how == "request":
                assert rec.live.cancel(session.id)
            else:
                tg.cancel_scope.cancel()
    record = await record_of(rec, session.id)
    assert cleaned == ["finally"]
    assert peer.sent[-1]["more_body"] is False
    if how == "request":
        assert record.status is StreamStatus.CANCELLED
        assert record.metadata["cancelled_by"] == "request"
        assert peer.events()[-1].event == "done"
        assert json.loads(peer.events()[-1].data) == {"stream_id": session.id, "status": "cancelled"}
    else:
        assert record.status is StreamStatus.INTERRUPTED
        last = peer.events()[-1]
        assert last.event == "shutdown"
        assert json.loads(last.data)["last_event_id"] == "1"


async def test_a_full_queue_makes_the_stream_wait_for_room_rather_than_lose_chunks() -> None:
    rec = await opened(max_pending=1, max_wait=5.0, flush_interval=0.01)
    peer = Peer(suspend=False)
    _, peer, record = await run(Items(*"abcdef"), peer=peer, rec=rec)
    assert (record.status, record.chunk_count, record.content) == (StreamStatus.COMPLETED, 6, "abcdef")
    assert "dropped_chunks" not in record.metadata


async def test_a_source_that_never_suspends_lets_other_tasks_run_every_32_items() -> None:
    ran = 0
    seen: list[int] = []

    class Counting(Items):
        async def __anext__(self) -> Any:
            seen.append(ran)
            return await super().__anext__()

    async def other() -> None:
        nonlocal ran
        while True:
            ran += 1
            await anyio.lowlevel.checkpoint()

    peer = Peer(suspend=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.lowlevel.checkpoint()
        _, peer, record = await run(Counting(*["t"] * 100), peer=peer)
        tg.cancel_scope.cancel()
    assert record.chunk_count == 100
    during = seen[99] - seen[0]
    assert 1 <= during <= 8, seen


async def test_an_unmanaged_recorder_is_flushed_at_the_end() -> None:
    rec = MemoryRecorder(flush_interval=30.0)
    await rec.ensure_open()
    assert not rec.managed
    session = StreamSession(rec)
    session.begin()
    driver = new_driver(Peer(), session, ping=None)
    with anyio.fail_after(5):
        await driver.stream(START, Items("a"), None)
    record = await rec.backend.get(session.id)  # no flush here: the driver made it durable
    assert record is not None and record.status is StreamStatus.COMPLETED
    await rec.close()


# -- the source's cleanup ----------------------------------------------------------------------


async def test_a_source_without_aclose_and_a_failing_aclose_still_end_the_stream(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "asgi_stream_recorder"):
        _, peer, record = await run(Items("a"))
    assert record.status is StreamStatus.COMPLETED
    assert caplog.records == []  # nothing to close: nothing tried
    source = ClosableItems("a", close_error=RuntimeError("cleanup broke"))
    _, peer, record = await run(source)
    assert (record.status, source.closed) == (StreamStatus.COMPLETED, 1)
    assert peer.events()[-1].event == "done"


# -- the last word -----------------------------------------------------------------------------


async def test_the_last_word_of_an_unrecorded_stream() -> None:
    cases: list[tuple[Callable[[StreamDriver], None], StreamStatus, list[Message]]] = [
        (lambda d: d.fail(RuntimeError("x"), "test"), StreamStatus.FAILED, [body(ERROR_UNRECORDED, False)]),
        (lambda d: d.interrupt(), StreamStatus.INTERRUPTED, [body(SHUTDOWN_UNRECORDED, False)]),
        (lambda d: setattr(d, "exhausted", True), StreamStatus.COMPLETED, []),  # the app ended its own body
        (lambda d: d.request_stop(), StreamStatus.CANCELLED, []),
        (lambda d: setattr(d, "stopped_for_client", True), StreamStatus.CANCELLED, [body(b"", False)]),
    ]
    for fact, status, last in cases:
        peer = Peer()
        driver = new_driver(peer, None, host=Host())
        await driver.start(START)
        fact(driver)
        assert await driver.finish() is status
        assert driver.status is status
        assert peer.sent[1:] == last, status
        assert driver.ended is bool(last)


async def test_no_last_word_before_the_start_after_the_end_or_to_a_gone_client() -> None:
    rec = await opened()
    for case in ["not started", "ended", "gone"]:
        session = StreamSession(rec)
        session.begin()
        peer = Peer()
        driver = new_driver(peer, session)
        if case != "not started":
            await driver.start(START)
        if case == "ended":
            driver.ended = True
        if case == "gone":
            peer.gone = True
            driver.client_left()
        driver.exhausted = True
        await driver.finish()
        assert peer.sent == ([] if case == "not started" else [START]), case
        assert peer.sends_after_gone == 0


@pytest.mark.parametrize("status", ["failed", "interrupted", "cancelled for the client", "completed"])
async def test_the_last_word_of_a_recorded_stream(status: str) -> None:
    rec = await opened()
    session = StreamSession(rec)
    session.begin()
    session.stamp()
    peer = Peer()
    driver = new_driver(peer, session)
    await driver.start(START)
    if status == "failed":
        driver.fail(ValueError("x"), "test")
    elif status == "interrupted":
        driver.interrupt()
    elif status == "completed":
        driver.exhausted = True
    else:
        driver.stopped_for_client = True
    final = await driver.finish()
    assert final.value == status.split()[0]
    expected = {"failed": SSE.error(session), "interrupted": SSE.shutdown(session), "completed": SSE.end(session),
                "cancelled for the client": b""}[status]
    assert peer.sent == [START, body(expected, False)]
    assert b"event: " in expected or status.startswith("cancelled")
    assert driver.ended


async def test_a_format_failing_at_the_end_still_ends_the_body(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(WireFormat):
        def end(self, session: StreamSession) -> bytes:
            raise RuntimeError("no end")

    with caplog.at_level(logging.ERROR, "asgi_stream_recorder"):
        _, peer, record = await run(Items("a"), format=Broken())
    assert record.status is StreamStatus.COMPLETED
    assert peer.sent[-1] == body(b"", False)
    assert "failed to write its last event" in caplog.text


# -- a followed stream -------------------------------------------------------------------------


async def _finished_stream(rec: MemoryRecorder, texts: list[str], **end: Any) -> str:
    session = StreamSession(rec, resumable=True)
    session.begin()
    for text in texts:
        session.stamp()
        session.record_nowait(text, None)
    session.end(**end)
    await rec.flush()
    return session.id


async def _relay(rec: MemoryRecorder, sid: str, peer: Peer | None = None, host: Host | None = None,
                 **options: Any) -> tuple[StreamDriver, Peer]:
    peer = peer or Peer()
    driver = new_driver(peer, None, host=host, ping=options.pop("ping", None), **options)
    view = StreamSession(rec, id=sid, resumable=True)
    with anyio.fail_after(5):
        await driver.relay(START, rec.follow(sid), view)
    return driver, peer


@pytest.mark.parametrize("end", ["completed", "failed", "interrupted"])
async def test_relay_of_a_stored_stream_ends_with_its_own_last_word(end: str) -> None:
    rec = await opened()
    ends: dict[str, dict[str, Any]] = {"completed": {"exhausted": True}, "failed": {"error": "boom"}, "interrupted": {}}
    how = ends[end]
    sid = await _finished_stream(rec, ["a", "b"], **how)
    host = Host()
    driver, peer = await _relay(rec, sid, host=host)
    assert peer.sent[:3] == [START, body(f"id: {sid}:1\ndata: a\n\n".encode()),
                             body(f"id: {sid}:2\ndata: b\n\n".encode())]
    last = peer.sent[3]
    assert len(peer.sent) == 4 and last["more_body"] is False
    event = SSEParser().feed(last["body"])[0]
    assert event.event == {"completed": "done", "failed": "error", "interrupted": "shutdown"}[end]
    data = json.loads(event.data)
    assert data["stream_id"] == sid
    if end == "completed":
        assert data["status"] == "completed"
    if end == "interrupted":
        assert data["last_event_id"] == "2"
    assert host.calls == ["track", "untrack"]
    assert driver.ended and driver.exhausted


async def test_relay_of_an_unknown_stream_says_error(caplog: pytest.LogCaptureFixture) -> None:
    rec = await opened()
    with caplog.at_level(logging.ERROR, "asgi_stream_recorder"):
        driver, peer = await _relay(rec, "nope")
    assert [m.get("more_body") for m in peer.sent] == [None, False]
    assert SSEParser().feed(peer.sent[1]["body"])[0].event == "error"
    assert isinstance(driver.error, LookupError)
    assert not driver.exhausted
    assert "following it failed" in caplog.text


class _SaysError(WireFormat):
    def error(self, session: StreamSession) -> bytes:
        return f"error {session.status.value} {session.error}".encode()


async def test_relay_of_a_failed_stream_gives_its_format_the_error() -> None:
    rec = await opened()
    sid = await _finished_stream(rec, ["a"], error="boom")
    _, peer = await _relay(rec, sid, format=_SaysError())
    assert peer.sent[-1] == body(b"error failed boom", False)


async def test_relay_stops_when_the_client_leaves() -> None:
    rec = await opened()
    session = StreamSession(rec, resumable=True)
    session.begin()
    session.stamp()
    session.record_nowait("a", None)
    peer = Peer()
    host = Host()
    driver = new_driver(peer, None, host=host, ping=None)
    view = StreamSession(rec, id=session.id, resumable=True)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.relay, START, rec.follow(session.id), view)
            await until(lambda: len(peer.sent) >= 2)
            peer.leave()
    assert driver.client_gone and not driver.exhausted
    assert len(peer.sent) == 2 and peer.sends_after_gone == 0
    assert host.calls == ["track", "untrack"]
    session.end(exhausted=True)


async def test_relay_to_a_client_gone_at_the_start_sends_nothing_more() -> None:
    rec = await opened()
    sid = await _finished_stream(rec, ["a"], exhausted=True)
    host = Host()
    peer = Peer(hang_up_on=lambda m: m["type"] == "http.response.start")
    _, peer = await _relay(rec, sid, peer=peer, host=host)
    assert peer.sent == [] and peer.sends_after_gone == 0
    assert host.calls == ["track", "untrack"]


async def test_relay_of_a_client_that_hangs_up_mid_way() -> None:
    rec = await opened()
    sid = await _finished_stream(rec, ["a", "b", "c"], exhausted=True)
    # a send that fails at once, without a checkpoint (as uvicorn's does once the client is gone)
    peer = Peer(hang_up_on=lambda m: m.get("body", b"").endswith(b"data: b\n\n"), suspend=False)
    driver, peer = await _relay(rec, sid, peer=peer)
    assert len(peer.sent) == 2 and peer.sends_after_gone == 0
    assert driver.client_gone and not driver.exhausted


async def test_relay_skips_chunks_the_format_leaves_out() -> None:
    class Hidden(WireFormat):
        def chunk(self, session: StreamSession, chunk: Chunk, extra: ServerSentEvent | None) -> bytes:
            return b"" if chunk.data == "hidden" else super().chunk(session, chunk, extra)

    rec = await opened()
    sid = await _finished_stream(rec, ["a", "hidden", "b"], exhausted=True)
    _, peer = await _relay(rec, sid, format=Hidden())
    assert peer.bodies[:2] == [f"id: {sid}:1\ndata: a\n\n".encode(), f"id: {sid}:3\ndata: b\n\n".encode()]
    assert len(peer.bodies) == 3


class _MetadataEnd(WireFormat):
    def end(self, session: StreamSession) -> bytes:
        return f"end {session.status.value} {session.metadata.get('chunk_count')} {session.metadata.get('x')}".encode()


async def test_relay_of_a_live_stream_ends_with_its_final_metadata() -> None:
    rec = await opened()
    session = StreamSession(rec, resumable=True, metadata={"x": 1})
    session.begin()
    session.stamp()
    session.record_nowait("a", None)
    peer = Peer()
    driver = new_driver(peer, None, ping=None, format=_MetadataEnd())
    view = StreamSession(rec, id=session.id, resumable=True)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.relay, START, rec.follow(session.id), view)
            await until(lambda: len(peer.sent) >= 2)
            session.metadata["x"] = 2
            session.stamp()
            session.record_nowait("b", None)
            session.end(exhausted=True)
    assert peer.bodies == [f"id: {session.id}:1\ndata: a\n\n".encode(), f"id: {session.id}:2\ndata: b\n\n".encode(),
                           b"end completed 2 2"]
    assert peer.sent[-1]["more_body"] is False


@pytest.mark.parametrize("how", ["interrupt", "request", "outside"])
async def test_relay_stopped_while_following(how: str) -> None:
    rec = await opened()
    session = StreamSession(rec, resumable=True)
    session.begin()
    session.stamp()
    session.record_nowait("a", None)
    peer = Peer()
    host = Host()
    driver = new_driver(peer, None, host=host, ping=None)
    view = StreamSession(rec, id=session.id, resumable=True)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.relay, START, rec.follow(session.id), view)
            await until(lambda: len(peer.sent) >= 2)
            {"interrupt": driver.interrupt, "request": driver.request_stop, "outside": tg.cancel_scope.cancel}[how]()
    last = peer.sent[-1]
    assert last["more_body"] is False and len(peer.sent) == 3
    if how == "interrupt":
        event = SSEParser().feed(last["body"])[0]
        assert (event.event, json.loads(event.data)["last_event_id"]) == ("shutdown", "1")
    else:
        assert last["body"] == b""
    assert host.calls == ["track", "untrack"]
    session.end(exhausted=True)


async def test_relay_sends_no_ping_right_after_a_chunk() -> None:
    rec = await opened()
    session = StreamSession(rec, resumable=True)
    session.begin()
    session.stamp()
    session.record_nowait("a", None)
    peer = Peer()
    driver = new_driver(peer, None, ping=0.4)
    await anyio.sleep(0.45)  # idle since it was made: the chunk relayed resets that
    view = StreamSession(rec, id=session.id, resumable=True)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.relay, START, rec.follow(session.id), view)
            await until(lambda: len(peer.sent) >= 2)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            session.end(exhausted=True)
    assert peer.pings == 0
    assert peer.sent[-1]["more_body"] is False


# -- unwrap_group ------------------------------------------------------------------------------


def test_unwrap_group_raises_a_lone_error_as_itself_with_the_groups_cause() -> None:
    inner, cause = ValueError("inner"), KeyError("cause")
    with pytest.raises(ValueError) as caught, unwrap_group():
        raise BaseExceptionGroup("outer", [BaseExceptionGroup("middle", [inner])]) from cause
    assert caught.value is inner
    assert caught.value.__cause__ is cause


def test_unwrap_group_keeps_a_group_of_several_and_a_plain_error_as_they_are() -> None:
    group = BaseExceptionGroup("two", [ValueError("a"), KeyError("b")])
    with pytest.raises(BaseExceptionGroup) as caught, unwrap_group():
        raise group
    assert caught.value is group

    with pytest.raises(ValueError) as plain, unwrap_group():
        try:
            raise KeyError("context")
        except KeyError:
            raise ValueError("plain")  # noqa: B904 - the context is what is checked
    assert isinstance(plain.value.__context__, KeyError)
    assert plain.value.__cause__ is None and not plain.value.__suppress_context__

    with unwrap_group():
        pass
