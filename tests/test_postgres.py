"""PostgresRecorder's own behaviour, on a real server: its schema and migrations, retry-safe writes,
NUL, LISTEN/NOTIFY, cancels and leases between processes, connections killed and a server restart,
and the errors it gives (no password in them). The shared contract is in ``test_recorders.py``."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

from asgi_stream_recorder import RecorderError, StreamStatus
from asgi_stream_recorder.recorders import postgres
from asgi_stream_recorder.recorders.base import Batch, Segment, StreamEnd, StreamStart
from asgi_stream_recorder.recorders.postgres import SCHEMA_VERSION, PostgresBackend, PostgresRecorder
from asgi_stream_recorder.session import StreamSession

asyncpg = pytest.importorskip("asyncpg")

pytestmark = pytest.mark.anyio

PG_DSN = os.environ.get("ASGI_STREAM_RECORDER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg runs on asyncio only (the trio error is tested below)


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    """A plain asyncpg connection of the test's own, to look at and disturb the server."""
    try:
        con = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        where = urlsplit(PG_DSN).netloc.rpartition("@")[2]  # (no credentials)
        pytest.skip(f"PostgreSQL is not reachable at {where} ({type(exc).__name__}): start it to test PostgresRecorder")
    try:
        yield con
    finally:
        if not con.is_closed():
            await con.close()


@pytest.fixture
async def schema(admin: Any) -> AsyncIterator[str]:
    """A schema of this test's own, dropped afterwards (with a fresh connection: the test may restart the server)."""
    name = f"asr_test_{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        con = await asyncpg.connect(PG_DSN, timeout=10)
        try:
            await con.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await con.close()


@pytest.fixture
async def backend(schema: str) -> AsyncIterator[PostgresBackend]:
    b = PostgresBackend(PG_DSN, schema=schema)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


def seg(sid: str, *items: tuple[int, str, str | None]) -> Segment:
    s = Segment(sid)
    for seq, data, event in items:
        s.add(seq, data, event, float(seq * 10))
    return s


def start(sid: str, created: float = 100.0, owner: str = "me", **meta: Any) -> StreamStart:
    return StreamStart(sid, created, "/p", "POST", dict(meta), None, owner)


def app_name(schema: str) -> str:
    return f"asgi_stream_recorder:{schema}"


async def add(session: StreamSession, text: str, event: str | None = None) -> None:
    session.stamp()
    await session.record(text, event)


async def terminate(admin: Any, schema: str, only_listener: bool = False) -> int:
    """pg_terminate_backend on the recorder's connections (or only its LISTEN one); how many."""
    listen = " AND query LIKE 'LISTEN%'" if only_listener else ""
    return int(await admin.fetchval("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                                    f" WHERE application_name = $1{listen}", app_name(schema)))


async def connections(admin: Any, schema: str) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                                    app_name(schema)))


