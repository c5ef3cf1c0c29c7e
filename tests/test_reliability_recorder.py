"""Reliability of the recorder and its writer: nothing a stream carries, and nothing the
database does, may stop recording or stall a client.

Each test drives real streams (the in-process testing client, or a real server) into a
real SQLite file in ``tmp_path`` where storage matters, then reads back what was stored.
Every wait is bounded: a recorder that hangs fails the test in seconds.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from asgi_stream_recorder import (
    MemoryRecorder,
    Recorder,
    RecorderError,
    ServerSentEvent,
    SQLiteBackend,
    SQLiteRecorder,
    StreamRecord,
    StreamStatus,
    current_stream,
    recorded_stream,
    stream_app,
)
from asgi_stream_recorder.testing import SSEClient, sse_client

from .servers import free_port, serve

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
LOGGER = "asgi_stream_recorder"
MiB = 1024 * 1024

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


# -- helpers ---------------------------------------------------------------------------------
def token(i: int) -> str:
    return f"tok {i} "


async def flushed(recorder: Recorder, timeout: float = 10.0) -> None:
    """Flush with the recorder's own bound; the outer bound catches a flush that ignores it."""
    with anyio.fail_after(timeout + 5):
        await recorder.flush(timeout=timeout)


@asynccontextmanager
async def opened(recorder: Recorder, close_timeout: float = 3.0) -> AsyncIterator[Recorder]:
    """Open ``recorder``; close it (bounded) on the way out. A close that loses records fails
    a test that otherwise passed; after a failure it is only cleanup."""
    await recorder.open()
    try:
        yield recorder
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(close_timeout + 5), contextlib.suppress(Exception):
            await recorder.close(timeout=close_timeout)
        raise
    with anyio.fail_after(close_timeout + 5):
        await recorder.close(timeout=close_timeout)


@contextmanager
def locked(db: Path) -> Iterator[Callable[[], None]]:
    """Hold ``db`` locked by another connection (``BEGIN EXCLUSIVE``) until ``release()`` or the end."""
    con = sqlite3.connect(db, timeout=10, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    held = True

    def release() -> None:
        nonlocal held
        if held:
            held = False
            con.execute("ROLLBACK")

    try:
        yield release
    finally:
        release()
        con.close()


async def run_stream(client: SSEClient, url: str = "/", **kwargs: Any) -> tuple[str, list[ServerSentEvent]]:
    """One request read to its end: the stream's id and the events the client got."""
    async with client.stream("GET", url, **kwargs) as s:
        events = await s.collect()
    assert s.stream_id, f"GET {url}: no X-Stream-Id header"
    return s.stream_id, events


def completed_data(events: list[ServerSentEvent], stream_id: str | None) -> list[ServerSentEvent]:
    """The data events of a completed stream, once checked that it ended with its ``event: done``
    (naming the stream, status completed, no ``id``)."""
    assert events, "no events"
    done = events[-1]
    assert (done.event, done.id) == ("done", None), events[-3:]
    assert done.text is not None and json.loads(done.text) == {"stream_id": stream_id, "status": "completed"}
    return events[:-1]


async def stored(recorder: Recorder, stream_id: str) -> StreamRecord:
    record = await recorder.get(stream_id)
    assert record is not None, f"stream {stream_id} was not recorded"
    return record


async def assert_all_completed(recorder: Recorder, ids: list[str], content: str) -> None:
    """Flush, then every stream in ``ids`` is stored as completed with ``content``."""
    await flushed(recorder)
    problems = []
    for sid in ids:
        record = await recorder.get(sid)
        if record is None:
            problems.append(f"{sid}: not recorded")
        elif record.status is not StreamStatus.COMPLETED or record.content != content:
            problems.append(f"{sid}: {record.status.value} {record.content!r} error={record.error!r}")
    assert not problems, f"{len(problems)} of {len(ids)} later streams not recorded properly:\n" + "\n".join(problems)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= level]


async def ab(request: Request) -> AsyncIterator[str]:
    yield "a"
    yield "b"


# -- 1. unstorable values never stop recording ------------------------------------------------------
class Opaque:
    """An object no database can hold."""


def _cycle() -> dict[str, Any]:
    d: dict[str, Any] = {"keep": 1}
    d["self"] = d
    return d


