"""The writer (``BufferedWriter``) and the two backends, each driven directly: the behaviours a
small slip in their code would change (bounds, wake-ups, deadlines, counts, isolation of a bad
record, schema migration, cancel requests, change notification), asserted by value."""

from __future__ import annotations

import array
import contextlib
import math
import os
import sqlite3
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_stream_recorder import RecorderError, SQLiteRecorder, StreamStatus
from asgi_stream_recorder.recorders import buffered
from asgi_stream_recorder.recorders.base import Backend, Batch, Chunk, Segment, StreamEnd, StreamRecord, StreamStart
from asgi_stream_recorder.recorders.buffered import BufferedWriter, Policy, RecorderTimeout
from asgi_stream_recorder.recorders.memory import MemoryBackend
from asgi_stream_recorder.recorders.sqlite import _SCHEMA_1, _SCHEMA_2, SCHEMA_VERSION, SQLiteBackend
from asgi_stream_recorder.recorders.storable import UNSTORABLE_KEY

pytestmark = pytest.mark.anyio


# -- a backend the writer tests control ------------------------------------------------------------


class Fake(Backend):
    """Records what it is given; fails as told: ``errors`` raised first, in order; the starts of
    ``bad`` streams refused unless salvaged; every write of a ``hopeless`` stream refused."""

    def __init__(self) -> None:
        self.starts: dict[str, StreamStart] = {}
        self.chunks_: list[Chunk] = []
        self.ends: dict[str, StreamEnd] = {}
        self.sizes: list[int] = []  # records per successful write
        self.calls = 0
        self.errors: list[BaseException] = []
        self.always: BaseException | None = None
        self.bad: set[str] = set()
        self.hopeless: set[str] = set()
        self.gate: anyio.Event | None = None
        self.entered: anyio.Event | None = None
        self.segment_ids: dict[str, set[int]] = {}
        self.transient_raises = False

    def is_transient(self, exc: BaseException) -> bool:
        if self.transient_raises:
            raise RuntimeError("is_transient broke")
        return isinstance(exc, OSError)

    async def write(self, batch: Batch) -> None:
        self.calls += 1
        if self.entered is not None:
            self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        if self.always is not None:
            raise self.always
        ids = set(batch.stream_ids())
        if ids & self.hopeless:
            raise ValueError(f"refused {sorted(ids & self.hopeless)}")
        for s in batch.starts:
            if s.id in self.bad and UNSTORABLE_KEY not in s.metadata:
                raise ValueError("bad metadata")
        for s in batch.starts:
            self.starts[s.id] = s
        for seg in batch.segments:
            self.segment_ids.setdefault(seg.stream_id, set()).add(id(seg))
        self.chunks_.extend(batch.chunks)
        for e in batch.ends:
            self.ends[e.id] = e
        self.sizes.append(len(batch))

    async def get(self, stream_id: str) -> StreamRecord | None:
        return None

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        return []

    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, key: str | None = None
    ) -> list[StreamRecord]:
        return []

    async def heartbeat(self, owner: str, at: float) -> None:
        pass

    async def recover(self, stale_before: float) -> int:
        return 0


def writer(fake: Fake | None = None, **policy: Any) -> BufferedWriter:
    return BufferedWriter(fake or Fake(), Policy(**policy))


def put_stream(w: BufferedWriter, sid: str, n: int, *, end: bool = True, meta: dict[str, Any] | None = None) -> None:
    w.put_start(StreamStart(sid, 1000.0, "/p", "GET", dict(meta or {"m": 1})))
    for i in range(1, n + 1):
        assert w.put_chunk(sid, i, f"{sid}{i}", None, float(i))
    if end:
        w.put_end(StreamEnd(sid, StreamStatus.COMPLETED, 1001.0, None, {"chunk_count": n, "x": "y"}, None, n))


async def until(cond: Any, what: str, limit: float = 5.0) -> None:
    with anyio.fail_after(limit):
        while not cond():  # noqa: ASYNC110 - the conditions read plain attributes
            await anyio.sleep(0.005)


@pytest.fixture
async def running() -> AsyncIterator[tuple[BufferedWriter, Fake]]:
    fake = Fake()
    w = BufferedWriter(fake, Policy(interval=60.0))
    w.start()
    yield w, fake
    with anyio.fail_after(10):
        await w.stop(5)


# -- Policy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"batch_size": 0}, {"batch_size": True}, {"batch_size": 1.5}, {"batch_size": "2"},
    {"max_pending": 0}, {"max_pending": True}, {"max_pending_bytes": 0}, {"max_pending_bytes": False},
    {"interval": -0.01}, {"interval": math.nan}, {"interval": "1"},
    {"max_wait": -1}, {"max_wait": math.nan}, {"max_wait": "1"},
])
def test_policy_rejects_invalid_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Policy(**bad)


def test_policy_accepts_the_smallest_valid_values() -> None:
    p = Policy(batch_size=1, max_pending=1, max_pending_bytes=1, interval=0, max_wait=0)
    assert (p.batch_size, p.max_pending, p.max_pending_bytes, p.interval, p.max_wait) == (1, 1, 1, 0, 0)
    assert Policy(max_wait=None).max_wait is None
    assert Policy() == Policy(2000, 0.05, 200_000, 64 * 1024 * 1024, 0.0)


# -- queueing bounds ------------------------------------------------------------------------------


async def test_queue_bounds_are_exact_and_freed_by_a_write() -> None:
    fake = Fake()
    w = writer(fake, max_pending=3, max_pending_bytes=1000, interval=60.0)
    w.put_start(StreamStart("a", 1.0))
    assert [w.put_chunk("a", i, "x", None, 0.0) for i in range(1, 5)] == [True, True, True, False]
    w2 = writer(max_pending=100, max_pending_bytes=6)
    assert [w2.put_chunk("b", i, "abc", None, 0.0) for i in range(1, 4)] == [True, True, False]
    w.start()
    try:
        with anyio.fail_after(5):
            await w.flush(5)
        assert fake.sizes == [4]
        assert w.put_chunk("a", 4, "y", None, 0.0)  # the written chunks no longer count
        assert w.put_chunk("a", 5, "y", None, 0.0)
    finally:
        with anyio.fail_after(10):
            await w.stop(5)
    assert [c.seq for c in fake.chunks_] == [1, 2, 3, 4, 5]


async def test_full_batch_wakes_the_writer_at_once() -> None:
    fake = Fake()
    w = writer(fake, batch_size=3, interval=60.0)
    w.start()
    try:
        w.put_start(StreamStart("a", 1.0))
        w.put_chunk("a", 1, "x", None, 0.0)
        w.put_chunk("a", 2, "x", None, 0.0)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        await anyio.wait_all_tasks_blocked()
        assert fake.calls == 0  # below the batch size, the interval (60 s) decides
        w.put_chunk("a", 3, "x", None, 0.0)
        await until(lambda: fake.sizes == [4], "a full batch written")
        w.put_chunk("a", 4, "x", None, 0.0)
        await anyio.wait_all_tasks_blocked()
        assert fake.sizes == [4]  # the next batch waits to be full again
        w.put_chunk("a", 5, "x", None, 0.0)
        w.put_chunk("a", 6, "x", None, 0.0)
        await until(lambda: fake.sizes == [4, 3], "the next full batch written")
    finally:
        with anyio.fail_after(10):
            await w.stop(5)