async def listener_pid(admin: Any, schema: str) -> int | None:
    pid = await admin.fetchval("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                               app_name(schema))
    return None if pid is None else int(pid)


# -- the schema ------------------------------------------------------------------------------------


async def test_schema_is_created_in_the_given_schema_with_its_version(admin: Any, schema: str) -> None:
    rec = PostgresRecorder(PG_DSN, schema=schema)
    async with rec:
        pass
    tables = {r[0] for r in await admin.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)}
    assert tables == {"streams", "chunks", "owners", "cancels", "schema_version"}
    assert [r[0] for r in await admin.fetch(f'SELECT version FROM "{schema}".schema_version')] == [SCHEMA_VERSION]
    indexes = {r[0] for r in await admin.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1", schema)}
    assert {"streams_created", "streams_status", "streams_key"} <= indexes
    assert not await admin.fetchval("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
                                    " AND table_name IN ('streams', 'chunks')")  # nothing leaked elsewhere
    async with PostgresRecorder(PG_DSN, schema=schema):  # reopened as it is
        pass
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".schema_version') == 1
    with pytest.raises(ValueError, match="identifier"):
        PostgresBackend(PG_DSN, schema='x"; DROP TABLE y; --')


async def test_a_newer_schema_is_refused_and_no_connection_is_left(admin: Any, schema: str) -> None:
    await admin.execute(f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".schema_version (version integer);'
                        f' INSERT INTO "{schema}".schema_version VALUES ({SCHEMA_VERSION + 1})')
    rec = PostgresRecorder(PG_DSN, schema=schema)
    with pytest.raises(RecorderError, match=rf"{schema} has version {SCHEMA_VERSION + 1}, newer .* upgrade"):
        await rec.open()
    with anyio.fail_after(5):  # its connection is closed (the server takes a moment to notice)
        while await connections(admin, schema):  # noqa: ASYNC110 - only the server can tell
            await anyio.sleep(0.02)


async def test_recorders_opening_one_new_schema_at_once_all_succeed(admin: Any, schema: str) -> None:
    recorders = [PostgresRecorder(PG_DSN, schema=schema) for _ in range(4)]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for rec in recorders:
                tg.start_soon(rec.open)
    for rec in recorders:
        await rec.close()
    assert [r[0] for r in await admin.fetch(f'SELECT version FROM "{schema}".schema_version')] == [SCHEMA_VERSION]


# -- writes --------------------------------------------------------------------------------------


async def test_a_retried_batch_doubles_nothing(backend: PostgresBackend, admin: Any, schema: str) -> None:
    def batch() -> Batch:  # as a retry would send it again after losing the reply to its commit
        return Batch([start("a"), start("b")], [seg("a", (1, "x", None), (2, "y", "ev")), seg("b", (1, "q", None))],
                     [StreamEnd("b", StreamStatus.COMPLETED, 200.0, None, {"m": 1})])

    await backend.write(batch())
    await backend.write(batch())
    await backend.write(Batch([start("a", created=999.0)], [seg("a", (2, "CHANGED", None), (3, "z", None))], []))
    assert [(c.seq, c.data, c.event) for c in await backend.chunks("a")] == [(1, "x", None), (2, "y", "ev"),
                                                                            (3, "z", None)]
    record = await backend.get("b")
    assert record is not None and (record.status, record.content, record.chunk_count) == (
        StreamStatus.COMPLETED, "q", 1)
    a = await backend.get("a")
    assert a is not None and a.created_at.timestamp() == 100.0  # the first start stays
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".chunks') == 4


@pytest.mark.parametrize("insert", ["unnest", "executemany", "copy"])
async def test_each_way_of_inserting_chunks_stores_the_same_and_is_safe_to_retry(
    backend: PostgresBackend, insert: str
) -> None:
    backend._insert_chunks = getattr(postgres, f"_insert_{insert}")  # (the alternatives bench/ measures)
    batch = Batch([start("plain"), start("named"), start("nul")],
                  [seg("plain", (1, "a", None), (2, "b", None)), seg("named", (1, "c", "ev"), (2, "d", None)),
                   seg("nul", (1, "e", None), (2, "f\x00\\0", "t\x00"))], [])
    for _ in range(2):
        await backend.write(batch)
    assert [[(c.seq, c.data, c.event, c.at_ms) for c in await backend.chunks(sid)] for sid in ("plain", "named", "nul")
            ] == [[(1, "a", None, 10.0), (2, "b", None, 20.0)], [(1, "c", "ev", 10.0), (2, "d", None, 20.0)],
                  [(1, "e", None, 10.0), (2, "f\x00\\0", "t\x00", 20.0)]]


async def test_records_of_a_stream_never_started_fail_the_batch_and_keep_nothing(backend: PostgresBackend) -> None:
    with pytest.raises(ValueError, match="stream zz has records but was never started") as info:
        await backend.write(Batch([start("a")], [seg("a", (1, "x", None)), seg("zz", (1, "y", None))], []))
    assert not backend.is_transient(info.value)
    with pytest.raises(ValueError, match="stream zz"):
        await backend.write(Batch([], [], [StreamEnd("zz", StreamStatus.COMPLETED, 1.0, content="c", chunk_count=0)]))
    assert await backend.get("a") is None and await backend.chunks("a") == []
    await backend.write(Batch([start("a")], [seg("a", (1, "x", None))], []))  # the pool is fine afterwards
    assert [c.data for c in await backend.chunks("a")] == ["x"]


async def test_nul_in_chunks_and_content_round_trips_exactly(admin: Any, schema: str) -> None:
    texts = ["plain", "nul\x00inside", "\x00", "back\\0slash", "\\", "both\\\x00", ""]
    events: list[str | None] = [None, None, "t\x00ool", None, None, None, None]
    async with PostgresRecorder(PG_DSN, schema=schema) as rec:
        session = StreamSession(rec)
        session.begin()
        for text, event in zip(texts, events, strict=True):
            await add(session, text, event)
        await rec.flush()
        live = await rec.get(session.id)  # content computed from the stored chunks while streaming
        assert live is not None and live.status is StreamStatus.STREAMING
        assert (live.content, live.chunk_count) == ("".join(t for t, e in zip(texts, events, strict=True) if e is None),
                                                    len(texts))
        session.end(exhausted=True)
        await rec.flush()
        record = await rec.get(session.id)
        chunks = await rec.chunks(session.id)
        tail = await rec.chunks(session.id, after=2)
        # an end without content freezes the content of the stored chunks, NUL included
        await rec.backend.write(Batch([start("n")], [seg("n", (1, "a\x00", None), (2, "b", None))],
                                      [StreamEnd("n", StreamStatus.COMPLETED, 200.0)]))
        frozen = await rec.get("n")
        assert frozen is not None and (frozen.content, frozen.chunk_count) == ("a\x00b", 2)
    assert [(c.data, c.event) for c in chunks] == list(zip(texts, events, strict=True))
    assert [c.data for c in tail] == texts[2:]
    assert record is not None and record.content == live.content and "unstorable" not in record.metadata
    rows = await admin.fetch(f'SELECT seq, data, escaped FROM "{schema}".chunks WHERE stream_id = $1 ORDER BY seq',
                             session.id)
    assert [r["escaped"] for r in rows] == ["\x00" in t or "\x00" in (e or "") for t, e in zip(texts, events,
                                                                                              strict=True)]
    assert rows[3]["data"] == "back\\0slash"  # rows without NUL are stored as given
    assert await admin.fetchval(f'SELECT escaped FROM "{schema}".streams WHERE id = $1', session.id) is True


async def test_nul_in_metadata_and_labels_changes_only_that_record(schema: str) -> None:
    async with PostgresRecorder(PG_DSN, schema=schema, flush_interval=60) as rec:  # one batch for both
        bad = StreamSession(rec, metadata={"note": "a\x00b", "k\x00": [1, "\x00"]}, path="/p\x00")
        good = StreamSession(rec, metadata={"note": "a\\u0000b"})
        for session in (bad, good):
            session.begin()
            await add(session, "same")
        bad.end(error="bad\x00error")
        good.end(exhausted=True)
        await rec.flush()
        b, g = await rec.get(bad.id), await rec.get(good.id)
        assert rec.stats["write_failures"] == 0
    assert b is not None and g is not None
    assert (b.metadata["note"], b.metadata["k\ufffd"], b.path, b.error) == (
        "a\ufffdb", [1, "\ufffd"], "/p\ufffd", "bad\ufffderror")
    notes = b.metadata["unstorable"]
    assert [n.split(":")[0] for n in notes] == ["path", "error", "$.note", "$ key 'k\ufffd'", "$.k\ufffd[1]"]
    assert all("U+0000 stored as U+FFFD" in n for n in notes)
    assert b.content == g.content == "same"
    assert g.metadata["note"] == "a\\u0000b" and "unstorable" not in g.metadata and g.path is None


async def test_a_record_postgres_refuses_fails_only_its_stream(schema: str, caplog: pytest.LogCaptureFixture) -> None:
    async with PostgresRecorder(PG_DSN, schema=schema, flush_interval=60) as rec:
        bad = StreamSession(rec, id="id-with-\x00")  # no way to store this id
        good = StreamSession(rec)
        for session in (bad, good):
            session.begin()
            await add(session, "x")
            session.end(exhausted=True)
        refused = "3 records could not be written: CharacterNotInRepertoireError"
        with caplog.at_level(logging.ERROR, logger="asgi_stream_recorder"), pytest.raises(RecorderError, match=refused):
            await rec.flush()
        record = await rec.get(good.id)
        assert rec.stats["lost"] == 3  # the bad stream's start, chunk and end
    assert record is not None and (record.status, record.content) == (StreamStatus.COMPLETED, "x")
    assert any("gave up" in r.getMessage() for r in caplog.records)


# -- between processes ---------------------------------------------------------------------------


async def test_notify_wakes_another_backend_at_once_and_a_killed_listener_comes_back(
    backend: PostgresBackend, admin: Any, schema: str
) -> None:
    other = PostgresBackend(PG_DSN, schema=schema)
    await other.connect()
    try:
        with anyio.fail_after(5):
            await backend.wait_for_change(5)  # the first wait returns once it listens
        assert await listener_pid(admin, schema) is not None
        began = anyio.current_time()
        await backend.wait_for_change(0.3)  # nothing changed: the whole timeout
        assert anyio.current_time() - began >= 0.29

        async def woken_after_write(sid: str) -> float:
            """Seconds from another backend's write until ``backend`` wakes (8 if it never does)."""
            written = 0.0

            async def write() -> None:
                nonlocal written
                await anyio.sleep(0.2)
                written = anyio.current_time()
                await other.write(Batch([start(sid)], [], []))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    await backend.wait_for_change(8)
                    while not written:  # (a change announced before the write does not count)
                        await backend.wait_for_change(8)
                    woke = anyio.current_time()
            return woke - written

        assert await woken_after_write("a") < 0.5  # typically under 10 milliseconds

        old = await listener_pid(admin, schema)
        assert await terminate(admin, schema, only_listener=True) == 1
        with anyio.fail_after(5):
            await backend.wait_for_change(8)  # losing the listener wakes the waiter (it may have missed a change)
            while (pid := await listener_pid(admin, schema)) in (None, old):
                await backend.wait_for_change(0.2)  # polls meanwhile, and listens again
        assert pid != old
        assert await woken_after_write("b") < 0.5
    finally:
        await other.close()


async def test_cancel_from_one_recorder_reaches_the_stream_in_another(admin: Any, schema: str) -> None:
    async with PostgresRecorder(PG_DSN, schema=schema) as here, PostgresRecorder(PG_DSN, schema=schema) as there:
        session = StreamSession(here)
        session.begin()
        asked = anyio.Event()
        assert session.live is not None
        session.live.on_cancel = asked.set
        await add(session, "x")
        await here.flush()
        began = anyio.current_time()
        assert await there.cancel(session.id) is True
        with anyio.fail_after(5):
            await asked.wait()
        assert anyio.current_time() - began < 2.0
        session.end(stopped_by_request=True)
        await here.flush()
        assert await there.cancel(session.id) is False  # it has ended
        record = await there.get(session.id)
    assert record is not None and record.status is StreamStatus.CANCELLED
    assert record.metadata["cancelled_by"] == "request"
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".cancels') == 0


async def test_cancel_requests_are_consumed_only_for_the_ids_asked(backend: PostgresBackend) -> None:
    await backend.write(Batch([start("a"), start("b"), start("done")], [],
                              [StreamEnd("done", StreamStatus.COMPLETED, 1.0)]))
    assert await backend.request_cancel("nope") is False
    assert await backend.request_cancel("done") is False
    assert await backend.request_cancel("a") is True and await backend.request_cancel("b") is True
    assert await backend.cancel_requests(["a", "x"]) == ["a"]
    assert await backend.cancel_requests(["a"]) == []
    assert await backend.cancel_requests([]) == []
    await backend.write(Batch([], [], [StreamEnd("b", StreamStatus.CANCELLED, 2.0)]))
    assert await backend.cancel_requests(["b"]) == []  # its end removed the request


# -- leases --------------------------------------------------------------------------------------


async def test_heartbeat_and_recover_end_only_streams_whose_lease_ran_out(
    backend: PostgresBackend, admin: Any, schema: str
) -> None:
    await backend.write(Batch([start("orphan", 50.0, owner="dead", u=1), start("alive", owner="live"),
                               start("done", owner="dead"), start("unknown", 60.0, owner="never-beat"),
                               start("young", 450.0, owner="never-beat")],
                              [seg("orphan", (1, "ab", None), (2, "c", "other"), (3, "d", None))],
                              [StreamEnd("done", StreamStatus.COMPLETED, 1.0)]))
    await backend.heartbeat("dead", 100.0)
    await backend.heartbeat("live", 1000.0)
    await backend.heartbeat("live", 90.0)  # a late, older beat does not move the lease back
    await backend.request_cancel("orphan")
    assert await backend.recover(50.0) == 0
    assert await backend.recover(400.0) == 2  # "orphan" (owner silent since 100) and "unknown" (no owner row)
    owners = dict(await admin.fetch(f'SELECT owner, extract(epoch FROM seen_at)::float8 FROM "{schema}".owners'))
    assert owners == {"live": 1000.0}  # a silent owner running nothing is forgotten
    rec = await backend.get("orphan")
    assert rec is not None
    assert (rec.status, rec.error, rec.content, rec.chunk_count) == (
        StreamStatus.INTERRUPTED, "process ended mid-stream", "abd", 3)
    assert rec.metadata == {"u": 1, "recovered": True, "duration_ms": 30.0, "chunk_count": 3, "char_count": 4,
                            "ttft_ms": 10.0}
    assert rec.completed_at is not None and rec.completed_at.timestamp() == 50.03
    assert [c.data for c in await backend.chunks("orphan")] == ["ab", "c", "d"]
    assert await backend.cancel_requests(["orphan"]) == []
    statuses = {r.id: r.status for r in await backend.list_streams()}
    assert statuses == {"orphan": StreamStatus.INTERRUPTED, "unknown": StreamStatus.INTERRUPTED,
                        "alive": StreamStatus.STREAMING, "done": StreamStatus.COMPLETED,
                        "young": StreamStatus.STREAMING}
    assert await backend.recover(2000.0) == 2  # "alive" and "young" are past their leases too now
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".owners') == 0


async def test_sweepers_at_once_end_each_stream_once(backend: PostgresBackend, schema: str) -> None:
    n = 300
    await backend.write(Batch([start(f"s{i}", 10.0, owner=f"dead{i % 7}") for i in range(n)],
                              [seg(f"s{i}", (1, "x", None)) for i in range(n)], []))
    sweepers = [PostgresBackend(PG_DSN, schema=schema) for _ in range(3)]
    counts: list[int] = []
    try:
        for sweeper in sweepers:
            await sweeper.connect()

        async def sweep(b: PostgresBackend) -> None:
            counts.append(await b.recover(100.0))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for sweeper in [*sweepers, backend]:
                    tg.start_soon(sweep, sweeper)
    finally:
        for sweeper in sweepers:
            await sweeper.close()
    assert sum(counts) == n, counts
    records = await backend.list_streams(limit=n)
    assert all(r.status is StreamStatus.INTERRUPTED and r.content == "x" for r in records) and len(records) == n


# -- failures ------------------------------------------------------------------------------------


async def _stream(rec: PostgresRecorder, k: int, n: int, pause: float) -> str:
    session = StreamSession(rec, metadata={"k": k})
    session.begin()
    for i in range(n):
        await add(session, f"{k}:{i};")
        await anyio.sleep(pause)
    session.end(exhausted=True)
    return session.id


async def _check_all(rec: PostgresRecorder, ids: list[str], n: int) -> None:
    for sid in ids:
        record = await rec.get(sid)
        assert record is not None and record.status is StreamStatus.COMPLETED
        k = record.metadata["k"]
        assert record.content == "".join(f"{k}:{i};" for i in range(n)) and record.chunk_count == n
        assert [c.seq for c in await rec.chunks(sid)] == list(range(1, n + 1))  # none lost, none doubled


async def test_killing_every_connection_under_load_loses_and_doubles_nothing(admin: Any, schema: str) -> None:
    n_streams, n_chunks = 20, 300
    ids: list[str] = []
    kills = 0
    rec = PostgresRecorder(PG_DSN, schema=schema, flush_interval=0.005, max_wait=None)
    async with rec:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as load:

                async def one(k: int) -> None:
                    ids.append(await _stream(rec, k, n_chunks, 0.003))

                for k in range(n_streams):
                    load.start_soon(one, k)
                while len(ids) < n_streams:  # every connection, every 50 ms, until the streams end
                    await anyio.sleep(0.05)
                    kills += await terminate(admin, schema)
            await rec.flush(timeout=30)
        await _check_all(rec, ids, n_chunks)
        stats = rec.stats
    assert kills >= 10 and stats["write_failures"] >= 1  # some kill hit a write: it was retried
    assert stats["lost"] == 0 and stats["dropped"] == 0
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".chunks') == n_streams * n_chunks


def _cluster() -> tuple[str, str] | None:
    """(version, name) of the local Debian cluster serving the tests, if this process may restart it."""
    if shutil.which("pg_ctlcluster") is None or os.geteuid() != 0 or not os.path.isdir("/etc/postgresql"):
        return None
    versions = sorted(os.listdir("/etc/postgresql"))
    return (versions[-1], "main") if versions else None


def _ctl(cluster: tuple[str, str], action: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, action], check=True, timeout=60,
                   capture_output=True)


