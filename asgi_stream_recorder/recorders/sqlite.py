"""SQLite, the embedded default: one file, WAL mode, one transaction per batch.

One code path for asyncio and trio: stdlib ``sqlite3`` run in a worker thread through
``anyio.to_thread``. That is what aiosqlite does too (a thread per connection), and it
only runs on asyncio; the thread hop happens once per batch, not per chunk, so it costs
nothing measurable (see ``bench/``). A writer connection and a reader connection, each
used by one thread at a time, let reads run while a batch is being written.
"""

from __future__ import annotations

import array
import itertools
import json
import operator
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from .base import Batch, Chunk, Recorder, StreamRecord, StreamStatus, dump_metadata, to_datetime

__all__ = ["SCHEMA_VERSION", "SQLiteRecorder"]

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    id           TEXT PRIMARY KEY,
    status       TEXT NOT NULL,
    created_at   REAL NOT NULL,
    completed_at REAL,
    error        TEXT,
    metadata     TEXT NOT NULL DEFAULT '{}',
    path         TEXT,
    method       TEXT,
    text_event   TEXT,
    owner        TEXT NOT NULL DEFAULT '',
    chunk_count  INTEGER,
    content      TEXT
);
CREATE INDEX IF NOT EXISTS streams_created ON streams (created_at DESC);
CREATE INDEX IF NOT EXISTS streams_status ON streams (status, created_at DESC);
-- A stream's chunks are stored in segments: one row per stream per written batch, holding a
-- run of consecutive seqs (first_seq, first_seq + 1, ...) as column arrays: data and events
-- as JSON (events NULL when all are the default), times as float64 milliseconds. One B-tree
-- insert per segment instead of per chunk, and no per-chunk work in Python, is what lets the
-- recorder keep up with many fast streams. The chunks view shows them one per row.
CREATE TABLE IF NOT EXISTS segments (
    stream_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    data      TEXT NOT NULL,
    events    TEXT,
    at_ms     BLOB NOT NULL,
    PRIMARY KEY (stream_id, first_seq)
) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS chunks AS
    SELECT s.stream_id AS stream_id, s.first_seq + d.key AS seq, d.value AS data,
           CASE WHEN s.events IS NULL THEN NULL ELSE json_extract(s.events, '$[' || d.key || ']') END AS event
    FROM segments AS s, json_each(s.data) AS d;
