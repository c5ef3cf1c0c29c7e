"""The recorder contract, run against every backend: what a stream records is what you read back,
durably, under concurrency, backpressure and a failing database."""

from __future__ import annotations

import enum
import itertools
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_stream_recorder import Recorder, RecorderError, SQLiteRecorder, StreamStatus
from asgi_stream_recorder.recorders import Backend
from asgi_stream_recorder.recorders.base import Batch, Chunk, StreamEnd, StreamRecord, StreamStart
from asgi_stream_recorder.recorders.sqlite import SCHEMA_VERSION
from asgi_stream_recorder.session import StreamSession
from tests.backends import Place, every_kind, place_fixture  # noqa: F401 - fixtures "kind", "place"

pytestmark = pytest.mark.anyio


class Ending(enum.Enum):
    """How a test ends a stream, turned into the facts ``StreamSession.end`` takes."""

    EXHAUSTED = "exhausted"
    RAISED = "raised"
    CLIENT_LEFT = "client_left"
    INTERRUPTED = "interrupted"


def end(session: StreamSession, ending: Ending) -> StreamStatus:
    return session.end(error=RuntimeError("boom") if ending is Ending.RAISED else None,
                       exhausted=ending is Ending.EXHAUSTED, stopped_for_client=ending is Ending.CLIENT_LEFT)


async def add(session: StreamSession, text: str, event: str | None = None) -> None:
    session.stamp()
    await session.record(text, event)