async def _until_accepting(timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                con = await asyncpg.connect(PG_DSN, timeout=2)
            except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
                await anyio.sleep(0.2)
                continue
            await con.close()
            return


async def test_a_server_restart_mid_load_loses_no_acknowledged_chunk(schema: str) -> None:
    cluster = _cluster()
    if cluster is None or "127.0.0.1" not in PG_DSN:
        pytest.skip("restarting PostgreSQL needs root, pg_ctlcluster and the local server")
    n_streams, n_chunks = 10, 400
    ids: list[str] = []
    rec = PostgresRecorder(PG_DSN, schema=schema, flush_interval=0.01, max_wait=None)
    try:
        async with rec:
            with anyio.fail_after(120):
                async with anyio.create_task_group() as load:

                    async def one(k: int) -> None:
                        ids.append(await _stream(rec, k, n_chunks, 0.005))

                    for k in range(n_streams):
                        load.start_soon(one, k)
                    await anyio.sleep(0.3)
                    await rec.flush()  # acknowledged: durable from here on
                    acked = rec.stats["written"]
                    await anyio.to_thread.run_sync(_ctl, cluster, "restart")
                await rec.flush(timeout=60)  # the writer retried through the outage
            await _check_all(rec, ids, n_chunks)
            stats = rec.stats
            assert stats["lost"] == 0 and stats["dropped"] == 0 and stats["write_failures"] >= 1 and acked > 0
            after = await asyncpg.connect(PG_DSN, timeout=5)  # (the restart closed the test's own too)
            try:
                with anyio.fail_after(10):  # and its listener is back
                    while await listener_pid(after, schema) is None:
                        await rec.backend.wait_for_change(0.2)
            finally:
                await after.close()
    finally:
        listed = await anyio.run_process(["pg_lsclusters", "-h"], check=False)
        if b"online" not in listed.stdout:
            await anyio.to_thread.run_sync(_ctl, cluster, "start")
        await _until_accepting()


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dsn", ["postgresql://postgres:Sup3r-s3cret@127.0.0.1:1/test",
                                 "postgresql://postgres@127.0.0.1:1/test?password=Sup3r-s3cret"])
