"""3. Recorder write rate, and the SQLite backend's design note.

* ``buffered``: chunks/s sustained into SQLite through the library's path (a ``StreamSession``
  per stream, ``session.record`` per chunk, the buffered writer batching into the
  ``SQLiteRecorder``), clock stopped when everything is flushed; 1 and 100 concurrent streams.
* ``naive``: the usual chat-persistence loop, an ``INSERT`` and a ``COMMIT`` per chunk through
  aiosqlite on one shared connection (same schema, same WAL + synchronous=NORMAL pragmas).
* ``to_thread`` vs ``aiosqlite``: the same 2,000-chunk batches written by ``SQLiteRecorder.write``
  (stdlib sqlite3 in an anyio worker thread, one hop per batch) and, with the same schema and
  statements, by aiosqlite on asyncio (one transaction per batch).
* ``asyncio`` vs ``trio``: the buffered path, 1 stream, on each event loop.
* ``busy loop``: one batch of 1,000 streams (each a start, 50 chunks and an end) written by
  ``SQLiteBackend.write`` (a few multi-row statements) and, the same rows, one statement per
  row (``executemany``), while another Python thread spins as a busy event loop does. Each
  statement releases the GIL, and getting it back costs up to the switch interval (5 ms).

Every run writes into a fresh database file so that no contender inherits a bigger B-tree.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from asgi_stream_recorder import SQLiteRecorder
from asgi_stream_recorder.recorders import SQLiteBackend
from asgi_stream_recorder.recorders.base import Batch, Segment
from asgi_stream_recorder.session import StreamSession

from .common import alternate, say, summary

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    stream_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, event TEXT, at_ms REAL NOT NULL,
    PRIMARY KEY (stream_id, seq)
) WITHOUT ROWID;
"""
_INSERT = "INSERT OR IGNORE INTO chunks (stream_id, seq, data, event, at_ms) VALUES (?, ?, ?, ?, ?)"
WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog"]


class Scratch:
    """A temporary directory with a fresh database path per call."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="asr-bench-rec-")
        self.n = 0

    def path(self) -> str:
        self.n += 1
        return os.path.join(self.dir, f"r{self.n}.db")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the library's path -------------------------------------------------------------------------
async def buffered_rate(path: str, streams: int, total: int) -> float:
    """Chunks/s from the first ``record`` to the last chunk being durable."""
    per = total // streams
    recorder = SQLiteRecorder(path, max_wait=None)  # a full queue waits here: the rate counts every chunk
    async with recorder:

        async def one() -> None:
            session = StreamSession(recorder, metadata={"bench": True})
            session.begin()
            record, stamp = session.record, session.stamp
            for i in range(per):
                stamp()
                await record(WORDS[i & 7], None)
                if not i & 63:  # tokens arrive interleaved across streams, as from a model
                    await anyio.lowlevel.checkpoint()
            session.end(exhausted=True)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(streams):
                tg.start_soon(one)
        await recorder.flush()
        dt = time.perf_counter() - t0
        stats = recorder.stats
    if stats["dropped"] or stats["lost"]:
        raise AssertionError(f"recorder dropped chunks: {stats}")
    return per * streams / dt


# -- the naive loop -------------------------------------------------------------------------------
async def _naive_connect(path: str) -> Any:
    import aiosqlite

    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.executescript(_SCHEMA)
    await db.commit()
    return db


async def naive_rate(path: str, streams: int, total: int) -> float:
    per = total // streams
    db = await _naive_connect(path)
    try:

        async def one(k: int) -> None:
            sid = f"stream-{k:06d}-{time.time_ns()}"
            t0 = time.perf_counter()
            for i in range(per):
                await db.execute(_INSERT, (sid, i + 1, WORDS[i & 7], None, (time.perf_counter() - t0) * 1000))
                await db.commit()

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for k in range(streams):
                tg.start_soon(one, k)
        dt = time.perf_counter() - t0
    finally:
        await db.close()
    return per * streams / dt


# -- design note: one thread hop per batch vs aiosqlite -----------------------------------------
def _batches(n_batches: int, size: int = 2000) -> list[Segment]:
    sid = "0194a3b2c1d0" + "ab" * 10
    batches = []
    for b in range(n_batches):
        segment = Segment(sid)
        for i in range(size):
            segment.add(b * size + i + 1, WORDS[i & 7], None, float(i))
        batches.append(segment)
    return batches


async def to_thread_rate(path: str, batches: list[Segment]) -> float:
    backend = SQLiteBackend(path)
    await backend.connect()  # the backend only: no writer task, we call write() ourselves
    try:
        t0 = time.perf_counter()
        for segment in batches:
            await backend.write(Batch(segments=[segment]))
        dt = time.perf_counter() - t0
    finally:
        await backend.close()
    return sum(map(len, batches)) / dt


async def aiosqlite_rate(path: str, batches: list[Segment]) -> float:
    """The same batches, the same schema and statements as ``SQLiteRecorder.write``, through aiosqlite."""
    import aiosqlite

    from asgi_stream_recorder.recorders.sqlite import _INSERT_SEGMENT, _segment_rows

    schema = SQLiteBackend(path)
    await schema.connect()  # creates our schema
    await schema.close()
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute("PRAGMA synchronous=NORMAL")
        t0 = time.perf_counter()
        for segment in batches:
            await db.execute("BEGIN IMMEDIATE")
            await db.executemany(_INSERT_SEGMENT, _segment_rows([segment]))
            await db.execute("COMMIT")
        dt = time.perf_counter() - t0
    finally:
        await db.close()
    return sum(map(len, batches)) / dt


def _busy_batches(tag: str, n: int = 1000, chunks: int = 50) -> tuple[Batch, Batch]:
    from asgi_stream_recorder.recorders.base import StreamEnd, StreamStart, StreamStatus

    starts = [StreamStart(f"{tag}-{i}", 1.0) for i in range(n)]
    segments = []
    for i in range(n):
        segment = Segment(f"{tag}-{i}")
        for q in range(1, chunks + 1):
            segment.add(q, WORDS[q & 7], None, float(q))
        segments.append(segment)
    ends = [StreamEnd(f"{tag}-{i}", StreamStatus.COMPLETED, 2.0, content="x", chunk_count=chunks) for i in range(n)]
    return Batch(starts, segments, []), Batch([], [], ends)


def _per_row_write(con: Any, batch: Batch) -> None:
    """The same rows as ``SQLiteBackend.write``, one statement per row (as it was before)."""
    from asgi_stream_recorder.recorders.sqlite import _INSERT_SEGMENT, _INSERT_STREAM, _dumps, _segment_rows

    con.executemany(_INSERT_STREAM, [(s.id, s.created_at, _dumps(s.metadata), s.path, s.method, s.text_event,
                                      s.owner, s.key, s.format) for s in batch.starts])
    con.executemany(_INSERT_SEGMENT, _segment_rows(batch.segments))
    for end in batch.ends:
        con.execute("UPDATE streams SET status = ?, completed_at = ?, error = ?, metadata = ?, chunk_count = ?,"
                    " content = ? WHERE id = ?", (str(end.status), end.completed_at, end.error,
                                                  _dumps(end.metadata), end.chunk_count, end.content, end.id))
        con.execute("DELETE FROM cancels WHERE stream_id = ?", (end.id,))


def busy_write_ms(path: str, way: str, busy: bool) -> float:
    """Milliseconds to write 1,000 streams' records (two transactions), optionally beside a spinning thread."""
    import threading

    from asgi_stream_recorder.recorders.sqlite import _write_batch

    async def run() -> float:
        backend = SQLiteBackend(path)
        await backend.connect()
        try:
            first, second = _busy_batches(way)
            write = _write_batch if way == "ours" else _per_row_write
            t0 = time.perf_counter()
            for batch in (first, second):
                await backend._writing(lambda con, b=batch: write(con, b))
            return (time.perf_counter() - t0) * 1000
        finally:
            await backend.close()

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(100))

    spinner = threading.Thread(target=spin, daemon=True)
    if busy:
        spinner.start()
    try:
        return float(anyio.run(run))
    finally:
        stop.set()
        if busy:
            spinner.join()