"""

# The statements, shared by every path that writes or reads.
_INSERT_STREAM = (
    "INSERT OR IGNORE INTO streams (id, status, created_at, metadata, path, method, text_event, owner)"
    " VALUES (?, 'streaming', ?, ?, ?, ?, ?, ?)"
)
_INSERT_SEGMENT = (
    "INSERT OR IGNORE INTO segments (stream_id, first_seq, last_seq, data, events, at_ms) VALUES (?, ?, ?, ?, ?, ?)"
)
_SEGMENTS_OF = (
    "SELECT first_seq, data, events, at_ms FROM segments WHERE stream_id = ? AND last_seq > ? ORDER BY first_seq"
)
_END_STREAM = (
    "UPDATE streams SET status = ?, completed_at = ?, error = ?, metadata = ?, chunk_count = ?, content = ?"
    " WHERE id = ?"
)
_COLUMNS = "id, status, created_at, completed_at, error, metadata, path, method, text_event, chunk_count, content"
_BY_STREAM, _DATA, _EVENT, _AT = (operator.itemgetter(i) for i in (0, 2, 3, 4))
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _pack(times: list[float]) -> bytes:
    packed = array.array("d", times)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _unpack(blob: bytes) -> array.array[float]:
    times = array.array("d")
    times.frombytes(blob)
    if sys.byteorder == "big":
        times.byteswap()
    return times


class SQLiteRecorder(Recorder):
    """Record streams into the SQLite file at ``path`` (created with its schema on open)."""

    def __init__(self, path: str | Path = "streams.db", **options: Any) -> None:
        super().__init__(**options)
        if str(path) == ":memory:":
            raise ValueError("SQLiteRecorder needs a file (it uses two connections): use MemoryRecorder for tests")
        self.path = str(path)
        self._wcon: sqlite3.Connection | None = None
        self._rcon: sqlite3.Connection | None = None
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteRecorder({self.path!r})"

    # -- connections ---------------------------------------------------------------------
    def _connect_sync(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        wcon = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        try:
            wcon.execute("PRAGMA journal_mode=WAL")
            wcon.execute("PRAGMA synchronous=NORMAL")
            version = wcon.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this library's {SCHEMA_VERSION}: upgrade"
                )
            if version < SCHEMA_VERSION:
                wcon.executescript(f"BEGIN IMMEDIATE; {_SCHEMA}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            rcon = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        except BaseException:
            wcon.close()
            raise
        return wcon, rcon

    async def connect(self) -> None:
        self._wcon, self._rcon = await anyio.to_thread.run_sync(self._connect_sync)

    async def disconnect(self) -> None:
        wcon, rcon, self._wcon, self._rcon = self._wcon, self._rcon, None, None
        for con in (wcon, rcon):
            if con is not None:
                await anyio.to_thread.run_sync(con.close)

    async def _writing(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._wlock:
                if self._wcon is None:
                    raise RuntimeError("SQLiteRecorder is closed")
                con = self._wcon
                con.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(con)
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                return result

        return await anyio.to_thread.run_sync(run)

    async def _reading(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._rlock:
                if self._rcon is None:
                    raise RuntimeError("SQLiteRecorder is closed: open it (async with recorder) before reading")
                return fn(self._rcon)

        return await anyio.to_thread.run_sync(run)

    # -- writing -----------------------------------------------------------------------
    async def write(self, batch: Batch) -> None:
        await self._writing(lambda con: _write_batch(con, batch))

    async def recover(self, is_orphan: Callable[[str], bool]) -> int:
        def run(con: sqlite3.Connection) -> int:
            rows = con.execute("SELECT id, owner, text_event, metadata FROM streams WHERE status = 'streaming'")
            orphans = [row for row in rows.fetchall() if is_orphan(row[1])]
            for sid, _, text_event, metadata in orphans:
                meta = json.loads(metadata)
                meta["recovered"] = True
                content, count = _text_and_count(con, sid, text_event)
                _freeze(con, sid, StreamStatus.INTERRUPTED, None, "process ended mid-stream", meta, content, count)
            return len(orphans)

        return await self._writing(run)

    # -- reading -----------------------------------------------------------------------
    async def get(self, stream_id: str) -> StreamRecord | None:
        def run(con: sqlite3.Connection) -> StreamRecord | None:
            row = con.execute(f"SELECT {_COLUMNS} FROM streams WHERE id = ?", (stream_id,)).fetchone()
            return None if row is None else _record(con, row)

        return await self._reading(run)

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        def run(con: sqlite3.Connection) -> list[Chunk]:
            return [c for c in _chunks_of(con, stream_id, after) if c.seq > after]

        return await self._reading(run)

    async def list_streams(self, status: StreamStatus | str | None = None, limit: int = 100) -> list[StreamRecord]:
        def run(con: sqlite3.Connection) -> list[StreamRecord]:
            if status is None:
                rows = con.execute(f"SELECT {_COLUMNS} FROM streams ORDER BY created_at DESC LIMIT ?", (limit,))
            else:
                rows = con.execute(
                    f"SELECT {_COLUMNS} FROM streams WHERE status = ? ORDER BY created_at DESC LIMIT ?",
                    (str(StreamStatus(status)), limit),
                )
            return [_record(con, row) for row in rows.fetchall()]

        return await self._reading(run)


def _write_batch(con: sqlite3.Connection, batch: Batch) -> None:
    if batch.starts:
        con.executemany(
            _INSERT_STREAM,
            [
                (s.id, s.created_at, dump_metadata(s.metadata), s.path, s.method, s.text_event, s.owner)
                for s in batch.starts
            ],
        )
    if batch.chunks:
        con.executemany(_INSERT_SEGMENT, _segments(batch.chunks))
    for end in batch.ends:
        content, count = end.content, end.chunk_count
        if content is None or count is None:
            row = con.execute("SELECT text_event FROM streams WHERE id = ?", (end.id,)).fetchone()
            if row is None:
                raise RuntimeError(f"stream {end.id} ended but was never started")
            content, count = _text_and_count(con, end.id, row[0])
        _freeze(con, end.id, end.status, end.completed_at, end.error, end.metadata, content, count)


def _freeze(
    con: sqlite3.Connection,
    stream_id: str,
    status: StreamStatus,
    completed_at: float | None,
    error: str | None,
    metadata: dict[str, Any],
    content: str,
    count: int,
) -> None:
    if completed_at is None:
        completed_at = time.time()
    params = (str(status), completed_at, error, dump_metadata(metadata), count, content, stream_id)
    if con.execute(_END_STREAM, params).rowcount != 1:
        raise RuntimeError(f"stream {stream_id} ended but was never started")


def _segments(chunks: list[Chunk]) -> list[tuple[Any, ...]]:
    """Rows for the segments table: per stream, runs of consecutive seqs, as column arrays."""
    rows: list[tuple[Any, ...]] = []
    # Stable sort: each stream's chunks stay in seq order, as they were queued.
    for stream_id, group in itertools.groupby(sorted(chunks, key=_BY_STREAM), _BY_STREAM):
        run = list(group)
        if run[-1].seq - run[0].seq + 1 == len(run):
            runs = [run]
        else:  # a gap (a dropped chunk): split into runs of consecutive seqs
            cuts = [i for i in range(1, len(run)) if run[i].seq != run[i - 1].seq + 1]
            runs = [run[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(run)], strict=True)]
        for part in runs:
            events = list(map(_EVENT, part))
            rows.append((stream_id, part[0].seq, part[-1].seq, _dumps(list(map(_DATA, part))),
                         _dumps(events) if any(events) else None, _pack(list(map(_AT, part)))))
    return rows


def _chunks_of(con: sqlite3.Connection, stream_id: str, after: int) -> list[Chunk]:
    """The stream's chunks from the segments holding seqs after ``after`` (whole segments)."""
    result: list[Chunk] = []
    for first, data, events, times in con.execute(_SEGMENTS_OF, (stream_id, after)).fetchall():
        texts = json.loads(data)
        names = json.loads(events) if events is not None else [None] * len(texts)
        result.extend(
            Chunk(stream_id, first + i, text, name, at)
            for i, (text, name, at) in enumerate(zip(texts, names, _unpack(times), strict=True))
        )
    return result


def _text_and_count(con: sqlite3.Connection, stream_id: str, text_event: str | None) -> tuple[str, int]:
    """The stream's text (its chunks of the text event, in order) and how many chunks it has."""
    chunks = _chunks_of(con, stream_id, 0)
    return "".join(c.data for c in chunks if c.event == text_event), len(chunks)


def _record(con: sqlite3.Connection, row: tuple[Any, ...]) -> StreamRecord:
    sid, status, created, completed, error, metadata, path, method, text_event, count, content = row
    if count is None:  # still streaming: read what has been written so far
        content, count = _text_and_count(con, sid, text_event)
    created_dt = to_datetime(created)
    assert created_dt is not None
    return StreamRecord(
        id=sid,
        status=StreamStatus(status),
        created_at=created_dt,
        completed_at=to_datetime(completed),
        content=content,
        chunk_count=count,
        error=error,
        metadata=json.loads(metadata),
        path=path,
        method=method,
    )