async def test_interval_writes_a_lone_chunk_without_a_flush() -> None:
    fake = Fake()
    w = writer(fake, interval=0.01)
    w.start()
    try:
        w.put_start(StreamStart("a", 1.0))
        await until(lambda: fake.sizes == [1], "the start written")
        w.put_chunk("a", 1, "x", None, 0.0)  # the queue was empty: the first chunk wakes the writer
        await until(lambda: fake.sizes == [1, 1], "the chunk written after the interval")
        w.put_end(StreamEnd("a", StreamStatus.COMPLETED, 2.0))
        await until(lambda: fake.sizes == [1, 1, 1], "the end written")
    finally:
        with anyio.fail_after(10):
            await w.stop(5)


# -- flush --------------------------------------------------------------------------------------------


async def test_flush_waits_until_everything_queued_is_written(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    put_stream(w, "a", 3)
    with anyio.fail_after(5):
        await w.flush(5)
    assert sorted(fake.starts) == ["a"] and list(fake.ends) == ["a"]
    assert [(c.seq, c.data, c.at_ms) for c in fake.chunks_] == [(1, "a1", 1.0), (2, "a2", 2.0), (3, "a3", 3.0)]
    assert w.stats() == {"queued": 5, "written": 5, "pending": 0, "dropped": 0, "write_failures": 0, "lost": 0,
                         "last_error": None}
    with anyio.fail_after(5):
        await w.flush(None)  # nothing queued since: returns at once


async def test_flush_times_out_while_a_write_hangs(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    fake.gate = anyio.Event()
    put_stream(w, "a", 2, end=False)
    with anyio.fail_after(5), pytest.raises(RecorderTimeout, match=r"^3 records were not written within 0.1s"):
        await w.flush(0.1)
    assert w.stats()["pending"] == 3
    fake.gate.set()
    with anyio.fail_after(5):
        await w.flush(5)
    assert w.stats()["pending"] == 0 and w.stats()["written"] == 3


async def test_flush_raises_when_records_were_given_up_on(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    fake.hopeless = {"bad"}
    put_stream(w, "ok", 2)
    put_stream(w, "bad", 2)
    with anyio.fail_after(5), pytest.raises(RecorderError, match=r"^4 records could not be written") as info:
        await w.flush(5)
    assert not isinstance(info.value, RecorderTimeout)
    assert w.lost == 4 and list(fake.ends) == ["ok"]
    s = w.stats()
    assert (s["queued"], s["written"], s["pending"], s["lost"]) == (8, 4, 0, 4)
    assert s["write_failures"] == 3  # the whole batch, then the bad stream, then its salvaged form
    assert s["last_error"] == repr(ValueError("refused ['bad']"))
    put_stream(w, "ok2", 1)
    with anyio.fail_after(5):
        await w.flush(5)  # a later flush does not count the old loss again


async def test_flush_of_a_writer_never_started() -> None:
    w = writer()
    with anyio.fail_after(5):
        await w.flush(1)  # nothing queued: nothing to wait for
    w.put_start(StreamStart("a", 1.0))
    with anyio.fail_after(5), pytest.raises(RecorderError, match="not running"):
        await w.flush(1)


async def test_a_crashed_writer_does_not_leave_flush_waiting() -> None:
    fake = Fake()
    fake.errors = [ValueError("x")]
    fake.transient_raises = True
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 1)
    with anyio.fail_after(5), pytest.raises(RecorderError, match="not running"):
        await w.flush(None)
    assert not w.alive
    with anyio.fail_after(5), pytest.raises(RecorderError, match=r"^3 queued records could not be written"):
        await w.stop(1)


# -- start / stop ------------------------------------------------------------------------------------


async def test_stop_on_a_never_started_writer() -> None:
    w = writer()
    assert not w.alive
    with anyio.fail_after(5):
        await w.stop(1)  # quiet
    put_stream(w, "a", 2)
    with anyio.fail_after(5), pytest.raises(RecorderError, match=r"^4 queued records could not be written before close"
                                                                 r": the close was cut short"):
        await w.stop(1)
    assert w.stats() == {"queued": 4, "written": 0, "pending": 0, "dropped": 0, "write_failures": 0, "lost": 4,
                         "last_error": None}
    assert w.queued_chunks("a") == [] and not w.has_queued("a")
    with anyio.fail_after(5):
        await w.stop(1)  # settled once: no second error
    assert w.lost == 4


async def test_stop_keeps_its_deadline_during_an_outage() -> None:
    fake = Fake()
    fake.always = OSError("disk gone")
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 3)
    with anyio.fail_after(5), pytest.raises(RecorderError, match=r"^5 queued records .*OSError\('disk gone'\)") as info:
        await w.stop(0.3)
    assert isinstance(info.value.__cause__, OSError)
    assert not w.alive
    s = w.stats()
    assert (s["queued"], s["written"], s["pending"], s["lost"]) == (5, 0, 0, 5)
    assert 1 < s["write_failures"] < 40  # retried with backoff until the deadline, not spinning


async def test_stop_retries_until_the_outage_ends() -> None:
    fake = Fake()
    fake.errors = [OSError("locked"), OSError("locked")]
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 2)
    with anyio.fail_after(5):
        await w.stop(3)
    assert w.stats() == {"queued": 4, "written": 4, "pending": 0, "dropped": 0, "write_failures": 2, "lost": 0,
                         "last_error": repr(OSError("locked"))}
    assert fake.sizes == [4]  # written once, whole


async def test_stop_cuts_a_hanging_write_short() -> None:
    fake = Fake()
    fake.gate = anyio.Event()
    fake.entered = anyio.Event()
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 1)
    with anyio.fail_after(5):
        w._wake(hurry=True)
        await fake.entered.wait()
    with anyio.fail_after(5), pytest.raises(RecorderError, match=r"^3 queued records .*cut short"):
        await w.stop(0.1)
    assert not w.alive and w.lost == 3 and w.stats()["pending"] == 0


async def test_writer_restarted_after_stop_keeps_writing(anyio_backend: str) -> None:
    fake = Fake()
    w = writer(fake, interval=0.01)
    before = len(buffered._TASKS)
    w.start()
    assert w.alive
    put_stream(w, "a", 1)
    with anyio.fail_after(5):
        await w.stop(1)
    assert not w.alive
    if anyio_backend == "asyncio":
        await until(lambda: len(buffered._TASKS) == before, "the finished task released")
    w.start()
    try:
        for _ in range(3):
            await anyio.sleep(0.03)  # idle for several intervals: the writer must not exit
        assert w.alive
        put_stream(w, "b", 1)
        await until(lambda: "b" in fake.ends, "b written without a flush")
    finally:
        with anyio.fail_after(5):
            await w.stop(1)
    assert w.stats()["written"] == 6


def test_records_left_by_a_dead_loop_are_written_by_the_next(anyio_backend: str) -> None:
    fake = Fake()
    w = writer(fake, interval=0.01)

    async def first() -> None:
        fake.gate = anyio.Event()
        w.start()
        put_stream(w, "a", 2)
        # the loop ends with the records queued (the write never finishes)

    async def second() -> None:
        fake.gate = None
        assert not w.alive
        w.start()
        assert w.alive
        await until(lambda: "a" in fake.ends, "a written without a new record or flush")
        await w.stop(1)

    anyio.run(first, backend=anyio_backend)
    anyio.run(second, backend=anyio_backend)
    assert [c.data for c in fake.chunks_] == ["a1", "a2"] and w.lost == 0


# -- what is queued ---------------------------------------------------------------------------------


