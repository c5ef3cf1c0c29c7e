"""RedisRecorder's own behaviour, on the real Redis (``ASGI_STREAM_RECORDER_TEST_REDIS``, default
``redis://127.0.0.1:6379/0``): its key layout, retries that double nothing, retention, change
notification and cancels between recorders, leases, lost connections and outages, and the
password kept out of sight. The recorder contract itself is ``test_recorders.py``'s, run over
every backend. Each test keeps its keys under its own prefix and deletes them afterwards."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
import redis
import redis.asyncio
import redis.exceptions

from asgi_stream_recorder import Recorder, RecorderError, RecorderTimeout, StreamStatus
from asgi_stream_recorder.recorders.base import Batch, Segment, StreamEnd, StreamStart, process_owner
from asgi_stream_recorder.recorders.redis import RedisBackend, RedisRecorder
from asgi_stream_recorder.session import StreamSession
from tests.backends import REDIS_URL, require

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client; under trio connect() refuses (tested below)


@pytest.fixture
def prefix() -> Iterator[str]:
    """This test's own key prefix; its keys are deleted afterwards."""
    require("redis")
    name = f"asr-test-{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{name}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def admin() -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client of the test's own, to look at and meddle with the server."""
    require("redis")
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def db(prefix: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    await backend.connect()
    yield backend
    await backend.close()


def seg(sid: str, *items: tuple[int, str, str | None]) -> Segment:
    segment = Segment(sid)
    for seq, data, event in items:
        segment.add(seq, data, event, seq * 10.0)
    return segment


def start(sid: str, created: float = 100.0, owner: str = "me", key: str | None = None) -> StreamStart:
    return StreamStart(sid, created, "/p", "POST", {"u": 1}, None, owner, key, "fmt")


async def stream(recorder: Recorder, chunks: list[str], *, key: str | None = None,
                 events: list[str | None] | None = None, pause: float = 0.0) -> StreamSession:
    """One stream, recorded as the driver records it, ending exhausted."""
    session = StreamSession(recorder, key=key, metadata={"m": "v"})
    session.begin()
    for i, text in enumerate(chunks):
        session.stamp()
        await session.record(text, None if events is None else events[i])
        if pause:
            await anyio.sleep(pause)
    session.end(exhausted=True)
    return session


async def kill(admin: redis.asyncio.Redis, name: str, *, exact: bool = False) -> int:
    """Kill the server's connections whose client name is (or starts with) ``name``; how many."""
    ids = [c["id"] for c in await admin.client_list()
           if (c["name"] == name if exact else c["name"].startswith(name))]
    for cid in ids:
        await admin.client_kill_filter(_id=cid)
    return len(ids)


# -- layout ------------------------------------------------------------------------------------------


async def test_key_layout_is_as_documented(prefix: str, admin: redis.asyncio.Redis) -> None:
    async with RedisRecorder(REDIS_URL, prefix=prefix) as rec:
        done = await stream(rec, ["He", "{}", "llo"], key="conv", events=[None, "tool", None])
        running = StreamSession(rec)
        running.begin()
        await rec.flush()
        await rec.backend.heartbeat(process_owner(), 1234.5)  # (the recorder's own may or may not have come yet)
        keys = {k async for k in admin.scan_iter(match=f"{prefix}*", count=10_000)}
        for sid in (done.id, running.id):  # nothing of theirs outside the prefix
            assert {k async for k in admin.scan_iter(match=f"*{sid}*", count=10_000)} <= keys
        assert keys == {f"{prefix}{name}" for name in (
            "schema", f"s:{done.id}", f"c:{done.id}", f"s:{running.id}", "idx:all", "idx:completed",
            "idx:streaming", "idx:key:conv", "changes", "owners")}
        assert float(await admin.hget(f"{prefix}owners", process_owner())) >= 1234.5  # (or the recorder's, later)
        assert await admin.get(f"{prefix}schema") == "1"
        entries = await admin.xrange(f"{prefix}c:{done.id}")
        assert [(eid, f["d"], f.get("e")) for eid, f in entries] == [
            ("1-0", "He", None), ("2-0", "{}", "tool"), ("3-0", "llo", None)]
        assert all(float(f["t"]) >= 0 for _, f in entries)
        record = await admin.hgetall(f"{prefix}s:{done.id}")
        assert (record["status"], record["content"], record["chunk_count"], record["key"]) == (
            "completed", "Hello", "3", "conv")
        assert "error" not in record and "completed_at" in record and '"m":"v"' in record["metadata"]
        assert await admin.zrange(f"{prefix}idx:all", 0, -1) == [done.id, running.id]
        assert await admin.zrange(f"{prefix}idx:streaming", 0, -1) == [running.id]
        assert await admin.zscore(f"{prefix}idx:completed", done.id) == pytest.approx(done.created_at)
        running.end(exhausted=True)


async def test_two_prefixes_are_isolated(prefix: str) -> None:
    other_prefix = f"{prefix}other:"  # (under the test's prefix, so that it is cleaned up too)
    one, two = RedisBackend(REDIS_URL, prefix=prefix), RedisBackend(REDIS_URL, prefix=other_prefix)
    await one.connect()
    await two.connect()
    try:
        await one.write(Batch([start("same", key="k")], [seg("same", (1, "one", None))], []))
        await two.write(Batch([start("same", key="k")], [seg("same", (1, "two", None), (2, "!", None))],
                              [StreamEnd("same", StreamStatus.FAILED, 200.0, "boom")]))
        assert await one.request_cancel("same") is True
        assert await two.cancel_requests(["same"]) == []
        a, b = await one.get("same"), await two.get("same")
        assert a is not None and (a.status, a.content, a.chunk_count) == (StreamStatus.STREAMING, "one", 1)
        assert b is not None and (b.status, b.content, b.error) == (StreamStatus.FAILED, "two!", "boom")
        assert [r.id for r in await one.list_streams("failed")] == []
        assert [r.id for r in await two.list_streams(key="k")] == ["same"]
        assert await one.cancel_requests(["same"]) == ["same"]
    finally:
        await one.close()
        await two.close()


# -- retries double nothing ---------------------------------------------------------------------------


async def test_a_batch_written_twice_or_overlapping_doubles_nothing(db: RedisBackend, admin: redis.asyncio.Redis,
                                                                    prefix: str) -> None:
    batch = Batch([start("a")], [seg("a", (1, "x", None), (2, "y", "ev"), (4, "z", None))],
                  [StreamEnd("a", StreamStatus.COMPLETED, 200.0, None, {"done": 1})])
    await db.write(batch)
    await db.write(batch)  # a retry
    await db.write(Batch([start("a", 999.0)], [seg("a", (2, "CHANGED", None), (3, "late", None))], []))
    assert await admin.xlen(f"{prefix}c:a") == 3
    assert [(c.seq, c.data, c.event, c.at_ms) for c in await db.chunks("a")] == [
        (1, "x", None, 10.0), (2, "y", "ev", 20.0), (4, "z", None, 40.0)]
    record = await db.get("a")
    # content and count computed server-side from the stored chunks (the end gave none)
    assert record is not None and (record.content, record.chunk_count, record.metadata) == ("xz", 3, {"done": 1})
    assert record.created_at.timestamp() == 100.0 and await admin.zcard(f"{prefix}idx:all") == 1
    # a record of a stream never started is an error of the batch's content, and nothing of it is kept
    with pytest.raises(redis.exceptions.ResponseError, match="stream zz has records but was never started") as info:
        await db.write(Batch([start("b")], [seg("zz", (1, "x", None))], []))
    assert not db.is_transient(info.value) and await db.get("b") is None


class LosesReplies(RedisBackend):
    """Writes, then loses the reply of the first ``lose`` writes (the connection dropped after EXEC)."""

    lose = 3

    async def write(self, batch: Batch) -> None:
        await super().write(batch)
        if self.lose:
            self.lose -= 1
            raise redis.exceptions.ConnectionError("Connection closed by server.")


async def test_a_batch_whose_reply_was_lost_is_retried_without_doubling(prefix: str,
                                                                       admin: redis.asyncio.Redis) -> None:
    backend = LosesReplies(REDIS_URL, prefix=prefix)
    async with Recorder(backend, flush_interval=0.01, batch_size=5) as rec:
        with anyio.fail_after(10):
            session = await stream(rec, [f"w{i} " for i in range(20)], pause=0.002)
            await rec.flush()
        record = await rec.get(session.id)
        stats = rec.stats
    assert stats["write_failures"] == 3 and stats["lost"] == 0 and stats["pending"] == 0
    assert record is not None and (record.status, record.chunk_count) == (StreamStatus.COMPLETED, 20)
    assert record.content == "".join(f"w{i} " for i in range(20))
    assert await admin.xlen(f"{prefix}c:{session.id}") == 20


def test_errors_that_are_worth_retrying() -> None:
    backend = RedisBackend()
    errors = redis.exceptions
    for exc in (errors.ConnectionError("x"), errors.TimeoutError("x"), errors.BusyLoadingError("x"), OSError("x"),
                ConnectionResetError(), TimeoutError(), errors.ReadOnlyError("x"), errors.ResponseError("LOADING x"),
                errors.ResponseError("READONLY x"), errors.ResponseError("TRYAGAIN x"), errors.AuthenticationError()):
        assert backend.is_transient(exc), exc
    for exc in (errors.ResponseError("stream a has records but was never started"), ValueError("NaN"),
                errors.ResponseError("ERR user_script:3: bad argument"), errors.DataError("x")):
        assert not backend.is_transient(exc), exc


# -- retention ---------------------------------------------------------------------------------------


async def test_ttl_expires_finished_streams_not_streaming_ones(prefix: str, admin: redis.asyncio.Redis) -> None:
    db = RedisBackend(REDIS_URL, prefix=prefix, ttl=0.4)
    await db.connect()
    try:
        await db.write(Batch([start("done", 1.0, key="k"), start("live", 2.0, key="k")],
                             [seg("done", (1, "x", None)), seg("live", (1, "y", None))],
                             [StreamEnd("done", StreamStatus.COMPLETED, 3.0, content="x", chunk_count=1)]))
        for name in ("s:done", "c:done"):
            assert 0 < await admin.pttl(f"{prefix}{name}") <= 400
        for name in ("s:live", "c:live"):
            assert await admin.pttl(f"{prefix}{name}") == -1
        assert [r.id for r in await db.list_streams()] == ["live", "done"]
        await anyio.sleep(0.6)
        assert await db.get("done") is None and await db.chunks("done") == []
        assert [r.id for r in await db.list_streams(key="k")] == ["live"]
        assert await db.list_streams("completed") == []
        assert [r.id for r in await db.list_streams()] == ["live"]
        for index in ("idx:all", "idx:completed", "idx:key:k"):  # listing dropped the expired one's members
            assert await admin.zscore(f"{prefix}{index}", "done") is None
        # Without any listing, a later end sweeps the indexes of streams that expired meanwhile.
        await db.write(Batch([start("gone", 4.0, key="g")], [], [StreamEnd("gone", StreamStatus.FAILED, 5.0)]))
        await anyio.sleep(0.6)
        await db.write(Batch([], [], [StreamEnd("live", StreamStatus.COMPLETED, 6.0)]))
        for index in ("idx:all", "idx:failed", "idx:key:g"):
            assert await admin.zscore(f"{prefix}{index}", "gone") is None
        assert await admin.zrange(f"{prefix}idx:expiry", 0, -1) == ['["live","completed","k"]']
        live = await db.get("live")
        assert live is not None and live.status is StreamStatus.COMPLETED
    finally:
        await db.close()
    with pytest.raises(ValueError, match="ttl"):
        RedisBackend(ttl=0)


# -- between recorders: change notification and cancels ---------------------------------------------------


async def test_wait_for_change_wakes_when_another_backend_writes_and_survives_client_kill(
    db: RedisBackend, prefix: str, admin: redis.asyncio.Redis
) -> None:
    other = RedisBackend(REDIS_URL, prefix=prefix)
    await other.connect()
    try:
        with anyio.fail_after(5):
            began = time.perf_counter()
            await db.wait_for_change(0.2)  # nothing happens: it waits out its timeout
            assert 0.2 <= time.perf_counter() - began < 0.5
        await other.write(Batch([start("a")], [], []))
        with anyio.fail_after(5):
            await db.wait_for_change(10)  # that write: reported at once
        for round_ in range(3):
            woke_after: list[float] = []

            async def waiter(woke_after: list[float] = woke_after) -> None:
                await db.wait_for_change(10)
                woke_after.append(time.perf_counter())

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter)
                    await anyio.sleep(0.1)
                    if round_:  # its blocked connection is killed: it reconnects and reads on
                        assert await kill(admin, f"asr:{prefix}listen", exact=True) == 1
                        await anyio.sleep(0.1)
                    assert not woke_after
                    await other.write(Batch([], [seg("a", (round_ + 1, "x", None))], []))
                    wrote = time.perf_counter()
            assert woke_after[0] - wrote < 0.1  # well under the timeout (about a millisecond)
    finally:
        await other.close()


