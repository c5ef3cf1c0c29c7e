"""StreamSession and its rules, driven directly over real recorders: the final status, the
timings and counts a stream records, and :func:`current_stream`'s lifetime."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from asgi_stream_recorder import MemoryRecorder, Recorder, SQLiteRecorder, StreamStatus
from asgi_stream_recorder.recorders.base import Chunk, StreamRecord
from asgi_stream_recorder.session import StreamSession, current_stream, decide_status

pytestmark = pytest.mark.anyio

SLEEP = 0.03  # seconds: long enough that a timing off by 0.1% is tens of microseconds off


async def read_back(rec: Recorder, sid: str) -> tuple[StreamRecord, list[Chunk]]:
    with anyio.fail_after(10):
        await rec.flush()
        record = await rec.get(sid)
        assert record is not None
        return record, await rec.chunks(sid)


# -- decide_status: the order of the facts -----------------------------------------------------------

@pytest.mark.parametrize(
    ("error", "exhausted", "for_client", "by_request", "status"),
    [
        (RuntimeError("x"), True, True, True, StreamStatus.FAILED),
        ("broken", False, False, False, StreamStatus.FAILED),
        (None, True, True, True, StreamStatus.COMPLETED),
        (None, True, False, False, StreamStatus.COMPLETED),
        (None, False, True, True, StreamStatus.CANCELLED),
        (None, False, True, False, StreamStatus.CANCELLED),
        (None, False, False, True, StreamStatus.CANCELLED),
        (None, False, False, False, StreamStatus.INTERRUPTED),
    ],
)
def test_decide_status_takes_the_facts_in_order(error: Any, exhausted: bool, for_client: bool, by_request: bool,
                                                status: StreamStatus) -> None:
    assert decide_status(error=error, exhausted=exhausted, stopped_for_client=for_client,
                         stopped_by_request=by_request) is status


def test_decide_status_defaults_to_not_stopped() -> None:
    assert decide_status(error=None, exhausted=False) is StreamStatus.INTERRUPTED
    assert decide_status(error=None, exhausted=False, stopped_for_client=True) is StreamStatus.CANCELLED
    assert decide_status(error=None, exhausted=False, stopped_by_request=True) is StreamStatus.CANCELLED


# -- end(): defaults, the first call counts, what it records ---------------------------------------

async def test_end_defaults_to_interrupted_without_error_or_cancel_note() -> None:
    async with MemoryRecorder() as rec:
        session = StreamSession(rec)
        assert session.completed_at is None and session.live is None
        session.begin()
        assert session.end() is StreamStatus.INTERRUPTED
        assert session.status is StreamStatus.INTERRUPTED and session.error is None
        record, chunks = await read_back(rec, session.id)
    assert record.status is StreamStatus.INTERRUPTED and record.error is None and chunks == []
    assert record.chunk_count == 0 and record.content == ""
    assert record.metadata["ttft_ms"] is None
    assert record.metadata["chunk_count"] == 0 and record.metadata["char_count"] == 0
    for absent in ("cancelled_by", "dropped_chunks", "client_disconnected_at_ms"):
        assert absent not in record.metadata


async def test_a_second_end_returns_the_first_status_and_changes_nothing() -> None:
    async with MemoryRecorder() as rec:
        session = StreamSession(rec, metadata={"user": "u"})
        session.begin()
        session.stamp()
        await session.record("hi", None)
        assert session.end(exhausted=True) is StreamStatus.COMPLETED
        completed_at = session.completed_at
        await anyio.sleep(0.01)
        assert session.end(error=RuntimeError("late")) is StreamStatus.COMPLETED
        assert session.end(stopped_by_request=True) is StreamStatus.COMPLETED
        assert session.status is StreamStatus.COMPLETED and session.error is None
        assert session.completed_at == completed_at
        record, _ = await read_back(rec, session.id)
    assert record.status is StreamStatus.COMPLETED and record.error is None
    assert record.completed_at is not None and record.completed_at.timestamp() == pytest.approx(completed_at, abs=2e-6)
    assert "cancelled_by" not in record.metadata and record.metadata["user"] == "u"


@pytest.mark.parametrize(
    ("facts", "status", "cancelled_by"),
    [
        ({"stopped_by_request": True}, StreamStatus.CANCELLED, "request"),
        ({"stopped_by_request": True, "stopped_for_client": True}, StreamStatus.CANCELLED, "request"),
        ({"stopped_for_client": True}, StreamStatus.CANCELLED, None),
        ({"stopped_by_request": True, "exhausted": True}, StreamStatus.COMPLETED, None),
        ({"stopped_by_request": True, "error": "boom"}, StreamStatus.FAILED, None),
        ({"exhausted": True}, StreamStatus.COMPLETED, None),
        ({}, StreamStatus.INTERRUPTED, None),
    ],
)
async def test_cancelled_by_request_only_when_asked_and_cancelled(facts: dict[str, Any], status: StreamStatus,
                                                                  cancelled_by: str | None) -> None:
    async with MemoryRecorder() as rec:
        session = StreamSession(rec)
        session.begin()
        assert session.end(**facts) is status
        record, _ = await read_back(rec, session.id)
    assert record.status is status
    assert record.metadata.get("cancelled_by") == cancelled_by


async def test_errors_are_recorded_as_type_and_message_or_as_given() -> None:
    async with MemoryRecorder() as rec:
        raised = StreamSession(rec)
        raised.begin()
        assert raised.end(error=ValueError("bad token"), exhausted=True) is StreamStatus.FAILED
        given = StreamSession(rec)
        given.begin()
        assert given.end(error="the wire broke") is StreamStatus.FAILED
        assert (raised.error, given.error) == ("ValueError: bad token", "the wire broke")
        record, _ = await read_back(rec, raised.id)
    assert record.error == "ValueError: bad token"


async def test_a_session_never_begun_can_end() -> None:
    session = StreamSession(MemoryRecorder())  # e.g. its start failed: it is still ended once
    assert session.end(exhausted=True) is StreamStatus.COMPLETED
    assert session.end() is StreamStatus.COMPLETED
    with pytest.raises(LookupError):
        current_stream()


# -- ids -----------------------------------------------------------------------------------------

async def test_event_ids_are_the_seq_or_stream_id_and_seq_when_resumable() -> None:
    rec = MemoryRecorder()
    plain = StreamSession(rec, id="abc")
    resumable = StreamSession(rec, id="abc", resumable=True)
    assert plain.id == "abc"
    assert [plain.event_id(1), plain.event_id(12)] == ["1", "12"]
    assert [resumable.event_id(1), resumable.event_id(12)] == ["abc:1", "abc:12"]
    fresh = [StreamSession(rec).id for _ in range(3)]
    assert all(isinstance(sid, str) and len(sid) == 32 for sid in fresh) and len(set(fresh)) == 3
    assert StreamSession(rec, id="").id != ""


# -- timings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_timings_are_consistent_with_each_other_and_with_what_is_read_back(backend: str,
                                                                                 tmp_path: Path) -> None:
    rec: Recorder = MemoryRecorder() if backend == "memory" else SQLiteRecorder(tmp_path / "s.db")
    async with rec:
        before = time.perf_counter()
        session = StreamSession(rec)
        inside_from = time.perf_counter()
        session.begin()
        await anyio.sleep(SLEEP)
        session.client_left()  # just before the first chunk: its time is at most the chunk's
        session.stamp()
        await session.record("a", None)
        await anyio.sleep(SLEEP)
        session.client_left()  # only the first call counts
        session.stamp()
        await session.record("bc", None)
        inside_to = time.perf_counter()
        status = session.end(exhausted=True)  # just after the last chunk: its duration is at least the chunk's
        after = time.perf_counter()
        assert status is StreamStatus.COMPLETED
        record, chunks = await read_back(rec, session.id)
    meta = record.metadata
    assert [(c.seq, c.data) for c in chunks] == [(1, "a"), (2, "bc")]
    first, second = chunks[0].at_ms, chunks[1].at_ms
    ttft, duration, left = meta["ttft_ms"], meta["duration_ms"], meta["client_disconnected_at_ms"]
    # the first chunk's time, not the last one's
    assert session.ttft_ms == first
    assert ttft == round(first, 3) != round(second, 3)
    assert left == round(session.client_left_ms or -1.0, 3)
    for value in (ttft, duration, left):
        assert round(value, 3) == value
    # in order: the client left, then each chunk, then the end
    assert session.client_left_ms is not None
    assert 0 < SLEEP * 1000 <= session.client_left_ms <= first
    assert first + SLEEP * 1000 <= second <= duration + 0.0005  # (0.0005: the rounding to 3 decimals)
    assert ttft <= duration
    assert (inside_to - inside_from) * 1000 - 0.0005 <= duration <= (after - before) * 1000 + 0.0005
    assert duration >= 2 * SLEEP * 1000
    # the end's time is the start's plus the duration
    assert session.completed_at is not None
    assert session.created_at <= session.completed_at
    assert session.completed_at - session.created_at == pytest.approx(duration / 1000, abs=2e-6)
    assert record.completed_at is not None
    assert record.created_at.timestamp() == pytest.approx(session.created_at, abs=2e-6)
    assert record.completed_at.timestamp() == pytest.approx(session.completed_at, abs=2e-6)
    assert record.created_at <= record.completed_at
    assert meta["chunk_count"] == record.chunk_count == 2 and meta["char_count"] == 3
    assert record.content == "abc"


async def test_durations_are_rounded_to_the_microsecond() -> None:
    async with MemoryRecorder() as rec:
        sessions = []
        for _ in range(6):
            session = StreamSession(rec)
            session.begin()
            await anyio.sleep(0.001)
            session.stamp()
            session.end(exhausted=True)
            sessions.append(session)
        for session in sessions:
            record, _ = await read_back(rec, session.id)
            duration = record.metadata["duration_ms"]
            assert round(duration, 3) == duration and duration >= record.metadata["ttft_ms"]
            assert session.completed_at is not None
            assert session.completed_at - session.created_at == pytest.approx(duration / 1000, abs=2e-6)


async def test_ttft_is_the_first_chunks_time_only() -> None:
    async with MemoryRecorder() as rec:
        session = StreamSession(rec)
        session.begin()
        assert session.ttft_ms is None
        assert session.stamp() == 1
        await session.record("x", None)
        ttft = session.ttft_ms
        await anyio.sleep(0.01)
        assert session.stamp() == 2
        await session.record("y", None)
        assert session.stamp() == 3
        await session.record("z", None)
        assert session.ttft_ms == ttft
        session.end(exhausted=True)
        record, chunks = await read_back(rec, session.id)
    assert [c.seq for c in chunks] == [1, 2, 3]
    assert ttft == chunks[0].at_ms < chunks[1].at_ms <= chunks[2].at_ms
    assert record.metadata["ttft_ms"] == round(chunks[0].at_ms, 3)


# -- counting, text, drops --------------------------------------------------------------------------

async def test_counts_and_text_of_the_text_event_only() -> None:
    async with MemoryRecorder() as rec:
        session = StreamSession(rec, text_event="token")
        session.begin()
        for data, event in [("ab", "token"), ("{}", None), ("cde", "token"), ("z", "other")]:
            session.stamp()
            await session.record(data, event)
        assert (session.seq, session.count, session.char_count, session.dropped) == (4, 4, 8, 0)
        session.end(exhausted=True)
        record, chunks = await read_back(rec, session.id)
    assert record.content == "abcde" and record.chunk_count == 4
    assert [(c.seq, c.data, c.event) for c in chunks] == [(1, "ab", "token"), (2, "{}", None), (3, "cde", "token"),
                                                          (4, "z", "other")]


async def test_record_waiting_counts_a_chunk_that_finds_room() -> None:
    async with MemoryRecorder(max_wait=1.0) as rec:
        session = StreamSession(rec, text_event="t")
        session.begin()
        session.stamp()
        with anyio.fail_after(5):
            await session.record_waiting("abc", "t")
        session.stamp()
        with anyio.fail_after(5):
            await session.record_waiting("{}", None)
        assert (session.count, session.char_count, session.dropped) == (2, 5, 0)
        session.end(exhausted=True)
        record, chunks = await read_back(rec, session.id)
    assert record.content == "abc" and record.metadata["char_count"] == 5 and record.metadata["chunk_count"] == 2
    assert [c.data for c in chunks] == ["abc", "{}"]


async def test_a_full_queue_that_waits_lets_the_stream_wait_then_counts_the_drop() -> None:
    rec = MemoryRecorder(max_pending=1, max_wait=0.05)  # not opened: nothing makes room
    session = StreamSession(rec)
    session.begin()
    session.stamp()
    assert session.record_nowait("a", None) is True
    session.stamp()
    assert session.record_nowait("bb", None) is False  # the caller is to wait
    assert (session.count, session.dropped, rec.stats["dropped"]) == (1, 0, 0)
    with anyio.fail_after(5):
        await session.record_waiting("bb", None)
    assert (session.count, session.char_count, session.dropped, rec.stats["dropped"]) == (1, 1, 1, 1)
    session.stamp()
    with anyio.fail_after(5):
        await session.record("ccc", None)
    assert (session.count, session.char_count, session.dropped, rec.stats["dropped"]) == (1, 1, 2, 2)
    session.end(exhausted=True)
    async with rec:
        record, chunks = await read_back(rec, session.id)
    assert record.metadata["dropped_chunks"] == 2 and record.metadata["chunk_count"] == 1
    assert [c.data for c in chunks] == ["a"] and record.content == "a"


async def test_a_full_queue_that_does_not_wait_drops_at_once() -> None:
    rec = MemoryRecorder(max_pending=1)  # max_wait 0: drop, never wait
    session = StreamSession(rec)
    session.begin()
    session.stamp()
    assert session.record_nowait("a", None) is True
    session.stamp()
    assert session.record_nowait("bb", None) is True  # dropped, nothing to wait for
    assert (session.count, session.char_count, session.dropped, rec.stats["dropped"]) == (1, 1, 1, 1)
    session.end(exhausted=True)
    async with rec:
        record, _ = await read_back(rec, session.id)
    assert record.metadata["dropped_chunks"] == 1


async def test_a_waiting_stream_gets_room_once_the_writer_writes() -> None:
    async with MemoryRecorder(max_pending=1, max_wait=None, flush_interval=0.0) as rec:
        session = StreamSession(rec)
        session.begin()
        with anyio.fail_after(5):
            for data in ["a", "bb", "ccc"]:
                session.stamp()
                await session.record(data, None)
        assert (session.count, session.char_count, session.dropped) == (3, 6, 0)
        session.end(exhausted=True)
        record, chunks = await read_back(rec, session.id)
    assert [c.data for c in chunks] == ["a", "bb", "ccc"] and "dropped_chunks" not in record.metadata


# -- followers ---------------------------------------------------------------------------------

async def test_live_followers_get_each_chunk_then_the_status() -> None:
    async with MemoryRecorder() as rec:
        session = StreamSession(rec)
        session.begin()
        assert session.live is not None and rec.live.streams[session.id] is session.live
        got: list[tuple[int, str, str | None]] = []
        follow = rec.follow(session.id)

        async def follower() -> None:
            async for chunk in follow:
                got.append((chunk.seq, chunk.data, chunk.event))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower)
                for _ in range(1000):
                    if session.live.followers:
                        break
                    await anyio.sleep(0.001)
                await anyio.sleep(0.01)  # the follower has read the (empty) record and waits
                for data, event in [("a", None), ("b", "e")]:
                    session.stamp()
                    await session.record(data, event)
                    await anyio.sleep(0.001)
                session.end(error="boom")
        assert session.id not in rec.live.streams
    assert got == [(1, "a", None), (2, "b", "e")]
    assert (follow.status, follow.error) == (StreamStatus.FAILED, "boom")


# -- cancel requests from elsewhere ----------------------------------------------------------------

async def test_a_begun_stream_hears_cancel_requests_from_another_recorder(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SQLiteRecorder(path) as here, SQLiteRecorder(path) as elsewhere:
        session = StreamSession(here)
        session.begin()
        assert session.live is not None
        asked = anyio.Event()
        session.live.on_cancel = asked.set
        with anyio.fail_after(10):
            await here.flush()
            assert await elsewhere.cancel(session.id) is True
            await asked.wait()
        assert session.end(stopped_by_request=True) is StreamStatus.CANCELLED


# -- current_stream --------------------------------------------------------------------------------

async def test_current_stream_only_inside_a_running_stream() -> None:
    with pytest.raises(LookupError):
        current_stream()
    async with MemoryRecorder() as rec:
        session = StreamSession(rec)
        with pytest.raises(LookupError):
            current_stream()  # not begun
        session.begin()
        assert current_stream() is session
        current_stream().metadata["usage"] = 7
        session.end(exhausted=True)
        with pytest.raises(LookupError):
            current_stream()
        # a new stream in the same task is current in turn
        again = StreamSession(rec)
        again.begin()
        assert current_stream() is again
        again.end()
        with pytest.raises(LookupError):
            current_stream()
        record, _ = await read_back(rec, session.id)
    assert record.metadata["usage"] == 7


async def test_a_stream_begun_inside_another_gives_it_back_when_it_ends() -> None:
    async with MemoryRecorder() as rec:
        outer = StreamSession(rec)
        outer.begin()
        inner = StreamSession(rec)
        inner.begin()
        assert current_stream() is inner
        inner.end(exhausted=True)
        assert current_stream() is outer
        outer.end(exhausted=True)
        with pytest.raises(LookupError):
            current_stream()


async def test_a_stream_ended_from_another_task_is_no_longer_current() -> None:
    async with MemoryRecorder() as rec:
        session = StreamSession(rec)
        session.begin()
        statuses: list[StreamStatus] = []

        async def ender() -> None:
            statuses.append(session.end(stopped_for_client=True))
            with pytest.raises(LookupError):
                current_stream()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ender)
        assert statuses == [StreamStatus.CANCELLED]
        with pytest.raises(LookupError):
            current_stream()
        follower = StreamSession(rec)
        follower.begin()
        assert current_stream() is follower
        follower.end()


async def test_sequence_numbers_start_at_one_per_stream() -> None:
    async with MemoryRecorder() as rec:
        a, b = StreamSession(rec), StreamSession(rec)
        a.begin()
        b.begin()
        seqs = [s.stamp() for s in itertools.islice(itertools.cycle([a, b, a]), 5)]
        assert seqs == [1, 1, 2, 3, 2]  # a, b, a, a, b
        assert (a.seq, b.seq) == (3, 2)
        b.end()
        a.end()