def _unstorable(metadata: Mapping[str, Any]) -> list[str]:
    entries = metadata.get("unstorable")
    assert isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries), (
        f"metadata['unstorable'] must list what was changed or dropped: {metadata!r}"
    )
    return entries


def _names(metadata: Mapping[str, Any], name: str) -> None:
    entries = _unstorable(metadata)
    assert any(name in e for e in entries), f"no entry of metadata['unstorable'] names {name!r}: {entries!r}"


def _check_tuple_key(md: Mapping[str, Any]) -> None:
    assert md["keep"] == 1 and md["nested"] == {"ok": 2}, md
    _names(md, "nested")


def _check_cycle(md: Mapping[str, Any]) -> None:
    assert md["keep"] == 1, md
    _names(md, "self")


def _check_surrogate(md: Mapping[str, Any]) -> None:
    assert md["keep"] == 1 and md["prompt"] == "a\ufffdb", md
    _names(md, "prompt")


def _check_set(md: Mapping[str, Any]) -> None:
    assert md["keep"] == 1, md
    assert md["tags"] == ["a", "b", "c"], f"a set is stored as a (sorted) list, not {md['tags']!r}"
    assert md["ids"] == [1, 2, 3], f"a frozenset is stored as a (sorted) list, not {md['ids']!r}"


WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)


def _check_datetime(md: Mapping[str, Any]) -> None:
    assert md["keep"] == 1, md
    assert md["when"] == WHEN.isoformat() == "2024-05-06T07:08:09.123456+00:00", md["when"]
    assert md["day"] == "2024-05-06", md["day"]
    assert md["at"] == "07:08:09", md["at"]


def _check_object(md: Mapping[str, Any]) -> None:
    assert md["keep"] == 1, md
    assert "obj" not in md, f"an arbitrary object is dropped, not stored as {md.get('obj')!r}"
    _names(md, "obj")


def _check_nan(md: Mapping[str, Any]) -> None:
    assert md["keep"] == 1, md
    assert md["score"] is None and md["big"] is None, f"NaN and inf are stored as None: {md!r}"
    _names(md, "score")


#: name -> (the metadata a stream carries, what must be stored, whether something was lost)
UNSTORABLE: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[Mapping[str, Any]], None], bool]] = {
    "tuple_key": (lambda: {"keep": 1, "nested": {("a", 1): "x", "ok": 2}}, _check_tuple_key, True),
    "cycle": (_cycle, _check_cycle, True),
    "lone_surrogate": (lambda: {"keep": 1, "prompt": "a\ud83db"}, _check_surrogate, True),
    "set": (lambda: {"keep": 1, "tags": {"b", "c", "a"}, "ids": frozenset({3, 1, 2})}, _check_set, False),
    "datetime": (lambda: {"keep": 1, "when": WHEN, "day": WHEN.date(), "at": time(7, 8, 9)}, _check_datetime, False),
    "object": (lambda: {"keep": 1, "obj": Opaque()}, _check_object, True),
    "nan": (lambda: {"keep": 1, "score": math.nan, "big": math.inf}, _check_nan, True),
}


def _bad_metadata_app(recorder: Recorder, case: str, via: str) -> ASGIApp:
    """``/bad`` streams carrying the case's metadata (given as a dict, by a callable, or added
    by the generator through ``current_stream()``), ``/good`` plain streams; one recorder."""
    make = UNSTORABLE[case][0]

    async def adds_metadata(request: Request) -> AsyncIterator[str]:
        current_stream().metadata.update(make())
        yield "a"
        yield "b"

    if via == "dict":
        bad = stream_app(ab, recorder=recorder, metadata=make(), ping=None)
    elif via == "callable":
        bad = stream_app(ab, recorder=recorder, metadata=lambda scope: make(), ping=None)
    else:
        bad = stream_app(adds_metadata, recorder=recorder, ping=None)
    good = stream_app(ab, recorder=recorder, ping=None)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await (bad if scope.get("path") == "/bad" else good)(scope, receive, send)

    return app