async def test_cancel_from_one_recorder_reaches_the_stream_in_another(prefix: str) -> None:
    async with RedisRecorder(REDIS_URL, prefix=prefix) as here, RedisRecorder(REDIS_URL, prefix=prefix) as elsewhere:
        session = StreamSession(here)
        session.begin()
        assert session.live is not None
        asked = anyio.Event()
        session.live.on_cancel = asked.set
        with anyio.fail_after(10):
            await here.flush()
            await anyio.sleep(0.3)  # the owner's watcher is blocked waiting for changes
            began = time.perf_counter()
            assert await elsewhere.cancel(session.id) is True
            await asked.wait()
            assert time.perf_counter() - began < 0.5
        assert await here.backend.cancel_requests([session.id]) == []  # consumed
        assert session.end(stopped_by_request=True) is StreamStatus.CANCELLED
        await here.flush()
        assert await elsewhere.cancel(session.id) is False  # over
        assert await elsewhere.backend.request_cancel("nosuch") is False
        record = await elsewhere.get(session.id)
        assert record is not None and record.metadata["cancelled_by"] == "request"


# -- leases ---------------------------------------------------------------------------------------------


async def test_recover_ends_streams_whose_lease_ran_out(db: RedisBackend, prefix: str,
                                                        admin: redis.asyncio.Redis) -> None:
    now = time.time()
    await db.heartbeat("dead", now - 100)
    await db.heartbeat("live", now)
    await db.write(Batch([start("orphan", now - 100, owner="dead"), start("alive", now - 100, owner="live"),
                          start("fresh", now, owner="unheard-of"), start("old", now - 101, owner="unheard-of"),
                          start("done", now - 100, owner="dead")],
                         [seg("orphan", (1, "ab", None), (2, "c", "other"), (3, "d", None))],
                         [StreamEnd("done", StreamStatus.COMPLETED, now - 99)]))
    assert await db.request_cancel("orphan") is True
    assert await db.recover(now - 30) == 2
    orphan = await db.get("orphan")
    assert orphan is not None
    assert (orphan.status, orphan.error, orphan.content, orphan.chunk_count) == (
        StreamStatus.INTERRUPTED, "process ended mid-stream", "abd", 3)
    assert orphan.metadata == {"u": 1, "recovered": True, "duration_ms": 30.0, "chunk_count": 3, "char_count": 4,
                               "ttft_ms": 10.0}
    old = await db.get("old")
    assert old is not None and (old.status, old.chunk_count) == (StreamStatus.INTERRUPTED, 0)
    for sid, status in (("alive", StreamStatus.STREAMING), ("fresh", StreamStatus.STREAMING),
                        ("done", StreamStatus.COMPLETED)):
        record = await db.get(sid)
        assert record is not None and record.status is status
    assert await db.cancel_requests(["orphan"]) == []  # the end took its request away
    assert await admin.hgetall(f"{prefix}owners") == {"live": repr(now)}  # the stale owner forgotten
    assert [r.id for r in await db.list_streams("interrupted")] == ["orphan", "old"]
    assert await db.recover(now - 30) == 0


