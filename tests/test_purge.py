"""Retention: ``recorder.purge`` deletes old finished streams with their chunks, on every backend,
never a stream still streaming, and says how many."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Collection
from datetime import timedelta

import anyio
import pytest

from asgi_stream_recorder import Recorder, StreamStatus
from asgi_stream_recorder.recorders import Backend
from asgi_stream_recorder.recorders.base import Batch, Chunk, StreamEnd, StreamRecord, StreamStart, process_owner
from asgi_stream_recorder.session import StreamSession
from tests.backends import Place, every_kind, place_fixture  # noqa: F401 - fixtures "kind", "place"

pytestmark = pytest.mark.anyio

DAY = 86400.0
FINISHED = [s for s in StreamStatus if s is not StreamStatus.STREAMING]


@pytest.fixture
async def recorder(place: Place) -> AsyncIterator[Recorder]:
    # A long lease: the old streams left streaming here must not be ended by a sweep meanwhile.
    async with place.recorder(lease=3600) as rec:
        yield rec


def record(recorder: Recorder, *, age_days: float, status: StreamStatus | None, chunks: Collection[str] = "abc",
           key: str | None = "conv") -> str:
    """Queue a stream created ``age_days`` ago with ``chunks``, ended with ``status`` (None: still streaming)."""
    sid = uuid.uuid4().hex
    created = time.time() - age_days * DAY
    recorder.start(StreamStart(sid, created, "/chat", "POST", {"n": 1}, owner=process_owner(), key=key))
    for seq, text in enumerate(chunks, 1):
        assert recorder.put_chunk(sid, seq, text, None, seq * 10.0)
    if status is not None:
        error = "RuntimeError: boom" if status is StreamStatus.FAILED else None
        recorder.finish(StreamEnd(sid, status, created + 1.0, error, {"n": 2}))
    return sid


async def ids(recorder: Recorder, **filters: str) -> set[str]:
    return {r.id for r in await recorder.list_streams(limit=1000, **filters)}


async def test_purge_deletes_old_finished_streams_with_their_chunks(recorder: Recorder) -> None:
    old = {status: record(recorder, age_days=10, status=status) for status in FINISHED}
    old_streaming = record(recorder, age_days=10, status=None)
    new = {record(recorder, age_days=0.5, status=StreamStatus.COMPLETED),
           record(recorder, age_days=0.5, status=StreamStatus.FAILED)}
    await recorder.flush()

    assert await recorder.purge(timedelta(days=7), dry_run=True) == len(FINISHED)
    assert len(await ids(recorder)) == len(FINISHED) + 3  # a dry run deletes nothing

    assert await recorder.purge(timedelta(days=7)) == len(FINISHED)
    for sid in old.values():
        assert await recorder.get(sid) is None
        assert await recorder.chunks(sid) == []
    kept = {old_streaming, *new}
    assert await ids(recorder) == kept
    assert await ids(recorder, key="conv") == kept  # the key's index forgot them too
    for status in FINISHED:
        assert old[status] not in await ids(recorder, status=status)
    survivor = await recorder.get(old_streaming)
    assert survivor is not None and survivor.status is StreamStatus.STREAMING
    assert [c.data for c in await recorder.chunks(old_streaming)] == ["a", "b", "c"]
    assert await recorder.purge(timedelta(days=7)) == 0
    assert await recorder.purge(timedelta(hours=1), dry_run=True) == 2
    assert await recorder.purge(timedelta(hours=1)) == 2
    assert await ids(recorder) == {old_streaming}


async def test_purge_only_the_statuses_asked_for(recorder: Recorder) -> None:
    made = {status: record(recorder, age_days=3, status=status) for status in FINISHED}
    await recorder.flush()

    assert await recorder.purge(timedelta(days=2), status="failed", dry_run=True) == 1
    assert await recorder.purge(timedelta(days=2), status=StreamStatus.FAILED) == 1
    assert await recorder.get(made[StreamStatus.FAILED]) is None
    assert await recorder.purge(timedelta(days=2), status=[StreamStatus.CANCELLED, "interrupted"]) == 2
    assert await ids(recorder) == {made[StreamStatus.COMPLETED]}
    assert await recorder.purge(timedelta(days=4)) == 0  # not old enough

    with pytest.raises(ValueError, match="streaming"):
        await recorder.purge(timedelta(days=2), status=["completed", "streaming"])
    with pytest.raises(ValueError, match="at least 0"):
        await recorder.purge(-1.0)
    with pytest.raises(ValueError):
        await recorder.purge(timedelta(days=2), status="gone")
    assert await ids(recorder) == {made[StreamStatus.COMPLETED]}


async def test_a_stream_being_recorded_is_never_purged(recorder: Recorder) -> None:
    session = StreamSession(recorder, metadata={"model": "m"})
    session.begin()
    session.stamp()
    await session.record("first ", None)
    done = record(recorder, age_days=0, status=StreamStatus.COMPLETED)
    await recorder.flush()
    await anyio.sleep(0.01)

    assert await recorder.purge(0) == 1  # everything finished, however young
    assert await recorder.get(done) is None
    live = await recorder.get(session.id)
    assert live is not None and live.status is StreamStatus.STREAMING

    session.stamp()
    await session.record("and more", None)
    session.end(exhausted=True)
    await recorder.flush()
    ended = await recorder.get(session.id)
    assert ended is not None and ended.status is StreamStatus.COMPLETED
    assert ended.content == "first and more"
    assert [c.seq for c in await recorder.chunks(session.id)] == [1, 2]


async def test_purge_goes_through_every_batch(recorder: Recorder) -> None:
    made = [record(recorder, age_days=2, status=FINISHED[i % 2], chunks=[f"c{i}", "x"]) for i in range(23)]
    keep = record(recorder, age_days=0.1, status=StreamStatus.COMPLETED)
    await recorder.flush()
    assert await recorder.purge(timedelta(days=1), batch_size=4) == len(made)
    assert await ids(recorder) == {keep}
    assert [await recorder.chunks(sid) for sid in made] == [[]] * len(made)


async def test_two_purges_at_once_delete_each_stream_once(recorder: Recorder) -> None:
    for i in range(30):
        record(recorder, age_days=2, status=FINISHED[i % 4])
    await recorder.flush()
    counts: list[int] = []

    async def purge() -> None:
        counts.append(await recorder.purge(timedelta(days=1), batch_size=3))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(purge)
            tg.start_soon(purge)
    assert sum(counts) == 30
    assert await ids(recorder) == set()


@pytest.mark.parametrize("kind", ["redis"])
async def test_redis_purge_skips_streams_already_expired(place: Place) -> None:
    """With ``ttl``, ids of expired streams stay in the indexes until swept: purge passes them by."""
    from asgi_stream_recorder.recorders.redis import RedisRecorder

    async with RedisRecorder(place.url.split("?")[0], prefix=f"{place.name}:", ttl=0.3, lease=3600) as rec:
        for status in FINISHED:
            record(rec, age_days=2, status=status)
        await rec.flush()
        await anyio.sleep(0.6)  # the keys expire; their ids stay in the indexes
        with anyio.fail_after(10):
            assert await rec.purge(timedelta(days=1)) == 0
        kept = record(rec, age_days=2, status=StreamStatus.COMPLETED)
        await rec.flush()
        assert await rec.purge(timedelta(days=1)) == 1
        assert await rec.get(kept) is None


class Minimal(Backend):
    """A backend written without purge."""

    async def write(self, batch: Batch) -> None:
        pass

    async def get(self, stream_id: str) -> StreamRecord | None:
        return None

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        return []

    async def list_streams(self, status: StreamStatus | str | None = None, limit: int = 100,
                           key: str | None = None) -> list[StreamRecord]:
        return []

    async def heartbeat(self, owner: str, at: float) -> None:
        pass

    async def recover(self, stale_before: float) -> int:
        return 0


async def test_a_backend_without_purge_says_so() -> None:
    async with Recorder(Minimal()) as rec:
        with pytest.raises(NotImplementedError, match="Minimal cannot purge"):
            await rec.purge(timedelta(days=1))