@pytest.mark.parametrize("via", ["dict", "callable", "generator"])
@pytest.mark.parametrize("case", list(UNSTORABLE))
async def test_unstorable_metadata_is_made_storable_and_recording_goes_on(
    tmp_path: Path, case: str, via: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _, check, lossy = UNSTORABLE[case]
    recorder = SQLiteRecorder(tmp_path / "streams.db")
    app = _bad_metadata_app(recorder, case, via)
    async with opened(recorder), sse_client(app) as client:
        bad_id, events = await run_stream(client, "/bad")
        assert [e.data for e in completed_data(events, bad_id)] == ["a", "b"]
        later = [(await run_stream(client, "/good"))[0] for _ in range(20)]
        await assert_all_completed(recorder, later, "ab")
        record = await stored(recorder, bad_id)
        assert record.status is StreamStatus.COMPLETED, record
        assert record.content == "ab" and record.chunk_count == 2, record
        assert record.metadata["chunk_count"] == 2 and "duration_ms" in record.metadata, record.metadata
        check(record.metadata)
        if lossy:
            assert messages(caplog, logging.WARNING), "what was changed or dropped is logged (WARNING)"


async def test_remote_lone_surrogate_prompt_does_not_stop_recording(tmp_path: Path) -> None:
    """The issue's remote trigger: a JSON body whose prompt is an escaped lone surrogate, stored
    in the stream's metadata by the generator, must not wedge the writer for everyone."""
    recorder = SQLiteRecorder(tmp_path / "streams.db")

    async def chat(request: Request) -> AsyncIterator[str]:
        prompt = (await request.json())["prompt"]
        current_stream().metadata["prompt"] = prompt
        yield "echo"

    app = stream_app(chat, recorder=recorder, methods=["POST"], ping=None)
    bodies = [b'{"prompt":"\\ud83d"}'] + [json.dumps({"prompt": f"hello {i}"}).encode() for i in range(20)]
    ids: list[str] = []
    async with opened(recorder):
        async with serve(app) as url, httpx.AsyncClient(timeout=10) as http:
            for body in bodies:
                response = await http.post(
                    url, content=body, headers={"content-type": "application/json", "accept": "text/event-stream"}
                )
                assert response.status_code == 200, response.text
                assert "data: echo" in response.text, response.text
                ids.append(response.headers["x-stream-id"])
        await assert_all_completed(recorder, ids, "echo")
        first = await stored(recorder, ids[0])
        assert first.metadata["prompt"] == "\ufffd", first.metadata
        _names(first.metadata, "prompt")
        for i, sid in enumerate(ids[1:]):
            assert (await stored(recorder, sid)).metadata["prompt"] == f"hello {i}"


async def test_yielded_lone_surrogate_fails_that_stream_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    recorder = SQLiteRecorder(tmp_path / "streams.db")

    async def source(request: Request) -> AsyncIterator[str]:
        if request.query_params.get("bad"):
            yield "before"
            yield "\ud83d"
            yield "after"
        else:
            yield "a"
            yield "b"

    app = stream_app(source, recorder=recorder, ping=None)
    async with opened(recorder), sse_client(app, raise_app_exceptions=False) as client:
        bad_id, events = await run_stream(client, "/?bad=1")
        assert [e.data for e in events if e.event in (None, "message")] == ["before"], events
        assert events[-1].event == "error", f"the client is told the stream failed: {events!r}"
        later = [(await run_stream(client))[0] for _ in range(20)]
        await assert_all_completed(recorder, later, "ab")
        record = await stored(recorder, bad_id)
        assert record.status is StreamStatus.FAILED, record
        assert record.error and re.search(r"surrogate|utf-?8|unicode", record.error, re.I), record.error
        assert [c.data for c in await recorder.chunks(bad_id)] == ["before"]
        assert record.content == "before" and record.chunk_count == 1, record
        assert messages(caplog, logging.ERROR), "the failure is logged (ERROR)"


# -- 2. a database outage never stalls the client ------------------------------------------------------
async def test_locked_database_never_stalls_the_client(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    n = 300
    recorder = SQLiteRecorder(db, max_pending=50)

    @recorded_stream(recorder=recorder, ping=None)
    async def tokens(request: Request) -> AsyncIterator[str]:
        for i in range(n):
            yield token(i)

    app = Starlette(routes=[Route("/tokens", tokens)])
    async with opened(recorder):
        await flushed(recorder)  # the schema exists and the writer is idle before the outage
        with locked(db) as release:
            async with sse_client(app, timeout=10) as client:
                with anyio.fail_after(10):
                    sid, events = await run_stream(client, "/tokens")
            # the client has every token while the database is still locked
            assert [e.data for e in completed_data(events, sid)] == [token(i) for i in range(n)]
            release()
        await flushed(recorder, 20)
        record = await stored(recorder, sid)
        dropped = record.metadata.get("dropped_chunks", 0)
        assert record.status is StreamStatus.COMPLETED, record
        assert record.chunk_count + dropped == n, (record.chunk_count, record.metadata)
        assert dropped > 0, f"a queue of 50 cannot hold {n} chunks during the outage: {record.metadata}"
        assert recorder.stats["dropped"] >= dropped, recorder.stats
        chunks = await recorder.chunks(sid)
        assert len(chunks) == record.chunk_count
        assert all(c.data == token(c.seq - 1) for c in chunks), "a stored chunk is the token the client got"


@pytest.mark.parametrize("max_wait", [None, 30.0])
async def test_full_queue_of_a_stopped_writer_never_holds_the_stream(max_wait: float | None) -> None:
    """``max_wait`` opts in to waiting for room, but a writer that has stopped (the recorder
    was closed mid-stream) will never make room: past the queue's bound each chunk is dropped
    at once, without spinning or waiting, and the client gets every token."""
    recorder = MemoryRecorder(max_pending=5, max_wait=max_wait)
    n = 50
    go = anyio.Event()

    async def source(request: Request) -> AsyncIterator[str]:
        yield token(0)
        await go.wait()
        for i in range(1, n):
            yield token(i)

    app = stream_app(source, recorder=recorder, ping=None)
    await recorder.open()
    received: list[ServerSentEvent] = []
    async with sse_client(app, raise_app_exceptions=False) as client, client.stream("GET", "/") as s:
        with anyio.fail_after(5):
            async for event in s.events():
                received.append(event)
                if len(received) == 1:
                    # The writer stops while the stream goes on (the chunk being queued as it stops may be lost).
                    with contextlib.suppress(RecorderError):
                        await recorder.close(timeout=2)
                    go.set()
    assert [e.data for e in completed_data(received, s.stream_id)] == [token(i) for i in range(n)]
    assert recorder.stats["dropped"] >= n - 1 - 5, recorder.stats


# -- 3. max_pending_bytes bounds the queue by size -----------------------------------------------------
async def test_max_pending_bytes_drops_huge_chunks_beyond_the_bound(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    n = 8

    def big(i: int) -> str:
        return f"{i:04d}" + "x" * (MiB - 4)

    async def source(request: Request) -> AsyncIterator[str]:
        for i in range(n):
            yield big(i)

    recorder = SQLiteRecorder(db, max_pending_bytes=2 * MiB)
    app = stream_app(source, recorder=recorder, ping=None)
    async with opened(recorder):
        await flushed(recorder)
        with locked(db) as release:
            async with sse_client(app, timeout=10) as client:
                with anyio.fail_after(15):
                    sid, events = await run_stream(client)
            assert [e.data for e in completed_data(events, sid)] == [big(i) for i in range(n)]
            release()
        await flushed(recorder, 20)
        record = await stored(recorder, sid)
        dropped = record.metadata.get("dropped_chunks", 0)
        assert record.status is StreamStatus.COMPLETED, record.status
        assert record.chunk_count + dropped == n, (record.chunk_count, dropped)
        # 2 MiB hold at most two 1 MiB chunks (three counting one already handed to the blocked write)
        assert dropped >= n - 3, f"only {dropped} of {n} chunks of 1 MiB dropped with max_pending_bytes=2 MiB"
        assert recorder.stats["dropped"] >= dropped
        chunks = await recorder.chunks(sid)
        assert [c.seq for c in chunks] == list(range(1, record.chunk_count + 1)), "the later chunks are dropped"
        assert all(c.data == big(c.seq - 1) for c in chunks)


# -- 4. bounded waits -----------------------------------------------------------------------------------
async def test_flush_during_outage_raises_recorder_timeout(tmp_path: Path) -> None:
    from asgi_stream_recorder import RecorderTimeout  # (imported here: new in this release)

    db = tmp_path / "streams.db"
    recorder = SQLiteRecorder(db)
    app = stream_app(ab, recorder=recorder, ping=None)
    async with opened(recorder), sse_client(app) as client:
        await flushed(recorder)
        with locked(db) as release:
            sid, _ = await run_stream(client)
            with anyio.fail_after(0.5 + 2), pytest.raises(RecorderTimeout) as raised:
                await recorder.flush(timeout=0.5)
            assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, RecorderError)
            release()
        await flushed(recorder, 20)  # nothing was lost by the timeout: the stream is written once possible
        record = await stored(recorder, sid)
        assert record.status is StreamStatus.COMPLETED and record.content == "ab", record


async def test_close_during_outage_is_bounded_and_names_the_loss(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    recorder = SQLiteRecorder(db)
    app = stream_app(ab, recorder=recorder, ping=None)
    await recorder.open()
    await flushed(recorder)
    with locked(db):
        async with sse_client(app) as client:
            await run_stream(client)
        with anyio.fail_after(1 + 3), pytest.raises(RecorderError) as raised:
            await recorder.close(timeout=1)
        lost = recorder.stats["lost"]
        assert lost > 0, recorder.stats
        named = re.search(rf"\b{lost}\b", str(raised.value))
        assert named, f"the error names how many records were lost ({lost}): {raised.value}"


@asyncio_only
async def test_sigterm_with_a_locked_database_exits_within_shutdown_timeout(tmp_path: Path) -> None:
    """uvicorn with an open stream and a database another process holds locked: SIGTERM must
    end the process within the middleware's shutdown_timeout (2 s here) and a little more."""
    db = tmp_path / "streams.db"
    shutdown_timeout = 2.0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "REL_REC_DB": str(db), "REL_REC_SHUTDOWN_TIMEOUT": str(shutdown_timeout),
           "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "uvicorn", "--factory", "tests.apps.rel_rec_locked_app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "60"]
    with log_path.open("wb") as log_file:
        proc = await anyio.open_process(args, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    received: list[str] = []
    enough = anyio.Event()

    async def read_stream() -> None:
        with contextlib.suppress(httpx.TransportError):
            async with httpx.AsyncClient(timeout=30) as http, http.stream("GET", f"{url}/stream") as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        received.append(line)
                        if len(received) >= 20:
                            enough.set()

    try:
        with anyio.fail_after(15):
            async with httpx.AsyncClient(timeout=2) as http:
                while True:
                    assert proc.returncode is None, log_path.read_text(errors="replace")
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(f"{url}/health")).status_code == 200:
                            break
                    await anyio.sleep(0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_stream)
            with anyio.fail_after(10):
                while len(received) < 3:  # noqa: ASYNC110 - the reader task only appends
                    await anyio.sleep(0.01)
            with locked(db):
                with anyio.fail_after(10):
                    await enough.wait()  # chunks were produced (and queued) while the file is locked
                proc.send_signal(signal.SIGTERM)
                try:
                    with anyio.fail_after(shutdown_timeout + 3):
                        await proc.wait()
                except TimeoutError:
                    raise AssertionError(
                        f"SIGTERM with a locked database: still running after {shutdown_timeout + 3}s "
                        f"(shutdown_timeout={shutdown_timeout})\n{log_path.read_text(errors='replace')}"
                    ) from None
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(10):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()


# -- 5. the lost counter --------------------------------------------------------------------------------
async def test_lost_records_are_counted_once(tmp_path: Path) -> None:
    """A close that gives up on records stuck behind a lock counts each lost record once, also
    when the write it gave up on fails later (here: the lock goes, but the disk is now full)."""
    n_streams, n_tokens = 3, 4

    async def source(request: Request) -> AsyncIterator[str]:
        for i in range(n_tokens):
            yield token(i)

    with small_disk(tmp_path / "disk") as disk:
        db, filler = disk / "streams.db", disk / "filler"
        recorder = SQLiteRecorder(db)
        app = stream_app(source, recorder=recorder, ping=None)
        await recorder.open()
        await flushed(recorder)
        with locked(db) as release:
            async with sse_client(app) as client:
                ids = [(await run_stream(client))[0] for _ in range(n_streams)]
            with anyio.fail_after(15), pytest.raises(RecorderError) as raised:
                await recorder.close(timeout=0.5)
            lost = recorder.stats["lost"]
            fill(filler)
            release()  # a write still waiting on the lock now fails (disk full): that is no further loss
        with anyio.move_on_after(1):
            while recorder.stats["lost"] == lost:  # noqa: ASYNC110 - stats are plain counters
                await anyio.sleep(0.02)
        assert recorder.stats["lost"] == lost, f"lost counted again after close: {lost} -> {recorder.stats}"
        queued_items = n_streams * (1 + n_tokens + 1)  # each stream's start, chunks and end
        assert lost in (n_streams, queued_items), (
            f"lost={lost}: each lost record counted once ({n_streams} streams, or {queued_items} queued items)"
        )
        assert re.search(rf"\b{lost}\b", str(raised.value)), str(raised.value)
        filler.unlink()
        async with opened(SQLiteRecorder(db)) as fresh:
            for sid in ids:
                assert await fresh.get(sid) is None, "counted lost, yet stored"


# -- 6. records ended by crash recovery -------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens", [5, 0])
async def test_recovered_record_ends_at_its_last_chunk(tmp_path: Path, anyio_backend: str, n_tokens: int) -> None:
    db = tmp_path / "streams.db"
    args = [sys.executable, "-m", "tests.apps.rel_rec_crash_stream", str(db), str(n_tokens), anyio_backend]
    proc = await anyio.open_process(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reader = SQLiteRecorder(db, lease=1.0)  # the same lease as the streaming process
    try:
        with anyio.fail_after(20):
            while not db.exists():  # the other process creates it
                assert proc.returncode is None
                await anyio.sleep(0.02)
        async with opened(reader):
            with anyio.fail_after(20):
                while True:  # until the other process has made the start and all its chunks durable
                    assert proc.returncode is None, "the streaming process died on its own"
                    streams = await reader.list_streams()
                    if streams and len(await reader.chunks(streams[0].id)) == n_tokens:
                        break
                    await anyio.sleep(0.02)
            sid = streams[0].id
            await anyio.sleep(1.5)  # past the lease: the live process's heartbeat keeps its stream
            assert await reader.recover() == 0
            proc.kill()
            with anyio.fail_after(10):
                await proc.wait()
            with anyio.fail_after(5):  # the reader's sweep ends it once its last heartbeat is a lease old
                while not (await stored(reader, sid)).finished:  # noqa: ASYNC110 - a sweep writes it
                    await anyio.sleep(0.1)
            record = await stored(reader, sid)
            chunks = await reader.chunks(sid)
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(10):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()
    assert record.status is StreamStatus.INTERRUPTED and record.metadata.get("recovered") is True, record
    assert [c.data for c in chunks] == [token(i) for i in range(n_tokens)]
    assert record.chunk_count == n_tokens and record.metadata.get("chunk_count") == n_tokens, record
    last_ms = chunks[-1].at_ms if chunks else 0.0
    assert "duration_ms" in record.metadata, record.metadata
    assert abs(record.metadata["duration_ms"] - last_ms) <= 1.0, (record.metadata, last_ms)
    assert record.completed_at is not None
    expected_end = record.created_at + timedelta(milliseconds=last_ms)
    off_ms = abs((record.completed_at - expected_end).total_seconds()) * 1000
    assert off_ms <= 1.0, f"completed_at {record.completed_at} is {off_ms:.0f} ms from the last chunk {expected_end}"


# -- 7. the process owner of a forked worker --------------------------------------------------------------
@pytest.mark.parametrize("method", ["os.fork", "multiprocessing"])
async def test_forked_worker_owns_its_streams(tmp_path: Path, anyio_backend: str, method: str) -> None:
    db, out = tmp_path / "streams.db", tmp_path / "owners.json"
    args = [sys.executable, "-m", "tests.apps.rel_rec_fork_owner", str(db), anyio_backend, method, str(out)]
    with anyio.fail_after(60):
        result = await anyio.run_process(args, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    report = json.loads(out.read_text())
    parent, child = report["parent"], report["child"]
    assert child["pid"] == report["forked_pid"] != parent["pid"]
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        owners = dict(con.execute("SELECT id, owner FROM streams").fetchall())
    finally:
        con.close()
    assert owners[parent["stream"]].split(":")[1] == str(parent["pid"])
    assert owners[child["stream"]].split(":")[1] == str(child["pid"]), (
        f"the child's stream is owned by {owners[child['stream']]!r}, not by the child (pid {child['pid']})"
    )
    assert child["owner"].split(":")[1] == str(child["pid"]), f"process_owner() in the child: {child['owner']}"
    assert child["owner"].split(":")[2:] != parent["owner"].split(":")[2:], "a forked child is a new incarnation"


# -- 8. the SQLite file deleted or replaced under a running recorder -----------------------------------------
def _remove_database(db: Path) -> None:
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)


def _other_database(path: Path) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute("CREATE TABLE other (x)")
        con.execute("INSERT INTO other VALUES (42)")
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
async def test_database_file_deleted_or_replaced_is_reopened(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    db = tmp_path / "streams.db"
    recorder = SQLiteRecorder(db)
    app = stream_app(ab, recorder=recorder, ping=None)
    async with opened(recorder), sse_client(app) as client:
        before = [(await run_stream(client))[0] for _ in range(3)]
        await assert_all_completed(recorder, before, "ab")
        assert not messages(caplog, logging.ERROR)
        if fault == "deleted":
            _remove_database(db)
        else:
            _other_database(tmp_path / "other.db")
            _remove_database(db)  # (its -wal and -shm belong to the old file)
            os.replace(tmp_path / "other.db", db)
        after = [(await run_stream(client))[0] for _ in range(3)]
        await flushed(recorder)
        async with opened(SQLiteRecorder(db)) as fresh:  # what is at the path now holds the later streams
            await assert_all_completed(fresh, after, "ab")
        assert messages(caplog, logging.ERROR), f"the {fault} database file is logged at ERROR"
    if fault == "replaced":
        con = sqlite3.connect(db)
        try:
            assert con.execute("SELECT x FROM other").fetchall() == [(42,)], "written into the new file"
        finally:
            con.close()


# -- 9. a full disk --------------------------------------------------------------------------------------------
@contextmanager
def small_disk(where: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (needs root), unmounted on the way out."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs to fill up (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    with path.open("wb", buffering=0) as f:
        block = b"\0" * 65536
        try:
            while True:
                f.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


async def test_full_disk_reports_the_real_error_and_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with small_disk(tmp_path / "disk") as disk:
        db, filler = disk / "streams.db", disk / "filler"
        recorder = SQLiteRecorder(db)

        async def source(request: Request) -> AsyncIterator[str]:
            for i in range(20):
                yield f"{i:04d}" + "x" * 1020

        app = stream_app(source, recorder=recorder, ping=None)
        content = "".join(f"{i:04d}" + "x" * 1020 for i in range(20))
        async with opened(recorder), sse_client(app) as client:
            first = [(await run_stream(client))[0]]
            await assert_all_completed(recorder, first, content)
            fill(filler)
            during = [(await run_stream(client))[0] for _ in range(5)]
            with anyio.fail_after(15):
                while not recorder.stats["write_failures"]:  # noqa: ASYNC110 - stats are plain counters
                    await anyio.sleep(0.02)
            last_error = str(recorder.stats["last_error"])
            logged = messages(caplog, logging.WARNING)
            assert "database or disk is full" in last_error, recorder.stats
            assert "cannot rollback" not in last_error, recorder.stats
            assert not [m for m in logged if "cannot rollback" in m], logged
            assert [m for m in logged if "database or disk is full" in m], f"the real error is logged: {logged}"
            filler.unlink()
            await assert_all_completed(recorder, during, content)
            after = [(await run_stream(client))[0]]
            await assert_all_completed(recorder, after, content)


# -- 10. no GC-tracked object per queued chunk --------------------------------------------------------------
async def call_asgi(app: ASGIApp, query: bytes = b"") -> str:
    """GET ``/?query`` on ``app`` with a client that keeps nothing it receives; the stream id."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": "/", "raw_path": b"/", "query_string": query,
        "root_path": "", "headers": [(b"host", b"testserver"), (b"accept", b"text/event-stream")],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "extensions": {},
    }
    stream_id = ""
    body_read = False
    ended = anyio.Event()

    async def receive() -> Message:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal stream_id
        if message["type"] == "http.response.start":
            stream_id = dict(message["headers"]).get(b"x-stream-id", b"").decode()
        elif not message.get("more_body", False):
            ended.set()

    with anyio.fail_after(30):
        await app(scope, receive, send)
    assert stream_id
    return stream_id


async def test_queued_chunks_are_not_each_a_gc_tracked_object(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    n = 10_000

    async def source(request: Request) -> AsyncIterator[str]:
        for _ in range(int(request.query_params["n"])):
            yield "tok"

    recorder = SQLiteRecorder(db)
    app = stream_app(source, recorder=recorder, ping=None)
    async with opened(recorder):
        await call_asgi(app, b"n=100")  # warm up: imports, caches, the writer's first batch
        await flushed(recorder)
        with locked(db) as release:  # the queued chunks stay queued: the write cannot happen
            gc.collect()
            gc.disable()
            try:
                before = len(gc.get_objects())
                sid = await call_asgi(app, f"n={n}".encode())
                grown = len(gc.get_objects()) - before
            finally:
                gc.enable()
            release()
        await flushed(recorder, 20)
        record = await stored(recorder, sid)
        assert record.chunk_count == n and not record.metadata.get("dropped_chunks"), record.metadata
    assert grown < 1000, f"{n} queued chunks left {grown} more GC-tracked objects (one per chunk?)"



# -- a busy event loop must not starve the SQLite writer ---------------------------------------------


async def test_sqlite_writes_a_batch_of_many_streams_in_a_few_statements(tmp_path: Path) -> None:
    """Every statement SQLite runs releases the GIL, and while the event loop is busy (a
    thousand streams) the writer thread waits up to the switch interval (5 ms) to get it back
    after each one. One statement per row made a batch of 1,000 streams' starts, segments and
    ends take 15 s under load, the queue filled and chunks were dropped (bench memory, loss
    check). A batch goes in as a few multi-row statements instead, and stays exact."""
    from asgi_stream_recorder.recorders.base import Batch, Segment, StreamEnd, StreamStart

    backend = SQLiteBackend(tmp_path / "s.db")
    await backend.connect()
    try:
        n = 1000
        starts = [StreamStart(f"s{i:04d}", 1.0 + i, metadata={"i": i}) for i in range(n)]
        segments = []
        for i in range(n):
            segment = Segment(f"s{i:04d}")
            for seq in range(1, 4):
                segment.add(seq, f"t{seq} ", "word" if (i, seq) == (7, 2) else None, float(seq))
            segments.append(segment)
        ends = [StreamEnd(f"s{i:04d}", StreamStatus.COMPLETED, 2.0 + i, metadata={"i": i},
                          content="t1 t3 " if i == 7 else "t1 t2 t3 ", chunk_count=3) for i in range(n)]
        statements: list[str] = []
        assert backend._wcon is not None
        backend._wcon.set_trace_callback(statements.append)
        await backend.write(Batch(starts, segments, []))
        await backend.write(Batch([], [], ends))
        backend._wcon.set_trace_callback(None)
        assert len(statements) <= 40, f"{len(statements)} statements for {3 * n} records"
        for i in (0, 7, 999):
            record = await backend.get(f"s{i:04d}")
            assert record is not None and record.status is StreamStatus.COMPLETED
            assert record.metadata == {"i": i} and record.chunk_count == 3
            chunks = await backend.chunks(f"s{i:04d}", 0)
            assert [(c.seq, c.data, c.event) for c in chunks] == [
                (1, "t1 ", None), (2, "t2 ", "word" if i == 7 else None), (3, "t3 ", None)]
        stored = sqlite3.connect(tmp_path / "s.db").execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert stored == 3 * n
        # an end of a stream that never started is still refused, by name
        with pytest.raises(sqlite3.IntegrityError, match="s9999"):
            await backend.write(Batch([], [], [StreamEnd("s0001", StreamStatus.FAILED, 3.0),
                                               StreamEnd("s9999", StreamStatus.FAILED, 3.0)]))
    finally:
        await backend.close()