def main(quick: bool) -> dict[str, Any]:
    scratch = Scratch()
    rounds = 2 if quick else 3
    total = 50_000 if quick else 500_000
    naive_total = 1_000 if quick else 10_000
    out: dict[str, Any] = {"rounds": rounds, "chunks_per_run": total, "naive_chunks_per_run": naive_total}

    def on(backend: str, fn: Callable[..., Any], *args: Any) -> Callable[[], float]:
        async def bounded() -> float:
            with anyio.fail_after(300):  # every loop is bounded in time
                return float(await fn(*args))

        def go() -> float:
            return float(anyio.run(bounded, backend=backend))

        return go

    try:
        for streams in (1, 100):
            say(f"  recorder: {streams} stream(s)")
            samples = alternate(
                {
                    "buffered": lambda s=streams: on("asyncio", buffered_rate, scratch.path(), s, total)(),
                    "naive": lambda s=streams: on("asyncio", naive_rate, scratch.path(), s, naive_total)(),
                },
                rounds,
                say,
            )
            s = summary(samples)
            s["ratio_buffered_to_naive"] = s["buffered"]["median"] / s["naive"]["median"]
            out[f"streams_{streams}"] = s

        say("  design note: to_thread vs aiosqlite, same batches")
        batches = _batches(15 if quick else 150)
        samples = alternate(
            {
                "to_thread": lambda: on("asyncio", to_thread_rate, scratch.path(), batches)(),
                "aiosqlite": lambda: on("asyncio", aiosqlite_rate, scratch.path(), batches)(),
            },
            rounds,
            say,
        )
        s = summary(samples)
        s["ratio_to_thread_to_aiosqlite"] = s["to_thread"]["median"] / s["aiosqlite"]["median"]
        out["batched_paths"] = s

        say("  design note: asyncio vs trio, buffered path, 1 stream")
        samples = alternate(
            {
                "asyncio": lambda: on("asyncio", buffered_rate, scratch.path(), 1, total)(),
                "trio": lambda: on("trio", buffered_rate, scratch.path(), 1, total)(),
            },
            rounds,
            say,
        )
        s = summary(samples)
        s["ratio_trio_to_asyncio"] = s["trio"]["median"] / s["asyncio"]["median"]
        out["event_loops"] = s

        say("  design note: a batch of 1,000 streams beside a busy thread")
        samples = alternate(
            {f"{way}_{'busy' if busy else 'idle'}": (lambda w=way, b=busy: busy_write_ms(scratch.path(), w, b))
             for way in ("ours", "per_row") for busy in (False, True)},
            1 if quick else rounds,
            say,
        )
        out["busy_loop_ms"] = summary(samples)
    finally:
        scratch.cleanup()
    return out

