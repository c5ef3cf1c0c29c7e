"""Every way a stream can end, seen from both sides: what the client receives on the wire and
what the record says. Each test runs through a real server (uvicorn on asyncio, hypercorn on
trio) and through a direct in-process ASGI call with our own ``receive``/``send``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import (
    Recorder,
    SQLiteBackend,
    SQLiteRecorder,
    StreamRecord,
    StreamStatus,
    current_stream,
    recorded_stream,
)
from asgi_stream_recorder.recorders.base import Batch
from asgi_stream_recorder.sse import ServerSentEvent, SSEParser

from .servers import serve

pytestmark = pytest.mark.anyio

SECRET_AUTH = "Bearer sk-live-SECRET-TOKEN-4711"
SECRET_COOKIE = "session=COOKIE-SECRET-0815"
HEADERS = {"authorization": SECRET_AUTH, "cookie": SECRET_COOKIE, "x-tenant": "acme"}

Generator = Callable[[Request], AsyncIterator[Any]]


# -- the two transports ------------------------------------------------------------------------------


@dataclass
class Exchange:
    """What the client got: status, headers (lower-case names), the raw body and its events."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes = b""
    events: list[ServerSentEvent] = field(default_factory=list)
    parser: SSEParser = field(default_factory=SSEParser)
    finished: bool = False

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"header {name} sent {len(values)} times"
        return values[0] if values else None

    @property
    def stream_id(self) -> str:
        sid = self.header("x-stream-id")
        assert sid
        return sid

    def blocks(self) -> list[bytes]:
        """The raw event blocks (our server only ever uses LF line endings)."""
        return [b for b in self.raw.split(b"\n\n") if b]

    def took(self, body: bytes) -> None:
        self.raw += body
        self.events.extend(self.parser.feed(body))


class InProcess:
    """Calls the ASGI app directly: ``receive`` gives the request, then blocks until
    :meth:`leave` makes it return ``http.disconnect``; after that, ``send`` raises OSError
    as the ASGI spec says a server does."""

    def __init__(self, app: Any, method: str, path: str, headers: dict[str, str]) -> None:
        self.app = app
        path, _, query = path.partition("?")
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        self.exchange = Exchange()
        self._requested = False
        self._left = anyio.Event()
        self._changed = anyio.Event()

    def leave(self) -> None:
        self._left.set()

    async def receive(self) -> dict[str, Any]:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self._left.is_set():
            raise OSError("client disconnected")
        ex = self.exchange
        if message["type"] == "http.response.start":
            assert ex.status == 0, "response started twice"
            ex.status = message["status"]
            ex.headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message["headers"]]
        elif message["type"] == "http.response.body":
            assert ex.status and not ex.finished
            ex.took(message.get("body", b""))
            ex.finished = not message.get("more_body", False)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_events(self, n: int) -> None:
        while len(self.exchange.events) < n:
            await self._changed.wait()

    async def run(self) -> None:
        await self.app(self.scope, self.receive, self.send)


Watch = Callable[[Exchange], Awaitable[None]]


async def exchange(
    transport: str,
    app: Any,
    *,
    method: str = "GET",
    path: str = "/s",
    headers: dict[str, str] | None = None,
    watch: Watch | None = None,
) -> Exchange:
    """One request, read to its end. ``watch`` is awaited after every read of the body."""
    with anyio.fail_after(10):
        if transport == "inprocess":
            call = InProcess(app, method, path, headers or {})
            if watch is None:
                await call.run()
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call.run)
                    while not call.exchange.finished:
                        await call._changed.wait()
                        await watch(call.exchange)
            assert call.exchange.finished, "the app returned without ending the body"
            return call.exchange
        ex = Exchange()
        async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
            async with client.stream(method, url + path, headers=headers) as response:
                ex.status = response.status_code
                ex.headers = [(k.decode().lower(), v.decode()) for k, v in response.headers.raw]
                async for body in response.aiter_raw():
                    ex.took(body)
                    if watch is not None:
                        await watch(ex)
            ex.finished = True
        return ex