async def test_queued_chunks_and_has_queued_cover_queued_and_inflight() -> None:
    fake = Fake()
    fake.gate = anyio.Event()
    fake.entered = anyio.Event()
    w = writer(fake, interval=60.0)
    w.put_start(StreamStart("a", 1.0))
    w.put_chunk("a", 1, "x", None, 1.0)
    w.put_chunk("a", 2, "y", "ev", 2.0)
    w.put_start(StreamStart("b", 1.0))
    assert w.queued_chunks("a") == [Chunk("a", 1, "x", None, 1.0), Chunk("a", 2, "y", "ev", 2.0)]
    assert w.queued_chunks("b") == [] and w.queued_chunks("zz") == []
    assert w.has_queued("a") and w.has_queued("b") and not w.has_queued("zz")
    w.start()
    try:
        w._wake(hurry=True)
        with anyio.fail_after(5):
            await fake.entered.wait()
        w.put_chunk("a", 3, "z", None, 3.0)  # queued while 1 and 2 are being written
        w.put_end(StreamEnd("c", StreamStatus.COMPLETED, 2.0))
        assert [c.seq for c in w.queued_chunks("a")] == [1, 2, 3]
        assert w.has_queued("b") and w.has_queued("c")  # b in flight, c queued
        fake.gate.set()
        fake.starts["c"] = StreamStart("c", 1.0)
        with anyio.fail_after(5):
            await w.flush(5)
        assert w.queued_chunks("a") == [] and not w.has_queued("a") and not w.has_queued("b")
    finally:
        with anyio.fail_after(5):
            await w.stop(1)