async def test_sweepers_at_once_end_each_stream_once(db: RedisBackend, prefix: str) -> None:
    long_ago = time.time() - 100
    n = 30
    await db.write(Batch([start(f"s{i}", long_ago + i, owner="dead") for i in range(n)],
                         [seg(f"s{i}", *[(k, f"{i}.{k}", None) for k in range(1, 6)]) for i in range(n)], []))
    sweepers = [RedisBackend(REDIS_URL, prefix=prefix) for _ in range(4)]
    for sweeper in sweepers:
        await sweeper.connect()
    try:
        with anyio.fail_after(10):
            counts = await asyncio.gather(*(s.recover(time.time() - 30) for s in sweepers))
    finally:
        for sweeper in sweepers:
            await sweeper.close()
    assert sum(counts) == n  # a stream ended twice would count twice
    records = await db.list_streams(limit=-1)
    assert len(records) == n
    for r in records:
        assert (r.status, r.chunk_count, r.metadata["chunk_count"]) == (StreamStatus.INTERRUPTED, 5, 5)
        assert r.content == "".join(f"{r.id[1:]}.{k}" for k in range(1, 6))


# -- lost connections and outages --------------------------------------------------------------------------


async def test_connections_killed_over_and_over_lose_and_double_nothing(prefix: str,
                                                                        admin: redis.asyncio.Redis) -> None:
    n_streams, n_chunks = 20, 300
    rec = RedisRecorder(REDIS_URL, prefix=prefix, batch_size=50, flush_interval=0.002)
    expected: dict[str, str] = {}
    killed = 0

    async def one(k: int) -> None:
        chunks = [f"{k}:{i};" for i in range(n_chunks)]
        session = await stream(rec, chunks, pause=0.003)
        expected[session.id] = "".join(chunks)

    async def killer(done: anyio.Event) -> None:
        nonlocal killed
        while not done.is_set():
            killed += await kill(admin, f"asr:{prefix}")
            await anyio.sleep(0.02)

    async with rec:
        with anyio.fail_after(60):
            done = anyio.Event()
            async with anyio.create_task_group() as outer:
                outer.start_soon(killer, done)
                async with anyio.create_task_group() as tg:
                    for k in range(n_streams):
                        tg.start_soon(one, k)
                await rec.flush()
                done.set()
        assert rec.stats["dropped"] == 0 and rec.stats["lost"] == 0
        assert killed >= 20, killed
        assert len(expected) == n_streams
        for sid, content in expected.items():
            record = await rec.get(sid)
            assert record is not None and record.status is StreamStatus.COMPLETED
            assert [c.seq for c in await rec.chunks(sid)] == list(range(1, n_chunks + 1))
            assert (record.content, record.chunk_count) == (content, n_chunks)
            assert await admin.xlen(f"{prefix}c:{sid}") == n_chunks