def app_for(generator: Generator, method: str = "GET", **options: Any) -> Starlette:
    return Starlette(routes=[Route("/s", recorded_stream(**options)(generator), methods=[method])])


@pytest.fixture(params=["server", "inprocess"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def recorder(tmp_path: Path) -> AsyncIterator[SQLiteRecorder]:
    rec = SQLiteRecorder(tmp_path / "streams.db")
    async with rec:
        yield rec


async def final_record(recorder: SQLiteRecorder, stream_id: str) -> StreamRecord:
    with anyio.fail_after(5):
        await recorder.flush()
        record = await recorder.get(stream_id)
    assert record is not None, "the stream was not recorded"
    return record


def data_events(ex: Exchange) -> list[ServerSentEvent]:
    return [e for e in ex.events if e.event != "error"]


def assert_done(ex: Exchange) -> None:
    """A completed stream's last event is ``event: done`` naming it, in a block without an ``id``
    line: the id a client resumes from stays on the last chunk."""
    *data, done = ex.events
    assert (done.event, done.id) == ("done", None), done
    assert done.text is not None and json.loads(done.text) == {"stream_id": ex.stream_id, "status": "completed"}
    assert not any(line.startswith(b"id:") for line in ex.blocks()[-1].split(b"\n")), ex.blocks()[-1]
    assert all(e.event != "done" for e in data), "more than one done event"
    assert ex.parser.last_event_id == (data[-1].id if data else "")


def assert_sse_response(ex: Exchange) -> None:
    assert ex.status == 200
    assert ex.header("content-type") == "text/event-stream; charset=utf-8"
    cache = ex.header("cache-control")
    assert cache is not None and "no-cache" in cache
    assert ex.header("content-length") is None
    assert ex.header("x-stream-id")


# -- completed --------------------------------------------------------------------------------------


async def test_completed_stream(transport: str, recorder: SQLiteRecorder, tmp_path: Path) -> None:
    seen_scope: list[dict[str, Any]] = []

    def metadata(scope: dict[str, Any]) -> dict[str, Any]:
        seen_scope.append(scope)
        return {"tenant": dict(scope["headers"])[b"x-tenant"].decode(), "model": "tiny"}

    async def generate(request: Request) -> AsyncIterator[Any]:
        yield "Hel"
        yield "lo wörld\n"
        yield {"k": [1, "ü"]}
        yield b"by\xc3\xa9tes"
        yield ServerSentEvent({"name": "lookup"}, event="tool")
        yield "\N{PILE OF POO}"
        current_stream().metadata["usage"] = {"completion_tokens": 6}

    ex = await exchange(transport, app_for(generate, "POST", recorder=recorder, metadata=metadata),
                        method="POST", path="/s?q=1", headers=HEADERS)
    assert_sse_response(ex)

    texts = ["Hel", "lo wörld\n", '{"k":[1,"ü"]}', "byétes", '{"name":"lookup"}', "\N{PILE OF POO}"]
    assert [e.text for e in ex.events[:-1]] == texts
    assert [e.id for e in ex.events[:-1]] == ["1", "2", "3", "4", "5", "6"]
    assert [e.event for e in ex.events[:-1]] == [None, None, None, None, "tool", None]
    assert_done(ex)
    assert all(block.startswith(f"id: {i}\n".encode()) for i, block in enumerate(ex.blocks()[:-1], 1))
    assert len(ex.blocks()) == 7  # the six events, then the done event: no error, no other event

    record = await final_record(recorder, ex.stream_id)
    assert record.status is StreamStatus.COMPLETED
    assert record.error is None
    assert record.content == "Hello wörld\n" + '{"k":[1,"ü"]}' + "byétes" + "\N{PILE OF POO}"  # not the tool event
    assert record.chunk_count == 6
    assert (record.path, record.method) == ("/s", "POST")
    meta = record.metadata
    assert meta["tenant"] == "acme" and meta["model"] == "tiny"
    assert seen_scope and seen_scope[0]["path"] == "/s"
    assert meta["usage"] == {"completion_tokens": 6}
    assert meta["chunk_count"] == 6
    assert meta["char_count"] == sum(map(len, texts))
    assert isinstance(meta["ttft_ms"], (int, float)) and isinstance(meta["duration_ms"], (int, float))
    assert 0 <= meta["ttft_ms"] <= meta["duration_ms"]
    chunks = await recorder.chunks(ex.stream_id)
    assert [(c.seq, c.data, c.event) for c in chunks] == [
        (i, t, "tool" if i == 5 else None) for i, t in enumerate(texts, 1)
    ]

    # request headers are nowhere in the record: not in the record, not in the database file
    await recorder.close()
    with sqlite3.connect(tmp_path / "streams.db") as con:
        dump = "\n".join(con.iterdump())
    assert ex.stream_id in dump and "acme" in dump  # the dump does hold the record
    for secret in ("SECRET-TOKEN-4711", "COOKIE-SECRET-0815"):
        assert secret not in dump
        assert secret not in repr(record)
    assert "authorization" not in dump.lower() and "cookie" not in dump.lower()


async def test_metadata_as_a_plain_dict_is_stored_and_not_shared(transport: str, recorder: SQLiteRecorder) -> None:
    shared = {"feature": "chat", "n": 1}

    async def generate(request: Request) -> AsyncIterator[str]:
        current_stream().metadata["per_request"] = request.query_params["r"]
        yield "x"

    app = app_for(generate, recorder=recorder, metadata=shared)
    first = await exchange(transport, app, path="/s?r=one")
    second = await exchange(transport, app, path="/s?r=two")
    one, two = await final_record(recorder, first.stream_id), await final_record(recorder, second.stream_id)
    assert (one.metadata["feature"], one.metadata["per_request"]) == ("chat", "one")
    assert (two.metadata["feature"], two.metadata["per_request"]) == ("chat", "two")
    assert shared == {"feature": "chat", "n": 1}  # the user's dict is not written into
    assert first.stream_id != second.stream_id


# -- failed -------------------------------------------------------------------------------------------


async def test_generator_raising_fails_the_stream_without_leaking_the_error(
    transport: str, recorder: SQLiteRecorder
) -> None:
    async def generate(request: Request) -> AsyncIterator[str]:
        yield "part"
        yield "ial"
        raise RuntimeError("connection to db://admin:hunter2@db failed")

    ex = await exchange(transport, app_for(generate, recorder=recorder))
    assert_sse_response(ex)
    assert [(e.text, e.id) for e in data_events(ex)] == [("part", "1"), ("ial", "2")]
    assert ex.events[-1].event == "error", "the client was not told the stream failed"
    assert len([e for e in ex.events if e.event == "error"]) == 1
    error_event = ex.events[-1]
    assert b"hunter2" not in ex.raw and b"RuntimeError" not in ex.raw
    assert json.loads(error_event.text or "")["stream_id"] == ex.stream_id

    record = await final_record(recorder, ex.stream_id)
    assert record.status is StreamStatus.FAILED
    assert record.error is not None
    assert "RuntimeError" in record.error and "hunter2" in record.error  # the operator sees it
    assert record.content == "partial"
    assert record.chunk_count == record.metadata["chunk_count"] == 2


@pytest.mark.parametrize(("item", "type_name"), [(42, "int"), (object(), "object"), (1.5, "float"), ({1, 2}, "set")])
async def test_wrong_item_type_fails_with_a_type_error_naming_the_type(
    transport: str, recorder: SQLiteRecorder, item: object, type_name: str
) -> None:
    cleaned_up = anyio.Event()

    async def generate(request: Request) -> AsyncIterator[Any]:
        try:
            yield "fine"
            yield item
            yield "never sent"
        finally:
            cleaned_up.set()

    ex = await exchange(transport, app_for(generate, recorder=recorder))
    assert [e.text for e in data_events(ex)] == ["fine"]
    assert ex.events[-1].event == "error"
    record = await final_record(recorder, ex.stream_id)
    assert record.status is StreamStatus.FAILED
    assert record.error is not None and record.error.startswith("TypeError")
    assert f"builtins.{type_name}" in record.error
    assert record.content == "fine"
    assert cleaned_up.is_set()


async def test_event_with_explicit_id_is_rejected(transport: str, recorder: SQLiteRecorder) -> None:
    async def generate(request: Request) -> AsyncIterator[Any]:
        yield "ok"
        yield ServerSentEvent("mine", id="custom-id")

    ex = await exchange(transport, app_for(generate, recorder=recorder))
    assert [e.text for e in data_events(ex)] == ["ok"]
    assert b"custom-id" not in ex.raw
    assert ex.events[-1].event == "error"
    record = await final_record(recorder, ex.stream_id)
    assert record.status is StreamStatus.FAILED
    assert record.error is not None and "id" in record.error and "ValueError" in record.error
    assert record.content == "ok"


# -- cancelled ---------------------------------------------------------------------------------------------


async def test_client_disconnect_cancels_the_generator_in_process(recorder: SQLiteRecorder) -> None:
    finally_ran = anyio.Event()

    async def generate(request: Request) -> AsyncIterator[str]:
        try:
            for i in range(3):
                yield f"t{i}"
            await anyio.sleep_forever()
        finally:
            finally_ran.set()

    call = InProcess(app_for(generate, recorder=recorder), "GET", "/s", {})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call.run)
            await call.wait_events(3)
            call.leave()
        # the app returned: the generator was stopped, not left running
        assert finally_ran.is_set()
    record = await final_record(recorder, call.exchange.stream_id)
    assert record.status is StreamStatus.CANCELLED
    assert record.content == "t0t1t2"
    assert [c.seq for c in await recorder.chunks(record.id)] == [1, 2, 3]
    assert record.metadata["chunk_count"] == 3
    assert record.metadata["client_disconnected_at_ms"] <= record.metadata["duration_ms"]


async def test_client_disconnect_cancels_the_generator_over_a_real_server(recorder: SQLiteRecorder) -> None:
    finally_ran = anyio.Event()

    async def generate(request: Request) -> AsyncIterator[str]:
        try:
            i = 0
            while True:
                yield f"t{i}"
                i += 1
                await anyio.sleep(0.01)
        finally:
            finally_ran.set()

    parser = SSEParser()
    received: list[str] = []
    with anyio.fail_after(10):
        async with serve(app_for(generate, recorder=recorder)) as url, httpx.AsyncClient(timeout=5) as client:
            async with client.stream("GET", url + "/s") as response:
                stream_id = response.headers["x-stream-id"]
                async for body in response.aiter_raw():
                    received += [e.text or "" for e in parser.feed(body)]
                    if len(received) >= 3:
                        break
            await finally_ran.wait()
            for _ in range(500):  # the end is queued right after the generator's finally
                record = await final_record(recorder, stream_id)
                if record.status is not StreamStatus.STREAMING:
                    break
                await anyio.sleep(0.01)
    assert record.status is StreamStatus.CANCELLED
    # the record holds at least what the client read, as a prefix, in order
    assert record.content.startswith("".join(received))
    assert record.chunk_count == len(await recorder.chunks(stream_id))


# -- pings ------------------------------------------------------------------------------------------------------


async def test_idle_stream_gets_pings_that_are_not_recorded(transport: str, recorder: SQLiteRecorder) -> None:
    async def generate(request: Request) -> AsyncIterator[str]:
        await anyio.sleep(0.3)
        yield "a"
        await anyio.sleep(0.3)
        yield "b"

    ex = await exchange(transport, app_for(generate, recorder=recorder, ping=0.05))
    blocks = ex.blocks()
    pings = [i for i, b in enumerate(blocks) if b == b": ping"]
    *data, done = [i for i, b in enumerate(blocks) if b != b": ping"]
    assert done == len(blocks) - 1  # the done event ends the stream: no ping after it
    assert blocks[data[0]] == b"id: 1\ndata: a" and blocks[data[1]] == b"id: 2\ndata: b"
    assert len(data) == 2
    assert len(pings) >= 4
    assert any(i < data[0] for i in pings) and any(data[0] < i < data[1] for i in pings)
    assert ex.parser.comments == len(pings)
    assert [(e.text, e.id) for e in ex.events[:-1]] == [("a", "1"), ("b", "2")]
    assert_done(ex)

    record = await final_record(recorder, ex.stream_id)
    assert record.status is StreamStatus.COMPLETED
    assert [c.data for c in await recorder.chunks(ex.stream_id)] == ["a", "b"]
    assert record.chunk_count == 2 and record.content == "ab"


async def test_busy_stream_gets_no_pings(transport: str, recorder: SQLiteRecorder) -> None:
    async def generate(request: Request) -> AsyncIterator[str]:
        for i in range(20):
            yield str(i)
            await anyio.sleep(0.01)

    ex = await exchange(transport, app_for(generate, recorder=recorder, ping=0.2))
    assert b"ping" not in ex.raw
    assert [e.text for e in ex.events if e.event != "done"] == [str(i) for i in range(20)]
    assert_done(ex)


# -- the database is off the client's path -----------------------------------------------------------------------


class BlockedSQLite(SQLiteBackend):
    """Every write waits until the test releases it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = anyio.Event()
        self.released = anyio.Event()
        self.completed = 0

    async def write(self, batch: Batch) -> None:
        self.entered.set()
        await self.released.wait()
        await super().write(batch)
        self.completed += 1


async def test_events_reach_the_client_while_the_database_is_blocked(transport: str, tmp_path: Path) -> None:
    blocked = BlockedSQLite(tmp_path / "streams.db")
    recorder = Recorder(blocked, flush_interval=0.01)

    async def generate(request: Request) -> AsyncIterator[str]:
        yield "first"
        with anyio.fail_after(5):
            await blocked.entered.wait()  # the writer is now stuck inside the database
        yield "second"
        yield "third"

    checked: list[int] = []

    async def watch(ex: Exchange) -> None:
        if len(ex.events) == 3 and not checked:
            assert blocked.entered.is_set()
            checked.append(blocked.completed)  # writes completed when the client had all three
            blocked.released.set()

    async with recorder:
        ex = await exchange(transport, app_for(generate, recorder=recorder), watch=watch)
        assert checked == [0], "the client waited for the database"
        record = await final_record(recorder, ex.stream_id)
    assert [e.text for e in ex.events[:-1]] == ["first", "second", "third"]
    assert_done(ex)
    assert record.status is StreamStatus.COMPLETED
    assert record.content == "firstsecondthird"


async def test_comment_and_retry_events_are_sent_but_only_data_is_recorded(
    transport: str, recorder: SQLiteRecorder
) -> None:
    async def generate(request: Request) -> AsyncIterator[Any]:
        yield ServerSentEvent(retry=2500)  # a reconnect hint: no data, no seq
        yield ServerSentEvent(comment="just a comment")
        yield ServerSentEvent("with extras", retry=1000, comment="hi", event="token")
        yield "plain"

    ex = await exchange(transport, app_for(generate, recorder=recorder))
    assert [(e.text, e.id, e.event, e.retry) for e in ex.events[:-1]] == [
        ("with extras", "1", "token", 1000),
        ("plain", "2", None, None),
    ]
    assert_done(ex)
    assert ex.parser.retry == 1000 and ex.parser.comments == 2
    assert b"retry: 2500" in ex.raw
    record = await final_record(recorder, ex.stream_id)
    chunks = await recorder.chunks(ex.stream_id)
    assert [(c.seq, c.data, c.event) for c in chunks] == [(1, "with extras", "token"), (2, "plain", None)]
    assert record.status is StreamStatus.COMPLETED and record.content == "plain"