class Layer(Backend):
    """A backend in front of a real one, for tests that make storage misbehave."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) or self.inner.is_transient(exc)

    async def write(self, batch: Batch) -> None:
        await self.inner.write(batch)

    async def get(self, stream_id: str) -> StreamRecord | None:
        return await self.inner.get(stream_id)

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        return await self.inner.chunks(stream_id, after)

    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, key: str | None = None
    ) -> list[StreamRecord]:
        return await self.inner.list_streams(status, limit, key)

    async def heartbeat(self, owner: str, at: float) -> None:
        await self.inner.heartbeat(owner, at)

    async def recover(self, stale_before: float) -> int:
        return await self.inner.recover(stale_before)


def make(place: Place, layer: type[Layer] | None = None, **options: Any) -> Recorder:
    """A recorder on ``place``; ``layer`` puts a deliberately faulty backend in front of the real one."""
    if layer is None:
        return place.recorder(**options)
    return Recorder(layer(place.backend()), **options)


@pytest.fixture
async def recorder(place: Place) -> AsyncIterator[Recorder]:
    rec = make(place)
    async with rec:
        yield rec


async def run_stream(
    recorder: Recorder,
    chunks: list[str],
    ending: Ending = Ending.EXHAUSTED,
    *,
    metadata: dict[str, Any] | None = None,
    path: str | None = "/chat",
    method: str | None = "POST",
    events: list[str | None] | None = None,
    text_event: str | None = None,
) -> StreamSession:
    session = StreamSession(recorder, metadata=metadata, path=path, method=method, text_event=text_event)
    session.begin()
    for i, text in enumerate(chunks):
        await add(session, text, None if events is None else events[i])
    end(session, ending)
    return session


# -- the contract ------------------------------------------------------------------------------


async def test_completed_stream_reads_back_exactly(recorder: Recorder) -> None:
    words = ["Hello", ", ", "wörld", " \N{PILE OF POO}", "\n", ""]
    session = await run_stream(recorder, words, metadata={"model": "m-1", "nested": {"a": [1, 2]}})
    await recorder.flush()

    record = await recorder.get(session.id)
    assert record is not None
    assert record.id == session.id
    assert record.status is StreamStatus.COMPLETED
    assert record.content == "".join(words)
    assert record.chunk_count == len(words)
    assert record.error is None
    assert record.path == "/chat" and record.method == "POST"
    assert record.metadata["model"] == "m-1"
    assert record.metadata["nested"] == {"a": [1, 2]}
    assert record.metadata["chunk_count"] == len(words)
    assert record.metadata["char_count"] == sum(map(len, words))
    assert 0 <= record.metadata["ttft_ms"] <= record.metadata["duration_ms"]
    assert record.completed_at is not None and record.completed_at >= record.created_at

    chunks = await recorder.chunks(session.id)
    assert [(c.stream_id, c.seq, c.data, c.event) for c in chunks] == [
        (session.id, i, w, None) for i, w in enumerate(words, 1)
    ]
    assert all(a.at_ms <= b.at_ms for a, b in itertools.pairwise(chunks))


async def test_content_is_only_the_text_event(recorder: Recorder) -> None:
    session = await run_stream(
        recorder, ["a", "{\"tool\":1}", "b"], events=["token", "tool", "token"], text_event="token"
    )
    await recorder.flush()
    record = await recorder.get(session.id)
    assert record is not None
    assert record.content == "ab"
    assert record.chunk_count == 3
    assert [c.event for c in await recorder.chunks(session.id)] == ["token", "tool", "token"]


async def test_failed_stream_keeps_error_and_partial_content(recorder: Recorder) -> None:
    session = await run_stream(recorder, ["part", "ial"], Ending.RAISED)
    await recorder.flush()
    record = await recorder.get(session.id)
    assert record is not None
    assert record.status is StreamStatus.FAILED
    assert record.error == "RuntimeError: boom"
    assert record.content == "partial"


async def test_chunks_after_is_strictly_greater_and_ordered(recorder: Recorder) -> None:
    session = await run_stream(recorder, [f"c{i}" for i in range(1, 11)])
    await recorder.flush()
    for after in (0, 1, 5, 9, 10, 11):
        got = await recorder.chunks(session.id, after=after)
        assert [c.seq for c in got] == list(range(after + 1, 11))
        assert [c.data for c in got] == [f"c{i}" for i in range(after + 1, 11)]
    assert await recorder.chunks("no-such-stream") == []
    assert await recorder.get("no-such-stream") is None


async def test_list_streams_newest_first_with_status_and_limit(recorder: Recorder) -> None:
    made: list[tuple[str, StreamStatus]] = []
    plan = [Ending.EXHAUSTED, Ending.RAISED, Ending.EXHAUSTED, Ending.CLIENT_LEFT, Ending.EXHAUSTED]
    for ending in plan:
        session = await run_stream(recorder, ["x"], ending)
        made.append((session.id, session.status))
        await anyio.sleep(0.002)  # distinct creation times
    open_session = StreamSession(recorder)
    open_session.begin()
    await recorder.flush()
    newest_first = [open_session.id] + [sid for sid, _ in reversed(made)]

    assert [r.id for r in await recorder.list_streams()] == newest_first
    assert [r.id for r in await recorder.list_streams(limit=2)] == newest_first[:2]
    completed = [sid for sid, st in reversed(made) if st is StreamStatus.COMPLETED]
    assert [r.id for r in await recorder.list_streams(status=StreamStatus.COMPLETED)] == completed
    assert [r.id for r in await recorder.list_streams(status="completed", limit=1)] == completed[:1]
    assert [r.id for r in await recorder.list_streams(status="cancelled")] == [made[3][0]]
    assert [r.id for r in await recorder.list_streams(status=StreamStatus.STREAMING)] == [open_session.id]
    assert all(r.status is StreamStatus.FAILED for r in await recorder.list_streams(status="failed"))
    end(open_session, Ending.EXHAUSTED)


async def test_streaming_record_shows_what_is_written_so_far(recorder: Recorder) -> None:
    session = StreamSession(recorder)
    session.begin()
    for text in ["a", "b"]:
        await add(session, text)
    await recorder.flush()
    record = await recorder.get(session.id)
    assert record is not None
    assert record.status is StreamStatus.STREAMING
    assert (record.content, record.chunk_count, record.completed_at) == ("ab", 2, None)
    end(session, Ending.EXHAUSTED)


async def test_flush_makes_everything_durable(place: Place) -> None:
    # a long interval and a big batch: only flush() can have written it
    rec = make(place, flush_interval=60, batch_size=100_000)
    async with rec:
        session = await run_stream(rec, [str(i) for i in range(100)])
        with anyio.fail_after(5):
            await rec.flush()
        assert rec.stats["pending"] == 0
        record = await rec.get(session.id)
        assert record is not None and record.status is StreamStatus.COMPLETED and record.chunk_count == 100
        other = place.backend()  # visible to any other connection, i.e. committed
        await other.connect()
        try:
            seen = await other.get(session.id)
            assert seen is not None and (seen.status, seen.chunk_count) == (StreamStatus.COMPLETED, 100)
            assert len(await other.chunks(session.id)) == 100
        finally:
            if other is not rec.backend:
                await other.close()
        if place.kind == "sqlite":
            with sqlite3.connect(place.tmp_path / "streams.db") as con:
                assert con.execute("SELECT count(*) FROM chunks WHERE stream_id = ?", (session.id,)).fetchone() == (
                    100,
                )
                assert con.execute("SELECT status FROM streams WHERE id = ?", (session.id,)).fetchone() == (
                    "completed",
                )


async def test_flush_on_a_recorder_never_opened_raises(place: Place) -> None:
    rec = make(place)
    StreamSession(rec).begin()
    with pytest.raises(RecorderError, match="open"), anyio.fail_after(5):
        await rec.flush()


async def test_list_streams_by_key(recorder: Recorder) -> None:
    mine = []
    for i in range(3):
        session = StreamSession(recorder, key="conv-1" if i != 1 else "conv-2")
        session.begin()
        await add(session, f"t{i}")
        end(session, Ending.EXHAUSTED if i else Ending.RAISED)
        if i != 1:
            mine.append(session.id)
        await anyio.sleep(0.002)
    await recorder.flush()
    assert [r.id for r in await recorder.list_streams(key="conv-1")] == mine[::-1]
    assert [r.id for r in await recorder.list_streams(key="conv-1", limit=1)] == mine[-1:]
    assert [r.id for r in await recorder.list_streams("failed", key="conv-1")] == mine[:1]
    assert [r.id for r in await recorder.list_streams("failed", key="conv-2")] == []
    assert await recorder.list_streams(key="nobody") == []
    assert all(r.key == "conv-1" for r in await recorder.list_streams(key="conv-1"))


async def test_survives_close_and_reopen(place: Place) -> None:
    async with make(place) as first:
        session = await run_stream(first, ["dur", "able"], metadata={"user": "u1"})
        live = StreamSession(first, key="k", format="sse")
        live.begin()
        await add(live, "so far")
    async with make(place) as second:
        record = await second.get(session.id)
        chunks = await second.chunks(session.id)
        still = await second.get(live.id)
    assert record is not None
    assert (record.status, record.content, record.chunk_count, record.metadata["user"]) == (
        StreamStatus.COMPLETED, "durable", 2, "u1",
    )
    assert [c.data for c in chunks] == ["dur", "able"]
    assert still is not None and (still.status, still.content, still.key, still.format) == (
        StreamStatus.STREAMING, "so far", "k", "sse")


# -- SQLite specifics ---------------------------------------------------------------------------------


async def test_sqlite_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "db" / "streams.db"
    async with SQLiteRecorder(path) as rec:
        session = await run_stream(rec, ["x"])
    assert path.exists()
    async with SQLiteRecorder(path) as rec:
        assert await rec.get(session.id) is not None


async def test_sqlite_uses_wal_and_sets_user_version(tmp_path: Path) -> None:
    async with SQLiteRecorder(tmp_path / "streams.db"):
        pass
    with sqlite3.connect(tmp_path / "streams.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "streams.db"
    with sqlite3.connect(path) as con:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    rec = SQLiteRecorder(path)
    with pytest.raises(RuntimeError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer") as info:
        await rec.open()
    assert str(path) in str(info.value)


async def test_sqlite_rejects_in_memory_database() -> None:
    with pytest.raises(ValueError, match="MemoryRecorder"):
        SQLiteRecorder(":memory:")


# -- concurrency ----------------------------------------------------------------------------------------


async def test_many_concurrent_streams_lose_and_duplicate_nothing(place: Place) -> None:
    n_streams, n_chunks = 50, 200
    rec = make(place, batch_size=500)
    ids: list[str] = []

    async def one(k: int) -> None:
        session = StreamSession(rec, metadata={"k": k})
        ids.append(session.id)
        session.begin()
        for i in range(n_chunks):
            await add(session, f"{k}:{i};")
            if i % 7 == 0:
                await anyio.lowlevel.checkpoint()  # interleave with the other streams and the writer
        end(session, Ending.EXHAUSTED)

    async with rec:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for k in range(n_streams):
                    tg.start_soon(one, k)
            await rec.flush()
        assert rec.stats["dropped"] == 0
        for sid in ids:
            record = await rec.get(sid)
            assert record is not None
            k = record.metadata["k"]
            assert record.status is StreamStatus.COMPLETED
            assert record.chunk_count == record.metadata["chunk_count"] == n_chunks
            assert record.content == "".join(f"{k}:{i};" for i in range(n_chunks))
            assert [c.seq for c in await rec.chunks(sid)] == list(range(1, n_chunks + 1))
        assert len(await rec.list_streams(limit=1000)) == n_streams
    if place.kind == "sqlite":
        with sqlite3.connect(place.tmp_path / "streams.db") as con:
            assert con.execute("SELECT count(*) FROM chunks").fetchone() == (n_streams * n_chunks,)
    reader = make(place)  # read back through a new connection: the chunks are stored, not held here
    async with reader:
        for sid in ids:
            assert len(await reader.chunks(sid)) == n_chunks


# -- backpressure ---------------------------------------------------------------------------------------------


class Gated(Layer):
    """``write`` waits at a gate until the test opens it."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.gate, self.entered = anyio.Event(), anyio.Event()

    async def write(self, batch: Batch) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().write(batch)