class Proxy:
    """A TCP proxy to Redis that the test can take down and bring back (an outage)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


async def test_an_outage_loses_nothing_and_waiting_just_sleeps(prefix: str) -> None:
    parts = urlsplit(REDIS_URL)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    await proxy.up()
    auth = parts.netloc.rpartition("@")[0]
    url = urlunsplit((parts.scheme, f"{auth}{'@' if auth else ''}127.0.0.1:{proxy.port}", parts.path, parts.query, ""))
    async with RedisRecorder(url, prefix=prefix, flush_interval=0.01) as rec:
        with anyio.fail_after(20):
            session = StreamSession(rec)
            session.begin()
            for i in range(10):
                session.stamp()
                await session.record(f"{i},", None)
            await rec.flush()
            await proxy.down()
            for i in range(10, 30):
                session.stamp()
                await session.record(f"{i},", None)
            session.end(exhausted=True)
            began = time.perf_counter()
            await rec.backend.wait_for_change(0.3)  # Redis cannot be reached: it sleeps, quietly
            assert 0.3 <= time.perf_counter() - began < 1.0
            await anyio.sleep(0.3)
            assert rec.stats["write_failures"] > 0 and rec.stats["pending"] > 0
            await proxy.up()
            await rec.flush()
        record = await rec.get(session.id)
    await proxy.down()
    assert record is not None and record.status is StreamStatus.COMPLETED
    assert record.content == "".join(f"{i}," for i in range(30)) and record.chunk_count == 30


def test_a_recorder_reopened_on_a_new_event_loop_reconnects(prefix: str) -> None:
    rec = RedisRecorder(REDIS_URL, prefix=prefix)

    async def first() -> str:
        await rec.ensure_open()  # opened lazily, as the default recorder is, and never closed
        session = await stream(rec, ["one"])
        await rec.flush()
        return session.id

    async def second(first_id: str) -> None:
        await rec.ensure_open()
        session = await stream(rec, ["two"])
        await rec.flush()
        assert [(r.id, r.content) for r in await rec.list_streams()] == [(session.id, "two"), (first_id, "one")]
        await rec.close()

    first_id = anyio.run(first, backend="asyncio")
    anyio.run(second, first_id, backend="asyncio")


# -- errors, and the password kept out of sight ----------------------------------------------------------


async def test_unreachable_server_is_a_clear_error_quickly() -> None:
    backend = RedisBackend("redis://:hunter2-secret@127.0.0.1:1/0", socket_timeout=1.0)
    with anyio.fail_after(5), pytest.raises(RecorderError, match=r"cannot connect to Redis at 127\.0\.0\.1:1") as info:
        await backend.connect()
    assert "hunter2-secret" not in "".join(traceback.format_exception(info.value))
    assert repr(backend) == "RedisBackend('redis://:***@127.0.0.1:1/0', prefix='asr:')"


async def test_the_password_never_shows(prefix: str, admin: redis.asyncio.Redis,
                                        caplog: pytest.LogCaptureFixture) -> None:
    user, password = f"asr-test-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    await admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=[f"{prefix}*"],
                            commands=["+@all"])
    parts = urlsplit(REDIS_URL)
    url = urlunsplit((parts.scheme, f"{user}:{password}@{parts.hostname}:{parts.port or 6379}", parts.path,
                      parts.query, ""))
    caplog.set_level(logging.DEBUG)
    try:
        rec = RedisRecorder(url, prefix=prefix, flush_interval=0.01)
        assert rec.url.startswith(f"redis://{user}:***@")
        assert repr(rec) == f"RedisRecorder(RedisBackend({rec.url!r}, prefix={prefix!r}))"
        async with rec:
            with anyio.fail_after(10):
                await stream(rec, ["a"])
                await rec.flush()
                await admin.acl_setuser(user, enabled=False)  # its connections die, and it cannot log in again
                await kill(admin, f"asr:{prefix}")
                session = await stream(rec, ["b"])
                with pytest.raises(RecorderTimeout):
                    await rec.flush(0.5)
                assert rec.stats["write_failures"]
                stats = str(rec.stats)
                await admin.acl_setuser(user, enabled=True)
                await rec.flush()
            record = await rec.get(session.id)
            assert record is not None and record.content == "b"
        wrong = RedisBackend(url.replace(password, "not-the-password"), prefix=prefix)
        with pytest.raises(RecorderError, match="cannot connect to Redis") as info:
            await wrong.connect()
        error = "".join(traceback.format_exception(info.value))
        query = repr(RedisBackend(f"{REDIS_URL}?password={password}"))
    finally:
        await admin.acl_deluser(user)
    assert "invalid username-password pair" in error and "AuthenticationError" in stats
    assert "password=%2A%2A%2A" in query
    for text in (rec.url, repr(rec.backend), stats, error, query, caplog.text):
        assert password not in text, text


async def test_missing_redis_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(RecorderError) as info:
        await RedisBackend().connect()
    assert str(info.value) == "RedisRecorder needs redis: pip install 'asgi-stream-recorder[redis]'"
    # and the module imports, and its recorder is made, without it
    code = ("import sys; sys.modules['redis'] = None\n"
            "from asgi_stream_recorder import RedisRecorder\n"
            "print(repr(RedisRecorder('redis://cache:6379/1', prefix='app:', ttl=60)))")
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-c", code], check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "RedisRecorder(RedisBackend('redis://cache:6379/1', prefix='app:'))"


def test_under_trio_connect_names_the_trio_backend() -> None:
    async def main() -> Any:
        await RedisBackend(REDIS_URL).connect()

    with pytest.raises(RecorderError, match=r"asyncio only.*trio.*SQLiteRecorder"):
        anyio.run(main, backend="trio")
