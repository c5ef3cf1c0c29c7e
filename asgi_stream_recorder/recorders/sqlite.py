"""SQLite, the embedded default: one file, WAL mode, one transaction per batch.

One code path for asyncio and trio: stdlib ``sqlite3`` run in a worker thread through
``anyio.to_thread``. That is what aiosqlite does too (a thread per connection), and it
only runs on asyncio; the thread hop happens once per batch, not per chunk, so it costs
nothing measurable (see ``bench/``). A writer connection and a reader connection, each
used by one thread at a time, let reads run while a batch is being written.
"""

from __future__ import annotations

import json
import sqlite3
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
CREATE TABLE IF NOT EXISTS chunks (
    stream_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    data      TEXT NOT NULL,
    event     TEXT,
    at_ms     REAL NOT NULL,
    PRIMARY KEY (stream_id, seq)
) WITHOUT ROWID;
"""

# The statements, shared by every path that writes or reads.
_INSERT_STREAM = (
    "INSERT OR IGNORE INTO streams (id, status, created_at, metadata, path, method, text_event, owner)"
    " VALUES (?, 'streaming', ?, ?, ?, ?, ?, ?)"
)
_INSERT_CHUNK = "INSERT OR IGNORE INTO chunks (stream_id, seq, data, event, at_ms) VALUES (?, ?, ?, ?, ?)"
_TEXT_OF = "SELECT data FROM chunks WHERE stream_id = ? AND event IS ? ORDER BY seq"
_COUNT_OF = "SELECT count(*) FROM chunks WHERE stream_id = ?"
_END_STREAM = (
    "UPDATE streams SET status = ?, completed_at = ?, error = ?, metadata = ?, chunk_count = ?, content = ?"
    " WHERE id = ?"
)
_COLUMNS = "id, status, created_at, completed_at, error, metadata, path, method, text_event, chunk_count, content"


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
                _freeze(con, sid, text_event, StreamStatus.INTERRUPTED, None, "process ended mid-stream", meta)
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
            rows = con.execute(
                "SELECT stream_id, seq, data, event, at_ms FROM chunks WHERE stream_id = ? AND seq > ? ORDER BY seq",
                (stream_id, after),
            )
            return [Chunk(*row) for row in rows.fetchall()]

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
        con.executemany(_INSERT_CHUNK, batch.chunks)
    for end in batch.ends:
        row = con.execute("SELECT text_event FROM streams WHERE id = ?", (end.id,)).fetchone()
        if row is None:
            raise RuntimeError(f"stream {end.id} ended but was never started")
        _freeze(con, end.id, row[0], end.status, end.completed_at, end.error, end.metadata)


def _freeze(
    con: sqlite3.Connection,
    stream_id: str,
    text_event: str | None,
    status: StreamStatus,
    completed_at: float | None,
    error: str | None,
    metadata: dict[str, Any],
) -> None:
    content = "".join(r[0] for r in con.execute(_TEXT_OF, (stream_id, text_event)))
    count = con.execute(_COUNT_OF, (stream_id,)).fetchone()[0]
    if completed_at is None:
        completed_at = time.time()
    con.execute(_END_STREAM, (str(status), completed_at, error, dump_metadata(metadata), count, content, stream_id))


def _record(con: sqlite3.Connection, row: tuple[Any, ...]) -> StreamRecord:
    sid, status, created, completed, error, metadata, path, method, text_event, count, content = row
    if count is None:  # still streaming: read what has been written so far
        content = "".join(r[0] for r in con.execute(_TEXT_OF, (sid, text_event)))
        count = con.execute(_COUNT_OF, (sid,)).fetchone()[0]
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