async def test_an_unreachable_server_names_where_but_never_the_password(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    rec = PostgresRecorder(dsn, schema="asr_test_unreachable", command_timeout=3)
    assert "Sup3r-s3cret" not in repr(rec) + repr(rec.backend) and "***" in repr(rec)
    with caplog.at_level(logging.DEBUG), anyio.fail_after(10), pytest.raises(RecorderError) as info:
        await rec.open()
    assert "cannot connect to PostgreSQL at postgresql://postgres" in str(info.value)
    assert "@127.0.0.1:1/test" in str(info.value)
    shown = "".join(traceback.format_exception(info.value)) + caplog.text + repr(info.value)
    assert "Sup3r-s3cret" not in shown


async def test_transient_and_permanent_errors(backend: PostgresBackend) -> None:
    errors = asyncpg.exceptions
    transient = [errors.AdminShutdownError("terminating connection due to administrator command"),
                 errors.CannotConnectNowError("the database system is starting up"),
                 errors.TooManyConnectionsError("too many"), errors.SerializationError("x"),
                 errors.DeadlockDetectedError("x"), errors.LockNotAvailableError("x"),
                 errors.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
                 errors.InterfaceError("connection is closed"), errors.ReadOnlySQLTransactionError("x"),
                 errors.DiskFullError("x"), ConnectionRefusedError(), TimeoutError()]
    permanent = [errors.CharacterNotInRepertoireError("x"), errors.UniqueViolationError("x"),
                 errors.DataError("invalid input for query argument"), errors.InterfaceError("pool is closed"),
                 errors.UndefinedTableError("x"), ValueError("x")]
    assert [e for e in transient if not backend.is_transient(e)] == []
    assert [e for e in permanent if backend.is_transient(e)] == []
    # a connection lost mid-transaction surfaces as whatever the clean-up after it raised
    cleanup = errors.InterfaceError("cannot perform operation: another operation is in progress")
    cleanup.__context__ = errors.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    assert backend.is_transient(cleanup)


async def test_a_closed_backend_refuses(schema: str) -> None:
    b = PostgresBackend(PG_DSN, schema=schema)
    with pytest.raises(RuntimeError, match="closed"):
        await b.get("a")
    await b.connect()
    await b.close()
    with pytest.raises(RuntimeError, match="closed"):
        await b.write(Batch([start("a")], [], []))
    with anyio.fail_after(2):
        await b.wait_for_change(0.01)  # just waits


def test_without_asyncpg_the_module_imports_and_connect_says_what_to_install() -> None:
    code = (
        "import sys, asyncio; sys.modules['asyncpg'] = None\n"
        "from asgi_stream_recorder.recorders import PostgresRecorder\n"
        f"rec = PostgresRecorder({PG_DSN!r})\n"
        "try:\n    asyncio.run(rec.open())\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("RecorderError PostgresRecorder needs asyncpg: "
                                   "pip install 'asgi-stream-recorder[postgres]'")


def test_on_trio_connect_says_asyncpg_needs_asyncio() -> None:
    async def main() -> None:
        with pytest.raises(RecorderError, match="asyncpg runs on asyncio only") as info:
            await PostgresRecorder(PG_DSN, schema="asr_test_trio").open()
        assert "SQLiteRecorder" in str(info.value)

    began = time.monotonic()
    anyio.run(main, backend="trio")
    assert time.monotonic() - began < 5