def gated(place: Place, **options: Any) -> tuple[Recorder, Gated]:
    rec = make(place, Gated, **options)
    assert isinstance(rec.backend, Gated)
    return rec, rec.backend


async def test_full_queue_with_max_wait_none_slows_the_generator_and_loses_nothing(place: Place) -> None:
    rec, gate = gated(place, max_pending=5, max_wait=None, flush_interval=0.01)
    produced = 0
    total = 40

    async def generate(session: StreamSession) -> None:
        nonlocal produced
        for i in range(total):
            await add(session, f"t{i} ")
            produced += 1
        end(session, Ending.EXHAUSTED)

    async with rec:
        session = StreamSession(rec)
        session.begin()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(generate, session)
                await gate.entered.wait()  # the first batch is stuck in the database
                await anyio.sleep(0.2)
                assert produced < total, "appends did not wait for room in the full queue"
                stuck_at = produced
                await anyio.sleep(0.1)
                assert produced == stuck_at  # still waiting, not dropping
                gate.gate.set()
            await rec.flush()
        record = await rec.get(session.id)
    assert record is not None
    assert record.status is StreamStatus.COMPLETED
    assert record.chunk_count == total
    assert record.content == "".join(f"t{i} " for i in range(total))
    assert "dropped_chunks" not in record.metadata
    assert rec.stats["dropped"] == 0