async def test_a_running_streams_segments_are_reused(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    w.put_start(StreamStart("a", 1.0))
    for i in range(1, 7):
        w.put_chunk("a", i, "x", None, 0.0)
        with anyio.fail_after(5):
            await w.flush(5)
    assert len(fake.segment_ids["a"]) == 1  # one segment object for all six batches
    assert [c.seq for c in fake.chunks_] == [1, 2, 3, 4, 5, 6]
    assert list(w._spare) == ["a"]
    w.put_chunk("a", 7, "x", None, 0.0)
    w.put_end(StreamEnd("a", StreamStatus.COMPLETED, 2.0))  # its last chunk and its end in one batch
    with anyio.fail_after(5):
        await w.flush(5)
    assert w._spare == {}  # an ended stream's segments are let go


async def test_two_streams_writing_alternately_keep_separate_segments(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    for sid in "ab":
        w.put_start(StreamStart(sid, 1.0))
    for i in range(1, 4):
        w.put_chunk("a", i, f"a{i}", None, 0.0)
        w.put_chunk("b", i, f"b{i}", "e" if i == 2 else None, 0.0)
        with anyio.fail_after(5):
            await w.flush(5)
    assert [c.data for c in fake.chunks_ if c.stream_id == "a"] == ["a1", "a2", "a3"]
    assert [(c.data, c.event) for c in fake.chunks_ if c.stream_id == "b"] == [("b1", None), ("b2", "e"), ("b3", None)]


# -- failures ------------------------------------------------------------------------------------------


async def test_a_permanently_failing_stream_is_isolated_and_salvaged(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    fake.bad = {"bad"}
    put_stream(w, "ok", 2, meta={"user": "u"})
    put_stream(w, "bad", 2, meta={"user": "v"})
    with anyio.fail_after(5):
        await w.flush(5)
    assert fake.starts["ok"].metadata == {"user": "u"}
    note = fake.starts["bad"].metadata[UNSTORABLE_KEY]
    assert fake.starts["bad"].metadata == {UNSTORABLE_KEY: note}
    assert note == ["metadata left out: the backend refused it (ValueError: bad metadata)"]
    assert (fake.starts["bad"].path, fake.starts["bad"].method, fake.starts["bad"].created_at) == ("/p", "GET", 1000.0)
    assert fake.ends["bad"].metadata == {"chunk_count": 2, UNSTORABLE_KEY: note}
    assert fake.ends["bad"].status is StreamStatus.COMPLETED and fake.ends["bad"].chunk_count == 2
    assert fake.ends["ok"].metadata == {"chunk_count": 2, "x": "y"}
    assert sorted((c.stream_id, c.seq, c.data, c.at_ms) for c in fake.chunks_) == [
        ("bad", 1, "bad1", 1.0), ("bad", 2, "bad2", 2.0), ("ok", 1, "ok1", 1.0), ("ok", 2, "ok2", 2.0)]
    assert w.lost == 0 and w.failures == 2 and w.stats()["written"] == 8


async def test_a_lone_stream_with_bad_records_is_salvaged(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    fake.bad = {"bad"}
    w.put_start(StreamStart("bad", 1.0, "/p\ud800", None, {"k": 1}, "t\udc00"))
    w.put_chunk("bad", 1, "x\ud800", "e\ud800", 5.0)
    kept = {"ttft_ms": 1.5, "duration_ms": 2, "chunk_count": 1, "char_count": 2, "dropped_chunks": 0,
            "client_disconnected_at_ms": 3.5}
    w.put_end(StreamEnd("bad", StreamStatus.FAILED, 2.0, "err\ud800", {**kept, "s": "q", "n": None}, "c\ud800", 1))
    with anyio.fail_after(5):
        await w.flush(5)
    s, e = fake.starts["bad"], fake.ends["bad"]
    assert (s.path, s.text_event) == ("/p\ufffd", "t\ufffd") and s.method is None
    assert fake.chunks_ == [Chunk("bad", 1, "x\ufffd", "e\ufffd", 5.0)]
    assert (e.error, e.content, e.status, e.completed_at) == ("err\ufffd", "c\ufffd", StreamStatus.FAILED, 2.0)
    assert e.metadata == {**kept, UNSTORABLE_KEY: [
        "metadata left out: the backend refused it (ValueError: bad metadata)"]}
    assert w.failures == 1 and w.lost == 0


async def test_transient_errors_are_retried_not_salvaged(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    fake.errors = [OSError("busy"), TimeoutError("slow")]
    put_stream(w, "a", 1, meta={"keep": True})
    with anyio.fail_after(5):
        await w.flush(5)
    assert fake.starts["a"].metadata == {"keep": True}  # retried as given, not salvaged
    assert w.failures == 2 and w.lost == 0 and fake.sizes == [3]


# -- waiting for room ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_wait", [None, 5.0])
async def test_put_chunk_waiting_returns_at_once_when_the_writer_is_not_running(max_wait: float | None) -> None:
    w = writer(max_pending=1, max_wait=max_wait)
    assert await w.put_chunk_waiting("a", 1, "x", None, 0.0)
    with anyio.fail_after(2):
        assert await w.put_chunk_waiting("a", 2, "x", None, 0.0) is False


async def test_put_chunk_waiting_with_no_wait_drops_at_once() -> None:
    fake = Fake()
    fake.gate = anyio.Event()
    w = writer(fake, max_pending=1, max_wait=0.0, interval=0.0)
    w.start()
    try:
        w.put_start(StreamStart("a", 1.0))
        assert await w.put_chunk_waiting("a", 1, "x", None, 0.0)
        with anyio.fail_after(2):
            assert await w.put_chunk_waiting("a", 2, "x", None, 0.0) is False
    finally:
        fake.gate.set()
        with anyio.fail_after(5):
            await w.stop(1)


async def test_put_chunk_waiting_gets_room_once_a_write_frees_it() -> None:
    fake = Fake()
    w = writer(fake, max_pending=1, max_wait=None, interval=0.0)
    w.start()
    try:
        w.put_start(StreamStart("a", 1.0))
        with anyio.fail_after(5):
            for i in range(1, 6):
                assert await w.put_chunk_waiting("a", i, "x", None, 0.0)
            await w.flush(5)
        assert [c.seq for c in fake.chunks_] == [1, 2, 3, 4, 5]
    finally:
        with anyio.fail_after(5):
            await w.stop(1)


async def test_put_chunk_waiting_gives_up_after_max_wait() -> None:
    fake = Fake()
    fake.gate = anyio.Event()
    w = writer(fake, max_pending=1, max_wait=0.05, interval=0.0)
    w.start()
    try:
        w.put_start(StreamStart("a", 1.0))
        assert w.put_chunk("a", 1, "x", None, 0.0)
        with anyio.fail_after(5):
            assert await w.put_chunk_waiting("a", 2, "x", None, 0.0) is False
    finally:
        fake.gate.set()
        with anyio.fail_after(5):
            await w.stop(1)


# -- MemoryBackend ---------------------------------------------------------------------------------------


def seg(sid: str, *items: tuple[int, str, str | None]) -> Segment:
    s = Segment(sid)
    for seq, data, event in items:
        s.add(seq, data, event, float(seq * 10))
    return s


def start(sid: str, created: float = 100.0, key: str | None = None, owner: str = "me", **meta: Any) -> StreamStart:
    return StreamStart(sid, created, "/p", "POST", dict(meta), None, owner, key, "fmt")


async def test_memory_batch_is_all_or_nothing() -> None:
    b = MemoryBackend()
    with pytest.raises(KeyError, match="stream zz has records but was never started"):
        await b.write(Batch([start("a")], [seg("zz", (1, "x", None))], []))
    with pytest.raises(KeyError, match="stream zz"):
        await b.write(Batch([start("a")], [], [StreamEnd("zz", StreamStatus.COMPLETED, 1.0)]))
    assert b.rows == {} and await b.get("a") is None
    await b.write(Batch([start("a")], [seg("a", (1, "x", None))], []))  # a start makes its own chunks known
    with pytest.raises(ValueError):
        await b.write(Batch([start("b", bad=math.nan)], [seg("a", (2, "y", None))], []))
    assert [c.seq for c in await b.chunks("a")] == [1] and await b.get("b") is None


async def test_memory_write_is_safe_to_retry_and_copies_metadata() -> None:
    b = MemoryBackend()
    meta = {"n": [1]}
    first = StreamStart("a", 100.0, "/p", "POST", meta, None, "me", "k", "fmt")
    await b.write(Batch([first], [seg("a", (1, "x", None), (2, "y", "ev"))], []))
    meta["n"].append(2)
    again = StreamStart("a", 999.0, "/q", "GET", {"other": 1}, None, "me", "k2", None)
    await b.write(Batch([again], [seg("a", (2, "CHANGED", None), (3, "z", None))], []))
    rec = await b.get("a")
    assert rec is not None
    assert (rec.status, rec.metadata, rec.path, rec.method, rec.key, rec.format) == (
        StreamStatus.STREAMING, {"n": [1]}, "/p", "POST", "k", "fmt")
    assert rec.created_at.timestamp() == 100.0 and rec.completed_at is None
    assert (rec.content, rec.chunk_count) == ("xz", 3)
    rec.metadata["n"].append(3)
    again_rec = await b.get("a")
    assert again_rec is not None and again_rec.metadata == {"n": [1]}
    assert await b.chunks("a") == [Chunk("a", 1, "x", None, 10.0), Chunk("a", 2, "y", "ev", 20.0),
                                   Chunk("a", 3, "z", None, 30.0)]
    assert [c.seq for c in await b.chunks("a", after=1)] == [2, 3]
    assert await b.chunks("a", after=3) == [] and await b.chunks("nope") == []
    await b.write(Batch([], [], [StreamEnd("a", StreamStatus.FAILED, 200.0, "boom", {"done": True})]))
    rec = await b.get("a")
    assert rec is not None and (rec.status, rec.error, rec.metadata) == (StreamStatus.FAILED, "boom", {"done": True})
    assert rec.completed_at is not None and rec.completed_at.timestamp() == 200.0 and rec.finished


async def test_memory_content_is_the_text_event() -> None:
    b = MemoryBackend()
    s = StreamStart("a", 1.0, text_event="t")
    await b.write(Batch([s], [seg("a", (1, "x", None), (2, "y", "t"), (3, "z", "t"))], []))
    rec = await b.get("a")
    assert rec is not None and (rec.content, rec.chunk_count, rec.text_event) == ("yz", 3, "t")


async def test_memory_list_streams_filters_and_order() -> None:
    b = MemoryBackend()
    await b.write(Batch([start("old", 1.0, key="k"), start("mid", 2.0), start("new", 3.0, key="k")], [],
                        [StreamEnd("mid", StreamStatus.COMPLETED, 5.0)]))
    assert [r.id for r in await b.list_streams()] == ["new", "mid", "old"]
    assert [r.id for r in await b.list_streams(limit=2)] == ["new", "mid"]
    assert [r.id for r in await b.list_streams("streaming")] == ["new", "old"]
    assert [r.id for r in await b.list_streams(StreamStatus.COMPLETED)] == ["mid"]
    assert [r.id for r in await b.list_streams(key="k")] == ["new", "old"]
    assert [r.id for r in await b.list_streams("completed", key="k")] == []
    await b.write(Batch([start(f"s{i}", 10.0 + i) for i in range(100)], [], []))
    assert len(await b.list_streams()) == 100


async def test_memory_cancels() -> None:
    b = MemoryBackend()
    await b.write(Batch([start("a"), start("b"), start("done")], [], [StreamEnd("done", StreamStatus.COMPLETED, 1.0)]))
    assert await b.request_cancel("nope") is False
    assert await b.request_cancel("done") is False
    assert await b.request_cancel("a") is True
    assert await b.cancel_requests(["a", "b", "x"]) == ["a"]
    assert await b.cancel_requests(["a"]) == []  # consumed
    assert await b.request_cancel("b") is True
    await b.write(Batch([], [], [StreamEnd("b", StreamStatus.CANCELLED, 2.0)]))
    assert await b.cancel_requests(["b"]) == []  # the stream ended: its request went with it


async def test_memory_wait_for_change() -> None:
    b = MemoryBackend()
    await b.write(Batch([start("a")], [], []))
    with anyio.fail_after(5):
        await b.wait_for_change(0.05)  # nothing changes: returns after the timeout
    for change in (lambda: b.write(Batch([], [seg("a", (1, "x", None))], [])), lambda: b.request_cancel("a")):
        woke = anyio.Event()

        async def waiter(woke: anyio.Event = woke) -> None:
            await b.wait_for_change(60)
            woke.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                assert not woke.is_set()
                await change()
                await woke.wait()


async def test_memory_recover() -> None:
    b = MemoryBackend()
    await b.write(Batch([start("orphan", 50.0, owner="dead", u=1), start("alive", owner="live"),
                         start("done", owner="dead"), start("empty", owner="dead")],
                        [seg("orphan", (1, "ab", None), (2, "c", "other"), (3, "d", None))],
                        [StreamEnd("done", StreamStatus.COMPLETED, 1.0)]))
    await b.heartbeat("dead", 100.0)
    await b.heartbeat("live", 90.0)
    await b.heartbeat("live", 1000.0)  # the last beat counts
    assert await b.recover(50.0) == 0  # nothing is that old: "orphan" started at 50, its owner beat at 100
    assert await b.recover(500.0) == 2
    assert b.owners == {"live": 1000.0}  # a silent owner is forgotten
    rec = await b.get("orphan")
    assert rec is not None
    assert (rec.status, rec.error, rec.content, rec.chunk_count) == (
        StreamStatus.INTERRUPTED, "process ended mid-stream", "abd", 3)
    assert rec.metadata == {"u": 1, "recovered": True, "duration_ms": 30.0, "chunk_count": 3, "char_count": 4,
                            "ttft_ms": 10.0}
    assert rec.completed_at is not None and rec.completed_at.timestamp() == 50.03
    for sid, status in (("alive", StreamStatus.STREAMING), ("done", StreamStatus.COMPLETED),
                        ("empty", StreamStatus.INTERRUPTED)):
        r = await b.get(sid)
        assert r is not None and r.status is status
    assert await b.recover(2000.0) == 1  # only "alive" was left streaming
    assert b.owners == {}


# -- SQLiteBackend --------------------------------------------------------------------------------------


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    b = SQLiteBackend(tmp_path / "s.db")
    await b.connect()
    yield b
    await b.close()


def _fds_on(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                n += 1
        except OSError:
            pass
    return n


async def test_sqlite_migrates_a_version_1_file(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript(_SCHEMA_1)
    con.execute("INSERT INTO streams (id, status, created_at, metadata, owner) VALUES ('old', 'completed', 5.0, "
                "'{\"a\": 1}', '')")
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    b = SQLiteBackend(path)
    await b.connect()
    try:
        await b.write(Batch([start("new", key="k")], [seg("new", (1, "x", None))], []))
        old = await b.get("old")
        assert old is not None and (old.status, old.metadata, old.key, old.format) == (
            StreamStatus.COMPLETED, {"a": 1}, None, None)
        assert [r.id for r in await b.list_streams(key="k")] == ["new"]
        assert await b.request_cancel("new") is True
        await b.heartbeat("me", 1000.0)  # version 3: leases
        assert await b.recover(500.0) == 0 and await b.recover(2000.0) == 1
    finally:
        await b.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    con.close()


async def test_sqlite_failed_migration_rolls_back_and_leaks_no_connection(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript(_SCHEMA_1)
    con.execute("ALTER TABLE streams ADD COLUMN format TEXT")  # the migration's second statement then fails
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    b = SQLiteBackend(path)
    with pytest.raises(RecorderError, match=r"cannot open the SQLite database .*duplicate column"):
        await b.connect()
    assert _fds_on(path) == 0
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 1
        columns = [r[1] for r in con.execute("PRAGMA table_info(streams)")]
        assert "key" not in columns  # the first statement was rolled back too
    finally:
        con.close()


async def test_sqlite_refuses_a_newer_schema_without_leaking(tmp_path: Path) -> None:
    path = tmp_path / "v9.db"
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 4")
    con.close()
    with pytest.raises(RecorderError, match="schema version 4 is newer than this library's 3: upgrade the library"):
        await SQLiteBackend(path).connect()
    assert _fds_on(path) == 0


async def test_sqlite_current_file_is_opened_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for n in range(2):
        b = SQLiteBackend(path)
        await b.connect()
        await b.write(Batch([start(f"s{n}", created=100.0 + n)], [], []))
        await b.close()
    b = SQLiteBackend(path)
    await b.connect()
    try:
        assert [r.id for r in await b.list_streams()] == ["s1", "s0"]
    finally:
        await b.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


async def test_sqlite_failed_write_rolls_back_and_keeps_the_real_error(db: SQLiteBackend) -> None:
    await db.write(Batch([start("a")], [], []))
    with pytest.raises(sqlite3.IntegrityError, match="stream zz ended but was never started"):
        await db.write(Batch([start("b")], [seg("b", (1, "x", None))], [StreamEnd("zz", StreamStatus.COMPLETED, 1.0)]))
    with pytest.raises(sqlite3.IntegrityError, match="stream zz ended but was never started"):
        await db.write(Batch([], [], [StreamEnd("zz", StreamStatus.COMPLETED, 1.0, content="c", chunk_count=0)]))
    assert await db.get("b") is None  # nothing of the failed batches was kept
    await db.write(Batch([start("c")], [], []))  # the connection is usable: no transaction left open
    other = sqlite3.connect(db.path)
    try:
        assert sorted(r[0] for r in other.execute("SELECT id FROM streams")) == ["a", "c"]
    finally:
        other.close()
    assert db.is_transient(sqlite3.OperationalError("locked")) and db.is_transient(sqlite3.DatabaseError("x"))
    assert db.is_transient(OSError("x"))
    assert not db.is_transient(sqlite3.IntegrityError("x")) and not db.is_transient(ValueError("x"))


async def test_sqlite_end_freezes_content_and_count(db: SQLiteBackend) -> None:
    s = StreamStart("a", 1.0, text_event="t", owner="me")
    await db.write(Batch([s], [seg("a", (1, "x", None), (2, "y", "t"), (4, "z", "t"))], []))
    rec = await db.get("a")
    assert rec is not None and (rec.content, rec.chunk_count, rec.status) == ("yz", 3, StreamStatus.STREAMING)
    assert await db.chunks("a") == [Chunk("a", 1, "x", None, 10.0), Chunk("a", 2, "y", "t", 20.0),
                                    Chunk("a", 4, "z", "t", 40.0)]
    assert [c.seq for c in await db.chunks("a", 1)] == [2, 4] and await db.chunks("a", 4) == []
    await db.write(Batch([], [seg("a", (5, "w", "t"))], [StreamEnd("a", StreamStatus.COMPLETED, 2.0, None, {"m": 1})]))
    rec = await db.get("a")
    assert rec is not None and (rec.content, rec.chunk_count, rec.metadata) == ("yzw", 4, {"m": 1})
    assert rec.completed_at is not None and rec.completed_at.timestamp() == 2.0
    await db.write(Batch([start("b")], [seg("b", (1, "q", None))],
                         [StreamEnd("b", StreamStatus.FAILED, 3.0, "e", {}, "given", 7)]))
    rec = await db.get("b")
    assert rec is not None and (rec.content, rec.chunk_count, rec.error) == ("given", 7, "e")
    await db.write(Batch([start("a")], [seg("a", (1, "again", None))], []))  # a retry doubles nothing
    assert [c.data for c in await db.chunks("a")] == ["x", "y", "z", "w"]
    con = sqlite3.connect(db.path)
    try:
        rows = con.execute("SELECT first_seq, last_seq, events, at_ms FROM segments WHERE stream_id='a' "
                           "ORDER BY first_seq").fetchall()
        b_events = con.execute("SELECT events FROM segments WHERE stream_id='b'").fetchone()[0]
    finally:
        con.close()
    assert [(r[0], r[1], r[2]) for r in rows] == [(1, 2, '[null,"t"]'), (4, 4, '["t"]'), (5, 5, '["t"]')]
    assert struct.unpack("<2d", rows[0][3]) == (10.0, 20.0)  # little-endian float64 on every machine
    assert b_events is None


async def test_sqlite_closed_backend_refuses(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "c.db")
    with pytest.raises(RuntimeError, match="closed"):
        await b.get("a")
    await b.connect()
    await b.close()
    with pytest.raises(RuntimeError, match="closed"):
        await b.write(Batch([start("a")], [], []))
    with pytest.raises(ValueError, match="needs a file"):
        SQLiteBackend(":memory:")


def _replace_with_a_directory(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.mkdir()


async def test_sqlite_failed_reopen_is_retried(db: SQLiteBackend) -> None:
    path = Path(db.path)
    await db.write(Batch([start("a")], [], []))
    _replace_with_a_directory(path)  # the path cannot be opened for now
    with pytest.raises(sqlite3.OperationalError) as info:
        await db.write(Batch([start("b")], [], []))
    assert db.is_transient(info.value)
    with pytest.raises(sqlite3.OperationalError):
        await db.write(Batch([start("b")], [], []))
    os.rmdir(path)
    await db.write(Batch([start("b")], [], []))
    assert [r.id for r in await db.list_streams()] == ["b"]
    assert _fds_on(path) == 2 and _fds_on(Path(f"{path} (deleted)")) == 0  # the old file's connections closed


async def test_sqlite_wait_for_change(db: SQLiteBackend) -> None:
    db.poll_interval = 0.01
    await db.write(Batch([start("a")], [], []))
    with anyio.fail_after(5):
        await db.wait_for_change(60)  # the first look always reports (nothing seen yet)
        await db.wait_for_change(0.05)  # then nothing changes: returns after the timeout
    woke = anyio.Event()

    async def waiter() -> None:
        await db.wait_for_change(60)
        woke.set()

    def commit_elsewhere() -> None:
        con = sqlite3.connect(db.path)
        con.execute("INSERT INTO cancels VALUES ('x', 1.0)")
        con.commit()
        con.close()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.05)
            assert not woke.is_set()
            await anyio.to_thread.run_sync(commit_elsewhere)
            await woke.wait()


async def test_sqlite_cancels_between_connections(db: SQLiteBackend, tmp_path: Path) -> None:
    await db.write(Batch([start("a"), start("b"), start("done")], [], [StreamEnd("done", StreamStatus.COMPLETED, 1.0)]))
    other = SQLiteBackend(db.path)
    await other.connect()
    try:
        assert await other.request_cancel("nope") is False
        assert await other.request_cancel("done") is False
        assert await other.request_cancel("a") is True
        assert await other.request_cancel("b") is True
        assert await db.cancel_requests([]) == []
        assert await db.cancel_requests(["a", "x"]) == ["a"]
        assert await db.cancel_requests(["a"]) == []  # consumed
        await db.write(Batch([], [], [StreamEnd("b", StreamStatus.CANCELLED, 2.0)]))
        assert await db.cancel_requests(["b"]) == []  # the end took its request away
    finally:
        await other.close()


async def test_sqlite_list_streams_filters_and_order(db: SQLiteBackend) -> None:
    await db.write(Batch([start("old", 1.0, key="k"), start("mid", 2.0), start("new", 3.0, key="k")], [],
                         [StreamEnd("mid", StreamStatus.COMPLETED, 5.0)]))
    assert [r.id for r in await db.list_streams()] == ["new", "mid", "old"]
    assert [r.id for r in await db.list_streams(limit=2)] == ["new", "mid"]
    assert [r.id for r in await db.list_streams("streaming")] == ["new", "old"]
    assert [r.id for r in await db.list_streams(StreamStatus.COMPLETED)] == ["mid"]
    assert [r.id for r in await db.list_streams(key="k")] == ["new", "old"]
    assert [r.id for r in await db.list_streams("streaming", key="k")] == ["new", "old"]
    assert [r.id for r in await db.list_streams("completed", key="k")] == []
    await db.write(Batch([start(f"s{i}", 10.0 + i) for i in range(100)], [], []))
    assert len(await db.list_streams()) == 100


async def test_sqlite_recover(db: SQLiteBackend) -> None:
    await db.write(Batch([start("orphan", 50.0, owner="dead", u=1), start("alive", owner="live"),
                          start("done", owner="dead")],
                         [seg("orphan", (1, "ab", None), (2, "c", "other"), (3, "d", None))],
                         [StreamEnd("done", StreamStatus.COMPLETED, 1.0)]))
    assert await db.request_cancel("orphan") is True
    await db.heartbeat("dead", 90.0)
    await db.heartbeat("live", 80.0)
    await db.heartbeat("live", 1000.0)  # replaces the earlier beat
    assert await db.recover(60.0) == 0  # "orphan" started at 50 but its owner beat at 90
    assert await db.recover(500.0) == 1
    rec = await db.get("orphan")
    assert rec is not None
    assert (rec.status, rec.error, rec.content, rec.chunk_count) == (
        StreamStatus.INTERRUPTED, "process ended mid-stream", "abd", 3)
    assert rec.metadata == {"u": 1, "recovered": True, "duration_ms": 30.0, "chunk_count": 3, "char_count": 4,
                            "ttft_ms": 10.0}
    assert await db.cancel_requests(["orphan"]) == []
    alive = await db.get("alive")
    assert alive is not None and alive.status is StreamStatus.STREAMING

    def owners() -> list[tuple[str, float]]:
        with contextlib.closing(sqlite3.connect(db.path)) as con:
            return con.execute("SELECT owner, seen_at FROM owners ORDER BY owner").fetchall()

    assert owners() == [("live", 1000.0)]  # the silent owner is forgotten
    await db.heartbeat("gone", 10.0)
    assert await db.recover(500.0) == 0 and owners() == [("live", 1000.0)]  # forgotten with no stream to end
    assert await db.recover(2000.0) == 1 and owners() == []


async def test_sqlite_recorder_path_and_times_packing(tmp_path: Path) -> None:
    rec = SQLiteRecorder(tmp_path / "r.db")
    assert rec.path == str(tmp_path / "r.db")
    times = array.array("d", [1.5, 2.25])
    from asgi_stream_recorder.recorders.sqlite import _pack, _unpack

    assert _pack(times) == struct.pack("<2d", 1.5, 2.25)
    assert list(_unpack(_pack(times))) == [1.5, 2.25]


# -- timing, on trio's virtual clock (deterministic: no wall-clock time involved) --------------------


def _virtual_trio() -> tuple[str, dict[str, Any]]:
    import trio.testing

    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


virtual_clock = pytest.mark.parametrize("anyio_backend", [pytest.param(_virtual_trio(), id="trio-virtual")])


@virtual_clock
async def test_timing_of_interval_flush_timeout_and_max_wait() -> None:
    fake = Fake()
    w = writer(fake, interval=0.25, max_pending=1, max_wait=0.4)
    w.start()
    try:
        await anyio.wait_all_tasks_blocked()  # the writer waits for something to arrive: a start wakes it
        t0 = anyio.current_time()
        w.put_start(StreamStart("a", 1.0))
        await until(lambda: fake.sizes == [1], "written after the interval", limit=10)
        assert anyio.current_time() - t0 == pytest.approx(0.25)
        fake.gate = anyio.Event()
        w.put_chunk("a", 1, "x", None, 0.0)
        t0 = anyio.current_time()
        with pytest.raises(RecorderTimeout):
            await w.flush(0.7)
        assert anyio.current_time() - t0 == pytest.approx(0.7)
        t0 = anyio.current_time()
        assert await w.put_chunk_waiting("a", 2, "x", None, 0.0) is False  # the queue holds one chunk: full
        assert anyio.current_time() - t0 == pytest.approx(0.4)
        fake.gate.set()
        await w.flush(5)
    finally:
        await w.stop(1)


@virtual_clock
async def test_stop_retries_with_backoff_until_exactly_its_deadline() -> None:
    fake = Fake()
    fake.always = OSError("down")
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 1)
    t0 = anyio.current_time()
    with pytest.raises(RecorderError, match=r"^3 queued records"):
        await w.stop(2.2)
    assert anyio.current_time() - t0 == pytest.approx(2.2)
    # tries at 0, 0.05, 0.15, 0.35, 0.75, 1.55 (backoff doubling from 0.05) and 2.2 (the deadline)
    assert w.failures == 7 and fake.calls == 7 and w.lost == 3


@virtual_clock
async def test_backoff_is_capped_at_two_seconds() -> None:
    fake = Fake()
    fake.errors = [OSError("down")] * 8
    w = writer(fake, interval=60.0)
    w.start()
    try:
        put_stream(w, "a", 1)
        t0 = anyio.current_time()
        await w.flush(60)
        # 0.05 + 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 2 + 2 seconds of backoff before the ninth try succeeds
        assert anyio.current_time() - t0 == pytest.approx(7.15)
        assert w.failures == 8 and fake.sizes == [3]
    finally:
        await w.stop(1)


@virtual_clock
async def test_stop_grace_then_cut_short() -> None:
    fake = Fake()
    fake.gate = anyio.Event()
    fake.entered = anyio.Event()
    w = writer(fake, interval=0.0)
    w.start()
    put_stream(w, "a", 1)
    await fake.entered.wait()
    t0 = anyio.current_time()
    with pytest.raises(RecorderError, match="cut short"):
        await w.stop(0.1)
    assert anyio.current_time() - t0 == pytest.approx(0.6)  # the timeout, half a second of grace, then cancelled
    assert w.lost == 3


class Stubborn(Fake):
    """A write that ignores cancellation (as a backend call in a thread does) until its gate opens."""

    async def write(self, batch: Batch) -> None:
        with anyio.CancelScope(shield=True):
            await super().write(batch)


@virtual_clock
async def test_stop_leaves_an_uncancellable_write_behind() -> None:
    fake = Stubborn()
    fake.gate = anyio.Event()
    fake.entered = anyio.Event()
    w = writer(fake, interval=0.0)
    w.start()
    put_stream(w, "a", 1)
    await fake.entered.wait()
    t0 = anyio.current_time()
    try:
        with pytest.raises(RecorderError, match=r"^3 queued records .*cut short"):
            await w.stop(0.1)
        elapsed = anyio.current_time() - t0
        alive, lost = w.alive, w.lost
    finally:
        fake.gate.set()  # the abandoned write finishes later (even if the test failed: trio waits for it)
    assert elapsed == pytest.approx(2.6)  # 0.1 + 0.5 grace + 2 s after the cancel
    assert not alive and lost == 3
    await anyio.sleep(1)  # it must not count again
    assert w.stats() == {"queued": 3, "written": 0, "pending": 0, "dropped": 0, "write_failures": 0, "lost": 3,
                         "last_error": None}
    w.start()  # a new writer works
    put_stream(w, "b", 1)
    await w.flush(5)
    await w.stop(1)
    assert w.stats()["written"] == 3 and w.lost == 3


# -- more of the writer --------------------------------------------------------------------------------


def test_policy_is_frozen() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        Policy().batch_size = 5  # type: ignore[misc]


def test_a_never_started_writer_queues_a_full_batch_quietly() -> None:
    w = writer(batch_size=2, max_pending=100, max_pending_bytes=6)
    assert [w.put_chunk("a", i, d, None, 0.0) for i, d in enumerate(["abc", "ab", "x", "y"], 1)] == [
        True, True, True, False]  # 6 characters queued: the next chunk is refused
    w.put_start(StreamStart("a", 1.0))
    w.put_end(StreamEnd("a", StreamStatus.COMPLETED, 2.0))
    assert w.stats()["queued"] == 5 and w.stats()["pending"] == 5 and w.stats()["dropped"] == 0


async def test_the_writer_task_is_named_and_held(anyio_backend: str) -> None:
    w = writer(interval=0.0)
    before = len(buffered._TASKS)
    w.start()
    try:
        await anyio.lowlevel.checkpoint()
        if anyio_backend == "asyncio":
            assert len(buffered._TASKS) == before + 1
            assert [t.get_name() for t in buffered._TASKS if not t.done()].count("asgi_stream_recorder writer") >= 1
        else:
            import trio

            def names(task: Any) -> list[str]:
                return [task.name] + [n for nursery in task.child_nurseries for c in nursery.child_tasks
                                      for n in names(c)]

            assert "asgi_stream_recorder writer" in names(trio.lowlevel.current_root_task())
    finally:
        await w.stop(1)


async def test_outage_is_logged_once_and_its_end_too(running: tuple[BufferedWriter, Fake],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    w, fake = running
    caplog.set_level("WARNING", logger="asgi_stream_recorder")
    for round_ in range(2):
        caplog.clear()
        fake.errors = [OSError("busy")] * 3
        put_stream(w, f"s{round_}", 1)
        with anyio.fail_after(5):
            await w.flush(5)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("retrying with backoff" in m for m in messages) == 1, messages
        assert sum("still failing" in m for m in messages) == 0, messages
        assert sum("succeed again" in m for m in messages) == 1, messages


# -- more of SQLite ---------------------------------------------------------------------------------------


async def test_sqlite_defaults_and_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert SQLiteBackend().path == "streams.db" and SQLiteRecorder().path == "streams.db"
    plain = SQLiteBackend(tmp_path / "x.db")
    assert (plain.busy_timeout, plain.poll_interval) == (1.0, 0.05)
    nested = tmp_path / "a" / "b" / "s.db"
    caplog.set_level("WARNING", logger="asgi_stream_recorder")
    for _ in range(2):  # the directories are made, and found made the second time
        b = SQLiteBackend(nested)
        with pytest.raises(RuntimeError, match="closed"):
            await b.write(Batch([start("early")], [], []))  # not connected yet
        await b.connect()
        try:
            assert b._wcon is not None and b._wcon.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
            for i in range(3):
                await b.write(Batch([start(f"s{_}{i}", meta="é")], [], []))
            assert _fds_on(nested) == 2  # one write and one read connection, opened once
        finally:
            await b.close()
    assert _fds_on(nested) == 0
    assert [r.getMessage() for r in caplog.records] == []  # no reopening of a file that did not change
    con = sqlite3.connect(nested)
    try:
        assert con.execute("SELECT metadata FROM streams WHERE id = 's00'").fetchone()[0] == '{"meta":"é"}'
    finally:
        con.close()


async def test_sqlite_counts_single_chunk_segments(db: SQLiteBackend) -> None:
    await db.write(Batch([start("one", owner="dead"), start("two"), start("three")],
                         [seg("one", (1, "solo", None)), seg("two", (1, "a", None)), seg("three", (1, "b", None))], []))
    rec = await db.get("one")
    assert rec is not None and (rec.content, rec.chunk_count) == ("solo", 1)  # still streaming: read so far
    await db.write(Batch([], [], [StreamEnd("two", StreamStatus.COMPLETED, 2.0)]))
    await db.write(Batch([], [], [StreamEnd("three", StreamStatus.COMPLETED, 2.0, chunk_count=7)]))
    two, three = await db.get("two"), await db.get("three")
    assert two is not None and (two.content, two.chunk_count) == ("a", 1)
    assert three is not None and (three.content, three.chunk_count) == ("b", 1)  # content missing: both computed
    assert await db.recover(500.0) == 1  # "one" (created at 100, no heartbeat); the others have ended
    one = await db.get("one")
    assert one is not None and (one.status, one.content, one.chunk_count) == (StreamStatus.INTERRUPTED, "solo", 1)
    assert one.metadata["chunk_count"] == 1


async def test_sqlite_wait_for_change_waits_its_timeout(db: SQLiteBackend) -> None:
    await db.wait_for_change(0)  # the first look reports
    t0 = anyio.current_time()
    with anyio.fail_after(5):
        await db.wait_for_change(0.3)
    assert anyio.current_time() - t0 >= 0.3  # nothing changed: it waited the whole timeout


# -- stopping a writer that waits -------------------------------------------------------------------------


@virtual_clock
async def test_stop_hurries_a_writer_waiting_for_its_interval() -> None:
    fake = Fake()
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 1)
    await anyio.wait_all_tasks_blocked()  # the writer now waits for the interval or a full batch
    assert fake.calls == 0
    t0 = anyio.current_time()
    await w.stop(5)
    assert anyio.current_time() - t0 == 0  # written at once, not after the interval or the deadline
    assert fake.sizes == [3] and w.lost == 0 and not w.alive


@virtual_clock
async def test_stop_finishes_even_when_its_caller_is_cancelled() -> None:
    fake = Fake()
    fake.gate = anyio.Event()
    fake.entered = anyio.Event()
    w = writer(fake, interval=0.0)
    w.start()
    put_stream(w, "a", 1)
    await fake.entered.wait()

    async def open_gate_later() -> None:
        await anyio.sleep(1)
        assert fake.gate is not None
        fake.gate.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_gate_later)
        t0 = anyio.current_time()
        with anyio.move_on_after(0.1):
            await w.stop(5)  # shielded: it drains and joins the writer before the cancellation applies
        assert anyio.current_time() - t0 == pytest.approx(1.0)
    assert not w.alive and w.stats()["written"] == 3 and w.lost == 0


def test_a_writer_whose_loop_was_dropped_is_not_alive(recwarn: pytest.WarningsRecorder) -> None:
    import asyncio

    fake = Fake()
    w = writer(fake, interval=60.0)

    async def first() -> None:
        w.start()
        put_stream(w, "a", 1)
        assert w.alive

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first())
    loop.close()  # its tasks are dropped, not cancelled (as in a forked child): the writer never ran to its end

    async def second() -> None:
        assert not w.alive  # another loop: that writer is gone
        w.start()
        assert w.alive
        await w.flush(5)
        await w.stop(1)

    asyncio.run(second())
    assert fake.sizes == [3] and w.lost == 0


def test_a_stop_that_gives_records_up_frees_their_room() -> None:
    async def main() -> None:
        w = writer(max_pending=2, max_pending_bytes=4, batch_size=2)
        assert w.put_chunk("a", 1, "xx", None, 0.0) and w.put_chunk("a", 2, "xx", None, 0.0)
        assert not w.put_chunk("a", 3, "x", None, 0.0)
        with pytest.raises(RecorderError, match=r"^2 queued"):
            await w.stop(1)
        fake = w.backend
        assert isinstance(fake, Fake)
        w.start()
        w.put_start(StreamStart("b", 1.0))
        assert w.put_chunk("b", 1, "xx", None, 0.0)  # the given-up chunks no longer take room
        await anyio.wait_all_tasks_blocked()
        assert fake.calls == 0  # one chunk of a batch of two: nothing hurries the writer yet
        assert w.put_chunk("b", 2, "xx", None, 0.0)
        with anyio.fail_after(5):
            while not fake.sizes:  # noqa: ASYNC110 - a plain list
                await anyio.sleep(0.01)
        assert fake.sizes == [3]
        await w.stop(1)

    anyio.run(main)


async def test_mixed_events_in_one_segment(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    w.put_start(StreamStart("a", 1.0))
    for seq, event in enumerate([None, "e", None, None, "f"], 1):
        w.put_chunk("a", seq, f"d{seq}", event, float(seq))
    assert [(c.seq, c.event) for c in w.queued_chunks("a")] == [(1, None), (2, "e"), (3, None), (4, None), (5, "f")]
    with anyio.fail_after(5):
        await w.flush(5)
    assert fake.chunks_ == [Chunk("a", i, f"d{i}", e, float(i)) for i, e in enumerate([None, "e", None, None, "f"], 1)]


async def test_written_text_frees_its_room_and_an_idle_writer_sleeps(running: tuple[BufferedWriter, Fake]) -> None:
    w, fake = running
    w._max_chars = 4  # (the running fixture's policy, with a small text bound)
    w.put_start(StreamStart("a", 1.0))
    for round_ in range(3):
        assert w.put_chunk("a", 2 * round_ + 1, "xx", None, 0.0)
        assert w.put_chunk("a", 2 * round_ + 2, "xx", None, 0.0)
        assert not w.put_chunk("a", 99, "x", None, 0.0)  # 4 characters queued: full
        with anyio.fail_after(5):
            await w.flush(5)
    calls = fake.calls
    with anyio.fail_after(2):
        await anyio.wait_all_tasks_blocked()  # the idle writer waits; it does not spin
    await w.flush(5)  # nothing queued: no write
    assert fake.calls == calls == 3


@virtual_clock
async def test_stop_of_an_idle_writer_writes_no_empty_batch() -> None:
    fake = Fake()
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 1)
    await w.flush(5)
    await anyio.wait_all_tasks_blocked()
    await w.stop(5)
    assert fake.calls == 1 and fake.sizes == [3]


@virtual_clock
async def test_records_queued_while_stopping_are_written_at_once() -> None:
    fake = Fake()
    fake.gate = anyio.Event()
    fake.entered = anyio.Event()
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 1, end=False)
    await anyio.wait_all_tasks_blocked()  # the writer waits for its interval; stop() hurries it into a write

    async def end_then_open() -> None:
        await anyio.sleep(1)
        w.put_end(StreamEnd("a", StreamStatus.COMPLETED, 2.0))  # a stream ends during the close
        assert fake.gate is not None
        fake.gate.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(end_then_open)
        t0 = anyio.current_time()
        await w.stop(5)
        assert anyio.current_time() - t0 == pytest.approx(1.0)
    assert fake.sizes == [2, 1] and w.lost == 0


@virtual_clock
async def test_a_long_outage_is_recalled_every_30_seconds(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The reminder's cadence is measured on ``time.monotonic``; the test sets it at each failed try."""
    import types

    now = [0.0]
    monkeypatch.setattr(buffered, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    schedule = iter([0.0, 30.0, 31.0, 59.0, 60.0, 61.0])

    class Timed(Fake):
        async def write(self, batch: Batch) -> None:
            now[0] = next(schedule, now[0])
            await super().write(batch)

    fake = Timed()
    fake.errors = [OSError("down")] * 5
    caplog.set_level("WARNING", logger="asgi_stream_recorder")
    w = writer(fake, interval=60.0)
    w.start()
    put_stream(w, "a", 1)
    await w.flush(60)
    await w.stop(1)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retrying with backoff" in m for m in messages) == 1, messages
    # failures at 0 (logged), 30 (30 s later: reminded), 31, 59 (not yet), 60 (30 s after the reminder)
    assert [m.split("(")[0] for m in messages if "still failing" in m] == [
        "recorder writes still failing after 30s ", "recorder writes still failing after 60s "], messages
    assert sum("succeed again after 61.0s" in m for m in messages) == 1, messages


async def test_sqlite_odd_shapes(db: SQLiteBackend, tmp_path: Path) -> None:
    await SQLiteBackend(tmp_path / "never.db").close()  # closing what was never opened is quiet
    await db.write(Batch([start("g")], [seg("g", (1, "p", None), (3, "q", "e"), (4, "r", None))], []))
    assert await db.chunks("g") == [Chunk("g", 1, "p", None, 10.0), Chunk("g", 3, "q", "e", 30.0),
                                    Chunk("g", 4, "r", None, 40.0)]
    with pytest.raises(sqlite3.IntegrityError, match="stream zz ended but was never started"):
        await db.write(Batch([], [seg("zz", (1, "x", None))], [StreamEnd("zz", StreamStatus.COMPLETED, 1.0)]))


async def test_sqlite_migration_done_meanwhile_by_another_process_is_not_redone(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.executescript(_SCHEMA_1)
    other.execute("PRAGMA user_version = 1")
    other.execute("BEGIN IMMEDIATE")  # another process is migrating: it holds the write lock
    b = SQLiteBackend(path, busy_timeout=10.0)  # long enough to outwait the other process on a loaded machine
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.connect)  # reads version 1, then waits for the lock
            await anyio.sleep(0.2)
            for statement in _SCHEMA_2.split(";"):
                if statement.strip():
                    other.execute(statement)
            other.execute("PRAGMA user_version = 2")
            other.execute("COMMIT")
        await b.write(Batch([start("a", key="k")], [], []))  # the schema, migrated once, works
        assert [r.id for r in await b.list_streams(key="k")] == ["a"]
    finally:
        other.close()
        await b.close()