async def test_full_queue_with_max_wait_zero_drops_and_counts(
    place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    rec, gate = gated(place, max_pending=5, max_wait=0, flush_interval=0.01)
    total = 30
    async with rec:
        session = StreamSession(rec)
        session.begin()
        with anyio.fail_after(10):
            await gate.entered.wait()  # the start is stuck in the database: the queue fills
            with caplog.at_level(logging.WARNING, logger="asgi_stream_recorder"):
                for i in range(total):
                    await add(session, f"{i},")
            end(session, Ending.EXHAUSTED)
            gate.gate.set()
            await rec.flush()
        record = await rec.get(session.id)
        stored = await rec.chunks(session.id)
    assert record is not None
    dropped = total - len(stored)
    assert 0 < dropped < total
    assert record.status is StreamStatus.COMPLETED
    assert record.metadata["dropped_chunks"] == dropped == rec.stats["dropped"]
    assert record.metadata["chunk_count"] == record.chunk_count == len(stored)
    # what was kept is a prefix, in order, with the seqs the client saw
    assert [c.seq for c in stored] == list(range(1, len(stored) + 1))
    drop_logs = [r for r in caplog.records if r.levelno == logging.WARNING and "dropping chunks" in r.getMessage()]
    assert len(drop_logs) == 1  # once per stream, not once per chunk
    assert session.id in drop_logs[0].getMessage()


# -- a failing database ------------------------------------------------------------------------------------------


class Flaky(Layer):
    """The first ``failures`` writes raise, before (or after) really writing."""

    failures = 3
    after_commit = False
    calls = 0

    async def write(self, batch: Batch) -> None:
        self.calls += 1
        if self.after_commit and self.calls <= self.failures:
            await super().write(batch)
        if self.calls <= self.failures:
            raise sqlite3.OperationalError("database is locked")
        await super().write(batch)


@pytest.mark.parametrize("after_commit", [False, True], ids=["fails-before", "fails-after-commit"])
async def test_failed_writes_are_retried_until_everything_is_written(
    place: Place, after_commit: bool
) -> None:
    rec = make(place, Flaky, flush_interval=0.01)
    assert isinstance(rec.backend, Flaky)
    rec.backend.after_commit = after_commit
    async with rec:
        with anyio.fail_after(10):
            session = await run_stream(rec, [f"w{i}" for i in range(20)])
            await rec.flush()
        record = await rec.get(session.id)
        chunks = await rec.chunks(session.id)
        stats = rec.stats
    assert stats["write_failures"] == 3
    assert "database is locked" in stats["last_error"]
    assert stats["pending"] == 0 and stats["lost"] == 0
    assert record is not None and record.status is StreamStatus.COMPLETED
    assert [c.seq for c in chunks] == list(range(1, 21))  # nothing lost, nothing doubled
    assert record.content == "".join(f"w{i}" for i in range(20))
    assert record.chunk_count == 20


class Broken(Layer):
    async def write(self, batch: Batch) -> None:
        raise sqlite3.OperationalError("disk I/O error")


async def test_close_on_a_broken_database_says_how_much_was_lost(place: Place) -> None:
    rec = make(place, Broken, flush_interval=0.01)
    await rec.open()
    await run_stream(rec, ["a", "b", "c", "d"])  # 1 start + 4 chunks + 1 end
    await anyio.sleep(0.05)
    with anyio.fail_after(5), pytest.raises(RecorderError, match=r"^6 queued records could not be written") as info:
        await rec.close(timeout=0.3)
    assert "disk I/O error" in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert rec.stats["lost"] == 6


# -- leases: streams of processes that stopped beating are ended ------------------------------------------------


async def test_sweep_ends_only_streams_whose_lease_ran_out(recorder: Recorder) -> None:
    now = time.time()
    ids = {name: f"{uuid.uuid4().hex}-{name}" for name in ("silent", "beating", "young", "unknown", "done")}
    owners = {"silent": "host-a:1:x", "beating": "host-b:2:y", "young": "host-a:1:x", "unknown": "host-c:3:z",
              "done": "host-a:1:x"}
    created = {"silent": now - 100, "beating": now - 100, "young": now - 1, "unknown": now - 100, "done": now - 100}
    for name, sid in ids.items():
        recorder.start(StreamStart(sid, created[name], metadata={"user": name}, owner=owners[name]))
    for seq, (text, at) in enumerate([("half ", 10.0), ("way", 20.5)], 1):
        recorder.put_chunk(ids["silent"], seq, text, None, at)
    recorder.finish(StreamEnd(ids["done"], StreamStatus.COMPLETED, now - 90))
    await recorder.flush()
    await recorder.backend.heartbeat("host-a:1:x", now - 100)
    await recorder.backend.heartbeat("host-b:2:y", now - 100)
    await recorder.backend.heartbeat("host-b:2:y", now)  # replaces the earlier beat

    assert await recorder.recover() == 2  # lease 30 s: "silent" (beat 100 s ago) and "unknown" (never beat)
    silent = await recorder.get(ids["silent"])
    assert silent is not None
    assert (silent.status, silent.content, silent.chunk_count) == (StreamStatus.INTERRUPTED, "half way", 2)
    assert silent.error and "mid-stream" in silent.error
    assert silent.metadata["recovered"] is True and silent.metadata["user"] == "silent"
    assert silent.completed_at is not None and abs(silent.completed_at.timestamp() - (now - 100 + 0.0205)) < 0.01
    assert [c.data for c in await recorder.chunks(ids["silent"])] == ["half ", "way"]
    unknown = await recorder.get(ids["unknown"])
    assert unknown is not None and (unknown.status, unknown.chunk_count) == (StreamStatus.INTERRUPTED, 0)
    for name, status in (("beating", StreamStatus.STREAMING), ("young", StreamStatus.STREAMING),
                         ("done", StreamStatus.COMPLETED)):
        record = await recorder.get(ids[name])
        assert record is not None and record.status is status, name
        assert "recovered" not in record.metadata
    assert await recorder.recover() == 0  # each stream is ended once
    # later, nothing heard from either owner for a lease: both remaining streams end
    assert await recorder.backend.recover(now + 31) == 2


async def test_a_running_process_keeps_its_streams_and_a_silent_one_loses_them(place: Place) -> None:
    producer, sweeper = make(place, lease=0.6), make(place, lease=0.6)
    async with sweeper:
        await producer.open()
        kept = StreamSession(producer)
        kept.begin()
        await add(kept, "alive")
        with anyio.fail_after(10):
            await anyio.sleep(1.5)  # well past the lease: the producer's heartbeat keeps it
            assert await sweeper.recover() == 0
            end(kept, Ending.EXHAUSTED)
            await producer.flush()
            record = await sweeper.get(kept.id)
            assert record is not None and record.status is StreamStatus.COMPLETED

            lost = StreamSession(producer)
            lost.begin()
            await add(lost, "then silence")
            await producer.close()  # the producer stops beating with its stream still running: as if killed
            follow = sweeper.follow(lost.id)
            seen = [chunk.data async for chunk in follow]  # ends once a sweep ends the stream
        assert seen == ["then silence"]
        assert follow.status is StreamStatus.INTERRUPTED
        record = await sweeper.get(lost.id)
        assert record is not None and record.metadata["recovered"] is True


async def test_recovered_stream_stays_recovered_across_reopen(place: Place) -> None:
    async with make(place) as rec:
        orphan = StreamSession(rec)
        orphan.begin()
        await add(orphan, "lost?")
    async with make(place, lease=0.2) as rec:
        with anyio.fail_after(5):  # its periodic sweep ends it
            while (record := await rec.get(orphan.id)) is None or not record.finished:  # noqa: ASYNC110
                await anyio.sleep(0.05)
    async with make(place) as rec:
        record = await rec.get(orphan.id)
    assert record is not None
    assert (record.status, record.content, record.chunk_count) == (StreamStatus.INTERRUPTED, "lost?", 1)


def test_lease_must_be_positive() -> None:
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lease"):
            SQLiteRecorder("x.db", lease=bad)


# -- open_recorder: a recorder from a URL ----------------------------------------------------------------------


def test_open_recorder_reads_each_scheme_and_its_options(tmp_path: Path) -> None:
    from asgi_stream_recorder import MemoryRecorder, PostgresRecorder, RedisRecorder, open_recorder

    rel = open_recorder("sqlite:///data/streams.db?lease=5&batch_size=10")
    assert isinstance(rel, SQLiteRecorder) and rel.path == "data/streams.db" and rel.lease == 5.0
    assert rel.stats is not None and rel._writer.policy.batch_size == 10
    absolute = open_recorder(f"sqlite:///{tmp_path}/s.db", flush_interval=0.5)
    assert isinstance(absolute, SQLiteRecorder) and absolute.path == f"{tmp_path}/s.db"
    assert absolute._writer.policy.interval == 0.5
    assert isinstance(open_recorder("memory://"), MemoryRecorder)

    pg = open_recorder("postgresql://app:pw@db.example:5433/app?schema=streams&sslmode=disable&lease=60")
    assert isinstance(pg, PostgresRecorder) and pg.backend.schema == "streams" and pg.lease == 60.0
    assert "schema" not in pg.backend._dsn and "sslmode=disable" in pg.backend._dsn  # the rest is the driver's
    assert "pw" not in repr(pg)
    assert isinstance(open_recorder("postgres://db/app"), PostgresRecorder)

    rd = open_recorder("redis://:pw@cache:6379/2?prefix=app:&ttl=604800")
    assert isinstance(rd, RedisRecorder) and (rd.backend.prefix, rd.backend.ttl) == ("app:", 604800.0)
    assert "pw" not in repr(rd) and "prefix" not in rd.backend._url
    assert isinstance(open_recorder("rediss://cache/0"), RedisRecorder)
    assert RedisRecorder(socket_timeout=1.5).backend.socket_timeout == 1.5


@pytest.mark.parametrize(("url", "words"), [
    ("mysql://db/app", "unknown recorder URL scheme 'mysql:'"),
    ("streams.db", "unknown recorder URL scheme 'streams.db'"),
    ("sqlite://host/x.db", "sqlite:///relative/path.db"),
    ("sqlite:///x.db?timeout=3", "sqlite:///relative/path.db"),
    ("redis://cache/0?ttl=week", "ttl='week' is not a float"),
    ("redis://cache/0?schema=app", "option 'schema' is for postgresql:// and postgres:// recorders, not redis://"),
    ("sqlite:///x.db?prefix=app:", "option 'prefix' is for redis://"),
    ("postgresql://db/app?ttl=60", "option 'ttl' is for redis://"),
    ("memory://?size=3", "a memory recorder URL is memory://"),
])
def test_open_recorder_refuses_what_it_cannot_open(url: str, words: str) -> None:
    from asgi_stream_recorder import open_recorder

    with pytest.raises(ValueError, match=re.escape(words)):
        open_recorder(url)


def test_default_recorder_follows_the_url_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from asgi_stream_recorder import MemoryRecorder, recorders

    monkeypatch.setattr(recorders, "_default", None)
    monkeypatch.setenv("ASGI_STREAM_RECORDER_URL", "memory://")
    assert isinstance(recorders.default_recorder(), MemoryRecorder)
    assert recorders.default_recorder() is recorders.default_recorder()
    monkeypatch.setattr(recorders, "_default", None)
    monkeypatch.delenv("ASGI_STREAM_RECORDER_URL")
    monkeypatch.setenv("ASGI_STREAM_RECORDER_DB", "elsewhere.db")
    default = recorders.default_recorder()
    assert isinstance(default, SQLiteRecorder) and default.path == "elsewhere.db"


async def test_an_open_idle_recorder_listens_for_changes_as_soon_as_someone_follows(place: Place) -> None:
    """A recorder opened for good with no stream of its own sleeps until its next sweep
    (``lease / 3``); a follower of a stream produced elsewhere must wake it to listen to the
    backend at once, not wait for the sweep (that cost followers up to a second per chunk)."""
    producer, follower = make(place), make(place)
    listened = 0
    async with producer, follower:
        inner = follower.backend.wait_for_change

        async def counted(timeout: float) -> None:
            nonlocal listened
            listened += 1
            await inner(timeout)

        follower.backend.wait_for_change = counted  # type: ignore[method-assign]
        await anyio.sleep(0.3)  # the follower's watcher is idle now
        session = StreamSession(producer)
        session.begin()
        await add(session, "a")
        await producer.flush()
        listened = 0
        got: list[str] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def follow() -> None:
                    async for chunk in follower.follow(session.id):
                        got.append(chunk.data)

                tg.start_soon(follow)
                await anyio.sleep(0.6)
                assert listened >= 2, f"the follower's recorder asked the backend for changes {listened} times"
                await add(session, "b")
                end(session, Ending.EXHAUSTED)
                await producer.flush()
    assert got == ["a", "b"]


class Unreadable(Layer):
    """Reads fail (as while the server restarts) until ``readable`` is set."""

    readable = False
    failed = 0

    async def get(self, stream_id: str) -> StreamRecord | None:
        if not self.readable:
            self.failed += 1
            raise sqlite3.OperationalError("server closed the connection unexpectedly")
        return await super().get(stream_id)


async def test_a_follower_rides_out_a_database_outage(place: Place, caplog: pytest.LogCaptureFixture) -> None:
    """A follower of a stream produced elsewhere waits for the database to come back (as the
    writer does), then gets every chunk: it does not end its client's stream at the first
    failed read."""
    producer = make(place)
    follower = Recorder(Unreadable(place.backend()))
    assert isinstance(follower.backend, Unreadable)
    async with producer, follower:
        session = StreamSession(producer)
        session.begin()
        await add(session, "a")
        await producer.flush()
        got: list[str] = []
        with anyio.fail_after(15), caplog.at_level(logging.WARNING, logger="asgi_stream_recorder"):
            async with anyio.create_task_group() as tg:

                async def follow() -> None:
                    async for chunk in follower.follow(session.id):
                        got.append(chunk.data)

                tg.start_soon(follow)
                while follower.backend.failed < 2:  # noqa: ASYNC110 - counts the follower's tries
                    await anyio.sleep(0.05)
                await add(session, "b")
                end(session, Ending.EXHAUSTED)
                await producer.flush()
                follower.backend.readable = True
    assert got == ["a", "b"]
    warnings = [r for r in caplog.records if "cannot read the record" in r.getMessage()]
    assert len(warnings) == 1, "logged once per outage"
